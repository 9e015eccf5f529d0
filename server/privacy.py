"""Central differential privacy around a J-RAS strategy: Flower's server-side fixed clipping.

:func:`with_privacy` wraps a strategy in :class:`JRASServerSideDP` when ``dp = "fixed"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import compute_stdv

from federation.records import arrays_to_record, record_to_arrays
from server.local_entries import shared_record
from server.settings import ServerSettings
from server.strategies import JRASStrategyMixin

log = logging.getLogger(__name__)

VARIANCE_SUFFIXES = ("running_var",)
"""Entries that must stay non-negative after DP noise (BatchNorm running variances)."""


class JRASServerSideDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's central DP with server-side fixed clipping around a J-RAS strategy.

    What it adds to Flower's wrapper so that the J-RAS strategy keeps working:

    * replies are validated (and rejected ones counted) *before* clipping, by the inner
      strategy's :meth:`~server.strategies.JRASStrategyMixin.screen_train_replies`;
    * updates are clipped against the entries that were sent (local entries excluded),
      in the same key order as the replies;
    * noise goes to the aggregated floating-point shared entries only: local entries keep
      the global model's values, integer counters stay noise-free, variances are kept >= 0;
    * the noise multiplier, clipping norm and noise stdev are round stats of the recorder.

    The inner strategy keeps round offset, checkpoint state and bookkeeping: pass it (not
    the wrapper) to the round-end function.
    """

    def __init__(self, strategy: JRASStrategyMixin, noise_multiplier: float, clipping_norm: float, num_sampled_clients: int):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)  # type: ignore[arg-type]
        self.inner = strategy

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.current_arrays = shared_record(arrays, self.inner.local_keys)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        inner = self.inner
        rnd = inner.global_round(server_round)
        if inner.recorder is not None:
            inner.recorder.set_round_stat("dp_noise_multiplier", self.noise_multiplier)
            inner.recorder.set_round_stat("dp_clipping_norm", self.clipping_norm)
            inner.recorder.set_round_stat(
                "dp_noise_stdv", compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
            )
        kept = inner.screen_train_replies(rnd, list(replies))
        if kept is None:
            return None, None
        order = list(self.current_arrays.keys())
        for msg in kept:
            if msg.has_error():
                continue
            name, record = next(iter(msg.content.array_records.items()))
            if list(record.keys()) != order:
                msg.content[name] = ArrayRecord({k: record[k] for k in order})
        inner._screened = True
        try:
            return super().aggregate_train(server_round, kept)
        finally:
            inner._screened = False

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Flower's noise on the aggregated floating-point shared entries only; local entries
        and integer counters as aggregated, variances kept >= 0.

        Flower 1.42 has no public hook for the noise step: this overrides the private method
        of ``DifferentialPrivacyFixedClippingBase`` that its ``aggregate_train`` calls.
        """
        clean = record_to_arrays(aggregated_arrays)
        noisy_keys = [
            k for k, v in clean.items() if k not in self.inner.local_keys and np.issubdtype(v.dtype, np.floating)
        ]
        noised = record_to_arrays(
            super()._add_noise_to_aggregated_arrays(arrays_to_record({k: clean[k] for k in noisy_keys}))
        )
        for k in noised:
            if k.endswith(VARIANCE_SUFFIXES):
                noised[k] = np.maximum(noised[k], 0).astype(clean[k].dtype)
        out = dict(clean)
        out.update(noised)
        return arrays_to_record(out)


def with_privacy(strategy: JRASStrategyMixin, settings: ServerSettings) -> Strategy:
    """The strategy to run: ``strategy`` itself, or wrapped in :class:`JRASServerSideDP` when ``dp = "fixed"``."""
    if settings.dp == "none":
        return strategy  # type: ignore[return-value]
    log.info(
        "differential privacy: server-side fixed clipping, noise multiplier %g, clipping norm %g, %d sampled sites",
        settings.dp_noise_multiplier, settings.dp_clipping_norm, settings.dp_sampled,
    )
    return JRASServerSideDP(strategy, settings.dp_noise_multiplier, settings.dp_clipping_norm, settings.dp_sampled)
