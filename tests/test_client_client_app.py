"""Tests of client.client_app: the ClientApp's replies, its site and the privacy boundary."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_federation import base_run_config, run_server, tiny_method, write_sites

from client import site_runner
from jras_core.config import JRASConfig
from jras_core.models.jras import build_model

pytestmark = pytest.mark.usefixtures("fresh_site_cache")

IMAGE_SIZE = 32


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


def test_a_round_trains_at_its_place_in_the_run(tmp_path, site_dir, task_identity, monkeypatch):
    from client.client_app import app as client_app
    from jras_core.site import Site

    spans = []
    original = Site.train

    def spy(self, model, epochs=None, proximal_reference=None, **kw):
        spans.append((epochs, kw["span"]))
        return original(self, model, epochs, proximal_reference, **kw)

    monkeypatch.setattr(Site, "train", spy)
    rc = base_run_config(tmp_path, [str(site_dir / "site-A.yaml")])
    method = tiny_method(rc)
    ctx = _context(rc, {"site-config": str(site_dir / "site-A.yaml")})
    client_app(_train_message(method, {"server-round": 3, "last-round": 5}), ctx)
    client_app(_train_message(method, {"server-round": 3}), ctx)  # a server that does not say
    (epochs, span), (_, unknown) = spans
    assert epochs == method.train.epochs and (span.done, span.total) == (2 * epochs, 5 * epochs)
    assert unknown is None


def test_client_site_selection_errors(tmp_path, site_dir, task_identity):
    from client.client_app import app as client_app

    rc = base_run_config(tmp_path, [str(site_dir / "site-A.yaml")])
    msg = _train_message(tiny_method(rc), {"server-round": 1})
    # bad site input becomes an error reply carrying the text, not an exception
    reply = client_app(msg, _context(rc, {"partition-id": 3, "num-partitions": 4}))
    assert reply.has_error() and reply.error.reason.startswith("ConfigError: partition-id 3")
    reply = client_app(msg, _context(rc, {}))
    assert reply.has_error() and "site-config" in reply.error.reason


def _manifest_site(folder, data, name="m", extra=""):
    """A site YAML in ``folder`` over a manifest in ``data`` of two toy cases, the second with
    mask label 7 (a DataError naming that mask)."""
    from loader_cases import toy_pair, write_case, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    image, mask = toy_pair()
    bad = mask.copy()
    bad[3, 3, 1] = 7
    manifest = write_manifest(data, [write_case(data, "c0", image, mask), write_case(data, "c1", image, bad)])
    site = folder / f"{name}.yaml"
    site.write_text(f"name: {name}\n{extra}data: {{kind: manifest, path: {manifest}}}\n")
    return site


def test_error_replies_name_files_relative_to_the_site(tmp_path, site_dir, task_identity):
    """What an error reply carries to the coordinator (its metrics.jsonl) holds no absolute
    path: files under the site's folder are named relative to it, others by their name."""
    import re

    from client.client_app import FAILURE_CODE, INPUT_ERROR_CODE
    from client.client_app import app as client_app
    from jras_core.retrieval.crypto import generate_key_file

    rc = base_run_config(tmp_path, [str(site_dir / "site-A.yaml")])
    msg = _train_message(tiny_method(rc), {"server-round": 1})
    absolute = re.compile(r"(^|[\s'\"(])/\w")
    inside = _manifest_site(tmp_path / "site", tmp_path / "site" / "data")
    outside = _manifest_site(tmp_path / "other", tmp_path / "elsewhere" / "data")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "cache").write_text("a file where the cache folder should be")
    blocked = tmp_path / "blocked" / "b.yaml"
    generate_key_file(tmp_path / "blocked" / "b.key")  # a keyed site writes its store to cache_dir
    blocked.write_text("name: b\ncache_dir: cache\nkey_file: b.key\n"
                       "data: {kind: synthetic, vendor: A, cases: 2, size: 32}\n")
    cases = [
        (inside, INPUT_ERROR_CODE, "DataError: site m: data/c1_gt.nii.gz: mask labels [7] outside"),
        (outside, INPUT_ERROR_CODE, "DataError: site m: .../c1_gt.nii.gz: mask labels [7] outside"),
        (blocked, FAILURE_CODE, "FileExistsError:"),
    ]
    for yaml_path, code, start in cases:
        site_runner.clear_cache()
        reply = client_app(msg, _context(rc, {"site-config": str(yaml_path)}))
        assert reply.has_error() and reply.error.code == code
        assert reply.error.reason.startswith(start), reply.error.reason
        assert str(tmp_path) not in reply.error.reason and not absolute.search(reply.error.reason), reply.error.reason
    site_runner.clear_cache()


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


@pytest.mark.slow
def test_personalise_keeps_each_site_model_at_the_site_and_sends_scalars(tmp_path, in_process_grid):
    """Run config ``personalise``: at the final round's evaluation each site adapts the final
    global model to its own cases and saves it beside its YAML; only scalars go back, and the
    global model (the server's checkpoint) is not the sites' adapted models."""
    from federation.protocol import FINAL_ROUND, arrays_to_state
    from jras_core.checkpoint import load_model
    from server.checkpoint import load_checkpoint
    from tiny_federation import run_dir

    sites = write_sites(tmp_path, "AB", cases=4)
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 2, "personalise": True,
                                             "method-overrides": TINY_ADAPT})
    grid = run_server(in_process_grid, rc)
    evaluations = [m for m in grid.sent if m.metadata.message_type == "evaluate"]
    finals = [bool(next(iter(m.content.config_records.values()))[FINAL_ROUND]) for m in evaluations]
    assert finals and all(finals[-2:]) and not any(finals[:-2])  # only the last round's evaluation is final
    replies = [r for r in grid.received if r.metadata.message_type == "evaluate" and not r.has_error()]
    last = [next(iter(r.content.metric_records.values())) for r in replies[-2:]]
    global_state = arrays_to_state(load_checkpoint(run_dir(rc) / "checkpoint.pt").arrays)
    for name, metrics in zip(("test-A", "test-B"), sorted(last, key=lambda m: m["partition-id"])):
        assert {"personal-epochs-run", "personal-best-epoch", "personal-val-dice-best", "personal-dice-mean"} <= set(metrics)
        assert metrics["personal-val-dice-best"] >= metrics["personal-val-dice-start"]
        path = tmp_path / f"{name}-adapted.pt"
        model, cfg, extra = load_model(path)
        assert extra["adaptation"]["site"] == name and cfg.adapt.norm_stats is False
        assert extra["adaptation"]["epochs_run"] == metrics["personal-epochs-run"]
        assert set(model.state_dict()) == set(global_state)
        # AdaBN at least: the site's statistics differ from the global model's
        assert any(not torch.equal(v, global_state[k]) for k, v in model.state_dict().items() if "running" in k)
    for reply in replies:
        assert len(reply.content.array_records) == 0
    # the earlier rounds' evaluations carry no personalisation
    assert all("personal-dice-mean" not in next(iter(r.content.metric_records.values())) for r in replies[:-2])


TINY_ADAPT = ("preprocess.size=32; segmenter.channels=[4, 8]; retriever.channels=[4, 8]; retriever.embed_dim=8; "
              "train.batch_size=32; contrastive.steps_per_epoch=1; adapt.epochs=2; adapt.patience=1")
