"""The ``jras`` command line.

Subcommands: ``data synth``, ``train``, ``eval``, ``bank build``, ``demo``.
Run ``jras <command> --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from typing import TYPE_CHECKING

import yaml

from jras_core.config import ConfigError, JRASConfig

if TYPE_CHECKING:  # heavy imports (torch, MONAI, FAISS) are deferred so that --help is instant
    from jras_core.site import Site, SiteConfig

log = logging.getLogger("jras")

PROJECT_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """``["train.epochs=3", "segmenter.fusion=none"]`` -> typed dict (values parsed as YAML)."""
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def load_method(path: str | None, overrides: Sequence[str]) -> JRASConfig:
    cfg = JRASConfig.from_yaml(path) if path else JRASConfig()
    return cfg.with_overrides(parse_overrides(overrides)) if overrides else cfg


def synthetic_site(vendor: str, cases: int, seed: int, size: int, support: int | None = None) -> SiteConfig:
    """A site config for a built-in synthetic vendor."""
    from jras_core.data.sources import DataSourceConfig
    from jras_core.site import SiteConfig

    data = DataSourceConfig(kind="synthetic", vendor=vendor, cases=cases, seed=seed, size=size)
    return SiteConfig(name=f"synthetic-{vendor}", vendor=vendor, data=data, support_cases=support)


def collect_sites(args: argparse.Namespace, cfg: JRASConfig) -> list[Site]:
    """Sites from ``--site`` YAMLs, ``--manifest`` CSVs and ``--synthetic`` vendors."""
    from jras_core.data.sources import DataSourceConfig
    from jras_core.site import Site, SiteConfig

    configs: list[tuple[SiteConfig, Path | None]] = []
    for path in args.site or []:
        configs.append((SiteConfig.from_yaml(path), Path(path).parent))
    for path in args.manifest or []:
        data = DataSourceConfig(kind="manifest", path=str(Path(path).resolve()), skip_bad=args.skip_bad)
        configs.append((SiteConfig(name=Path(path).stem, data=data), None))
    for vendor in (args.synthetic.split(",") if args.synthetic else []):
        configs.append((synthetic_site(vendor.strip(), args.cases, args.seed, cfg.preprocess.size), None))
    if not configs:
        raise ConfigError("no data given: use --site SITE.yaml, --manifest CSV or --synthetic A,B,C")
    held = set(args.holdout.split(",")) if getattr(args, "holdout", None) else set()
    sites = []
    for sc, root in configs:
        if sc.name in held or sc.vendor in held:
            sc.support_cases = args.support
        sites.append(Site(sc, cfg, root))
    return sites


def print_table(results: dict[str, dict[str, float]], names: Sequence[str]) -> None:
    cols = ["dice_mean"] + [f"dice_{n.lower()}" for n in names] + ["hd95_mean", "guide_dice", "dice_oracle", "dice_random"]
    present = [c for c in cols if any(c in m for m in results.values())]
    print("site".ljust(16) + "".join(c.rjust(13) for c in present))
    for site, m in results.items():
        print(site.ljust(16) + "".join(f"{m.get(c, float('nan')):13.3f}" for c in present))


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--site", action="append", metavar="YAML", help="site config (repeatable)")
    p.add_argument("--manifest", action="append", metavar="CSV", help="manifest CSV of NIfTI pairs, one site each (repeatable)")
    p.add_argument("--synthetic", metavar="VENDORS", help="built-in synthetic vendors, e.g. A,B,C")
    p.add_argument("--cases", type=int, default=12, help="cases per synthetic vendor (default 12)")
    p.add_argument("--seed", type=int, default=0, help="data seed for synthetic vendors (default 0)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable cases with a warning")
    p.add_argument("--config", metavar="YAML", help="method config (default: built-in defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a method config value, e.g. --set train.epochs=5 (repeatable)")


# --------------------------------------------------------------------------- commands


def cmd_data_synth(args: argparse.Namespace) -> int:
    from jras_core.data.synthetic import write_dataset

    manifest = write_dataset(args.out, args.vendor.split(","), args.cases, args.seed, size=args.size)
    print(f"wrote {manifest}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jras_core.training.centralised import train_centralised

    cfg = load_method(args.config, args.set)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sites = collect_sites(args, cfg)
    out = Path(args.out)
    _, results = train_centralised(sites, cfg, out, progress=not args.quiet, eval_every=args.eval_every)
    print_table(results, cfg.labels.names)
    print(f"model, metrics and TensorBoard logs in {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from jras_core.checkpoint import load_model
    from jras_core.training.centralised import evaluate_sites

    model, cfg, _ = load_model(args.checkpoint)
    if args.set:
        cfg = cfg.with_overrides(parse_overrides(args.set))
    sites = collect_sites(args, cfg)
    results = evaluate_sites(model, sites, cfg)
    print_table(results, cfg.labels.names)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def cmd_bank_build(args: argparse.Namespace) -> int:
    from jras_core.checkpoint import load_model

    model, cfg, _ = load_model(args.checkpoint)
    sites = collect_sites(args, cfg)
    for site in sites:
        out = Path(args.out) / site.name if len(sites) > 1 else Path(args.out)
        bank = site.bank
        bank.refresh(model.retr)
        path = bank.save(out)
        print(f"{site.name}: bank of {len(bank)} slices -> {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jras_core.site import Site
    from jras_core.training.centralised import train_centralised

    cfg = JRASConfig.from_yaml(PROJECT_ROOT / "configs" / "demo.yaml") if (PROJECT_ROOT / "configs" / "demo.yaml").is_file() \
        else JRASConfig().with_overrides({"preprocess.size": 64, "train.epochs": 4})
    sites = [Site(synthetic_site(v, 8, 0, cfg.preprocess.size), cfg) for v in "ABC"]
    sites.append(Site(synthetic_site("D", 8, 0, cfg.preprocess.size, support=3), cfg))
    print("J-RAS demo: centralised training on synthetic vendors A-C, vendor D held out (3-case support bank)")
    _, results = train_centralised(sites, cfg, Path(args.out), progress=True)
    print_table(results, cfg.labels.names)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jras",
        description="J-RAS Federated: retrieval-augmented segmentation across sites.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write synthetic vendor volumes (NIfTI) and a manifest.csv")
    synth.add_argument("--vendor", required=True, help="vendor name(s), comma-separated, e.g. A or A,B,C,D")
    synth.add_argument("--cases", type=int, default=10, help="cases per vendor (default 10)")
    synth.add_argument("--size", type=int, default=128, help="matrix size in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True, help="output folder")
    synth.set_defaults(func=cmd_data_synth)

    train = sub.add_parser("train", help="centralised J-RAS training on one or more sites")
    add_data_args(train)
    train.add_argument("--holdout", metavar="NAMES", help="site names or vendors held out (never trained; bank from --support cases)")
    train.add_argument("--support", type=int, default=5, help="support cases of a held-out site (default 5)")
    train.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    train.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    train.add_argument("--eval-every", type=int, default=0, help="log validation Dice every N epochs")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint on sites (Dice, HD95, retrieval diagnostics)")
    add_data_args(ev)
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--holdout", metavar="NAMES")
    ev.add_argument("--support", type=int, default=5)
    ev.add_argument("--out", help="write the metrics as JSON here")
    ev.set_defaults(func=cmd_eval)

    bank = sub.add_parser("bank", help="retrieval bank utilities").add_subparsers(dest="bank_command", required=True)
    build = bank.add_parser("build", help="embed a site's pairs with a checkpoint's retriever and store the bank")
    add_data_args(build)
    build.add_argument("--checkpoint", required=True)
    build.add_argument("--out", required=True, help="bank directory")
    build.set_defaults(func=cmd_bank_build, holdout=None, support=5)

    demo = sub.add_parser("demo", help="the main job on the embedded synthetic vendors, at small size")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        from jras_core.data.volume import DataError

        if not isinstance(exc, (ConfigError, DataError)):
            raise
        print(f"jras: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
