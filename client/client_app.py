"""The Flower ClientApp of a J-RAS site.

On ``train``: load the global weights (plus the site's own local entries kept in
``context.state``), run the local epochs of the alternating optimisation, reply
with the model entries that are aggregated (one ``ArrayRecord``) and scalar
metrics (one ``MetricRecord`` with ``num-examples``); when the server asks
(``evaluate-first``), first evaluate the received model and add its metrics (the
``evaluate`` MetricRecord). On ``evaluate``: reply with
the validation metrics only; at the final round of a run with ``personalise = true``, also
adapt the final global model to the site's own annotated cases (AdaBN, fine-tuning with
early stopping) and save it at the site; only scalar figures of that go back. On ``query`` (the server's warm-up before the first
round): get ready, i.e. read the site's YAML and data, build its bank and model and
pay the process's first-use costs, and reply with the seconds it took. Images,
masks, embeddings and the bank never leave.

Which site this node is: ``node_config["site-config"]`` (deployment: a site YAML
on this machine), else ``node_config["partition-id"]`` indexing the run config's
comma-separated ``sites`` (simulation: paths relative to the app folder). A
simulated node adds its ``partition-id`` (a number) to its reply metrics, so that
per-site results can be named after the ``sites`` list.

A problem with the site's own input (its YAML, its data, its bank: ``ConfigError`` or
``DataError``) is logged here and sent to the coordinator as an error reply whose text
names the file and the fix; the server logs it and counts the site as failed. Any other
exception is logged here with its traceback and replied as an error too. A reply's text
names files relative to the site YAML's folder, or by their name alone: it never tells
the coordinator where the site's files are (the site's own log keeps the full paths).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.site_runner import SiteRunner, get_runner
from federation.protocol import (
    EVALUATE_FIRST,
    EVALUATION,
    EVALUATION_ERROR,
    FINAL_ROUND,
    LAST_ROUND,
    PERSONALISE,
    Arrays,
    RoundPolicy,
    method_from_run_config,
    site_list,
)
from federation.records import arrays_to_record, record_to_arrays
from jras_core.config import ConfigError
from jras_core.data.volume import DataError
from jras_core.files import PROJECT_ROOT, redact_paths, resolve_path

log = logging.getLogger(__name__)

LOCAL_STATE_KEY = "jras-local"
"""``context.state`` entry holding the model entries that stay at this site."""

INPUT_ERROR_CODE = 100
"""Error code of a reply that reports bad site input (Flower's own codes are below 100)."""

FAILURE_CODE = 101
"""Error code of a reply that reports any other exception of the ClientApp."""

PARTITION_METRIC = "partition-id"
"""Reply metric naming a simulated node's partition (index into the run config's ``sites``)."""

app = ClientApp()


def site_config_path(context: Context) -> Path:
    """The site YAML this node serves."""
    node = context.node_config
    if "site-config" in node:
        return resolve_path(str(node["site-config"]), [Path.cwd(), PROJECT_ROOT])
    if "partition-id" in node:
        sites = site_list(context.run_config)
        pid = int(node["partition-id"])
        if not sites:
            raise ConfigError("run config 'sites' is empty: list one site YAML per simulated node")
        if not 0 <= pid < len(sites):
            raise ConfigError(
                f"partition-id {pid} has no site: run config 'sites' lists {len(sites)} "
                "(set num-supernodes to the number of sites)"
            )
        return resolve_path(sites[pid], [PROJECT_ROOT, Path.cwd()])
    raise ConfigError("node config needs 'site-config' (path of the site YAML) or 'partition-id'")


def runner_for(context: Context) -> SiteRunner:
    """The cached site runner of this node (data and bank are loaded once per process)."""
    torch.set_num_threads(max(1, int(context.run_config.get("client-threads", 1))))
    method = method_from_run_config(context.run_config, roots=[PROJECT_ROOT, Path.cwd()])
    if str(context.node_config.get("device", "") or ""):  # the site's own machine decides its device
        method = method.with_overrides({"train.device": str(context.node_config["device"])})
    return get_runner(site_config_path(context), method)


def _arrays(msg: Message) -> Arrays:
    records = list(msg.content.array_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one ArrayRecord in the message, got {len(records)}")
    return record_to_arrays(records[0])


def _config(msg: Message) -> Mapping[str, Any]:
    records = list(msg.content.config_records.values())
    return records[0] if records else {}


def _policy(config: Mapping[str, Any]) -> RoundPolicy:
    return RoundPolicy(
        server_round=int(config.get("server-round", 0)),
        keep_norm_local=bool(config.get("keep-norm-local", False)),
        keep_retriever_local=bool(config.get("keep-retriever-local", False)),
        proximal_mu=float(config.get("proximal-mu", 0.0)),
        transfer_dtype=str(config.get("transfer-dtype", "float32")),
        diagnostics=bool(config.get("diagnostics", True)),
        final=bool(config.get(FINAL_ROUND, False)),
        last_round=int(config.get(LAST_ROUND, 0)),
    )


def _local_state(context: Context) -> Arrays | None:
    if LOCAL_STATE_KEY not in context.state.array_records:
        return None
    return record_to_arrays(context.state.array_records[LOCAL_STATE_KEY])


def _identify(metrics: dict[str, float], context: Context) -> dict[str, float]:
    """In simulation, add the node's ``partition-id`` (a number, not a name) so that the
    server's per-site logs can be mapped to the run config's ``sites`` list."""
    node = context.node_config
    if "partition-id" in node and "site-config" not in node:
        metrics = dict(metrics)
        metrics[PARTITION_METRIC] = int(node["partition-id"])
    return metrics


def _site_folder(context: Context) -> Path | None:
    """The folder of this node's site YAML, or None when the node has no valid site."""
    try:
        return site_config_path(context).parent
    except Exception:  # noqa: BLE001 - a node without a site: paths are reduced to names
        return None


def reply_text(exc: BaseException, context: Context) -> str:
    """``Type: message`` of an exception, for a reply to the coordinator: absolute paths
    become relative to the site YAML's folder, or file names (:func:`redact_paths`)."""
    return redact_paths(" ".join(f"{type(exc).__name__}: {exc}".split()), _site_folder(context))


def reports_input_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn an exception of ``handler`` into an error reply ``Type: message`` with site-relative
    file names (:func:`reply_text`): a ``ConfigError``/``DataError`` (code
    :data:`INPUT_ERROR_CODE`) is logged here without a traceback, any other exception
    (code :data:`FAILURE_CODE`) with it; the local log keeps the full paths."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except (ConfigError, DataError) as exc:
            log.error("%s refused: %s: %s", msg.metadata.message_type, type(exc).__name__, exc)
            return Message(Error(code=INPUT_ERROR_CODE, reason=reply_text(exc, context)), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - replied without the site's paths, logged in full
            log.exception("%s failed", msg.metadata.message_type)
            return Message(Error(code=FAILURE_CODE, reason=reply_text(exc, context)), reply_to=msg)

    return wrapped


def _evaluate_first(runner: SiteRunner, arrays: Arrays, local: Arrays | None, policy: RoundPolicy, context: Context) -> tuple[RecordDict, dict[str, float]]:
    """The evaluation a train message asks for before training (``evaluate-first``): the
    records to add to the reply (an ``evaluate`` MetricRecord, or an ``evaluate-error``
    ConfigRecord naming what failed, so that the update still goes back) and the seconds
    it took (``client-time-s``, ``client-cpu-s``), which the train reply's figures include."""
    try:
        metrics = runner.evaluate(arrays, local, policy)
    except (ConfigError, DataError) as exc:
        log.error("evaluation before training refused: %s: %s", type(exc).__name__, exc)
        return RecordDict({EVALUATION_ERROR: ConfigRecord({"error": reply_text(exc, context)})}), {}
    spent = {key: metrics.pop(key) for key in ("client-time-s", "client-cpu-s")}
    return RecordDict({EVALUATION: MetricRecord(_identify(metrics, context))}), spent


@app.train()
@reports_input_errors
def train(msg: Message, context: Context) -> Message:
    """Local training from the global model; reply with the shared entries and metrics
    (first evaluating the received model when the server asks: ``evaluate-first``)."""
    runner = runner_for(context)
    config, arrays, local = _config(msg), _arrays(msg), _local_state(context)
    policy = _policy(config)
    extra, spent = RecordDict(), {}
    if bool(config.get(EVALUATE_FIRST, False)):
        extra, spent = _evaluate_first(runner, arrays, local, policy, context)
    shared, local, metrics = runner.train(arrays, local, policy)
    for key, seconds in spent.items():
        metrics[key] += seconds
    if local:
        context.state[LOCAL_STATE_KEY] = arrays_to_record(local)
    content = RecordDict({"arrays": arrays_to_record(shared), "metrics": MetricRecord(_identify(metrics, context)), **extra})
    return Message(content=content, reply_to=msg)


@app.evaluate()
@reports_input_errors
def evaluate(msg: Message, context: Context) -> Message:
    """Validation metrics of the global model on this site (with its local entries); at the
    final round of a run with ``personalise``, the site then adapts that model to its own
    annotated cases, keeps it, and adds the adaptation's scalar figures."""
    runner = runner_for(context)
    arrays, local, policy = _arrays(msg), _local_state(context), _policy(_config(msg))
    metrics = runner.evaluate(arrays, local, policy)
    if policy.final and bool(context.run_config.get(PERSONALISE, False)):
        metrics.update(runner.personalise(arrays, local, policy))
    return Message(content=RecordDict({"metrics": MetricRecord(_identify(metrics, context))}), reply_to=msg)


@app.query()
@reports_input_errors
def query(msg: Message, context: Context) -> Message:
    """Warm-up before the first round: build this node's site runner (site YAML, data splits,
    bank, model) and import what the first local epoch would otherwise import (torch's
    optimisers load ``torch._dynamo`` on first use, seconds per process), so that the rounds
    measure rounds. Replies with ``client-time-s``."""
    t0 = time.perf_counter()
    import torch._dynamo  # noqa: F401

    runner = runner_for(context)
    site = runner.site
    site.train_set, site.val_set  # noqa: B018 - loads and splits the site's slices
    if site.method.uses_retrieval:
        site.bank  # noqa: B018 - the bank over the training slices
    metrics = {"client-time-s": time.perf_counter() - t0}
    return Message(content=RecordDict({"metrics": MetricRecord(_identify(metrics, context))}), reply_to=msg)
