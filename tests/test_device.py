"""Devices and precision: every path computes where ``train.device`` says, in ``train.precision``.

Device-independent checks run on the CPU and, where a CUDA device is present, on it too
(reported as skipped where there is none).
"""

import pytest
import torch

from federation.protocol import method_from_run_config
from jras_core.checkpoint import load_model, save_model
from jras_core.config import ConfigError, JRASConfig
from jras_core.data.augment import BatchIntensityAugment
from jras_core.data.slices import build_slice_set
from jras_core.data.synthetic import generate_volumes
from jras_core.device import autocast, check_precision, module_device, resolve_device
from jras_core.models import build_model
from jras_core.retrieval.bank import RetrievalBank
from jras_core.training import JRASTrainer, evaluate
from jras_core.training.adapt import recalibrate_norm
from jras_core.training.evaluate import predict

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine"))]

TINY = {
    "preprocess.size": 32,
    "preprocess.fov_mm": 200.0,
    "segmenter.channels": [8, 16, 32],
    "retriever.channels": [8, 16],
    "retriever.embed_dim": 16,
    "train.batch_size": 8,
    "train.epochs": 1,
}


@pytest.fixture(scope="module")
def tiny_split():
    cfg = JRASConfig().with_overrides(TINY)
    vols = generate_volumes("A", num_cases=6, seed=5, size=64)
    return build_slice_set(vols, cfg.preprocess, cfg.labels.num_classes).split_by_case(0.34, seed=0)


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="train.device"):
        JRASConfig().with_overrides({"train.device": "tpu"})
    with pytest.raises(ConfigError, match="fp16"):
        check_precision(torch.device("cpu"), "fp16")


@pytest.mark.skipif(HAS_CUDA, reason="a CUDA device is present")
def test_cuda_asked_for_without_one_is_a_clear_error(tiny_split):
    train, _ = tiny_split
    cfg = JRASConfig().with_overrides({**TINY, "train.device": "cuda"})
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        JRASTrainer(build_model(cfg), cfg, train)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_joint_training_and_inference_run_on_the_device(device, tiny_split):
    train, val = tiny_split
    cfg = JRASConfig().with_overrides({**TINY, "train.device": device})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, train)
    history = trainer.fit()
    assert module_device(model.seg).type == device and module_device(model.retr).type == device
    assert all(torch.isfinite(torch.tensor(h["seg_loss"])) and torch.isfinite(torch.tensor(h["retr_loss"])) for h in history)
    # the bank, its index input and the prediction memory stay on the CPU
    assert trainer.bank.slices.images.device.type == "cpu"
    assert trainer.memory is not None and bool(trainer.memory.known.any())
    metrics = evaluate(model, val, cfg, trainer.bank)
    assert 0.0 <= metrics["dice_mean"] <= 1.0 and "dice_oracle" in metrics
    pred, _ = predict(model, val, cfg, trainer.bank)
    assert pred.device.type == "cpu" and pred.shape == val.masks.shape
    # AdaBN on the device
    assert recalibrate_norm(model, val, cfg, trainer.bank) > 0


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_cuda_predictions_match_cpu(tiny_split):
    train, val = tiny_split
    cfg = JRASConfig().with_overrides({**TINY, "train.device": "cpu"})
    model = build_model(cfg)
    trainer = JRASTrainer(model, cfg, train)
    trainer.fit()
    cpu_pred, _ = predict(model, val, cfg, trainer.bank)
    model.to("cuda")
    trainer.bank.refresh(model.retr, force=True)
    cuda_pred, _ = predict(model, val, cfg, trainer.bank)
    assert (cpu_pred == cuda_pred).float().mean() > 0.99


@pytest.mark.slow
def test_bf16_autocast_trains_and_predicts_like_fp32(tiny_split):
    train, val = tiny_split
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = JRASConfig().with_overrides({**TINY, "train.device": "cpu", "train.precision": precision})
        model = build_model(cfg)
        trainer = JRASTrainer(model, cfg, train)
        trainer.fit()
        results[precision] = (model, cfg, trainer.bank)
    model, cfg, bank = results["fp32"]
    fp32, _ = predict(model, val, cfg, bank)
    bf16_cfg = cfg.with_overrides({"train.precision": "bf16"})
    bf16, _ = predict(model, val, bf16_cfg, bank)
    # the same weights: bf16 arithmetic changes only uncertain pixels (a one-epoch model has many:
    # 0.905 agreement measured on the H200 machine's CPU)
    assert (fp32 == bf16).float().mean() > 0.8
    with autocast(torch.device("cpu"), "bf16"):
        out = model.seg(val.images[:2])
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES)
def test_intensity_augmentation_runs_where_the_images_are(device):
    cfg = JRASConfig().augment
    x = torch.rand(6, 4, 32, 32)
    out = BatchIntensityAugment(cfg, seed=3)(x.to(device))
    assert out.device.type == device and out.shape == x.shape
    assert float(out.amin()) >= 0.0 and float(out.amax()) <= 1.0 + 1e-6
    # draws come from the CPU generator: the same seed gives the same non-noise changes anywhere
    cpu = BatchIntensityAugment(cfg.__class__(**{**cfg.__dict__, "noise_std": 0.0}), seed=3)(x)
    dev = BatchIntensityAugment(cfg.__class__(**{**cfg.__dict__, "noise_std": 0.0}), seed=3)(x.to(device))
    assert torch.allclose(cpu, dev.cpu(), atol=1e-4)


def test_checkpoint_trained_on_a_gpu_loads_anywhere(tmp_path):
    cfg = JRASConfig().with_overrides({**TINY, "train.device": "cuda:0"})
    model = build_model(cfg)
    path = save_model(tmp_path / "m.pt", model, cfg)
    loaded, loaded_cfg, _ = load_model(path)
    assert loaded_cfg.train.device == "auto"
    assert module_device(loaded).type == "cpu"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_run_config_names_the_device_and_precision():
    cfg = method_from_run_config({"method-config": "", "device": "cpu", "precision": "bf16"})
    assert (cfg.train.device, cfg.train.precision) == ("cpu", "bf16")
    assert method_from_run_config({"method-config": "", "device": ""}).train.device == "auto"


def test_simulated_sites_reserve_no_gpu_on_the_cpu():
    from tools.simulate import gpu_share

    assert gpu_share(4, "cpu") == 0.0
    assert gpu_share(4, "auto") == (min(1.0, round(torch.cuda.device_count() / 4, 4)) if HAS_CUDA else 0.0)


def test_bank_refresh_embeds_with_the_retriever_on_its_device(tiny_split):
    train, _ = tiny_split
    cfg = JRASConfig().with_overrides(TINY)
    model = build_model(cfg)
    bank = RetrievalBank(train, cfg.labels.num_classes)
    bank.refresh(model.retr)
    assert bank.embeddings.dtype.name == "float32" and bank.embeddings.shape == (len(train), 16)
