"""Evaluate generated images against references under a stated metric protocol.

    python eval/generation.py --config configs/eval_generation.yaml generated=[out/gen] references=[data/gt]

Inputs are folders (searched recursively; the first sub-folder names the category, as in Fashion-RAG's
``{dresses,upper_body,lower_body}/`` layout) or ``.tar`` shards. Generated and reference images are
paired by file stem, by CatVTON's first-8-digits rule, or by an explicit manifest (CSV with columns
``generated,reference`` and optionally ``category,caption,garment``). Writes ``metrics.json`` (every
result with its protocol), ``metrics.md`` (a table row per category) and the resolved ``config.yaml``
into ``out_dir``. Bad input is an error naming the file, or — with ``skip_bad=true`` — skipped, counted
and listed in ``metrics.json``.
"""

from __future__ import annotations

import csv
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from fashionshoot.config import config_from_argv, save_config
from fashionshoot.data.faults import FaultReport
from fashionshoot.data.images import decode_image, load_image
from fashionshoot.errors import ConfigError, DataError, script_exit_code
from fashionshoot.metrics.images import match_reference
from fashionshoot.metrics.protocol import Protocol, get_protocol
from fashionshoot.metrics.report import AGGREGATE, EvaluationReport

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
#: The bucket of images without a category when other images of the run have one.
UNCATEGORISED = "uncategorised"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "eval_generation.yaml"


@dataclass
class WeightsConfig:
    """Local weights; ``None`` files are looked up by their canonical names (docs/evaluation.md)."""

    inception: str | None = None
    lpips_trunk: str | None = None
    clip: str | None = None
    garment_encoder: str | None = None
    search_dirs: list[str] = field(default_factory=list)


@dataclass
class GenerationEvalConfig:
    generated: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    manifest: str | None = None
    pairing: Literal["stem", "first-digits"] = "stem"
    setting: Literal["paired", "unpaired"] = "paired"
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "lpips", "ssim"])
    protocol: str = "fashionshoot"
    kid_subset_size: int | None = None
    kid_subsets: int | None = None
    #: Catalogue garment images: the gallery of garment_recall and the garments of clip_i (by manifest).
    garments: list[str] = field(default_factory=list)
    batch_size: int = 16
    device: str = "cpu"
    skip_bad: bool = False
    out_dir: str = "outputs/eval_generation"
    label: str = ""
    weights: WeightsConfig = field(default_factory=WeightsConfig)


@dataclass(frozen=True)
class Entry:
    """One image in a folder or shard: ``key`` is its path without suffix, relative to its source."""

    key: str
    source: str
    member: str

    @property
    def stem(self) -> str:
        return Path(self.key).name

    @property
    def category(self) -> str | None:
        parts = Path(self.key).parts
        return parts[0] if len(parts) > 1 else None

    @property
    def where(self) -> str:
        return self.member if not self.source.endswith(".tar") else f"{self.source}#{self.member}"


def list_images(sources: Sequence[str]) -> list[Entry]:
    """Every image in the given folders and ``.tar`` shards, in a stable order."""
    entries: list[Entry] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            entries += [Entry(p.relative_to(path).with_suffix("").as_posix(), source, str(p)) for p in files]
        elif path.suffix == ".tar" and path.is_file():
            with tarfile.open(path) as tar:
                names = sorted(m.name for m in tar.getmembers() if Path(m.name).suffix.lower() in IMAGE_SUFFIXES)
            entries += [Entry(str(Path(n).with_suffix("")), source, n) for n in names]
        else:
            raise DataError(f"{source}: not a folder or a .tar shard")
    return entries


class ImageReader:
    """Decodes entries; shards stay open for the run so reading a member does not rescan the tar."""

    def __init__(self) -> None:
        self._tars: dict[str, tarfile.TarFile] = {}

    def __call__(self, entry: Entry) -> Image.Image:
        if not entry.source.endswith(".tar"):
            return load_image(entry.member)
        tar = self._tars.setdefault(entry.source, tarfile.open(entry.source))
        member = tar.extractfile(entry.member)
        if member is None:
            raise DataError(f"{entry.where}: not a regular file")
        return decode_image(member.read(), entry.where)


def pair_key(entry: Entry, pairing: str) -> str:
    """The pairing key: the file stem, or CatVTON's 8 characters from the first digit of the file name."""
    if pairing == "stem":
        return entry.stem
    match = re.search(r"\d", entry.stem)
    if match is None:
        raise DataError(f"{entry.where}: no digit in the file name to pair by ({pairing})")
    return entry.stem[match.start() : match.start() + 8]


@dataclass
class Sample:
    generated: Entry
    reference: Entry | None
    category: str | None
    caption: str | None = None
    garment: str | None = None


def _index(entries: Sequence[Entry], key: Callable[[Entry], str], what: str) -> dict[str, Entry]:
    index: dict[str, Entry] = {}
    for entry in entries:
        k = key(entry)
        if k in index:
            raise DataError(f"two {what} images share the key {k!r}: {index[k].where} and {entry.where}")
        index[k] = entry
    return index


@dataclass(frozen=True)
class GarmentIds:
    """The garment ids a manifest row may name: catalogue files (clip_i) and gallery entries (garment_recall)."""

    files: Collection[str] = ()
    gallery: Collection[str] = ()


def build_samples(cfg: GenerationEvalConfig, gen: list[Entry], refs: list[Entry], faults: FaultReport,
                  garments: GarmentIds | None = None) -> list[Sample]:
    """Pair generated with reference images (paired setting) or just attach categories (unpaired)."""
    if cfg.manifest:
        return _manifest_samples(cfg, gen, refs, faults, garments or GarmentIds())
    if cfg.setting == "unpaired":
        for g in gen:
            _check_category(g.category, g.where)
        return [Sample(g, None, g.category) for g in gen]
    # Pair within the same category sub-folder; a flat folder pairs with a nested one by key alone.
    by_key = _index(refs, lambda e: f"{e.category}/{pair_key(e, cfg.pairing)}", "reference")
    bare: dict[str, list[Entry]] = {}
    for r in refs:
        bare.setdefault(pair_key(r, cfg.pairing), []).append(r)
    samples, used = [], set()
    for g in gen:
        key = pair_key(g, cfg.pairing)
        ref = by_key.get(f"{g.category}/{key}")
        if ref is None and len(bare.get(key, [])) > 1:
            raise DataError(f"{g.where}: key {key!r} matches several references: {[r.where for r in bare[key]]}")
        ref = ref or (bare.get(key) or [None])[0]
        if ref is None:
            _bad(cfg, faults, "generated image without reference", g.where)
            continue
        used.add(ref.key)
        _check_category(g.category or ref.category, g.where)
        samples.append(Sample(g, ref, g.category or ref.category))
    unused = [r for r in refs if r.key not in used]
    if unused and not cfg.skip_bad:
        raise DataError(
            f"mismatched counts: {len(gen)} generated vs {len(refs)} reference images; {len(unused)} references "
            f"have no generated image (e.g. {unused[0].where}); pass skip_bad=true to evaluate the matched pairs"
        )
    for r in unused:
        faults.skip("reference image without generated image", r.where)
    return samples


def _manifest_samples(cfg: GenerationEvalConfig, gen: list[Entry], refs: list[Entry],
                      faults: FaultReport, garments: GarmentIds) -> list[Sample]:
    gen_by = {**_index(gen, lambda e: e.stem, "generated"), **{e.key: e for e in gen}}
    ref_by = {**_index(refs, lambda e: e.stem, "reference"), **{e.key: e for e in refs}}
    with open(cfg.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "generated" not in rows[0]:
        raise DataError(f"{cfg.manifest}: expected a CSV header with at least a 'generated' column")
    samples = []
    for line, row in enumerate(rows, start=2):
        where = f"{cfg.manifest}:{line}"
        g = gen_by.get(row["generated"])
        r = ref_by.get(row.get("reference") or "")
        if g is None or (cfg.setting == "paired" and r is None):
            _bad(cfg, faults, "manifest row names a missing image", where)
            continue
        problem = _row_problem(cfg, row, garments)
        if problem is not None:
            reason, detail = problem
            _bad(cfg, faults, reason, f"{where} ({detail})")
            continue
        category = row.get("category") or g.category
        _check_category(category, where)
        samples.append(Sample(g, r, category, row.get("caption"), (row.get("garment") or "").strip() or None))
    return samples


def _row_problem(cfg: GenerationEvalConfig, row: dict[str, str], garments: GarmentIds) -> tuple[str, str] | None:
    """Why a manifest row cannot be scored by the chosen metrics, as (reason, detail), or None.

    Why here, once per row: a row kept without its caption or garment would be scored against "" or
    crash a metric later, far from the manifest line at fault.
    """
    metrics, garment = set(cfg.metrics), (row.get("garment") or "").strip()
    if "clip_t" in metrics and not (row.get("caption") or "").strip():
        return "manifest row has no caption (clip_t needs one)", f"generated {row['generated']!r}"
    if metrics & {"clip_i", "garment_recall"} and not garment:
        return "manifest row has no garment (clip_i / garment_recall need one)", f"generated {row['generated']!r}"
    if "clip_i" in metrics and garment not in garments.files:
        return "manifest garment not found in garments", f"garment {garment!r}, garments={cfg.garments}"
    if "garment_recall" in metrics and garment not in garments.gallery:
        return "manifest garment not in the garment_recall gallery", f"garment {garment!r}"
    return None


def _check_category(category: str | None, where: str) -> None:
    """``all`` names the pooled result of every category; a real category of that name would merge into it."""
    if category == AGGREGATE:
        raise DataError(f"{where}: category {AGGREGATE!r} is reserved for the pooled result; rename the category")


def _bad(cfg: GenerationEvalConfig, faults: FaultReport, reason: str, where: str) -> None:
    if not cfg.skip_bad:
        raise DataError(f"{where}: {reason} (pass skip_bad=true to skip and report such samples)")
    faults.skip(reason, where)


def resolve_protocol(cfg: GenerationEvalConfig) -> Protocol:
    protocol = get_protocol(cfg.protocol)
    changes = {k: v for k, v in (("kid_subset_size", cfg.kid_subset_size), ("kid_subsets", cfg.kid_subsets))
               if v is not None}
    return protocol.replace(**changes)


def load_extractors(cfg: GenerationEvalConfig, protocol: Protocol, gallery: list[Entry], read: ImageReader):
    """Load only the networks the chosen metrics need, each from a local file."""
    from fashionshoot.metrics.clip import load_clip
    from fashionshoot.metrics.extractors import load_inception, load_lpips
    from fashionshoot.metrics.fidelity import embed
    from fashionshoot.metrics.suite import Extractors, GarmentGallery

    w, metrics = cfg.weights, set(cfg.metrics)
    ex = Extractors()
    if metrics & {"fid", "kid"}:
        ex.inception = load_inception(protocol.inception, w.inception, w.search_dirs).to(cfg.device)
    if "lpips" in metrics and cfg.setting == "paired":
        ex.lpips = load_lpips(protocol.lpips_net, w.lpips_trunk, w.search_dirs).to(cfg.device)
    if metrics & {"clip_t", "clip_i"}:
        if w.clip is None:
            raise ConfigError("clip_t / clip_i need weights.clip (a CLIP or OpenCLIP folder)")
        ex.clip = load_clip(w.clip, cfg.device)
    if "garment_recall" in metrics:
        source = w.garment_encoder or w.clip
        if source is None or not gallery:
            raise ConfigError("garment_recall needs weights.garment_encoder (or weights.clip) and garments=[...]")
        encoder = load_clip(source, cfg.device).embed_images
        images = [pil_to_tensor(read(e)) for e in gallery]
        ex.garment_gallery = GarmentGallery(encoder, embed(encoder, images, cfg.batch_size), [e.stem for e in gallery])
    return ex


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run(cfg: GenerationEvalConfig, extractors=None) -> EvaluationReport:
    """Evaluate and write the outputs; ``extractors`` (a :class:`~fashionshoot.metrics.Extractors`) may be
    injected, e.g. tiny networks in tests, instead of loading the configured weights."""
    from fashionshoot.metrics.suite import EvaluationSuite

    if not cfg.generated or (not cfg.references and set(cfg.metrics) - {"clip_t", "garment_recall"}):
        raise ConfigError("set generated=[...] and references=[...] (folders or .tar shards)")
    protocol = resolve_protocol(cfg)
    faults = FaultReport()
    read = ImageReader()
    gen, refs, garments = list_images(cfg.generated), list_images(cfg.references), list_images(cfg.garments)
    if not gen:
        raise DataError(f"no images found in {cfg.generated}")
    extractors = extractors or load_extractors(cfg, protocol, garments, read)
    suite = EvaluationSuite(protocol, cfg.metrics, cfg.setting, extractors)  # config errors before data errors
    samples = build_samples(cfg, gen, refs, faults, _garment_ids(garments, extractors))
    _check_kid_counts(cfg, protocol, samples, refs)
    categorised = _has_categories(cfg, samples, refs)
    garment_by = {e.stem: e for e in garments}
    for batch in tqdm(list(_batches(samples, cfg.batch_size)), desc="evaluating", unit="batch"):
        _update(cfg, protocol, suite, batch, read, garment_by, faults, categorised)
    if cfg.setting == "unpaired":
        for batch in tqdm(list(_batches(refs, cfg.batch_size)), desc="references", unit="batch"):
            loaded = [(r, _load(cfg, read, r, faults)) for r in batch]
            loaded = [(r, img) for r, img in loaded if img is not None]
            suite.update_real([pil_to_tensor(img).to(cfg.device) for _, img in loaded],
                              _categories([r.category for r, _ in loaded], categorised))
    report = suite.compute(skip_failed=cfg.skip_bad)
    report.faults = faults.to_dict()
    _write(cfg, report)
    if faults.total:
        print(faults.summary(), file=sys.stderr)
    return report


def _garment_ids(garments: list[Entry], extractors) -> GarmentIds:
    """Catalogue stems (clip_i's garments), and the ids of the gallery garment_recall searches."""
    gallery = extractors.garment_gallery
    return GarmentIds({e.stem for e in garments}, {str(i) for i in gallery.ids} if gallery is not None else ())


def _has_categories(cfg: GenerationEvalConfig, samples: Sequence[Sample], refs: Sequence[Entry]) -> bool:
    """Whether the run reports per category, decided once for the whole run.

    Why once: decided per batch, an uncategorised image would land in the pooled ``all`` bucket or in
    ``uncategorised`` depending on its neighbours, so counts and values would depend on ``batch_size``.
    """
    if cfg.setting == "unpaired":
        for r in refs:
            _check_category(r.category, r.where)
        if any(r.category is not None for r in refs):
            return True
    return any(s.category is not None for s in samples)


def _categories(cats: Sequence[str | None], categorised: bool) -> list[str] | None:
    """The suite's category per image: None (only the pooled result) for an uncategorised run."""
    return [c or UNCATEGORISED for c in cats] if categorised else None


def _load(cfg: GenerationEvalConfig, read: ImageReader, entry: Entry, faults: FaultReport) -> Image.Image | None:
    try:
        return read(entry)
    except DataError as exc:
        if not cfg.skip_bad:
            raise
        faults.skip("unreadable image", str(exc))
        return None


def _update(cfg, protocol, suite, batch: Sequence[Sample], read, garment_by, faults, categorised: bool) -> None:
    rows = []
    for s in batch:
        g = _load(cfg, read, s.generated, faults)
        r = _load(cfg, read, s.reference, faults) if s.reference is not None else None
        # clip_i rows name a catalogue garment (checked in build_samples); an unreadable one skips the row
        needs_garment = s.garment is not None and "clip_i" in suite.metrics
        garment = _load(cfg, read, garment_by[s.garment], faults) if needs_garment else None
        if g is None or (s.reference is not None and r is None) or (needs_garment and garment is None):
            continue
        rows.append((s, g, r, garment))
    if not rows:
        return
    device = cfg.device
    t = lambda img: pil_to_tensor(img).to(device)  # noqa: E731
    gen = [t(g) for _, g, _, _ in rows]
    cats = _categories([s.category for s, _, _, _ in rows], categorised)
    kwargs = {}
    if cfg.setting == "paired":
        matched = [match_reference(r, g.size, protocol.reference_resize, protocol.reference_filter)
                   for _, g, r, _ in rows]
        kwargs["references"] = [t(m) for m in matched]
        real = kwargs["references"] if protocol.resize_reference_for_distribution else [t(r) for _, _, r, _ in rows]
        suite.update_real(real, cats)
    if any(s.caption is not None for s, *_ in rows):
        kwargs["captions"] = [s.caption or "" for s, *_ in rows]
    if any(garment is not None for *_, garment in rows):
        kwargs["garments"] = [t(garment) for *_, garment in rows]
    if any(s.garment is not None for s, *_ in rows):
        kwargs["garment_ids"] = [s.garment for s, *_ in rows]
    suite.update_generated(gen, cats, **kwargs)


def _check_kid_counts(cfg: GenerationEvalConfig, protocol: Protocol, samples: list[Sample], refs: list[Entry]) -> None:
    """Fail before extracting anything when a category has fewer images than the KID subset (strict)."""
    if "kid" not in cfg.metrics or protocol.kid_subset_policy != "strict" or cfg.skip_bad:
        return
    gen_counts = Counter(s.category for s in samples)
    ref_counts = Counter(s.category for s in samples) if cfg.setting == "paired" else Counter(r.category for r in refs)
    for category in sorted(set(gen_counts) | set(ref_counts), key=str):
        n = min(gen_counts[category], ref_counts[category])
        if n < protocol.kid_subset_size:
            raise DataError(
                f"KID: category {category or 'all'!r} has {gen_counts[category]} generated and {ref_counts[category]} "
                f"reference images, fewer than the KID subset size {protocol.kid_subset_size} (protocol "
                f"{protocol.name!r}); set kid_subset_size=..., or skip_bad=true to skip KID where it cannot be computed"
            )


def _write(cfg: GenerationEvalConfig, report: EvaluationReport) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report.to_json(out / "metrics.json")
    (out / "metrics.md").write_text(report.to_markdown(cfg.label))
    save_config(cfg, out)


def main(argv: Sequence[str] | None = None) -> EvaluationReport:
    cfg = config_from_argv(GenerationEvalConfig, sys.argv[1:] if argv is None else argv,
                           DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    report = run(cfg)
    print(report.to_markdown(cfg.label))
    return report


if __name__ == "__main__":
    raise SystemExit(script_exit_code("eval/generation.py", main))
