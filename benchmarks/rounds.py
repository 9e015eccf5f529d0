"""Round time of a federation through Flower: evaluation in the train exchange or in a phase of
its own, and the number of sites.

The same federation (synthetic vendors A, B, ..., ``configs/demo.yaml``; by default 64 px and
one local epoch per round, ``--size`` and ``--local-epochs`` for rounds of realistic work)
runs with run config ``evaluate-in-train`` true and false (``--evaluation``), in turn,
``--repeats`` times each:

- ``simulation``: Flower's Simulation Engine (:func:`tools.simulate.run_simulation`);
  each round's Flower overhead is ``1 - ideal / wall`` (:func:`benchmarks.cost.flower_overhead`);
- ``deployment``: a real SuperLink and SuperNodes on this machine
  (:class:`tools.localhost.LocalDeployment`), where every message starts a ClientApp
  process of its own.

Both settings do the same work: every round's model is evaluated once, and the weights
are those of the same training. ``--sites 4,10,20`` runs each simulated federation with
each number of sites (vendors A-D in turn, with other data seeds beyond the fourth site);
with ``--total-cases T`` every federation holds the same ``T`` cases, ``T / N`` per site,
so the rounds differ only in how the work is split (and in Flower's cost per site: the
overhead per site is the round's wall time less its ideal, over the sites). Prints a table
and writes ``rounds.csv`` and ``rounds.md`` to ``--out``.

    python -m benchmarks.rounds --out runs/rounds             # or: jras bench rounds --out runs/rounds
    jras bench rounds --modes simulation --rounds 3 --repeats 1 --sites 2 --out /tmp/rounds   # quick
    jras bench rounds --modes simulation --evaluation in-train --size 128 --local-epochs 3   # realistic rounds
    jras bench rounds --modes simulation --evaluation in-train --sites 4,10,20 --total-cases 80 --rounds 3 --repeats 1
    jras bench rounds --modes deployment --data acdc --cases 25 --rounds 3 --repeats 1   # hospital-like sites (NIfTI)

Every site has its key and encrypted store (``key_file``, ``cache_dir``), as a deployed site does.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import sys
from pathlib import Path

from jras_core.config import ConfigError
from jras_core.files import PROJECT_ROOT, SHARED_DATA

MODES = ("simulation", "deployment")
EVALUATIONS = {"in-train": True, "separate": False}
"""``--evaluation`` names and their run config ``evaluate-in-train``."""
COLUMNS = ["mode", "evaluate_in_train", "sites", "repeat", "round", "wall_s", "ideal_s", "overhead", "dice_mean"]
SEED_STEP = 10
"""Data seed added for each further site of a vendor (site ``i`` is vendor ``i mod 4``)."""
ACDC_MANIFEST = SHARED_DATA / "acdc" / "manifest.csv"
"""The ACDC patients of ``--data acdc`` (the real-data fixtures beside the project folder)."""


def _site_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or any(n < 2 for n in counts):
        raise argparse.ArgumentTypeError(f"sites must be comma-separated counts of at least 2, got {text!r}")
    return counts


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise argparse.ArgumentTypeError(f"modes must be a comma-separated subset of {', '.join(MODES)}, got {text!r}")
    return modes


def _evaluations(text: str) -> list[bool]:
    names = [e.strip() for e in text.split(",") if e.strip()]
    bad = [e for e in names if e not in EVALUATIONS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"evaluation must be a comma-separated subset of {', '.join(EVALUATIONS)}, got {text!r}")
    return [EVALUATIONS[e] for e in names]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m benchmarks.rounds`` and ``jras bench rounds``)."""
    p.add_argument("--modes", type=_modes, default=list(MODES),
                   help="simulation, deployment or both (default simulation,deployment)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per federation (default 6)")
    p.add_argument("--repeats", type=int, default=2, help="federations per setting and mode, run in turn (default 2)")
    p.add_argument("--sites", type=_site_counts, default=[4],
                   help="synthetic sites, or several counts, e.g. 4,10,20: a federation of each (default 4; "
                        "vendors A-D in turn, other data seeds beyond the fourth; deployment: 2)")
    p.add_argument("--cases", type=int, default=8, help="cases per site (default 8)")
    p.add_argument("--data", choices=("synthetic", "acdc"), default="synthetic",
                   help="synthetic vendors (default), or acdc: the ACDC patients of shared/data in turn, "
                        "--cases per site (read from NIfTI, as a hospital's site)")
    p.add_argument("--total-cases", type=int, default=None, metavar="T",
                   help="cases of the whole federation, T / N per site whatever the number N of sites (equal "
                        "total data; instead of --cases)")
    p.add_argument("--evaluation", type=_evaluations, default=[True, False],
                   help="in-train (evaluation in the train exchange, the default run config), separate (a phase "
                        "of its own) or both (default in-train,separate)")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--out", default="runs/rounds", metavar="DIR", help="output folder (default runs/rounds)")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="S", help="give up a federation after S seconds")


def site_files(folder: Path, count: int, cases: int, size: int = 64, data: str = "synthetic") -> list[Path]:
    """YAMLs of ``count`` sites of ``cases`` cases each, each with its key and encrypted store
    (``key_file``, ``cache_dir``) under ``folder`` as a deployed site has.

    ``data`` ``synthetic``: sites 1-4 are the demo's vendors A-D (``size`` px); site ``i``
    beyond them is vendor ``i mod 4`` again with its data seed raised by :data:`SEED_STEP` per
    lap (other cases), named ``synthetic-<vendor><lap + 1>``. ``acdc``: site ``i`` holds the
    ``i``-th ``cases`` patients of the ACDC manifest (:data:`ACDC_MANIFEST`), named
    ``acdc-<i + 1>``."""
    import yaml

    from jras_core.retrieval.crypto import generate_key_file
    from tools.sites import demo_sites

    folder.mkdir(parents=True, exist_ok=True)
    if data == "acdc":
        with open(ACDC_MANIFEST, newline="") as fh:
            patients = list(dict.fromkeys(row["case"] for row in csv.DictReader(fh)))
        if count * cases > len(patients):
            raise ConfigError(f"{ACDC_MANIFEST}: {len(patients)} patients, fewer than {count} sites of {cases}")
        sites = [{"name": f"acdc-{i + 1}", "vendor": "A", "val_fraction": 0.2,
                  "data": {"kind": "manifest", "path": str(ACDC_MANIFEST),
                           "where": {"case": patients[i * cases:(i + 1) * cases]}}} for i in range(count)]
    else:
        templates = [yaml.safe_load(p.read_text()) for p in demo_sites(folder / "templates", cases, size)]
        sites = []
        for i in range(count):
            site = yaml.safe_load(yaml.safe_dump(templates[i % len(templates)]))
            lap = i // len(templates)
            if lap:
                site["name"] = f"{site['name']}{lap + 1}"
                site["data"]["seed"] = int(site["data"]["seed"]) + SEED_STEP * lap
            sites.append(site)
    paths = []
    for site in sites:
        short = site["name"].removeprefix("synthetic-")
        site["cache_dir"] = str(folder / f"cache-{short}")
        key = folder / "keys" / f"{short}.key"
        if not key.exists():
            generate_key_file(key)
        site["key_file"] = str(key)
        path = folder / f"{site['name']}.yaml"
        path.write_text(yaml.safe_dump(site, sort_keys=False))
        paths.append(path)
    return paths


def round_rows(metrics: Path, mode: str, folded: bool, repeat: int, cpus: int | None = None,
               sites: int | None = None) -> list[dict]:
    """One row per round of a run's ``metrics.jsonl``: wall time, and in simulation the
    ideal round and the overhead (NaN in deployment, where the sites' processes are not
    the work alone). ``sites``: the federation's number of sites (default: as many as the
    first round's record names)."""
    from benchmarks.cost import flower_overhead

    records = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    ideal = {r["round"]: r for r in flower_overhead(metrics, cpus=cpus)} if mode == "simulation" else {}
    if sites is None:
        sites = len(records[0].get("sites", {})) if records else 0
    rows = []
    for rec in records:
        rnd = int(rec["round"])
        over = ideal.get(rnd, {})
        rows.append({
            "mode": mode, "evaluate_in_train": folded, "sites": sites, "repeat": repeat, "round": rnd,
            "wall_s": float(rec["round_stats"]["wall_time_s"]),
            "ideal_s": float(over.get("ideal_s", float("nan"))),
            "overhead": float(over.get("overhead", float("nan"))),
            "dice_mean": float((rec.get("global", {}).get("evaluate") or {}).get("dice_mean", float("nan"))),
        })
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per mode, setting and number of sites: the median round (all rounds but the last,
    which also evaluates in a phase of its own), the sum of all rounds per federation, and in
    simulation the median overhead, as a fraction of the round and as seconds per site
    (wall less ideal, over the sites)."""
    out = []
    groups = sorted({(MODES.index(r["mode"]), not r["evaluate_in_train"], r.get("sites", 0)) for r in rows})
    for mode_index, separate, n in groups:
        mode, folded = MODES[mode_index], not separate
        sel = [r for r in rows if r["mode"] == mode and r["evaluate_in_train"] == folded and r.get("sites", 0) == n]
        last = max(r["round"] for r in sel)
        inner = [r for r in sel if r["round"] < last] or sel
        sums = [sum(r["wall_s"] for r in sel if r["repeat"] == k) for k in sorted({r["repeat"] for r in sel})]
        timed = [r for r in inner if r["overhead"] == r["overhead"]]
        overheads = [r["overhead"] for r in timed]
        per_site = [(r["wall_s"] - r["ideal_s"]) / n for r in timed] if n else []
        out.append({
            "mode": mode,
            "evaluation": "in the train exchange" if folded else "a phase of its own",
            "sites": n,
            "round_median_s": statistics.median(r["wall_s"] for r in inner),
            "round_range_s": (min(r["wall_s"] for r in inner), max(r["wall_s"] for r in inner)),
            "ideal_median_s": statistics.median(r["ideal_s"] for r in timed) if timed else float("nan"),
            "federation_s": sums,
            "overhead_median": statistics.median(overheads) if overheads else float("nan"),
            "overhead_range": (min(overheads), max(overheads)) if overheads else None,
            "overhead_per_site_s": statistics.median(per_site) if per_site else float("nan"),
        })
    return out


def format_summary(summary: list[dict], rounds: int) -> list[str]:
    lines = [
        f"| mode | evaluation | sites | round (median, rounds 1-{rounds - 1}) | range | ideal round | "
        f"federation of {rounds} rounds | Flower overhead (median, range) | overhead per site |",
        "|---|---|---:|---:|---|---:|---|---|---:|",
    ]
    for s in summary:
        lo, hi = s["round_range_s"]
        over, ideal, per_site = "-", "-", "-"
        if s["overhead_range"] is not None:
            olo, ohi = s["overhead_range"]
            over = f"{s['overhead_median']:.0%} ({olo:.0%}-{ohi:.0%})"
            ideal = f"{s['ideal_median_s']:.2f} s"
            per_site = f"{s['overhead_per_site_s']:.3f} s"
        feds = ", ".join(f"{x:.1f}" for x in s["federation_s"])
        lines.append(f"| {s['mode']} | {s['evaluation']} | {s['sites']} | {s['round_median_s']:.2f} s | "
                     f"{lo:.2f}-{hi:.2f} s | {ideal} | {feds} s | {over} | {per_site} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    from tools.localhost import LocalDeployment
    from tools.simulate import run_simulation

    counts = args.sites if isinstance(args.sites, list) else [int(args.sites)]
    if args.rounds < 2 or args.repeats < 1 or min(counts) < 2:
        raise ConfigError("bench rounds: needs --rounds >= 2, --repeats >= 1 and --sites of at least 2")
    if args.total_cases is None and args.cases < 4:
        raise ConfigError("bench rounds: needs --cases >= 4")
    if args.total_cases is not None and args.total_cases // max(counts) < 2:
        raise ConfigError(f"bench rounds: --total-cases {args.total_cases} gives fewer than 2 cases to each of "
                          f"{max(counts)} sites")
    if args.size < 32 or args.size % 16 or args.local_epochs < 1:
        raise ConfigError("bench rounds: needs --size a multiple of 16 and >= 32, and --local-epochs >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = {"num-server-rounds": args.rounds, "strategy": "fedavg", "local-epochs": args.local_epochs,
            "image-size": args.size,
            "client-threads": 1, "method-config": str(PROJECT_ROOT / "configs" / "demo.yaml")}
    rows: list[dict] = []
    for mode in args.modes:
        for count in (counts if mode == "simulation" else [2]):
            cases = args.cases if args.total_cases is None else args.total_cases // count
            sites = site_files(out / f"sites-{args.data}-{count}x{cases}", count, cases, args.size, args.data)
            deployment = LocalDeployment(sites, work_dir=out / "deployment") if mode == "deployment" else None
            try:
                if deployment is not None:
                    deployment.start()
                for repeat in range(args.repeats):
                    for folded in args.evaluation:
                        name = f"{mode}-{count}sites-{'folded' if folded else 'separate'}-{repeat}"
                        rc = dict(base, **{"evaluate-in-train": folded})
                        print(f"{name}: {args.rounds} rounds, {len(sites)} sites of {cases} cases ...", flush=True)
                        if deployment is None:
                            run_dir = run_simulation(PROJECT_ROOT, [str(s) for s in sites], rc, out_dir=out / "runs",
                                                     run_name=name, stream=False, timeout=args.timeout, fresh=True)
                        else:
                            run_dir = deployment.run(PROJECT_ROOT, rc, out / "runs" / name, timeout=args.timeout)
                        got = round_rows(run_dir / "tensorboard" / "metrics.jsonl", mode, folded, repeat,
                                         sites=len(sites))
                        rows += got
                        print("    rounds " + " ".join(f"{r['wall_s']:.1f}" for r in got) + " s", flush=True)
            finally:
                if deployment is not None:
                    deployment.close()
    with open(out / "rounds.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = format_summary(summarise(rows), args.rounds)
    data = (f"--total-cases {args.total_cases}" if args.total_cases is not None else f"--cases {args.cases}")
    data += f" --data {args.data}"
    per_site = (f"{args.total_cases} cases in all, split evenly over the sites" if args.total_cases is not None
                else f"{args.cases} cases per site")
    per_site += " (ACDC patients, read from NIfTI)" if args.data == "acdc" else " (synthetic vendors)"
    per_site += ", each site with its key and encrypted store"
    md = [
        "# Round time: evaluation in the train exchange or in a phase of its own, and the number of sites", "",
        (f"{args.rounds} rounds, {args.size} px, {args.local_epochs} local epoch(s) per round, `configs/demo.yaml`, "
         f"{per_site}; modes {', '.join(args.modes)}; "
         f"{args.repeats} federation(s) per setting, run in turn. Rounds 1-{args.rounds - 1}: the last round also "
         "has an evaluation phase in both settings. Overhead (simulation): 1 - ideal / wall, the ideal being the "
         "sites' compute packed onto this machine's cores phase by phase; per site: (wall - ideal) / sites."), "",
        *table, "",
        (f"Reproduce: `jras bench rounds --modes {','.join(args.modes)} --rounds {args.rounds} "
         f"--repeats {args.repeats} --sites {','.join(map(str, counts))} {data} --size {args.size} "
         f"--local-epochs {args.local_epochs} --evaluation "
         f"{','.join(n for n, v in EVALUATIONS.items() if v in args.evaluation)}`"),
    ]
    (out / "rounds.md").write_text("\n".join(md) + "\n")
    print("\n".join(["", *table, "", f"wrote {out / 'rounds.csv'} and {out / 'rounds.md'}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
