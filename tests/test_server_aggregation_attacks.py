"""Aggregation that no single site can steer: inflated example counts, out-of-range
metrics, implausible buffers and oversized updates, each as an attack on the strategy's
aggregation (replies built by hand on an in-process grid, tiny arrays, no training) and on
the pure checks of :mod:`server.validation`; plus a clean round that stays the plain
weighted mean."""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from federation.protocol import EVALUATION
from federation.records import arrays_to_record, record_to_arrays
from server.settings import ServerSettings
from server.strategies import build_strategy
from server.tracking import RoundRecorder
from server.validation import (
    METRIC_RANGES,
    BufferLimits,
    ExampleWeighting,
    lower_median,
    metric_range,
    relative_norm_bound,
    validate_buffers,
    validate_example_count,
    validate_metrics,
    validate_update,
)

INT64_MAX = np.iinfo(np.int64).max

GLOBAL = {
    "w": np.zeros(6, np.float32),
    "bn.weight": np.ones(2, np.float32),
    "bn.running_mean": np.zeros(2, np.float32),
    "bn.running_var": np.ones(2, np.float32),
    "bn.num_batches_tracked": np.array(10, np.int64),
}
BUFFERS = {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
NODES = (100, 101, 102)
ATTACKER = 102


def honest(i: int) -> dict[str, np.ndarray]:
    """A plausible site update: small steps, running statistics nudged, a few batches counted."""
    rng = np.random.default_rng(i)
    return {
        "w": (GLOBAL["w"] + 0.1 * rng.standard_normal(6)).astype(np.float32),
        "bn.weight": (GLOBAL["bn.weight"] + 0.05 * rng.standard_normal(2)).astype(np.float32),
        "bn.running_mean": (0.2 * rng.standard_normal(2)).astype(np.float32),
        "bn.running_var": (1.0 + 0.1 * rng.random(2)).astype(np.float32),
        "bn.num_batches_tracked": np.array(15 + i, np.int64),
    }


def with_update_norm(norm: float) -> dict[str, np.ndarray]:
    """A site update moving ``w`` by exactly ``norm`` (buffers plausible)."""
    out = honest(9)
    out["w"] = (GLOBAL["w"] + norm / math.sqrt(6)).astype(np.float32)
    return out


def train_metrics(count: float = 100.0, **over: float) -> dict[str, float]:
    return {"num-examples": count, "seg_loss": 0.4, "retr_loss": 1.2, "client-time-s": 3.0, "peak-rss-mb": 300.0,
            **over}


def eval_metrics(count: float = 20.0, **over: float) -> dict[str, float]:
    return {"num-examples": count, "dice_mean": 0.8, "dice_lv": 0.9, "hd95_mean": 4.0, "guide_dice": 0.6,
            "client-time-s": 1.0, **over}


class Round:
    """A strategy from run-config keys and one round of hand-made replies on an in-process grid."""

    def __init__(self, grid_cls, nodes=NODES, **run_config):
        settings = ServerSettings.from_run_config({"min-nodes": 2, "num-server-rounds": 2, **run_config})
        self.recorder = RoundRecorder(None)
        self.strategy = build_strategy(settings, buffer_keys=BUFFERS, recorder=self.recorder)
        self.replies: dict[int, RecordDict] = {}
        self.stats: dict[str, float] = {}
        self.grid = grid_cls(lambda msg, ctx: Message(content=self.replies[ctx.node_id], reply_to=msg),
                             {nid: {} for nid in nodes}, {})

    def train(self, replies: dict[int, tuple[dict, dict]], server_round: int = 1, evaluations: dict | None = None):
        """Send the global model, let each node answer ``(arrays, metrics)`` (plus an
        ``evaluate`` record from ``evaluations``), aggregate; returns ``(arrays, metrics)``."""
        self.replies = {}
        for nid, (arrays, metrics) in replies.items():
            content = RecordDict({"arrays": arrays_to_record(arrays), "metrics": MetricRecord(dict(metrics))})
            if evaluations and nid in evaluations:
                content[EVALUATION] = MetricRecord(dict(evaluations[nid]))
            self.replies[nid] = content
        config = ConfigRecord({})
        messages = self.strategy.configure_train(server_round, arrays_to_record(GLOBAL), config, self.grid)
        got = self.grid.send_and_receive(list(messages))
        aggregated, metrics = self.strategy.aggregate_train(server_round, got)
        self.stats = self.recorder.end_round(server_round, defer=self.strategy.evaluation_deferred(server_round))
        return (None if aggregated is None else record_to_arrays(aggregated)), metrics

    def evaluate(self, replies: dict[int, dict]):
        """An evaluation phase (the run's last round, 2) with these metrics per node; returns
        the aggregate and the round's record."""
        self.replies = {nid: RecordDict({"metrics": MetricRecord(dict(m))}) for nid, m in replies.items()}
        messages = self.strategy.configure_evaluate(2, arrays_to_record(GLOBAL), ConfigRecord({}), self.grid)
        metrics = self.strategy.aggregate_evaluate(2, self.grid.send_and_receive(list(messages)))
        self.recorder.end_round(2)
        return metrics, self.recorder.history[-1]


def weighted_mean(updates: list[dict], weights: list[float], key: str) -> np.ndarray:
    return np.average(np.stack([u[key].astype(np.float64) for u in updates]), axis=0, weights=weights)


@contextmanager
def server_log(caplog):
    """Capture the ``server`` loggers at WARNING."""
    logger = logging.getLogger("server")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)


def logged(caplog, *parts: str) -> bool:
    return any(all(p in r.getMessage() for p in parts) for r in caplog.records)


# --------------------------------------------------------------------------- a clean round


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedbn"])
def test_clean_round_is_the_plain_weighted_mean(in_process_grid, strategy):
    r = Round(in_process_grid, strategy=strategy)
    updates, counts = [honest(i) for i in range(3)], [100.0, 120.0, 150.0]
    arrays, metrics = r.train({nid: (u, train_metrics(c)) for nid, u, c in zip(NODES, updates, counts)})
    for key in ("w", "bn.weight", "bn.running_mean", "bn.running_var"):
        np.testing.assert_allclose(arrays[key], weighted_mean(updates, counts, key), rtol=1e-6)
    assert arrays["bn.num_batches_tracked"].dtype == np.int64
    assert metrics["seg_loss"] == pytest.approx(0.4) and "num-examples" not in metrics
    # (the stats read with a default: the same test passes on the code before these screens)
    assert [r.stats.get(k, 0) for k in ("rejected_replies", "clipped_weights", "dropped_metrics")] == [0, 0, 0]


# --------------------------------------------------------------------------- 1. example counts


def test_inflated_example_count_is_capped(in_process_grid, caplog):
    """Measured before: 1e12 claimed examples and an update of norm 5 made the FedAvg
    aggregate the attacker's weights to within 2e-11, also with max-update-norm = 10."""
    updates = [honest(0), honest(1), with_update_norm(5.0)]
    counts = [100.0, 120.0, 1e12]
    replies = {nid: (u, train_metrics(c)) for nid, u, c in zip(NODES, updates, counts)}
    # the norm bound made relative to the round would reject it anyway: take it out to see the weights
    r = Round(in_process_grid, **{"max-update-norm": 10.0, "norm-bound-factor": 0.0})
    with server_log(caplog):
        arrays, _ = r.train(replies)
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates, [100, 120, 3 * 120], "w"), rtol=1e-6)
    assert np.linalg.norm(arrays["w"] - updates[2]["w"]) > 1.0  # the attacker does not set the aggregate
    assert r.stats["clipped_weights"] == 1 and r.stats["rejected_replies"] == 0
    assert logged(caplog, "node-102", "clipped from 1e+12 to 360")

    # equal weights: each reply weighs 1
    r = Round(in_process_grid, **{"example-weights": "equal", "norm-bound-factor": 0.0})
    arrays, _ = r.train(replies)
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates, [1, 1, 1], "w"), rtol=1e-6)

    # claimed: today's trust, but max-examples still caps it
    r = Round(in_process_grid, **{"example-weights": "claimed", "max-examples": 500, "norm-bound-factor": 0.0})
    arrays, _ = r.train(replies)
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates, [100, 120, 500], "w"), rtol=1e-6)

    # with the defaults the oversized update is rejected outright
    r = Round(in_process_grid)
    arrays, _ = r.train(replies)
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates[:2], [100, 120], "w"), rtol=1e-6)
    assert r.stats["rejected_replies"] == 1


def test_two_sites_one_inflating_gets_at_most_three_quarters(in_process_grid):
    """With two replies the (lower) median is the honest site's count: the attacker weighs
    at most ``max-example-ratio`` times it, i.e. 3/4 of the aggregate, not all of it."""
    updates = [honest(0), with_update_norm(5.0)]
    r = Round(in_process_grid, nodes=NODES[:2])
    arrays, _ = r.train({100: (updates[0], train_metrics(100.0)), 101: (updates[1], train_metrics(1e12))})
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates, [100, 300], "w"), rtol=1e-6)


@pytest.mark.parametrize("strategy", ["fedadam"])
def test_capped_weights_reach_fedadam_buffers(in_process_grid, strategy):
    """FedAdam averages the buffers itself, with the replies' weights: the capped ones."""
    updates = [honest(0), honest(1), honest(2)]
    counts = [100.0, 120.0, 1e9]
    r = Round(in_process_grid, strategy=strategy)
    arrays, _ = r.train({nid: (u, train_metrics(c)) for nid, u, c in zip(NODES, updates, counts)})
    for key in ("bn.running_mean", "bn.running_var"):
        np.testing.assert_allclose(arrays[key], weighted_mean(updates, [100, 120, 360], key), rtol=1e-5)


@pytest.mark.parametrize("bad", [2.5, 0, -3.0, float("inf"), float("nan"), 2.0**60])
def test_invalid_example_count_is_rejected(in_process_grid, bad):
    updates = [honest(0), honest(1), honest(2)]
    r = Round(in_process_grid)
    counts = [100.0, 120.0, bad]
    arrays, _ = r.train({nid: (u, train_metrics(c)) for nid, u, c in zip(NODES, updates, counts)})
    assert r.stats["rejected_replies"] == 1
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates[:2], [100, 120], "w"), rtol=1e-6)


# --------------------------------------------------------------------------- 2. metrics


def test_claimed_dice_of_an_evaluation_in_train_is_not_the_global_dice(in_process_grid, caplog):
    """Measured before: a claimed dice_mean of 1e9 was logged as the round's global Dice."""
    r = Round(in_process_grid)
    updates = [honest(0), honest(1), honest(2)]
    replies = {nid: (u, train_metrics()) for nid, u in zip(NODES, updates)}
    evaluations = {100: eval_metrics(20, dice_mean=0.7), 101: eval_metrics(30, dice_mean=0.8),
                   102: eval_metrics(1e6, dice_mean=1e9)}
    r.train(replies, server_round=1)
    with server_log(caplog):
        arrays, _ = r.train(replies, server_round=2, evaluations=evaluations)
    record = next(h for h in r.recorder.history if h["round"] == 1)
    assert record["global"]["evaluate"]["dice_mean"] == pytest.approx((20 * 0.7 + 30 * 0.8) / 50)
    assert "dice_mean = 1e+09 outside [0, 1]" in record["errors"]["node-102"]["evaluate"]
    assert logged(caplog, "dropped the evaluation of node-102", "dice_mean")
    # its update is still aggregated: the attack was on the metrics only
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates, [100, 100, 100], "w"), rtol=1e-6)


def test_evaluation_phase_drops_out_of_range_metrics_and_caps_counts(in_process_grid, caplog):
    r = Round(in_process_grid)
    with server_log(caplog):
        metrics, _ = r.evaluate({100: eval_metrics(20, dice_mean=0.7), 101: eval_metrics(30, dice_mean=0.8),
                              102: eval_metrics(1e9, dice_mean=0.1)})
    # the huge count weighs 3 x the median (30): 90
    assert metrics["dice_mean"] == pytest.approx((20 * 0.7 + 30 * 0.8 + 90 * 0.1) / 140)
    assert logged(caplog, "node-102", "clipped from 1e+09 to 90")
    with server_log(caplog):
        metrics, record = r.evaluate({100: eval_metrics(20, dice_mean=0.7), 101: eval_metrics(30, dice_mean=0.8),
                                      102: eval_metrics(20, hd95_mean=-1.0)})
    assert metrics["dice_mean"] == pytest.approx((20 * 0.7 + 30 * 0.8) / 50)
    assert record["global"]["evaluate"]["dice_mean"] == pytest.approx(metrics["dice_mean"])
    assert record["errors"]["node-102"]["evaluate"].startswith("evaluation dropped: metric hd95_mean = -1 outside")
    assert logged(caplog, "dropped the evaluation of node-102", "hd95_mean")


@pytest.mark.parametrize("bad", [{"seg_loss": float("inf")}, {"seg_loss": -2.0}, {"client-time-s": -1.0},
                                 {"dice_mean": 1.5}, {"unknown_metric": float("inf")}])
def test_out_of_range_train_metrics_are_dropped_but_the_update_counts(in_process_grid, caplog, bad):
    updates = [honest(0), honest(1), honest(2)]
    r = Round(in_process_grid)
    with server_log(caplog):
        arrays, metrics = r.train({100: (updates[0], train_metrics(seg_loss=0.2)),
                                   101: (updates[1], train_metrics(seg_loss=0.6)),
                                   102: (updates[2], train_metrics(**bad))})
    assert metrics["seg_loss"] == pytest.approx(0.4)  # the two others only
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates, [1, 1, 1], "w"), rtol=1e-6)
    assert r.stats["dropped_metrics"] == 1 and r.stats["rejected_replies"] == 0
    assert logged(caplog, "dropped the train metrics of node-102", next(iter(bad)))


def test_a_metric_a_site_could_not_measure_is_left_out_of_its_mean(in_process_grid):
    """NaN is what an honest site sends for a metric it cannot measure (the Dice of a class
    none of its cases has, guide Dice without guides): the site's evaluation still counts, and
    that one metric's mean is over the sites that measured it."""
    r = Round(in_process_grid)
    metrics, record = r.evaluate({100: eval_metrics(20, dice_lv=0.6), 101: eval_metrics(30, dice_lv=0.9),
                                  102: eval_metrics(50, dice_lv=float("nan"), guide_dice=float("nan"))})
    assert metrics["dice_lv"] == pytest.approx((20 * 0.6 + 30 * 0.9) / 50)
    assert metrics["dice_mean"] == pytest.approx(0.8) and metrics["guide_dice"] == pytest.approx(0.6)
    assert "node-102" not in record.get("errors", {})
    only_nan = r.evaluate({100: eval_metrics(20, guide_dice=float("nan")), 101: eval_metrics(30, guide_dice=float("nan"))})
    assert math.isnan(only_nan[0]["guide_dice"])


def test_a_site_with_extra_metric_keys_does_not_end_the_run(in_process_grid):
    """Flower ends the whole run on replies whose MetricRecords differ in keys; the server
    aggregates the metrics itself and hands Flower the weights only."""
    updates = [honest(0), honest(1), honest(2)]
    r = Round(in_process_grid)
    arrays, metrics = r.train({100: (updates[0], train_metrics()), 101: (updates[1], train_metrics()),
                               102: (updates[2], train_metrics(extra=0.5))})
    assert arrays is not None and metrics["seg_loss"] == pytest.approx(0.4)


# --------------------------------------------------------------------------- 3. buffers


@pytest.mark.parametrize("key, value, words", [
    ("bn.running_var", -1e3, "variances in [-1000"),
    ("bn.running_var", 1e30, "outside [0, 1e+06]"),
    ("bn.running_mean", 1e7, "|running mean| up to 1e+07"),
    ("bn.num_batches_tracked", INT64_MAX, f"counter {INT64_MAX}"),
    ("bn.num_batches_tracked", -1, "counter -1"),
])
def test_implausible_buffers_are_rejected(in_process_grid, caplog, key, value, words):
    """Measured before, with max-update-norm = 100: a running_var of -1e3 passed (the global
    running_var became -348, every output NaN); 1e30 passed; int64-max counters passed."""
    updates = [honest(0), honest(1), honest(2)]
    bad = dict(updates[2])
    bad[key] = np.full_like(bad[key], value)
    r = Round(in_process_grid, **{"max-update-norm": 100.0})
    with server_log(caplog):
        arrays, _ = r.train({100: (updates[0], train_metrics()), 101: (updates[1], train_metrics()),
                             102: (bad, train_metrics())})
    assert r.stats["rejected_replies"] == 1
    assert (arrays["bn.running_var"] > 0).all() and arrays["bn.num_batches_tracked"] < 100
    assert logged(caplog, "rejected the update of node-102", key, words)


# --------------------------------------------------------------------------- 4. update norm


def test_oversized_update_rejected_by_default(in_process_grid, caplog):
    """Measured before: with the defaults an update of norm 6.5e5 was accepted."""
    updates = [honest(0), honest(1), with_update_norm(6.5e5)]
    r = Round(in_process_grid)
    with server_log(caplog):
        arrays, _ = r.train({nid: (u, train_metrics()) for nid, u in zip(NODES, updates)})
    assert r.stats["rejected_replies"] == 1
    np.testing.assert_allclose(arrays["w"], weighted_mean(updates[:2], [1, 1], "w"), rtol=1e-6)
    assert logged(caplog, "rejected the update of node-102", "update norm 6.5e+05 above the round's bound")

    # a factor of 0 turns the relative bound off (the attacker is then only capped by weight)
    r = Round(in_process_grid, **{"norm-bound-factor": 0.0})
    arrays, _ = r.train({nid: (u, train_metrics()) for nid, u in zip(NODES, updates)})
    assert r.stats["rejected_replies"] == 0

    # an absolute bound keeps its meaning, also with two sites (no relative bound there)
    r = Round(in_process_grid, nodes=NODES[:2], **{"max-update-norm": 100.0})
    arrays, _ = r.train({100: (updates[0], train_metrics()), 101: (updates[2], train_metrics())})
    assert arrays is None and r.stats["rejected_replies"] == 1 and r.stats["aggregate_skipped"] == 1


def test_robust_strategy_still_screens(in_process_grid):
    updates = [honest(0), honest(1), honest(2)]
    bad = dict(updates[2], **{"bn.running_var": np.full(2, -1e3, np.float32)})
    r = Round(in_process_grid, strategy="fedmedian")
    arrays, _ = r.train({100: (updates[0], train_metrics()), 101: (updates[1], train_metrics()),
                         102: (bad, train_metrics(1e12))})
    assert r.stats["rejected_replies"] == 1 and (arrays["bn.running_var"] > 0).all()


# --------------------------------------------------------------------------- the pure checks


def test_example_weighting():
    counts = [100.0, 120.0, 1e12]
    assert ExampleWeighting().weights(counts) == [100.0, 120.0, 360.0]
    assert ExampleWeighting("capped", 2.0, 200).weights(counts) == [100.0, 120.0, 200.0]
    assert ExampleWeighting("claimed").weights(counts) == counts
    assert ExampleWeighting("claimed", max_examples=500).weights(counts) == [100.0, 120.0, 500.0]
    assert ExampleWeighting("equal").weights(counts) == [1.0, 1.0, 1.0]
    assert ExampleWeighting().weights([100.0, 1e12]) == [100.0, 300.0]  # the lower median
    assert lower_median([5, 1, 9, 7]) == 5 and lower_median([3]) == 3
    assert "3 x the round's median count 120" in ExampleWeighting().describe_cap(counts)
    assert "max-examples 200" in ExampleWeighting("capped", 2.0, 200).describe_cap(counts)
    with pytest.raises(ValueError):
        ExampleWeighting("trusted")


def test_validate_example_count():
    for ok in (1, 100, 100.0, 2**53):
        assert validate_example_count(ok) is None
    for bad in (0, -1, 2.5, float("nan"), float("inf"), True, "3", None, 2.0**60):
        assert validate_example_count(bad) is not None, bad


def test_validate_metrics_ranges():
    clean = {**eval_metrics(), **train_metrics(), "slice_dice_mean": 0.7, "dice_oracle": 0.9, "dice_random": 0.2,
             "dice_noguide": 0.6, "support_dice_guided": 0.5, "guides_used": 1.0, "num_slices": 40.0,
             "num_volumes": 2.0, "partition-id": 2, "seg_time_s": 1.5, "client-cpu-s": 2.0, "other": -3.0}
    assert validate_metrics(clean, skip=("num-examples",)) is None
    assert validate_metrics({"dice_mean": 1e9}) == "metric dice_mean = 1e+09 outside [0, 1]"
    assert validate_metrics({"guide_dice": -0.1}) is not None
    assert validate_metrics({"retrieval_precision": 1.2}) is not None
    assert validate_metrics({"guides_used": 2.0}) is not None
    assert validate_metrics({"seg_loss": -1.0}) is not None
    assert validate_metrics({"hd95_mean": float("inf")}) == "metric hd95_mean = inf is not finite"
    assert validate_metrics({"other": float("-inf")}) is not None  # an unknown name: finite
    assert validate_metrics({"dice_rv": float("nan"), "hd95_mean": float("nan")}) is None  # NaN: not measured
    assert validate_metrics({"dice_lv": [0.5, 1.2]}) is not None
    assert validate_metrics({"num-examples": -5}, skip=("num-examples",)) is None


def test_metric_table_covers_what_the_client_sends():
    sent = ["seg_loss", "retr_loss", "seg_time_s", "retr_time_s", "refresh_time_s", "epoch_time_s", "client-time-s",
            "client-cpu-s", "peak-rss-mb", "partition-id", "dice_mean", "dice_lv", "dice_myo", "dice_rv",
            "hd95_mean", "hd95_lv", "slice_dice_mean", "num_slices", "num_volumes", "guides_used", "guide_dice",
            "dice_oracle", "dice_random", "dice_noguide", "support_dice_guided", "support_dice_noguide"]
    for name in sent:
        assert metric_range(name) is not None, name
    fractions = {n for n in sent if metric_range(n).high == 1.0}
    assert fractions == {n for n in sent if "dice" in n} | {"guides_used"}
    assert all(r.low == 0.0 for r in METRIC_RANGES)


def test_validate_buffers():
    ref = {"bn.running_var": np.ones(2, np.float32), "bn.running_mean": np.zeros(2, np.float32),
           "bn.num_batches_tracked": np.array(10, np.int64), "w": np.zeros(2, np.float32)}
    ok = {"bn.running_var": np.array([0.0, 3.0], np.float32), "bn.running_mean": np.array([-5.0, 5.0], np.float32),
          "bn.num_batches_tracked": np.array(10 + 10**7, np.int64), "w": np.ones(2, np.float32)}
    assert validate_buffers(ok, ref) is None and validate_update(ok, ref) is None
    for key, value in (("bn.running_var", -1e-3), ("bn.running_var", 1e30), ("bn.running_mean", -2e6),
                       ("bn.num_batches_tracked", 11 + 10**7), ("bn.num_batches_tracked", INT64_MAX),
                       ("bn.num_batches_tracked", -1)):
        bad = dict(ok, **{key: np.full_like(ok[key], value)})
        reason = validate_buffers(bad, ref)
        assert reason is not None and reason.startswith(key) and validate_update(bad, ref) == reason
    assert validate_buffers(dict(ok, **{"bn.running_var": np.full(2, 50.0, np.float32)}), ref,
                            BufferLimits(max_variance=10.0)) is not None
    # an absolute ceiling even when the global counter is already huge
    assert validate_buffers(dict(ok, **{"bn.num_batches_tracked": np.array(2**60, np.int64)}),
                            dict(ref, **{"bn.num_batches_tracked": np.array(2**60 - 1, np.int64)})) is not None


def test_relative_norm_bound():
    assert relative_norm_bound([1.0, 1.2, 6.5e5]) == pytest.approx(12.0)
    assert relative_norm_bound([1.0, 1.2, 6.5e5], factor=3.0) == pytest.approx(3.6)
    assert relative_norm_bound([1.0, 6.5e5]) is None  # two replies: no median to trust
    assert relative_norm_bound([1.0, 1.2, 6.5e5], factor=0.0) is None
    assert relative_norm_bound([0.0, 0.0, 3.0]) is None
    assert relative_norm_bound([1.0, 2.0, 3.0, 4.0]) == pytest.approx(25.0)


def test_settings_keys_and_defaults():
    s = ServerSettings.from_run_config({})
    assert (s.example_weights, s.max_example_ratio, s.max_examples, s.norm_bound_factor, s.max_update_norm) == (
        "capped", 3.0, 0, 10.0, 0.0)
    assert s.weighting == ExampleWeighting("capped", 3.0, 0)
    s = ServerSettings.from_run_config({"example-weights": "equal", "max-example-ratio": 2, "max-examples": 50,
                                        "norm-bound-factor": 0.0})
    assert s.weighting == ExampleWeighting("equal", 2.0, 50) and s.norm_bound_factor == 0.0
    from jras_core.config import ConfigError

    for bad in ({"example-weights": "trusted"}, {"max-example-ratio": 0.5}, {"max-examples": -1},
                {"norm-bound-factor": 0.5}, {"norm-bound-factor": -1.0}):
        with pytest.raises(ConfigError):
            ServerSettings.from_run_config(bad)
