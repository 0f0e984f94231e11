"""k8s_api: which Kubernetes API errors the launcher waits out and which end the step, and the
back-off between tries. The exceptions are the real ones, raised as
kubeflow-training's TrainingClient raises them (a RuntimeError from the ApiException, or while
handling urllib3's error); the requests that produce them run against a stub API server in
test_pytorchjob.py.
"""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3
from kubernetes.client.exceptions import ApiException

from lmforge.training.launchers import k8s_api


def wrapped(cause: BaseException) -> RuntimeError:
    """`cause` as TrainingClient.get_job hands it on (a RuntimeError from the ApiException, or raised
    while handling any other error)."""
    try:
        try:
            raise cause
        except ApiException as exc:
            raise RuntimeError(f"Failed to get PyTorchJob: team-a/x. Error: {exc}") from exc
        except Exception:
            raise RuntimeError("Failed to get PyTorchJob: team-a/x")  # noqa: B904 (as TrainingClient does)
    except RuntimeError as exc:
        return exc


def api_error(status: int, reason: str, message: str = "") -> ApiException:
    error = ApiException(status=status, reason=reason)
    error.body = f'{{"kind": "Status", "code": {status}, "message": "{message}"}}' if message else None
    return error


def urllib3_error(url: str) -> Exception:
    """What urllib3 (as the kubernetes client drives it, retries=0) raises for a request to `url`."""
    try:
        urllib3.PoolManager(retries=0, cert_reqs="CERT_NONE").request("GET", url, timeout=5)
    except Exception as exc:
        return exc
    raise AssertionError(f"{url} answered")


def refused_connection() -> Exception:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return urllib3_error(f"http://127.0.0.1:{port}/apis/kubeflow.org/v1")


def tls_to_a_plain_http_server() -> Exception:
    """A kubeconfig with https:// for a server that speaks HTTP: stays wrong however often it is tried."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return urllib3_error(f"https://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
        server.server_close()


ERRORS = {
    # (the error, made when the test runs; transient?; how its one-line description starts)
    "401": (lambda: api_error(401, "Unauthorized", "Unauthorized"), False, "401 Unauthorized: Unauthorized"),
    "403": (lambda: api_error(403, "Forbidden", 'User \\"u\\" cannot get resource \\"pytorchjobs\\"'), False,
            '403 Forbidden: User "u" cannot get resource "pytorchjobs"'),
    "404": (lambda: api_error(404, "Not Found"), False, "404 Not Found"),
    "422": (lambda: api_error(422, "Unprocessable Entity", "spec: Invalid value"), False,
            "422 Unprocessable Entity: spec: Invalid value"),
    "429": (lambda: api_error(429, "Too Many Requests"), True, "429 Too Many Requests"),
    "500": (lambda: api_error(500, "Internal Server Error", "etcdserver: request timed out"), True,
            "500 Internal Server Error: etcdserver: request timed out"),
    "503": (lambda: api_error(503, "Service Unavailable"), True, "503 Service Unavailable"),
    "refused": (refused_connection, True, "no answer (ConnectionRefusedError: [Errno 111] Connection refused)"),
    "timeout": (lambda: TimeoutError("Timeout to get PyTorchJob: team-a/x"), True,
                "no answer (TimeoutError: Timeout to get PyTorchJob: team-a/x)"),
    "TLS misconfigured": (tls_to_a_plain_http_server, False, "no answer (SSLError: [SSL: WRONG_VERSION_NUMBER]"),
    "a bug": (lambda: ValueError("Invalid value for `kind`, must not be `None`"), False,
              "ValueError: Invalid value for `kind`, must not be `None`"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_errors_are_classified_and_described_in_one_line(name):
    make, transient, description = ERRORS[name]
    cause = make()
    exc = cause if isinstance(cause, TimeoutError) else wrapped(cause)
    assert k8s_api.is_transient(exc) is transient
    assert k8s_api.describe(exc).startswith(description)
    assert k8s_api.status_code(exc) == (int(name) if name.isdigit() else None)
    refusal = k8s_api.refusal(exc, "get PyTorchJob team-a/x", "team-a")
    assert (refusal is not None) == (name in ("401", "403"))
    if refusal is not None:
        assert "\n" not in str(refusal) and "k8s/rbac.yaml" in str(refusal) and description in str(refusal)


def test_backoff_doubles_to_its_cap():
    backoff = k8s_api.Backoff("read x", base_s=10, cap_s=120)
    error = wrapped(api_error(503, "Service Unavailable"))
    assert [backoff.failed(error) for _ in range(7)] == [10, 20, 40, 80, 120, 120, 120]
    assert [k8s_api.Backoff("x", base_s=300, cap_s=120).delay(n) for n in (0, 1, 2)] == [0, 300, 300], \
        "a poll longer than the cap is not shortened"
    assert k8s_api.Backoff("x", base_s=10).delay(10_000) == k8s_api.CAP_S


def test_backoff_logs_each_distinct_error_once_per_outage_and_the_recovery(caplog):
    backoff = k8s_api.Backoff("read PyTorchJob team-a/x", base_s=1)
    unavailable = [wrapped(api_error(503, "Service Unavailable")) for _ in range(50)]
    refused = [wrapped(refused_connection()) for _ in range(50)]
    with caplog.at_level(logging.INFO, logger=k8s_api.__name__):
        for a, b in zip(unavailable, refused):
            backoff.failed(a)
            backoff.failed(b)
        backoff.succeeded()
        backoff.failed(unavailable[0])  # a new outage: said again
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == ["WARNING", "WARNING", "INFO", "WARNING"], lines
    assert lines[0][1].startswith("cannot read PyTorchJob team-a/x: 503 Service Unavailable; trying again")
    assert "Connection refused" in lines[1][1]
    assert lines[2][1].startswith("read PyTorchJob team-a/x: the API server answers again, after 100 failed tries")
    assert backoff.delay() == 1
