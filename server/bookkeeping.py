"""What a round's exchange leaves in the log and the recorder.

Error replies (a ClientApp that raised, a SuperNode that went away) are logged with the
site's error text and sites that sent nothing within the round timeout as timed out;
per-site metrics, failures, bytes of arrays sent and received, and the time the server
spends on a strategy step go to the :class:`~server.tracking.RoundRecorder`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from flwr.app import Message

from server.messages import array_bytes, error_text, metrics_of, site_label
from server.tracking import RoundRecorder

log = logging.getLogger(__name__)


class _Recorded(Protocol):
    recorder: RoundRecorder | None


_Method = TypeVar("_Method", bound=Callable[..., Any])


def server_work(method: _Method) -> _Method:
    """Time a strategy step (preparing messages, screening and aggregating replies) into
    the round's ``server_time_s``."""

    @functools.wraps(method)
    def timed(self: _Recorded, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            if self.recorder is not None:
                self.recorder.add_server_time(time.perf_counter() - t0)

    return timed  # type: ignore[return-value]


def record_sent(messages: list[Message], recorder: RoundRecorder | None) -> None:
    """Count the bytes of the arrays sent out."""
    if recorder is None:
        return
    recorder.add_traffic(sent=array_bytes(messages))


def record_failures(
    rnd: int,
    phase: str,
    sent: list[Message],
    replies: list[Message],
    round_timeout: float | None,
    recorder: RoundRecorder | None,
) -> None:
    """Log (and record) the phase's error replies with their text, and the sites that
    sent no reply at all within the round timeout.

    Args:
        rnd: the (global) round.
        phase: ``train`` or ``evaluate``.
        sent: the phase's messages that went out (which sites were asked).
        replies: the replies that came back.
        round_timeout: seconds a site had to answer (None: no timeout).
        recorder: per-round bookkeeping.
    """
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    for msg in replies:
        if not msg.has_error():
            continue
        site = f"node-{dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)}"
        text = error_text(msg)
        log.warning("round %d: %s failed at %s: %s", rnd, phase, site, text)
        if recorder is not None:
            recorder.add_site_error(phase, site, text)
    answered = {m.metadata.reply_to_message_id for m in replies}
    missing = [m for m in sent if m.metadata.message_id and m.metadata.message_id not in answered]
    for msg in missing:
        site = f"node-{msg.metadata.dst_node_id}"
        text = f"no reply within the round timeout ({round_timeout:g} s)" if round_timeout else "no reply"
        log.warning("round %d: %s at %s: %s", rnd, phase, site, text)
        if recorder is not None:
            recorder.add_site_error(phase, site, text)
    if recorder is not None and sent:
        recorder.set_round_stat(f"timeouts_{phase}", len(missing))


def record_replies(
    rnd: int,
    phase: str,
    sent: list[Message],
    replies: list[Message],
    round_timeout: float | None,
    recorder: RoundRecorder | None,
) -> None:
    """Log and record a phase's replies: failures and timeouts (:func:`record_failures`),
    then the number of failures, each site's metrics and the bytes of arrays received."""
    record_failures(rnd, phase, sent, replies, round_timeout, recorder)
    if recorder is None:
        return
    ok = [m for m in replies if not m.has_error()]
    recorder.add_failures(phase, len(replies) - len(ok))
    for msg in ok:
        recorder.add_site_metrics(phase, site_label(msg), metrics_of(msg))
    recorder.add_traffic(received=array_bytes(ok))
