from __future__ import annotations

import json
from pathlib import Path

import pytest

from quant.cli import main, resolve_recipe
from quant.recipes.presets import get_preset, list_presets
from tests.quant.test_pipeline import _recipe, store  # noqa: F401  (fixture: temp model store + corpus)


def test_recipes_lists_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    assert capsys.readouterr().out.split() == list_presets()
    assert main(["recipes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gptq-w4a8"]["weight"]["algorithm"] == "gptq"


def test_resolve_recipe_name_and_file(tmp_path: Path) -> None:
    assert resolve_recipe("rtn-w8a8") == get_preset("rtn-w8a8")
    f = tmp_path / "r.yaml"
    f.write_text(get_preset("smoothquant-w8a8").to_yaml())
    assert resolve_recipe(str(f)) == get_preset("smoothquant-w8a8")
    with pytest.raises(KeyError, match="neither"):
        resolve_recipe("no-such-recipe")


def test_quantize_prints_metrics(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    recipe_file = tmp_path / "recipe.json"
    recipe_file.write_text(_recipe("rtn-w8a8").model_dump_json())
    out = tmp_path / "artifact"
    assert main(["quantize", "--model", "tiny/llama", "--recipe", str(recipe_file), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["artifact"] == str(out) and (out / "manifest.json").is_file()
    assert {"fp_ppl", "quant_ppl", "kl_mean", "top1_agreement"} <= set(result["metrics"])
    assert "[100.0%] done" in captured.err


def test_quantize_errors(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: {name: rtn}\nweight: {bits: 5}\n")
    assert main(["quantize", "--model", "tiny/llama", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bits" in capsys.readouterr().err
    assert main(["quantize", "--model", "tiny/none", "--recipe", "rtn-w8a8", "--out", str(tmp_path / "o")]) == 3
    assert "tiny/none" in capsys.readouterr().err
