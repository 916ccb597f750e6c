"""Checkpoints: ``accelerator.save_state`` (models, optimizer, LR schedule, every rank's RNG) plus the
step, counters and resolved config, written atomically and rotated.

A checkpoint is first written to a hidden temporary folder and renamed into place only when
complete, so a run killed mid-save never leaves a folder that ``resume="latest"`` would pick up.
Resuming compares the saved config with the current one and refuses a checkpoint of a different run
(naming the keys), except for keys that only say how long to run or where to log.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fashionshoot.errors import ConfigError, FashionshootError

CHECKPOINT_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
#: Config keys (dotted prefixes) a resumed run may change: run length, logging, saving, validation.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "output_dir", "log_with", "log_every", "max_nan_steps", "optim.max_steps", "checkpoint.", "validation.",
    "data.num_workers",
)
#: LR schedules that do not depend on ``optim.max_steps``: a longer resumed run follows the same curve.
HORIZON_FREE_SCHEDULES = frozenset({"constant", "constant_with_warmup"})

logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """What ``save_state`` does not hold: optimizer steps taken, skipped non-finite losses, the config."""

    step: int = 0
    nan_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_mismatches(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for every dotted key that differs and may not change on resume."""
    old, new = _flatten(saved), _flatten(current)
    keys = sorted(k for k in set(old) | set(new)
                  if old.get(k) != new.get(k) and not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES))
    return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in keys]


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are hidden and skipped)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    found = [p for p in folder.glob("checkpoint-*") if _NAME.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=step_of)


def step_of(checkpoint: Path) -> int:
    """The step a ``checkpoint-<step>`` folder was written at."""
    return int(_NAME.match(checkpoint.name).group(1))


def check_start(resume: Path | None, output_dir: str | Path, config: Mapping[str, Any]) -> None:
    """Refuse, before a run writes anything into ``output_dir``, a start that would mix two runs there.

    * a fresh start (``resume`` None) over checkpoints: ``resume=latest`` would later continue those;
    * a checkpoint written with another config (the keys named);
    * a checkpoint with later ones beside it (resuming an earlier checkpoint of the same folder, or one
      from elsewhere into a folder holding another run's): rotation keeps the highest steps and
      ``resume=latest`` picks them, so this run's checkpoints would be deleted and a later resume would
      continue the other run.
    """
    found = checkpoints(output_dir)
    if resume is None:
        if found:
            raise FashionshootError(f"{output_dir} holds checkpoints of an earlier run; resume it with "
                                    "checkpoint.resume=latest or choose another output_dir")
        return
    saved = _saved_state(resume, config)
    later = [p.name for p in found if step_of(p) > saved.step]
    if later:
        raise ConfigError(f"{Path(output_dir) / CHECKPOINT_DIR} holds checkpoints after step {saved.step}, where "
                          f"{resume} continues from: {', '.join(later)}; continuing beside them would mix two runs "
                          "(rotation keeps the highest steps, resume=latest picks them). Resume into another "
                          "output_dir, or move them away")


def _saved_state(path: Path, config: Mapping[str, Any]) -> TrainerState:
    """The state saved in checkpoint ``path``, refused if it was written with a config other than ``config``."""
    saved = TrainerState(**json.loads((path / STATE_NAME).read_text()))
    mismatches = config_mismatches(saved.config, config)
    if mismatches:
        raise ConfigError(f"checkpoint {path} was written with a different config; mismatching keys: "
                          + "; ".join(mismatches) + ". To train this config, give it its own output_dir=...; "
                          "to continue that run, use its config")
    return saved


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint ``resume`` names: ``""`` none, ``"latest"`` the newest here (none if there is none)."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise ConfigError(f"checkpoint.resume: {path} is not a checkpoint folder (no {STATE_NAME})")
    return path


def per_rank_file(name: str, rank: int) -> str:
    """File name of one rank's copy of per-rank state ``name`` in a checkpoint."""
    return f"{name}-rank{rank}.pt"


def save_checkpoint(accelerator: Any, output_dir: str | Path, state: TrainerState, keep: int,
                    per_rank: Mapping[str, Any] | None = None) -> Path:
    """Write ``checkpoint-<step>`` atomically and delete all but the newest ``keep``; call on every rank.

    ``per_rank`` objects (``state_dict``, ``load_state_dict`` and ``to(device)``) differ between ranks, e.g.
    EMA over ZeRO-3 or FSDP slices, so every rank writes its own (accelerate writes registered objects from
    rank 0 only)."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    final = folder / f"checkpoint-{state.step:08d}"
    tmp = folder / f".tmp-checkpoint-{state.step:08d}"
    if accelerator.is_main_process:
        for leftover in folder.glob(".tmp-checkpoint-*"):  # saves interrupted in this or an earlier run
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank writes its own RNG state; rank 0 the rest
    for name, obj in (per_rank or {}).items():
        torch.save(obj.state_dict(), tmp / per_rank_file(name, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps(vars(state), indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path, config: Mapping[str, Any],
                    per_rank: Mapping[str, Any] | None = None, on_device: Sequence[Any] = ()) -> TrainerState:
    """Restore ``path`` into the prepared objects (and this rank's ``per_rank`` state, see
    :func:`save_checkpoint`) after checking it was written by a matching config.

    ``on_device``: objects registered with ``accelerator.register_for_checkpointing`` that hold tensors
    (``to(device)``, e.g. an EMA): ``load_state`` reads registered objects onto the CPU, so they are moved
    back to ``accelerator.device``, where their next update meets the model's parameters."""
    path = Path(path)
    saved = _saved_state(path, config)
    _warn_if_the_schedule_changes(saved, config)
    accelerator.load_state(str(path))
    for obj in on_device:
        obj.to(accelerator.device)
    for name, obj in (per_rank or {}).items():
        file = path / per_rank_file(name, accelerator.process_index)
        if not file.is_file():
            raise ConfigError(f"checkpoint {path} has no {file.name}: resume with the number of processes that "
                              f"wrote it ({name} is saved per rank)")
        obj.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        obj.to(accelerator.device)
    return saved


def _warn_if_the_schedule_changes(saved: TrainerState, config: Mapping[str, Any]) -> None:
    """A new ``max_steps`` is allowed on resume, but a decaying schedule then bends to the new horizon."""
    old, new = saved.config.get("optim", {}), config.get("optim", {})
    schedule = new.get("lr_scheduler")
    if old.get("max_steps") != new.get("max_steps") and schedule not in HORIZON_FREE_SCHEDULES:
        logger.warning("resuming at step %d with optim.max_steps %s -> %s: the %s learning-rate schedule "
                       "follows the new horizon from here on (an uninterrupted %s-step run would also have "
                       "used other rates before this step)", saved.step, old.get("max_steps"),
                       new.get("max_steps"), schedule, new.get("max_steps"))
