"""The two branches of CLIPFusion and the one interface the detector knows them by.

:class:`PatchCLIP` (``patchclip.py``) and :class:`MapDiff` (the ``mapdiff/`` wing: the branch and the UNet
surgery, capture, prompts, lean VAE and conditioning tables that only it uses) each turn images into
component maps; ``memory.py`` holds the nearest-neighbour distance both memory-bank maps use. Branches take
images and return tensors; loading lives in :mod:`clipfusion.models`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from PIL import Image

    Images = Sequence[Image.Image] | torch.Tensor


@dataclass
class BranchState:
    """What a fitted branch learnt, apart from its model weights: what ``CLIPFusion.save`` writes.

    ``tensors`` go to a safetensors file (CPU tensors, in the dtype they were computed in, so a reloaded
    branch predicts bit for bit what the saved one did); ``meta`` is plain JSON (object name, shots, how
    tensor names map to prompts and blocks).
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TextSide:
    """A branch's text encoder and tokenizer, held once for the branch and every view of it that another
    fitted object uses (``share``), so that freeing them frees them for all. (PatchCLIP's text tower lives
    inside its CLIP model, which its views share anyway; only its tokenizer is held here.)"""

    encoder: Any = None
    tokenizer: Any = None


@runtime_checkable
class Branch(Protocol):
    """What the detector asks of a branch, and all it asks (an injected or fake branch implements this).

    ``predict`` returns float32 CPU tensors keyed by name: some of :attr:`map_names` (``(N, S, S)``; the
    memory-bank map only after a few-shot ``fit``) and possibly image-level scores such as ``s_clip_L``
    (``(N,)``). ``batch_size`` is how many images go through the models at once (``None``: the branch's
    :attr:`default_batch_size`); it changes time and memory, never the result.

    ``native=True`` returns each map at the grid the branch computes it on (``(N, h, w)``: the CLIP token,
    window or crop grid, the diffusion attention or feature grid) instead of the output size. The detector
    asks for these and does the one bilinear resize itself (:func:`clipfusion.maps.resize_maps`, the same
    function a branch uses for ``native=False``), so that the maps it can store are the ones it fused and an
    ablation recomputed from them equals a run.
    """

    #: ``"clip"`` or ``"diffusion"``: the name timings and options use
    name: str
    #: the component maps this branch can produce (e.g. ``("clip_L", "clip_V")``)
    map_names: tuple[str, ...]
    #: images per forward pass when the caller does not say
    default_batch_size: int

    @property
    def shots(self) -> int:
        """Reference images in the memory bank of the last ``fit`` (0: zero-shot)."""
        ...

    def fit(self, object_name: str, images: Images | None = None) -> Branch:
        """Prompts for ``object_name`` and, given normal reference images, the memory bank."""
        ...

    def prepare(self, object_names: Iterable[str]) -> None:
        """Compute and cache the text side for every object name (before :meth:`release_text_encoder`)."""
        ...

    def predict(
        self, images: Images, *, batch_size: int | None = None, native: bool = False
    ) -> dict[str, torch.Tensor]:
        """Component maps (and scores) of ``images``, ``batch_size`` images per forward pass; at the output
        size, or with ``native`` at the branch's own grid."""
        ...

    def release_text_encoder(self) -> None:
        """Free the text encoder once every object name that will be used is prepared or fitted."""
        ...

    def state(self) -> BranchState:
        """The fitted state (text side of the fitted object, memory bank), without model weights."""
        ...

    def load_state(self, state: BranchState) -> None:
        """Become fitted from a :meth:`state` of a branch with the same weights; no text encoder needed."""
        ...

    def weights_fingerprint(self) -> str:
        """A short hash of the weights that :meth:`predict` uses (not the text encoder), so a saved state is
        only ever loaded into the model it was computed with."""
        ...


def resolve_batch_size(batch_size: int | None, default: int) -> int:
    """A ``predict`` call's batch size: the one asked for, else the branch's default; refuses nonsense."""
    from clipfusion.config import check_batch_size

    return check_batch_size(batch_size) or default


__all__ = ["Branch", "BranchState", "TextSide", "resolve_batch_size"]
