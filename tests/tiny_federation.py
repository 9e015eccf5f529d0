"""Tiny federations run in this process: synthetic site YAMLs, run configs, the real ServerApp
on an in-process grid (``in_process_grid`` in ``conftest.py``), its logs, and poisoned train
replies.

A site's reply is poisoned by wrapping the ClientApp callable handed to the grid,
so no production code carries test hooks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import yaml

from federation import protocol
from jras_core.config import JRASConfig

TINY = (
    "preprocess.size=32; segmenter.channels=[4, 8]; retriever.channels=[4, 8]; "
    "retriever.embed_dim=8; train.batch_size=32; contrastive.steps_per_epoch=1"
)


def write_sites(folder: Path, vendors: str = "ABC", cases: int = 4) -> list[str]:
    """Tiny synthetic site YAMLs; returns their paths."""
    paths = []
    for i, v in enumerate(vendors):
        p = folder / f"site-{v}.yaml"
        p.write_text(yaml.safe_dump({
            "name": f"test-{v}", "vendor": v, "val_fraction": 0.25,
            "data": {"kind": "synthetic", "vendor": v, "cases": cases, "seed": 10 + i, "size": 64},
        }))
        paths.append(str(p))
    return paths


def base_run_config(tmp_path: Path, sites: list[str], **over) -> dict:
    """A run config of the tiny method over ``sites``, writing under ``tmp_path/out``; ``over`` wins."""
    cfg = {
        "num-server-rounds": 2, "strategy": "fedavg", "aggregate": "all", "proximal-mu": 0.1,
        "fraction-train": 1.0, "fraction-evaluate": 1.0, "min-nodes": len(sites),
        "output-dir": str(tmp_path / "out"), "run-name": "test", "resume": "",
        "method-config": "configs/demo.yaml", "method-overrides": TINY, "local-epochs": 1,
        "image-size": 0, "fusion": "", "retriever-mode": "", "seed": -1, "client-threads": 1,
        "sites": ",".join(sites),
    }
    cfg.update(over)
    return cfg


def tiny_method(run_config: dict) -> JRASConfig:
    """The method config that ``run_config`` gives the sites."""
    return protocol.method_from_run_config(run_config)


def run_server(grid_cls, run_config: dict, run_id: int = 1):
    """Run the real ServerApp on an in-process grid of one node per site."""
    from flwr.app import Context, RecordDict

    from client.client_app import app as client_app
    from server.server_app import app as server_app

    n = len(protocol.site_list(run_config))
    grid = grid_cls(client_app, {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}, run_config)
    ctx = Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_app(grid, ctx)
    return grid


def run_dir(run_config: dict) -> Path:
    """The run's folder (checkpoint, ``tensorboard/``)."""
    return Path(run_config["output-dir"]) / run_config["run-name"]


Poison = Callable[[dict, dict], dict]


def one_round_config(tmp_path: Path, sites: list[str], name: str, **over) -> dict:
    """A one-round run ``name`` of at least 2 sites, without an evaluation phase; ``over`` wins."""
    return base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "fraction-evaluate": 0.0, "min-nodes": 2,
                                               "run-name": name, **over})


def poisoned(client_app, node_id: int, poison: Poison):
    """The ClientApp, except that node ``node_id``'s train replies go through ``poison(reply, sent)``."""
    from flwr.app import MessageType

    from server.strategies import arrays_to_record, record_to_arrays

    def call(msg, ctx):
        reply = client_app(msg, ctx)
        if ctx.node_id == node_id and msg.metadata.message_type == MessageType.TRAIN and not reply.has_error():
            name = next(iter(reply.content.array_records))
            sent = record_to_arrays(next(iter(msg.content.array_records.values())))
            reply.content[name] = arrays_to_record(poison(record_to_arrays(reply.content[name]), sent))
        return reply

    return call


def run_rounds(grid_cls, rc: dict, poison: Poison | None = None, poisoned_node: int = 102):
    """Run the real ServerApp on one in-process node per site (ids 100, 101, ...);
    returns the final checkpoint's arrays and the round records of metrics.jsonl."""
    from flwr.app import Context, RecordDict

    from client.client_app import app as client_app
    from server.checkpoint import load_checkpoint
    from server.server_app import app as server_app

    n = len(protocol.site_list(rc))
    call = client_app if poison is None else poisoned(client_app, poisoned_node, poison)
    grid = grid_cls(call, {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}, rc)
    server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=dict(rc)))
    folder = run_dir(rc)
    lines = [json.loads(x) for x in (folder / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(folder).arrays, lines


@contextmanager
def server_logs(caplog):
    """Capture the ``server`` loggers (the ServerApp routes them to Flower's handlers, not the root)."""
    logger = logging.getLogger("server")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def nan_update(reply: dict, sent: dict) -> dict:
    """A reply with one NaN in its first float array of more than one entry."""
    out = dict(reply)
    key = next(k for k, v in reply.items() if np.issubdtype(v.dtype, np.floating) and v.size > 1)
    bad = reply[key].copy()
    bad.flat[0] = np.nan
    out[key] = bad
    return out


def scaled_update(reply: dict, sent: dict, factor: float = 50.0) -> dict:
    """A model-replacement style attack: global + factor * random direction."""
    rng = np.random.default_rng(0)
    return {k: (v + factor * rng.standard_normal(v.shape)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else reply[k]
            for k, v in sent.items()}


def float_distance(a: dict, b: dict) -> float:
    """L2 distance of the float arrays of ``a`` and ``b``."""
    return float(np.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2))
                             for k in a if np.issubdtype(a[k].dtype, np.floating))))
