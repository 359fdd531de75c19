"""Compile the gramline pipeline to KFP IR YAML.

    python pipeline/compile.py [--profile P] [--image I | --image-registry REG] [--output F] [--pvc CLAIM]
                               [--state-root URI] [--train-gpus N] [--gpu-product P] [--memory Q] [--ephemeral-storage Q]
                               [--node-selector K=V ...] [--toleration K[=V][:EFFECT] ...] [--queue NAME]
                               [--image-pull-secret NAME ...] [--components DIR]
                               [--shards-uri s3://B/P] [--from-dataset URI] [--from-model STAGE=URI ...]

With a GPU profile, pass `--shards-uri s3://bucket/prefix`: curate publishes the shards there and the
training pods stream them rather than download them with the Dataset (docs/running.md, "Moving data").

Writes `gramline.yaml` at the repository root by default; submit it with
`kfp run submit -e EXP -f gramline.yaml key=value ...` (parameters: see the YAML's header).
Deployment profiles (parameter defaults + per-task Kubernetes settings): gramline/kfp/profiles.py.
The default image is the profile's variant (GPU profiles: gramline-cuda, tiny: gramline) tagged
`<version>-<content hash>`, as `python images/build.py` tags what it builds; `--image-registry REG`
prefixes it with REG/. `--preset P` is the deprecated name of `--profile P`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    try:
        from gramline.errors import BAD_INPUT_EXIT_CODE, InputError
        from gramline.kfp.components import DEFAULT_IMAGE, IMAGE_REFERENCE, check_image
        from gramline.kfp.pipeline import (
            BENCHMARK,
            active_stages,
            compile_components,
            compile_pipeline,
            default_image,
            left_out,
        )
        from gramline.kfp.profiles import (
            DEFAULT_PROFILE,
            add_profile_option,
            add_scheduling_options,
            scheduled_profile,
        )
    except ModuleNotFoundError as err:
        print(f"compile.py: error: {err.name} is not installed (pip install -e '.[pipeline]')", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="pipeline/compile.py", description=__doc__.splitlines()[0])
    add_profile_option(parser, default=DEFAULT_PROFILE)
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--image", default=None,
                        help="image every task runs (default: the profile's variant, tagged <version>-<content hash>)")
    images.add_argument("--image-registry", default=None, metavar="REG",
                        help="registry (and path) of the default image, e.g. ghcr.io/org")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "gramline.yaml", help="default: <repo>/gramline.yaml")
    parser.add_argument("--pvc", default=None, help="PersistentVolumeClaim mounted at /data in every task")
    parser.add_argument("--state-root", default=None, metavar="URI",
                        help="s3://bucket/prefix or a directory under /data (with --pvc) where the training tasks "
                             "keep their checkpoints per run, so that a retried task resumes (default with --pvc "
                             "on a profile with retries: /data/gramline-state)")
    add_scheduling_options(parser)
    parser.add_argument("--components", type=Path, default=None,
                        help=f"also write one component YAML per stage into this directory (image {DEFAULT_IMAGE} "
                             "unless --image)")
    args = parser.parse_args(argv)
    try:
        profile = scheduled_profile(args, args.pvc)
        if args.image_registry is not None and not IMAGE_REFERENCE.fullmatch(f"{args.image_registry.rstrip('/')}/gramline"):
            raise InputError(f"--image-registry {args.image_registry!r}", "is not a registry path",
                             "host[:port][/path] in lower case, e.g. ghcr.io/org")
        image = check_image(args.image or default_image(profile, args.image_registry))
        path = compile_pipeline(args.output, profile, image)
        skipped = left_out(active_stages(), profile.imports)
        stages = " -> ".join([s.name + ("(imported)" if s.name in profile.imports else "")
                              for s in active_stages() if s.name not in skipped] + [BENCHMARK.name])
        print(f"pipeline {stages} (profile {profile.name}, image {image}) -> {path}")
        if args.components is not None:
            for written in compile_components(args.components, args.image or DEFAULT_IMAGE):
                print(f"component -> {written}")
    except InputError as err:
        print(f"compile.py: error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
