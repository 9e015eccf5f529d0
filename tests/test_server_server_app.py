"""Tests of server.server_app: checkpoints and resume, initial weights and the sites' warm-up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_federation import TINY, base_run_config, run_dir, run_server, tiny_method, write_sites

from federation import protocol
from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model

pytestmark = pytest.mark.usefixtures("fresh_site_cache")


def test_fedavg_checkpoints_logs_and_resume(tmp_path, site_dir, in_process_grid):
    from flwr.app import MessageType

    from server.checkpoint import load_checkpoint
    from server.tracking import METRICS_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites)
    saved = []
    import server.server_app as sa

    original = sa.save_checkpoint

    def spy(path, ckpt):
        out = original(path, ckpt)
        saved.append((ckpt.round, load_checkpoint(out).round))
        return out

    sa.save_checkpoint = spy
    try:
        grid = run_server(in_process_grid, rc)
    finally:
        sa.save_checkpoint = original
    assert saved == [(1, 1), (2, 2)]
    folder = run_dir(rc)
    ckpt = load_checkpoint(folder)
    assert ckpt.round == 2 and ckpt.run_config["strategy"] == "fedavg"
    assert ckpt.config == tiny_method(rc).to_dict()
    protocol.check_arrays_fit(ckpt.arrays, build_model(tiny_method(rc)), "checkpoint")
    from jras_core.checkpoint import load_model

    _, cfg, extra = load_model(folder / "checkpoint.pt")  # readable by the centralised tools too
    assert cfg == tiny_method(rc) and extra["round"] == 2
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert list((folder / "tensorboard").glob("events.out.tfevents.*"))
    lines = [json.loads(x) for x in (folder / "tensorboard" / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    for r in lines:
        stats = r["round_stats"]
        assert stats["bytes_sent"] > 0 and stats["bytes_received"] > 0 and stats["wall_time_s"] > 0
        assert 0 < stats["server_time_s"] < stats["wall_time_s"]  # messages, aggregation, checkpoint
        assert set(r["sites"]) == {"node-100", "node-101"}
        assert "dice_mean" in r["global"]["evaluate"] and "seg_loss" in r["global"]["train"]
        assert "dice_lv" in r["sites"]["node-100"]["evaluate"]
    # retrieval diagnostics: every 5th round (default) and the last one only. Round 1's model
    # is evaluated at the start of round 2's training, round 2's (the last) in an evaluation phase
    assert [("dice_oracle" in r["sites"]["node-100"]["evaluate"]) for r in lines] == [False, True]
    train_sent = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert [bool(m.content["config"].get("evaluate-first")) for m in train_sent] == [False, False, True, True]
    assert [m.content["config"]["diagnostics"] for m in train_sent[2:]] == [False, False]
    assert {m.content["config"]["last-round"] for m in train_sent} == {2}  # places each round's epochs
    evaluate_sent = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert [m.content["config"]["diagnostics"] for m in evaluate_sent] == [True, True]
    # bytes: round 1 sends the model to 2 sites and gets 2 back (its evaluation comes as metrics)
    model_bytes = sum(m.content["arrays"].count_bytes() for m in grid.sent[:1])
    assert lines[0]["round_stats"]["bytes_total"] == pytest.approx(4 * model_bytes, rel=0.01)

    # resume: continue numbering from the checkpoint, starting from its weights
    rc2 = dict(rc, **{"resume": str(folder), "run-name": "resumed", "num-server-rounds": 1})
    grid2 = run_server(in_process_grid, rc2)
    first = grid2.sent[0]
    assert first.content["config"]["server-round"] == 3
    assert first.content["config"]["last-round"] == 3  # numbered on from the checkpoint
    sent = {k: v.numpy() for k, v in first.content["arrays"].items()}
    assert all(np.array_equal(sent[k], ckpt.arrays[k]) for k in sent)
    assert load_checkpoint(run_dir(rc2)).round == 3

    bad = dict(rc2, **{"method-overrides": TINY.replace("segmenter.channels=[4, 8]", "segmenter.channels=[8, 16]"),
                       "run-name": "bad"})
    with pytest.raises(ConfigError, match="do not match|shape"):
        run_server(in_process_grid, bad)


def test_initial_weights_start_a_fresh_run(tmp_path, caplog):
    from jras_core.checkpoint import save_model
    from server import checkpoint as ck
    from server.server_app import initial_state
    from server.settings import ServerSettings
    from server.strategies import record_to_arrays

    method = JRASConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    pretrained = build_model(method)
    with torch.no_grad():
        for p in pretrained.parameters():
            p.add_(1.0)
    save_model(tmp_path / "pretrained.pt", pretrained, method.with_overrides({"train.lr": 0.5}))
    fresh = build_model(method)

    s = ServerSettings.from_run_config({"initial-weights": "pretrained.pt"})
    assert s.initial_weights == "pretrained.pt"
    with caplog.at_level("WARNING"):
        arrays, ckpt = initial_state(fresh, method, s, [tmp_path])
    assert ckpt is None  # rounds count from 1
    got = record_to_arrays(arrays)
    want = protocol.state_to_arrays(pretrained.state_dict())
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    fresh_arrays = protocol.state_to_arrays(fresh.state_dict())
    assert all(not np.array_equal(got[k], fresh_arrays[k]) for k, p in fresh.named_parameters())
    assert "another method configuration" in caplog.text

    # a federation checkpoint (a run folder) is read the same way; a resume wins over it
    ck.save_checkpoint(tmp_path / "run", ck.Checkpoint(round=2, arrays=want, config=method.to_dict()))
    _, ckpt = initial_state(fresh, method, ServerSettings(resume=str(tmp_path / "run"),
                                                          initial_weights=str(tmp_path / "missing.pt")), [tmp_path])
    assert ckpt is not None and ckpt.round == 2
    from_run, ckpt = initial_state(fresh, method, ServerSettings(initial_weights=str(tmp_path / "run")), [tmp_path])
    assert ckpt is None and all(np.array_equal(record_to_arrays(from_run)[k], want[k]) for k in want)

    # weights of another architecture or a missing file: errors that name the file
    other = method.with_overrides({"segmenter.channels": [4, 8, 16, 32]})
    save_model(tmp_path / "other.pt", build_model(other), other)
    with pytest.raises(ConfigError, match=r"initial-weights .*other\.pt: entry .* has shape"):
        initial_state(fresh, method, ServerSettings(initial_weights="other.pt"), [tmp_path])
    with pytest.raises(ConfigError, match=r"nothing\.pt: checkpoint not found"):
        initial_state(fresh, method, ServerSettings(initial_weights="nothing.pt"), [tmp_path])


def test_warm_up_before_round_one(tmp_path, in_process_grid):
    """With run-config ``warm-up = true`` the server first sends every node a ``query``; each site
    loads its data and bank then; the rounds follow as before and the warm-up is logged
    in ``startup.json``, not as a round."""
    import json

    from client import site_runner
    from federation import protocol
    from server.settings import ServerSettings
    from server.tracking import METRICS_FILE, STARTUP_FILE

    site_runner.clear_cache()
    assert ServerSettings.from_run_config({"warm-up": True}).warm_up and not ServerSettings().warm_up
    with pytest.raises(ConfigError, match="warm-up"):
        ServerSettings.from_run_config({"warm-up": 1})
    sites = write_sites(tmp_path, "AB", cases=4) + [str(tmp_path / "nowhere.yaml")]
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "min-nodes": 2, "fraction-evaluate": 0.0,
                                             "warm-up": True})
    grid = run_server(in_process_grid, rc)
    types = [m.metadata.message_type for m in grid.sent]
    assert types[:3] == ["query"] * 3 and types[3:] == ["train"] * 3
    assert [m.has_error() for m in grid.received[:3]] == [False, False, True]  # the missing site is reported
    ready = [site_runner.get_runner(p, protocol.method_from_run_config(rc)).site for p in sites[:2]]
    assert all(s._slices is not None and s._bank is not None for s in ready)
    folder = run_dir(rc) / "tensorboard"
    startup = json.loads((folder / STARTUP_FILE).read_text())
    assert startup["sites"] == 3 and startup["sites_ready"] == 2 and startup["wall_time_s"] > 0
    assert all(t > 0 for t in startup["client-time-s"].values())
    assert [json.loads(x)["round"] for x in (folder / METRICS_FILE).read_text().splitlines()] == [1]
    site_runner.clear_cache()


def test_no_warm_up_unless_asked_and_the_same_model_either_way(tmp_path, in_process_grid):
    from client import site_runner
    from server.checkpoint import load_checkpoint
    from server.tracking import STARTUP_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    finals = {}
    for flag in (False, True):
        site_runner.clear_cache()
        rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "fraction-evaluate": 0.0,
                                                 "run-name": f"warm-{flag}", "warm-up": flag})
        grid = run_server(in_process_grid, rc)
        assert ("query" in {m.metadata.message_type for m in grid.sent}) == flag
        assert (run_dir(rc) / "tensorboard" / STARTUP_FILE).exists() == flag
        finals[flag] = load_checkpoint(run_dir(rc)).arrays
    # the warm-up changes when sites get ready, not what they train
    assert all(np.array_equal(finals[False][k], finals[True][k]) for k in finals[False])
    site_runner.clear_cache()
