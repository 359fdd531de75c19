"""What a recipe gets from the loop at build time: the device and process group, autocast, step-section timing."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gramline.train.distributed import DistEnv


@dataclass
class Runtime:
    env: DistEnv
    precision: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU; bf16; fp32
    section_times: dict[str, float] | None = None  # set to {} to time step sections (bench/)

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        if self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Accumulate wall time per step section when `section_times` is a dict (benchmarks only)."""
        if self.section_times is None:
            yield
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.section_times[name] = self.section_times.get(name, 0.0) + time.perf_counter() - start
