"""Whole trained weights on the main process, also when DeepSpeed ZeRO-3 or FSDP2 shards them across ranks.

DDP and ZeRO-1/2 keep whole parameters on every rank, so the training pipeline itself is validated and
saved. ZeRO-3 and FSDP2 keep 1/N of every parameter of the wrapped module on each rank and gather them
only around the forward and backward, so validation and saving go through a plain copy instead:
:meth:`WholeWeights.pipeline` gathers the shards (a collective: every rank calls it) and the main
process loads them into a copy of the UNet and garment adapter, built once, which shares the frozen
VAE and encoders (they never enter the engine, so they stay whole) and waits on the CPU between uses.

Models are always built whole (:func:`whole_models`) and sharded by ``accelerator.prepare``. Under ZeRO-3
accelerate otherwise lets transformers build models inside DeepSpeed's collective ``zero.Init``: a model
built by the main process alone (the base pipeline, the validation encoder) then waits for ranks that
never come, and frozen encoders, which never enter the engine, would be left as unusable shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fashionshoot.models.denoiser import PhotoshootDenoiser
from fashionshoot.pipelines.photoshoot import PhotoshootPipeline


def shards_parameters(accelerator: Any) -> bool:
    """Whether this run's parameters are partitioned across ranks (DeepSpeed ZeRO stage 3, or FSDP)."""
    if str(accelerator.distributed_type.value).upper() == "FSDP":
        return True
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) >= 3


def local_weights(params: list[torch.nn.Parameter], sharded: bool) -> list[torch.nn.Parameter]:
    """What holds this rank's values of ``params``, for EMA to average and overwrite.

    Without sharding, the parameters themselves. Sharded, a Parameter sharing the storage of each one's
    local slice: under ZeRO-3 the parameter is an empty placeholder and the slice lives in ``ds_tensor``;
    under FSDP2 it is a DTensor and the slice is its local tensor. EMA then averages the slice, and copying
    averaged values into it before a gather gathers the averaged weights. Call after ``prepare``: ZeRO-3's
    optimizer moves the slices into its flat buffers while it initialises, FSDP2 replaces the parameters.
    """
    if not sharded:
        return params
    return [torch.nn.Parameter(param.ds_tensor if hasattr(param, "ds_tensor") else param.to_local(),
                               requires_grad=param.requires_grad) for param in params]


@contextlib.contextmanager
def whole_models(accelerator: Any) -> Iterator[None]:
    """Build models whole: outside DeepSpeed's ``zero.Init`` (a no-op without DeepSpeed).

    transformers builds under ``zero.Init`` while a ZeRO-3 config is registered with it, which accelerate's
    DeepSpeed plugin does (``plugin.dschf``); the registration is lifted for the duration. (accelerate's own
    ``zero3_init_context_manager(enable=False)`` re-registers the same config in accelerate 1.15, so the
    text encoder still came out partitioned.)"""
    registered = getattr(accelerator.state.deepspeed_plugin, "dschf", None)
    if registered is None:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(registered)


def configure_zero3(deepspeed_config: dict[str, Any]) -> None:
    """Let ZeRO-3 consolidate the denoiser's state dict (``accelerator.get_state_dict``), which DeepSpeed
    allows only with ``stage3_gather_16bit_weights_on_model_save``; the weights keep their training dtype."""
    deepspeed_config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


class WholeWeights:
    """The trained pipeline with whole weights, on the main process.

    ``pipe`` and ``denoiser`` are the training pipeline and the prepared (wrapped) denoiser made of its
    UNet and garment adapter; ``sharded`` is :func:`shards_parameters`; ``add_layers`` adds to a fresh UNet
    what the run added to the trained one (LoRA layers), so the gathered state dict fits it.
    """

    def __init__(self, accelerator: Any, pipe: PhotoshootPipeline, denoiser: Any, sharded: bool,
                 add_layers: Callable[[Any], None] | None = None) -> None:
        self.accelerator, self.pipe, self.denoiser, self.add_layers = accelerator, pipe, denoiser, add_layers
        self.sharded = sharded
        self._copy: PhotoshootPipeline | None = None
        self._copy_denoiser: PhotoshootDenoiser | None = None

    @property
    def reads_this_rank(self) -> bool:
        """Whether :meth:`pipeline` reads this rank's weights (every rank's when sharded, else the main's):
        only then must EMA weights be swapped in here first."""
        return self.sharded or self.accelerator.is_main_process

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[PhotoshootPipeline | None]:
        """The pipeline to validate and save on the main process (``None`` elsewhere). Enter on every rank:
        sharded, it gathers the current weights into the copy; otherwise it is the training pipeline.

        The copy's UNet and adapter are on the device only inside the context and wait on the CPU in
        between, so training steps carry no second device copy of the trained weights on the main process
        (an SD-1.5 UNet is 3.4 GB in fp32); the gathered state dict arrives on the CPU anyway."""
        if not self.sharded:
            yield self.pipe if self.accelerator.is_main_process else None
            return
        state = self.accelerator.get_state_dict(self.denoiser)  # collective; the whole state on rank 0 only
        if not self.accelerator.is_main_process:
            yield None
            return
        if self._copy is None:
            self._build_copy()
        self._copy_denoiser.load_state_dict(state)
        del state
        self._copy_denoiser.to(self.accelerator.device)
        try:
            yield self._copy
        finally:
            self._copy_denoiser.to("cpu")

    def _build_copy(self) -> None:
        """A pipeline of the training pipeline's frozen parts and a fresh UNet + adapter, left on the CPU."""
        unet, adapter = self.pipe.unet, self.pipe.garment_adapter
        with whole_models(self.accelerator):
            fresh_unet = type(unet).from_config(unet.config).eval()
            fresh_adapter = type(adapter).from_config(adapter.config).eval()
        if self.add_layers is not None:
            self.add_layers(fresh_unet)
        self._copy = PhotoshootPipeline(**{**self.pipe.components, "unet": fresh_unet, "garment_adapter": fresh_adapter})
        self._copy_denoiser = PhotoshootDenoiser(fresh_unet, fresh_adapter)  # the state dict's key layout
