"""The README's cluster command, `python pipeline/compile.py && kfp run submit -e EXP -f gramline.yaml
key=value ...`, with the real `kfp` CLI against a STAND-IN of the KFP v2beta1 REST API.

The stand-in below is written for this test: an HTTP server on 127.0.0.1 that answers healthz,
experiments (list, create) and runs (create, get) the way the KFP 2.x API server does, and records
every request. It checks that the compiled spec and the parsed parameters arrive as the API expects
them; it does not execute anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

pytest.importorskip("kfp")

REPO = Path(__file__).resolve().parents[1]
API = "/apis/v2beta1"


class StandInKfpApi(ThreadingHTTPServer):
    """A stand-in for the KFP v2beta1 API server (not KFP): just enough for `kfp run submit`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, Any]] = []
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StandInKfpApi

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        self.server.requests.append(("GET", url.path, parse_qs(url.query)))
        if url.path == f"{API}/healthz":
            return self._send(200, {"commit_sha": "stand-in", "tag_name": "2.17.0", "multi_user": False})
        if url.path == f"{API}/experiments":
            predicate = json.loads(parse_qs(url.query).get("filter", ["{}"])[0]).get("predicates", [{}])[0]
            wanted = predicate.get("string_value") or predicate.get("stringValue")
            found = [e for e in self.server.experiments.values() if wanted is None or e["display_name"] == wanted]
            return self._send(200, {"experiments": found, "total_size": len(found)} if found else {})
        if url.path.startswith(f"{API}/runs/"):
            run = self.server.runs.get(url.path.rsplit("/", 1)[1])
            return self._send(200, run) if run else self._send(404, {"error": "run not found", "code": 5})
        return self._send(404, {"error": f"the stand-in does not serve {url.path}", "code": 5})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.server.requests.append(("POST", self.path, body))
        now = "2026-01-01T00:00:00Z"
        if self.path == f"{API}/experiments":
            experiment = {"experiment_id": str(uuid.uuid4()), "display_name": body["display_name"],
                          "created_at": now, "storage_state": "AVAILABLE"}
            self.server.experiments[experiment["experiment_id"]] = experiment
            return self._send(200, experiment)
        if self.path == f"{API}/runs":
            run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": now,
                   "storage_state": "AVAILABLE"}
            self.server.runs[run["run_id"]] = run
            return self._send(200, run)
        return self._send(404, {"error": f"the stand-in does not serve POST {self.path}", "code": 5})


@pytest.fixture
def api() -> Iterator[StandInKfpApi]:
    server = StandInKfpApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def kfp_cli() -> list[str]:
    script = Path(sys.executable).parent / "kfp"
    return [str(script)] if script.exists() else [shutil.which("kfp") or "kfp"]


def test_kfp_run_submit_sends_the_compiled_spec_and_parsed_parameters(api: StandInKfpApi, tmp_path: Path) -> None:
    compiled = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--output",
                               str(tmp_path / "gramline.yaml")], check=False, capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
    done = subprocess.run([*kfp_cli(), "--endpoint", api.url, "run", "submit", "-e", "gramline-ci", "-f", "gramline.yaml",
                           "preset=tiny", 'pretrain_overrides={"train.steps": 50, "optim.lr": {"peak": 0.001}}',
                           "source=s3://bucket/raw/", "init_from=timm:vit_base_patch16_dinov3"],
                          check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "'submit' is deprecated" in done.stderr  # kfp 2.x: an alias of `run create`

    paths = [(method, path) for method, path, _ in api.requests]
    assert ("GET", f"{API}/healthz") in paths
    created = [body for method, path, body in api.requests if (method, path) == ("POST", f"{API}/experiments")]
    assert [c["display_name"] for c in created] == ["gramline-ci"]
    runs = [body for method, path, body in api.requests if (method, path) == ("POST", f"{API}/runs")]
    assert len(runs) == 1
    run = runs[0]
    experiment_id = next(iter(api.experiments))
    assert run["display_name"] == "gramline-ci" and run["experiment_id"] == experiment_id
    assert run["runtime_config"]["parameters"] == {
        "preset": "tiny", "pretrain_overrides": {"train.steps": 50, "optim.lr": {"peak": 0.001}},
        "source": "s3://bucket/raw/", "init_from": "timm:vit_base_patch16_dinov3"}
    spec_doc, platform_doc = [d for d in yaml.safe_load_all((tmp_path / "gramline.yaml").read_text()) if d]
    assert run["pipeline_spec"]["pipeline_spec"] == spec_doc
    assert run["pipeline_spec"]["platform_spec"] == platform_doc
    parameters = run["pipeline_spec"]["pipeline_spec"]["root"]["inputDefinitions"]["parameters"]
    assert set(run["runtime_config"]["parameters"]) <= set(parameters)
    assert ("GET", f"{API}/runs/{next(iter(api.runs))}") in paths  # the CLI shows the run it created
    assert next(iter(api.runs)) in done.stdout


def test_kfp_run_submit_reuses_an_existing_experiment(api: StandInKfpApi, tmp_path: Path) -> None:
    compiled = subprocess.run([sys.executable, str(REPO / "pipeline" / "compile.py"), "--preset", "tiny", "--output",
                               str(tmp_path / "gramline.yaml")], check=False, capture_output=True, text=True, timeout=120)
    assert compiled.returncode == 0, compiled.stderr
    for _ in range(2):
        done = subprocess.run([*kfp_cli(), "--endpoint", api.url, "run", "submit", "-e", "exp", "-r", "r1",
                               "-f", "gramline.yaml"], check=False, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
    assert len(api.experiments) == 1 and len(api.runs) == 2
    for run in api.runs.values():
        assert run["display_name"] == "r1" and run["runtime_config"].get("parameters", {}) == {}
