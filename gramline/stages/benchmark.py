"""Benchmark stage: global and dense probes of every model, side by side, plus the report.

    python -m gramline.stages.benchmark --model NAME=SPEC [--model ...] --eval-dataset DIR
        --out-metrics DIR --out-report DIR [--out-html FILE] [--out-markdown FILE]
        [--preset NAME] [--config FILE] [--set key=value ...] [--executor-output FILE]

SPEC is a Model artifact directory (the distill stage's output stands for each of its students,
`NAME.<student>`), `timm:<timm name>[@<weights file>]` or `random:<arch>` (a seeded random-init
baseline). On the eval split: k-NN and a linear probe on its labels, a
segmentation probe on its masks, and the label-free dense diagnostics (patch correspondence,
Gram similarity to a reference model). Whatever cannot run is skipped and the report says why;
exit 2 when a model or the dataset is unusable, or nothing at all can be measured. The work
is done in gramline.eval.benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gramline.errors import InputError
from gramline.eval.benchmark import BenchmarkRequest, load_benchmark_config, run_benchmark
from gramline.eval.features import expand_students, parse_model_spec
from gramline.stages.common import emit_executor_output, parse_named, run_stage, stage_parser

STAGE = "benchmark"


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(STAGE, "Benchmark models: k-NN, linear and segmentation probes, dense diagnostics, report.")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=SPEC",
                        help="NAME=DIR, NAME=timm:<name>[@weights] or NAME=random:<arch>; repeatable")
    parser.add_argument("--eval-dataset", type=Path, required=True, help="Dataset artifact with an eval split")
    parser.add_argument("--out-metrics", type=Path, required=True, help="output dir: metrics.json + manifest")
    parser.add_argument("--out-report", type=Path, required=True, help="output dir: report.html, report.md, images/")
    parser.add_argument("--out-html", type=Path, default=None, help="also write the HTML page to this file")
    parser.add_argument("--out-markdown", type=Path, default=None, help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    if not args.model:
        raise InputError("--model", "none given", "at least one NAME=SPEC")
    config = load_benchmark_config(args.preset, args.config, args.overrides)
    specs = expand_students([parse_model_spec(name, value) for name, value in
                             parse_named(args.model, "--model").items()])
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
