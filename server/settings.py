"""The server side of a run configuration, parsed and validated. No Flower import here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from jras_core.config import ConfigError
from jras_core.files import resolve_path

STRATEGIES = ("fedavg", "fedprox", "fedbn", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
ROBUST = ("fedmedian", "fedtrimmedavg", "krum")
DP_MODES = ("none", "fixed")
AGGREGATE = ("all", "segmenter")

@dataclass
class ServerSettings:
    """What the ServerApp reads from ``context.run_config`` (keys in brackets).

    Attributes:
        num_rounds: rounds to run in this run [``num-server-rounds``]; after a resume,
            rounds are numbered on from the checkpoint's round.
        strategy: ``fedavg``, ``fedprox``, ``fedbn``, ``fedadam`` or a robust aggregation,
            ``fedmedian``, ``fedtrimmedavg`` or ``krum`` [``strategy``].
        aggregate: ``all`` (segmenter and retriever) or ``segmenter`` (each site keeps
            its own retriever) [``aggregate``].
        proximal_mu: FedProx weight of ``mu/2 ||w - w_global||^2`` [``proximal-mu``].
        server_lr, beta_1, beta_2, tau: FedAdam [``fedadam-eta``, ``fedadam-beta-1``,
            ``fedadam-beta-2``, ``fedadam-tau``].
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
        max_update_norm: largest accepted ``||w_site - w_global||`` of a train reply;
            0 turns the check off [``max-update-norm``].
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

    num_rounds: int = 3
    strategy: str = "fedavg"
    aggregate: str = "all"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    output_dir: str = "runs/federation"
    run_name: str = ""
    resume: str = ""
    initial_weights: str = ""
    round_timeout: float = 3600.0
    trim_beta: float = 0.2
    krum_num_malicious: int = 0
    max_update_norm: float = 0.0
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0
    dp_num_sampled_clients: int = 0
    transfer_dtype: str = "float32"
    diagnostics_every: int = 5
    evaluate_in_train: bool = True
    warm_up: bool = False

    KEYS: ClassVar[dict[str, tuple[str, type]]] = {
        "num-server-rounds": ("num_rounds", int),
        "strategy": ("strategy", str),
        "aggregate": ("aggregate", str),
        "proximal-mu": ("proximal_mu", float),
        "fedadam-eta": ("server_lr", float),
        "fedadam-beta-1": ("beta_1", float),
        "fedadam-beta-2": ("beta_2", float),
        "fedadam-tau": ("tau", float),
        "fraction-train": ("fraction_train", float),
        "fraction-evaluate": ("fraction_evaluate", float),
        "min-nodes": ("min_nodes", int),
        "output-dir": ("output_dir", str),
        "run-name": ("run_name", str),
        "resume": ("resume", str),
        "initial-weights": ("initial_weights", str),
        "round-timeout": ("round_timeout", float),
        "trim-beta": ("trim_beta", float),
        "krum-num-malicious": ("krum_num_malicious", int),
        "max-update-norm": ("max_update_norm", float),
        "dp": ("dp", str),
        "dp-noise-multiplier": ("dp_noise_multiplier", float),
        "dp-clipping-norm": ("dp_clipping_norm", float),
        "dp-num-sampled-clients": ("dp_num_sampled_clients", int),
        "transfer-dtype": ("transfer_dtype", str),
        "diagnostics-every": ("diagnostics_every", int),
        "evaluate-in-train": ("evaluate_in_train", bool),
        "warm-up": ("warm_up", bool),
    }

    @property
    def keep_norm_local(self) -> bool:
        return self.strategy == "fedbn"

    @property
    def keep_retriever_local(self) -> bool:
        return self.aggregate == "segmenter"

    @property
    def dp_sampled(self) -> int:
        """Sites per round the DP noise is calibrated for."""
        return self.dp_num_sampled_clients or self.min_nodes

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        """Read the known keys (others belong to the clients); raise :class:`ConfigError` on bad values."""
        kwargs: dict[str, Any] = {}
        for key, (attr, tp) in cls.KEYS.items():
            if key not in run_config:
                continue
            value = run_config[key]
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
                raise ConfigError(f"run config: {key} must be {tp.__name__}, got {value!r}")
            kwargs[attr] = value
        settings = cls(**kwargs)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.num_rounds < 1:
            raise ConfigError(f"run config: num-server-rounds must be >= 1, got {self.num_rounds}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"run config: strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        if self.aggregate not in AGGREGATE:
            raise ConfigError(f"run config: aggregate must be one of {list(AGGREGATE)}, got {self.aggregate!r}")
        if self.proximal_mu < 0:
            raise ConfigError(f"run config: proximal-mu must be >= 0, got {self.proximal_mu}")
        for key, value in (("fraction-train", self.fraction_train), ("fraction-evaluate", self.fraction_evaluate)):
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"run config: {key} must be in [0, 1], got {value}")
        if self.fraction_train == 0.0:
            raise ConfigError("run config: fraction-train must be > 0")
        if self.min_nodes < 1:
            raise ConfigError(f"run config: min-nodes must be >= 1, got {self.min_nodes}")
        if self.server_lr <= 0 or self.tau <= 0:
            raise ConfigError("run config: fedadam-eta and fedadam-tau must be positive")
        if not (0.0 <= self.beta_1 < 1.0 and 0.0 <= self.beta_2 < 1.0):
            raise ConfigError("run config: fedadam-beta-1 and fedadam-beta-2 must be in [0, 1)")
        if self.round_timeout <= 0:
            raise ConfigError(f"run config: round-timeout must be positive, got {self.round_timeout}")
        if not 0.0 <= self.trim_beta < 0.5:
            raise ConfigError(f"run config: trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if self.krum_num_malicious < 0:
            raise ConfigError(f"run config: krum-num-malicious must be >= 0, got {self.krum_num_malicious}")
        if not self.max_update_norm >= 0:
            raise ConfigError(f"run config: max-update-norm must be >= 0 (0: off), got {self.max_update_norm}")
        if self.dp not in DP_MODES:
            raise ConfigError(f"run config: dp must be one of {list(DP_MODES)}, got {self.dp!r}")
        if not self.dp_noise_multiplier >= 0:
            raise ConfigError(f"run config: dp-noise-multiplier must be >= 0, got {self.dp_noise_multiplier}")
        if not self.dp_clipping_norm > 0:
            raise ConfigError(f"run config: dp-clipping-norm must be positive, got {self.dp_clipping_norm}")
        if self.transfer_dtype not in ("float32", "float16"):
            raise ConfigError(f"run config: transfer-dtype must be float32 or float16, got {self.transfer_dtype!r}")
        if self.diagnostics_every < 0:
            raise ConfigError(f"run config: diagnostics-every must be >= 0 (0: last round only), got {self.diagnostics_every}")
        if self.dp_num_sampled_clients < 0:
            raise ConfigError(f"run config: dp-num-sampled-clients must be >= 0 (0: min-nodes), got {self.dp_num_sampled_clients}")

    def run_dir(self, run_id: int, cwd: Path | None = None) -> Path:
        """This run's output folder (relative ``output-dir`` against ``cwd``)."""
        return (resolve_path(self.output_dir, [cwd or Path.cwd()]) / (self.run_name or f"run-{run_id}")).resolve()
