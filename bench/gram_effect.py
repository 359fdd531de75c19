"""The Gram-anchoring experiment in small (DINOv3 paper §4): does anchoring to an
earlier checkpoint's patch-similarity structure bring dense quality back while global quality holds?

    python bench/gram_effect.py --out DIR [--preset tiny] [--pretrain-steps 3000] [--continue-steps 1000]
        [--eval-every 250] [--batch 64] [--workers 8] [--n-train 8000] [--n-eval 800] [--device auto|cpu]
        [--set key=value ...]            # overrides for the pretrain run (e.g. backbone.arch=small)
        [--gram-set key=value ...]       # overrides for both continuations (e.g. phase.weight=2)

1. A procedural-world Dataset (gramline.data.synthetic: labelled shapes with segmentation masks).
2. pretrain, with a teacher checkpoint every --eval-every steps; each checkpoint is probed on the eval
   split: k-NN top-1 (CLS), linear segmentation mIoU (patches) and patch correspondence (label-free).
3. anchor: the checkpoint with the best dense quality (the anchor stage's label-free choice).
4. Two continuations of the same run for the same number of steps through the gram stage, identical
   but for the Gram weight: (a) phase.weight=0 (no anchoring), (b) the preset's Gram weight.
5. Every checkpoint of both is probed the same way. Writes results.json, curves.png and prints a table.

On CPU keep it small (e.g. --pretrain-steps 120 --continue-steps 40 --eval-every 40 --batch 16
--n-train 512 --n-eval 200); the default sizes are for one GPU. The stages pick CUDA when present
(--device cpu hides it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


def probe_checkpoint(path: Path, data: Any, plan: dict[str, Any], seed: int = 0) -> dict[str, float]:
    import torch

    from gramline.eval.dense import patch_correspondence
    from gramline.eval.features import LoadedModel, ModelSpec, extract_features
    from gramline.eval.knn import knn_accuracy
    from gramline.eval.segprobe import seg_probe
    from gramline.models.io import load_backbone

    module, manifest = load_backbone(path)
    model = LoadedModel(path.name, ModelSpec(path.name, "dir", str(path)), module, manifest)
    size = model.native_size
    feats = extract_features(model, data.images, size, batch_size=128, label=f"{path.parent.parent.name}/{path.name}")
    labels = torch.from_numpy(data.labels)
    train, test = plan["knn_train"], plan["knn_test"]
    knn = knn_accuracy(feats.cls[train], labels[train], feats.cls[test], labels[test], ks=(10, 20))
    masks = torch.from_numpy(data.masks)
    seg = seg_probe(feats.patches[train], masks[train], feats.patches[test], masks[test], plan["seg_classes"],
                    steps=300, seed=seed)
    corr = patch_correspondence(module, data.images[:plan["dense_images"]], size, 0.6, seed)
    return {"step": int(manifest["step"]), "knn_top1": knn[20], "knn_top1_k10": knn[10], "seg_miou": seg.miou,
            "correspondence": corr}


def probe_run(model_dir: Path, data: Any, plan: dict[str, Any], min_step: int = 0) -> list[dict[str, float]]:
    from gramline.train.export import list_teacher_checkpoints

    rows = []
    for step, path in list_teacher_checkpoints(model_dir):
        if step > min_step:
            start = time.perf_counter()
            rows.append(probe_checkpoint(path, data, plan))
            r = rows[-1]
            print(f"[gram_effect] {model_dir.name} step {step}: kNN {r['knn_top1']:.3f} mIoU {r['seg_miou']:.3f} "
                  f"corr {r['correspondence']:.3f} ({time.perf_counter() - start:.1f}s)", flush=True)
    return rows


def plot(curves: dict[str, list[dict[str, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("knn_top1", "k-NN top-1 (CLS)"), ("seg_miou", "linear seg. mIoU (patches)"),
               ("correspondence", "patch correspondence")]
    styles = {"pretrain": ("black", "-"), "no_gram": ("tab:blue", "-"), "gram": ("tab:red", "-")}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    start = curves.get("pretrain", [])[-1:]  # continuations are drawn from the run's last checkpoint
    for ax, (key, label) in zip(axes, metrics):
        for name, rows in curves.items():
            if name != "pretrain":
                rows = start + rows
            if rows:
                color, line = styles.get(name, ("gray", "--"))
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], line, color=color, marker="o", ms=3,
                        label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--continue-steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-eval", type=int, default=800)
    parser.add_argument("--size", type=int, default=64, help="procedural image side")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads for the probes (0: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--gram-set", dest="gram_overrides", action="append", default=[])
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""

    import numpy as np
    import torch

    from gramline.artifacts import read_manifest
    from gramline.data.synthetic import write_synthetic_dataset
    from gramline.eval.features import load_eval_data, split_indices
    from gramline.stages import anchor, gram, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dataset, pre, anchor_dir = out / "dataset", out / "pretrain", out / "anchor"
    t0 = time.perf_counter()
    if not (dataset / "manifest.json").is_file():
        write_synthetic_dataset(dataset, n_train=args.n_train, n_eval=args.n_eval, size=args.size, seed=0)

    def sets(items: list[str]) -> list[str]:
        return [a for item in items for a in ("--set", item)]

    common = [f"train.batch_size={args.batch}", f"data.num_workers={args.workers}",
              f"train.teacher_checkpoint_every={args.eval_every}", f"train.checkpoint_every={args.eval_every}",
              "train.log_every=50", "train.keep_checkpoints=1"]
    stage_args = ["--dataset", str(dataset), "--preset", args.preset]
    code = pretrain.main([*stage_args, "--out-model", str(pre),
                          *sets([*common, f"train.steps={args.pretrain_steps}", *args.overrides])])
    assert code == 0
    t_pretrain = time.perf_counter() - t0
    if not (anchor_dir / "manifest.json").is_file():
        assert anchor.main(["--model", str(pre), "--dataset", str(dataset), "--out-model", str(anchor_dir),
                            "--preset", args.preset, *sets(["anchor.images=128"])]) == 0
    continuation = [*common, f"phase.steps={args.continue_steps}", "phase.refresh_at=[]", *args.gram_overrides]
    runs = {"no_gram": [*continuation, "phase.weight=0"], "gram": continuation}
    for name, overrides in runs.items():
        code = gram.main([*stage_args, "--model", str(pre), "--anchor", str(anchor_dir), "--out-model",
                          str(out / name), *sets(overrides)])
        assert code == 0
    t_train = time.perf_counter() - t0

    data = load_eval_data(dataset)
    train, test = split_indices(data.labels, 0.5, 0)
    plan = {"knn_train": train, "knn_test": test, "seg_classes": max(len(data.classes) + 1, int(data.masks.max()) + 1),
            "dense_images": min(128, data.n)}
    start_step = read_manifest(pre)["step"]
    curves = {"pretrain": probe_run(pre, data, plan), "no_gram": probe_run(out / "no_gram", data, plan, start_step),
              "gram": probe_run(out / "gram", data, plan, start_step)}
    anchor_manifest = read_manifest(anchor_dir)
    gram_manifest = read_manifest(out / "gram")
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "anchor_step": anchor_manifest["step"], "anchor_scores": anchor_manifest["anchor"].get("candidates"),
        "gram_phase": gram_manifest.get("gram_phase"), "curves": curves,
        "seconds": {"pretrain": t_pretrain, "train_total": t_train, "total": time.perf_counter() - t0},
    }
    pre_rows = curves["pretrain"]
    best_dense = max(pre_rows, key=lambda r: r["seg_miou"])
    result["summary"] = {
        "pretrain_best_miou": best_dense, "pretrain_end": pre_rows[-1],
        "end_no_gram": curves["no_gram"][-1], "end_gram": curves["gram"][-1],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(curves, out / "curves.png", f"Gram anchoring in small ({args.preset}, anchor = step "
                                     f"{anchor_manifest['step']}, device {result['device']})")
    print("\nrun                 step    kNN    mIoU   corr")
    for label, row in (("pretrain best mIoU", best_dense), ("pretrain end", pre_rows[-1]),
                       ("(a) no Gram", curves["no_gram"][-1]), ("(b) Gram", curves["gram"][-1])):
        print(f"{label:18s} {row['step']:6d}  {row['knn_top1']:.3f}  {row['seg_miou']:.3f}  {row['correspondence']:.3f}")
    mious = np.array([r["seg_miou"] for r in pre_rows])
    print(f"\npretrain mIoU peak at step {best_dense['step']} ({mious.max():.3f}), end {mious[-1]:.3f}; "
          f"anchor (label-free choice) = step {anchor_manifest['step']}; results in {out}/results.json, "
          f"curves in {out}/curves.png ({result['seconds']['total']:.0f}s)", file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
