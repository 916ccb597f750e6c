"""The weights resolver and the tiny-model testbed: every model round-trips through production loading."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from PIL import Image

from fashionshoot import weights
from fashionshoot.errors import MissingWeightsError


def test_missing_local_folder_names_the_model_and_where_to_put_it(tmp_path):
    with pytest.raises(MissingWeightsError, match="not found locally") as info:
        weights.resolve_pretrained(tmp_path / "nope")
    assert "nope" in str(info.value)


def test_missing_hub_id_fails_fast_offline_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve_pretrained("someorg/some-model", subfolder="unet")
    assert time.perf_counter() - start < 5, "an unreachable hub id must not hang"
    message = str(info.value)
    assert "someorg/some-model" in message and str(tmp_path / "someorg/some-model") in message
    assert weights.ALLOW_DOWNLOAD_ENV in message


def test_without_a_weights_root_the_message_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(weights.WEIGHTS_ROOT_ENV, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(MissingWeightsError) as info:
        weights.resolve_pretrained("someorg/some-model")
    assert "place a copy at $FASHIONSHOOT_WEIGHTS/someorg/some-model (" in str(info.value)
    assert "$$" not in str(info.value)


def test_hub_id_is_found_under_the_weights_root(tiny_models, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    shutil.copytree(tiny_models["sd"], tmp_path / "acme" / "tiny-sd")
    monkeypatch.setenv(weights.WEIGHTS_ROOT_ENV, str(tmp_path))
    unet = weights.load_pretrained(UNet2DConditionModel, "acme/tiny-sd", subfolder="unet")
    assert unet.config.in_channels == 4


def test_required_files_are_checked(tiny_models):
    with pytest.raises(MissingWeightsError, match="lacks model_index.json"):
        weights.resolve_pretrained(tiny_models["sd"] / "unet", required=("model_index.json",))


def test_missing_subfolder_is_an_error_not_a_random_init(tiny_models):
    from diffusers import UNet2DConditionModel

    with pytest.raises(MissingWeightsError, match="controlnet"):
        weights.load_pretrained(UNet2DConditionModel, tiny_models["sd"], subfolder="controlnet")


def test_missing_weight_file_is_an_error(tiny_models, tmp_path):
    from diffusers import UNet2DConditionModel

    broken = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(MissingWeightsError, match="UNet2DConditionModel"):
        weights.load_pretrained(UNet2DConditionModel, broken, subfolder="unet")


def _empty_vocabulary(tokenizer_dir):
    """Leave a tokenizer folder loadable but with a 2-token vocabulary, as a failed download can."""
    (tokenizer_dir / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n")
    (tokenizer_dir / "tokenizer.json").unlink(missing_ok=True)


def test_empty_tokenizer_is_caught(tiny_models, tmp_path):
    from transformers import CLIPTokenizer

    broken = tmp_path / "tok"
    shutil.copytree(tiny_models["sd"] / "tokenizer", broken)
    _empty_vocabulary(broken)
    with pytest.raises(MissingWeightsError, match="tokens"):
        weights.load_pretrained(CLIPTokenizer, broken)


def test_empty_tokenizer_of_a_pipeline_is_caught_naming_its_subfolder(tiny_models, tmp_path):
    from diffusers import StableDiffusionPipeline

    broken = tmp_path / "sd"
    shutil.copytree(tiny_models["sd"], broken)
    _empty_vocabulary(broken / "tokenizer")
    with pytest.raises(MissingWeightsError, match=r"tokenizer loaded from \S*sd[/\\]tokenizer has only 2 tokens"):
        weights.load_pretrained(StableDiffusionPipeline, broken)


def test_stable_diffusion_round_trip_generates(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipe = weights.load_pretrained(StableDiffusionPipeline, tiny_models["sd"])
    ids = pipe.tokenizer("a striped red dress").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 6
    image = pipe("a red dress", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_tokenizer_matches_open_clip(tiny_models):
    import open_clip
    from transformers import CLIPTokenizer

    ours = weights.load_pretrained(CLIPTokenizer, tiny_models["sd"], subfolder="tokenizer")
    reference = open_clip.get_tokenizer("ViT-B-32")
    for caption in ["A plain white t-shirt, scoop neck", "navy chevron midi skirt by Acme", "red  dress!!"]:
        expected = reference([caption])[0]
        expected = expected[: int((expected != 0).sum())].tolist()
        assert ours(caption).input_ids == expected


def test_inpainting_unet_has_nine_channels(tiny_models):
    from diffusers import UNet2DConditionModel

    unet = weights.load_pretrained(UNet2DConditionModel, tiny_models["sd_inpaint"], subfolder="unet")
    assert unet.config.in_channels == 9
    out = unet(torch.randn(1, 9, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert out.shape == (1, 4, 8, 8)


def test_siglip2_round_trip_embeds_images_and_text(tiny_models):
    from transformers import AutoImageProcessor, AutoTokenizer, Siglip2Model

    model = weights.load_pretrained(Siglip2Model, tiny_models["siglip2"])
    tokenizer = weights.load_pretrained(AutoTokenizer, tiny_models["siglip2"])
    processor = weights.load_pretrained(AutoImageProcessor, tiny_models["siglip2"])
    pixels = processor(images=[Image.new("RGB", (40, 30), "red")], return_tensors="pt")
    image_features = model.get_image_features(**pixels)
    text = tokenizer(["a red dress"], padding="max_length", max_length=64, return_tensors="pt")
    text_features = model.get_text_features(**text)
    assert getattr(image_features, "pooler_output", image_features).shape == (1, 32)
    assert getattr(text_features, "pooler_output", text_features).shape == (1, 32)


def test_clip_round_trip(tiny_models):
    from transformers import CLIPModel

    model = weights.load_pretrained(CLIPModel, tiny_models["clip"])
    assert model.config.projection_dim == 32


def test_open_clip_round_trip_restores_the_saved_weights(tiny_models):
    from safetensors.torch import load_file

    model, preprocess, tokenizer = weights.load_open_clip(tiny_models["open_clip"])
    saved = load_file(str(tiny_models["open_clip"] / "open_clip_model.safetensors"))
    assert torch.equal(model.state_dict()["visual.conv1.weight"], saved["visual.conv1.weight"])
    features = model.encode_image(preprocess(Image.new("RGB", (50, 40), "blue"))[None])
    assert features.shape == (1, 32)
    assert model.encode_text(tokenizer(["a dress"])).shape == (1, 32)


def test_open_clip_without_weights_is_an_error(tiny_models, tmp_path):
    broken = tmp_path / "oc"
    shutil.copytree(tiny_models["open_clip"], broken)
    (broken / "open_clip_model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="no weights"):
        weights.load_open_clip(broken)


def test_weight_file_lookup_and_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"weights-a")
    found = weights.resolve_weight_file("alexnet-owt-7be5be79.pth")
    assert found == checkpoints / "alexnet-owt-7be5be79.pth"
    first = weights.hash_weights(found)
    found.write_bytes(b"weights-b")
    assert weights.hash_weights(found) != first
    with pytest.raises(MissingWeightsError, match="vgg16"):
        weights.resolve_weight_file("vgg16-397923af.pth")
