"""Every config key of every stage is read by the code that runs the stage, not only by its validators.

The tiny DAG runs in this process (curate → pretrain → anchor → gram → highres → distill → align →
benchmark) while
attribute reads of config sections are recorded; reads inside config validation do not count. A
key that nothing reads fails the test (a key that does nothing is a promise the code does not keep).
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from gramline.config import Strict
from gramline.curate.config import CurateConfig
from gramline.eval.anchor import AnchorConfig
from gramline.eval.benchmark import BenchmarkConfig
from gramline.train.recipes.align.config import AlignConfig
from gramline.train.recipes.dino.config import DinoConfig, GramStageConfig, HighresStageConfig
from gramline.train.recipes.distill.config import DistillConfig

# Keys read only on paths a tiny CPU run does not take, each with the code that reads it.
NOT_ON_THE_TINY_PATH = {
    **{("EmbedConfig", key): "curate/embed.py build_embedder, for embed.backbone=timm:<name> or model:<dir>"
       for key in ("weights", "pretrained", "kwargs", "img_size", "batch_size", "threads", "device", "workers")},
    ("PartitionConfig", "work_root"): "curate/pipeline.py and stages/curate_partition.py, when partitions are "
                                      "kept across runs (tests/test_curate_partitions.py)",
}
# Keys whose whole job is to derive another key when the config is resolved.
DERIVING = {
    ("GramPhase", "gram_size_factor"): "sets crops.gram_size (the Gram crops' side) when it is not given",
}


def leaf_keys(cls: type[BaseModel]) -> set[tuple[str, str]]:
    """(section class, field) of every field of `cls` and of the config sections below it."""
    keys: set[tuple[str, str]] = set()
    for name, info in cls.model_fields.items():
        keys.add((cls.__name__, name))
        for arg in (info.annotation, *typing.get_args(info.annotation)):
            if isinstance(arg, type) and issubclass(arg, Strict):
                keys |= leaf_keys(arg)
    return keys


@contextlib.contextmanager
def record_reads() -> Iterator[set[tuple[str, str]]]:
    reads: set[tuple[str, str]] = set()
    validating = [0]
    fields = {}

    def getattribute(self: BaseModel, name: str) -> object:
        cls = type(self)
        if not validating[0] and name in fields.setdefault(cls, set(cls.model_fields)):
            reads.add((cls.__name__, name))
        return object.__getattribute__(self, name)

    original_validate = BaseModel.model_validate.__func__  # type: ignore[attr-defined]
    original_init = BaseModel.__init__

    def model_validate(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        validating[0] += 1
        try:
            return original_validate(cls, *args, **kwargs)
        finally:
            validating[0] -= 1

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        validating[0] += 1
        try:
            original_init(self, *args, **kwargs)
        finally:
            validating[0] -= 1

    Strict.__getattribute__ = getattribute  # type: ignore[method-assign,assignment]
    BaseModel.model_validate = classmethod(model_validate)  # type: ignore[method-assign,assignment]
    BaseModel.__init__ = init  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        del Strict.__getattribute__
        BaseModel.model_validate = classmethod(original_validate)  # type: ignore[method-assign,assignment]
        BaseModel.__init__ = original_init  # type: ignore[method-assign]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.slow
def test_every_config_key_is_read_by_the_stage_that_has_it(tmp_path: Path) -> None:
    from phase_run import one_thread

    from gramline.stages import align, anchor, benchmark, curate, distill, gram, highres, pretrain

    data, runs = tmp_path / "data", tmp_path
    short = sets("train.steps=4", "train.batch_size=8", "train.checkpoint_every=2", "train.teacher_checkpoint_every=2",
                 "train.log_every=2")
    with one_thread(), record_reads() as reads:
        assert curate.main(["--source", "synthetic:n=120,size=48,seed=0", "--out-dataset", str(data),
                            *sets("split.eval_fraction=0.3")]) == 0
        # pretrain's teacher checkpoints by count over the run (every 2 of 4 steps), the others' by cadence
        assert pretrain.main(["--dataset", str(data), "--out-model", str(runs / "pretrain"),
                              *sets("train.steps=4", "train.batch_size=8", "train.checkpoint_every=2",
                                    "train.teacher_checkpoints=2", "train.log_every=2")]) == 0
        assert anchor.main(["--model", str(runs / "pretrain"), "--dataset", str(data), "--out-model",
                            str(runs / "anchor"), *sets("anchor.images=8")]) == 0
        assert gram.main(["--model", str(runs / "pretrain"), "--anchor", str(runs / "anchor"), "--dataset", str(data),
                          "--out-model", str(runs / "gram"), *sets("phase.steps=2", "phase.refresh_at=[1]",
                                                                   "train.batch_size=8")]) == 0
        assert highres.main(["--model", str(runs / "gram"), "--dataset", str(data), "--out-model",
                             str(runs / "highres"), *short]) == 0
        assert distill.main(["--teacher", str(runs / "highres"), "--dataset", str(data), "--out-model",
                             str(runs / "distill"), *sets("train.steps=2", "train.batch_size=8")]) == 0
        assert align.main(["--model", str(runs / "distill"), "--dataset", str(data), "--out-model", str(runs / "align"),
                           *sets("train.steps=2", "train.batch_size=8", "images.augment=true")]) == 0
        assert benchmark.main(["--model", f"highres={runs / 'highres'}", "--model", "random=random:tiny",
                               "--model", f"align={runs / 'align'}",
                               "--eval-dataset", str(data), "--out-metrics", str(runs / "metrics"),
                               "--out-report", str(runs / "report"),
                               *sets("linear.epochs=2", "seg.steps=2", "dense.images=4", "report.images=2")]) == 0
    expected = set()
    roots = (CurateConfig, DinoConfig, AnchorConfig, GramStageConfig, HighresStageConfig, DistillConfig, AlignConfig,
             BenchmarkConfig)
    for root in roots:
        expected |= leaf_keys(root)
    labels = {(root.__name__, "preset") for root in roots}
    unread = sorted(expected - reads - labels - set(NOT_ON_THE_TINY_PATH) - set(DERIVING))
    assert unread == [], f"config keys nothing reads: {unread}"
    assert not reads & (set(NOT_ON_THE_TINY_PATH) | set(DERIVING)), "an exception above is read after all"
