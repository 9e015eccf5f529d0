"""Tests of server.transfer: model entries in float16 on the wire."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_federation import base_run_config, run_dir, run_server, write_sites

from federation import protocol
from jras_core.config import ConfigError

pytestmark = pytest.mark.usefixtures("fresh_site_cache")


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_float16_transfer_halves_the_bytes(tmp_path, in_process_grid, strategy):
    from server.checkpoint import load_checkpoint
    from server.tracking import METRICS_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    stats = {}
    for dtype in ("float32", "float16"):
        rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "strategy": strategy,
                                                 "transfer-dtype": dtype, "run-name": dtype})
        grid = run_server(in_process_grid, rc)
        sent = grid.sent[0].content["arrays"]
        floats = [v.numpy().dtype for v in sent.values() if np.issubdtype(v.numpy().dtype, np.floating)]
        assert floats and set(floats) == {np.dtype(dtype)}
        payload = sum(v.numpy().nbytes for v in sent.values())
        assert grid.sent[0].content["config"]["transfer-dtype"] == dtype
        line = json.loads((run_dir(rc) / "tensorboard" / METRICS_FILE).read_text().splitlines()[0])
        stats[dtype] = {**line["round_stats"], "payload": payload}
        assert stats[dtype]["failures_train"] == 0 and stats[dtype].get("rejected_replies", 0) == 0
        ckpt = load_checkpoint(run_dir(rc))
        assert all(v.dtype == np.float32 for v in ckpt.arrays.values() if np.issubdtype(v.dtype, np.floating))
        assert all(np.isfinite(v).all() for v in ckpt.arrays.values())
    assert 0.49 < stats["float16"]["payload"] / stats["float32"]["payload"] < 0.52
    for key in ("bytes_sent", "bytes_received"):  # the tiny test model's per-array overhead is large
        assert 0.45 < stats["float16"][key] / stats["float32"][key] < 0.75
    with pytest.raises(ConfigError, match="transfer-dtype"):
        protocol.transfer_cast({"w": np.zeros(2, np.float32)}, "bfloat16")
    counters = protocol.transfer_cast({"n": np.array(3, np.int64), "w": np.ones(2, np.float32)}, "float16")
    assert counters["n"].dtype == np.int64 and counters["w"].dtype == np.float16
