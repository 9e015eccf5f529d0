"""Centralised vendor-shift benchmark of the method's variants.

Trains on pooled synthetic vendors (default A-C), evaluates on the held-out
vendor (default D) with a small support bank, for each variant and seed, and
reports Dice with the retrieval diagnostics. Also measures (1) the raw vendor
shift (a plain segmenter trained on vendor A alone, evaluated on A and on D) and
(2) the training step time with retrieval vs without.

    python -m benchmarks.central_shift --out runs/central-shift

Prints a table and writes ``results.csv`` and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report import mean_se as report_mean_se
from jras_core.config import JRASConfig
from jras_core.data.slices import SliceSet
from jras_core.models import build_model
from jras_core.site import Site
from jras_core.training.centralised import train_centralised
from jras_core.training.joint import JRASTrainer

VARIANTS: dict[str, dict[str, object]] = {
    "none": {"segmenter.fusion": "none", "augment.intensity": False},
    "none+aug": {"segmenter.fusion": "none"},
    "frozen": {"retriever.mode": "frozen"},
    "mask-rank": {"retriever.mode": "mask"},
    "jras": {},
    "jras-grid": {"retriever.pool_grid": 4},
    "jras-zero": {"segmenter.guide_init": "zero"},
    "jras-grid-zero": {"retriever.pool_grid": 4, "segmenter.guide_init": "zero"},
    "jras-shared-aug": {"augment.guides": "shared"},
    "jras-indep-aug": {"augment.guides": "independent"},
    "none+aug-nm": {"segmenter.fusion": "none", "augment.non_monotone": 0.3},
    "jras-shared-aug-nm": {"augment.guides": "shared", "augment.non_monotone": 0.3},
    "jras-shared-app": {"augment.guides": "shared", "segmenter.appearance": True},
    "jras-shared-app-nm": {"augment.guides": "shared", "segmenter.appearance": True, "augment.non_monotone": 0.3},
    "jras-app": {"segmenter.appearance": True},
    "jras-cheap-retriever": {"retriever.input_size": 32, "contrastive.steps_per_epoch": 4},
    "jras-naive": {"retriever.input": "image", "retrieval.align_centroid": False,
                   "retrieval.guide_dropout": 0.0, "augment.intensity": False},
}
COLUMNS = ["variant", "seed", "heldout_dice", "indist_dice", "guide_dice", "dice_oracle", "dice_random",
           "dice_noguide", "heldout_hd95", "train_s"]


def make_sites(cfg: JRASConfig, train_vendors: list[str], heldout: str, cases: int, support: int,
               data_seed: int) -> list[Site]:
    from tools.sites import synthetic_site

    sites = [Site(synthetic_site(v, cases, data_seed, cfg.preprocess.size), cfg) for v in train_vendors]
    sites.append(Site(synthetic_site(heldout, cases, data_seed, cfg.preprocess.size, support=support), cfg))
    return sites


def step_times(cfg: JRASConfig, slices: SliceSet, repeats: int = 5) -> dict[str, float]:
    """Mean seconds per phase-A step for K=3 retrieval and for ``none`` (same backbone/batch)."""
    out = {}
    for name, overrides in (("none", {"segmenter.fusion": "none"}), ("jras", {})):
        c = cfg.with_overrides(overrides)
        trainer = JRASTrainer(build_model(c), c, slices)
        trainer._batches = lambda: [torch.arange(c.train.batch_size) % len(slices)] * repeats  # fixed batches
        trainer.phase_segmenter()  # warm-up
        t = trainer.phase_segmenter()["seg_time_s"] / repeats
        out[name] = t
    return out


def mean_se(values: list[float]) -> str:
    """Mean ± standard error of the finite values (see :func:`benchmarks.report.mean_se`)."""
    return report_mean_se([v for v in values if not math.isnan(v)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="method config (default configs/demo.yaml)")
    p.add_argument("--train-vendors", default="A,B,C")
    p.add_argument("--heldout", default="D")
    p.add_argument("--cases", type=int, default=10, help="cases per vendor")
    p.add_argument("--support", type=int, default=5, help="support cases of the held-out vendor")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="none,none+aug,frozen,jras")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-shift", action="store_true", help="skip the vendor-A-only shift check")
    p.add_argument("--out", default="runs/central-shift")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = JRASConfig.from_yaml(args.config).with_overrides(
        {"train.epochs": args.epochs, "preprocess.size": args.size}
    )
    train_vendors = args.train_vendors.split(",")
    lines: list[str] = []

    if not args.skip_shift:
        cfg = base.with_overrides(VARIANTS["none"])
        sites = make_sites(cfg, ["A"], args.heldout, args.cases, args.support, 0)
        _, res = train_centralised(sites, cfg)
        a, d = res["synthetic-A"]["dice_mean"], res[f"synthetic-{args.heldout}"]["dice_mean"]
        line = f"vendor shift: plain segmenter trained on A alone: Dice on A val {a:.3f}, on {args.heldout} {d:.3f}"
        print(line)
        lines.append(line)

    rows = []
    for variant in args.variants.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = base.with_overrides({**VARIANTS[variant], "train.seed": seed})
            sites = make_sites(cfg, train_vendors, args.heldout, args.cases, args.support, seed)
            t0 = time.perf_counter()
            _, res = train_centralised(sites, cfg, out / "tb" / f"{variant}-s{seed}")
            held = res[f"synthetic-{args.heldout}"]
            indist = float(np.mean([res[f"synthetic-{v}"]["dice_mean"] for v in train_vendors]))
            row = {
                "variant": variant, "seed": seed, "heldout_dice": held["dice_mean"], "indist_dice": indist,
                "guide_dice": held.get("guide_dice", float("nan")), "dice_oracle": held.get("dice_oracle", float("nan")),
                "dice_random": held.get("dice_random", float("nan")), "dice_noguide": held.get("dice_noguide", float("nan")),
                "heldout_hd95": held["hd95_mean"], "train_s": time.perf_counter() - t0,
            }
            rows.append(row)
            print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            with open(out / "results.csv", "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=COLUMNS)
                w.writeheader()
                w.writerows(rows)

    table = ["| variant | held-out Dice | in-distribution | retrieval quality | oracle guides | random guides | no guides |",
             "|---|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == variant]
        table.append("| " + " | ".join([variant] + [mean_se([r[c] for r in rs]) for c in
                     ("heldout_dice", "indist_dice", "guide_dice", "dice_oracle", "dice_random", "dice_noguide")]) + " |")

    sites = make_sites(base, train_vendors, args.heldout, args.cases, args.support, 0)
    pooled = SliceSet.concat([s.train_set for s in sites[:-1]])
    st = step_times(base, pooled)
    step_line = (f"phase-A step time, batch {base.train.batch_size}, {args.size}px: none {st['none'] * 1e3:.1f} ms, "
                 f"J-RAS K={base.retrieval.k} {st['jras'] * 1e3:.1f} ms ({st['jras'] / st['none']:.2f}x)")
    lines += ["", *table, "", step_line]
    report = "\n".join(["# Centralised vendor-shift benchmark", "",
                        f"Train vendors {args.train_vendors}, held-out {args.heldout} ({args.support}-case support bank), "
                        f"{args.cases} cases/vendor, {args.size}px, {args.epochs} epochs, seeds {args.seeds}; mean ± s.e.", "",
                        *lines, ""])
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
