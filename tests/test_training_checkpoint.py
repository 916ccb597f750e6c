"""Per-rank checkpoint state (EMA over ZeRO-3 slices): every rank writes and reads back its own file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fashionshoot.errors import ConfigError
from fashionshoot.training.checkpoint import TrainerState, load_checkpoint, per_rank_file, save_checkpoint


@pytest.fixture
def accelerator() -> Iterator[object]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_per_rank_state_round_trips_and_a_missing_rank_file_is_named(tmp_path: Path, accelerator: object) -> None:
    torch.manual_seed(0)
    mine, restored = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    state = TrainerState(step=5, config={"seed": 0})
    saved = save_checkpoint(accelerator, tmp_path, state, keep=1, per_rank={"ema": mine})
    assert (saved / per_rank_file("ema", 0)).is_file()

    def same() -> bool:
        return all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), restored.state_dict().values(),
                                                     strict=True))

    assert not same()
    assert load_checkpoint(accelerator, saved, {"seed": 0}, per_rank={"ema": restored}).step == 5
    assert same()

    (saved / per_rank_file("ema", 0)).unlink()
    with pytest.raises(ConfigError, match="has no ema-rank0.pt: resume with the number of processes"):
        load_checkpoint(accelerator, saved, {"seed": 0}, per_rank={"ema": restored})


def test_registered_state_is_moved_back_to_the_accelerator_device(tmp_path: Path, accelerator: object) -> None:
    """accelerate's load_state reads registered objects (a whole-weights EMA) onto the CPU, where on a GPU the
    next EMA step would meet the model's CUDA parameters. The meta device stands in for the GPU."""
    from types import SimpleNamespace

    from diffusers.training_utils import EMAModel

    ema = EMAModel(torch.nn.Linear(3, 2).parameters(), decay=0.9)
    accelerator.register_for_checkpointing(ema)
    saved = save_checkpoint(accelerator, tmp_path, TrainerState(step=1, config={"seed": 0}), keep=1)
    on_gpu = SimpleNamespace(load_state=accelerator.load_state, process_index=0, device=torch.device("meta"))
    load_checkpoint(on_gpu, saved, {"seed": 0}, on_device=[ema])
    assert {p.device.type for p in ema.shadow_params} == {"meta"}
