"""Backbone weights in the two layouts outside gramline: the official DINOv3 teacher checkpoint and
transformers' `DINOv3ViTModel` (DINOv3, Siméoni et al. 2025, https://arxiv.org/abs/2508.10104).

Official layout (github.com/facebookresearch/dinov3): `dinov3/train/train.py` (`do_test`) saves the EMA
teacher as `torch.save({"teacher": state}, "teacher_checkpoint.pth")`; `state` is the teacher's
`backbone.*` (`dinov3/models/vision_transformer.py`), `dino_head.*` and `ibot_head.*`
(`dinov3/layers/dino_head.py`). Reading maps the backbone to timm's key layout with timm's own
reader of that layout, `timm.models.eva.checkpoint_filter_fn`; writing is its inverse plus the
buffers the official model keeps in its state dict (`rope_embed.periods`, `attn.qkv.bias_mask`).

transformers layout: `DINOv3ViTModel` (`transformers/models/dinov3_vit/modeling_dinov3_vit.py`),
with the key names of the published hub checkpoints (`layer.N.*`, as written by
`convert_dinov3_vit_to_hf.py`); transformers >= 5 renames them on load.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models.eva import checkpoint_filter_fn
from torch import Tensor, nn

from gramline.errors import InputError
from gramline.io import atomic_path, plain_file_mode
from gramline.models.archs import ARCHS, Arch
from gramline.models.io import HEADS_FILE, load_backbone, read_weights, state_misfit

BACKBONE_PREFIX = "backbone."
HEAD_NAMES = ("dino_head", "ibot_head")
OFFICIAL_EXPECTED = ("an official DINOv3 checkpoint (teacher_checkpoint.pth) with backbone.* keys, "
                     "as torch.save({'teacher': state}) writes it")
# RoPE base period of every DINOv3 ViT (`pos_embed_rope_base` in `dinov3/hub/backbones.py` and the train configs)
ROPE_BASE = 100.0
# the official ViTs built without a qkv bias (`dinov3_vit7b16` in `dinov3/hub/backbones.py`: qkv_bias=False);
# every other official ViT has one, masked on its key part (mask_k_bias=True)
NO_QKV_BIAS = frozenset({"vit_7b_patch16_dinov3"})
TRANSFORMERS_WEIGHTS = "model.safetensors"


def _plain(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu").contiguous().clone()


# --------------------------------------------------------------------------- official: read


@dataclass
class OfficialParts:
    """An official checkpoint split into what gramline keeps: the backbone in timm key layout, the
    iBOT mask token [1, D] and the DINO/iBOT heads (keys as gramline's `DinoHead` state dicts)."""

    backbone: dict[str, Tensor]
    mask_token: Tensor | None
    heads: dict[str, Tensor] | None


def read_official_checkpoint(path: Path, flag: str = "--init-from") -> dict[str, Tensor]:
    """The flat tensor state of an official checkpoint: its `teacher` entry when present (else
    `model`, else the top level), loaded with `weights_only=True` (no arbitrary pickles). Errors name
    `flag` and the path (`flag` may already name the path)."""
    path = Path(path)
    where = flag if str(path) in flag else f"{flag} {path}"
    if not path.exists():
        raise InputError(where, "does not exist", OFFICIAL_EXPECTED)
    if not path.is_file():
        raise InputError(where, "is not a file", OFFICIAL_EXPECTED)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError,
            KeyError, IndexError, ImportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(where, f"cannot be loaded with torch.load(weights_only=True) ({reason})",
                         OFFICIAL_EXPECTED) from err
    state: Any = loaded
    for key in ("teacher", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise InputError(where, f"holds a {type(state).__name__}, not a state dict", OFFICIAL_EXPECTED)
    tensors = {key: value for key, value in state.items() if isinstance(key, str) and isinstance(value, Tensor)}
    if not any(key.startswith(BACKBONE_PREFIX) for key in tensors):
        raise InputError(where, "has no backbone.* tensors", OFFICIAL_EXPECTED)
    return tensors


def _split_qkv_bias(raw: dict[str, Tensor], vit: nn.Module, where: str) -> dict[str, Tensor]:
    """Pop every `attn.qkv.bias` (and its `bias_mask`) from `raw`; return timm's `q_bias`/`v_bias` for
    them, as `checkpoint_filter_fn` splits them, where the model has them or they are non-zero (a
    non-zero bias for a model without one then fails the fit instead of being dropped). The key part
    must be zero or masked off: no timm DINOv3 ViT has a key bias."""
    has_bias = any(name.endswith("attn.q_bias") for name, _ in vit.named_parameters())
    out: dict[str, Tensor] = {}
    for key in [k for k in raw if k.endswith("attn.qkv.bias")]:
        bias, mask = raw.pop(key), raw.pop(key + "_mask", None)  # `bias_mask`: 1 on q and v, 0 on k
        q, k, v = bias.chunk(3, dim=-1)
        masked_k = k.float() * mask.chunk(3, dim=-1)[1].float() if mask is not None else k.float()
        if bool((masked_k != 0).any()):
            raise InputError(where, f"{BACKBONE_PREFIX}{key} has a non-zero key bias that no bias_mask removes",
                             "a checkpoint of an official ViT built with mask_k_bias=True (timm's has no key bias)")
        if has_bias or bool((q != 0).any() or (v != 0).any()):
            block = key[: -len("qkv.bias")]
            out[block + "q_bias"], out[block + "v_bias"] = _plain(q), _plain(v)
    return out


def split_official(state: Mapping[str, Tensor], vit: nn.Module, where: str, strict: bool = False) -> OfficialParts:
    """Split an official teacher state (`read_official_checkpoint`) for timm model `vit` (any device,
    meta included: only its names and shapes are used).

    The backbone goes through `timm.models.eva.checkpoint_filter_fn` (storage_tokens -> reg_token,
    ls1/ls2.gamma -> gamma_1/2, SwiGLU w1/w2/w3 -> fc1_g/fc1_x/fc2; drops rope periods and bias
    masks); the qkv bias is split here (`_split_qkv_bias`) and the patch embedding is never resampled.
    A checkpoint of another architecture therefore maps to missing, unexpected or mis-shaped keys:
    with `strict` that is an InputError, otherwise the caller checks the fit (e.g.
    `vit.load_state_dict(parts.backbone, strict=True)`). Heads are returned only when both
    `dino_head.*` and `ibot_head.*` are present.
    """
    raw = {key[len(BACKBONE_PREFIX):]: value for key, value in state.items() if key.startswith(BACKBONE_PREFIX)}
    if not raw:
        raise InputError(where, "has no backbone.* tensors", OFFICIAL_EXPECTED)
    mask_token = raw.pop("mask_token", None)
    if mask_token is not None:
        mask_token = _plain(mask_token).reshape(1, -1)
    patch = raw.pop("patch_embed.proj.weight", None)  # checkpoint_filter_fn would resample another patch size
    biases = _split_qkv_bias(raw, vit, where)
    backbone = {key: _plain(value) for key, value in checkpoint_filter_fn(raw, vit).items()}
    backbone.update(biases)
    if patch is not None:
        backbone["patch_embed.proj.weight"] = _plain(patch)
    if strict:
        own = vit.state_dict()
        detail = state_misfit(backbone, own)
        if mask_token is not None and mask_token.shape[-1] != own["cls_token"].shape[-1]:
            detail = "; ".join(filter(None, [detail, "wrong shape ['mask_token']"]))
        if detail:
            raise InputError(where, f"does not fit the timm model {type(vit).__name__} ({detail})",
                             f"{OFFICIAL_EXPECTED}, of the same architecture")
    heads = complete_heads({key: _plain(value) for key, value in state.items()})
    return OfficialParts(backbone=backbone, mask_token=mask_token, heads=heads)


def complete_heads(tensors: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """The `dino_head.*` and `ibot_head.*` tensors of `tensors`, or None unless both heads are there."""
    heads = {key: value for key, value in tensors.items() if key.startswith(tuple(f"{h}." for h in HEAD_NAMES))}
    if not all(any(key.startswith(f"{name}.") for key in heads) for name in HEAD_NAMES):
        return None
    return heads


# --------------------------------------------------------------------------- official: write

_OFFICIAL_KEY = re.compile(
    r"^(cls_token|storage_tokens|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm[12]\.(weight|bias)|ls[12]\.gamma|attn\.qkv\.weight|attn\.proj\.(weight|bias)"
    r"|mlp\.(fc1|fc2|w1|w2|w3)\.(weight|bias)))$"
)


def rope_periods(head_dim: int) -> Tensor:
    """The official RoPE periods buffer (`dinov3/layers/rope_position_encoding.py`, `base` form):
    base ** (2 i / (head_dim / 2)) for i < head_dim / 4, in float32 as the released backbones use."""
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return ROPE_BASE ** exponents


def _official_backbone(state: Mapping[str, Tensor], arch: Arch, mask_token: Tensor | None) -> dict[str, Tensor]:
    where = f"timm backbone {arch.timm_name}"
    state = {key: _plain(value) for key, value in state.items()}
    if "cls_token" not in state or "reg_token" not in state:
        raise InputError(where, "has no cls_token / reg_token", "a timm DINOv3 ViT state dict (4 registers)")
    dim = state["cls_token"].shape[-1]
    if dim % (4 * arch.num_heads):
        raise InputError(where, f"width {dim} is not a multiple of 4 x {arch.num_heads} heads",
                         "an official RoPE ViT (head dim divisible by 4)")
    swiglu = any(".mlp.fc1_g." in key for key in state)
    official_bias = arch.timm_name not in NO_QKV_BIAS
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        name = "storage_tokens" if key == "reg_token" else key
        name = name.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            name = name.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
            name = name.replace(".mlp.fc2.", ".mlp.w3.")
        if not _OFFICIAL_KEY.match(name):
            raise InputError(where, f"has {key!r}, which has no place in the official DINOv3 ViT",
                             "a timm DINOv3 ViT state dict (Eva with RoPE, registers and LayerScale)")
        out[name] = value
        if name.endswith("attn.qkv.weight"):
            block, src = name[: -len("qkv.weight")], key[: -len("qkv.weight")]
            q_bias, v_bias = state.get(src + "q_bias"), state.get(src + "v_bias")
            if q_bias is not None and v_bias is not None:
                out[block + "qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
            elif official_bias:
                out[block + "qkv.bias"] = torch.zeros(3 * dim, dtype=value.dtype)
            if block + "qkv.bias" in out:
                bias = out[block + "qkv.bias"]
                out[block + "qkv.bias_mask"] = torch.cat(
                    [torch.ones(dim, dtype=bias.dtype), torch.zeros(dim, dtype=bias.dtype),
                     torch.ones(dim, dtype=bias.dtype)])
    out["rope_embed.periods"] = rope_periods(dim // arch.num_heads)
    if mask_token is None:
        out["mask_token"] = torch.zeros(1, dim, dtype=state["cls_token"].dtype)
    elif mask_token.numel() != dim:
        raise InputError("mask_token", f"has shape {tuple(mask_token.shape)}", f"[1, {dim}]")
    else:
        out["mask_token"] = _plain(mask_token).reshape(1, dim)
    return {BACKBONE_PREFIX + key: value for key, value in out.items()}


def write_official_checkpoint(path: Path, backbone_state: Mapping[str, Tensor], arch: str | Arch,
                              mask_token: Tensor | None = None, heads: Mapping[str, Tensor] | None = None) -> None:
    """Write a timm-layout backbone (and heads) as an official `teacher_checkpoint.pth`, atomically.

    `{"teacher": {backbone.*, dino_head.*, ibot_head.*}}` with what the official ViT's state dict
    holds (`dinov3/models/vision_transformer.py`): `storage_tokens`, `ls1/ls2.gamma`, SwiGLU
    `mlp.w1/w2/w3`, `attn.qkv.bias` (zero key part) with its `bias_mask` [1, 0, 1] for every ViT
    built with a qkv bias (all but the 7B; zeros where the timm class has none, which is what the
    released S/B/L/H+ checkpoints hold), `rope_embed.periods` (base 100, float32) and `mask_token`
    (zeros when None). The official eval loader (`dinov3/checkpointer/checkpointer.py`,
    `init_model_from_checkpoint_for_evals`) takes `["teacher"]`, strips `backbone.` and loads into a
    model made with `to_empty`, so every buffer it keeps must be in the file. Verified: the written
    backbone loads strictly into the official `DinoVisionTransformer` of the hub's ViT-S/S+ settings
    (tiny widths) with equal outputs to timm's, and back through `checkpoint_filter_fn` bit for bit.
    Not written: the 7B training config's `local_cls_norm` (untie_global_and_local_cls_norm).
    """
    spec = ARCHS[arch] if isinstance(arch, str) and arch in ARCHS else arch
    if not isinstance(spec, Arch):
        raise InputError("arch", f"{arch!r} is unknown", "one of " + ", ".join(sorted(ARCHS)))
    teacher = _official_backbone(backbone_state, spec, mask_token)
    for key, value in (heads or {}).items():
        if not key.startswith(tuple(f"{name}." for name in HEAD_NAMES)):
            raise InputError("heads", f"has {key!r}", "dino_head.* and ibot_head.* weights")
        teacher[key] = _plain(value)
    with atomic_path(path) as tmp:
        torch.save({"teacher": teacher}, tmp)


# --------------------------------------------------------------------------- transformers


def _transformers_config(vit: Any, image_size: int) -> dict[str, Any]:
    where = f"timm model {type(vit).__name__}"
    expected = "a timm DINOv3 ViT (Eva with DINOv3 RoPE, class token, registers, no absolute position embedding)"
    rope: Any = getattr(vit, "rope", None)
    if (type(rope).__name__ != "RotaryEmbeddingDinoV3" or getattr(vit, "pos_embed", None) is not None
            or getattr(vit, "cls_token", None) is None or rope.temperature is None
            or rope.normalize_coords != "separate" or not rope.rotate_half):
        raise InputError(where, "is not a DINOv3 ViT that transformers' DINOv3ViTModel can express", expected)
    block = vit.blocks[0]
    patch = tuple(vit.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise InputError(where, f"has a non-square patch {patch}", expected)
    gated = hasattr(block.mlp, "fc1_g")
    hidden = block.mlp.fc1_g if gated else block.mlp.fc1
    return {
        "model_type": "dinov3_vit",
        "architectures": ["DINOv3ViTModel"],
        "patch_size": int(patch[0]),
        "hidden_size": int(vit.embed_dim),
        "intermediate_size": int(hidden.out_features),
        "num_hidden_layers": len(vit.blocks),
        "num_attention_heads": int(block.attn.num_heads),
        "hidden_act": "silu" if gated else "gelu",
        "layer_norm_eps": float(vit.norm.eps),
        "rope_theta": float(rope.temperature),
        "image_size": int(image_size),
        "num_channels": int(vit.patch_embed.proj.in_channels),
        "query_bias": block.attn.q_bias is not None,
        "key_bias": False,
        "value_bias": block.attn.v_bias is not None,
        "proj_bias": block.attn.proj.bias is not None,
        "mlp_bias": hidden.bias is not None,
        "layerscale_value": 1.0,
        "use_gated_mlp": gated,
        "num_register_tokens": int(vit.reg_token.shape[1]) if vit.reg_token is not None else 0,
        "pos_embed_rescale": rope.rescale_coords,
    }


def _transformers_state(vit: Any, mask_token: Tensor | None) -> dict[str, Tensor]:
    """timm Eva keys -> DINOv3ViTModel keys (q/k/v split from the fused qkv, zero key bias)."""
    state = {key: _plain(value) for key, value in vit.state_dict().items()}
    dim = int(vit.embed_dim)
    out = {
        "embeddings.cls_token": state.pop("cls_token"),
        "embeddings.mask_token": (torch.zeros(1, 1, dim) if mask_token is None
                                  else _plain(mask_token).reshape(1, 1, dim)),
        "embeddings.patch_embeddings.weight": state.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.bias": state.pop("patch_embed.proj.bias"),
        "norm.weight": state.pop("norm.weight"),
        "norm.bias": state.pop("norm.bias"),
    }
    if "reg_token" in state:
        out["embeddings.register_tokens"] = state.pop("reg_token")
    renames = {"norm1.": "norm1.", "norm2.": "norm2.", "attn.proj.": "attention.o_proj.",
               "mlp.fc1_g.": "mlp.gate_proj.", "mlp.fc1_x.": "mlp.up_proj.", "mlp.fc1.": "mlp.up_proj.",
               "mlp.fc2.": "mlp.down_proj."}
    for i in range(len(vit.blocks)):
        src, dst = f"blocks.{i}.", f"layer.{i}."
        q, k, v = state.pop(src + "attn.qkv.weight").chunk(3, dim=0)
        out.update({dst + "attention.q_proj.weight": q.clone(), dst + "attention.k_proj.weight": k.clone(),
                    dst + "attention.v_proj.weight": v.clone()})
        for part, proj in (("q", "q_proj"), ("v", "v_proj")):
            if src + f"attn.{part}_bias" in state:
                out[dst + f"attention.{proj}.bias"] = state.pop(src + f"attn.{part}_bias")
        for gamma, scale in (("gamma_1", "layer_scale1"), ("gamma_2", "layer_scale2")):
            out[dst + f"{scale}.lambda1"] = state.pop(src + gamma) if src + gamma in state else torch.ones(dim)
        for key in [key for key in state if key.startswith(src)]:
            rest = key[len(src):]
            prefix = next((p for p in renames if rest.startswith(p)), None)
            if prefix is not None:
                out[dst + renames[prefix] + rest[len(prefix):]] = state.pop(key)
    if state:
        raise InputError(f"timm model {type(vit).__name__}", f"has weights DINOv3ViTModel has no place for: "
                         f"{sorted(state)[:6]}", "a plain timm DINOv3 ViT (no extra norms or heads)")
    return out


def write_transformers_export(directory: Path, vit: nn.Module, image_size: int | None = None,
                              mask_token: Tensor | None = None,
                              image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
                              image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)) -> None:
    """Write timm DINOv3 ViT `vit` as a transformers `DINOv3ViTModel` directory, atomically.

    `config.json`, `model.safetensors` (hub key names) and `preprocessor_config.json` (resize to
    `image_size` bicubic, ImageNet normalisation as gramline's eval). `AutoModel.from_pretrained`
    gives a model whose `last_hidden_state` (CLS, registers, patches after the final norm) equals
    `vit.forward_features` in eval mode. `image_size` defaults to the timm model's.
    """
    vit_any: Any = vit
    size = int(image_size or vit_any.patch_embed.img_size[0])
    config = _transformers_config(vit_any, size)
    weights = _transformers_state(vit_any, mask_token)
    processor = {
        # the class name transformers 4.56 registered; later versions map it to DINOv3ViTImageProcessor
        "image_processor_type": "DINOv3ViTImageProcessorFast",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(image_mean), "image_std": list(image_std),
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True) + "\n")
        save_file(weights, str(tmp / TRANSFORMERS_WEIGHTS), metadata={"format": "pt"})
        plain_file_mode(tmp / TRANSFORMERS_WEIGHTS)


# --------------------------------------------------------------------------- Model artifacts


def export_model(model_dir: Path, to: str, out: Path, flag: str = "--model") -> Path:
    """Export a gramline Model artifact: `to="transformers"` writes directory `out`,
    `to="official"` writes the checkpoint file `out` (with heads when the Model has them)."""
    model_dir, out = Path(model_dir), Path(out)
    if to not in ("transformers", "official"):
        raise InputError("--to", f"{to!r} is unknown", "transformers or official")
    if to == "official" and out.is_dir():
        raise InputError(f"--out {out}", "is a directory", "the checkpoint file to write, e.g. DIR/teacher_checkpoint.pth")
    vit, manifest = load_backbone(model_dir, flag)
    vit_any: Any = vit
    heads_path = model_dir / HEADS_FILE
    extras = read_weights(heads_path, "the heads a gramline stage wrote") if heads_path.is_file() else {}
    mask_token = extras.get("mask_token")
    if to == "transformers":
        write_transformers_export(out, vit, image_size=manifest.get("img_size"), mask_token=mask_token)
        return out
    heads = complete_heads(extras)
    arch = Arch(manifest["timm"]["name"], int(vit_any.patch_embed.patch_size[0]), int(vit_any.embed_dim),
                len(vit_any.blocks), int(vit_any.blocks[0].attn.num_heads))
    write_official_checkpoint(out, vit.state_dict(), arch, mask_token=mask_token, heads=heads)
    return out
