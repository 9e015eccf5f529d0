"""Batch sizes for gradient-free forwards (bank refresh, inference) on the CPU."""

from __future__ import annotations

INFERENCE_BATCH_PIXELS = 16 * 128 * 128
"""Pixels per batch of a gradient-free forward: 16 slices of 128 x 128. The first
activations of the networks then take about 4 MiB and stay in a core's caches from one
layer to the next. On one core a 206-slice bank at 128 px is embedded in about 0.27 s in
batches of 16 against 0.47 s in batches of 128 (33 MiB activations), and inference with
retrieval takes 25 ms per slice against 29 ms in batches of 64."""


def inference_batch_size(size: int) -> int:
    """Slices per batch of a gradient-free forward on ``size x size`` slices (at least 1)."""
    return max(1, INFERENCE_BATCH_PIXELS // max(size * size, 1))
