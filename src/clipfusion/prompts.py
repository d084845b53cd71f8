"""Text prompts of the CLIP branch: WinCLIP's compositional prompt ensemble. (The diffusion branch's one
prompt is ``diffusion.prompt_template``, filled and tokenised in :mod:`clipfusion.branches.mapdiff`.)

The CLIP ensemble must produce exactly the strings anomalib's WinCLIP uses, so that the text features (and
hence every language-guided score) can be checked against that reference implementation. anomalib's
template list repeats "a jpeg corrupted photo of the {}." — kept here, because it weights that template
twice in the average.
"""

from __future__ import annotations

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def _fill(pattern: str, value: str) -> str:
    # replace rather than str.format: an object name containing braces must not break the prompt
    return pattern.replace("{}", value)


def clip_prompt_ensemble(object_name: str) -> tuple[list[str], list[str]]:
    """Normal and anomalous prompts for ``object_name``: every state, in every template (state-major)."""
    normal = [_fill(template, _fill(state, object_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [
        _fill(template, _fill(state, object_name)) for state in ANOMALOUS_STATES for template in TEMPLATES
    ]
    return normal, anomalous
