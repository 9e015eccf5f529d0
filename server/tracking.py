"""Per-round bookkeeping of a federation: TensorBoard scalars and a JSON-lines log.

Per round it records the aggregated (global) and per-site train and evaluation
metrics, the number of failed and rejected replies, each failed site's error text, the
round's wall time and the bytes of model arrays sent to and received from the sites.
When the sites evaluate a round's model at the start of the next round's training, that
round's record waits for the evaluation (:meth:`RoundRecorder.end_round` with ``defer``).
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
PENDING_FILE = "pending-round.json"
"""A finished round's record waiting for the evaluation of its model (see :meth:`RoundRecorder.end_round`)."""


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
        self._pending: dict[str, Any] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._pending = _read_pending(self.log_dir / PENDING_FILE)
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
        """Mark the start of global round ``rnd`` (idempotent within a round). A held
        record of a round other than the previous one is written as it is."""
        if self._pending is not None and int(self._pending["round"]) != rnd - 1:
            self.flush_pending()
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
        self._sites[site][phase] = _scalars(metrics)

    def add_global_metrics(self, phase: str, metrics: Mapping[str, float]) -> None:
        """Aggregated metrics of a phase."""
        self._global[phase] = _scalars(metrics)

    # ------------------------------------------------------------------ writing
    def end_round(self, rnd: int, defer: bool = False) -> dict[str, float]:
        """End round ``rnd``: its record is written now, or, with ``defer``, held until
        :meth:`add_evaluation` brings the evaluation of its model (sent with the next
        round's updates). A held record is also kept in ``pending-round.json``, so that
        a crash loses nothing and a resumed run can still evaluate that model.

        Returns the round summary (wall time, server time, bytes, sites).
        """
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
        record = {
            "round": rnd,
            "round_stats": summary,
            "global": self._global,
            "sites": {name: dict(phases) for name, phases in self._sites.items()},
            "errors": {name: dict(phases) for name, phases in self._errors.items()},
        }
        log.info(
            "round %d: %.1f s, %.2f MB sent, %.2f MB received",
            rnd, wall, self._sent / 2**20, self._received / 2**20,
        )
        self.flush_pending()
        if defer:
            self._hold(record)
        else:
            self._write(record)
        self._reset(rnd)
        return summary

    @property
    def pending_round(self) -> int | None:
        """The round whose record waits for the evaluation of its model, or None."""
        return None if self._pending is None else int(self._pending["round"])

    def add_evaluation(
        self,
        rnd: int,
        sites: Mapping[str, Mapping[str, float]],
        global_metrics: Mapping[str, float] | None,
        errors: Mapping[str, str] | None = None,
    ) -> None:
        """The evaluation of round ``rnd``'s model, made by the sites at the start of a
        later round's training: completes and writes round ``rnd``'s held record (a
        record of its own when none is held for that round).

        Args:
            sites: each evaluating site's metrics.
            global_metrics: their aggregate (None when no site evaluated).
            errors: why a site's evaluation failed, by site.
        """
        if self._pending is not None and int(self._pending["round"]) == rnd:
            record, self._pending = self._pending, None
        else:
            self.flush_pending()
            record = {"round": rnd, "round_stats": {}, "global": {}, "sites": {}, "errors": {}}
        stats = record["round_stats"]
        for site, metrics in sites.items():
            record["sites"].setdefault(site, {})["evaluate"] = _scalars(metrics)
        if global_metrics is not None:
            record["global"]["evaluate"] = _scalars(global_metrics)
        for site, text in (errors or {}).items():
            record["errors"].setdefault(site, {})["evaluate"] = str(text)
        stats["num_sites_evaluate"] = float(len(sites))
        stats["failures_evaluate"] = float(len(errors or {}))
        self._write(record)

    def flush_pending(self) -> None:
        """Write a held record as it is (its evaluation never came)."""
        if self._pending is not None:
            record, self._pending = self._pending, None
            self._write(record)

    def _hold(self, record: dict[str, Any]) -> None:
        self._pending = record
        if self.log_dir is not None:
            tmp = self.log_dir / (PENDING_FILE + ".tmp")
            tmp.write_text(json.dumps(_json_safe(record)))
            tmp.replace(self.log_dir / PENDING_FILE)

    def _write(self, record: dict[str, Any]) -> None:
        """Append a round's record to ``metrics.jsonl`` and its scalars to TensorBoard."""
        rnd = int(record["round"])
        record = {**record, "time": time.time()}
        for phase in ("train", "evaluate"):
            n = [s[phase].get("num-examples") for s in record["sites"].values() if phase in s]
            if n and all(v is not None for v in n):
                record["global"].setdefault(phase, {})["num-examples"] = float(sum(n))
        self.history.append(record)
        if self.log_dir is not None:
            _append_line(self.log_dir / METRICS_FILE, json.dumps(_json_safe(record)))
            (self.log_dir / PENDING_FILE).unlink(missing_ok=True)
        if self._writer is not None:
            w = self._writer
            for key, value in record["round_stats"].items():
                if value is not None:
                    w.add_scalar(f"round/{key}", value, rnd)
            for phase, metrics in record["global"].items():
                for key, value in metrics.items():
                    w.add_scalar(f"global/{phase}/{key}", value, rnd)
            for site, phases in record["sites"].items():
                for phase, metrics in phases.items():
                    for key, value in metrics.items():
                        w.add_scalar(f"site/{site}/{phase}/{key}", value, rnd)
            w.flush()

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


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics mapping, as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _read_pending(path: Path) -> dict[str, Any] | None:
    """A held round record left by an earlier run in this folder, or None (also when unreadable)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["round"])
        for key in ("round_stats", "global", "sites", "errors"):
            record[key] = dict(record.get(key) or {})
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable (%s), ignored", path, exc)
        return None
    return record


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
