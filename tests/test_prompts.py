"""The CLIP prompt ensemble is WinCLIP's, string for string."""

from __future__ import annotations

from clipfusion.prompts import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, clip_prompt_ensemble


def test_prompt_ensemble_is_winclips():
    normal, anomalous = clip_prompt_ensemble("metal nut")
    assert len(TEMPLATES) == 21 and TEMPLATES.count("a jpeg corrupted photo of the {}.") == 2
    assert len(normal) == len(NORMAL_STATES) * 21 == 147
    assert len(anomalous) == len(ANOMALOUS_STATES) * 21 == 84
    assert normal[0] == "a cropped photo of the metal nut."
    assert anomalous[21] == "a cropped photo of the metal nut with flaw."
    assert "a photo of a damaged metal nut for anomaly detection." in anomalous
    # braces in a name are text, not format fields
    assert clip_prompt_ensemble("a{}b")[0][0] == "a cropped photo of the a{}b."
