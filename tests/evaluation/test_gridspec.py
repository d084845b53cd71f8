"""The --grid syntax: commas separate values, plus signs join the items of a list value."""

import pytest

from clipfusion.config import FUSION_TERMS, load_preset
from clipfusion.errors import ConfigError
from clipfusion.evaluation.gridspec import (
    FUSION_OPTIONS,
    MAP_OPTIONS,
    apply_point,
    grid_points,
    parse_grid,
    point_dirname,
    point_label,
)


def test_values_lists_and_all():
    grid = parse_grid(
        ["alpha_map=0,0.25,1", "terms=clip_L+diff_L,all", "score_mode=terms,max"], FUSION_OPTIONS
    )
    assert grid["alpha_map"] == [0, 0.25, 1]
    assert grid["terms"] == [("clip_L", "diff_L"), FUSION_TERMS]
    assert grid["score_mode"] == ["terms", "max"]
    blocks = parse_grid(["diffusion.feature_blocks=up_blocks.0,up_blocks.1+up_blocks.2"], MAP_OPTIONS)
    assert blocks["diffusion.feature_blocks"] == [("up_blocks.0",), ("up_blocks.1", "up_blocks.2")]
    assert parse_grid(["diffusion.timestep=50,100"], MAP_OPTIONS)["diffusion.timestep"] == [50, 100]


def test_product_order_labels_and_folders():
    points = grid_points({"diffusion.timestep": [50, 100], "diffusion.feature_blocks": [("a",), ("b", "c")]})
    assert [p["diffusion.timestep"] for p in points] == [50, 50, 100, 100]  # the first option varies slowest
    assert point_label(points[1]) == "timestep=50 feature_blocks=b+c"
    assert point_dirname(points[1]) == "timestep-50_feature_blocks-b+c"
    assert grid_points({}) == [{}]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["alpha_map"], "expected KEY=VALUE"),
        (["alpha_map=0", "alpha_map=1"], "given twice"),
        (["alpha_map=0,,1"], "empty value"),
        (["alpha_map=0,0"], "repeated"),
        (["diffusion.timestep=50"], "clipfusion evaluate --grid"),
        (["terms=clip_L+"], "empty item"),
    ],
)
def test_bad_grids_are_one_line_errors(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid(items, FUSION_OPTIONS, other="options that change the maps: `clipfusion evaluate --grid`")


def test_a_bad_value_names_its_grid_point():
    config = load_preset("tiny")
    assert apply_point(config, {"terms": ("clip_L",)}).terms == ("clip_L",)
    with pytest.raises(ConfigError, match=r"grid point alpha_map=2: alpha_map must lie in \[0, 1\]"):
        apply_point(config, {"alpha_map": 2})
    with pytest.raises(ConfigError, match="terms must be distinct names"):
        apply_point(config, {"terms": ("clip_X",)})
