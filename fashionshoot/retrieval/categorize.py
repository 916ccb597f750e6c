"""Which garments can a lookbook show? Catalogue metadata, category assignment, fuzzy metadata matching.

Comparing every garment with every lookbook is both slow and error-prone: a red skirt will find some
red coat. Two cheap signals shrink the candidate set before any visual scoring:

- the garment **category** (from catalogue metadata when present, else a :class:`Categorizer`: zero-shot
  with the retrieval encoder's text tower by default, or any VLM behind :class:`VLMCategorizer`);
- **fuzzy metadata matching** (:class:`FuzzyMatcher`, rapidfuzz): a lookbook of brand "Maison Margiela"
  only shows garments of that brand, even when one side spells it "Maison Margela".

Catalogue folders are read by :func:`read_catalogue`: images plus an optional JSONL of metadata.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from fashionshoot.data.images import IMAGE_SUFFIXES
from fashionshoot.errors import DataError
from fashionshoot.retrieval.encoders import Encoder

#: File suffixes read as catalogue images (the same set the public-dataset readers accept).


# --------------------------------------------------------------------------------------------------
# Catalogues
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueItem:
    """One garment or lookbook image and its (optional) metadata.

    ``item_id`` is the metadata's id, else the image path relative to the folder without suffix.
    ``categories`` is the garment's category, or the categories a lookbook is known to show; empty when
    unknown (then a categoriser or the detector decides).
    """

    item_id: str
    path: Path
    categories: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


def default_metadata_path(folder: str | Path) -> Path:
    """``root/garments/`` -> ``root/garments.jsonl``: the sidecar convention of the synthetic set."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".jsonl")


def read_catalogue(folder: str | Path, metadata: str | Path | None = None,
                   id_key: str = "") -> list[CatalogueItem]:
    """Every image under ``folder`` (sorted), joined with metadata lines where present.

    A metadata line names its item with ``id_key`` (or the first of ``garment_id``, ``lookbook_id``,
    ``id``) and optionally its ``image`` path relative to ``folder``; otherwise the id must equal the
    image's relative path without suffix. ``category`` (str) or ``categories`` (list) fill
    :attr:`CatalogueItem.categories`; everything else (brand, title, collection, caption) is ``meta``.
    Metadata for an id with no image is a :class:`DataError`: it means the join is wrong.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: catalogue image folder does not exist")
    images = {p.relative_to(folder).with_suffix("").as_posix(): p for p in sorted(folder.rglob("*"))
              if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    meta_path = Path(metadata) if metadata else default_metadata_path(folder)
    rows: dict[str, dict[str, Any]] = {}
    if meta_path.is_file():
        rows = _read_metadata(meta_path, folder, images, id_key)
    elif metadata:
        raise DataError(f"{meta_path}: metadata file not found")
    items = []
    for rel, path in images.items():
        row = dict(rows.get(rel, {}))
        item_id = row.pop("_id", rel)
        categories = row.pop("categories", None) or ([row.pop("category")] if row.get("category") else [])
        row.pop("category", None)
        items.append(CatalogueItem(item_id, path, tuple(str(c) for c in categories), row))
    return items


def _read_metadata(path: Path, folder: Path, images: dict[str, Path], id_key: str) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc})") from exc
            keys = (id_key,) if id_key else ("garment_id", "lookbook_id", "id")
            item_id = next((str(row[k]) for k in keys if k in row), None)
            if item_id is None:
                raise DataError(f"{where}: no id field (looked for {', '.join(keys)})")
            rel = _image_key(row.pop("image"), folder, path.parent) if "image" in row else item_id
            if rel not in images:
                raise DataError(f"{where}: item {item_id!r} has no image {rel}.* under {folder}")
            rows[rel] = {**row, "_id": item_id}
    return rows


def _image_key(image: str, folder: Path, meta_dir: Path) -> str:
    """An ``image`` field is relative to the image folder or, as in the synthetic set's
    ``garments.jsonl`` (``garments/g00001.png``), to the metadata file's folder."""
    for base in (folder, meta_dir):
        path = (base / image).resolve()
        if path.is_file() and path.is_relative_to(folder.resolve()):
            return path.relative_to(folder.resolve()).with_suffix("").as_posix()
    return Path(image).with_suffix("").as_posix()


# --------------------------------------------------------------------------------------------------
# Categorisers
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class Categorizer(Protocol):
    """Scores images against a fixed category list: ``(N, C)`` probabilities, rows summing to 1.

    ``name`` identifies the categoriser and its settings (it keys the category cache).
    """

    name: str
    categories: tuple[str, ...]

    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor: ...


def predict(categorizer: Categorizer, images: Sequence[Image.Image], top_k: int = 1,
            min_margin: float = 0.0) -> list[tuple[str, ...]]:
    """The ``top_k`` most likely categories of each image, best first; ``()`` when there is no clear winner.

    A row whose best probability does not beat the runner-up by more than ``min_margin`` (a tie, e.g.
    the uniform row a :class:`VLMCategorizer` gives an unmappable answer) names no category: ``topk``
    would otherwise pick an arbitrary tied one and the item would be paired as if it had been categorised.
    """
    probs = categorizer.scores(images)
    best = probs.topk(min(max(top_k, 2), probs.shape[1]), dim=1)  # the runner-up too, for the margin
    top = best.indices[:, :top_k]
    if probs.shape[1] > 1:
        clear = best.values[:, 0] - best.values[:, 1] > min_margin
    else:
        clear = torch.ones(len(probs), dtype=torch.bool)
    return [tuple(categorizer.categories[i] for i in row) if ok else ()
            for row, ok in zip(top.tolist(), clear.tolist(), strict=True)]


class ZeroShotCategorizer:
    """CLIP-style zero-shot classification with the retrieval encoder's own text tower.

    Each category is described by several prompts (``templates`` formatted with the category name, or
    explicit ``prompts``); their text embeddings are averaged and renormalised (prompt ensembling), and
    ``softmax(temperature * cos)`` turns cosines into probabilities (100 is CLIP's learned logit scale).
    """

    def __init__(self, encoder: Encoder, categories: Sequence[str],
                 templates: Sequence[str] = ("a photo of a {}.", "a product photo of a {}."),
                 prompts: Mapping[str, Sequence[str]] | None = None, temperature: float = 100.0) -> None:
        if not categories:
            raise DataError("ZeroShotCategorizer: no categories given")
        self.encoder = encoder
        self.categories = tuple(categories)
        self.temperature = temperature
        texts = {c: list((prompts or {}).get(c) or [t.format(c) for t in templates]) for c in self.categories}
        embedded = [encoder.embed_texts(texts[c]).mean(0) for c in self.categories]
        self.class_embeddings = torch.nn.functional.normalize(torch.stack(embedded), dim=1)
        self.name = f"zeroshot|{encoder.name}|{json.dumps(texts, sort_keys=True)}|T={temperature}"

    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        image_emb = self.encoder.embed_images(images)
        if image_emb.shape[1] != self.class_embeddings.shape[1]:
            raise DataError(f"{self.encoder.name}: image embeddings have dim {image_emb.shape[1]} but text "
                            f"embeddings dim {self.class_embeddings.shape[1]}; zero-shot needs one space")
        return (self.temperature * image_emb @ self.class_embeddings.T).softmax(dim=1)


VLM_PROMPT_VERSION = "v1"
VLM_PROMPT = ("Which kind of garment is shown in this image? Answer with exactly one of: {choices}.")


class VLMCategorizer:
    """A vision-language model as categoriser: ``answer(images, prompt) -> texts`` is any VLM call
    (e.g. a transformers ``image-text-to-text`` pipeline); each answer is mapped onto the closest
    category name (see :meth:`match`). An answer matching no category, or several, gets a uniform row,
    so it never silently picks a category. The prompt is versioned for the cache key.
    """

    def __init__(self, answer: Callable[[Sequence[Image.Image], str], Sequence[str]], categories: Sequence[str],
                 name: str, prompt: str = VLM_PROMPT, min_score: float = 85.0, margin: float = 10.0) -> None:
        self.answer = answer
        self.categories = tuple(categories)
        self.prompt = prompt.format(choices=", ".join(self.categories))
        self.min_score, self.margin = min_score, margin
        self.name = f"vlm|{name}|{VLM_PROMPT_VERSION}|{self.prompt}|match=v2/{min_score}/{margin}"

    def scores(self, images: Sequence[Image.Image]) -> torch.Tensor:
        answers = list(self.answer(images, self.prompt))
        if len(answers) != len(images):
            raise DataError(f"{self.name}: got {len(answers)} answers for {len(images)} images")
        out = torch.full((len(images), len(self.categories)), 1.0 / len(self.categories))
        for i, text in enumerate(answers):
            match = self.match(text)
            if match is not None:
                out[i] = 0.0
                out[i, match] = 1.0
        return out

    def match(self, answer: str) -> int | None:
        """Index of the one category ``answer`` names, or None when it names none or several.

        Whole words first (a plural ``s``/``es`` allowed): substring scorers map "a t-shirt" to
        "skirt". Failing that, each run of 1-3 answer words (joined with and without spaces, so
        "outer wear" reaches "outerwear") is compared whole with ``fuzz.ratio`` for typos; the best
        category must reach ``min_score`` and beat the runner-up by ``margin``.
        """
        from rapidfuzz import fuzz, utils

        words = utils.default_process(answer).split()
        named = [j for j, c in enumerate(self.categories) if _names_category(words, utils.default_process(c).split())]
        if named:
            return named[0] if len(named) == 1 else None
        grams = {sep.join(words[i : i + n]) for n in (1, 2, 3) for i in range(len(words) - n + 1) for sep in ("", " ")}
        best = sorted((max((fuzz.ratio(g, utils.default_process(c)) for g in grams), default=0.0), j)
                      for j, c in enumerate(self.categories))[::-1]
        if not best or best[0][0] < self.min_score:
            return None
        if len(best) > 1 and best[0][0] - best[1][0] < self.margin:
            return None
        return best[0][1]


def _names_category(words: Sequence[str], category: Sequence[str]) -> bool:
    """Whether ``category``'s words occur consecutively in ``words`` (the last one may be plural)."""
    n = len(category)
    if n == 0:
        return False
    forms = {category[-1], category[-1] + "s", category[-1] + "es"}
    return any(list(words[i : i + n - 1]) == list(category[:-1]) and words[i + n - 1] in forms
               for i in range(len(words) - n + 1))


# --------------------------------------------------------------------------------------------------
# Fuzzy metadata matching
# --------------------------------------------------------------------------------------------------


class FuzzyMatcher:
    """Restricts a query's candidates to gallery items whose metadata fuzzily agrees.

    ``fields`` maps a metadata key (``brand``, ``collection``, ``title``) to the minimum rapidfuzz score
    (0-100). A gallery item is a candidate when, for every field both sides have, the score of the two
    strings reaches that minimum; a field missing on either side does not restrict (unknown is not a
    mismatch). Strings are lower-cased and stripped of punctuation first (rapidfuzz ``default_process``);
    ``token_set_ratio`` tolerates typos, word order and extra words ("Prada Milano" vs "prada").
    """

    def __init__(self, fields: Mapping[str, float], scorer: str = "token_set_ratio") -> None:
        from rapidfuzz import fuzz

        if not hasattr(fuzz, scorer):
            raise DataError(f"fuzzy scorer {scorer!r}: not a rapidfuzz.fuzz function")
        self.fields = dict(fields)
        self.scorer = getattr(fuzz, scorer)

    def key(self, meta: Mapping[str, Any]) -> tuple[str, ...]:
        """The values that decide a query's candidates (queries with equal keys share candidates)."""
        return tuple(str(meta.get(f) or "") for f in self.fields)

    def candidates(self, query_keys: Sequence[tuple[str, ...]], gallery: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``(len(query_keys), len(gallery))`` boolean mask of allowed (query, gallery item) pairs."""
        from rapidfuzz import process, utils

        mask = np.ones((len(query_keys), len(gallery)), dtype=bool)
        for j, (name, minimum) in enumerate(self.fields.items()):
            q_values = sorted({k[j] for k in query_keys})
            g_all = [str(m.get(name) or "") for m in gallery]
            g_values = sorted(set(g_all))
            scores = process.cdist(q_values, g_values, scorer=self.scorer, processor=utils.default_process,
                                   dtype=np.float32)
            ok = scores >= minimum
            ok[[i for i, v in enumerate(q_values) if not v], :] = True
            ok[:, [i for i, v in enumerate(g_values) if not v]] = True
            q_lookup = {v: i for i, v in enumerate(q_values)}
            g_lookup = {v: i for i, v in enumerate(g_values)}
            q_pos = np.array([q_lookup[k[j]] for k in query_keys], dtype=np.int64)
            g_pos = np.array([g_lookup[v] for v in g_all], dtype=np.int64)
            mask &= ok[q_pos][:, g_pos]
        return mask
