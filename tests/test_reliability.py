"""Reliability of a federation: site failures, hanging sites, server restarts, interrupted
writes and bad input at the entry points (CLI and ClientApp).

Site failures, timeouts and resume run the real ServerApp and ClientApp in this process
(``in_process_grid``); a SuperNode killed in a real deployment is in ``test_deployment.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import yaml
from loader_cases import (
    HEADER,
    label_seven_case,
    nan_image_case,
    shape_mismatch_case,
    toy_pair,
    truncated_case,
    write_case,
    write_manifest,
)
from tiny_federation import (
    base_run_config,
    run_dir,
    run_server,
    server_logs,
    tiny_method,
    write_sites,
)

from client import site_runner
from federation import protocol
from jras_core.models.jras import build_model
from tools.cli import main as cli_main

PROJECT = Path(__file__).resolve().parents[1]

RESUME_ATOL = 0.0
"""Largest accepted |resumed - uninterrupted| of any global array (same seed): none, the
replies are summed in partition order whatever order Flower samples the sites in."""

pytestmark = pytest.mark.usefixtures("fresh_site_cache")


def rounds_of(rc: dict) -> list[dict]:
    return [json.loads(x) for x in (run_dir(rc) / "tensorboard" / "metrics.jsonl").read_text().splitlines()]


def server_messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("server")]


def fail_once(monkeypatch, site_name: str, server_round: int, exc: Exception) -> None:
    """Make ``site_name``'s local training raise ``exc`` in ``server_round`` only."""
    original = site_runner.SiteRunner.train

    def train(self, shared, local, policy):
        if self.site.name == site_name and policy.server_round == server_round:
            raise exc
        return original(self, shared, local, policy)

    monkeypatch.setattr(site_runner.SiteRunner, "train", train)


# --------------------------------------------------------------------------- site failures


def test_site_failure_mid_round_then_rejoin(tmp_path, in_process_grid, monkeypatch, caplog):
    """An exception in one site's training: the round aggregates the other two (min-nodes 2),
    the error text is logged and recorded; the site is back in round 2."""
    sites = write_sites(tmp_path, "ABC", cases=4)
    fail_once(monkeypatch, "test-C", 1, RuntimeError("GPU fell off the bus"))
    rc = base_run_config(tmp_path, sites, **{"min-nodes": 2, "fraction-evaluate": 0.0})
    initial = protocol.state_to_arrays(build_model(tiny_method(rc)).state_dict())
    saved = []
    import server.server_app as sa

    original = sa.save_checkpoint
    monkeypatch.setattr(sa, "save_checkpoint", lambda path, ckpt: saved.append(ckpt) or original(path, ckpt))
    with server_logs(caplog):
        run_server(in_process_grid, rc)

    r1, r2 = rounds_of(rc)
    assert r1["round_stats"]["num_sites_train"] == 2 and r1["round_stats"]["failures_train"] == 1
    assert r1["round_stats"]["timeouts_train"] == 0
    (failed,) = r1["errors"]
    assert r1["errors"][failed]["train"] == "RuntimeError: GPU fell off the bus"
    assert failed not in r1["sites"]
    assert any("round 1: train failed at" in m and "GPU fell off the bus" in m for m in server_messages(caplog))
    # aggregated without the failed site, and the site rejoined in round 2
    assert [c.round for c in saved] == [1, 2]
    assert any(not np.array_equal(saved[0].arrays[k], initial[k]) for k in initial)
    assert r2["round_stats"]["num_sites_train"] == 3 and r2["round_stats"]["failures_train"] == 0
    assert failed in r2["sites"] and r2["errors"] == {}


def test_too_few_sites_left_keeps_the_global_model(tmp_path, in_process_grid, monkeypatch):
    """With min-nodes 3 and one site failing, the aggregate is skipped: the global model
    (and so the checkpoint) stays as it was, the round still completes."""
    sites = write_sites(tmp_path, "ABC", cases=4)
    fail_once(monkeypatch, "test-B", 1, MemoryError("out of memory"))
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "fraction-evaluate": 0.0})
    initial = protocol.state_to_arrays(build_model(tiny_method(rc)).state_dict())
    run_server(in_process_grid, rc)
    from server.checkpoint import arrays_equal, load_checkpoint

    ckpt = load_checkpoint(run_dir(rc))
    assert ckpt.round == 1 and arrays_equal(ckpt.arrays, initial)
    (r1,) = rounds_of(rc)
    assert r1["round_stats"]["aggregate_skipped"] == 1 and r1["round_stats"]["failures_train"] == 1


# --------------------------------------------------------------------------- hanging sites


@pytest.mark.slow
def test_hanging_site_does_not_block_the_round(tmp_path, in_process_grid):
    """A site that never answers: after ``round-timeout`` the round goes on with the others
    (the grid returns what arrived, as Flower's grids do), the site is logged as timed out."""
    base = in_process_grid
    release = threading.Event()

    class ThreadedGrid(base):
        """Each message in its own thread; returns the replies that arrived within ``timeout``.
        The real ClientApp runs under a lock (the cached model is shared in this process);
        ``hang`` lists nodes whose ClientApp never answers."""

        hang: frozenset[int] = frozenset()
        lock = threading.Lock()

        def send_and_receive(self, messages: Iterable, *, timeout: float | None = None):
            done: list = []
            threads = []
            for msg in messages:
                self._next_id += 1
                msg.metadata.__dict__["_message_id"] = f"msg-{self._next_id}"
                self.sent.append(msg)

                def work(msg=msg):
                    if msg.metadata.dst_node_id in self.hang:
                        release.wait(60)
                        return
                    with self.lock:
                        reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
                    done.append(reply)

                t = threading.Thread(target=work, daemon=True)
                t.start()
                threads.append(t)
            end = time.monotonic() + (timeout if timeout is not None else 1e9)
            for t in threads:
                t.join(max(0.0, end - time.monotonic()))
            self.received.extend(done)
            return list(done)

    sites = write_sites(tmp_path, "ABC", cases=4)
    ThreadedGrid.hang = frozenset({102})
    timeout = 12
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "min-nodes": 2, "fraction-evaluate": 0.0,
                                             "round-timeout": timeout})
    t0 = time.monotonic()
    try:
        run_server(ThreadedGrid, rc)
    finally:
        release.set()
    assert time.monotonic() - t0 < timeout + 15
    (r1,) = rounds_of(rc)
    stats = r1["round_stats"]
    assert stats["timeouts_train"] == 1 and stats["num_sites_train"] == 2 and "aggregate_skipped" not in stats
    assert r1["errors"] == {"node-102": {"train": f"no reply within the round timeout ({timeout} s)"}}


# --------------------------------------------------------------------------- server restart


def _event_steps(folder: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: list[int] = []
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


def test_resume_matches_an_uninterrupted_run(tmp_path, in_process_grid, capsys):
    """FedAdam, same seed: 2 rounds in one go vs 1 round, a server restart, and 1 resumed
    round into the same run folder. Global arrays and FedAdam moments agree bit for bit
    (``RESUME_ATOL``); rounds, moments and the logs continue."""
    from server.checkpoint import load_checkpoint

    sites = write_sites(tmp_path, "AB", cases=4)
    common = {"strategy": "fedadam", "fraction-evaluate": 0.0, "seed": 7}
    whole = base_run_config(tmp_path, sites, **common, **{"run-name": "whole"})
    run_server(in_process_grid, whole)

    site_runner.clear_cache()  # a restarted server and fresh sites: nothing carried over in memory
    part = base_run_config(tmp_path, sites, **common, **{"run-name": "part", "num-server-rounds": 1})
    run_server(in_process_grid, part)
    first = load_checkpoint(run_dir(part))
    assert first.round == 1 and first.strategy_state
    site_runner.clear_cache()
    resumed = dict(part, resume=str(run_dir(part)))
    grid = run_server(in_process_grid, resumed, run_id=2)
    assert {m.content["config"]["server-round"] for m in grid.sent} == {2}

    a, b = load_checkpoint(run_dir(whole)), load_checkpoint(run_dir(part))
    assert a.round == b.round == 2
    assert set(a.arrays) == set(b.arrays) and set(a.strategy_state) == set(b.strategy_state)
    diff = max(float(np.max(np.abs(a.arrays[k].astype(np.float64) - b.arrays[k]))) for k in a.arrays)
    moments = max(float(np.max(np.abs(a.strategy_state[k] - b.strategy_state[k]))) for k in a.strategy_state)
    with capsys.disabled():
        print(f"\nresume check: max |resumed - uninterrupted| = {diff:.3g} (arrays), {moments:.3g} (FedAdam moments)")
    assert diff <= RESUME_ATOL and moments <= RESUME_ATOL
    # the moments were restored, not restarted: without them round 2 differs
    assert any(not np.array_equal(first.strategy_state[k], b.strategy_state[k]) for k in b.strategy_state)
    # round count and logs continue in the same folder
    assert [r["round"] for r in rounds_of(part)] == [1, 2]
    tb = run_dir(part) / "tensorboard"
    assert _event_steps(tb, "round/bytes_total") == [1, 2]


# --------------------------------------------------------------------------- interrupted writes

_SLOW_WRITER = r"""
import os, sys, time
import numpy as np
from server import checkpoint as ck

real_fdopen = os.fdopen

class HalfThenStall:
    def __init__(self, fh): self.fh = fh
    def __enter__(self): return self
    def __exit__(self, *exc): return self.fh.__exit__(*exc)
    def __getattr__(self, name): return getattr(self.fh, name)
    def write(self, data):
        self.fh.write(data[: len(data) // 2]); self.fh.flush(); os.fsync(self.fh.fileno())
        print("half-written", flush=True)
        time.sleep(120)
        return self.fh.write(data[len(data) // 2:])

os.fdopen = lambda fd, *a, **k: HalfThenStall(real_fdopen(fd, *a, **k))
arrays = {"seg.w": np.full((256, 256), 2.0, np.float32)}
ck.save_checkpoint(sys.argv[1], ck.Checkpoint(round=2, arrays=arrays))
"""


def test_checkpoint_survives_sigkill_mid_write(tmp_path):
    """A server killed (SIGKILL) half-way through writing a checkpoint: the previous one is
    intact; the next write succeeds and removes the interrupted temporary file."""
    from server import checkpoint as ck

    old = {"seg.w": np.ones((256, 256), np.float32)}
    ck.save_checkpoint(tmp_path, ck.Checkpoint(round=1, arrays=old))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path)], cwd=PROJECT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "half-written", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    leftovers = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size
    back = ck.load_checkpoint(tmp_path)
    assert back.round == 1 and ck.arrays_equal(back.arrays, old)
    ck.save_checkpoint(tmp_path, ck.Checkpoint(round=3, arrays=old))
    assert ck.load_checkpoint(tmp_path).round == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [ck.CHECKPOINT_FILE]


class _HalfWriteFails:
    """``os.fdopen`` replacement whose files write half of the data, then raise."""

    def __init__(self, real):
        self.real = real

    def __call__(self, fd, *args, **kwargs):
        fh = self.real(fd, *args, **kwargs)
        real_write = fh.write

        def write(data):
            real_write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        fh.write = write
        return fh


def test_bank_and_site_store_survive_a_failed_write(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous bank and the site's stored slices
    readable, with no temporary file left; a damaged store file stops the site with an error
    naming it (it cannot be told from a tampered one) instead of being used or silently
    replaced."""
    import torch

    from jras_core.retrieval.crypto import BankDecryptError, generate_key_file
    from jras_core.retrieval.store import BankStore
    from jras_core.site import Site, SiteConfig

    store = BankStore(tmp_path / "bank")
    store.save({"embeddings": np.ones((3, 4), np.float32)}, {"version": 1})
    site_yaml = Path(write_sites(tmp_path, "A", cases=4)[0])
    generate_key_file(tmp_path / "site.key")
    cfg = yaml.safe_load(site_yaml.read_text())
    cfg["cache_dir"] = str(tmp_path / "cache")
    cfg["key_file"] = str(tmp_path / "site.key")
    site_yaml.write_text(yaml.safe_dump(cfg))
    method = tiny_method(base_run_config(tmp_path, [str(site_yaml)]))
    site = Site(SiteConfig.from_yaml(site_yaml), method, root=tmp_path)
    slices = site.slices
    (sealed,) = (tmp_path / "cache").glob("*.slices-*.enc")
    before = sealed.read_bytes()
    digest = sealed.name.rsplit("-", 1)[1][: -len(".enc")]

    monkeypatch.setattr(os, "fdopen", _HalfWriteFails(os.fdopen))
    with pytest.raises(OSError, match="No space"):
        store.save({"embeddings": np.zeros((3, 4), np.float32)}, {"version": 2})
    with pytest.raises(OSError, match="No space"):
        site.store.save("slices", digest, *slices.to_arrays())
    monkeypatch.undo()
    arrays, meta = store.load()
    assert meta == {"version": 1} and np.array_equal(arrays["embeddings"], np.ones((3, 4)))
    assert sealed.read_bytes() == before
    assert not [p for p in tmp_path.rglob("*.tmp")]
    again = Site(SiteConfig.from_yaml(site_yaml), method, root=tmp_path).slices
    assert torch.equal(again.images, slices.images) and torch.equal(again.masks, slices.masks)

    sealed.write_bytes(before[: len(before) // 3])  # e.g. a file cut short outside the project's writers
    with pytest.raises(BankDecryptError, match=sealed.name):
        Site(SiteConfig.from_yaml(site_yaml), method, root=tmp_path).slices  # noqa: B018


# --------------------------------------------------------------------------- bad input


def _site(folder: Path, name: str, data: dict, **extra) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "vendor": "A", "val_fraction": 0.25, "data": data, **extra}))
    return path


def _manifest_site(tmp_path: Path, name: str, make) -> tuple[Path, str]:
    folder = tmp_path / name
    folder.mkdir()
    rows, culprit = make(folder)
    return _site(tmp_path, name, {"kind": "manifest", "path": str(write_manifest(folder, rows))}), culprit


def bad_sites(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """One site YAML per kind of bad input -> (YAML path, text the error must contain)."""
    from PIL import Image

    out: dict[str, tuple[Path, str]] = {}
    folder = tmp_path / "corrupt-nifti"
    folder.mkdir()
    case = write_case(folder, "junk", *toy_pair())
    (folder / case[1]).write_bytes(b"\x1f\x8b this is not a NIfTI volume")
    out["corrupt NIfTI"] = (_site(tmp_path, "corrupt-nifti", {"kind": "manifest", "path": str(write_manifest(folder, [case]))}),
                            "junk.nii.gz")
    out["truncated NIfTI"] = _manifest_site(tmp_path, "truncated", truncated_case)
    out["image/mask mismatch"] = _manifest_site(tmp_path, "mismatch", shape_mismatch_case)
    out["unexpected labels"] = _manifest_site(tmp_path, "labels", label_seven_case)
    out["NaN intensities"] = _manifest_site(tmp_path, "nan", nan_image_case)
    png = tmp_path / "png"
    png.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png / "scan.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(png / "scan_mask.png")
    (png / "scan.png").write_bytes((png / "scan.png").read_bytes()[:20])
    out["corrupt PNG"] = (_site(tmp_path, "png", {"kind": "folder", "path": str(png)}), "scan.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.csv").write_text(HEADER)
    out["empty site data"] = (_site(tmp_path, "empty", {"kind": "manifest", "path": str(empty / "manifest.csv")}),
                              "manifest.csv")
    out["missing site data"] = (_site(tmp_path, "missing", {"kind": "manifest", "path": str(tmp_path / "gone.csv")}),
                                "gone.csv")
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("name: x\ndata: [unclosed\n")
    out["malformed YAML"] = (malformed, "malformed.yaml")
    out["unknown key"] = (_site(tmp_path, "unknown", {"kind": "synthetic", "vendor": "A"}, colour="blue"), "colour")
    out["site config pointing nowhere"] = (tmp_path / "nowhere.yaml", "nowhere.yaml")
    return out


def test_bad_input_in_the_cli(tmp_path, capsys):
    """Every kind of bad site input: exit code 2 (not an exception: no traceback), one line naming the file."""
    for what, (site, culprit) in bad_sites(tmp_path).items():
        rc = cli_main(["train", "--site", str(site), "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert rc == 2, what
        assert err.startswith("jras: error: ") and len(err.splitlines()) == 1, (what, err)
        assert culprit in err, (what, err)
    method = tmp_path / "method.yaml"
    method.write_text("train:\n  epoch: 2\n")
    assert cli_main(["train", "--synthetic", "A", "--config", str(method), "--quiet"]) == 2
    assert "method.yaml" in capsys.readouterr().err


def test_bad_input_at_a_site_reaches_the_server(tmp_path, in_process_grid, caplog):
    """The same bad inputs behind ClientApps: each site replies with an error whose text
    names the file (never by its absolute path); the server logs and records it per site;
    the good sites' round goes on."""
    bad = bad_sites(tmp_path)
    good = write_sites(tmp_path, "AB", cases=4)
    sites = good + [str(p) for p, _ in bad.values()]
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "min-nodes": 2, "fraction-evaluate": 0.0})
    with server_logs(caplog):
        run_server(in_process_grid, rc)
    (r1,) = rounds_of(rc)
    assert r1["round_stats"]["num_sites_train"] == 2 and r1["round_stats"]["failures_train"] == len(bad)
    assert "aggregate_skipped" not in r1["round_stats"]
    for i, (what, (_, culprit)) in enumerate(bad.items()):
        text = r1["errors"][f"node-{100 + len(good) + i}"]["train"]
        assert text.startswith(("ConfigError: ", "DataError: ")) and culprit in text, (what, text)
        assert str(tmp_path) not in text, (what, text)  # the site's file names only, never its paths
        assert any(culprit in m for m in server_messages(caplog)), what
