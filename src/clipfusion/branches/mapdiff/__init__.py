"""MapDiff, the diffusion branch, and the rooms only it uses (its wing).

``branch.py`` is the branch (:class:`MapDiff`); ``unet.py`` the UNet pass that captures what the maps read
and the surgery that removes what that pass never reaches; ``attention.py`` the cross-attention capture;
``prompts.py`` the prompt and its state word's positions; ``lean_vae.py`` the VAE encoder pass with the
fewest large activations alive; ``conditioning.py`` the UNet's conditioning layers replaced by their outputs.
"""

from clipfusion.branches.mapdiff.branch import MapDiff, MemoryBank, Pass
from clipfusion.branches.mapdiff.lean_vae import use_inplace_activations
from clipfusion.branches.mapdiff.prompts import PromptTokens, encode_prompt, prompt_tokens
from clipfusion.branches.mapdiff.unet import (
    DroppedModule,
    UNetCapture,
    drop_after_last_attention,
    drop_unreached_modules,
    stop_block,
)

__all__ = [
    "DroppedModule",
    "MapDiff",
    "MemoryBank",
    "Pass",
    "PromptTokens",
    "UNetCapture",
    "drop_after_last_attention",
    "drop_unreached_modules",
    "encode_prompt",
    "prompt_tokens",
    "stop_block",
    "use_inplace_activations",
]
