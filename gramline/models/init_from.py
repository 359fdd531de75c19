"""Weights a run starts from (`--init-from`): public timm DINOv3 backbones, a local weights file for a
timm class, a gramline Model, or an official DINOv3 checkpoint (`teacher_checkpoint.pth`).

Every source becomes one `StartingWeights`: the backbone in timm key layout, the architecture of
`gramline.models.archs.ARCHS` it fits, and the iBOT mask token and DINO/iBOT heads when the source
has them (the released DINOv3 backbones have neither: official issues #84, #152). Which architecture
a source is, is read off its tensors' shapes, not its name: `prefer` (the configured one) wins when
it fits. Nothing is downloaded unless timm is asked for a hub model by name; checkpoints load with
`weights_only=True`; a source that fits no registered architecture exits 2 naming the missing,
unexpected and mis-shaped keys against the architecture expected.

    timm:<name>                 timm's pretrained weights (the Hugging Face hub, or its local cache offline)
    timm:<name>@<file>          a local .safetensors/.pth for timm class <name> (timm's DINOv3 key filter applies)
    <dir>                       a gramline Model artifact (its backbone, mask token and heads)
    <file>.pth / .pt            an official DINOv3 checkpoint: `backbone.*`, and `dino_head.*`/`ibot_head.*`
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import Tensor, nn

from gramline.artifacts import read_manifest
from gramline.errors import InputError
from gramline.models.archs import ARCHS, archs_of_timm
from gramline.models.formats import complete_heads, read_official_checkpoint, split_official
from gramline.models.io import BACKBONE_FILE, HEADS_FILE, build_timm, read_weights, state_misfit


@dataclass(frozen=True)
class StartingWeights:
    spec: str  # as the user gave it
    kind: str  # "timm", "timm-file", "model" or "official"
    arch: str  # the ARCHS entry the backbone fits
    backbone: dict[str, Tensor]  # timm key layout
    mask_token: Tensor | None = None  # [1, D]
    heads: dict[str, Tensor] | None = None  # `dino_head.*` and `ibot_head.*`
    record: dict[str, Any] = field(default_factory=dict)  # what the manifest records of the source

    @property
    def has_heads(self) -> bool:
        return self.heads is not None

    def timm_backbone(self, img_size: int) -> nn.Module:
        """The backbone as a plain timm model of its architecture, in eval mode, for `img_size`
        inputs (the architecture fits the weights strictly: `fitting_arch`)."""
        arch = ARCHS[self.arch]
        vit = build_timm(arch.timm_name, arch.timm_kwargs(img_size))
        vit.load_state_dict(self.backbone, strict=True)
        return vit.eval()

    def describe(self) -> str:
        extra = " with its mask token and DINO/iBOT heads" if self.has_heads else " (backbone only: new heads)"
        return f"{self.spec} ({self.kind}, arch {self.arch}){extra}"


@functools.cache
def _meta_vit(arch: str) -> nn.Module:
    """`arch`'s timm model on the meta device: names and shapes only (read, never changed)."""
    spec = ARCHS[arch]
    with torch.device("meta"):
        return timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs(224))


def misfit(state: Mapping[str, Tensor], arch: str) -> str | None:
    """None when `state` loads into `arch` strictly; else which keys are missing, unexpected or mis-shaped."""
    return state_misfit(state, _meta_vit(arch).state_dict())


def _expected(arch: str) -> str:
    a = ARCHS[arch]
    return (f"weights of {arch} (timm {a.timm_name}: embed_dim {a.embed_dim}, depth {a.depth}, "
            f"patch {a.patch_size}, {a.num_heads} heads)")


def fitting_arch(state: Mapping[str, Tensor], candidates: Iterable[str], prefer: str | None, where: str) -> str:
    """The first of `candidates` (`prefer` first) whose backbone `state` fits; InputError naming the
    misfit against the preferred (or first) candidate otherwise."""
    ordered = list(dict.fromkeys([c for c in (prefer,) if c in candidates] + list(candidates)))
    if not ordered:
        raise InputError(where, "names no registered architecture", "one of " + ", ".join(sorted(ARCHS)))
    for arch in ordered:
        if misfit(state, arch) is None:
            return arch
    raise InputError(where, f"does not fit {ordered[0]} ({misfit(state, ordered[0])})", _expected(ordered[0]))


# --------------------------------------------------------------------------- the sources


def _from_timm(spec: str, body: str, prefer: str | None, flag: str) -> StartingWeights:
    name, _, file = body.partition("@")
    where = f"{flag} {spec}"
    base = name.split(".")[0]  # a pretrained tag (`.lvd1689m`) picks the weights, not the class
    if base not in timm.list_models():
        raise InputError(where, f"names no timm model {name!r}",
                         "a timm DINOv3 ViT such as timm:vit_base_patch16_dinov3 (see timm.list_models('*dinov3*'))")
    candidates = archs_of_timm(base)
    if not candidates:
        known = sorted({a.timm_name for a in ARCHS.values()})
        raise InputError(where, f"names timm model {name!r}, which is not a DINOv3 ViT gramline trains",
                         "one of " + ", ".join(known))
    if file:
        path = Path(file)
        if not path.is_file():
            raise InputError(where, f"names the weights file {path}, which does not exist", "a local .safetensors or .pth file")
        state = _timm_file_state(path, candidates, prefer, where)
        record = {"kind": "timm-file", "timm_name": base, "file": str(path.resolve()), "bytes": path.stat().st_size}
        arch = fitting_arch(state, candidates, prefer, f"{flag} {path}")
        return StartingWeights(spec, "timm-file", arch, state, record=record)
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as err:  # noqa: BLE001 - hub errors (offline, no cache, HTTP) come in many types
        raise InputError(where, f"could not be loaded: timm found no weights for {name!r} on the Hugging Face "
                         f"hub or in its local cache ({type(err).__name__}: {str(err).splitlines()[0][:200]})",
                         f"network access to the hub once (then the cache serves it offline), or "
                         f"timm:{name}@<local weights file>") from None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    arch = fitting_arch(state, candidates, prefer, where)
    tag = getattr(model, "pretrained_cfg", {}).get("tag")
    return StartingWeights(spec, "timm", arch, state, record={"kind": "timm", "timm_name": name, "tag": tag})


def _timm_file_state(path: Path, candidates: list[str], prefer: str | None, where: str) -> dict[str, Tensor]:
    """A weights file for a timm class, through timm's own DINOv3 key filter (official backbone key
    names are mapped; timm-layout keys pass through). The filter looks parameters up on the model it
    maps for (a meta-device build of each candidate); the first that fits wins."""
    from timm.models.eva import checkpoint_filter_fn

    raw = _read_tensors(path, where)
    raw = {k.removeprefix("backbone."): v for k, v in raw.items()}
    ordered = list(dict.fromkeys([c for c in (prefer,) if c in candidates] + candidates))
    mapped = {arch: checkpoint_filter_fn(dict(raw), _meta_vit(arch)) for arch in ordered}
    return next((m for arch, m in mapped.items() if misfit(m, arch) is None), mapped[ordered[0]])


def _read_tensors(path: Path, where: str) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        return read_weights(path, "timm-layout weights")
    return read_official_checkpoint(path, where)


def _from_model(spec: str, model_dir: Path, flag: str) -> StartingWeights:
    where = f"{flag} {model_dir}"
    manifest = read_manifest(model_dir, "Model", flag)
    weights = model_dir / BACKBONE_FILE
    if not weights.is_file():
        raise InputError(where, f"has no {BACKBONE_FILE}", "a Model artifact with backbone weights")
    state = read_weights(weights, "the backbone weights a gramline stage wrote")
    arch = manifest.get("arch")
    if arch not in ARCHS:
        raise InputError(f"{model_dir}/manifest.json", f"records the architecture {arch!r}",
                         "one of " + ", ".join(sorted(ARCHS)))
    arch = fitting_arch(state, [arch], arch, str(weights))
    mask, heads = None, None
    if (model_dir / HEADS_FILE).is_file():
        extra = read_weights(model_dir / HEADS_FILE, "the heads a gramline stage wrote")
        mask = extra.get("mask_token")
        heads = complete_heads(extra)
    return StartingWeights(spec, "model", arch, state, mask, heads,
                           record={"kind": "model", "path": str(model_dir.resolve()), "step": manifest.get("step"),
                                   "stage": manifest.get("stage")})


def _from_official(spec: str, path: Path, prefer: str | None, flag: str) -> StartingWeights:
    where = f"{flag} {path}"
    raw = read_official_checkpoint(path, where)
    order = list(dict.fromkeys([a for a in (prefer,) if a in ARCHS] + list(ARCHS)))
    patch = raw.get("backbone.patch_embed.proj.weight")
    for arch in order:
        if patch is not None and tuple(patch.shape[-2:]) != (ARCHS[arch].patch_size,) * 2:
            continue  # timm's filter would resample the patch embedding; the architecture is not this one
        parts = split_official(raw, _meta_vit(arch), where)
        if misfit(parts.backbone, arch) is None:
            return StartingWeights(spec, "official", arch, parts.backbone, parts.mask_token, parts.heads,
                                   record={"kind": "official", "file": str(path.resolve()), "bytes": path.stat().st_size})
    target = order[0]
    parts = split_official(raw, _meta_vit(target), where)
    raise InputError(where, f"fits no registered architecture; against {target}: {misfit(parts.backbone, target)}",
                     _expected(target))


def load_starting_weights(spec: str, prefer: str | None = None, flag: str = "--init-from") -> StartingWeights:
    """The weights `spec` names (module docstring), fitted to an architecture (`prefer` when it fits)."""
    spec = spec.strip()
    if not spec:
        raise InputError(flag, "is empty", "timm:<name>[@<file>], a Model directory or an official checkpoint file")
    if spec.startswith("timm:"):
        return _from_timm(spec, spec[len("timm:"):], prefer, flag)
    path = Path(spec)
    if path.is_dir():
        return _from_model(spec, path, flag)
    if path.is_file():
        return _from_official(spec, path, prefer, flag)
    raise InputError(f"{flag} {spec}", "is neither a timm:<name> spec nor an existing directory or file",
                     "timm:<name>[@<file>], a gramline Model directory or an official DINOv3 checkpoint (.pth)")
