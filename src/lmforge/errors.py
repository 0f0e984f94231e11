"""Errors a user can act on.

Anything raised as `LmforgeError` is printed by the CLI as one line (no
traceback) and turned into the exit status `exit_code`. Everything else is a bug
in lmforge and keeps its traceback.
"""


class LmforgeError(Exception):
    """A user's mistake or an unmet precondition; the message names what to change."""

    exit_code = 1


class ConfigError(LmforgeError):
    """The run config is invalid; raised once, naming every bad field."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config: " + "; ".join(self.problems))


class IntegrityError(LmforgeError):
    """Downloaded or stored bytes are not what was pinned (size or sha256)."""
