"""The protocol end to end on synthetic data, with model-free fake branches (fast and exact); the same
protocol with the real tiny branches runs in test_end_to_end.py."""

import csv
import json

import pytest

from clipfusion.config import load_preset
from clipfusion.detector import CLIPFusion
from clipfusion.errors import InputError
from clipfusion.evaluation import CSV_COLUMNS, METRIC_COLUMNS, evaluate
from fakes import FakeBranch


def _factory(calls):
    def build(config):
        calls.append(config)
        return CLIPFusion(config, clip=FakeBranch("clip", 64), diffusion=FakeBranch("diffusion", 64))

    return build


@pytest.fixture()
def config():
    return load_preset("tiny").replace(output_size=64, sigma=1.0)


def test_writes_three_files_with_sane_values(synthetic_root, tmp_path, config):
    calls = []
    runs = evaluate(
        "folder",
        synthetic_root,
        tmp_path,
        config=config,
        categories=["woven_fabric", "bottle_cap"],
        shots=[0, 2],
        seeds=[0, 1],
        progress=False,
        detector_factory=_factory(calls),
        log=lambda _m: None,
    )
    assert len(calls) == 1  # models are built once for the whole evaluation
    assert len(runs) == 2 * (1 + 2)
    with (tmp_path / "results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 6
    for row in rows:
        for column in METRIC_COLUMNS:
            assert 0.0 <= float(row[column]) <= 1.0
        assert row["weights"] in {"pretrained", "random"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["config"] == config.to_dict()
    assert "torch" in data["versions"]
    few = [r for r in data["runs"] if r["shots"] == 2]
    assert all(len(r["references"]) == 2 for r in few)
    assert all(r["references"][0].startswith(r["category"] + "/train/good/") for r in few)
    # the plumbing localises obvious synthetic defects (pixel differences to the references)
    assert min(r["pixel_auroc"] for r in few) >= 0.9
    summary = (tmp_path / "summary.md").read_text()
    assert "## zero-shot" in summary and "## 2-shot (2 seeds: 0, 1)" in summary
    assert "| woven_fabric |" in summary and "| **mean** |" in summary


def test_resume_skips_finished_runs_and_reproduces_the_results(synthetic_root, tmp_path, config):
    kwargs = dict(
        config=config,
        categories=["woven_fabric", "metal_plate"],
        shots=[1],
        seeds=[0],
        progress=False,
        log=lambda _m: None,
    )
    full = tmp_path / "full"
    evaluate("folder", synthetic_root, full, detector_factory=_factory([]), **kwargs)

    partial = tmp_path / "partial"
    evaluate(
        "folder",
        synthetic_root,
        partial,
        detector_factory=_factory([]),
        **{**kwargs, "categories": ["woven_fabric"]},
    )
    calls = []
    messages = []
    evaluate(
        "folder",
        synthetic_root,
        partial,
        resume=True,
        detector_factory=_factory(calls),
        **{**kwargs, "log": messages.append},
    )
    assert any("1 of 2 runs already done" in m for m in messages)
    assert (partial / "results.csv").read_text() == (full / "results.csv").read_text()

    # everything done: no model is even built
    calls.clear()
    evaluate("folder", synthetic_root, partial, resume=True, detector_factory=_factory(calls), **kwargs)
    assert calls == []


def test_bad_root_and_too_many_shots_fail_before_any_model_work(synthetic_root, tmp_path, config):
    calls = []
    with pytest.raises(InputError, match="does not exist"):
        evaluate("folder", tmp_path / "nope", tmp_path / "o", config=config, detector_factory=_factory(calls))
    with pytest.raises(InputError, match="only 8 usable images"):
        evaluate(
            "folder",
            synthetic_root,
            tmp_path / "o",
            config=config,
            categories=["bottle_cap"],
            shots=[9],
            detector_factory=_factory(calls),
        )
    with pytest.raises(InputError, match="no product folder"):
        evaluate("folder", tmp_path, tmp_path / "o", config=config, detector_factory=_factory(calls))
    assert calls == []


def _copy_category(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_every_file_problem_is_reported_at_once_and_skip_bad_leaves_them_out(
    synthetic_root, tmp_path, config
):
    from PIL import Image

    from clipfusion.errors import InputErrors

    product = _copy_category(synthetic_root / "bottle_cap", tmp_path / "data" / "bottle_cap")
    (product / "train" / "good" / "000.png").write_bytes(b"")  # empty
    (product / "test" / "good" / "001.png").write_text("not a png")  # not an image
    masks = sorted((product / "ground_truth").rglob("*_mask.png"))
    Image.new("L", (7, 9)).save(masks[0])  # mask size differs from its image
    calls = []

    def run(**options):
        return evaluate(
            "folder",
            product,
            tmp_path / "o",
            config=config,
            shots=[1],
            progress=False,
            detector_factory=_factory(calls),
            log=lambda _m: None,
            **options,
        )

    with pytest.raises(InputErrors) as info:
        run()
    problems = info.value.problems
    assert any("000.png: empty file" in p for p in problems)
    assert any("001.png" in p for p in problems)
    assert any(masks[0].name in p and "mask is 7×9" in p for p in problems)
    assert "--skip-bad" in problems[-1]
    assert calls == []

    runs = run(skip_bad=True)
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(data["skipped"]) == 3
    assert runs[0]["n_test"] == 12 - 2
