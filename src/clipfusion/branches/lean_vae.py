"""The VAE encoder pass with the fewest full-size activations alive at once, same values bit for bit.

At 512 × 512 the SD-2 VAE encoder's first block holds 128 channels per pixel: one activation is 134 MB in
float32, and the whole prediction's memory peak above the loaded models is set there
(``benchmarks/bench_vae_memory.py``). diffusers' forward has five of them alive at once in that block
(measured): the encoder's frame still holds the block's input while the block's second resnet runs, and
each resnet computes ``(input + h) / output_scale_factor`` out of place, a sum and then a quotient. The pass
here walks the same modules in the same order with the same operations, but lets go of every tensor as soon
as it is no longer read and adds the residual in place, so at most three are alive (the resnet's input,
which the residual needs, and a convolution's input and output): 0.40 GB instead of 0.67 at 512².
Addition is commutative in IEEE arithmetic and the division by 1.0 is exact, so the latents are identical
(``tests/branches/test_lean_vae.py``).

:func:`lean_encoder_supported` checks that an encoder has exactly the structure walked here (diffusers'
``Encoder`` of ``AutoencoderKL``: resnets without time embedding, up- or down-sampling inside, attention
only in the middle block); anything else takes diffusers' own forward.
"""

from __future__ import annotations

from typing import Any

import torch


def use_inplace_activations(encoder: torch.nn.Module) -> int:
    """Make the SiLU activations of a VAE encoder work in place; returns how many were switched.

    In the encoder every SiLU follows a GroupNorm whose output nothing else reads (there is no time
    embedding in a VAE), so the values are identical, while each activation at 512 px no longer allocates
    (and page-faults in) a fresh 134 MB tensor. Not for the UNet, whose resnets apply SiLU to the time
    embedding they share.
    """
    switched = 0
    for module in encoder.modules():
        if isinstance(module, torch.nn.SiLU) and not module.inplace:
            module.inplace = True
            switched += 1
    return switched


def _is_plain_resnet(block: Any, resnet_class: type) -> bool:
    """A ``ResnetBlock2D`` as the VAE encoder builds it: no time embedding, no resampling inside."""
    return (
        type(block) is resnet_class
        and block.time_emb_proj is None
        and block.upsample is None
        and block.downsample is None
        and block.time_embedding_norm == "default"
    )


def lean_encoder_supported(vae: Any) -> bool:
    """Whether :func:`encode_moments` walks ``vae``'s encoder exactly as diffusers' forward would (False
    for a diffusers release that moved or renamed these classes: its own forward then runs)."""
    try:
        from diffusers.models.autoencoders.vae import Encoder
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D
        from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D
    except ImportError:
        return False

    encoder = getattr(vae, "encoder", None)
    if type(encoder) is not Encoder:
        return False
    if getattr(vae, "use_tiling", False) or getattr(vae, "use_slicing", False):
        return False
    for block in encoder.down_blocks:
        if type(block) is not DownEncoderBlock2D:
            return False
        if not all(_is_plain_resnet(r, ResnetBlock2D) for r in block.resnets):
            return False
        if block.downsamplers is not None and not all(type(d) is Downsample2D for d in block.downsamplers):
            return False
    mid = encoder.mid_block
    if mid is None:
        return True
    return type(mid) is UNetMidBlock2D and all(_is_plain_resnet(r, ResnetBlock2D) for r in mid.resnets)


def _resnet(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` for a block without time embedding, residual added in place.

    The caller's reference to ``hidden`` is the only other one: it is the residual, so it must stay alive.
    """
    h = block.nonlinearity(block.norm1(hidden))
    h = block.conv1(h)
    h = block.nonlinearity(block.norm2(h))
    h = block.conv2(block.dropout(h))
    shortcut = block.conv_shortcut(hidden) if block.conv_shortcut is not None else hidden
    h.add_(shortcut)  # == shortcut + h: IEEE addition is commutative
    if block.output_scale_factor != 1.0:
        h.div_(block.output_scale_factor)
    return h


def encode_moments(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """``vae``'s encoder and quant conv on ``pixels``: the posterior's moments (mean and log-variance
    stacked on the channels), as ``vae.encode(pixels).latent_dist.parameters`` gives them.

    Only for an encoder :func:`lean_encoder_supported` accepts; run under ``torch.inference_mode``.
    """
    encoder = vae.encoder
    h = encoder.conv_in(pixels)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            h = _resnet(resnet, h)
        for downsampler in block.downsamplers or ():
            h = downsampler(h)
    mid = encoder.mid_block
    if mid is not None:
        h = _resnet(mid.resnets[0], h)
        for attention, resnet in zip(mid.attentions, mid.resnets[1:], strict=True):
            if attention is not None:
                h = attention(h)
            h = _resnet(resnet, h)
    h = encoder.conv_out(encoder.conv_act(encoder.conv_norm_out(h)))
    return vae.quant_conv(h) if vae.quant_conv is not None else h


__all__ = ["encode_moments", "lean_encoder_supported", "use_inplace_activations"]
