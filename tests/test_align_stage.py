"""align stage: the contrastive loss against plain loops (1 and 2 gloo ranks), a frozen backbone,
exact resume, the aligned Model's API, the shuffled-caption control and bad inputs (exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from phase_run import TinyRun, one_thread, sets, stage_exit_code, tiny_run
from safetensors.torch import load_file, save_file

from gramline.artifacts import read_manifest
from gramline.data.synthetic import encode_png, write_synthetic_dataset
from gramline.data.writer import DatasetWriter, ShardSample
from gramline.losses.contrastive import contrastive_loss
from gramline.models.archs import ARCHS
from gramline.models.text import Tokenizer, load_aligned
from gramline.stages import align
from gramline.train.recipes.align.data import shuffled_captions
from gramline.train.recipes.align.inputs import backbone_dir

SHORT = ["train.steps=6", "train.batch_size=8", "train.checkpoint_every=3", "train.log_every=1",
         "text.width=32", "text.layers=1", "text.heads=2", "text.context_length=24"]


@pytest.fixture(scope="session")
def run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    return tiny_run(tmp_path_factory)


def argv(run: TinyRun, out: Path, overrides: list[str], dataset: Path | None = None) -> list[str]:
    return ["--model", str(run.pretrain), "--dataset", str(dataset or run.dataset), "--out-model", str(out),
            "--preset", "tiny", *sets(overrides)]


# --------------------------------------------------------------------------- the loss


def reference_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> float:
    """Symmetric InfoNCE with plain loops: for each image, -log of its own text's softmax share over
    all texts, and the same for each text over all images; the mean of the two directions."""
    n = image.shape[0]
    img = [row / math.sqrt(sum(float(v) ** 2 for v in row)) for row in image]
    txt = [row / math.sqrt(sum(float(v) ** 2 for v in row)) for row in text]
    scale = math.exp(logit_scale)
    sim = [[scale * sum(float(a) * float(b) for a, b in zip(img[i], txt[j])) for j in range(n)] for i in range(n)]
    i2t = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def loss_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    image = torch.randn(6, 4, generator=gen)
    text = image + 0.8 * torch.randn(6, 4, generator=gen)
    return image, text, torch.tensor(math.log(1 / 0.07))


def test_contrastive_loss_equals_plain_loops() -> None:
    image, text, scale = loss_inputs()
    assert float(contrastive_loss(image, text, scale)) == pytest.approx(reference_loss(image, text, float(scale)),
                                                                        rel=1e-5)
    # perfectly matched pairs at a high scale cost ~0; a permutation costs a lot
    assert float(contrastive_loss(image, image, torch.tensor(math.log(100)))) < 0.05
    assert float(contrastive_loss(image, image.roll(1, 0), torch.tensor(math.log(100)))) > 5


def _loss_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        image, text, scale = loss_inputs()
        image = image.chunk(2)[rank].clone().requires_grad_(True)
        text = text.chunk(2)[rank].clone().requires_grad_(True)
        scale = scale.clone().requires_grad_(True)
        loss = contrastive_loss(image, text, scale)
        loss.backward()
        torch.save({"loss": loss.detach(), "image_grad": image.grad, "text_grad": text.grad,
                    "scale_grad": scale.grad}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_gathered_equal_one_rank_on_the_whole_batch(tmp_path: Path) -> None:
    mp.spawn(_loss_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    image, text, scale = (t.clone().requires_grad_(True) for t in loss_inputs())
    whole = contrastive_loss(image, text, scale)
    whole.backward()
    # the mean of the ranks' losses is the global loss (and the plain-loop value)
    assert float(sum(r["loss"] for r in ranks) / 2) == pytest.approx(float(whole.detach()), rel=1e-6)
    assert float(whole.detach()) == pytest.approx(reference_loss(*loss_inputs()[:2], math.log(1 / 0.07)), rel=1e-5)
    # DDP averages the ranks' gradients: that average is the one-process gradient
    assert torch.allclose(torch.cat([r["image_grad"] for r in ranks]) / 2, image.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r["text_grad"] for r in ranks]) / 2, text.grad, atol=1e-6)
    assert float(sum(r["scale_grad"] for r in ranks) / 2) == pytest.approx(float(scale.grad), rel=1e-5)


# --------------------------------------------------------------------------- the stage


@pytest.mark.slow
def test_backbone_is_bit_identical_and_the_model_encodes(run: TinyRun, tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    with one_thread():
        assert align.main(argv(run, out, SHORT)) == 0
    before = load_file(str(run.pretrain / "backbone.safetensors"))
    after = load_file(str(out / "backbone.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    manifest = read_manifest(out, "Model")
    assert manifest["text_tower"]["tokenizer"]["vocab_size"] == 49408
    assert [i["name"] for i in manifest["inputs"]] == ["backbone", "dataset"]
    model = load_aligned(out)
    images = torch.randn(3, 3, 64, 64)
    embed = 2 * int(model.backbone.embed_dim)
    assert model.encode_image(images).shape == (3, embed)
    assert model.encode_text(["a red circle", "a blue star"]).shape == (2, embed)
    patches = model.encode_patches(images)
    assert patches.shape == (3, 8, 8, embed)
    # a patch embedding reads the patch half of a text embedding; the head's mean patch is the image's
    assert torch.allclose(patches[..., embed // 2:].mean(dim=(1, 2)), model.encode_image(images)[:, embed // 2:],
                          atol=1e-5)


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(run: TinyRun, tmp_path: Path) -> None:
    def stop_at_4(recipe: object, step: int) -> None:
        if step == 4:
            raise Interrupt

    with one_thread():
        assert align.main(argv(run, tmp_path / "clean", SHORT)) == 0
        with pytest.raises(Interrupt):
            align.main(argv(run, tmp_path / "broken", SHORT), hooks=[stop_at_4])
        assert not (tmp_path / "broken" / "manifest.json").exists()
        assert align.main(argv(run, tmp_path / "broken", SHORT)) == 0
    clean = load_file(str(tmp_path / "clean" / "text.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "text.safetensors"))
    assert clean.keys() == resumed.keys()
    for key in clean:
        assert torch.equal(clean[key], resumed[key]), key
    assert read_manifest(tmp_path / "broken")["resumed"] is True


def test_shuffled_captions_move_every_caption_once() -> None:
    captions = {f"k{i}": f"caption {i}" for i in range(7)}
    shuffled = shuffled_captions(captions, seed=0)
    assert shuffled.keys() == captions.keys()
    assert sorted(shuffled.values()) == sorted(captions.values())
    assert all(shuffled[k] != captions[k] for k in captions)
    assert shuffled == shuffled_captions(captions, seed=0)


def test_tokenizer_counts_what_it_truncates() -> None:
    tokenizer = Tokenizer(8)
    assert tokenizer.fits("a red circle")
    long = "a large red circle and a small blue star on a striped background"
    assert not tokenizer.fits(long)
    tokens = tokenizer([long])[0]
    assert tokens.shape == (8,) and int(tokens[-1]) == int(tokens.max())  # end-of-text kept last: pooled there


# --------------------------------------------------------------------------- bad input


def captioned_dataset(out: Path, captions: list[str | None]) -> Path:
    from gramline.data.synthetic import CLASSES, render_sample

    with DatasetWriter(out, stage="test", config={}) as writer:
        for i, caption in enumerate(captions):
            s = render_sample(0, i, 32)
            writer.add("train", ShardSample(key=f"s-{i:04d}", image=encode_png(s.image), image_ext="png",
                                            label=s.label, label_name=CLASSES[s.label], source="test",
                                            caption=caption, width=32, height=32))
        writer.close(classes=list(CLASSES), stats={})
    return out


@pytest.mark.parametrize("captions, needle", [
    (["a red circle", None, "a blue star"], "s-0001"),
    (["a red circle", "   ", "a blue star"], "empty caption"),
])
def test_missing_or_empty_caption_exits_2_naming_the_sample(run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            captions: list, needle: str) -> None:
    dataset = captioned_dataset(tmp_path / "ds", captions)
    out = tmp_path / "out"
    assert stage_exit_code(align.main_cli, argv(run, out, SHORT, dataset)) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists()


def test_long_captions_are_truncated_and_counted(run: TinyRun, tmp_path: Path) -> None:
    long = "a large red circle and a small blue star and a small green ring on a striped background"
    dataset = captioned_dataset(tmp_path / "ds", ["a red circle"] * 6 + [long] * 2)
    out = tmp_path / "out"
    with one_thread():
        assert align.main(argv(run, out, [*SHORT, "train.steps=1", "text.context_length=12"], dataset)) == 0
    assert read_manifest(out)["captions"] == {"train": 8, "truncated": 2, "shuffled": False}


def test_a_backbone_that_does_not_load_exits_2(run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((run.pretrain / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps(manifest))
    (broken / "backbone.safetensors").write_bytes(b"not safetensors")
    code = stage_exit_code(align.main_cli, ["--model", str(broken), "--dataset", str(run.dataset),
                                            "--out-model", str(tmp_path / "out"), *sets(SHORT)])
    assert code == 2
    assert "backbone.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_dataset_without_captions_exits_2(run: TinyRun, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = captioned_dataset(tmp_path / "ds", [None, None])
    assert stage_exit_code(align.main_cli, argv(run, tmp_path / "out", SHORT, dataset)) == 2
    assert "has no caption" in capsys.readouterr().err


def test_write_synthetic_dataset_indexes_captions(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    write_synthetic_dataset(tmp_path / "ds", n_train=4, n_eval=2, size=32)
    index = pq.read_table(tmp_path / "ds" / "index.parquet")
    assert all(c and c.endswith("background") for c in index.column("caption").to_pylist())


def test_a_distill_output_stands_for_its_largest_student_or_the_named_one(tmp_path: Path) -> None:
    from gramline.artifacts import build_manifest, write_manifest
    from gramline.errors import InputError

    out = tmp_path / "distill"
    for name, size in (("small", 10), ("big", 100)):
        (out / "students" / name).mkdir(parents=True)
        (out / "students" / name / "backbone.safetensors").write_bytes(b"x" * size)
    write_manifest(out, build_manifest("Model", "distill", config={}, inputs=[], counts={}, metrics={},
                                       students={"small": "students/small", "big": "students/big"}))
    assert backbone_dir(out, None) == out / "students" / "big"
    assert backbone_dir(out, "small") == out / "students" / "small"
    with pytest.raises(InputError, match="align.student"):
        backbone_dir(out, "medium")


# --------------------------------------------------------------------------- --init-from


def timm_weights(path: Path, arch: str = "tiny", seed: int = 0) -> Path:
    """A stand-in for public weights: a plain timm model of `arch` saved as safetensors."""
    a = ARCHS[arch]
    torch.manual_seed(seed)
    model = timm.create_model(a.timm_name, pretrained=False, **a.timm_kwargs(64))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("captioned") / "dataset"
    write_synthetic_dataset(path, n_train=16, n_eval=4, size=64, seed=3)
    return path


def test_init_from_aligns_timm_weights_as_they_are(captioned: Path, tmp_path: Path) -> None:
    weights = timm_weights(tmp_path / "public.safetensors")
    spec = f"timm:vit_small_patch16_dinov3_qkvb@{weights}"
    out = tmp_path / "aligned"
    with one_thread():
        assert align.main(["--init-from", spec, "--dataset", str(captioned), "--out-model", str(out),
                           "--preset", "tiny", *sets([*SHORT, "train.steps=2", "images.size=64"])]) == 0
    before, after = load_file(str(weights)), load_file(str(out / "backbone.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    manifest = read_manifest(out, "Model")
    assert manifest["arch"] == "tiny" and manifest["timm"]["name"] == "vit_small_patch16_dinov3_qkvb"
    assert manifest["init_from"]["spec"] == spec and [i["name"] for i in manifest["inputs"]] == ["dataset"]
    assert manifest["text_tower"]["backbone"] == spec and manifest["text_tower"]["image_size"] == 64
    model = load_aligned(out)
    images = torch.randn(2, 3, 64, 64)
    reference = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, **manifest["timm"]["kwargs"])
    reference.load_state_dict(before)
    assert torch.equal(model.backbone_tokens(images), reference.eval().forward_features(images))
    embed = 2 * int(model.backbone.embed_dim)
    assert model.encode_image(images).shape == (2, embed) and model.encode_text(["a red circle"]).shape == (1, embed)


def test_model_and_init_from_are_one_or_the_other(captioned: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    weights = timm_weights(tmp_path / "public.safetensors")
    out = tmp_path / "out"
    rest = ["--dataset", str(captioned), "--out-model", str(out), "--preset", "tiny", *sets(SHORT)]
    both = ["--model", str(tmp_path), "--init-from", f"timm:vit_small_patch16_dinov3_qkvb@{weights}"]
    for flags in (both, []):
        assert stage_exit_code(align.main_cli, [*flags, *rest]) == 2
        err = capsys.readouterr().err
        assert "--model" in err and "--init-from" in err
    assert not out.exists()
