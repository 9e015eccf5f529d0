"""Tiny method configurations for fast tests of the models and their training, and the models
and query sets built from them."""

from __future__ import annotations

import torch

from jras_core.config import JRASConfig
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.models.jras import JRASModel, build_model
from jras_core.models.retriever import Retriever
from jras_core.retrieval.bank import RetrievalBank

TINY = {"preprocess.size": 32, "preprocess.fov_mm": 200.0, "segmenter.channels": [4, 8, 16],
        "retriever.channels": [4, 8], "retriever.embed_dim": 8, "train.batch_size": 8}
"""A tiny method: 32 px slices, a [4, 8, 16] segmenter, an 8-d retriever, batches of 8."""

TINY16 = {
    "preprocess.size": 32,
    "preprocess.fov_mm": 200.0,
    "segmenter.channels": [8, 16, 32],
    "retriever.channels": [8, 16],
    "retriever.embed_dim": 16,
    "train.batch_size": 16,
}
"""A tiny method with a [8, 16, 32] segmenter, a 16-d retriever and batches of 16."""

BASE = {"preprocess.size": 32, "segmenter.channels": [4, 8, 16], "retriever.channels": [4, 8, 8],
        "retriever.embed_dim": 16}
"""The small networks of the method levers' tests (the other options at their defaults)."""

INPUT_PATH_DROPOUT = {"segmenter.guide_path": "input", "retrieval.guide_dropout": 0.3}
"""The input guide path, with guide dropout: the one network's guide-free forward is a shortcut."""


TRAINED_ACDC = {
    "preprocess.size": 32, "preprocess.fov_mm": 240.0, "segmenter.channels": [8, 16, 32],
    "retriever.channels": [4, 8], "retriever.embed_dim": 8, "train.batch_size": 16, "train.epochs": 12,
    "contrastive.steps_per_epoch": 1, "augment.intensity": False, "retrieval.test_passes": 2,
}
"""A tiny method that learns enough of real ACDC patients in a few seconds (on one thread) to find
the heart's structures: 32 px over 240 mm, two retrieval passes."""


def train_acdc_site(folder, manifest, cases, val_fraction: float = 0.0):
    """Train :data:`TRAINED_ACDC` on the training cases of a site of the ACDC ``cases`` (read in
    place from ``manifest``); returns its checkpoint and the site YAML, both in ``folder``."""
    from jras_core.checkpoint import save_model
    from jras_core.site import Site, SiteConfig

    site_yaml = folder / "site.yaml"
    site_yaml.write_text(f"name: bank\ndata:\n  kind: manifest\n  path: {manifest}\n"
                         f"  where: {{case: [{', '.join(cases)}]}}\nval_fraction: {val_fraction}\n")
    cfg = JRASConfig().with_overrides(TRAINED_ACDC)
    torch.manual_seed(0)
    model = build_model(cfg)
    Site(SiteConfig.from_yaml(site_yaml), cfg, site_yaml.parent).train(model)
    return save_model(folder / "model.pt", model, cfg), site_yaml


def sized_retriever_model(cfg: JRASConfig) -> JRASModel:
    """``build_model(cfg)`` with a retriever that embeds at ``cfg.retriever.input_size``."""
    model = build_model(cfg)
    r = cfg.retriever
    retr = Retriever(model.retr.in_channels, r.embed_dim, r.channels, r.pool_grid, input_size=r.input_size)
    return JRASModel(model.seg, retr)


def one_patient(cfg: JRASConfig):
    """One synthetic patient, both cardiac phases: a site with a single training case."""
    return build_slice_set(generate_volumes("A", 1, seed=5, size=32), cfg.preprocess, cfg.labels.num_classes)


def inference_setup(slices, passes: int):
    """A method config with ``passes`` retrieval rounds and no post-processing, an untrained
    model, a bank of ``slices`` embedded by its retriever, and every third slice as queries."""
    cfg = JRASConfig().with_overrides({**TINY, "postprocess.largest_component": False, "retrieval.test_passes": passes})
    torch.manual_seed(0)
    model = build_model(cfg)
    bank = RetrievalBank(slices, cfg.labels.num_classes)
    bank.refresh(model.retr)
    return cfg, model, bank, slices.subset(torch.arange(0, len(slices), 3))
