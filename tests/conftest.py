"""Shared test setup: Flower runs offline, Messages can be built outside a runtime,
a Grid that delivers messages to a ClientApp in this process, and the fixtures that tests
of several modules share (tiny slice sets and site YAMLs, the real-data samples, a clean
site cache and environment)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import jras_core  # noqa: F401 - first: it picks OpenBLAS's kernels before FAISS loads
from tools.processes import child_pids, free_port, pids_with_args, stop_pid  # noqa: F401 - re-exported for tests

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REQUIRE_SHARED_DATA = "JRAS_REQUIRE_SHARED_DATA"
"""Environment variable: ``1`` makes a missing real-data fixture stop the run (CI sets it)."""


def pytest_configure(config: pytest.Config) -> None:
    """Under ``JRAS_REQUIRE_SHARED_DATA=1``, refuse to start without the real-data fixtures
    instead of letting the tests that read them skip."""
    if os.environ.get(REQUIRE_SHARED_DATA) != "1":
        return
    from shared_data import SHARED, missing_fixtures

    missing = missing_fixtures()
    if missing:
        raise pytest.UsageError(f"{REQUIRE_SHARED_DATA}=1 but the real data fixtures {', '.join(missing)} are "
                                f"missing under {SHARED} (each needs its manifest.csv)")


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """Code under test may set torch's thread count (a ClientApp does); restore it, so that
    a test's numbers do not depend on which tests ran before it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def processes(tmp_path):
    """Start background processes (``start(name, argv, **popen_kwargs)``); every one of them
    and its descendants is stopped by PID at teardown. Output goes to ``tmp_path/<name>.log``."""
    started: list[tuple[subprocess.Popen, Any]] = []

    def start(name: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - open for the process lifetime
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        proc.log_path = tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        started.append((proc, log))
        return proc

    yield start
    for proc, log in reversed(started):
        stop_pid(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        log.close()


@pytest.fixture
def nginx() -> str:
    """The nginx executable; the test skips without it, except under ``JRAS_REQUIRE_NGINX=1``
    (``.ci/run`` installs nginx and sets it), where it fails."""
    from tools.proxy import ProxyError, nginx_binary

    try:
        return nginx_binary()
    except ProxyError as exc:
        if os.environ.get("JRAS_REQUIRE_NGINX") == "1":
            raise
        pytest.skip(f"{exc} (.ci/run installs it)")


@pytest.fixture
def flwr_home(tmp_path, monkeypatch):
    """A private ``FLWR_HOME`` for the test."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture
def task_identity():
    """Set Flower's task identity so that Messages can be created outside a runtime."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def in_process_grid(task_identity) -> Callable[..., Any]:
    """Factory of a Grid whose ``send_and_receive`` calls a ClientApp in this process.

    ``make(client_app, node_configs, run_config)``: one node per entry of
    ``node_configs`` (``{node_id: node_config}``), each with its own persistent
    ``Context``; a ClientApp exception becomes an error reply, as in a real runtime.
    The grid records every message sent and received in ``.sent`` / ``.received``.
    """
    from flwr.app import Context, Error, Message, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.run import Run

    class InProcessGrid(Grid):
        def __init__(self, client_app: Any, node_configs: Mapping[int, Mapping[str, Any]], run_config: Mapping[str, Any]):
            self.client_app = client_app
            self.contexts = {
                nid: Context(run_id=1, node_id=nid, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config))
                for nid, cfg in node_configs.items()
            }
            self._run = Run.create_empty(1)
            self.sent: list[Message] = []
            self.received: list[Message] = []
            self._next_id = 0

        def set_run(self, run: Run) -> None:
            self._run = run

        @property
        def run(self) -> Run:
            return self._run

        def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
            return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

        def get_node_ids(self) -> Iterable[int]:
            return list(self.contexts)

        def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
            raise NotImplementedError("use send_and_receive")

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            raise NotImplementedError("use send_and_receive")

        def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
            replies = []
            for msg in messages:
                self._next_id += 1
                msg.metadata.__dict__["_message_id"] = f"msg-{self._next_id}"
                self.sent.append(msg)
                ctx = self.contexts[msg.metadata.dst_node_id]
                try:
                    reply = self.client_app(msg, ctx)
                except Exception as exc:  # noqa: BLE001 - the runtime turns ClientApp failures into error replies
                    reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
                self.received.append(reply)
                replies.append(reply)
            return replies

    return InProcessGrid


# --------------------------------------------------------------------------- shared by several test modules


@pytest.fixture
def fresh_site_cache():
    """Clear the process's cache of sites (data, bank, model) before and after the test."""
    from client import site_runner

    site_runner.clear_cache()
    yield
    site_runner.clear_cache()


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory) -> Path:
    """A folder of tiny synthetic site YAMLs (``site-A.yaml`` ... ``site-C.yaml``), once per module."""
    from tiny_federation import write_sites

    folder = tmp_path_factory.mktemp("sites")
    write_sites(folder)
    return folder


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[str]:
    """Tiny synthetic site YAMLs of vendors A, B and C (4 cases each), once per module, with
    the site cache cleared before and after the module's tests."""
    from tiny_federation import write_sites

    from client import site_runner

    site_runner.clear_cache()
    yield write_sites(tmp_path_factory.mktemp("robust-sites"), "ABC", cases=4)
    site_runner.clear_cache()


@pytest.fixture(scope="module")
def slices():
    """Slices of four synthetic vendor-A cases, preprocessed for :data:`tiny_methods.TINY`."""
    from tiny_methods import TINY

    from jras_core.config import JRASConfig
    from jras_core.data.slices import build_slice_set
    from jras_core.data.synthetic import generate_volumes

    cfg = JRASConfig().with_overrides(TINY)
    return build_slice_set(generate_volumes("A", 4, seed=2, size=32), cfg.preprocess, cfg.labels.num_classes)


@pytest.fixture(scope="module")
def tiny_data():
    """Slices of eight synthetic vendor-A cases, preprocessed for :data:`tiny_methods.TINY16`,
    split by case: ``(train, val)``."""
    from tiny_methods import TINY16

    from jras_core.config import JRASConfig
    from jras_core.data.slices import build_slice_set
    from jras_core.data.synthetic import generate_volumes

    cfg = JRASConfig().with_overrides(TINY16)
    vols = generate_volumes("A", num_cases=8, seed=3, size=64)
    slices = build_slice_set(vols, cfg.preprocess, cfg.labels.num_classes)
    return slices.split_by_case(0.25, seed=0)


@pytest.fixture(scope="module")
def mnms_volumes():
    """The volumes of the real M&Ms sample (skips without it)."""
    from loader_cases import MNMS

    from jras_core.data import load_manifest

    if not (MNMS / "manifest.csv").is_file():
        pytest.skip(f"M&Ms fixture not found at {MNMS}")
    return load_manifest(MNMS / "manifest.csv", num_classes=4)


@pytest.fixture(scope="module")
def mnms_slices(mnms_volumes):
    """The M&Ms sample's slices at 64 px."""
    from jras_core.config import PreprocessConfig
    from jras_core.data import build_slice_set

    return build_slice_set(mnms_volumes, PreprocessConfig(size=64), num_classes=4)


@pytest.fixture
def acdc_root(tmp_path):
    """Two patients in the official ACDC layout (ED and ES frames with ``Info.cfg``)."""
    from loader_cases import save_nifti, toy_pair

    root = tmp_path / "ACDC" / "training"
    for pid, (ed, es) in {"patient001": (1, 3), "patient002": (1, 2)}.items():
        folder = root / pid
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text(
            f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 4\n"
        )
        for frame in (ed, es):
            image, mask = toy_pair()
            mask[:] = 0
            mask[0:2] = 1  # ACDC RV
            mask[4:6] = 3  # ACDC LV
            save_nifti(folder / f"{pid}_frame{frame:02d}.nii.gz", image + frame)
            save_nifti(folder / f"{pid}_frame{frame:02d}_gt.nii.gz", mask)
    return tmp_path / "ACDC"


@pytest.fixture
def no_bank_key_env(monkeypatch):
    """No bank key in the environment (``JRAS_BANK_KEY``): banks are plaintext unless a test
    gives a key."""
    from jras_core.retrieval.crypto import ENV_VAR

    monkeypatch.delenv(ENV_VAR, raising=False)
