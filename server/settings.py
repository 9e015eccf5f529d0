"""The server side of a run configuration, parsed and validated. No Flower import here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr

from jras_core.config import check, config_class, validate_as
from jras_core.files import resolve_path
from server.validation import (
    DEFAULT_MAX_EXAMPLE_RATIO,
    DEFAULT_NORM_BOUND_FACTOR,
    ExampleWeighting,
    ExampleWeights,
)

StrategyName = Literal["fedavg", "fedprox", "fedbn", "fedadam", "fedavgm", "fedmedian", "fedtrimmedavg", "krum"]
Aggregate = Literal["all", "segmenter"]
DPMode = Literal["none", "fixed"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
DP_MODES: tuple[str, ...] = get_args(DPMode)
AGGREGATE: tuple[str, ...] = get_args(Aggregate)
SOURCE = "run config"
"""What errors in these settings name first."""


@config_class
class ServerSettings:
    """What the ServerApp reads from ``context.run_config`` (keys in brackets).

    Attributes:
        num_rounds: rounds to run in this run [``num-server-rounds``]; after a resume,
            rounds are numbered on from the checkpoint's round.
        strategy: ``fedavg``, ``fedprox``, ``fedbn``, ``fedadam``, ``fedavgm`` (FedAvg with server
            momentum) or a robust aggregation,
            ``fedmedian``, ``fedtrimmedavg`` or ``krum`` [``strategy``].
        aggregate: ``all`` (segmenter and retriever) or ``segmenter`` (each site keeps
            its own retriever) [``aggregate``].
        proximal_mu: FedProx weight of ``mu/2 ||w - w_global||^2`` [``proximal-mu``].
        server_lr, beta_1, beta_2, tau: FedAdam [``fedadam-eta``, ``fedadam-beta-1``,
            ``fedadam-beta-2``, ``fedadam-tau``].
        server_learning_rate, server_momentum: FedAvgM's step on the averaged update and the
            momentum of its heavy-ball buffer [``server-learning-rate``, ``server-momentum``].
        fraction_train, fraction_evaluate: fraction of connected sites sampled per round.
        min_nodes: minimum sites to sample and to wait for [``min-nodes``].
        output_dir: folder of run folders [``output-dir``].
        run_name: this run's folder under ``output_dir`` (empty: ``run-<run id>``) [``run-name``].
        resume: checkpoint file or run folder to resume from (empty: start fresh) [``resume``].
        initial_weights: checkpoint file or run folder whose model weights a fresh run starts
            from, e.g. a model pretrained elsewhere (``jras train`` or another federation);
            rounds count from 1; ignored when resuming [``initial-weights``].
        round_timeout: seconds to wait for replies per round [``round-timeout``].
        trim_beta: fraction cut off at each tail by ``fedtrimmedavg`` [``trim-beta``].
        krum_num_malicious: sites assumed malicious by ``krum`` [``krum-num-malicious``].
        max_update_norm: largest accepted ``||w_site - w_global||`` (over the trained
            parameters) of a train reply; 0: no absolute bound, the relative one below still
            applies [``max-update-norm``].
        norm_bound_factor: a train reply whose update norm is above this many times the
            median update norm of the round's replies is rejected, in rounds with at least
            three valid replies (with fewer, only ``max-update-norm`` applies); applies
            together with ``max-update-norm``; 0 turns it off, else >= 1 [``norm-bound-factor``].
            Buffers (running statistics, counters) are screened by their plausible ranges
            instead (:class:`~server.validation.BufferLimits`).
        example_weights: how a reply's claimed ``num-examples`` weighs in FedAvg, FedProx,
            FedBN, FedAdam and the evaluation aggregates: ``capped`` (at most
            ``max-example-ratio`` times the lower median of the round's counts, and
            ``max-examples``), ``claimed`` (as claimed, at most ``max-examples``) or
            ``equal`` (each reply weighs 1). Counts that are not positive whole numbers are
            rejected under every policy [``example-weights``].
        max_example_ratio: the ``capped`` ratio, >= 1 [``max-example-ratio``].
        max_examples: largest count a reply weighs with, under ``capped`` and ``claimed``;
            0: no absolute cap [``max-examples``].
        dp: ``none`` or ``fixed`` (server-side fixed clipping + Gaussian noise) [``dp``].
        dp_noise_multiplier, dp_clipping_norm: of the Gaussian mechanism
            [``dp-noise-multiplier``, ``dp-clipping-norm``].
        dp_num_sampled_clients: sites per round the noise is calibrated for; 0: ``min-nodes``
            [``dp-num-sampled-clients``].
        transfer_dtype: wire format of model entries in both directions, ``float32`` or
            ``float16`` (half the bytes; the server aggregates in float32) [``transfer-dtype``].
        diagnostics_every: the sites' evaluation adds the retrieval diagnostics
            (``guide_dice``, ``dice_oracle``, ``dice_random``, ``dice_noguide``: three more
            predictions of the validation slices, about twice the evaluation's time) in every
            N-th round and in the run's last round; 0: the last round only
            [``diagnostics-every``].
        evaluate_in_train: the sites evaluate the model they receive (the previous round's
            aggregate) at the start of each train message and send the metrics with their
            update; the separate evaluation phase then runs in the run's last round only, so
            a round is one exchange with the sites instead of two. The evaluation sample is
            then the train sample (``fraction-evaluate`` sizes the last round's; 0 still
            turns evaluation off) [``evaluate-in-train``].
        warm_up: before round 1, have every connected site load its data, bank and model
            and its process pay its first-use costs (:func:`server.server_app.warm_up`), so
            that round 1 measures a round [``warm-up``]; ``run_simulation`` turns it on.
    """

    num_rounds: Annotated[StrictInt, Field(ge=1)] = Field(3, alias="num-server-rounds")
    strategy: StrategyName = "fedavg"
    aggregate: Aggregate = "all"
    proximal_mu: Annotated[StrictFloat, Field(ge=0)] = Field(0.01, alias="proximal-mu")
    server_lr: Annotated[StrictFloat, Field(gt=0)] = Field(0.01, alias="fedadam-eta")
    beta_1: Annotated[StrictFloat, Field(ge=0, lt=1)] = Field(0.9, alias="fedadam-beta-1")
    beta_2: Annotated[StrictFloat, Field(ge=0, lt=1)] = Field(0.99, alias="fedadam-beta-2")
    tau: Annotated[StrictFloat, Field(gt=0)] = Field(1e-3, alias="fedadam-tau")
    server_learning_rate: Annotated[StrictFloat, Field(gt=0)] = Field(1.0, alias="server-learning-rate")
    server_momentum: Annotated[StrictFloat, Field(ge=0, lt=1)] = Field(0.9, alias="server-momentum")
    fraction_train: Annotated[StrictFloat, Field(gt=0, le=1)] = Field(1.0, alias="fraction-train")
    fraction_evaluate: Annotated[StrictFloat, Field(ge=0, le=1)] = Field(1.0, alias="fraction-evaluate")
    min_nodes: Annotated[StrictInt, Field(ge=1)] = Field(2, alias="min-nodes")
    output_dir: StrictStr = Field("runs/federation", alias="output-dir")
    run_name: StrictStr = Field("", alias="run-name")
    resume: StrictStr = ""
    initial_weights: StrictStr = Field("", alias="initial-weights")
    round_timeout: Annotated[StrictFloat, Field(gt=0)] = Field(3600.0, alias="round-timeout")
    trim_beta: Annotated[StrictFloat, Field(ge=0, lt=0.5)] = Field(0.2, alias="trim-beta")
    krum_num_malicious: Annotated[StrictInt, Field(ge=0)] = Field(0, alias="krum-num-malicious")
    max_update_norm: Annotated[StrictFloat, check(lambda v: v >= 0, "must be >= 0 (0: off)")] = Field(
        0.0, alias="max-update-norm"
    )
    norm_bound_factor: Annotated[
        StrictFloat, check(lambda v: v == 0 or v >= 1, "must be 0 (off) or >= 1")
    ] = Field(DEFAULT_NORM_BOUND_FACTOR, alias="norm-bound-factor")
    example_weights: ExampleWeights = Field("capped", alias="example-weights")
    max_example_ratio: Annotated[StrictFloat, Field(ge=1)] = Field(DEFAULT_MAX_EXAMPLE_RATIO, alias="max-example-ratio")
    max_examples: Annotated[
        StrictInt, check(lambda v: v >= 0, "must be >= 0 (0: no absolute cap)")
    ] = Field(0, alias="max-examples")
    dp: DPMode = "none"
    dp_noise_multiplier: Annotated[StrictFloat, Field(ge=0)] = Field(1.0, alias="dp-noise-multiplier")
    dp_clipping_norm: Annotated[StrictFloat, Field(gt=0)] = Field(1.0, alias="dp-clipping-norm")
    dp_num_sampled_clients: Annotated[
        StrictInt, check(lambda v: v >= 0, "must be >= 0 (0: min-nodes)")
    ] = Field(0, alias="dp-num-sampled-clients")
    transfer_dtype: Literal["float32", "float16"] = Field("float32", alias="transfer-dtype")
    diagnostics_every: Annotated[
        StrictInt, check(lambda v: v >= 0, "must be >= 0 (0: last round only)")
    ] = Field(5, alias="diagnostics-every")
    evaluate_in_train: StrictBool = Field(True, alias="evaluate-in-train")
    warm_up: StrictBool = Field(False, alias="warm-up")

    KEYS: ClassVar[dict[str, str]]
    """Run config key -> attribute, for every setting read from the run config."""

    @property
    def keep_norm_local(self) -> bool:
        return self.strategy == "fedbn"

    @property
    def keep_retriever_local(self) -> bool:
        return self.aggregate == "segmenter"

    @property
    def weighting(self) -> ExampleWeighting:
        """The ``example-weights`` policy with its caps."""
        return ExampleWeighting(self.example_weights, self.max_example_ratio, self.max_examples)

    @property
    def dp_sampled(self) -> int:
        """Sites per round the DP noise is calibrated for."""
        return self.dp_num_sampled_clients or self.min_nodes

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        """Read the known keys (others belong to the clients); raise :class:`ConfigError` on bad values."""
        return validate_as(cls, {key: run_config[key] for key in cls.KEYS if key in run_config}, SOURCE)

    def validate(self) -> None:
        """Check the current values again; raise :class:`ConfigError` on bad ones."""
        validate_as(type(self), {key: getattr(self, attr) for key, attr in self.KEYS.items()}, SOURCE)

    def run_dir(self, run_id: int, cwd: Path | None = None) -> Path:
        """This run's output folder (relative ``output-dir`` against ``cwd``)."""
        return (resolve_path(self.output_dir, [cwd or Path.cwd()]) / (self.run_name or f"run-{run_id}")).resolve()


ServerSettings.KEYS = {f.alias or name: name for name, f in ServerSettings.__pydantic_fields__.items()}
