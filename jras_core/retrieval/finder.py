"""From query images to aligned guide pairs: pass 1, retrieval, centroid alignment.

:class:`GuideFinder` is the one path by which training, evaluation and
inference obtain guides, so all three retrieve in exactly the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jras_core.config import JRASConfig
from jras_core.device import autocast, module_device
from jras_core.models.jras import JRASModel
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.guides import align_guides, centroids


@dataclass
class Guides:
    """K guide pairs per query.

    Attributes:
        images: ``(B, K, 1, H, W)``; masks: ``(B, K, H, W)`` uint8 labels;
        sims: ``(B, K)`` retrieval scores; idx: ``(B, K)`` bank indices (-1: none).
    """

    images: torch.Tensor
    masks: torch.Tensor
    sims: torch.Tensor
    idx: torch.Tensor

    @classmethod
    def none(cls, batch: int, k: int, size: tuple[int, int]) -> Guides:
        """No guides for any of ``batch`` queries (blank images and masks, index -1)."""
        h, w = size
        return cls(torch.zeros(batch, k, 1, h, w), torch.zeros(batch, k, h, w, dtype=torch.uint8),
                   torch.zeros(batch, k), torch.full((batch, k), -1, dtype=torch.long))

    def to(self, device: torch.device | str) -> Guides:
        """These guides on ``device`` (the same object where they already are there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return Guides(self.images.to(device, non_blocking=True), self.masks.to(device, non_blocking=True),
                      self.sims.to(device), self.idx.to(device))

    @property
    def present(self) -> torch.Tensor:
        """``(B,)`` bool on the guides' device: whether a query has at least one guide."""
        return (self.idx >= 0).any(dim=1)

    def with_images(self, images: torch.Tensor) -> Guides:
        """These guides with other images ``(B, K, 1, H, W)`` (e.g. intensity-changed ones);
        missing guides (index -1) stay blank."""
        present = (self.idx >= 0).to(device=images.device, dtype=images.dtype)[:, :, None, None, None]
        return Guides(images * present, self.masks, self.sims, self.idx)

    def placed(self, rows: torch.Tensor, batch: int) -> Guides:
        """These guides, one row per entry of ``rows`` ``(R,)``, as rows of a batch of
        ``batch`` queries in which the other rows have none."""
        k, size = self.idx.shape[1], tuple(self.masks.shape[-2:])
        out = Guides.none(batch, k, size)
        out.masks = out.masks.to(self.masks.dtype)
        out.images[rows], out.masks[rows], out.sims[rows], out.idx[rows] = self.images, self.masks, self.sims, self.idx
        return out


class GuideFinder:
    """Find guides for a batch of queries in a bank, as the configuration says.

    Args:
        model: segmenter (for pass 1) and retriever.
        bank: the bank to search (embeddings must be current: ``bank.refresh``).
        cfg: method configuration (``retriever.mode``, ``retrieval.*``).
        generator: random source for training-time guide sampling and random guides.
    """

    def __init__(self, model: JRASModel, bank: RetrievalBank, cfg: JRASConfig, generator: torch.Generator | None = None):
        model_size, cfg_size = model.retr.input_size, cfg.retriever.input_size
        if model_size != cfg_size:
            raise ValueError(
                f"the model's retriever embeds its inputs at size {model_size} but retriever.input_size "
                f"is {cfg_size}: build the model from the same configuration"
            )
        self.model = model
        self.bank = bank
        self.cfg = cfg
        self.num_classes = cfg.labels.num_classes
        self.generator = generator or torch.Generator().manual_seed(cfg.train.seed)

    @property
    def device(self) -> torch.device:
        """Where the models compute (``train.device``, as the model was placed)."""
        return module_device(self.model.seg)

    @property
    def needs_first_pass(self) -> bool:
        r = self.cfg.retriever
        return r.mode == "mask" or r.input == "image+pred" or self.cfg.retrieval.align_centroid

    @torch.no_grad()
    def first_pass(self, images: torch.Tensor) -> torch.Tensor:
        """Pass 1 without guides: softmax ``(B, C, H, W)`` float32 on the CPU (segmenter in eval
        mode, on its device and in ``train.precision``; ``images`` on any device)."""
        seg, device = self.model.seg, self.device
        was_training = seg.training
        seg.eval()
        with autocast(device, self.cfg.train.precision):
            logits = seg(images.to(device), guide_present=torch.zeros(images.shape[0], dtype=torch.bool, device=device))
        seg.train(was_training)
        return torch.softmax(logits.float(), dim=1).cpu()

    def query_input(self, images: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """The retriever's input for queries: the image, plus the pass-1 foreground probabilities."""
        if not self.model.retriever_uses_prediction:
            return images
        if probs is None:
            raise ValueError("the retriever takes the pass-1 prediction but none was given")
        return torch.cat([images, probs[:, 1:].to(device=images.device, dtype=images.dtype)], dim=1)

    @torch.no_grad()
    def embed_queries(self, images: torch.Tensor, probs: torch.Tensor | None) -> torch.Tensor:
        """``(B, d)`` float32 query embeddings (retriever in eval mode, on its device)."""
        retr, device = self.model.retr, self.device
        was_training = retr.training
        retr.eval()
        with autocast(device, self.cfg.train.precision):
            emb = retr(self.query_input(images.to(device), probs))
        retr.train(was_training)
        return emb.float()

    def exclude(self, owners: list[str] | None, n: int) -> torch.Tensor | None:
        """``(n,)`` bank owner id each query may not retrieve from (None: no exclusion)."""
        return None if owners is None else self.bank.owner_ids_of(owners, n)

    @torch.no_grad()
    def rank(
        self, images: torch.Tensor, probs: torch.Tensor | None, k: int, owners: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` bank entries per query, ``(sims, idx)`` each ``(B, k)``."""
        exclude = self.exclude(owners, images.shape[0])
        if self.cfg.retriever.mode == "mask":
            return self.bank.search_by_mask(probs[:, 1:], k, exclude)
        return self.bank.search(self.embed_queries(images, probs), k, exclude)

    @torch.no_grad()
    def random_indices(self, n: int, k: int, owners: list[str] | None) -> torch.Tensor:
        """``(n, k)`` random bank indices avoiding each query's own case (or volume)."""
        scores = torch.rand(n, len(self.bank), generator=self.generator)
        exclude = self.exclude(owners, n)
        if exclude is not None:
            own = self.bank.owner_ids.view(1, -1) == exclude.view(-1, 1)
            scores = scores.masked_fill(own, -1.0)
        kk = min(k, len(self.bank))
        idx = scores.topk(kk, dim=1).indices
        valid = torch.gather(scores, 1, idx) >= 0
        idx = idx.masked_fill(~valid, -1)
        if kk < k:
            idx = torch.cat([idx, idx.new_full((n, k - kk), -1)], dim=1)
        return idx

    def sample_from_pool(self, sims: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``k`` of the ``pool`` candidates of each row at random (training-time sampling)."""
        keys = torch.rand(idx.shape, generator=self.generator).masked_fill(idx < 0, 2.0)
        pick = keys.argsort(dim=1)[:, :k]
        pick = pick.gather(1, torch.gather(sims, 1, pick).argsort(dim=1, descending=True))
        return torch.gather(sims, 1, pick), torch.gather(idx, 1, pick)

    def assemble(self, idx: torch.Tensor, sims: torch.Tensor, probs: torch.Tensor | None) -> Guides:
        """Gather guide pairs and shift them onto the query's predicted centroid (and scale them
        to its predicted foreground area, ``retrieval.align_scale``)."""
        images, masks = self.bank.gather(idx)
        r = self.cfg.retrieval
        if r.align_centroid and probs is not None:
            fg = 1.0 - probs[:, 0]
            cent, valid = centroids(fg)
            scales = None
            if r.align_scale > 1.0:  # guide foreground area onto the query's predicted area
                area = fg.sum(dim=(1, 2)).unsqueeze(1)
                scales = (area / self.bank.areas_at(idx).clamp_min(1.0)).sqrt().clamp(1.0 / r.align_scale, r.align_scale)
            images, masks = align_guides(images, masks, cent, valid, self.bank.centroids_at(idx), scales)
        return Guides(images, masks, sims.nan_to_num(neginf=0.0), idx)

    @torch.no_grad()
    def find(
        self,
        images: torch.Tensor,
        owners: list[str] | None = None,
        source: str = "retrieved",
        true_masks: torch.Tensor | None = None,
        train_pool: int | None = None,
        probs: torch.Tensor | None = None,
    ) -> tuple[Guides, torch.Tensor | None]:
        """Guides for ``images`` ``(B, 1, H, W)``.

        Args:
            owners: each query's owner key (:meth:`RetrievalBank.owner_keys`): no slice
                of its own case (or volume) is returned.
            source: ``retrieved`` (the configured retriever), ``oracle`` (top-K by
                centroid-aligned Dice with the true masks: the ceiling of any retriever)
                or ``random``.
            true_masks: ``(B, H, W)``, required by ``oracle``.
            train_pool: when set, draw K of the top ``train_pool`` at random (training).
            probs: a pass-1 prediction already computed, reused instead of a new one.

        Returns:
            the guides and the pass-1 softmax (None when not needed).
        """
        k = self.cfg.retrieval.k
        if probs is None and self.needs_first_pass:
            probs = self.first_pass(images)
        if source == "retrieved":
            sims, idx = self.rank(images, probs, train_pool or k, owners)
            if train_pool and train_pool > k:
                sims, idx = self.sample_from_pool(sims, idx, k)
        elif source == "oracle":
            if true_masks is None:
                raise ValueError("oracle guides need the true masks")
            sims, idx = self.bank.search_by_mask(true_masks, k, self.exclude(owners, images.shape[0]))
        elif source == "random":
            idx = self.random_indices(images.shape[0], k, owners)
            sims = torch.zeros(idx.shape)
        else:
            raise ValueError(f"unknown guide source {source!r}")
        return self.assemble(idx, sims, probs), probs

    @torch.no_grad()
    def find_draws(
        self, images: torch.Tensor, draws: int, owners: list[str] | None = None, probs: torch.Tensor | None = None
    ) -> list[Guides]:
        """``draws`` retrieved guide sets for ``images`` ``(B, 1, H, W)``: the top K, then
        ``draws - 1`` random draws of K from the top ``retrieval.train_pool`` (one ranking,
        one pass 1; ``retrieval.test_draws``)."""
        k, pool = self.cfg.retrieval.k, max(self.cfg.retrieval.train_pool, self.cfg.retrieval.k)
        if probs is None and self.needs_first_pass:
            probs = self.first_pass(images)
        sims, idx = self.rank(images, probs, pool, owners)
        sets = [self.assemble(idx[:, :k], sims[:, :k], probs)]
        for _ in range(draws - 1):
            d_sims, d_idx = self.sample_from_pool(sims, idx, k)
            sets.append(self.assemble(d_idx, d_sims, probs))
        return sets
