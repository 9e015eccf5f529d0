"""Tests of the retriever on the segmenter's encoder (``retriever.kind: shared_encoder``): what it
owns, what it leaves alone, how the bank, the federation's named arrays, checkpoints and
training see it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_methods import TINY

from federation.protocol import arrays_to_state, local_keys, state_to_arrays
from jras_core.checkpoint import load_model, save_model
from jras_core.config import ConfigError, JRASConfig
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.models.jras import build_model
from jras_core.models.retriever import SharedEncoderRetriever
from jras_core.retrieval.bank import RetrievalBank
from jras_core.training.joint import JRASTrainer

SHARED = {**TINY, "retriever.kind": "shared_encoder"}


def _cfg(**overrides: object) -> JRASConfig:
    return JRASConfig().with_overrides({**SHARED, **overrides})


def _slices(cfg: JRASConfig, cases: int = 3):
    vols = generate_volumes("A", cases, 0, cfg.preprocess.size)
    return build_slice_set(vols, cfg.preprocess, cfg.labels.num_classes)


@pytest.mark.parametrize("backbone", ["unet", "dynunet"])
def test_the_retriever_owns_only_its_head_and_reads_the_segmenters_encoder(backbone):
    model = build_model(_cfg(**{"segmenter.backbone": backbone}))
    retr = model.retr
    assert isinstance(retr, SharedEncoderRetriever) and retr.segmenter is model.seg
    retr_keys = [k for k in model.state_dict() if k.startswith("retr.")]
    assert retr_keys and all(k.startswith("retr.head.") for k in retr_keys)
    # every parameter counted once: the model's are the segmenter's plus the head's
    seg_ids = {id(p) for p in model.seg.parameters()}
    assert not seg_ids & {id(p) for p in retr.parameters()}
    assert sum(p.numel() for p in model.parameters()) == (
        sum(p.numel() for p in model.seg.parameters()) + sum(p.numel() for p in retr.parameters()))
    # the embedding of an image depends on the segmenter's encoder weights
    x = torch.rand(4, retr.in_channels, 32, 32)
    before = retr(x)
    assert before.shape == (4, 8) and torch.allclose(before.norm(dim=1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        next(model.seg.backbone.parameters()).add_(0.5)
    assert not torch.allclose(retr(x), before, atol=1e-4)


def test_embedding_leaves_the_segmenter_untouched_and_trains_only_the_head():
    model = build_model(_cfg())
    seg, retr = model.seg, model.retr
    seg.train()
    stats = {k: v.clone() for k, v in seg.state_dict().items() if "running" in k}
    assert stats  # batch norm: running statistics that a train-mode forward would move
    x = torch.rand(6, retr.in_channels, 32, 32)
    emb = retr(x)
    assert seg.training and seg.backbone.training  # its mode is restored
    assert all(torch.equal(v, seg.state_dict()[k]) for k, v in stats.items())
    # train mode or eval mode of the segmenter: the same features (eval-mode statistics)
    seg.eval()
    assert torch.allclose(retr(x), emb, atol=1e-6)
    emb.sum().backward()
    assert all(p.grad is None for p in seg.parameters())
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in retr.head.parameters())


def test_class_maps_enter_as_pooling_weights():
    model = build_model(_cfg())
    retr = model.retr.eval()
    image = torch.rand(2, 1, 32, 32)
    feats = retr.features(image)
    cells = feats.shape[-1]
    cell = 32 // cells  # pixels per bottleneck cell
    maps = torch.zeros(2, 3, 32, 32)
    maps[:, 0, cell : 2 * cell, cell : 2 * cell] = 1.0  # class 1 covers bottleneck cell (1, 1)
    desc = retr.describe(feats, maps)
    width = feats.shape[1]
    assert desc.shape == (2, width * 4 + 3)
    assert torch.allclose(desc[:, :width], feats.mean(dim=(2, 3)))
    assert torch.allclose(desc[:, width : 2 * width], feats[:, :, 1, 1], atol=1e-6)  # the cell's features
    assert torch.allclose(desc[:, 2 * width :].narrow(1, 0, 2 * width), torch.zeros(2, 2 * width))  # absent classes
    assert torch.allclose(desc[:, -3:], torch.tensor([[1 / cells**2, 0.0, 0.0]] * 2))  # areas
    other = maps.clone()
    other[:, 0] = 0.0
    other[:, 0, 2 * cell : 3 * cell, 2 * cell : 3 * cell] = 1.0
    assert not torch.allclose(retr(torch.cat([image, other], 1)), retr(torch.cat([image, maps], 1)))


def test_bank_refresh_follows_changes_of_the_segmenters_encoder():
    cfg = _cfg()
    model = build_model(cfg)
    bank = RetrievalBank(_slices(cfg), cfg.labels.num_classes)
    bank.refresh(model.retr)
    first = bank.embeddings.copy()
    bank.refresh(model.retr)  # nothing changed: nothing re-embedded
    assert bank.embeddings is not None and np.array_equal(bank.embeddings, first)
    with torch.no_grad():
        next(model.seg.backbone.parameters()).mul_(-1.0)  # the segmenter alone changes
    bank.refresh(model.retr)
    assert not np.allclose(bank.embeddings, first, atol=1e-4)
    expected = model.retr(bank.retriever_input(slice(0, 4), model.retr.in_channels)).detach().numpy()
    assert np.allclose(bank.embeddings[:4], expected, atol=1e-5)


def test_named_arrays_and_checkpoints_carry_the_head_once(tmp_path):
    cfg = _cfg()
    model = build_model(cfg)
    arrays = state_to_arrays(model.state_dict())
    assert set(arrays) == set(model.state_dict())
    retr_local = local_keys(model, keep_norm_local=False, keep_retriever_local=True)
    assert retr_local == {k for k in arrays if k.startswith("retr.head.")}
    other = build_model(cfg.with_overrides({"train.seed": 1}))
    x = torch.rand(3, model.retr.in_channels, 32, 32)
    assert not torch.allclose(other.retr(x), model.retr(x))
    other.load_state_dict(arrays_to_state(arrays))
    assert torch.allclose(other.retr(x), model.retr(x), atol=1e-6)
    loaded, loaded_cfg, _ = load_model(save_model(tmp_path / "m.pt", model, cfg))
    assert loaded_cfg.retriever.kind == "shared_encoder"
    assert loaded.retr.segmenter is loaded.seg
    assert torch.allclose(loaded.retr(x), model.retr(x), atol=1e-6)


def test_the_option_is_validated():
    with pytest.raises(ConfigError, match="kind"):
        JRASConfig().with_overrides({"retriever.kind": "vit"})
    with pytest.raises(ValueError, match="input_size"):
        build_model(_cfg(**{"retriever.input_size": 16}))
    with pytest.raises(ValueError, match="unet or dynunet"):
        build_model(_cfg(**{"segmenter.backbone": "segformer"}))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_joint_training_trains_the_head_and_keeps_the_bank_current(norm):
    cfg = _cfg(**{"segmenter.norm": norm, "contrastive.batch_fraction": 1.0})
    model = build_model(cfg)
    slices = _slices(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    head = {k: v.clone() for k, v in model.retr.state_dict().items()}
    metrics = trainer.fit(2)
    assert all(np.isfinite(m["retr_loss"]) and np.isfinite(m["seg_loss"]) for m in metrics)
    assert any(not torch.equal(v, model.retr.state_dict()[k]) for k, v in head.items())
    # after the epoch's refresh the bank holds what the trained retriever and encoder give now
    model.eval()
    fresh = model.retr(trainer.bank.retriever_input(slice(0, 8), model.retr.in_channels)).detach().numpy()
    assert np.allclose(trainer.bank.embeddings[:8], fresh, atol=1e-5)
    assert F.cosine_similarity(torch.from_numpy(fresh), torch.from_numpy(fresh[:1])).min() < 0.999
