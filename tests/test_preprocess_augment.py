import numpy as np
import torch

from jras_core.config import AugmentConfig, PreprocessConfig
from jras_core.data.augment import BatchIntensityAugment, RandNonMonotoneIntensity
from jras_core.data.slices import SliceSet, build_slice_set, preprocess_volume
from jras_core.data.volume import Volume


def _volume(h=80, w=60, z=4, spacing=(2.0, 1.0, 8.0), case="c0"):
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w, z), dtype=np.int64)
    mask[30:50, 20:40, 1:3] = 1
    image = (rng.normal(100, 10, (h, w, z)) + 200 * (mask > 0)).astype(np.float32)
    return Volume(image, mask, spacing, case=case, phase="ED", vendor="X")


def test_preprocess_resamples_to_the_fov_and_keeps_labels():
    cfg = PreprocessConfig(size=64, fov_mm=128.0)  # 2 mm pixels
    img, msk, spacing = preprocess_volume(_volume(), cfg)
    assert img.shape == (4, 64, 64) and msk.shape == (4, 64, 64)
    assert spacing == (2.0, 2.0, 8.0)
    # 20 x 20 voxels of 2 x 1 mm -> 40 x 20 mm -> 20 x 10 pixels of 2 mm
    assert abs(int((msk[1] == 1).sum()) - 200) <= 20
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(msk)) == {0, 1}


def test_build_slice_set_drops_empty_slices_and_splits_by_case():
    cfg = PreprocessConfig(size=32, fov_mm=None)
    vols = [_volume(case=f"c{i}") for i in range(5)]
    s = build_slice_set(vols, cfg, num_classes=2)
    assert len(s) == 10 and s.slice_pos.tolist()[:2] == [1, 2]
    keep = build_slice_set(vols[:1], PreprocessConfig(size=32, fov_mm=None, keep_empty_slices=True), 2)
    assert len(keep) == 4
    train, val = s.split_by_case(0.4, seed=1)
    assert len(train) + len(val) == len(s)
    assert not {train.cases[c] for c in train.case_ids.tolist()} & {val.cases[c] for c in val.case_ids.tolist()}
    both = SliceSet.concat([train, val])
    assert len(both) == len(s) and len(both.cases) == 10  # tables are concatenated


def test_augmentation_is_seeded_and_bounded():
    x = torch.rand(4, 1, 32, 32)
    a = BatchIntensityAugment(AugmentConfig(non_monotone=0.5), seed=3)(x)
    b = BatchIntensityAugment(AugmentConfig(non_monotone=0.5), seed=3)(x)
    c = BatchIntensityAugment(AugmentConfig(non_monotone=0.5), seed=4)(x)
    assert type(a) is torch.Tensor  # plain tensor, no MONAI metadata overhead downstream
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1 and a.shape == x.shape
    off = BatchIntensityAugment(AugmentConfig(intensity=False))(x)
    assert torch.equal(off, x)


def test_non_monotone_remap_can_reverse_tissue_order():
    t = RandNonMonotoneIntensity(prob=1.0, num_points=2)
    t.set_random_state(seed=0)
    ramp = torch.linspace(0, 1, 101)
    reversed_seen = False
    for _ in range(20):
        y = t(ramp)
        assert y.shape == ramp.shape and (y >= 0).all() and (y <= 1).all()
        reversed_seen |= bool((y.diff() < 0).any())
    assert reversed_seen


def test_shared_bias_field_matches_monai_with_one_evaluation():
    from monai.transforms import RandBiasField

    from jras_core.data.augment import RandSharedBiasField

    reference = RandBiasField(degree=3, coeff_range=(0.0, 0.4), prob=1.0)
    shared = RandSharedBiasField(degree=3, coeff_range=(0.0, 0.4), prob=1.0)
    reference.set_random_state(seed=5)
    shared.set_random_state(seed=5)
    calls = []
    evaluate = shared._generate_random_field
    shared._generate_random_field = lambda **kw: calls.append(1) or evaluate(**kw)
    for channels in (1, 4):
        x = torch.rand(channels, 24, 24)
        expected, got = torch.as_tensor(reference(x)), torch.as_tensor(shared(x))
        assert torch.equal(expected, got)
        assert not torch.allclose(got, x)  # a field was applied
    assert len(calls) == 2  # once per call, whatever the channel count
