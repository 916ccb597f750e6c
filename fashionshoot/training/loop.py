"""The photoshoot training loop: noise-prediction MSE on lookbook latents, conditioned on garment,
pose and caption through :class:`~fashionshoot.models.denoiser.PhotoshootDenoiser`, under accelerate.

Frozen parts (VAE, text and image encoders) run outside the wrapped module; everything trained (the
garment adapter, the UNet's pose input channels, optionally the whole UNet) runs inside its one
forward, so DDP sees it. Gradient accumulation is done by hand (``no_sync`` on all but the last
micro-batch) so a step is always ``grad_accum`` micro-batches and resume positions are exact.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from fashionshoot.config import save_config, to_dict
from fashionshoot.errors import FashionshootError
from fashionshoot.models.denoiser import PhotoshootDenoiser
from fashionshoot.models.garment_encoder import encode_garment_pixels, scatter_slots
from fashionshoot.models.guidance import condition_dropout
from fashionshoot.models.pose import pose_maps
from fashionshoot.pipelines.photoshoot import PhotoshootPipeline, load_photoshoot_pipeline
from fashionshoot.training.checkpoint import (
    TrainerState,
    checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from fashionshoot.training.config import DropoutConfig, PhotoshootTrainConfig
from fashionshoot.training.data import (
    PhotoshootCollator,
    batches_from,
    category_slot,
    load_records,
    select,
    train_loader,
)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingDiverged(FashionshootError, RuntimeError):
    """Too many optimizer steps had a non-finite loss; the run stopped instead of training on garbage."""


@dataclass
class Frozen:
    """The pipeline parts that only encode inputs: never trained, run under ``no_grad`` in ``dtype``."""

    pipe: PhotoshootPipeline
    device: torch.device
    dtype: torch.dtype

    def text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
        return self.pipe.text_encoder(ids.to(self.device))[0]

    def latents(self, pixels: torch.Tensor, sample: bool) -> torch.Tensor:
        """Scaled VAE latents; the target is *sampled* from the posterior (as SD training does), garment
        references use its mode (as the pipeline does at inference)."""
        dist = self.pipe.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return (dist.sample() if sample else dist.mode()) * self.pipe.vae.config.scaling_factor

    def garment_features(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        layer = self.pipe.garment_adapter.config.feature_layer
        return scatter_slots(encode_garment_pixels(self.pipe.image_encoder, pixels.to(self.device, self.dtype), layer), mask)


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


def trainable_parameters(denoiser: PhotoshootDenoiser, train_unet: bool, latent_channels: int,
                         weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: the adapter (decayed) and the UNet or only its pose input channels.

    ``conv_in.weight`` holds latent and pose channels in one tensor; without ``train_unet`` a gradient
    hook zeroes the latent part and the group has no weight decay, so only pose weights move.
    """
    denoiser.requires_grad_(False)
    denoiser.garment_adapter.requires_grad_(True)
    groups: list[dict[str, Any]] = [{"params": list(denoiser.garment_adapter.parameters()), "weight_decay": weight_decay}]
    unet = denoiser.unet
    if train_unet:
        unet.requires_grad_(True)
        groups.append({"params": list(unet.parameters()), "weight_decay": weight_decay})
    elif unet.conv_in.in_channels > latent_channels:
        weight = unet.conv_in.weight
        weight.requires_grad_(True)
        keep = torch.zeros_like(weight)
        keep[:, latent_channels:] = 1.0
        weight.register_hook(lambda grad: grad * keep)
        groups.append({"params": [weight], "weight_decay": 0.0})
    return groups


def training_loss(denoiser: torch.nn.Module, frozen: Frozen, noise_scheduler: Any, batch: dict[str, Any],
                  dropout: DropoutConfig) -> torch.Tensor:
    """Confidence-weighted noise-prediction MSE of one batch, after condition dropout."""
    adapter = frozen.pipe.garment_adapter
    present = batch["slot_mask"].to(frozen.device)
    dropped = condition_dropout({"slot_mask": present, "prompts": batch["prompts"]},
                                dropout.garment, dropout.text, dropout.both)
    with torch.no_grad():
        target_latents = frozen.latents(batch["lookbook"], sample=True)
        text = frozen.text(dropped["prompts"])
        features = frozen.garment_features(batch["garment_clip"], present) if adapter.uses_cross_attention else None
        garment_latents = reference_context = None
        if adapter.uses_reference:
            garment_latents = scatter_slots(frozen.latents(batch["garment_vae"], sample=False), present)
            reference_context = frozen.text([""])
        pose = None
        if frozen.pipe.pose_channels:
            pose = pose_maps(batch["keypoints"], tuple(batch["lookbook"].shape[-2:]), tuple(target_latents.shape[-2:]))
            pose = pose.to(frozen.device, frozen.dtype)
    noise = torch.randn_like(target_latents)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(noise),), device=frozen.device)
    noisy = noise_scheduler.add_noise(target_latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(target_latents, noise, timesteps)
    else:
        target = noise
    pred = denoiser(noisy, timesteps, text, dropped["slot_mask"], image_features=features,
                    garment_latents=garment_latents, reference_context=reference_context, pose=pose)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    weight = batch["weight"].to(frozen.device)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-8)


def _prepare_inputs(config: PhotoshootTrainConfig, out: Path) -> Path:
    """Generate the synthetic set and the tiny base pipeline if needed (main process only); the base path."""
    load_records(config.data, out)
    if config.model.pretrained:
        return Path(config.model.pretrained)
    base = out / "base"
    if not (base / "model_index.json").is_file():
        from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

        save_tiny_photoshoot_pipeline(base, conditioning=config.model.conditioning, randomize_zero_init=False,
                                      seed=config.seed)
    return base


def sample_grid(pipe: PhotoshootPipeline, records: list[Any], root: Path, config: PhotoshootTrainConfig,
                collator: PhotoshootCollator) -> Image.Image:
    """Rows of garment | generated | ground truth for the first ``sample.num_pairs`` test garments."""
    from fashionshoot.data.pairs import PairManifestDataset

    height, width = config.data.resolution
    first = list({r.garment_id: r for r in reversed(records)}.values())[::-1][: config.sample.num_pairs]
    dataset = PairManifestDataset(first, root)
    samples = [dataset[i] for i in range(len(dataset))]
    batch = collator(samples)
    outfits = [{pipe.slots[category_slot(s["record"].category, pipe.slots, config.data.slot_map)]: s["garment"]}
               for s in samples]
    generated = pipe(garments=outfits, keypoints=batch["keypoints"], prompt=batch["prompts"], height=height,
                     width=width, num_inference_steps=config.sample.steps,
                     guidance_scale_text=config.sample.guidance_text,
                     guidance_scale_garment=config.sample.guidance_garment,
                     generator=torch.Generator().manual_seed(config.sample.seed)).images
    grid = Image.new("RGB", (3 * width, len(samples) * height))
    for row, (sample, image) in enumerate(zip(samples, generated, strict=True)):
        for col, tile in enumerate((sample["garment"], image, sample["lookbook"])):
            grid.paste(tile.convert("RGB").resize((width, height)), (col * width, row * height))
    return grid


def run(config: PhotoshootTrainConfig) -> dict[str, Any]:
    """Train as configured; returns ``step``, ``nan_steps``, ``losses`` (step -> loss of this process)
    and the paths of the last checkpoint, the pipeline folder and the sample grid."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    out = Path(config.output_dir)
    accelerator = Accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision,
                              log_with=_tracker(config.log_with), project_dir=str(out))
    set_seed(config.seed)
    resume = resolve_resume(config.checkpoint.resume, out)
    if resume is None and checkpoints(out):
        raise FashionshootError(f"{out} holds checkpoints of an earlier run; resume it with "
                                "checkpoint.resume=latest or choose another output_dir")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out)
        _prepare_inputs(config, out)
    accelerator.wait_for_everyone()
    base = _prepare_inputs(config, out)  # now only finds what the main process wrote
    records, root = load_records(config.data, out)
    train_records = select(records, config.data, config.data.train_split)

    pipe = load_photoshoot_pipeline(base)
    dtype = _DTYPES[accelerator.mixed_precision]
    for module in (pipe.vae, pipe.text_encoder, pipe.image_encoder):
        module.requires_grad_(False).eval().to(accelerator.device)
        if dtype != torch.float32:  # diffusers warns on every .to(dtype), even a no-op one
            module.to(dtype)
    frozen = Frozen(pipe, accelerator.device, dtype)
    denoiser = PhotoshootDenoiser(pipe.unet, pipe.garment_adapter).to(accelerator.device)
    groups = trainable_parameters(denoiser, config.model.train_unet, pipe.vae.config.latent_channels,
                                  config.optim.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.optim.lr)
    lr_scheduler = get_scheduler(config.optim.lr_scheduler, optimizer, num_warmup_steps=config.optim.warmup_steps,
                                 num_training_steps=config.optim.max_steps)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)  # stepped by us: one step per optimizer step
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    collator = PhotoshootCollator(pipe.feature_extractor, pipe.slots, config.data.slot_map, config.data.resolution)
    loader, sampler = train_loader(train_records, root, config.data, collator, config.optim.batch_size, config.seed,
                                   accelerator.process_index, accelerator.num_processes)
    resolved = to_dict(config)
    state = load_checkpoint(accelerator, resume, resolved) if resume else TrainerState()
    state.config = resolved
    accelerator.init_trackers("photoshoot", config=_tracker_config(config))
    batches = batches_from(loader, sampler, state.step * config.optim.grad_accum)
    losses: dict[int, float] = {}
    progress = tqdm(total=config.optim.max_steps, initial=state.step, desc="photoshoot",
                    disable=not accelerator.is_local_main_process)
    denoiser.train()
    last_checkpoint = None
    while state.step < config.optim.max_steps:
        total, finite = torch.zeros((), device=accelerator.device), True
        for micro in range(config.optim.grad_accum):
            batch = next(batches)
            if not finite:
                continue  # consume the window's batches so data positions stay step * grad_accum
            last = micro == config.optim.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(denoiser):
                loss = training_loss(denoiser, frozen, noise_scheduler, batch, config.dropout)
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
                if finite:
                    accelerator.backward(loss / config.optim.grad_accum)
                    total += loss.detach() / config.optim.grad_accum
        if finite:
            accelerator.clip_grad_norm_(denoiser.parameters(), config.optim.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()  # a skipped step does not advance the schedule either
        else:
            state.nan_steps += 1
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        progress.update(1)
        if not finite:
            accelerator.print(f"step {state.step}: non-finite loss, step skipped ({state.nan_steps} so far)")
            if state.nan_steps > config.max_nan_steps:
                raise TrainingDiverged(
                    f"{state.nan_steps} steps had a non-finite loss (limit max_nan_steps={config.max_nan_steps}), "
                    f"the last at step {state.step}: lower optim.lr, prefer mixed_precision=bf16 to fp16, "
                    "or check the data")
            continue
        losses[state.step] = total.item()
        progress.set_postfix(loss=f"{losses[state.step]:.4f}")
        if state.step % config.log_every == 0:
            accelerator.log({"loss": losses[state.step], "lr": lr_scheduler.get_last_lr()[0],
                             "nan_steps": state.nan_steps}, step=state.step)
        if state.step % config.checkpoint.every == 0 or state.step == config.optim.max_steps:
            last_checkpoint = save_checkpoint(accelerator, out, state, config.checkpoint.keep)
    progress.close()
    if last_checkpoint is None:  # resumed at (or past) max_steps: nothing trained, point at what exists
        found = checkpoints(out)
        last_checkpoint = found[-1] if found else None

    results: dict[str, Any] = {"step": state.step, "nan_steps": state.nan_steps, "losses": losses,
                               "checkpoint": last_checkpoint, "pipeline": out / "pipeline",
                               "grid": out / "samples.png"}
    if accelerator.is_main_process:
        if dtype != torch.float32:
            pipe.to(dtype=torch.float32)
        denoiser.eval()
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(str(results["pipeline"]))
        test_records = select(records, config.data, config.data.test_split)
        sample_grid(pipe, test_records, root, config, collator).save(results["grid"])
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group: nothing collective after it
    return results
