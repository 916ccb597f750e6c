"""Garment conditioning: attention processors, the garment adapter, the reference net, a training step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fashionshoot import testing
from fashionshoot.errors import ConfigError
from fashionshoot.models.attention import CONTROLS_KEY
from fashionshoot.models.denoiser import PhotoshootDenoiser
from fashionshoot.models.garment_adapter import (
    TOKEN_MULTIPLE,
    GarmentAdapter,
    GarmentConditioning,
    install_garment_attention,
)
from fashionshoot.models.garment_encoder import (
    AttentionPool,
    GarmentProjector,
    encode_garment_pixels,
    scatter_slots,
)
from fashionshoot.models.pose import POSE_CHANNELS, expand_conv_in
from fashionshoot.models.reference_net import write_reference
from fashionshoot.weights import load_pretrained

SLOTS, TOKENS, DIM = 6, 17, 32


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def unet():
    torch.manual_seed(0)
    return testing.tiny_unet()


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True, False, True, False, False, False], [False, False, False, False, True, True]])
    return {
        "latents": torch.randn(2, 4, 16, 16, generator=g),
        "ehs": torch.randn(2, 77, 32, generator=g),
        "mask": mask,
        "features": torch.randn(2, SLOTS, TOKENS, DIM, generator=g) * mask[..., None, None],
        "garment_latents": torch.randn(2, SLOTS, 4, 16, 16, generator=g),
    }


def _run(unet, inputs, controls=None):
    kwargs = {CONTROLS_KEY: controls} if controls is not None else None
    return unet(inputs["latents"], 10, inputs["ehs"], cross_attention_kwargs=kwargs).sample


def _randomize(adapter):
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if name.startswith(("to_v.", "reference_slot_embedding.")):
                param.normal_(std=0.5)
    return adapter


def _bank(unet, inputs, latents=None, mask=None):
    mask = inputs["mask"] if mask is None else mask
    latents = inputs["garment_latents"] if latents is None else latents
    return write_reference(unet, latents, mask, inputs["ehs"][:1])


def test_installed_processors_without_controls_match_diffusers_attention(unet, inputs):
    base = _run(unet, inputs)
    install_garment_attention(unet)
    assert torch.equal(_run(unet, inputs), base)
    assert not any("processor" in k for k in unet.state_dict())  # processors hold no weights


def test_fresh_adapter_leaves_the_unet_unchanged_and_training_it_changes_it(unet, inputs):
    base = _run(unet, inputs)
    install_garment_attention(unet)
    adapter = GarmentAdapter.from_unet(unet, image_embed_dim=DIM)
    assert torch.equal(_run(unet, inputs, adapter(inputs["mask"], inputs["features"])), base)
    _randomize(adapter)
    assert not torch.allclose(_run(unet, inputs, adapter(inputs["mask"], inputs["features"])), base, atol=1e-4)


def test_empty_slots_are_masked_out_not_attended(unet, inputs):
    install_garment_attention(unet)
    adapter = _randomize(GarmentAdapter.from_unet(unet, image_embed_dim=DIM))
    out = _run(unet, inputs, adapter(inputs["mask"], inputs["features"]))
    garbage = inputs["features"] + 100.0 * (~inputs["mask"])[..., None, None]
    assert torch.allclose(_run(unet, inputs, adapter(inputs["mask"], garbage)), out, atol=1e-6)
    # A sample with no garment at all gets no garment term: exactly the base UNet.
    none = torch.zeros_like(inputs["mask"])
    assert torch.allclose(_run(unet, inputs, adapter(none, inputs["features"])), _run(unet, inputs), atol=1e-6)
    # In a batch where only some samples have a garment, each sample gets what it would get alone.
    mixed = inputs["mask"].clone()
    mixed[1] = False
    out_mixed = _run(unet, inputs, adapter(mixed, inputs["features"]))
    assert torch.allclose(out_mixed[0], out[0], atol=1e-6)
    assert torch.allclose(out_mixed[1], _run(unet, inputs)[1], atol=1e-6)
    assert not torch.allclose(out[1], _run(unet, inputs)[1], atol=1e-4)
    # Garments are packed to the most any sample has: a fuller outfit beside it changes nothing either.
    fuller = inputs["mask"].clone()
    fuller[1, :3] = True
    assert torch.allclose(_run(unet, inputs, adapter(fuller, inputs["features"]))[0], out[0], atol=1e-6)


def test_token_padding_and_guidance_branches_change_nothing(unet, inputs):
    """Garment tokens are padded with invalid ones (fast CPU attention) and scaled per sample through
    the values; neither changes the garment term, and a branch without garments is the base UNet."""
    install_garment_attention(unet)
    adapter = _randomize(GarmentAdapter.from_unet(unet, image_embed_dim=DIM))
    controls = adapter(inputs["mask"], inputs["features"])
    cond = controls["garment"]
    real = 2 * adapter.config.num_tokens  # packed: two garments per sample
    assert cond.valid.shape[1] % TOKEN_MULTIPLE == 0 and cond.valid.shape[1] > real
    assert not cond.valid[:, real:].any()
    unpadded = GarmentConditioning({k: v[:, :real] for k, v in cond.keys.items()},
                                   {k: v[:, :real] for k, v in cond.values.items()}, cond.valid[:, :real])
    out = _run(unet, inputs, controls)
    assert torch.allclose(_run(unet, inputs, {"garment": unpadded}), out, atol=1e-6)
    stacked = {"latents": inputs["latents"].repeat(2, 1, 1, 1), "ehs": inputs["ehs"].repeat(2, 1, 1)}
    branches = _run(unet, stacked, {"garment": cond.for_branches([True, False])})
    assert torch.allclose(branches[:2], out, atol=1e-6)
    assert torch.allclose(branches[2:], _run(unet, inputs), atol=1e-6)


def test_garment_controls_can_be_rebuilt_as_fsdp_rebuilds_block_inputs(unet, inputs):
    """FSDP2's mixed precision rebuilds every dataclass in a wrapped block's inputs with
    ``dataclasses.replace`` to cast its tensors; the rebuilt conditioning gives the same garment term."""
    install_garment_attention(unet)
    adapter = _randomize(GarmentAdapter.from_unet(unet, image_embed_dim=DIM))
    mask = inputs["mask"].clone()
    mask[0] = False  # a sample without garments: its mask and scale are derived, not passed
    cond = adapter(mask, inputs["features"])["garment"]
    rebuilt = dataclasses.replace(cond, keys={k: v.clone() for k, v in cond.keys.items()})
    assert torch.equal(rebuilt.mask, cond.mask) and torch.equal(rebuilt.row_scale, cond.row_scale)
    assert torch.equal(_run(unet, inputs, {"garment": rebuilt}), _run(unet, inputs, {"garment": cond}))


def test_slot_identity_matters(unet, inputs):
    install_garment_attention(unet)
    adapter = _randomize(GarmentAdapter.from_unet(unet, image_embed_dim=DIM))
    out = _run(unet, inputs, adapter(inputs["mask"], inputs["features"]))
    moved_features = inputs["features"][:, [1, 0, 2, 3, 4, 5]]
    moved_mask = inputs["mask"][:, [1, 0, 2, 3, 4, 5]]
    assert not torch.allclose(_run(unet, inputs, adapter(moved_mask, moved_features)), out, atol=1e-4)


@pytest.mark.parametrize("conditioning", ["cross_attention", "reference", "both"])
def test_adapter_round_trips_through_save_and_load(unet, inputs, conditioning, tmp_path):
    install_garment_attention(unet)
    adapter = _randomize(GarmentAdapter.from_unet(unet, image_embed_dim=DIM, conditioning=conditioning))
    bank = _bank(unet, inputs) if adapter.uses_reference else None
    out = _run(unet, inputs, adapter(inputs["mask"], inputs["features"], bank))
    adapter.save_pretrained(tmp_path)
    loaded = load_pretrained(GarmentAdapter, tmp_path)
    assert loaded.config.conditioning == conditioning
    assert torch.equal(_run(unet, inputs, loaded(inputs["mask"], inputs["features"], bank)), out)


def test_projector_packs_each_samples_garments_to_the_front_in_slot_order():
    projector = GarmentProjector(DIM, 16, num_tokens=3, num_heads=2, num_slots=SLOTS)
    features = torch.randn(3, SLOTS, TOKENS, DIM)
    mask = torch.tensor([[False, False, True, False, True, False], [False] * SLOTS, [True] + [False] * 5])
    tokens, valid = projector(features, mask)
    assert tokens.shape == (3, 2 * 3, 16)  # the most garments in a sample (2) x 3 tokens
    assert valid.tolist() == [[True] * 6, [False] * 6, [True] * 3 + [False] * 3]

    torch_pool = torch.nn.MultiheadAttention(16, 2, batch_first=True)  # what the projector's pool computes
    torch_pool.load_state_dict(projector.pool.state_dict())

    def pooled(sample: int, slot: int) -> torch.Tensor:
        x = projector.proj_in(features[sample, slot])[None]
        out = torch_pool(projector.queries[None], x, x, need_weights=False)[0][0]
        return projector.norm(out) + projector.slot_embedding.weight[slot]

    assert torch.allclose(tokens[0, :3], pooled(0, 2), atol=1e-5)
    assert torch.allclose(tokens[0, 3:], pooled(0, 4), atol=1e-5)
    assert torch.allclose(tokens[2, :3], pooled(2, 0), atol=1e-5)


def test_attention_pool_is_torch_multihead_attention_initialised_and_computed_faster():
    torch.manual_seed(3)
    ours = AttentionPool(16, 2)
    torch.manual_seed(3)
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    queries, tokens = torch.randn(5, 3, 16, requires_grad=True), torch.randn(5, 7, 16, requires_grad=True)
    got, want = ours(queries, tokens), theirs(queries, tokens, tokens, need_weights=False)[0]
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad(out.square().sum(), (queries, tokens)) for out in (got, want)]
    for g, w in zip(*grads, strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(ConfigError, match="width 16 is not divisible by 3 heads"):
        AttentionPool(16, 3)


def test_projector_round_trips(tmp_path):
    projector = GarmentProjector(DIM, 16, num_tokens=3, num_heads=2, num_slots=SLOTS)
    features, mask = torch.randn(2, SLOTS, TOKENS, DIM), torch.ones(2, SLOTS, dtype=torch.bool)
    tokens, _ = projector(features, mask)
    assert tokens.shape == (2, SLOTS * 3, 16)
    projector.save_pretrained(tmp_path)
    assert torch.equal(load_pretrained(GarmentProjector, tmp_path)(features, mask)[0], tokens)


def test_reference_mode_follows_the_reference_and_ignores_empty_slots(unet, inputs):
    install_garment_attention(unet)
    adapter = GarmentAdapter.from_unet(unet, image_embed_dim=DIM, conditioning="reference")
    base = _run(unet, inputs)
    out = _run(unet, inputs, adapter(inputs["mask"], reference=_bank(unet, inputs)))
    other = _run(unet, inputs, adapter(inputs["mask"], reference=_bank(unet, inputs, inputs["garment_latents"].flip(-1))))
    assert not torch.allclose(out, base, atol=1e-4)
    assert not torch.allclose(out, other, atol=1e-4)
    # Latents in empty slots are never read; an all-empty bank is the base UNet.
    noisy = inputs["garment_latents"] + 50.0 * (~inputs["mask"])[:, :, None, None, None]
    assert torch.allclose(_run(unet, inputs, adapter(inputs["mask"], reference=_bank(unet, inputs, noisy))), out,
                          atol=1e-6)
    empty = torch.zeros_like(inputs["mask"])
    assert torch.allclose(_run(unet, inputs, adapter(empty, reference=_bank(unet, inputs, mask=empty))), base,
                          atol=1e-5)


def test_training_step_sends_gradients_to_adapter_pose_channels_and_unet(unet, inputs):
    """Two SGD steps from the fresh (zero-initialised) state: after the first, every adapter weight learns."""
    expand_conv_in(unet, POSE_CHANNELS)
    adapter = GarmentAdapter.from_unet(unet, image_embed_dim=DIM, conditioning="both")
    denoiser = PhotoshootDenoiser(unet, adapter)
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.1)
    pose = torch.rand(2, POSE_CHANNELS, 16, 16)
    noise = torch.randn_like(inputs["latents"])
    for _ in range(2):
        optimizer.zero_grad()
        pred = denoiser(inputs["latents"], torch.tensor([10, 500]), inputs["ehs"], inputs["mask"],
                        image_features=inputs["features"], garment_latents=inputs["garment_latents"],
                        reference_context=inputs["ehs"][:1], pose=pose)
        F.mse_loss(pred, noise).backward()
        assert unet.conv_in.weight.grad[:, 4:].abs().sum() > 0
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapter.named_parameters()
                   if n.startswith(("to_v.", "reference_slot_embedding.")))
        optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    self_attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert self_attn.to_k.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_garment_features_from_clip_or_siglip_vision_towers(tower):
    from transformers import CLIPVisionModelWithProjection, SiglipVisionConfig, SiglipVisionModel

    if tower == "clip":
        encoder = CLIPVisionModelWithProjection(testing.tiny_clip_vision_config(image_size=32))
    else:
        encoder = SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=DIM,
                                                       intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4))
    mask = torch.tensor([[True, False, False, False, False, True]])
    features = scatter_slots(encode_garment_pixels(encoder, torch.randn(2, 3, 32, 32)), mask)
    assert features.shape[:2] == (1, SLOTS) and features.shape[-1] == DIM
    assert features[0, 1].abs().sum() == 0 and features[0, 5].abs().sum() > 0
    controls = GarmentAdapter(image_embed_dim=DIM, layers=["x"], layer_dims=[8])(mask, features)
    assert controls["garment"].keys["x"].shape == (1, 16, 8)  # 2 garments x 4 tokens, padded to TOKEN_MULTIPLE
