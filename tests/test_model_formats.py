"""Backbone weights in other layouts: transformers' DINOv3ViTModel and the official DINOv3 teacher checkpoint
(gramline.models.formats and `gramline export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from phase_run import random_vit
from safetensors.torch import load_file

from gramline.cli import main as gramline_main
from gramline.errors import BAD_INPUT_EXIT_CODE, InputError
from gramline.models.archs import ARCHS
from gramline.models.formats import (
    read_official_checkpoint,
    split_official,
    write_official_checkpoint,
    write_transformers_export,
)
from gramline.models.heads import DinoHead

IMG = 32
TINY = ARCHS["tiny"]
# small builds of the public timm classes: one without qkv bias, one with the SwiGLU MLP
SMALL = {"embed_dim": 64, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": IMG, "num_classes": 0}
VARIANTS = {
    "tiny": (TINY.timm_name, TINY.timm_kwargs(IMG)),
    "no_qkv_bias": ("vit_small_patch16_dinov3", SMALL),
    "swiglu": ("vit_small_plus_patch16_dinov3_qkvb", SMALL),
}


class NotWeights:
    """An arbitrary object: a checkpoint holding one is not loadable with weights_only=True."""


def random_heads(dim: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    heads = {"dino_head": DinoHead(dim, 32, 16, 40), "ibot_head": DinoHead(dim, 24, 16, 48)}
    with torch.no_grad():
        for head in heads.values():
            for param in head.parameters():
                param.add_(torch.randn_like(param))
    return {f"{name}.{key}": value for name, head in heads.items() for key, value in head.state_dict().items()}


def features(vit: Any, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vit.forward_features(x)


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        gramline_main(argv)
    return int(info.value.code or 0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny gramline Model artifact (random backbone and heads) as the training stages write it."""
    from gramline.models.backbone import Backbone
    from gramline.models.config import BackboneConfig
    from gramline.train.export import write_model_artifact

    config = BackboneConfig(arch="tiny", img_size=IMG)
    torch.manual_seed(3)
    backbone = Backbone(config)
    backbone.vit.load_state_dict(random_vit(TINY.timm_name, TINY.timm_kwargs(IMG), seed=3).state_dict())
    with torch.no_grad():
        backbone.mask_token.normal_()
    heads = {"dino_head": DinoHead(backbone.embed_dim, 32, 16, 40), "ibot_head": DinoHead(backbone.embed_dim, 32, 16, 40)}
    path = tmp_path_factory.mktemp("formats") / "model"
    write_model_artifact(path, backbone, heads, config, config, stage="test", step=0, metrics={})
    return path


# --------------------------------------------------------------------------- transformers


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_export_matches_timm(tmp_path: Path, variant: str) -> None:
    transformers = pytest.importorskip("transformers")
    name, kwargs = VARIANTS[variant]
    vit = random_vit(name, kwargs, seed=1)
    mask_token = torch.randn(1, vit.embed_dim)
    write_transformers_export(tmp_path / "hf", vit, mask_token=mask_token)

    model, info = transformers.AutoModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == "DINOv3ViTModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    torch.manual_seed(2)
    for shape in [(2, 3, IMG, IMG), (1, 3, IMG, IMG + 16)]:  # the export size and another grid
        x = torch.randn(shape)
        with torch.no_grad():
            ours = model(pixel_values=x).last_hidden_state
        torch.testing.assert_close(ours, features(vit, x), rtol=0, atol=1e-5)
    assert torch.equal(model.embeddings.mask_token.reshape(1, -1), mask_token)


def test_transformers_export_has_an_image_processor(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    name, kwargs = VARIANTS["tiny"]
    write_transformers_export(tmp_path / "hf", random_vit(name, kwargs, seed=0), image_size=48)
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    pixels = processor(images=[torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)], return_tensors="pt")
    assert tuple(pixels["pixel_values"].shape) == (1, 3, 48, 48)


# --------------------------------------------------------------------------- official


def test_official_round_trip_is_bit_exact(tmp_path: Path) -> None:
    name, kwargs = VARIANTS["tiny"]
    vit = random_vit(name, kwargs, seed=4)
    heads = random_heads(TINY.embed_dim, seed=4)
    mask_token = torch.randn(1, TINY.embed_dim)
    path = tmp_path / "teacher_checkpoint.pth"
    write_official_checkpoint(path, vit.state_dict(), "tiny", mask_token=mask_token, heads=heads)

    fresh = random_vit(name, kwargs, seed=5)
    parts = split_official(read_official_checkpoint(path), fresh, str(path), strict=True)
    original = vit.state_dict()
    assert parts.backbone.keys() == original.keys()
    assert all(torch.equal(parts.backbone[key], original[key]) for key in original)
    assert parts.heads is not None and parts.heads.keys() == heads.keys()
    assert all(torch.equal(parts.heads[key], heads[key]) for key in heads)
    assert parts.mask_token is not None and torch.equal(parts.mask_token, mask_token)


def test_official_file_has_the_official_buffers_and_loads_through_timm(tmp_path: Path) -> None:
    """The backbone part, stripped of `backbone.` (what the official eval loader does), loads through
    timm's own pretrained-file path and reader of the official layout, with the same outputs."""
    name, kwargs = VARIANTS["tiny"]
    vit = random_vit(name, kwargs, seed=6)
    path = tmp_path / "teacher_checkpoint.pth"
    write_official_checkpoint(path, vit.state_dict(), "tiny")
    teacher = torch.load(path, map_location="cpu", weights_only=True)["teacher"]
    assert set(teacher) == {key for key in teacher if key.startswith("backbone.")}  # no heads given
    backbone = {key.removeprefix("backbone."): value for key, value in teacher.items()}

    # buffers the official ViT keeps in its state dict: RoPE periods (timm computes the same schedule),
    # the iBOT mask token, and a qkv bias mask that zeroes the key part only
    torch.testing.assert_close(backbone["rope_embed.periods"], vit.rope.periods, rtol=0, atol=0)
    assert torch.equal(backbone["mask_token"], torch.zeros(1, TINY.embed_dim))
    for i in range(TINY.depth):
        bias, mask = backbone[f"blocks.{i}.attn.qkv.bias"], backbone[f"blocks.{i}.attn.qkv.bias_mask"]
        q, k, v = (bias * mask).chunk(3)
        assert torch.equal(q, vit.blocks[i].attn.q_bias) and torch.equal(v, vit.blocks[i].attn.v_bias)
        assert not k.any() and int(mask.sum()) == 2 * TINY.embed_dim
    assert "storage_tokens" in backbone and "reg_token" not in backbone

    plain = tmp_path / "backbone_only.pth"
    torch.save(backbone, plain)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(plain)}, **kwargs).eval()
    x = torch.randn(2, 3, IMG, IMG)
    assert torch.equal(features(loaded, x), features(vit, x))


def test_hand_written_official_state_loads_with_heads(tmp_path: Path) -> None:
    """A state dict built here from the official key names (dinov3/models/vision_transformer.py,
    dinov3/layers/dino_head.py), not by the writer."""
    dim, depth, patch, hidden = TINY.embed_dim, TINY.depth, TINY.patch_size, 4 * TINY.embed_dim
    gen = torch.Generator().manual_seed(7)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    state = {"backbone.cls_token": rand(1, 1, dim), "backbone.storage_tokens": rand(1, 4, dim),
             "backbone.mask_token": rand(1, dim), "backbone.patch_embed.proj.weight": rand(dim, 3, patch, patch),
             "backbone.patch_embed.proj.bias": rand(dim), "backbone.rope_embed.periods": rand(dim // TINY.num_heads // 4),
             "backbone.norm.weight": rand(dim), "backbone.norm.bias": rand(dim)}
    for i in range(depth):
        block = f"backbone.blocks.{i}."
        state |= {block + "norm1.weight": rand(dim), block + "norm1.bias": rand(dim),
                  block + "attn.qkv.weight": rand(3 * dim, dim), block + "attn.qkv.bias": rand(3 * dim),
                  block + "attn.qkv.bias_mask": torch.cat([torch.ones(dim), torch.zeros(dim), torch.ones(dim)]),
                  block + "attn.proj.weight": rand(dim, dim), block + "attn.proj.bias": rand(dim),
                  block + "ls1.gamma": rand(dim), block + "norm2.weight": rand(dim), block + "norm2.bias": rand(dim),
                  block + "mlp.fc1.weight": rand(hidden, dim), block + "mlp.fc1.bias": rand(hidden),
                  block + "mlp.fc2.weight": rand(dim, hidden), block + "mlp.fc2.bias": rand(dim),
                  block + "ls2.gamma": rand(dim)}
    for head, prototypes in (("dino_head", 40), ("ibot_head", 48)):
        state |= {f"{head}.mlp.0.weight": rand(32, dim), f"{head}.mlp.0.bias": rand(32),
                  f"{head}.mlp.2.weight": rand(32, 32), f"{head}.mlp.2.bias": rand(32),
                  f"{head}.mlp.4.weight": rand(16, 32), f"{head}.mlp.4.bias": rand(16),
                  f"{head}.last_layer.weight": rand(prototypes, 16)}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": state}, path)

    vit = random_vit(*VARIANTS["tiny"], seed=8)
    parts = split_official(read_official_checkpoint(path), vit, str(path))
    vit.load_state_dict(parts.backbone, strict=True)
    assert torch.equal(vit.reg_token, state["backbone.storage_tokens"])
    last = vit.blocks[depth - 1]
    block = f"backbone.blocks.{depth - 1}."
    assert torch.equal(last.gamma_1, state[block + "ls1.gamma"]) and torch.equal(last.gamma_2, state[block + "ls2.gamma"])
    q, _, v = state[block + "attn.qkv.bias"].chunk(3)
    assert torch.equal(last.attn.q_bias, q) and torch.equal(last.attn.v_bias, v)
    assert parts.mask_token is not None and torch.equal(parts.mask_token, state["backbone.mask_token"])
    assert parts.heads is not None
    for head, prototypes in (("dino_head", 40), ("ibot_head", 48)):
        module = DinoHead(dim, 32, 16, prototypes)
        module.load_state_dict({k.removeprefix(f"{head}."): t for k, t in parts.heads.items() if k.startswith(head)},
                               strict=True)
        assert torch.equal(module.last_layer.weight, state[f"{head}.last_layer.weight"])

    # without one of the two heads, no heads are returned
    no_ibot = {key: value for key, value in state.items() if not key.startswith("ibot_head.")}
    assert split_official(no_ibot, vit, "state").heads is None


# --------------------------------------------------------------------------- bad inputs


def test_bad_official_checkpoints_are_input_errors(tmp_path: Path) -> None:
    arbitrary = tmp_path / "pickled.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1), "extra": NotWeights()}}, arbitrary)
    no_backbone = tmp_path / "heads_only.pth"
    torch.save({"teacher": {"dino_head.last_layer.weight": torch.zeros(2, 2)}}, no_backbone)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    for path, problem in [(arbitrary, "weights_only"), (no_backbone, "backbone"), (garbage, "weights_only"),
                          (tmp_path / "missing.pth", "does not exist"), (tmp_path, "not a file")]:
        with pytest.raises(InputError) as info:
            read_official_checkpoint(path, flag="--init-from")
        assert str(path) in str(info.value) and problem in str(info.value)
        assert "teacher_checkpoint.pth" in str(info.value)


def test_official_checkpoint_of_another_architecture_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "teacher_checkpoint.pth"
    write_official_checkpoint(path, random_vit(*VARIANTS["tiny"], seed=0).state_dict(), "tiny")
    state = read_official_checkpoint(path)
    micro = ARCHS["micro"]
    narrower = timm.create_model(micro.timm_name, **micro.timm_kwargs(IMG))
    coarser = timm.create_model(TINY.timm_name, **{**TINY.timm_kwargs(IMG), "patch_size": 16})
    no_bias = random_vit("vit_small_patch16_dinov3", TINY.timm_kwargs(IMG), 0)  # the tiny shapes, no qkv bias
    for model in (narrower, coarser, no_bias):
        with pytest.raises(InputError, match="teacher_checkpoint.pth.*does not fit"):
            split_official(state, model, str(path), strict=True)
        # without strict the caller's own fit check fails: nothing is resampled or silently dropped
        with pytest.raises(RuntimeError):
            model.load_state_dict(split_official(state, model, str(path)).backbone, strict=True)


def test_an_unmasked_key_bias_is_an_input_error(tmp_path: Path) -> None:
    """The official attention without mask_k_bias adds a key bias, which RoPE makes position dependent and
    timm's DINOv3 ViT cannot hold."""
    path = tmp_path / "teacher_checkpoint.pth"
    write_official_checkpoint(path, random_vit(*VARIANTS["tiny"], seed=0).state_dict(), "tiny")
    state = {key: value for key, value in read_official_checkpoint(path).items() if not key.endswith("bias_mask")}
    state["backbone.blocks.0.attn.qkv.bias"] = torch.ones_like(state["backbone.blocks.0.attn.qkv.bias"])
    with pytest.raises(InputError, match="blocks.0.attn.qkv.bias"):
        split_official(state, random_vit(*VARIANTS["tiny"], seed=0), str(path))


# --------------------------------------------------------------------------- gramline export


def test_cli_exports_a_model_to_transformers(tiny_model: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from gramline.models.io import load_backbone

    out = tmp_path / "hf"
    assert exit_code(["export", "--model", str(tiny_model), "--to", "transformers", "--out", str(out)]) == 0
    vit, _ = load_backbone(tiny_model)
    model = transformers.AutoModel.from_pretrained(out).eval()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).last_hidden_state, features(vit, x), rtol=0, atol=1e-5)
    mask_token = load_file(str(tiny_model / "heads.safetensors"))["mask_token"]
    assert torch.equal(model.embeddings.mask_token.reshape(mask_token.shape), mask_token)


def test_cli_exports_a_model_to_the_official_layout(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher_checkpoint.pth"
    assert exit_code(["export", "--model", str(tiny_model), "--to", "official", "--out", str(out)]) == 0
    saved_heads = load_file(str(tiny_model / "heads.safetensors"))
    saved_backbone = load_file(str(tiny_model / "backbone.safetensors"))
    parts = split_official(read_official_checkpoint(out), random_vit(*VARIANTS["tiny"], seed=9), str(out))
    assert parts.backbone.keys() == saved_backbone.keys()
    assert all(torch.equal(parts.backbone[key], saved_backbone[key]) for key in saved_backbone)
    assert parts.mask_token is not None and torch.equal(parts.mask_token, saved_heads.pop("mask_token"))
    assert parts.heads is not None and parts.heads.keys() == saved_heads.keys()
    assert all(torch.equal(parts.heads[key], saved_heads[key]) for key in saved_heads)


def test_cli_bad_inputs_exit_2_naming_the_path(tiny_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    no_backbone = tmp_path / "no_backbone"
    no_backbone.mkdir()
    for entry in tiny_model.iterdir():
        if entry.name != "backbone.safetensors":
            (no_backbone / entry.name).write_bytes(entry.read_bytes())
    cases = [
        (["--model", str(no_backbone), "--to", "official", "--out", str(tmp_path / "a.pth")], str(no_backbone)),
        (["--model", str(tmp_path / "absent"), "--to", "transformers", "--out", str(tmp_path / "b")],
         str(tmp_path / "absent")),
        (["--model", str(tiny_model), "--to", "official", "--out", str(tmp_path)], str(tmp_path)),
    ]
    for argv, named in cases:
        assert exit_code(["export", *argv]) == BAD_INPUT_EXIT_CODE
        err = capsys.readouterr().err
        assert "gramline export: error:" in err and named in err
    assert exit_code(["export", "--model", str(tiny_model), "--to", "onnx", "--out", "x"]) == BAD_INPUT_EXIT_CODE
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "b").exists()
