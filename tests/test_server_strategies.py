"""Tests of server.strategies: the federation's strategies, driven through an in-process grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_federation import (
    base_run_config,
    float_distance,
    one_round_config,
    run_dir,
    run_rounds,
    run_server,
    scaled_update,
    tiny_method,
    write_sites,
)

from federation import protocol
from jras_core.models.jras import build_model

pytestmark = pytest.mark.usefixtures("fresh_site_cache")


def _received_train(grid):
    from flwr.app import MessageType

    return [m for m in grid.received if m.metadata.message_type == MessageType.TRAIN and not m.has_error()]


@pytest.mark.slow
def test_evaluation_in_train_matches_an_evaluation_phase(tmp_path, site_dir, in_process_grid):
    """With ``evaluate-in-train`` (the default) each round is one exchange with the sites; the
    metrics logged for every round's model and the trained weights are those of a run with an
    evaluation phase in every round."""
    from flwr.app import MessageType

    from server.checkpoint import load_checkpoint
    from server.tracking import METRICS_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    runs = {}
    for folded in (True, False):
        rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 3, "evaluate-in-train": folded,
                                                 "run-name": f"folded-{folded}", "diagnostics-every": 2})
        grid = run_server(in_process_grid, rc)
        lines = [json.loads(x) for x in (run_dir(rc) / "tensorboard" / METRICS_FILE).read_text().splitlines()]
        kinds = [m.metadata.message_type for m in grid.sent]
        runs[folded] = (lines, kinds, load_checkpoint(run_dir(rc)).arrays)
    (folded, kinds, arrays), (separate, kinds_sep, arrays_sep) = runs[True], runs[False]
    assert kinds.count(MessageType.EVALUATE) == 2 and kinds_sep.count(MessageType.EVALUATE) == 6
    assert kinds.count(MessageType.TRAIN) == kinds_sep.count(MessageType.TRAIN) == 6
    assert [r["round"] for r in folded] == [r["round"] for r in separate] == [1, 2, 3]
    for a, b in zip(folded, separate):
        for site in ("node-100", "node-101"):
            ea, eb = a["sites"][site]["evaluate"], b["sites"][site]["evaluate"]
            assert {k for k in eb if not k.startswith("client-")} == {k for k in ea if not k.startswith("client-")}
            assert ea["dice_mean"] == pytest.approx(eb["dice_mean"], abs=1e-6)
            assert ("dice_oracle" in ea) == ("dice_oracle" in eb) == (a["round"] in (2, 3))
            assert a["sites"][site]["train"]["seg_loss"] == pytest.approx(b["sites"][site]["train"]["seg_loss"], abs=1e-6)
        assert a["global"]["evaluate"]["dice_mean"] == pytest.approx(b["global"]["evaluate"]["dice_mean"], abs=1e-6)
    assert set(arrays) == set(arrays_sep) and all(np.allclose(arrays[k], arrays_sep[k], atol=1e-6) for k in arrays)
    # the evaluation's time counts in the train reply's (it ran there), not twice
    assert all("client-time-s" not in r["sites"]["node-100"]["evaluate"] for r in folded[:2])
    assert folded[1]["sites"]["node-100"]["train"]["client-time-s"] > 0


def test_resume_completes_the_round_waiting_for_its_evaluation(tmp_path, site_dir, in_process_grid, monkeypatch):
    """The coordinator stops after round 2's checkpoint, before round 3's train messages went
    out: round 2's log line waits in ``pending-round.json``; the resumed run asks the sites to
    evaluate the checkpoint's model in its first train messages and writes the line."""
    from flwr.app import MessageType

    from server.strategies import JRASStrategyMixin
    from server.tracking import METRICS_FILE, PENDING_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 3})
    original = JRASStrategyMixin._evaluates_first

    def stop_at_round_3(self, rnd, server_round):
        if rnd == 3:
            raise KeyboardInterrupt
        return original(self, rnd, server_round)

    monkeypatch.setattr(JRASStrategyMixin, "_evaluates_first", stop_at_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_server(in_process_grid, rc)
    monkeypatch.undo()
    logs = run_dir(rc) / "tensorboard"
    assert [json.loads(x)["round"] for x in (logs / METRICS_FILE).read_text().splitlines()] == [1]
    assert json.loads((logs / PENDING_FILE).read_text())["round"] == 2

    grid = run_server(in_process_grid, dict(rc, **{"resume": str(run_dir(rc)), "num-server-rounds": 1}))
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert [m.content["config"]["server-round"] for m in train] == [3, 3]
    assert all(m.content["config"].get("evaluate-first") for m in train)
    lines = [json.loads(x) for x in (logs / METRICS_FILE).read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2, 3] and not (logs / PENDING_FILE).exists()
    assert "train" in lines[1]["global"] and "dice_mean" in lines[1]["global"]["evaluate"]


def test_evaluation_in_train_failure_keeps_the_update(tmp_path, site_dir, in_process_grid):
    """A site whose evaluation fails (no validation slices) still trains; the failure is
    logged as that round's evaluation error."""
    from server.tracking import METRICS_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    broken = yaml.safe_load(Path(sites[1]).read_text())
    broken["val_fraction"] = 0.0
    Path(sites[1]).write_text(yaml.safe_dump(broken))
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 2})
    run_server(in_process_grid, rc)
    lines = [json.loads(x) for x in (run_dir(rc) / "tensorboard" / METRICS_FILE).read_text().splitlines()]
    first = lines[0]
    assert "validation" in first["errors"]["node-101"]["evaluate"]
    assert set(first["sites"]) == {"node-100", "node-101"} and "evaluate" in first["sites"]["node-100"]
    assert lines[1]["round_stats"]["num_sites_train"] == 2  # both updates of round 2 arrived


def test_fedbn_keeps_norm_local(tmp_path, site_dir, in_process_grid):
    from server.checkpoint import load_checkpoint

    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites, strategy="fedbn")
    method = tiny_method(rc)
    model = build_model(method)
    norms = protocol.norm_keys(model)
    initial = protocol.state_to_arrays(model.state_dict())
    grid = run_server(in_process_grid, rc)
    for msg in grid.sent + grid.received:
        for record in msg.content.array_records.values():
            assert not set(record) & norms
    states = []
    for ctx in grid.contexts.values():
        local = {k: v.numpy() for k, v in ctx.state["jras-local"].items()}
        assert set(local) == norms
        states.append(local)
    running = [k for k in norms if k.endswith("running_mean")]
    assert any(not np.allclose(states[0][k], states[1][k]) for k in running)
    ckpt = load_checkpoint(run_dir(rc))
    assert all(np.array_equal(ckpt.arrays[k], initial[k]) for k in norms)
    assert any(not np.array_equal(ckpt.arrays[k], initial[k]) for k in initial if k not in norms)


def test_segmenter_only_keeps_retriever_local(tmp_path, site_dir, in_process_grid):
    from server.checkpoint import load_checkpoint

    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites, aggregate="segmenter")
    method = tiny_method(rc)
    initial = protocol.state_to_arrays(build_model(method).state_dict())
    retr = {k for k in initial if k.startswith("retr.")}
    grid = run_server(in_process_grid, rc)
    for msg in grid.sent + grid.received:
        for record in msg.content.array_records.values():
            assert all(k.startswith("seg.") for k in record)
    locals_ = [{k: v.numpy() for k, v in ctx.state["jras-local"].items()} for ctx in grid.contexts.values()]
    assert all(set(s) == retr for s in locals_)
    assert any(not np.array_equal(locals_[0][k], locals_[1][k]) for k in retr)
    assert any(not np.array_equal(locals_[0][k], initial[k]) for k in retr)
    ckpt = load_checkpoint(run_dir(rc))
    assert all(np.array_equal(ckpt.arrays[k], initial[k]) for k in retr)


def test_fedprox_and_fedadam(tmp_path, site_dir, in_process_grid):
    from server.checkpoint import load_checkpoint

    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites, strategy="fedprox", **{"num-server-rounds": 1, "proximal-mu": 0.5})
    grid = run_server(in_process_grid, rc)
    assert all(m.content["config"]["proximal-mu"] == 0.5 for m in grid.sent if "proximal-mu" in m.content["config"])
    assert any("proximal-mu" in m.content["config"] for m in grid.sent)

    rc = base_run_config(tmp_path, sites, strategy="fedadam", **{"run-name": "adam"})
    run_server(in_process_grid, rc)
    ckpt = load_checkpoint(run_dir(rc))
    model = build_model(tiny_method(rc))
    buffers = protocol.buffer_keys(model)
    for k in buffers:
        assert ckpt.arrays[k].dtype == model.state_dict()[k].numpy().dtype
        if k.endswith("running_var"):
            assert (ckpt.arrays[k] >= 0).all()
    params = {k for k, _ in model.named_parameters()}
    assert {k[4:] for k in ckpt.strategy_state if k.startswith("m_t.")} == params | buffers
    # resume restores the moments
    from server.settings import ServerSettings
    from server.strategies import build_strategy

    strat = build_strategy(ServerSettings.from_run_config(rc), buffer_keys=buffers)
    strat.load_state_arrays(ckpt.strategy_state)
    assert set(strat.m_t) == params | buffers and set(strat.v_t) == params | buffers


def test_failed_site_does_not_stop_the_round(tmp_path, site_dir, in_process_grid):
    sites = write_sites(tmp_path, "AB", cases=4)
    missing = str(tmp_path / "nowhere.yaml")
    rc = base_run_config(tmp_path, sites + [missing], **{"num-server-rounds": 1, "min-nodes": 3})
    grid = run_server(in_process_grid, rc)
    errors = [m for m in grid.received if m.has_error()]
    assert len(errors) == 2  # train and evaluate of the broken site
    lines = (run_dir(rc) / "tensorboard" / "metrics.jsonl").read_text().splitlines()
    stats = json.loads(lines[0])["round_stats"]
    assert stats["failures_train"] == 1 and stats["num_sites_train"] == 2


def _scaled_parameters(reply: dict, sent: dict) -> dict:
    """:func:`scaled_update` on the trained parameters; the running statistics as the site
    trained them (the server's buffer screens reject noise there whatever the strategy)."""
    out = scaled_update(reply, sent)
    return {k: reply[k] if "running_" in k else v for k, v in out.items()}


def test_poisoned_site_robust_vs_fedavg(tmp_path, sites, in_process_grid):
    """The aggregations themselves, without the round-relative norm bound (``norm-bound-factor
    = 0``; on by default, it rejects this attacker too: tests/test_server_aggregation_attacks.py)."""
    clean, lines = run_rounds(in_process_grid, one_round_config(tmp_path, sites, "clean"))
    initial = protocol.state_to_arrays(build_model(protocol.method_from_run_config(one_round_config(tmp_path, sites, "x"))).state_dict())
    clean_step = float_distance(clean, initial)  # how far one clean round moves the model
    assert lines[0]["round_stats"]["rejected_replies"] == 0
    distance = {}
    for name, over in {
        "fedavg": {},
        "fedmedian": {"strategy": "fedmedian"},
        "krum": {"strategy": "krum", "krum-num-malicious": 1},
        "fedavg+norm-bound": {"max-update-norm": 100.0},
    }.items():
        rc = one_round_config(tmp_path, sites, name, **{"norm-bound-factor": 0.0, **over})
        arrays, lines = run_rounds(in_process_grid, rc, _scaled_parameters)
        assert all(np.isfinite(v).all() for v in arrays.values())
        distance[name] = float_distance(arrays, clean)
        if name == "fedavg+norm-bound":
            assert lines[0]["round_stats"]["rejected_replies"] == 1
    print(f"clean round step {clean_step:.3f}; distance to the clean FedAvg run:",
          {k: round(v, 3) for k, v in distance.items()})
    assert max(distance["fedmedian"], distance["krum"], distance["fedavg+norm-bound"]) < 0.25 * clean_step
    assert distance["fedavg"] > 100 * distance["fedmedian"]
    assert distance["fedavg"] > 100 * distance["krum"]
    assert distance["fedavg"] > 100 * distance["fedavg+norm-bound"]


def test_fedavgm_steps_along_the_averaged_update_and_keeps_its_momentum(tmp_path, site_dir, in_process_grid):
    """One FedAvgM round at server learning rate 0.5 lands halfway between the initial model
    and FedAvg's aggregate of the same round (the sites train identically from the same
    model); buffers are FedAvg's plain mean; the momentum buffer is checkpointed and restored."""
    from server.checkpoint import load_checkpoint
    from server.settings import ServerSettings
    from server.strategies import build_strategy

    sites = write_sites(tmp_path, "AB", cases=4)
    common = {"num-server-rounds": 1, "fraction-evaluate": 0.0}
    rc_avg = base_run_config(tmp_path, sites, **common, **{"run-name": "avg"})
    run_server(in_process_grid, rc_avg)
    rc_m = base_run_config(tmp_path, sites, strategy="fedavgm", **common,
                           **{"run-name": "avgm", "server-learning-rate": 0.5, "server-momentum": 0.9})
    run_server(in_process_grid, rc_m)
    model = build_model(tiny_method(rc_m))
    initial = protocol.state_to_arrays(model.state_dict())
    avg, avgm = load_checkpoint(run_dir(rc_avg)), load_checkpoint(run_dir(rc_m))
    buffers = protocol.buffer_keys(model)
    params = [k for k, _ in model.named_parameters()]
    assert any(not np.allclose(avg.arrays[k], initial[k]) for k in params)
    for k in params:
        np.testing.assert_allclose(avgm.arrays[k], (initial[k] + avg.arrays[k]) / 2, rtol=1e-5, atol=1e-6)
    for k in buffers:
        np.testing.assert_allclose(avgm.arrays[k], avg.arrays[k], rtol=1e-6)
    momentum = {k[len("momentum."):]: v for k, v in avgm.strategy_state.items() if k.startswith("momentum.")}
    assert set(momentum) >= set(params)
    k = params[0]
    np.testing.assert_allclose(momentum[k], initial[k] - avg.arrays[k], rtol=1e-5, atol=1e-6)
    strat = build_strategy(ServerSettings.from_run_config(rc_m), buffer_keys=buffers)
    strat.load_state_arrays(avgm.strategy_state)
    assert strat.momentum_vector is not None and len(strat.momentum_vector) == len(momentum)
