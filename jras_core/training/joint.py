"""Alternating joint optimisation of segmenter and retriever on one site's data.

Per local epoch:

* **Phase A (segmenter)**: retriever frozen; each (augmented) query gets K guides
  drawn from its top ``train_pool`` bank entries (own case excluded, or only its own
  volume: ``retrieval.exclude``), shifted to its
  pass-1 centroid, augmented as ``augment.guides`` says, dropped with probability
  ``guide_dropout``; query, labels and guides then share one random flip/rotation/zoom
  (``augment.flip``, ``rotate_deg``, ``scale``); Dice + CE step.
* **Phase B (retriever)**: segmenter frozen; each query gets M candidates (top M/2
  by the current retriever plus random ones); their relevance (``mask``: centroid-
  aligned Dice with the query's mask; ``utility``: how much the segmenter's loss
  drops with the candidate as guide) supervises the retriever's similarities
  through a soft InfoNCE (candidates embedded anew, or read from the bank:
  ``contrastive.keys``). Then the bank is refreshed.

Pass 1 is a guide-free forward of the segmenter, or (``retrieval.first_pass:
reuse``) the prediction a :class:`PredictionMemory` kept from the slice's last
phase-A step; phase B then also takes its queries from the memory: the augmented
views phase A trained on, each with the prediction made on it. With ``warmup`` the
first phase A of a multi-epoch call trains without guides and fills the memory.

``fusion: none`` trains only phase A without guides (the no-retrieval baseline, same
code path); ``retriever.mode: frozen`` or ``mask`` skips phase B.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from jras_core.config import JRASConfig
from jras_core.data.augment import BatchIntensityAugment
from jras_core.data.slices import SliceSet
from jras_core.data.spatial import (
    BatchSpatialAugment,
    SpatialDraw,
    warp_back,
    warp_images,
    warp_labels,
)
from jras_core.device import autocast, check_precision, grad_scaler, place
from jras_core.models.jras import JRASModel
from jras_core.retrieval.bank import RetrievalBank
from jras_core.retrieval.finder import GuideFinder, Guides
from jras_core.training.losses import per_sample_dice_ce, segmentation_loss, soft_info_nce
from jras_core.training.lr_schedule import TrainingSpan, lr_factor
from jras_core.training.memory import PredictionMemory

log = logging.getLogger(__name__)


class JRASTrainer:
    """Trains a :class:`JRASModel` on one site's slices with its own bank.

    The model is moved to ``train.device`` and computes in ``train.precision``; the slices,
    the bank and the prediction memory stay on the CPU, and each batch crosses once.

    Args:
        model: segmenter + retriever (updated in place, and moved to ``cfg.train.device``).
        cfg: method configuration.
        train_set: the site's training slices; also the bank, unless ``bank`` is given.
        bank: retrieval bank (default: built from ``train_set`` and embedded now).
        proximal_reference: global weights for the FedProx term ``mu/2 ||w - w_g||^2``
            (``cfg.train.proximal_mu``).
        memory: where ``retrieval.first_pass: reuse`` keeps its predictions (default: a new,
            empty one; its first epoch runs pass 1 for every query).
        writer: TensorBoard writer for per-epoch curves (optional).
        progress: show progress bars.
        span: where this trainer's epochs lie in the whole training, which sets the learning
            rate under ``train.lr_schedule`` (a federated round's; default: the trainer's
            epochs are the whole training, ``cfg.train.epochs`` of them or those one
            :meth:`fit` call is given).
    """

    def __init__(
        self,
        model: JRASModel,
        cfg: JRASConfig,
        train_set: SliceSet,
        bank: RetrievalBank | None = None,
        proximal_reference: Mapping[str, torch.Tensor] | None = None,
        memory: PredictionMemory | None = None,
        writer: SummaryWriter | None = None,
        progress: bool = False,
        span: TrainingSpan | None = None,
    ):
        if len(train_set) == 0:
            raise ValueError("the training set is empty")
        self.device = place(model, cfg.train.device)
        self.precision = cfg.train.precision
        check_precision(self.device, self.precision)
        self.model = model
        self.cfg = cfg
        self.train_set = train_set
        self.writer = writer
        self.progress = progress
        self.epoch = 0
        self._span_given = span is not None
        self.span = span if span is not None else TrainingSpan(0, max(1, cfg.train.epochs))
        seed = cfg.train.seed
        self.generator = torch.Generator().manual_seed(seed)
        self.augment = BatchIntensityAugment(cfg.augment, seed=seed)
        self.spatial = BatchSpatialAugment(cfg.augment, seed=seed)
        self.seg_loss = segmentation_loss()
        self.seg_opt = torch.optim.AdamW(model.seg.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        self.retr_opt = torch.optim.AdamW(model.retr.parameters(), lr=cfg.contrastive.lr, weight_decay=cfg.train.weight_decay)
        self.seg_scaler = grad_scaler(self.device, self.precision)
        self.retr_scaler = grad_scaler(self.device, self.precision)
        self.proximal = None
        if proximal_reference is not None and cfg.train.proximal_mu > 0:
            self.proximal = {k: v.detach().to(self.device, copy=True) for k, v in proximal_reference.items()}
        self.bank: RetrievalBank | None = None
        self.finder: GuideFinder | None = None
        if cfg.uses_retrieval:
            self.bank = bank or RetrievalBank.for_method(train_set, cfg)
            self.bank.refresh(model.retr)
            self.finder = GuideFinder(model, self.bank, cfg, self.generator)
        self.memory: PredictionMemory | None = None
        if self.finder is not None and self.finder.needs_first_pass and cfg.retrieval.first_pass in ("reuse", "warmup"):
            size = int(train_set.images.shape[-1])
            self.memory = memory or PredictionMemory(len(train_set), cfg.labels.num_classes, size)
            if len(self.memory) != len(train_set):
                raise ValueError(f"the prediction memory holds {len(self.memory)} slices, the training set {len(train_set)}")
        self._owners = self.bank.owner_keys(train_set) if self.bank is not None else []
        # the bank holds the training slices themselves (the default, and a site's bank):
        # a query's centred mask is then the bank's, computed once
        self._bank_is_train_set = self.bank is not None and self.bank.slices is train_set
        # a retriever without dropout or running statistics computes the same in train and eval mode
        self._retriever_mode_free = not any(
            isinstance(m, torch.nn.modules.dropout._DropoutNd) or getattr(m, "track_running_stats", False)
            for m in model.retr.modules()
        )

    # ------------------------------------------------------------------ helpers
    def _batches(self) -> list[torch.Tensor]:
        perm = torch.randperm(len(self.train_set), generator=self.generator)
        bs = self.cfg.train.batch_size
        return [perm[i : i + bs] for i in range(0, len(perm), bs)]

    def _owners_of(self, idx: torch.Tensor) -> list[str]:
        """Owner keys (case or volume, as the bank excludes) of training slices ``idx``."""
        return [self._owners[i] for i in idx.tolist()]

    def _proximal_term(self) -> torch.Tensor:
        mu = self.cfg.train.proximal_mu
        total = torch.zeros((), device=self.device)
        for name, p in self.model.named_parameters():
            ref = self.proximal.get(name)
            if ref is not None and p.requires_grad:
                total = total + (p - ref).pow(2).sum()
        return 0.5 * mu * total

    def _step(self, loss: torch.Tensor, optimiser: torch.optim.Optimizer,
              scaler: torch.amp.GradScaler | None) -> None:
        """One optimiser step on ``loss`` (through the gradient scaler under fp16)."""
        optimiser.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimiser.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimiser)
            scaler.update()

    def _schedule(self, optimiser: torch.optim.Optimizer, base_lr: float, step: int, steps: int) -> None:
        """Set ``optimiser``'s rate for step ``step`` of ``steps`` in the current epoch
        (``train.lr_schedule`` over :attr:`span`)."""
        t = self.cfg.train
        if t.lr_schedule == "constant":
            return
        factor = lr_factor(t.lr_schedule, self.span.progress(self.epoch, step / max(steps, 1)), t.lr_final_fraction)
        for group in optimiser.param_groups:
            group["lr"] = base_lr * factor

    def _bar(self, items, desc: str):
        return tqdm(items, desc=desc, leave=False, disable=not self.progress)

    def _first_pass(self, idx: torch.Tensor, images: torch.Tensor) -> torch.Tensor | None:
        """Pass-1 softmax ``(B, C, H, W)`` for slices ``idx`` seen as ``images`` (None when
        the configuration needs none): fresh, or from the memory where it knows the slice."""
        if not self.finder.needs_first_pass:
            return None
        if self.memory is None:
            return self.finder.first_pass(images)
        probs, known = self.memory.recall(idx)
        if not bool(known.all()):
            missing = ~known
            fresh = self.finder.first_pass(images[missing])
            probs[missing] = fresh
            self.memory.store(idx[missing], fresh, images[missing])
        return probs

    def _find_kept(self, idx: torch.Tensor, images: torch.Tensor, keep: torch.Tensor) -> Guides:
        """Training guides for the queries ``images`` (slices ``idx``) whose guides are kept
        (``keep`` ``(B,)``); the dropped ones get none, without pass 1 or retrieval."""
        rows = keep.nonzero().squeeze(1)
        if len(rows) == 0:
            return Guides.none(len(idx), self.cfg.retrieval.k, tuple(images.shape[-2:]))
        sub_idx = idx[rows]
        sub_images = images[rows]
        probs = self._first_pass(sub_idx, sub_images)
        guides, _ = self.finder.find(sub_images, self._owners_of(sub_idx),
                                     train_pool=self.cfg.retrieval.train_pool, probs=probs)
        return guides if len(rows) == len(idx) else guides.placed(rows, len(idx))

    def _guided_batch(self, idx: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, Guides]:
        """Phase A's augmented queries ``(B, 1, H, W)`` and their guides (``augment.guides``),
        both on the training device; queries whose guides are dropped (``keep`` false) get none."""
        cfg = self.cfg
        raw = self.train_set.images[idx].to(self.device, non_blocking=True)
        if cfg.augment.guides != "shared" or not self.augment.enabled:
            images = self.augment(raw)
            guides = self._find_kept(idx, images, keep).to(self.device)
            if cfg.augment.guides == "independent" and self.augment.enabled:
                changed = self.augment(guides.images.flatten(0, 1))  # (B*K, 1, H, W)
                guides = guides.with_images(changed.view_as(guides.images))
            return images, guides
        guides = self._find_kept(idx, raw, keep).to(self.device)
        # each query with its K guides stacked (B1, 1 + K, H, W): one change for the stack;
        # a query without guides changed alone
        has = guides.present
        with_guides, alone = has.nonzero().squeeze(1), (~has).nonzero().squeeze(1)
        stacks = torch.cat([raw[with_guides], guides.images[with_guides].flatten(1, 2)], dim=1)
        changed = self.augment(stacks)
        images = torch.empty_like(raw)
        images[with_guides] = changed[:, :1]
        images[alone] = self.augment(raw[alone])
        guide_images = torch.zeros_like(guides.images)
        guide_images[with_guides] = changed[:, 1:].unsqueeze(2)
        guides = guides.with_images(guide_images)
        return images, guides

    def _warp(
        self, images: torch.Tensor, labels: torch.Tensor, guides: Guides | None
    ) -> tuple[torch.Tensor, torch.Tensor, Guides | None, SpatialDraw]:
        """Phase A's spatial augmentation (``augment.flip``, ``rotate_deg``, ``scale``): each
        query ``(B, 1, H, W)``, its labels ``(B, H, W)`` and its K guide pairs receive one
        random flip/rotation/zoom together, so that the guides keep the query's orientation,
        as the bank of a site holds its own scanner's orientation."""
        draw = self.spatial.draw(len(images))
        if guides is None:
            return warp_images(images, draw), warp_labels(labels, draw), None, draw
        stack = warp_images(torch.cat([images, guides.images.flatten(1, 2)], dim=1), draw)  # (B, 1 + K, H, W)
        maps = warp_labels(torch.cat([labels.unsqueeze(1), guides.masks.to(labels.dtype)], dim=1), draw)
        warped = Guides(stack[:, 1:].unsqueeze(2), maps[:, 1:].to(guides.masks.dtype), guides.sims, guides.idx)
        return stack[:, :1].contiguous(), maps[:, 0], warped, draw

    def _residual_loss(
        self, images: torch.Tensor, labels: torch.Tensor, guides: Guides | None, present: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase A's loss under ``segmenter.guide_path: residual``: the guide-free logits of
        every query plus the guided logits of the queries with guides (the latter train the
        head only; a ``refine`` cascade, without guides, scores the head's output for every
        query). Returns the loss and the guide-free logits ``(B, C, H, W)`` (the next
        retrieval's pass 1, as at inference)."""
        g = (None, None, None) if guides is None else (guides.images, guides.masks, guides.sims)
        with autocast(self.device, self.precision):
            plain, guided, rows = self.model.seg.forward_paths(images, *g, present)
        plain = plain.float()
        loss = self.seg_loss(plain, labels.unsqueeze(1))
        if guided is not None:
            loss = loss + self.seg_loss(guided.float(), labels[rows].unsqueeze(1))
        return loss, plain

    # ------------------------------------------------------------------ phases
    def phase_segmenter(self, guided: bool = True) -> dict[str, float]:
        """Phase A: one pass over the data training the segmenter (retriever frozen).

        ``guided=False`` trains without guides (no pass 1, no retrieval); the predictions
        still fill the prediction memory (``retrieval.first_pass: warmup``)."""
        model, cfg = self.model, self.cfg
        model.seg.train()
        model.retr.eval()
        total, n, t0 = 0.0, 0, time.perf_counter()
        device = self.device
        batches = self._batches()
        for step, idx in enumerate(self._bar(batches, f"epoch {self.epoch} seg")):
            self._schedule(self.seg_opt, cfg.train.lr, step, len(batches))
            labels = self.train_set.masks[idx].to(device, non_blocking=True).long()
            loss = None  # set by the residual path, which scores its two outputs itself
            if self.finder is not None and guided:
                present = torch.rand(len(idx), generator=self.generator) >= cfg.retrieval.guide_dropout
                images, guides = self._guided_batch(idx, present)
                present = present.to(device) & guides.present
                if self.spatial.enabled:
                    images, labels, guides, draw = self._warp(images, labels, guides)
                if model.seg.residual:
                    loss, logits = self._residual_loss(images, labels, guides, present)
                else:
                    with autocast(device, self.precision):
                        logits = model.seg(images, guides.images, guides.masks, guides.sims, present)
            else:
                images = self.augment(self.train_set.images[idx].to(device, non_blocking=True))
                if self.spatial.enabled:
                    images, labels, _, draw = self._warp(images, labels, None)
                if model.seg.residual and not model.seg.uses_guides:  # a refine cascade: both outputs scored
                    loss, logits = self._residual_loss(images, labels, None, None)
                else:
                    with autocast(device, self.precision):
                        logits = model.seg(images)
            logits = logits.float()
            if self.memory is not None:  # kept in the slice's own geometry: the next retrieval's pass 1
                probs = torch.softmax(logits.detach(), dim=1)
                if self.spatial.enabled:
                    probs, images = warp_back(probs, draw), warp_back(images, draw)
                self.memory.store(idx, probs, images)
            if loss is None:
                loss = self.seg_loss(logits, labels.unsqueeze(1))
            if self.proximal is not None:
                loss = loss + self._proximal_term()
            self._step(loss, self.seg_opt, self.seg_scaler)
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        return {"seg_loss": total / max(n, 1), "seg_time_s": time.perf_counter() - t0}

    def _relevance(self, idx, images, labels, cand_idx, probs) -> torch.Tensor:
        """``(B, M)`` relevance of each candidate to its query (training slices ``idx``), on the
        training device; ``images`` and ``labels`` are there, ``cand_idx`` and ``probs`` on the CPU."""
        bank, device = self.bank, self.device
        if self.cfg.contrastive.relevance == "mask":
            if self._bank_is_train_set:
                return bank.entry_mask_similarity_at(idx, cand_idx).to(device)
            return bank.mask_similarity_at(labels.cpu(), cand_idx).to(device)
        # utility: loss drop of the frozen segmenter with the candidate as its guide(s)
        seg = self.model.seg
        b, m = cand_idx.shape
        k = self.cfg.retrieval.k
        with torch.no_grad(), autocast(device, self.precision):
            seg.eval()
            none = torch.zeros(b, dtype=torch.bool, device=device)
            base = per_sample_dice_ce(seg(images, guide_present=none).float(), labels)
            flat = cand_idx.reshape(-1, 1).clamp_min(0).expand(-1, k)
            rep_probs = probs.repeat_interleave(m, dim=0) if probs is not None else None
            guides = self.finder.assemble(flat, torch.zeros(flat.shape), rep_probs).to(device)
            rep_images = images.repeat_interleave(m, dim=0)
            logits = seg(rep_images, guides.images, guides.masks, None, torch.ones(b * m, dtype=torch.bool, device=device))
            loss = per_sample_dice_ce(logits.float(), labels.repeat_interleave(m, dim=0)).view(b, m)
            seg.train()
        return base.unsqueeze(1) - loss

    def phase_retriever(self) -> dict[str, float]:
        """Phase B: contrastive retriever training (segmenter frozen), then bank refresh."""
        model, cfg, bank = self.model, self.cfg, self.bank
        c = cfg.contrastive
        model.seg.eval()
        model.retr.train()
        total, n, t0 = 0.0, 0, time.perf_counter()
        batches = self._batches()
        batches = batches[: c.phase_b_steps(len(batches))]
        m_top = c.candidates // 2
        device = self.device
        for step, idx in enumerate(self._bar(batches, f"epoch {self.epoch} retr")):
            self._schedule(self.retr_opt, c.lr, step, len(batches))
            if self.memory is not None and bool(self.memory.known[idx].all()):
                images = self.memory.views(idx).to(device)  # the views phase A trained on, with their predictions
            else:
                images = self.augment(self.train_set.images[idx].to(device))
            labels = self.train_set.masks[idx].to(device).long()
            names = self._owners_of(idx)
            probs = self._first_pass(idx, images)
            exclude = bank.owner_ids_of(names, len(idx))
            with autocast(device, self.precision):
                q_emb = model.retr(self.finder.query_input(images, probs)).float()  # (B, d)
            # where train and eval mode agree, the search reuses this forward
            search_emb = q_emb.detach() if self._retriever_mode_free else self.finder.embed_queries(images, probs)
            with torch.no_grad():
                _, top_idx = bank.search(search_emb, m_top, exclude)
                rand_idx = self.finder.random_indices(len(idx), c.candidates - m_top, names)
            cand = torch.cat([top_idx, rand_idx], dim=1)  # (B, M)
            valid = (cand >= 0).to(device)
            relevance = self._relevance(idx, images, labels, cand, probs)
            if c.keys == "stored":
                c_emb = bank.embeddings_at(cand).to(device)  # (B, M, d), no gradient
            else:
                # each distinct candidate is embedded once; duplicates share it (and its gradient)
                unique, inverse = torch.unique(cand.clamp_min(0), return_inverse=True)
                with autocast(device, self.precision):
                    u_emb = model.retr(bank.retriever_input(unique, model.retr.in_channels).to(device)).float()
                c_emb = u_emb[inverse.to(device)]  # (B, M, d)
            sims = (c_emb * q_emb.unsqueeze(1)).sum(-1)
            loss = soft_info_nce(sims, relevance, c.tau, c.tau_relevance, valid)
            if self.proximal is not None:
                loss = loss + self._proximal_term()
            self._step(loss, self.retr_opt, self.retr_scaler)
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        t_refresh = time.perf_counter()
        bank.refresh(model.retr)
        done = time.perf_counter()
        model.seg.train()
        return {
            "retr_loss": total / max(n, 1),
            "retr_time_s": t_refresh - t0,
            "refresh_time_s": done - t_refresh,
        }

    def train_epoch(self, guided: bool = True) -> dict[str, float]:
        """One local epoch: phase A (``guided=False``: without guides), then (if the retriever
        is learned) phase B + refresh."""
        t0 = time.perf_counter()
        metrics = self.phase_segmenter(guided)
        if self.cfg.trains_retriever:
            metrics.update(self.phase_retriever())
        metrics["epoch_time_s"] = time.perf_counter() - t0
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"train/{key}", value, self.epoch)
        log.info("epoch %d: %s", self.epoch, {k: round(v, 4) for k, v in metrics.items()})
        self.epoch += 1
        return metrics

    def fit(self, epochs: int | None = None) -> list[dict[str, float]]:
        """Train ``epochs`` (default ``cfg.train.epochs``) local epochs."""
        epochs = self.cfg.train.epochs if epochs is None else epochs
        if not self._span_given:
            self.span = TrainingSpan(0, self.epoch + max(1, epochs))
        return [self.train_epoch(guided=self.epoch_is_guided(i, epochs)) for i in range(epochs)]

    def epoch_is_guided(self, index: int, epochs: int) -> bool:
        """Whether epoch ``index`` of a call training ``epochs`` epochs trains with guides: all
        do, except the first of two or more under ``retrieval.first_pass: warmup``."""
        warmup = self.memory is not None and self.cfg.retrieval.first_pass == "warmup" and epochs > 1
        return not (warmup and index == 0)
