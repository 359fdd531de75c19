"""Compile the gramline pipeline to KFP IR YAML.

    python pipeline/compile.py [--profile P] [--image I] [--output F] [--pvc CLAIM] [--components DIR]

Writes `gramline.yaml` at the repository root by default; submit it with
`kfp run submit -e EXP -f gramline.yaml key=value ...` (parameters: see the YAML's header).
Deployment profiles (parameter defaults + per-task Kubernetes settings): gramline/kfp/profiles.py.
`--preset P` is the deprecated name of `--profile P`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    try:
        from gramline.errors import BAD_INPUT_EXIT_CODE, InputError
        from gramline.kfp.components import DEFAULT_IMAGE, check_image
        from gramline.kfp.pipeline import BENCHMARK, active_stages, compile_components, compile_pipeline
        from gramline.kfp.profiles import DEFAULT_PROFILE, add_profile_option, deployment_profile
    except ModuleNotFoundError as err:
        print(f"compile.py: error: {err.name} is not installed (pip install -e '.[pipeline]')", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="pipeline/compile.py", description=__doc__.splitlines()[0])
    add_profile_option(parser, default=DEFAULT_PROFILE)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help=f"image every task runs (default {DEFAULT_IMAGE})")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "gramline.yaml", help="default: <repo>/gramline.yaml")
    parser.add_argument("--pvc", default=None, help="PersistentVolumeClaim mounted at /data in every task")
    parser.add_argument("--components", type=Path, default=None,
                        help="also write one component YAML per stage into this directory")
    args = parser.parse_args(argv)
    try:
        check_image(args.image)
        profile = deployment_profile(args.profile, flag=args.profile_flag)
        path = compile_pipeline(args.output, profile.name, args.image, args.pvc)
        stages = " -> ".join([s.name for s in active_stages()] + [BENCHMARK.name])
        print(f"pipeline {stages} (profile {profile.name}, image {args.image}) -> {path}")
        if args.components is not None:
            for written in compile_components(args.components, args.image):
                print(f"component -> {written}")
    except InputError as err:
        print(f"compile.py: error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
