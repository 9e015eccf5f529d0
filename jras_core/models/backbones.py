"""One factory for the 2-D segmentation backbones.

Every backbone maps ``(B, in_channels, H, W)`` to logits ``(B, out_channels, H, W)``;
``H`` and ``W`` must be multiples of 16 (32 for ``swinunetr`` and ``segformer``).

``norm`` names the normalisation of the convolutional backbones: ``batch`` (statistics over
the batch, kept as running averages for inference) or ``instance`` (statistics of each
sample's own feature maps, with learned scale and shift: nothing depends on which site or
batch a slice came from). SegFormer keeps its layer norms whatever ``norm`` says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.networks.nets import DynUNet, SwinUNETR, UNet
from torch import nn

NORMS = ("batch", "instance")


def norm_layer(norm: str) -> str | tuple[str, dict]:
    """MONAI's name (and arguments) of normalisation ``norm`` (one of :data:`NORMS`)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose from {NORMS}")
    return ("instance", {"affine": True}) if norm == "instance" else "batch"


def _unet(
    in_channels: int, out_channels: int, channels: Sequence[int], dropout: float, norm: str
) -> nn.Module:
    return UNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=2,
        norm=norm_layer(norm),
        dropout=dropout,
    )


def _dynunet(
    in_channels: int, out_channels: int, channels: Sequence[int], dropout: float, norm: str
) -> nn.Module:
    n = len(channels)
    strides = [1] + [2] * (n - 1)
    return DynUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * n,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(channels),
        norm_name=norm_layer(norm),
        dropout=dropout or None,
        res_block=True,
    )


def _swinunetr(
    in_channels: int, out_channels: int, channels: Sequence[int], dropout: float, norm: str
) -> nn.Module:
    feature_size = max(12, (channels[0] // 12) * 12)
    return SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        spatial_dims=2,
        feature_size=feature_size,
        depths=(2, 2, 2, 2),
        num_heads=(3, 6, 12, 24),
        window_size=4,
        norm_name=norm_layer(norm),
        drop_rate=dropout,
    )


def _segformer(
    in_channels: int, out_channels: int, channels: Sequence[int], dropout: float, norm: str
) -> nn.Module:
    from jras_core.models.segformer import SegFormer

    return SegFormer(in_channels, out_channels, widths=tuple(channels), dropout=dropout)


BACKBONES: dict[str, Callable[[int, int, Sequence[int], float, str], nn.Module]] = {
    "unet": _unet,
    "dynunet": _dynunet,
    "swinunetr": _swinunetr,
    "segformer": _segformer,
}


def build_backbone(
    name: str, in_channels: int, out_channels: int, channels: Sequence[int], dropout: float = 0.0,
    norm: str = "batch",
) -> nn.Module:
    """Build backbone ``name`` (one of :data:`BACKBONES`) with normalisation ``norm``."""
    norm_layer(norm)
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None
    return factory(in_channels, out_channels, channels, dropout, norm)


ENCODER_BACKBONES = ("unet", "dynunet")
"""Backbones whose encoder :func:`encoder_stages` can run on its own."""


def encoder_stages(backbone: nn.Module) -> tuple[list[nn.Module], int]:
    """The layers of ``backbone``'s encoder, input to bottleneck, in order, and the width of
    the bottleneck's feature map: applied in turn to ``(B, in_channels, H, W)`` they give the
    features ``(B, width, H / 2^(L-1), W / 2^(L-1))`` that the decoder starts from (``L``
    levels), without running the decoder. MONAI ``UNet`` and ``DynUNet`` only.
    """
    if isinstance(backbone, UNet):
        from monai.networks.layers.simplelayers import SkipConnection

        stages: list[nn.Module] = []
        block: nn.Module = backbone.model
        # UNet nests each level as Sequential(down, SkipConnection(deeper levels), up)
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            stages.append(block[0])
            block = block[1].submodule
        stages.append(block)  # the bottom layer
        return stages, int(backbone.channels[-1])
    if isinstance(backbone, DynUNet):
        return [backbone.input_block, *backbone.downsamples, backbone.bottleneck], int(backbone.filters[-1])
    raise ValueError(
        f"{type(backbone).__name__} has no separable encoder; a retriever sharing the segmenter's encoder "
        f"needs segmenter.backbone {' or '.join(ENCODER_BACKBONES)}"
    )
