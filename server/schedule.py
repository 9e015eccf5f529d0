"""What each round of a run asks of the sites besides training.

The retrieval diagnostics are added to the evaluation every ``diagnostics_every``-th round
and the last one. With ``evaluate_in_train``, a round's model is evaluated at the start of
the next round's training (the train config then carries ``evaluate-first``) instead of in
an evaluation phase of its own; only the last round keeps that phase, so that a round is one
exchange. Rounds here are global rounds (numbered on from a resumed checkpoint).
"""

from __future__ import annotations

from flwr.app import ConfigRecord

from federation.protocol import EVALUATE_FIRST, FINAL_ROUND


def is_diagnostics_round(rnd: int, last_round: int, diagnostics_every: int) -> bool:
    """Whether round ``rnd``'s evaluation adds the retrieval diagnostics: every
    ``diagnostics_every``-th round and the last one (every round when the last is unknown,
    ``last_round <= 0``)."""
    if last_round <= 0 or rnd >= last_round:
        return True
    return diagnostics_every > 0 and rnd % diagnostics_every == 0


def is_evaluation_deferred(rnd: int, last_round: int, evaluate_in_train: bool, fraction_evaluate: float) -> bool:
    """Whether round ``rnd``'s model is evaluated at the start of the next round's
    training instead of in an evaluation phase of its own (every round but the last,
    with ``evaluate_in_train`` and sites sampled for evaluation)."""
    folds = evaluate_in_train and fraction_evaluate > 0
    return folds and 0 < last_round and rnd < last_round


def evaluate_first_config(config: ConfigRecord, diagnostics: bool) -> ConfigRecord:
    """A train config that also asks the sites to evaluate the model they receive first."""
    return ConfigRecord({**dict(config), EVALUATE_FIRST: True, "diagnostics": diagnostics})


def evaluate_config(config: ConfigRecord, diagnostics: bool, final: bool = False) -> ConfigRecord:
    """An evaluation config saying whether to add the retrieval diagnostics and whether the
    model is the run's final one (:data:`~federation.protocol.FINAL_ROUND`: a site asked to
    personalise adapts it then)."""
    return ConfigRecord({**dict(config), "diagnostics": diagnostics, FINAL_ROUND: final})
