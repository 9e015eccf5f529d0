"""A federation on this machine through Flower's Simulation Engine, as one function call.

:func:`run_simulation` runs ``flwr run <project> <connection> --run-config FILE
--federation-config "num-supernodes=N client-resources-num-cpus=C" --stream`` in a
subprocess, offline, against a managed local SuperLink (a ``:local:`` connection in a
private ``FLWR_HOME``, on free ports; Ray on loopback, :data:`RAY_LOOPBACK_ENV`). ``flwr run``
leaves that SuperLink running and
no ``flwr`` command stops it, so it is always stopped here, by PID, with its
descendants, whether the run succeeds, fails or is interrupted.

:func:`site_table` / :func:`format_site_table` read a run folder's ``metrics.jsonl``
and give the last round's per-site Dice (per class, mean), HD95 and retrieval
diagnostics.

No Flower or torch import here: Flower runs in the subprocess.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from jras_core.files import resolve_path
from tools.processes import free_port, pids_with_args, stop_pid

log = logging.getLogger(__name__)

OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # else the SuperLink runs `uv sync` per run
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
}
"""Environment of every Flower process started here: nothing goes to the network."""

RAY_LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Environment that keeps the Simulation Engine's Ray on loopback. Ray takes the host's
address as its node address on Linux, and its GCS server, raylet, workers and agents then
listen on the host's address (or on all of them); with multi-node clusters switched off it
uses 127.0.0.1 and every one of them listens there only. (Flower's backend ``init-args``
carry only ``num_cpus``, ``num_gpus``, ``logging_level`` and ``log_to_driver``, so the
address cannot be passed to ``ray.init`` through it.)"""

CONNECTION = "jras-local"
"""Name of the ``:local:`` connection written to ``$FLWR_HOME/config.toml``."""

RUN_CONFIG_FILE = "run-config.toml"
"""Copy of the run configuration kept in the run folder (``flwr run ... --run-config`` reads it)."""

LOG_FILE = "flwr-run.log"
"""Output of ``flwr run`` (the streamed Flower log), kept in the run folder."""

METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS = ("guide_dice", "dice_oracle", "dice_random", "dice_noguide")
_NOT_CLASSES = {"dice_mean", *DIAGNOSTICS}
_STARTED = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt): .+")
_FAILED_STATUS = ("fail", "stop", "error")


class SimulationError(RuntimeError):
    """``flwr run`` failed, timed out, or the run did not finish successfully."""


# --------------------------------------------------------------------------- helpers



def _tool(name: str) -> str:
    """An executable of this environment (next to ``sys.executable``), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise SimulationError(f"`{name}` not found next to {sys.executable} nor on PATH: install flwr[simulation]")
    return found


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of the Flower processes started here: this one's, offline
    (:data:`OFFLINE_ENV`), with ``FLWR_HOME``, this environment's executables first on
    ``PATH`` and unbuffered Python output."""
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def _write_connection(flwr_home: Path) -> None:
    """Make sure ``$FLWR_HOME/config.toml`` has the ``:local:`` connection :data:`CONNECTION`."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    cfg = flwr_home / "config.toml"
    section = f'[superlink.{CONNECTION}]\naddress = ":local:"\n'
    if not cfg.exists():
        cfg.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n{section}')
    elif f"[superlink.{CONNECTION}]" not in cfg.read_text():
        with open(cfg, "a", encoding="utf-8") as fh:
            fh.write(f"\n{section}")


def _write_run_config(path: Path, run_config: Mapping[str, Any]) -> Path:
    import tomli_w  # a dependency of flwr

    bad = {k: v for k, v in run_config.items() if not isinstance(v, (str, int, float, bool))}
    if bad:
        raise ValueError(f"run config values must be str, int, float or bool: {bad}")
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


def _plain(text: str) -> str:
    return _ANSI.sub("", text)


def _tail(lines: Sequence[str], n: int = 60) -> str:
    """The last ``n`` lines of output, without colour codes, led by the last exception line."""
    tail = _plain("".join(list(lines)[-n:]))
    causes = [ln.strip() for ln in _plain("".join(lines)).splitlines() if _EXCEPTION.match(ln.strip())]
    return (f"cause: {causes[-1]}\n" if causes else "") + tail


def _file_tail(path: Path, n: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


def _run_status(flwr: str, run_id: int, env: Mapping[str, str], cwd: Path) -> str:
    """The run's status string from ``flwr ls --run-id N --format json`` ('' if unknown)."""
    try:
        res = subprocess.run(
            [flwr, "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
            env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
        )
        data = json.loads(res.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        return ""
    runs = data.get("runs", []) if isinstance(data, dict) else []
    for run in runs:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", ""))
    return ""


# --------------------------------------------------------------------------- running

OVERSUBSCRIBE = 2
"""At most this many simulated sites run at once per free CPU slot (see :func:`ray_cpus`)."""


def phase_units(num_sites: int, workers: int, slots: int) -> float:
    """Length of a phase of ``num_sites`` equal sites, in one site's time, when Ray's pool
    holds ``workers`` workers and the machine ``slots`` free slots: the sites go in waves of
    ``workers``, and a wave of ``m`` sites shares the slots (``max(1, m / slots)``)."""
    units, left = 0.0, num_sites
    while left > 0:
        wave = min(left, workers)
        units += max(1.0, wave / slots)
        left -= wave
    return units


def ray_cpus(num_sites: int, client_threads: int = 1, cores: int | None = None) -> tuple[int | None, int]:
    """How many CPUs to give Ray, and how many each simulated ClientApp reserves, so that
    a round's sites keep the machine's cores busy.

    Ray's actor pool holds ``Ray CPUs // CPUs per ClientApp`` workers and a round's
    messages queue for them. When the sites do not divide evenly into the free slots
    (``cores // client_threads``), Ray's count of the real cores leaves cores idle at the
    end of each phase: 3 sites on 2 cores train two at a time and then the third alone, 2
    site-times for 1.5 site-times of work. Giving Ray more logical CPUs than cores starts
    more workers, up to :data:`OVERSUBSCRIBE` per slot, and the operating system shares
    the cores among them. Sites that share a core compete for its caches, so this is done
    only where it shortens a phase (:func:`phase_units`), with the fewest workers that do:
    4 sites on 2 cores keep 2 workers. (Flower's ``client-resources-num-cpus`` is a whole
    number, so the pool is sized through Ray's ``init-args-num-cpus``.)

    Args:
        num_sites: simulated SuperNodes.
        client_threads: torch threads of each ClientApp (run config ``client-threads``).
        cores: CPUs of this machine (default: those this process may use).

    Returns:
        ``(ray_cpus, cpus_per_client)``: ``(None, client_threads)`` when Ray's own count
        of the cores is best, else ``(workers * client_threads, client_threads)``.
    """
    if num_sites < 1 or client_threads < 1:
        raise ValueError(f"ray_cpus needs num_sites >= 1 and client_threads >= 1, got {num_sites}, {client_threads}")
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    native = cores // client_threads  # Ray's own pool (0 when a site wants more threads than there are cores)
    slots = max(1, native)
    candidates = range(slots, max(slots, min(num_sites, OVERSUBSCRIBE * slots)) + 1)
    workers = min(candidates, key=lambda w: (phase_units(num_sites, w, slots), w))
    if workers == native:
        return None, client_threads
    return workers * client_threads, client_threads


def gpu_share(num_sites: int, device: str = "auto") -> float:
    """The share of a GPU each of ``num_sites`` simulated sites reserves so that they all fit
    on the machine's GPUs at once (Flower's ``client-resources-num-gpus``): 0 where the sites
    compute on the CPU (``device`` ``cpu``, or no CUDA device)."""
    import torch

    if (device or "auto").startswith("cpu") or not torch.cuda.is_available():
        return 0.0
    gpus = torch.cuda.device_count()
    return min(1.0, round(gpus / max(1, num_sites), 4))


def run_simulation(
    project_dir: str | Path,
    sites: Sequence[str | Path],
    run_config: Mapping[str, Any] | None = None,
    num_supernodes: int | None = None,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
    share_cores: bool = False,
    out_dir: str | Path = "runs/federation",
    run_name: str = "sim",
    flwr_home: str | Path | None = None,
    stream: bool = True,
    timeout: float | None = None,
    fresh: bool = False,
    warm_up: bool = True,
) -> Path:
    """Run a simulated federation of ``sites`` and return its run folder.

    Args:
        project_dir: the Flower app (folder with ``pyproject.toml``).
        sites: one site YAML per simulated SuperNode, in partition order (relative
            paths against the current folder, then ``project_dir``).
        run_config: run-config overrides (keys of ``[tool.flwr.app.config]``), e.g.
            ``{"num-server-rounds": 3, "image-size": 64}``. ``sites``, ``output-dir``
            and ``run-name`` are set from the arguments; ``min-nodes`` defaults to
            the number of SuperNodes, so that every site takes part in every round.
        num_supernodes: simulated SuperNodes (default: one per site; at most one per site).
        cpus_per_client: CPUs Ray reserves per ClientApp, out of the machine's cores (a
            whole number: Flower's ``client-resources-num-cpus``).
        gpus_per_client: the share of a GPU Ray reserves per ClientApp (Flower's
            ``client-resources-num-gpus``; fractional, e.g. 0.25 lets four simulated sites share
            one GPU). 0: the ClientApps see no GPU and compute on the CPU.
        share_cores: size Ray's pool by :func:`ray_cpus` instead (the run config's
            ``client-threads`` per site; more workers than cores where that shortens a
            phase). Measured on 2 cores with 3 sites at 128 px: the rounds' idle tails go,
            but sites that share a core use 15-27% more CPU time, and rounds were not
            reliably shorter (``docs/results/cost.md``).
        out_dir: folder of run folders.
        run_name: this run's folder under ``out_dir``.
        flwr_home: Flower's home for this run (default: a temporary folder, removed after).
        stream: echo Flower's log to stdout while the run goes.
        timeout: seconds before the run is stopped and :class:`SimulationError` raised.
        fresh: first remove a previous run's checkpoint, TensorBoard folder and logs
            from ``out_dir/run_name`` (else new rounds are appended to its logs).
        warm_up: before round 1 the server has every site load its data and bank and its
            worker import the ClientApp (run-config ``warm-up``), so that Ray's start and the
            first-use costs are not part of round 1; the warm-up's wall time is written to
            ``tensorboard/startup.json``.

    Returns:
        ``out_dir/run_name``: ``checkpoint.pt``, ``tensorboard/`` (events,
        ``metrics.jsonl`` and, after a warm-up, ``startup.json``), ``run-config.toml`` and
        ``flwr-run.log``.

    Raises:
        SimulationError: ``flwr run`` failed or timed out, or the run did not finish
            successfully; the message holds the tail of the output.
        ValueError: bad arguments.
    """
    project = Path(project_dir).resolve()
    if not (project / "pyproject.toml").is_file():
        raise ValueError(f"{project} is not a Flower app (no pyproject.toml)")
    if not sites:
        raise ValueError("run_simulation needs at least one site YAML")
    site_paths = [resolve_path(s, [Path.cwd(), project]) for s in sites]
    missing = [str(p) for p in site_paths if not p.is_file()]
    if missing:
        raise ValueError(f"site YAML not found: {', '.join(missing)}")
    n = int(num_supernodes or len(site_paths))
    if not 1 <= n <= len(site_paths):
        raise ValueError(f"num_supernodes must be between 1 and the number of sites ({len(site_paths)}), got {n}")
    ray_total: int | None = None
    if share_cores:
        ray_total, cpus_per_client = ray_cpus(n, int((run_config or {}).get("client-threads", 1)))
    elif int(cpus_per_client) != cpus_per_client or cpus_per_client < 1:
        raise ValueError(f"cpus_per_client must be a whole number >= 1 (Flower's client-resources-num-cpus), "
                         f"got {cpus_per_client}")
    if gpus_per_client < 0 or gpus_per_client > 1 and gpus_per_client != int(gpus_per_client):
        raise ValueError(f"gpus_per_client must be a share of one GPU (0 to 1) or a whole number, got {gpus_per_client}")
    if any("," in str(p) for p in site_paths):
        raise ValueError("site YAML paths must not contain commas")

    run_dir = Path(out_dir).expanduser().resolve() / run_name
    previous = [run_dir / name for name in ("checkpoint.pt", "tensorboard", RUN_CONFIG_FILE, LOG_FILE)]
    if fresh:
        for p in previous:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    elif any(p.exists() for p in previous):
        log.warning("%s holds a previous run: its checkpoint is replaced and its logs are appended to", run_dir)
    rc: dict[str, Any] = dict(run_config or {})
    rc.setdefault("warm-up", warm_up)
    rc.setdefault("min-nodes", n)
    rc.update({"sites": ",".join(str(p) for p in site_paths), "output-dir": str(run_dir.parent), "run-name": run_name})

    work = Path(tempfile.mkdtemp(prefix="jras-sim-"))
    home = Path(flwr_home).expanduser().resolve() if flwr_home else work / "flwr-home"
    _write_connection(home)
    run_dir.mkdir(parents=True, exist_ok=True)
    toml_path = _write_run_config(run_dir / RUN_CONFIG_FILE, rc)
    control_port, http_port = free_port(), free_port()
    env = flower_env(home)
    env.update({
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
    })
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # CPU only: silences Ray's FutureWarning
    env.update(RAY_LOOPBACK_ENV)
    flwr = _tool("flwr")
    cmd = [
        flwr, "run", str(project), CONNECTION,
        "--run-config", str(toml_path),
        "--federation-config", f"num-supernodes={n} client-resources-num-cpus={int(cpus_per_client)}"
        + (f" init-args-num-cpus={ray_total}" if ray_total else "")
        + (f" client-resources-num-gpus={float(gpus_per_client)}" if gpus_per_client else ""),
        "--stream",
    ]
    log.info("running %s", " ".join(cmd))
    with _sigterm_as_interrupt():
        return _run_and_stop(cmd, work, env, flwr, toml_path, run_dir, home, control_port, timeout, stream)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a run goes, SIGTERM raises KeyboardInterrupt (in the main thread), so that a
    ``kill`` of the calling process still stops the local SuperLink it started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_and_stop(cmd: list[str], work: Path, env: dict[str, str], flwr: str, toml_path: Path, run_dir: Path,
                  home: Path, control_port: int, timeout: float | None, stream: bool) -> Path:
    """Run ``flwr run`` and wait for it; always stop the local SuperLink of ``control_port``."""
    lines: list[str] = []
    tty = sys.stdout.isatty()
    proc: subprocess.Popen[str] | None = None
    superlink_log = home / "local-superlink" / "superlink.log"
    try:
        proc = subprocess.Popen(
            cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )

        def pump() -> None:
            assert proc is not None and proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if stream:
                    sys.stdout.write(line if tty else _plain(line))
                    sys.stdout.flush()

        reader = threading.Thread(target=pump, name="flwr-run-output", daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SimulationError(
                f"flwr run did not finish within {timeout:g} s; last output:\n{_tail(lines)}"
            ) from None
        reader.join(timeout=10)
        if code != 0:
            raise SimulationError(f"flwr run exited with {code}; last output:\n{_tail(lines)}"
                                  + (f"\nlocal SuperLink log:\n{_file_tail(superlink_log)}" if superlink_log.exists() else ""))
        started = _STARTED.search("".join(lines))
        status = _run_status(flwr, int(started.group(1)), env, work) if started else ""
        if status and any(word in status.lower() for word in _FAILED_STATUS):
            raise SimulationError(f"run {started.group(1)} ended with status {status!r}; last output:\n{_tail(lines)}")  # type: ignore[union-attr]
        if not (run_dir / "checkpoint.pt").is_file():
            raise SimulationError(f"run finished without a checkpoint in {run_dir}; last output:\n{_tail(lines)}")
        return run_dir
    finally:
        if proc is not None and proc.poll() is None:
            stop_pid(proc.pid)
        # the managed local SuperLink (and its simulation children) of this run only
        for pid in pids_with_args("flower-superlink", f"127.0.0.1:{control_port}"):
            stop_pid(pid)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if lines:
            (run_dir / LOG_FILE).write_text(_plain("".join(lines)))
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- results


def _metrics_file(run_dir: str | Path) -> Path:
    p = Path(run_dir)
    for cand in (p, p / METRICS_FILE, p / "tensorboard" / METRICS_FILE):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no {METRICS_FILE} in {p} or {p / 'tensorboard'}")


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib  # type: ignore[import-not-found]
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    return tomllib.loads(path.read_text())


def _site_names(run_dir: Path, sites: Sequence[str | Path] | None) -> list[str]:
    """Site names in partition order: ``name`` of each site YAML (else its file stem)."""
    if sites is None:
        cfg = run_dir / RUN_CONFIG_FILE
        if not cfg.is_file():
            return []
        sites = [s.strip() for s in str(_load_toml(cfg).get("sites", "")).split(",") if s.strip()]
    import yaml

    names = []
    for s in sites:
        name = Path(s).stem
        try:
            data = yaml.safe_load(Path(s).read_text())
            if isinstance(data, dict) and data.get("name"):
                name = str(data["name"])
        except (OSError, yaml.YAMLError):
            pass
        names.append(name)
    return names


def site_table(run_dir: str | Path, sites: Sequence[str | Path] | None = None) -> list[dict[str, Any]]:
    """Per-site results of the last round in a run's ``metrics.jsonl``.

    Args:
        run_dir: the run folder (or its ``tensorboard`` folder, or the file itself).
        sites: the site YAMLs in partition order (default: ``sites`` of the run folder's
            ``run-config.toml``). In simulation each site reports its ``partition-id``,
            which names it; otherwise sites are listed by node id.

    Returns:
        One dict per site, sorted by site name: ``site`` (name, or ``node-<id>``),
        ``node``, ``round``, then the evaluation metrics present: ``dice_<class>``,
        ``dice_mean``, ``hd95_mean``, ``hd95_<class>``, ``guide_dice``, ``dice_oracle``,
        ``dice_random``, ``dice_noguide``, ``num-examples``.
    """
    path = _metrics_file(run_dir)
    records = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    if not records:
        return []
    last = records[-1]
    base = path.parent.parent if path.parent.name == "tensorboard" else path.parent
    names = _site_names(base, sites)
    rows = []
    for node, phases in last.get("sites", {}).items():
        ev = phases.get("evaluate") or {}
        pid = ev.get("partition-id", (phases.get("train") or {}).get("partition-id"))
        name = node
        if pid is not None and 0 <= int(pid) < len(names):
            name = names[int(pid)]
        row: dict[str, Any] = {"site": name, "node": node, "round": last.get("round")}
        classes = [k for k in ev if k.startswith("dice_") and k not in _NOT_CLASSES]
        hd95 = ["hd95_mean"] + [k for k in ev if k.startswith("hd95_") and k != "hd95_mean"]
        for key in [*classes, "dice_mean", *hd95, *DIAGNOSTICS, "num-examples"]:
            if key in ev:
                row[key] = ev[key]
        rows.append(row)
    return sorted(rows, key=lambda r: str(r["site"]))


def format_site_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of :func:`site_table` rows (Dice per class and mean,
    HD95 mean, retrieval diagnostics)."""
    if not rows:
        return "(no per-site evaluation metrics)"
    cols: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("dice_") and key not in _NOT_CLASSES and key not in cols:
                cols.append(key)
    cols += [c for c in ("dice_mean", "hd95_mean", *DIAGNOSTICS) if any(c in r for r in rows)]
    width = max(12, *(len(str(r["site"])) + 2 for r in rows))
    out = ["site".ljust(width) + "".join(c.rjust(13) for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(("-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}").rjust(13))
        out.append(str(r["site"]).ljust(width) + "".join(cells))
    rnd = rows[0].get("round")
    if rnd is not None:
        out.append(f"(round {rnd}; Dice on each site's validation cases; HD95 in mm)")
    return "\n".join(out)


__all__ = [
    "OFFLINE_ENV", "SimulationError", "format_site_table", "run_simulation", "site_table",
]
