"""The learning rate over a whole training, federated or central (``train.lr_schedule``).

A federation trains in many short calls (one per round, each with a fresh optimiser);
the schedule is a function of the position in the whole training, so that a round's
learning rate depends on the round alone and a resumed round computes what it would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingSpan:
    """Where one training call's epochs lie in the whole training.

    Attributes:
        done: epochs of the whole training before this call's first (a federation's round
            ``r`` of ``E`` local epochs: ``(r - 1) E``).
        total: epochs of the whole training (``R E`` for ``R`` rounds).
    """

    done: int
    total: int

    def __post_init__(self) -> None:
        if self.total < 1 or not 0 <= self.done <= self.total:
            raise ValueError(f"a training span needs 0 <= done <= total and total >= 1, got {self.done} of {self.total}")

    @classmethod
    def of_round(cls, server_round: int, last_round: int, epochs: int) -> TrainingSpan | None:
        """The span of federated round ``server_round`` (1-based) of ``last_round``, each of
        ``epochs`` local epochs; None when the rounds are not known (a call outside a run)."""
        if server_round < 1 or last_round < server_round or epochs < 1:
            return None
        return cls(done=(server_round - 1) * epochs, total=last_round * epochs)

    def progress(self, epoch: int, fraction: float = 0.0) -> float:
        """Share of the whole training done at ``fraction`` (in [0, 1)) of this call's
        epoch ``epoch`` (0-based), clipped to [0, 1]."""
        return min(1.0, max(0.0, (self.done + epoch + fraction) / self.total))


def lr_factor(schedule: str, progress: float, final_fraction: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``progress`` (in [0, 1]) of the training.

    ``constant``: 1. ``cosine``: half a cosine from 1 down to ``final_fraction`` at the end.
    """
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant or cosine)")
