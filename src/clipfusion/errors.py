"""Errors that reach users.

Every exception the CLI reports without a traceback derives from :class:`ClipfusionError`; its message is
one line that names the file or option at fault, so that a user can act on it without reading code.
"""

from __future__ import annotations

from collections.abc import Iterable


class ClipfusionError(Exception):
    """Base class: an expected failure whose message is meant for the user."""


class InputError(ClipfusionError):
    """A file, folder or data set that cannot be used as given (missing, corrupt, wrong layout)."""


class ConfigError(ClipfusionError):
    """An option or preset that does not exist or does not make sense."""


class WeightsUnavailableError(ClipfusionError):
    """Pretrained weights were asked for but could not be found locally or downloaded."""


class MetricError(ClipfusionError):
    """Scores or maps that no metric can be computed from (one class only, NaN, mismatched shapes)."""


class InputErrors(InputError):
    """Several input problems found in one pass, reported together (one line each) rather than one per run."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"did you mean 'paper'? "`` for the choices closest to a mistyped ``name`` (case and ``-``/``_``
    forgiven), or ``""``: the start of a hint that then lists what exists."""
    import difflib

    options = list(dict.fromkeys(choices))
    folded = {c.lower().replace("-", "_"): c for c in options}
    close = difflib.get_close_matches(name.lower().replace("-", "_"), list(folded), n=2, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(repr(folded[c]) for c in close) + "? "


def first_line(exc: BaseException, default: str = "no detail") -> str:
    """The first non-blank line of an exception's message (``default`` when it has none): what a one-line
    error quotes of a library's multi-line message (a hub error, a checkpoint mismatch)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return default


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, whitespace folded: a failure reported per image or per record, where
    the kind of error is part of the story and a newline would break the record."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())
