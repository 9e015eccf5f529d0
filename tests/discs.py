"""Slices of random discs with their masks, for the retrieval tests."""

from __future__ import annotations

import torch

from jras_core.data.slices import SliceSet, VolumeInfo


def disc(cx, cy, r, size=32, label=1):
    """``(size, size)`` long: ``label`` inside the disc of radius ``r`` around ``(cx, cy)``."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).long() * label


def disc_slices(n_cases=6, per_case=4, size=32, seed=0) -> SliceSet:
    """``n_cases`` cases of ``per_case`` slices, each a random disc (label 1) in a noisy image."""
    g = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(n_cases * per_case):
        cx, cy = torch.randint(8, size - 8, (2,), generator=g).tolist()
        masks.append(disc(cx, cy, int(torch.randint(3, 7, (1,), generator=g)), size))
    masks = torch.stack(masks).to(torch.uint8)
    images = masks.float().unsqueeze(1) + 0.05 * torch.randn(len(masks), 1, size, size, generator=g)
    case_ids = torch.arange(n_cases).repeat_interleave(per_case)
    return SliceSet(
        images=images, masks=masks, case_ids=case_ids, volume_ids=case_ids.clone(),
        slice_pos=torch.arange(per_case).repeat(n_cases),
        cases=[f"case{i}" for i in range(n_cases)],
        volumes=[VolumeInfo(f"case{i}", f"case{i}", "", "X", "", (1.0, 1.0, 1.0)) for i in range(n_cases)],
    )
