"""The Kubernetes API's errors as the PyTorchJob launcher meets them: which to wait out, which end the step.

In: the exceptions kubeflow-training's TrainingClient raises (a RuntimeError around the
ApiException or the connection error, a TimeoutError). Out:

- `status_code`, `is_transient` (429, 5xx, no answer at all) and `describe` (one line, the API's
  own message);
- `refusal`: 401 and 403 as a one-line LmforgeError naming what the train step needs
  (k8s/rbac.yaml), raised at once: waiting does not change a Role;
- `Backoff`: the waits between tries of a request that fails transiently, exponential with a cap,
  with one log line per distinct error per outage (not one per poll) and one when it recovers;
- `delete_job` and `wait_gone`, the requests that end a job, with both rules applied.

Used by `lmforge.training.launchers.pytorchjob`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

AUTHORIZATION = frozenset({401, 403})
# What the train step's ServiceAccount needs, as k8s/rbac.yaml grants it (tests/test_k8s.py keeps them equal).
RBAC = ("k8s/rbac.yaml (Role lmforge-pytorchjobs: create, get, list, watch and delete on pytorchjobs.kubeflow.org, "
        "get, list and watch on pods, get on pods/log), bound to the step's ServiceAccount")
CAP_S = 120.0  # the longest wait between tries: a recovered API server is noticed within 2 minutes
DELETE_PATIENCE_S = 20.0  # transient errors of a delete are retried this long: KFP's pods get 30 s after SIGTERM


def _chain(exc: BaseException) -> list[BaseException]:
    """exc and what it wraps: TrainingClient raises RuntimeError `from` the ApiException, or while
    handling a connection error (its __context__)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        reason = getattr(exc, "reason", None)  # urllib3's MaxRetryError holds the last attempt's error there
        exc = reason if isinstance(reason, BaseException) else exc.__cause__ or exc.__context__
    return chain


def _api_exception(exc: BaseException) -> Any | None:
    return next((e for e in _chain(exc) if isinstance(getattr(e, "status", None), int)), None)


def status_code(exc: BaseException) -> int | None:
    """The HTTP status the API server answered with; None when it did not answer."""
    api = _api_exception(exc)
    return api.status if api is not None else None


def is_transient(exc: BaseException) -> bool:
    """Worth waiting out: throttled (429), a server error (5xx), or no answer (connection, timeout);
    not a certificate the client rejects, which stays rejected."""
    import ssl

    from urllib3.exceptions import HTTPError, SSLError

    code = status_code(exc)
    if code is not None:
        return code == 429 or code >= 500
    chain = _chain(exc)
    if any(isinstance(e, (SSLError, ssl.SSLError)) for e in chain):
        return False
    return any(isinstance(e, (HTTPError, OSError)) for e in chain)  # TimeoutError is an OSError


def describe(exc: BaseException) -> str:
    """One line: '403 Forbidden: <the API's message>', 'no answer (<the deepest cause>)', or the error."""
    from urllib3.exceptions import HTTPError

    api = _api_exception(exc)
    if api is None:
        chain = _chain(exc)
        root = f"{type(chain[-1]).__name__}: {chain[-1]}".replace("\n", " ")
        return f"no answer ({root})" if any(isinstance(e, (HTTPError, OSError)) for e in chain) else root
    message = ""
    try:
        message = json.loads(api.body or "{}").get("message", "")
    except (TypeError, ValueError, AttributeError):
        pass
    return " ".join(f"{api.status} {api.reason or ''}: {message}".split()).rstrip(":")


def signature(exc: BaseException) -> str:
    """What makes two failures the same error for the log (a connection error's text names object addresses)."""
    api = _api_exception(exc)
    if api is not None:
        return f"{api.status} {api.reason}"
    return "/".join(type(e).__name__ for e in _chain(exc))


def refusal(exc: BaseException, action: str, namespace: str) -> LmforgeError | None:
    """The one-line error for an authorization failure (401, 403) of `action`; None for any other error."""
    code = status_code(exc)
    if code == 403:
        return LmforgeError(f"cannot {action}: {describe(exc)}; the train step needs {RBAC} in namespace {namespace} "
                            f"(kubectl apply -k k8s -n {namespace})")
    if code == 401:
        return LmforgeError(f"cannot {action}: {describe(exc)}; the API server does not accept this process's "
                            "credentials (the pod's ServiceAccount token or KUBECONFIG): check them, and that "
                            f"the step has {RBAC} in namespace {namespace}")
    return None


class Backoff:
    """Waits between tries of one request that fails transiently.

    The n-th failure in a row waits base_s * 2**(n-1), at most cap_s (at least base_s). Each
    distinct error is logged once per outage, and the recovery once, so an API server that is
    down for an hour costs a few log lines, not one per poll.
    """

    def __init__(self, what: str, *, base_s: float, cap_s: float = CAP_S) -> None:
        self.what, self.base_s, self.cap_s = what, base_s, max(cap_s, base_s)
        self.failures = 0
        self._seen: set[str] = set()
        self._since = 0.0

    def delay(self, failures: int | None = None) -> float:
        """The wait after `failures` failures in a row (default: the current run; 0 before the first)."""
        n = self.failures if failures is None else failures
        return min(self.cap_s, self.base_s * 2 ** min(n - 1, 62)) if n > 0 else 0.0

    def failed(self, exc: BaseException) -> float:
        """Count a transient failure; the seconds to wait before the next try."""
        if not self.failures:
            self._since = time.monotonic()
        self.failures += 1
        key = signature(exc)
        if key not in self._seen:
            self._seen.add(key)
            log.warning("cannot %s: %s; trying again with back-off (%.3g s, doubling up to %.3g s)",
                        self.what, describe(exc), self.delay(), self.cap_s)
        return self.delay()

    def succeeded(self) -> None:
        if self.failures:
            log.info("%s: the API server answers again, after %d failed tries in %.0f s",
                     self.what, self.failures, time.monotonic() - self._since)
        self.failures = 0
        self._seen.clear()


# ------------------------------------------------------------------ requests that end a job


def delete_job(client: Any, name: str, namespace: str, patience_s: float | None = None) -> None:
    """Delete the job (gone already is fine); transient errors are retried for patience_s
    (DELETE_PATIENCE_S); the error that remains names the command that deletes it by hand."""
    from kubernetes.client import V1DeleteOptions

    what = f"PyTorchJob {namespace}/{name}"
    by_hand = f"delete it by hand: kubectl -n {namespace} delete pytorchjob {name}"
    backoff = Backoff(f"delete {what}", base_s=0.5)
    deadline = time.monotonic() + (DELETE_PATIENCE_S if patience_s is None else patience_s)
    while True:
        try:
            # Foreground: the pods go before the job does, so a new job cannot meet the old pods
            client.delete_job(name, namespace, delete_options=V1DeleteOptions(propagation_policy="Foreground"))
            log.info("deleted %s", what)
            return
        except (RuntimeError, TimeoutError) as exc:
            if status_code(exc) == 404:
                return
            refused = refusal(exc, f"delete {what}", namespace)
            if refused or not is_transient(exc) or time.monotonic() + backoff.delay(backoff.failures + 1) > deadline:
                raise LmforgeError(f"{refused or f'cannot delete {what}: {describe(exc)}'}; {by_hand}") from None
            time.sleep(backoff.failed(exc))


def wait_gone(client: Any, name: str, namespace: str, timeout_s: float = 300.0, poll_s: float = 1.0) -> None:
    """Wait until a deleted job is gone (Foreground deletion: after its pods)."""
    what = f"PyTorchJob {namespace}/{name}"
    backoff, deadline = Backoff(f"read {what}", base_s=poll_s), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        delay = poll_s
        try:
            client.get_job(name, namespace)
            backoff.succeeded()
        except (RuntimeError, TimeoutError) as exc:
            if status_code(exc) == 404:
                return
            if not is_transient(exc):
                raise refusal(exc, f"get {what}", namespace) or LmforgeError(
                    f"cannot read {what}: {describe(exc)}") from None
            delay = backoff.failed(exc)
        time.sleep(delay)
    raise LmforgeError(f"{what} was not deleted within {timeout_s:.0f} s")
