"""Update validation, robust aggregation and server-side DP, on an in-process grid.

A site's reply is poisoned by wrapping the ClientApp callable handed to the grid,
so no production code carries test hooks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from test_federation import base_run_config, run_dir, write_sites

from client import site_runner
from federation import protocol
from jras_core.config import ConfigError
from jras_core.models.jras import build_model
from server.settings import ServerSettings
from server.validation import update_norm, validate_update, validate_weight

Poison = Callable[[dict, dict], dict]


# --------------------------------------------------------------------------- validate_update


def _ref() -> dict[str, np.ndarray]:
    return {
        "w": np.zeros((2, 3), np.float32),
        "b": np.zeros(3, np.float32),
        "n": np.array(0, np.int64),
    }


def test_validate_update_cases():
    ref = _ref()
    clean = {"w": np.full((2, 3), 0.1, np.float32), "b": np.ones(3, np.float32), "n": np.array(7, np.int64)}
    assert validate_update(clean, ref) is None
    assert validate_update(clean, ref, bound=10.0) is None
    assert update_norm(clean, ref) == pytest.approx(np.sqrt(6 * 0.01 + 3), rel=1e-5)  # ints do not count
    assert update_norm(clean, ref, norm_keys={"w"}) == pytest.approx(np.sqrt(0.06), rel=1e-5)

    assert "unexpected keys: x" == validate_update({**clean, "x": np.zeros(1, np.float32)}, ref)
    assert "missing keys: b" == validate_update({k: v for k, v in clean.items() if k != "b"}, ref)
    assert "shape of w" in validate_update({**clean, "w": np.zeros((3, 2), np.float32)}, ref)
    assert "dtype of w" in validate_update({**clean, "w": clean["w"].astype(np.float64)}, ref)
    assert "dtype of n" in validate_update({**clean, "n": np.array(7.0, np.float32)}, ref)
    nan = clean["b"].copy()
    nan[1] = np.nan
    assert validate_update({**clean, "b": nan}, ref) == "non-finite values in b"
    inf = clean["w"].copy()
    inf[0, 0] = -np.inf
    assert validate_update({**clean, "w": inf}, ref) == "non-finite values in w"
    reason = validate_update(clean, ref, bound=1.0)
    assert reason is not None and "above the bound" in reason
    assert validate_update(clean, ref, bound=1.0, norm_keys={"w"}) is None  # only w's norm (0.24) counts
    assert validate_update(clean, ref, bound=0.0) is None  # 0: off
    # the reason never carries array content
    secret = {**clean, "w": np.full((2, 3), 123.456, np.float32)}
    assert "123.4" not in (validate_update(secret, ref, bound=1.0) or "")

    assert validate_weight(10) is None and validate_weight(2.5) is None
    for bad in (0, -1, float("nan"), float("inf"), True, "3", None):
        assert validate_weight(bad) is not None


def test_settings_keys():
    s = ServerSettings.from_run_config({})
    assert (s.max_update_norm, s.dp, s.trim_beta, s.krum_num_malicious) == (0.0, "none", 0.2, 0)
    s = ServerSettings.from_run_config({"strategy": "krum", "krum-num-malicious": 1, "dp": "fixed",
                                        "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2, "min-nodes": 3})
    assert s.strategy == "krum" and s.dp_clipping_norm == 2.0 and s.dp_sampled == 3
    for bad in ({"strategy": "bulyan"}, {"trim-beta": 0.5}, {"krum-num-malicious": -1}, {"max-update-norm": -1.0},
                {"dp": "adaptive"}, {"dp-clipping-norm": 0.0}, {"dp-noise-multiplier": -0.1},
                {"dp-num-sampled-clients": -2}):
        with pytest.raises(ConfigError):
            ServerSettings.from_run_config(bad)


# --------------------------------------------------------------------------- in-process rounds


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[str]:
    site_runner.clear_cache()
    yield write_sites(tmp_path_factory.mktemp("robust-sites"), "ABC", cases=4)
    site_runner.clear_cache()


def _poisoned(client_app, node_id: int, poison: Poison):
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


def _run(grid_cls, rc: dict, poison: Poison | None = None, poisoned_node: int = 102):
    """Run the real ServerApp on one in-process node per site (ids 100, 101, ...);
    returns the final checkpoint's arrays and the round records of metrics.jsonl."""
    from flwr.app import Context, RecordDict

    from client.client_app import app as client_app
    from server.checkpoint import load_checkpoint
    from server.server_app import app as server_app

    n = len(protocol.site_list(rc))
    call = client_app if poison is None else _poisoned(client_app, poisoned_node, poison)
    grid = grid_cls(call, {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}, rc)
    server_app(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=dict(rc)))
    folder = run_dir(rc)
    lines = [json.loads(x) for x in (folder / "tensorboard" / "metrics.jsonl").read_text().splitlines()]
    return load_checkpoint(folder).arrays, lines


@contextmanager
def _server_logs(caplog):
    """Capture the ``server`` loggers (the ServerApp routes them to Flower's handlers, not the root)."""
    logger = logging.getLogger("server")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def _nan(reply: dict, sent: dict) -> dict:
    out = dict(reply)
    key = next(k for k, v in reply.items() if np.issubdtype(v.dtype, np.floating) and v.size > 1)
    bad = reply[key].copy()
    bad.flat[0] = np.nan
    out[key] = bad
    return out


def _scaled(reply: dict, sent: dict, factor: float = 50.0) -> dict:
    """A model-replacement style attack: global + factor * random direction."""
    rng = np.random.default_rng(0)
    return {k: (v + factor * rng.standard_normal(v.shape)).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else reply[k]
            for k, v in sent.items()}


def _float_distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2))
                             for k in a if np.issubdtype(a[k].dtype, np.floating))))


def _config(tmp_path: Path, sites: list[str], name: str, **over) -> dict:
    return base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "fraction-evaluate": 0.0, "min-nodes": 2,
                                               "run-name": name, **over})


def test_nan_reply_rejected_and_round_goes_on(tmp_path, sites, in_process_grid, caplog):
    initial = protocol.state_to_arrays(build_model(protocol.method_from_run_config(_config(tmp_path, sites, "x"))).state_dict())
    rc = _config(tmp_path, sites, "nan")
    with _server_logs(caplog):
        arrays, lines = _run(in_process_grid, rc, _nan)
    stats = lines[0]["round_stats"]
    assert stats["rejected_replies"] == 1 and "aggregate_skipped" not in stats
    assert all(np.isfinite(v).all() for v in arrays.values())
    assert _float_distance(arrays, initial) > 0  # the two clean sites were aggregated
    assert any("rejected the update of node-102" in r.getMessage() and "non-finite" in r.getMessage()
               for r in caplog.records)

    # with min-nodes = 3 the two valid replies are not enough: the global model stays as it was
    rc = _config(tmp_path, sites, "nan-skip", **{"min-nodes": 3})
    with _server_logs(caplog):
        arrays, lines = _run(in_process_grid, rc, _nan)
    stats = lines[0]["round_stats"]
    assert stats["rejected_replies"] == 1 and stats["aggregate_skipped"] == 1
    assert all(np.array_equal(arrays[k], initial[k]) for k in initial)
    assert any("aggregation skipped" in r.getMessage() for r in caplog.records)


def test_poisoned_site_robust_vs_fedavg(tmp_path, sites, in_process_grid):
    clean, lines = _run(in_process_grid, _config(tmp_path, sites, "clean"))
    initial = protocol.state_to_arrays(build_model(protocol.method_from_run_config(_config(tmp_path, sites, "x"))).state_dict())
    clean_step = _float_distance(clean, initial)  # how far one clean round moves the model
    assert lines[0]["round_stats"]["rejected_replies"] == 0
    distance = {}
    for name, over in {
        "fedavg": {},
        "fedmedian": {"strategy": "fedmedian"},
        "krum": {"strategy": "krum", "krum-num-malicious": 1},
        "fedavg+norm-bound": {"max-update-norm": 100.0},
    }.items():
        arrays, lines = _run(in_process_grid, _config(tmp_path, sites, name, **over), _scaled)
        assert all(np.isfinite(v).all() for v in arrays.values())
        distance[name] = _float_distance(arrays, clean)
        if name == "fedavg+norm-bound":
            assert lines[0]["round_stats"]["rejected_replies"] == 1
    print(f"clean round step {clean_step:.3f}; distance to the clean FedAvg run:",
          {k: round(v, 3) for k, v in distance.items()})
    assert max(distance["fedmedian"], distance["krum"], distance["fedavg+norm-bound"]) < 0.25 * clean_step
    assert distance["fedavg"] > 100 * distance["fedmedian"]
    assert distance["fedavg"] > 100 * distance["krum"]
    assert distance["fedavg"] > 100 * distance["fedavg+norm-bound"]


def test_dp_fixed_clipping(tmp_path, sites, in_process_grid):
    """DP wrapper with the segmenter-only federation (local retriever), a NaN reply
    rejected before clipping, noise metrics per round, resume numbering and local entries intact."""
    rc = _config(tmp_path, sites, "dp", aggregate="segmenter", dp="fixed", **{
        "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2.0, "dp-num-sampled-clients": 2, "num-server-rounds": 2,
    })
    method = protocol.method_from_run_config(rc)
    model = build_model(method)
    initial = protocol.state_to_arrays(model.state_dict())
    arrays, lines = _run(in_process_grid, rc, _nan)
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        stats = r["round_stats"]
        assert stats["dp_noise_multiplier"] == 0.5 and stats["dp_clipping_norm"] == 2.0
        assert stats["dp_noise_stdv"] == pytest.approx(0.5 * 2.0 / 2)
        assert stats["rejected_replies"] == 1
    assert all(np.isfinite(v).all() for v in arrays.values())
    for k, v in initial.items():
        assert arrays[k].dtype == v.dtype
        if k.startswith("retr."):
            assert np.array_equal(arrays[k], v)  # local entries: neither clipped nor noised
        if k.endswith("running_var"):
            assert (arrays[k] >= 0).all()
    seg = [k for k in initial if k.startswith("seg.") and np.issubdtype(initial[k].dtype, np.floating)]
    assert any(not np.array_equal(arrays[k], initial[k]) for k in seg)
