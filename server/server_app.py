"""The Flower ServerApp of the J-RAS federation.

It builds the global model (segmenter + retriever, one ``ArrayRecord`` with
``seg.*``/``retr.*`` keys) from the run's method configuration, or loads it from a
checkpoint to resume, runs the configured strategy, and after every round writes
the global checkpoint and the round's TensorBoard scalars.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from jras_core.config import JRASConfig
from jras_core.fedutil import (
    PROJECT_ROOT,
    buffer_keys,
    check_arrays_fit,
    local_keys,
    method_from_run_config,
    resolve_path,
)
from jras_core.models.jras import JRASModel, build_model
from server.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from server.settings import ServerSettings
from server.strategies import (
    JRASStrategyMixin,
    arrays_to_record,
    build_strategy,
    record_to_arrays,
    with_privacy,
)
from server.tracking import RoundRecorder

log = logging.getLogger(__name__)

app = ServerApp()


def make_round_end_fn(
    run_dir: Path,
    strategy: JRASStrategyMixin,
    recorder: RoundRecorder,
    method: JRASConfig,
    run_config: dict[str, Any],
) -> Callable[[int, ArrayRecord], MetricRecord | None]:
    """The ``evaluate_fn`` called after every round: global checkpoint, then the round's logs.

    Flower calls it with its own round counter (starting at 0 before the first round);
    the strategy's round offset turns that into the global round.
    """

    def round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + strategy.round_offset
        if server_round == 0:
            return None
        save_checkpoint(
            run_dir,
            Checkpoint(
                round=rnd,
                arrays=record_to_arrays(arrays),
                config=method.to_dict(),
                run_config=run_config,
                strategy_state=strategy.state_arrays(),
            ),
        )
        summary = recorder.end_round(rnd)
        return MetricRecord({k: float(v) for k, v in summary.items()})

    return round_end


def initial_state(
    model: JRASModel, method: JRASConfig, settings: ServerSettings, roots: list[Path]
) -> tuple[ArrayRecord, Checkpoint | None]:
    """The starting global arrays: the fresh model's, or a checkpoint's when resuming."""
    if not settings.resume:
        return ArrayRecord(model.state_dict()), None
    ckpt = load_checkpoint(resolve_path(settings.resume, roots))
    check_arrays_fit(ckpt.arrays, model, f"resume {settings.resume}")
    if ckpt.config and ckpt.config != method.to_dict():
        log.warning("resuming with a method configuration that differs from the checkpoint's")
    log.info("resuming from round %d (%s)", ckpt.round, settings.resume)
    return arrays_to_record(ckpt.arrays), ckpt


def _show_logs() -> None:
    """Route this package's INFO logs to Flower's log handlers (they reach ``flwr log``)."""
    ours = logging.getLogger("server")
    if not ours.handlers:
        for handler in logging.getLogger("flwr").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of the configured strategy."""
    _show_logs()
    run_config = dict(context.run_config)
    settings = ServerSettings.from_run_config(run_config)
    roots = [Path.cwd(), PROJECT_ROOT]
    method = method_from_run_config(run_config, roots=[PROJECT_ROOT, Path.cwd()])
    model = build_model(method)
    arrays, ckpt = initial_state(model, method, settings, roots)
    offset = ckpt.round if ckpt is not None else 0

    run_dir = settings.run_dir(context.run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    log.info("run folder: %s", run_dir)
    recorder = RoundRecorder(run_dir / "tensorboard")
    keep = local_keys(model, settings.keep_norm_local, settings.keep_retriever_local)
    strategy = build_strategy(settings, keep, buffer_keys(model), offset, recorder)
    if ckpt is not None and ckpt.strategy_state:
        strategy.load_state_arrays(ckpt.strategy_state)

    flags = {
        "keep-norm-local": settings.keep_norm_local,
        "keep-retriever-local": settings.keep_retriever_local,
        "transfer-dtype": settings.transfer_dtype,
    }
    try:
        with_privacy(strategy, settings).start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=settings.num_rounds,
            timeout=settings.round_timeout,
            train_config=ConfigRecord(dict(flags)),
            evaluate_config=ConfigRecord(dict(flags)),
            evaluate_fn=make_round_end_fn(run_dir, strategy, recorder, method, run_config),
        )
    finally:
        recorder.close()
