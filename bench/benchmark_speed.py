"""How long the tiny-preset benchmark stage takes for two models (target: under 2 minutes on 2 cores).

    python bench/benchmark_speed.py [--model DIR] [--n-eval 500] [--threads 1 0] [--out DIR]

Runs `python -m gramline.stages.benchmark --preset tiny` end to end (a fresh process, so imports
count) on a procedural eval split, comparing a random-init baseline with a second model: the Model
artifact given by --model (e.g. the tiny pretrain output), or else a seeded tiny backbone exported
as a Model artifact. Each `--threads` value is one run (`--set threads=N`; 0 = torch's default);
the report is wall and CPU seconds per run and the wall time's ratio to the 120 s budget. On a
shared machine CPU seconds are the steadier number: wall time also counts waiting for the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 120.0


def tiny_model_dir(out: Path, dataset: Path) -> Path:
    from gramline.artifacts import build_manifest, lineage_entry, write_manifest
    from gramline.models.archs import ARCHS
    from gramline.models.io import BACKBONE_FILE, build_random_backbone, save_weights, timm_manifest_entry

    out.mkdir(parents=True, exist_ok=True)
    arch = ARCHS["tiny"]
    save_weights(out / BACKBONE_FILE, build_random_backbone("tiny", 64, seed=1).state_dict())
    write_manifest(out, build_manifest("Model", "bench", inputs=[lineage_entry("dataset", dataset)],
                                       timm=timm_manifest_entry(arch.timm_name, arch.timm_kwargs(64)), arch="tiny"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="second model (a Model artifact dir)")
    parser.add_argument("--dataset", type=Path, default=None, help="eval Dataset (default: a synthetic one)")
    parser.add_argument("--n-eval", type=int, default=500, help="eval images of the synthetic dataset")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="threads values to time")
    parser.add_argument("--out", type=Path, default=None, help="keep outputs here (default: a temp dir)")
    args = parser.parse_args()

    from gramline.data.synthetic import write_synthetic_dataset

    work = args.out or Path(tempfile.mkdtemp(prefix="gramline-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset
    if dataset is None:
        dataset = work / "eval-data"
        if not (dataset / "manifest.json").exists():
            write_synthetic_dataset(dataset, n_train=1, n_eval=args.n_eval, size=64, seed=0)
    from gramline.data.reader import open_dataset

    n_eval = open_dataset(dataset).splits.get("eval", 0)
    model = args.model or tiny_model_dir(work / "model", dataset)
    results = []
    for threads in args.threads:
        out = work / f"threads{threads}"
        cmd = [sys.executable, "-m", "gramline.stages.benchmark", "--preset", "tiny",
               "--model", "random=random:tiny", "--model", f"model={model}", "--eval-dataset", str(dataset),
               "--out-metrics", str(out / "metrics"), "--out-report", str(out / "report"),
               "--set", f"threads={threads}"]
        start = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            return proc.returncode
        per_model = [float(s) for s in re.findall(r"\] model: \d+/\d+ .* in ([\d.]+)s", proc.stdout)]
        results.append({"threads": threads, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "per_model_s": per_model,
                        "budget_ratio": round(wall / BUDGET_S, 3), "metrics": str(out / "metrics" / "metrics.json")})
        print(f"threads={threads}: {wall:.1f}s wall, {cpu:.1f}s CPU for 2 models on {n_eval} "
              f"eval images ({wall / BUDGET_S:.2f} of the {BUDGET_S:.0f}s budget); per model {per_model}", flush=True)
    load = os.getloadavg()[0]
    print(json.dumps({"cpus": os.cpu_count(), "load_avg_1m": round(load, 2), "eval_images": n_eval,
                      "runs": results}, indent=2))
    return 0 if all(r["wall_s"] < BUDGET_S for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
