"""Cross-attention capture for a diffusers UNet: explicit attention probabilities on chosen layers only.

The fused kernels (SDPA, flash attention) never materialise the attention matrix, so the layers whose maps
MapDiff reads get a processor that computes ``softmax(QKᵀ/√d)`` explicitly and stores it; every other layer
keeps its fast processor. The processors are installed by a context manager that restores the original ones
on exit, even after an exception (including the branch's early exit), so a UNet shared with other code is
left exactly as it was found.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from clipfusion.errors import ConfigError


def cross_attention_layers(unet: torch.nn.Module, prefixes: Iterable[str]) -> list[str]:
    """Names of the cross-attention (``attn2``) layers under each module-name prefix, in execution order.

    A prefix is any module name (``up_blocks.1``, ``up_blocks.1.attentions.0``, or a layer itself). A prefix
    that holds no cross-attention layer is a configuration error: asking for a map from it would otherwise
    silently average nothing.
    """
    names = [
        name
        for name, module in unet.named_modules()
        if name.rsplit(".", 1)[-1] == "attn2" and getattr(module, "is_cross_attention", False)
    ]
    chosen: list[str] = []
    for prefix in prefixes:
        found = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not found:
            blocks = sorted({n.split(".attentions")[0] for n in names})
            raise ConfigError(
                f"diffusion.attention_blocks: {prefix!r} holds no cross-attention layer; blocks that do: "
                + ", ".join(blocks)
            )
        chosen.extend(n for n in found if n not in chosen)
    order = {name: i for i, name in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


class AttentionProbabilityProcessor:
    """Attention with the probabilities computed explicitly and stored as ``(B, heads, queries, keys)``.

    Mirrors diffusers' ``AttnProcessor2_0`` step for step (spatial/group norm, cross norm, q/k norms, masks,
    output projection, residual, rescale) so the layer's output is unchanged up to rounding. Scores and
    softmax are computed in float32 whatever the model dtype: the stored maps are averaged and renormalised
    later, and bf16/fp16 probabilities would lose the small values that matter there.
    """

    def __init__(self, name: str, store: dict[str, torch.Tensor]) -> None:
        self.name = name
        self.store = store

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.float()
        probs = scores.softmax(dim=-1)
        self.store[self.name] = probs

        hidden_states = torch.matmul(probs.to(value.dtype), value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_cross_attention(
    unet: torch.nn.Module, layer_names: Iterable[str]
) -> Iterator[dict[str, torch.Tensor]]:
    """Install :class:`AttentionProbabilityProcessor` on ``layer_names``; yields the dict they fill.

    Each forward pass overwrites the entry of every layer it runs through; layers a pass did not reach (early
    exit) keep no stale entry from earlier passes because the dict is fresh for each ``with`` block.
    """
    modules = dict(unet.named_modules())
    store: dict[str, torch.Tensor] = {}
    originals: dict[str, Any] = {}
    try:
        for name in layer_names:
            if name not in modules or not hasattr(modules[name], "set_processor"):
                raise ConfigError(f"{name!r} is not an attention layer of this UNet")
            originals[name] = modules[name].processor
            modules[name].set_processor(AttentionProbabilityProcessor(name, store))
        yield store
    finally:
        for name, processor in originals.items():
            modules[name].set_processor(processor)
