"""One logging setup for every lmforge process: level from LOGLEVEL (default INFO)."""

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
