"""The segmenter's latest prediction for each training slice, kept for reuse as pass 1."""

from __future__ import annotations

import torch


class PredictionMemory:
    """Class probabilities per slice, stored as the foreground channels in 8 bits.

    Args:
        num_slices: slices of the training set (indices ``0 .. num_slices - 1``).
        num_classes: classes including background.
        size: side ``S`` of the slices.

    A 2,000-slice set of 128 x 128 slices with four classes takes 98 MiB.
    """

    def __init__(self, num_slices: int, num_classes: int, size: int):
        if num_slices < 1 or num_classes < 2 or size < 1:
            raise ValueError(f"invalid memory shape: {num_slices} slices, {num_classes} classes, size {size}")
        self.num_classes = num_classes
        self.size = size
        self._fg = torch.zeros(num_slices, num_classes - 1, size, size, dtype=torch.uint8)
        self.known = torch.zeros(num_slices, dtype=torch.bool)

    def __len__(self) -> int:
        return int(self._fg.shape[0])

    def store(self, idx: torch.Tensor, probs: torch.Tensor) -> None:
        """Keep ``probs`` ``(B, C, S, S)`` (a softmax) as the prediction for slices ``idx`` ``(B,)``."""
        if probs.shape[1:] != (self.num_classes, self.size, self.size):
            raise ValueError(
                f"expected probabilities of shape (B, {self.num_classes}, {self.size}, {self.size}), "
                f"got {tuple(probs.shape)}"
            )
        self._fg[idx] = (probs[:, 1:].detach() * 255.0).round_().to(torch.uint8)
        self.known[idx] = True

    def recall(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored probabilities ``(B, C, S, S)`` of slices ``idx`` and which of them are
        known ``(B,)``; unknown rows are all background. Background is one minus the
        foreground, clipped at zero."""
        fg = self._fg[idx].float().div_(255.0)
        bg = (1.0 - fg.sum(dim=1, keepdim=True)).clamp_min_(0.0)
        return torch.cat([bg, fg], dim=1), self.known[idx]
