"""Artifact manifests (docs/architecture.md) and the KFP executor output (https://www.kubeflow.org/docs/components/pipelines/user-guides/components/container-components/).

Every artifact directory holds `manifest.json`: kind, schema version, producing stage, resolved
config, the hashes of the inputs' manifests (lineage), counts, metrics and created-at.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from gramline import __version__
from gramline.errors import InputError
from gramline.io import write_json_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ArtifactKind = Literal["Dataset", "Model", "Metrics", "Report"]


def manifest_hash(directory: Path | str) -> str:
    """sha256 of an artifact's manifest bytes: the lineage key recorded by its consumers."""
    path = Path(directory) / MANIFEST
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lineage_entry(name: str, directory: Path | str) -> dict[str, Any]:
    manifest = read_manifest(directory)
    return {
        "name": name,
        "kind": manifest["kind"],
        "stage": manifest.get("stage"),
        "manifest_sha256": manifest_hash(directory),
        "path": str(directory),
    }


def build_manifest(
    kind: ArtifactKind,
    stage: str,
    config: Mapping[str, Any] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    counts: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "gramline_version": __version__,
        "config": dict(config or {}),
        "inputs": list(inputs or []),
        "counts": dict(counts or {}),
        "metrics": dict(metrics or {}),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def write_manifest(directory: Path | str, manifest: Mapping[str, Any]) -> Path:
    """Write the manifest last: its presence marks the artifact complete."""
    path = Path(directory) / MANIFEST
    write_json_atomic(path, dict(manifest))
    return path


def read_manifest(directory: Path | str, kind: ArtifactKind | None = None, flag: str = "artifact") -> dict:
    """Read and check an artifact's manifest; a missing or wrong one is an InputError naming `flag`."""
    directory = Path(directory)
    if not directory.exists():
        raise InputError(f"{flag} {directory}", "does not exist", f"a {kind or 'gramline'} artifact directory")
    path = directory / MANIFEST
    if not path.is_file():
        raise InputError(
            f"{flag} {directory}", f"has no {MANIFEST}", f"a complete {kind or 'gramline'} artifact directory"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(str(path), f"is not valid JSON ({err})", "a gramline manifest") from err
    if not isinstance(manifest, dict) or "kind" not in manifest:
        raise InputError(str(path), "has no 'kind' field", "a gramline manifest")
    if kind is not None and manifest["kind"] != kind:
        raise InputError(f"{flag} {directory}", f"is a {manifest['kind']} artifact", f"a {kind} artifact")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(str(path), f"has schema_version {version!r}", f"schema_version {SCHEMA_VERSION}")
    return manifest


def _kfp_value(value: Any) -> Any:
    """Metadata must be JSON: numbers, strings, bools, lists and dicts only."""
    return json.loads(json.dumps(value, default=str))


def write_executor_output(
    path: Path | str | None,
    artifacts: Mapping[str, tuple[str, Mapping[str, Any]]],
    parameters: Mapping[str, Any] | None = None,
) -> None:
    """Write the full KFP ExecutorOutput JSON (the artifact `name`, `uri` and `metadata` of every output: KFP reads
    nothing else from a container component).

    `artifacts` maps output name → (uri, metadata). With no path (plain CLI use) nothing is written.
    """
    if not path:
        return
    payload: dict[str, Any] = {
        "artifacts": {
            name: {"artifacts": [{"name": name, "uri": uri, "metadata": _kfp_value(dict(meta))}]}
            for name, (uri, meta) in artifacts.items()
        }
    }
    if parameters:
        payload["parameterValues"] = _kfp_value(dict(parameters))
    write_json_atomic(path, payload)


def uri_for(path: Path | str, uri: str | None) -> str:
    """The artifact URI KFP gave us, or a file path URI-ish fallback for plain CLI runs."""
    return uri if uri else str(Path(path).resolve())
