"""On-disk caches that make rebuilding pairs incremental and resumable.

Embedding 9.5M garments and 550k lookbooks is the expensive part of building pairs; adding a thousand
new garments must not re-embed the other millions, and a crash must not lose hours of work. So:

- :class:`EmbeddingCache` keeps, per encoder, embeddings keyed by ``(item key, fingerprint)`` in
  safetensors chunk files. Each chunk carries its own keys and fingerprints in its header, so the
  chunk headers *are* the index: there is no separate index file that a crash could leave out of sync,
  and several processes can add chunks to one cache concurrently (each writes its own files).
  An item whose file changed gets a new fingerprint and is embedded again; stale rows are ignored.
- :class:`RecordCache` does the same for small JSON results (detections, categories) in JSONL files.

The fingerprint of a file is a hash of its bytes (``content``) or its size and mtime (``mtime``,
faster on slow disks, but a touched file counts as changed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from fashionshoot.data.faults import FaultReport
from fashionshoot.errors import DataError

FingerprintMode = Literal["content", "mtime"]


def file_fingerprint(path: str | Path, mode: FingerprintMode = "content") -> str:
    """Identity of a file's current content; raises :class:`DataError` naming a missing file."""
    path = Path(path)
    try:
        if mode == "mtime":
            st = path.stat()
            return f"m{st.st_size}-{st.st_mtime_ns}"
        if mode != "content":
            raise DataError(f"fingerprint mode {mode!r}: expected 'content' or 'mtime'")
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc


def text_fingerprint(*parts: Any) -> str:
    """A short stable hash of settings or derived keys (e.g. a crop box plus its image fingerprint)."""
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] + "-" + text_fingerprint(name)[:8]


@dataclass(frozen=True)
class CacheItem:
    """Something to embed: ``load`` returns its image (raising :class:`DataError` if unreadable)."""

    key: str
    fingerprint: str
    load: Callable[[], Image.Image]


class EmbeddingCache:
    """Embeddings of one encoder, stored under ``root/<encoder slug>/chunk-*.safetensors``.

    ``writer`` names this process's chunk files (use the process rank); :attr:`embedded` counts the
    items this object actually sent through the encoder, which is how "incremental" is checked.
    """

    def __init__(self, root: str | Path, encoder_name: str, writer: str = "0") -> None:
        self.encoder_name = encoder_name
        self.dir = Path(root) / _slug(encoder_name)
        self.writer = writer
        self.embedded = 0
        self._rows: dict[tuple[str, str], tuple[str, int]] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self.dim: int | None = None
        self.reload()

    def reload(self) -> None:
        """Re-read every chunk header (picks up chunks written by other processes)."""
        from safetensors import safe_open

        self._rows.clear()
        for path in sorted(self.dir.glob("chunk-*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            if meta.get("encoder") != self.encoder_name:
                raise DataError(f"{path}: written for encoder {meta.get('encoder')!r}, not {self.encoder_name!r}")
            self._check_dim(int(meta["dim"]), str(path))
            for row, (key, fp) in enumerate(zip(json.loads(meta["keys"]), json.loads(meta["fingerprints"]),
                                                strict=True)):
                self._rows[(key, fp)] = (path.name, row)

    def _check_dim(self, dim: int, where: str) -> None:
        if self.dim is None:
            self.dim = dim
        elif dim != self.dim:
            raise DataError(f"{where}: encoder {self.encoder_name!r} embeddings have dim {dim}, but this cache "
                            f"({self.dir}) holds dim {self.dim}; the encoder changed under the same name: "
                            "delete the cache folder or rename the encoder")

    def __contains__(self, item: tuple[str, str]) -> bool:
        return item in self._rows

    def put(self, keys: Sequence[str], fingerprints: Sequence[str], embeddings: torch.Tensor) -> None:
        """Store one chunk atomically (temporary name, then rename)."""
        from safetensors.torch import save_file

        if embeddings.ndim != 2 or embeddings.shape[0] != len(keys) or len(keys) != len(fingerprints):
            raise DataError(f"{self.encoder_name}: {len(keys)} keys for embeddings of shape {tuple(embeddings.shape)}")
        self._check_dim(embeddings.shape[1], f"encoder {self.encoder_name!r} output")
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"chunk-{self.writer}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = self.dir / f".{name}.tmp"
        tensor = embeddings.detach().to("cpu", torch.float32).contiguous()
        save_file({"embeddings": tensor}, str(tmp), metadata={
            "encoder": self.encoder_name, "dim": str(tensor.shape[1]),
            "keys": json.dumps(list(keys)), "fingerprints": json.dumps(list(fingerprints))})
        os.replace(tmp, self.dir / name)
        self._tensors[name] = tensor
        for row, key_fp in enumerate(zip(keys, fingerprints, strict=True)):
            self._rows[key_fp] = (name, row)

    def get(self, items: Sequence[tuple[str, str]]) -> torch.Tensor:
        """Stacked embeddings of ``(key, fingerprint)`` items, in order; all must be cached."""
        from safetensors.torch import load_file

        missing = [k for k in items if k not in self._rows]
        if missing:
            raise DataError(f"{self.encoder_name}: {len(missing)} item(s) not in the cache, e.g. {missing[0]}")
        if not items:
            return torch.empty(0, self.dim or 0)
        out = torch.empty(len(items), self.dim or 0)
        by_file: dict[str, tuple[list[int], list[int]]] = {}
        for i, key_fp in enumerate(items):
            name, row = self._rows[key_fp]
            positions, rows = by_file.setdefault(name, ([], []))
            positions.append(i)
            rows.append(row)
        for name, (positions, rows) in by_file.items():
            if name not in self._tensors:
                self._tensors[name] = load_file(str(self.dir / name))["embeddings"]
            out[positions] = self._tensors[name][rows].float()
        return out

    def fill(self, items: Iterable[CacheItem], embed: Callable[[list[Image.Image]], torch.Tensor],
             faults: FaultReport, batch_size: int = 64, fault_reason: str = "undecodable image",
             progress: Callable[[int], None] | None = None) -> set[str]:
        """Embed the items not yet cached, ``batch_size`` at a time, one chunk per batch.

        Unreadable items are skipped and counted in ``faults``; returns their keys. Writing a chunk per
        batch bounds the work an interruption can lose to one batch.
        """
        failed: set[str] = set()
        batch: list[CacheItem] = []
        images: list[Image.Image] = []

        def flush() -> None:
            if batch:
                self.put([b.key for b in batch], [b.fingerprint for b in batch], embed(images))
                self.embedded += len(batch)
                if progress is not None:
                    progress(len(batch))
                batch.clear()
                images.clear()

        for item in items:
            if (item.key, item.fingerprint) in self._rows:
                continue
            try:
                images.append(item.load())
            except DataError as exc:
                faults.skip(fault_reason, str(exc))
                failed.add(item.key)
                continue
            batch.append(item)
            if len(batch) >= batch_size:
                flush()
        flush()
        return failed


class RecordCache:
    """JSON values keyed by ``(key, fingerprint)``, appended to ``root/<writer>.jsonl``.

    Used for detector boxes and category predictions. A line cut short by a crash is ignored on the
    next read (its item is simply recomputed).
    """

    def __init__(self, root: str | Path, writer: str = "0") -> None:
        self.dir = Path(root)
        self.writer = writer
        self._values: dict[tuple[str, str], Any] = {}
        self.reload()

    def reload(self) -> None:
        self._values.clear()
        for path in sorted(self.dir.glob("*.jsonl")):
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                        self._values[(row["key"], row["fp"])] = row["value"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue

    def get(self, key: str, fingerprint: str) -> Any | None:
        return self._values.get((key, fingerprint))

    def put_many(self, entries: Iterable[tuple[str, str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / f"{self.writer}.jsonl").open("a", encoding="utf-8") as fh:
            for key, fp, value in entries:
                fh.write(json.dumps({"key": key, "fp": fp, "value": value}) + "\n")
                self._values[(key, fp)] = value
            fh.flush()
