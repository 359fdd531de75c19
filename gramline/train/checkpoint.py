"""Complete, atomic training checkpoints over a run's stateful parts: `<out>/state/step-XXXXXXXX/`.

A checkpoint directory holds
- `model.pt`: `{"layout": 2, "step": S, <part name>: <part state dict>, ...}` for every part the
  recipe names (student, teacher, optimizer, ...), as full (unsharded) state dicts, so DDP and
  FSDP2 runs save the same portable thing; written by rank 0. A part that rank 0 does not hold (a
  distillation student trained on other ranks) is written by the lowest rank holding it, to
  `parts-rank-R.pt`, and `model.pt` names that file under `"stored"`;
- `rank-R.pt`: what differs per rank (RNG states, the NaN streak);
- `meta.json`: small facts (step, layout, the run's config) that can be read without the weights.

It is written under a temp name and renamed, so a directory named `step-*` is always complete.
Loading uses `weights_only=True`. Checkpoints of the first layout (no "layout" key; gramline 0.1)
are converted by the recipe's `upgrade` function, or refused with a message that says so.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from gramline.errors import InputError
from gramline.io import atomic_path, remove_stale_temps
from gramline.train import distributed

LAYOUT = 2
STEP_DIR = re.compile(r"^step-(\d{8})$")
MODEL_FILE = "model.pt"
META_FILE = "meta.json"
Upgrade = Callable[[dict[str, Any]], dict[str, Any]]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


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
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return []
    found = []
    for entry in state_dir.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and (entry / MODEL_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(state_dir: Path) -> Path | None:
    found = list_checkpoints(state_dir)
    return found[-1][1] if found else None


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's meta.json ({} when absent: checkpoints of the first layout may lack it)."""
    meta = Path(path) / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def read_model_state(path: Path, upgrade: Upgrade | None = None, mmap: bool = False) -> dict[str, Any]:
    """`model.pt` of a checkpoint in the current layout (converted from the first one by `upgrade`);
    `mmap` for a look that does not copy the weights into memory."""
    state = torch.load(Path(path) / MODEL_FILE, map_location="cpu", weights_only=True, mmap=mmap)
    layout = state.get("layout", 1)
    if layout == LAYOUT:
        return state
    if layout == 1 and upgrade is not None:
        return upgrade(state)
    raise InputError(str(path), f"is a checkpoint of layout {layout}, which this gramline version cannot read",
                     f"a checkpoint of layout {LAYOUT}" + (" or 1" if upgrade else "") +
                     " (written by a gramline version of the same training stage)")


class Checkpointer:
    """Saves and loads the parts of a run; every rank calls save/load (full state dicts of sharded
    parts are gathered collectively), rank 0 owns the directory and the rename. `on_saved`, when
    set, is called by rank 0 with each new complete checkpoint directory, which then holds every
    rank's files (gramline.train.state_sync mirrors it), before the ranks go on."""

    def __init__(self, state_dir: Path, rank: int, keep: int, upgrade: Upgrade | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.rank = rank
        self.keep = keep
        self.upgrade = upgrade
        self.on_saved: Callable[[Path], None] | None = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.state_dir)

    def save(self, step: int, parts: Mapping[str, Stateful], rank_state: Mapping[str, Any],
             meta: Mapping[str, Any]) -> Path:
        held = distributed.all_gather_objects(sorted(parts))  # the part names each rank holds
        writer = {name: min(r for r, names in enumerate(held) if name in names) for names in held for name in names}
        states = {name: part.state_dict() for name, part in parts.items()}  # on every holder: may be collective
        mine = {name: state for name, state in states.items() if writer[name] == self.rank}
        final = self.state_dir / f"step-{step:08d}"
        tmp = self.state_dir / f".step-{step:08d}.writing"
        if self.rank == 0:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.state_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        distributed.barrier()
        torch.save({"layout": LAYOUT, "step": step, **rank_state}, tmp / f"rank-{self.rank}.pt")
        if self.rank == 0:
            stored = {name: f"parts-rank-{r}.pt" for name, r in writer.items() if r != 0}
            torch.save({"layout": LAYOUT, "step": step, **mine, **({"stored": stored} if stored else {})},
                       tmp / MODEL_FILE)
            (tmp / META_FILE).write_text(json.dumps({"layout": LAYOUT, "step": step, **meta}, default=str))
        elif mine:
            torch.save(mine, tmp / f"parts-rank-{self.rank}.pt")
        distributed.barrier()
        if self.rank == 0:
            with atomic_path(final) as target:
                tmp.rename(target)
            for _, old in list_checkpoints(self.state_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
            if self.on_saved is not None:
                self.on_saved(final)
        distributed.barrier()
        return final

    def load(self, path: Path, parts: Mapping[str, Stateful], optional: Iterable[str] = ()) -> tuple[int, dict]:
        """Load `parts` from checkpoint `path`; a part named in `optional` may be absent from it.
        Returns (step, this rank's state). The files are memory-mapped: the ranks of a node share one
        copy in the page cache, and under FSDP2 each reads only the pages of its own shards."""
        state = read_model_state(path, self.upgrade, mmap=True)
        stored: dict[str, str] = state.get("stored", {})
        available = [k for k in state if k not in ("layout", "step", "stored")] + list(stored)
        missing = [name for name in parts if name not in available and name not in set(optional)]
        if missing:
            raise InputError(str(path), f"has no {', '.join(missing)} state",
                             "a checkpoint of the same kind of run (its parts: " + ", ".join(available) + ")")
        files: dict[str, dict[str, Any]] = {}
        for name, part in parts.items():
            if name in state:
                part.load_state_dict(state[name])
            elif name in stored:
                if stored[name] not in files:
                    files[stored[name]] = torch.load(Path(path) / stored[name], map_location="cpu", weights_only=True,
                                                     mmap=True)
                part.load_state_dict(files[stored[name]][name])
        rank_file = Path(path) / f"rank-{self.rank}.pt"
        if not rank_file.is_file():
            raise InputError(str(path), f"has no training state for rank {self.rank}",
                             "a resume with the same number of processes")
        return int(state["step"]), torch.load(rank_file, map_location="cpu", weights_only=True)
