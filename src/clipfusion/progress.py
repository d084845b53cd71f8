"""The one progress-bar style of the package (tqdm, on stderr), and the rule that keeps every other line of
the console on a line of its own."""

from __future__ import annotations

import sys
from typing import Any


def _interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "img") -> Any:
    """A tqdm bar, or a silent stand-in with the same ``update``/``close`` methods when ``enabled`` is false.

    On a terminal the bar is cleared when done; in a log (stderr not a terminal) its last state stays, with
    its line ended, so that the next message does not start glued to it. Imported lazily: tqdm is only paid
    for by code that shows progress.
    """
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        leave=not _interactive(),
        dynamic_ncols=True,
    )


def close_open_bars() -> int:
    """Close every progress bar still open — the work it showed was cut short by an error or Ctrl-C — so
    that the line that says so starts on a line of its own; returns how many there were."""
    if "tqdm" not in sys.modules:
        return 0
    from tqdm import tqdm

    bars = [bar for bar in list(getattr(tqdm, "_instances", ())) if not bar.disable]
    for bar in bars:
        bar.close()
    return len(bars)
