from __future__ import annotations

import pytest

from quant.methods.base import registered_methods
from quant.recipes.presets import BIT_SETTINGS, get_preset, list_presets, write_preset_files
from quant.recipes.schema import METHOD_NAMES, Recipe


def test_every_preset_validates() -> None:
    names = list_presets()
    assert len(names) == len(METHOD_NAMES) * len(BIT_SETTINGS) == len(set(names))
    for name in names:
        recipe = get_preset(name)
        assert isinstance(recipe, Recipe) and recipe.name == name
        assert Recipe.model_validate(recipe.to_dict()) == recipe
        assert name.startswith(recipe.method.name + "-")
        if recipe.method.name == "gptq":
            assert recipe.weight.algorithm == "gptq"
    assert get_preset("flatquant-w4a4kv4").kv_cache.bits == 4


def test_smoothquant_presets_search_alpha_per_group() -> None:
    for setting in BIT_SETTINGS:
        method = get_preset(f"smoothquant-{setting}").method
        assert method.name == "smoothquant" and method.alpha == "auto"


def test_unknown_preset() -> None:
    with pytest.raises(KeyError):
        get_preset("rtn-w3a3")


def test_preset_files_round_trip(tmp_path) -> None:
    paths = write_preset_files(tmp_path)
    assert len(paths) == len(list_presets())
    for p in paths:
        assert Recipe.from_file(p) == get_preset(p.stem)


def test_core_methods_registered() -> None:
    assert {"rtn", "gptq"} <= set(registered_methods())
