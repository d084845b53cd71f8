import json
import math

import pytest

from clipfusion.errors import ConfigError, InputError
from clipfusion.evaluation import (
    CSV_COLUMNS,
    METRIC_COLUMNS,
    ResultStore,
    RunKey,
    results_csv,
    run_plan,
    summary_markdown,
)


def _run(category, shots, seed, value):
    row = {"category": category, "shots": shots, "seed": seed}
    for column in METRIC_COLUMNS:
        row[column] = value
    return row


def test_zero_shot_runs_once_and_few_shot_once_per_seed():
    plan = run_plan(["a", "b"], [0, 2], [3, 4])
    assert plan == [
        RunKey("a", 0, 3),
        RunKey("a", 2, 3),
        RunKey("a", 2, 4),
        RunKey("b", 0, 3),
        RunKey("b", 2, 3),
        RunKey("b", 2, 4),
    ]
    with pytest.raises(ConfigError):
        run_plan(["a"], [-1], [0])


def test_csv_has_the_documented_columns_and_blank_missing_metrics():
    runs = [_run("a", 1, 0, 0.5)]
    runs[0]["pixel_aupro"] = None
    text = results_csv(runs)
    header, row = text.strip().split("\n")
    assert header.split(",") == list(CSV_COLUMNS)
    fields = dict(zip(CSV_COLUMNS, row.split(","), strict=True))
    assert fields["image_auroc"] == "0.500000" and fields["pixel_aupro"] == ""


def test_summary_is_percent_with_mean_and_std_over_seeds():
    runs = [_run("a", 1, 0, 0.90), _run("a", 1, 1, 0.80), _run("b", 1, 0, 0.70), _run("b", 1, 1, 0.60)]
    text = summary_markdown(runs)
    assert "## 1-shot (2 seeds: 0, 1)" in text
    # per category: mean ± sample std over seeds
    assert "| a | 85.0 ± 7.1 |" in text
    # mean row: mean over categories per seed (80, 70) → 75.0 ± 7.1
    assert "| **mean** | 75.0 ± 7.1 |" in text


def test_summary_of_a_single_run_has_no_std():
    text = summary_markdown([_run("a", 0, 0, 0.5)])
    assert "## zero-shot" in text and "| a | 50.0 |" in text


def test_store_writes_all_files_and_resumes(tmp_path):
    header = {"config": {"x": 1}}
    store = ResultStore(tmp_path, header, resume=False)
    store.add(_run("a", 0, 0, 0.5))
    assert {p.name for p in tmp_path.iterdir()} == {"results.csv", "results.json", "summary.md"}
    again = ResultStore(tmp_path, header, resume=True)
    assert again.done() == {RunKey("a", 0, 0)}
    fresh = ResultStore(tmp_path, header, resume=False)
    assert fresh.done() == set()
    with pytest.raises(InputError, match="different configuration"):
        ResultStore(tmp_path, {"config": {"x": 2}}, resume=True)
    (tmp_path / "results.json").write_text("{truncated")
    with pytest.raises(InputError, match="unreadable"):
        ResultStore(tmp_path, header, resume=True)


def test_json_is_strict_json(tmp_path):
    store = ResultStore(tmp_path, {"config": {}}, resume=False)
    row = _run("a", 0, 0, 0.5)
    row["pixel_auroc"] = None
    store.add(row)
    data = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: math.nan / 0)
    assert data["runs"][0]["pixel_auroc"] is None
