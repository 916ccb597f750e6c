"""``PhotoshootPipeline``: garments (up to six slots) + pose keypoints + scene text -> editorial images.

A standard diffusers pipeline (swappable scheduler, generators on any device, batches,
``save_pretrained``/``from_pretrained``) whose garment conditioning enters only through the
attention processors of :mod:`fashionshoot.models.attention` and the registered
:class:`~fashionshoot.models.garment_adapter.GarmentAdapter`; pose enters as extra UNet input
channels. Guidance has two scales (text and garment), see :mod:`fashionshoot.models.guidance`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedModel
from transformers.image_processing_utils import BaseImageProcessor

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.models.attention import (
    CONTROLS_KEY,
    FashionAttnProcessor,
    attention_layers,
    is_self_attention,
)
from fashionshoot.models.garment_adapter import GarmentAdapter, install_garment_attention
from fashionshoot.models.garment_encoder import encode_garment_pixels, scatter_slots
from fashionshoot.models.guidance import BRANCH_CONDITIONS, combine_guidance, guidance_branches
from fashionshoot.models.outfit import Outfit, arrange_outfit, is_outfit_batch, slot_mask, swap_garments
from fashionshoot.models.pose import pose_maps
from fashionshoot.models.reference_net import write_reference
from fashionshoot.models.unet_inputs import UNetInputs, inpaint_inputs
from fashionshoot.weights import load_pretrained, resolve_pretrained

Keypoints = np.ndarray | Sequence[Sequence[float]] | Sequence[float]
logger = logging.getLogger(__name__)


def _as_list(value: Any, is_batch: bool) -> list[Any]:
    return list(value) if is_batch else [value]


def _is_keypoint_batch(keypoints: object) -> bool:
    """A batch is a 3-D array or a list whose first entry is ``None`` or a 2-D ``(K, 2|3)`` array."""
    if isinstance(keypoints, np.ndarray):
        return keypoints.ndim == 3
    if isinstance(keypoints, (list, tuple)) and keypoints:
        return keypoints[0] is None or np.ndim(keypoints[0]) == 2
    return False


def _broadcast(named: Mapping[str, list[Any]]) -> int:
    """The batch size; every input is length 1 (shared) or that size."""
    size = max(len(v) for v in named.values())
    wrong = {k: len(v) for k, v in named.items() if len(v) not in (1, size)}
    if wrong:
        raise DataError(f"batch inputs disagree in length (each must be 1 or {size}): {wrong}")
    return size


def _layer_mismatches(kind: str, adapter: Mapping[str, int], unet: Mapping[str, int]) -> list[str]:
    """How the ``{layer: width}`` an adapter was sized for differ from the UNet's, as message parts."""
    missing = [name for name in unet if name not in adapter]
    extra = [name for name in adapter if name not in unet]
    widths = [f"{name} (adapter {adapter[name]}, UNet {unet[name]})"
              for name in adapter if name in unet and adapter[name] != unet[name]]
    return [f"{what}: {', '.join(names)}" for what, names in (
        (f"UNet {kind} layers the adapter lacks", missing),
        (f"adapter {kind} layers the UNet lacks", extra),
        (f"{kind} widths differ", widths),
    ) if names]


def _check_adapter_fits(unet: UNet2DConditionModel, adapter: GarmentAdapter) -> None:
    """Refuse an adapter sized for another UNet: its garment keys would reach no layer (or reach one of
    another width), so the garment would silently have no effect, or fail deep inside attention."""
    layers = attention_layers(unet)
    problems: list[str] = []
    if adapter.uses_cross_attention:
        cross = {n: a.to_k.out_features for n, a in layers.items() if not is_self_attention(n, a)}
        sized = dict(zip(adapter.config.layers, adapter.config.layer_dims, strict=True))
        problems += _layer_mismatches("cross-attention", sized, cross)
    if adapter.uses_reference:
        selfs = {n: a.to_k.in_features for n, a in layers.items() if is_self_attention(n, a)}
        sized = dict(zip(adapter.config.reference_layers, adapter.config.reference_dims, strict=True))
        problems += _layer_mismatches("reference (self-attention)", sized, selfs)
    if problems:
        raise ConfigError("garment adapter does not fit this UNet (build it with GarmentAdapter.from_unet(unet, ...)): "
                          + "; ".join(problems))


def _clone(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def _same_noise_step_generators(generator: torch.Generator | list[torch.Generator] | None, n: int, batch: int
                                ) -> list[torch.Generator]:
    """Per-image generators for a stochastic scheduler's per-step noise (Euler ancestral) with ``same_noise``.

    Image ``i * n + j`` gets a copy of noise ``j``'s generator, so images with the same conditions draw
    the same noise at every step, not only at the start. Noise ``j``'s generator is the caller's
    ``generator[j]``, or one seeded from ``generator`` (the global RNG when ``None``); the seeds are
    drawn after the starting noise, which therefore stays what it was.
    """
    if not isinstance(generator, list):
        device = generator.device if generator is not None else torch.device("cpu")
        seeds = torch.randint(2**62, (n,), generator=generator, device=device).tolist()
        generator = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    return [_clone(generator[j]) for _ in range(batch) for j in range(n)]


class PhotoshootPipeline(DiffusionPipeline, TextualInversionLoaderMixin):
    """Generate a fashion model wearing an outfit, in a pose, in a scene described by text.

    Components: ``vae``, ``text_encoder`` + ``tokenizer`` (scene/style prompt), ``unet`` (optionally
    with 18 zero-initialised pose input channels, see :func:`~fashionshoot.models.pose.expand_conv_in`),
    ``scheduler``, ``image_encoder`` (``CLIPVisionModelWithProjection`` or ``SiglipVisionModel``) with
    its ``feature_extractor`` (image processor), and ``garment_adapter``. Textual-inversion tokens
    (``load_textual_inversion``) work in both prompts, e.g. FashionR2R's negative "rendered" embedding
    as ``negative_prompt``.
    """

    #: Call order for ``enable_model_cpu_offload``: each model moves to the GPU when called, evicting the one before.
    #: A module left out would be offloaded layer by layer on every call instead.
    model_cpu_offload_seq = "text_encoder->image_encoder->garment_adapter->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        image_encoder: PreTrainedModel,
        feature_extractor: BaseImageProcessor,
        garment_adapter: GarmentAdapter,
    ) -> None:
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            image_encoder=image_encoder, feature_extractor=feature_extractor, garment_adapter=garment_adapter,
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.unet_inputs = UNetInputs.of(unet.config.in_channels, vae.config.latent_channels)
        self.pose_channels = self.unet_inputs.pose
        self.mask_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False,
                                                do_binarize=True, do_convert_grayscale=True)
        encoder_dim = image_encoder.config.hidden_size
        if garment_adapter.uses_cross_attention and encoder_dim != garment_adapter.config.image_embed_dim:
            raise ConfigError(f"image encoder width {encoder_dim} != garment adapter image_embed_dim "
                              f"{garment_adapter.config.image_embed_dim}")
        _check_adapter_fits(unet, garment_adapter)
        install_garment_attention(unet)

    @property
    def slots(self) -> tuple[str, ...]:
        return tuple(self.garment_adapter.config.slots)

    @property
    def default_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels when a call gives none: the UNet's ``sample_size``, square when it is
        one number; a training run saves its resolution there, so its pipeline generates at that shape."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states ``(B, 77, dim)`` for the scene/style prompts."""
        prompts = self.maybe_convert_prompt(list(prompts), self.tokenizer)  # multi-vector inversion tokens
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self._execution_device))[0].to(self.unet.dtype)

    @torch.no_grad()
    def encode_outfits(self, outfits: Sequence[Sequence[Image.Image | None]], height: int, width: int
                       ) -> dict[str, Any]:
        """Attention controls (see :class:`GarmentAdapter`) for arranged outfits; empty slots encode nothing."""
        device, dtype = self._execution_device, self.unet.dtype
        mask = torch.tensor(slot_mask(outfits), dtype=torch.bool, device=device).view(len(outfits), len(self.slots))
        present = [g.convert("RGB") for outfit in outfits for g in outfit if g is not None]
        features = reference = None
        if self.garment_adapter.uses_cross_attention:
            features = torch.zeros(*mask.shape, 1, self.garment_adapter.config.image_embed_dim, device=device)
            if present:
                pixels = self.feature_extractor(images=present, return_tensors="pt").pixel_values
                encoder_dtype = next(self.image_encoder.parameters()).dtype
                encoded = encode_garment_pixels(self.image_encoder, pixels.to(device, encoder_dtype),
                                                self.garment_adapter.config.feature_layer)
                features = scatter_slots(encoded, mask)
        if self.garment_adapter.uses_reference:
            size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
            latents = torch.zeros(0, self.vae.config.latent_channels, *size, device=device, dtype=dtype)
            if present:
                pixels = self.image_processor.preprocess(present, height=height, width=width)
                latents = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist.mode()
                latents = (latents * self.vae.config.scaling_factor).to(dtype)
            reference = write_reference(self.unet, scatter_slots(latents, mask), mask, self.encode_prompt([""]))
        return self.garment_adapter(mask, features, reference)

    def prepare_pose(self, keypoints: Sequence[Keypoints | None], height: int, width: int) -> torch.Tensor | None:
        """``(B, 18, h, w)`` heatmaps, or ``None`` for a UNet without pose channels (then no keypoints allowed)."""
        if self.pose_channels == 0:
            if any(kp is not None for kp in keypoints):
                raise DataError("this pipeline's UNet has no pose channels; keypoints cannot be used")
            return None
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return pose_maps(keypoints, (height, width), latent_size).to(self._execution_device, self.unet.dtype)

    def prepare_inpaint(self, images: Sequence[Image.Image | None], masks: Sequence[Image.Image | None],
                        height: int, width: int) -> torch.Tensor | None:
        """``(B, 1 + C, h, w)`` mask + masked-image latents for an inpainting UNet (``None`` for others).

        Without scene images the whole image is regenerated; with them, every sample needs an image
        and a mask (white = regenerate), as in the diffusers inpainting pipelines.
        """
        given = [img is not None for img in images] + [m is not None for m in masks]
        if not self.unet_inputs.inpaint:
            if any(given):
                raise DataError("image / mask_image need an inpainting UNet (e.g. SD-2-inpainting); this one has "
                                f"{self.unet.config.in_channels} input channels")
            return None
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        if not any(given):
            return inpaint_inputs(self.vae, latent_size, len(images)).to(self.unet.dtype)
        if not all(given):
            raise DataError("give an image and a mask_image for every sample, or neither (regenerate everything)")
        pixels = self.image_processor.preprocess(list(images), height=height, width=width)
        mask = self.mask_processor.preprocess(list(masks), height=height, width=width)
        return inpaint_inputs(self.vae, latent_size, len(images), pixels, mask).to(self.unet.dtype)

    def _arrange_garments(self, outfit: Outfit[Image.Image]) -> list[Image.Image | None]:
        """One outfit in slot order, each garment a PIL image or ``None``."""
        if isinstance(outfit, Image.Image):
            raise DataError(f"garments must be an outfit ({{slot: image}} or images in slot order "
                            f"{', '.join(self.slots)}), or a list of outfits; got a bare PIL image: "
                            f"e.g. garments={{{self.slots[0]!r}: image}}")
        arranged = arrange_outfit(outfit, self.slots)
        for slot, garment in zip(self.slots, arranged, strict=True):
            if garment is not None and not isinstance(garment, Image.Image):
                raise DataError(f"garment in slot {slot!r} is a {type(garment).__name__}; expected a PIL image or None")
        return arranged

    def set_use_memory_efficient_attention_xformers(self, valid: bool, attention_op: Any = None) -> None:
        """Keep the garment processors (``enable_xformers_memory_efficient_attention`` lands here).

        diffusers would replace every attention processor with its xformers one, which knows no garment
        conditioning: the pipeline would then generate as if no garment were given. The installed
        processors already run ``scaled_dot_product_attention``, whose memory-efficient and flash kernels
        a GPU uses without xformers, so the request is already met."""
        logger.warning("PhotoshootPipeline keeps its garment attention processors: they already use "
                       "torch's memory-efficient scaled_dot_product_attention (xformers processors would "
                       "drop the garment conditioning)")

    def _check_processors(self) -> None:
        """Refuse to generate when the UNet's processors were replaced (``unet.set_attn_processor(...)``): the
        garment controls would be ignored, with at most a warning."""
        foreign = {name: type(p).__name__ for name, p in self.unet.attn_processors.items()
                   if not isinstance(p, FashionAttnProcessor)}
        if foreign:
            name, kind = next(iter(foreign.items()))
            raise ConfigError(f"{len(foreign)} UNet attention processor(s) are not garment processors (e.g. {name}: "
                              f"{kind}), so the garment would be ignored; reinstall them with "
                              "fashionshoot.models.garment_adapter.install_garment_attention(pipe.unet)")

    def _step_kwargs(self, generator: torch.Generator | list[torch.Generator] | None) -> dict[str, Any]:
        accepts = set(inspect.signature(self.scheduler.step).parameters)
        return {"generator": generator} if "generator" in accepts else {}

    @torch.no_grad()
    def __call__(
        self,
        garments: Outfit[Image.Image] | Sequence[Outfit[Image.Image]] | None = None,
        keypoints: Keypoints | Sequence[Keypoints | None] | None = None,
        prompt: str | Sequence[str] | None = "",
        negative_prompt: str | Sequence[str] | None = "",
        image: Image.Image | Sequence[Image.Image] | None = None,
        mask_image: Image.Image | Sequence[Image.Image] | None = None,
        guidance_scale_text: float = 5.0,
        guidance_scale_garment: float = 3.0,
        num_inference_steps: int = 30,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        same_noise: bool = False,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple[Any]:
        """Generate images.

        ``garments``: one outfit (``{slot: image}``, or images in slot order with ``None`` for empty
        slots) or a list of outfits (``None`` in it: a sample without garments). ``keypoints``: one
        ``(K, 2|3)`` array in output-image pixels (COCO-18, MPII-16 or BODY_25, chosen by ``K``) or a list
        of them. ``prompt`` / ``negative_prompt``: one string or one per sample (``None``: no text).
        Inputs of length 1 are shared across the batch. ``image`` / ``mask_image`` (inpainting UNets
        only): a scene to keep outside the white mask region, one or one per sample. ``same_noise`` gives
        every sample the same noise, the starting noise and a stochastic scheduler's per-step noise, so
        samples differ only by their conditions (used by :meth:`outfit_transfer` / :meth:`pose_transfer`);
        its ``generator`` is one generator or one per image of a prompt (``num_images_per_prompt``).
        """
        self._check_processors()
        bad = [f"{name}={value}" for name, value in (("num_images_per_prompt", num_images_per_prompt),
                                                     ("num_inference_steps", num_inference_steps)) if value < 1]
        if bad:
            raise DataError(f"must be at least 1: {', '.join(bad)}")
        height, width = height or self.default_size[0], width or self.default_size[1]
        if min(height, width) < 1 or height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise DataError(f"height and width must be positive multiples of {self.vae_scale_factor}, "
                            f"got {height}x{width}")
        prompt, negative_prompt = prompt or "", negative_prompt or ""  # None: no text, as in diffusers
        inputs = {
            "garments": [outfit if outfit is not None else {}
                         for outfit in _as_list(garments, is_outfit_batch(garments))],
            "keypoints": _as_list(keypoints, _is_keypoint_batch(keypoints)),
            "prompt": _as_list(prompt, not isinstance(prompt, str)),
            "negative_prompt": _as_list(negative_prompt, not isinstance(negative_prompt, str)),
            "image": _as_list(image, isinstance(image, (list, tuple))),
            "mask_image": _as_list(mask_image, isinstance(mask_image, (list, tuple))),
        }
        batch = _broadcast(inputs)
        n = num_images_per_prompt
        per_image = {k: [v[i if len(v) > 1 else 0] for i in range(batch) for _ in range(n)] for k, v in inputs.items()}
        outfits = [self._arrange_garments(o) for o in per_image["garments"]]
        shape = (len(outfits), self.vae.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != shape:
            raise DataError(f"latents have shape {tuple(latents.shape)}; expected {shape}: (images, latent channels, "
                            f"height / {self.vae_scale_factor}, width / {self.vae_scale_factor})")
        noises = n if same_noise else len(outfits)
        if isinstance(generator, list) and len(generator) != noises:
            raise DataError(f"{len(generator)} generators for {noises} noises: pass one generator, or one per "
                            "generated image (one per image of a prompt with same_noise)")
        device, dtype = self._execution_device, self.unet.dtype

        branches = guidance_branches(guidance_scale_text, guidance_scale_garment)
        positive = self.encode_prompt(per_image["prompt"])
        negative = self.encode_prompt(per_image["negative_prompt"]) if branches != ("full",) else positive
        text = torch.cat([positive if BRANCH_CONDITIONS[b][1] else negative for b in branches])
        keep = [BRANCH_CONDITIONS[b][0] for b in branches]
        controls = {k: v.for_branches(keep) for k, v in self.encode_outfits(outfits, height, width).items()}
        pose = self.prepare_pose(per_image["keypoints"], height, width)
        inpaint = self.prepare_inpaint(per_image["image"], per_image["mask_image"], height, width)
        extra = [x.repeat(len(branches), 1, 1, 1) for x in (inpaint, pose) if x is not None]

        # Before the noise: init_noise_sigma depends on the timesteps (Euler, DPM++).
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor((noises, *shape[1:]), generator=generator, device=device, dtype=dtype)
            latents = latents.repeat(batch, 1, 1, 1) if same_noise else latents
        latents = latents.to(device, dtype) * self.scheduler.init_noise_sigma

        step_generator = _same_noise_step_generators(generator, n, batch) if same_noise else generator
        step_kwargs = self._step_kwargs(step_generator)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * len(branches)), t)
            model_input = torch.cat([model_input, *extra], dim=1)
            eps = self.unet(model_input, t, encoder_hidden_states=text,
                            cross_attention_kwargs={CONTROLS_KEY: controls}).sample
            eps = combine_guidance(dict(zip(branches, eps.chunk(len(branches)), strict=True)),
                                   guidance_scale_text, guidance_scale_garment)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample

        if output_type == "latent":
            images: Any = latents
        else:
            decoded = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def outfit_transfer(
        self, outfit: Outfit[Image.Image], swaps: Sequence[Mapping[str, Image.Image | None]],
        keypoints: Keypoints | None = None, **kwargs: Any,
    ) -> ImagePipelineOutput | tuple[Any]:
        """One image per swap (slot -> new garment, ``None`` empties the slot), same pose and noise."""
        outfits = [swap_garments(outfit, swap, self.slots) for swap in swaps]
        return self(garments=outfits, keypoints=keypoints, same_noise=True, **kwargs)

    def pose_transfer(
        self, outfit: Outfit[Image.Image], poses: Sequence[Keypoints], **kwargs: Any,
    ) -> ImagePipelineOutput | tuple[Any]:
        """One image per pose, same outfit and noise."""
        return self(garments=[outfit], keypoints=list(poses), same_noise=True, **kwargs)


def load_photoshoot_pipeline(name_or_path: str | os.PathLike[str], **kwargs: Any) -> PhotoshootPipeline:
    """Load a saved pipeline folder offline through :mod:`fashionshoot.weights`.

    A folder without the garment adapter fails with a :class:`~fashionshoot.errors.MissingWeightsError`
    naming it, rather than a generic diffusers loading error.
    """
    resolve_pretrained(name_or_path, required=("model_index.json",))
    resolve_pretrained(name_or_path, subfolder="garment_adapter", required=("config.json",))
    return load_pretrained(PhotoshootPipeline, name_or_path, **kwargs)
