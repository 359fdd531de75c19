"""Units of the training code: schedules, LR scaling, parameter groups, EMA, backbone additions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from gramline.models.backbone import Backbone, timm_spec
from gramline.models.config import BackboneConfig
from gramline.models.io import load_timm_backbone, save_weights
from gramline.train.param_groups import build_param_groups, lr_multiplier, scaled_lr, wd_multiplier
from gramline.train.recipes.dino.config import load_pretrain_config
from gramline.train.schedules import Schedule
from gramline.train.teachers import update_ema


def test_warmup_then_constant_schedule_matches_hand_values() -> None:
    s = Schedule(start=0.0, peak=4e-4, end=4e-4, warmup_steps=100)
    assert s.at(0, 1000) == 0.0
    assert s.at(50, 1000) == pytest.approx(2e-4)
    assert s.at(100, 1000) == pytest.approx(4e-4)
    assert s.at(999, 1000) == pytest.approx(4e-4)


def test_cosine_schedule_midpoint_and_end() -> None:
    # the official cosine over the C = 91 remaining steps is cos(linspace(0, pi, 91)): its midpoint
    # (step 10 + 45) is 0.5 and it reaches the end value on its last step, 10 + 90
    s = Schedule(start=0.0, peak=1.0, end=0.0, warmup_steps=10)
    assert s.at(55, 101) == pytest.approx(0.5)
    assert s.at(10 + 30, 101) == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert s.at(100, 101) == pytest.approx(0.0)


def test_cosine_matches_the_official_linspace_by_hand() -> None:
    """cos(linspace(0, pi, 5)) = [1, sqrt(2)/2, 0, -sqrt(2)/2, -1], so a peak 1 -> end 0 cosine over
    5 steps is (1 + cos)/2 = [1, (2 + sqrt 2)/4, 1/2, (2 - sqrt 2)/4, 0]: the end value on step 4,
    one step earlier than cos(pi t / C) would reach it."""
    s = Schedule(start=0.0, peak=1.0, end=0.0, cosine_steps=5)
    r2 = 2 ** 0.5
    assert [s.at(t, 100) for t in range(7)] == pytest.approx([1.0, (2 + r2) / 4, 0.5, (2 - r2) / 4, 0.0, 0.0, 0.0])
    # with a warmup first (start 0 -> peak 2 over 4 steps: 0, 0.5, 1, 1.5) and an end of 1
    w = Schedule(start=0.0, peak=2.0, end=1.0, warmup_steps=4, cosine_steps=3)  # cos(linspace(0, pi, 3)) = 1, 0, -1
    assert [w.at(t, 100) for t in range(9)] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 1.5, 1.0, 1.0, 1.0])
    # a one-step cosine is linspace(0, pi, 1) = [0]: the peak for that step, then the end
    one = Schedule(start=0.0, peak=3.0, end=1.0, cosine_steps=1)
    assert [one.at(t, 100) for t in range(3)] == [3.0, 1.0, 1.0]


def test_delayed_ramp_is_zero_before_the_delay() -> None:
    # the Gram weight in the 7B recipe: 0 until 1M, cosine ramp to 2.0 over 1k steps, then held
    s = Schedule(start=0.0, peak=0.0, end=2.0, warmup_steps=0, cosine_steps=1001, delay_steps=1_000_000)
    assert s.at(999_999, 1_200_000) == 0.0
    assert s.at(1_000_500, 1_200_000) == pytest.approx(1.0)  # the middle of cos(linspace(0, pi, 1001))
    assert s.at(1_001_000, 1_200_000) == pytest.approx(2.0)
    assert s.at(1_100_000, 1_200_000) == pytest.approx(2.0)


def test_scalar_override_means_constant_schedule() -> None:
    config = load_pretrain_config("tiny", overrides=["optim.lr=3e-4"])
    assert (config.optim.lr.start, config.optim.lr.peak, config.optim.lr.end) == (3e-4, 3e-4, 3e-4)


def test_lr_scaling_rules() -> None:
    assert scaled_lr(5e-5, "sqrt_wrt_1024", 4096) == pytest.approx(4e-4)  # the 7B recipe's effective LR
    assert scaled_lr(1e-3, "sqrt_wrt_1024", 2048) == pytest.approx(5.657e-3, rel=1e-3)  # ViT-L IN-1k
    assert scaled_lr(1e-3, "linear_wrt_256", 512) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, "none", 512) == 1e-3


def test_layerwise_decay_and_patch_embed_multipliers() -> None:
    depth = 4
    assert lr_multiplier("vit.norm.weight", depth, 0.9, 0.2) == pytest.approx(1.0)
    assert lr_multiplier("vit.blocks.3.mlp.fc1.weight", depth, 0.9, 0.2) == pytest.approx(0.9)
    assert lr_multiplier("vit.blocks.0.attn.qkv.weight", depth, 0.9, 0.2) == pytest.approx(0.9**4)
    assert lr_multiplier("vit.cls_token", depth, 0.9, 0.2) == pytest.approx(0.9**5)
    assert lr_multiplier("vit.patch_embed.proj.weight", depth, 0.9, 0.2) == pytest.approx(0.9**5 * 0.2)
    assert lr_multiplier("mask_token", depth, 0.9, 0.2) == pytest.approx(0.9**5)


def test_weight_decay_exclusions() -> None:
    assert wd_multiplier("vit.blocks.0.attn.qkv.bias") == 0.0
    assert wd_multiplier("vit.blocks.0.norm1.weight") == 0.0
    assert wd_multiplier("vit.blocks.0.gamma_1") == 0.0
    assert wd_multiplier("vit.blocks.0.attn.qkv.weight") == 1.0
    assert wd_multiplier("vit.cls_token") == 1.0  # tokens do get weight decay in the recipe
    assert wd_multiplier("vit.patch_embed.proj.weight") == 1.0


def test_param_groups_cover_every_trainable_parameter_once() -> None:
    from gramline.train.recipes.dino.model import DinoModel

    config = load_pretrain_config("tiny")
    model = DinoModel(config.backbone, config.heads)
    groups = build_param_groups(model.backbone, model.heads(), 4, 0.9, 0.2)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    last = [g for g in groups if g["is_last_layer"]]
    assert sum(len(g["params"]) for g in last) == 2  # the two heads' prototype layers


def test_ema_update_matches_formula() -> None:
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = [0.9 * t.detach().clone() + 0.1 * s.detach().clone()
                for t, s in zip(teacher.parameters(), student.parameters())]
    update_ema(teacher, student, 0.9)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got, want)


def _tiny_backbone(**changes: object) -> Backbone:
    return Backbone(BackboneConfig(arch="tiny", img_size=64, **changes))


def test_mask_token_replaces_masked_patch_embeddings() -> None:
    torch.manual_seed(0)
    model = _tiny_backbone().eval()
    images = torch.randn(2, 3, 32, 32)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :8] = True
    with torch.no_grad():
        model.mask_token.normal_()
        plain = model.forward_group(images)
        masked = model.forward_group(images, masks)
        # image 1 has no masked patch: its tokens are unchanged
        torch.testing.assert_close(masked["patches"][1], plain["patches"][1])
        assert not torch.allclose(masked["patches"][0], plain["patches"][0])
        # two different images with all patches masked give identical outputs (patch content is gone)
        all_masked = torch.ones(2, 16, dtype=torch.bool)
        out = model.forward_group(images, all_masked)
        torch.testing.assert_close(out["cls"][0], out["cls"][1])


def test_rope_rescale_is_student_only() -> None:
    torch.manual_seed(0)
    model = _tiny_backbone(rope_rescale_coords=2.0)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train()
        a, b = model.forward_group(images)["cls"], model.forward_group(images)["cls"]
        model.eval()
        c, d = model.forward_group(images)["cls"], model.forward_group(images)["cls"]
    assert not torch.allclose(a, b)  # training draws a new coordinate rescale
    torch.testing.assert_close(c, d)


def test_uniform_drop_path() -> None:
    model = _tiny_backbone(drop_path_rate=0.3, drop_path_uniform=True)
    rates = {round(b.drop_path1.drop_prob, 6) for b in model.vit.blocks}
    assert rates == {0.3}
    linear = _tiny_backbone(drop_path_rate=0.3, drop_path_uniform=False)
    assert len({round(getattr(b.drop_path1, "drop_prob", 0.0), 6) for b in linear.vit.blocks}) == 4


def test_forward_returns_tokens_for_each_crop_group() -> None:
    model = _tiny_backbone().eval()
    out = model([torch.randn(3, 3, 48, 48), torch.randn(3, 3, 24, 24)])
    assert [o["patches"].shape for o in out] == [(3, 36, 96), (3, 9, 96)]
    assert out[0]["registers"].shape == (3, 4, 96) and out[1]["cls"].shape == (3, 96)


def test_exported_backbone_loads_in_plain_timm_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = BackboneConfig(arch="tiny", img_size=64)
    model = Backbone(config).eval()
    save_weights(tmp_path / "backbone.safetensors", model.vit.state_dict())
    name, kwargs = timm_spec(config)
    via_overlay = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "backbone.safetensors")},
                                    **kwargs).eval()
    via_helper = load_timm_backbone(name, tmp_path / "backbone.safetensors",
                                    **{k: v for k, v in kwargs.items() if k not in ("num_classes", "global_pool")})
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.forward_group(images)
        for other in (via_overlay, via_helper):
            tokens = other.forward_features(images)
            assert torch.equal(tokens[:, 0], ours["cls"])
            assert torch.equal(tokens[:, other.num_prefix_tokens:], ours["patches"])


def test_mapping_override_updates_only_the_given_keys() -> None:
    config = load_pretrain_config("tiny", overrides=['optim.lr={"peak": 0.005}'])
    tiny = load_pretrain_config("tiny")
    assert config.optim.lr.peak == 0.005
    assert config.optim.lr.warmup_steps == tiny.optim.lr.warmup_steps and config.optim.lr.end == tiny.optim.lr.end


def test_json_overrides_flag_feeds_the_same_machinery() -> None:
    from gramline.errors import InputError
    from gramline.stages.common import stage_parser

    args = stage_parser("x", "y").parse_args(["--overrides", '{"train.steps": 3, "optim.lr": 1e-3}', "--set", "train.steps=4"])
    config = load_pretrain_config("tiny", overrides=args.overrides)
    assert config.train.steps == 4 and config.optim.lr.peak == 1e-3  # --set wins over --overrides
    with pytest.raises(InputError, match="--overrides"):
        stage_parser("x", "y").parse_args(["--overrides", "[1, 2]"])


@pytest.mark.parametrize(("steps", "keep", "expected"), [
    ([10, 20, 30], 3, [10, 20, 30]),                  # within the cap: all stay
    ([10, 20, 30, 40], 3, [10, 30]),                  # one too many: every other one, from the oldest
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 2, [1, 9]),         # 9 -> 5 (1,3,5,7,9) -> 3 (1,5,9) -> 2 (1,9)
    ([5, 1, 3], 1, [1]),                              # unsorted in, the oldest kept
])
def test_thinned_teacher_checkpoints_stay_spread(steps: list[int], keep: int, expected: list[int]) -> None:
    from gramline.train.export import thinned

    assert thinned(steps, keep) == expected
