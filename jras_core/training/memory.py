"""The segmenter's latest view and prediction of each training slice, kept for reuse."""

from __future__ import annotations

import torch


class PredictionMemory:
    """Per slice: the (augmented) image the segmenter last saw, in 16 bits, and its class
    probabilities there, stored as the foreground channels in 8 bits.

    Args:
        num_slices: slices of the training set (indices ``0 .. num_slices - 1``).
        num_classes: classes including background.
        size: side ``S`` of the slices.

    A 2,000-slice set of 128 x 128 slices with four classes takes 160 MiB.
    """

    def __init__(self, num_slices: int, num_classes: int, size: int):
        if num_slices < 1 or num_classes < 2 or size < 1:
            raise ValueError(f"invalid memory shape: {num_slices} slices, {num_classes} classes, size {size}")
        self.num_classes = num_classes
        self.size = size
        self._fg = torch.zeros(num_slices, num_classes - 1, size, size, dtype=torch.uint8)
        self._views = torch.zeros(num_slices, 1, size, size, dtype=torch.float16)
        self.known = torch.zeros(num_slices, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self._fg.shape[0])

    def store(self, idx: torch.Tensor, probs: torch.Tensor, views: torch.Tensor) -> None:
        """Keep ``probs`` ``(B, C, S, S)`` (a softmax), predicted on ``views`` ``(B, 1, S, S)``,
        for slices ``idx`` ``(B,)`` (kept on the CPU, from any device)."""
        b = idx.shape[0]
        if probs.shape != (b, self.num_classes, self.size, self.size) or views.shape != (b, 1, self.size, self.size):
            raise ValueError(
                f"expected probabilities ({b}, {self.num_classes}, {self.size}, {self.size}) and views "
                f"({b}, 1, {self.size}, {self.size}), got {tuple(probs.shape)} and {tuple(views.shape)}"
            )
        self._fg[idx] = (probs[:, 1:].detach() * 255.0).round_().to(device="cpu", dtype=torch.uint8)
        self._views[idx] = views.detach().to(device="cpu", dtype=torch.float16)
        self.known[idx] = True

    def recall(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored probabilities ``(B, C, S, S)`` of slices ``idx`` and which of them are
        known ``(B,)``; unknown rows are all background. Background is one minus the
        foreground, clipped at zero."""
        fg = self._fg[idx].float().div_(255.0)
        bg = (1.0 - fg.sum(dim=1, keepdim=True)).clamp_min_(0.0)
        return torch.cat([bg, fg], dim=1), self.known[idx]

    def views(self, idx: torch.Tensor) -> torch.Tensor:
        """The images ``(B, 1, S, S)`` the stored predictions of slices ``idx`` were made on."""
        return self._views[idx].float()
