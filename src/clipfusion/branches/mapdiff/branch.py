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

The steps are public (:meth:`MapDiff.preprocess`, :meth:`MapDiff.encode_latents`, :meth:`MapDiff.passes` over
:meth:`MapDiff.unet_input` and :meth:`MapDiff.run_unet`, :meth:`MapDiff.maps_from_passes` and
:meth:`MapDiff.bank_from_passes`), so that a speed harness can time the VAE, the UNet and the map arithmetic
separately, and a grid over diffusion options can share one pass among several option sets, through the
very loop :meth:`MapDiff.predict` and :meth:`MapDiff.fit` run. No I/O happens here: components come from
:mod:`clipfusion.models.diffusion` or from the caller. The UNet surgery and capture (``unet.py``), the
prompts (``prompts.py``), the lean VAE pass (``lean_vae.py``) and the conditioning tables
(``conditioning.py``) are this wing's other rooms.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipfusion.branches import BranchState, TextSide, resolve_batch_size
from clipfusion.branches.mapdiff.attention import cross_attention_layers
from clipfusion.branches.mapdiff.conditioning import (
    KnownInputs,
    batch_one_projections,
    precompute_conditioning,
)
from clipfusion.branches.mapdiff.lean_vae import (
    encode_moments,
    lean_encoder_supported,
    use_inplace_activations,
)
from clipfusion.branches.mapdiff.prompts import PromptTokens, encode_prompt, prompt_tokens
from clipfusion.branches.mapdiff.unet import (
    DroppedModule,
    UNetCapture,
    capture_pass,
    check_reachable,
    drop_after_last_attention,
    drop_unreached_modules,
    top_level_block,
)
from clipfusion.branches.memory import nearest_neighbour_distance
from clipfusion.config import MapDiffConfig, load_preset, with_overrides
from clipfusion.errors import ClipfusionError, ConfigError, InputError
from clipfusion.maps import resize_maps

Images = Sequence[Image.Image] | torch.Tensor
#: one UNet pass of a batch: its state word, its noise draw, and what it captured
Pass = tuple[str, int, UNetCapture]
#: a memory bank: ``bank[(state word, noise draw)][feature block]`` = ``(M, C)`` reference features
MemoryBank = dict[tuple[str, int], dict[str, torch.Tensor]]


class MapDiff:
    """The diffusion branch (a :class:`~clipfusion.branches.Branch`): ``fit(object_name, references)``, then
    ``predict(images)``.

    Takes already-loaded components (any device and dtype; the maps are computed in float32), so that tests
    and benchmarks can inject their own; :meth:`from_preset` and :meth:`from_config` load them.
    :meth:`share` gives another fitted object a branch on the same components (no copy).
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
        self._text = TextSide(text_encoder, tokenizer)  # shared by every view (:meth:`share`)
        self.scheduler = scheduler
        #: whether :meth:`release_text_encoder` may replace the UNet's prompt layers by tables of this
        #: branch's prompts (never where the UNet is shared by several fitted objects)
        self.specialise_unet = True
        #: whether :meth:`release_text_encoder` frees the text side (a view leaves that to its models)
        self.owns_text_encoder = True
        # one UNet pass at a time: the capture hooks and processors live on the (possibly shared) modules
        self._unet_lock = threading.Lock()
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
        #: encode through the lean pass (:mod:`.lean_vae`) where the VAE's structure allows (the same latents
        #: to float32 rounding, fewer 512² activations alive); False runs diffusers' own forward (the
        #: benchmarks' "before")
        self.lean_vae = True
        self.object_name: str | None = None
        self.prompts: dict[str, PromptTokens] = {}
        # memory_bank[(state word, noise draw)][feature block] = (M, C) reference features
        self.memory_bank: MemoryBank | None = None
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
        shared: bool = False,
    ) -> MapDiff:
        """Load the components the configuration names (pretrained or random) and wrap them.

        ``local_files_only`` keeps the hub out of it (default: the hub library's own offline setting).
        ``text_encoder=False`` does not load the text encoder at all: for a branch that gets its prompt
        embeddings from :meth:`load_state`. ``objects`` are the object names the branch will be fitted for:
        the text encoder is loaded alone, encodes their prompts, and is freed before the VAE and the UNet
        load, so that it never shares memory with them (1.4 GB less at the peak for SD-2 in float32); the
        branch is then as after :meth:`prepare` and :meth:`release_text_encoder`.

        ``shared``: the components are for many fitted objects (:class:`clipfusion.shared.SharedModels`),
        which get branches on them through :meth:`share`: the UNet's timestep layers become tables as usual,
        but its prompt projections never become tables of any object's prompts (they compute a batch's one
        prompt once instead, :class:`~.conditioning.BatchOneLinear`: the same numbers).
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
            if shared and config.precompute_conditioning:
                precompute_conditioning(unet, [config.timestep], [])
                batch_one_projections(unet)
            elif embeddings and config.precompute_conditioning:
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
        branch.specialise_unet = not shared
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

    def share(self, config: MapDiffConfig) -> MapDiff:
        """A branch for another fitted object with ``config``, on these very components: its own prompts,
        memory bank and options, no copy of a network and no load. The UNet must be one built for sharing
        (``from_config(shared=True)``, as :class:`clipfusion.shared.SharedModels` builds it): a UNet whose
        prompt layers are tables of this branch's prompts cannot serve another object's, and is refused.

        Prompts already encoded here are handed on when the prompt template is the same; the text encoder
        (while there is one) is the same object, and freeing it is the models' business, not the view's.
        """
        tables = [m for m in self.unet.modules() if isinstance(m, KnownInputs) and not m.timesteps]
        if tables:
            raise ConfigError(
                "this diffusion branch's UNet holds tables of its own prompts (precompute_conditioning), so "
                "it cannot serve another object; load the models with clipfusion.shared.SharedModels"
            )
        view = type(self)(self.vae, self.unet, None, None, self.scheduler, config)
        view._text = self._text
        if self.text_encoder is not None:
            view._check_text_width(int(self.text_encoder.config.hidden_size))
        view._unet_lock = self._unet_lock
        view._unet_records = self._unet_records
        view.lean_vae = self.lean_vae
        view.specialise_unet = False
        view.owns_text_encoder = False
        if view.config.prompt_template == self.config.prompt_template:
            view._embeddings.update(self._embeddings)
            view._tokens.update(self._tokens)
        return view

    def _check_components(self) -> None:
        self.check_config(self.config)

    def check_config(self, cfg: MapDiffConfig) -> None:
        """Refuse options these components cannot run (block names, timestep range, sizes, widths): the
        branch's own at construction, and any other set of options its steps are asked to use (a grid)."""
        modules = dict(self.unet.named_modules())
        blocks = sorted({loc[0] for n in modules if (loc := top_level_block(n)) is not None})
        for name in cfg.feature_blocks:
            if name not in modules or name == "":
                raise ConfigError(
                    f"diffusion.feature_blocks: {name!r} is not a module of the UNet; "
                    f"blocks: {', '.join(blocks)}"
                )
        cross_attention_layers(self.unet, cfg.attention_blocks)  # every attention block holds layers
        if self.dropped_modules:
            layers = cross_attention_layers(self.unet, cfg.attention_blocks)
            check_reachable(
                self.dropped_modules, [*layers, *cfg.feature_blocks], cfg.early_exit, cfg.feature_blocks
            )
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

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> Any:
        return self._text.encoder

    @text_encoder.setter
    def text_encoder(self, value: Any) -> None:
        self._text.encoder = value

    @property
    def tokenizer(self) -> Any:
        return self._text.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._text.tokenizer = value

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
        timestep and the cached prompts (:mod:`.conditioning`: 0.2 GB fewer weights for SD-2 in float32, same
        maps to rounding) — except in a UNet shared by several fitted objects, which is never specialised to
        one of them. A view (:meth:`share`) leaves the text side to its models.
        """
        if not self.owns_text_encoder:
            return  # a view: its models free the text side for every object at once
        self.text_encoder = None
        self.tokenizer = None
        if (
            self.specialise_unet
            and self.config.precompute_conditioning
            and self._embeddings
            and not self.precomputed
        ):
            self._precompute_conditioning()

    def _precompute_conditioning(self) -> None:
        from clipfusion.models.weights import fingerprint_records

        if self._unet_records is None:  # the weights as loaded, before any is freed
            self._unet_records = fingerprint_records("unet", self.unet)
        prompts = list({id(t): t for t in self._embeddings.values()}.values())
        precompute_conditioning(self.unet, [self.config.timestep], prompts)
        self._note_tables()

    def _note_tables(self) -> None:
        """Which UNet layers are tables of their outputs (:mod:`.conditioning`) and for which timesteps, read
        from the UNet itself (it may come precomputed from :meth:`from_config`)."""
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
            bank: MemoryBank | None = None
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
        """One UNet pass at ``timestep`` (default: the configured one), capturing attention and block outputs
        (:func:`~clipfusion.branches.mapdiff.unet.capture_pass`).

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
            check_reachable(self.dropped_modules, layers + blocks, early, blocks)
        states = prompt_embeddings.to(device=sample.device, dtype=self.dtype)
        states = states.expand(sample.shape[0], -1, -1)
        step = self.config.timestep if timestep is None else timestep
        with self._unet_lock:
            return capture_pass(
                self.unet, sample, step, states, layers=layers, blocks=blocks, early_exit=early
            )

    def passes(
        self,
        z0: torch.Tensor,
        *,
        object_name: str | None = None,
        state_words: Sequence[str] | None = None,
        attention_layers: Sequence[str] | None = None,
        feature_blocks: Sequence[str] | None = None,
        timestep: int | None = None,
    ) -> Iterator[Pass]:
        """Every (state word, noise draw) UNet pass over one batch of latents ``z0`` (noise draws outer,
        state words inner), each run when it is asked for: the one loop that :meth:`predict`, :meth:`fit`,
        the speed stages and a grid over diffusion options all run.

        Defaults: the fitted object, the configured state words, layers, blocks and timestep;
        ``attention_layers=[]`` captures no attention (a memory bank's passes).
        """
        name = self.object_name if object_name is None else object_name
        words = self.config.state_words if state_words is None else state_words
        for draw in range(self.config.n_noise):
            sample = self.unet_input(z0, draw, timestep=timestep)
            for state in words:
                embeddings = self.prompt_embeddings(name, state)  # type: ignore[arg-type]
                capture = self.run_unet(
                    sample,
                    embeddings,
                    attention_layers=attention_layers,
                    feature_blocks=feature_blocks,
                    timestep=timestep,
                )
                yield state, draw, capture

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

    def bank_from_passes(self, passes: Iterable[Pass], blocks: Sequence[str] | None = None) -> MemoryBank:
        """The memory bank of the references whose passes are given (batch after batch, in order): every
        pass's block features (``blocks``, default the configured ones) as rows, concatenated per state word,
        noise draw and block. :meth:`fit` and a grid over diffusion options both build banks here."""
        parts: dict[tuple[str, int], dict[str, list[torch.Tensor]]] = {}
        for state, draw, capture in passes:
            slot = parts.setdefault((state, draw), {})
            for name, entries in self.bank_entries(capture, blocks).items():
                slot.setdefault(name, []).append(entries)
        return {
            key: {name: torch.cat(chunks) for name, chunks in slot.items()} for key, slot in parts.items()
        }

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
            pixels = self.preprocess(references)
            step = self.config.batch_size
            self.memory_bank = self.bank_from_passes(
                captured
                for start in range(0, pixels.shape[0], step)
                for captured in self.passes(
                    self.encode_latents(pixels[start : start + step]), attention_layers=[]
                )
            )
            self._n_references = int(pixels.shape[0])
        except BaseException:
            self.object_name, self.memory_bank = None, None
            raise
        return self

    def maps_from_passes(
        self,
        passes: Iterable[Pass],
        prompts: dict[str, PromptTokens] | None,
        memory_bank: MemoryBank | None = None,
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
            passes = self.passes(self.encode_latents(pixels[start : start + batch]))
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


__all__ = ["MapDiff", "MemoryBank", "Pass"]
