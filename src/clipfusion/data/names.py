"""The object name put into prompts for a category folder name.

Folder names are identifiers (``metal_nut``, ``pcb3``, ``chewinggum``); CLIP and the diffusion text encoder
were trained on captions, so prompts read better with the words a caption would use.
"""

from __future__ import annotations

# VisA folder names that are not just words joined by underscores
_SPECIAL_NAMES: dict[str, str] = {
    "pcb1": "printed circuit board",
    "pcb2": "printed circuit board",
    "pcb3": "printed circuit board",
    "pcb4": "printed circuit board",
    "macaroni1": "macaroni",
    "macaroni2": "macaroni",
    "pipe_fryum": "pipe fryum",
    "chewinggum": "chewing gum",
}


def object_name(category: str, overrides: dict[str, str] | None = None) -> str:
    """Prompt word(s) for ``category``: ``overrides`` first (e.g. from the config's ``object_names``), then
    the VisA special cases, then underscores read as spaces (``metal_nut`` → ``metal nut``)."""
    if overrides and category in overrides:
        return overrides[category]
    if category in _SPECIAL_NAMES:
        return _SPECIAL_NAMES[category]
    return " ".join(category.replace("_", " ").split())
