"""Model specs, model loading (Model dir, timm + weights file, random baseline) and feature extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from phase_run import random_vit
from safetensors.torch import save_file

from gramline.errors import InputError
from gramline.eval.features import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    extract_features,
    forward_tokens,
    input_size_for,
    load_model,
    parse_model_spec,
    preprocess,
    torch_threads,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_parse_model_specs() -> None:
    assert parse_model_spec("a", "/models/x") == ModelSpec("a", "dir", "/models/x")
    assert parse_model_spec("b", "timm:vit_small_patch16_dinov3") == ModelSpec("b", "timm", "vit_small_patch16_dinov3")
    assert parse_model_spec("c", "timm:vit_x@/w/f.safetensors") == ModelSpec("c", "timm", "vit_x",
                                                                            Path("/w/f.safetensors"))
    assert parse_model_spec("d", "random:tiny") == ModelSpec("d", "random", "tiny")
    for name, value, message in (("e", "random:huge9", "huge9"), ("f g", "random:tiny", "invalid name"),
                                 ("h", "timm:", "names no timm model")):
        with pytest.raises(InputError, match=message):
            parse_model_spec(name, value)


def test_preprocess_normalises_and_resizes() -> None:
    white = torch.full((1, 3, 16, 16), 255, dtype=torch.uint8)
    x = preprocess(white, 32)
    assert x.shape == (1, 3, 32, 32)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    assert x[0, :, 5, 7].tolist() == pytest.approx(expected, abs=1e-5)


def test_timm_spec_with_a_local_weights_file(tmp_path: Path) -> None:
    torch.manual_seed(5)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, global_pool="token")
    weights = tmp_path / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    model = load_model(parse_model_spec("t", f"timm:vit_tiny_patch16_224@{weights}"), random_img_size=64)
    for key, value in source.state_dict().items():
        assert torch.equal(model.module.state_dict()[key], value), key
    assert (model.native_size, model.patch_size, model.embed_dim) == (224, 16, 192)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    feats = extract_features(model, images, input_size_for(model, None), keep_patches=True)
    assert feats.cls.shape == (2, 192) and feats.patches is not None and feats.patches.shape == (2, 14, 14, 192)
    assert torch.allclose(feats.mean_patch, feats.patches.mean(dim=(1, 2)))
    with pytest.raises(InputError, match="img_size"):  # a fixed-size timm ViT cannot take another size
        input_size_for(model, 64)


def test_random_baseline_is_seeded_and_takes_any_multiple_of_its_patch() -> None:
    a = load_model(parse_model_spec("r", "random:tiny"), random_img_size=64, seed=0)
    b = load_model(parse_model_spec("r", "random:tiny"), random_img_size=64, seed=0)
    c = load_model(parse_model_spec("r", "random:tiny"), random_img_size=64, seed=1)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(a.module.state_dict()[key], b.module.state_dict()[key])
    assert not torch.equal(a.module.state_dict()[key], c.module.state_dict()[key])
    assert input_size_for(a, None) == 64 and input_size_for(a, 30) == 32  # rounded to the 8px patch
    cls, patches = forward_tokens(a.module, preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 32))
    assert cls.shape == (1, 96) and patches.shape == (1, 4, 4, 96)


def test_eval_data_carries_the_captions(small_dataset: Path) -> None:
    from gramline.data.reader import iter_samples
    from gramline.eval.features import load_eval_data

    data = load_eval_data(small_dataset)
    expected = [s["caption"] for s in iter_samples(small_dataset, split="eval", decode=False)]
    assert data.captions == expected and len(data.captions) == data.n
    assert all(isinstance(c, str) and c for c in data.captions)
    assert load_eval_data(small_dataset, max_images=3).captions == expected[:3]


def _public_tiny(seed: int) -> torch.nn.Module:
    """A tiny DINOv3 ViT standing in for public weights (every weight away from its init)."""
    from gramline.models.archs import ARCHS

    arch = ARCHS["tiny"]
    return random_vit(arch.timm_name, arch.timm_kwargs(64), seed)


def test_checkpoint_file_and_start_specs_load_the_starting_weights(tmp_path: Path) -> None:
    """A FILE spec (official DINOv3 checkpoint) and a --start-model timm:<name>@<file> load through
    the --init-from resolver into the same plain timm backbone; a --model timm:<name> stays timm's."""
    from gramline.eval.features import starting_model_spec
    from gramline.models.archs import ARCHS
    from gramline.models.formats import write_official_checkpoint

    source = _public_tiny(seed=7)
    checkpoint = tmp_path / "teacher_checkpoint.pth"
    write_official_checkpoint(checkpoint, source.state_dict(), "tiny")
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    timm_file = f"timm:{ARCHS['tiny'].timm_name}@{weights}"

    from_file = parse_model_spec("ckpt", str(checkpoint))
    assert from_file.kind == "weights" and "checkpoint" in from_file.describe()
    start = starting_model_spec("start", timm_file)
    assert start.kind == "weights"
    assert parse_model_spec("t", timm_file).kind == "timm"  # --model keeps timm's own loader
    assert starting_model_spec("start", str(tmp_path)).kind == "dir"  # a Model directory stays one
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = forward_tokens(source, preprocess(images, 64))
    for spec in (from_file, start):
        model = load_model(spec, random_img_size=64)
        for key, value in source.state_dict().items():
            assert torch.equal(model.module.state_dict()[key], value), (spec, key)
        assert (model.patch_size, model.embed_dim, model.native_size) == (8, 96, 64)
        cls, patches = forward_tokens(model.module, preprocess(images, 64))
        assert torch.equal(cls, expected[0]) and torch.equal(patches, expected[1])
    with pytest.raises(InputError, match="names no timm model"):
        starting_model_spec("start", "timm:@x")


def test_a_timm_name_without_a_file_means_its_pretrained_weights(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """Offline with an empty cache, `timm:<name>` is refused (exit 2) rather than silently benchmarked
    as a random init."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(InputError, match="pretrained weights"):
        load_model(parse_model_spec("pub", "timm:vit_small_patch16_dinov3"), random_img_size=64)
