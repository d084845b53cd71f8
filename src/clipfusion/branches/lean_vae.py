"""The VAE encoder pass with the fewest full-size activations alive at once, same values.

At 512 × 512 the SD-2 VAE encoder's first block holds 128 channels per pixel: one activation is 134 MB in
float32, and the whole prediction's memory peak above the loaded models is set there
(``benchmarks/bench_vae_memory.py``). diffusers' forward has five of them alive at once in that block
(measured): the encoder's frame still holds the block's input while the block's second resnet runs, and
each resnet computes ``(input + h) / output_scale_factor`` out of place, a sum and then a quotient. The pass
here walks the same modules in the same order with the same operations, but lets go of every tensor as soon
as it is no longer read and adds the residual in place, so at most three are alive (the resnet's input,
which the residual needs, and a convolution's input and output). Addition is commutative in IEEE arithmetic
and the division by 1.0 is exact, so the latents are identical bit for bit
(``tests/branches/test_lean_vae.py``).

Where one activation is large (at least :data:`BAND_MIN_BYTES`: the first block at 512²), it goes further:
a resnet whose input and output widths agree runs *banded*, with two full-size activations instead of
three: the residual, and one buffer that holds the first normalisation's output, then the first
convolution's (computed :data:`BAND_ROWS` rows at a time from the rows around them, each band written back
once the next band has read the row they share), then the second normalisation's (a sixteenth of the
channel groups at a time, in place); the second convolution is added to the residual band by band. The
downsampler that follows convolves band by band too, without the padded copy of its input diffusers makes.
A convolution's output row reads only the rows beside it and a group's normalisation only its own
channels, so every value comes from the same kernels and the same inputs: on this project's AVX2 CPU the
latents are bit for bit diffusers' (512², SD-2 configuration), and the tests check them to rounding, as
another CPU may pick other kernels for a band than for the whole. Measured at 512² in float32: 0.29 GB above
the loaded encoder against 0.40 unbanded and 0.67 for diffusers' pass, at the same speed (6.96 against 7.48 s
unbanded, interleaved medians of 4 in one process; 7.57 against 7.38 s in single calls).

:func:`lean_encoder_supported` checks that an encoder has exactly the structure walked here (diffusers'
``Encoder`` of ``AutoencoderKL``: resnets without time embedding, up- or down-sampling inside, attention
only in the middle block); anything else takes diffusers' own forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

#: an activation at least this large (bytes) is worth banding its resnet for: the SD-2 encoder's first block
#: at 512² (134 MB in float32; 67 MB in bfloat16), not the later ones, whose three activations stay below
#: the first block's two
BAND_MIN_BYTES = 64 * 10**6
#: rows per band: the band's temporaries stay a small fraction of one activation, each convolution call
#: still works on tens of thousands of pixels
BAND_ROWS = 32
#: the second normalisation works in place on this share of the groups at a time (at least one group)
GROUP_SHARE = 1 / 16


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


def _is_same_padded_3x3(conv: Any) -> bool:
    return (
        type(conv) is torch.nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.in_channels == conv.out_channels
    )


def _bandable(block: Any) -> bool:
    """A resnet :func:`_banded_resnet` computes as diffusers does: same width in and out (no shortcut
    convolution), unscaled residual, GroupNorm and SiLU, 3×3 same-padded convolutions, no dropout."""
    return (
        block.conv_shortcut is None
        and block.output_scale_factor == 1.0
        and type(block.norm1) is torch.nn.GroupNorm
        and type(block.norm2) is torch.nn.GroupNorm
        and type(block.nonlinearity) is torch.nn.SiLU
        and not (block.dropout.training and block.dropout.p > 0)
        and _is_same_padded_3x3(block.conv1)
        and _is_same_padded_3x3(block.conv2)
    )


def _conv_rows(conv: torch.nn.Conv2d, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``conv(x)``, from the rows of ``x`` they read (zeros beyond its edges)."""
    height = x.shape[-2]
    rows = x[:, :, max(0, start - 1) : min(height, stop + 1)]
    edges = (0, 0, int(start == 0), int(stop == height))
    if any(edges):
        rows = F.pad(rows, edges)
    return F.conv2d(rows, conv.weight, conv.bias, padding=(0, 1))


def _conv_in_place(conv: torch.nn.Conv2d, x: torch.Tensor, band: int) -> None:
    """``x`` becomes ``conv(x)``: each band's output is held until the next band has read the row they
    share, then written back."""
    height = x.shape[-2]
    held: torch.Tensor | None = None
    for start in range(0, height, band):
        out = _conv_rows(conv, x, start, min(height, start + band))
        if held is not None:
            x[:, :, start - band : start].copy_(held)
        held = out
    assert held is not None
    x[:, :, height - held.shape[-2] :].copy_(held)


def _group_norm_in_place(norm: torch.nn.GroupNorm, x: torch.Tensor) -> None:
    """``x`` becomes ``norm(x)``, a few whole groups at a time (a group's statistics are its own)."""
    width = x.shape[1] // norm.num_groups
    step = width * max(1, int(norm.num_groups * GROUP_SHARE))
    for first in range(0, x.shape[1], step):
        part = x[:, first : first + step]
        weight = norm.weight[first : first + step] if norm.weight is not None else None
        bias = norm.bias[first : first + step] if norm.bias is not None else None
        part.copy_(F.group_norm(part, part.shape[1] // width, weight, bias, norm.eps))


def _banded_resnet(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    """A :func:`_bandable` resnet with two full-size activations alive (the module docstring says how);
    ``hidden`` is the residual and receives the output."""
    h = F.silu(block.norm1(hidden), inplace=True)
    _conv_in_place(block.conv1, h, BAND_ROWS)
    _group_norm_in_place(block.norm2, h)
    h = block.dropout(F.silu(h, inplace=True))
    height = h.shape[-2]
    for start in range(0, height, BAND_ROWS):
        stop = min(height, start + BAND_ROWS)
        hidden[:, :, start:stop].add_(_conv_rows(block.conv2, h, start, stop))  # == input + h
    return hidden


def _bandable_downsampler(down: Any) -> bool:
    """diffusers' ``Downsample2D`` as the VAE encoder builds it: no norm, a 3×3 stride-2 convolution after
    one zero row and column are padded at the bottom and the right."""
    conv = getattr(down, "conv", None)
    return (
        getattr(down, "norm", None) is None
        and getattr(down, "use_conv", False)
        and getattr(down, "padding", None) == 0
        and type(conv) is torch.nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (2, 2)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def _banded_downsample(down: Any, x: torch.Tensor) -> torch.Tensor:
    """``down(x)`` band by band, without the padded copy of ``x`` diffusers makes first: each band of
    output rows reads input rows ``2r .. 2r + 2``, padded with the zero column (and, at the bottom, the zero
    row) the whole would have had."""
    height, width = x.shape[-2:]
    out_height, out_width = (height - 2) // 2 + 1, (width - 2) // 2 + 1  # of the padded input
    layout = (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )
    out = torch.empty(
        (x.shape[0], down.conv.out_channels, out_height, out_width),
        dtype=x.dtype,
        device=x.device,
        memory_format=layout,
    )
    for start in range(0, out_height, BAND_ROWS):
        stop = min(out_height, start + BAND_ROWS)
        rows = x[:, :, 2 * start : min(height, 2 * stop + 1)]
        rows = F.pad(rows, (0, 1, 0, 2 * stop + 1 - 2 * start - rows.shape[-2]))
        out[:, :, start:stop] = F.conv2d(rows, down.conv.weight, down.conv.bias, stride=2)
    return out


def encode_moments(vae: Any, pixels: torch.Tensor, *, band_min_bytes: int = BAND_MIN_BYTES) -> torch.Tensor:
    """``vae``'s encoder and quant conv on ``pixels``: the posterior's moments (mean and log-variance
    stacked on the channels), as ``vae.encode(pixels).latent_dist.parameters`` gives them.

    Only for an encoder :func:`lean_encoder_supported` accepts; run under ``torch.inference_mode``. A resnet
    whose activation holds at least ``band_min_bytes`` runs banded.
    """

    def big(h: torch.Tensor) -> bool:
        return h.numel() * h.element_size() >= band_min_bytes

    encoder = vae.encoder
    h = encoder.conv_in(pixels)
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            h = _banded_resnet(resnet, h) if big(h) and _bandable(resnet) else _resnet(resnet, h)
        for down in block.downsamplers or ():
            h = _banded_downsample(down, h) if big(h) and _bandable_downsampler(down) else down(h)
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
