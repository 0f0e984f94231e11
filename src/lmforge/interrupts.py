"""Stop signals: how SIGTERM and SIGINT end lmforge's work, as one exception.

In: a stop signal (SIGTERM from `kill`, `timeout`, Kubernetes or a supervisor; SIGINT from Ctrl-C).
Out: `Interrupted`, raised in the main thread, so that every `finally` and `with` block runs (a
step ends its MLflow run KILLED, a launcher stops its processes) and the process exits
128 + the signal, the shell's convention, without a traceback (it is a SystemExit).

    lmforge run --config pipelines/configs/tiny.yaml & kill -TERM $!   # exit 143, MLflow run KILLED
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(SystemExit):
    """A stop signal ended the work: not an error (no LmforgeError), and no `except Exception`
    swallows it. `code` is 128 + the signal, what the process exits with."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}"


def is_stop(exc: BaseException) -> bool:
    """Whether `exc` is a stop signal's doing (Interrupted, or Python's own KeyboardInterrupt for SIGINT)."""
    return isinstance(exc, (Interrupted, KeyboardInterrupt))


@contextlib.contextmanager
def stop_signals_handled_by(
    handler: Callable[[int, Any], None], signals: tuple[int, ...] = STOP_SIGNALS
) -> Iterator[None]:
    """`handler` takes the stop signals (SIGTERM and SIGINT unless told) for the block, and the
    previous handlers come back after it. Outside the main thread (signals reach only it) the
    block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, handler_before in previous.items():
            signal.signal(sig, handler_before)


@contextlib.contextmanager
def raised_on_stop_signals() -> Iterator[None]:
    """The first SIGTERM or SIGINT in the block raises Interrupted in the main thread; later ones are
    ignored until the block has unwound, so that a second SIGTERM (as `timeout` and supervisors send)
    or a second Ctrl-C does not cut the cleanup short. Handlers installed inside the block (a
    launcher's) take precedence while they are installed."""
    received: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    with stop_signals_handled_by(stop):
        yield
