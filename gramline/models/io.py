"""Model artifacts on disk: backbone weights in timm key layout, heads, and loading them back.

`backbone.safetensors` + the manifest's `timm: {name, kwargs}` rebuild the backbone in plain timm:
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **kwargs)`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gramline.artifacts import read_manifest
from gramline.errors import InputError
from gramline.models.archs import ARCHS

BACKBONE_FILE = "backbone.safetensors"
HEADS_FILE = "heads.safetensors"


def _plain(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous().clone() for key, value in state.items()}


def save_weights(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """safetensors write to a temp name, then rename (atomic), readable as the umask allows."""
    from gramline.io import atomic_path, plain_file_mode

    with atomic_path(path) as tmp:
        save_file(_plain(state), str(tmp), metadata=dict(metadata or {}))
        plain_file_mode(tmp)


def read_weights(path: Path, expected: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; InputError naming the file when it cannot be read."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(str(path), f"is not a readable safetensors file ({err})", expected) from None


def state_misfit(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """None when `state` has exactly `reference`'s keys and shapes; else which keys are missing,
    unexpected or mis-shaped (the first few of each)."""
    missing = sorted(set(reference) - set(state))
    unexpected = sorted(set(state) - set(reference))
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(reference[k].shape)}" for k in set(state) & set(reference)
                   if tuple(state[k].shape) != tuple(reference[k].shape))
    parts = [f"{name} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    return "; ".join(parts) or None


def timm_manifest_entry(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "kwargs": dict(kwargs)}


def build_timm(name: str, kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:
        raise InputError(f"timm model {name!r}", f"cannot be built with {dict(kwargs)} ({err})") from err


def load_backbone(model_dir: Path | str, flag: str = "--model") -> tuple[nn.Module, dict]:
    """Load a Model artifact's backbone as a plain timm model in eval mode, with its manifest."""
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, "Model", flag)
    weights = model_dir / BACKBONE_FILE
    if not weights.is_file():
        raise InputError(f"{flag} {model_dir}", f"has no {BACKBONE_FILE}", "a Model artifact with backbone weights")
    spec = manifest.get("timm") or {}
    if "name" not in spec:
        raise InputError(f"{model_dir}/manifest.json", "has no timm.name", "a Model manifest with timm name + kwargs")
    model = build_timm(spec["name"], spec.get("kwargs", {}))
    state = read_weights(weights, "the backbone weights a gramline stage wrote")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(str(weights), f"does not match timm model {spec['name']} ({err})") from err
    return model.eval(), manifest


def build_random_backbone(arch: str, img_size: int, seed: int = 0) -> nn.Module:
    """A seeded random-init backbone of a preset architecture: the baseline every model must beat."""
    if arch not in ARCHS:
        raise InputError("arch", f"{arch!r} is unknown", "one of " + ", ".join(sorted(ARCHS)))
    spec = ARCHS[arch]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_timm(spec.timm_name, spec.timm_kwargs(img_size))
    return model.eval()


def load_timm_backbone(name: str, weights: Path | str | None = None, **kwargs: Any) -> nn.Module:
    """A plain timm backbone, optionally with local weights (no download is attempted)."""
    kwargs = {"num_classes": 0, "global_pool": "token", **kwargs}
    if weights is None:
        return build_timm(name, kwargs).eval()
    weights = Path(weights)
    if not weights.is_file():
        raise InputError(f"weights file {weights}", "does not exist", "a local .safetensors or .pth file")
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    except (RuntimeError, ValueError, KeyError) as err:
        raise InputError(f"weights file {weights}", f"does not load into timm model {name!r} ({err})") from err
    return model.eval()
