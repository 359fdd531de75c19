"""A tiny pretrain run shared by the anchor, gram and highres tests (made once per test session).

Each of those test modules has a session-scoped fixture that calls `tiny_run(tmp_path_factory)`;
the run lives under the session's base temp directory, so whichever module runs first makes it
and the others reuse it (its manifest is written last, so a present manifest means complete).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from gramline.data.augment import IMAGENET_MEAN, IMAGENET_STD
from gramline.train.checkpoint import latest_checkpoint

PRETRAIN_STEPS = 20
BATCH = 8
PRETRAIN_OVERRIDES = [f"train.steps={PRETRAIN_STEPS}", f"train.batch_size={BATCH}", "train.checkpoint_every=10",
                      "train.teacher_checkpoint_every=10", "train.log_every=10"]


@dataclass(frozen=True)
class TinyRun:
    dataset: Path
    pretrain: Path
    steps: int = PRETRAIN_STEPS


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors run several times faster on one thread on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_run(factory: pytest.TempPathFactory) -> TinyRun:
    from gramline.data.synthetic import write_synthetic_dataset
    from gramline.stages import pretrain

    root = factory.getbasetemp() / "phase_tiny_run"
    run = TinyRun(root / "dataset", root / "pretrain")
    if (run.pretrain / "manifest.json").is_file():
        return run
    root.mkdir(exist_ok=True)
    if not (run.dataset / "manifest.json").is_file():
        write_synthetic_dataset(run.dataset, n_train=96, n_eval=32, size=64, seed=3)
    with one_thread():
        code = pretrain.main(["--dataset", str(run.dataset), "--out-model", str(run.pretrain), "--preset", "tiny",
                              *[a for o in PRETRAIN_OVERRIDES for a in ("--set", o)]])
    assert code == 0
    return run


def sets(overrides: Sequence[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def stage_exit_code(main_cli, argv: Sequence[str]) -> int:  # type: ignore[no-untyped-def]
    """Run a stage's CLI entry in-process; its exit code (0, 2, ...)."""
    with pytest.raises(SystemExit) as exit_info:
        main_cli(list(argv))
    return int(exit_info.value.code or 0)


def final_state(out: Path) -> dict:
    """The model state of a stage run's latest checkpoint."""
    path = latest_checkpoint(out / "state")
    assert path is not None
    return torch.load(path / "model.pt", map_location="cpu", weights_only=True)


def to_uint8(crops: torch.Tensor) -> np.ndarray:
    """Normalised crops [N, 3, H, W] back to uint8 images [N, H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (crops * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def random_vit(name: str, kwargs: dict, seed: int) -> torch.nn.Module:
    """A timm ViT with every weight random and away from its init (LayerScale and biases near 0.5),
    so a tensor loaded into the wrong place changes the outputs."""
    import timm

    vit = timm.create_model(name, pretrained=False, **kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in vit.parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(noise * 0.1 if param.ndim > 1 else 0.5 + 0.3 * noise)
    return vit.eval()
