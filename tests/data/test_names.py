"""Object names for the prompts. (All files fabricated in tmp_path.)"""

from __future__ import annotations

import pytest

from clipfusion.data import (
    MVTEC_CATEGORIES,
    VISA_CATEGORIES,
    object_name,
)


@pytest.mark.parametrize(
    ("category", "name"),
    [
        ("metal_nut", "metal nut"),
        ("bottle", "bottle"),
        ("pcb1", "printed circuit board"),
        ("pcb4", "printed circuit board"),
        ("macaroni2", "macaroni"),
        ("pipe_fryum", "pipe fryum"),
        ("chewinggum", "chewing gum"),
        ("woven_fabric", "woven fabric"),
    ],
)
def test_object_name_mapping(category, name):
    assert object_name(category) == name


def test_object_name_overrides_win():
    assert object_name("pcb1", {"pcb1": "circuit board"}) == "circuit board"
    assert object_name("metal_nut", {"pcb1": "circuit board"}) == "metal nut"
    assert object_name("metal_nut", None) == "metal nut"
    assert {object_name(c) for c in MVTEC_CATEGORIES + VISA_CATEGORIES}.isdisjoint({""})
