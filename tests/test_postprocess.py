import numpy as np
import torch

from jras_core.config import JRASConfig, PostprocessConfig
from jras_core.data.slices import SliceSet, VolumeInfo
from jras_core.metrics import volume_metrics
from jras_core.models.jras import build_model
from jras_core.postprocess import keep_largest_components, postprocess
from jras_core.training.evaluate import predict


def _slices(masks: torch.Tensor, volume_ids: list[int], slice_pos: list[int]) -> SliceSet:
    vols = [VolumeInfo(f"v{i}", f"c{i}", "ED", "A", "", (1.0, 1.0, 1.0)) for i in range(max(volume_ids) + 1)]
    return SliceSet(
        images=masks.float().unsqueeze(1) / 3.0,
        masks=masks.to(torch.uint8),
        case_ids=torch.tensor(volume_ids),
        volume_ids=torch.tensor(volume_ids),
        slice_pos=torch.tensor(slice_pos),
        cases=[f"c{i}" for i in range(len(vols))],
        volumes=vols,
    )


def test_islands_go_and_structures_connected_across_slices_stay():
    # volume 0: slices stored out of order (positions 1, 0, 2); volume 1: one slice
    pred = torch.zeros(4, 12, 12, dtype=torch.long)
    pred[0, 2:7, 2:7] = 1  # LV, position 1
    pred[1, 3:6, 3:6] = 1  # LV, position 0: small in its slice but connected to position 1
    pred[2, 10:12, 10:12] = 1  # LV island at position 2, not touching the LV above
    pred[2, 2:4, 2:4] = 2  # MYO, position 2
    pred[0, 8:9, 8:9] = 2  # MYO island at position 1: far from the MYO at position 2
    pred[3, 1:3, 1:3] = 1  # volume 1: two LV pieces of different size
    pred[3, 6:11, 6:11] = 1
    slices = _slices(pred.clone(), [0, 0, 0, 1], [1, 0, 2, 0])

    out = keep_largest_components(pred, slices, num_classes=4)

    assert out.dtype == pred.dtype and out.shape == pred.shape
    assert (out[0, 2:7, 2:7] == 1).all() and (out[1, 3:6, 3:6] == 1).all()  # kept in 3-D
    assert (out[2, 10:12, 10:12] == 0).all()  # LV island removed
    assert (out[2, 2:4, 2:4] == 2).all() and out[0, 8, 8] == 0  # largest MYO kept, its island removed
    assert (out[3, 1:3, 1:3] == 0).all() and (out[3, 6:11, 6:11] == 1).all()  # volumes are separate
    changed = (out != pred).sum().item()
    assert changed == 4 + 1 + 4
    assert torch.equal(pred, slices.masks.long())  # the input is left alone


def test_diagonal_neighbours_are_separate_components():
    pred = torch.zeros(2, 8, 8, dtype=torch.long)
    pred[0, 0:3, 0:3] = 3
    pred[1, 3, 3] = 3  # touches the block only through a corner across slices
    slices = _slices(pred.clone(), [0, 0], [0, 1])
    out = keep_largest_components(pred, slices, num_classes=4)
    assert out[1, 3, 3] == 0 and (out[0, 0:3, 0:3] == 3).all()


def test_postprocess_config_switches_it_off_and_lowers_hd95_of_islands():
    truth = torch.zeros(3, 16, 16, dtype=torch.long)
    truth[:, 4:10, 4:10] = 1
    slices = _slices(truth.clone(), [0, 0, 0], [0, 1, 2])
    pred = truth.clone()
    pred[2, 12:16, 12:16] = 1  # a stray island far from the structure
    assert torch.equal(postprocess(pred, slices, PostprocessConfig(largest_component=False), 4), pred)
    cleaned = postprocess(pred, slices, PostprocessConfig(), 4)
    assert torch.equal(cleaned, truth)
    before = volume_metrics(pred, slices, 4)["hd95"][0, 0]
    after = volume_metrics(cleaned, slices, 4)["hd95"][0, 0]
    assert after == 0.0 < before
    dice_only = volume_metrics(pred, slices, 4, hd95=False)
    assert set(dice_only) == {"dice"} and np.array_equal(dice_only["dice"], volume_metrics(pred, slices, 4)["dice"], equal_nan=True)


def test_predict_applies_the_configured_postprocessing():
    cfg = JRASConfig.from_yaml("configs/demo.yaml").with_overrides({"segmenter.fusion": "none"})
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 4, (4, 64, 64), generator=g)
    slices = _slices(masks, [0, 0, 1, 1], [0, 1, 0, 1])
    slices.images = torch.rand(4, 1, 64, 64, generator=g)
    raw, _ = predict(model, slices, cfg.with_overrides({"postprocess.largest_component": False}))
    cleaned, _ = predict(model, slices, cfg)
    assert torch.equal(cleaned, keep_largest_components(raw, slices, 4))
