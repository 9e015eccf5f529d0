"""The Flower ServerApp of the J-RAS federation.

It builds the global model (segmenter + retriever, one ``ArrayRecord`` with
``seg.*``/``retr.*`` keys) from the run's method configuration, or loads it from a
checkpoint to resume, warms the connected sites up when asked to (:func:`warm_up`,
run-config ``warm-up``, which ``run_simulation`` sets), runs the configured strategy, and after
every round writes the global checkpoint and the round's TensorBoard scalars.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp

from federation.protocol import (
    LAST_ROUND,
    buffer_keys,
    check_arrays_fit,
    local_keys,
    method_from_run_config,
    state_to_arrays,
)
from federation.records import arrays_to_record, record_to_arrays
from jras_core.checkpoint import read_checkpoint
from jras_core.config import JRASConfig
from jras_core.files import PROJECT_ROOT, resolve_path
from jras_core.models.jras import JRASModel, build_model
from server.checkpoint import Checkpoint, checkpoint_path, load_checkpoint, save_checkpoint
from server.messages import error_text, site_label
from server.privacy import with_privacy
from server.settings import ServerSettings
from server.strategies import JRASStrategyMixin, build_strategy
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
    """The ``evaluate_fn`` called after every round: global checkpoint, then the round's logs
    (held until the next round's replies bring the evaluation of this round's model, when
    the sites evaluate it at the start of their training).

    Flower calls it with its own round counter (starting at 0 before the first round);
    the strategy's round offset turns that into the global round.
    """

    def round_end(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        rnd = server_round + strategy.round_offset
        if server_round == 0:
            return None
        t0 = time.perf_counter()
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
        recorder.add_server_time(time.perf_counter() - t0)
        summary = recorder.end_round(rnd, defer=strategy.evaluation_deferred(rnd))
        return MetricRecord({k: float(v) for k, v in summary.items()})

    return round_end


def initial_state(
    model: JRASModel, method: JRASConfig, settings: ServerSettings, roots: list[Path]
) -> tuple[ArrayRecord, Checkpoint | None]:
    """The starting global arrays: a checkpoint's when resuming, else the weights of
    ``initial-weights`` when given, else the fresh model's."""
    if settings.resume:
        ckpt = load_checkpoint(resolve_path(settings.resume, roots))
        check_arrays_fit(ckpt.arrays, model, f"resume {settings.resume}")
        if ckpt.config and ckpt.config != method.to_dict():
            log.warning("resuming with a method configuration that differs from the checkpoint's")
        log.info("resuming from round %d (%s)", ckpt.round, settings.resume)
        return arrays_to_record(ckpt.arrays), ckpt
    if settings.initial_weights:
        path = checkpoint_path(resolve_path(settings.initial_weights, roots))
        data = read_checkpoint(path)
        arrays = state_to_arrays(data["state"])
        check_arrays_fit(arrays, model, f"initial-weights {path}")
        if data["config"] != method.to_dict():
            log.warning("initial-weights %s were trained with another method configuration", path)
        log.info("starting from the weights of %s", path)
        return arrays_to_record(arrays), None
    return ArrayRecord(model.state_dict()), None


def warm_up(grid: Grid, timeout: float | None) -> dict[str, Any]:
    """Before the first round, send each connected node a ``query`` message and wait (at
    most ``timeout`` s) for the replies: each site then loads its data, builds its bank and
    model, and its process pays its first-use costs (Flower's simulation starts its workers
    and imports the ClientApp on their first message), so that round 1 measures a round.

    A site that fails or does not answer is logged and left to the rounds. Nodes that
    connect later are warmed up by their first round.

    Returns:
        ``wall_time_s``, ``sites``, ``sites_ready`` and each ready site's ``client-time-s``
        (``{}`` when no node is connected yet).
    """
    node_ids = list(grid.get_node_ids())
    if not node_ids:
        return {}
    t0 = time.perf_counter()
    messages = [Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=nid) for nid in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    wall = time.perf_counter() - t0
    ready: dict[str, float] = {}
    for msg in replies:
        if msg.has_error():
            log.warning("warm-up: %s is not ready: %s", site_label(msg), error_text(msg))
            continue
        metrics = next(iter(msg.content.metric_records.values()), {})
        ready[site_label(msg)] = float(metrics.get("client-time-s", float("nan")))
    log.info("warm-up: %d of %d sites ready in %.1f s", len(ready), len(node_ids), wall)
    return {"wall_time_s": wall, "sites": len(node_ids), "sites_ready": len(ready), "client-time-s": ready}


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
        startup = warm_up(grid, settings.round_timeout) if settings.warm_up else {}
        if startup:
            recorder.record_startup(startup)
        with_privacy(strategy, settings).start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=settings.num_rounds,
            timeout=settings.round_timeout,
            train_config=ConfigRecord({**flags, LAST_ROUND: offset + settings.num_rounds}),
            evaluate_config=ConfigRecord(dict(flags)),
            evaluate_fn=make_round_end_fn(run_dir, strategy, recorder, method, run_config),
        )
    finally:
        recorder.close()
