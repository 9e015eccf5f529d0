from pathlib import Path

import pytest

from jras_core.config import ConfigError, JRASConfig


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
