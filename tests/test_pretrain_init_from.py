"""pretrain --init-from: a run that starts from existing weights (domain adaptation).

A tiny timm DINOv3-architecture model saved to safetensors stands in for the public weights (no
download). What is checked: the student and EMA teacher start bit-equal to the loaded backbone;
new heads warm up on a backbone that does not move; the Gram anchor to the start keeps the patch
geometry closer to the start than the same run without it; official-layout checkpoints load with
their heads; a killed run resumes exactly; bad sources exit 2 naming the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from phase_run import one_thread
from safetensors.torch import load_file, save_file

from gramline.data.synthetic import write_synthetic_dataset
from gramline.eval.dense import dense_patches, gram_similarity
from gramline.eval.features import load_eval_data
from gramline.models.archs import ARCHS
from gramline.models.io import load_backbone
from gramline.stages import pretrain
from gramline.train.recipes.dino.config import load_adapt_config
from gramline.train.recipes.dino.model import DinoModel
from gramline.train.recipes.dino.recipe import DinoRecipe

TIMM_NAME = ARCHS["tiny"].timm_name
QUICK = ["train.batch_size=8", "train.log_every=100", "train.teacher_checkpoint_every=0"]


def sets(*overrides: str) -> list[str]:
    return [a for o in (*QUICK, *overrides) for a in ("--set", o)]


def public_stand_in(path: Path, arch: str = "tiny", seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm DINOv3 ViT of `arch`, randomly initialised with LayerScale 1 (so every block matters)."""
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    model = timm.create_model(spec.timm_name, pretrained=False, init_values=1.0, **spec.timm_kwargs(64))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dataset, stand-in weights file)."""
    root = tmp_path_factory.mktemp("init_from")
    write_synthetic_dataset(root / "data", n_train=96, n_eval=24, size=64, seed=3, shard_max_count=24)
    public_stand_in(root / "public.safetensors")
    return root / "data", root / "public.safetensors"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gramline.stages.pretrain", *args], capture_output=True, text=True,
                          check=False, env={**os.environ, **(env or {})}, timeout=600)


def backbone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_student_and_teacher_start_as_loaded_and_warm_up_keeps_the_backbone(world: tuple[Path, Path],
                                                                              tmp_path: Path) -> None:
    data, weights = world
    loaded = load_file(str(weights))
    seen: dict[int, tuple[dict, dict, dict]] = {}

    def watch(recipe: DinoRecipe, step: int) -> None:
        seen[step] = (backbone_state(recipe.student.backbone.vit), backbone_state(recipe.teacher.model.backbone.vit),
                      backbone_state(recipe.student.dino_head))

    with one_thread():
        assert pretrain.main(["--dataset", str(data), "--out-model", str(tmp_path / "m"), "--init-from",
                              f"timm:{TIMM_NAME}@{weights}", *sets("train.steps=8", "init.head_warmup_steps=4")],
                             hooks=[watch]) == 0
    for step in (1, 2, 3, 4):  # after each warm-up step: both backbones exactly as loaded
        student, teacher, _ = seen[step]
        for key, value in loaded.items():
            assert torch.equal(student[key], value), f"student {key} moved during the head warm-up (step {step})"
            assert torch.equal(teacher[key], value), f"teacher {key} moved during the head warm-up (step {step})"
    assert any(not torch.equal(seen[1][2][k], seen[4][2][k]) for k in seen[1][2]), "the heads did not train"
    after = seen[8][0]
    assert any(not torch.equal(after[k], loaded[k]) for k in loaded), "the backbone never unfroze"
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["init_from"]["arch"] == "tiny" and manifest["init_from"]["heads_loaded"] is False
    assert manifest["init_from"]["head_warmup_steps"] == 4 and manifest["init_from"]["gram_anchored"] is True


def _adapted_gram_similarity(data: Path, weights: Path, out: Path, anchored: bool, gram_size: int | None) -> dict:
    """A tiny adaptation long and fast enough to drift, then its Gram similarity to the start."""
    extra = [f"gram.enabled={str(anchored).lower()}", "train.steps=60", "init.head_warmup_steps=5",
             "optim.lr={start: 0, peak: 5.0e-3, end: 5.0e-3, warmup_steps: 5}"]
    if gram_size is not None:
        extra.append(f"crops.gram_size={gram_size}")
    with one_thread():
        assert pretrain.main(["--dataset", str(data), "--out-model", str(out), "--init-from",
                              f"timm:{TIMM_NAME}@{weights}", *sets(*extra)]) == 0
    start = timm.create_model(TIMM_NAME, pretrained=False, **ARCHS["tiny"].timm_kwargs(64))
    start.load_state_dict(load_file(str(weights)))
    images = load_eval_data(data).images
    with one_thread():
        return gram_similarity(dense_patches(load_backbone(out)[0], images, 48), dense_patches(start.eval(), images, 48))


def test_gram_anchor_keeps_the_patch_geometry_closer_to_the_start(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = world
    trained = tmp_path / "trained.safetensors"  # a start model with some training behind it
    with one_thread():
        assert pretrain.main(["--dataset", str(data), "--out-model", str(tmp_path / "scratch"),
                              *sets("train.steps=60", "train.batch_size=16")]) == 0
    save_file(load_file(str(tmp_path / "scratch" / "backbone.safetensors")), str(trained))
    anchored = _adapted_gram_similarity(data, trained, tmp_path / "anchored", True, None)
    free = _adapted_gram_similarity(data, trained, tmp_path / "free", False, None)
    print("anchored", anchored, "free", free)
    assert anchored["gram_corr"] > free["gram_corr"]
    assert anchored["gram_mse"] < 0.5 * free["gram_mse"]
    # at 2x resolution (the Gram phase's crops) the anchor still pulls the Gram matrices closer
    anchored_2x = _adapted_gram_similarity(data, trained, tmp_path / "anchored_2x", True, 96)
    print("anchored 2x", anchored_2x)
    assert anchored_2x["gram_mse"] < 0.5 * free["gram_mse"]


def _official_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official ViT's key names, written out by hand from the released checkpoints' layout
    (storage tokens, LayerScale `ls1/ls2.gamma`, one fused qkv bias whose key part is zero)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in timm_state.items():
        if key.endswith("attn.q_bias"):
            v_bias = timm_state[key.replace("q_bias", "v_bias")]
            out["backbone." + key.replace("q_bias", "qkv.bias")] = torch.cat([value, torch.zeros_like(value), v_bias])
            continue
        if key.endswith(("attn.v_bias", "attn.k_bias")):
            continue
        name = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out["backbone." + name] = value
    return out


def test_official_checkpoint_loads_with_its_heads(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, weights = world
    timm_state = load_file(str(weights))
    torch.manual_seed(1)
    config = load_adapt_config("tiny", None, [])
    donor = DinoModel(config.backbone, config.heads)
    heads = {f"{name}.{k}": v for name, head in donor.heads().items() for k, v in head.state_dict().items()}
    mask_token = torch.randn(1, ARCHS["tiny"].embed_dim)
    teacher = {**_official_layout(timm_state), "backbone.mask_token": mask_token, **heads}
    checkpoint = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, checkpoint)

    out = tmp_path / "m"
    with one_thread():
        assert pretrain.main(["--dataset", str(data), "--out-model", str(out), "--init-from", str(checkpoint),
                              *sets("train.steps=2", "optim.lr={start: 0, peak: 0, end: 0}",
                                   "ema.momentum={start: 1, peak: 1, end: 1}")]) == 0
    # with LR 0 and EMA momentum 1 the exported teacher is the loaded one: backbone, mask token, heads
    exported, exported_heads = load_file(str(out / "backbone.safetensors")), load_file(str(out / "heads.safetensors"))
    for key, value in timm_state.items():
        assert torch.equal(exported[key], value), key
    assert torch.equal(exported_heads["mask_token"].reshape(mask_token.shape), mask_token)
    for key, value in heads.items():
        assert torch.equal(exported_heads[key], value), key
    record = json.loads((out / "manifest.json").read_text())["init_from"]
    assert record["kind"] == "official" and record["heads_loaded"] is True and record["head_warmup_steps"] == 0


def test_killed_run_resumes_exactly_inside_the_head_warmup(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, weights = world
    argv = lambda out: ["--dataset", str(data), "--out-model", str(out), "--init-from",
                        f"timm:{TIMM_NAME}@{weights}", *sets("train.steps=8", "init.head_warmup_steps=5",
                                                             "train.checkpoint_every=3")]

    class Interrupt(Exception):
        pass

    def crash(recipe: DinoRecipe, step: int) -> None:
        if step == 4:  # after the step-3 checkpoint, inside the warm-up
            raise Interrupt

    with one_thread():
        assert pretrain.main(argv(tmp_path / "clean")) == 0
        with pytest.raises(Interrupt):
            pretrain.main(argv(tmp_path / "resumed"), hooks=[crash])
        assert pretrain.main(argv(tmp_path / "resumed")) == 0
    for name in ("backbone.safetensors", "heads.safetensors"):
        a, b = load_file(str(tmp_path / "clean" / name)), load_file(str(tmp_path / "resumed" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_model_directory_brings_its_heads(world: tuple[Path, Path], tmp_path: Path) -> None:
    data, weights = world
    first = tmp_path / "first"
    with one_thread():
        assert pretrain.main(["--dataset", str(data), "--out-model", str(first), "--init-from",
                              f"timm:{TIMM_NAME}@{weights}", *sets("train.steps=4", "init.head_warmup_steps=2")]) == 0
        second = tmp_path / "second"
        assert pretrain.main(["--dataset", str(data), "--out-model", str(second), "--init-from", str(first),
                              *sets("train.steps=2")]) == 0
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["init_from"]["heads_loaded"] is True and manifest["init_from"]["head_warmup_steps"] == 0
    assert any(entry["name"] == "init_from" for entry in manifest["inputs"])


@pytest.mark.parametrize("case", ["unknown_timm", "other_arch", "not_weights_only", "prototypes", "offline"])
def test_bad_sources_exit_2_naming_the_file(world: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    data, weights = world
    env = None
    if case == "unknown_timm":
        spec, needle = "timm:vit_nonexistent_patch16", "vit_nonexistent_patch16"
    elif case == "other_arch":  # ViT-B/16's class, with the tiny weights
        spec, needle = f"timm:vit_base_patch16_dinov3@{weights}", str(weights)
    elif case == "not_weights_only":
        bad = tmp_path / "pickled.pth"
        torch.save({"teacher": {"backbone.cls_token": torch.zeros(1)}, "extra": Path("x")}, bad)
        spec, needle = str(bad), str(bad)
    elif case == "prototypes":
        config = load_adapt_config("tiny", None, [])
        other = config.heads.model_copy(update={"dino_prototypes": config.heads.dino_prototypes * 2})
        donor = DinoModel(config.backbone, other)
        heads = {f"{n}.{k}": v for n, h in donor.heads().items() for k, v in h.state_dict().items()}
        bad = tmp_path / "teacher_checkpoint.pth"
        torch.save({"teacher": {**_official_layout(load_file(str(weights))), **heads}}, bad)
        spec, needle = str(bad), f"{bad}: has a DINO head of {2 * config.heads.dino_prototypes} prototypes"
    else:  # a hub model by name with no network and an empty cache
        spec, needle = f"timm:{TIMM_NAME}", TIMM_NAME
        env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HUGGINGFACE_HUB_CACHE": str(tmp_path / "hf")}
    out = tmp_path / "out"
    result = run_cli("--dataset", str(data), "--out-model", str(out), "--init-from", spec, "--set", "train.steps=2",
                     env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()
