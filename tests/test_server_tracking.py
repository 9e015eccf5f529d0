"""Tests of server.tracking: the per-round log and TensorBoard scalars."""

from __future__ import annotations

import json


def test_round_recorder(tmp_path):
    from server.tracking import METRICS_FILE, RoundRecorder

    rec = RoundRecorder(tmp_path)
    rec.start_round(3)
    rec.add_traffic(sent=100, received=40)
    rec.add_site_metrics("train", "node-1", {"seg_loss": 1.0, "num-examples": 10})
    rec.add_site_metrics("evaluate", "node-1", {"dice_lv": float("nan"), "num-examples": 4})
    rec.add_global_metrics("train", {"seg_loss": 1.0})
    summary = rec.end_round(3)
    rec.close()
    assert summary["bytes_total"] == 140 and summary["wall_time_s"] >= 0
    line = json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[0])
    assert line["round"] == 3 and line["global"]["train"]["num-examples"] == 10
    assert line["sites"]["node-1"]["evaluate"]["dice_lv"] is None
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_round_recorder_holds_a_round_for_its_evaluation(tmp_path):
    from server.tracking import METRICS_FILE, PENDING_FILE, RoundRecorder

    def rounds() -> list[dict]:
        return [json.loads(x) for x in (tmp_path / METRICS_FILE).read_text().splitlines()]

    rec = RoundRecorder(tmp_path)
    rec.start_round(1)
    rec.add_site_metrics("train", "node-1", {"seg_loss": 1.0, "num-examples": 10})
    rec.end_round(1, defer=True)
    assert not (tmp_path / METRICS_FILE).exists() and rec.pending_round == 1
    assert json.loads((tmp_path / PENDING_FILE).read_text())["round"] == 1
    rec.start_round(2)  # the previous round's record keeps waiting
    rec.add_evaluation(1, {"node-1": {"dice_mean": 0.5, "num-examples": 4}}, {"dice_mean": 0.5},
                       errors={"node-2": "ConfigError: no validation slices"})
    [one] = rounds()
    assert one["round"] == 1 and one["global"]["evaluate"] == {"dice_mean": 0.5, "num-examples": 4.0}
    assert one["sites"]["node-1"]["train"]["seg_loss"] == 1.0 and one["sites"]["node-1"]["evaluate"]["dice_mean"] == 0.5
    assert one["errors"]["node-2"]["evaluate"].startswith("ConfigError")
    assert one["round_stats"]["failures_evaluate"] == 1 and one["round_stats"]["num_sites_evaluate"] == 1
    assert not (tmp_path / PENDING_FILE).exists() and rec.pending_round is None

    # a crash after round 2 ended: its record survives in the pending file and a new recorder
    # (the resumed run) picks it up and completes it
    rec.add_site_metrics("train", "node-1", {"seg_loss": 0.8, "num-examples": 10})
    rec.end_round(2, defer=True)
    rec.close()
    resumed = RoundRecorder(tmp_path)
    assert resumed.pending_round == 2
    resumed.start_round(3)
    resumed.add_evaluation(2, {"node-1": {"dice_mean": 0.6, "num-examples": 4}}, {"dice_mean": 0.6})
    assert [r["round"] for r in rounds()] == [1, 2]
    assert rounds()[1]["sites"]["node-1"]["train"]["seg_loss"] == 0.8
    # a held record whose evaluation cannot come any more (a fresh run in the same folder
    # starting at round 1) is written as it is
    resumed.end_round(3, defer=True)
    resumed.close()
    fresh = RoundRecorder(tmp_path)
    fresh.start_round(1)
    assert [r["round"] for r in rounds()] == [1, 2, 3] and "evaluate" not in rounds()[2]["global"]
    fresh.close()
