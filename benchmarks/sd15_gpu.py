"""SD-1.5-sized photoshoot training and generation on a GPU: throughput, MFU, peak memory, latency.

Issue 5's GPU figures: "SD-1.5 at 512x384 bf16 training throughput and MFU, peak memory at batch 4 with
gradient checkpointing (target: fits 24 GB), 30-step generation latency".

No weights can be downloaded, and neither speed nor memory depends on the weights' values, so the script
writes an SD-1.5-shaped base (860M-parameter UNet, VAE, CLIP ViT-L/14 text tower, tokenizer, DDIM
scheduler) and a CLIP ViT-L/14 vision tower with random weights, and builds the photoshoot pipeline from
them with ``assemble_photoshoot_pipeline``, as a run of ``configs/photoshoot_sd15.yaml`` does from real ones.

train     one optimizer step as the loop runs it with that config: ``training_loss`` (condition dropout, VAE
          posterior sample, text and garment-image encoders, pose maps, adapter + UNet), backward, grad
          clipping, AdamW over the whole UNet and the adapter, EMA update. The forward runs under bf16
          autocast and the frozen parts are cast to bf16, which is what accelerate's
          ``mixed_precision: bf16`` does; trained weights, gradients and optimizer state stay float32.
          The batch is synthetic pairs through the real collator at 512x384. Reported per row: ms/step,
          images/s, peak GiB (``max_memory_allocated`` since just before the row's first step, so the
          AdamW and EMA state are in it), and MFU: the FLOPs of one step without gradient checkpointing
          (counted by ``torch.utils.flop_counter``; recomputation is not useful work) over the step time
          and ``--peak-tflops`` (dense bf16; 989 for H100/H200 SXM).
generate  one ``PhotoshootPipeline`` call: one garment, pose and prompt, DDIM with ``--steps`` steps, text and
          garment guidance (three UNet branches per step), bf16 weights; median wall time of ``--repeats``.

``--cpu-memory`` estimates the peak-memory figure without a GPU (the first batch size, gradient checkpointing):
the forward and backward of the same step run on the CPU under bf16 autocast inside torch's ``MemTracker``,
which counts every live tensor; the AdamW state and the EMA copy, which the step holds from its first
optimizer step on, are added from the trained parameter count (8 and 4 bytes each); the step itself adds
no whole-model temporaries (``make_optimizer``'s AdamW is torch's fused kernel, which updates in place).
Not in the estimate: the CUDA context and kernel workspaces, allocator fragmentation.

    python benchmarks/sd15_gpu.py [--batch-sizes 4 16] [--repeats 5] [--peak-tflops 989]
    python benchmarks/sd15_gpu.py --cpu-memory [--batch-sizes 4]   # about 3 minutes and 9 GB of RAM on 2 cores
    python benchmarks/sd15_gpu.py --tiny   # the test-size models on CPU at 64x48: checks the script itself
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import synthetic_batch  # noqa: E402  (the same collated synthetic batch as the CPU benchmark)

ROOT = Path(__file__).resolve().parents[1]
SD15_CONFIG = ROOT / "configs" / "photoshoot_sd15.yaml"


def write_base(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """Random-weight SD-1.5-shaped (or test-size) base and image-encoder folders, as ``save_pretrained`` writes them."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from fashionshoot import testing

    if tiny:
        unet, vae = testing.tiny_unet(sample_size=8), testing.tiny_vae()
        text_config, vision_config = testing.tiny_clip_text_config(), testing.tiny_clip_vision_config(image_size=32)
    else:
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                    cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512)
        text_config = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                     projection_dim=768)
        vision_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                         num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                                         hidden_act="quick_gelu")
    base, encoder = folder / "base", folder / "image_encoder"
    tokenizer = CLIPTokenizer.from_pretrained(str(testing.write_clip_tokenizer(folder / "tokenizer")))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(base))
    CLIPVisionModelWithProjection(vision_config).save_pretrained(str(encoder))
    side = vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size=side).save_pretrained(str(encoder))
    return base, encoder


class TrainStep:
    """The loop's optimizer step on ``device``: bf16 autocast forward, float32 trained weights and AdamW."""

    def __init__(self, pipe: Any, config: Any, batch: dict[str, Any], device: torch.device, dtype: torch.dtype,
                 checkpointing: bool) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        from fashionshoot.training.loop import make_optimizer, trainable_denoiser

        self.config, self.device, self.dtype = config, device, dtype
        self.batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        self.frozen, denoiser, groups = trainable_denoiser(pipe, config.model, config.optim, device, dtype)
        if checkpointing:  # whatever the config says: the pipeline is reused across rows
            pipe.unet.enable_gradient_checkpointing()
        else:
            pipe.unet.disable_gradient_checkpointing()
        self.denoiser = denoiser.train()
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(groups, config.optim)
        self.ema = EMAModel(self.params, decay=config.ema.decay) if config.ema.decay else None
        if self.ema is not None:
            self.ema.to(device)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.n = 0

    def loss(self) -> torch.Tensor:
        from fashionshoot.training.loop import training_loss
        from fashionshoot.training.randomness import SampleRandomness

        self.n += 1
        randomness = SampleRandomness.for_batch(self.config.seed, self.n, 0, len(self.batch["weight"]), self.device)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return training_loss(self.denoiser, self.frozen, self.noise_scheduler, self.batch, randomness,
                                 self.config.dropout, self.config.loss, self.batch["weight"].sum())

    def step(self) -> None:
        self.loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.step(self.params)
        self.optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(run: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall ms of ``run`` after ``warmup`` calls, the device synchronised around each call."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict[str, float]) -> Iterator[None]:
    """``into["gib"]``: the peak allocated GiB inside the block (NaN without CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    into["gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def step_flops(step: TrainStep) -> int:
    """FLOPs of one optimizer step's forward and backward (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step.loss().backward()
    step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cpu_memory_estimate(pipe: Any, config: Any, batch: dict[str, Any]) -> None:
    """Print the forward+backward peak measured on the CPU, plus the optimizer and EMA state (see ``--cpu-memory``)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenAwareTracker(MemTracker):
        """MemTracker hooks the gradients of every module it sees run, which fails on frozen encoders."""

        def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True) -> int:
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    no_ema = dataclasses.replace(config, ema=dataclasses.replace(config.ema, decay=0.0))  # counted, not held
    step = TrainStep(pipe, no_ema, batch, torch.device("cpu"), torch.bfloat16, checkpointing=True)
    trained = sum(p.numel() for p in step.params)
    tracker = FrozenAwareTracker()
    with tracker:
        step.loss().backward()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    gib = {str(kind.value if hasattr(kind, "value") else kind): value / 2**30 for kind, value in peak.items()}
    optimizer, ema = 8 * trained / 2**30, (4 * trained / 2**30 if config.ema.decay else 0.0)
    print(f"\nmemory estimate on CPU (no GPU): batch {len(batch['weight'])}, {tuple(batch['lookbook'].shape[-2:])}, bf16 "
          f"autocast, gradient checkpointing, {trained / 1e6:.1f}M trained parameters")
    print(f"  forward+backward peak (MemTracker): {gib['Total']:.3g} GiB (weights {gib['Parameter']:.3g}, "
          f"gradients + activations + temporaries {gib['Total'] - gib['Parameter']:.3g})")
    print(f"  + AdamW state {optimizer:.3g} GiB + EMA {ema:.3g} GiB = {gib['Total'] + optimizer + ema:.3g} GiB; not "
          "included: the CUDA context and workspaces, allocator fragmentation")


def generation_inputs(config: Any, size: tuple[int, int]) -> dict[str, Any]:
    """One synthetic garment, its lookbook's pose scaled to the output size, and a caption."""
    from fashionshoot.data.synthetic import SyntheticFashion

    data = SyntheticFashion(config.data.synthetic)
    lookbook = data.lookbook(0, 0)
    image = next(iter(lookbook.images.values()))
    keypoints = lookbook.keypoints.copy()
    keypoints[:, 0] *= size[1] / image.width
    keypoints[:, 1] *= size[0] / image.height
    return {"garments": {"top": data.render_garment(0)}, "keypoints": keypoints,
            "prompt": "a model on a city street, editorial photo", "height": size[0], "width": size[1]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="test-size models on CPU at 64x48 (checks the script)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="generation steps")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
    parser.add_argument("--cpu-memory", action="store_true", help="estimate the peak memory on the CPU instead")
    args = parser.parse_args(argv)

    from fashionshoot.config import config_from_argv
    from fashionshoot.pipelines.assemble import assemble_photoshoot_pipeline
    from fashionshoot.training import PhotoshootTrainConfig

    device = torch.device("cpu" if args.tiny or args.cpu_memory else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = (64, 48) if args.tiny else (512, 384)
    config = config_from_argv(PhotoshootTrainConfig, [f"data.resolution=[{size[0]}, {size[1]}]"],
                              default_path=SD15_CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        base, encoder = write_base(Path(tmp), args.tiny)
        pipe = assemble_photoshoot_pipeline(base, encoder, conditioning=config.model.conditioning)
        print(f"built {'test-size' if args.tiny else 'SD-1.5-shaped'} pipeline in {time.perf_counter() - start:.0f} s:"
              f" UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M parameters, adapter "
              f"{sum(p.numel() for p in pipe.garment_adapter.parameters()) / 1e6:.1f}M; device {device}"
              + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)
    if args.cpu_memory:
        cpu_memory_estimate(pipe, config, synthetic_batch(config, pipe, args.batch_sizes[0])[0])
        return

    print(f"\ntrain: {size[0]}x{size[1]}, {dtype}, full UNet + adapter, AdamW, EMA {config.ema.decay}, "
          f"min-SNR {config.loss.snr_gamma}")
    print(f"{'batch':>5} {'grad ckpt':>9} {'ms/step':>9} {'images/s':>9} {'peak GiB':>9} {'TFLOP/step':>10} {'MFU':>6}")
    for batch_size in args.batch_sizes:
        batch, _ = synthetic_batch(config, pipe, batch_size)
        flops = None
        for checkpointing in (False, True):
            memory: dict[str, float] = {}
            with peak_memory(device, memory):
                step = TrainStep(pipe, config, batch, device, dtype, checkpointing)
                ms = timed_ms(step.step, device, args.repeats)
            if flops is None:
                flops = step_flops(step)
            mfu = flops / (ms / 1e3) / (args.peak_tflops * 1e12)
            print(f"{batch_size:>5} {'on' if checkpointing else 'off':>9} {ms:>9.1f} {batch_size / ms * 1e3:>9.2f} "
                  f"{memory['gib']:>9.2f} {flops / 1e12:>10.4g} {mfu:>6.1%}", flush=True)
            del step

    pipe.unet.disable_gradient_checkpointing()
    pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    inputs = generation_inputs(config, size)
    generator = torch.Generator(device).manual_seed(0)
    with torch.inference_mode():
        ms = timed_ms(lambda: pipe(**inputs, num_inference_steps=args.steps, generator=generator), device,
                      args.repeats, warmup=1)
    print(f"\ngenerate: {size[0]}x{size[1]}, {args.steps} DDIM steps, text + garment guidance, {dtype}: "
          f"{ms / 1e3:.2f} s per image ({ms / args.steps:.1f} ms per step)")


if __name__ == "__main__":
    main()
