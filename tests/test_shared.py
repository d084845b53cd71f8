"""One copy of the models for many fitted objects (``clipfusion.shared``, ``clipfusion.detector_set``).

With the tiny random-weight preset (plumbing, never detection quality): objects loaded onto shared models
share every network tensor, and each predicts bit for bit what the same fitted folder loaded alone does, in
whatever order objects are interleaved, in any batch, and from several threads at once.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from clipfusion.config import load_preset
from clipfusion.detector import CLIPFusion
from clipfusion.detector_set import DetectorSet
from clipfusion.errors import ConfigError, InputError
from clipfusion.shared import SharedModels, models_difference, plan_models, shared_config
from fabricate import random_rgb, save_image

OBJECTS = {"bottle": "bottle", "cable": "cable", "screw": "screw"}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-images")
    return [save_image(root / f"{i}.png", random_rgb(40 + i, (72, 64))) for i in range(8)]


@pytest.fixture(scope="module")
def folders(images, tmp_path_factory):
    """Three objects fitted alone (each with its own models), saved: the reference every shared load must
    reproduce."""
    root = tmp_path_factory.mktemp("shared-fits")
    refs = {"bottle": images[:1], "cable": images[1:3], "screw": []}
    out = {}
    for name, obj in OBJECTS.items():
        CLIPFusion(load_preset("tiny"), objects=[obj]).fit(obj, refs[name]).save(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def alone(folders):
    return {name: CLIPFusion.load(path) for name, path in folders.items()}


@pytest.fixture(scope="module")
def line(folders):
    return DetectorSet.load(folders)


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.score == y.score
        np.testing.assert_array_equal(x.anomaly_map, y.anomaly_map)
        for name in x.maps:
            np.testing.assert_array_equal(x.maps[name], y.maps[name])


def _parameters(detector):
    modules = [detector.clip.model, detector.diffusion.vae, detector.diffusion.unet]
    return {id(p) for module in modules for p in module.parameters()}


def test_objects_on_shared_models_share_every_network_tensor(line, alone):
    assert len(line.models) == 1
    shared = [_parameters(d) for d in line.values()]
    assert shared[0] == shared[1] == shared[2]
    # alone, each fit holds its own copy: three times the tensors
    separate = set().union(*(_parameters(d) for d in alone.values()))
    assert len(separate) == 3 * len(shared[0])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_each_object_predicts_bit_for_bit_what_it_does_alone(line, alone, images, batch_size):
    queries = images[3:6]
    for name in OBJECTS:
        _same(
            line.predict(name, queries, batch_size=batch_size),
            alone[name].predict(queries, batch_size=batch_size),
        )


def test_interleaving_objects_changes_nothing(line, alone, images):
    queries = images[6:8]
    expected = {name: alone[name].predict(queries) for name in OBJECTS}
    for name in ["screw", "bottle", "screw", "cable"]:
        _same(line.predict(name, queries), expected[name])


def test_concurrent_predictions_on_different_objects_are_those_of_each_alone(line, alone, images):
    queries = images[6:8]
    expected = {name: alone[name].predict(queries, batch_size=2) for name in OBJECTS}
    jobs = [name for _ in range(2) for name in OBJECTS]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda n: (n, line.predict(n, queries, batch_size=2)), jobs))
    for name, got in results:
        _same(got, expected[name])


def test_a_shared_unet_is_never_specialised_to_one_object(line, monkeypatch):
    from clipfusion.branches.mapdiff import conditioning
    from clipfusion.branches.mapdiff.conditioning import BatchOneLinear, KnownInputs

    unet = line["bottle"].diffusion.unet
    tables = [m for m in unet.modules() if isinstance(m, KnownInputs)]
    assert tables and all(m.timesteps for m in tables)  # timestep tables only, no prompt table
    projections = [m for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    assert projections and all(isinstance(m, BatchOneLinear) for m in projections)
    # a fit alone is specialised (its prompts' tables; the tiny text width is below a prompt's 77 tokens,
    # where tables would outweigh the weights they free, so they are allowed here), and cannot hand its UNet
    # to another object
    monkeypatch.setattr(conditioning, "KEY_VALUE_TABLE_SHARE", 100.0)
    alone = CLIPFusion(load_preset("tiny"), objects=["bolt"])
    assert any(isinstance(m, KnownInputs) and not m.timesteps for m in alone.diffusion.unet.modules())
    with pytest.raises(ConfigError, match="holds tables of its own prompts"):
        alone.diffusion.share(alone.diffusion.config)


def test_batch_one_projection_computes_one_row_and_expands_it():
    from clipfusion.branches.mapdiff.conditioning import BatchOneLinear

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    layer.__class__ = BatchOneLinear
    prompt = torch.randn(1, 5, 16)
    batch = prompt.expand(4, -1, -1)
    out = layer(batch)
    assert out.shape == (4, 5, 8) and out.stride(0) == 0  # one row, expanded: the table's numbers
    torch.testing.assert_close(
        out[3], torch.nn.functional.linear(prompt, layer.weight, layer.bias)[0], rtol=0, atol=0
    )
    rows = torch.randn(3, 5, 16)  # different rows: computed as a plain linear layer
    torch.testing.assert_close(layer(rows), torch.nn.functional.linear(rows, layer.weight, layer.bias))


def test_fitting_several_objects_on_one_load_saves_what_each_fit_alone_saves(folders, images, tmp_path):
    refs = {"bottle": images[:1], "cable": images[1:3], "screw": []}
    fitted = DetectorSet.fit(refs, load_preset("tiny"))
    assert len(fitted.models) == 1
    saved = fitted.save(tmp_path)
    for name, folder in saved.items():
        for file in ("clip.safetensors", "diffusion.safetensors", "config.json"):
            assert (folder / file).read_bytes() == (folders[name] / file).read_bytes(), (name, file)


def test_text_encoders_belong_to_the_models_not_to_a_view(images):
    models = SharedModels(load_preset("tiny"))
    first = CLIPFusion(load_preset("tiny"), models=models).fit("bottle", images[:1])
    first.release_text_encoders()  # a view: the models keep their text encoders for the next object
    second = CLIPFusion(load_preset("tiny"), models=models).fit("cable")
    assert second.diffusion.text_encoder is not None
    models.release_text_encoders()
    assert first.diffusion.text_encoder is None and second.clip.text_encoder_released
    with pytest.raises(Exception, match="released"):
        CLIPFusion(load_preset("tiny"), models=models).fit("gear")
    first.predict(images[3:4])  # what was fitted keeps its prompts


def test_a_folder_needing_other_models_is_refused_in_one_line(folders):
    models = SharedModels(load_preset("tiny").replace(dtype="bfloat16"), text_encoders=False)
    with pytest.raises(ConfigError, match=r"needs other models than the shared ones \(.*float32") as caught:
        CLIPFusion.load(folders["bottle"], models=models)
    assert "\n" not in str(caught.value)


def test_a_folder_fitted_with_other_weights_is_refused_in_one_line(folders, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(folders["bottle"], other)
    record = json.loads((other / "detector.json").read_text())
    record["branches"]["diffusion"]["weights"]["fingerprint"] = "0" * 32  # as if fitted with other weights
    (other / "detector.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="the diffusion weights found .* are not the ones") as caught:
        DetectorSet.load({"bottle": folders["bottle"], "other": other})
    assert "\n" not in str(caught.value)


def test_plans_group_what_can_share_and_separate_what_cannot():
    tiny = load_preset("tiny")
    configs = {
        "a": tiny,
        "b": tiny.replace(alpha_map=0.5, **{"diffusion.feature_blocks": ["up_blocks.0"]}),
        "c": tiny.replace(dtype="bfloat16"),
        "d": tiny.replace(**{"diffusion.timestep": 200}),
    }
    plans = plan_models(configs)
    assert [names for _, names in plans] == [["a", "b"], ["c"], ["d"]]
    built = plans[0][0]
    assert built.diffusion.feature_blocks == ("up_blocks.1", "up_blocks.0")  # the union: both stay reachable
    assert models_difference(tiny, configs["b"]) is None
    assert "dtype" in models_difference(tiny, configs["c"]) or "bfloat16" in models_difference(
        tiny, configs["c"]
    )
    assert "timestep" in models_difference(tiny, configs["d"])
    assert shared_config([tiny, configs["d"]]).diffusion.precompute_conditioning is False


def test_an_unknown_name_is_one_line_listing_the_known_ones(line):
    with pytest.raises(InputError, match=r"no fitted object named 'gear' \(known: bottle, cable, screw\)"):
        line.predict("gear", [])
