"""Tests of federation.protocol: model entries, local keys, averaging, a run's method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from federation import protocol
from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model

PROJECT = Path(__file__).resolve().parents[1]


def test_norm_and_local_keys():
    model = build_model(JRASConfig.from_dict({"segmenter": {"channels": [4, 8]}, "retriever": {"channels": [4, 8], "embed_dim": 8}}))
    state = model.state_dict()
    norms = protocol.norm_keys(model)
    assert norms and norms <= set(state)
    assert any(k.endswith("running_var") for k in norms)
    assert any(k.endswith("num_batches_tracked") for k in norms)
    assert all(not k.endswith("conv.weight") for k in norms)
    assert protocol.buffer_keys(model) == {k for k in state if "running" in k or "num_batches" in k}
    retr = {k for k in state if k.startswith("retr.")}
    assert protocol.local_keys(model, False, False) == set()
    assert protocol.local_keys(model, False, True) == retr
    assert protocol.local_keys(model, True, True) == norms | retr


def test_cast_like_and_weighted_average():
    ref = {"w": np.zeros(3, np.float32), "n": np.array(0, np.int64)}
    out = protocol.cast_like({"w": np.ones(3) * 0.5, "n": np.array(2.6)}, ref)
    assert out["w"].dtype == np.float32 and out["n"].dtype == np.int64 and int(out["n"]) == 3
    avg = protocol.weighted_average([{"a": np.array([1.0])}, {"a": np.array([4.0])}], [1, 2], ["a"])
    assert np.allclose(avg["a"], [3.0])
    with pytest.raises(ValueError):
        protocol.weighted_average([{"a": np.array([1.0])}], [0], ["a"])


def test_method_from_run_config():
    cfg = protocol.method_from_run_config({
        "method-config": "configs/demo.yaml", "local-epochs": 2, "image-size": 0, "fusion": "prior",
        "retriever-mode": "", "seed": -1, "method-overrides": "train.lr=0.005; segmenter.channels=[4, 8]",
    })
    demo = JRASConfig.from_yaml(PROJECT / "configs" / "demo.yaml")
    assert cfg.train.epochs == 2 and cfg.segmenter.fusion == "prior" and cfg.train.lr == 0.005
    assert cfg.preprocess.size == demo.preprocess.size and cfg.train.seed == demo.train.seed
    assert cfg.segmenter.channels == (4, 8)
    assert protocol.method_from_run_config({}) == JRASConfig()
    with pytest.raises(ConfigError):
        protocol.method_from_run_config({"method-overrides": "train.nope=1"})
    with pytest.raises(ConfigError):
        protocol.parse_method_overrides("train.lr")
    key = protocol.method_key(cfg)
    assert key == protocol.method_key(cfg.with_overrides({"train.seed": 5, "train.proximal_mu": 0.3}))
    assert key != protocol.method_key(cfg.with_overrides({"train.lr": 0.1}))
