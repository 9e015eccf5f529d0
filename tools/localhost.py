"""A real deployment on this machine: one SuperLink and one SuperNode per site YAML.

:class:`LocalDeployment` starts ``flower-superlink`` and ``flower-supernode`` processes
(plain HTTP on ``127.0.0.1``, no TLS: for trials and benchmarks on one machine; a real
federation uses TLS and node authentication, ``docs/DEPLOYMENT.md``), runs apps on them
with ``flwr run``, and stops every process it started by PID when it closes, also on
failure or Ctrl-C. Each site's ClientApp runs in a process of its own per message, as in
any Flower deployment, so this measures what a deployment costs, not a simulation.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from tools.processes import Started, free_port, stop_pid
from tools.simulate import RUN_CONFIG_FILE, SimulationError, _tool, _write_run_config, flower_env

log = logging.getLogger(__name__)

CONNECTION = "localhost-deploy"
"""Name of the connection in ``$FLWR_HOME/config.toml`` that ``flwr run`` uses."""


class LocalDeployment(Started):
    """A SuperLink and one SuperNode per site YAML on this machine (a context manager).

    Args:
        sites: one site YAML per SuperNode (its ``node_config["site-config"]``).
        work_dir: folder for the processes' logs and Flower's home (default: a temporary
            folder, removed on close).
        startup_timeout: seconds to wait for the SuperLink's port.
    """

    def __init__(self, sites: Sequence[str | Path], work_dir: str | Path | None = None, startup_timeout: float = 60.0):
        if not sites:
            raise ValueError("a local deployment needs at least one site YAML")
        self.sites = [Path(s).expanduser().resolve() for s in sites]
        for site in self.sites:
            if not site.is_file():
                raise FileNotFoundError(f"{site}: site YAML not found")
        self._own_work = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="jras-deploy-")) if work_dir is None else Path(work_dir).resolve()
        self.startup_timeout = startup_timeout
        self.port = 0
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the SuperLink, wait for its port, then start the SuperNodes."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        home = self.work_dir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = flower_env(home)
        link = self._spawn("superlink", [_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                         "--port", str(self.port)])
        self._wait_for_port(link)
        for i, site in enumerate(self.sites):
            self._spawn(f"supernode-{i}", [
                _tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--node-config", f'site-config="{site}"', "--port", str(free_port()),
            ])
        log.info("local deployment: SuperLink on 127.0.0.1:%d, %d SuperNodes; logs in %s",
                 self.port, len(self.sites), self.work_dir)

    def close(self) -> None:
        """Stop every process started here (SuperNodes first) by PID."""
        for proc in reversed(self._procs):
            stop_pid(proc.pid)
        self._procs.clear()
        for fh in self._logs:
            fh.close()
        self._logs.clear()
        if self._own_work:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    # ------------------------------------------------------------------ runs
    def run(self, project_dir: str | Path, run_config: Mapping[str, Any], run_dir: Path,
            timeout: float | None = None) -> Path:
        """``flwr run`` the app of ``project_dir`` on this deployment and wait for it.

        Args:
            run_config: run-config overrides; ``output-dir`` and ``run-name`` are set from
                ``run_dir`` and ``min-nodes`` defaults to the number of SuperNodes.
            run_dir: the run folder (checkpoint, TensorBoard logs; ``flwr-run.log``).
            timeout: seconds before the run is given up (:class:`SimulationError`).

        Returns:
            ``run_dir``.
        """
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        rc = dict(run_config)
        rc.setdefault("min-nodes", len(self.sites))
        rc.update({"output-dir": str(run_dir.parent), "run-name": run_dir.name})
        toml_path = _write_run_config(run_dir / RUN_CONFIG_FILE, rc)
        cmd = [_tool("flwr"), "run", str(Path(project_dir).resolve()), CONNECTION, "--run-config", str(toml_path), "--stream"]
        with open(run_dir / "flwr-run.log", "wb") as out:
            try:
                res = subprocess.run(cmd, cwd=self.work_dir, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise SimulationError(f"flwr run on the local deployment took more than {timeout:g} s; "
                                      f"see {run_dir / 'flwr-run.log'}") from None
        if res.returncode != 0:
            tail = (run_dir / "flwr-run.log").read_text(errors="replace")[-3000:]
            raise SimulationError(f"flwr run on the local deployment failed (exit {res.returncode}):\n{tail}")
        return run_dir

    # ------------------------------------------------------------------ helpers
    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        fh = open(self.work_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed in close()
        self._logs.append(fh)
        proc = subprocess.Popen(cmd, cwd=self.work_dir, env=self.env, stdout=fh, stderr=subprocess.STDOUT)
        self._procs.append(proc)
        return proc

    def _wait_for_port(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = (self.work_dir / "superlink.log").read_text(errors="replace")[-2000:]
                raise SimulationError(f"flower-superlink exited with {proc.returncode}:\n{tail}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise SimulationError(f"flower-superlink did not open port {self.port} within {self.startup_timeout:g} s")
