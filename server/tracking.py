"""Per-round bookkeeping of a federation: TensorBoard scalars and a JSON-lines log.

Per round it records the aggregated (global) and per-site train and evaluation
metrics, the number of failed and rejected replies, each failed site's error text, the
round's wall time and the bytes of model arrays sent to and received from the sites.
No Flower import here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STARTUP_FILE = "startup.json"
"""The warm-up before the first round (wall time, sites ready, each site's ``client-time-s``)."""


class RoundRecorder:
    """Collects one round's numbers and writes them when the round ends.

    Args:
        log_dir: folder for TensorBoard event files and ``metrics.jsonl`` (None: keep in memory only).
        writer_factory: builds the TensorBoard writer (default ``SummaryWriter``).
    """

    def __init__(self, log_dir: str | Path | None, writer_factory: Callable[[str], Any] | None = None):
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.history: list[dict[str, Any]] = []
        self._writer = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if writer_factory is None:
                from torch.utils.tensorboard import SummaryWriter

                writer_factory = SummaryWriter
            self._writer = writer_factory(str(self.log_dir))
        self._reset(0)

    def _reset(self, rnd: int) -> None:
        self._round = rnd
        self._t0: float | None = None
        self._sent = 0
        self._received = 0
        self._server_s = 0.0
        self._failures: dict[str, int] = defaultdict(int)
        self._errors: dict[str, dict[str, str]] = defaultdict(dict)
        self._stats: dict[str, float] = {}
        self._global: dict[str, dict[str, float]] = {}
        self._sites: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)

    # ------------------------------------------------------------------ collecting
    def start_round(self, rnd: int) -> None:
        """Mark the start of global round ``rnd`` (idempotent within a round)."""
        if rnd != self._round or self._t0 is None:
            self._reset(rnd)
            self._t0 = time.perf_counter()

    def add_traffic(self, sent: int = 0, received: int = 0) -> None:
        """Bytes of model arrays sent to / received from sites."""
        self._sent += int(sent)
        self._received += int(received)

    def add_failures(self, phase: str, count: int) -> None:
        self._failures[phase] += int(count)

    def add_site_error(self, phase: str, site: str, text: str) -> None:
        """Why ``site`` gave no usable reply in ``phase`` (its error text, or a timeout)."""
        self._errors[site][phase] = str(text)

    def add_server_time(self, seconds: float) -> None:
        """Seconds the server spent on the round itself (preparing messages, screening and
        aggregating replies, the checkpoint): ``server_time_s`` of the round's stats."""
        self._server_s += float(seconds)

    def set_round_stat(self, name: str, value: float) -> None:
        """A scalar of the round itself (rejected replies, DP parameters), logged with the round's stats."""
        self._stats[name] = float(value)

    def add_site_metrics(self, phase: str, site: str, metrics: Mapping[str, float]) -> None:
        """Scalar metrics of one site's reply (``phase``: ``train`` or ``evaluate``)."""
        self._sites[site][phase] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def add_global_metrics(self, phase: str, metrics: Mapping[str, float]) -> None:
        """Aggregated metrics of a phase."""
        self._global[phase] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    # ------------------------------------------------------------------ writing
    def end_round(self, rnd: int) -> dict[str, float]:
        """Write the round's scalars; returns the round summary (wall time, bytes)."""
        wall = time.perf_counter() - self._t0 if self._t0 is not None and rnd == self._round else float("nan")
        summary = {
            "wall_time_s": wall,
            "server_time_s": self._server_s,
            "bytes_sent": float(self._sent),
            "bytes_received": float(self._received),
            "bytes_total": float(self._sent + self._received),
            "num_sites_train": float(len([s for s in self._sites.values() if "train" in s])),
            "num_sites_evaluate": float(len([s for s in self._sites.values() if "evaluate" in s])),
        }
        for phase, n in self._failures.items():
            summary[f"failures_{phase}"] = float(n)
        summary.update(self._stats)
        for phase in ("train", "evaluate"):
            n = [s[phase].get("num-examples") for s in self._sites.values() if phase in s]
            if n and all(v is not None for v in n):
                self._global.setdefault(phase, {})["num-examples"] = float(sum(n))
        record = {
            "round": rnd,
            "round_stats": summary,
            "global": self._global,
            "sites": {name: dict(phases) for name, phases in self._sites.items()},
            "errors": {name: dict(phases) for name, phases in self._errors.items()},
            "time": time.time(),
        }
        self.history.append(record)
        if self.log_dir is not None:
            _append_line(self.log_dir / METRICS_FILE, json.dumps(_json_safe(record)))
        if self._writer is not None:
            w = self._writer
            for key, value in summary.items():
                w.add_scalar(f"round/{key}", value, rnd)
            for phase, metrics in self._global.items():
                for key, value in metrics.items():
                    w.add_scalar(f"global/{phase}/{key}", value, rnd)
            for site, phases in self._sites.items():
                for phase, metrics in phases.items():
                    for key, value in metrics.items():
                        w.add_scalar(f"site/{site}/{phase}/{key}", value, rnd)
            w.flush()
        log.info(
            "round %d: %.1f s, %.2f MB sent, %.2f MB received",
            rnd, wall, self._sent / 2**20, self._received / 2**20,
        )
        self._reset(rnd)
        return summary

    def record_startup(self, startup: Mapping[str, Any]) -> None:
        """Write the warm-up before the first round to ``startup.json`` (not a round: it is
        kept out of ``metrics.jsonl``) and its scalars to TensorBoard."""
        if self.log_dir is not None:
            (self.log_dir / STARTUP_FILE).write_text(json.dumps(_json_safe(dict(startup)), indent=1) + "\n")
        if self._writer is not None:
            for key, value in startup.items():
                if isinstance(value, (int, float)):
                    self._writer.add_scalar(f"startup/{key}", value, 0)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _append_line(path: Path, line: str) -> None:
    """Append one line to ``path``, first ending a last line cut short by a crash (a resumed
    run appends to the same log)."""
    with open(path, "a+b") as fh:
        fh.seek(0, 2)
        lead = b""
        if fh.tell() > 0:
            fh.seek(-1, 2)
            if fh.read(1) != b"\n":
                lead = b"\n"
        fh.write(lead + line.encode("utf-8") + b"\n")
        fh.flush()


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
