"""One logging setup for every lmforge process, and one progress helper for long work.

In: LOGLEVEL (default INFO) and whether stderr is a terminal. Out: `setup_logging()`
(one format, to stderr) and `Progress` (a tqdm bar in a terminal; plain periodic log
lines in a pod or CI), used by `lmforge download` and `lmforge preprocess`.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_logging() -> None:
    level = os.environ.get("LOGLEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        stream=sys.stderr,
        force=True,
    )


def progress_enabled() -> bool:
    """Progress bars in a terminal; plain log lines in a pod or a CI log."""
    return sys.stderr.isatty()


class Progress:
    """Progress of long work in bytes: a tqdm bar in a terminal; elsewhere (a pod's or CI's log)
    a plain log line at most every `every_s` seconds, and one when the work completes."""

    def __init__(self, label: str, total: int | None = None, *, every_s: float = 10.0,
                 logger: logging.Logger | None = None) -> None:
        import time

        self._clock = time.monotonic
        self.label, self.total, self.done, self.every_s = label, total, 0, every_s
        self.log = logger or logging.getLogger("lmforge")
        self.bar = None
        if progress_enabled():  # tqdm only then: importing it costs ~15 ms of every serial run
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024, leave=False)
        self.next_log = self._clock() + every_s

    def set_total(self, total: int) -> None:
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def restart(self) -> None:
        """Start counting again from 0 (a transfer that begins anew)."""
        self.done = 0
        if self.bar is not None:
            self.bar.reset(total=self.total)

    def update(self, n: int, what: str = "") -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        finished = self.total is not None and self.done >= self.total
        if finished or self._clock() >= self.next_log:
            self.next_log = self._clock() + self.every_s
            of = f" of {self.total / 2**20:.1f} MiB ({100 * self.done / max(1, self.total):.0f}%)" if self.total else ""
            self.log.info("%s: %.1f MiB%s%s", self.label, self.done / 2**20, of, f", {what} done" if what else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
