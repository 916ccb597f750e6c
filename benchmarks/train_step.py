"""One photoshoot training step against a bare diffusers UNet + VAE step of the same tiny size (CPU).

Issue 5 asks for "one photoshoot training step <= 1.10x a bare diffusers UNet+VAE step of the same
tiny size". Both sides get the same pre-collated batch: ``--batch-size`` synthetic pairs from
:class:`~fashionshoot.data.synthetic.SyntheticFashion` (the ``data.synthetic`` settings of
``configs/photoshoot_tiny.yaml``), run once through the real :class:`PhotoshootCollator` at the
config's ``data.resolution``. Collation happens in DataLoader workers in a real run, so it is not
timed (its one-off cost is printed for reference); it includes drawing the pose heatmaps at the latent
size, which the loop's collator does there too.

ours   what ``fashionshoot.training.loop.run`` does per optimizer step (grad_accum 1, one process):
       ``SampleRandomness.for_batch``, ``training_loss`` (condition dropout, VAE posterior sample,
       the text encoder on the step's distinct prompts, the garment-image encoder on the garments
       kept after dropout -- both ``Frozen`` methods, under ``inference_mode`` --, garment adapter +
       UNet through ``PhotoshootDenoiser``), the finite-loss check, backward, grad clipping, AdamW step, LR
       schedule step, ``zero_grad``. Model: ``save_tiny_photoshoot_pipeline(conditioning=
       "cross_attention", randomize_zero_init=False)``; frozen encoders, denoiser and trainable groups
       from ``trainable_denoiser``, as the loop builds them.
bare   the textbook diffusers step (``examples/text_to_image/train_text_to_image.py``) at the same size:
       tokenize + CLIP-text-encode the same prompts, VAE-encode the same lookbook pixels,
       ``latent_dist.sample()``, DDPM ``add_noise`` with global-RNG noise and timesteps, a plain
       ``UNet2DConditionModel`` (the same config and weights, but 4 input channels: no pose channels,
       default attention processors, no adapter), mean MSE, backward, grad clipping, AdamW, LR schedule,
       ``zero_grad``. Its VAE, text encoder and tokenizer are loaded from the same tiny pipeline folder.
       Its AdamW is the one ``make_optimizer`` builds (torch's fused kernel; the textbook's default
       per-tensor loop costs ~7 ms more per step here): the ratio is what the photoshoot step adds, not
       an optimizer choice.

Two rows, both interleaved in every round:

  train-unet  (headline) ours trains the whole UNet + the garment adapter; bare trains the whole UNet.
  default     ours trains the adapter + the UNet's pose input channels (``model.train_unet: false``);
              bare trains only ``unet.conv_in.weight``, so both back-propagate through the whole UNet to
              its first layer but keep weight gradients for only a few tensors.

Each round runs one step of every candidate in turn (so load drift from other processes hits all
alike); the table gives the median wall and CPU ms per step and the ours/bare ratios (of the medians;
and the median and quartiles of the per-round ratios, which show how much one run's figure can
move). A staged copy of each step (the same calls with timers between them, checked to give the same
loss as ``training_loss``) shows where the time goes.

Each thread count (``--threads``, default 1 then 2) gets its own warm-up, rounds and tables. On a
2-core machine one thread is the steadier figure: with two, the step has no core to spare, so whatever
else runs (the OS, a DataLoader worker, a shell) stalls one of the two halves of every parallel op and
the per-round ratios spread about twice as wide.

    PYTHONPATH=. python benchmarks/train_step.py [--repeats 30] [--threads 1 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "photoshoot_tiny.yaml"
STAGES = (
    "randomness", "condition dropout", "text: tokenize + encode", "VAE encode", "garment image encoder",
    "add_noise", "adapter forward", "UNet forward", "loss + finite check", "backward",
    "clip + AdamW + LR + zero_grad",
)


class Stages:
    """Accumulates wall time per named stage of one step."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.ms[name] += (time.perf_counter() - start) * 1e3


def synthetic_batch(config: Any, pipe: Any, batch_size: int) -> tuple[dict[str, Any], float]:
    """A batch of the first ``batch_size`` synthetic training pairs through the real collator; and its ms."""
    from fashionshoot.data.pairs import SampleSpec
    from fashionshoot.data.synthetic import SyntheticFashion, pair_record
    from fashionshoot.training.data import PhotoshootCollator

    data = SyntheticFashion(config.data.synthetic)
    spec = SampleSpec(weight_power=config.data.weight_power)
    samples = []
    for i in range(config.data.synthetic.num_garments):
        if len(samples) == batch_size:
            break
        garment = data.garment(i)
        lookbook = data.lookbook(i, 0)
        style = next(iter(lookbook.images))
        record = pair_record(garment, lookbook, data.split(i), "g.png", {style: "l.png"})
        samples.append(spec.sample(record, data.render_garment(garment), lookbook.images[style]))
    latent_size = tuple(side // pipe.vae_scale_factor for side in config.data.resolution)
    collator = PhotoshootCollator(pipe.feature_extractor, pipe.slots, config.data.slot_map, config.data.resolution,
                                  pipe.garment_adapter.config.conditioning, latent_size)
    start = time.perf_counter()
    batch = collator(samples)
    return batch, (time.perf_counter() - start) * 1e3


class Ours:
    """The loop's optimizer step on a freshly loaded tiny photoshoot pipeline."""

    def __init__(self, base: Path, config: Any, batch: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
        from fashionshoot.training.loop import make_optimizer, trainable_denoiser

        pipe = load_photoshoot_pipeline(base)
        self.base = base
        assert not pipe.garment_adapter.uses_reference, "benchmark covers conditioning=cross_attention"
        self.config, self.batch, self.pipe = config, batch, pipe
        self.frozen, denoiser, groups = trainable_denoiser(pipe, config.model, config.optim, torch.device("cpu"),
                                                           torch.float32)
        self.denoiser = denoiser.train()
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = make_optimizer(groups, config.optim)
        self.lr_scheduler = get_scheduler(config.optim.lr_scheduler, self.optimizer,
                                          num_warmup_steps=config.optim.warmup_steps,
                                          num_training_steps=10**9)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.n = 0

    def randomness(self) -> Any:
        from fashionshoot.training.randomness import SampleRandomness

        self.n += 1
        return SampleRandomness.for_batch(self.config.seed, self.n, 0, len(self.batch["weight"]))

    def loss(self, randomness: Any) -> torch.Tensor:
        from fashionshoot.training.loop import training_loss

        weight_norm = self.batch["weight"].sum()
        return training_loss(self.denoiser, self.frozen, self.noise_scheduler, self.batch, randomness,
                             self.config.dropout, self.config.loss, weight_norm)

    def step(self) -> float:
        loss = self.loss(self.randomness())
        finite = bool(torch.isfinite(loss.detach()).float().reshape(1).min() > 0)
        if finite:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def staged_loss(self, randomness: Any, t: Stages) -> torch.Tensor:
        """``training_loss`` for this benchmark's settings, call for call, with a timer around each part."""
        from fashionshoot.models.attention import CONTROLS_KEY
        from fashionshoot.models.guidance import condition_dropout

        batch, frozen, sched = self.batch, self.frozen, self.noise_scheduler
        drop = self.config.dropout
        present = batch["slot_mask"]
        with t("randomness"):
            uniform = randomness.rand()
        with t("condition dropout"):
            dropped = condition_dropout({"slot_mask": present, "prompts": batch["prompts"]},
                                        drop.garment, drop.text, drop.both, uniform=uniform)
        with torch.no_grad():
            with t("VAE encode"):  # includes the posterior sample's per-sample draw
                target_latents = frozen.latents(batch["lookbook"], randomness)
            with t("text: tokenize + encode"):
                text = frozen.text(dropped["prompts"])
            with t("garment image encoder"):
                kept = dropped["slot_mask"]
                features = frozen.garment_features(batch["garment_clip"][kept[present]], kept)
            pose = batch["pose"]
        with t("randomness"):
            timesteps = randomness.randint(sched.config.num_train_timesteps)
            noise = randomness.randn(target_latents.shape[1:], target_latents.dtype)
        with t("add_noise"):
            noisy = sched.add_noise(target_latents, noise, timesteps)
        with t("adapter forward"):
            controls = self.denoiser.garment_adapter(dropped["slot_mask"], features, None)
        with t("UNet forward"):
            model_input = torch.cat([noisy, pose], dim=1)
            pred = self.denoiser.unet(model_input, timesteps, text, cross_attention_kwargs={CONTROLS_KEY: controls}).sample
        with t("loss + finite check"):
            per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            loss = (per_sample * batch["weight"]).sum() / batch["weight"].sum()
        return loss

    def staged_step(self, t: Stages) -> float:
        with t("randomness"):
            randomness = self.randomness()
        loss = self.staged_loss(randomness, t)
        with t("loss + finite check"):
            finite = bool(torch.isfinite(loss.detach()).float().reshape(1).min() > 0)
        with t("backward"):
            if finite:
                loss.backward()
        with t("clip + AdamW + LR + zero_grad"):
            if finite:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.optim.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    def check_staged(self) -> None:
        """The staged copy must compute what ``training_loss`` computes (same weights, same randomness)."""
        from fashionshoot.training.randomness import SampleRandomness

        def fresh() -> Any:
            return SampleRandomness.for_batch(self.config.seed, 12345, 0, len(self.batch["weight"]))

        with torch.no_grad():
            want, got = float(self.loss(fresh())), float(self.staged_loss(fresh(), Stages()))
        assert math.isclose(want, got, rel_tol=1e-5, abs_tol=1e-7), f"staged loss {got} != training_loss {want}"


class Bare:
    """The textbook diffusers text-to-image training step with a plain UNet of the same config."""

    def __init__(self, ours: Ours, train_unet: bool) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler

        from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
        from fashionshoot.training.loop import make_optimizer

        pipe = load_photoshoot_pipeline(ours.base)
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        for module in (self.vae, self.text_encoder):
            module.requires_grad_(False).eval()
        config = dict(pipe.unet.config)
        config["in_channels"] = pipe.vae.config.latent_channels
        unet = UNet2DConditionModel.from_config(config)
        state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        state["conv_in.weight"] = state["conv_in.weight"][:, : config["in_channels"]].contiguous()
        unet.load_state_dict(state)
        self.unet = unet.train()  # default AttnProcessor2_0 processors: a fresh model, nothing installed
        unet.requires_grad_(train_unet)
        if train_unet:
            self.params = list(unet.parameters())
        else:
            unet.conv_in.weight.requires_grad_(True)
            self.params = [unet.conv_in.weight]
        optim = ours.config.optim
        self.max_grad_norm = optim.max_grad_norm
        self.optimizer = make_optimizer([{"params": self.params, "weight_decay": optim.weight_decay}], optim)
        self.lr_scheduler = get_scheduler(optim.lr_scheduler, self.optimizer, num_warmup_steps=optim.warmup_steps,
                                          num_training_steps=10**9)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.pixels, self.prompts = ours.batch["lookbook"], ours.batch["prompts"]

    def step(self, t: Stages | None = None) -> float:
        t = t or (lambda name: contextlib.nullcontext())
        with torch.no_grad():
            with t("VAE encode"):
                dist = self.vae.encode(self.pixels).latent_dist
            with t("randomness"):
                latents = dist.sample()
            with t("VAE encode"):
                latents = latents * self.vae.config.scaling_factor
            with t("text: tokenize + encode"):
                ids = self.tokenizer(self.prompts, padding="max_length", truncation=True,
                                     max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
                encoder_hidden_states = self.text_encoder(ids, return_dict=False)[0]
        with t("randomness"):
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        with t("add_noise"):
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with t("UNet forward"):
            pred = self.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        with t("loss + finite check"):
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        with t("backward"):
            loss.backward()
        with t("clip + AdamW + LR + zero_grad"):
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall ms, this process's CPU ms) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def unet_ablation(ours: Ours, bare: Bare) -> dict[str, Callable[[], None]]:
    """UNet forward + backward alone on fixed inputs, adding our parts one at a time (train-unet models)."""
    from fashionshoot.models.attention import CONTROLS_KEY

    batch = ours.batch
    with torch.no_grad():
        latents = bare.vae.encode(batch["lookbook"]).latent_dist.mode() * bare.vae.config.scaling_factor
        text = ours.frozen.text(batch["prompts"])
        features = ours.frozen.garment_features(batch["garment_clip"], batch["slot_mask"])
        pose = batch["pose"]
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(latents),), generator=generator)
    noisy = bare.noise_scheduler.add_noise(latents, noise, timesteps)
    zero_pose = torch.zeros_like(pose)

    def backward(pred: torch.Tensor, params: list[torch.nn.Parameter]) -> None:
        F.mse_loss(pred, noise).backward()
        for param in params:
            param.grad = None

    unet, denoiser = ours.denoiser.unet, ours.denoiser
    return {
        "bare diffusers UNet (4 ch, AttnProcessor2_0)": lambda: backward(
            bare.unet(noisy, timesteps, text).sample, bare.params),
        "ours UNet, no controls, zero pose (22 ch)": lambda: backward(
            unet(torch.cat([noisy, zero_pose], 1), timesteps, text, cross_attention_kwargs={CONTROLS_KEY: {}}).sample,
            ours.params),
        "  + pose maps as input": lambda: backward(
            unet(torch.cat([noisy, pose], 1), timesteps, text, cross_attention_kwargs={CONTROLS_KEY: {}}).sample,
            ours.params),
        "  + garment adapter (PhotoshootDenoiser)": lambda: backward(
            denoiser(noisy, timesteps, text, batch["slot_mask"], image_features=features, pose=pose), ours.params),
    }


Rows = dict[str, tuple[Ours, Bare]]
Name = tuple[str, str]


@dataclass
class Measured:
    """One thread count's interleaved rounds: per-step (wall, CPU) ms, staged parts and UNet ablation."""

    threads: int
    times: dict[Name, list[tuple[float, float]]]
    stages: dict[Name, list[dict[str, float]]]
    parts: dict[str, list[float]]


def measure(rows: Rows, threads: int, repeats: int, warmup: int, breakdown: bool) -> Measured:
    """Warm up, then ``repeats`` rounds of one step of every candidate in turn (staged copies after them)."""
    torch.set_num_threads(threads)
    names = [(row, side) for row in rows for side in ("ours", "bare")]
    ablation = unet_ablation(*rows["train-unet"]) if breakdown else {}

    def runner(row: str, side: str, t: Stages | None = None) -> Callable[[], float]:
        ours, bare = rows[row]
        if side == "ours":
            return (lambda: ours.staged_step(t)) if t is not None else ours.step
        return lambda: bare.step(t)

    for _ in range(warmup):
        for name in names:
            runner(*name)()
            if breakdown:
                runner(*name, Stages())()
        for fn in ablation.values():
            fn()

    measured = Measured(threads, {name: [] for name in names}, {name: [] for name in names},
                        {label: [] for label in ablation})
    for _ in range(repeats):
        for name in names:
            measured.times[name].append(timed(runner(*name)))
        if not breakdown:
            continue
        for name in names:
            t = Stages()
            runner(*name, t)()
            measured.stages[name].append(dict(t.ms))
        for label, fn in ablation.items():
            measured.parts[label].append(timed(fn)[0])
    return measured


def report(measured: Measured) -> tuple[float, float, float, float]:
    """Print one thread count's tables; return the headline row's (ratio, paired, low, high)."""
    names = list(measured.times)
    rows = dict.fromkeys(row for row, _ in names)
    print(f"\n== threads={measured.threads}")
    print(f"{'':12}{'ours':>9}{'bare':>9}{'ratio':>8}{'paired':>8}{'quartiles':>14}{'ours':>9}{'bare':>9}{'ratio':>8}")
    print(f"{'':12}{'median wall ms/step':^48}{'median CPU ms/step':^26}")
    print(f"{'':12}(paired: median of the per-round ratios; quartiles: their 25th and 75th percentiles)")
    ratios = {}
    for row in rows:
        o, b = measured.times[(row, "ours")], measured.times[(row, "bare")]
        cells = []
        for i in (0, 1):
            mo, mb = statistics.median(x[i] for x in o), statistics.median(x[i] for x in b)
            cells.append((mo, mb, mo / mb))
        per_round = [x[0] / y[0] for x, y in zip(o, b, strict=True)]
        paired = statistics.median(per_round)
        low, _, high = statistics.quantiles(per_round, n=4)
        ratios[row] = (cells[0][2], paired, low, high)
        print(f"{row:12}{cells[0][0]:9.1f}{cells[0][1]:9.1f}{cells[0][2]:8.3f}{paired:8.3f}{low:8.3f}-{high:.3f}"
              f"{cells[1][0]:9.1f}{cells[1][1]:9.1f}{cells[1][2]:8.3f}")
    ratio, paired, low, high = ratios["train-unet"]
    verdict = "PASS" if ratio <= 1.10 else "FAIL"
    print(f"summary (threads={measured.threads}): train-unet ours/bare = {ratio:.3f} (paired {paired:.3f}, "
          f"quartiles {low:.3f}-{high:.3f}; target <= 1.10: {verdict}); default config ours/bare = "
          f"{ratios['default'][0]:.3f} (paired {ratios['default'][1]:.3f})")

    if not measured.parts:
        return ratios["train-unet"]
    print("\nwhere the time goes: median wall ms per stage of the staged steps (-: not done on that side)")
    print(f"{'stage':32}" + "".join(f"{row + ' ' + side:>18}" for row, side in names))
    for stage in STAGES:
        cells = []
        for name in names:
            values = [s[stage] for s in measured.stages[name] if stage in s]
            cells.append(f"{statistics.median(values):18.2f}" if values else f"{'-':>18}")
        print(f"{stage:32}" + "".join(cells))
    totals = {name: statistics.median(sum(s.values()) for s in measured.stages[name]) for name in names}
    print(f"{'sum of stages':32}" + "".join(f"{totals[name]:18.2f}" for name in names))

    print("\nUNet forward + backward alone, fixed inputs, train-unet models (median wall ms, ratio to bare)")
    first = statistics.median(next(iter(measured.parts.values())))
    for label, values in measured.parts.items():
        print(f"{label:46}{statistics.median(values):9.1f}{statistics.median(values) / first:8.3f}")
    return ratios["train-unet"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds (one step per candidate each)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per candidate first")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch intra-op thread counts, measured one after the other")
    parser.add_argument("--batch-size", type=int, default=None, help="default: optim.batch_size of the config")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the staged per-part timing")
    args = parser.parse_args()
    torch.set_num_interop_threads(1)

    from fashionshoot.config import load_config
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline
    from fashionshoot.training.config import PhotoshootTrainConfig

    base_config = load_config(PhotoshootTrainConfig, args.config)
    batch_size = args.batch_size or base_config.optim.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        base = save_tiny_photoshoot_pipeline(Path(tmp, "base"), conditioning="cross_attention",
                                             randomize_zero_init=False, seed=base_config.seed)
        rows: Rows = {}
        batch: dict[str, Any] = {}
        collate_ms = 0.0
        for row, train_unet in (("train-unet", True), ("default", False)):
            config = load_config(PhotoshootTrainConfig, args.config, [f"model.train_unet={str(train_unet).lower()}",
                                                                     "model.conditioning=cross_attention"])
            if not batch:
                batch, collate_ms = synthetic_batch(config, load_photoshoot_pipeline(base), batch_size)
            ours = Ours(base, config, batch)
            ours.check_staged()
            rows[row] = (ours, Bare(ours, train_unet))
        runs = [measure(rows, threads, args.repeats, args.warmup, not args.no_breakdown) for threads in args.threads]

    latent = tuple(rows["train-unet"][1].vae.encode(batch["lookbook"][:1]).latent_dist.mean.shape[-2:])
    print(f"batch={batch_size} synthetic pairs via PhotoshootCollator (collated once, {collate_ms:.0f} ms, untimed), "
          f"pixels {tuple(batch['lookbook'].shape[-2:])} -> latents {latent} (H, W), {args.repeats} interleaved "
          f"rounds after {args.warmup} warm-up, per thread count")
    headline = [(run.threads, report(run)) for run in runs]
    print("\nsummary: train-unet ours/bare (paired) by threads: " + ", ".join(
        f"{threads}: {ratio:.3f} ({paired:.3f})" for threads, (ratio, paired, _, _) in headline))


if __name__ == "__main__":
    main()
