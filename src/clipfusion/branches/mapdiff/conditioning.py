"""The UNet's conditioning layers replaced by their outputs, once the timestep and the prompts are final.

Every UNet pass of MapDiff runs at one timestep (the configured one) with one of a few cached prompts. Some
layers only ever see those two: the timestep embedding (its input is the sinusoid of the timestep), each
resnet's ``time_emb_proj`` (its input is that embedding through a SiLU) and each cross-attention's ``to_k``
and ``to_v`` (their input is the prompt's text-encoder states). In SD-2 they hold 50 M parameters, 0.2 GB in
float32, while their outputs for one timestep take 0.1 MB and for one prompt 7 MB (the keys and values of the
cross-attentions the early exit reaches). Once the text encoder is released no new prompt can appear, so
:func:`precompute_conditioning` computes those outputs, replaces each layer by a :class:`KnownInputs` table
of them, and the layer's weights are freed.

The tables are looked up by value: each keeps the inputs its outputs were computed from and serves the output
of the one its input equals exactly (``torch.equal``); any other input (another timestep, a prompt that was
not cached) is an error naming the layer, never a silently wrong output. The outputs are those of the layer
itself at batch 1, so maps agree with the unreplaced UNet to rounding (bit for bit at batch 1 on this
project's CPU; at a larger batch the layer's own matrix product may round its rows differently from its
batch-1 product, by about 1e-7 of the values).

A cross-attention's keys and values are replaced only while the table is smaller than the two weight
matrices (tokens × prompts below the text width: 13 prompts of 77 tokens for SD-2's 1,024): a run over many
categories keeps them.

A UNet shared by several fitted objects (:class:`clipfusion.shared.SharedModels`) is never given prompt
tables: the prompts are the objects' own, and more objects may come. Its timestep layers still become tables
(the timestep is a setting of the shared models), and its key and value projections become
:class:`BatchOneLinear` layers, which compute a batch's one repeated prompt once and expand it: the numbers a
prompt table gives, whatever the batch, with the weights kept for any prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from clipfusion.errors import ClipfusionError

#: a cross-attention's keys and values are replaced while their table (tokens × prompts rows) is smaller than
#: this share of the projections' weights (the text width in rows): beyond it, the table would cost more
#: memory than the weights it frees
KEY_VALUE_TABLE_SHARE = 1.0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


class KnownInputs(torch.nn.Module):
    """A layer replaced by its outputs for the only inputs it will be given (see the module docstring).

    ``inputs[i]`` and ``outputs[i]`` are one batch row of the layer's input and output (any shape); a call
    with a batch of rows returns, for each row, the output of the input it equals, as a read-only view
    where every row is the same input (the usual case: a batch shares its timestep and prompt).
    """

    def __init__(
        self,
        name: str,
        inputs: Sequence[torch.Tensor],
        outputs: Sequence[torch.Tensor],
        timesteps: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.replaced_name = name
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        #: the timesteps a timestep layer's rows are for (empty for a prompt layer)
        self.timesteps = tuple(timesteps)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> KnownInputs:
        # the tables are not parameters or buffers (they must not enter a state dict: the fingerprint of the
        # weights is taken before replacing), but they follow the module to another device or dtype
        self.inputs = [fn(t) for t in self.inputs]
        self.outputs = [fn(t) for t in self.outputs]
        return self

    def _index(self, row: torch.Tensor) -> int:
        for i, known in enumerate(self.inputs):
            if _same(known, row):
                return i
        raise ClipfusionError(
            f"UNet layer {self.replaced_name!r} was replaced by its outputs for {len(self.inputs)} known "
            "input(s) (the configured timestep and the prompts cached when the text encoder was released) "
            "and was given another one; build the branch with diffusion.precompute_conditioning=false to "
            "run other timesteps or prompts"
        )

    def forward(self, hidden: torch.Tensor, *rest: Any) -> torch.Tensor:
        if any(r is not None for r in rest):
            raise ClipfusionError(f"UNet layer {self.replaced_name!r} was replaced by a table: no condition")
        shared = hidden.shape[0] == 1 or hidden.stride(0) == 0  # an expanded batch: one row to look up
        rows = [self._index(hidden[0])] if shared else [self._index(row) for row in hidden]
        if len(set(rows)) == 1:
            return self.outputs[rows[0]].unsqueeze(0).expand(hidden.shape[0], *self.outputs[rows[0]].shape)
        return torch.stack([self.outputs[i] for i in rows])


def _parent(root: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def conditioning_layers(unet: torch.nn.Module) -> dict[str, str]:
    """``{module name: "time" | "prompt"}`` for the layers :func:`precompute_conditioning` may replace."""
    layers: dict[str, str] = {}
    for name, module in unet.named_modules():
        leaf = name.rpartition(".")[2]
        if name == "time_embedding" or (leaf == "time_emb_proj" and isinstance(module, torch.nn.Linear)):
            layers[name] = "time"
        elif leaf in ("to_k", "to_v") and isinstance(module, torch.nn.Linear):
            parent = unet.get_submodule(name.rpartition(".")[0])
            if getattr(parent, "is_cross_attention", False) and not getattr(parent, "norm_cross", None):
                layers[name] = "prompt"
    return layers


def _time_tables(
    unet: torch.nn.Module, names: Sequence[str], timesteps: Sequence[int], like: torch.Tensor
) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The timestep layers' inputs and outputs, computed as diffusers' ``UNet2DConditionModel.forward`` and
    ``ResnetBlock2D.forward`` compute them (the embedding goes to every resnet unchanged in SD-2; a UNet that
    adds class or text-time embeddings to it keeps these layers)."""
    extra = ("class_embedding", "add_embedding", "time_embed_act")
    if any(getattr(unet, n, None) is not None for n in extra) or not hasattr(unet, "get_time_embed"):
        return {}
    tables: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {name: ([], []) for name in names}
    for step in dict.fromkeys(timesteps):
        t_emb = unet.get_time_embed(sample=like, timestep=torch.tensor([step], device=like.device))
        emb = unet.time_embedding(t_emb, None)
        for name in names:
            if name == "time_embedding":
                key, value = t_emb, emb
            else:
                resnet = unet.get_submodule(name.rpartition(".")[0])
                key = emb if getattr(resnet, "skip_time_act", False) else resnet.nonlinearity(emb)
                value = unet.get_submodule(name)(key)
            tables[name][0].append(key[0])
            tables[name][1].append(value[0])
    return tables


class BatchOneLinear(torch.nn.Linear):
    """A key or value projection that computes a batch of one repeated input (an expanded tensor, as every
    UNet pass gives its prompt) once and expands the result: each row is then the layer's batch-1 output,
    the very numbers a :class:`KnownInputs` table of that prompt holds, at any batch size."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] > 1 and hidden.stride(0) == 0:
            row = super().forward(hidden[:1])
            return row.expand(hidden.shape[0], *row.shape[1:])
        return super().forward(hidden)


def batch_one_projections(unet: torch.nn.Module) -> list[str]:
    """Make every prompt projection that :func:`precompute_conditioning` could table a
    :class:`BatchOneLinear` (the same module, weights and name; only its forward changes); returns their
    names."""
    changed = []
    for name, kind in conditioning_layers(unet).items():
        layer = unet.get_submodule(name)
        if kind == "prompt" and type(layer) is torch.nn.Linear:
            layer.__class__ = BatchOneLinear
            changed.append(name)
    return changed


def precompute_conditioning(
    unet: torch.nn.Module, timesteps: Sequence[int], prompts: Sequence[torch.Tensor]
) -> list[str]:
    """Replace the conditioning layers of ``unet`` by :class:`KnownInputs` tables; returns their names.

    ``prompts`` are ``(1, tokens, width)`` text-encoder states as the UNet's passes get them, in its dtype;
    none (a shared UNet) replaces the timestep layers only. Each table row is the layer's own output at
    batch 1, computed here directly (no UNet pass, so no activation or weight copy adds to the memory peak
    while every weight is still loaded).
    """
    if not timesteps:
        return []
    kinds = conditioning_layers(unet)
    # no prompt (a shared UNet), or a table that would outweigh the weights it frees: timestep layers only
    rows = int(prompts[0].shape[-2]) * len(prompts) if prompts else 0
    if not prompts or rows >= int(prompts[0].shape[-1]) * KEY_VALUE_TABLE_SHARE:
        kinds = {name: kind for name, kind in kinds.items() if kind == "time"}
    if not kinds:
        return []
    with torch.inference_mode():
        # a batch of one in the UNet's dtype and device
        like = prompts[0].new_zeros(1) if prompts else next(unet.parameters()).new_zeros(1)
        tables = _time_tables(unet, [n for n, k in kinds.items() if k == "time"], timesteps, like)
        for name in (n for n, k in kinds.items() if k == "prompt"):
            layer = unet.get_submodule(name)
            tables[name] = ([p[0] for p in prompts], [layer(p)[0] for p in prompts])
    replaced = []
    for name, (keys, values) in tables.items():
        parent, leaf = _parent(unet, name)
        steps = tuple(dict.fromkeys(timesteps)) if kinds[name] == "time" else ()
        setattr(parent, leaf, KnownInputs(name, keys, values, steps))
        replaced.append(name)
    return replaced


__all__ = [
    "BatchOneLinear",
    "KnownInputs",
    "batch_one_projections",
    "conditioning_layers",
    "precompute_conditioning",
]
