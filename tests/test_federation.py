"""The federation in one process: ClientApp replies, strategies driven through an
in-process Grid, FedBN / segmenter-only local state, checkpoints and resume, and
the privacy boundary (nothing but model entries and scalar metrics leaves a site)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from shared_data import SHARED

from client import site_runner
from federation import protocol
from jras_core.config import ConfigError, JRASConfig
from jras_core.models.jras import build_model

PROJECT = Path(__file__).resolve().parents[1]

TINY = (
    "preprocess.size=32; segmenter.channels=[4, 8]; retriever.channels=[4, 8]; "
    "retriever.embed_dim=8; train.batch_size=32; contrastive.steps_per_epoch=1"
)
IMAGE_SIZE = 32


def write_sites(folder: Path, vendors: str = "ABC", cases: int = 4) -> list[str]:
    """Tiny synthetic site YAMLs; returns their paths."""
    paths = []
    for i, v in enumerate(vendors):
        p = folder / f"site-{v}.yaml"
        p.write_text(yaml.safe_dump({
            "name": f"test-{v}", "vendor": v, "val_fraction": 0.25,
            "data": {"kind": "synthetic", "vendor": v, "cases": cases, "seed": 10 + i, "size": 64},
        }))
        paths.append(str(p))
    return paths


def base_run_config(tmp_path: Path, sites: list[str], **over) -> dict:
    cfg = {
        "num-server-rounds": 2, "strategy": "fedavg", "aggregate": "all", "proximal-mu": 0.1,
        "fraction-train": 1.0, "fraction-evaluate": 1.0, "min-nodes": len(sites),
        "output-dir": str(tmp_path / "out"), "run-name": "test", "resume": "",
        "method-config": "configs/demo.yaml", "method-overrides": TINY, "local-epochs": 1,
        "image-size": 0, "fusion": "", "retriever-mode": "", "seed": -1, "client-threads": 1,
        "sites": ",".join(sites),
    }
    cfg.update(over)
    return cfg


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sites")
    write_sites(folder)
    return folder


@pytest.fixture(autouse=True)
def _fresh_cache():
    site_runner.clear_cache()
    yield
    site_runner.clear_cache()


def tiny_method(run_config: dict) -> JRASConfig:
    return protocol.method_from_run_config(run_config)


def run_server(grid_cls, run_config: dict, run_id: int = 1):
    """Run the real ServerApp on an in-process grid of one node per site."""
    from flwr.app import Context, RecordDict

    from client.client_app import app as client_app
    from server.server_app import app as server_app

    n = len(protocol.site_list(run_config))
    grid = grid_cls(client_app, {100 + i: {"partition-id": i, "num-partitions": n} for i in range(n)}, run_config)
    ctx = Context(run_id=run_id, node_id=1, node_config={}, state=RecordDict(), run_config=dict(run_config))
    server_app(grid, ctx)
    return grid


def run_dir(run_config: dict) -> Path:
    return Path(run_config["output-dir"]) / run_config["run-name"]


# --------------------------------------------------------------------------- Flower-free helpers


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


def test_diagnostics_every_nth_and_last_round():
    from server.settings import ServerSettings
    from server.strategies import build_strategy

    def rounds_with(settings: dict, offset: int = 0) -> list[int]:
        strategy = build_strategy(ServerSettings.from_run_config(settings), round_offset=offset)
        return [r for r in range(offset + 1, offset + settings["num-server-rounds"] + 1) if strategy.wants_diagnostics(r)]

    assert rounds_with({"num-server-rounds": 12}) == [5, 10, 12]
    assert rounds_with({"num-server-rounds": 12, "diagnostics-every": 1}) == list(range(1, 13))
    assert rounds_with({"num-server-rounds": 12, "diagnostics-every": 0}) == [12]
    assert rounds_with({"num-server-rounds": 4, "diagnostics-every": 3}, offset=8) == [9, 12]


def test_checkpoint_roundtrip_and_atomic(tmp_path, monkeypatch):
    import os

    from server import checkpoint as ck

    arrays = {"seg.w": np.arange(6, dtype=np.float32).reshape(2, 3), "seg.n": np.array(3, np.int64)}
    path = ck.save_checkpoint(tmp_path, ck.Checkpoint(round=4, arrays=arrays, config={"a": 1},
                                                      run_config={"strategy": "fedavg"},
                                                      strategy_state={"m_t.seg.w": np.ones((2, 3), np.float32)}))
    assert path == tmp_path / ck.CHECKPOINT_FILE
    back = ck.load_checkpoint(tmp_path)
    assert back.round == 4 and ck.arrays_equal(back.arrays, arrays)
    assert back.arrays["seg.n"].dtype == np.int64
    assert back.run_config == {"strategy": "fedavg"} and back.config == {"a": 1}
    assert set(back.strategy_state) == {"m_t.seg.w"}

    # a crash while replacing leaves the previous checkpoint intact and no temporary file
    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, ck.Checkpoint(round=5, arrays={k: v + 1 for k, v in arrays.items()}))
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path).round == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINT_FILE]

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError):
        ck.load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(ConfigError):
        ck.load_checkpoint(tmp_path / "missing.pt")


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


def test_pki(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from tools import pki

    _, ca_crt = pki.create_ca(tmp_path / "ca")
    key, crt = pki.create_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1", "link.example"])
    ca = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "link.example"}
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert (key.stat().st_mode & 0o777) == 0o600
    priv_path, pub_path = pki.create_node_key(tmp_path / "nodes" / "site-a.key")
    priv = load_ssh_private_key(priv_path.read_bytes(), None)
    pub = load_ssh_public_key(pub_path.read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(priv.curve, ec.SECP384R1)
    assert priv.public_key().public_numbers() == pub.public_numbers()
    assert pub_path.read_text().startswith("ecdsa-sha2-nistp384 ")
    with pytest.raises(ValueError):
        pki.create_server_cert(tmp_path / "ca", tmp_path / "s2", [])


def test_site_yamls_parse():
    from jras_core.site import SiteConfig

    for name in "ABCD":
        cfg = SiteConfig.from_yaml(PROJECT / "sites" / f"synthetic-{name}.yaml")
        assert cfg.data.kind == "synthetic" and cfg.data.vendor == name
    manifest = SHARED / "mnms-sample" / "manifest.csv"
    if manifest.is_file():
        for name in "ABC":
            cfg = SiteConfig.from_yaml(PROJECT / "sites" / f"mnms-{name}.yaml")
            assert cfg.data.kind == "manifest" and cfg.data.vendor == name
    template = yaml.safe_load((PROJECT / "sites" / "template-hospital.yaml").read_text())
    assert {"name", "vendor", "data", "val_fraction"} <= set(template)


# --------------------------------------------------------------------------- ClientApp


def _train_message(method: JRASConfig, config: dict, keys: set[str] | None = None):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    state = build_model(method).state_dict()
    if keys is not None:
        state = {k: v for k, v in state.items() if k in keys}
    content = RecordDict({"arrays": ArrayRecord(state), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=5, message_type=MessageType.TRAIN)


def _context(run_config: dict, node_config: dict):
    from flwr.app import Context, RecordDict

    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_client_train_and_evaluate(tmp_path, site_dir, task_identity):
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from client.client_app import app as client_app

    rc = base_run_config(tmp_path, [str(site_dir / "site-A.yaml")])
    method = tiny_method(rc)
    ctx = _context(rc, {"site-config": str(site_dir / "site-B.yaml")})
    msg = _train_message(method, {"server-round": 1})
    reply = client_app(msg, ctx)
    assert not reply.has_error()
    assert len(reply.content.array_records) == 1 and len(reply.content.metric_records) == 1
    assert len(reply.content.config_records) == 0
    arrays = next(iter(reply.content.array_records.values()))
    metrics = next(iter(reply.content.metric_records.values()))
    assert set(arrays) == set(build_model(method).state_dict())
    assert metrics["num-examples"] > 0 and "seg_loss" in metrics and "retr_loss" in metrics
    assert metrics["client-time-s"] > 0 and metrics["client-cpu-s"] > 0
    trained = {k: v.numpy() for k, v in arrays.items()}
    sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    assert any(not np.array_equal(trained[k], sent[k]) for k in sent)

    ev = Message(content=RecordDict({"arrays": ArrayRecord(dict(arrays)), "config": ConfigRecord({"server-round": 1})}),
                 dst_node_id=5, message_type=MessageType.EVALUATE)
    reply = client_app(ev, ctx)
    assert not reply.has_error()
    assert len(reply.content.array_records) == 0 and len(reply.content.metric_records) == 1
    metrics = next(iter(reply.content.metric_records.values()))
    assert {"dice_mean", "dice_lv", "dice_myo", "dice_rv", "hd95_mean", "num-examples"} <= set(metrics)
    assert {"guide_dice", "dice_oracle", "dice_random", "dice_noguide"} <= set(metrics)  # no flag: all
    assert metrics["client-cpu-s"] > 0
    ev_plain = Message(content=RecordDict({"arrays": ArrayRecord(dict(arrays)),
                                           "config": ConfigRecord({"server-round": 1, "diagnostics": False})}),
                       dst_node_id=5, message_type=MessageType.EVALUATE)
    plain = next(iter(client_app(ev_plain, ctx).content.metric_records.values()))
    assert "dice_oracle" not in plain and "guide_dice" not in plain
    assert plain["dice_mean"] == pytest.approx(metrics["dice_mean"])

    # the site (data + bank) is cached per process: a second round does not reload it
    runner = site_runner.get_runner(site_dir / "site-B.yaml", method)
    assert runner.site._slices is not None
    reply = client_app(_train_message(method, {"server-round": 2}), ctx)
    assert site_runner.get_runner(site_dir / "site-B.yaml", method) is runner


def test_client_site_selection_errors(tmp_path, site_dir, task_identity):
    from client.client_app import app as client_app

    rc = base_run_config(tmp_path, [str(site_dir / "site-A.yaml")])
    msg = _train_message(tiny_method(rc), {"server-round": 1})
    # bad site input becomes an error reply carrying the text, not an exception
    reply = client_app(msg, _context(rc, {"partition-id": 3, "num-partitions": 4}))
    assert reply.has_error() and reply.error.reason.startswith("ConfigError: partition-id 3")
    reply = client_app(msg, _context(rc, {}))
    assert reply.has_error() and "site-config" in reply.error.reason


def test_fedprox_client_uses_proximal_term(tmp_path, site_dir, task_identity, monkeypatch):
    from client.client_app import app as client_app
    from jras_core.site import Site

    seen = {}
    original = Site.train

    def spy(self, model, epochs=None, proximal_reference=None, **kw):
        seen["mu"] = kw["method"].train.proximal_mu  # the round's method config, given with the call
        assert self.method.train.proximal_mu == 0.0  # the cached site's own config is left alone
        seen["ref"] = proximal_reference
        seen["model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original(self, model, epochs, proximal_reference, **kw)

    monkeypatch.setattr(Site, "train", spy)
    rc = base_run_config(tmp_path, [str(site_dir / "site-A.yaml")])
    method = tiny_method(rc)
    msg = _train_message(method, {"server-round": 1, "proximal-mu": 0.25})
    client_app(msg, _context(rc, {"site-config": str(site_dir / "site-A.yaml")}))
    assert seen["mu"] == 0.25
    params = dict(build_model(method).named_parameters())
    assert set(seen["ref"]) == set(params)
    for k, v in seen["ref"].items():
        assert torch.equal(v, seen["model"][k])
    runner = site_runner.get_runner(site_dir / "site-A.yaml", method)
    assert runner.site.method.train.proximal_mu == method.train.proximal_mu  # restored after the round


# --------------------------------------------------------------------------- strategies on an in-process grid


def _received_train(grid):
    from flwr.app import MessageType

    return [m for m in grid.received if m.metadata.message_type == MessageType.TRAIN and not m.has_error()]


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
    sent = {k: v.numpy() for k, v in first.content["arrays"].items()}
    assert all(np.array_equal(sent[k], ckpt.arrays[k]) for k in sent)
    assert load_checkpoint(run_dir(rc2)).round == 3

    bad = dict(rc2, **{"method-overrides": TINY.replace("segmenter.channels=[4, 8]", "segmenter.channels=[8, 16]"),
                       "run-name": "bad"})
    with pytest.raises(ConfigError, match="do not match|shape"):
        run_server(in_process_grid, bad)


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


@pytest.mark.slow
def test_aggregate_does_not_depend_on_the_order_replies_arrive(tmp_path, site_dir, in_process_grid):
    """The same seeded federation with its replies arriving in reverse order ends with the
    same weights, bit for bit (replies are summed in partition order)."""
    from server.checkpoint import load_checkpoint

    class ReversedGrid(in_process_grid):
        def send_and_receive(self, messages, *, timeout=None):
            return list(reversed(list(super().send_and_receive(messages, timeout=timeout))))

    sites = write_sites(tmp_path, "ABC", cases=4)
    weights = []
    for name, grid in (("in-order", in_process_grid), ("reversed", ReversedGrid)):
        rc = base_run_config(tmp_path, sites, **{"run-name": name, "diagnostics-every": 0})
        run_server(grid, rc)
        weights.append(load_checkpoint(run_dir(rc)).arrays)
    assert weights[0].keys() == weights[1].keys()
    assert all(np.array_equal(weights[0][k], weights[1][k]) for k in weights[0])


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


# --------------------------------------------------------------------------- privacy boundary


def test_replies_hold_only_model_entries_and_scalars(tmp_path, site_dir, in_process_grid):
    """Every reply a site sends: one ArrayRecord of model entries (train only) with the
    model's shapes, one MetricRecord of scalars; nothing shaped like an image, mask,
    embedding batch or bank."""
    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1})
    method = tiny_method(rc)
    state = build_model(method).state_dict()
    grid = run_server(in_process_grid, rc)
    banks = [site_runner.get_runner(p, method).site.bank for p in sites]
    bank_sizes = {len(b) for b in banks} | {len(site_runner.get_runner(p, method).site.val_set) for p in sites}
    assert grid.received
    for reply in grid.received:
        assert not reply.has_error()
        content = reply.content
        assert len(content.config_records) == 0
        assert len(content.metric_records) == 1
        for value in next(iter(content.metric_records.values())).values():
            assert isinstance(value, (int, float)) and not isinstance(value, bool)
        records = list(content.array_records.values())
        assert len(records) == (1 if reply.metadata.message_type == "train" else 0)
        for record in records:
            assert set(record) == set(state)
            for key, arr in record.items():
                a = arr.numpy()
                assert key.startswith(("seg.", "retr."))
                assert tuple(a.shape) == tuple(state[key].shape) and a.dtype == state[key].numpy().dtype
                assert a.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE)
                assert not (a.ndim >= 1 and a.shape[0] in bank_sizes and a.ndim == 2 and a.shape[1] == method.retriever.embed_dim)
        total = sum(int(np.prod(a.numpy().shape)) for r in records for a in r.values())
        if records:
            assert total == sum(v.numel() for v in state.values())


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_float16_transfer_halves_the_bytes(tmp_path, in_process_grid, strategy):
    from server.checkpoint import load_checkpoint
    from server.tracking import METRICS_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    stats = {}
    for dtype in ("float32", "float16"):
        rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "strategy": strategy,
                                                 "transfer-dtype": dtype, "run-name": dtype})
        grid = run_server(in_process_grid, rc)
        sent = grid.sent[0].content["arrays"]
        floats = [v.numpy().dtype for v in sent.values() if np.issubdtype(v.numpy().dtype, np.floating)]
        assert floats and set(floats) == {np.dtype(dtype)}
        payload = sum(v.numpy().nbytes for v in sent.values())
        assert grid.sent[0].content["config"]["transfer-dtype"] == dtype
        line = json.loads((run_dir(rc) / "tensorboard" / METRICS_FILE).read_text().splitlines()[0])
        stats[dtype] = {**line["round_stats"], "payload": payload}
        assert stats[dtype]["failures_train"] == 0 and stats[dtype].get("rejected_replies", 0) == 0
        ckpt = load_checkpoint(run_dir(rc))
        assert all(v.dtype == np.float32 for v in ckpt.arrays.values() if np.issubdtype(v.dtype, np.floating))
        assert all(np.isfinite(v).all() for v in ckpt.arrays.values())
    assert 0.49 < stats["float16"]["payload"] / stats["float32"]["payload"] < 0.52
    for key in ("bytes_sent", "bytes_received"):  # the tiny test model's per-array overhead is large
        assert 0.45 < stats["float16"][key] / stats["float32"][key] < 0.75
    with pytest.raises(ConfigError, match="transfer-dtype"):
        protocol.transfer_cast({"w": np.zeros(2, np.float32)}, "bfloat16")
    counters = protocol.transfer_cast({"n": np.array(3, np.int64), "w": np.ones(2, np.float32)}, "float16")
    assert counters["n"].dtype == np.int64 and counters["w"].dtype == np.float16


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
