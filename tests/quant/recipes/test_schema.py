from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from quant.recipes.schema import Recipe


def _error_locs(body: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as err:
        Recipe.model_validate(body)
    return [tuple(e["loc"]) for e in err.value.errors()]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"method": {"name": "rtn"}, "weight": {"bits": 5}}, "weight"),
        ({"method": {"name": "rtn"}, "activation": {"bits": 3}}, "activation"),
        ({"method": {"name": "rtn"}, "activation": {"clip_ratio": 1.5}}, "clip_ratio"),
        ({"method": {"name": "rtn"}, "kv_cache": {"bits": 6}}, "kv_cache"),
        ({"method": {"name": "rtn"}, "weight": {"granularity": "per_group"}}, "weight"),
        ({"method": {"name": "rtn"}, "weight": {"granularity": "per_group", "group_size": 12}}, "weight"),
        ({"method": {"name": "rtn"}, "weight": {"group_size": 64}}, "weight"),
        ({"method": {"name": "rtn"}, "calibration": {"num_samples": 0}}, "num_samples"),
        ({"method": {"name": "rtn"}, "calibration": {"seq_len": 8}}, "seq_len"),
        ({"method": {"name": "smoothquant", "alpha": 1.5}}, "alpha"),
        ({"method": {"name": "flatquant", "lr": 0}}, "lr"),
        ({"method": {"name": "gptq"}, "weight": {"gptq": {"damp_percent": 0}}}, "damp_percent"),
        ({"method": {"name": "nope"}}, "method"),
        ({"method": {"name": "rtn"}, "unknown_field": 1}, "unknown_field"),
        ({"method": {"name": "rtn", "alpha": 0.5}}, "alpha"),
    ],
)
def test_invalid_values_name_the_field(body: dict, field: str) -> None:
    locs = _error_locs(body)
    assert any(field in loc for loc in locs), locs


def test_defaults_and_round_trips() -> None:
    r = Recipe.model_validate({"method": {"name": "osplus"}, "weight": {"bits": 4, "granularity": "per_group",
                                                                       "group_size": 128}})
    assert r.method.name == "osplus" and r.method.search_grid == 20
    assert r.bits_label == "W4A8-g128"
    assert Recipe.from_json(json.dumps(r.to_dict())) == r
    assert Recipe.from_yaml(r.to_yaml()) == r
    assert json.loads(r.canonical_json()) == r.to_dict()
    with pytest.raises(ValidationError):
        r.weight.bits = 8  # type: ignore[misc]  # frozen
    with pytest.raises(ValueError, match="mapping"):
        Recipe.from_yaml("- a list\n")


@pytest.mark.parametrize(
    "params, field",
    [
        ({"alpha": "AUTO"}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": "auto", "alpha_grid": []}, "alpha_grid"),
        ({"alpha": "auto", "alpha_grid": [0.5, 1.2]}, "alpha_grid"),
        ({"alpha": "auto", "search_tokens": 8}, "search_tokens"),
    ],
)
def test_smoothquant_alpha_search_fields_are_validated(params: dict, field: str) -> None:
    locs = _error_locs({"method": {"name": "smoothquant", **params}})
    assert any(field in loc for loc in locs), locs


def test_smoothquant_alpha_auto_round_trips() -> None:
    r = Recipe.model_validate({"method": {"name": "smoothquant", "alpha": "auto", "alpha_grid": [0.8, 0.2, 0.8]}})
    assert r.method.alpha == "auto" and r.method.auto
    assert r.method.alpha_grid == (0.2, 0.8)  # sorted, deduplicated
    assert Recipe.from_json(json.dumps(r.to_dict())) == r and Recipe.from_yaml(r.to_yaml()) == r
    fixed = Recipe.model_validate({"method": {"name": "smoothquant", "alpha": 1}})
    assert fixed.method.alpha == 1.0 and not fixed.method.auto
    assert len(fixed.method.alpha_grid) == 21
