"""Speed paths and options: FAISS search (threads, BLAS switch-over), the bank's flat FAISS
index, the translation grid of guide alignment, the retriever's group-norm form of
instance normalisation, the retriever input size option, training's reused pass 1
(prediction memory) and phase B's stored candidate keys."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jras_core.config import ConfigError, JRASConfig
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.models.jras import JRASModel, build_model
from jras_core.models.retriever import Retriever
from jras_core.retrieval.bank import BLAS_MIN_QUERIES, RetrievalBank, exact_topk, faiss_search
from jras_core.retrieval.finder import GuideFinder
from jras_core.retrieval.guides import translate, translation_grid

TINY = {"preprocess.size": 32, "preprocess.fov_mm": 200.0, "segmenter.channels": [4, 8, 16],
        "retriever.channels": [4, 8], "retriever.embed_dim": 8, "train.batch_size": 8}
INPUT_PATH = {"segmenter.guide_path": "input", "retrieval.guide_dropout": 0.3}
"""The input guide path, with guide dropout: the one network's guide-free forward is a shortcut."""


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def slices():
    cfg = JRASConfig().with_overrides(TINY)
    return build_slice_set(generate_volumes("A", 4, seed=2, size=32), cfg.preprocess, cfg.labels.num_classes)


@pytest.mark.parametrize("nq", [1, BLAS_MIN_QUERIES - 1, BLAS_MIN_QUERIES, 64])
def test_faiss_search_equals_brute_force_on_both_paths(nq):
    rng = np.random.default_rng(nq)
    x, q = _unit(rng, 3000, 32), _unit(rng, nq, 32)
    index = faiss.IndexFlatIP(32)
    index.add(x)
    sims, idx = faiss_search(index, q.astype(np.float64), 7)  # any float dtype is accepted
    t_sims, t_idx = exact_topk(torch.from_numpy(q), torch.from_numpy(x), 7)
    assert idx.dtype == np.int64 and sims.dtype == np.float32
    assert np.array_equal(idx, t_idx.numpy())
    assert np.allclose(sims, t_sims.numpy(), atol=1e-5)
    assert faiss.omp_get_max_threads() == torch.get_num_threads()


def test_bank_flat_index_is_faiss_and_exact(slices):
    bank = RetrievalBank(slices, num_classes=4)
    rng = np.random.default_rng(0)
    emb = _unit(rng, len(slices), 16)
    bank.set_embeddings(emb)
    assert isinstance(bank.index, faiss.IndexFlatIP) and bank.index.ntotal == len(slices)
    q = torch.from_numpy(_unit(rng, 12, 16))
    sims, idx = bank.search(q, 5)
    t_sims, t_idx = exact_topk(q, torch.from_numpy(emb), 5)
    assert torch.equal(idx, t_idx) and torch.allclose(sims, t_sims, atol=1e-5)
    # own-case exclusion still holds
    exclude = bank.slices.case_ids[:12]
    _, idx = bank.search(q, 5, exclude)
    assert not (bank.slices.case_ids[idx] == exclude.view(-1, 1)).any()


@pytest.mark.parametrize("hw", [(32, 32), (17, 40)])
def test_translation_grid_equals_affine_grid(hw):
    h, w = hw
    offsets = (torch.rand(6, 2) - 0.5) * 2
    theta = torch.zeros(6, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -offsets
    assert torch.equal(translation_grid(offsets, h, w), F.affine_grid(theta, [6, 1, h, w], align_corners=True))
    images = torch.rand(6, 2, h, w)
    expected = F.grid_sample(images, F.affine_grid(theta, [6, 2, h, w], align_corners=True), align_corners=True)
    assert torch.equal(translate(images, offsets), expected)


def test_retriever_norm_is_instance_norm_without_running_stats():
    torch.manual_seed(0)
    retr = Retriever(in_channels=2, embed_dim=8, channels=(4, 8))
    norms = [m for m in retr.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels and not m.affine for m in norms)
    assert not any(getattr(m, "track_running_stats", False) for m in retr.modules())
    assert not any(n.startswith("encoder") and "adn" in n for n in retr.state_dict())  # no norm parameters
    x = torch.rand(3, 2, 32, 32)
    out = retr(x)
    with torch.no_grad():
        h = x
        for conv in [m for m in retr.encoder.modules() if isinstance(m, torch.nn.Conv2d)]:
            h = F.relu(F.instance_norm(conv(h)))
        ref = F.normalize(retr.head(h.mean(dim=(2, 3))), dim=1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_retriever_input_size_resamples_every_input():
    torch.manual_seed(0)
    small = Retriever(in_channels=4, embed_dim=8, channels=(4, 8), input_size=16).eval()
    plain = Retriever(in_channels=4, embed_dim=8, channels=(4, 8)).eval()
    plain.load_state_dict(small.state_dict())  # the option adds no weights
    x = torch.rand(3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), plain(F.avg_pool2d(x, 2)), atol=1e-6)
        assert torch.equal(small(x[..., ::2, ::2]), plain(x[..., ::2, ::2]))  # already 16 px: unchanged
    with pytest.raises(ValueError):
        Retriever(in_channels=1, input_size=0)


def test_retriever_input_size_is_validated():
    assert JRASConfig().retriever.input_size is None
    assert JRASConfig().with_overrides({"retriever.input_size": 64}).retriever.input_size == 64
    for bad in (8, 40, 0):
        with pytest.raises(ConfigError, match="input_size"):
            JRASConfig().with_overrides({"retriever.input_size": bad})


def _model(cfg: JRASConfig) -> JRASModel:
    """``build_model(cfg)`` with a retriever that embeds at ``cfg.retriever.input_size``."""
    model = build_model(cfg)
    r = cfg.retriever
    retr = Retriever(model.retr.in_channels, r.embed_dim, r.channels, r.pool_grid, input_size=r.input_size)
    return JRASModel(model.seg, retr)


def test_finder_refuses_a_retriever_built_for_another_input_size(slices):
    cfg = JRASConfig().with_overrides({**TINY, "retriever.input_size": 16})
    bank = RetrievalBank(slices, cfg.labels.num_classes)
    with pytest.raises(ValueError, match="input_size"):
        GuideFinder(build_model(cfg.with_overrides({"retriever.input_size": None})), bank, cfg)
    GuideFinder(_model(cfg), bank, cfg)


@pytest.mark.slow
def test_training_with_a_smaller_retriever_input(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "retriever.input_size": 16, "contrastive.steps_per_epoch": 1})
    model = _model(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    before = trainer.bank.embeddings.copy()
    metrics = trainer.train_epoch()
    assert np.isfinite(metrics["retr_loss"]) and metrics["retr_time_s"] > 0
    assert trainer.bank.embeddings.shape == (len(slices), 8) and (trainer.bank.embeddings != before).any()
    # bank entries are embedded from 16 px inputs, like the queries
    with torch.no_grad():
        first = model.retr.eval()(F.avg_pool2d(trainer.bank.retriever_input(slice(0, 4)), 2))
    assert np.allclose(trainer.bank.embeddings[:4], first.numpy(), atol=1e-5)


def test_bank_retriever_input_channels(slices):
    bank = RetrievalBank(slices, num_classes=4)
    idx = torch.tensor([0, 3])
    assert torch.equal(bank.retriever_input(idx, 1), slices.images[idx])
    full = bank.retriever_input(idx)
    assert full.shape == (2, 4, 32, 32) and torch.equal(full[:, :1], slices.images[idx])


# --------------------------------------------------------------------------- federation warm-up


def test_warm_up_before_round_one(tmp_path, in_process_grid):
    """With run-config ``warm-up = true`` the server first sends every node a ``query``; each site
    loads its data and bank then; the rounds follow as before and the warm-up is logged
    in ``startup.json``, not as a round."""
    import json

    from test_federation import base_run_config, run_dir, run_server, write_sites

    from client import site_runner
    from federation import protocol
    from server.settings import ServerSettings
    from server.tracking import METRICS_FILE, STARTUP_FILE

    site_runner.clear_cache()
    assert ServerSettings.from_run_config({"warm-up": True}).warm_up and not ServerSettings().warm_up
    with pytest.raises(ConfigError, match="warm-up"):
        ServerSettings.from_run_config({"warm-up": 1})
    sites = write_sites(tmp_path, "AB", cases=4) + [str(tmp_path / "nowhere.yaml")]
    rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "min-nodes": 2, "fraction-evaluate": 0.0,
                                             "warm-up": True})
    grid = run_server(in_process_grid, rc)
    types = [m.metadata.message_type for m in grid.sent]
    assert types[:3] == ["query"] * 3 and types[3:] == ["train"] * 3
    assert [m.has_error() for m in grid.received[:3]] == [False, False, True]  # the missing site is reported
    ready = [site_runner.get_runner(p, protocol.method_from_run_config(rc)).site for p in sites[:2]]
    assert all(s._slices is not None and s._bank is not None for s in ready)
    folder = run_dir(rc) / "tensorboard"
    startup = json.loads((folder / STARTUP_FILE).read_text())
    assert startup["sites"] == 3 and startup["sites_ready"] == 2 and startup["wall_time_s"] > 0
    assert all(t > 0 for t in startup["client-time-s"].values())
    assert [json.loads(x)["round"] for x in (folder / METRICS_FILE).read_text().splitlines()] == [1]
    site_runner.clear_cache()


def test_no_warm_up_unless_asked_and_the_same_model_either_way(tmp_path, in_process_grid):
    from test_federation import base_run_config, run_dir, run_server, write_sites

    from client import site_runner
    from server.checkpoint import load_checkpoint
    from server.tracking import STARTUP_FILE

    sites = write_sites(tmp_path, "AB", cases=4)
    finals = {}
    for flag in (False, True):
        site_runner.clear_cache()
        rc = base_run_config(tmp_path, sites, **{"num-server-rounds": 1, "fraction-evaluate": 0.0,
                                                 "run-name": f"warm-{flag}", "warm-up": flag})
        grid = run_server(in_process_grid, rc)
        assert ("query" in {m.metadata.message_type for m in grid.sent}) == flag
        assert (run_dir(rc) / "tensorboard" / STARTUP_FILE).exists() == flag
        finals[flag] = load_checkpoint(run_dir(rc)).arrays
    # the warm-up changes when sites get ready, not what they train
    assert all(np.array_equal(finals[False][k], finals[True][k]) for k in finals[False])
    site_runner.clear_cache()


# --------------------------------------------------------------------------- guide-free forward


@pytest.mark.parametrize("backbone", ["unet", "segformer"])
def test_forward_without_guides_equals_the_zero_padded_input(backbone):
    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.backbone": backbone,
                                       "segmenter.channels": [8, 16, 32], **INPUT_PATH})
    seg = build_model(cfg).seg.train()
    x = torch.rand(4, 1, 32, 32)
    absent = torch.zeros(4, dtype=torch.bool)
    out = seg(x, torch.rand(4, 3, 1, 32, 32), torch.randint(0, 4, (4, 3, 32, 32)), None, absent)
    assert seg._query_channel_exact is True
    full = seg.backbone(torch.cat([x, torch.zeros(4, seg.in_channels - 1, 32, 32)], dim=1))
    # equal up to the float rounding of the convolution kernels, which differs between CPUs
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)
    # gradients reach the query-channel weights of the input layers, as with the full input
    out.square().mean().backward()
    first = seg._input_layers()[0][1]
    assert first.weight.grad is not None and first.weight.grad[:, :1].abs().sum() > 0
    assert torch.count_nonzero(first.weight.grad[:, 1:]) == 0


def test_forward_without_guides_falls_back_when_the_shortcut_differs(monkeypatch):
    cfg = JRASConfig().with_overrides({"preprocess.size": 32, "segmenter.channels": [8, 16, 32], **INPUT_PATH})
    seg = build_model(cfg).seg.eval()
    monkeypatch.setattr(seg, "_query_channel_forward", lambda image: torch.zeros(len(image), 4, 32, 32))
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        out = seg.forward_without_guides(x)
        full = seg.backbone(torch.cat([x, torch.zeros(2, seg.in_channels - 1, 32, 32)], dim=1))
    assert seg._query_channel_exact is False and torch.equal(out, full)


# --------------------------------------------------------------------------- reused pass 1, stored keys


def test_prediction_memory_round_trip():
    from jras_core.training.memory import PredictionMemory

    mem = PredictionMemory(6, num_classes=4, size=8)
    probs = torch.softmax(torch.randn(3, 4, 8, 8), dim=1)
    views = torch.rand(3, 1, 8, 8)
    idx = torch.tensor([4, 0, 2])
    mem.store(idx, probs, views)
    back, known = mem.recall(torch.tensor([0, 1, 2, 4]))
    assert known.tolist() == [True, False, True, True]
    assert torch.allclose(back[[0, 2, 3]], probs[[1, 2, 0]], atol=2.5 / 255)
    assert torch.equal(back[1, 0], torch.ones(8, 8)) and not back[1, 1:].any()  # unknown: background
    assert torch.allclose(mem.views(torch.tensor([2, 4])), views[[2, 0]], atol=1e-3)
    with pytest.raises(ValueError, match=r"\(3, 4, 8, 8\)"):
        mem.store(idx, probs[:, :3], views)


class _PassOneCounter:
    """Counts the queries that ``GuideFinder.first_pass`` runs on."""

    def __init__(self, finder: GuideFinder):
        self.images = 0
        original = finder.first_pass

        def counted(images):
            self.images += images.shape[0]
            return original(images)

        finder.first_pass = counted


@pytest.mark.slow
def test_reused_first_pass_runs_pass_one_only_for_unseen_slices(slices):
    from jras_core.training.joint import JRASTrainer

    n = len(slices)
    fresh_cfg = JRASConfig().with_overrides({**TINY, **INPUT_PATH, "retrieval.first_pass": "fresh",
                                             "contrastive.batch_fraction": 1.0})
    fresh = JRASTrainer(build_model(fresh_cfg), fresh_cfg, slices)
    fresh_count = _PassOneCounter(fresh.finder)
    fresh.phase_segmenter()  # pass 1 only for the queries whose guides are not dropped
    assert fresh.memory is None and 0 < fresh_count.images < n
    fresh_count.images = 0
    fresh.phase_retriever()
    assert fresh_count.images == n

    cfg = fresh_cfg.with_overrides({"retrieval.first_pass": "reuse"})
    trainer = JRASTrainer(build_model(cfg), cfg, slices)
    count = _PassOneCounter(trainer.finder)
    trainer.phase_segmenter()
    assert 0 < count.images < n and bool(trainer.memory.known.all())
    remembered, _ = trainer.memory.recall(torch.arange(n))
    # what phase A kept is its own (guided) prediction, not the pass 1 it started from
    first = trainer.finder.first_pass(slices.images)
    count.images = 0
    assert (remembered - first).abs().max() > 0.05
    trainer.phase_retriever()
    trainer.phase_segmenter()
    assert count.images == 0
    # phase B's queries are the remembered views with their predictions, not new augmentations
    seen = []
    query_input = trainer.finder.query_input
    trainer.finder.query_input = lambda images, probs: seen.append((images, probs)) or query_input(images, probs)
    augmented = []
    augment = trainer.augment
    trainer.augment = lambda x: augmented.append(x) or augment(x)
    trainer.phase_retriever()
    assert len(seen) == len(trainer._batches()) and not augmented
    all_views, all_probs = trainer.memory.views(torch.arange(n)), trainer.memory.recall(torch.arange(n))[0]
    for images, probs in seen:
        rows = [int((all_views - img).abs().flatten(1).sum(1).argmin()) for img in images]
        assert torch.equal(images, all_views[rows]) and torch.equal(probs, all_probs[rows])
    # a later trainer given the memory (as a site keeps it across rounds) starts from it
    later = JRASTrainer(build_model(cfg), cfg, slices, memory=trainer.memory)
    later_count = _PassOneCounter(later.finder)
    later.phase_segmenter()
    assert later_count.images == 0


@pytest.mark.slow
def test_warmup_first_epoch_trains_without_guides_and_fills_the_memory(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "retrieval.first_pass": "warmup", "retrieval.guide_dropout": 0.0})
    trainer = JRASTrainer(build_model(cfg), cfg, slices)
    count = _PassOneCounter(trainer.finder)
    guided_inputs = []
    forward = trainer.model.seg.forward

    def watched(images, guide_images=None, *args, **kwargs):
        guided_inputs.append(guide_images is not None)
        return forward(images, guide_images, *args, **kwargs)

    trainer.model.seg.forward = watched
    found = []
    find = trainer.finder.find
    trainer.finder.find = lambda *a, **k: found.append(1) or find(*a, **k)
    trainer.fit(2)
    steps = len(trainer._batches())
    # epoch 0: guide-free steps that fill the memory; epoch 1: every step guided, no pass 1 at all
    assert guided_inputs[:steps] == [False] * steps and all(guided_inputs[steps : 2 * steps])
    assert count.images == 0 and len(found) == steps and bool(trainer.memory.known.all())

    # a call of a single epoch stays guided (pass 1 for the unseen slices, as with reuse)
    single = JRASTrainer(build_model(cfg), cfg, slices)
    single_count = _PassOneCounter(single.finder)
    single.fit(1)
    assert single_count.images == len(slices)


@pytest.mark.slow
def test_a_round_of_local_training_does_not_depend_on_the_previous_one():
    """The prediction memory lives for one call of ``Site.train``: the same global model
    gives the same local update whatever the site trained before (as after a resume)."""
    from jras_core.data.sources import DataSourceConfig
    from jras_core.site import Site, SiteConfig

    cfg = JRASConfig().with_overrides({**TINY, "retrieval.first_pass": "reuse", "contrastive.steps_per_epoch": 1})

    def site():
        return Site(SiteConfig(name="s", data=DataSourceConfig(kind="synthetic", vendor="B", cases=3, size=32)), cfg)

    start = build_model(cfg).state_dict()
    fresh_site, used_site = site(), site()
    used_site.train(build_model(cfg.with_overrides({"train.seed": 1})), epochs=1)  # an earlier round
    updates = []
    for s in (fresh_site, used_site):
        model = build_model(cfg)
        model.load_state_dict(start)
        s.train(model, epochs=2)
        updates.append(model.state_dict())
    assert all(torch.equal(updates[0][k], updates[1][k]) for k in updates[0])


def test_stored_keys_embed_only_the_queries_in_phase_b(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "contrastive.keys": "stored", "contrastive.batch_fraction": 1.0})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    embedded = []
    handle = model.retr.register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].shape[0]))
    before = [p.detach().clone() for p in model.retr.parameters()]
    trainer.bank.refresh = lambda retriever: None  # count phase B's own forwards only
    metrics = trainer.phase_retriever()
    handle.remove()
    bs = cfg.train.batch_size
    expected = [min(bs, n - i) for n in [len(slices)] for i in range(0, n, bs)]
    assert embedded == expected  # one forward per batch, of its queries: no candidate is embedded
    assert np.isfinite(metrics["retr_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.retr.parameters()))
    idx = torch.tensor([[2, -1], [0, 5]])
    rows = trainer.bank.embeddings_at(idx)
    assert rows.shape == (2, 2, 8) and torch.equal(rows[1, 1], torch.from_numpy(trainer.bank.embeddings[5]))
    assert torch.equal(rows[0, 1], torch.from_numpy(trainer.bank.embeddings[0]))


def test_pass_one_and_key_options_are_validated():
    cfg = JRASConfig()
    assert cfg.retrieval.first_pass == "reuse" and cfg.contrastive.keys == "stored"
    with pytest.raises(ConfigError, match="first_pass"):
        cfg.with_overrides({"retrieval.first_pass": "stale"})
    with pytest.raises(ConfigError, match="keys"):
        cfg.with_overrides({"contrastive.keys": "cached"})
    with pytest.raises(RuntimeError, match="refresh"):
        RetrievalBank(build_slice_set(generate_volumes("A", 2, seed=0, size=32), cfg.with_overrides(TINY).preprocess, 4),
                      4).embeddings_at(torch.tensor([0]))


@pytest.mark.slow
def test_phase_a_retrieves_only_for_queries_that_keep_their_guides(slices):
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, **INPUT_PATH, "retrieval.guide_dropout": 0.5})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, slices)
    found, kept = [], []
    find = trainer.finder.find
    trainer.finder.find = lambda images, *a, **kw: found.append(images.shape[0]) or find(images, *a, **kw)
    forward = model.seg.forward

    def seg_forward(image, guide_images=None, guide_masks=None, guide_sims=None, guide_present=None):
        if guide_images is not None:  # a phase-A step (pass 1 comes without guides)
            kept.append(guide_present.clone())
            # dropped queries come with blank guides; kept ones with real ones
            assert not guide_images[~guide_present].any() and not guide_masks[~guide_present].any()
            assert guide_masks[guide_present].flatten(1).any(dim=1).all()
        return forward(image, guide_images, guide_masks, guide_sims, guide_present)

    model.seg.forward = seg_forward
    trainer.phase_segmenter()
    present = torch.cat(kept)
    assert len(present) == len(slices) and 0 < int(present.sum()) < len(slices)
    assert sum(found) == int(present.sum())


def test_guides_placed_in_a_larger_batch():
    from jras_core.retrieval.finder import Guides

    sub = Guides(torch.rand(2, 3, 1, 4, 4), torch.randint(1, 4, (2, 3, 4, 4)), torch.rand(2, 3),
                 torch.tensor([[5, 6, 7], [8, -1, 9]]))
    out = sub.placed(torch.tensor([3, 0]), 5)
    assert out.images.shape == (5, 3, 1, 4, 4) and out.idx.shape == (5, 3)
    assert torch.equal(out.images[3], sub.images[0]) and torch.equal(out.masks[0], sub.masks[1])
    assert torch.equal(out.idx[[1, 2, 4]], torch.full((3, 3), -1)) and not out.images[[1, 2, 4]].any()
    assert not out.masks[[1, 2, 4]].any() and not out.sims[[1, 2, 4]].any()


def _one_patient(cfg: JRASConfig):
    """One synthetic patient, both cardiac phases: a site with a single training case."""
    return build_slice_set(generate_volumes("A", 1, seed=5, size=32), cfg.preprocess, cfg.labels.num_classes)


def test_exclusion_unit_of_the_bank(slices, tmp_path):
    cfg = JRASConfig().with_overrides(TINY)
    one = _one_patient(cfg)
    assert len(one.volumes) == 2 and len(set(one.case_ids.tolist())) == 1
    assert RetrievalBank(one, 4, exclude="auto").exclude == "volume"
    assert RetrievalBank(slices, 4, exclude="auto").exclude == "case"
    with pytest.raises(ValueError, match="exclude"):
        RetrievalBank(one, 4, exclude="patient")
    rng = np.random.default_rng(0)
    emb = _unit(rng, len(one), 8)
    for unit, eligible in (("case", 0), ("volume", 1)):
        bank = RetrievalBank(one, 4, exclude=unit)
        bank.set_embeddings(emb)
        owners = bank.owner_keys(one)
        exclude = bank.owner_ids_of(owners, len(one))
        _, idx = bank.search(torch.from_numpy(emb), 3, exclude)
        found = idx >= 0
        assert bool(found.any()) == bool(eligible)
        # never a slice of the query's own volume; with "case", nothing at all
        own_volume = one.volume_ids[idx.clamp_min(0)] == one.volume_ids.view(-1, 1)
        assert not (own_volume & found).any()
        if eligible:
            assert found.all()  # the other phase holds more than 3 slices
    # the unit in force survives a save and load
    bank = RetrievalBank(one, 4, exclude="volume")
    bank.set_embeddings(emb)
    bank.save(tmp_path / "bank")
    assert RetrievalBank.load(tmp_path / "bank").exclude == "volume"


@pytest.mark.slow
def test_single_patient_site_trains_with_guides_from_its_other_phase():
    from jras_core.training.joint import JRASTrainer

    cfg = JRASConfig().with_overrides({**TINY, "retrieval.guide_dropout": 0.0})
    one = _one_patient(cfg)
    counts = {}
    volume_of = [v.key for v in one.volumes]
    for unit in ("case", "auto"):
        trainer = JRASTrainer(build_model(cfg), cfg.with_overrides({"retrieval.exclude": unit}), one)
        guided = []
        find = trainer.finder.find

        def spy(images, owners=None, *a, _find=find, _guided=guided, **kw):
            guides, probs = _find(images, owners, *a, **kw)
            _guided.append((guides.idx >= 0).any(dim=1))
            # a guide never comes from the query's own volume
            for row, owner in zip(guides.idx.tolist(), owners):
                assert all(volume_of[one.volume_ids[i]] != owner for i in row if i >= 0)
            return guides, probs

        trainer.finder.find = spy
        trainer.phase_segmenter()
        counts[unit] = int(torch.cat(guided).sum())
    assert counts["case"] == 0
    assert counts["auto"] == len(one)


def _inference_setup(slices, passes: int):
    """A method config with ``passes`` retrieval rounds and no post-processing, an untrained
    model, a bank of ``slices`` embedded by its retriever, and every third slice as queries."""
    cfg = JRASConfig().with_overrides({**TINY, "postprocess.largest_component": False, "retrieval.test_passes": passes})
    torch.manual_seed(0)
    model = build_model(cfg)
    bank = RetrievalBank(slices, cfg.labels.num_classes)
    bank.refresh(model.retr)
    return cfg, model, bank, slices.subset(torch.arange(0, len(slices), 3))


def test_test_draws_average_the_softmax_over_guide_sets(slices):
    from jras_core.training.evaluate import predict

    cfg, model, bank, queries = _inference_setup(slices, passes=1)
    _, used_one = predict(model, queries, cfg, bank, exclude_own_case=False, seed=4)
    drawn_cfg = cfg.with_overrides({"retrieval.test_draws": 3})
    three, used_three = predict(model, queries, drawn_cfg, bank, exclude_own_case=False, seed=4)
    # the first set is the top K, as with one draw
    assert torch.equal(torch.cat([g.idx for g in used_one]), torch.cat([g.idx for g in used_three]))
    # the prediction is the argmax of the mean softmax over the top K and two draws from the pool
    finder = GuideFinder(model, bank, drawn_cfg, torch.Generator().manual_seed(4))
    with torch.no_grad():
        sets = finder.find_draws(queries.images, 3)
        assert len(sets) == 3 and all(g.idx.shape == (len(queries), 3) for g in sets)
        top_pool = finder.rank(queries.images, finder.first_pass(queries.images), 5, None)[1]
        for g in sets[1:]:
            assert all(set(row) <= set(pool) for row, pool in zip(g.idx.tolist(), top_pool.tolist()))
        probs = torch.stack([
            torch.softmax(model.seg(queries.images, g.images, g.masks, g.sims, (g.idx >= 0).any(1)), dim=1)
            for g in sets
        ]).mean(0)
    assert torch.equal(three, probs.argmax(1))
    assert not torch.equal(sets[1].idx, sets[0].idx) or not torch.equal(sets[2].idx, sets[0].idx)
    with pytest.raises(ConfigError, match="test_draws"):
        JRASConfig().with_overrides({"retrieval.test_draws": 0})


def test_test_passes_retrieve_again_with_the_guided_prediction(slices, monkeypatch):
    from jras_core.training.evaluate import predict

    cfg, model, bank, queries = _inference_setup(slices, passes=2)
    calls = []
    find = GuideFinder.find

    def spy(self, images, owners=None, source="retrieved", true_masks=None, train_pool=None, probs=None):
        guides, used = find(self, images, owners, source, true_masks, train_pool, probs)
        calls.append((probs, used, guides))
        return guides, used

    monkeypatch.setattr(GuideFinder, "find", spy)
    pred, used = predict(model, queries, cfg, bank, exclude_own_case=False)
    assert len(calls) == 2 and calls[0][0] is None  # round 1: the guide-free pass 1
    with torch.no_grad():
        first = calls[0][2]
        logits = model.seg(queries.images, first.images, first.masks, first.sims, (first.idx >= 0).any(1))
        # round 2 retrieves and aligns with round 1's guided prediction
        assert torch.allclose(calls[1][0], torch.softmax(logits, dim=1), atol=1e-6)
        second = calls[1][2]
        final = model.seg(queries.images, second.images, second.masks, second.sims, (second.idx >= 0).any(1))
    assert torch.equal(pred, final.argmax(1)) and used[0] is second
    with pytest.raises(ConfigError, match="test_passes"):
        JRASConfig().with_overrides({"retrieval.test_passes": 0})


def test_test_views_average_shared_intensity_changes_of_query_and_guides(slices, monkeypatch):
    from jras_core.data.augment import BatchIntensityAugment
    from jras_core.models.segmenter import GuidedSegmenter
    from jras_core.training.evaluate import _with_views, predict

    cfg, model, bank, queries = _inference_setup(slices, passes=1)
    # noiseless changes, on every view: a guide equal to its query must stay equal to it
    viewed = cfg.with_overrides({"augment.test_views": 3, "augment.prob": 1.0, "augment.noise_std": 0.0})
    plain_pred, used = predict(model, queries, cfg, bank, exclude_own_case=False)
    seen = []
    forward = GuidedSegmenter.forward

    def spy(self, image, guide_images=None, guide_masks=None, guide_sims=None, guide_present=None):
        seen.append((image.clone(), None if guide_images is None else guide_images.clone()))
        return forward(self, image, guide_images, guide_masks, guide_sims, guide_present)

    monkeypatch.setattr(GuidedSegmenter, "forward", spy)
    pred, _ = predict(model, queries, viewed, bank, exclude_own_case=False, seed=2)
    views = seen[-3:]  # after pass 1 and the guided forward: the three changed views
    guides = used[0]
    for image, guide_images in views:
        assert not torch.allclose(image, queries.images)  # the query was changed
        # every present guide received a change, and missing ones stay blank
        present = guides.idx >= 0
        assert not torch.allclose(guide_images[present], guides.images[present])
        assert torch.all(guide_images[~present] == 0)
    # the same draw for a query and its guides: with the guides replaced by the query itself,
    # each changed guide equals its changed query
    same = guides.with_images(queries.images.unsqueeze(1).expand_as(guides.images).clone())
    seen.clear()
    with torch.no_grad():
        probs = torch.softmax(model.seg(queries.images, same.images, same.masks, same.sims, same.idx.ge(0).any(1)), 1)
        averaged = _with_views(model, queries.images, same, probs, BatchIntensityAugment(viewed.augment, seed=5), 3,
                               viewed)
    assert averaged.shape == probs.shape and torch.allclose(averaged.sum(1), torch.ones_like(averaged[:, 0]))
    for image, guide_images in seen[1:]:
        for k in range(guide_images.shape[1]):
            rows = same.idx[:, k] >= 0
            assert torch.allclose(guide_images[rows, k], image[rows], atol=1e-5)
    # an unchanged prediction without views, a different one with them, and the same again for the same seed
    assert torch.equal(plain_pred, predict(model, queries, cfg, bank, exclude_own_case=False)[0])
    again, _ = predict(model, queries, viewed, bank, exclude_own_case=False, seed=2)
    assert torch.equal(pred, again)


def test_test_views_for_a_model_without_retrieval_and_validation(slices):
    from jras_core.training.evaluate import predict

    cfg = JRASConfig().with_overrides({**TINY, "segmenter.fusion": "none", "postprocess.largest_component": False})
    torch.manual_seed(0)
    model = build_model(cfg)
    queries = slices.subset(torch.arange(0, len(slices), 3))
    viewed = cfg.with_overrides({"augment.test_views": 2})
    with torch.no_grad():
        base = torch.softmax(model.seg(queries.images), dim=1)
    pred, used = predict(model, queries, viewed, seed=1)
    assert used == []
    # the averaged probabilities differ from the unchanged query's: some pixel's label moves
    assert pred.shape == base.argmax(1).shape and not torch.equal(pred, base.argmax(1))
    with pytest.raises(ConfigError, match="test_views"):
        JRASConfig().with_overrides({"augment.test_views": -1})
    with pytest.raises(ConfigError, match="augment.intensity"):
        JRASConfig().with_overrides({"augment.test_views": 2, "augment.intensity": False})


def test_align_scale_matches_the_guides_foreground_area_to_the_predicted_one(slices):
    cfg, model, bank, _ = _inference_setup(slices, passes=1)
    scaled_cfg = cfg.with_overrides({"retrieval.align_scale": 1.5})
    idx = torch.arange(6).view(2, 3)
    guide_area = bank.areas_at(idx)
    # a predicted foreground of a known area for each query: a square at the image centre
    size = slices.size
    probs = torch.zeros(2, cfg.labels.num_classes, size, size)
    probs[:, 0] = 1.0
    sides = [10, 14]
    for row, side in enumerate(sides):
        lo = (size - side) // 2
        probs[row, 0, lo:lo + side, lo:lo + side] = 0.0
        probs[row, 1, lo:lo + side, lo:lo + side] = 1.0
    plain = GuideFinder(model, bank, cfg).assemble(idx, torch.zeros(2, 3), probs)
    scaled = GuideFinder(model, bank, scaled_cfg).assemble(idx, torch.zeros(2, 3), probs)
    plain_area = (plain.masks > 0).flatten(2).sum(2).float()
    scaled_area = (scaled.masks > 0).flatten(2).sum(2).float()
    target = torch.tensor(sides, dtype=torch.float32).square().view(2, 1).expand(2, 3)
    wanted = target.clamp(guide_area / 1.5**2, guide_area * 1.5**2)  # within the largest magnification
    assert torch.all((scaled_area - wanted).abs() <= (plain_area - wanted).abs())
    torch.testing.assert_close(scaled_area, wanted, atol=0.0, rtol=0.25)
    with pytest.raises(ConfigError, match="align_scale"):
        JRASConfig().with_overrides({"retrieval.align_scale": 0.5})
    with pytest.raises(ConfigError, match="align_centroid"):
        JRASConfig().with_overrides({"retrieval.align_scale": 1.5, "retrieval.align_centroid": False})
