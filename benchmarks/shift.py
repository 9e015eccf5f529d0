"""Vendor-shift benchmark: leave-one-vendor-out federations, methods side by side.

For each held-out vendor, the other vendors' sites federate (through Flower's
Simulation Engine: the same ServerApp and ClientApp that deploy); the held-out site
never trains: it builds its bank from ``--support`` annotated cases of its own and is
evaluated on its other cases with the final global model. Every training site's
in-federation validation is reported too. Local-only and centralised pooled training
run in this process with the same budget (rounds x local epochs x image size).

    jras bench shift --quick                      # < 3 min, 2 cores
    jras bench shift --dataset mnms-sample --seeds 0,1,2 --out runs/shift-mnms

Writes to ``--out``: ``results.csv`` (one row per method, held-out vendor, evaluated
site and seed; written after every run, and a re-run skips what it holds),
``report.md`` (tables), ``heldout_dice.png`` (bar chart), ``gallery-<vendor>.png``
(query, retrieved guides with their similarity, prediction, ground truth),
``runs/<method>/heldout-<vendor>-s<seed>/`` (TensorBoard, checkpoints, Flower log)
and ``sites/`` (the site YAMLs of the federations).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jras_core.files import SHARED_DATA

if TYPE_CHECKING:  # heavy imports stay out of `jras --help`
    from jras_core.config import JRASConfig
    from jras_core.models.jras import JRASModel
    from jras_core.site import Site, SiteConfig

log = logging.getLogger(__name__)

PLAIN = {"segmenter.fusion": "none", "augment.intensity": False}
AUGMENTED = {"segmenter.fusion": "none", "augment.intensity": True}
RETRIEVAL = {"augment.intensity": True}


@dataclass(frozen=True)
class Method:
    """One compared method.

    Attributes:
        name: the name used on the command line and in the results.
        kind: ``local`` (each site alone), ``federated`` (Simulation Engine) or
            ``central`` (pooled training: an upper bound, not private).
        strategy: the server strategy of a federated method.
        overrides: method-config overrides (dotted keys).
        finetune: fine-tune the final model on the held-out site's support cases
            before evaluating it there (an adaptation competitor to retrieval).
        description: one line for the report.
        trains_as: the method whose training runs (folder) this one shares: set for a
            variant whose overrides change inference only (:data:`INFERENCE_KEYS`).
        server: run-config entries of the federation's server (e.g. ``strategy``,
            ``server-momentum``), over the benchmark's own.
    """

    name: str
    kind: str
    description: str
    strategy: str = "fedavg"
    overrides: Mapping[str, Any] = field(default_factory=dict)
    finetune: bool = False
    trains_as: str | None = None
    server: Mapping[str, Any] = field(default_factory=dict)

    @property
    def training_key(self) -> tuple:
        """Methods with equal keys share one training run (e.g. with and without fine-tuning,
        or, for a federation, with another inference option)."""
        training = {k: v for k, v in self.overrides.items() if not (self.kind == "federated" and _inference_only(k))}
        return (self.kind, self.strategy, json.dumps(training, sort_keys=True, default=str),
                json.dumps(dict(self.server), sort_keys=True, default=str))

    @property
    def uses_retrieval(self) -> bool:
        return self.overrides.get("segmenter.fusion", "concat") != "none"


INFERENCE_KEYS = ("retrieval.test_passes", "retrieval.test_draws", "augment.test_views", "postprocess.", "adapt.")
"""Method-config keys (or key prefixes) that change inference only, never training."""


def _inference_only(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in INFERENCE_KEYS)


def _changes_training_sites(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether two methods' overrides evaluate the training sites differently (``adapt.*``
    applies to held-out sites only)."""
    keys = {k for k in {*before, *after} if before.get(k) != after.get(k)}
    return any(not k.startswith("adapt.") for k in keys)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("local", "local", "each site trains alone; the held-out vendor gets the mean of the local models", overrides=PLAIN),
    Method("fedavg", "federated", "FedAvg, no retrieval, no augmentation", "fedavg", PLAIN),
    Method("fedavg+aug", "federated", "FedAvg with strong intensity augmentation (the baseline to beat)", "fedavg", AUGMENTED),
    Method("fedprox", "federated", "FedProx (mu 0.01), no retrieval, no augmentation", "fedprox", PLAIN),
    Method("fedbn", "federated", "FedBN (norm layers stay local; held-out site re-estimates them, AdaBN)", "fedbn", PLAIN),
    Method("jras-fedavg", "federated", "J-RAS + FedAvg (segmenter and retriever aggregated)", "fedavg", RETRIEVAL),
    Method("jras-fedbn", "federated", "J-RAS + FedBN (held-out site re-estimates norm statistics, AdaBN)", "fedbn", RETRIEVAL),
    Method("jras-frozen", "federated", "J-RAS + FedAvg with a frozen (untrained) retriever: ablation", "fedavg",
           {**RETRIEVAL, "retriever.mode": "frozen"}),
    Method("central", "central", "pooled training of all training sites with augmentation (upper bound, not private)",
           overrides=AUGMENTED),
    Method("fedavg+aug+ft", "federated", "FedAvg + augmentation, then fine-tuned on the held-out support cases",
           "fedavg", AUGMENTED, finetune=True),
    Method("jras-fedavg+ft", "federated", "J-RAS + FedAvg, then fine-tuned on the held-out support cases",
           "fedavg", RETRIEVAL, finetune=True),
]}
DEFAULT_METHODS = ["local", "fedavg", "fedavg+aug", "fedprox", "fedbn", "jras-fedavg", "jras-fedbn", "jras-frozen",
                   "central"]
QUICK = {"dataset": "synthetic", "heldout": "D", "methods": "fedavg+aug,jras-fedavg", "seeds": "0",
         "rounds": 2, "local_epochs": 1, "size": 32, "cases": 6, "support": 2, "ft_epochs": 1}
DEFAULTS = {"dataset": "synthetic", "methods": ",".join(DEFAULT_METHODS), "seeds": "0,1,2", "rounds": 10,
            "local_epochs": 1, "size": 128, "cases": 12, "support": 5, "ft_epochs": None}
"""The values of the options left unset (after :data:`QUICK`'s under ``--quick``)."""



def parse_methods(text: str, table: Mapping[str, Method] | None = None) -> list[Method]:
    """The methods of ``--methods``: comma-separated names of ``table`` (default :data:`METHODS`);
    a name may carry method-config overrides in brackets, ``jras-fedavg[retriever.pool_grid=4;
    retrieval.k=5]`` (a lever study: the whole item is the method's name in the results), and
    a federated one the server's run-config entries (keys without a dot),
    ``fedavg+aug[strategy=fedavgm;server-momentum=0.9]``. A variant of inference options only
    shares the training run of its base method (or of the method its base shares)."""
    from federation.protocol import parse_method_overrides
    from jras_core.config import ConfigError
    from server.settings import ServerSettings

    table = METHODS if table is None else table

    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
            continue
        depth += (ch == "[") - (ch == "]")
        current += ch
    items.append(current)
    out: list[Method] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        base, bracket, rest = item.partition("[")
        base = base.strip()
        if base not in table:
            raise ConfigError(f"--methods: unknown {base!r}; choose from {', '.join(table)}")
        method = table[base]
        if bracket:
            if not rest.endswith("]"):
                raise ConfigError(f"--methods: {item!r}: overrides go in brackets, e.g. jras-fedavg[retrieval.k=5]")
            extra = parse_method_overrides(rest[:-1])
            server = {k: extra.pop(k) for k in [k for k in extra if "." not in k]}
            unknown = [k for k in server if k not in ServerSettings.KEYS]
            if unknown or (server and method.kind != "federated"):
                what = f"unknown server setting {unknown[0]!r}" if unknown else f"{base} has no server"
                raise ConfigError(f"--methods: {item!r}: {what}; method-config keys are dotted (retrieval.k=5), "
                                  f"server settings are run-config keys of a federated method (server-momentum=0.9)")
            shares = method.kind == "federated" and not server and all(_inference_only(k) for k in extra)
            method = dataclasses.replace(method, name=item, overrides={**method.overrides, **extra},
                                         server={**method.server, **server},
                                         strategy=str(server.get("strategy", method.strategy)),
                                         description=f"{method.description}; with {rest[:-1]}",
                                         trains_as=(method.trains_as or base) if shares else None)
        if any(m.name == method.name for m in out):
            raise ConfigError(f"--methods: {method.name!r} is listed twice")
        out.append(method)
    if not out:
        raise ConfigError("--methods: no method given")
    return out


BASE_COLUMNS = ["method", "heldout", "site", "role", "seed"]
FINETUNE = ["ft_epochs_run", "ft_best_epoch", "ft_val_dice_start", "ft_val_dice_best"]
"""What a ``+ft`` method's fine-tuning did at the held-out site (:class:`jras_core.training.finetune.Adaptation`)."""
TAIL_COLUMNS = ["hd95_mean", "guide_dice", "dice_oracle", "dice_random", "dice_noguide", "rounds", "local_epochs",
                "size", "wall_s", "bytes_per_round", "peak_rss_mb", *FINETUNE]
MNMS_SAMPLE = SHARED_DATA / "mnms-sample" / "manifest.csv"
"""The M&Ms sample fixture beside the project folder (``--dataset mnms-sample``)."""


# --------------------------------------------------------------------------- data


@dataclass
class VendorData:
    """The data source of one vendor's site."""

    vendor: str
    source: Any  # DataSourceConfig
    val_fraction: float


def vendor_sites(dataset: str, cases: int, size: int, data_seed: int) -> list[VendorData]:
    """One site per vendor of ``dataset`` (``synthetic``, ``mnms-sample`` or a manifest CSV)."""
    from jras_core.config import ConfigError
    from jras_core.data.sources import DataSourceConfig

    if dataset == "synthetic":
        from jras_core.data.synthetic import BUILTIN_VENDORS

        return [VendorData(v, DataSourceConfig(kind="synthetic", vendor=v, cases=cases, seed=data_seed, size=size), 0.25)
                for v in sorted(BUILTIN_VENDORS)]
    path = MNMS_SAMPLE if dataset == "mnms-sample" else Path(dataset).expanduser().resolve()
    if not path.is_file():
        hint = (" (the M&Ms sample is read from shared/data/mnms-sample beside the project folder)"
                if dataset == "mnms-sample" else " (give synthetic, mnms-sample or a manifest CSV)")
        raise ConfigError(f"--dataset {dataset}: {path} not found{hint}")
    try:
        with open(path, newline="") as fh:
            vendors = sorted({(r.get("vendor") or "").strip() for r in csv.DictReader(fh)} - {""})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a readable manifest CSV ({exc})") from None
    if len(vendors) < 2:
        raise ConfigError(f"{path}: a vendor-shift benchmark needs a 'vendor' column with at least two vendors, "
                          f"found {vendors or 'none'}")
    return [VendorData(v, DataSourceConfig(kind="manifest", path=str(path), vendor=v), 0.5) for v in vendors]


def site_config(vd: VendorData, name: str, support: int | None = None) -> SiteConfig:
    from jras_core.site import SiteConfig

    return SiteConfig(name=name, vendor=vd.vendor, data=vd.source, val_fraction=vd.val_fraction,
                      support_cases=support)


def write_site_yaml(cfg: SiteConfig, path: Path) -> Path:
    """A site config as a YAML file (for the ClientApps of a simulated federation)."""
    import yaml

    data = dataclasses.asdict(cfg)
    data["data"] = {k: v for k, v in data["data"].items() if v is not None}
    data = {k: v for k, v in data.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def heldout_site(vd: VendorData, method_cfg: JRASConfig, support: int) -> Site:
    """The held-out vendor's site: ``support`` cases form its bank, the rest is evaluated."""
    from jras_core.config import ConfigError
    from jras_core.site import Site

    site = Site(site_config(vd, f"heldout-{vd.vendor}", support), method_cfg)
    n = len(site.slices.cases)
    if support >= n:
        raise ConfigError(f"vendor {vd.vendor} has {n} cases: --support must be below that (got {support})")
    return site


# --------------------------------------------------------------------------- training runs


@dataclass
class Trained:
    """The outcome of one training run: final model state(s) and its costs."""

    states: list[dict]  # one state for federated/central, one per site for local
    train_rows: list[dict[str, float | str]]  # in-federation validation, one per training site
    wall_s: float
    bytes_per_round: float = float("nan")
    peak_rss_mb: float = float("nan")


@dataclass
class Settings:
    """What every run of one benchmark shares."""

    method_config: Path
    config_overrides: dict[str, Any]
    rounds: int
    local_epochs: int
    size: int
    support: int
    ft_epochs: int | None
    """Most fine-tuning epochs of the ``+ft`` methods (None: the method config's ``adapt.epochs``)."""
    out: Path
    cpus_per_client: int = 1
    share_cores: bool = False
    """Size Ray's pool by :func:`tools.simulate.ray_cpus` (more workers than cores where that shortens a phase)."""
    client_threads: int = 1
    timeout: float | None = None
    init: str | None = None
    """Checkpoint path a federated run starts from; ``{method}``, ``{heldout}``, ``{seed}`` filled in."""
    run_prefix: str = "heldout-"
    """A run folder is ``<prefix><heldout>-s<seed>`` under the method's folder."""

    def method_cfg(self, method: Method, seed: int) -> JRASConfig:
        from jras_core.config import JRASConfig

        return JRASConfig.from_yaml(self.method_config).with_overrides(
            {**self.config_overrides, **method.overrides, "preprocess.size": self.size,
             "train.epochs": self.local_epochs, "train.seed": seed}
        )

    def init_path(self, method: Method, heldout: str, seed: int) -> Path | None:
        """The checkpoint that ``method``'s run for ``heldout`` and ``seed`` starts from (None: fresh weights)."""
        if not self.init:
            return None
        from jras_core.config import ConfigError

        try:
            path = self.init.format(method=_dir_name(method.name), base=_dir_name(method.name.partition("[")[0].strip()),
                                    heldout=heldout, seed=seed)
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(f"--init {self.init}: only {{method}}, {{base}}, {{heldout}} and {{seed}} can be filled "
                              f"in ({exc!r})") from None
        return Path(path).expanduser().resolve()

    def run_dir(self, method: Method, heldout: str, seed: int) -> Path:
        """The training folder of ``method``'s run: a variant of inference options only
        (``trains_as``) shares its base method's."""
        return self.out / "runs" / _dir_name(method.trains_as or method.name) / f"{self.run_prefix}{heldout}-s{seed}"


def _dir_name(name: str) -> str:
    """A method name as a folder name."""
    return re.sub(r"[^\w.+=-]+", "_", name)


GUIDE_CHOICE = ["guides_used", "support_dice_guided", "support_dice_noguide"]
"""Metrics of a held-out site's choice for or against its guides (``adapt.guides``)."""


def _metrics_of(values: Mapping[str, Any], class_keys: Sequence[str]) -> dict[str, float]:
    keys = ["dice_mean", *class_keys, "hd95_mean", "guide_dice", "dice_oracle", "dice_random", "dice_noguide",
            *GUIDE_CHOICE]
    return {k: float(values[k]) for k in keys if k in values}


def train_local(sites: Sequence[Site], st: Settings, run_dir: Path, class_keys: Sequence[str]) -> Trained:
    """Each site trains alone for ``rounds x local_epochs`` epochs."""
    from torch.utils.tensorboard import SummaryWriter

    from jras_core.models.jras import build_model

    t0 = time.perf_counter()
    states, rows = [], []
    for site in sites:
        model = build_model(site.method)
        writer = SummaryWriter(str(run_dir / "tensorboard" / site.name))
        try:
            site.train(model, epochs=st.rounds * st.local_epochs, writer=writer)
        finally:
            writer.close()
        rows.append({"site": site.name, **_metrics_of(site.evaluate(model), class_keys)})
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return Trained(states, rows, time.perf_counter() - t0, 0.0, _peak_rss())


def train_central(sites: Sequence[Site], st: Settings, run_dir: Path, class_keys: Sequence[str]) -> Trained:
    """Pooled training of the training sites (same epochs), evaluated on each site."""
    from jras_core.training.centralised import train_centralised

    t0 = time.perf_counter()
    cfg = sites[0].method.with_overrides({"train.epochs": st.rounds * st.local_epochs})
    for s in sites:
        s.method = cfg
    model, res = train_centralised(sites, cfg, out_dir=run_dir)
    rows = [{"site": s.name, **_metrics_of(res[s.name], class_keys)} for s in sites]
    return Trained([{k: v.clone() for k, v in model.state_dict().items()}], rows, time.perf_counter() - t0, 0.0,
                   _peak_rss())


def train_federated(method: Method, yamls: Sequence[Path], st: Settings, seed: int, run_dir: Path,
                    class_keys: Sequence[str], names: Sequence[str], init: Path | None = None) -> Trained:
    """A Flower Simulation Engine federation of the training sites (from the weights of
    the checkpoint ``init`` when given)."""

    from jras_core.files import PROJECT_ROOT
    from tools.simulate import gpu_share, run_simulation

    overrides = {**st.config_overrides, **method.overrides}
    run_config: dict[str, Any] = {
        "num-server-rounds": st.rounds,
        "strategy": method.strategy,
        "method-config": str(st.method_config),
        "method-overrides": "; ".join(f"{k}={_yaml_value(v)}" for k, v in overrides.items()),
        "local-epochs": st.local_epochs,
        "image-size": st.size,
        "seed": seed,
        "client-threads": st.client_threads,
        "min-nodes": len(yamls),
        **method.server,
    }
    if init is not None:
        run_config["initial-weights"] = str(init)
    t0 = time.perf_counter()
    device = str(st.config_overrides.get("train.device", "auto"))
    run_simulation(PROJECT_ROOT, [str(p) for p in yamls], run_config, cpus_per_client=st.cpus_per_client,
                   share_cores=st.share_cores, gpus_per_client=gpu_share(len(yamls), device),
                   out_dir=run_dir.parent, run_name=run_dir.name, stream=False, timeout=st.timeout, fresh=True)
    return federated_outcome(run_dir, yamls, class_keys, names, time.perf_counter() - t0)


def finished_federation(run_dir: Path, rounds: int) -> bool:
    """Whether ``run_dir`` holds the final checkpoint of a federation of ``rounds`` rounds."""
    from server.checkpoint import load_checkpoint

    path = run_dir / "checkpoint.pt"
    if not path.is_file() or not (run_dir / "tensorboard" / "metrics.jsonl").is_file():
        return False
    try:
        return load_checkpoint(path).round == rounds
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is trained again
        return False


def site_rows(state: Mapping[str, Any], sites: Sequence[Site], names: Sequence[str],
              class_keys: Sequence[str]) -> list[dict[str, float | str]]:
    """The validation metrics of ``sites`` (named ``names``) with the global model ``state``,
    measured now with each site's method configuration."""
    from jras_core.models.jras import build_model

    rows = []
    for name, site in zip(names, sites):
        model = build_model(site.method)
        load_state(model, state)
        rows.append({"site": name, **_metrics_of(site.evaluate(model), class_keys)})
    return rows


def federated_outcome(run_dir: Path, yamls: Sequence[Path], class_keys: Sequence[str], names: Sequence[str],
                      wall_s: float, sites: Sequence[Site] | None = None) -> Trained:
    """What a finished federation left in ``run_dir``: its final global model, the training
    sites' validation metrics, bytes per round and peak memory (``wall_s`` as given).

    With ``sites`` (the training sites, in ``names`` order, with the method configuration
    of now) the validation metrics are measured anew with the final model, so that an
    inference option changed since training applies to them as to the held-out site;
    without, they are the federation's own last evaluation (FedBN's sites keep
    normalisation statistics of their own that the global model does not hold)."""
    from federation.protocol import arrays_to_state
    from server.checkpoint import load_checkpoint
    from tools.simulate import site_table

    state = arrays_to_state(load_checkpoint(run_dir / "checkpoint.pt").arrays)
    if sites is None:
        table = {r["site"]: r for r in site_table(run_dir, [str(p) for p in yamls])}
        rows = [{"site": n, **_metrics_of(table.get(n, {}), class_keys)} for n in names]
    else:
        rows = site_rows(state, sites, names, class_keys)
    records = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_round = [r["round_stats"]["bytes_total"] for r in records if "bytes_total" in r.get("round_stats", {})]
    rss = [float(m.get("peak-rss-mb", float("nan"))) for r in records for site in r.get("sites", {}).values()
           for m in site.values() if isinstance(m, dict)]
    rss = [x for x in rss if math.isfinite(x)]
    return Trained([state], rows, wall_s,
                   float(sum(per_round) / len(per_round)) if per_round else float("nan"),
                   max(rss) if rss else float("nan"))


def _yaml_value(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _peak_rss() -> float:
    from jras_core.sysinfo import peak_rss_mb

    return peak_rss_mb()


# --------------------------------------------------------------------------- held-out evaluation


def load_state(model: JRASModel, state: Mapping[str, Any]) -> None:
    """Load ``state`` into ``model``; entries it lacks (kept local under FedBN) keep the model's."""
    merged = dict(model.state_dict())
    merged.update({k: v for k, v in state.items() if k in merged})
    model.load_state_dict(merged)


def evaluate_heldout(method: Method, trained: Trained, site: Site, st: Settings,
                     class_keys: Sequence[str]) -> tuple[dict[str, float], JRASModel]:
    """The held-out site's metrics with the trained model(s): AdaBN under FedBN or with
    ``adapt.norm_stats``, for ``+ft`` methods then fine-tuning on its support cases with early
    stopping (:func:`jras_core.training.finetune.adapt_site`, at most ``st.ft_epochs`` epochs,
    default ``adapt.epochs``), then evaluation retrieving from its support bank. Local-only
    reports the mean over the local models."""
    import numpy as np

    from jras_core.models.jras import build_model
    from jras_core.training.adapt import adapt_to_site, recalibrate_norm
    from jras_core.training.finetune import adapt_site

    results, model = [], None
    for state in trained.states:
        model = build_model(site.method)
        load_state(model, state)
        bank = site.bank if site.method.uses_retrieval else None
        fedbn = method.strategy == "fedbn" and method.kind == "federated"  # no shared statistics to keep
        tuned: dict[str, float] = {}
        if method.finetune:
            cfg = site.method if st.ft_epochs is None else site.method.with_overrides({"adapt.epochs": st.ft_epochs})
            model, record = adapt_site(model, site.train_set, cfg, bank, norm_stats=True if fedbn else None)
            tuned = record.metrics(prefix="ft_", sep="_")
        elif fedbn:
            recalibrate_norm(model, site.train_set, site.method, bank)
        else:
            model = adapt_to_site(model, site.train_set, site.method, bank)
        results.append({**_metrics_of(site.evaluate(model), class_keys), **tuned})
    keys = results[0].keys()
    return {k: float(np.nanmean([r.get(k, float("nan")) for r in results])) for k in keys}, model


# --------------------------------------------------------------------------- results file


def columns_for(class_names: Sequence[str], base: Sequence[str] = BASE_COLUMNS,
                tail: Sequence[str] = TAIL_COLUMNS) -> list[str]:
    """The columns of ``results.csv``: ``base``, the mean and per-class Dice, then ``tail``."""
    return [*base, "dice_mean", *[f"dice_{c.lower()}" for c in class_names], *tail]


def _run_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """The (method, held-out vendor, seed) run a ``results.csv`` row belongs to."""
    return row["method"], row["heldout"], str(row["seed"])


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """All rows to ``path`` atomically (a crash mid-write leaves the previous file)."""
    from jras_core.files import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: _fmt(r.get(k, "")) for k in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


# --------------------------------------------------------------------------- planning and timing


@dataclass
class Job:
    method: Method
    heldout: str
    seed: int

    @property
    def key(self) -> tuple[str, str, str]:
        """The (method, held-out vendor, seed) of the job's rows in ``results.csv`` (:func:`_run_key`)."""
        return self.method.name, self.heldout, str(self.seed)


def calibrate_site(site: Site, base_cfg: JRASConfig) -> dict[str, float]:
    """Seconds per training slice of one local epoch, without and with retrieval, measured
    on a 32-slice subset of ``site`` (second epoch, after a warm-up), and the site's numbers
    of training and validation slices."""
    from jras_core.models.jras import build_model
    from jras_core.training.joint import JRASTrainer

    sub = site.train_set.subset(list(range(min(32, len(site.train_set)))))
    out = {}
    for name, overrides in (("plain", AUGMENTED), ("retrieval", RETRIEVAL)):
        cfg = base_cfg.with_overrides(overrides)
        trainer = JRASTrainer(build_model(cfg), cfg, sub)
        trainer.train_epoch()
        t0 = time.perf_counter()
        trainer.train_epoch()
        out[name] = (time.perf_counter() - t0) / len(sub)
    out["train_slices"] = float(len(site.train_set))
    out["val_slices"] = float(len(site.val_set))
    return out


FLOWER_START_S = 35.0
"""Simulation Engine start-up and first-round set-up per federated run (measured on 2 cores)."""


def estimate_job_s(job: Job, calib: Mapping[str, float], st: Settings, n_train_sites: int, cores: int,
                   eval_sites: int = 1) -> float:
    """Rough seconds of one job: training epochs x slices x per-slice cost (+ evaluation of the
    training sites and ``eval_sites`` held-out sites, each the size of the calibration site's
    validation split, and Flower's start)."""
    per = calib["retrieval" if job.method.uses_retrieval else "plain"]
    epochs = st.rounds * st.local_epochs
    slices = calib["train_slices"] * n_train_sites
    per_eval = calib["val_slices"] * per * (4 if job.method.uses_retrieval else 1) * 0.3
    evals = per_eval * (n_train_sites + 1)
    more_heldout = per_eval * (eval_sites - 1)
    if job.method.kind == "federated":
        from tools.simulate import ray_cpus

        total, cpus = ray_cpus(n_train_sites, st.client_threads, cores) if st.share_cores else (None, st.cpus_per_client)
        workers = max(1, (total or cores) // cpus)  # Ray's pool; sites queue for its workers
        parallel = max(1.0, min(cores, n_train_sites / math.ceil(n_train_sites / workers)))
        return FLOWER_START_S + epochs * slices * per / parallel + evals * st.rounds / parallel + evals + more_heldout
    return epochs * slices * per + evals + more_heldout


# --------------------------------------------------------------------------- pieces of a benchmark's main loop


def fill_options(args: argparse.Namespace, defaults: Mapping[str, Any], quick: Mapping[str, Any],
                 quick_config: str | None = None) -> None:
    """Give the options left unset (None) their values: ``quick``'s first under ``--quick``
    (and ``--config`` ``quick_config``), then ``defaults``."""
    for values in ((quick if args.quick else {}), defaults):
        for k, v in values.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.quick and args.config is None and quick_config is not None:
        args.config = quick_config


def resolve_config(value: str | None, default: Path) -> Path:
    """The method config file of ``--config`` (``default`` without it; a relative path is
    also looked up under the project folder)."""
    from jras_core.config import ConfigError
    from jras_core.files import PROJECT_ROOT

    config = Path(value) if value else default
    if not config.is_file() and (PROJECT_ROOT / config).is_file():
        config = PROJECT_ROOT / config
    if not config.is_file():
        raise ConfigError(f"--config {value}: file not found")
    return config.resolve()


def parse_seeds(text: str) -> list[int]:
    """The seeds of ``--seeds`` (comma-separated integers)."""
    from jras_core.config import ConfigError

    try:
        return [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {text!r}") from None


def train_method(method: Method, sites: Sequence[Site], names: Sequence[str], yamls: Sequence[Path],
                 st: Settings, seed: int, run_dir: Path, class_keys: Sequence[str], reused: bool = False,
                 wall_before: float = float("nan"), init: Path | None = None) -> Trained:
    """Train ``method`` on ``sites`` (named ``names``): a federation of the site YAMLs
    ``yamls`` (the same sites, in that order), or in this process (local-only, central).
    ``reused``: the federation already finished in ``run_dir``; it is read back (its
    training's wall time ``wall_before``) and its training sites evaluated anew, not trained
    again."""
    if method.kind == "federated":
        if reused:
            return federated_outcome(run_dir, yamls, class_keys, names, wall_before,
                                     None if method.strategy == "fedbn" else sites)
        return train_federated(method, yamls, st, seed, run_dir, class_keys, names, init)
    if method.kind == "local":
        return train_local(sites, st, run_dir, class_keys)
    return train_central(sites, st, run_dir, class_keys)


def reuse_training(cache: Mapping[tuple, tuple[Trained, Method]], key: tuple, method: Method,
                   sites: Sequence[Site], names: Sequence[str], class_keys: Sequence[str]) -> Trained | None:
    """The training run of ``key`` (a method's training key with what else makes the run) if
    ``cache`` holds it from a method before that trained alike (None: train). When that method
    evaluated the training sites differently, they are evaluated anew with ``method``'s
    configuration (``sites``, named ``names``)."""
    hit = cache.get(key)
    if hit is None:
        return None
    trained, trained_for = hit
    if _changes_training_sites(trained_for.overrides, method.overrides) and method.strategy != "fedbn":
        # the same federation under other inference options: its training sites evaluated with this method's
        trained = dataclasses.replace(trained, train_rows=site_rows(trained.states[0], sites, names, class_keys))
    return trained


def reused_federations(todo: Sequence[Job], st: Settings, reevaluate: bool = False) -> set[int]:
    """The jobs (by id) whose federation is read back from its finished run folder instead of
    trained: an inference or fine-tuning variant whose base method's federation has finished
    (every federated job with ``reevaluate``). Decided once, before any training: a federation
    this call trains is evaluated as new."""
    return {id(j) for j in todo if (reevaluate or j.method.trains_as) and j.method.kind == "federated"
            and finished_federation(st.run_dir(j.method, j.heldout, j.seed), st.rounds)}


def expected_runtime(jobs: Sequence[Job], site: Site, base_cfg: JRASConfig, st: Settings, n_train_sites: int,
                     eval_sites: int = 1) -> dict[int, float]:
    """Calibrate on ``site`` and print the expected runtime of ``jobs``; returns each job's
    estimate (by id)."""
    import os

    calib = calibrate_site(site, base_cfg)
    cores = os.cpu_count() or 1
    estimate = {id(j): estimate_job_s(j, calib, st, n_train_sites, cores, eval_sites) for j in jobs}
    print(f"expected runtime: about {_duration(sum(estimate.values()))} for {len(jobs)} runs (calibrated on this "
          f"machine: {calib['plain'] * 1e3:.1f} / {calib['retrieval'] * 1e3:.1f} ms per training slice without / "
          f"with retrieval; a rough figure)", flush=True)
    return estimate


class Progress:
    """Time spent and time left of a benchmark's runs: the estimate of the runs left, scaled by
    how the finished runs compared with theirs."""

    def __init__(self, todo: Sequence[Job], estimate: Mapping[int, float]):
        self.todo, self.estimate = list(todo), dict(estimate)
        self.t_start, self.spent_est = time.perf_counter(), 0.0

    def finished(self, i: int) -> str:
        """After the ``i``-th run (from 1): ``"elapsed ..., left about ..."``."""
        self.spent_est += self.estimate.get(id(self.todo[i - 1]), 0.0)
        elapsed = time.perf_counter() - self.t_start
        left = sum(self.estimate.get(id(j), 0.0) for j in self.todo[i:])
        left *= elapsed / self.spent_est if self.spent_est else 1.0
        return f"elapsed {_duration(elapsed)}, left about {_duration(left)}"


def interrupted(command: str, results_path: Path) -> int:
    """Say where the finished runs of an interrupted ``jras bench <command>`` are; exit code 130."""
    print(f"\njras bench {command}: interrupted; the runs finished so far are in {results_path} "
          "(a re-run with the same --out continues from there)", file=sys.stderr)
    return 130


# --------------------------------------------------------------------------- main loop


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`)."""
    plan = resolve_plan(args)
    rows = [] if args.fresh else read_rows(plan.results_path)
    todo = pending_jobs(args, plan, rows)
    announce(args, plan, todo)
    schedule = schedule_jobs(plan, todo, rows, args.reevaluate)
    try:
        run_jobs(plan, schedule, rows)
    except KeyboardInterrupt:
        return interrupted("shift", plan.results_path)
    report_results(args, plan)
    return 0


@dataclass(frozen=True)
class Plan:
    """What one call of the benchmark runs, resolved from its options."""

    dataset: str
    config: Path
    chosen: list[Method]
    seeds: list[int]
    st: Settings
    base_cfg: JRASConfig
    """The method config without a method's overrides (class names, calibration)."""
    vds: list[VendorData]
    heldout_vds: dict[str, VendorData]
    """Each vendor's data as a held-out site (``--heldout-cases`` cases)."""
    heldouts: list[str]
    heldout_cases: int
    jobs: list[Job]
    """Every run, seed by seed: an interrupted benchmark has every vendor and method of its first seeds."""

    @property
    def methods(self) -> list[str]:
        """The chosen methods' names."""
        return [m.name for m in self.chosen]

    @property
    def vendors(self) -> list[str]:
        """Every vendor of the dataset."""
        return [v.vendor for v in self.vds]

    @property
    def class_names(self) -> list[str]:
        """The segmented classes (without background)."""
        return self.base_cfg.labels.names

    @property
    def class_keys(self) -> list[str]:
        """The per-class Dice columns."""
        return [f"dice_{c.lower()}" for c in self.class_names]

    @property
    def columns(self) -> list[str]:
        """The columns of ``results.csv``."""
        return columns_for(self.class_names)

    @property
    def results_path(self) -> Path:
        """``results.csv`` in the output folder."""
        return self.st.out / "results.csv"

    @property
    def sites_dir(self) -> Path:
        """The folder of the site YAMLs of the federations."""
        return self.st.out / "sites" / self.dataset.replace("/", "_")


def resolve_plan(args: argparse.Namespace) -> Plan:
    """The :class:`Plan` of parsed ``args`` (the options left unset filled in); a bad option
    raises :class:`~jras_core.config.ConfigError` before anything runs. Creates the output
    folder and sets torch's threads."""
    from jras_core.config import JRASConfig

    config, chosen, seeds = resolve_choices(args)
    st = resolve_settings(args, config)
    base_cfg = JRASConfig.from_yaml(config).with_overrides(
        {**st.config_overrides, "preprocess.size": args.size, "train.epochs": args.local_epochs})
    vds = vendor_sites(args.dataset, args.cases, args.size, args.data_seed)
    heldout_cases = args.heldout_cases or args.cases
    heldout_vds, heldouts = resolve_heldouts(args, vds, heldout_cases)
    jobs = [Job(m, h, s) for s in seeds for h in heldouts for m in chosen]
    check_init(st, chosen, jobs)
    return Plan(args.dataset, config, chosen, seeds, st, base_cfg, vds, heldout_vds, heldouts, heldout_cases, jobs)


def resolve_choices(args: argparse.Namespace) -> tuple[Path, list[Method], list[int]]:
    """Fill in the options left unset (:data:`QUICK` under ``--quick``, then :data:`DEFAULTS`);
    the method config file, the methods and the seeds."""
    from jras_core.config import ConfigError
    from jras_core.files import PROJECT_ROOT

    fill_options(args, DEFAULTS, QUICK, str(PROJECT_ROOT / "configs" / "demo.yaml"))
    config = resolve_config(args.config, PROJECT_ROOT / "configs" / "default.yaml")
    chosen = parse_methods(args.methods)
    seeds = parse_seeds(args.seeds)
    if args.rounds < 1 or args.local_epochs < 1 or args.size < 16 or args.support < 1 or not seeds:
        raise ConfigError("--rounds, --local-epochs and --support must be >= 1, --size >= 16, --seeds non-empty")
    return config, chosen, seeds


def resolve_settings(args: argparse.Namespace, config: Path) -> Settings:
    """The :class:`Settings` every run shares (method config ``config``); creates the output
    folder and sets torch's threads for the training in this process."""
    import torch

    from jras_core.config import parse_overrides
    from tools.options import method_sets

    overrides = parse_overrides(method_sets(args))
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    return Settings(config, overrides, args.rounds, args.local_epochs, args.size, args.support, args.ft_epochs,
                    out, cpus_per_client=args.cpus_per_client, share_cores=args.share_cores,
                    client_threads=args.client_threads, timeout=args.timeout or None, init=args.init)


def resolve_heldouts(args: argparse.Namespace, vds: Sequence[VendorData],
                     heldout_cases: int) -> tuple[dict[str, VendorData], list[str]]:
    """Each vendor's data as a held-out site (``heldout_cases`` cases with ``--heldout-cases``)
    and the held-out vendors of ``--heldout`` (default: every vendor)."""
    from jras_core.config import ConfigError

    by_vendor = {v.vendor: v for v in vds}
    if args.heldout_cases is not None:
        if args.dataset != "synthetic":
            raise ConfigError(f"--heldout-cases applies to the synthetic vendors only (dataset {args.dataset})")
        if args.heldout_cases <= args.support:
            raise ConfigError(f"--heldout-cases ({args.heldout_cases}) must exceed --support ({args.support})")
    heldout_vds = {v.vendor: dataclasses.replace(v, source=dataclasses.replace(v.source, cases=heldout_cases))
                   if args.heldout_cases is not None else v for v in vds}
    heldouts = [h.strip() for h in (args.heldout or ",".join(by_vendor)).split(",") if h.strip()]
    bad = [h for h in heldouts if h not in by_vendor]
    if bad:
        raise ConfigError(f"--heldout {', '.join(bad)}: not a vendor of {args.dataset} ({', '.join(by_vendor)})")
    return heldout_vds, heldouts


def check_init(st: Settings, chosen: Sequence[Method], jobs: Sequence[Job]) -> None:
    """With ``--init``: every method federated and every job's checkpoint there."""
    from jras_core.config import ConfigError

    if not st.init:
        return
    others = [m.name for m in chosen if m.kind != "federated"]
    if others:
        raise ConfigError(f"--init applies to federated methods only, not {', '.join(others)}")
    missing = sorted({str(p) for j in jobs if not (p := st.init_path(j.method, j.heldout, j.seed)).is_file()})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"--init: checkpoint {missing[0]} not found{more}")


def pending_jobs(args: argparse.Namespace, plan: Plan, rows: Sequence[Mapping[str, Any]]) -> list[Job]:
    """The jobs this call runs: none with ``--report-only``, every one with ``--reevaluate``,
    else those without a held-out row in ``rows`` (of ``results.csv``)."""
    done = {_run_key(r) for r in rows if r.get("role") == "heldout"}
    if args.report_only:
        return []
    if args.reevaluate:
        return list(plan.jobs)
    return [j for j in plan.jobs if j.key not in done]


def announce(args: argparse.Namespace, plan: Plan, todo: Sequence[Job]) -> None:
    """Print what the benchmark compares, and which of its runs are skipped."""
    print(f"J-RAS vendor-shift benchmark: dataset {args.dataset} (vendors {', '.join(plan.vendors)}), held-out "
          f"{', '.join(plan.heldouts)}, methods {', '.join(plan.methods)}, seeds {', '.join(map(str, plan.seeds))}; "
          f"{args.rounds} rounds x {args.local_epochs} local epoch(s), {args.size} px, support {args.support} cases, "
          f"config {plan.config.name}.", flush=True)
    jobs = plan.jobs
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {plan.results_path}: skipped "
              "(--fresh reruns them)")
    if plan.heldout_cases != args.cases:
        print(f"held-out vendors: {plan.heldout_cases} cases, {args.support} of them the support bank, "
              "the rest evaluated")


@dataclass(frozen=True)
class Schedule:
    """The runs of one call, in order, and what is known of them before the first starts."""

    todo: list[Job]
    reused: set[int]
    """The jobs (by id) whose finished federation is evaluated again, not retrained."""
    estimate: dict[int, float]
    """Each job's expected seconds (by id; empty when nothing is trained)."""
    previous_wall: dict[tuple[str, str, str], Any]
    """The wall time ``results.csv`` holds for a run (by :func:`_run_key`)."""


def schedule_jobs(plan: Plan, todo: list[Job], rows: Sequence[Mapping[str, Any]], reevaluate: bool) -> Schedule:
    """Find the finished federations that ``todo`` evaluates again (:func:`reused_federations`)
    and, when some job trains, calibrate on this machine and print the expected runtime."""
    from jras_core.site import Site

    previous_wall = {_run_key(r): r.get("wall_s") for r in rows if r.get("role") == "heldout"}
    reused = reused_federations(todo, plan.st, reevaluate)
    estimate: dict[int, float] = {}
    to_train = [j for j in todo if id(j) not in reused]
    if len(to_train) < len(todo):
        print(f"{len(todo) - len(to_train)} finished federations in {plan.st.out / 'runs'}: evaluated again, "
              "not retrained")
    if to_train:
        estimate = expected_runtime(to_train, Site(site_config(plan.vds[0], "calibration"), plan.base_cfg),
                                    plan.base_cfg, plan.st, len(plan.vds) - 1)
    return Schedule(todo, reused, estimate, previous_wall)


def run_jobs(plan: Plan, schedule: Schedule, rows: list[dict[str, Any]]) -> None:
    """Train (or take over) and evaluate each job in turn; ``results.csv`` (``rows`` before the
    first) is rewritten after each, and each held-out vendor's first retrieval run draws its
    gallery."""
    cache: dict[tuple, tuple[Trained, Method]] = {}
    gallery_done: set[str] = set()
    progress = Progress(schedule.todo, schedule.estimate)
    for i, job in enumerate(schedule.todo, 1):
        sites = job_sites(plan, job)
        print(f"[{i}/{len(schedule.todo)}] {job.method.name}, held-out {job.heldout}, seed {job.seed} ...", flush=True)
        trained = train_job(plan, schedule, job, sites, cache)
        evaluated = evaluate_job(plan, schedule, job, sites.cfg, trained)
        rows = record_job(plan, job, trained, evaluated, rows)
        save_job_gallery(plan, job, evaluated, gallery_done)
        print(f"{job_summary(trained, evaluated)}; {progress.finished(i)}", flush=True)


@dataclass(frozen=True)
class JobSites:
    """The training sites of a job, under its method's configuration."""

    cfg: JRASConfig
    vendors: list[VendorData]
    names: list[str]
    sites: list[Site]


def job_sites(plan: Plan, job: Job) -> JobSites:
    """The training sites of ``job``: every vendor but the held-out one (data loaded on first use)."""
    from jras_core.site import Site

    cfg = plan.st.method_cfg(job.method, job.seed)
    train_vds = [v for v in plan.vds if v.vendor != job.heldout]
    names = [f"site-{v.vendor}" for v in train_vds]
    sites = [Site(site_config(v, n), cfg) for v, n in zip(train_vds, names)]  # data loaded on first use
    return JobSites(cfg, train_vds, names, sites)


def train_job(plan: Plan, schedule: Schedule, job: Job, ts: JobSites,
              cache: dict[tuple, tuple[Trained, Method]]) -> Trained:
    """``job``'s training run: the one in ``cache`` when the method before it trained alike
    (:func:`reuse_training`), else trained now or a finished federation read back
    (:func:`train_method`), which then replaces what ``cache`` held."""
    from benchmarks.report import as_number

    m, h, seed = job.method, job.heldout, job.seed
    key = (m.training_key, h, seed)
    trained = reuse_training(cache, key, m, ts.sites, ts.names, plan.class_keys)
    if trained is not None:
        return trained
    yamls = [write_site_yaml(site_config(v, n), plan.sites_dir / f"{n}.yaml")
             for v, n in zip(ts.vendors, ts.names)] if m.kind == "federated" else []
    trained = train_method(m, ts.sites, ts.names, yamls, plan.st, seed, plan.st.run_dir(m, h, seed), plan.class_keys,
                           reused=id(job) in schedule.reused,
                           wall_before=as_number(schedule.previous_wall.get(
                               (m.trains_as or m.name, h, str(seed)), schedule.previous_wall.get(job.key))),
                           init=plan.st.init_path(m, h, seed))
    cache.clear()  # only the last run is kept: a +ft or inference variant follows
    cache[key] = (trained, m)
    return trained


@dataclass(frozen=True)
class Evaluated:
    """A job's evaluation on its held-out site."""

    site: Site
    metrics: dict[str, float]
    model: JRASModel
    """The (last) evaluated model."""
    wall_s: float
    """The run's wall time: its training and this evaluation."""


def evaluate_job(plan: Plan, schedule: Schedule, job: Job, cfg: JRASConfig, trained: Trained) -> Evaluated:
    """Evaluate ``trained`` on ``job``'s held-out site (method configuration ``cfg``;
    :func:`evaluate_heldout`)."""
    t_eval = time.perf_counter()
    held = heldout_site(plan.heldout_vds[job.heldout], cfg, plan.st.support)
    metrics, model = evaluate_heldout(job.method, trained, held, plan.st, plan.class_keys)
    # a federation evaluated again keeps the wall time of its first training and evaluation
    wall = trained.wall_s + (0.0 if id(job) in schedule.reused else time.perf_counter() - t_eval)
    return Evaluated(held, metrics, model, wall)


def record_job(plan: Plan, job: Job, trained: Trained, evaluated: Evaluated,
               rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with ``job``'s (its held-out site's, then its training sites') in place of any
    of the same run, written to ``results.csv``."""
    m, st = job.method, plan.st
    common = {"method": m.name, "heldout": job.heldout, "seed": job.seed, "rounds": st.rounds,
              "local_epochs": st.local_epochs, "size": st.size, "wall_s": evaluated.wall_s,
              "bytes_per_round": trained.bytes_per_round,
              "peak_rss_mb": max(trained.peak_rss_mb, _peak_rss()) if m.kind != "federated" else trained.peak_rss_mb}
    rows = [r for r in rows if _run_key(r) != job.key]
    rows.append({**common, "site": evaluated.site.name, "role": "heldout", **evaluated.metrics})
    for r in trained.train_rows:
        rows.append({**common, "role": "train", **r})
    write_rows(plan.results_path, rows, plan.columns)
    return rows


def save_job_gallery(plan: Plan, job: Job, evaluated: Evaluated, done: set[str]) -> None:
    """The guide gallery of a held-out vendor (``gallery-<vendor>.png``), drawn by its first
    retrieval method that is not fine-tuned; ``done``: the vendors drawn."""
    m, h = job.method, job.heldout
    if m.uses_retrieval and evaluated.model is not None and h not in done and not m.finetune:
        from benchmarks.report import save_gallery

        save_gallery(plan.st.out / f"gallery-{h}.png", evaluated.model, evaluated.site,
                     f"{m.name}, held-out vendor {h}, seed {job.seed}")
        done.add(h)


def job_summary(trained: Trained, evaluated: Evaluated) -> str:
    """A finished job's line: held-out Dice (and guide diagnostics), in-federation Dice, wall time."""
    metrics = evaluated.metrics
    return (f"    held-out Dice {metrics.get('dice_mean', float('nan')):.3f}"
            + (f" (guides {metrics['guide_dice']:.3f}, oracle {metrics['dice_oracle']:.3f}, random "
               f"{metrics['dice_random']:.3f})" if "guide_dice" in metrics else "")
            + f"; in-federation {_mean([r.get('dice_mean') for r in trained.train_rows]):.3f}; "
            f"{evaluated.wall_s:.0f} s")


def report_results(args: argparse.Namespace, plan: Plan) -> None:
    """Write ``report.md`` and the bar chart from ``results.csv`` (every run it holds of the
    chosen methods) and print the report."""
    from benchmarks.report import write_report

    out = plan.st.out
    rows = read_rows(plan.results_path)
    report = write_report(out, rows, methods=plan.methods, class_names=plan.class_names, settings={
        "dataset": args.dataset, "vendors": ", ".join(plan.vendors), "heldout": ", ".join(plan.heldouts),
        "seeds": ", ".join(map(str, plan.seeds)), "rounds": args.rounds, "local_epochs": args.local_epochs,
        "size": args.size, "support": args.support,
        "heldout_cases": plan.heldout_cases if args.dataset == "synthetic" else None, "config": plan.config.name,
        "overrides": "; ".join(args.set or []) or "none", "init": args.init,
        "command": reproduce_command(getattr(args, "argv", None) or sys.argv[3:]),
    }, descriptions={m.name: m.description for m in plan.chosen})
    print(report)
    print(f"\nwrote {plan.results_path}, {out / 'report.md'} and figures in {out}")


def reproduce_command(argv: Sequence[str], command: str = "shift") -> str:
    """The ``jras bench <command>`` command line that reruns a benchmark (without
    ``--report-only``/``--fresh``)."""
    import shlex

    kept = [a for a in argv if a not in ("--report-only", "--fresh")]
    return shlex.join(["jras", "bench", command, *kept])


def _mean(values: Sequence[Any]) -> float:
    vals = [float(v) for v in values if v not in (None, "") and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else float("nan")


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``jras bench shift`` (no heavy import: ``--help`` stays instant)."""
    p.add_argument("--dataset", help="synthetic (the 4 built-in vendors, default), mnms-sample (the M&Ms sample "
                   "fixture, 3 vendors) or a manifest CSV with a vendor column")
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHODS)
                   + f" (default: {','.join(DEFAULT_METHODS)})")
    p.add_argument("--heldout", help="held-out vendors, comma-separated (default: each vendor in turn)")
    p.add_argument("--seeds", help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--rounds", type=int, help="federated rounds (local-only and central train rounds x local "
                   "epochs epochs; default 10)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 1)")
    p.add_argument("--size", type=int, help="image side in pixels (default 128)")
    p.add_argument("--cases", type=int, help="cases per synthetic vendor (default 12)")
    p.add_argument("--support", type=int, help="annotated cases of the held-out vendor that form its bank (default 5)")
    p.add_argument("--heldout-cases", type=int, help="cases of each held-out synthetic vendor: --support of them form "
                   "its bank, the others are evaluated (default: --cases; more cases, less evaluation noise, "
                   "no extra training)")
    p.add_argument("--ft-epochs", type=int, help="most fine-tuning epochs of the +ft methods, which stop early on "
                   "support cases held out (default: the method config's adapt.epochs; adapt.* via --set)")
    p.add_argument("--init", metavar="CHECKPOINT", help="start every federated run from this checkpoint's weights "
                   "(pretraining, e.g. on the synthetic vendors); {method}, {heldout} and {seed} in the path are "
                   "replaced by the run's, {base} by its method name without [overrides] (a lever variant starting "
                   "from its base method's weights), e.g. runs/pretrain/runs/{method}/heldout-D-s0/checkpoint.pt")
    p.add_argument("--data-seed", type=int, default=1, help="synthetic data seed (default 1; fixed across --seeds)")
    add_method_config_arguments(p, "configs/default.yaml")
    p.add_argument("--quick", action="store_true", help="a small run in under 3 minutes on 2 cores: synthetic, "
                   "held-out D, fedavg+aug vs jras-fedavg, 1 seed, 2 rounds, 32 px (options given "
                   "explicitly still apply)")
    p.add_argument("--out", default="runs/bench-shift", help="output folder (default runs/bench-shift)")
    p.add_argument("--fresh", action="store_true", help="rerun runs already in OUT/results.csv")
    p.add_argument("--reevaluate", action="store_true", help="evaluate every run again; a federation whose final "
                   "checkpoint is already in OUT/runs is not retrained (e.g. after changing --heldout-cases)")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite report.md and the bar chart "
                   "from OUT/results.csv for the given methods (e.g. after runs made by several invocations)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of in-process training (default 2)")
    add_simulation_arguments(p)


def add_method_config_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """The options that choose a benchmark's method config: the file (``default`` without it;
    configs/demo.yaml under ``--quick``), overrides, device and precision."""
    from tools.options import add_device_args

    p.add_argument("--config", metavar="YAML", help=f"method config (default {default}; --quick: configs/demo.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method config override for every method, e.g. --set retrieval.k=5 (repeatable)")
    add_device_args(p)


def add_simulation_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a benchmark's simulated federations: Ray's CPUs and torch threads per
    site, and a time limit."""
    p.add_argument("--cpus-per-client", type=int, default=1, help="CPUs Ray reserves per simulated site (default 1)")
    p.add_argument("--share-cores", action="store_true", help="start more simulation workers than cores where "
                   "that shortens a phase (3 sites on 2 cores: 3 workers); measured: no reliably shorter rounds")
    p.add_argument("--client-threads", type=int, default=1, help="torch threads per simulated site (default 1)")
    p.add_argument("--timeout", type=float, default=0, metavar="S", help="stop a federation after S seconds (default: none)")


def standalone_main(prog: str, description: str | None, add: Callable[[argparse.ArgumentParser], None],
                    run_args: Callable[[argparse.Namespace], int], argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.<name>``: parse ``argv`` with the options ``add`` defines and run."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add(p)
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.WARNING)
    return run_args(args)


def main(argv: Sequence[str] | None = None) -> int:
    return standalone_main("jras bench shift", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
