import glob

import pytest
import yaml

from gaq_backend.algorithms import MinMaxConfig, UnknownAlgorithmError
from gaq_backend.config import ConfigError, preset
from gaq_backend.recipe import load_recipe, recipe_from_dict, set_override


def _base():
    return dict(model="embedded", algorithm="minmax", quantization=dict(w_bits=4, a_bits=8))


@pytest.mark.parametrize("path", sorted(glob.glob("recipes/*.yaml")))
def test_shipped_recipes_load(path):
    r = load_recipe(path)
    assert r.algorithm and r.quantization.w_bits in (4, 8)


def test_shipped_presets_have_the_right_bits():
    for name, (w, a) in {"w4a8": (4, 8), "w8a8": (8, 8), "w4a32": (4, 32)}.items():
        q = load_recipe(f"recipes/ddpm-mnist-{name}.yaml").quantization
        assert (q.w_bits, q.a_bits) == (w, a)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(algorithm="nope"), r"unknown algorithm 'nope' \(available: .*minmax"),
    (lambda d: d.pop("algorithm"), r"missing required key 'algorithm' \(available: .*minmax"),
    (lambda d: d.pop("model"), r"missing required key 'model'"),
    (lambda d: d["quantization"].update(w_bits=3.5), r"quantization.w_bits must be an integer from 2 to 8; got 3.5"),
    (lambda d: d["quantization"].update(a_bits=16), r"quantization.a_bits must be an integer from 2 to 8 or 32"),
    (lambda d: d["quantization"].update(wbits=4), r"unknown key 'quantization.wbits' \(allowed: w_bits, a_bits"),
    (lambda d: d.update(sampler=dict(num_inference_steps="fifty")), r"sampler.num_inference_steps must be an integer"),
    (lambda d: d.update(settings=dict(weight_range="l1")), r"settings.weight_range must be one of max, mse"),
    (lambda d: d.update(calibration=dict(val_fraction=1.5)), r"calibration.val_fraction must be a number in \(0, 1\)"),
    (lambda d: d.update(extra=1), r"unknown key 'extra'"),
    (lambda d: d["quantization"].update(keep_fp="conv_in"), r"quantization.keep_fp must be a list"),
])
def test_bad_recipes_name_the_key(mutate, message):
    d = _base()
    mutate(d)
    with pytest.raises(ConfigError, match=message):
        recipe_from_dict(d)


def test_unknown_algorithm_error_type():
    with pytest.raises(UnknownAlgorithmError):
        recipe_from_dict({**_base(), "algorithm": "gradient_aligned_typo"})


def test_set_overrides_by_dotted_path(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_base()))
    r = load_recipe(str(p), ["quantization.w_bits=8", "settings.act_range=percentile", "calibration.seed=7", "quantization.keep_fp=[conv_in]"])
    assert r.quantization.w_bits == 8 and r.settings.act_range == "percentile" and r.calibration.seed == 7
    assert r.quantization.keep_fp == ["conv_in"] and isinstance(r.settings, MinMaxConfig)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        set_override({}, "quantization.w_bits")
    with pytest.raises(ConfigError, match="w_bits must be an integer"):
        load_recipe(str(p), ["quantization.w_bits=3.5"])


def test_recipe_round_trips_through_yaml(tmp_path):
    from gaq_backend.recipe import dump_recipe

    r = load_recipe("recipes/ddpm-mnist-w4a8.yaml", ["settings.weight_range=mse"])
    dump_recipe(r, str(tmp_path / "out.yaml"))
    assert load_recipe(str(tmp_path / "out.yaml")).to_dict() == r.to_dict()


def test_presets():
    assert (preset("W4A8").w_bits, preset("W4A8").a_bits) == (4, 8)
    assert preset("w4a32").a_bits == 32
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("W3A3")


def test_relative_prompts_file_is_found_beside_the_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "prompts.txt").write_text("a red cat\n")
    (folder / "r.yaml").write_text("model: embedded\nalgorithm: minmax\ncalibration: {prompts: prompts.txt}\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert load_recipe("recipes/r.yaml").calibration.prompts == str(folder / "prompts.txt")
    (tmp_path / "here.txt").write_text("the blue sea\n")  # only in the working directory: used as given
    (folder / "r2.yaml").write_text("model: embedded\nalgorithm: minmax\ncalibration: {prompts: here.txt}\n")
    assert load_recipe("recipes/r2.yaml").calibration.prompts == "here.txt"
