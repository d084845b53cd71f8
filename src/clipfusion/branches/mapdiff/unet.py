"""The UNet as MapDiff uses it: a pass that captures what the maps read and stops as soon as it has it, and
the surgery that removes what such a pass never reaches.

A pass (:func:`capture_pass`) hooks every read block and captures the attention probabilities of every read
cross-attention layer (:mod:`.attention`); once the last of them has run, a hook ends the pass (the early
exit), so what is captured is identical to a full pass and the rest of the UNet is never computed. The
modules such a pass never reaches can then be removed for good (:func:`drop_unreached_modules`,
:func:`drop_after_last_attention`): each is replaced by a :class:`DroppedModule` that says why if anything
still calls it, and :func:`check_reachable` refuses, before any computation, a pass that would need one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from clipfusion.branches.mapdiff.attention import capture_cross_attention, cross_attention_layers
from clipfusion.errors import ClipfusionError, ConfigError


@dataclass
class UNetCapture:
    """What one UNet pass left behind: attention probabilities and block outputs.

    ``attention[name]`` is ``(B, heads, queries, tokens)`` in float32; ``features[name]`` is ``(B, C, h, w)``
    in the model dtype; ``noise_pred`` is the UNet output, or ``None`` when the pass stopped early.
    """

    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    noise_pred: torch.Tensor | None = None


class _StopUNet(Exception):
    """Raised from a forward hook to end a UNet pass once every block a map reads has run."""


_BLOCK_RANK = {"down_blocks": 1, "mid_block": 2, "up_blocks": 3}


def top_level_block(name: str) -> tuple[str, tuple[int, int]] | None:
    """The UNet block (``down_blocks.i``, ``mid_block``, ``up_blocks.i``) a module belongs to, with its rank
    in the order diffusers' ``UNet2DConditionModel.forward`` runs them; ``None`` for anything else."""
    parts = name.split(".")
    if parts[0] == "mid_block":
        return "mid_block", (2, 0)
    if parts[0] in _BLOCK_RANK and len(parts) > 1 and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}", (_BLOCK_RANK[parts[0]], int(parts[1]))
    return None


def stop_block(module_names: Sequence[str]) -> str | None:
    """The block after which no module in ``module_names`` runs, or ``None`` when a full pass is needed."""
    located = [top_level_block(n) for n in module_names]
    if not located or any(loc is None for loc in located):
        return None
    return max(located, key=lambda loc: loc[1])[0]  # type: ignore[index]


class DroppedModule(torch.nn.Module):
    """Stands where a UNet module was removed because the early exit never reaches it (its weights freed).

    Calling it is an error that says why; :class:`MapDiff` refuses a full pass on such a UNet before any
    computation starts.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.dropped_name = name

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        raise ClipfusionError(
            f"UNet module {self.dropped_name!r} was dropped (diffusion.early_exit never runs it); build the "
            "branch with early_exit=false to run the whole UNet"
        )


def drop_unreached_modules(unet: torch.nn.Module, module_names: Sequence[str]) -> list[str]:
    """Replace every top-level UNet module that runs after the last block of ``module_names`` (later
    up-blocks, the output norm and convolution) by a :class:`DroppedModule`; returns their names.

    With the early exit those modules never run, so dropping them changes no map and frees their weights
    (``up_blocks.3`` and the output layers of SD-2: 19 M parameters). Nothing is dropped when a name is
    outside the blocks (a full pass is needed) or when the last block is the last one anyway.
    """
    last = stop_block(module_names)
    if last is None:
        return []
    rank = top_level_block(last)[1]  # type: ignore[index]
    dropped: list[str] = []
    for group in ("down_blocks", "up_blocks"):
        blocks = getattr(unet, group, None)
        for i in range(len(blocks) if blocks is not None else 0):
            name = f"{group}.{i}"
            if top_level_block(name)[1] > rank and not isinstance(blocks[i], DroppedModule):  # type: ignore[index]
                blocks[i] = DroppedModule(name)
                dropped.append(name)
    if rank < (2, 0) and isinstance(getattr(unet, "mid_block", None), torch.nn.Module):
        unet.mid_block = DroppedModule("mid_block")
        dropped.append("mid_block")
    for name in ("conv_norm_out", "conv_out"):
        if isinstance(getattr(unet, name, None), torch.nn.Module) and not isinstance(
            getattr(unet, name), DroppedModule
        ):
            setattr(unet, name, DroppedModule(name))
            dropped.append(name)
    return dropped


def drop_after_last_attention(
    unet: torch.nn.Module, attention_layers: Sequence[str], feature_blocks: Sequence[str]
) -> list[str]:
    """Inside the block where the early exit stops, replace what runs after its last cross-attention by
    :class:`DroppedModule`; returns their names.

    When the pass ends at a cross-attention (the defaults: the last ``attn2`` of up_blocks.2), the rest of
    its transformer block (``norm3``, ``ff``), its transformer's ``proj_out``, any later resnet and attention
    of the block and its up- or down-sampler never run: 9.0 M parameters for SD-2. Only for diffusers'
    cross-attention up and down blocks, when that layer is the block's last cross-attention (so that no
    ``attn2`` a configuration may name is removed) and no block output in it is read.
    """
    stop = stop_block([*attention_layers, *feature_blocks])
    if stop is None or not attention_layers:
        return []
    block = dict(unet.named_modules()).get(stop)  # None for a misspelt block: check_config says so
    if type(block).__name__ not in ("CrossAttnUpBlock2D", "CrossAttnDownBlock2D"):
        return []
    if any(b == stop or b.startswith(stop + ".") for b in feature_blocks):
        return []
    inside = [n for n in attention_layers if n.startswith(stop + ".")]
    every = cross_attention_layers(unet, [stop])
    parts = inside[-1].split(".") if inside else []
    if not inside or inside[-1] != every[-1] or parts[2:6:2] != ["attentions", "transformer_blocks"]:
        return []
    k, j = int(parts[3]), int(parts[5])
    transformer = block.attentions[k]
    cut: list[tuple[torch.nn.Module, str, str]] = [
        (transformer.transformer_blocks[j], leaf, f"{stop}.attentions.{k}.transformer_blocks.{j}.{leaf}")
        for leaf in ("norm3", "ff")
    ]
    cut += [
        (transformer.transformer_blocks, str(i), f"{stop}.attentions.{k}.transformer_blocks.{i}")
        for i in range(j + 1, len(transformer.transformer_blocks))
    ]
    cut.append((transformer, "proj_out", f"{stop}.attentions.{k}.proj_out"))
    for group in ("resnets", "attentions"):
        modules = getattr(block, group)
        cut += [(modules, str(i), f"{stop}.{group}.{i}") for i in range(k + 1, len(modules))]
    for group in ("upsamplers", "downsamplers"):
        modules = getattr(block, group, None) or []
        cut += [(modules, str(i), f"{stop}.{group}.{i}") for i in range(len(modules))]
    dropped = []
    for parent, leaf, name in cut:
        module = parent[int(leaf)] if leaf.isdigit() else getattr(parent, leaf, None)
        if isinstance(module, torch.nn.Module) and not isinstance(module, DroppedModule):
            if leaf.isdigit():
                parent[int(leaf)] = DroppedModule(name)
            else:
                setattr(parent, leaf, DroppedModule(name))
            dropped.append(name)
    return dropped


def _tensor_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # down blocks return (hidden states, residuals)
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise ConfigError(f"a feature block returned {type(output).__name__}, not a tensor")


def check_reachable(
    dropped: Sequence[str], module_names: Sequence[str], early_exit: bool, feature_blocks: Sequence[str] = ()
) -> None:
    """Refuse a pass that would need a module :func:`drop_unreached_modules` or
    :func:`drop_after_last_attention` removed (``dropped``: their names; ``module_names``: every layer and
    block the pass reads)."""
    last = stop_block(module_names) if early_exit else None
    needed = top_level_block(last)[1] if last is not None else None  # type: ignore[index]
    for name in dropped:
        located = top_level_block(name)
        top_level = located is None or name == located[0]
        if needed is None or (located is not None and located[1] < needed):
            reached = True
        elif located is not None and located[1] == needed:
            # inside the stop block, only what follows its last cross-attention was dropped: a pass
            # that reads no block output there stops before it
            reached = top_level or any(b == last or b.startswith(f"{last}.") for b in feature_blocks)
        else:
            reached = False
        if reached:
            raise ConfigError(
                f"this UNet's {', '.join(dropped)} were dropped (the early exit of the "
                "branch it was loaded for never runs them); "
                + ("a full pass (early_exit=false)" if not early_exit else f"reading {last}")
                + " needs them: load the components again"
            )


def capture_pass(
    unet: Any,
    sample: torch.Tensor,
    timestep: int,
    encoder_states: torch.Tensor,
    *,
    layers: Sequence[str],
    blocks: Sequence[str],
    early_exit: bool,
) -> UNetCapture:
    """One UNet pass at ``timestep`` conditioned on ``encoder_states`` (one row per sample), capturing the
    attention probabilities of ``layers`` and the outputs of ``blocks``; with ``early_exit`` it ends as soon
    as all of them have run (``noise_pred`` is then ``None``). Hooks and attention processors are removed
    afterwards, whatever happens, so the UNet is left as it was found."""
    capture = UNetCapture()
    modules = dict(unet.named_modules())
    handles = []
    waiting = set(layers) | set(blocks)  # read modules that have not finished yet in this pass
    features = set(blocks)

    def finished(name: str):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            if name in features:
                capture.features[name] = _tensor_output(output)
            waiting.discard(name)
            if early_exit and not waiting:  # nothing left to read: the rest of the pass is waste
                raise _StopUNet

        return hook

    try:
        for name in dict.fromkeys([*layers, *blocks]):
            if name not in modules:
                raise ConfigError(f"{name!r} is not a module of this UNet")
            handles.append(modules[name].register_forward_hook(finished(name)))
        t = torch.full((sample.shape[0],), timestep, dtype=torch.long, device=sample.device)
        with torch.inference_mode(), capture_cross_attention(unet, list(layers)) as attention:
            with contextlib.suppress(_StopUNet):
                capture.noise_pred = unet(sample, t, encoder_hidden_states=encoder_states).sample
            capture.attention = dict(attention)
    finally:
        for handle in handles:
            handle.remove()
    return capture


__all__ = [
    "DroppedModule",
    "UNetCapture",
    "capture_pass",
    "check_reachable",
    "drop_after_last_attention",
    "drop_unreached_modules",
    "stop_block",
    "top_level_block",
]
