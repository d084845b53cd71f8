"""The one progress-bar style of the package (tqdm, on stderr, cleared when done)."""

from __future__ import annotations

from typing import Any


def progress_bar(total: int | None, desc: str, *, enabled: bool = True, unit: str = "img") -> Any:
    """A tqdm bar, or a silent stand-in with the same ``update``/``close`` methods when ``enabled`` is false.

    Imported lazily: tqdm is only paid for by code that shows progress.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
