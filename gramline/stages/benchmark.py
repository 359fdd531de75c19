"""Benchmark stage: global and dense probes of every model, side by side, plus the report.

    python -m gramline.stages.benchmark --model NAME=SPEC [--model ...] --eval-dataset DIR
        --out-metrics DIR --out-report DIR [--out-html FILE] [--out-markdown FILE]
        [--start-model SPEC] [--preset NAME] [--config FILE] [--set key=value ...] [--executor-output FILE]

SPEC is a Model artifact directory (the distill stage's output stands for each of its students,
`NAME.<student>`), an official DINOv3 checkpoint file, `timm:<timm name>[@<weights file>]` (without a
file: timm's pretrained weights) or `random:<arch>` (a seeded random-init baseline). `--start-model SPEC`
(a pretrain `--init-from` spec; empty: none) adds the weights training started from as the model
`start`, loaded as pretrain loads them (fitted to a registered architecture), and makes it the
Gram reference (`dense.reference`) unless the config names another. On the eval split: k-NN and a
linear probe on its labels, a segmentation probe on its masks, and the label-free dense diagnostics
(patch correspondence, Gram similarity to a reference model). Whatever cannot run is skipped and
the report says why; exit 2 when a model or the dataset is unusable, or nothing at all can be
measured. The work is done in gramline.eval.benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gramline.errors import InputError
from gramline.eval.benchmark import BenchmarkRequest, load_benchmark_config, run_benchmark
from gramline.eval.features import expand_students, parse_model_spec, starting_model_spec
from gramline.stages.common import emit_executor_output, parse_named, run_stage, stage_parser

STAGE = "benchmark"
START = "start"  # the model name of --start-model


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "Benchmark models: k-NN, linear and segmentation probes, dense diagnostics, report.")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=SPEC",
                        help="NAME=DIR, NAME=timm:<name>[@weights] or NAME=random:<arch>; repeatable")
    parser.add_argument("--eval-dataset", type=Path, required=True, help="Dataset artifact with an eval split")
    parser.add_argument("--out-metrics", type=Path, required=True, help="output dir: metrics.json + manifest")
    parser.add_argument("--out-report", type=Path, required=True, help="output dir: report.html, report.md, images/")
    parser.add_argument("--out-html", type=Path, default=None, help="also write the HTML page to this file")
    parser.add_argument("--out-markdown", type=Path, default=None, help="also write the Markdown to this file")
    parser.add_argument("--start-model", default="", metavar="SPEC",
                        help=f"the weights training started from (a pretrain --init-from spec), compared as the model "
                             f"{START!r} and the Gram reference unless dense.reference names another; empty: none")
    args = parser.parse_args(argv)
    start = args.start_model.strip()
    if not args.model and not start:
        raise InputError("--model", "none given", "at least one NAME=SPEC")
    config = load_benchmark_config(args.preset, args.config, args.overrides)
    named = parse_named(args.model, "--model")
    specs = [parse_model_spec(name, value) for name, value in named.items()]
    if start:
        if START in named:
            raise InputError(f"--model {START}={named[START]}", f"takes the name {START!r} that --start-model uses",
                             "another NAME")
        specs.append(starting_model_spec(START, start))
        if config.dense.reference is None:
            config.dense.reference = START
    specs = expand_students(specs)
    request = BenchmarkRequest(specs, args.eval_dataset, args.out_metrics, args.out_report, args.out_html,
                               args.out_markdown)
    flat = run_benchmark(request, config)
    emit_executor_output(args, {
        "metrics": (args.out_metrics, flat),
        "report": (args.out_html or args.out_report, {}),
        "report_md": (args.out_markdown or args.out_report / "report.md", {}),
        "report_dir": (args.out_report, {}),  # the whole report folder (HTML, Markdown, PNG files)
    })
    print(f"[{STAGE}] metrics -> {args.out_metrics}, report -> {args.out_report}", flush=True)
    return 0


def main_cli(argv: Sequence[str] | None = None) -> None:
    run_stage(main, argv)


if __name__ == "__main__":
    main_cli(None)
