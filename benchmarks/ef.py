"""Ventricular function from predicted masks against the ground truth: `jras bench ef`.

For every site given, the volumes `jras eval` evaluates (a training site's validation cases, a
held-out site's cases outside its support bank) are predicted as `jras predict` predicts them
(:class:`jras_core.predict.Predictor`: the site's bank, two-pass retrieval, labels mapped back to
each volume's own grid), and both the predicted and the ground-truth masks are measured
(:mod:`jras_core.measures`). Per ED/ES pair: predicted and true LV and RV EDV, ESV and ejection
fraction, and the absolute EF errors; per site, the mean absolute error. Prints a table and writes
``ef.csv`` and ``ef.md`` to ``--out``.

    jras bench ef --checkpoint runs/acdc/model.pt --site sites/acdc-test.yaml --site sites/unseen-mnms-B.yaml \\
        --out runs/ef
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from pathlib import Path

from tools.options import add_device_args, method_sets

COLUMNS = (
    "site", "case", "lv_ef_pred", "lv_ef_true", "lv_ef_abs_err", "lv_edv_pred", "lv_edv_true", "lv_esv_pred",
    "lv_esv_true", "rv_ef_pred", "rv_ef_true", "rv_ef_abs_err",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="model checkpoint")
    p.add_argument("--site", action="append", required=True, metavar="YAML",
                   help="site whose evaluated cases are measured, retrieving from its own bank (repeatable)")
    p.add_argument("--out", default="runs/ef", metavar="DIR", help="output folder (default runs/ef)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the checkpoint (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_device_args(p)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def site_rows(predictor, site, progress: bool = True) -> list[dict[str, float | str]]:
    """One row per ED/ES pair among ``site``'s evaluated cases: predicted and true function."""
    from tqdm.auto import tqdm

    from jras_core.data.sources import load_volumes
    from jras_core.measures import measure_volume, pair_phases

    cfg = predictor.cfg
    val = site.val_set
    wanted = {val.cases[c] for c in val.case_ids.tolist()}
    volumes = [v for v in load_volumes(site.config.data, cfg.labels.num_classes, site.root) if v.case in wanted]
    pred, true = {}, {}
    for vol in tqdm(volumes, desc=site.name, unit="volume", disable=not progress):
        labels = predictor.predict(vol.image, vol.spacing, vol.case, vol.phase)
        pred[vol.key] = (vol.case, vol.phase, measure_volume(labels, vol.spacing, cfg.labels.names))
        true[vol.key] = (vol.case, vol.phase, measure_volume(vol.mask, vol.spacing, cfg.labels.names))
    pred_pairs, _ = pair_phases(pred)
    true_pairs = {p.case: p for p in pair_phases(true)[0]}
    rows = []
    for p in pred_pairs:
        t = true_pairs[p.case]
        rows.append({
            "site": site.name, "case": p.case,
            "lv_ef_pred": p.lv.ef_pct, "lv_ef_true": t.lv.ef_pct, "lv_ef_abs_err": abs(p.lv.ef_pct - t.lv.ef_pct),
            "lv_edv_pred": p.lv.edv_ml, "lv_edv_true": t.lv.edv_ml, "lv_esv_pred": p.lv.esv_ml,
            "lv_esv_true": t.lv.esv_ml,
            "rv_ef_pred": p.rv.ef_pct, "rv_ef_true": t.rv.ef_pct, "rv_ef_abs_err": abs(p.rv.ef_pct - t.rv.ef_pct),
        })
    return rows


def summary(rows: list[dict]) -> list[tuple[str, int, float, float, float]]:
    """Per site and over all rows: (name, pairs, LV EF MAE, LV EF median absolute error, RV EF MAE)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r["site"]), []).append(r)
    groups["all"] = list(rows)
    out = []
    for name, rs in groups.items():
        lv = [float(r["lv_ef_abs_err"]) for r in rs if not math.isnan(float(r["lv_ef_abs_err"]))]
        rv = [float(r["rv_ef_abs_err"]) for r in rs if not math.isnan(float(r["rv_ef_abs_err"]))]
        out.append((name, len(rs), statistics.fmean(lv) if lv else math.nan,
                    statistics.median(lv) if lv else math.nan, statistics.fmean(rv) if rv else math.nan))
    return out


def run(args: argparse.Namespace) -> int:
    from jras_core.checkpoint import load_model
    from jras_core.config import parse_overrides
    from jras_core.device import place
    from jras_core.files import atomic_write_text
    from jras_core.predict import Predictor
    from jras_core.site import Site

    model, cfg, _ = load_model(args.checkpoint)
    sets = method_sets(args)
    if sets:
        cfg = cfg.with_overrides(parse_overrides(sets), source="--set")
    place(model, cfg.train.device)
    rows: list[dict] = []
    for path in args.site:
        site = Site.from_yaml(path, cfg)
        rows.extend(site_rows(Predictor.for_site(model, cfg, site), site, progress=not args.quiet))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (_number(v) if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
    out = Path(args.out)
    atomic_write_text(out / "ef.csv", buf.getvalue())
    lines = ["| site | ED/ES pairs | LV EF MAE (points) | LV EF median abs. error | RV EF MAE |",
             "|---|---|---|---|---|"]
    lines += [f"| {n} | {k} | {_number(a)} | {_number(m)} | {_number(r)} |" for n, k, a, m, r in summary(rows)]
    command = "jras bench ef " + " ".join(getattr(args, "argv", None) or sys.argv[1:])
    atomic_write_text(out / "ef.md", "\n".join([
        "# Ejection fraction from predicted masks against the ground truth", "",
        f"Checkpoint `{args.checkpoint}`; EF in percentage points (absolute errors).", "",
        *lines, "", f"Command: `{command}`", ""]))
    print("\n".join(lines))
    print(f"per case: {out / 'ef.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
