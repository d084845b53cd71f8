"""PatchCLIP against anomalib's WinCLIP, the reference implementation, given the very same open_clip model.

Compared (tiny preset, seed 0; anomalib's constructor would download ViT-B-16-plus-240/laion400m_e31, so
``open_clip.create_model_and_transforms`` is replaced by one that returns our model object):

- the prompt strings: ``clip_prompt_ensemble(name)`` == anomalib's ``create_prompt_ensemble(name)``;
- the text features: ``PatchCLIP.text_features(name)`` == ``WinClipModel._text_embeddings`` after L2
  normalisation (max abs difference <= 1e-5);
- the image score: ``s_clip_L`` == zero-shot ``pred_score`` for the same 240×240 images, anomalib being fed
  the exact normalised tensor our pre-processing produces (<= 1e-5);
- the few-shot memory bank: our bank == anomalib's ``_patch_embeddings`` for the same references, and
  ``clip_V`` on the token grid == 2 × anomalib's patch-level ``visual_association_score`` (which halves
  the cosine distance);
- the window embeddings (``patch_mode = "windows"``) == anomalib's ``_get_window_embeddings`` at scale 2,
  once its transformer receives the sequence-first layout it was written for (see the last test).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipfusion.branches.patchclip import PatchCLIP
from clipfusion.prompts import clip_prompt_ensemble

winclip_module = pytest.importorskip(
    "anomalib.models.image.winclip.torch_model",
    reason="anomalib (the `test` extra) is not installed; the WinCLIP fidelity checks need it",
)

NAMES = ("metal nut", "bottle", "printed circuit board")


def _images(n: int, seed: int) -> list[Image.Image]:
    """240×240 images: smooth colour fields with noise, so that the scores differ between images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:240, 0:240] / 240.0
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(0, 6, 3)
        base = np.stack([np.sin(a * xx + b * yy + c), np.cos(b * xx - a * yy), np.sin(c * xx * yy)], -1)
        pixels = 127.5 * (1 + base) + rng.normal(0, 20, base.shape)
        images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="module")
def clip() -> PatchCLIP:
    # output_size = the token grid, so that maps can be compared before any upsampling
    return PatchCLIP.from_preset("tiny", output_size=15)


@pytest.fixture(scope="module")
def winclip(clip):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**clip.model.visual.preprocess_cfg), is_train=False)
    asked = []

    def same_model(name, pretrained=None, **kwargs):
        asked.append((name, pretrained))
        return clip.model, transform, transform

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(winclip_module.open_clip, "create_model_and_transforms", same_model)
        model = winclip_module.WinClipModel(class_name=NAMES[0]).eval()
    assert asked == [("ViT-B-16-plus-240", "laion400m_e31")]
    assert model.clip is clip.model
    return model


def test_prompts_are_anomalibs():
    from anomalib.models.image.winclip.prompting import create_prompt_ensemble

    for name in NAMES:
        assert clip_prompt_ensemble(name) == create_prompt_ensemble(name)


@pytest.mark.parametrize("name", NAMES)
def test_text_features_equal_winclips(clip, winclip, name):
    winclip.setup(name)
    theirs = F.normalize(winclip._text_embeddings.float(), dim=-1)
    ours = clip.text_features(name)
    assert ours.shape == theirs.shape == (2, 64)
    assert (ours - theirs).abs().max() <= 1e-5


def test_zero_shot_image_score_equals_winclips(clip, winclip):
    images = _images(4, seed=0)
    winclip.setup(NAMES[0])
    assert winclip.k_shot == 0
    with torch.no_grad():
        theirs = winclip(clip.preprocess(images)).pred_score
    ours = clip.fit(NAMES[0]).predict(images)["s_clip_L"]
    assert ours.shape == theirs.shape == (4,)
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours.max() - ours.min() > 1e-4  # the images score differently: the comparison means something


def test_memory_bank_and_clip_v_equal_winclip_plus(clip, winclip):
    references, queries = _images(2, seed=1), _images(3, seed=2)
    reference_pixels = clip.preprocess(references)
    winclip.setup(NAMES[1], reference_pixels)
    clip.fit(NAMES[1], references)
    theirs_bank = winclip._patch_embeddings
    assert theirs_bank.shape == (2, 225, 256)
    assert (clip.memory_bank - theirs_bank.reshape(-1, 256)).abs().max() <= 1e-5

    from anomalib.models.image.winclip.utils import visual_association_score

    with torch.no_grad():
        _, query_tokens = winclip.clip.encode_image(clip.preprocess(queries))
        theirs = 2 * visual_association_score(query_tokens, theirs_bank).reshape(-1, 15, 15)
    ours = clip.predict(queries)["clip_V"]
    assert (ours - theirs).abs().max() <= 1e-5
    assert ours.max() > 0.01  # distinct images: the distances are not all zero


def test_window_embeddings_equal_winclips_once_its_layout_slip_is_undone(clip, winclip):
    """anomalib 2.x hands the transformer (L, N, D) tensors, but open_clip >= 2.26 runs it batch-first, so
    its windows attend across windows. Given the layout it meant, its windows must equal ours."""
    transformer = clip.model.visual.transformer
    batch_first_forward = transformer.forward

    def sequence_first_forward(x, attn_mask=None):
        return batch_first_forward(x.transpose(0, 1), attn_mask=attn_mask).transpose(0, 1)

    assert clip.config.window_size == 2 and winclip.scales[0] == 2
    with torch.no_grad():
        encoded = clip.encode(clip.preprocess(_images(2, seed=3)), keep_embedded=True)
        ours = clip.window_embeddings(encoded.embedded)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(transformer, "forward", sequence_first_forward)
            theirs = winclip._get_window_embeddings(encoded.embedded, winclip.masks[0])
    assert ours.shape == theirs.shape == (2, 14 * 14, 64)
    assert (ours - theirs).abs().max() <= 1e-5
