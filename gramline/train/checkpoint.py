"""Complete, atomic training checkpoints under `<out>/state/step-XXXXXXXX/`.

A checkpoint directory holds `model.pt` (student, teacher, optimizer: full state dicts, so DDP and
FSDP2 runs save the same portable thing) and one `rank-R.pt` per rank (data position and RNG
states). It is written under a temp name and renamed, so a directory named `step-*` is always
complete; loading uses `weights_only=True`.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gramline.errors import InputError
from gramline.io import atomic_path, remove_stale_temps
from gramline.train import distributed

STEP_DIR = re.compile(r"^step-(\d{8})$")
META_FILE = "meta.json"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def list_checkpoints(state_dir: Path) -> list[tuple[int, Path]]:
    if not state_dir.is_dir():
        return []
    found = []
    for entry in state_dir.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / "model.pt").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(state_dir: Path) -> Path | None:
    found = list_checkpoints(state_dir)
    return found[-1][1] if found else None


def save_checkpoint(state_dir: Path, step: int, model_state: dict[str, Any] | None, rank_state: dict[str, Any],
                    rank: int, keep: int, meta: dict[str, Any] | None = None) -> Path:
    """Every rank calls this; rank 0 owns the directory and the rename. `meta` (small, JSON) goes to
    `meta.json`, so a resume check can read the run's config without loading the weights."""
    final = state_dir / f"step-{step:08d}"
    tmp_name = state_dir / f".step-{step:08d}.writing"
    if rank == 0:
        state_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(state_dir)
        shutil.rmtree(tmp_name, ignore_errors=True)
        tmp_name.mkdir()
    distributed.barrier()
    torch.save(rank_state, tmp_name / f"rank-{rank}.pt")
    if rank == 0 and model_state is not None:
        torch.save(model_state, tmp_name / "model.pt")
        if meta is not None:
            (tmp_name / META_FILE).write_text(json.dumps(meta, default=str))
    distributed.barrier()
    if rank == 0:
        with atomic_path(final) as tmp:
            tmp_name.rename(tmp)
        for _, old in list_checkpoints(state_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, Any], dict[str, Any]]:
    model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
    rank_file = path / f"rank-{rank}.pt"
    if not rank_file.is_file():
        raise InputError(str(path), f"has no training state for rank {rank}", "a resume with the same world size")
    rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
    return model_state, rank_state
