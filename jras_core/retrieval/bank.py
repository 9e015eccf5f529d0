"""A site's private retrieval bank: its image-mask pairs and their embeddings.

Search runs in FAISS: ``IndexFlatIP`` (exact inner product) or ``IndexHNSWFlat``
(approximate, for large banks; ``retrieval.index``, :func:`build_index`), through
:func:`faiss_search`, which gives FAISS torch's thread count and its BLAS path for
batches of queries.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from jras_core.blas import choose_openblas_core

choose_openblas_core()  # OpenBLAS reads OPENBLAS_CORETYPE once, when FAISS loads it
import faiss  # noqa: E402
import numpy as np
import torch

from jras_core.config import HNSW_FROM, JRASConfig
from jras_core.data.slices import SliceSet
from jras_core.device import module_device
from jras_core.labels import one_hot_fg
from jras_core.models.batching import inference_batch_size
from jras_core.models.retriever import RetrieverModule
from jras_core.retrieval.guides import (
    centred_dice,
    centred_dice_pairs,
    centred_one_hot,
    centroids,
)
from jras_core.retrieval.store import BankStore

log = logging.getLogger(__name__)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def state_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict's names, dtypes, shapes and bytes: equal exactly when the
    states are, so that embeddings stored with it are reused only for the very same weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(state[name].shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


HNSW_LINKS = 32
"""Neighbours per node of the HNSW graph (FAISS's ``M``)."""

HNSW_EF_SEARCH = 128
"""Candidates HNSW keeps while searching (``efSearch``; at least the entries asked for)."""


def index_kind(kind: str, entries: int, hnsw_from: int = HNSW_FROM) -> str:
    """The index a bank of ``entries`` builds: ``flat`` or ``hnsw`` as given, and for ``auto``
    ``hnsw`` from ``hnsw_from`` entries on, else ``flat``."""
    if kind not in ("flat", "hnsw", "auto"):
        raise ValueError(f"index must be 'flat', 'hnsw' or 'auto', got {kind!r}")
    if kind == "auto":
        return "hnsw" if entries >= hnsw_from else "flat"
    return kind


def build_index(embeddings: np.ndarray, kind: str) -> faiss.Index:
    """A FAISS inner-product index over ``embeddings`` ``(N, d)`` float32 (L2-normalised):
    ``flat`` (``IndexFlatIP``, exact) or ``hnsw`` (``IndexHNSWFlat``, approximate,
    :data:`HNSW_LINKS` links per node, ``efSearch`` :data:`HNSW_EF_SEARCH`)."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(emb.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "flat":
        index = faiss.IndexFlatIP(emb.shape[1])
    else:
        raise ValueError(f"unknown index kind {kind!r}: 'flat' or 'hnsw'")
    faiss.omp_set_num_threads(torch.get_num_threads())
    index.add(emb)
    return index


class RetrievalBank:
    """Image-mask pairs of one site with L2-normalised embeddings and a search index.

    Args:
        slices: the bank's pairs (``images (N, 1, S, S)``, ``masks (N, S, S)``, case ids).
        num_classes: classes including background.
        index: ``flat`` (exact inner product, FAISS ``IndexFlatIP``; default), ``hnsw``
            (approximate FAISS HNSW index, large banks) or ``auto`` (``hnsw`` from
            ``hnsw_from`` entries on, else ``flat``: :func:`index_kind`).
        hnsw_from: the size from which ``auto`` builds HNSW.
        exclude: what a query of the bank's own slices may not retrieve: ``case`` (any
            slice of its patient), ``volume`` (any slice of its volume; other volumes of
            the patient, such as the other cardiac phase, stay eligible) or ``auto``
            (``case``, but ``volume`` when the bank holds a single case, which would
            otherwise leave its queries no guide at all).

    A query never retrieves a slice of its own owner (case or volume):
    :meth:`search` takes the queries' owner keys (:meth:`owner_keys`) and drops bank
    entries of those owners. The index is searched for ``k`` plus the most entries any one
    owner has, and the query's own entries are dropped from what comes back, so exclusion
    holds for the approximate index as for the exact one.
    """

    def __init__(self, slices: SliceSet, num_classes: int, index: str = "flat", exclude: str = "case",
                 hnsw_from: int = HNSW_FROM):
        if len(slices) == 0:
            raise ValueError("a retrieval bank needs at least one slice")
        index_kind(index, len(slices), hnsw_from)  # an unknown kind fails here, not at refresh
        if exclude not in ("case", "volume", "auto"):
            raise ValueError(f"exclude must be 'case', 'volume' or 'auto', got {exclude!r}")
        self.slices = slices
        self.num_classes = num_classes
        self.index_kind = index
        """As configured: ``flat``, ``hnsw`` or ``auto`` (:attr:`index_built` says which)."""
        self.hnsw_from = hnsw_from
        self.embeddings: np.ndarray | None = None
        self.index: faiss.Index | None = None
        self._centred: torch.Tensor | None = None
        self._centroids: tuple[torch.Tensor, torch.Tensor] | None = None
        self._areas: torch.Tensor | None = None
        self._embedded_with: dict[str, torch.Tensor] | None = None
        """The retriever state of the last :meth:`refresh` (None: embeddings from elsewhere)."""
        self._offered: tuple[np.ndarray, str] | None = None
        """Embeddings stored earlier and the :func:`state_fingerprint` they were computed with
        (:meth:`offer_embeddings`)."""
        if exclude == "auto":
            exclude = "volume" if len(set(slices.case_ids.tolist())) == 1 else "case"
        self.exclude = exclude
        """The exclusion unit in force: ``case`` or ``volume``."""
        keys = self.owner_keys(slices)
        self._owner_lookup = {name: i for i, name in enumerate(dict.fromkeys(keys))}
        self.owner_ids = torch.tensor([self._owner_lookup[k] for k in keys], dtype=torch.long)
        """``(N,)`` owner id of every entry (index into the bank's owners)."""
        self.max_per_owner = int(torch.bincount(self.owner_ids).max())

    @classmethod
    def for_method(cls, slices: SliceSet, cfg: JRASConfig) -> RetrievalBank:
        """A bank over ``slices`` as the method ``cfg`` configures it: its label set and its
        ``retrieval`` index, ``hnsw_from`` and exclusion."""
        r = cfg.retrieval
        return cls(slices, cfg.labels.num_classes, r.index, r.exclude, hnsw_from=r.hnsw_from)

    def __len__(self) -> int:
        return len(self.slices)

    # ------------------------------------------------------------------ embedding
    def retriever_input(self, index: torch.Tensor | slice | None = None, channels: int | None = None) -> torch.Tensor:
        """Bank entries in the retriever's channel layout: image plus true-mask one-hot,
        ``(n, 1 + C_fg, S, S)``; with ``channels=1`` the image alone ``(n, 1, S, S)``."""
        sel = slice(None) if index is None else index
        images = self.slices.images[sel]
        if channels == 1:
            return images
        masks = one_hot_fg(self.slices.masks[sel], self.num_classes)
        return torch.cat([images, masks], dim=1)

    @torch.no_grad()
    def refresh(self, retriever: RetrieverModule, batch_size: int | None = None, force: bool = False) -> None:
        """Re-embed every entry with ``retriever`` and rebuild the index.

        Nothing is recomputed when ``retriever`` holds exactly the weights of the last
        refresh (as when a site evaluates the global model and then trains from it; for a
        retriever on the segmenter's encoder, the encoder's weights count too).

        Args:
            batch_size: entries embedded at a time (default:
                :func:`~jras_core.models.batching.inference_batch_size` of the slice size).
            force: re-embed even then.
        """
        state = retriever.embedding_state()
        if not force and self._embedded_with is not None and _same_state(self._embedded_with, state):
            return
        offered, self._offered = self._offered, None
        if not force and offered is not None and offered[1] == state_fingerprint(state):
            self.set_embeddings(offered[0])
            self._embedded_with = {k: v.detach().clone() for k, v in state.items()}
            log.info("bank of %d entries: stored embeddings of these retriever weights reused", len(self))
            return
        batch_size = batch_size or inference_batch_size(int(self.slices.images.shape[-1]))
        was_training = retriever.training
        retriever.eval()
        device = module_device(retriever)
        chunks = []
        for start in range(0, len(self), batch_size):
            entries = self.retriever_input(slice(start, start + batch_size), retriever.in_channels)
            chunks.append(retriever(entries.to(device)).float().cpu())
        retriever.train(was_training)
        self.set_embeddings(torch.cat(chunks).numpy())
        self._embedded_with = {k: v.detach().clone() for k, v in state.items()}

    def offer_embeddings(self, embeddings: np.ndarray, fingerprint: str) -> None:
        """Embeddings ``(N, d)`` computed earlier (e.g. read from the site's store) with the
        retriever state of ``fingerprint`` (:func:`state_fingerprint`): the next
        :meth:`refresh` installs them instead of re-embedding when its retriever has exactly
        that state, and forgets them otherwise."""
        if embeddings.shape[0] != len(self):
            raise ValueError(f"{embeddings.shape[0]} embeddings for a bank of {len(self)} entries")
        self._offered = (embeddings, fingerprint)

    @property
    def embedded_fingerprint(self) -> str | None:
        """:func:`state_fingerprint` of the retriever state the current embeddings were
        computed with (None: no :meth:`refresh` yet, or embeddings set from elsewhere)."""
        return None if self._embedded_with is None else state_fingerprint(self._embedded_with)

    def set_embeddings(self, embeddings: np.ndarray) -> None:
        """Install ``(N, d)`` float32 embeddings and build the search index over them."""
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.shape[0] != len(self):
            raise ValueError(f"{emb.shape[0]} embeddings for a bank of {len(self)} entries")
        self.index = build_index(emb, self.index_built)
        self.embeddings = emb
        self._embedded_with = None

    @property
    def index_built(self) -> str:
        """The index this bank builds: ``flat`` or ``hnsw`` (:func:`index_kind`)."""
        return index_kind(self.index_kind, len(self), self.hnsw_from)

    def embeddings_at(self, idx: torch.Tensor) -> torch.Tensor:
        """The stored embeddings at ``idx`` (any shape; -1 reads entry 0): ``(*idx.shape, d)``."""
        if self.embeddings is None:
            raise RuntimeError("the bank has no embeddings yet: call refresh() first")
        table = torch.from_numpy(self.embeddings)
        return table[idx.clamp_min(0)]

    # ------------------------------------------------------------------ search
    def owner_keys(self, slices: SliceSet) -> list[str]:
        """The owner key of every slice of ``slices`` under this bank's exclusion unit:
        its case name, or its volume key (``case_phase``)."""
        if self.exclude == "volume":
            keys = [v.key for v in slices.volumes]
            return [keys[v] for v in slices.volume_ids.tolist()]
        return [slices.cases[c] for c in slices.case_ids.tolist()]

    def owner_ids_of(self, owners: list[str] | None, n: int) -> torch.Tensor:
        """Bank owner id of each of ``n`` queries' owner keys (-1 when the bank holds no
        slice of that owner, or ``owners`` is None)."""
        if owners is None:
            return torch.full((n,), -1, dtype=torch.long)
        return torch.tensor([self._owner_lookup.get(c, -1) for c in owners], dtype=torch.long)

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` entries by inner product, excluding each query's own case or volume.

        Args:
            queries: ``(Q, d)`` L2-normalised embeddings.
            k: neighbours per query.
            exclude: ``(Q,)`` bank owner id to exclude per query (-1: none;
                :meth:`owner_ids_of`).

        Returns:
            similarities ``(Q, k)`` float32 and indices ``(Q, k)`` int64, best first;
            index -1 (similarity -inf) where fewer than ``k`` entries are eligible.
        """
        if self.index is None:
            raise RuntimeError("the bank has no embeddings yet: call refresh() first")
        extra = self.max_per_owner if exclude is not None and bool((exclude >= 0).any()) else 0
        fetch = min(len(self), k + extra)
        if isinstance(self.index, faiss.IndexHNSW):  # keep at least as many candidates as asked for
            self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, fetch)
        sims, idx = faiss_search(self.index, torch.as_tensor(queries).detach().cpu().numpy(), fetch)
        sims_t, idx_t = torch.from_numpy(sims), torch.from_numpy(idx)
        valid = idx_t >= 0
        if extra:
            own = self.owner_ids[idx_t.clamp_min(0)] == exclude.view(-1, 1)
            valid &= ~own
        return _take_valid(sims_t, idx_t, valid, k)

    def search_by_mask(
        self, query_maps: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-learned ranking: centroid-aligned mask Dice of each bank mask against
        a (predicted) query mask.

        Args:
            query_maps: ``(Q, H, W)`` labels or ``(Q, C_fg, H, W)`` soft foreground maps.
            k: neighbours per query.
            exclude: as in :meth:`search`.

        Returns:
            Dice ``(Q, k)`` and indices ``(Q, k)``, best first.
        """
        scores = self.mask_similarity(query_maps)
        if exclude is not None:
            own = self.owner_ids.view(1, -1) == exclude.view(-1, 1)
            scores = scores.masked_fill(own, float("-inf"))
        kk = min(k, len(self))
        sims, idx = scores.topk(kk, dim=1)
        return _take_valid(sims, idx, torch.isfinite(sims), k)

    def centred_masks(self) -> torch.Tensor:
        """``(N, C_fg, 32, 32)`` centred, pooled one-hot bank masks (computed once)."""
        if self._centred is None:
            self._centred = centred_one_hot(self.slices.masks, self.num_classes)
        return self._centred

    def mask_similarity(self, query_maps: torch.Tensor) -> torch.Tensor:
        """``(Q, N)`` centroid-aligned Dice between query maps and every bank mask."""
        return centred_dice(centred_one_hot(query_maps, self.num_classes), self.centred_masks())

    def mask_similarity_at(self, query_maps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(Q, M)`` centroid-aligned Dice of each query map with the bank masks at
        ``idx`` ``(Q, M)`` (index -1 is scored as entry 0): :meth:`mask_similarity`
        gathered at ``idx``, computed for those entries only."""
        cand = self.centred_masks()[idx.clamp_min(0)]  # (Q, M, C_fg, s, s)
        return centred_dice_pairs(centred_one_hot(query_maps, self.num_classes), cand)

    def centroids_at(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Foreground centroids of the bank masks at ``idx`` (any shape): ``(*idx.shape, 2)``
        in normalised coordinates, and ``idx.shape`` bool, False where a mask has no
        foreground or the index is -1 (:func:`~jras_core.retrieval.guides.centroids`,
        computed once per bank)."""
        if self._centroids is None:
            parts = [centroids((m > 0).float()) for m in self.slices.masks.split(256)]
            self._centroids = torch.cat([c for c, _ in parts]), torch.cat([v for _, v in parts])
        cent, valid = self._centroids
        safe = idx.clamp_min(0)
        return cent[safe], valid[safe] & (idx >= 0)

    def areas_at(self, idx: torch.Tensor) -> torch.Tensor:
        """Foreground pixel count of the bank masks at ``idx`` (any shape; 0 where the index
        is -1), computed once per bank."""
        if self._areas is None:
            self._areas = torch.cat([(m > 0).sum(dim=(1, 2)) for m in self.slices.masks.split(256)]).float()
        return torch.where(idx >= 0, self._areas[idx.clamp_min(0)], torch.zeros(idx.shape))

    def entry_mask_similarity_at(self, entries: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``(Q, M)`` centroid-aligned Dice of the bank's own entries ``entries`` ``(Q,)``
        with the entries at ``idx`` ``(Q, M)``: :meth:`mask_similarity_at` of the entries'
        masks, read from the centred maps computed once instead of centring them anew."""
        centred = self.centred_masks()
        return centred_dice_pairs(centred[entries], centred[idx.clamp_min(0)])

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guide pairs at ``idx`` ``(Q, K)``: images ``(Q, K, 1, S, S)``, masks ``(Q, K, S, S)``
        uint8 labels.

        Entries with index -1 come back as zeros.
        """
        safe = idx.clamp_min(0)
        images = self.slices.images[safe]
        masks = self.slices.masks[safe].to(torch.uint8)
        missing = idx < 0
        if missing.any():
            images = images.masked_fill(missing[..., None, None, None], 0.0)
            masks = masks.masked_fill(missing[..., None, None], 0)
        return images, masks

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, store: BankStore | None = None) -> Path:
        """Write pairs, case table and embeddings to ``directory`` (one atomic file)."""
        store = store or BankStore(directory)
        arrays, tables = self.slices.to_arrays()
        arrays["images"] = self.slices.images.numpy()  # as given: a bank's images need not be on float16's grid
        if self.embeddings is not None:
            arrays["embeddings"] = self.embeddings
        meta = {
            "num_classes": self.num_classes,
            "index": self.index_kind,
            "hnsw_from": self.hnsw_from,
            "exclude": self.exclude,
            **tables,
        }
        path = store.save(arrays, meta)
        log.info("bank of %d slices written to %s", len(self), path)
        return path

    @classmethod
    def load(cls, directory: str | Path, store: BankStore | None = None) -> RetrievalBank:
        """Read a bank written by :meth:`save` (the index is rebuilt from the embeddings)."""
        store = store or BankStore(directory)
        arrays, meta = store.load()
        embeddings = arrays.pop("embeddings", None)
        slices = SliceSet.from_arrays(arrays, meta)
        bank = cls(slices, int(meta["num_classes"]), index=meta.get("index", "flat"), exclude=meta.get("exclude", "case"),
                   hnsw_from=int(meta.get("hnsw_from", HNSW_FROM)))
        if embeddings is not None:
            bank.set_embeddings(embeddings)
        return bank


BLAS_MIN_QUERIES = 4
"""From this many queries per call on, FAISS's flat search computes the inner products as
BLAS matrix products over blocks of entries, which read the index once per block of
queries. With fewer, it scans the whole index once per query (SIMD dot products), which is
faster for a single query but streams the index from memory again for every query: FAISS's
own switch-over (``distance_compute_blas_threshold``, 1000 queries at d=128) made a batch
of 256 queries over 100k entries 10x slower than one matrix product."""


def faiss_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with FAISS's OpenMP threads set to torch's and its BLAS path from
    :data:`BLAS_MIN_QUERIES` queries on.

    FAISS has its own OpenMP runtime: left at its default it starts one thread per core
    next to torch's pool, however few threads torch was given.

    Args:
        index: a FAISS index of ``d``-dimensional vectors.
        queries: ``(Q, d)`` (any float dtype, any layout: converted to contiguous float32).
        k: neighbours per query.

    Returns:
        scores ``(Q, k)`` float32 and indices ``(Q, k)`` int64 (-1 where fewer than ``k``).
    """
    faiss.omp_set_num_threads(torch.get_num_threads())
    faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES * index.d
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def exact_topk(
    queries: torch.Tensor, entries: torch.Tensor, k: int, chunk_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products in torch (a matrix product + ``topk``), queries in
    chunks so that at most ``chunk_elems`` scores exist at a time: the brute-force reference
    that ``jras bench cost`` times FAISS against.

    Args:
        queries: ``(Q, d)``; entries: ``(N, d)`` float32.

    Returns:
        similarities ``(Q, k)`` float32 and indices ``(Q, k)`` int64, best first.
    """
    n = entries.shape[0]
    step = max(1, chunk_elems // max(n, 1))
    sims, idx = [], []
    for start in range(0, queries.shape[0], step):
        top = torch.topk(queries[start : start + step] @ entries.T, k, dim=1)
        sims.append(top.values)
        idx.append(top.indices)
    if not sims:
        return queries.new_zeros((0, k)), torch.zeros((0, k), dtype=torch.long)
    return torch.cat(sims), torch.cat(idx)


def _take_valid(
    sims: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first ``k`` valid columns of each row (order preserved), padding with -1."""
    q, n = idx.shape
    # stable sort puts valid entries first while keeping their rank order
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    sims = torch.gather(sims, 1, order)
    idx = torch.gather(idx, 1, order)
    valid = torch.gather(valid, 1, order)
    if n < k:
        pad = k - n
        sims = torch.cat([sims, sims.new_full((q, pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_full((q, pad), -1)], dim=1)
        valid = torch.cat([valid, valid.new_zeros((q, pad))], dim=1)
    sims, idx, valid = sims[:, :k], idx[:, :k], valid[:, :k]
    return sims.masked_fill(~valid, float("-inf")), idx.masked_fill(~valid, -1)
