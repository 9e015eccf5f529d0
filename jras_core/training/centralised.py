"""Centralised (pooled) training and evaluation over one or more sites."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from jras_core.checkpoint import save_model
from jras_core.config import JRASConfig
from jras_core.data.slices import SliceSet
from jras_core.models.jras import JRASModel, build_model
from jras_core.retrieval.bank import RetrievalBank
from jras_core.site import Site
from jras_core.training.adapt import adapt_to_site
from jras_core.training.evaluate import evaluate
from jras_core.training.joint import JRASTrainer

log = logging.getLogger(__name__)


def evaluate_sites(model: JRASModel, sites: Sequence[Site], cfg: JRASConfig,
                   pooled_bank: RetrievalBank | None = None, diagnostics: bool = True) -> dict[str, dict[str, float]]:
    """Evaluate every site's validation split; a site without one (e.g. a site of one case,
    which trains on it) is left out of the result, with a warning saying why
    (:attr:`Site.no_validation <jras_core.site.Site.no_validation>`).

    Training sites retrieve from ``pooled_bank`` (own case excluded); a site with
    ``support_cases`` (never trained on) retrieves from its own support bank, with the
    model adapted to it as ``cfg.adapt`` says (:func:`~jras_core.training.adapt.adapt_to_site`)
    and its guides kept or not as its support cases say (:meth:`Site.evaluate`).
    """
    results = {}
    for site in sites:
        if site.no_validation is not None:
            log.warning("%s; not evaluated", site.no_validation)
            continue
        if site.config.support_cases is not None:  # adapted, then evaluated as the site itself does
            site_model = adapt_to_site(model, site.train_set, cfg, site.bank if cfg.uses_retrieval else None)
            results[site.name] = site.evaluate(site_model, diagnostics=diagnostics)
            continue
        bank = None
        if cfg.uses_retrieval:
            if pooled_bank is None:
                bank = site.refresh_bank(model.retr)  # stored embeddings of these weights reused
            else:
                bank = pooled_bank
                bank.refresh(model.retr)
        results[site.name] = evaluate(model, site.val_set, cfg, bank, diagnostics=diagnostics)
    return results


def train_centralised(
    sites: Sequence[Site],
    cfg: JRASConfig,
    out_dir: str | Path | None = None,
    progress: bool = False,
    eval_every: int = 0,
) -> tuple[JRASModel, dict[str, dict[str, float]]]:
    """Pool the training splits of the sites that train, fit, evaluate every site.

    Sites with ``support_cases`` set are held out: they never train and are only
    evaluated, retrieving from their support bank.

    Returns:
        the trained model and ``{site: metrics}``.
    """
    train_sites = [s for s in sites if s.config.support_cases is None]
    if not train_sites:
        raise ValueError("no site to train on: every site is held out (support_cases set)")
    pooled = SliceSet.concat([s.train_set for s in train_sites])
    model = build_model(cfg)
    writer = SummaryWriter(str(Path(out_dir) / "tb")) if out_dir else None
    trainer = JRASTrainer(model, cfg, pooled, writer=writer, progress=progress)
    t0 = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        trainer.train_epoch(guided=trainer.epoch_is_guided(epoch, cfg.train.epochs))
        if eval_every and (epoch + 1) % eval_every == 0 and writer is not None:
            for name, m in evaluate_sites(model, sites, cfg, trainer.bank, diagnostics=False).items():
                writer.add_scalar(f"val/{name}/dice_mean", m["dice_mean"], epoch)
    train_time = time.perf_counter() - t0
    results = evaluate_sites(model, sites, cfg, trainer.bank)
    if out_dir:
        out = Path(out_dir)
        save_model(out / "model.pt", model, cfg, sites=[s.name for s in sites])
        skipped = {s.name: s.no_validation for s in sites if s.name not in results}
        (out / "metrics.json").write_text(
            json.dumps({"train_time_s": train_time, "sites": results, "not_evaluated": skipped}, indent=2)
        )
        for name, m in results.items():
            for key, value in m.items():
                writer.add_scalar(f"final/{name}/{key}", value, cfg.train.epochs)
        writer.close()
    return model, results
