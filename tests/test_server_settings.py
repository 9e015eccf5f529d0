"""Tests of server.settings: the server side of a run config."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzzing import FEW, any_scalar
from hypothesis import given
from hypothesis import strategies as st

from jras_core.config import ConfigError
from server.settings import ServerSettings


def test_server_settings():
    from server.settings import ServerSettings

    s = ServerSettings.from_run_config({"strategy": "fedbn", "aggregate": "segmenter", "proximal-mu": 0, "other": 1})
    assert s.keep_norm_local and s.keep_retriever_local and s.proximal_mu == 0.0
    for bad in ({"strategy": "fedsgd"}, {"aggregate": "retriever"}, {"num-server-rounds": 0},
                {"fraction-train": 1.5}, {"min-nodes": "2"}, {"proximal-mu": -1.0}):
        with pytest.raises(ConfigError):
            ServerSettings.from_run_config(bad)
    assert s.run_dir(7, Path("/x")) == Path("/x/runs/federation/run-7")
    with pytest.raises(ConfigError, match="diagnostics-every"):
        ServerSettings.from_run_config({"diagnostics-every": -1})


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


@FEW
@given(data=st.dictionaries(st.sampled_from(sorted(ServerSettings.KEYS) + ["other"]), any_scalar, max_size=6))
def test_server_settings_only_raise_config_error(data):
    try:
        settings_ = ServerSettings.from_run_config(data)
    except ConfigError as exc:
        assert str(exc).startswith("run config: "), str(exc)
    else:
        settings_.validate()
