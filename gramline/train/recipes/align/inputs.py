"""What the align stage reads besides the dataset: the Model whose backbone it aligns."""

from __future__ import annotations

from pathlib import Path

from gramline.artifacts import read_manifest
from gramline.errors import InputError
from gramline.models.io import BACKBONE_FILE


def backbone_dir(model: Path, student: str | None) -> Path:
    """The Model directory to align: `model` itself, or one student of a distill output."""
    students = read_manifest(model, "Model", "--model").get("students") or {}
    if not students:
        if student is not None:
            raise InputError(f"config field 'align.student' ({student!r})", f"is set, but --model {model} is not a "
                             "distill output with students", "null, or a distill output as --model")
        return model
    if student is None:  # the largest: the one with the most backbone bytes
        student = max(students, key=lambda name: (model / students[name] / BACKBONE_FILE).stat().st_size
                      if (model / students[name] / BACKBONE_FILE).is_file() else -1)
    if student not in students:
        raise InputError(f"config field 'align.student' ({student!r})", f"is not a student of --model {model}",
                         "one of " + ", ".join(sorted(students)))
    return model / students[student]
