"""Tests of jras_core.config: the method configuration, its YAML files, overrides and validation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from fuzzing import FEW, any_value
from hypothesis import given
from hypothesis import strategies as st
from tiny_methods import TINY

from jras_core.config import ConfigError, JRASConfig, load_yaml
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.retrieval.bank import RetrievalBank


def test_defaults_are_valid_and_round_trip():
    cfg = JRASConfig()
    cfg.validate()
    again = JRASConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.retrieval.k == 3 and cfg.retriever.embed_dim == 128 and cfg.contrastive.candidates == 8


def test_shipped_default_yaml_states_the_built_in_defaults():
    path = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert JRASConfig.from_yaml(path) == JRASConfig()
    # every option is written out, so the file is a complete starting point
    import yaml

    written = yaml.safe_load(path.read_text())
    for section, values in JRASConfig().to_dict().items():
        assert set(written[section]) == set(values), section


def test_yaml_loading_and_errors_name_the_file(tmp_path: Path):
    good = tmp_path / "m.yaml"
    good.write_text("train:\n  epochs: 2\nsegmenter:\n  fusion: prior\n")
    cfg = JRASConfig.from_yaml(good)
    assert cfg.train.epochs == 2 and cfg.segmenter.fusion == "prior"

    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("train:\n  epoch: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key.*epoch"):
        JRASConfig.from_yaml(bad_key)

    bad_value = tmp_path / "badv.yaml"
    bad_value.write_text("segmenter:\n  fusion: magic\n")
    with pytest.raises(ConfigError, match=r"badv\.yaml.*segmenter\.fusion"):
        JRASConfig.from_yaml(bad_value)

    bad_type = tmp_path / "badt.yaml"
    bad_type.write_text("train:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match="integer"):
        JRASConfig.from_yaml(bad_type)

    malformed = tmp_path / "mal.yaml"
    malformed.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"mal\.yaml.*malformed"):
        JRASConfig.from_yaml(malformed)

    with pytest.raises(ConfigError, match="not found"):
        JRASConfig.from_yaml(tmp_path / "missing.yaml")


def test_range_validation_and_overrides():
    with pytest.raises(ConfigError, match="train_pool"):
        JRASConfig.from_dict({"retrieval": {"k": 4, "train_pool": 2}})
    with pytest.raises(ConfigError, match="multiple of 16"):
        JRASConfig.from_dict({"preprocess": {"size": 50}})
    cfg = JRASConfig().with_overrides({"train.epochs": 7, "retrieval.k": 2})
    assert cfg.train.epochs == 7 and cfg.retrieval.k == 2
    with pytest.raises(ConfigError, match="unknown config key"):
        JRASConfig().with_overrides({"train.nope": 1})


def test_retriever_input_size_is_validated():
    assert JRASConfig().retriever.input_size is None
    assert JRASConfig().with_overrides({"retriever.input_size": 64}).retriever.input_size == 64
    for bad in (8, 40, 0):
        with pytest.raises(ConfigError, match="input_size"):
            JRASConfig().with_overrides({"retriever.input_size": bad})


def test_pass_one_and_key_options_are_validated():
    cfg = JRASConfig()
    assert cfg.retrieval.first_pass == "reuse" and cfg.contrastive.keys == "stored"
    with pytest.raises(ConfigError, match="first_pass"):
        cfg.with_overrides({"retrieval.first_pass": "stale"})
    with pytest.raises(ConfigError, match="keys"):
        cfg.with_overrides({"contrastive.keys": "cached"})
    with pytest.raises(RuntimeError, match="refresh"):
        RetrievalBank(build_slice_set(generate_volumes("A", 2, seed=0, size=32), cfg.with_overrides(TINY).preprocess, 4),
                      4).embeddings_at(torch.tensor([0]))


def test_lever_options_are_validated():
    with pytest.raises(ConfigError, match="pool_grid"):
        JRASConfig().with_overrides({"retriever.pool_grid": 0})
    with pytest.raises(ConfigError, match="guide_init"):
        JRASConfig().with_overrides({"segmenter.guide_init": "ones"})
    with pytest.raises(ConfigError, match="norm"):
        JRASConfig().with_overrides({"segmenter.norm": "layer"})


def test_adaptation_options_are_validated(tmp_path: Path):
    cfg = JRASConfig().with_overrides({"adapt.epochs": 0, "adapt.patience": 1, "adapt.lr": 5e-5,
                                       "adapt.val_fraction": 0.0, "adapt.tune_retriever": True})
    assert (cfg.adapt.epochs, cfg.adapt.patience, cfg.adapt.lr, cfg.adapt.val_fraction) == (0, 1, 5e-5, 0.0)
    for key, bad, problem in [("adapt.epochs", -1, ">= 0"), ("adapt.patience", 0, ">= 1"), ("adapt.lr", 0.0, "> 0"),
                              ("adapt.val_fraction", 1.0, "< 1"), ("adapt.min_cases", 0, ">= 1"), ("adapt.tune_retriever", "maybe", "true or false")]:
        with pytest.raises(ConfigError, match=rf"{key}: .*{problem}") as info:
            JRASConfig().with_overrides({key: bad}, source="--set")
        assert str(info.value).startswith("--set: ") and "\n" not in str(info.value)
    path = tmp_path / "method.yaml"
    path.write_text("adapt:\n  patience: 3\n  epoch: 5\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'adapt.epoch'; allowed in adapt: .*epochs"):
        JRASConfig.from_yaml(path)


def test_phase_b_trains_on_the_configured_share_of_the_batches():
    from jras_core.config import ConfigError, ContrastiveConfig

    assert ContrastiveConfig(batch_fraction=1.0).phase_b_steps(6) == 6
    # the default, 0.4, is 3 of the synthetic sites' 6 or 7 batches
    assert ContrastiveConfig().phase_b_steps(6) == ContrastiveConfig().phase_b_steps(7) == 3
    assert ContrastiveConfig(batch_fraction=0.5).phase_b_steps(6) == 3
    assert ContrastiveConfig(batch_fraction=0.5).phase_b_steps(7) == 4
    assert ContrastiveConfig(batch_fraction=0.01).phase_b_steps(6) == 1
    assert ContrastiveConfig(batch_fraction=0.5, steps_per_epoch=2).phase_b_steps(6) == 2
    assert ContrastiveConfig(batch_fraction=1.0, steps_per_epoch=10).phase_b_steps(6) == 6
    for bad in ({"contrastive.batch_fraction": 0.0}, {"contrastive.batch_fraction": 1.5},
                {"contrastive.steps_per_epoch": 0}):
        with pytest.raises(ConfigError, match="contrastive"):
            JRASConfig().with_overrides(bad)


def test_config_validates_the_head():
    assert JRASConfig().segmenter.guide_path == "residual"
    with pytest.raises(ConfigError, match="guide_path"):
        JRASConfig().with_overrides({"segmenter.guide_path": "side"})
    with pytest.raises(ConfigError, match="head_channels"):
        JRASConfig().with_overrides({"segmenter.head_channels": [8]})


_SECTIONS = list(JRASConfig().to_dict())

_FIELDS = sorted({f for section in JRASConfig().to_dict().values() for f in section})


@FEW
@given(data=st.dictionaries(
    st.one_of(st.sampled_from(_SECTIONS), st.text(max_size=6)),
    st.one_of(any_value, st.dictionaries(st.one_of(st.sampled_from(_FIELDS), st.text(max_size=6)), any_value, max_size=4)),
    max_size=4,
))
def test_method_config_parser_only_raises_config_error(data):
    try:
        cfg = JRASConfig.from_dict(data, source="fuzz.yaml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.yaml") or "unknown" in str(exc), str(exc)
    else:
        assert JRASConfig.from_dict(cfg.to_dict()) == cfg


@FEW
@given(text=st.one_of(
    st.text(max_size=80),
    st.lists(st.sampled_from(["train:", "  epochs: 2", "- a", "[", "]", "{", "key: [1, 2", ": x", "\t", "'"]),
             max_size=6).map("\n".join),
))
def test_yaml_loader_only_raises_config_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "any.yaml"
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        try:
            data = load_yaml(path)
        except ConfigError as exc:
            assert "any.yaml" in str(exc) and "\n" not in str(exc), str(exc)
        else:
            assert isinstance(data, dict)
