"""Tests of server.screening: which train replies are aggregated, and in which order."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_federation import (
    base_run_config,
    float_distance,
    nan_update,
    one_round_config,
    run_dir,
    run_rounds,
    run_server,
    server_logs,
    write_sites,
)

from federation import protocol
from jras_core.models.jras import build_model

pytestmark = pytest.mark.usefixtures("fresh_site_cache")


def test_nan_reply_rejected_and_round_goes_on(tmp_path, sites, in_process_grid, caplog):
    initial = protocol.state_to_arrays(build_model(protocol.method_from_run_config(one_round_config(tmp_path, sites, "x"))).state_dict())
    rc = one_round_config(tmp_path, sites, "nan")
    with server_logs(caplog):
        arrays, lines = run_rounds(in_process_grid, rc, nan_update)
    stats = lines[0]["round_stats"]
    assert stats["rejected_replies"] == 1 and "aggregate_skipped" not in stats
    assert all(np.isfinite(v).all() for v in arrays.values())
    assert float_distance(arrays, initial) > 0  # the two clean sites were aggregated
    assert any("rejected the update of node-102" in r.getMessage() and "non-finite" in r.getMessage()
               for r in caplog.records)

    # with min-nodes = 3 the two valid replies are not enough: the global model stays as it was
    rc = one_round_config(tmp_path, sites, "nan-skip", **{"min-nodes": 3})
    with server_logs(caplog):
        arrays, lines = run_rounds(in_process_grid, rc, nan_update)
    stats = lines[0]["round_stats"]
    assert stats["rejected_replies"] == 1 and stats["aggregate_skipped"] == 1
    assert all(np.array_equal(arrays[k], initial[k]) for k in initial)
    assert any("aggregation skipped" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_aggregate_does_not_depend_on_the_order_replies_arrive(tmp_path, site_dir, in_process_grid):
    """The same seeded federation with its replies arriving in reverse order ends with the
    same weights, bit for bit (replies are summed in partition order)."""
    from server.checkpoint import load_checkpoint

    class ReversedGrid(in_process_grid):
        def send_and_receive(self, messages, *, timeout=None):
            return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))

    sites = write_sites(tmp_path, "ABC", cases=4)
    weights = []
    for name, grid in (("in-order", in_process_grid), ("reversed", ReversedGrid)):
        rc = base_run_config(tmp_path, sites, **{"run-name": name, "diagnostics-every": 0})
        run_server(grid, rc)
        weights.append(load_checkpoint(run_dir(rc)).arrays)
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
