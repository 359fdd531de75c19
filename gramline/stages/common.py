"""What every stage entry point shares: common flags, the exit-code contract, executor output.

Flags common to all stages:
  --preset NAME          named preset (default: tiny)
  --config FILE          YAML config merged over the preset
  --set key=value        dotted override, repeatable
  --overrides JSON       a JSON object of dotted overrides (what KFP components pass); applied
                         before the --set ones
  --executor-output FILE where KFP wants the ExecutorOutput JSON ({{$.outputs.output_file}})
  --output-uri NAME=URI  the KFP URI of output artifact NAME (its `.uri` placeholder), repeatable
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gramline.artifacts import uri_for, write_executor_output
from gramline.errors import BAD_INPUT_EXIT_CODE, TRANSIENT_EXIT_CODE, InputError, TransientError


class StageArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as exit 2 with one line (its default is also 2)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "overrides_json", None) is not None:
            parsed.overrides = json_overrides(parsed.overrides_json) + list(parsed.overrides)
        return parsed


def json_overrides(text: str) -> list[str]:
    """`{"train.steps": 10, "optim.lr": {"peak": 1e-3}}` → ["train.steps=10", "optim.lr={...}"]."""
    try:
        value = json.loads(text) if text.strip() else {}
    except ValueError as err:
        raise InputError("--overrides", f"is not valid JSON ({err})", 'a JSON object such as {"train.steps": 10}') from None
    if not isinstance(value, dict):
        raise InputError("--overrides", f"is a JSON {type(value).__name__}", 'a JSON object such as {"train.steps": 10}')
    return [f"{key}={json.dumps(item)}" for key, item in value.items()]


def stage_parser(stage: str, description: str) -> StageArgumentParser:
    parser = StageArgumentParser(prog=f"python -m gramline.stages.{stage}", description=description)
    parser.add_argument("--preset", default="tiny", help="named preset (default: tiny)")
    parser.add_argument("--config", type=Path, default=None, help="YAML config merged over the preset")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable (e.g. --set train.steps=100)")
    parser.add_argument("--overrides", dest="overrides_json", default=None, metavar="JSON",
                        help='JSON object of dotted overrides, e.g. {"train.steps": 100}')
    parser.add_argument("--executor-output", type=Path, default=None,
                        help="path for the KFP ExecutorOutput JSON ({{$.outputs.output_file}})")
    parser.add_argument("--output-uri", action="append", default=[], metavar="NAME=URI",
                        help="KFP URI of an output artifact, repeatable")
    return parser


def parse_named(items: Sequence[str], flag: str) -> dict[str, str]:
    """Parse repeated NAME=VALUE flags, rejecting malformed or duplicate names."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise InputError(f"{flag} {item!r}", "is malformed", "NAME=VALUE")
        if name in out:
            raise InputError(f"{flag} {item!r}", f"repeats the name {name!r}", "each name once")
        out[name] = value
    return out


def emit_executor_output(
    args: argparse.Namespace,
    artifacts: Mapping[str, tuple[Path, Mapping[str, Any]]],
    parameters: Mapping[str, Any] | None = None,
) -> None:
    """Write the executor output: `artifacts` maps output name → (local path, metadata)."""
    uris = parse_named(args.output_uri, "--output-uri")
    write_executor_output(
        args.executor_output,
        {name: (uri_for(path, uris.get(name)), meta) for name, (path, meta) in artifacts.items()},
        parameters,
    )


def run_stage(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> NoReturn:
    """Run a stage's main: InputError → one clear paragraph on stderr and exit 2; TransientError
    (a service still failing after its retries) → the same, exit 75, so that a retry may follow."""
    try:
        code = main(argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT_EXIT_CODE)
    except TransientError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(TRANSIENT_EXIT_CODE)
    sys.exit(code or 0)
