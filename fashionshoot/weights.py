"""The one place that finds pretrained weights: a local folder, a weights root, or the hub cache.

Why one place: an unreachable hub id makes transformers/diffusers retry for minutes and a tokenizer
can even come back silently empty (see docs/weights.md). Every pretrained load in fashionshoot goes
through :func:`resolve_pretrained` / :func:`load_pretrained`, which

1. accept a local directory, or a hub id looked up under ``$FASHIONSHOOT_WEIGHTS/<org>/<name>`` and
   then in the local Hugging Face cache, never touching the network unless downloads are allowed
   (``FASHIONSHOOT_ALLOW_DOWNLOAD=1`` and ``HF_HUB_OFFLINE`` unset);
2. call the model class's real ``from_pretrained`` on the resolved folder with ``local_files_only``;
3. fail fast with :class:`MissingWeightsError` naming the model and exactly where to put it;
4. check that a loaded tokenizer (or each tokenizer of a loaded pipeline) actually has a vocabulary.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from fashionshoot.errors import MissingWeightsError

T = TypeVar("T")

WEIGHTS_ROOT_ENV = "FASHIONSHOOT_WEIGHTS"
ALLOW_DOWNLOAD_ENV = "FASHIONSHOOT_ALLOW_DOWNLOAD"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")
#: A real tokenizer has thousands of entries; a failed offline load can return one with 2 or 3.
MIN_TOKENIZER_VOCAB = 100


def downloads_allowed() -> bool:
    """Downloads happen only when explicitly allowed and the hub is not forced offline."""
    truthy = ("1", "true", "yes", "on")
    allowed = os.environ.get(ALLOW_DOWNLOAD_ENV, "").lower() in truthy
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in truthy
    return allowed and not offline


def weights_root() -> Path | None:
    root = os.environ.get(WEIGHTS_ROOT_ENV)
    return Path(root).expanduser() if root else None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _where_to_put(name: str, subfolder: str | None) -> str:
    sub = f"/{subfolder}" if subfolder else ""
    root = weights_root()
    lines = [f"pass a local directory that holds the model{sub} files"]
    if _looks_like_hub_id(name):
        target = (root / name) if root else Path(f"${WEIGHTS_ROOT_ENV}/{name}")
        lines.append(f"or place a copy at {target}{sub} (e.g. `hf download {name} --local-dir {target}`)")
        lines.append(f"or set {ALLOW_DOWNLOAD_ENV}=1 on a machine with network access")
    return "; ".join(lines)


def _hub_cache_snapshot(name: str) -> Path | None:
    """The newest local snapshot of hub repo ``name``, without any network access."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # any failure here simply means "not cached"
        return None


def _download(name: str) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name))


def resolve_pretrained(
    name_or_path: str | os.PathLike[str],
    subfolder: str | None = None,
    required: Iterable[str] = (),
) -> Path:
    """Return the local folder for ``name_or_path`` (a directory or a hub id).

    ``required`` lists files (relative to ``subfolder``) that must exist, e.g. ``("config.json",)``.
    Raises :class:`MissingWeightsError` with instructions instead of hanging or downloading.
    """
    name = str(name_or_path)
    candidates: list[Path] = [Path(name).expanduser()]
    root = weights_root()
    if root is not None and _looks_like_hub_id(name):
        candidates.append(root / name)
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None and _looks_like_hub_id(name):
        folder = _hub_cache_snapshot(name)
        if folder is None and downloads_allowed():
            folder = _download(name)
    if folder is None:
        raise MissingWeightsError(f"pretrained model {name!r} not found locally: {_where_to_put(name, subfolder)}")
    target = folder / subfolder if subfolder else folder
    if not target.is_dir():
        raise MissingWeightsError(
            f"pretrained model {name!r}: folder {target} does not exist; {_where_to_put(name, subfolder)}"
        )
    missing = [f for f in required if not (target / f).exists()]
    if missing:
        raise MissingWeightsError(
            f"pretrained model {name!r}: {target} lacks {', '.join(missing)}; {_where_to_put(name, subfolder)}"
        )
    return folder


def load_pretrained(
    cls: type[T],
    name_or_path: str | os.PathLike[str],
    subfolder: str | None = None,
    **kwargs: Any,
) -> T:
    """Resolve ``name_or_path`` locally, then load it with ``cls.from_pretrained`` (offline).

    Works for diffusers models/schedulers, transformers models/tokenizers/processors and anything else
    following the ``from_pretrained(path, subfolder=..., local_files_only=...)`` convention.
    """
    folder = resolve_pretrained(name_or_path, subfolder)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        obj = cls.from_pretrained(str(folder), local_files_only=True, **kwargs)  # type: ignore[attr-defined]
    except (OSError, ValueError) as exc:
        sub = f" (subfolder {subfolder!r})" if subfolder else ""
        raise MissingWeightsError(
            f"cannot load {cls.__name__} from {folder}{sub} for {str(name_or_path)!r}: {exc}"
        ) from exc
    _check_tokenizer(obj, folder, subfolder)
    for name, part in getattr(obj, "components", {}).items():  # a diffusers pipeline: one subfolder per part
        _check_tokenizer(part, folder, f"{subfolder}/{name}" if subfolder else name)
    return obj


def _check_tokenizer(obj: Any, folder: Path, subfolder: str | None) -> None:
    if "Tokenizer" not in type(obj).__name__ or not hasattr(obj, "__len__"):
        return
    if len(obj) < MIN_TOKENIZER_VOCAB:
        where = folder / subfolder if subfolder else folder
        raise MissingWeightsError(
            f"tokenizer loaded from {where} has only {len(obj)} tokens: its vocabulary files "
            "(vocab.json + merges.txt, or tokenizer.json) are missing or unreadable"
        )


def resolve_weight_file(path_or_name: str | os.PathLike[str], search_dirs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Find a single weight file (e.g. a torchvision ``alexnet-owt-7be5be79.pth``).

    ``path_or_name`` is a path, or a bare file name looked up in ``search_dirs``, the weights root and
    ``$TORCH_HOME/hub/checkpoints`` (where torchvision and lpips look for their downloads).
    """
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    dirs = [Path(d).expanduser() for d in search_dirs]
    root = weights_root()
    if root is not None:
        dirs.append(root)
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")).expanduser()
    dirs.append(torch_home / "hub" / "checkpoints")
    for d in dirs:
        if (d / path.name).is_file():
            return d / path.name
    raise MissingWeightsError(
        f"weight file {path.name!r} not found; put it at {path} or in one of: {', '.join(str(d) for d in dirs)}"
    )


def hash_weights(path: str | os.PathLike[str], length: int = 16) -> str:
    """SHA-256 over a weight file, or over every weight file under a folder (sorted, path-salted).

    Metrics record this so a number can be traced to the exact extractor weights that produced it.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES
    )
    if not files:
        raise MissingWeightsError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {path}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(str(f.relative_to(path) if f != path else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load_open_clip(name_or_path: str | os.PathLike[str], device: str = "cpu") -> tuple[Any, Any, Any]:
    """Load an OpenCLIP model folder (``open_clip_config.json`` + weights) as (model, preprocess, tokenizer).

    open_clip itself only warns and initialises randomly when the weight file is missing; here that
    is a :class:`MissingWeightsError`.
    """
    import open_clip

    folder = resolve_pretrained(name_or_path, required=("open_clip_config.json",))
    if not any((folder / n).is_file() for n in OPEN_CLIP_WEIGHT_NAMES):
        raise MissingWeightsError(
            f"OpenCLIP model {str(name_or_path)!r}: {folder} has a config but no weights "
            f"(expected one of {', '.join(OPEN_CLIP_WEIGHT_NAMES)})"
        )
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model.eval(), preprocess, tokenizer
