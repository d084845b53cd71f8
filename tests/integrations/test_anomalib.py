"""clipfusion inside anomalib: the AnomalibModule run by anomalib's Engine, data modules, metrics and
visualiser, cross-checked against ``clipfusion evaluate`` and ``clipfusion predict``.

Fast tests use a model-free detector (``fakes.fake_detector``); the ``slow`` ones run anomalib's Engine on
the tiny preset and synthetic data, one Engine run per module fixture shared by several assertions.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("anomalib")

from anomalib import LearningType
from anomalib.data import ImageBatch, MVTecAD
from anomalib.engine import Engine
from anomalib.post_processing import PostProcessor

from clipfusion.detector import CLIPFusion
from clipfusion.errors import ConfigError, InputError
from clipfusion.integrations.anomalib import (
    ClipFusion,
    ClipFusionModel,
    ClipFusionPostProcessor,
    working_size_pre_processor,
)
from clipfusion.metrics import image_metrics
from fabricate import random_rgb, save_image
from fakes import fake_detector

SRC = Path(__file__).resolve().parents[2] / "src"
CATEGORY = "metal_plate"
N_TEST = 6


# -- without anomalib --------------------------------------------------------------------------------------


def test_clipfusion_imports_without_anomalib_and_the_integration_says_what_to_install():
    # anomalib made unimportable in a fresh interpreter: the library works, the adapter names the extra
    script = textwrap.dedent(
        """
        import sys
        sys.modules["anomalib"] = None
        import clipfusion, clipfusion.data, clipfusion.integrations
        from clipfusion.config import load_preset
        load_preset("tiny")
        try:
            import clipfusion.integrations.anomalib
        except ImportError as exc:
            print("ImportError:", exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert "ImportError:" in done.stdout and "pip install 'clipfusion[anomalib]'" in done.stdout


# -- pre- and post-processing ------------------------------------------------------------------------------


def test_the_pre_processor_only_resizes_images_and_masks_to_the_working_size():
    from torchvision.tv_tensors import Mask

    image = torch.rand(2, 3, 100, 80)
    mask = Mask((torch.rand(2, 100, 80) > 0.7).to(torch.uint8))
    resized, resized_mask = working_size_pre_processor(64).transform(image, mask)
    assert resized.shape == (2, 3, 64, 64) and resized_mask.shape == (2, 64, 64)
    assert resized.min() >= 0 and resized.max() <= 1  # no normalisation: still pixels in [0, 1]
    assert set(resized_mask.unique().tolist()) <= {0, 1}  # masks resized nearest
    assert working_size_pre_processor((48, 96)).transform(image).shape == (2, 3, 48, 96)
    assert working_size_pre_processor(None).transform is None
    for bad in (0, 8, "512", (64,), True):
        with pytest.raises(ConfigError, match="working_size"):
            working_size_pre_processor(bad)


def _validation_and_test(post: PostProcessor, scores, labels, maps, masks) -> ImageBatch:
    """The post-processor's own callbacks, as the Engine calls them: statistics from a validation pass,
    then the test batch post-processed."""
    batch = lambda: ImageBatch(  # noqa: E731
        image=torch.zeros(len(scores), 3, 8, 8),
        gt_label=torch.tensor(labels),
        gt_mask=torch.tensor(masks),
        pred_score=torch.tensor(scores, dtype=torch.float32),
        anomaly_map=torch.tensor(maps, dtype=torch.float32),
    )
    post.on_validation_batch_end(None, None, batch())
    post.on_validation_epoch_end(None, None)
    test = batch()
    post.on_test_batch_end(None, None, test)
    return test


def test_the_post_processor_keeps_the_order_of_the_scores_that_anomalibs_default_ties():
    rng = np.random.default_rng(0)
    labels = [0] * 30 + [1] * 10
    # anomalous scores spread far above the normal ones, so the F1 threshold (0.5) sits low in the range and
    # anomalib's default clips everything above 0.5 + range / 2 to 1, tying the normal outlier at 1.2 with
    # the anomalous scores above it (raw: 3 of 4 higher; tied: 4 halves)
    scores = np.concatenate([rng.normal(0.3, 0.02, 29), [1.2], np.linspace(0.5, 1.5, 10)])
    maps = rng.random((40, 8, 8)) * scores[:, None, None]
    masks = (rng.random((40, 8, 8)) > 0.9) & (np.array(labels)[:, None, None] == 1)
    ours = _validation_and_test(ClipFusionPostProcessor(), scores, labels, maps, masks)
    default = _validation_and_test(PostProcessor(), scores, labels, maps, masks)
    raw = image_metrics(np.array(labels), scores)["auroc"]
    assert image_metrics(np.array(labels), ours.pred_score.numpy())["auroc"] == pytest.approx(raw, abs=1e-12)
    assert image_metrics(np.array(labels), default.pred_score.numpy())["auroc"] != pytest.approx(
        raw, abs=1e-3
    )
    # the same order, no new ties; minimum → 0, maximum → 1, decisions at 0.5 as anomalib's
    order = np.argsort(scores, kind="stable")
    normalized = ours.pred_score.numpy()
    assert np.all(np.diff(normalized[order]) > 0)
    assert normalized.min() == 0 and normalized.max() == 1
    assert torch.equal(ours.pred_label, ours.pred_score > 0.5)
    flat, raw_maps = ours.anomaly_map.numpy().ravel(), maps.ravel()
    assert np.all(np.diff(flat[np.argsort(raw_maps, kind="stable")]) >= 0)  # maps: order kept too


def test_the_post_processor_without_statistics_passes_raw_scores_and_decides_nothing():
    post = ClipFusionPostProcessor()
    batch = ImageBatch(
        image=torch.zeros(2, 3, 8, 8), pred_score=torch.tensor([0.2, 1.7]), anomaly_map=torch.rand(2, 8, 8)
    )
    scores, maps = batch.pred_score.clone(), batch.anomaly_map.clone()
    post.post_process_batch(batch)
    assert torch.equal(batch.pred_score, scores) and torch.equal(batch.anomaly_map, maps)
    assert batch.pred_label is None and batch.pred_mask is None  # anomalib's default: score > 0.5
    out = post(ClipFusionModel.inference_batch(scores, maps[:, :4, :4], torch.zeros(2, 3, 8, 8)))
    assert out.pred_label is None and torch.equal(out.pred_score, scores)


# -- the module with a model-free detector -----------------------------------------------------------------


@pytest.fixture
def fake_built(monkeypatch):
    """ClipFusion(...) builds a fake detector instead of loading models; records its fits."""
    fits = []

    def from_preset(cls, name="paper", *, weights_dir=None, **overrides):
        detector = fake_detector()
        original = detector.fit

        def fit(object_name, references=None):
            fits.append((object_name, references))
            return original(object_name, references)

        detector.fit = fit
        return detector

    monkeypatch.setattr(CLIPFusion, "from_preset", classmethod(from_preset))
    return fits


def _product(root: Path, n_train: int = 6) -> Path:
    for i in range(n_train):
        save_image(root / CATEGORY / "train" / "good" / f"{i:03d}.png", random_rgb(i, (40, 40)))
    return root / CATEGORY


def _attach(model: ClipFusion, category: str, train_files: list[Path]) -> None:
    """What the Engine gives the module in setup: a trainer whose data module has a category and a train
    split (here in a shuffled order, as a loader may list it)."""
    import pandas as pd

    order = np.random.default_rng(1).permutation(len(train_files))
    samples = pd.DataFrame(
        {"image_path": [str(train_files[i]) for i in order], "label_index": [0] * len(train_files)}
    )
    datamodule = SimpleNamespace(category=category, train_data=SimpleNamespace(samples=samples))
    model._trainer = SimpleNamespace(datamodule=datamodule)


def test_contract_of_a_training_free_model(fake_built):
    zero, few = ClipFusion(preset="tiny"), ClipFusion(preset="tiny", shots=2)
    assert zero.learning_type == LearningType.ZERO_SHOT and few.learning_type == LearningType.FEW_SHOT
    assert ClipFusion(preset="tiny", references=["a.png"]).learning_type == LearningType.FEW_SHOT
    assert zero.trainer_arguments == {} and zero.configure_optimizers() is None
    assert isinstance(zero.post_processor, ClipFusionPostProcessor)
    assert isinstance(zero.model, ClipFusionModel) and isinstance(zero.model, torch.nn.Module)
    assert ClipFusion(preset="tiny", working_size=96).input_size == (96, 96)
    for bad in ({"shots": -1}, {"shots": 1.5}, {"seed": "0"}, {"batch_size": 0}):
        with pytest.raises(ConfigError):
            ClipFusion(preset="tiny", **bad)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_references_are_drawn_from_the_train_split_as_clipfusion_evaluate_draws_them(
    fake_built, tmp_path, seed
):
    from clipfusion.data import FolderDataset, sample_references

    product = _product(tmp_path)
    model = ClipFusion(preset="tiny", shots=2, seed=seed)
    _attach(model, CATEGORY, sorted((product / "train" / "good").glob("*.png")))
    model.setup("test")
    expected = sample_references(FolderDataset(product, "train"), 2, seed)
    assert model.reference_files == [str(s.image_path) for s in expected]
    assert model.hparams["reference_files"] == model.reference_files
    assert model.object_name == "metal plate"  # clipfusion's object-name mapping of the category
    [(name, references)] = fake_built
    assert name == CATEGORY and references.shape == (2, 3, 512, 512)  # through the pre-processor
    model.setup("test")  # the same category and references: not fitted again
    assert len(fake_built) == 1


def test_the_object_name_comes_from_class_name_else_from_the_category(fake_built, tmp_path):
    model = ClipFusion(preset="tiny")
    with pytest.raises(ConfigError, match="class_name"):
        model.setup("predict")  # no data module, no class name
    _attach(model, "pcb1", [])
    model.setup("test")
    assert model.object_name == "printed circuit board" and model.reference_files == []
    named = ClipFusion(preset="tiny", class_name="transistor")
    _attach(named, "pcb1", [])
    named.setup("test")
    assert named.object_name == "transistor"


def test_references_given_as_files_or_folders(fake_built, tmp_path, caplog):
    from clipfusion.data import Sample, sample_references

    product = _product(tmp_path)
    files = sorted((product / "train" / "good").glob("*.png"))
    every = ClipFusion(preset="tiny", references=[str(files[3]), str(files[1])], class_name="plate")
    with caplog.at_level(logging.INFO, logger="clipfusion.integrations.anomalib"):
        every.setup("predict")
    assert every.reference_files == [str(files[1]), str(files[3])]
    assert str(files[1]) in caplog.text and "2-shot" in caplog.text  # the chosen files are logged
    drawn = ClipFusion(preset="tiny", references=str(product / "train"), shots=3, seed=5, class_name="plate")
    drawn.setup("predict")
    pool = [Sample(f, 0, None, "good", "plate") for f in files]
    assert drawn.reference_files == [str(s.image_path) for s in sample_references(pool, 3, 5)]


def test_missing_or_too_few_references_are_clear_errors(fake_built, tmp_path):
    product = _product(tmp_path, n_train=2)
    no_split = ClipFusion(preset="tiny", shots=2, class_name="plate")
    with pytest.raises(ConfigError, match="references=.*train split"):
        no_split.setup("test")
    too_many = ClipFusion(preset="tiny", shots=3)
    _attach(too_many, CATEGORY, sorted((product / "train" / "good").glob("*.png")))
    with pytest.raises(InputError, match="train split.*3 reference images but only 2"):
        too_many.setup("test")
    with pytest.raises(InputError, match="no such file"):
        ClipFusion(preset="tiny", references=[tmp_path / "missing.png"], class_name="x").setup("test")


# -- anomalib's Engine on the tiny preset ------------------------------------------------------------------

# Every resize is the identity in the comparisons below: 240 px images (CLIP's input size), the working
# size, the output size and the diffusion branch's input all 240 px. Both sides then see the same pixels
# and compare maps and masks at the same resolution, so the only differences left are anomalib's metrics
# against ours (and float32 rounding): the comparison checks the references, the object name, the fusion
# and the metrics, not resampling filters (their agreement is tested in tests/branches/test_patchclip.py).
ALIGNED = {"working_size": 240, "output_size": 240, "diffusion__image_size": 240}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from clipfusion.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("mvtec_layout")
    return make_synthetic_dataset(root, [CATEGORY], n_train=3, n_test=N_TEST, image_size=240, seed=0)


def _engine(root_dir: Path) -> Engine:
    return Engine(
        accelerator="cpu", devices=1, default_root_dir=root_dir, logger=False, enable_progress_bar=False
    )


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def few_shot_run(data_root, tmp_path_factory):
    """One ``Engine.test`` of a 2-shot model on the MVTecAD data module, shared by the tests below."""
    root_dir = tmp_path_factory.mktemp("engine")
    records = _Records()
    logger = logging.getLogger("clipfusion.integrations.anomalib")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)
    try:
        model = ClipFusion(preset="tiny", shots=2, seed=0, **ALIGNED)
        datamodule = MVTecAD(root=data_root, category=CATEGORY, num_workers=0, eval_batch_size=4)
        [metrics] = _engine(root_dir).test(model, datamodule=datamodule, verbose=False)
    finally:
        logger.removeHandler(records)
    return SimpleNamespace(model=model, metrics=metrics, root_dir=root_dir, logs=records.messages)


@pytest.fixture(scope="module")
def evaluate_run(data_root, few_shot_run, tmp_path_factory):
    """``clipfusion evaluate`` on the same data, configuration, shots and seed."""
    from clipfusion.evaluation.protocol import evaluate

    [row] = evaluate(
        "folder",
        data_root,
        tmp_path_factory.mktemp("evaluate"),
        config=few_shot_run.model.detector.config,
        categories=[CATEGORY],
        shots=[2],
        seeds=[0],
        progress=False,
        log=lambda _line: None,
    )
    return row


@pytest.mark.slow
def test_engine_test_returns_image_and_pixel_metrics(few_shot_run):
    metrics = few_shot_run.metrics
    assert {"image_AUROC", "image_F1Score", "pixel_AUROC", "pixel_F1Score"} <= set(metrics)
    assert all(0 <= value <= 1 for value in metrics.values())
    assert few_shot_run.model.learning_type == LearningType.FEW_SHOT
    # anomalib validates on the test images before testing; the test pass took those answers
    assert few_shot_run.model.computed_images == N_TEST and few_shot_run.model.reused_images == N_TEST


@pytest.mark.slow
def test_the_references_are_those_of_clipfusion_evaluate_and_are_logged(
    few_shot_run, evaluate_run, data_root
):
    files = few_shot_run.model.reference_files
    assert [str(Path(f).relative_to(data_root)) for f in files] == evaluate_run["references"]
    assert any("2-shot for 'metal plate'" in m and all(f in m for f in files) for m in few_shot_run.logs)
    # the metrics anomalib prints come from random weights: said before the run and before the metrics
    said = [m for m in few_shot_run.logs if "PIPELINE DEMONSTRATION: random-weight models (tiny preset)" in m]
    assert len(said) == 2


@pytest.mark.slow
def test_anomalib_metrics_equal_clipfusion_evaluate(few_shot_run, evaluate_run):
    # same ranking of the same scores: anomalib's image AUROC (float32) equals ours to 1e-6. The pixel
    # AUROCs see the same maps and masks at the same 240 px; anomalib's comes from order-preserving
    # normalised maps in float32, which can merge values one rounding step apart (measured: 1e-6 or less)
    assert few_shot_run.metrics["image_AUROC"] == pytest.approx(evaluate_run["image_auroc"], abs=1e-6)
    assert few_shot_run.metrics["pixel_AUROC"] == pytest.approx(evaluate_run["pixel_auroc"], abs=5e-3)
    assert few_shot_run.metrics["pixel_AUROC"] == pytest.approx(evaluate_run["pixel_auroc"], abs=1e-4)


@pytest.mark.slow
def test_anomalibs_visualiser_writes_an_image_per_test_image(few_shot_run):
    from PIL import Image

    written = sorted(few_shot_run.root_dir.rglob("images/**/*.png"))
    assert len(written) == N_TEST
    for path in written:
        with Image.open(path) as image:
            # image, mask, map overlay and predicted-mask overlay side by side, at least two fields
            assert image.width >= 2 * image.height > 0
    pixels = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in written]
    assert np.abs(pixels[0] - pixels[-1]).mean() > 1  # different images, different pictures


@pytest.mark.slow
def test_the_fitted_state_lives_in_registered_buffers(few_shot_run):
    model, detector = few_shot_run.model.model, few_shot_run.model.detector
    state = model.state_dict()
    name = detector.object_name
    torch.testing.assert_close(state["clip_text_features"], detector.clip.text_features(name))
    assert state["clip_memory_bank"].shape == detector.clip.memory_bank.shape  # 2 images × 225 tokens
    torch.testing.assert_close(state["clip_memory_bank"], detector.clip.memory_bank)
    block = detector.config.diffusion.feature_blocks[0]
    bank = detector.diffusion.memory_bank[(detector.config.diffusion.state_words[0], 0)][block]
    torch.testing.assert_close(state["diffusion_memory_bank_0_0_0"], bank)
    assert state["diffusion_prompt_embeddings"].shape[0] == len(detector.config.diffusion.state_words)
    fresh = ClipFusionModel(detector)  # empty buffers: a checkpoint loads into them (resized)
    assert fresh.clip_memory_bank.numel() == 0
    fresh.load_state_dict(state, strict=True)
    for key, value in state.items():
        torch.testing.assert_close(getattr(fresh, key), value)


@pytest.fixture(scope="module")
def predict_comparison(data_root, tmp_path_factory):
    """``Engine.predict`` on a folder (no data module) and ``clipfusion predict`` on the same folder."""
    from clipfusion.cli import main

    folder = data_root / CATEGORY / "test" / "good"
    references = [str(p) for p in sorted((data_root / CATEGORY / "train" / "good").glob("*.png"))[:2]]
    out = tmp_path_factory.mktemp("cli_predict")
    settings = ["--set", "output_size=240", "--set", "diffusion.image_size=240"]
    argv = ["predict", str(folder), "--object", CATEGORY, "--refs", *references, "--out", str(out)]
    assert main([*argv, "--preset", "tiny", *settings, "--no-progress"]) == 0
    with open(out / "scores.csv", newline="") as handle:
        cli = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    # working_size None: the images reach the branches at their own size, as they do in clipfusion predict
    model = ClipFusion(
        preset="tiny", references=references, class_name=CATEGORY, **{**ALIGNED, "working_size": None}
    )
    batches = _engine(tmp_path_factory.mktemp("engine_predict")).predict(model, data_path=folder)
    return SimpleNamespace(cli=cli, cli_dir=out, batches=batches, model=model)


@pytest.mark.slow
def test_engine_predict_on_a_folder_gives_the_scores_of_clipfusion_predict(predict_comparison):
    # same files, same references, same object name, no resize on either side: the same computation, so
    # the scores and maps agree to float32 rounding (k/255 computed in two ways)
    batches, cli = predict_comparison.batches, predict_comparison.cli
    items = [
        (path, batch.pred_score[i], batch.anomaly_map[i])
        for batch in batches
        for i, path in enumerate(batch.image_path)
    ]
    assert sorted(path for path, _, _ in items) == sorted(cli) and len(items) == 3
    for path, score, anomaly_map in items:
        assert float(score) == pytest.approx(cli[path], abs=1e-5)
        ours = np.load(predict_comparison.cli_dir / "maps" / f"{Path(path).stem}.npy")
        np.testing.assert_allclose(anomaly_map.numpy(), ours, atol=1e-5)
    # nothing to validate on: no statistics, so raw scores and no decisions (not "score > 0.5")
    assert all(batch.pred_label is None for batch in batches)
    assert predict_comparison.model.reference_files == sorted(predict_comparison.model.reference_files)


@pytest.fixture(scope="module")
def zero_shot_run(data_root, tmp_path_factory):
    """Zero-shot on a copy of the category without a train split, with the default working size (512)."""
    root = tmp_path_factory.mktemp("no_train")
    for part in ("test", "ground_truth"):
        shutil.copytree(data_root / CATEGORY / part, root / CATEGORY / part)
    model = ClipFusion(preset="tiny", shots=0)
    datamodule = MVTecAD(root=root, category=CATEGORY, num_workers=0, eval_batch_size=N_TEST)
    [metrics] = _engine(tmp_path_factory.mktemp("engine_zero")).test(
        model, datamodule=datamodule, verbose=False
    )
    return SimpleNamespace(model=model, metrics=metrics, root=root)


@pytest.mark.slow
def test_zero_shot_needs_no_train_split(zero_shot_run):
    assert not (zero_shot_run.root / CATEGORY / "train").exists()
    assert zero_shot_run.model.learning_type == LearningType.ZERO_SHOT
    assert zero_shot_run.model.reference_files == [] and zero_shot_run.model.detector.clip.shots == 0
    assert {"image_AUROC", "pixel_AUROC"} <= set(zero_shot_run.metrics)
    assert all(np.isfinite(v) for v in zero_shot_run.metrics.values())


@pytest.mark.slow
def test_anomalibs_command_line_runs_the_model(zero_shot_run, tmp_path):
    # the command of the README: anomalib's CLI builds the model from its signature (jsonargparse); on the
    # zero-shot run's data and settings it must report the zero-shot run's metrics
    command = Path(sys.executable).parent / "anomalib"
    if not command.exists():
        pytest.skip("anomalib's command is not installed next to this Python")
    argv = [str(command), "test", "--model", "clipfusion.integrations.anomalib.ClipFusion"]
    argv += ["--model.preset", "tiny", "--data", "MVTecAD", "--data.root", str(zero_shot_run.root)]
    argv += ["--data.category", CATEGORY, "--data.num_workers", "0", "--data.eval_batch_size", str(N_TEST)]
    argv += ["--default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(SRC)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "zero-shot for 'metal plate'" in output
    assert "PIPELINE DEMONSTRATION: random-weight models (tiny preset)" in output
    for name in ("image_AUROC", "pixel_AUROC"):
        [value] = re.findall(rf"{name}\s*│\s*([0-9.]+)", output)
        assert float(value) == pytest.approx(zero_shot_run.metrics[name], abs=1e-6)
