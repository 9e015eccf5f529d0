"""`jras site init` and `jras bank build` (tools.cli): encrypted site banks from the CLI."""

from __future__ import annotations

import base64
import logging
import os
import stat

import pytest
import torch
from bank_sites import posix_only, site_yaml

from jras_core.data.volume import DataError
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.crypto import BankDecryptError, generate_key_file, load_key_file
from jras_core.retrieval.store import BankStore
from jras_core.site_store import SiteStore
from tools.cli import main

pytestmark = pytest.mark.usefixtures("no_bank_key_env")


@posix_only
def test_jras_site_init_end_to_end(tmp_path, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    yaml_path = site_yaml(tmp_path)
    argv = ["site", "init", "--site", str(yaml_path), "--set", "preprocess.size=32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    key_path = yaml_path.parent / "secrets" / "bank.key"
    bank_file = yaml_path.parent / "bank" / "bank.enc"
    assert str(key_path) in out and str(bank_file) in out and "new, mode 0600" in out
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    raw = load_key_file(key_path)._key
    for secret in (raw, base64.b64encode(raw)):
        assert secret.decode("latin-1") not in out + caplog.text
        assert secret not in bank_file.read_bytes()
    bank = RetrievalBank.load(bank_file.parent, store=BankStore(bank_file.parent, key=load_key_file(key_path)))
    assert len(bank) > 0 and bank.embeddings is None and bank.slices.images.shape[-1] == 32
    with pytest.raises(DataError, match="encrypted but no key"):
        RetrievalBank.load(bank_file.parent)
    # a second run keeps the key and re-encrypts the bank with it
    assert main(argv) == 0
    assert "(existing)" in capsys.readouterr().out
    assert load_key_file(key_path)._key == raw
    RetrievalBank.load(bank_file.parent, store=BankStore(bank_file.parent, key=load_key_file(key_path)))
    # a key file others can read is refused with the fix
    os.chmod(key_path, 0o644)
    assert main(argv) == 2
    assert f"chmod 600 {key_path}" in capsys.readouterr().err


def test_jras_site_init_without_any_key_is_an_error(tmp_path, capsys):
    yaml_path = site_yaml(tmp_path, key_file=None)
    assert main(["site", "init", "--site", str(yaml_path), "--set", "preprocess.size=32"]) == 2
    assert "no bank key" in capsys.readouterr().err
    assert not (yaml_path.parent / "bank").exists()


def test_bank_build_and_site_init_with_a_checkpoint_write_encrypted_embedded_banks(tmp_path, capsys):
    from jras_core.checkpoint import save_model
    from jras_core.config import JRASConfig
    from jras_core.models.jras import build_model

    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.channels": [8, 16, 32],
                                       "retriever.channels": [8, 16], "retriever.embed_dim": 16})
    ckpt = save_model(tmp_path / "model.pt", build_model(cfg), cfg)
    yaml_path = site_yaml(tmp_path)
    key_path = yaml_path.parent / "secrets" / "bank.key"
    bank_dir = yaml_path.parent / "bank"
    # bank build: the site's bank_dir, encrypted with its key_file
    generate_key_file(key_path)
    assert main(["bank", "build", "--checkpoint", str(ckpt), "--site", str(yaml_path)]) == 0
    assert "encrypted (AES-256-GCM)" in capsys.readouterr().out
    bank = RetrievalBank.load(bank_dir, store=BankStore(bank_dir, key=load_key_file(key_path)))
    assert bank.embeddings.shape == (len(bank), 16)
    # --key-file overrides the site's key; --out overrides bank_dir
    other_key = generate_key_file(tmp_path / "other.key")
    assert main(["site", "init", "--site", str(yaml_path), "--checkpoint", str(ckpt),
                 "--key-file", str(other_key), "--out", str(tmp_path / "b2")]) == 0
    capsys.readouterr()
    with pytest.raises(BankDecryptError):
        BankStore(tmp_path / "b2", key=load_key_file(key_path)).load()
    bank = RetrievalBank.load(tmp_path / "b2", store=BankStore(tmp_path / "b2", key=load_key_file(other_key)))
    assert bank.embeddings.shape == (len(bank), 16)


def _bank_arrays(bank_dir, key_path):
    arrays, _ = BankStore(bank_dir, key=load_key_file(key_path)).load()
    return arrays


@posix_only
def test_site_init_refuses_to_re_key_an_existing_bank(tmp_path, capsys):
    """`--key-file OTHER` on a site whose bank is encrypted with its own key would make the
    site's configured key fail: refused (a new key file is not even created), by `site init`
    and `bank build` alike, and the bank is left as it was."""
    yaml_path = site_yaml(tmp_path)
    argv = ["site", "init", "--site", str(yaml_path), "--set", "preprocess.size=32"]
    assert main(argv) == 0
    key_path = yaml_path.parent / "secrets" / "bank.key"
    bank_file = yaml_path.parent / "bank" / "bank.enc"
    before = bank_file.read_bytes()
    capsys.readouterr()
    new_key = tmp_path / "new.key"
    assert main([*argv, "--key-file", str(new_key)]) == 2
    err = capsys.readouterr().err
    assert str(bank_file) in err and "--rekey" in err and err.count("\n") == 1
    assert not new_key.exists()
    other = generate_key_file(tmp_path / "other.key")
    assert main([*argv, "--key-file", str(other)]) == 2
    err = capsys.readouterr().err
    assert "encrypted with another key" in err and str(other) in err and "--rekey" in err
    assert bank_file.read_bytes() == before
    _bank_arrays(bank_file.parent, key_path)  # the site's own key still reads it
    # the same key rebuilds it as before
    assert main(argv) == 0
    _bank_arrays(bank_file.parent, key_path)


def test_bank_build_refuses_a_bank_of_another_key(tmp_path, capsys):
    from jras_core.checkpoint import save_model
    from jras_core.config import JRASConfig
    from jras_core.models.jras import build_model

    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.channels": [8, 16, 32],
                                       "retriever.channels": [8, 16], "retriever.embed_dim": 16})
    ckpt = save_model(tmp_path / "model.pt", build_model(cfg), cfg)
    yaml_path = site_yaml(tmp_path)
    generate_key_file(yaml_path.parent / "secrets" / "bank.key")
    build = ["bank", "build", "--checkpoint", str(ckpt), "--site", str(yaml_path)]
    assert main(build) == 0
    before = (yaml_path.parent / "bank" / "bank.enc").read_bytes()
    other = generate_key_file(tmp_path / "other.key")
    assert main([*build, "--key-file", str(other)]) == 2
    assert "encrypted with another key" in capsys.readouterr().err
    assert (yaml_path.parent / "bank" / "bank.enc").read_bytes() == before


@posix_only
def test_site_init_rekey_decrypts_with_the_old_key_and_keeps_the_bank(tmp_path, capsys):
    yaml_path = site_yaml(tmp_path)
    argv = ["site", "init", "--site", str(yaml_path), "--set", "preprocess.size=32"]
    assert main(argv) == 0
    key_path = yaml_path.parent / "secrets" / "bank.key"
    bank_dir = yaml_path.parent / "bank"
    original = _bank_arrays(bank_dir, key_path)
    before = (bank_dir / "bank.enc").read_bytes()
    capsys.readouterr()
    # a wrong old key changes nothing
    wrong = generate_key_file(tmp_path / "wrong.key")
    new_key = tmp_path / "new.key"
    assert main([*argv, "--rekey", "--key-file", str(new_key), "--old-key-file", str(wrong)]) == 2
    assert "cannot decrypt bank" in capsys.readouterr().err
    assert (bank_dir / "bank.enc").read_bytes() == before
    # the site's key_file is the old key by default; the new key file is created
    assert main([*argv, "--rekey", "--key-file", str(new_key)]) == 0
    out = capsys.readouterr().out
    assert "re-encrypted" in out and f"set key_file: {new_key} in {yaml_path}" in out
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    with pytest.raises(BankDecryptError):
        _bank_arrays(bank_dir, key_path)
    rekeyed = _bank_arrays(bank_dir, new_key)
    assert set(rekeyed) == set(original)
    assert all((rekeyed[k] == original[k]).all() for k in original)
    # the site's store (in bank_dir: the site has no cache_dir) moved to the new key too
    (stored,) = bank_dir.glob("tiny.slices-*.enc")
    assert sorted(p.name for p in bank_dir.iterdir()) == ["bank.enc", stored.name]  # atomic, no leftovers
    digest = stored.name[len("tiny.slices-"):-len(".enc")]
    assert SiteStore(bank_dir, load_key_file(new_key), "tiny").load("slices", digest) is not None
    with pytest.raises(BankDecryptError):
        SiteStore(bank_dir, load_key_file(key_path), "tiny").load("slices", digest)
    # back to the site's own key with --old-key-file
    assert main([*argv, "--rekey", "--old-key-file", str(new_key)]) == 0
    assert "set key_file" not in capsys.readouterr().out
    _bank_arrays(bank_dir, key_path)
    # the same key twice is not a re-key
    assert main([*argv, "--rekey"]) == 2
    assert "are the same" in capsys.readouterr().err


@pytest.mark.slow
def test_jras_site_adapt_writes_a_site_model_that_eval_reads(tmp_path, capsys):
    import math

    from jras_core.checkpoint import load_model, read_checkpoint, save_model
    from jras_core.config import JRASConfig
    from jras_core.models.jras import build_model

    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.channels": [8, 16, 32],
                                       "retriever.channels": [8, 16], "retriever.embed_dim": 16})
    ckpt = save_model(tmp_path / "global.pt", build_model(cfg), cfg)
    yaml_path = site_yaml(tmp_path, key_file=None)
    out = tmp_path / "site-model.pt"
    argv = ["site", "adapt", "--checkpoint", str(ckpt), "--site", str(yaml_path), "--out", str(out), "--quiet",
            "--set", "adapt.epochs=2", "--set", "adapt.patience=1", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for item in ("held out", "epochs run", "best epoch", "val Dice before", "val Dice after", str(out)):
        assert item in printed
    model, stored, extra = load_model(out)
    record = extra["adaptation"]
    assert record["site"] == "tiny" and record["start"] == str(ckpt.resolve()) and record["holdout"] == "case"
    assert 1 <= record["epochs_run"] <= 2 and 0 <= record["best_epoch"] <= record["epochs_run"]
    assert record["val_dice_best"] >= record["val_dice_start"] and math.isfinite(record["val_dice_best"])
    assert f"val Dice after   {record['val_dice_best']:.4f}" in printed
    assert stored.adapt.norm_stats is False and stored.adapt.epochs == 2  # its statistics are the site's already
    global_state = read_checkpoint(ckpt)["state"]
    assert any(not torch.equal(v, global_state[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    # jras eval reads it as any checkpoint
    assert main(["eval", "--checkpoint", str(out), "--site", str(yaml_path)]) == 0
    assert "tiny" in capsys.readouterr().out
    # without --out: the site's default place beside its YAML
    assert main(argv[:6] + ["--quiet", "--set", "adapt.epochs=0"]) == 0
    assert (yaml_path.parent / "tiny-adapted.pt").is_file()
    assert "AdaBN only" in capsys.readouterr().out


def test_jras_site_adapt_errors_are_one_line(tmp_path, capsys):
    from jras_core.checkpoint import save_model
    from jras_core.config import JRASConfig
    from jras_core.models.jras import build_model

    yaml_path = site_yaml(tmp_path, key_file=None)
    missing = ["site", "adapt", "--checkpoint", str(tmp_path / "none.pt"), "--site", str(yaml_path)]
    assert main(missing) == 2
    assert capsys.readouterr().err.strip() == f"jras: error: {tmp_path / 'none.pt'}: checkpoint not found"
    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.channels": [8, 16, 32],
                                       "retriever.channels": [8, 16], "retriever.embed_dim": 16})
    ckpt = save_model(tmp_path / "global.pt", build_model(cfg), cfg)
    assert main(["site", "adapt", "--checkpoint", str(ckpt), "--site", str(yaml_path), "--set", "adapt.lr=-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--set: adapt.lr: must be > 0.0, got -1" in err
