"""Typed config of ``train/photoshoot.py``; the CPU default (no arguments) is a few-minute plumbing run.

Every section is a dataclass so :func:`fashionshoot.config.config_from_argv` rejects a typo'd key at
start-up. The resolved config is saved in the run folder and inside each checkpoint, where resuming
compares it key by key (:mod:`fashionshoot.training.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fashionshoot.data.pairs import PairFilter
from fashionshoot.data.records import TIERS
from fashionshoot.data.synthetic import SyntheticConfig
from fashionshoot.errors import ConfigError
from fashionshoot.models.garment_adapter import Conditioning

#: Small enough to generate in about a second, varied enough that the grid shows different garments.
DEFAULT_SYNTHETIC = SyntheticConfig(num_garments=40, lookbooks_per_garment=2, styles=("real",),
                                    garment_size=(64, 64), lookbook_size=(64, 48))


@dataclass
class DataConfig:
    """Pairs to train on: ``manifest`` (``.jsonl``/``.parquet``); or ``shards``, a folder of WebDataset pair
    shards with its ``shards.json`` (streamed in endless per-worker epochs through a ``shuffle_buffer``,
    resumed exactly; before the first step one read of the shards unpacks the test split into
    ``<output_dir>/test-pairs`` for validation); else the synthetic set generated into
    ``<output_dir>/synthetic``. ``tier`` selects nested tiers ("medium" = high + medium);
    ``resolution`` is the lookbook ``(height, width)`` the model sees. ``slot_map`` maps a record's
    category to an outfit slot where the names differ (a category equal to a slot name maps to it).
    ``weight_power`` turns confidence into a per-sample loss weight (0: all weights 1).
    ``curriculum`` (optional) replaces ``tier`` for training by stages ``[[start_step, tier], ...]``,
    e.g. ``[[0, low], [2000, medium], [6000, high]]``: broad, noisier pairs first, then only the best
    (the paper's tiers; nested, so "low" is every pair)."""

    manifest: str = ""
    shards: str = ""
    shuffle_buffer: int = 500
    synthetic: SyntheticConfig = field(default_factory=lambda: DEFAULT_SYNTHETIC)
    tier: str = "high"
    min_confidence: float | None = None
    train_split: str = "train"
    test_split: str = "test"
    resolution: tuple[int, int] = (64, 48)
    slot_map: dict[str, str] = field(default_factory=lambda: {"trousers": "bottom", "skirt": "bottom"})
    weight_power: float = 1.0
    num_workers: int = 0
    curriculum: tuple[tuple[int, str], ...] = ()

    def pair_filter(self, split: str, tier: str | None = None) -> PairFilter:
        """The pairs of ``split`` at ``tier`` (default: ``tier``) and ``min_confidence``: the one selection
        rule for manifests, training streams and the unpacked test split alike."""
        return PairFilter(tier or self.tier, min_confidence=self.min_confidence, split=split)


@dataclass
class ModelConfig:
    """The pipeline to fine-tune: ``pretrained``, a saved photoshoot pipeline (e.g. an earlier run's
    ``pipeline/``); else ``base`` (a Stable Diffusion folder or hub id, text-to-image or inpainting)
    plus ``image_encoder`` (a CLIP or SigLIP folder), assembled with pose channels and a fresh
    adapter of kind ``conditioning`` into ``<output_dir>/base``; else a tiny random pipeline written
    there. The tiny default is cross-attention only because the reference path's long self-attention
    makes a CPU step about six times slower.
    ``train_unet`` also trains the whole UNet; otherwise only the adapter and the pose input channels.
    ``lora_rank`` > 0 adds peft LoRA layers of that rank to the UNet's attention projections
    (``lora_targets``) and trains them instead of the whole UNet (scale ``lora_alpha / lora_rank``;
    ``lora_alpha`` 0 means equal to the rank). ``gradient_checkpointing`` trades UNet compute for memory.
    ``prediction_type`` ("" keeps the base scheduler's) retargets the UNet: ``epsilon``, ``v_prediction``
    or ``sample`` (x0); the pipeline is saved with it so sampling matches. ``tiny_vae_steps``: the
    tiny base's VAE is first fitted to the training images for this many steps
    (:func:`~fashionshoot.pipelines.tiny_pretraining.fit_tiny_vae`; 0 leaves it random, so decoded
    samples and their metrics are noise whatever the UNet learns)."""

    pretrained: str = ""
    base: str = ""
    image_encoder: str = ""
    conditioning: Conditioning = "cross_attention"
    train_unet: bool = False
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    gradient_checkpointing: bool = False
    prediction_type: Literal["", "epsilon", "v_prediction", "sample"] = ""
    tiny_vae_steps: int = 1000


@dataclass
class OptimConfig:
    """AdamW (``optimizer="adamw8bit"``: bitsandbytes' 8-bit AdamW, about a quarter of the optimizer memory);
    ``max_steps`` counts optimizer steps, each of ``batch_size * grad_accum`` samples per process."""

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    max_steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-2
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0


@dataclass
class DropoutConfig:
    """Condition dropout probabilities (exclusive), see :func:`fashionshoot.models.guidance.condition_dropout`."""

    garment: float = 0.05
    text: float = 0.05
    both: float = 0.05


@dataclass
class LossConfig:
    """Diffusion-loss options. ``snr_gamma`` > 0: min-SNR weighting (Hang et al. 2023), each timestep's
    loss scaled by ``min(SNR, gamma) / SNR`` (``/ (SNR + 1)`` for v-prediction); 5 is the paper's value.
    ``noise_offset`` > 0 adds a per-channel constant to the noise (lets the model learn very dark or
    bright images; 0.05-0.1 is usual). ``garment_weight`` > 0: latent pixels inside the pair's garment
    box (``crop_box``) weigh ``1 + garment_weight`` against 1 elsewhere, rescaled so each sample's
    weights average 1. Why: the scene is most of the image and easy to reproduce, so an unweighted
    MSE is mostly about it; the garment is the small region the conditioning is about. Pairs without
    a box keep uniform weights."""

    snr_gamma: float = 0.0
    noise_offset: float = 0.0
    garment_weight: float = 0.0


@dataclass
class EMAConfig:
    """Exponential moving average of the trained weights; ``decay`` 0 turns it off. The saved pipeline,
    validation and the sample grid use the averaged weights; checkpoints hold both."""

    decay: float = 0.0
    update_after_step: int = 0


@dataclass
class CheckpointConfig:
    """Save every ``every`` steps (and at the end), keep the newest ``keep``. ``resume``: "latest"
    (newest checkpoint in ``output_dir``, fresh if none: rerunning a preempted command continues it),
    a checkpoint folder, or "" (start fresh; refused if ``output_dir`` already holds checkpoints)."""

    every: int = 100
    keep: int = 2
    resume: str = "latest"


@dataclass
class ValidationConfig:
    """Validation on held-out (``data.test_split``) pairs every ``every`` optimizer steps (0: only at the
    end) and at the end, see :mod:`fashionshoot.training.validation`: one generation per pair for
    ``num_pairs`` pairs (0: all; one per garment first), a PNG grid (garment | generated | ground truth,
    ``grid_rows`` rows) and metrics: garment-fidelity R@k (with chance and oracle) and pose following.
    ``encoder`` embeds garments for R@k: ``histogram`` (training-free colour histogram, right for the
    synthetic set) or a CLIP/SigLIP folder or hub id. ``prompts``: ``empty`` (garment and pose only, so
    identity cannot come from the caption) or ``caption``."""

    every: int = 0
    num_pairs: int = 16
    grid_rows: int = 4
    steps: int = 20
    guidance_text: float = 3.0
    guidance_garment: float = 3.0
    seed: int = 0
    prompts: Literal["empty", "caption"] = "empty"
    encoder: str = "histogram"


@dataclass
class PhotoshootTrainConfig:
    """``train/photoshoot.py``. ``log_with``: an accelerate tracker name, "auto" (tensorboard when
    installed, else none) or "none". ``max_nan_steps``: steps with a non-finite loss or gradients
    tolerated (skipped) before the run stops."""

    output_dir: str = "runs/photoshoot"
    seed: int = 0
    cpu: bool = False
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_with: str = "auto"
    log_every: int = 10
    max_nan_steps: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        self._check_ranges()
        if self.model.lora_rank and self.model.train_unet:
            raise ConfigError("LoRA (model.lora_rank > 0) replaces model.train_unet=true: "
                              f"got lora_rank={self.model.lora_rank}, train_unet={self.model.train_unet}")
        if bool(self.model.base) != bool(self.model.image_encoder):
            raise ConfigError("model.base and model.image_encoder go together (an SD folder and a CLIP/SigLIP "
                              f"folder), got base={self.model.base!r}, image_encoder={self.model.image_encoder!r}")
        starts = [start for start, _ in self.data.curriculum]
        if starts and (starts[0] != 0 or starts != sorted(set(starts))):
            raise ConfigError(f"data.curriculum stages must start at step 0 and increase, got starts {starts}")
        tiers = {"data.tier": self.data.tier} | {f"data.curriculum[{i}]": t for i, (_, t) in enumerate(self.data.curriculum)}
        unknown = [f"{key}={tier!r}" for key, tier in tiers.items() if tier not in TIERS]
        if unknown:  # at start-up, not when a late curriculum stage begins
            raise ConfigError(f"unknown tier: {', '.join(unknown)}; expected one of {TIERS}")
        drop = self.dropout
        if min(drop.garment, drop.text, drop.both) < 0 or drop.garment + drop.text + drop.both > 1:
            raise ConfigError(f"dropout.garment/text/both are exclusive probabilities: each >= 0, summing to <= 1; "
                              f"got {drop.garment}, {drop.text}, {drop.both}")
        if self.data.manifest and self.data.shards:
            raise ConfigError(f"data.manifest and data.shards name two sources of pairs; set one of them to \"\" (got "
                              f"manifest={self.data.manifest!r}, shards={self.data.shards!r})")
        if any(v % 8 for v in self.data.resolution):
            raise ConfigError(f"data.resolution must be multiples of 8, got {list(self.data.resolution)}")

    def _check_ranges(self) -> None:
        """Refuse numbers outside their key's range at start-up: many would not fail but train wrongly
        (``optim.max_grad_norm`` 0 zeroes every gradient and a negative one flips them; a negative
        ``data.weight_power`` weighs the least confident pairs most)."""
        d, m, o, loss, v = self.data, self.model, self.optim, self.loss, self.validation
        ranges: list[tuple[str, Callable[[float], bool], dict[str, float]]] = [
            ("at least 1", lambda x: x >= 1, {
                "optim.max_steps": o.max_steps, "optim.batch_size": o.batch_size, "optim.grad_accum": o.grad_accum,
                "checkpoint.every": self.checkpoint.every, "checkpoint.keep": self.checkpoint.keep,
                "log_every": self.log_every, "validation.grid_rows": v.grid_rows, "validation.steps": v.steps,
                **{f"data.resolution[{i}]": side for i, side in enumerate(d.resolution)}}),
            ("> 0", lambda x: x > 0, {"optim.lr": o.lr, "optim.max_grad_norm": o.max_grad_norm}),
            (">= 0", lambda x: x >= 0, {
                "max_nan_steps": self.max_nan_steps, "data.shuffle_buffer": d.shuffle_buffer,
                "data.num_workers": d.num_workers, "data.weight_power": d.weight_power, "model.lora_rank": m.lora_rank,
                "model.lora_alpha": m.lora_alpha, "model.tiny_vae_steps": m.tiny_vae_steps,
                "optim.weight_decay": o.weight_decay, "optim.warmup_steps": o.warmup_steps,
                "loss.snr_gamma": loss.snr_gamma, "loss.noise_offset": loss.noise_offset,
                "loss.garment_weight": loss.garment_weight, "ema.update_after_step": self.ema.update_after_step,
                "validation.every": v.every, "validation.num_pairs": v.num_pairs}),
            ("in [0, 1]", lambda x: 0 <= x <= 1, {} if d.min_confidence is None else {"data.min_confidence": d.min_confidence}),
            ("in [0, 1)", lambda x: 0 <= x < 1, {"ema.decay": self.ema.decay}),
        ]
        bad = [f"{key}={value} (must be {allowed})" for allowed, ok, values in ranges
               for key, value in values.items() if not ok(value)]
        if bad:
            raise ConfigError(f"out of range: {', '.join(bad)}")
