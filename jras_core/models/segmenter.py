"""The guided segmenter: a backbone plus one of four ways to fuse retrieved guides."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn
from torch.func import functional_call

from jras_core.labels import one_hot_fg
from jras_core.models.backbones import build_backbone, encoder_stages, norm_layer

FUSIONS = ("concat", "prior", "feature", "none")
GUIDE_PATHS = ("input", "residual")


def appearance_prior(
    image: torch.Tensor, guide_images: torch.Tensor, guide_masks: torch.Tensor, num_classes: int,
    min_std: float = 0.05, guide_fg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel class probabilities of the query under its guides' intensity model.

    Each class's intensity in the K guide images (read through their masks) is fitted by one
    Gaussian; each query pixel gets the class posterior of its intensity under these
    Gaussians (equal class priors). Guides from the query's own scanner so tell which
    intensities mean which tissue there, whatever the scanner's contrast order.

    Args:
        image: query ``(B, 1, H, W)``; guide_images ``(B, K, 1, H, W)``; guide_masks
            ``(B, K, H, W)`` labels in ``[0, num_classes)``.
        min_std: floor of each class's standard deviation (intensities in about ``[0, 1]``).
        guide_fg: the masks' foreground one-hot maps ``(B, K, C - 1, H, W)`` when already
            at hand (:func:`~jras_core.labels.one_hot_fg`; made here otherwise).

    Returns:
        ``(B, C, H, W)`` probabilities; classes absent from every guide get probability 0
        (uniform over all classes when no class is present).
    """
    b, k = guide_masks.shape[:2]
    fg = one_hot_fg(guide_masks, num_classes) if guide_fg is None else guide_fg
    # per-class pixel count, intensity sum and sum of squares over all K guides: the
    # foreground classes' by one matrix product per guide, (C_fg, P) x (P, 2); the
    # background's as what the whole guide holds beyond them
    values = guide_images.reshape(b * k, 1, -1).to(image.dtype)
    moments = torch.cat([values, values.square()], dim=1)  # (B*K, 2, P)
    fg_flat = fg.reshape(b * k, num_classes - 1, -1).to(image.dtype)
    fg_sums = torch.bmm(fg_flat, moments.transpose(1, 2)).view(b, k, num_classes - 1, 2).sum(1)  # (B, C_fg, 2)
    fg_count = fg_flat.sum(2).view(b, k, num_classes - 1).sum(1)  # (B, C_fg)
    all_sums = moments.view(b, k, 2, -1).sum(dim=(1, 3))  # (B, 2)
    count = torch.cat([(values.shape[2] * k - fg_count.sum(1)).unsqueeze(1), fg_count], dim=1)  # (B, C)
    sums = torch.cat([(all_sums - fg_sums.sum(1)).unsqueeze(1), fg_sums], dim=1)  # (B, C, 2)
    mean = sums[..., 0] / count.clamp_min(1.0)
    var = (sums[..., 1] / count.clamp_min(1.0) - mean.square()).clamp_min(0.0) + min_std**2
    # log-likelihood up to a constant, a x^2 + b x + c per class: one (C, 3) x (3, H*W) product
    # per sample instead of several full-size (B, C, H, W) temporaries
    inv = 1.0 / var
    coef = torch.stack([-0.5 * inv, mean * inv, -0.5 * mean.square() * inv - 0.5 * var.log()], dim=2)
    absent = coef.new_tensor([0.0, 0.0, -1e4])  # classes no guide shows: a constant, very low score
    coef = torch.where((count < 0.5).unsqueeze(2), absent, coef)
    x = image.reshape(b, 1, -1)
    powers = torch.cat([x.square(), x, torch.ones_like(x)], dim=1)  # (B, 3, H*W)
    loglik = torch.bmm(coef, powers).view(b, num_classes, *image.shape[-2:])
    return torch.softmax(loglik, dim=1)


class GuideAttention(nn.Module):
    """Feature-level fusion: guides and query are encoded by one shared encoder, and
    each query position attends over the K guides' features at the same position
    (and, through the encoder's receptive field, their neighbourhood).

    Output: ``(B, width, H, W)`` fused guide features, appended to the backbone input.
    """

    def __init__(self, num_fg: int, width: int = 16, norm: str = "batch"):
        super().__init__()
        n = norm_layer(norm)
        self.query_enc = nn.Sequential(
            Convolution(2, 1, width, strides=2, norm=n, act="relu"),
            Convolution(2, width, width, strides=2, norm=n, act="relu"),
        )
        self.guide_enc = nn.Sequential(
            Convolution(2, 1 + num_fg, width, strides=2, norm=n, act="relu"),
            Convolution(2, width, width, strides=2, norm=n, act="relu"),
        )
        self.key = nn.Conv2d(width, width, 1)
        self.scale = width**-0.5
        self.width = width

    def forward(self, image: torch.Tensor, guide_images: torch.Tensor, guide_fg: torch.Tensor) -> torch.Tensor:
        b, k = guide_images.shape[:2]
        h, w = image.shape[-2:]
        q = self.query_enc(image)  # (B, F, h', w')
        g = self.guide_enc(torch.cat([guide_images, guide_fg], dim=2).flatten(0, 1))
        g = g.view(b, k, *g.shape[1:])  # (B, K, F, h', w')
        keys = self.key(g.flatten(0, 1)).view_as(g)
        attn = torch.softmax((keys * q.unsqueeze(1)).sum(2) * self.scale, dim=1)  # (B, K, h', w')
        fused = (attn.unsqueeze(2) * g).sum(1)
        return F.interpolate(fused, size=(h, w), mode="bilinear", align_corners=False)


class GuidedSegmenter(nn.Module):
    """Segmenter that takes a query slice and K retrieved guide pairs.

    Args:
        num_classes: classes including background (``C``); ``C_fg = C - 1``.
        k: number of guides.
        fusion: ``concat`` (query + K guide images + K one-hot guide masks as channels),
            ``prior`` (query + similarity-weighted mean of the guide masks), ``feature``
            (guides encoded and attended at feature level) or ``none`` (plain backbone).
        backbone: backbone name (see :func:`build_backbone`).
        channels: backbone widths.
        prior_tau: temperature of the similarity softmax of ``prior`` fusion.
        guide_init: ``zero`` sets the backbone's first-layer weights on the guide channels
            to zero, so that the untrained segmenter computes what the plain backbone
            computes from the query alone (``default``: the layer's own initialisation).
        appearance: also give the backbone ``C`` channels of :func:`appearance_prior` (the
            query's class probabilities under its guides' per-class intensities).
        channels_last: keep the backbone's weights and activations in channels-last memory
            order. Same results; on CPU the convolutions of the U-Nets run 10-30% faster,
            and a wide guided input costs little more than the query channel alone.
        guide_path: where the guide channels enter. ``input``: beside the query at the
            backbone's input (one network for both paths). ``residual``: the backbone sees the
            query alone and is the guide-free path; a small U-Net head (``head_channels``)
            reads the query, the backbone's class probabilities (detached) and the guide
            channels and adds a correction to the backbone's logits. The correction's last
            layer starts at zero, so the untrained guided path equals the guide-free one, and
            guided losses never reach the backbone (:meth:`forward_paths`): the guide-free
            path trains exactly as a plain segmenter does.
        head_channels: widths of the residual head's U-Net.
        refine: with ``fusion="none"``, give the plain backbone the residual head all the
            same, reading the query and the backbone's prediction only: a two-stage cascade of
            the residual guided segmenter's size without guides (the control for what the
            head adds beyond its guides). Ignored when the segmenter uses guides.
        norm: normalisation of the backbone, the head and the guide encoder: ``batch`` or
            ``instance`` (see :mod:`jras_core.models.backbones`).

    ``forward(image, guide_images, guide_masks, guide_sims, guide_present)``:
        image ``(B, 1, H, W)``; guide_images ``(B, K, 1, H, W)``; guide_masks ``(B, K, H, W)``
        labels; guide_sims ``(B, K)`` retrieval similarities (``prior`` only; differentiable);
        guide_present ``(B,)`` bool, False zeroes all guide channels of a sample (guide
        dropout, or inference without guides; under ``residual`` such a sample gets the
        guide-free logits). Guides may be None: no guides for anyone.
        Returns logits ``(B, C, H, W)``.
    """

    def __init__(
        self,
        num_classes: int,
        k: int = 3,
        fusion: str = "concat",
        backbone: str = "unet",
        channels: Sequence[int] = (16, 32, 64, 128),
        dropout: float = 0.0,
        prior_tau: float = 0.1,
        feature_width: int = 16,
        guide_init: str = "default",
        appearance: bool = False,
        channels_last: bool = True,
        guide_path: str = "input",
        head_channels: Sequence[int] = (16, 32, 64),
        refine: bool = False,
        norm: str = "batch",
    ):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; choose from {FUSIONS}")
        if guide_path not in GUIDE_PATHS:
            raise ValueError(f"unknown guide_path {guide_path!r}; choose from {GUIDE_PATHS}")
        self.num_classes = num_classes
        self.num_fg = num_classes - 1
        self.k = k
        self.fusion = fusion
        self.prior_tau = prior_tau
        self.guide_attention = None
        if fusion == "concat":
            in_ch = 1 + k * (1 + self.num_fg)
        elif fusion == "prior":
            in_ch = 1 + self.num_fg
        elif fusion == "feature":
            self.guide_attention = GuideAttention(self.num_fg, feature_width, norm)
            in_ch = 1 + feature_width
        else:
            in_ch = 1
        self.appearance = appearance and fusion != "none"
        if self.appearance:
            in_ch += num_classes
        self.guide_width = in_ch - 1
        """Channels built from the guides (:meth:`guide_channels`)."""
        self.residual = (guide_path == "residual" and fusion != "none") or (fusion == "none" and refine)
        self.guide_path = guide_path
        self.head: nn.Module | None = None
        self.head_out: nn.Conv2d | None = None
        if self.residual:
            head_width = int(head_channels[0])
            self.head = build_backbone("unet", 1 + num_classes + self.guide_width, head_width, head_channels, norm=norm)
            self.head_out = nn.Conv2d(head_width, num_classes, 1)
            nn.init.zeros_(self.head_out.weight)
            nn.init.zeros_(self.head_out.bias)
            in_ch = 1
        self.in_channels = in_ch
        """Input channels of the backbone (1 under ``residual``: the query alone)."""
        self.backbone = build_backbone(backbone, in_ch, num_classes, channels, dropout, norm)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.backbone.to(memory_format=self.memory_format)
        if self.head is not None:
            self.head.to(memory_format=self.memory_format)
        self._query_channel_exact: bool | None = None
        self._input_layer_list: list[tuple[str, nn.Module]] | None = None
        self._encoder_stages: tuple[list[nn.Module], int] | None = None
        if guide_init == "zero" and in_ch > 1:
            self.zero_guide_inputs()
        elif guide_init not in ("default", "zero"):
            raise ValueError(f"unknown guide_init {guide_init!r}; choose default or zero")

    def encoder_features(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone's bottleneck features of the guide-free query: ``(B, 1, H, W)`` ->
        ``(B, F, H / 2^(L-1), W / 2^(L-1))`` (``F`` = :attr:`encoder_width`, ``L`` levels),
        from its encoder alone, in the backbone's current mode (the caller picks eval mode and
        gradients). A backbone that also reads guide channels gets them as zeros."""
        stages, _ = self._encoder()
        x = self._laid_out(image if self.in_channels == 1 else self._zero_padded(image))
        for stage in stages:
            x = stage(x)
        return x.contiguous()

    @property
    def encoder_width(self) -> int:
        """Channels ``F`` of :meth:`encoder_features`."""
        return self._encoder()[1]

    def _encoder(self) -> tuple[list[nn.Module], int]:
        if self._encoder_stages is None:
            self._encoder_stages = encoder_stages(self.backbone)
        return self._encoder_stages

    def _input_layers(self) -> list[tuple[str, nn.Module]]:
        """The backbone's layers that read its input: ``(name, module)`` of each Conv2d/Linear
        whose weight spans all ``in_channels`` (found once; the modules keep their weights)."""
        if self._input_layer_list is None:
            layers = []
            for name, module in self.backbone.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    fan_in = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
                    if fan_in == self.in_channels and module.weight.shape[1] == self.in_channels:
                        layers.append((name, module))
            self._input_layer_list = layers
        return self._input_layer_list

    @torch.no_grad()
    def zero_guide_inputs(self) -> int:
        """Zero the weights that connect the guide channels (input channels ``1:``) to the
        backbone's layers reading the input; returns how many layers were changed."""
        layers = self._input_layers()
        for _, module in layers:
            module.weight[:, 1:] = 0.0
        return len(layers)

    def _query_channel_forward(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone on the query channel alone, its input layers using only their
        query-channel weights: ``(B, 1, H, W)`` -> logits ``(B, C, H, W)``."""
        weights = {f"{name}.weight": module.weight[:, :1] for name, module in self._input_layers()
                   if isinstance(module, nn.Conv2d)}
        return self._run_backbone(image, weights)

    def _laid_out(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the backbone's memory order (a copy only where the order differs)."""
        return x.contiguous(memory_format=self.memory_format)

    def _run_backbone(self, x: torch.Tensor, weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The backbone (with ``weights`` replacing some of its own) on ``x`` laid out in its
        memory order; logits in the usual contiguous order (the losses run faster on it)."""
        x = self._laid_out(x)
        if weights is None:
            out = self.backbone(x)
        else:  # one name per module: a module reached by two paths (DynUNet) is swapped and restored once
            out = functional_call(self.backbone, weights, (x,), tie_weights=False)
        return out.contiguous()

    def forward_without_guides(self, image: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` computes when no sample has guides, ``(B, 1, H, W)`` -> logits
        ``(B, C, H, W)``, without pushing the all-zero guide channels through the first layers
        (zero channels add nothing to a convolution, so only the query channel's weights are
        used). Checked once against the full input on the first call; a backbone for which
        the two differ always gets the full input."""
        if not self.uses_guides or self.residual:
            return self._run_backbone(image)
        if self._query_channel_exact is None:
            self._query_channel_exact = self._check_query_channel_forward(image[:2])
        if self._query_channel_exact:
            return self._query_channel_forward(image)
        return self._run_backbone(self._zero_padded(image))

    def _zero_padded(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> the backbone input ``(B, in_channels, H, W)`` with all guide channels zero."""
        b, _, h, w = image.shape
        return torch.cat([image, image.new_zeros(b, self.in_channels - 1, h, w)], dim=1)

    @torch.no_grad()
    def _check_query_channel_forward(self, image: torch.Tensor) -> bool:
        was_training = self.backbone.training
        self.backbone.eval()  # no running-statistics updates, no dropout
        try:
            full = self._run_backbone(self._zero_padded(image))
            try:
                slim = self._query_channel_forward(image)
            except RuntimeError:
                return False
            return slim.shape == full.shape and torch.allclose(slim, full, rtol=1e-4, atol=1e-5)
        finally:
            self.backbone.train(was_training)

    @property
    def uses_guides(self) -> bool:
        return self.fusion != "none"

    def guide_channels(
        self,
        image: torch.Tensor,
        guide_images: torch.Tensor,
        guide_masks: torch.Tensor,
        guide_sims: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The channels ``(B, guide_width, H, W)`` built from the guides, written into ``out``
        when given (a view of the backbone's or the head's input: no concatenation)."""
        b, k = guide_masks.shape[:2]
        if out is None:
            out = torch.empty(b, self.guide_width, *image.shape[-2:], dtype=image.dtype, device=image.device,
                              memory_format=self.memory_format)
        fg = one_hot_fg(guide_masks, self.num_classes)  # (B, K, C_fg, H, W)
        if self.fusion == "concat":
            out[:, :k] = guide_images.flatten(1, 2)
            out[:, k : k * (1 + self.num_fg)] = fg.flatten(1, 2)
            used = k * (1 + self.num_fg)
        elif self.fusion == "prior":
            if guide_sims is None:
                weights = image.new_full((b, k), 1.0 / k)
            else:
                weights = torch.softmax(guide_sims / self.prior_tau, dim=1)
            out[:, : self.num_fg] = (weights[:, :, None, None, None] * fg).sum(1)
            used = self.num_fg
        else:
            out[:, : self.guide_attention.width] = self.guide_attention(image, guide_images, fg)
            used = self.guide_attention.width
        if self.appearance:
            out[:, used:] = appearance_prior(image, guide_images, guide_masks, self.num_classes, guide_fg=fg)
        return out

    def forward_paths(
        self,
        image: torch.Tensor,
        guide_images: torch.Tensor | None = None,
        guide_masks: torch.Tensor | None = None,
        guide_sims: torch.Tensor | None = None,
        guide_present: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Both paths of a ``residual`` segmenter from one backbone forward (arguments as
        :meth:`forward`).

        Returns:
            ``(plain, guided, rows)``: the guide-free logits ``(B, C, H, W)`` (the backbone's,
            with gradients), the guided logits ``(B', C, H, W)`` of the ``B'`` samples with
            guides (``rows``, ``(B',)`` indices; None when no sample has guides): the
            backbone's logits, detached, plus the head's correction. A ``refine`` cascade
            (no guides) gives every sample the head's correction.
        """
        if not self.residual:
            raise ValueError("forward_paths is the residual guide path's (segmenter.guide_path: residual)")
        plain = self._run_backbone(image)
        if not self.uses_guides:
            rows = torch.arange(len(image), device=image.device)
        else:
            if guide_images is None or guide_masks is None:
                return plain, None, image.new_zeros(0, dtype=torch.long)
            present = guide_present if guide_present is not None else torch.ones(len(image), dtype=torch.bool,
                                                                                   device=image.device)
            rows = present.nonzero().squeeze(1)
            if len(rows) == 0:
                return plain, None, rows
        base = plain.detach()[rows]
        x = torch.empty(len(rows), 1 + self.num_classes + self.guide_width, *image.shape[-2:], dtype=image.dtype,
                        device=image.device, memory_format=self.memory_format)
        x[:, :1] = image[rows]
        x[:, 1 : 1 + self.num_classes] = torch.softmax(base.float(), dim=1).to(image.dtype)
        if self.uses_guides:
            sims = None if guide_sims is None else guide_sims[rows]
            self.guide_channels(image[rows], guide_images[rows], guide_masks[rows], sims,
                                out=x[:, 1 + self.num_classes :])
        correction = self.head_out(self.head(self._laid_out(x))).contiguous()
        return plain, base + correction, rows

    def forward(
        self,
        image: torch.Tensor,
        guide_images: torch.Tensor | None = None,
        guide_masks: torch.Tensor | None = None,
        guide_sims: torch.Tensor | None = None,
        guide_present: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not self.uses_guides and not self.residual:
            return self._run_backbone(image)
        if self.residual:
            plain, guided, rows = self.forward_paths(image, guide_images, guide_masks, guide_sims, guide_present)
            if guided is None:
                return plain
            if len(rows) == len(image):
                return guided
            return plain.index_copy(0, rows, guided.to(plain.dtype))
        if guide_images is None or guide_masks is None or (guide_present is not None and not bool(guide_present.any())):
            return self.forward_without_guides(image)
        b, _, h, w = image.shape
        x = torch.empty(b, self.in_channels, h, w, dtype=image.dtype, device=image.device,
                        memory_format=self.memory_format)
        x[:, :1] = image
        if guide_present is None or bool(guide_present.all()):
            self.guide_channels(image, guide_images, guide_masks, guide_sims, out=x[:, 1:])
        else:  # guide channels only for the samples that keep their guides; the others get zeros
            rows, dropped = guide_present.nonzero().squeeze(1), (~guide_present).nonzero().squeeze(1)
            sims = None if guide_sims is None else guide_sims[rows]
            extra = self.guide_channels(image[rows], guide_images[rows], guide_masks[rows], sims)
            x[:, 1:].index_copy_(0, rows, extra).index_fill_(0, dropped, 0.0)
        return self._run_backbone(x)
