"""Real-data benchmark: an ACDC federation, evaluated in distribution and on unseen sites.

Five ACDC hospital sites (``sites/acdc-DCM.yaml`` ... ``acdc-RV``, split by pathology group;
``--split random``: ``acdc-random-1`` ... ``5``) federate through Flower's Simulation Engine
(the same ServerApp and ClientApp that deploy), one federation per method and seed. The
final model is then evaluated at every held-out site, each of which never trains: it builds
its retrieval bank from its own annotated support cases (``support_cases`` in its YAML),
re-estimates the normalisation statistics on them where the method says so (AdaBN), is
fine-tuned on them for ``+ft`` methods, and is evaluated on its other cases:

- ``acdc-test``: 20 ACDC patients never trained on (4 form its bank), in distribution;
- ``unseen-lge``: Philips late gadolinium enhancement (another vendor and sequence);
- ``unseen-mnms-B``, ``unseen-mnms-C``: M&Ms Philips and GE cine, 1 support patient each.

The training sites' in-federation validation is kept too. Centralised pooled training runs in
this process with the same budget (rounds x local epochs). The site YAMLs read the fixtures in
place from ``shared/data`` beside the project folder.

    jras bench real --quick                          # a smoke run: < 5 min on 2 cores
    jras bench real --seeds 0,1,2 --out runs/bench-real

Writes to ``--out``: ``results.csv`` (one row per method, seed and evaluated site, held-out or
training; written after every run, and a re-run skips what it holds), ``cases.csv`` (Dice of
every evaluated volume of the held-out sites with fewer than 5 evaluated cases),
``report.md`` (tables, the targets met or missed), ``gallery-<site>.png`` (query, retrieved
guides, prediction, ground truth), ``runs/<method>/<split>-s<seed>/`` (TensorBoard,
checkpoint, Flower log) and, with ``--cases``, ``sites/`` (the site YAMLs limited to a few
patients).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks import shift
from benchmarks.shift import AUGMENTED, Method

if TYPE_CHECKING:  # heavy imports stay out of `jras --help`
    from jras_core.config import JRASConfig
    from jras_core.models.jras import JRASModel
    from jras_core.site import Site

SITES_DIR = Path(__file__).resolve().parents[1] / "sites"
"""The project's site YAMLs."""
SPLITS: dict[str, tuple[str, ...]] = {
    "group": ("acdc-DCM", "acdc-HCM", "acdc-MINF", "acdc-NOR", "acdc-RV"),
    "random": tuple(f"acdc-random-{k}" for k in range(1, 6)),
}
"""The training sites of ``--split``: ACDC by pathology group, or the same patients at random."""
HELDOUT_SITES: dict[str, str] = {"acdc-test": "ACDC test", "unseen-lge": "LGE", "unseen-mnms-B": "M&Ms B",
                                 "unseen-mnms-C": "M&Ms C"}
"""The held-out sites (YAML name: label in the report), in report order."""
IN_DISTRIBUTION = "acdc-test"
UNSEEN = ("unseen-lge", "unseen-mnms-B", "unseen-mnms-C")
PER_CASE_BELOW = 5
"""A held-out site with fewer evaluated cases than this has its per-volume Dice in ``cases.csv``."""

ACDC_TARGET = 0.88
"""ACDC test: the best federated method's Dice at least this."""
CENTRAL_GAP = 0.01
"""ACDC test: FedAvg at most this below central training."""
UNSEEN_LEAD = 0.03
"""Unseen sites: the best J-RAS method at least this above the best non-retrieval method (mean)."""
REFERENCE = {"unseen-mnms-B": 0.87, "unseen-mnms-C": 0.82}
"""Mean Dice of a full-data M&Ms challenge entry on these cases (shared/data/README.md)."""
REFERENCE_TOLERANCE = 0.10
FEDAVG_FOR_CENTRAL = ("fedavg+aug+adabn", "fedavg+aug")
"""The FedAvg method compared with central training, first present (the first adapts at the
held-out site as central training does, by the config's default)."""

NO_ADABN = {"adapt.norm_stats": False}
ADABN = {"adapt.norm_stats": True}

METHODS: dict[str, Method] = {m.name: m for m in [
    shift.METHODS["central"],
    dataclasses.replace(shift.METHODS["fedavg+aug"], overrides={**AUGMENTED, **NO_ADABN},
                        description="FedAvg with strong intensity augmentation; held-out sites keep the federation's "
                        "normalisation statistics (no AdaBN)"),
    Method("fedavg+aug+adabn", "federated", "the fedavg+aug federation; held-out sites re-estimate the normalisation "
           "statistics on their support images (AdaBN)", "fedavg", {**AUGMENTED, **ADABN}, trains_as="fedavg+aug"),
    dataclasses.replace(shift.METHODS["fedavg+aug+ft"], trains_as="fedavg+aug"),
    shift.METHODS["fedbn"],
    shift.METHODS["jras-fedavg"],
    dataclasses.replace(shift.METHODS["jras-fedavg+ft"], trains_as="jras-fedavg"),
]}
DEFAULT_METHODS = list(METHODS)
DEFAULTS = {"split": "group", "methods": ",".join(DEFAULT_METHODS), "seeds": "0,1,2", "rounds": 10,
            "local_epochs": 2, "ft_epochs": None, "out": "runs/bench-real"}
QUICK = {"methods": "fedavg+aug,jras-fedavg", "seeds": "0", "rounds": 1, "local_epochs": 1, "size": 32, "cases": 2,
         "ft_epochs": 1, "out": "runs/bench-real-quick"}

BASE_COLUMNS = ["method", "split", "site", "role", "seed"]
TAIL_COLUMNS = [*shift.TAIL_COLUMNS, "eval_s", "evaluated_cases", *shift.GUIDE_CHOICE]
"""``wall_s``: the training run (a federation: Flower's start included); ``eval_s``: the
held-out sites' evaluation."""
CASE_COLUMNS = ["method", "split", "site", "seed", "case", "phase"]


# --------------------------------------------------------------------------- sites


def site_yaml(name: str) -> Path:
    """The project's YAML of site ``name``."""
    from jras_core.config import ConfigError

    path = SITES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"site YAML {path} not found")
    return path


def check_fixtures(yamls: Sequence[Path]) -> None:
    """Raise :class:`ConfigError` naming the first data file a site YAML reads that is missing
    (the real fixtures are read in place, never copied)."""
    import os

    from jras_core.config import ConfigError, load_yaml

    for path in yamls:
        data = load_yaml(path).get("data") or {}
        if not data.get("path"):
            continue
        target = Path(os.path.normpath(path.parent / Path(data["path"]).expanduser()))
        if not target.exists():
            raise ConfigError(f"{target} not found (read by {path}): the real data fixtures are read in place from "
                              "shared/data beside the project folder")


def limited_yaml(path: Path, cases: int, folder: Path) -> Path:
    """A copy of site YAML ``path`` in ``folder`` that keeps the site's first ``cases`` patients
    (manifest order; a held-out site keeps at most ``cases - 1`` of them as support), its data
    path absolute."""
    from jras_core.data.loaders import select_manifest_rows
    from jras_core.site import SiteConfig

    cfg = SiteConfig.from_yaml(path)
    manifest = cfg.data.resolve(cfg.data.path, path.parent).resolve()
    where, exclude = cfg.data.row_filters()
    rows = select_manifest_rows(manifest, [cfg.data.vendor] if cfg.data.vendor else None, where, exclude)
    kept = list(dict.fromkeys(r["case"] for _, r in rows))[:cases]
    data = dataclasses.replace(cfg.data, path=str(manifest), where={**(cfg.data.where or {}), "case": kept})
    support = None if cfg.support_cases is None else max(1, min(cfg.support_cases, len(kept) - 1))
    return shift.write_site_yaml(dataclasses.replace(cfg, data=data, support_cases=support), folder / path.name)


def site_yamls(split: str, cases: int | None, out: Path) -> tuple[list[Path], list[Path]]:
    """The training and held-out site YAMLs of ``split``: the project's, or (``cases``) copies
    limited to a few patients in ``out/sites``. The fixtures they read must be present."""
    train = [site_yaml(n) for n in SPLITS[split]]
    held = [site_yaml(n) for n in HELDOUT_SITES]
    check_fixtures([*train, *held])
    if cases is not None:
        folder = out / "sites" / f"{split}-{cases}-cases"
        train = [limited_yaml(p, cases, folder) for p in train]
        held = [limited_yaml(p, cases, folder) for p in held]
    return train, held


def load_site(path: Path, method: JRASConfig) -> Site:
    """The site of YAML ``path`` (relative data paths resolved against its folder)."""
    from jras_core.site import Site, SiteConfig

    return Site(SiteConfig.from_yaml(path), method, root=path.parent)


# --------------------------------------------------------------------------- evaluation


def volume_rows(model: JRASModel, site: Site, class_names: Sequence[str], use_guides: bool = True
                ) -> list[dict[str, Any]]:
    """Dice of every evaluated volume of ``site`` (per class and their mean), predicted as
    :meth:`Site.evaluate` predicts: with guides from the site's bank, or (``use_guides`` off: a
    site that decided against its guides, ``adapt.guides``) without."""
    import numpy as np

    from jras_core.metrics import volume_metrics
    from jras_core.training.evaluate import predict

    cfg = site.method
    bank = None
    if cfg.uses_retrieval:
        bank = site.bank
        bank.refresh(model.retr)
    val = site.val_set
    pred, _ = predict(model, val, cfg, bank, "retrieved" if use_guides else "none", exclude_own_case=True)
    dice = volume_metrics(pred, val, cfg.labels.num_classes, hd95=False)["dice"]
    rows = []
    for (v, _), d in zip(val.volume_rows(), dice):
        finite = [float(x) for x in d if math.isfinite(float(x))]
        rows.append({"case": val.volumes[v].case, "phase": val.volumes[v].phase,
                     "dice_mean": float(np.mean(finite)) if finite else float("nan"),
                     **{f"dice_{c.lower()}": float(x) for c, x in zip(class_names, d)}})
    return rows


def order_by_training(methods: Sequence[Method]) -> list[Method]:
    """``methods`` with those that share a training run next to each other (the first of each
    run leads), so that the run is trained once."""
    first: dict[tuple, int] = {}
    for i, m in enumerate(methods):
        first.setdefault(m.training_key, i)
    return sorted(methods, key=lambda m: first[m.training_key])


# --------------------------------------------------------------------------- main loop


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`)."""
    import torch

    from benchmarks.report import as_number, finite_values
    from jras_core.config import ConfigError, JRASConfig, parse_overrides
    from jras_core.files import PROJECT_ROOT
    from jras_core.sysinfo import peak_rss_mb
    from tools.options import method_sets

    shift.fill_options(args, DEFAULTS, QUICK, str(PROJECT_ROOT / "configs" / "demo.yaml"))
    config = shift.resolve_config(args.config, PROJECT_ROOT / "configs" / "real.yaml")
    if args.split not in SPLITS:
        raise ConfigError(f"--split {args.split}: choose from {', '.join(SPLITS)}")
    chosen = order_by_training(shift.parse_methods(args.methods, METHODS))
    seeds = shift.parse_seeds(args.seeds)
    overrides = parse_overrides(method_sets(args))
    base_cfg = JRASConfig.from_yaml(config).with_overrides(overrides)
    if args.size is None:
        args.size = base_cfg.preprocess.size
    if args.ft_epochs is None:
        args.ft_epochs = base_cfg.adapt.epochs
    if args.rounds < 1 or args.local_epochs < 1 or args.ft_epochs < 1 or args.size < 16 or not seeds:
        raise ConfigError("--rounds, --local-epochs and --ft-epochs must be >= 1, --size >= 16, --seeds non-empty")
    if args.cases is not None and args.cases < 2:
        raise ConfigError(f"--cases must be >= 2 (a patient to train or support, one to evaluate), got {args.cases}")
    base_cfg = base_cfg.with_overrides({"preprocess.size": args.size, "train.epochs": args.local_epochs})
    class_names = base_cfg.labels.names
    class_keys = [f"dice_{c.lower()}" for c in class_names]
    out = Path(args.out).expanduser().resolve()
    results_path, cases_path = out / "results.csv", out / "cases.csv"
    settings = {"split": args.split, "train_sites": ", ".join(SPLITS[args.split]), "seeds": ", ".join(map(str, seeds)),
                "rounds": args.rounds, "local_epochs": args.local_epochs, "size": args.size,
                "ft_epochs": args.ft_epochs, "cases": args.cases, "config": config.name,
                "overrides": "; ".join(method_sets(args)) or "none",
                "command": shift.reproduce_command(getattr(args, "argv", None) or sys.argv[3:], "real")}
    if args.report_only:
        return _report(out, chosen, class_names, settings)

    train_yamls, held_yamls = site_yamls(args.split, args.cases, out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))
    st = shift.Settings(config, overrides, args.rounds, args.local_epochs, args.size, 0, args.ft_epochs, out,
                        cpus_per_client=args.cpus_per_client, share_cores=args.share_cores,
                        client_threads=args.client_threads, timeout=args.timeout or None, run_prefix="")
    # seed by seed: an interrupted benchmark has every method of its first seeds
    jobs = [shift.Job(m, args.split, s) for s in seeds for m in chosen]
    rows = [] if args.fresh else shift.read_rows(results_path)
    case_rows = [] if args.fresh else shift.read_rows(cases_path)
    done = {_run_key(r) for r in rows if r.get("role") == "heldout"}
    todo = [j for j in jobs if (j.method.name, j.heldout, str(j.seed)) not in done]
    previous_wall = {_run_key(r): r.get("wall_s") for r in rows if r.get("role") == "heldout"}
    print(f"J-RAS real-data benchmark: ACDC sites by {args.split} ({', '.join(SPLITS[args.split])}) train; "
          f"held-out {', '.join(HELDOUT_SITES)}; methods {', '.join(m.name for m in chosen)}; seeds "
          f"{settings['seeds']}; {args.rounds} rounds x {args.local_epochs} local epoch(s), {args.size} px, config "
          f"{config.name}" + (f"; {args.cases} patients per site" if args.cases else "") + ".", flush=True)
    if len(todo) < len(jobs):
        print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {results_path}: skipped (--fresh reruns them)")

    reused = shift.reused_federations(todo, st)
    if reused:
        print(f"{len(reused)} finished federations in {out / 'runs'}: evaluated, not retrained")
    to_train: dict[tuple, shift.Job] = {}  # a method that shares the training run before it only evaluates
    for j in todo:
        if id(j) not in reused:
            to_train.setdefault((j.method.training_key, j.seed), j)
    estimate = shift.expected_runtime(list(to_train.values()), load_site(train_yamls[0], base_cfg), base_cfg, st,
                                      len(train_yamls), len(held_yamls)) if to_train else {}

    results_columns = shift.columns_for(class_names, BASE_COLUMNS, TAIL_COLUMNS)
    case_columns = [*CASE_COLUMNS, "dice_mean", *class_keys]
    trained_cache: dict[tuple, tuple[shift.Trained, Method]] = {}
    gallery_done: set[str] = set()
    progress = shift.Progress(todo, estimate)
    try:
        for i, job in enumerate(todo, 1):
            m, seed = job.method, job.seed
            cfg = st.method_cfg(m, seed)
            sites = [load_site(p, cfg) for p in train_yamls]  # data loaded on first use
            names = [s.name for s in sites]
            run_dir = st.run_dir(m, args.split, seed)
            print(f"[{i}/{len(todo)}] {m.name}, seed {seed} ...", flush=True)
            key = (m.training_key, seed)
            trained = shift.reuse_training(trained_cache, key, m, sites, names, class_keys)
            if trained is None:
                trained = shift.train_method(m, sites, names, train_yamls, st, seed, run_dir, class_keys,
                                             reused=id(job) in reused,
                                             wall_before=as_number(previous_wall.get(
                                                 (m.trains_as or m.name, args.split, str(seed)))))
                trained_cache = {key: (trained, m)}  # only the last run is kept: its variants follow it
            t_eval = time.perf_counter()
            held_rows, volumes = [], []
            for path in held_yamls:
                held = load_site(path, cfg)
                metrics, model = shift.evaluate_heldout(m, trained, held, st, class_keys)
                evaluated = len(set(held.val_set.case_ids.tolist()))
                held_rows.append({"site": held.name, "role": "heldout", "evaluated_cases": evaluated, **metrics})
                if evaluated < PER_CASE_BELOW:
                    volumes += [{"site": held.name, **r} for r in volume_rows(
                        model, held, class_names, metrics.get("guides_used", 1.0) != 0.0)]
                if m.uses_retrieval and not m.finetune and held.name not in gallery_done:
                    from benchmarks.report import save_gallery

                    save_gallery(out / f"gallery-{held.name}.png", model, held,
                                 f"{m.name}, held-out site {held.name}, seed {seed}")
                    gallery_done.add(held.name)
            common = {"method": m.name, "split": args.split, "seed": seed, "rounds": st.rounds,
                      "local_epochs": st.local_epochs, "size": st.size, "wall_s": trained.wall_s,
                      "eval_s": time.perf_counter() - t_eval, "bytes_per_round": trained.bytes_per_round,
                      "peak_rss_mb": trained.peak_rss_mb if m.kind == "federated"
                      else max(trained.peak_rss_mb, peak_rss_mb())}
            mine = (m.name, args.split, str(seed))
            rows = [r for r in rows if _run_key(r) != mine]
            rows += [{**common, **r} for r in held_rows] + [{**common, "role": "train", **r} for r in trained.train_rows]
            case_rows = [r for r in case_rows if _run_key(r) != mine]
            case_rows += [{"method": m.name, "split": args.split, "seed": seed, **r} for r in volumes]
            shift.write_rows(cases_path, case_rows, case_columns)
            shift.write_rows(results_path, rows, results_columns)
            print("    " + ", ".join(f"{HELDOUT_SITES.get(r['site'], r['site'])} {r.get('dice_mean', math.nan):.3f}"
                                     for r in held_rows)
                  + f"; in-federation {_mean_or_nan(finite_values(trained.train_rows, 'dice_mean')):.3f}; "
                  f"training {trained.wall_s:.0f} s, evaluation {common['eval_s']:.0f} s; {progress.finished(i)}",
                  flush=True)
    except KeyboardInterrupt:
        return shift.interrupted("real", results_path)
    return _report(out, chosen, class_names, settings)


def _run_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    """The (method, split, seed) run a ``results.csv`` / ``cases.csv`` row belongs to."""
    return str(row.get("method")), str(row.get("split")), str(row.get("seed"))


def _report(out: Path, methods: Sequence[Method], class_names: Sequence[str], settings: Mapping[str, Any]) -> int:
    """Write ``report.md`` from ``out``'s results and print its main table and targets."""
    from jras_core.config import ConfigError

    results_path = out / "results.csv"
    if not results_path.is_file():
        raise ConfigError(f"--report-only: {results_path} not found (run the benchmark first)")
    rows = [r for r in shift.read_rows(results_path) if r.get("split") == settings["split"]]
    cases = [r for r in shift.read_rows(out / "cases.csv") if r.get("split") == settings["split"]]
    summary = write_report(out, rows, cases, methods, class_names, settings)
    print("\n" + summary)
    print(f"\nwrote {results_path}, {out / 'cases.csv'}, {out / 'report.md'} and figures in {out}")
    return 0


# --------------------------------------------------------------------------- report


def seed_values(rows: Sequence[Mapping[str, Any]], method: str, sites: Sequence[str] | None,
                role: str | None = "heldout", key: str = "dice_mean") -> list[float]:
    """Per seed, ``key`` of ``method`` averaged over ``sites`` (None: every site of ``role``;
    ``role`` None: rows of any role); only seeds with a finite value at each of ``sites``."""
    import numpy as np

    from benchmarks.report import as_number

    by_seed: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("method") == method and role in (None, r.get("role")) and (sites is None or r.get("site") in sites):
            by_seed.setdefault(str(r.get("seed")), {})[str(r.get("site"))] = as_number(r.get(key))
    out = []
    for seed in sorted(by_seed, key=lambda s: (len(s), s)):
        vals = by_seed[seed]
        if all(math.isfinite(v) for v in vals.values()) and (sites is None or set(sites) <= set(vals)):
            out.append(float(np.mean(list(vals.values()))))
    return out


def _mean_or_nan(values: Sequence[float]) -> float:
    """The mean of ``values`` (NaN for none)."""
    return sum(values) / len(values) if values else math.nan


def target_lines(rows: Sequence[Mapping[str, Any]], methods: Sequence[Method]) -> list[str]:
    """The targets, each as a computed line: met or missed, with the numbers (means over seeds);
    "not measured" where the results lack what a target compares."""
    present = [m for m in methods if any(r.get("method") == m.name for r in rows)]
    sites = {str(r.get("site")) for r in rows if r.get("role") == "heldout"}

    def mean(m: Method, where: Sequence[str]) -> float:
        return _mean_or_nan(seed_values(rows, m.name, where))

    def best(candidates: Sequence[Method], where: Sequence[str]) -> tuple[Method | None, float]:
        scored = [(m, mean(m, where)) for m in candidates]
        scored = [(m, v) for m, v in scored if math.isfinite(v)]
        return max(scored, key=lambda mv: mv[1]) if scored else (None, math.nan)

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    lines = []
    fed, acdc = [m for m in present if m.kind == "federated"], [IN_DISTRIBUTION]
    label = HELDOUT_SITES[IN_DISTRIBUTION]
    top, value = best(fed, acdc)
    what = f"- {label}: the best federated method's Dice ≥ {ACDC_TARGET:.2f}: "
    lines.append(what + (f"{verdict(value >= ACDC_TARGET)} ({top.name} {value:.3f})" if top
                         else "not measured (no federated method evaluated on it)"))

    by_name = {m.name: m for m in present}
    # FedAvg and central training compared under the same overrides (``fedavg+aug[x=1]`` with ``central[x=1]``)
    pairs = [(m, by_name["central" + suffix]) for base in FEDAVG_FOR_CENTRAL for m in present
             for name, bracket, rest in [m.name.partition("[")] for suffix in [bracket + rest]
             if name == base and "central" + suffix in by_name]
    fedavg, central = pairs[0] if pairs else (None, None)
    what = f"- {label}: FedAvg within {CENTRAL_GAP:.2f} of central training: "
    f_val = mean(fedavg, acdc) if fedavg else math.nan
    c_val = mean(central, acdc) if central else math.nan
    if math.isfinite(f_val) and math.isfinite(c_val):
        lines.append(what + f"{verdict(f_val >= c_val - CENTRAL_GAP)} ({fedavg.name} {f_val:.3f}, {central.name} "
                     f"{c_val:.3f}: {f_val - c_val:+.3f})")
    else:
        lines.append(what + f"not measured (needs central and {' or '.join(FEDAVG_FOR_CENTRAL)})")

    unseen = [s for s in UNSEEN if s in sites]
    jras = [m for m in present if m.uses_retrieval]
    plain = [m for m in present if not m.uses_retrieval and m.kind == "federated"]
    top_j, j_val = best(jras, unseen)
    top_p, p_val = best(plain, unseen)
    what = f"- Unseen sites: the best J-RAS method ≥ the best federated non-retrieval method + {UNSEEN_LEAD:.2f} " \
           f"(mean over {', '.join(HELDOUT_SITES[s] for s in unseen) or 'the unseen sites'}): "
    if top_j and top_p:
        lines.append(what + f"{verdict(j_val - p_val >= UNSEEN_LEAD)} ({top_j.name} {j_val:.3f}, {top_p.name} "
                     f"{p_val:.3f}: {j_val - p_val:+.3f})")
        diffs = {s: mean(top_j, [s]) - mean(top_p, [s]) for s in unseen}
        lines.append(f"- Unseen sites: {top_j.name} not below {top_p.name} on any unseen site: "
                     f"{verdict(all(d >= 0 for d in diffs.values()))} ("
                     + ", ".join(f"{HELDOUT_SITES[s]} {d:+.3f}" for s, d in diffs.items()) + ")")
    else:
        lines.append(what + "not measured (needs a J-RAS and a federated non-retrieval method evaluated on the "
                     "unseen sites)")
    suffix = "".join(top_j.name.partition("[")[1:]) if top_j else ""
    central = by_name.get("central" + suffix) or by_name.get("central")
    c_unseen = mean(central, unseen) if central else math.nan
    if top_j and math.isfinite(c_unseen):
        lines.append(f"- Unseen sites, against central training (pooled data, not private; reported, not a target): "
                     f"{top_j.name} {j_val:.3f}, {central.name} {c_unseen:.3f}: {j_val - c_unseen:+.3f}")
    for site, ref in REFERENCE.items():
        what = f"- {HELDOUT_SITES[site]}: within {REFERENCE_TOLERANCE:.2f} of the challenge entry's {ref:.2f}: "
        top, value = best(jras, [site])
        if top is None:
            top, value = best(present, [site])
        lines.append(what + (f"{verdict(value >= ref - REFERENCE_TOLERANCE)} ({top.name} {value:.3f}: "
                             f"{value - ref:+.3f})" if top else "not measured"))
    return lines


def main_table(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[str]:
    """Methods x held-out sites, the mean over the unseen sites and over the training sites
    (in-federation), each the mean ± standard error over seeds."""
    from benchmarks.report import markdown_table, mean_se

    sites = [s for s in HELDOUT_SITES if any(r.get("site") == s for r in rows)]
    unseen = [s for s in UNSEEN if s in sites]
    body = [[m, *[mean_se(seed_values(rows, m, [s])) for s in sites], mean_se(seed_values(rows, m, unseen)),
             mean_se(seed_values(rows, m, None, role="train"))] for m in methods]
    return markdown_table(["method", *[HELDOUT_SITES[s] for s in sites], "unseen mean", "in-federation mean"], body)


def write_report(out: Path, rows: Sequence[Mapping[str, Any]], cases: Sequence[Mapping[str, Any]],
                 methods: Sequence[Method], class_names: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Write ``report.md`` to ``out`` from the rows of ``results.csv`` and ``cases.csv``; returns
    the summary to print (the main table and the targets)."""
    from benchmarks.report import (
        COST_HEADER,
        DIAGNOSTICS_HEADER,
        DIAGNOSTICS_NOTE,
        cost_cells,
        diagnostics_cells,
        finite_values,
        markdown_table,
        mean_se,
    )

    present = [m for m in methods if any(r.get("method") == m.name for r in rows)]
    names = [m.name for m in present]
    sites = [s for s in HELDOUT_SITES if any(r.get("site") == s and r.get("role") == "heldout" for r in rows)]
    held = [r for r in rows if r.get("role") == "heldout"]
    lines = ["# Real-data benchmark: an ACDC federation, in distribution and on unseen sites", "",
             (f"Training sites (ACDC by {settings['split']}): {settings['train_sites']}"
              + (f", {settings['cases']} patients each" if settings.get("cases") else "")
              + f"; held-out sites: {', '.join(HELDOUT_SITES)}, each with a support bank of its own annotated "
              f"patients, evaluated on its other patients. Seeds {settings['seeds']}; {settings['rounds']} rounds x "
              f"{settings['local_epochs']} local epoch(s), {settings['size']} px; fine-tuning at most {settings['ft_epochs']} "
              f"epoch(s), stopped early on held-out support patients; method config `{settings['config']}`, overrides: {settings['overrides']}."), "",
             f"Reproduce: `{settings['command']}`", "", "## Methods", ""]
    lines += markdown_table(["method", "what", "training run"],
                            [[m.name, m.description, m.trains_as or "own"] for m in present])

    summary = ["## Dice per site (mean ± standard error over seeds)", "",
               ("Held-out sites never train. Unseen mean: per seed, the mean over "
                f"{', '.join(HELDOUT_SITES[s] for s in UNSEEN)}; in-federation mean: per seed, the mean over the "
                "training sites' validation cases."), ""]
    summary += main_table(rows, names)
    summary += ["", "## Targets", "", *target_lines(rows, present)]
    lines += ["", *summary]

    class_cols = [f"dice_{c.lower()}" for c in class_names]
    for site in sites:
        mine = [r for r in held if r.get("site") == site]
        evaluated = sorted({str(r.get("evaluated_cases")) for r in mine} - {"", "None"})
        lines += ["", f"## {HELDOUT_SITES[site]} (`{site}`): Dice per class and HD95 (mean ± s.e. over seeds)", ""]
        if evaluated:
            lines += [f"Evaluated patients: {', '.join(evaluated)}.", ""]
        lines += markdown_table(["method", *class_names, "mean", "HD95 mm"],
                                [[m, *[mean_se(seed_values(rows, m, [site], key=k)) for k in [*class_cols, "dice_mean",
                                                                                              "hd95_mean"]]]
                                 for m in names])

    with_cases = [s for s in sites if any(c.get("site") == s for c in cases)]
    if with_cases:
        lines += ["", f"## Per-volume Dice at sites with fewer than {PER_CASE_BELOW} evaluated patients "
                  "(mean ± s.e. over seeds)", ""]
        for site in with_cases:
            mine = [c for c in cases if c.get("site") == site]
            volumes = list(dict.fromkeys((c["case"], c["phase"]) for c in mine))
            body = []
            for m in names:
                for case, phase in volumes:
                    vs = [c for c in mine if c.get("method") == m and (c["case"], c["phase"]) == (case, phase)]
                    if vs:
                        body.append([m, f"{case} {phase}", *[mean_se(seed_values(vs, m, [site], role=None, key=k))
                                                              for k in [*class_cols, "dice_mean"]]])
            lines += [f"{HELDOUT_SITES[site]} (`{site}`):", ""]
            lines += markdown_table(["method", "volume", *class_names, "mean"], body) + [""]

    train_sites = sorted({str(r.get("site")) for r in rows if r.get("role") == "train"})
    if train_sites:
        lines += ["", "## In-federation validation Dice (mean ± s.e. over seeds)", "",
                  "Each training site's validation patients, with the final model (retrieval methods: the site's own "
                  "bank).", ""]
        lines += markdown_table(["method", *train_sites, "mean"],
                                [[m, *[mean_se(seed_values(rows, m, [s], role="train")) for s in train_sites],
                                  mean_se(seed_values(rows, m, None, role="train"))] for m in names])

    retrieval = [m.name for m in present if m.uses_retrieval]
    if retrieval:
        lines += ["", "## Retrieval diagnostics at the held-out sites (mean ± std over seeds)", "", DIAGNOSTICS_NOTE,
                  "Guides used: the seeds whose evaluation predicted with guides (`adapt.guides`: a held-out site may "
                  "decide against them on its support patients).", ""]
        body = []
        for m in retrieval:
            for s in sites:
                mine = [r for r in held if r.get("method") == m and r.get("site") == s]
                used = finite_values(mine, "guides_used")
                body.append([m, HELDOUT_SITES[s], *diagnostics_cells(mine),
                             f"{sum(u > 0 for u in used)}/{len(used)}" if used else "–"])
        lines += markdown_table(["method", "site", *DIAGNOSTICS_HEADER, "guides used"], body)

    lines += ["", "## Training and evaluation time (mean per seed)", "",
              ("wall s: the training run (a federation: through the Simulation Engine, its start included; a method "
               "that shares a run reports that run's); evaluation s: every held-out site, with fine-tuning for +ft."),
              ""]
    per_run = [next(r for r in held if r.get("method") == m.name and str(r.get("seed")) == seed)
               for m in present for seed in sorted({str(r.get("seed")) for r in held if r.get("method") == m.name})]
    lines += markdown_table(["method", *COST_HEADER, "evaluation s"],
                            [[m.name, *cost_cells([r for r in per_run if r.get("method") == m.name]),
                              _seconds([r for r in per_run if r.get("method") == m.name], "eval_s")]
                             for m in present])

    for site in sites:
        if (out / f"gallery-{site}.png").is_file():
            lines += ["", f"![retrieved guides at {HELDOUT_SITES[site]}](gallery-{site}.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return "\n".join(summary)


def _seconds(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    """The mean of column ``key`` in whole seconds ("–" for none)."""
    from benchmarks.report import finite_values

    value = _mean_or_nan(finite_values(rows, key))
    return f"{value:.0f}" if math.isfinite(value) else "–"


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``jras bench real`` (no heavy import: ``--help`` stays instant)."""
    p.add_argument("--split", choices=list(SPLITS), help="the ACDC training sites: by pathology group (default) or "
                   "the same 80 patients at random")
    p.add_argument("--methods", help="comma-separated, from: " + ", ".join(METHODS) + " (default: all); a method "
                   "may carry config overrides in brackets, e.g. 'jras-fedavg[retrieval.k=1]'")
    p.add_argument("--seeds", help="training seeds, comma-separated (default 0,1,2)")
    p.add_argument("--rounds", type=int, help="federated rounds (central trains rounds x local epochs; default 10)")
    p.add_argument("--local-epochs", type=int, help="local epochs per round (default 2)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the method config's)")
    p.add_argument("--cases", type=int, help="keep each site's first N patients (site YAMLs written to OUT/sites; "
                   "a held-out site's support shrinks to at most N - 1): a small run (default: every patient)")
    p.add_argument("--ft-epochs", type=int, help="most fine-tuning epochs of the +ft methods on a held-out site's "
                   "support patients, which stop early on support patients held out (default: the method config's "
                   "adapt.epochs; adapt.* via --set)")
    shift.add_method_config_arguments(p, "configs/real.yaml")
    p.add_argument("--quick", action="store_true", help="a smoke run in under 5 minutes on 2 cores: 2 patients "
                   "per site, fedavg+aug vs jras-fedavg, seed 0, 1 round x 1 local epoch, 32 px, configs/demo.yaml, "
                   "out runs/bench-real-quick (options given explicitly still apply)")
    p.add_argument("--out", help="output folder (default runs/bench-real)")
    p.add_argument("--fresh", action="store_true", help="rerun runs already in OUT/results.csv")
    p.add_argument("--report-only", action="store_true", help="run nothing: rewrite report.md from OUT/results.csv "
                   "and OUT/cases.csv for the given methods and split")
    p.add_argument("--threads", type=int, default=2, help="torch threads of in-process work: central training, "
                   "held-out evaluation and fine-tuning (default 2)")
    shift.add_simulation_arguments(p)


def main(argv: Sequence[str] | None = None) -> int:
    return shift.standalone_main("jras bench real", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
