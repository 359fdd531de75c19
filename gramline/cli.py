"""The `gramline` command: data tools and shortcuts to the stages.

  gramline data synth --out DIR --n N --size S     procedural Dataset artifact (train + eval split)
  gramline data digits --out DIR                   scikit-learn's handwritten digits as a Dataset
  gramline export --model DIR --to FORMAT --out P  a Model in another layout: transformers (directory P)
                                                   or official (teacher_checkpoint.pth file P)
  gramline run [--profile P] [--runner R] ...      the compiled pipeline on this machine (kfp.local),
                                                   as processes or in Docker
  gramline rerun STAGE --input NAME=PATH ...       one stage of the compiled pipeline on your directories,
                                                   in its container or as a process
  gramline <stage> ...                             same as `python -m gramline.stages.<stage> ...`

`gramline COMMAND --help` shows a command's options.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

from gramline.errors import BAD_INPUT_EXIT_CODE, InputError
from gramline.stages import STAGES


def _data_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="gramline data")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write a procedural shapes-world Dataset artifact")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--n", type=int, default=2000, help="number of train images")
    synth.add_argument("--n-eval", type=int, default=None, help="held-out eval images (default n/4)")
    synth.add_argument("--size", type=int, default=64, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--shard-max-count", type=int, default=1000)
    synth.add_argument("--shard-max-bytes", type=int, default=256 << 20)
    synth.add_argument("--colour-class-prior", type=float, default=0.0,
                       help="probability that the main object has its class's colour (default 0: independent)")
    digits = sub.add_parser("digits", help="scikit-learn's handwritten digits as a Dataset artifact")
    digits.add_argument("--out", type=Path, required=True)
    digits.add_argument("--size", type=int, default=32)
    digits.add_argument("--eval-fraction", type=float, default=0.5)
    digits.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "synth":
        from gramline.data.synthetic import write_synthetic_dataset

        n_eval = args.n_eval if args.n_eval is not None else max(1, args.n // 4)
        manifest = write_synthetic_dataset(
            args.out, n_train=args.n, n_eval=n_eval, size=args.size, seed=args.seed,
            shard_max_count=args.shard_max_count, shard_max_bytes=args.shard_max_bytes,
            colour_class_prior=args.colour_class_prior,
        )
    else:
        from gramline.data.digits import write_digits_dataset

        manifest = write_digits_dataset(args.out, size=args.size, eval_fraction=args.eval_fraction, seed=args.seed)
    print(f"dataset written to {args.out} ({manifest['splits']})")
    return 0


def _export_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gramline export",
        description="Write a gramline Model artifact's backbone in a layout other tools load.",
        epilog="--to transformers: OUT is a directory (config.json, model.safetensors, preprocessor_config.json) "
               "for transformers.AutoModel.from_pretrained (DINOv3ViTModel). --to official: OUT is the checkpoint "
               "file to write, e.g. DIR/teacher_checkpoint.pth, in the official DINOv3 layout "
               "({'teacher': {backbone.*, dino_head.*, ibot_head.*}}; heads when the Model has heads.safetensors).",
    )
    parser.add_argument("--model", type=Path, required=True, help="the Model artifact directory")
    parser.add_argument("--to", required=True, choices=("transformers", "official"), help="the layout to write")
    parser.add_argument("--out", type=Path, required=True,
                        help="a directory (transformers) or a .pth file path (official); replaced if present")
    args = parser.parse_args(argv)
    from gramline.models.formats import export_model

    out = export_model(args.model, args.to, args.out)
    print(f"{args.to} export of {args.model} written to {out}")
    return 0


def usage() -> str:
    """The module docstring plus the stages this build has (a stage module may be absent)."""
    present = [stage for stage in STAGES if importlib.util.find_spec(f"gramline.stages.{stage}") is not None]
    return f"{__doc__.rstrip()}\n\nStages: {', '.join(present)}.\n"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else BAD_INPUT_EXIT_CODE)
    command, rest = argv[0], argv[1:]
    try:
        if command == "data":
            sys.exit(_data_main(rest))
        if command == "export":
            sys.exit(_export_main(rest))
        if command in STAGES:
            module = importlib.import_module(f"gramline.stages.{command}")
            module.main_cli(rest)
        if command in ("run", "rerun"):
            importlib.import_module("gramline.kfp.local_run").main_cli(command, rest)
    except InputError as err:
        print(f"gramline {command}: error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("gramline."):
            print(f"gramline: '{command}' is not available in this build ({err.name} missing)", file=sys.stderr)
            sys.exit(BAD_INPUT_EXIT_CODE)
        raise
    print(f"gramline: unknown command {command!r}; expected data, export, run, rerun or one of {', '.join(STAGES)}",
          file=sys.stderr)
    sys.exit(BAD_INPUT_EXIT_CODE)
