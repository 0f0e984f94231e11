"""`lmforge submit`, `schedule` and `runs` against a stub Kubeflow Pipelines API server.

The stub is the one mock here: no cluster (hence no KFP API server) runs on this
machine. It is a real HTTP server on 127.0.0.1 that speaks the v2beta1 REST API
as far as the kfp SDK uses it, keeps what it is sent in memory, and records
every request, so the tests assert what lmforge asked of the server: the
pipeline upload, the run and its parameters, the recurring run's cron, max
concurrency and catch-up, the bearer token.

    PYTHONPATH=src .venv/bin/pytest tests/pipeline/test_client.py
"""

from __future__ import annotations

import email.parser
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from lmforge import cli
from lmforge import config as config_mod

TINY = config_mod.shipped_config_path("tiny")
S3_ROOT = "storage.root=s3://lmforge/runs"


class StubKfp:
    """In-memory pipelines, versions, experiments, runs and recurring runs; every request recorded."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.recurring: list[dict[str, Any]] = []

    def of(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    @staticmethod
    def _name_filter(query: dict[str, list[str]]) -> str | None:
        if "filter" not in query:
            return None
        (predicate,) = json.loads(query["filter"][0])["predicates"]
        assert predicate["key"] == "display_name" and predicate["operation"] in ("EQUALS", 1)
        return predicate["stringValue"]

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        n = len(self.requests)
        if path == "/apis/v2beta1/healthz":
            return {"multi_user": False}
        if method == "GET" and path == "/apis/v2beta1/pipelines":
            name = self._name_filter(query)
            return {"pipelines": [p for p in self.pipelines.values() if name in (None, p["display_name"])]}
        if method == "POST" and path == "/apis/v2beta1/pipelines/upload":
            pipeline = {"pipeline_id": f"pipeline-{n}", "display_name": query["name"][0]}
            self.pipelines[pipeline["pipeline_id"]] = pipeline
            # KFP makes the first version from the uploaded file, named like the pipeline.
            self.versions[pipeline["pipeline_id"]] = [
                {"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": f"version-{n}",
                 "display_name": pipeline["display_name"]}
            ]
            return pipeline
        if method == "POST" and path == "/apis/v2beta1/pipelines/upload_version":
            pipeline_id = query["pipelineid"][0]
            version = {"pipeline_id": pipeline_id, "pipeline_version_id": f"version-{n}",
                       "display_name": query["name"][0]}
            self.versions[pipeline_id].append(version)
            return version
        if method == "GET" and path.endswith("/versions"):
            name = self._name_filter(query)
            versions = self.versions[path.split("/")[-2]]
            return {"pipeline_versions": [v for v in versions if name in (None, v["display_name"])]}
        if method == "GET" and path == "/apis/v2beta1/experiments":
            name = self._name_filter(query)
            return {"experiments": [e for e in self.experiments.values() if name in (None, e["display_name"])]}
        if method == "POST" and path == "/apis/v2beta1/experiments":
            experiment = {**body, "experiment_id": f"experiment-{n}"}
            self.experiments[experiment["experiment_id"]] = experiment
            return experiment
        if method == "POST" and path == "/apis/v2beta1/runs":
            run = {**body, "run_id": f"run-{n}", "state": "PENDING", "created_at": "2026-01-04T03:00:00Z"}
            self.runs.append(run)
            return run
        if method == "GET" and path == "/apis/v2beta1/runs":
            return {"runs": self.runs, "total_size": len(self.runs)}
        if method == "POST" and path == "/apis/v2beta1/recurringruns":
            recurring = {**body, "recurring_run_id": f"recurring-{n}", "status": "ENABLED"}
            self.recurring.append(recurring)
            return recurring
        if method == "GET" and path == "/apis/v2beta1/recurringruns":
            return {"recurringRuns": self.recurring, "total_size": len(self.recurring)}  # sic: the API's JSON name
        raise AssertionError(f"the stub does not serve {method} {path}")


@pytest.fixture()
def kfp_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import kfp

    # kfp.Client keeps a namespace context in ~/.config/kfp; keep it out of the real home.
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.delenv("LMFORGE_KFP_TOKEN", raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    stub = StubKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlsplit(self.path)
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = self.headers.get("Content-Type", "")
            body: Any = None
            if content_type.startswith("multipart/form-data"):
                message = email.parser.BytesParser().parsebytes(
                    f"Content-Type: {content_type}\r\n\r\n".encode() + raw
                )
                body = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                        for part in message.get_payload()}
            elif raw:
                body = json.loads(raw)
            query = parse_qs(url.query)
            stub.requests.append({"method": self.command, "path": url.path, "query": query, "body": body,
                                  "authorization": self.headers.get("Authorization")})
            try:
                status, reply = 200, stub.handle(self.command, url.path, query, body)
            except AssertionError as exc:
                status, reply = 404, {"error": str(exc)}
                stub.errors.append(str(exc))
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()


def lmforge(*argv: str) -> int:
    return cli.main(list(argv))


def test_submit_uploads_the_pipeline_and_starts_a_run_with_the_config(kfp_server, capsys) -> None:
    code = lmforge("submit", "--host", kfp_server.url, "--experiment", "nightly", "--config", str(TINY),
                   "--set", S3_ROOT, "--token", "secret-token", "--name", "first")
    out, err = capsys.readouterr()
    assert code == 0, (err, kfp_server.errors)
    cfg = config_mod.load(TINY, [S3_ROOT])

    (upload,) = kfp_server.of("POST", "/apis/v2beta1/pipelines/upload")
    assert upload["query"]["name"] == ["lmforge"]
    spec = next(yaml.safe_load_all(upload["body"]["uploadfile"]))
    assert spec["pipelineInfo"]["name"] == "lmforge"
    # The uploaded pipeline was compiled from the same config: it is the run form's default.
    default = spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
    assert json.loads(default) == cfg.to_dict()

    (version,) = kfp_server.of("POST", "/apis/v2beta1/pipelines/upload_version")
    (experiment,) = kfp_server.of("POST", "/apis/v2beta1/experiments")
    assert experiment["body"]["display_name"] == "nightly"
    (run,) = kfp_server.of("POST", "/apis/v2beta1/runs")
    body = run["body"]
    assert body["display_name"] == "first"
    assert body["experiment_id"] == next(iter(kfp_server.experiments))
    # The run starts the version holding exactly this compiled pipeline (named by its content).
    ref = body["pipeline_version_reference"]
    (named,) = [v for v in kfp_server.versions[ref["pipeline_id"]] if v["display_name"] == version["query"]["name"][0]]
    assert ref["pipeline_version_id"] == named["pipeline_version_id"]
    assert named["display_name"].startswith("lmforge-0.1.0-")
    assert json.loads(body["runtime_config"]["parameters"]["config_json"]) == cfg.to_dict()
    assert "pipeline_spec" not in body or body["pipeline_spec"] is None, "runs the uploaded version"
    assert all(r["authorization"] == "Bearer secret-token" for r in kfp_server.requests)
    assert json.loads(out[out.index("{"):])["run_id"] == kfp_server.runs[0]["run_id"]


def test_submitting_the_same_pipeline_again_reuses_its_version(kfp_server) -> None:
    args = ("submit", "--host", kfp_server.url, "--config", str(TINY), "--set", S3_ROOT)
    assert lmforge(*args) == 0
    assert lmforge(*args, "--set", "train.max_epoch=7") == 0  # the config changes, the compiled pipeline's
    assert lmforge(*args) == 0                                  # default does too: one more version
    assert len(kfp_server.of("POST", "/apis/v2beta1/pipelines/upload")) == 1
    assert len(kfp_server.of("POST", "/apis/v2beta1/pipelines/upload_version")) == 2
    assert len(kfp_server.runs) == 3
    assert kfp_server.runs[0]["pipeline_version_reference"] == kfp_server.runs[2]["pipeline_version_reference"]
    assert json.loads(kfp_server.runs[1]["runtime_config"]["parameters"]["config_json"])["train"]["max_epoch"] == 7


def test_schedule_creates_a_recurring_run_one_at_a_time_without_catch_up(kfp_server, capsys) -> None:
    code = lmforge("schedule", "--host", kfp_server.url, "--cron", "0 0 3 * * 0", "--config", str(TINY),
                   "--set", S3_ROOT)
    assert code == 0, capsys.readouterr().err
    (request,) = kfp_server.of("POST", "/apis/v2beta1/recurringruns")
    body = request["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["display_name"] == "tiny-retraining"
    assert body["pipeline_version_reference"]["pipeline_version_id"]
    config_json = json.loads(body["runtime_config"]["parameters"]["config_json"])
    assert config_json == config_mod.load(TINY, [S3_ROOT]).to_dict()
    assert len(kfp_server.of("POST", "/apis/v2beta1/pipelines/upload")) == 1
    assert not kfp_server.of("POST", "/apis/v2beta1/runs"), "a schedule starts no run by itself"


def test_schedule_refuses_a_five_field_cron_before_any_request(kfp_server, capsys) -> None:
    code = lmforge("schedule", "--host", kfp_server.url, "--cron", "0 3 * * 0", "--set", S3_ROOT)
    err = capsys.readouterr().err
    assert code == 1 and "6 fields, seconds first" in err and len(err.strip().splitlines()) == 1
    assert kfp_server.requests == []


def test_submit_refuses_a_storage_root_no_other_pod_sees(kfp_server, capsys) -> None:
    code = lmforge("submit", "--host", kfp_server.url, "--config", str(TINY))
    err = capsys.readouterr().err
    assert code == 2 and "storage.root" in err and "s3://" in err
    assert kfp_server.requests == [], "nothing uploaded"


def test_runs_lists_runs_and_recurring_runs(kfp_server, capsys) -> None:
    assert lmforge("submit", "--host", kfp_server.url, "--config", str(TINY), "--set", S3_ROOT, "--name", "r1") == 0
    assert lmforge("schedule", "--host", kfp_server.url, "--cron", "0 0 3 * * 0", "--config", str(TINY),
                   "--set", S3_ROOT) == 0
    capsys.readouterr()
    assert lmforge("runs", "--host", kfp_server.url, "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listing["runs"]] == ["r1"]
    assert listing["runs"][0]["state"] == "PENDING"
    (recurring,) = listing["recurring_runs"]
    assert recurring["cron"] == "0 0 3 * * 0" and recurring["no_catchup"] is True
    (request,) = kfp_server.of("GET", "/apis/v2beta1/runs")
    assert request["query"]["sort_by"] == ["created_at desc"]

    assert lmforge("runs", "--host", kfp_server.url) == 0
    table = capsys.readouterr().out
    assert "r1" in table and "tiny-retraining" in table and "0 0 3 * * 0" in table


def test_a_pods_service_account_token_authenticates(kfp_server, tmp_path, monkeypatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("projected-sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    assert lmforge("runs", "--host", kfp_server.url) == 0
    assert kfp_server.requests
    assert all(r["authorization"] == "Bearer projected-sa-token" for r in kfp_server.requests)


def test_an_unreachable_server_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    import kfp

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-token"))
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert lmforge("runs", "--host", f"http://127.0.0.1:{port}") == 1
    # urllib3 logs its own retries first; lmforge's verdict is the last line, and only one.
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("lmforge: error: cannot reach Kubeflow Pipelines") and f"127.0.0.1:{port}" in lines[-1]
    assert sum(line.startswith("lmforge: error") for line in lines) == 1 and "Traceback" not in "".join(lines)
