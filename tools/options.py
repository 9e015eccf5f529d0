"""Command-line options shared by ``jras`` and its benchmarks."""

from __future__ import annotations

import argparse


def method_sets(args: argparse.Namespace) -> list[str]:
    """The command's ``--set`` items, with ``--device`` and ``--precision`` as the
    ``train.device`` / ``train.precision`` items they stand for (they win over ``--set``)."""
    items = list(getattr(args, "set", None) or [])
    if getattr(args, "device", None):
        items.append(f"train.device={args.device}")
    if getattr(args, "precision", None):
        items.append(f"train.precision={args.precision}")
    return items


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", metavar="DEV", help="where the models compute: auto (a CUDA GPU when present; the "
                   "default), cpu, cuda or cuda:N (train.device)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="arithmetic of the models (train.precision; default fp32; fp16 needs CUDA)")
