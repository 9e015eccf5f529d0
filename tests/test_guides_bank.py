import numpy as np
import pytest
import torch

from jras_core.data.slices import SliceSet, VolumeInfo
from jras_core.data.volume import DataError
from jras_core.labels import one_hot_fg
from jras_core.models.retriever import Retriever
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.guides import (
    align_guides,
    centred_dice,
    centred_dice_pairs,
    centred_one_hot,
    centroids,
    translate,
)
from jras_core.retrieval.store import BankStore


def _disc(cx, cy, r, size=32, label=1):
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).long() * label


def _slices(n_cases=6, per_case=4, size=32, seed=0) -> SliceSet:
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(n_cases * per_case):
        cx, cy = torch.randint(8, size - 8, (2,), generator=g).tolist()
        masks.append(_disc(cx, cy, int(torch.randint(3, 7, (1,), generator=g)), size))
    masks = torch.stack(masks).to(torch.uint8)
    images = masks.float().unsqueeze(1) + 0.05 * torch.randn(len(masks), 1, size, size, generator=g)
    case_ids = torch.arange(n_cases).repeat_interleave(per_case)
    return SliceSet(
        images=images, masks=masks, case_ids=case_ids, volume_ids=case_ids.clone(),
        slice_pos=torch.arange(per_case).repeat(n_cases),
        cases=[f"case{i}" for i in range(n_cases)],
        volumes=[VolumeInfo(f"case{i}", f"case{i}", "", "X", "", (1.0, 1.0, 1.0)) for i in range(n_cases)],
    )


def test_centroid_and_translation():
    m = _disc(10, 20, 4).float().unsqueeze(0)
    cent, valid = centroids(m)
    size = 32
    assert valid.all()
    # normalised coordinates: pixel p -> -1 + 2p/(size-1)
    assert cent[0, 0] == pytest.approx(-1 + 2 * 10 / (size - 1), abs=1e-4)
    assert cent[0, 1] == pytest.approx(-1 + 2 * 20 / (size - 1), abs=1e-4)
    shifted = translate(m.unsqueeze(1), torch.tensor([[2 * 6 / (size - 1), 0.0]]), mode="nearest")[:, 0]
    assert torch.equal(shifted[0].long(), _disc(16, 20, 4))
    empty_cent, empty_valid = centroids(torch.zeros(1, size, size))
    assert not empty_valid.any()


def test_align_guides_moves_guides_onto_query_centroid():
    guide_masks = torch.stack([_disc(8, 8, 3), _disc(24, 20, 4)]).unsqueeze(0)  # (1, 2, H, W)
    guide_images = guide_masks.float().unsqueeze(2)
    target = centroids(_disc(16, 16, 3).float().unsqueeze(0))[0]
    imgs, masks = align_guides(guide_images, guide_masks, target, torch.tensor([True]))
    new_cent, _ = centroids((masks[0] > 0).float())
    assert torch.allclose(new_cent, target.expand(2, 2), atol=0.05)
    assert imgs.shape == guide_images.shape


def test_centred_dice_is_shift_invariant():
    a = _disc(10, 10, 5).unsqueeze(0)
    b = torch.stack([_disc(20, 18, 5), _disc(20, 18, 2), torch.zeros(32, 32, dtype=torch.long)])
    d = centred_dice(centred_one_hot(a, 2), centred_one_hot(b, 2))
    assert d.shape == (1, 3)
    assert d[0, 0] > 0.95
    assert d[0, 1] < 0.5
    assert d[0, 2] == 0.0


def test_search_matches_brute_force_and_excludes_own_case():
    slices = _slices()
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
    slices = _slices(n_cases=2, per_case=2)
    bank = RetrievalBank(slices, num_classes=2)
    emb = np.eye(4, 8, dtype=np.float32)
    bank.set_embeddings(emb)
    sims, idx = bank.search(torch.from_numpy(emb[:1]), k=3, exclude=torch.tensor([0]))
    assert idx[0].tolist()[:2] != [-1, -1] and idx[0, 2] == -1
    assert sims[0, 2] == float("-inf")
    images, masks = bank.gather(idx)
    assert images.shape == (1, 3, 1, 32, 32) and masks[0, 2].sum() == 0


def test_mask_search_ranks_by_aligned_mask_dice():
    slices = _slices()
    bank = RetrievalBank(slices, num_classes=2)
    query = slices.masks[:3].long()
    sims, idx = bank.search_by_mask(query, k=3, exclude=slices.case_ids[:3])
    full = bank.mask_similarity(query)
    own = slices.case_ids.view(1, -1) == slices.case_ids[:3].view(-1, 1)
    expected = full.masked_fill(own, float("-inf")).topk(3, dim=1).values
    assert torch.allclose(sims, expected)


def test_mask_similarity_at_candidates_equals_the_gathered_full_matrix():
    slices = _slices()
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
    slices = _slices()
    bank = RetrievalBank(slices, num_classes=2)
    entries = torch.tensor([0, 3, 17])
    idx = torch.tensor([[1, 2, -1], [3, 9, 20], [16, 17, 0]])
    expected = bank.mask_similarity_at(slices.masks[entries], idx)
    torch.testing.assert_close(bank.entry_mask_similarity_at(entries, idx), expected, atol=1e-6, rtol=0)
    assert bank.entry_mask_similarity_at(entries, idx)[1, 0] == pytest.approx(1.0)  # an entry with itself


@pytest.mark.parametrize("dtype", [torch.uint8, torch.long])
def test_one_hot_fg_matches_torch_one_hot(dtype):
    masks = torch.randint(0, 4, (2, 3, 8, 8)).to(dtype)
    expected = torch.nn.functional.one_hot(masks.long(), 4).movedim(-1, -3)[..., 1:, :, :].float()
    out = one_hot_fg(masks, 4)
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert torch.equal(one_hot_fg(masks[0, 0], 4), expected[0, 0])  # (H, W) -> (C_fg, H, W)


def test_translation_grid_is_affine_grid_of_a_translation():
    from jras_core.retrieval.guides import translation_grid

    offsets = torch.tensor([[0.3, -0.2], [0.0, 0.0], [-1.1, 0.7]])
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -offsets
    expected = torch.nn.functional.affine_grid(theta, (3, 1, 5, 7), align_corners=True)
    torch.testing.assert_close(translation_grid(offsets, 5, 7), expected, atol=1e-6, rtol=0)


def test_bank_centroids_equal_those_of_the_gathered_masks():
    slices = _slices()
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
    slices = _slices()
    bank = RetrievalBank(slices, num_classes=2)
    retr = Retriever(in_channels=2, embed_dim=8, channels=(4, 8))
    bank.refresh(retr)
    other = RetrievalBank(slices, num_classes=2)
    other.refresh(retr, batch_size=5)
    np.testing.assert_allclose(other.embeddings, bank.embeddings, atol=1e-6)


def test_refresh_with_the_same_weights_embeds_nothing():
    bank = RetrievalBank(_slices(), num_classes=2)
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

    slices = _slices()
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
    slices = _slices()
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
    slices = _slices()
    bank = RetrievalBank(slices, num_classes=2, index="hnsw")
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(slices), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    bank.set_embeddings(emb)
    _, idx = bank.search(torch.from_numpy(emb[:4]), k=1)
    assert torch.equal(idx[:, 0], torch.arange(4))


def test_similarity_grid_is_a_translation_at_scale_one_and_magnifies_about_the_target():
    from jras_core.retrieval.guides import similarity_grid, translation_grid

    target, source = torch.tensor([[0.2, -0.1], [-0.5, 0.4]]), torch.tensor([[-0.3, 0.0], [0.1, 0.1]])
    torch.testing.assert_close(similarity_grid(target, source, torch.ones(2), 9, 11),
                               translation_grid(target - source, 9, 11), atol=1e-6, rtol=0)
    # a disc of radius 4 around (8, 8), doubled about the target (16, 16): radius 8 around the target
    size = 32
    guide = _disc(8, 8, 4).float()[None, None]
    grid = similarity_grid(torch.full((1, 2), -1 + 32 / (size - 1)), torch.full((1, 2), -1 + 16 / (size - 1)),
                           torch.tensor([2.0]), size, size)
    out = torch.nn.functional.grid_sample(guide, grid, mode="nearest", align_corners=True)[0, 0]
    assert abs(int(out.sum()) - int(_disc(16, 16, 8).sum())) <= 8
    expected = _disc(16, 16, 8).float()
    assert float(2 * (out * expected).sum() / (out.sum() + expected.sum())) > 0.9


def test_align_guides_scales_guides_to_the_given_magnification():
    guide_masks = torch.stack([_disc(8, 8, 3), _disc(24, 20, 6), _disc(20, 10, 4)]).unsqueeze(0)  # (1, 3, H, W)
    guide_images = guide_masks.float().unsqueeze(2)
    target = centroids(_disc(16, 16, 3).float().unsqueeze(0))[0]
    scales = torch.tensor([[2.0, 0.5, 1.0]])
    _, masks = align_guides(guide_images, guide_masks, target, torch.tensor([True]), scales=scales)
    areas = (masks[0] > 0).flatten(1).sum(1).float()
    before = (guide_masks[0] > 0).flatten(1).sum(1).float()
    torch.testing.assert_close(areas / before, scales[0] ** 2, atol=0.0, rtol=0.2)
    new_cent, _ = centroids((masks[0] > 0).float())
    assert torch.allclose(new_cent, target.expand(3, 2), atol=0.05)
    # scale 1 is the translation alone
    shifted = align_guides(guide_images, guide_masks, target, torch.tensor([True]))
    assert torch.equal(masks[0, 2], shifted[1][0, 2])
    # a query without a centroid leaves its guides in place, scaled or not
    still = align_guides(guide_images, guide_masks, target, torch.tensor([False]), scales=scales)
    assert torch.equal(still[1], guide_masks)


def test_bank_areas_are_the_foreground_pixel_counts():
    slices = _slices()
    bank = RetrievalBank(slices, num_classes=2)
    idx = torch.tensor([[0, 5, -1], [7, 7, 23]])
    areas = bank.areas_at(idx)
    expected = (slices.masks[idx.clamp_min(0)] > 0).flatten(2).sum(2).float()
    assert areas.shape == idx.shape and areas[0, 2] == 0
    assert torch.equal(areas[idx >= 0], expected[idx >= 0])
