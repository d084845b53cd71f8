"""The diffusion branch's prompt: one sentence per object and state word, tokenized with the state word's
positions found, and encoded by the text encoder.

``diff_L`` reads the UNet's attention on the state word's token(s), so their positions in the tokenized
prompt must be known exactly; :func:`prompt_tokens` finds them from the template and checks them against
the tokenizer's output, refusing a template where they cannot be located.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from clipfusion.errors import ConfigError


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized diffusion prompt and where its state word sits in it."""

    text: str
    state: str
    input_ids: torch.Tensor  # (1, context length), int64
    state_positions: tuple[int, ...]
    end_position: int  # index of the end-of-text token


def prompt_tokens(tokenizer: Any, template: str, object_name: str, state: str) -> PromptTokens:
    """The prompt for ``object_name`` and ``state``, with the state word's token positions.

    Positions are found by tokenizing the text before each ``{state}`` placeholder and the word alone
    (CLIP's BPE works word by word, so a word that splits into several tokens occupies consecutive
    positions), then checked against the tokenized prompt; a template where that does not hold is refused.
    """
    text = template.format(object=object_name, state=state)
    length = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if not 0 < length <= 1024:  # unset (transformers' "very large" sentinel): CLIP's context length
        length = 77
    ids = tokenizer(
        text, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids
    word = tokenizer(state, add_special_tokens=False).input_ids
    pieces = template.split("{state}")
    positions: list[int] = []
    prefix = ""
    for piece in pieces[:-1]:
        prefix += piece.format(object=object_name)
        start = 1 + len(tokenizer(prefix, add_special_tokens=False).input_ids)
        positions.extend(range(start, start + len(word)))
        prefix += state
    row = ids[0].tolist()
    eos = tokenizer.eos_token_id
    if eos not in row:
        raise ConfigError(f"the diffusion prompt {text!r} is longer than the text encoder's {length} tokens")
    end = row.index(eos)
    if (
        not word
        or any(p >= end for p in positions)
        or [row[p] for p in positions] != word * (len(pieces) - 1)
    ):
        raise ConfigError(
            f"cannot locate the state word {state!r} in the tokenized prompt {text!r}; keep {{state}} a "
            "separate word in diffusion.prompt_template"
        )
    return PromptTokens(text, state, ids, tuple(positions), end)


def encode_prompt(text_encoder: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's output for one tokenized prompt, on the encoder's device and in its dtype.

    SD-2 conditions on the last hidden state (its text tower already stops at the penultimate OpenCLIP
    layer), with no attention mask, as the diffusers pipeline does.
    """
    device = next(text_encoder.parameters()).device
    with torch.inference_mode():
        return text_encoder(input_ids.to(device))[0]


__all__ = ["PromptTokens", "encode_prompt", "prompt_tokens"]
