"""Tests of jras_core.retrieval.bank: search, exclusion, guides, masks, refresh, storage."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from discs import disc_slices
from tiny_methods import TINY, one_patient

from jras_core.config import JRASConfig
from jras_core.data.volume import DataError
from jras_core.models.retriever import Retriever
from jras_core.retrieval.bank import BLAS_MIN_QUERIES, RetrievalBank, exact_topk, faiss_search
from jras_core.retrieval.guides import align_guides, centred_dice_pairs, centred_one_hot, centroids
from jras_core.retrieval.store import BankStore


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_search_matches_brute_force_and_excludes_own_case():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(slices), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    bank.set_embeddings(emb)
    queries = torch.from_numpy(emb[:5])
    exclude = slices.case_ids[:5]
    sims, idx = bank.search(queries, k=4, exclude=exclude)
    brute = queries @ torch.from_numpy(emb).T
    own = slices.case_ids.view(1, -1) == exclude.view(-1, 1)
    brute = brute.masked_fill(own, float("-inf"))
    top = brute.topk(4, dim=1)
    assert torch.equal(idx, top.indices)
    assert torch.allclose(sims, top.values, atol=1e-5)
    assert not (slices.case_ids[idx] == exclude.view(-1, 1)).any()
    # without exclusion the query finds itself first
    _, idx_self = bank.search(queries, k=1)
    assert torch.equal(idx_self[:, 0], torch.arange(5))


def test_search_pads_when_bank_is_too_small():
    slices = disc_slices(n_cases=2, per_case=2)
    bank = RetrievalBank(slices, num_classes=2)
    emb = np.eye(4, 8, dtype=np.float32)
    bank.set_embeddings(emb)
    sims, idx = bank.search(torch.from_numpy(emb[:1]), k=3, exclude=torch.tensor([0]))
    assert idx[0].tolist()[:2] != [-1, -1] and idx[0, 2] == -1
    assert sims[0, 2] == float("-inf")
    images, masks = bank.gather(idx)
    assert images.shape == (1, 3, 1, 32, 32) and masks[0, 2].sum() == 0


def test_mask_search_ranks_by_aligned_mask_dice():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    query = slices.masks[:3].long()
    sims, idx = bank.search_by_mask(query, k=3, exclude=slices.case_ids[:3])
    full = bank.mask_similarity(query)
    own = slices.case_ids.view(1, -1) == slices.case_ids[:3].view(-1, 1)
    expected = full.masked_fill(own, float("-inf")).topk(3, dim=1).values
    assert torch.allclose(sims, expected)


def test_mask_similarity_at_candidates_equals_the_gathered_full_matrix():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    query = slices.masks[:5].long()
    cand = torch.randint(0, len(slices), (5, 8), generator=torch.Generator().manual_seed(1))
    full = torch.gather(bank.mask_similarity(query), 1, cand)
    assert torch.allclose(bank.mask_similarity_at(query, cand), full, atol=1e-6)
    a, b = centred_one_hot(query, 2), bank.centred_masks()[cand]
    assert torch.allclose(centred_dice_pairs(a, b), full, atol=1e-6)
    # chunking does not change the centred maps
    assert torch.allclose(centred_one_hot(slices.masks, 2, chunk=7), centred_one_hot(slices.masks, 2), atol=1e-6)


def test_entry_mask_similarity_equals_that_of_the_entries_masks():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    entries = torch.tensor([0, 3, 17])
    idx = torch.tensor([[1, 2, -1], [3, 9, 20], [16, 17, 0]])
    expected = bank.mask_similarity_at(slices.masks[entries], idx)
    torch.testing.assert_close(bank.entry_mask_similarity_at(entries, idx), expected, atol=1e-6, rtol=0)
    assert bank.entry_mask_similarity_at(entries, idx)[1, 0] == pytest.approx(1.0)  # an entry with itself


def test_bank_centroids_equal_those_of_the_gathered_masks():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    idx = torch.tensor([[0, 5, -1], [7, 7, 23]])
    cent, valid = bank.centroids_at(idx)
    _, masks = bank.gather(idx)
    assert masks.dtype == torch.uint8
    expected, expected_valid = centroids((masks > 0).flatten(0, 1).float())
    assert torch.equal(valid.flatten(), expected_valid) and not valid[0, 2]
    torch.testing.assert_close(cent.flatten(0, 1)[expected_valid], expected[expected_valid])
    # aligning with the stored centroids moves the guides exactly as computing them afresh
    images = bank.gather(idx)[0]
    target, target_valid = torch.tensor([[0.1, -0.2], [0.0, 0.3]]), torch.tensor([True, True])
    fresh = align_guides(images, masks, target, target_valid)
    stored = align_guides(images, masks, target, target_valid, (cent, valid))
    assert torch.equal(fresh[1], stored[1]) and fresh[1].dtype == torch.uint8
    torch.testing.assert_close(fresh[0], stored[0])


def test_refresh_embeddings_do_not_depend_on_the_batch_size():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    retr = Retriever(in_channels=2, embed_dim=8, channels=(4, 8))
    bank.refresh(retr)
    other = RetrievalBank(slices, num_classes=2)
    other.refresh(retr, batch_size=5)
    np.testing.assert_allclose(other.embeddings, bank.embeddings, atol=1e-6)


def test_refresh_with_the_same_weights_embeds_nothing():
    bank = RetrievalBank(disc_slices(), num_classes=2)
    retr = Retriever(in_channels=2, embed_dim=8, channels=(4, 8))
    calls = []
    retr.register_forward_hook(lambda *_: calls.append(1))
    bank.refresh(retr)
    first, n = bank.embeddings, len(calls)
    assert n > 0
    bank.refresh(retr)  # same weights: nothing recomputed
    assert len(calls) == n and bank.embeddings is first
    with torch.no_grad():
        next(retr.parameters()).add_(0.1)
    bank.refresh(retr)  # a changed weight: re-embedded
    assert len(calls) == 2 * n and not np.allclose(bank.embeddings, first)
    bank.set_embeddings(first)  # embeddings from elsewhere: the next refresh embeds again
    bank.refresh(retr)
    assert len(calls) == 3 * n
    bank.refresh(retr, force=True)
    assert len(calls) == 4 * n


def test_exact_search_agrees_with_faiss_flat():
    import faiss

    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(slices), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    bank.set_embeddings(emb)
    q = emb[:6] + 0.1 * rng.standard_normal((6, 16)).astype(np.float32)
    flat = faiss.IndexFlatIP(16)
    flat.add(emb)
    f_sims, f_idx = flat.search(q, 5)
    sims, idx = bank.search(torch.from_numpy(q), 5)
    assert np.array_equal(idx.numpy(), f_idx) and np.allclose(sims.numpy(), f_sims, atol=1e-5)


def test_refresh_save_load_round_trip(tmp_path):
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    retr = Retriever(in_channels=2, embed_dim=8, channels=(4, 8))
    bank.refresh(retr)
    assert bank.embeddings.shape == (len(slices), 8)
    assert np.allclose(np.linalg.norm(bank.embeddings, axis=1), 1.0, atol=1e-5)
    bank.save(tmp_path / "bank")
    again = RetrievalBank.load(tmp_path / "bank")
    assert torch.equal(again.slices.masks, slices.masks)
    assert again.slices.cases == slices.cases
    q = torch.from_numpy(bank.embeddings[:3])
    assert torch.equal(again.search(q, 3)[1], bank.search(q, 3)[1])
    # a truncated file is reported, not half-loaded
    path = BankStore(tmp_path / "bank").path
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt or truncated"):
        RetrievalBank.load(tmp_path / "bank")


def test_hnsw_index_finds_nearest():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2, index="hnsw")
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(slices), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    bank.set_embeddings(emb)
    _, idx = bank.search(torch.from_numpy(emb[:4]), k=1)
    assert torch.equal(idx[:, 0], torch.arange(4))


def test_bank_areas_are_the_foreground_pixel_counts():
    slices = disc_slices()
    bank = RetrievalBank(slices, num_classes=2)
    idx = torch.tensor([[0, 5, -1], [7, 7, 23]])
    areas = bank.areas_at(idx)
    expected = (slices.masks[idx.clamp_min(0)] > 0).flatten(2).sum(2).float()
    assert areas.shape == idx.shape and areas[0, 2] == 0
    assert torch.equal(areas[idx >= 0], expected[idx >= 0])


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


def test_bank_retriever_input_channels(slices):
    bank = RetrievalBank(slices, num_classes=4)
    idx = torch.tensor([0, 3])
    assert torch.equal(bank.retriever_input(idx, 1), slices.images[idx])
    full = bank.retriever_input(idx)
    assert full.shape == (2, 4, 32, 32) and torch.equal(full[:, :1], slices.images[idx])


def test_exclusion_unit_of_the_bank(slices, tmp_path):
    cfg = JRASConfig().with_overrides(TINY)
    one = one_patient(cfg)
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


def _clustered(rng: np.random.Generator, n: int, d: int, clusters: int) -> np.ndarray:
    centres = _unit(rng, clusters, d)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32) * 0.05
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_hnsw_bank_returns_the_flat_top_k_and_never_the_own_case():
    slices = disc_slices(n_cases=100, per_case=8, size=20)
    emb = _clustered(np.random.default_rng(3), len(slices), 32, clusters=40)
    banks = {kind: RetrievalBank(slices, num_classes=2, index=kind) for kind in ("flat", "hnsw")}
    for bank in banks.values():
        bank.set_embeddings(emb)
    assert isinstance(banks["hnsw"].index, faiss.IndexHNSWFlat)
    queries = torch.from_numpy(emb[::8])  # one query of each case
    exclude = slices.case_ids[::8]
    found = {kind: bank.search(queries, k=10, exclude=exclude) for kind, bank in banks.items()}
    flat_idx, hnsw_idx = found["flat"][1], found["hnsw"][1]
    for k in (3, 10):
        hits = [len(set(a[:k].tolist()) & set(b[:k].tolist())) for a, b in zip(hnsw_idx, flat_idx)]
        assert np.mean(hits) / k >= 0.95
    assert (hnsw_idx >= 0).all()
    # exclusion holds for the approximate index: every case's own entries are its nearest
    assert not (slices.case_ids[hnsw_idx] == exclude.view(-1, 1)).any()
    _, unexcluded = banks["hnsw"].search(queries, k=1)
    assert torch.equal(slices.case_ids[unexcluded[:, 0]], exclude)


def test_auto_index_switches_to_hnsw_at_the_configured_size(tmp_path):
    slices = disc_slices(n_cases=6, per_case=4, size=20)
    emb = _unit(np.random.default_rng(0), len(slices), 8)
    small = RetrievalBank(slices, num_classes=2, index="auto", hnsw_from=len(slices) + 1)
    large = RetrievalBank(slices, num_classes=2, index="auto", hnsw_from=len(slices))
    for bank in (small, large):
        bank.set_embeddings(emb)
    assert (small.index_built, large.index_built) == ("flat", "hnsw")
    assert isinstance(small.index, faiss.IndexFlatIP) and isinstance(large.index, faiss.IndexHNSWFlat)
    # the choice and its threshold survive storage (encrypted here)
    store = BankStore(tmp_path / "bank", key=bytes(range(32)))
    large.save(tmp_path / "bank", store)
    again = RetrievalBank.load(tmp_path / "bank", store)
    assert (again.index_kind, again.hnsw_from, again.index_built) == ("auto", len(slices), "hnsw")
    q = torch.from_numpy(emb[:4])
    assert torch.equal(again.search(q, 3, slices.case_ids[:4])[1], large.search(q, 3, slices.case_ids[:4])[1])
    with pytest.raises(ValueError, match="index must be"):
        RetrievalBank(slices, num_classes=2, index="ivf")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"retrieval.index": "ivf"}, "retrieval.index"),
    ({"retrieval.hnsw_from": 0}, "retrieval.hnsw_from"),
])
def test_index_options_are_validated(overrides, message):
    from jras_core.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        JRASConfig().with_overrides(overrides)
    cfg = JRASConfig().with_overrides({"retrieval.index": "hnsw", "retrieval.hnsw_from": 5})
    assert (cfg.retrieval.index, cfg.retrieval.hnsw_from) == ("hnsw", 5)
    assert JRASConfig().retrieval.index == "auto"
