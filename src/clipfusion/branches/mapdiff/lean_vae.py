"""The VAE encoder pass with the fewest full-size activations alive at once.

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

Where one activation is large (at least :data:`BAND_MIN_BYTES`: the first block at 512²), the block holds
*one* full-size activation at a time, in bands of :data:`BAND_ROWS` rows. The first resnet never keeps its
input (``conv_in``'s output: three channels in, so cheap to recompute band by band wherever it is read);
its one buffer takes the first convolution, is normalised in place, and receives the output. Every later
resnet of the block works in its input's buffer: the second normalisation needs the statistics of the
whole first convolution's output, so that output is computed band by band twice, once for its statistics
and once more (with a row of halo) for the second convolution, whose result is added to the input band by
band one band behind. The downsampler convolves band by band without diffusers' padded copy. The
normalisations use statistics gathered band by band in float64, so the latents differ from diffusers' in
the last bits only, and are as close to a float64 pass as diffusers' own float32 pass is (the tests check
this). Measured at 512² in float32 on SD-2's VAE (``benchmarks/bench_vae_memory.py``): 0.19 GB above the
loaded encoder against 0.40 unbanded and 0.67 for diffusers' pass, for about 0.6 s more per image (the
first block's one extra convolution and the statistics passes).

:func:`lean_encoder_supported` checks that an encoder has exactly the structure walked here (diffusers'
``Encoder`` of ``AutoencoderKL``: resnets without time embedding, up- or down-sampling inside, attention
only in the middle block); anything else takes diffusers' own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

#: an activation at least this large (bytes) is worth banding its resnet for: the SD-2 encoder's first block
#: at 512² (134 MB in float32; 67 MB in bfloat16), not the later ones, whose three activations stay below
#: the first block's two
BAND_MIN_BYTES = 64 * 10**6
#: rows per band: a band's temporaries (2.6 MB with their halo at 512² × 128 channels in float32) stay below
#: the size glibc maps on its own (``runtime.map_large_blocks``), so the heap reuses them band after band
#: instead of faulting in fresh pages each time (32 rows, 8 MB bands: 2.7 s more per image on the VAE, 8
#: rows: 0.6 s), and each convolution call still works on thousands of pixels
BAND_ROWS = 8
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


def _is_same_padded_3x3(conv: Any, *, same_width: bool = True) -> bool:
    return (
        type(conv) is torch.nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and (conv.in_channels == conv.out_channels or not same_width)
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


def _group_affine(
    norm: torch.nn.GroupNorm, bands: Iterable[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)``, ``(N, C, 1, 1)`` in float64, with which ``x * scale + shift`` is
    ``norm(x)``, from the statistics of the whole of ``x`` read band by band: each channel's sum and sum of
    squares accumulated in float64 (a pass over a 512² activation takes 0.06 s, a third of a grouped
    ``var_mean``), then pooled over each group's channels."""
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    pixels = 0
    for band in bands:
        band_total = band.sum(dim=(2, 3), dtype=torch.float64)
        band_squares = band.square().sum(dim=(2, 3), dtype=torch.float64)
        total = band_total if total is None else total + band_total
        squares = band_squares if squares is None else squares + band_squares
        pixels += band.shape[2] * band.shape[3]
    assert total is not None and squares is not None
    groups, width = norm.num_groups, norm.num_channels // norm.num_groups
    count = pixels * width
    mean = total.unflatten(1, (groups, width)).sum(dim=2) / count  # (N, G)
    variance = (squares.unflatten(1, (groups, width)).sum(dim=2) / count - mean.square()).clamp_min(0)
    scale = (variance + norm.eps).rsqrt().repeat_interleave(width, dim=1)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    shift = -mean.repeat_interleave(width, dim=1) * scale
    if norm.bias is not None:
        shift = shift + norm.bias.double()
    return scale[..., None, None], shift[..., None, None]


def _norm_silu(affine: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    scale, shift = affine
    return F.silu(torch.addcmul(shift.to(rows.dtype), rows, scale.to(rows.dtype)), inplace=True)


def _conv_band(
    conv: torch.nn.Conv2d, rows: Callable[[int, int], torch.Tensor], start: int, stop: int, height: int
) -> torch.Tensor:
    """Rows ``start:stop`` of a same-padded 3×3 ``conv`` of an input ``height`` rows high, whose rows
    ``lo:hi`` ``rows(lo, hi)`` gives (a slice, or rows computed on the spot): it is asked for the rows the
    band reads, and the zero rows beyond the edges are padded here."""
    lo, hi = max(0, start - 1), min(height, stop + 1)
    top, bottom = lo - (start - 1), (stop + 1) - hi
    band = rows(lo, hi)
    if top or bottom:
        band = F.pad(band, (0, 0, top, bottom))
    return F.conv2d(band, conv.weight, conv.bias, padding=(0, 1))


def _conv_rows(conv: torch.nn.Conv2d, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``conv(x)``, from the rows of ``x`` they read (zeros beyond its edges)."""
    return _conv_band(conv, lambda lo, hi: x[:, :, lo:hi], start, stop, x.shape[-2])


def _bands(height: int) -> list[tuple[int, int]]:
    return [(start, min(height, start + BAND_ROWS)) for start in range(0, height, BAND_ROWS)]


def _write_lagging(
    out: torch.Tensor, bands: Iterable[tuple[int, int]], compute: Callable[[int, int], torch.Tensor]
) -> None:
    """``out[rows] = compute(start, stop)`` band by band, each band written once the next one is computed:
    ``compute`` may read ``out``'s rows up to two beyond its band while they still hold the input."""
    held: tuple[int, int, torch.Tensor] | None = None
    for start, stop in bands:
        result = compute(start, stop)
        if held is not None:
            out[:, :, held[0] : held[1]].copy_(held[2])
        held = (start, stop, result)
    if held is not None:
        out[:, :, held[0] : held[1]].copy_(held[2])


def _first_resnet(block: Any, conv_in: torch.nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    """``block(conv_in(pixels))`` for a :func:`_bandable` resnet with one full-size activation alive.

    ``conv_in`` (3 channels in) is cheap, so its output is never kept: it is recomputed band by band
    wherever it is read (three times: the first normalisation's statistics, the first convolution, the
    residual). The one buffer takes the first convolution's output, is normalised in place a few groups at a
    time, and receives the block's output band by band.
    """
    height = pixels.shape[-2]

    def source(start: int, stop: int) -> torch.Tensor:  # rows start:stop of conv_in(pixels)
        return _conv_rows(conv_in, pixels, start, stop)

    affine1 = _group_affine(block.norm1, (source(a, b) for a, b in _bands(height)))
    first = source(0, 1)
    h = torch.empty(
        (first.shape[0], block.conv1.out_channels, height, first.shape[-1]),
        dtype=first.dtype,
        device=first.device,
        memory_format=_layout(first),
    )
    del first
    for start, stop in _bands(height):
        h[:, :, start:stop] = _conv_band(
            block.conv1, lambda lo, hi: _norm_silu(affine1, source(lo, hi)), start, stop, height
        )
    _group_norm_in_place(block.norm2, h)
    F.silu(h, inplace=True)
    _write_lagging(
        h, _bands(height), lambda a, b: _conv_rows(block.conv2, h, a, b).add_(source(a, b))
    )  # == input + h: IEEE addition is commutative
    return h


def _recomputing_resnet(block: Any, hidden: torch.Tensor) -> torch.Tensor:
    """A :func:`_bandable` resnet with one full-size activation alive: ``hidden``, which receives the output.

    The second normalisation needs the statistics of the whole first convolution's output; rather than keep
    that output (a second full-size activation), its bands are computed once for the statistics and again
    (with a row of halo each side) for the second convolution: the first convolution runs about twice.
    """
    height = hidden.shape[-2]
    affine1 = _group_affine(block.norm1, (hidden[:, :, a:b] for a, b in _bands(height)))

    def h_rows(start: int, stop: int) -> torch.Tensor:  # rows start:stop of conv1(silu(norm1(hidden)))
        return _conv_band(
            block.conv1, lambda lo, hi: _norm_silu(affine1, hidden[:, :, lo:hi]), start, stop, height
        )

    affine2 = _group_affine(block.norm2, (h_rows(a, b) for a, b in _bands(height)))

    def output(start: int, stop: int) -> torch.Tensor:
        out = _conv_band(block.conv2, lambda lo, hi: _norm_silu(affine2, h_rows(lo, hi)), start, stop, height)
        return out.add_(hidden[:, :, start:stop])

    _write_lagging(hidden, _bands(height), output)
    return hidden


def _layout(x: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        else torch.contiguous_format
    )


def _group_norm_in_place(norm: torch.nn.GroupNorm, x: torch.Tensor) -> None:
    """``x`` becomes ``norm(x)``, a few whole groups at a time (a group's statistics are its own)."""
    width = x.shape[1] // norm.num_groups
    step = width * max(1, int(norm.num_groups * GROUP_SHARE))
    for first in range(0, x.shape[1], step):
        part = x[:, first : first + step]
        weight = norm.weight[first : first + step] if norm.weight is not None else None
        bias = norm.bias[first : first + step] if norm.bias is not None else None
        part.copy_(F.group_norm(part, part.shape[1] // width, weight, bias, norm.eps))


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
    out = torch.empty(
        (x.shape[0], down.conv.out_channels, out_height, out_width),
        dtype=x.dtype,
        device=x.device,
        memory_format=_layout(x),
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
    first = encoder.down_blocks[0].resnets[0] if encoder.down_blocks[0].resnets else None
    first_bytes = pixels[:, :1].numel() * encoder.conv_in.out_channels * pixels.element_size()
    if (
        first is not None
        and first_bytes >= band_min_bytes
        and _bandable(first)
        and _is_same_padded_3x3(encoder.conv_in, same_width=False)
    ):
        h, done = _first_resnet(first, encoder.conv_in, pixels), first
    else:
        h, done = encoder.conv_in(pixels), None
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            if resnet is not done:
                h = _recomputing_resnet(resnet, h) if big(h) and _bandable(resnet) else _resnet(resnet, h)
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
