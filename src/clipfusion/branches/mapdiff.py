"""MapDiff: Stable Diffusion 2 inpainting as a one-step feature extractor (METHOD.md, MapDiff).

One UNet evaluation per image, state word and noise draw, no iterative denoising and no classifier-free
guidance. The clean image is encoded once (VAE posterior mean × scaling factor); the inpainting conditioning
is an empty mask with the clean latents as the masked-image latents, so the UNet sees the whole image; the
latents are noised at one timestep with a seeded ε that references and queries share. Two maps come out:

* ``diff_L``: cross-attention of every latent position onto the state word's token(s), renormalised by the
  attention on the prompt's other tokens (``attention_normaliser``), averaged over heads, layers (each
  upsampled to the largest grid first), state words and noise draws;
* ``diff_V`` (few-shot): cosine distance of UNet block features to their nearest neighbour in a memory bank
  of the references' features, taken at the same timestep, block, prompt and noise.

The steps are public (:meth:`MapDiff.preprocess`, :meth:`MapDiff.encode_latents`, :meth:`MapDiff.unet_input`,
:meth:`MapDiff.run_unet`, :meth:`MapDiff.attention_map`, :meth:`MapDiff.feature_distance`) so that a speed
harness can time the VAE, the UNet and the map arithmetic separately. No I/O happens here: components come
from :mod:`clipfusion.models.diffusion` or from the caller.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipfusion.branches import BranchState, resolve_batch_size
from clipfusion.branches.attention import capture_cross_attention, cross_attention_layers
from clipfusion.branches.conditioning import KnownInputs, precompute_conditioning
from clipfusion.branches.lean_vae import encode_moments, lean_encoder_supported, use_inplace_activations
from clipfusion.branches.memory import nearest_neighbour_distance
from clipfusion.config import MapDiffConfig, load_preset, with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.maps import resize_maps

Images = Sequence[Image.Image] | torch.Tensor


@dataclass(frozen=True)
class PromptTokens:
    """A tokenized diffusion prompt and where its state word sits in it."""

    text: str
    state: str
    input_ids: torch.Tensor  # (1, context length), int64
    state_positions: tuple[int, ...]
    end_position: int  # index of the end-of-text token


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


def _top_level_block(name: str) -> tuple[str, tuple[int, int]] | None:
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
    located = [_top_level_block(n) for n in module_names]
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
    rank = _top_level_block(last)[1]  # type: ignore[index]
    dropped: list[str] = []
    for group in ("down_blocks", "up_blocks"):
        blocks = getattr(unet, group, None)
        for i in range(len(blocks) if blocks is not None else 0):
            name = f"{group}.{i}"
            if _top_level_block(name)[1] > rank and not isinstance(blocks[i], DroppedModule):  # type: ignore[index]
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


class MapDiff:
    """The diffusion branch (a :class:`~clipfusion.branches.Branch`): ``fit(object_name, references)``, then
    ``predict(images)``.

    Takes already-loaded components (any device and dtype; the maps are computed in float32), so that tests
    and benchmarks can inject their own; :meth:`from_preset` and :meth:`from_config` load them.
    """

    name = "diffusion"
    map_names = ("diff_L", "diff_V")

    def __init__(
        self,
        vae: Any,
        unet: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        config: MapDiffConfig | None = None,
    ) -> None:
        self.vae = vae
        self.unet = unet
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.config = (config or MapDiffConfig()).placed()
        self.attention_layers = cross_attention_layers(unet, self.config.attention_blocks)
        #: UNet modules removed because the early exit never reaches them (see drop_unreached_modules)
        self.dropped_modules = [n for n, m in unet.named_modules() if isinstance(m, DroppedModule)]
        self._note_tables()
        #: what the weights fingerprint reads of the UNet before any of it was freed
        self._unet_records: tuple[bytes, ...] | None = None
        self._check_components()
        self._embeddings: dict[tuple[str, str], torch.Tensor] = {}
        self._tokens: dict[tuple[str, str], PromptTokens] = {}
        self._noise: dict[tuple[int, ...], torch.Tensor] = {}
        self._encoder_fn: Any = None
        #: encode through :mod:`clipfusion.branches.lean_vae` where the VAE's structure allows (the same
        #: latents to float32 rounding, fewer 512² activations alive); False runs diffusers' own forward (the
        #: benchmarks' "before")
        self.lean_vae = True
        self.object_name: str | None = None
        self.prompts: dict[str, PromptTokens] = {}
        # memory_bank[(state word, noise draw)][feature block] = (M, C) reference features
        self.memory_bank: dict[tuple[str, int], dict[str, torch.Tensor]] | None = None
        self._n_references = 0

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: MapDiffConfig,
        *,
        cache_dir: str | None = None,
        local_files_only: bool | None = None,
        text_encoder: bool = True,
        objects: Sequence[str] = (),
    ) -> MapDiff:
        """Load the components the configuration names (pretrained or random) and wrap them.

        ``local_files_only`` keeps the hub out of it (default: the hub library's own offline setting).
        ``text_encoder=False`` does not load the text encoder at all: for a branch that gets its prompt
        embeddings from :meth:`load_state`. ``objects`` are the object names the branch will be fitted for:
        the text encoder is loaded alone, encodes their prompts, and is freed before the VAE and the UNet
        load, so that it never shares memory with them (1.4 GB less at the peak for SD-2 in float32); the
        branch is then as after :meth:`prepare` and :meth:`release_text_encoder`.
        """
        from clipfusion.models.diffusion import load_diffusion_components
        from clipfusion.models.weights import fingerprint_records
        from clipfusion.runtime import return_freed_memory

        config = config.placed()
        load = {"cache_dir": cache_dir, "local_files_only": local_files_only}
        tokens: dict[tuple[str, str], PromptTokens] = {}
        embeddings: dict[tuple[str, str], torch.Tensor] = {}
        if objects and text_encoder:
            text = load_diffusion_components(config, image_models=False, **load)
            for name in objects:
                for state in config.state_words:
                    tokens[(name, state)] = prompt_tokens(text.tokenizer, config.prompt_template, name, state)
                    embeddings[(name, state)] = encode_prompt(
                        text.text_encoder, tokens[(name, state)].input_ids
                    )
            del text
            return_freed_memory()
        records: tuple[bytes, ...] | None = None

        def unet_ready(unet: Any) -> None:  # before the VAE loads: what goes here is gone when it exists
            nonlocal records
            if config.early_exit:  # what the early exit never reaches is never needed by this branch
                drop_unreached_modules(unet, [*config.attention_blocks, *config.feature_blocks])
            records = fingerprint_records("unet", unet)
            if config.early_exit:
                layers = cross_attention_layers(unet, config.attention_blocks)
                drop_after_last_attention(unet, layers, config.feature_blocks)
            if embeddings and config.precompute_conditioning:
                parameter = next(unet.parameters())
                prompts = [e.to(device=parameter.device, dtype=parameter.dtype) for e in embeddings.values()]
                precompute_conditioning(unet, [config.timestep], prompts)
                for key, prompt in zip(embeddings, prompts, strict=True):
                    embeddings[key] = prompt  # the tables' keys are the cached prompts themselves
            return_freed_memory()

        # the branch only encodes: the decoder (a third of the VAE) is dead weight here
        components = load_diffusion_components(
            config,
            text_encoder=text_encoder and not objects,
            vae_decoder=False,
            unet_ready=unet_ready,
            **load,
        )
        vae = components.vae
        if config.channels_last:
            vae.to(memory_format=torch.channels_last)
        use_inplace_activations(vae.encoder)
        branch = cls(**components.modules(), config=config)
        branch._unet_records = records
        if objects:
            for key, hidden in embeddings.items():
                branch._check_text_width(hidden.shape[-1])
                branch._embeddings[key] = hidden.to(device=branch.device, dtype=branch.dtype)
            branch._tokens.update(tokens)
            branch.release_text_encoder()
        return branch

    @classmethod
    def from_preset(cls, name: str = "paper", **options: Any) -> MapDiff:
        """The ``[diffusion]`` section of a preset, options overridden (``timestep=200``, ``device="cpu"``).

        Options are validated as a configuration file's would be: an unknown name or a bad value is a
        :class:`~clipfusion.errors.ConfigError` before anything is loaded.
        """
        config = load_preset(name).branch_configs()[1]
        if options:
            config = with_overrides(config, options)
        return cls.from_config(config)

    def _check_components(self) -> None:
        self.check_config(self.config)

    def check_config(self, cfg: MapDiffConfig) -> None:
        """Refuse options these components cannot run (block names, timestep range, sizes, widths): the
        branch's own at construction, and any other set of options its steps are asked to use (a grid)."""
        modules = dict(self.unet.named_modules())
        blocks = sorted({loc[0] for n in modules if (loc := _top_level_block(n)) is not None})
        for name in cfg.feature_blocks:
            if name not in modules or name == "":
                raise ConfigError(
                    f"diffusion.feature_blocks: {name!r} is not a module of the UNet; "
                    f"blocks: {', '.join(blocks)}"
                )
        cross_attention_layers(self.unet, cfg.attention_blocks)  # every attention block holds layers
        if self.dropped_modules:
            layers = cross_attention_layers(self.unet, cfg.attention_blocks)
            self._check_reachable([*layers, *cfg.feature_blocks], cfg.early_exit, cfg.feature_blocks)
        n_train = int(self.scheduler.config.num_train_timesteps)
        if not 0 <= cfg.timestep < n_train:
            raise ConfigError(f"diffusion.timestep must lie in [0, {n_train}), got {cfg.timestep}")
        if self._precomputed_timesteps and cfg.timestep not in self._precomputed_timesteps:
            raise ConfigError(
                f"diffusion.timestep {cfg.timestep}: this branch's UNet keeps its timestep layers' outputs "
                f"for timestep {', '.join(map(str, self._precomputed_timesteps))} only "
                "(diffusion.precompute_conditioning); build it with precompute_conditioning=false to run "
                "several timesteps"
            )
        latent = int(self.vae.config.latent_channels)
        if int(self.unet.config.in_channels) != 2 * latent + 1:
            raise ConfigError(
                f"the UNet takes {self.unet.config.in_channels} input channels; an inpainting UNet takes "
                f"{2 * latent + 1} (noisy latents, mask, masked-image latents)"
            )
        factor = self.vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        if cfg.image_size % factor:
            raise ConfigError(
                f"diffusion.image_size must be a multiple of {factor} for this VAE and UNet, "
                f"got {cfg.image_size}"
            )
        if self.text_encoder is not None:
            self._check_text_width(int(self.text_encoder.config.hidden_size))

    def _check_text_width(self, width: int) -> None:
        if width != int(self.unet.config.cross_attention_dim):
            raise ConfigError(
                f"text encoder width {width} differs from the UNet's cross_attention_dim "
                f"{self.unet.config.cross_attention_dim}"
            )

    def _check_reachable(
        self, module_names: Sequence[str], early_exit: bool, feature_blocks: Sequence[str] = ()
    ) -> None:
        """Refuse a pass that would need a module :func:`drop_unreached_modules` or
        :func:`drop_after_last_attention` removed (``module_names``: every layer and block it reads)."""
        last = stop_block(module_names) if early_exit else None
        needed = _top_level_block(last)[1] if last is not None else None  # type: ignore[index]
        for name in self.dropped_modules:
            located = _top_level_block(name)
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
                    f"this UNet's {', '.join(self.dropped_modules)} were dropped (the early exit of the "
                    "branch it was loaded for never runs them); "
                    + ("a full pass (early_exit=false)" if not early_exit else f"reading {last}")
                    + " needs them: load the components again"
                )

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_factor(self) -> int:
        """Pixels per latent position along one side."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.config.image_size // self.vae_factor

    @property
    def shots(self) -> int:
        """Number of reference images in the memory bank (0: zero-shot)."""
        return self._n_references

    @property
    def default_batch_size(self) -> int:
        return self.config.batch_size

    # -- prompts ------------------------------------------------------------------------------------------
    def tokenize_prompt(self, object_name: str, state: str) -> PromptTokens:
        """The prompt for ``object_name`` and ``state`` (:func:`prompt_tokens`), cached."""
        cached = self._tokens.get((object_name, state))
        if cached is not None:
            return cached
        if self.tokenizer is None:
            raise self._released(object_name, state)
        tokens = prompt_tokens(self.tokenizer, self.config.prompt_template, object_name, state)
        self._tokens[(object_name, state)] = tokens
        return tokens

    def prompt_embeddings(self, object_name: str, state: str) -> torch.Tensor:
        """Text-encoder output ``(1, 77, D)`` for one prompt, cached per object name and state word."""
        key = (object_name, state)
        if key not in self._embeddings:
            if self.text_encoder is None:
                raise self._released(object_name, state)
            hidden = encode_prompt(self.text_encoder, self.tokenize_prompt(object_name, state).input_ids)
            self._embeddings[key] = hidden.to(device=self.device, dtype=self.dtype)
        return self._embeddings[key]

    def prepare(self, object_names: Iterable[str]) -> None:
        """Cache the prompt embeddings of every object name, e.g. before :meth:`release_text_encoder`."""
        for name in object_names:
            for state in self.config.state_words:
                self.prompt_embeddings(name, state)

    @staticmethod
    def _released(object_name: str, state: str) -> ClipfusionError:
        """The error for a prompt asked for after :meth:`release_text_encoder` that was not cached before."""
        return ClipfusionError(
            f"the text encoder and tokenizer were released and no prompt is cached for {object_name!r} / "
            f"{state!r}; fit or prepare every object before release_text_encoder(), or name it in the "
            "detector's objects"
        )

    def release_text_encoder(self) -> None:
        """Drop the text encoder (≈ 1.4 GB in float32 for SD-2) and its tokenizer (its vocabulary and merges
        as Python objects) once every object's prompts are cached: the prompts' tokens stay cached too.

        No prompt can be added after this, so with ``precompute_conditioning`` (the default) the UNet's
        timestep and cross-attention key/value layers are then replaced by their outputs for the configured
        timestep and the cached prompts (:mod:`clipfusion.branches.conditioning`: 0.2 GB fewer weights for
        SD-2 in float32, same maps to rounding).
        """
        self.text_encoder = None
        self.tokenizer = None
        if self.config.precompute_conditioning and self._embeddings and not self.precomputed:
            self._precompute_conditioning()

    def _precompute_conditioning(self) -> None:
        from clipfusion.models.weights import fingerprint_records

        if self._unet_records is None:  # the weights as loaded, before any is freed
            self._unet_records = fingerprint_records("unet", self.unet)
        prompts = list({id(t): t for t in self._embeddings.values()}.values())
        precompute_conditioning(self.unet, [self.config.timestep], prompts)
        self._note_tables()

    def _note_tables(self) -> None:
        """Which UNet layers are tables of their outputs (:mod:`clipfusion.branches.conditioning`) and for
        which timesteps, read from the UNet itself (it may come precomputed from :meth:`from_config`)."""
        tables = {n: m for n, m in self.unet.named_modules() if isinstance(m, KnownInputs)}
        self.precomputed: list[str] = list(tables)
        self._precomputed_timesteps = tuple(dict.fromkeys(t for m in tables.values() for t in m.timesteps))

    # -- saving and loading the fitted state ----------------------------------------------------------------
    def state(self) -> BranchState:
        """The fitted object's prompts (token ids and text-encoder output per state word) and, few-shot, the
        memory bank, as CPU tensors in the dtype they were computed in. Tensor names are positional
        (``prompt_embeddings.0``, ``memory_bank.3``); ``meta`` says which state word, draw and block each is.
        """
        if self.object_name is None:
            raise ClipfusionError("MapDiff.state: the branch is not fitted")
        tensors: dict[str, torch.Tensor] = {}
        prompts = []
        for i, state in enumerate(self.config.state_words):
            prompt = self.prompts[state]
            tensors[f"prompt_ids.{i}"] = prompt.input_ids.cpu()
            tensors[f"prompt_embeddings.{i}"] = self.prompt_embeddings(self.object_name, state).cpu()
            prompts.append(
                {
                    "state": state,
                    "text": prompt.text,
                    "state_positions": list(prompt.state_positions),
                    "end_position": prompt.end_position,
                }
            )
        bank = []
        for (state, draw), blocks in (self.memory_bank or {}).items():
            for block, features in blocks.items():
                key = f"memory_bank.{len(bank)}"
                tensors[key] = features.cpu()
                bank.append({"state": state, "draw": draw, "block": block, "tensor": key})
        meta = {"object_name": self.object_name, "shots": self._n_references, "prompts": prompts}
        if self.memory_bank is not None:
            meta["memory_bank"] = bank
        return BranchState(tensors, meta)

    def load_state(self, state: BranchState) -> None:
        """Become fitted from :meth:`state` (of a branch with the same weights), with no text encoder."""
        meta = state.meta
        object_name = meta.get("object_name")
        if not isinstance(object_name, str) or not object_name:
            raise InputError("diffusion state: no object name")
        try:
            saved = {entry["state"]: (i, entry) for i, entry in enumerate(meta["prompts"])}
            missing = [w for w in self.config.state_words if w not in saved]
            if missing:
                raise InputError(f"diffusion state: no prompt for the state word(s) {', '.join(missing)}")
            prompts, embeddings = {}, {}
            for state_word in self.config.state_words:
                i, entry = saved[state_word]
                prompts[state_word] = PromptTokens(
                    str(entry["text"]),
                    state_word,
                    _state_tensor(state, f"prompt_ids.{i}").long(),
                    tuple(int(p) for p in entry["state_positions"]),
                    int(entry["end_position"]),
                )
                embeddings[(object_name, state_word)] = _state_tensor(state, f"prompt_embeddings.{i}").to(
                    device=self.device, dtype=self.dtype
                )
            bank: dict[tuple[str, int], dict[str, torch.Tensor]] | None = None
            if "memory_bank" in meta:
                bank = {}
                for entry in meta["memory_bank"]:
                    features = _state_tensor(state, str(entry["tensor"])).to(self.device)
                    bank.setdefault((str(entry["state"]), int(entry["draw"])), {})[str(entry["block"])] = (
                        features
                    )
                needed = {(w, d) for w in self.config.state_words for d in range(self.config.n_noise)}
                if set(bank) != needed or any(
                    set(blocks) != set(self.config.feature_blocks) for blocks in bank.values()
                ):
                    raise InputError(
                        "diffusion state: the memory bank does not cover every state word, noise draw and "
                        "feature block of the configuration"
                    )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"diffusion state: malformed ({type(exc).__name__}: {exc})") from exc
        self._embeddings.update(embeddings)
        self._tokens.update({(object_name, word): tokens for word, tokens in prompts.items()})
        self.prompts = prompts
        self.memory_bank = bank
        self._n_references = int(meta.get("shots", 0)) if bank is not None else 0
        self.object_name = object_name

    def weights_fingerprint(self) -> str:
        """Fingerprint of what :meth:`predict` computes with: the VAE encoder, the UNet and the noise
        schedule (not the text encoder, nor the VAE decoder the branch never runs)."""
        from clipfusion.models.weights import weights_fingerprint

        # the UNet as loaded (before drop_after_last_attention and precompute_conditioning freed some of it),
        # so that a fit saved before those existed still loads
        unet = self._unet_records if self._unet_records is not None else self.unet
        parts: dict[str, Any] = {"vae.encoder": self.vae.encoder, "unet": unet}
        if getattr(self.vae, "quant_conv", None) is not None:
            parts["vae.quant_conv"] = self.vae.quant_conv
        parts["scheduler.alphas_cumprod"] = torch.as_tensor(self.scheduler.alphas_cumprod)
        parts["vae.scaling_factor"] = torch.tensor([float(self.vae.config.scaling_factor)])
        return weights_fingerprint(parts)

    # -- pipeline steps -----------------------------------------------------------------------------------
    def preprocess(self, images: Images) -> torch.Tensor:
        """``(N, 3, S, S)`` in [-1, 1] (the VAE's range), resized bilinear to ``image_size``.

        PIL images go through PIL's bilinear resize; a float tensor ``(N, 3, H, W)`` in [0, 1] through
        antialiased bilinear interpolation (the same filter up to rounding).
        """
        size = self.config.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise InputError(
                    f"expected images as an (N, 3, H, W) tensor, got shape {tuple(images.shape)}"
                )
            x = images.float()
            if x.shape[-2:] != (size, size):
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        else:
            if len(images) == 0:
                raise InputError("no images given")
            arrays = []
            for img in images:
                if not isinstance(img, Image.Image):
                    raise InputError(f"expected PIL images or a tensor, got {type(img).__name__}")
                img = img.convert("RGB")
                if img.size != (size, size):
                    img = img.resize((size, size), Image.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
            x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (x * 2.0 - 1.0).clamp(-1.0, 1.0)

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """``z0 = scaling_factor · VAE.encode(x).mean``, float32 ``(N, 4, h, w)``.

        The posterior mean rather than a sample keeps the maps deterministic; the masked-image latents of the
        empty-mask conditioning are these same latents, so one encode serves both.
        """
        vae_param = next(self.vae.parameters())
        pixels = pixels.to(device=vae_param.device, dtype=vae_param.dtype)
        if self.config.channels_last:
            # oneDNN and cuDNN convolve NHWC without reordering every activation (~15 % of the VAE on a CPU)
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.config.compile:
                moments = self._compiled_encoder()(pixels)
            elif self.lean_vae and lean_encoder_supported(self.vae):
                # diffusers' pass, same values, with fewer 512² activations alive at once (lean_vae.py)
                moments = encode_moments(self.vae, pixels)
            else:
                moments = self.vae.encode(pixels).latent_dist.parameters
            mean = moments[:, : moments.shape[1] // 2]  # DiagonalGaussianDistribution's mean half
            z0 = mean.float() * float(self.vae.config.scaling_factor)
        return z0.to(self.device)

    def _compiled_encoder(self) -> Any:
        """The VAE encoder (and its quant conv) through ``torch.compile``, built on first use.

        Inductor's weight freezing pre-packs the convolution weights; shapes are static (one compile per
        batch shape), which suits a benchmark or a production line with a fixed batch size.
        """
        if self._encoder_fn is None:
            vae = self.vae

            def encode(pixels: torch.Tensor) -> torch.Tensor:
                moments = vae.encoder(pixels)
                return vae.quant_conv(moments) if vae.quant_conv is not None else moments

            self._encoder_fn = torch.compile(encode, options={"freezing": True}, dynamic=False)
        return self._encoder_fn

    def noise(self, latent_shape: Sequence[int]) -> torch.Tensor:
        """The ``n_noise`` ε draws ``(n_noise, C, h, w)``, float32, from ``seed`` alone.

        Drawn on the CPU (device-independent) once per latent shape; every image, query or reference, gets the
        same ε for a given draw, so an image's maps do not depend on the batch it is in.
        """
        key = tuple(int(s) for s in latent_shape)
        if key not in self._noise:
            generator = torch.Generator("cpu").manual_seed(self.config.seed)
            eps = torch.randn((self.config.n_noise, *key), generator=generator, dtype=torch.float32)
            self._noise[key] = eps.to(self.device)
        return self._noise[key]

    def unet_input(self, z0: torch.Tensor, draw: int = 0, *, timestep: int | None = None) -> torch.Tensor:
        """``cat[z_t, mask = 0, z0]`` with ``z_t = add_noise(z0, ε_draw, t)``, in the UNet's dtype (``t``:
        ``timestep``, default the configured one)."""
        eps = self.noise(z0.shape[1:])[draw].expand_as(z0)
        step = self.config.timestep if timestep is None else timestep
        t = torch.full((z0.shape[0],), step, dtype=torch.long, device=z0.device)
        z_t = self.scheduler.add_noise(z0.float(), eps, t)
        mask = torch.zeros_like(z0[:, :1])
        return torch.cat([z_t, mask, z0.float()], dim=1).to(self.dtype)

    def run_unet(
        self,
        sample: torch.Tensor,
        prompt_embeddings: torch.Tensor,
        *,
        attention_layers: Sequence[str] | None = None,
        feature_blocks: Sequence[str] | None = None,
        early_exit: bool | None = None,
        timestep: int | None = None,
    ) -> UNetCapture:
        """One UNet pass at ``timestep`` (default: the configured one), capturing attention and block outputs.

        With ``early_exit`` (default: the config's) the pass ends as soon as every layer and block whose
        attention or output is read has run (for the defaults: at the last cross-attention of up_blocks.2,
        before its feed-forward and upsampler); what is captured is identical to a full pass, only
        ``noise_pred`` is then ``None``.
        ``sample`` must have been made (:meth:`unet_input`) at the same timestep.
        """
        layers = list(self.attention_layers if attention_layers is None else attention_layers)
        blocks = list(self.config.feature_blocks if feature_blocks is None else feature_blocks)
        early = self.config.early_exit if early_exit is None else early_exit
        if self.dropped_modules:
            self._check_reachable(layers + blocks, early, blocks)
        capture = UNetCapture()
        modules = dict(self.unet.named_modules())
        handles = []
        waiting = set(layers) | set(blocks)  # read modules that have not finished yet in this pass
        features = set(blocks)

        def finished(name: str):
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                if name in features:
                    capture.features[name] = _tensor_output(output)
                waiting.discard(name)
                if early and not waiting:  # nothing left to read: the rest of the pass is waste
                    raise _StopUNet

            return hook

        try:
            for name in dict.fromkeys(layers + blocks):
                if name not in modules:
                    raise ConfigError(f"{name!r} is not a module of this UNet")
                handles.append(modules[name].register_forward_hook(finished(name)))
            states = prompt_embeddings.to(device=sample.device, dtype=self.dtype)
            states = states.expand(sample.shape[0], -1, -1)
            step = self.config.timestep if timestep is None else timestep
            t = torch.full((sample.shape[0],), step, dtype=torch.long, device=sample.device)
            with torch.inference_mode(), capture_cross_attention(self.unet, layers) as attention:
                with contextlib.suppress(_StopUNet):
                    capture.noise_pred = self.unet(sample, t, encoder_hidden_states=states).sample
                capture.attention = dict(attention)
        finally:
            for handle in handles:
                handle.remove()
        return capture

    # -- maps ---------------------------------------------------------------------------------------------
    def attention_map(
        self, capture: UNetCapture, prompt: PromptTokens, *, layers: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``diff_L`` of one pass, ``(B, G, G)`` in [0, 1] on the largest attention grid ``G``.

        Head-averaged probabilities of each layer (``layers``, default the configured attention blocks'
        layers) are upsampled to the largest grid and averaged over layers; then the attention on the state
        word's tokens is divided by the attention on the normaliser's tokens (which exclude the start token,
        the attention sink that would otherwise swamp the ratio).
        """
        per_layer = []
        for name in self.attention_layers if layers is None else layers:
            probs = capture.attention[name].float().mean(dim=1)  # (B, queries, tokens)
            side = math.isqrt(probs.shape[1])
            if side * side != probs.shape[1]:
                raise ClipfusionError(f"{name}: {probs.shape[1]} attention queries do not form a square grid")
            per_layer.append(probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], side, side))
        grid = max(p.shape[-1] for p in per_layer)
        mean = torch.stack([resize_maps(p, grid) for p in per_layer]).mean(dim=0)  # (B, tokens, G, G)
        mode = self.config.attention_normaliser
        stop = {"prompt": prompt.end_position + 1, "words": prompt.end_position, "sequence": mean.shape[1]}[
            mode
        ]
        word = mean[:, list(prompt.state_positions)].sum(dim=1)
        total = mean[:, 1:stop].sum(dim=1)
        return (word / total.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)

    def feature_distance(
        self, capture: UNetCapture, bank: dict[str, torch.Tensor], *, blocks: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``diff_V`` of one pass, ``(B, G, G)``: distance to the nearest reference feature (``distance``),
        averaged over ``blocks`` (default: the configured feature blocks)."""
        maps = []
        for name in self.config.feature_blocks if blocks is None else blocks:
            features = capture.features[name]
            maps.append(
                nearest_neighbour_distance(
                    features.permute(0, 2, 3, 1), bank[name], distance=self.config.distance
                )
            )
        grid = max(m.shape[-1] for m in maps)
        return torch.stack([resize_maps(m, grid) for m in maps]).mean(dim=0)

    def bank_entries(
        self, capture: UNetCapture, blocks: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Memory-bank rows ``(B·h·w, C)`` of each feature block (default: the configured ones) of a pass."""
        entries = {}
        for name in self.config.feature_blocks if blocks is None else blocks:
            features = capture.features[name]
            if features.ndim != 4:
                raise ConfigError(
                    f"diffusion.feature_blocks: {name!r} gives {features.ndim}-d output, not a map"
                )
            entries[name] = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        return entries

    def _passes(self, pixels: torch.Tensor, *, attention: bool) -> Iterator[tuple[str, int, UNetCapture]]:
        """Every (state word, noise draw) pass over one batch; the VAE runs once for all of them."""
        z0 = self.encode_latents(pixels)
        for draw in range(self.config.n_noise):
            sample = self.unet_input(z0, draw)
            for state in self.config.state_words:
                embeddings = self.prompt_embeddings(self.object_name, state)  # type: ignore[arg-type]
                layers = self.attention_layers if attention else []
                yield state, draw, self.run_unet(sample, embeddings, attention_layers=layers)

    # -- fit / predict ------------------------------------------------------------------------------------
    def fit(self, object_name: str, references: Images | None = None) -> MapDiff:
        """Prompts for ``object_name`` (embeddings cached) and, given normal references, the memory bank.

        No references (``None`` or empty) means zero-shot: :meth:`predict` then returns ``diff_L`` only.
        """
        if not object_name or not object_name.strip():
            raise InputError("the object name must not be empty")
        # a failed fit leaves the branch unfitted, never half-fitted with another object's prompts or bank
        self.object_name, self.memory_bank, self._n_references = None, None, 0
        prompts = {state: self.tokenize_prompt(object_name, state) for state in self.config.state_words}
        for state in self.config.state_words:
            self.prompt_embeddings(object_name, state)
        self.object_name, self.prompts = object_name, prompts
        if references is None or len(references) == 0:
            return self
        try:
            self._build_bank(self.preprocess(references))
        except BaseException:
            self.object_name, self.memory_bank = None, None
            raise
        return self

    def _build_bank(self, pixels: torch.Tensor) -> None:
        parts: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = {}
        for start in range(0, pixels.shape[0], self.config.batch_size):
            for state, draw, capture in self._passes(
                pixels[start : start + self.config.batch_size], attention=False
            ):
                slot = parts.setdefault((state, draw), {})
                for name, entries in self.bank_entries(capture).items():
                    slot.setdefault(name, []).append(entries)
        self.memory_bank = {
            key: {name: torch.cat(chunks) for name, chunks in slot.items()} for key, slot in parts.items()
        }
        self._n_references = int(pixels.shape[0])

    def maps_from_passes(
        self,
        passes: Iterable[tuple[str, int, UNetCapture]],
        prompts: dict[str, PromptTokens] | None,
        memory_bank: dict[tuple[str, int], dict[str, torch.Tensor]] | None = None,
        *,
        layers: Sequence[str] | None = None,
        blocks: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(diff_L, diff_V)`` of one batch on their native grids: the maps of every (state word, noise
        draw) pass averaged, in the order given; ``diff_L`` needs the ``prompts`` and ``diff_V`` the
        ``memory_bank`` (either is ``None`` without them). ``layers`` / ``blocks`` default to the configured
        ones.

        :meth:`predict` and a grid over the diffusion options (which runs each UNet pass once for several
        option sets and runs) both average through here, so their maps are the same numbers.
        """
        language = visual = None
        n_passes = 0
        for state, draw, capture in passes:
            n_passes += 1
            if prompts is not None:
                m_l = self.attention_map(capture, prompts[state], layers=layers)
                language = m_l if language is None else language + m_l
            if memory_bank is not None:
                m_v = self.feature_distance(capture, memory_bank[(state, draw)], blocks=blocks)
                visual = m_v if visual is None else visual + m_v
        if n_passes == 0:
            raise ClipfusionError("no UNet pass to average")
        return (
            None if language is None else language / n_passes,
            None if visual is None else visual / n_passes,
        )

    def predict(
        self, images: Images, *, batch_size: int | None = None, native: bool = False
    ) -> dict[str, torch.Tensor]:
        """``diff_L`` and, after a few-shot fit, ``diff_V``: float32 ``(N, S, S)`` on the CPU.

        S is ``output_size``; with ``native`` the maps stay on the largest attention grid (``diff_L``) and
        the largest feature grid (``diff_V``), e.g. 32×32 for SD-2 at 512 px. Images are processed
        ``batch_size`` at a time; an image's maps do not depend on its batch.
        """
        if self.object_name is None:
            raise ClipfusionError("call fit(object_name, references) before predict")
        batch = resolve_batch_size(batch_size, self.config.batch_size)
        pixels = self.preprocess(images)
        outputs: dict[str, list[torch.Tensor]] = {"diff_L": [], "diff_V": []}
        for start in range(0, pixels.shape[0], batch):
            passes = self._passes(pixels[start : start + batch], attention=True)
            language, visual = self.maps_from_passes(passes, self.prompts, self.memory_bank)
            assert language is not None
            outputs["diff_L"].append(language if native else resize_maps(language, self.config.output_size))
            if visual is not None:
                outputs["diff_V"].append(visual if native else resize_maps(visual, self.config.output_size))
        return {name: torch.cat(maps).float().cpu() for name, maps in outputs.items() if maps}


def _state_tensor(state: BranchState, key: str) -> torch.Tensor:
    tensor = state.tensors.get(key)
    if not isinstance(tensor, torch.Tensor):
        raise InputError(f"diffusion state: no {key!r} tensor")
    return tensor


__all__ = [
    "DroppedModule",
    "MapDiff",
    "PromptTokens",
    "UNetCapture",
    "drop_after_last_attention",
    "drop_unreached_modules",
    "encode_prompt",
    "prompt_tokens",
    "stop_block",
    "use_inplace_activations",
]
