"""Tests of server.privacy: server-side differential privacy with fixed clipping."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_federation import nan_update, one_round_config, run_rounds

from federation import protocol
from jras_core.models.jras import build_model


def test_dp_fixed_clipping(tmp_path, sites, in_process_grid):
    """DP wrapper with the segmenter-only federation (local retriever), a NaN reply
    rejected before clipping, noise metrics per round, resume numbering and local entries intact."""
    rc = one_round_config(tmp_path, sites, "dp", aggregate="segmenter", dp="fixed", **{
        "dp-noise-multiplier": 0.5, "dp-clipping-norm": 2.0, "dp-num-sampled-clients": 2, "num-server-rounds": 2,
    })
    method = protocol.method_from_run_config(rc)
    model = build_model(method)
    initial = protocol.state_to_arrays(model.state_dict())
    arrays, lines = run_rounds(in_process_grid, rc, nan_update)
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
