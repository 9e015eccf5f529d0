"""GPU benchmark: phase-A step times (plain vs J-RAS, fp32 vs bf16) and a federation of real
ACDC sites sharing one GPU, with its round times and Dice in fp32 and bf16.

    python -m benchmarks.gpu steps --sizes 128,224 --out runs/gpu
    python -m benchmarks.gpu pack-acdc --out .gpudata/acdc          # a small cropped copy of ACDC sites
    python -m benchmarks.gpu federation --data .gpudata/acdc --size 224 --rounds 3 --out runs/gpu

Each section prints a table and writes ``steps.csv`` / ``federation.json`` to ``--out``;
``benchmarks/gpu_check.sh`` runs them all in one go on a machine with a GPU (and, with
``--dry-run``, at tiny sizes on the CPU). Nothing here is imported by the project.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

from jras_core.files import PROJECT_ROOT, SHARED_DATA

ACDC = SHARED_DATA / "acdc"
GROUPS = ("DCM", "HCM", "MINF", "NOR")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_SLICES: dict = {}


def time_phase_a(size: int, fusion: str, precision: str, device: str, slices: int, repeats: int,
                 channels: tuple[int, ...]) -> dict[str, float]:
    """Seconds per phase-A step of ``fusion`` (``none``: plain) at ``size`` px: the mean over
    ``repeats`` passes of ``slices`` synthetic slices after one warm-up pass."""
    from jras_core.config import JRASConfig
    from jras_core.data.slices import build_slice_set
    from jras_core.data.synthetic import generate_volumes
    from jras_core.device import resolve_device
    from jras_core.models import build_model
    from jras_core.training import JRASTrainer

    cfg = JRASConfig().with_overrides({
        "preprocess.size": size, "segmenter.fusion": fusion, "segmenter.channels": list(channels),
        "train.device": device, "train.precision": precision, "train.batch_size": 16,
        "augment.rotate_deg": 180.0, "augment.flip": True, "augment.scale": 0.15,
    })
    dev = resolve_device(device)
    key = (size, slices)
    if key not in _SLICES:  # one synthetic set per size, shared by the four timed variants
        vols = generate_volumes("A", num_cases=max(4, slices // 8), seed=0, size=size)
        data = build_slice_set(vols, cfg.preprocess, cfg.labels.num_classes)
        _SLICES[key] = data.subset(torch.arange(min(slices, len(data))))
    data = _SLICES[key]
    trainer = JRASTrainer(build_model(cfg), cfg, data)
    trainer.phase_segmenter()  # warm-up: kernels chosen, prediction memory filled
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        trainer.phase_segmenter()
    _sync(dev)
    seconds = (time.perf_counter() - t0) / repeats
    steps = -(-len(data) // cfg.train.batch_size)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return {"size": size, "method": "plain" if fusion == "none" else "jras", "precision": precision,
            "slices": len(data), "step_ms": 1e3 * seconds / steps, "slices_per_s": len(data) / seconds,
            "peak_gpu_mb": peak}


def cmd_steps(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    channels = tuple(int(c) for c in args.channels.split(","))
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        for precision in args.precisions.split(","):
            for fusion in ("none", "concat"):
                row = time_phase_a(size, fusion, precision, args.device, args.slices, args.repeats, channels)
                rows.append(row)
                print(f"  {size:4d} px  {row['method']:5s}  {precision:4s}  {row['step_ms']:8.1f} ms/step  "
                      f"{row['slices_per_s']:8.0f} slices/s  peak {row['peak_gpu_mb']:.0f} MiB", flush=True)
    by = {(r["size"], r["method"], r["precision"]): r for r in rows}
    print("\nphase-A step, J-RAS / plain, and fp32 / bf16 (speed-up of bf16):")
    for size in sorted({r["size"] for r in rows}):
        for precision in args.precisions.split(","):
            if (size, "jras", precision) in by and (size, "plain", precision) in by:
                ratio = by[size, "jras", precision]["step_ms"] / by[size, "plain", precision]["step_ms"]
                print(f"  {size} px {precision}: J-RAS / plain = {ratio:.2f}x")
        for method in ("plain", "jras"):
            if (size, method, "fp32") in by and (size, method, "bf16") in by:
                speed = by[size, method, "fp32"]["step_ms"] / by[size, method, "bf16"]["step_ms"]
                print(f"  {size} px {method}: bf16 speed-up over fp32 = {speed:.2f}x")
    with (out / "steps.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


def cmd_pack_acdc(args: argparse.Namespace) -> int:
    """A small copy of ``--patients`` ACDC patients per group (the first ones of each group),
    each volume cropped in-plane to its central ``--crop`` pixels (the 240 mm field of view the
    preprocessing keeps is 154 px at ACDC's nominal 1.5625 mm): small enough to travel to a
    GPU machine. Written outside the repository's tracked files; never committed."""
    import nibabel as nib
    import numpy as np

    source = Path(args.acdc)
    rows = list(csv.DictReader((source / "manifest.csv").open()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep = []
    for group in GROUPS:
        cases = sorted({r["case"] for r in rows if r["group"] == group})[: args.patients]
        keep += [r for r in rows if r["case"] in cases]
    half = args.crop // 2
    for row in keep:
        for key in ("image", "mask"):
            img = nib.load(str(source / row[key]))
            data = np.asanyarray(img.dataobj)
            h, w = data.shape[:2]
            y0, x0 = max(0, h // 2 - half), max(0, w // 2 - half)
            cropped = data[y0 : y0 + args.crop, x0 : x0 + args.crop]
            nib.save(nib.Nifti1Image(cropped, img.affine, img.header), str(out / Path(row[key]).name))
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keep[0]))
        writer.writeheader()
        writer.writerows(keep)
    size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
    print(f"{len(keep)} volumes of {len(keep) // 2} patients ({args.patients} per group) -> {out} ({size:.1f} MiB)")
    return 0


def site_yamls(data: Path, folder: Path) -> list[Path]:
    """One site YAML per ACDC group of the packed copy (a quarter of its patients validate)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for group in GROUPS:
        site = {"name": f"acdc-{group}", "vendor": "A",
                "data": {"kind": "manifest", "path": str((data / "manifest.csv").resolve()), "where": {"group": group}},
                "val_fraction": 0.25, "split_seed": 0}
        path = folder / f"acdc-{group}.yaml"
        path.write_text(yaml.safe_dump(site, sort_keys=False))
        paths.append(path)
    return paths


def _federate(sites: list[Path], run_config: dict, run_dir: Path, gpu_share: float, timeout: float,
              engine: str = "auto") -> str:
    """Run one federation: Flower's Simulation Engine (where Ray is installed, for ``auto``), or a
    real SuperLink and one SuperNode per site on this machine, each site's ClientApp on the
    machine's GPU (``deployment``)."""
    try:
        if engine == "deployment":
            raise ImportError("deployment asked for")
        import ray  # noqa: F401

        from tools.simulate import run_simulation

        run_simulation(PROJECT_ROOT, [str(s) for s in sites], run_config, gpus_per_client=gpu_share,
                       out_dir=run_dir.parent, run_name=run_dir.name, stream=False, timeout=timeout, fresh=True)
        return "simulation"
    except ImportError:
        from tools.localhost import LocalDeployment

        with LocalDeployment(sites) as deployment:
            deployment.run(PROJECT_ROOT, run_config, run_dir, timeout=timeout)
        return "deployment"


def cmd_federation(args: argparse.Namespace) -> int:
    from tools.simulate import gpu_share

    out = Path(args.out).resolve()
    sites = site_yamls(Path(args.data).resolve(), out / "sites")
    share = gpu_share(len(sites), args.device)
    summary = {}
    for precision in args.precisions.split(","):
        run_dir = out / f"federation-{precision}"
        run_config = {
            "num-server-rounds": args.rounds, "strategy": "fedavg",
            "method-config": str(PROJECT_ROOT / args.config), "local-epochs": args.local_epochs,
            "image-size": args.size, "seed": args.seed, "client-threads": 1, "min-nodes": len(sites),
            "device": args.device, "precision": precision, "diagnostics-every": 0,
            "method-overrides": args.overrides,
        }
        t0 = time.perf_counter()
        engine = _federate(sites, run_config, run_dir, share, args.timeout, args.engine)
        wall = time.perf_counter() - t0
        history = [json.loads(x) for x in (run_dir / "tensorboard" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        dice = [r["global"]["evaluate"]["dice_mean"] for r in history
                if isinstance(r.get("global", {}).get("evaluate", {}).get("dice_mean"), (int, float))]
        round_s = [r["round_stats"]["wall_time_s"] for r in history
                   if isinstance(r.get("round_stats", {}).get("wall_time_s"), (int, float))]
        summary[precision] = {"engine": engine, "wall_s": wall, "rounds": args.rounds, "final_dice": dice[-1] if dice else None,
                              "dice_by_round": dice, "round_s": round_s, "gpu_share": share}
        print(f"  {precision}: {engine}, {args.rounds} rounds of {len(sites)} sites at {args.size} px in {wall:.0f} s; "
              f"final weighted Dice {summary[precision]['final_dice']}", flush=True)
    if "fp32" in summary and "bf16" in summary and summary["fp32"]["final_dice"] is not None:
        delta = summary["bf16"]["final_dice"] - summary["fp32"]["final_dice"]
        print(f"  bf16 - fp32 final Dice: {delta:+.4f}")
    (out / "federation.json").write_text(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    steps = sub.add_parser("steps", help="phase-A step times: plain vs J-RAS, fp32 vs bf16")
    steps.add_argument("--sizes", default="128,224")
    steps.add_argument("--precisions", default="fp32,bf16")
    steps.add_argument("--device", default="auto")
    steps.add_argument("--slices", type=int, default=256, help="slices per timed pass (default 256)")
    steps.add_argument("--repeats", type=int, default=3)
    steps.add_argument("--channels", default="16,32,64,128", help="segmenter widths (default the method's)")
    steps.add_argument("--out", default="runs/gpu")
    steps.set_defaults(func=cmd_steps)
    pack = sub.add_parser("pack-acdc", help="a small cropped copy of ACDC patients for a GPU machine")
    pack.add_argument("--acdc", default=str(ACDC))
    pack.add_argument("--patients", type=int, default=4, help="patients per group (default 4)")
    pack.add_argument("--crop", type=int, default=160, help="central in-plane crop in pixels (default 160)")
    pack.add_argument("--out", required=True)
    pack.set_defaults(func=cmd_pack_acdc)
    fed = sub.add_parser("federation", help="a federation of ACDC group sites sharing the GPU")
    fed.add_argument("--data", required=True, help="folder with manifest.csv (pack-acdc's output, or ACDC itself)")
    fed.add_argument("--size", type=int, default=224)
    fed.add_argument("--rounds", type=int, default=3)
    fed.add_argument("--local-epochs", type=int, default=2)
    fed.add_argument("--precisions", default="fp32,bf16")
    fed.add_argument("--device", default="auto")
    fed.add_argument("--seed", type=int, default=0)
    fed.add_argument("--config", default="configs/default.yaml")
    fed.add_argument("--overrides", default="augment.rotate_deg=180; augment.flip=true; augment.scale=0.15")
    fed.add_argument("--timeout", type=float, default=900.0)
    fed.add_argument("--engine", choices=["auto", "simulation", "deployment"], default="auto",
                     help="auto: the Simulation Engine where Ray is installed, else a local deployment")
    fed.add_argument("--out", default="runs/gpu")
    fed.set_defaults(func=cmd_federation)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
