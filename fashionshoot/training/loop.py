"""The photoshoot training loop: noise-prediction MSE on lookbook latents, conditioned on garment,
pose and caption through :class:`~fashionshoot.models.denoiser.PhotoshootDenoiser`, under accelerate.

Frozen parts (VAE, text and image encoders) run outside the wrapped module; everything trained (the
garment adapter, the UNet's pose input channels, optionally the whole UNet) runs inside its one
forward, so DDP sees it. Gradient accumulation is done by hand (``no_sync`` on all but the last
micro-batch) so a step is always ``grad_accum`` micro-batches and resume positions are exact.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fashionshoot.config import save_config, to_dict
from fashionshoot.data.records import PairRecord
from fashionshoot.errors import ConfigError, FashionshootError
from fashionshoot.models.denoiser import PhotoshootDenoiser
from fashionshoot.models.garment_encoder import encode_garment_pixels, scatter_slots
from fashionshoot.models.guidance import condition_dropout
from fashionshoot.models.unet_inputs import inpaint_inputs
from fashionshoot.pipelines.photoshoot import PhotoshootPipeline, load_photoshoot_pipeline
from fashionshoot.training.checkpoint import (
    TrainerState,
    check_start,
    checkpoints,
    config_mismatches,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from fashionshoot.training.config import (
    DropoutConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PhotoshootTrainConfig,
)
from fashionshoot.training.data import (
    PhotoshootCollator,
    TrainingPairs,
    curriculum_stage,
    load_pairs,
)
from fashionshoot.training.randomness import SampleRandomness
from fashionshoot.training.validation import ValidationResult, settings_from, validate
from fashionshoot.training.whole_weights import (
    WholeWeights,
    configure_zero3,
    local_weights,
    shards_parameters,
    whole_models,
)

#: Where a LoRA run also saves its LoRA layers alone (``unet.load_lora_adapter`` format), next to the pipeline.
LORA_DIR = "unet_lora"
#: The settings a run's ``<output_dir>/base`` was built for, kept in it.
BASE_SOURCE = "fashionshoot_base.json"
#: Validation grids (``step-<step>.png``) and :data:`METRICS_LOG` (one row per validation).
VALIDATION_DIR = "validation"
METRICS_LOG = "metrics.jsonl"
_GRID = re.compile(r"^step-(\d+)\.png$")
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(FashionshootError, RuntimeError):
    """Too many optimizer steps had a non-finite loss; the run stopped instead of training on garbage."""


@dataclass
class Frozen:
    """The pipeline parts that only encode inputs: never trained, run under ``inference_mode`` in ``dtype``.

    ``inference_mode`` is ``no_grad`` without autograd's version counters and view tracking (about 10 %
    off the tiny default config's encoders on the CPU). It makes inference tensors, which autograd
    refuses to save for backward, so each method ends with one ordinary op outside it (a gather, a
    scale, a scatter): what they return are normal tensors."""

    pipe: PhotoshootPipeline
    device: torch.device
    dtype: torch.dtype

    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder states, one row per prompt, encoding each distinct prompt once: condition
        dropout turns many prompts into ``""`` (90 % in the tiny default config)."""
        distinct = list(dict.fromkeys(prompts))
        ids = self.pipe.tokenizer(distinct, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        with torch.inference_mode():
            states = self.pipe.text_encoder(ids.to(self.device))[0]
        row = {prompt: i for i, prompt in enumerate(distinct)}
        return states[torch.tensor([row[p] for p in prompts], device=states.device)]

    def latents(self, pixels: torch.Tensor, randomness: SampleRandomness | None = None) -> torch.Tensor:
        """Scaled VAE latents: the posterior mode, or with ``randomness`` a posterior sample
        ``mean + std * eps`` (SD training samples its targets; garment references use the mode)."""
        with torch.inference_mode():
            dist = self.pipe.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        if randomness is None:
            latents = dist.mode()
        else:
            latents = dist.mean + dist.std * randomness.randn(dist.mean.shape[1:], dist.mean.dtype)
        return latents * self.pipe.vae.config.scaling_factor

    def garment_features(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, S, L, D)`` image-encoder features of the garments ``mask`` marks, one row of ``pixels``
        each (in ``mask``'s row-major order), zero elsewhere. With no garment the encoder is not run:
        the grid holds one zero token per slot, which the adapter never reads."""
        encoder = self.pipe.image_encoder
        if len(pixels) == 0:
            return torch.zeros(*mask.shape, 1, encoder.config.hidden_size, device=self.device, dtype=self.dtype)
        layer = self.pipe.garment_adapter.config.feature_layer
        with torch.inference_mode():
            features = encode_garment_pixels(encoder, pixels.to(self.device, self.dtype), layer)
        return scatter_slots(features, mask)


def _tracker(name: str) -> str | None:
    if name == "auto":
        found = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        return "tensorboard" if found else None
    return None if name == "none" else name


def _tracker_config(config: PhotoshootTrainConfig) -> dict[str, Any]:
    """Flat ``a.b -> scalar`` view of the config; trackers such as tensorboard's hparams take only scalars."""

    def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        return out

    return flat(to_dict(config))


def add_lora(unet: Any, model: ModelConfig) -> None:
    """Add peft LoRA layers (Gaussian ``A``, zero ``B``: the UNet's output is unchanged at step 0)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=model.lora_rank, lora_alpha=model.lora_alpha or model.lora_rank,
                                init_lora_weights="gaussian", target_modules=list(model.lora_targets)))


def trainable_parameters(denoiser: PhotoshootDenoiser, model: ModelConfig, pose_channels: int,
                         weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: the adapter (decayed) plus the whole UNet, its LoRA layers, or only its
    pose input channels.

    ``conv_in.weight`` holds latent (and inpainting) and pose channels in one tensor, pose last; when
    only pose weights train, a gradient hook zeroes the rest and the group has no weight decay, so only pose weights move.
    LoRA trains the pose channels too: new input channels have no pretrained weights to adapt.
    """
    denoiser.requires_grad_(False)
    denoiser.garment_adapter.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": list(denoiser.garment_adapter.parameters()), "weight_decay": weight_decay}]
    unet = denoiser.unet
    if model.train_unet:
        unet.requires_grad_(True)
        groups.append({"params": list(unet.parameters()), "weight_decay": weight_decay})
        return groups
    if model.lora_rank:
        lora = [p for name, p in unet.named_parameters() if "lora_" in name]
        for param in lora:
            param.requires_grad_(True)
        groups.append({"params": lora, "weight_decay": weight_decay})
    if pose_channels:
        weight = unet.conv_in.weight
        weight.requires_grad_(True)
        keep = torch.zeros_like(weight)
        keep[:, -pose_channels:] = 1.0
        weight.register_hook(lambda grad: grad * keep)
        groups.append({"params": [weight], "weight_decay": 0.0})
    return groups


def zero_latent_channel_grads(conv_in: torch.nn.Conv2d, pose_channels: int) -> None:
    """Zero the gradient of ``conv_in``'s non-pose input channels, as the hook of :func:`trainable_parameters`
    does, on this rank's shard: FSDP2 assigns each rank's reduced gradient shard directly, so the hook never
    runs. FSDP2 shards dim 0 (output channels), so every local shard holds all input channels."""
    grad = conv_in.weight.grad
    if grad is not None:
        (grad.to_local() if hasattr(grad, "to_local") else grad)[:, :-pose_channels].zero_()


def make_optimizer(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (an optional dependency) for ``optim.optimizer="adamw8bit"``.

    AdamW is torch's fused kernel: one call updates every tensor, where the default runs a loop of
    small ops per tensor on the CPU (~7 ms more of the tiny default config's ~100 ms step) and foreach
    kernels with whole-model temporaries on a GPU. Same update, to float rounding."""
    if optim.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as err:
            raise FashionshootError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
        return bitsandbytes.optim.AdamW8bit(groups, lr=optim.lr)
    return torch.optim.AdamW(groups, lr=optim.lr, fused=True)


def min_snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-gamma loss weights (1 everywhere when ``gamma`` is 0)."""
    if gamma <= 0:
        return torch.ones(len(timesteps), device=timesteps.device)
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps).float()
    clipped = snr.clamp(max=gamma)
    prediction = noise_scheduler.config.prediction_type
    return {"v_prediction": clipped / (snr + 1), "sample": clipped}.get(prediction, clipped / snr)


def garment_region_weights(boxes: torch.Tensor, pixels: tuple[int, int], latents: tuple[int, int],
                           garment_weight: float) -> torch.Tensor:
    """``(B, 1, h, w)`` loss weights: ``1 + garment_weight`` on latent pixels whose cell overlaps the
    sample's garment box, 1 elsewhere, divided by the sample's mean so only *where* the loss comes from
    changes, not its scale. ``boxes`` ``(B, 4)``: ``(x1, y1, x2, y2)`` in ``pixels`` ``(H, W)``
    coordinates; a NaN row (no box) gives uniform weights."""
    (height, width), (h, w) = pixels, latents
    cell_y, cell_x = height / h, width / w
    top, left = torch.arange(h) * cell_y, torch.arange(w) * cell_x
    x1, y1, x2, y2 = (c[:, None] for c in boxes.float().unbind(1))
    rows = (top + cell_y > y1) & (top < y2)  # (B, h); comparisons with NaN are False
    cols = (left + cell_x > x1) & (left < x2)  # (B, w)
    weights = 1.0 + garment_weight * (rows[:, :, None] & cols[:, None, :]).float()
    return (weights / weights.mean(dim=(1, 2), keepdim=True))[:, None]


def training_loss(denoiser: torch.nn.Module, frozen: Frozen, noise_scheduler: Any, batch: dict[str, Any],
                  randomness: SampleRandomness, dropout: DropoutConfig, loss: LossConfig,
                  weight_norm: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Confidence- (and optionally min-SNR- and garment-region-) weighted diffusion MSE of one batch,
    after condition dropout.

    The result is ``sum(weight * mse) / weight_norm``; the loop passes ``weight_norm`` = the mean over
    processes of their weight sums over the step's micro-batches, so that the accumulated gradients,
    averaged by DDP, are the gradient of the weighted mean over the step's whole global batch. A
    ``weight_norm`` of 0 (every sample of the step weighs 0: confidence 0 is a valid retrieval score) gives
    a loss of 0 with zero gradients, not 0/0 = NaN, which the loop would count as a diverging step. All
    random draws come from ``randomness`` in a fixed order.
    """
    adapter = frozen.pipe.garment_adapter
    present = batch["slot_mask"].to(frozen.device)
    dropped = condition_dropout({"slot_mask": present, "prompts": batch["prompts"]},
                                dropout.garment, dropout.text, dropout.both, uniform=randomness.rand())
    with torch.no_grad():
        target_latents = frozen.latents(batch["lookbook"], randomness)
        text = frozen.text(dropped["prompts"])
        features = None
        if adapter.uses_cross_attention:  # only garments that survived dropout: the adapter reads no other
            kept = dropped["slot_mask"]
            pixels = batch["garment_clip"]
            features = frozen.garment_features(pixels[kept[present].to(pixels.device)], kept)
        garment_latents = reference_context = None
        if adapter.uses_reference:
            garment_latents = scatter_slots(frozen.latents(batch["garment_vae"]), present)
            reference_context = frozen.text([""])
        pose = None
        if frozen.pipe.pose_channels:
            pose = batch.get("pose")
            if pose is None or pose.shape[-2:] != target_latents.shape[-2:]:
                got = "no 'pose'" if pose is None else f"'pose' of {tuple(pose.shape[-2:])}"
                raise ConfigError(f"this UNet reads pose heatmaps at the latent size {tuple(target_latents.shape[-2:])}; "
                                  f"the batch has {got}: collate with PhotoshootCollator(latent_size=...)")
            pose = pose.to(frozen.device, frozen.dtype)
        inpaint = None
        if frozen.pipe.unet_inputs.inpaint:  # inpainting base: train the regenerate-everything mode
            inpaint = inpaint_inputs(frozen.pipe.vae, tuple(target_latents.shape[-2:]), len(target_latents))
    timesteps = randomness.randint(noise_scheduler.config.num_train_timesteps)
    noise = randomness.randn(target_latents.shape[1:], target_latents.dtype)
    if loss.noise_offset:
        noise = noise + loss.noise_offset * randomness.randn((target_latents.shape[1], 1, 1), noise.dtype)
    noisy = noise_scheduler.add_noise(target_latents, noise, timesteps)
    target = {"epsilon": noise, "sample": target_latents}.get(noise_scheduler.config.prediction_type)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(target_latents, noise, timesteps)
    pred = denoiser(noisy, timesteps, text, dropped["slot_mask"], image_features=features,
                    garment_latents=garment_latents, reference_context=reference_context, pose=pose,
                    inpaint=inpaint)
    squared = F.mse_loss(pred.float(), target.float(), reduction="none")
    if loss.garment_weight:
        squared = squared * garment_region_weights(batch["garment_box"], tuple(batch["lookbook"].shape[-2:]),
                                                   tuple(squared.shape[-2:]), loss.garment_weight).to(squared.device)
    per_sample = squared.mean(dim=(1, 2, 3))
    weight = batch["weight"].to(frozen.device) * min_snr_weights(noise_scheduler, timesteps, loss.snr_gamma)
    norm = torch.as_tensor(weight_norm, device=per_sample.device).clamp_min(torch.finfo(per_sample.dtype).tiny)
    return (per_sample * weight).sum() / norm


def _prepare_inputs(config: PhotoshootTrainConfig, out: Path, pairs: TrainingPairs, resuming: bool) -> Path:
    """Build the base pipeline if needed (main process only); the base path.

    The base is built in a temporary folder and renamed into place, so a run killed while fitting the
    tiny VAE leaves no half-made base that a rerun would take as finished. It records the ``model``,
    ``data`` and ``seed`` settings it was built for (:data:`BASE_SOURCE`): a fresh start with other
    settings builds it again rather than training the old one, and a resume refuses a base that is not
    its checkpoint's."""
    if config.model.pretrained:
        return Path(config.model.pretrained)
    base = out / "base"
    source = {key: value for key, value in to_dict(config).items() if key in ("model", "data", "seed")}
    if (base / "model_index.json").is_file():
        recorded = base / BASE_SOURCE
        if not recorded.is_file():  # built by a version that did not record its settings
            if resuming:
                return base
            changed = ["not recorded"]
        else:
            changed = config_mismatches(json.loads(recorded.read_text()), source)
            if not changed:
                return base
            if resuming:
                raise ConfigError(f"{base} was built for other settings than this run's checkpoint: "
                                  + "; ".join(changed))
        print(f"{base} was built for other settings ({'; '.join(changed)}); building it again", flush=True)
    building = out / ".base-incomplete"
    shutil.rmtree(building, ignore_errors=True)
    if config.model.base:
        from fashionshoot.pipelines.assemble import assemble_photoshoot_pipeline

        pipe = assemble_photoshoot_pipeline(config.model.base, config.model.image_encoder,
                                            conditioning=config.model.conditioning)
        pipe.save_pretrained(str(building))
    else:
        from fashionshoot.pipelines.tiny_pretraining import (
            MAX_FIT_IMAGES,
            save_pretrained_tiny_photoshoot_pipeline,
        )

        steps = config.model.tiny_vae_steps
        images = pairs.fit_images(config.seed, MAX_FIT_IMAGES) if steps else []
        save_pretrained_tiny_photoshoot_pipeline(building, images, resolution=tuple(config.data.resolution),
                                                 vae_steps=steps, seed=config.seed, progress=True,
                                                 conditioning=config.model.conditioning)
    (building / BASE_SOURCE).write_text(json.dumps(source, indent=1) + "\n")
    shutil.rmtree(base, ignore_errors=True)  # ours: an unfinished base, or one built for other settings
    building.rename(base)
    return base


@dataclass
class Trainee:
    """What a run trains, built identically on every process (and on resume) from the config."""

    pipe: PhotoshootPipeline
    frozen: Frozen
    denoiser: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: Any
    ema_params: list[torch.nn.Parameter]  # what EMA averages: ``params``, or sharded this rank's slices
    per_rank: dict[str, Any]  # checkpointed by every rank (EMA over sharded slices)
    whole: WholeWeights
    before_step: Callable[[], None] | None  # a gradient fix between the last backward and clipping


def trainable_denoiser(pipe: PhotoshootPipeline, model: ModelConfig, optim: OptimConfig, device: torch.device,
                       dtype: torch.dtype) -> tuple[Frozen, PhotoshootDenoiser, list[dict[str, Any]]]:
    """The part of a run's setup that does not depend on how it is distributed (the benchmarks time steps
    built by it too): the encoders frozen on ``device`` in ``dtype``, LoRA and gradient checkpointing as
    ``model`` asks, and the denoiser (UNet + garment adapter) with its trainable parameter groups."""
    for module in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False).eval().to(device)
        if dtype != torch.float32:  # diffusers warns on every .to(dtype), even a no-op one
            module.to(dtype)
    if model.lora_rank:
        add_lora(pipe.unet, model)
    if model.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    denoiser = PhotoshootDenoiser(pipe.unet, pipe.garment_adapter).to(device)
    groups = trainable_parameters(denoiser, model, pipe.pose_channels, optim.weight_decay)
    return Frozen(pipe, device, dtype), denoiser, groups


def _build(config: PhotoshootTrainConfig, base: Path, accelerator: Any) -> Trainee:
    """Load the pipeline, add LoRA if asked, wrap the trained parts, and prepare them with accelerate."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    with whole_models(accelerator):
        pipe = load_photoshoot_pipeline(base)
    if config.model.prediction_type:  # saved with the pipeline, so sampling uses the trained parameterisation
        pipe.scheduler.register_to_config(prediction_type=config.model.prediction_type)
    dtype = _DTYPES[accelerator.mixed_precision]  # before deepspeed_bf16_as_autocast turns DeepSpeed's to "no"
    frozen, denoiser, groups = trainable_denoiser(pipe, config.model, config.optim, accelerator.device, dtype)
    optimizer = make_optimizer(groups, config.optim)
    lr_scheduler = get_scheduler(config.optim.lr_scheduler, optimizer, num_warmup_steps=config.optim.warmup_steps,
                                 num_training_steps=config.optim.max_steps)
    sharded = shards_parameters(accelerator)
    if accelerator.state.deepspeed_plugin is not None:
        # No dataloader goes through prepare, and the loop accumulates and clips by its own config.
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=config.optim.batch_size,
            gradient_accumulation_steps=config.optim.grad_accum,
            gradient_clipping=config.optim.max_grad_norm)
        if sharded:
            configure_zero3(accelerator.state.deepspeed_plugin.deepspeed_config)
        if deepspeed_bf16_as_autocast(accelerator.state.deepspeed_plugin.deepspeed_config):
            accelerator.print("DeepSpeed bf16 runs as DeepSpeed's torch_autocast: fp32 weights, bf16 compute")
    # The module's own parameters, taken before prepare: DeepSpeed's ZeRO optimizer swaps its param groups
    # for flat fp32 partitions (a rank's shard of the optimizer state), which EMA must not average.
    params = [p for group in groups for p in group["params"]]
    fsdp = sharded and accelerator.state.deepspeed_plugin is None
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    before_step = None
    if fsdp:
        # FSDP2 replaced the parameters with DTensors: the trained ones, in the module's order (accelerate's
        # clip_grad_norm_ recognises an FSDP model's parameters by comparing lists).
        params = [p for p in denoiser.parameters() if p.requires_grad]
        check_fsdp_units(denoiser, pipe.garment_adapter.uses_reference)
        if not config.model.train_unet and pipe.pose_channels:
            before_step = functools.partial(zero_latent_channel_grads, pipe.unet.conv_in, pipe.pose_channels)
    accelerator.register_for_checkpointing(lr_scheduler)  # stepped by us: one step per optimizer step
    ema, ema_params, per_rank = None, local_weights(params, sharded), {}
    if config.ema.decay:
        ema = EMAModel(ema_params, decay=config.ema.decay, update_after_step=config.ema.update_after_step)
        ema.to(accelerator.device)
        if sharded:
            per_rank["ema"] = ema
        else:
            accelerator.register_for_checkpointing(ema)
    lora = (lambda unet: add_lora(unet, config.model)) if config.model.lora_rank else None
    whole = WholeWeights(accelerator, pipe, denoiser, sharded, add_layers=lora)
    return Trainee(pipe, frozen, denoiser, params, optimizer, lr_scheduler, ema, ema_params, per_rank, whole,
                   before_step)


def _finish_weights(pipe: PhotoshootPipeline, config: PhotoshootTrainConfig, out: Path, frozen_dtype: torch.dtype) -> None:
    """Leave plain float32 weights in the whole final pipeline (EMA already in): LoRA saved apart, then
    fused and unloaded; the frozen parts cast back from ``frozen_dtype``."""
    if config.model.lora_rank:
        pipe.unet.save_lora_adapter(str(out / LORA_DIR))
        pipe.unet.fuse_lora()
        pipe.unet.unload_lora()
    if frozen_dtype != torch.float32:
        pipe.to(dtype=torch.float32)


def validation_encoder(name: str, device: torch.device) -> Any:
    """The garment encoder of garment-fidelity R@k: the colour histogram, or a CLIP/SigLIP model."""
    from fashionshoot.retrieval.encoders import HistogramEncoder, TransformersEncoder

    return HistogramEncoder(bins=6) if name == "histogram" else TransformersEncoder(name, device=device)


@contextlib.contextmanager
def averaged_weights(trainee: Trainee) -> Iterator[None]:
    """Swap the EMA weights in for the duration (a no-op without EMA, and on ranks whose weights are not
    read for validation), and eval mode."""
    swap = trainee.ema is not None and trainee.whole.reads_this_rank
    trainee.denoiser.eval()
    if swap:
        trainee.ema.store(trainee.ema_params)
        trainee.ema.copy_to(trainee.ema_params)
    try:
        yield
    finally:
        if swap:
            trainee.ema.restore(trainee.ema_params)
        trainee.denoiser.train()


def run_validation(pipe: PhotoshootPipeline, config: PhotoshootTrainConfig, records: list[PairRecord], root: Path,
                   out: Path, step: int, encoder: Any) -> ValidationResult:
    """Validate ``pipe``; write ``validation/step-<step>.png`` and append to ``metrics.jsonl``."""
    pipe.set_progress_bar_config(disable=True)
    result = validate(pipe, records, root, settings_from(config), encoder)
    folder = out / VALIDATION_DIR
    folder.mkdir(parents=True, exist_ok=True)
    result.grid(config.validation.grid_rows).save(folder / f"step-{step:08d}.png")
    with open(folder / METRICS_LOG, "a", encoding="utf-8") as log:
        log.write(json.dumps({"step": step, **result.metrics}) + "\n")
    return result


def restart_validation_log(folder: Path, resumed_at: int | None) -> None:
    """Leave in ``folder`` (the run's ``validation/``) only this run's validations, which its metrics table reports.

    A fresh start (``resumed_at`` None) finds validations there only from an earlier run that left no
    checkpoint (a fresh start beside checkpoints is refused): they are moved aside to
    ``validation.stale-<time>``, as the stale ``base/`` is rebuilt. A run resumed at step ``resumed_at``
    keeps the rows and grids up to it and drops later ones: the interrupted run validated those on the
    stretch this run trains again, and a changed ``validation.every`` would not overwrite them."""
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    if resumed_at is None:
        stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(stale)
        print(f"{folder} held validations of an earlier run that left no checkpoint; moved them to {stale}", flush=True)
        return
    for grid in list(folder.iterdir()):  # unlinking while listing
        match = _GRID.match(grid.name)
        if match and int(match.group(1)) > resumed_at:
            grid.unlink()
    log = folder / METRICS_LOG
    if log.is_file():
        rows = [row for row in read_validation_rows(log) if row["step"] <= resumed_at]
        log.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_validation_rows(log: Path) -> list[dict[str, Any]]:
    """The rows of a run's :data:`METRICS_LOG`; a last line cut short by a killed run is left out, with a
    message (its validation is redone when the run resumes before it)."""
    rows = []
    for number, line in enumerate(log.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"{log}:{number}: not a complete JSON row (a run killed while writing it?); left out", flush=True)
    return rows


def metrics_table(rows: Sequence[Mapping[str, float]]) -> str:
    """Markdown table of validation rows (one per validated step): fidelity vs chance/oracle, pose following."""
    columns = [c for c in ("step", "garment_r@1", "garment_r@5", "chance_r@1", "oracle_r@1", "autoencoder_r@1",
                           "pose_accuracy", "pose_contrast", "num_pairs") if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.0f}" if c in ("step", "num_pairs") else f"{row[c]:.3f}" if c in row else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check_distributed_type(distributed_type: Any, deepspeed_config: Mapping[str, Any] | None = None,
                           fsdp_version: int | None = None) -> None:
    """Refuse FSDP1 and DeepSpeed half precision with the reason, instead of training wrongly.

    DeepSpeed ZeRO-1/2 keep whole parameters on every rank (only optimizer state and gradients are
    partitioned), so saving, validation, EMA and the ``conv_in`` gradient hook work unchanged;
    :func:`_backward` makes DeepSpeed step once per window. ZeRO-3 and FSDP2 also shard the parameters: EMA
    averages each rank's slices, validation and saving gather them (:mod:`fashionshoot.training.whole_weights`).
    FSDP1 flattens parameters into views that the loop's parameter lists, EMA and gathering do not follow
    (a forced CPU trial saved flat views). DeepSpeed bf16 runs as DeepSpeed's torch autocast
    (:func:`deepspeed_bf16_as_autocast`); its fp16 mode would cast the trained weights, the EMA and the
    saved pipeline to half precision and scale the loss: untested, refused.
    """
    name = str(getattr(distributed_type, "value", distributed_type)).upper()
    if name == "DEEPSPEED" and str((deepspeed_config or {}).get("fp16", {}).get("enabled", False)).lower() == "true":
        raise ConfigError("DeepSpeed fp16 is not supported by the photoshoot trainer (DeepSpeed would cast the "
                          "trained weights, the EMA and the saved pipeline to half precision); use mixed_precision "
                          "bf16 with DeepSpeed, or DDP (multi_gpu) with fp16")
    if name == "FSDP" and fsdp_version != 2:
        raise ConfigError(
            f"accelerate's FSDP plugin version {fsdp_version} is not supported by the photoshoot trainer (FSDP1 "
            "flattens the parameters into views its EMA and saving do not follow); launch with --fsdp_version 2, "
            "DeepSpeed ZeRO-3 (--use_deepspeed --zero_stage 3), or DDP (multi_gpu)")


def check_mixed_precision(asked: str, running: str, launched: str | None) -> str | None:
    """Refuse a run whose precision is not the config's; a note when the launcher asked for another.

    ``asked`` is ``config.mixed_precision``; ``running`` what accelerate runs, which under DeepSpeed its
    config file's ``bf16``/``fp16`` sections decide (an explicit ``false`` there would silently train a
    bf16 config in fp32); ``launched`` is ``accelerate launch --mixed_precision``, which the config overrides.
    """
    if running != asked:
        raise ConfigError(f"the config asks for mixed_precision={asked!r} but accelerate runs {running!r}: under "
                          "DeepSpeed the config file's bf16/fp16 sections decide; set their \"enabled\" to \"auto\"")
    if launched and launched != asked:
        return (f"accelerate launch asked for mixed precision {launched!r}; the run uses the config's "
                f"mixed_precision={asked!r} (pass mixed_precision={launched} to train in it)")
    return None


def physical_cores() -> int:
    """Physical cores this process may run on (what accelerate sizes CPU threads by; psutil comes with it)."""
    import psutil

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(psutil.cpu_count(logical=False) or available, available))


def cpu_threads_note(device: str, processes: int, threads: int, cores: int) -> str | None:
    """A note when a lone CPU process trains on fewer threads than the machine has cores: ``accelerate
    launch`` without an ``accelerate config`` sets ``OMP_NUM_THREADS=1`` (the tiny default then takes
    ~11 minutes instead of 7-10 on 2 cores). The thread count is the user's to choose, so only a note."""
    if device != "cpu" or processes != 1 or threads >= cores:
        return None
    return (f"training on {threads} CPU thread(s) of this machine's {cores} cores (OMP_NUM_THREADS); "
            f"accelerate launch --num_cpu_threads_per_process {cores} ... uses all of them")


def deepspeed_bf16_as_autocast(deepspeed_config: dict[str, Any]) -> bool:
    """Run a DeepSpeed config's bf16 as DeepSpeed's ``torch_autocast``; whether it was bf16.

    ``mixed_precision: bf16`` means the same under every backend of this trainer: fp32 weights, optimizer
    and EMA, the forward under ``torch.autocast(bfloat16)``, a float32 saved pipeline. accelerate hands bf16
    to DeepSpeed as its ``bf16`` mode, which trains bf16 weights (with fp32 copies inside the optimizer),
    so the EMA and the saved weights would be bf16; DeepSpeed's ``torch_autocast`` section keeps the fp32
    weights and also communicates the linear/conv gradients in bf16. Other ``torch_autocast`` settings of
    the config (e.g. ``lower_precision_safe_modules``) are kept.
    """
    bf16 = deepspeed_config.get("bf16", {})
    if str(bf16.get("enabled", False)).lower() != "true":
        return False
    bf16["enabled"] = False  # accelerator.mixed_precision follows this section under DeepSpeed: read it before
    deepspeed_config.setdefault("torch_autocast", {}).update(enabled=True, dtype="bfloat16")
    return True


def check_fsdp_units(denoiser: torch.nn.Module, uses_reference: bool) -> None:
    """Refuse reference conditioning when FSDP2 shards blocks of the UNet as units of their own.

    FSDP2 gathers a unit's weights for the backward when gradients reach the unit's outputs. The
    reference write pass is read inside the self-attention layers, so its gradients enter the blocks
    below their outputs, and the backward meets freed weights ("data is not allocated yet"). One unit
    for the whole denoiser (no auto-wrap) works, as does DeepSpeed ZeRO-3.
    """
    from torch.distributed.fsdp import FSDPModule

    units = [name for name, module in denoiser.named_modules() if name and isinstance(module, FSDPModule)]
    if uses_reference and units:
        raise ConfigError(
            f"reference conditioning cannot train with FSDP2 sharding blocks as their own units ({len(units)}, "
            f"e.g. {units[0]}): its gradients enter the blocks inside their self-attention, where FSDP2 has not "
            "gathered their weights. Set fsdp_auto_wrap_policy NO_WRAP (one unit for the whole denoiser), or use "
            "DeepSpeed ZeRO-3")


def check_process_count(launched: int, joined: int) -> None:
    """Refuse a launch whose processes did not join one process group.

    ``launched`` is the launcher's ``WORLD_SIZE``, ``joined`` accelerate's ``num_processes``. Without a GPU,
    accelerate joins processes only for DDP with ``ACCELERATE_USE_CPU`` and for DeepSpeed (the loop asks
    for gloo); e.g. ``--use_fsdp`` on CPU starts lone processes that would each train the whole run and
    write the same output folder.
    """
    if launched > joined:
        raise ConfigError(
            f"the launcher started {launched} processes but accelerate joined {joined} into a process group, so "
            "each would train alone into the same output_dir. Without a GPU, launch with --multi_gpu and "
            "ACCELERATE_USE_CPU=true (DDP over gloo) or --use_deepspeed with DS_ACCELERATOR=cpu; accelerate's "
            "FSDP plugin needs GPUs")


def _sum_over_ranks(accelerator: Any, count: int) -> int:
    """``count`` summed over the processes (a collective: every rank calls it at the same point)."""
    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), "sum").item())


def gradients_finite(accelerator: Any, norm: torch.Tensor | float | None) -> bool:
    """Whether a step may apply its gradients, given the norm ``accelerator.clip_grad_norm_`` returned.

    A finite loss can still back-propagate to inf/NaN gradients; stepping on them would write NaN into
    every weight. Under DeepSpeed the engine has already stepped (in :func:`_backward`); with fp16's
    gradient scaler the optimizer wrapper skips such steps itself and lowers the scale (skipping its call
    here would keep the scale too high for ever)."""
    if accelerator.state.deepspeed_plugin is not None or accelerator.scaler is not None or norm is None:
        return True
    whole = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    return bool(torch.isfinite(torch.as_tensor(whole)))


def _backward(accelerator: Any, denoiser: Any, loss: torch.Tensor, last: bool) -> None:
    """``accelerator.backward``; under DeepSpeed drive the engine so it reduces and steps (clipping by
    ``gradient_clipping``) only on the window's last micro-batch (accelerate would step on every one)."""
    if accelerator.state.deepspeed_plugin is None:
        accelerator.backward(loss)
        return
    denoiser.set_gradient_accumulation_boundary(last)
    denoiser.backward(loss, scale_wrt_gas=False)  # already normalised by the window's weight sum, as on DDP
    if last:
        denoiser.step()


def _forget_accelerate_state(keep_processes: bool) -> None:
    """Reset accelerate's process-wide singletons, so this or another ``run`` in the same process (a
    notebook, a sweep, a test session) may choose its own mixed precision. ``keep_processes`` keeps the
    process-level state (device, process group), which must survive while a process group exists."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=not keep_processes)
    GradientState._reset_state()


def run(config: PhotoshootTrainConfig) -> dict[str, Any]:
    """Train as configured; returns ``step``, ``nan_steps``, ``losses`` (step -> loss of the global batch),
    ``skipped`` (bad samples this rank's shard stream skipped in the whole run, resumes included, by
    reason), ``skipped_total`` (all ranks' together), ``main_process`` (whether this process wrote the
    outputs and ``validation`` metrics) and the paths of the last checkpoint, the pipeline folder and the
    sample grid."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    out = Path(config.output_dir)
    _forget_accelerate_state(keep_processes=True)
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not torch.cuda.is_available():
        # accelerate leaves the backend unset without a GPU and then counts one process per rank.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision,
                              log_with=_tracker(config.log_with), project_dir=str(out), kwargs_handlers=handlers)
    notes = (check_mixed_precision(config.mixed_precision, accelerator.mixed_precision,
                                   os.environ.get("ACCELERATE_MIXED_PRECISION")),
             cpu_threads_note(accelerator.device.type, accelerator.num_processes, torch.get_num_threads(),
                              physical_cores()))
    for note in notes:
        if note:
            accelerator.print(note)
    plugin = accelerator.state.deepspeed_plugin
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)  # set only under FSDP
    check_distributed_type(accelerator.distributed_type, plugin.deepspeed_config if plugin is not None else None,
                           fsdp.fsdp_version if fsdp is not None else None)
    check_process_count(int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed_precision=fp16 on the CPU: accelerate does not autocast there, so the fp16 frozen "
                          "encoders would feed the fp32 UNet; use bf16 (autocast on the CPU) or no")
    set_seed(config.seed)
    resolved = to_dict(config)
    resume = resolve_resume(config.checkpoint.resume, out)
    check_start(resume, out, resolved)  # before anything is written into the run's folder
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out)
        with whole_models(accelerator):
            _prepare_inputs(config, out, load_pairs(config.data, out), resuming=resume is not None)
    accelerator.wait_for_everyone()
    pairs = load_pairs(config.data, out)  # now only reads what the main process wrote
    base = _prepare_inputs(config, out, pairs, resuming=resume is not None)

    trainee = _build(config, base, accelerator)
    if pairs.progress is not None:  # a stream's place is state, saved by every rank
        trainee.per_rank["data"] = pairs.progress
    pipe, frozen, denoiser, optimizer = trainee.pipe, trainee.frozen, trainee.denoiser, trainee.optimizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latent_size = tuple(side // pipe.vae_scale_factor for side in config.data.resolution)
    collator = PhotoshootCollator(pipe.feature_extractor, pipe.slots, config.data.slot_map, config.data.resolution,
                                  pipe.garment_adapter.config.conditioning, latent_size if pipe.pose_channels else None)

    def batches_at(step: int) -> tuple[int, Any]:
        return pairs.batches_at(collator, config.optim.batch_size, config.seed, accelerator.process_index,
                                accelerator.num_processes, step, config.optim.grad_accum)

    state = TrainerState()
    if resume:
        ema = [trainee.ema] if trainee.ema is not None else []
        state = load_checkpoint(accelerator, resume, resolved, trainee.per_rank, on_device=ema)
    state.config = resolved
    if accelerator.is_main_process:  # the only writer of validation/
        restart_validation_log(out / VALIDATION_DIR, state.step if resume else None)
    # wandb files go under the run's folder (as tensorboard's do), unless WANDB_DIR says where
    accelerator.init_trackers("photoshoot", config=_tracker_config(config),
                              init_kwargs={"wandb": {"dir": os.environ.get("WANDB_DIR", str(out))}})
    encoder = None
    if accelerator.is_main_process:
        with whole_models(accelerator):
            encoder = validation_encoder(config.validation.encoder, accelerator.device)
    stage, batches = batches_at(state.step)
    losses: dict[int, float] = {}
    progress = tqdm(total=config.optim.max_steps, initial=state.step, desc="photoshoot",
                    disable=not accelerator.is_local_main_process)
    denoiser.train()
    last_checkpoint = None
    while state.step < config.optim.max_steps:
        if curriculum_stage(config.data, state.step)[0] != stage:
            stage, batches = batches_at(state.step)
        # One step is one large batch, however it is split into micro-batches and processes: its weighted
        # mean loss over all of them (hence the window's weight sum), and randomness by window position.
        window = [next(batches) for _ in range(config.optim.grad_accum)]
        weight_norm = accelerator.reduce(sum(b["weight"].sum() for b in window).to(accelerator.device), "mean")
        total, finite = torch.zeros((), device=accelerator.device), True
        for micro, batch in enumerate(window):
            last = micro == len(window) - 1
            position = (micro * accelerator.num_processes + accelerator.process_index) * config.optim.batch_size
            randomness = SampleRandomness.for_batch(config.seed, state.step, position, len(batch["weight"]),
                                                    accelerator.device)
            with contextlib.nullcontext() if last else accelerator.no_sync(denoiser):
                loss = training_loss(denoiser, frozen, noise_scheduler, batch, randomness, config.dropout,
                                     config.loss, weight_norm)
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
                if finite:
                    _backward(accelerator, denoiser, loss, last)
                    total += loss.detach()
                elif micro > 0 and accelerator.state.deepspeed_plugin is not None:
                    raise TrainingDiverged(
                        f"step {state.step + 1}: non-finite loss in micro-batch {micro + 1} of {config.optim.grad_accum}; "
                        "DeepSpeed already holds this window's earlier gradients and cannot drop them, so the step "
                        "cannot be skipped: lower optim.lr, or train with DDP where such steps are skipped")
                else:
                    break  # the step is skipped; its remaining micro-batches were drawn, so data positions hold
        if finite:
            if trainee.before_step is not None:
                trainee.before_step()
            norm = accelerator.clip_grad_norm_(trainee.params, config.optim.max_grad_norm)
            finite = gradients_finite(accelerator, norm)
        if finite:
            optimizer.step()
            trainee.lr_scheduler.step()  # a skipped step does not advance the schedule either
            if trainee.ema is not None:
                trainee.ema.step(trainee.ema_params)
        else:
            state.nan_steps += 1
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update(1)
        if finite:
            losses[state.step] = accelerator.reduce(total, "mean").item()
            progress.set_postfix(loss=f"{losses[state.step]:.4f}")
        else:
            accelerator.print(f"step {state.step}: non-finite loss or gradients, step skipped "
                              f"({state.nan_steps} so far)")
        if state.step % config.log_every == 0:  # a skipped step too: the logs show why a run stopped
            logged = {"lr": trainee.lr_scheduler.get_last_lr()[0], "nan_steps": state.nan_steps}
            if finite:
                logged["loss"] = losses[state.step]
            if pairs.progress is not None:  # every rank's count, not only the logging process's
                logged["skipped_samples"] = _sum_over_ranks(accelerator, sum(pairs.progress.skipped().values()))
            accelerator.log(logged, step=state.step)
        if not finite and state.nan_steps > config.max_nan_steps:
            raise TrainingDiverged(
                f"{state.nan_steps} steps had a non-finite loss or gradients (limit "
                f"max_nan_steps={config.max_nan_steps}), "
                f"the last at step {state.step}: lower optim.lr, prefer mixed_precision=bf16 to fp16, "
                "or check the data")
        # a skipped step is still a step: its checkpoint and validation are due as usual
        if state.step % config.checkpoint.every == 0 or state.step == config.optim.max_steps:
            last_checkpoint = save_checkpoint(accelerator, out, state, config.checkpoint.keep, trainee.per_rank)
        every = config.validation.every
        if every and state.step % every == 0 and state.step < config.optim.max_steps:  # the end validates anyway
            with averaged_weights(trainee), trainee.whole.pipeline() as current:  # every rank: sharded runs gather
                if current is not None:
                    metrics = run_validation(current, config, pairs.test_records, pairs.test_root, out, state.step,
                                             encoder).metrics
                    accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=state.step)
            accelerator.wait_for_everyone()
    progress.close()
    if last_checkpoint is None:  # resumed at (or past) max_steps: nothing trained, point at what exists
        found = checkpoints(out)
        last_checkpoint = found[-1] if found else None

    skipped = dict(pairs.progress.skipped()) if pairs.progress is not None else {}
    if skipped:  # each rank streams its own part: each says what it skipped (the worker logs say where)
        print(f"rank {accelerator.process_index}: skipped {sum(skipped.values())} bad training sample(s) while "
              f"streaming: {skipped}", flush=True)
    skipped_total = _sum_over_ranks(accelerator, sum(skipped.values())) if pairs.progress is not None else 0
    results: dict[str, Any] = {"step": state.step, "nan_steps": state.nan_steps, "losses": losses, "skipped": skipped,
                               "skipped_total": skipped_total,
                               "main_process": accelerator.is_main_process,
                               "checkpoint": last_checkpoint, "pipeline": out / "pipeline",
                               "grid": out / "samples.png", "metrics": out / "metrics.md", "validation": {}}
    if trainee.ema is not None and trainee.whole.reads_this_rank:
        trainee.ema.copy_to(trainee.ema_params)
    denoiser.eval()
    with trainee.whole.pipeline() as final_pipe:  # every rank: sharded runs gather
        if final_pipe is not None:
            _finish_weights(final_pipe, config, out, frozen.dtype)
            height, width = config.data.resolution  # generation defaults to the trained shape (default_size)
            final_pipe.unet.register_to_config(sample_size=[height // final_pipe.vae_scale_factor,
                                                            width // final_pipe.vae_scale_factor])
            final_pipe.save_pretrained(str(results["pipeline"]))
            final = run_validation(final_pipe, config, pairs.test_records, pairs.test_root, out, state.step, encoder)
            final.grid(config.validation.grid_rows).save(results["grid"])
            results["validation"] = final.metrics
            accelerator.log({f"val/{k}": v for k, v in final.metrics.items()}, step=state.step)
            logged = read_validation_rows(out / VALIDATION_DIR / METRICS_LOG)
            rows = sorted({row["step"]: row for row in logged}.values(), key=lambda row: row["step"])  # reruns: last wins
            (out / "metrics.json").write_text(json.dumps(final.metrics, indent=1) + "\n")
            results["metrics"].write_text(metrics_table(rows))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: nothing collective after it
    _forget_accelerate_state(keep_processes=False)
    return results
