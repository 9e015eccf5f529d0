"""Cost benchmark of J-RAS: measurement only (no optimisation).

Sections (one table each; all rows also in ``cost.csv`` and ``cost.md``):

1. ``step``: training step time, phase A of J-RAS (K=3) and of ``none``, and a
   phase-B step, same backbone and batch, at each ``--sizes`` (fixed batches,
   warm-up first, the three steps timed in turn in each repeat, medians); the ratios
   also in process CPU time, as the median of the ratios of steps timed side by side.
2. ``refresh``: bank refresh time (``RetrievalBank.refresh`` with the model's
   retriever) for banks of ``--bank-sizes`` slices, against one local epoch
   (phase A + B of J-RAS measured on a synthetic site of ~200 slices and scaled
   per slice to the bank's size); a whole J-RAS epoch (A + B + refresh) against a
   ``none`` epoch on the same site (wall and CPU time; epochs timed in turn, three
   repeats, ratios taken within each repeat).
3. ``search``: the bank's FAISS exact top-K (``IndexFlatIP`` through
   :func:`jras_core.retrieval.bank.faiss_search`; K + own-case margin, 256 queries per
   batch) against brute force (a chunked torch matrix product + topk,
   :func:`jras_core.retrieval.bank.exact_topk`) at ``--index-sizes``,
   d=128, with the memory-bandwidth floor of one full scan of the index. FAISS
   and brute force must return the same indices (checked; a mismatch raises).
4. ``flower``: Flower round overhead from a simulation's ``metrics.jsonl``
   (``--flower-metrics``): each round's wall time against the shortest round its
   sites' compute (``client-cpu-s``, else ``client-time-s``, of training + evaluation)
   allows on this machine's CPUs, and the server's warm-up before round 1 (``startup.json``) on its
   own row; without the option only a note.
5. ``memory``: peak resident memory (``VmHWM``; ``ru_maxrss`` off Linux) of a
   separate process that builds a 2k-slice bank and runs one J-RAS epoch with it
   (per-client figure).
6. ``transfer``: bytes of one site's model transfer per round, fp32 vs fp16.
7. ``index``: FAISS exact (``IndexFlatIP``) against approximate (``IndexHNSWFlat``, the
   bank's ``retrieval.index: hnsw``) search at ``--bank-index-sizes`` entries, d=128, on
   clustered L2-normalised embeddings: build time, index bytes, search time per batch of
   256 queries, and the approximate index's recall@3 and @10 against the exact top-K.
8. ``sites`` (only with ``--site-sizes``): peak resident memory of a client process that
   loads and preprocesses a site of about N slices (ACDC-derived: rows of the ACDC
   fixture's manifest, repeated under new case names beyond its 1,841 slices), builds its
   bank and trains one J-RAS epoch (``--site-config``, default ``configs/real.yaml``);
   one process per size.

    jras bench cost --only index,sites --site-sizes 250,500,1000,2000,4000 --out runs/cost-scale

    python -m benchmarks.cost --out runs/cost          # or: jras bench cost --out runs/cost
    python -m benchmarks.cost --quick --out /tmp/cost  # tiny, < 1 min
    jras bench cost --set contrastive.steps_per_epoch=4  # the cost of a method option

Timings depend on the machine and on whatever else runs on it: on a shared
machine, run with ``--threads 1`` and read the CPU-time ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from jras_core.files import PROJECT_ROOT, SHARED_DATA

if TYPE_CHECKING:  # heavy imports stay out of `jras --help`
    from jras_core.config import JRASConfig
    from jras_core.data.slices import SliceSet

COLUMNS = ["section", "item", "value", "unit", "note"]
SECTION_TITLES = {
    "step": "1. Training step time",
    "refresh": "2. Bank refresh vs one local epoch",
    "search": "3. Top-K search latency (256 queries per batch)",
    "flower": "4. Flower round overhead",
    "memory": "5. Peak resident memory of one client process",
    "transfer": "6. Model transfer per round (one site)",
    "index": "7. Large banks: flat vs HNSW index (256 queries per batch)",
    "sites": "8. Peak resident memory of one client against its site's size",
}
FLOWER_NOTE = (
    "Flower round overhead: pass a simulation's `tensorboard/metrics.jsonl` with "
    "`--flower-metrics`; the overhead is 1 - ideal / wall, the ideal round being, phase by phase (training, "
    "evaluation), the slower of its slowest site and its sites' total compute (`client-cpu-s`, else "
    "`client-time-s`) spread over the CPUs. "
    "The server's warm-up before round 1 (`startup.json`) is reported on its own row."
)


# --------------------------------------------------------------------------- arguments


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values



def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m benchmarks.cost`` and ``jras bench cost``)."""
    p.add_argument("--sizes", type=_int_list, default=[64, 128], help="image sizes for step times (default 64,128)")
    p.add_argument("--bank-sizes", type=_int_list, default=[500, 2000, 10000],
                   help="bank sizes in slices for the refresh timing (default 500,2000,10000)")
    p.add_argument("--index-sizes", type=_int_list, default=[1000, 10000, 100000],
                   help="index sizes for the search timing (default 1000,10000,100000)")
    p.add_argument("--threads", type=int, default=2, help="torch / FAISS threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 7; 3 with --quick)")
    p.add_argument("--step-repeats", type=int, default=None,
                   help="timed pairs of training steps (default 40; 6 with --quick): a J-RAS step's cost "
                        "varies with the guides each call keeps and the changes it draws")
    p.add_argument("--quick", action="store_true",
                   help="tiny run (size 32, bank 200, index 1000,10000, few repeats; < 1 min)")
    p.add_argument("--out", default="runs/cost", metavar="DIR", help="output folder (default runs/cost)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method config override for every measurement, e.g. --set contrastive.steps_per_epoch=4 "
                        "(repeatable; values parsed as YAML)")
    p.add_argument("--flower-metrics", default=None, metavar="JSONL",
                   help="a simulation's tensorboard/metrics.jsonl: report its rounds' Flower overhead")
    p.add_argument("--bank-index-sizes", type=_int_list, default=[10000, 100000],
                   help="bank sizes of the flat vs HNSW table (default 10000,100000; 1000000 takes minutes)")
    p.add_argument("--site-sizes", type=_int_list, default=None,
                   help="slices per site of the client-memory table (e.g. 250,500,1000,2000,4000; "
                        "off by default: one J-RAS epoch per size)")
    p.add_argument("--site-config", default=str(PROJECT_ROOT / "configs" / "real.yaml"), metavar="YAML",
                   help="method config of the client-memory table (default configs/real.yaml)")
    p.add_argument("--acdc-manifest", default=str(SHARED_DATA / "acdc" / "manifest.csv"),
                   metavar="CSV", help="the ACDC fixture's manifest, the source of the client-memory table's sites")
    p.add_argument("--only", default=None, metavar="SECTIONS",
                   help=f"comma-separated sections to run (of {', '.join(SECTION_TITLES)}; default all)")
    p.add_argument("--_site-probe", dest="site_probe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_memory-probe", dest="memory_probe", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_probe-size", dest="probe_size", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--_probe-bank", dest="probe_bank", type=int, default=2000, help=argparse.SUPPRESS)
    p.add_argument("--_probe-cases", dest="probe_cases", type=int, default=15, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- data


def base_config(size: int, overrides: dict[str, object] | None = None):
    """The method's built-in defaults (backbone, batch, K=3) at ``size`` pixels, with
    ``overrides`` (dotted keys, as ``--set``) applied."""
    from jras_core.config import JRASConfig

    return JRASConfig().with_overrides({**(overrides or {}), "preprocess.size": size})


def site_slices(cfg, cases: int, seed: int = 0):
    """Training slices of a synthetic vendor-A site of ``cases`` cases (~14 slices each)."""
    from jras_core.data.slices import build_slice_set
    from jras_core.data.synthetic import generate_volumes

    vols = generate_volumes("A", cases, seed, cfg.preprocess.size)
    return build_slice_set(vols, cfg.preprocess, cfg.labels.num_classes)


def repeated_slices(slices, n: int):
    """``n`` slices made of copies of ``slices``; each copy gets its own case names
    (so that a copy is a distinct case for own-case exclusion)."""
    import torch

    from jras_core.data.slices import SliceSet

    base = len(slices)
    idx = torch.arange(n) % base
    rep = torch.arange(n) // base
    copies = int(rep.max()) + 1
    ncases = len(slices.cases)
    sub = slices.subset(idx)
    return SliceSet(
        images=sub.images, masks=sub.masks, case_ids=sub.case_ids + rep * ncases,
        volume_ids=sub.volume_ids, slice_pos=sub.slice_pos,
        cases=[c if r == 0 else f"{c}#{r}" for r in range(copies) for c in slices.cases],
        volumes=list(slices.volumes),
    )


# --------------------------------------------------------------------------- measurements


def _median(values: list[float]) -> float:
    v = sorted(values)
    m = len(v) // 2
    return v[m] if len(v) % 2 else 0.5 * (v[m - 1] + v[m])


def _with_cpu_time(fn):
    """``(fn(), process CPU seconds it took)``: unlike wall time, CPU time hardly moves
    when other processes compete for the cores (with one thread per process)."""
    t0 = time.process_time()
    result = fn()
    return result, time.process_time() - t0


def _phase_b(trainer) -> tuple[dict[str, float], float]:
    """One ``phase_retriever`` call: its metrics and its process CPU seconds without the
    bank refresh at its end (timed apart, like its wall time ``retr_time_s``)."""
    bank = trainer.bank
    refresh = bank.refresh
    spent: list[float] = []

    def timed_refresh(*args, **kwargs):
        _, cpu = _with_cpu_time(lambda: refresh(*args, **kwargs))
        spent.append(cpu)

    bank.refresh = timed_refresh
    try:
        metrics, cpu = _with_cpu_time(trainer.phase_retriever)
    finally:
        del bank.refresh  # the class's method again
    return metrics, cpu - sum(spent)


def step_times(cfg, slices, repeats: int) -> dict[str, float]:
    """Median seconds per step: phase A of ``none`` and of J-RAS and a phase-B step of
    J-RAS, in wall and process CPU time (``cpu_*``). The three steps are timed in turn
    within each repeat, so that a change of load on the machine affects them alike;
    ``ratio_phase_a`` is the median over repeats of the J-RAS / ``none`` CPU-time ratio
    of the two steps timed next to each other."""
    import torch

    from jras_core.models import build_model
    from jras_core.training.joint import JRASTrainer

    bs = cfg.train.batch_size
    batch = [torch.arange(bs) % len(slices)]
    trainers = {}
    for name, overrides in (("none", {"segmenter.fusion": "none"}), ("jras", {})):
        c = cfg.with_overrides(overrides)
        trainer = JRASTrainer(build_model(c), c, slices)
        trainer._batches = lambda: list(batch)  # one fixed batch per call
        trainer.phase_segmenter()  # warm-up
        trainers[name] = trainer
    jras = trainers["jras"]
    if cfg.trains_retriever:
        _phase_b(jras)  # warm-up
    timed: dict[str, list[tuple[float, float]]] = {"phase_a_none": [], "phase_a_jras": [], "phase_b_jras": []}
    for _ in range(repeats):
        for name in ("none", "jras"):
            m, cpu = _with_cpu_time(trainers[name].phase_segmenter)
            timed[f"phase_a_{name}"].append((m["seg_time_s"], cpu))
        if cfg.trains_retriever:
            m, cpu = _phase_b(jras)
            timed["phase_b_jras"].append((m["retr_time_s"], cpu))
    out: dict[str, float] = {}
    for key, values in timed.items():
        if values:
            out[key] = _median([wall for wall, _ in values])
            out[f"cpu_{key}"] = _median([cpu for _, cpu in values])
    out["ratio_phase_a"] = _median([j[1] / n[1] for n, j in zip(timed["phase_a_none"], timed["phase_a_jras"])])
    return out


def inference_times(cfg, slices, repeats: int, queries: int = 64) -> dict[str, float]:
    """Median process CPU seconds per slice of :func:`~jras_core.training.evaluate.predict`
    (post-processing included) on ``queries`` of ``slices``: ``none`` (no retrieval), and
    J-RAS retrieving from a bank of ``slices`` with one round (``passes_1``) and with
    ``cfg.retrieval.test_passes`` rounds (``passes_n``), timed in turn in each repeat."""
    import torch

    from jras_core.models import build_model
    from jras_core.retrieval.bank import RetrievalBank
    from jras_core.training.evaluate import predict

    subset = slices.subset(torch.arange(min(queries, len(slices))))
    plain = cfg.with_overrides({"segmenter.fusion": "none"})
    none_model, model = build_model(plain), build_model(cfg)
    bank = RetrievalBank.for_method(slices, cfg)
    bank.refresh(model.retr)
    runs = {
        "none": lambda: predict(none_model, subset, plain),
        "passes_1": lambda: predict(model, subset, cfg.with_overrides({"retrieval.test_passes": 1}), bank),
        "passes_n": lambda: predict(model, subset, cfg, bank),
    }
    for run in runs.values():
        run()  # warm-up
    timed: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timed[name].append(_with_cpu_time(run)[1] / len(subset))
    return {name: _median(values) for name, values in timed.items()}


def augment_times(cfg, slices, repeats: int) -> dict[str, float]:
    """Median process CPU seconds of the intensity augmentation of one phase-A batch:
    ``single`` (B images, as for ``none`` and for queries whose guides are dropped) and
    ``stacked`` (B stacks of a query and its K guides, as ``augment.guides: shared``)."""
    import torch

    from jras_core.data.augment import BatchIntensityAugment

    augment = BatchIntensityAugment(cfg.augment, seed=cfg.train.seed)
    idx = torch.arange(cfg.train.batch_size) % len(slices)
    images = slices.images[idx]
    batches = {"single": images, "stacked": images.repeat(1, 1 + cfg.retrieval.k, 1, 1)}
    for x in batches.values():
        augment(x)  # warm-up
    timed: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(repeats):
        for name, x in batches.items():
            timed[name].append(_with_cpu_time(lambda x=x: augment(x))[1])
    return {name: _median(values) for name, values in timed.items()}


def epoch_time(cfg, slices, repeats: int = 3) -> dict[str, float]:
    """Local epochs on ``slices`` after a one-batch warm-up, of J-RAS (phase A, phase B,
    refresh of the site's bank) and of ``none`` (the same data and batches), timed in turn
    ``repeats`` times; medians. ``ratio_*`` are CPU-time ratios to the ``none`` epoch timed
    in the same repeat: ``ratio_later`` of an epoch whose prediction memory is filled
    (reported with its wall times ``jras_s``, ``seg_s``, ``retr_s``, ``site_refresh_s``).
    With a prediction memory (``retrieval.first_pass: reuse`` or ``warmup``) each repeat
    also times the first epoch of a round, whose memory is empty: ``ratio_single`` runs
    pass 1 (a one-epoch round), ``ratio_first`` is the first epoch of a round of two or
    more (the same, or under ``warmup`` a guide-free one)."""
    import torch

    from jras_core.models import build_model
    from jras_core.training.joint import JRASTrainer

    trainers = {}
    for name, overrides in (("none", {"segmenter.fusion": "none"}), ("jras", {})):
        c = cfg.with_overrides(overrides)
        trainer = JRASTrainer(build_model(c), c, slices)
        full = trainer._batches
        one_batch = [torch.arange(c.train.batch_size) % len(slices)]
        trainer._batches = lambda one_batch=one_batch: list(one_batch)
        trainer.phase_segmenter()  # warm-up
        if c.trains_retriever:
            trainer.phase_retriever()  # warm-up (its refresh is of the small site bank)
        trainer._batches = full
        trainers[name] = trainer
    jras = trainers["jras"]
    memory = jras.memory
    warmup = memory is not None and cfg.retrieval.first_pass == "warmup"
    samples: dict[str, list[float]] = {}

    def record(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for _ in range(repeats):
        m, cpu_none = _with_cpu_time(trainers["none"].train_epoch)
        record("none_s", m["epoch_time_s"])
        if memory is not None:
            memory.known[:] = False  # as at the start of a round of one epoch
            _, cpu = _with_cpu_time(jras.train_epoch)
            record("ratio_single", cpu / cpu_none)
            if warmup:  # a call of 2+ epochs starts with a guide-free one
                memory.known[:] = False
                _, cpu = _with_cpu_time(lambda: jras.train_epoch(guided=False))
            record("ratio_first", cpu / cpu_none)
        m, cpu = _with_cpu_time(jras.train_epoch)
        record("ratio_later", cpu / cpu_none)
        for key, metric in (("seg_s", "seg_time_s"), ("retr_s", "retr_time_s"),
                            ("site_refresh_s", "refresh_time_s"), ("jras_s", "epoch_time_s")):
            record(key, m.get(metric, 0.0))
    return {key: _median(values) for key, values in samples.items()}


def refresh_time(cfg, model, slices, n: int, repeats: int) -> float:
    """Median seconds of ``RetrievalBank.refresh`` for a bank of ``n`` slices."""
    from jras_core.retrieval.bank import RetrievalBank

    bank = RetrievalBank(repeated_slices(slices, n), cfg.labels.num_classes, cfg.retrieval.index)
    bank.refresh(model.retr)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        bank.refresh(model.retr, force=True)
        times.append(time.perf_counter() - t0)
    return _median(times)


def memory_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes per second of a large numpy copy (read + write counted)."""
    import numpy as np

    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2.0 * src.nbytes / min(times)


def search_times(n: int, d: int, k: int, nq: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per batch of ``nq`` queries: FAISS ``IndexFlatIP`` as the bank searches it
    (:func:`~jras_core.retrieval.bank.faiss_search`) vs torch ``mm`` + ``topk``.

    Raises ``AssertionError`` if the two disagree on a top-k index beyond float ties.
    """
    import numpy as np
    import torch

    from jras_core.retrieval.bank import faiss

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((nq, d)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kk = min(k, n)
    from jras_core.retrieval.bank import exact_topk, faiss_search

    index = faiss.IndexFlatIP(d)
    index.add(x)
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)

    def run_faiss():
        return faiss_search(index, q, kk)

    def run_torch():
        return exact_topk(qt, xt, kk)

    for fn in (run_faiss, run_torch):
        fn()  # warm-up
    tf, tt = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f_sims, f_idx = run_faiss()
        t1 = time.perf_counter()
        t_sims, t_idx = run_torch()
        t2 = time.perf_counter()
        tf.append(t1 - t0)
        tt.append(t2 - t1)
    agree = check_same_topk(f_sims, f_idx, t_sims.numpy(), t_idx.numpy(), x, q)
    return {"faiss_s": _median(tf), "torch_s": _median(tt), "agree": agree, "k": kk}


def check_same_topk(f_sims, f_idx, t_sims, t_idx, x, q, tol: float = 1e-4) -> float:
    """1.0 if FAISS and brute force return the same top-k index sets; a difference is
    accepted only between entries whose exact similarities tie within ``tol``."""
    import numpy as np

    same = 0
    for row in range(f_idx.shape[0]):
        a, b = set(f_idx[row].tolist()), set(t_idx[row].tolist())
        if a == b:
            same += 1
            continue
        exact = x @ q[row]  # float32 reference
        kth = np.sort(exact)[::-1][f_idx.shape[1] - 1]
        for i in a ^ b:
            assert abs(float(exact[i]) - float(kth)) <= tol, (
                f"FAISS and brute force disagree on query {row}: {sorted(a)} vs {sorted(b)}"
            )
        same += 1
    assert same == f_idx.shape[0]
    return 1.0


def flower_overhead(path: str | Path, cpus: int | None = None) -> list[dict[str, float]]:
    """Per round of a simulation's ``metrics.jsonl``: wall time, the sites' compute, and
    the overhead fraction ``1 - ideal / wall``.

    A site's compute in a phase (train, evaluate) is its ``client-cpu-s`` (the process's CPU
    time, which stays the compute when sites share a core), else its ``client-time-s``
    (wall). ``ideal`` is the shortest round that compute allows: phase by phase, the
    slower of the phase's slowest site and its total compute spread over ``cpus`` cores
    (default: this machine's), summed over the phases (a phase waits for all its sites).
    ``server_s``: the round's ``server_time_s`` (the server's own work; NaN when not logged).

    Raises ``ValueError`` when no round has both a wall time and per-site client times.
    """
    cores = cpus or os.cpu_count() or 1
    rounds = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        wall = (rec.get("round_stats") or {}).get("wall_time_s")
        server = (rec.get("round_stats") or {}).get("server_time_s")
        per_phase: dict[str, list[float]] = {}
        measures = set()
        for site in (rec.get("sites") or {}).values():
            for phase, values in site.items():
                if not isinstance(values, dict):
                    continue
                key = "client-cpu-s" if "client-cpu-s" in values else "client-time-s"
                if key in values:
                    per_phase.setdefault(phase, []).append(float(values[key]))
                    measures.add("cpu" if key == "client-cpu-s" else "wall")
        compute = sum(sum(v) for v in per_phase.values())
        if wall and compute > 0:
            critical = sum(max(v) for v in per_phase.values())
            ideal = sum(max(max(v), sum(v) / cores) for v in per_phase.values())
            rounds.append({"round": int(rec.get("round", len(rounds) + 1)), "wall_s": float(wall),
                           "compute_s": compute, "critical_s": critical, "ideal_s": ideal,
                           "sites": len(rec["sites"]), "overhead": max(0.0, 1.0 - ideal / float(wall)),
                           "measure": "cpu" if measures == {"cpu"} else "wall",
                           "server_s": float(server) if server is not None else float("nan")})
    if not rounds:
        raise ValueError(f"{path}: no round with a wall time and per-site client-time-s")
    return rounds


def flower_startup(path: str | Path) -> dict | None:
    """The server's warm-up before round 1 (``startup.json`` beside ``metrics.jsonl``;
    written by :meth:`server.tracking.RoundRecorder.record_startup`), or None."""
    from server.tracking import STARTUP_FILE

    file = Path(path).with_name(STARTUP_FILE)
    return json.loads(file.read_text()) if file.is_file() else None


def transfer_bytes(cfg) -> dict[str, int]:
    """One-way bytes of the model's state as fp32 and with float entries cast to fp16."""
    import numpy as np

    from federation.protocol import arrays_nbytes, state_to_arrays
    from jras_core.models import build_model

    arrays = state_to_arrays(build_model(cfg).state_dict())

    def cast(dtype):
        return {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}

    return {"fp32": arrays_nbytes(cast(np.float32)), "fp16": arrays_nbytes(cast(np.float16)),
            "params": int(sum(v.size for v in arrays.values() if np.issubdtype(v.dtype, np.floating)))}


def memory_probe(args: argparse.Namespace) -> int:
    """In its own process: build a bank of ``--_probe-bank`` slices and run one J-RAS
    epoch on a ~``--_probe-cases``-case site with it; print peak RSS as JSON."""
    import torch

    from jras_core.config import parse_overrides
    from jras_core.models import build_model
    from jras_core.retrieval.bank import (
        RetrievalBank,
        faiss,  # noqa: F401  (count the libraries a client loads)
    )
    from jras_core.sysinfo import peak_rss_mb
    from jras_core.training.joint import JRASTrainer

    torch.set_num_threads(args.threads)
    after_imports = peak_rss_mb()
    cfg = base_config(args.probe_size, parse_overrides(args.set))
    site = site_slices(cfg, args.probe_cases)
    bank = RetrievalBank(repeated_slices(site, args.probe_bank), cfg.labels.num_classes, cfg.retrieval.index)
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, site, bank=bank)
    trainer.train_epoch()
    print(json.dumps({"after_imports_mb": after_imports, "peak_mb": peak_rss_mb(),
                      "bank": len(bank), "site": len(site)}))
    return 0


def run_memory_probe(size: int, bank: int, cases: int, threads: int, settings: list[str] | None = None) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.cost", "--_memory-probe", "--_probe-size", str(size),
           "--_probe-bank", str(bank), "--_probe-cases", str(cases), "--threads", str(threads)]
    return _run_probe(cmd, settings or [], "memory probe")


def _run_probe(cmd: list[str], settings: list[str], what: str) -> dict[str, float]:
    """Run a probe ``cmd`` (with ``--set`` of each of ``settings``) in a process of its own
    from the project root; its last line of output, JSON, is the result."""
    for item in settings:
        cmd = [*cmd, "--set", item]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def clustered_embeddings(n: int, d: int, seed: int, clusters: int = 1000, spread: float = 0.35):
    """``(n, d)`` float32 L2-normalised points around ``clusters`` random unit centres (Gaussian
    offsets of ``spread`` per unit of norm): the structure of a bank's embeddings, where slices
    of like anatomy lie close together. On uniform random points every neighbour is about as far
    as any other, and a recall measured there says little about a bank."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    step = 1 << 16
    for start in range(0, n, step):  # in chunks: 1M x 128 is 0.5 GiB
        m = min(step, n - start)
        pts = centres[rng.integers(0, clusters, m)] + rng.standard_normal((m, d)).astype(np.float32) * (spread / d**0.5)
        x[start:start + m] = pts / np.linalg.norm(pts, axis=1, keepdims=True)
    return x


def recall_at(approx, exact, k: int) -> float:
    """Mean over queries of ``|approx top-k & exact top-k| / k`` (rows ``(Q, >= k)`` indices)."""
    import numpy as np

    hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) for a, e in zip(np.asarray(approx), np.asarray(exact))]
    return float(np.mean(hits)) / k


def index_times(n: int, d: int, nq: int, k: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """The bank's flat and HNSW indices (:func:`~jras_core.retrieval.bank.build_index`) over ``n``
    clustered embeddings (:func:`clustered_embeddings`): build seconds, serialised bytes, median
    seconds per batch of ``nq`` queries (top ``k``, :func:`~jras_core.retrieval.bank.faiss_search`)
    and HNSW's recall@3 and @10 against the flat index's exact top-K on the same queries."""
    from jras_core.retrieval.bank import HNSW_EF_SEARCH, build_index, faiss, faiss_search

    x = clustered_embeddings(n + nq, d, seed)
    q, x = x[n:], x[:n]  # queries from the same distribution, not in the index
    out: dict[str, float] = {}
    results = {}
    for kind in ("flat", "hnsw"):
        t0 = time.perf_counter()
        index = build_index(x, kind)
        out[f"{kind}_build_s"] = time.perf_counter() - t0
        out[f"{kind}_bytes"] = float(faiss.serialize_index(index).nbytes)
        if kind == "hnsw":
            index.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        faiss_search(index, q, k)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            results[kind] = faiss_search(index, q, k)[1]
            times.append(time.perf_counter() - t0)
        out[f"{kind}_search_s"] = _median(times)
        del index
    out["recall3"] = recall_at(results["hnsw"], results["flat"], 3)
    out["recall10"] = recall_at(results["hnsw"], results["flat"], 10)
    out["data_bytes"] = float(x.nbytes)
    return out


def measure_index(opts: Options, table: Table) -> None:
    """Section 7: flat vs HNSW at ``--bank-index-sizes`` (:func:`index_times`)."""
    from jras_core.retrieval.bank import HNSW_EF_SEARCH, HNSW_LINKS

    d, nq, k = 128, 256, 10
    for n in opts.bank_index_sizes:
        r = index_times(n, d, nq, k, opts.repeats)
        note = f"d={d}, {nq} queries, top {k}, 1000 clusters"
        table.add("index", f"flat build, N={n}", r["flat_build_s"], "s", "IndexFlatIP.add")
        table.add("index", f"HNSW build, N={n}", r["hnsw_build_s"], "s",
                  f"IndexHNSWFlat M={HNSW_LINKS}, efConstruction 40, {opts.threads} thread(s)")
        table.add("index", f"flat index size, N={n}", r["flat_bytes"] / 2**20, "MiB", "serialised")
        table.add("index", f"HNSW index size, N={n}", r["hnsw_bytes"] / 2**20, "MiB", "serialised (vectors + graph)")
        table.add("index", f"flat search, N={n}", r["flat_search_s"] * 1e3, "ms/batch", note)
        table.add("index", f"HNSW search, N={n}", r["hnsw_search_s"] * 1e3, "ms/batch",
                  note + f", efSearch {HNSW_EF_SEARCH}")
        table.add("index", f"HNSW recall@3, N={n}", r["recall3"], "fraction", "of the exact top 3, same queries")
        table.add("index", f"HNSW recall@10, N={n}", r["recall10"], "fraction", "of the exact top 10, same queries")
    table.show("index")


def acdc_site_rows(manifest: str | Path, slices: int) -> list[dict[str, str]]:
    """Manifest rows of an ACDC-derived site of about ``slices`` labelled slices: the fixture's
    rows in order (about 9.2 labelled slices a volume), again under case names ``NAME#r`` once
    they run out; image and mask paths made absolute."""
    manifest = Path(manifest)
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"{manifest}: no rows")
    per_volume = 1841 / 200  # the fixture's labelled slices per volume
    wanted = max(2, round(slices / per_volume))
    out = []
    for i in range(wanted):
        row = dict(rows[i % len(rows)])
        rep = i // len(rows)
        if rep:
            row["case"] = f"{row['case']}#{rep}"
        for col in ("image", "mask"):
            row[col] = str((manifest.parent / row[col]).resolve())
        out.append(row)
    return out


def site_memory_probe(args: argparse.Namespace) -> int:
    """In its own process: a client's work on an ACDC-derived site of about ``--_site-probe``
    slices (:func:`acdc_site_rows`, validation fraction 0.2): load and preprocess its
    volumes, build and embed its bank, train one J-RAS epoch; print the peak RSS after each
    step as JSON."""
    import tempfile

    import torch

    from jras_core.config import JRASConfig, parse_overrides
    from jras_core.models import build_model
    from jras_core.retrieval.bank import faiss  # noqa: F401  (count the libraries a client loads)
    from jras_core.site import Site
    from jras_core.sysinfo import peak_rss_mb

    torch.set_num_threads(args.threads)
    out: dict[str, float] = {"after_imports_mb": peak_rss_mb()}
    method = JRASConfig.from_yaml(args.site_config).with_overrides(parse_overrides(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        rows = acdc_site_rows(args.acdc_manifest, args.site_probe)
        manifest = Path(tmp) / "manifest.csv"
        with open(manifest, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (Path(tmp) / "site.yaml").write_text(
            f"name: scale\nvendor: A\ndata:\n  kind: manifest\n  path: {manifest}\nval_fraction: 0.2\nsplit_seed: 0\n")
        site = Site.from_yaml(Path(tmp) / "site.yaml", method)
        t0 = time.perf_counter()
        out["slices"] = len(site.slices)
        out["train"] = len(site.train_set)
        out["load_mb"], out["load_s"] = peak_rss_mb(), time.perf_counter() - t0
        model = build_model(method)
        site.bank.refresh(model.retr)
        out["bank_mb"] = peak_rss_mb()
        t0 = time.perf_counter()
        site.train(model, epochs=1)
        out["epoch_mb"], out["epoch_s"] = peak_rss_mb(), time.perf_counter() - t0
    print(json.dumps(out))
    return 0


def run_site_probe(slices: int, opts: Options) -> dict[str, float]:
    """:func:`site_memory_probe` in a process of its own."""
    cmd = [sys.executable, "-m", "benchmarks.cost", "--_site-probe", str(slices), "--threads", str(opts.threads),
           "--site-config", opts.site_config, "--acdc-manifest", opts.acdc_manifest]
    return _run_probe(cmd, opts.settings, f"site memory probe ({slices} slices)")


def measure_sites(opts: Options, table: Table) -> None:
    """Section 8: a client's peak RSS against its site's size (:func:`run_site_probe`)."""
    for n in opts.site_sizes or []:
        r = run_site_probe(n, opts)
        note = f"{r['slices']:.0f} slices ({r['train']:.0f} training), {Path(opts.site_config).name}"
        table.add("sites", f"site ~{n}: after load + preprocessing", r["load_mb"], "MiB", note + f", {r['load_s']:.0f} s")
        table.add("sites", f"site ~{n}: + bank", r["bank_mb"], "MiB", note)
        table.add("sites", f"site ~{n}: + one J-RAS epoch", r["epoch_mb"], "MiB",
                  note + f", epoch {r['epoch_s']:.0f} s; imports alone {r['after_imports_mb']:.0f} MiB")
    table.show("sites")


# --------------------------------------------------------------------------- report


def format_table(rows: list[dict[str, object]]) -> list[str]:
    lines = ["| item | value | unit | note |", "|---|---:|---|---|"]
    for r in rows:
        v = float(r["value"])
        text = f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        lines.append(f"| {r['item']} | {text} | {r['unit']} | {r['note']} |")
    return lines


@dataclass(frozen=True)
class Table:
    """The measured rows of every section, in the order measured (the rows of ``cost.csv``)."""

    rows: list[dict[str, object]] = field(default_factory=list)

    def add(self, section: str, item: str, value: float, unit: str, note: str = "") -> None:
        """Append a row; a value that is not finite and positive is a failed measurement (raises)."""
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise RuntimeError(f"{section}/{item}: measured value {value!r} is not finite and positive")
        self.rows.append({"section": section, "item": item, "value": value, "unit": unit, "note": note})

    def lines(self, section: str) -> list[str]:
        """The Markdown table of ``section``'s rows."""
        return format_table([r for r in self.rows if r["section"] == section])

    def show(self, section: str) -> None:
        """Print ``section``'s title and table."""
        print(f"\n## {SECTION_TITLES[section]}")
        print("\n".join(self.lines(section)), flush=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args`` (see :func:`add_arguments`): each
    section measured and its table printed in turn, then ``cost.csv`` and ``cost.md`` written
    (``--_memory-probe``: only the memory probe, in its own process)."""
    if getattr(args, "memory_probe", False):
        return memory_probe(args)
    if getattr(args, "site_probe", None):
        return site_memory_probe(args)
    opts = resolve_options(args)
    header = set_up(opts)
    t_start = time.perf_counter()
    print(f"# J-RAS cost benchmark ({header})", flush=True)
    table = Table()
    cfg = base_config(opts.largest, opts.method)
    if {"step", "refresh", "search"} & opts.sections:
        sites = measure_steps(opts, table) if "step" in opts.sections else {
            opts.largest: site_slices(cfg, opts.site_cases)}
        slices = sites[opts.largest]
        if "refresh" in opts.sections:
            measure_refresh(opts, table, cfg, slices)
        if "search" in opts.sections:
            measure_search(opts, table, cfg, slices)
    if opts.flower_metrics and "flower" in opts.sections:
        measure_flower(opts.flower_metrics, table)
    if "memory" in opts.sections:
        measure_memory(opts, table)
    if "transfer" in opts.sections:
        measure_transfer(table, cfg)
    if "index" in opts.sections:
        measure_index(opts, table)
    if "sites" in opts.sections and opts.site_sizes:
        measure_sites(opts, table)
    write_outputs(opts, table, header, t_start)
    return 0


@dataclass(frozen=True)
class Options:
    """What one run measures, resolved from its options (``--quick``: tiny sizes, few repeats)."""

    settings: list[str]
    """The ``--set`` items as given (passed on to the memory probe's process)."""
    method: dict[str, object]
    """The method-config overrides they make (dotted keys), applied to every measurement."""
    threads: int
    quick: bool
    sizes: list[int]
    bank_sizes: list[int]
    index_sizes: list[int]
    repeats: int
    step_repeats: int
    epoch_repeats: int
    site_cases: int
    """Cases of the synthetic site (~14 slices each)."""
    copy_bytes: int
    """Bytes of the numpy copy that measures the memory bandwidth."""
    probe_size: int
    probe_bank: int
    """Image size and bank slices of the memory probe."""
    out: Path
    flower_metrics: str | None
    bank_index_sizes: list[int] = field(default_factory=list)
    site_sizes: list[int] | None = None
    site_config: str = ""
    acdc_manifest: str = ""
    sections: frozenset[str] = frozenset(SECTION_TITLES)
    """The sections to run (``--only``; default all)."""

    @property
    def largest(self) -> int:
        """The largest image size: the size of the sections after the step times."""
        return max(self.sizes)


def resolve_options(args: argparse.Namespace) -> Options:
    """The run's :class:`Options` from parsed ``args`` (nothing is set up yet)."""
    from jras_core.config import parse_overrides

    quick = args.quick
    return Options(
        settings=args.set, method=parse_overrides(args.set), threads=args.threads, quick=quick,
        sizes=[32] if quick else args.sizes,
        bank_sizes=[200] if quick else args.bank_sizes,
        index_sizes=[1000, 10000] if quick else args.index_sizes,
        repeats=args.repeats or (3 if quick else 7),
        step_repeats=args.step_repeats or (6 if quick else 40),
        epoch_repeats=1 if quick else 3,
        site_cases=4 if quick else 15,  # ~14 slices per case: ~56 / ~200 slices
        copy_bytes=(64 if quick else 512) * 2**20,
        probe_size=32 if quick else 128,
        probe_bank=200 if quick else 2000,
        out=Path(args.out), flower_metrics=args.flower_metrics,
        bank_index_sizes=[2000] if quick else args.bank_index_sizes,
        site_sizes=args.site_sizes, site_config=args.site_config, acdc_manifest=args.acdc_manifest,
        sections=_sections(args.only),
    )


def _sections(text: str | None) -> frozenset[str]:
    """The sections named in ``--only`` (all when None); an unknown name raises ValueError."""
    if not text:
        return frozenset(SECTION_TITLES)
    names = {t.strip() for t in text.split(",") if t.strip()}
    unknown = sorted(names - set(SECTION_TITLES))
    if unknown:
        raise ValueError(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTION_TITLES)}")
    return frozenset(names)


def set_up(opts: Options) -> str:
    """Quiet the method's logs, set torch's and FAISS's threads and create the output folder;
    returns the run's description (the header of the printout and of ``cost.md``)."""
    import logging

    import torch

    from jras_core.retrieval.bank import faiss

    logging.getLogger("jras_core").setLevel(logging.WARNING)
    torch.set_num_threads(opts.threads)
    faiss.omp_set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    return (f"threads {opts.threads}, torch {torch.__version__}, faiss {faiss.__version__}, "
            f"{os.cpu_count()} CPUs visible, OPENBLAS_CORETYPE {os.environ.get('OPENBLAS_CORETYPE', 'unset')}"
            f"{', --quick' if opts.quick else ''}"
            + (f", --only {','.join(s for s in SECTION_TITLES if s in opts.sections)}"
               if opts.sections != frozenset(SECTION_TITLES) else "")
            + "".join(f", --set {item}" for item in opts.settings))


# --------------------------------------------------------------------------- sections


def measure_steps(opts: Options, table: Table) -> dict[int, SliceSet]:
    """Section 1, at each image size: training steps, intensity augmentation and inference on
    a synthetic site. Returns the site of each size (the later sections use the largest)."""
    sites = {}
    for size in opts.sizes:
        cfg = base_config(size, opts.method)
        slices = site_slices(cfg, opts.site_cases)
        sites[size] = slices
        add_step_rows(table, cfg, slices, opts.step_repeats)
        add_augment_rows(table, cfg, slices, opts.repeats)
        add_inference_rows(table, cfg, slices, opts.repeats)
    table.show("step")
    return sites


def add_step_rows(table: Table, cfg: JRASConfig, slices: SliceSet, repeats: int) -> None:
    """Phase A of ``none`` and of J-RAS and phase B of J-RAS (:func:`step_times`, ``repeats``
    repeats), in wall time and as CPU-time ratios."""
    size = cfg.preprocess.size
    st = step_times(cfg, slices, repeats)
    note = f"batch {cfg.train.batch_size}, {cfg.segmenter.backbone} {cfg.segmenter.channels}"
    table.add("step", f"phase A none, {size}px", st["phase_a_none"] * 1e3, "ms/step", note)
    table.add("step", f"phase A J-RAS K={cfg.retrieval.k}, {size}px", st["phase_a_jras"] * 1e3, "ms/step", note)
    table.add("step", f"phase A J-RAS / none, {size}px", st["phase_a_jras"] / st["phase_a_none"], "x", "wall time")
    table.add("step", f"phase A J-RAS / none, {size}px, CPU time", st["ratio_phase_a"], "x",
              f"process CPU time (robust to other load); median over {repeats} repeats of the ratio of "
              "two steps timed next to each other")
    if "phase_b_jras" in st:
        note_b = (f"{cfg.contrastive.candidates} candidates, relevance {cfg.contrastive.relevance}, "
                  f"keys {cfg.contrastive.keys}, pass 1 {cfg.retrieval.first_pass}, refresh excluded")
        table.add("step", f"phase B J-RAS, {size}px", st["phase_b_jras"] * 1e3, "ms/step", note_b)
        table.add("step", f"phase B J-RAS / phase A none, {size}px, CPU time",
                  st["cpu_phase_b_jras"] / st["cpu_phase_a_none"], "x", "process CPU time (robust to other load)")


def add_augment_rows(table: Table, cfg: JRASConfig, slices: SliceSet, repeats: int) -> None:
    """The intensity augmentation of a batch of images and of a batch of guide stacks
    (:func:`augment_times`)."""
    size, batch = cfg.preprocess.size, cfg.train.batch_size
    aug = augment_times(cfg, slices, repeats)
    note_aug = f"process CPU time, batch {batch}, augment.prob {cfg.augment.prob}"
    table.add("step", f"intensity augmentation, {batch} images, {size}px", aug["single"] * 1e3, "ms/batch",
              note_aug + " (none, and queries without guides)")
    table.add("step", f"intensity augmentation, {batch} stacks of 1 + {cfg.retrieval.k}, {size}px",
              aug["stacked"] * 1e3, "ms/batch", note_aug + " (query and guides, augment.guides shared)")


def add_inference_rows(table: Table, cfg: JRASConfig, slices: SliceSet, repeats: int) -> None:
    """Inference per slice of ``none`` and of J-RAS with one and with ``retrieval.test_passes``
    retrieval rounds (:func:`inference_times`)."""
    from jras_core.models.batching import inference_batch_size

    size, n = cfg.preprocess.size, cfg.retrieval.test_passes
    inf = inference_times(cfg, slices, repeats)
    note_inf = (f"process CPU time per slice, batches of up to {inference_batch_size(size)}, "
                "post-processing included")
    table.add("step", f"inference none, {size}px", inf["none"] * 1e3, "ms/slice", note_inf)
    table.add("step", f"inference J-RAS, 1 retrieval round, {size}px", inf["passes_1"] * 1e3, "ms/slice",
              note_inf + "; pass 1, retrieval, guided forward")
    table.add("step", f"inference J-RAS, {n} retrieval round(s), {size}px", inf["passes_n"] * 1e3, "ms/slice",
              note_inf + " (retrieval.test_passes)")
    table.add("step", f"inference J-RAS ({n} round(s)) / none, {size}px", inf["passes_n"] / inf["none"], "x",
              "process CPU time")


def measure_refresh(opts: Options, table: Table, cfg: JRASConfig, slices: SliceSet) -> None:
    """Section 2: local epochs on ``slices``, then the refresh of banks of ``--bank-sizes``
    slices against an epoch over as many slices."""
    from jras_core.models import build_model

    size = cfg.preprocess.size
    per_slice = add_epoch_rows(table, cfg, slices, opts.epoch_repeats)
    model = build_model(cfg)
    for n in opts.bank_sizes:
        t = refresh_time(cfg, model, slices, n, max(1, opts.repeats // 2))
        table.add("refresh", f"refresh, bank {n}", t, "s", f"{t / n * 1e3:.3f} ms/slice, {size}px")
        table.add("refresh", f"refresh / epoch, bank {n}", 100.0 * t / (per_slice * n), "%",
                  f"vs an epoch over {n} slices (scaled per slice)")
    table.show("refresh")


def add_epoch_rows(table: Table, cfg: JRASConfig, slices: SliceSet, repeats: int) -> float:
    """A J-RAS epoch against a ``none`` epoch on ``slices`` (:func:`epoch_time`), with a
    prediction memory also rounds of 1 and 3 epochs; returns the seconds per slice of a
    J-RAS epoch (phase A + B, refresh excluded)."""
    size = cfg.preprocess.size
    ep = epoch_time(cfg, slices, repeats)
    per_slice = (ep["seg_s"] + ep["retr_s"]) / len(slices)
    paired = f"process CPU time, median over {repeats} repeats of the ratio to the none epoch of the same repeat"
    table.add("refresh", f"local epoch (A+B), {len(slices)}-slice site, {size}px", ep["seg_s"] + ep["retr_s"], "s",
              f"phase A {ep['seg_s']:.2f} s + phase B {ep['retr_s']:.2f} s, refresh excluded")
    table.add("refresh", "local epoch per slice", per_slice * 1e3, "ms/slice")
    table.add("refresh", f"local epoch none, {size}px", ep["none_s"], "s", "same site and batches, no retrieval")
    table.add("refresh", "J-RAS epoch (A+B+refresh) / none epoch", ep["jras_s"] / ep["none_s"], "x",
              f"wall time; site bank refresh {ep['site_refresh_s']:.2f} s included")
    table.add("refresh", "J-RAS epoch / none epoch, CPU time", ep["ratio_later"], "x", paired)
    if "ratio_first" in ep:
        warmup = cfg.retrieval.first_pass == "warmup"
        table.add("refresh", "J-RAS first epoch of a round / none epoch", ep["ratio_first"], "x",
                  paired + "; " + ("phase A without guides (first_pass warmup), then phase B" if warmup
                                   else "pass 1 run for the queries not yet in the prediction memory"))
        for e in (1, 3):
            first = ep["ratio_single"] if e == 1 else ep["ratio_first"]
            table.add("refresh", f"J-RAS round of {e} local epoch(s) / none, CPU time",
                      (first + (e - 1) * ep["ratio_later"]) / e, "x",
                      "first epoch + later epochs, from the ratios above")
    return per_slice


def measure_search(opts: Options, table: Table, cfg: JRASConfig, slices: SliceSet) -> None:
    """Section 3: FAISS against brute-force top-K at ``--index-sizes``, with the memory
    bandwidth's floor of one scan of the index."""
    from jras_core.retrieval.bank import RetrievalBank

    d, nq = 128, 256
    margin = RetrievalBank(slices, cfg.labels.num_classes).max_per_owner
    k = 3 + margin
    bw = memory_bandwidth(opts.copy_bytes, opts.repeats)
    table.add("search", "memory bandwidth (numpy copy)", bw / 1e9, "GB/s", "read + write bytes / time")
    for n in opts.index_sizes:
        s = search_times(n, d, k, nq, opts.repeats)
        floor = n * d * 4 / bw
        note = f"k={s['k']} (3 + own-case margin {margin}), d={d}, {nq} queries"
        table.add("search", f"FAISS flat IP, N={n}", s["faiss_s"] * 1e3, "ms/batch", note)
        table.add("search", f"torch mm + topk, N={n}", s["torch_s"] * 1e3, "ms/batch", note)
        table.add("search", f"scan floor, N={n}", floor * 1e3, "ms/batch",
                  f"{n * d * 4 / 2**20:.1f} MiB index / bandwidth")
        table.add("search", f"FAISS == brute force top-k, N={n}", s["agree"], "bool",
                  "same index sets (float ties allowed)")
    table.show("search")


def measure_flower(path: str, table: Table) -> None:
    """Section 4: the server's warm-up before round 1 and each round's overhead, from the
    simulation's ``metrics.jsonl`` at ``path`` (:func:`flower_startup`, :func:`flower_overhead`)."""
    startup = flower_startup(path)
    if startup and startup.get("wall_time_s"):
        site_times = [t for t in (startup.get("client-time-s") or {}).values() if t is not None]
        table.add("flower", "warm-up before round 1, wall time", startup["wall_time_s"], "s",
                  f"{startup.get('sites_ready', 0)} of {startup.get('sites', 0)} sites ready; worker start, imports, "
                  f"site data and bank (slowest site {max(site_times, default=0.0):.1f} s); not part of any round")
    for r in flower_overhead(path):
        what = "client-cpu-s" if r["measure"] == "cpu" else "client-time-s"
        note = (f"{r['sites']} sites; {what}: sum {r['compute_s']:.1f} s, "
                f"slowest site per phase {r['critical_s']:.1f} s")
        table.add("flower", f"round {r['round']} wall time", r["wall_s"], "s", note)
        server = f"; server-side work {r['server_s']:.2f} s" if math.isfinite(r["server_s"]) else ""
        table.add("flower", f"round {r['round']} overhead", max(100.0 * r["overhead"], 1e-3), "%",
                  f"1 - ideal {r['ideal_s']:.1f} s / wall (per phase: slowest site, or compute / {os.cpu_count()} CPUs)"
                  + server)
    table.show("flower")


def measure_memory(opts: Options, table: Table) -> None:
    """Section 5: peak resident memory of a separate process that builds a bank and runs one
    J-RAS epoch (:func:`run_memory_probe`)."""
    mem = run_memory_probe(opts.probe_size, opts.probe_bank, opts.site_cases, opts.threads, opts.settings)
    table.add("memory", "after imports (torch, MONAI, FAISS)", mem["after_imports_mb"], "MiB", "peak RSS (VmHWM)")
    table.add("memory", f"peak: bank {mem['bank']} x {opts.probe_size}px + 1 J-RAS epoch", mem["peak_mb"], "MiB",
              f"site of {mem['site']} slices, separate process, peak RSS (VmHWM)")
    table.show("memory")


def measure_transfer(table: Table, cfg: JRASConfig) -> None:
    """Section 6: one site's model transfer per round, fp32 and fp16 (:func:`transfer_bytes`)."""
    tb = transfer_bytes(cfg)
    note = f"{tb['params']:,} float values (segmenter + retriever)"
    table.add("transfer", "model, fp32, one way", tb["fp32"] / 2**20, "MiB", note)
    table.add("transfer", "model, fp16, one way", tb["fp16"] / 2**20, "MiB", note)
    table.add("transfer", "round (down + up), fp32", 2 * tb["fp32"] / 2**20, "MiB")
    table.add("transfer", "round (down + up), fp16", 2 * tb["fp16"] / 2**20, "MiB")
    table.show("transfer")


# --------------------------------------------------------------------------- files


def write_outputs(opts: Options, table: Table, header: str, t_start: float) -> None:
    """Write ``cost.csv`` and ``cost.md`` (the run's ``header``, its seconds since ``t_start``
    and every section's table; the Flower section's a note without ``--flower-metrics``)."""
    with open(opts.out / "cost.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(table.rows)
    md = ["# J-RAS cost benchmark", "", header + f"; {time.perf_counter() - t_start:.0f} s in all.",
          "Timings depend on the machine and on what else ran on it; medians of repeats after a warm-up.", ""]
    for section, title in SECTION_TITLES.items():
        if section not in opts.sections or (section == "sites" and not opts.site_sizes):
            continue
        if section == "flower" and not opts.flower_metrics:
            md += [f"## {title}", "", FLOWER_NOTE, ""]
        else:
            md += [f"## {title}", "", *table.lines(section), ""]
    (opts.out / "cost.md").write_text("\n".join(md))
    if not opts.flower_metrics and "flower" in opts.sections:
        print(f"\n{FLOWER_NOTE}")
    print(f"wrote {opts.out / 'cost.csv'} and {opts.out / 'cost.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
