"""Per-sample random streams, so a training run does not depend on how its global batch is split.

Diffusion training draws noise, timesteps, posterior samples and condition dropout at random. Drawn
from one process-wide generator, those draws depend on the number of processes and on each one's
micro-batch size, so 2-process DDP and 1 process on the same global batch would train different
models. Here every sample gets its own generator, seeded by (run seed, optimizer step, position in the
step's samples across micro-batches and processes): the same sample meets the same randomness however
the step is split (processes, gradient-accumulation micro-batches), and a resumed run meets the same
randomness as an uninterrupted one without restoring any RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def sample_seed(run_seed: int, step: int, position: int) -> int:
    """A well-mixed 63-bit seed for one sample (``numpy.random.SeedSequence`` hashing, not ``+``/``*``).

    The 0 is where a micro-batch index once was: kept, runs without gradient accumulation draw what they
    always drew."""
    state = np.random.SeedSequence([run_seed, step, 0, position]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class SampleRandomness:
    """One generator per sample of a (per-process) batch; each draw returns ``(B, ...)``.

    Positions are the samples' indices in the step's whole batch: micro-batch ``m`` of rank ``r`` starts
    at ``(m * world_size + r) * batch_size``. Draws happen per sample in call order, so callers must draw
    in a fixed order.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        generator_device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        self.generators = [torch.Generator(generator_device).manual_seed(s) for s in seeds]
        self._draw_device = generator_device

    @classmethod
    def for_batch(cls, run_seed: int, step: int, first_position: int, batch_size: int,
                  device: torch.device | str = "cpu") -> SampleRandomness:
        positions = range(first_position, first_position + batch_size)
        return cls([sample_seed(run_seed, step, p) for p in positions], device)

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, draws: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
        out = torch.stack(draws).to(self.device)
        return out if dtype is None else out.to(dtype)

    def randn(self, shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
        """``(B, *shape)`` standard normal draws."""
        return self._stack([torch.randn(tuple(shape), generator=g, device=self._draw_device)
                            for g in self.generators], dtype)

    def rand(self) -> torch.Tensor:
        """``(B,)`` uniform draws in ``[0, 1)``."""
        return self._stack([torch.rand((), generator=g, device=self._draw_device) for g in self.generators], None)

    def randint(self, high: int) -> torch.Tensor:
        """``(B,)`` integers in ``[0, high)``."""
        return self._stack([torch.randint(0, high, (), generator=g, device=self._draw_device)
                            for g in self.generators], None)
