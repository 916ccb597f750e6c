"""Gallery search: exact inner-product top-k over galleries of millions, with bounded memory.

The gallery is scanned in chunks of ``chunk_size`` rows with one preallocated score buffer, so extra
memory is about ``queries x (chunk_size + k)`` scores whatever the gallery size. After the first
chunk a query's current ``k``-th best score is a threshold: only the few scores above it are
collected (see :class:`ExactIndex`), so selecting the top-k costs a small fraction of the matmul and
exact search runs close to faiss ``IndexFlatIP`` (``benchmarks/retrieval_search.py``). Gallery rows
are stored in fp32 on CPU by default, or fp16 to halve the memory (converted per chunk, scores
computed in fp32; on GPU the storage dtype is the compute dtype). :class:`FaissIndex` wraps
``faiss.IndexFlatIP`` behind the same API for users who have faiss installed
(``pip install fashionshoot[faiss]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fashionshoot.errors import DataError


@dataclass
class SearchResult:
    """``scores[q, r]`` is the similarity of query ``q`` to its ``r``-th best gallery row ``indices[q, r]``."""

    scores: torch.Tensor
    indices: torch.Tensor


def _check_dims(queries: torch.Tensor, dim: int, what: str) -> None:
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise DataError(f"{what}: expected embeddings of shape (N, {dim}), got {tuple(queries.shape)}")


def merge_topk(best: SearchResult | None, scores: torch.Tensor, offset: int, k: int) -> SearchResult:
    """Merge one chunk's ``scores`` (columns start at gallery row ``offset``) into the running top-k."""
    chunk_k = min(k, scores.shape[1])
    top_scores, top_idx = scores.topk(chunk_k, dim=1)
    top_idx = top_idx + offset
    if best is None:
        return SearchResult(top_scores, top_idx)
    all_scores = torch.cat([best.scores, top_scores], dim=1)
    all_idx = torch.cat([best.indices, top_idx], dim=1)
    keep_scores, order = all_scores.topk(min(k, all_scores.shape[1]), dim=1)
    return SearchResult(keep_scores, all_idx.gather(1, order))


class _Pending:
    """Runs of scores whose maximum beats a per-query threshold, collected across chunks and merged
    into a running top-k now and then (every run is ``group`` scores wide)."""

    def __init__(self, group: int) -> None:
        self.group = group
        self.rows: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self.cols: list[torch.Tensor] = []

    def add_above(self, scores: torch.Tensor, threshold: torch.Tensor | None, offset: int, k: int) -> None:
        """Collect the runs of gallery-major ``scores`` (C, Q) whose maximum is at least ``threshold``
        (Q,); a tail shorter than a run is padded with ``-inf``. With no threshold (the first chunk),
        the ``k``-th largest run maximum is used: at least ``k`` runs reach it, so every query keeps
        at least ``k`` scores, and no top-``k`` score is below it."""
        group = self.group
        runs = scores.shape[0] // group
        grouped = scores[: runs * group].view(runs, group, scores.shape[1])
        maxima = grouped.amax(dim=1)
        if threshold is None:
            threshold = maxima.topk(k, dim=0).values[-1]
        run, row = (maxima >= threshold).nonzero().unbind(1)
        self._add(row, grouped[run, :, row], offset + run * group)
        if scores.shape[0] > runs * group:
            tail = scores[runs * group :]
            row = (tail.amax(dim=0) >= threshold).nonzero()[:, 0]
            padded = torch.nn.functional.pad(tail[:, row].T, (0, group - tail.shape[0]), value=float("-inf"))
            self._add(row, padded, torch.full_like(row, offset + runs * group))

    def _add(self, rows: torch.Tensor, scores: torch.Tensor, starts: torch.Tensor) -> None:
        if len(rows):
            self.rows.append(rows)
            self.scores.append(scores)
            self.cols.append(starts)

    def merge(self, best: SearchResult | None, k: int, queries: int) -> SearchResult | None:
        """``best`` (None: nothing yet) with the collected runs merged in, the collection emptied."""
        if not self.rows:
            return best
        rows, scores, starts = torch.cat(self.rows), torch.cat(self.scores), torch.cat(self.cols)
        self.rows, self.scores, self.cols = [], [], []
        order = rows.argsort(stable=True)
        rows, scores, starts = rows[order], scores[order], starts[order]
        counts = torch.bincount(rows, minlength=queries)
        slot = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
        width, group = int(counts.max()), self.group
        dense = torch.full((queries, width, group), float("-inf"), dtype=scores.dtype, device=rows.device)
        dense_cols = torch.zeros((queries, width, group), dtype=starts.dtype, device=rows.device)
        dense[rows, slot] = scores
        dense_cols[rows, slot] = starts.unsqueeze(1) + torch.arange(group, device=rows.device)
        all_scores, all_cols = dense.view(queries, -1), dense_cols.view(queries, -1)
        if best is not None:
            all_scores, all_cols = torch.cat([best.scores, all_scores], dim=1), torch.cat([best.indices, all_cols], dim=1)
        top_scores, order = all_scores.topk(k, dim=1)
        return SearchResult(top_scores, all_cols.gather(1, order))


class ExactIndex:
    """Exact maximum-inner-product search over a fixed gallery (use unit-norm rows for cosine).

    ``storage_dtype`` defaults to fp32 on CPU (scores are computed in fp32 there, where fp16 matmul
    is slow) and fp16 elsewhere; pass ``torch.float16`` on CPU to halve the gallery's memory at the
    cost of one conversion per chunk and fp16-rounded scores.

    Search is a chunked scan that never runs ``topk`` over a whole chunk once each query has ``k``
    results: every ``group`` consecutive scores of a chunk are reduced to their maximum (one cheap
    vectorised pass), only groups whose maximum beats the query's current ``k``-th best score are
    read, and the few scores above it are merged into the running top-k now and then. The result is
    the same as a full sort (ties aside); the selection costs a small fraction of the matmul.

    ``embeddings`` may also be a sequence of ``(N, D_p)`` parts with the same rows (a multi-part
    gallery): queries are then ``(Q, sum D_p)`` and a chunk's scores are the sum of the parts'
    products (one ``addmm`` each), as if the parts were concatenated, without a concatenated copy.
    The ensemble searches its members' galleries this way
    (:class:`~fashionshoot.retrieval.ensemble.RetrievalEnsemble`, dot-product fast path).
    """

    def __init__(self, embeddings: torch.Tensor | Sequence[torch.Tensor], chunk_size: int = 4096,
                 storage_dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 group: int = 32) -> None:
        parts = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
        if not parts or any(p.ndim != 2 or p.shape[0] == 0 for p in parts):
            shapes = [tuple(p.shape) for p in parts]
            raise DataError(f"gallery: expected non-empty (N, D) embedding matrices, got {shapes}")
        if len({p.shape[0] for p in parts}) != 1:
            raise DataError(f"gallery: parts have different numbers of rows {[p.shape[0] for p in parts]}")
        if chunk_size < 1 or group < 1:
            raise DataError(f"chunk_size and group must be >= 1, got {chunk_size} and {group}")
        self.device = torch.device(device)
        if storage_dtype is None:
            storage_dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        self.parts = [p.to(self.device, storage_dtype).contiguous() for p in parts]
        self.chunk_size, self.group = chunk_size, group
        self.compute_dtype = torch.float32 if self.device.type == "cpu" else storage_dtype

    @property
    def embeddings(self) -> torch.Tensor:
        """The stored ``(N, D)`` gallery (for a multi-part index, a concatenated copy)."""
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts, dim=1)

    @property
    def dim(self) -> int:
        return sum(p.shape[1] for p in self.parts)

    def __len__(self) -> int:
        return self.parts[0].shape[0]

    def search(self, queries: torch.Tensor, k: int, query_chunk: int = 4096) -> SearchResult:
        """Top-``k`` gallery rows for each query, best first. ``k`` is capped at the gallery size.

        Queries are searched in blocks of ``query_chunk``; extra memory is about
        ``query_chunk x (chunk_size + k)`` scores plus one converted chunk.
        """
        _check_dims(queries, self.dim, "queries")
        k = min(k, len(self))
        results = [self._search_block(block, k) for block in queries.split(query_chunk)]
        return SearchResult(torch.cat([r.scores for r in results]).float().cpu(),
                            torch.cat([r.indices for r in results]).cpu())

    def _search_block(self, queries: torch.Tensor, k: int) -> SearchResult:
        queries = queries.to(self.device, self.compute_dtype)
        q_ts, start = [], 0
        for part in self.parts:
            q_ts.append(queries[:, start : start + part.shape[1]].T.contiguous())
            start += part.shape[1]
        rows, size, group = queries.shape[0], self.chunk_size, self.group
        size = min(size, len(self))
        scores_buf = torch.empty(rows * size, dtype=self.compute_dtype, device=self.device)
        chunk_bufs = [torch.empty(size, p.shape[1], dtype=self.compute_dtype, device=self.device)
                      if p.dtype != self.compute_dtype else None for p in self.parts]
        best: SearchResult | None = None
        pending = _Pending(group)
        for number, offset in enumerate(range(0, len(self), size)):
            # Gallery-major (C, Q) scores: the faster matmul layout on CPU, and runs of gallery rows
            # are then contiguous rows of the buffer. A multi-part gallery adds each part's product.
            scores = None
            for part, q_t, chunk_buf in zip(self.parts, q_ts, chunk_bufs, strict=True):
                chunk = part[offset : offset + size]
                if chunk_buf is not None:
                    chunk = chunk_buf[: len(chunk)].copy_(chunk)
                if scores is None:
                    scores = torch.mm(chunk, q_t, out=scores_buf[: rows * len(chunk)].view(len(chunk), rows))
                else:
                    scores.addmm_(chunk, q_t)
            assert scores is not None
            if k * group * 4 > scores.shape[0] or (best is not None and best.scores.shape[1] < k):
                best = merge_topk(pending.merge(best, k, rows), scores.T, offset, k)
                continue
            pending.add_above(scores, None if best is None else best.scores[:, -1], offset, k)
            if number & (number + 1) == 0:  # chunks 0, 1, 3, 7, 15, ...: refresh the thresholds
                best = pending.merge(best, k, rows)
        best = pending.merge(best, k, rows)
        assert best is not None
        return best

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        save_file({"embeddings": self.embeddings.cpu()}, str(path), metadata={"chunk_size": str(self.chunk_size)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ExactIndex:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            chunk_size = int((fh.metadata() or {}).get("chunk_size", 4096))
            embeddings = fh.get_tensor("embeddings")
        return cls(embeddings, chunk_size=chunk_size, storage_dtype=embeddings.dtype, device=device)


class FaissIndex:
    """``faiss.IndexFlatIP`` behind the same ``search`` API (optional dependency)."""

    def __init__(self, embeddings: torch.Tensor) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise ImportError("FaissIndex needs faiss: pip install 'fashionshoot[faiss]'") from exc
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise DataError(f"gallery: expected a non-empty (N, D) embedding matrix, got {tuple(embeddings.shape)}")
        self.index = faiss.IndexFlatIP(embeddings.shape[1])
        self.index.add(embeddings.float().cpu().numpy())

    @property
    def dim(self) -> int:
        return self.index.d

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: torch.Tensor, k: int) -> SearchResult:
        _check_dims(queries, self.dim, "queries")
        scores, indices = self.index.search(queries.float().cpu().numpy(), min(k, len(self)))
        return SearchResult(torch.from_numpy(scores), torch.from_numpy(indices))
