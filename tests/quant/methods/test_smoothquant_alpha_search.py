"""SmoothQuant ``alpha="auto"``: the per-group search over alpha (plus no smoothing) on the quantized
output error, its choices on synthetic layers, FP-exact folding of the chosen scales, and the report."""

from __future__ import annotations

import copy

import pytest
import torch

from quant.methods.base import MethodReport, get_method
from quant.methods.scaling import quantized_output_error
from quant.methods.smoothquant import alpha_candidates, search_alpha, smooth_groups, smoothing_scales
from quant.recipes.schema import DEFAULT_ALPHA_GRID, Recipe
from tests.conftest import make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

FACTORIES = {
    "llama-gqa": lambda: make_tiny_llama(kv_heads=2),
    "llama-mha": lambda: make_tiny_llama(kv_heads=4),
    "opt": make_tiny_opt,
    "bert": make_tiny_bert,
}


def _recipe(w_bits: int, a_bits: int, **params: object) -> Recipe:
    return Recipe.model_validate({
        "method": {"name": "smoothquant", "alpha": "auto", **params},
        "weight": {"bits": w_bits}, "activation": {"bits": a_bits},
    })


def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _outlier_layer(n: int = 512, c: int = 64, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Tokens with three channels 50x larger than the rest (as in LLM activations) and two linears."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, :3] *= 50.0
    weights = [torch.randn(96, c, generator=g) / c**0.5, torch.randn(32, c, generator=g) / c**0.5]
    return x, weights


def _balanced_layer(n: int = 256, c: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every activation channel and every weight column has absmax exactly 1: nothing to migrate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x = x / x.abs().amax(0)
    w = torch.randn(48, c, generator=g)
    return x, [w / w.abs().amax(0)]


def _absmaxes(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return x.abs().amax(0), torch.stack([w.abs().amax(0) for w in weights]).amax(0)


def test_candidates_start_with_no_smoothing() -> None:
    assert alpha_candidates([0.2, 0.8]) == [None, 0.2, 0.8]
    assert len(alpha_candidates(DEFAULT_ALPHA_GRID)) == 22
    assert DEFAULT_ALPHA_GRID[0] == 0.0 and DEFAULT_ALPHA_GRID[-1] == 1.0 and DEFAULT_ALPHA_GRID[10] == 0.5


def test_search_keeps_no_smoothing_when_nothing_is_quantized() -> None:
    x, weights = _outlier_layer()
    act, w = _absmaxes(x, weights)
    fp = _recipe(16, 16)
    choice = search_alpha(x, weights, act, w, fp)
    assert choice.alpha is None and choice.scale is None
    assert choice.loss == choice.loss_unsmoothed == 0.0
    assert [a for a, _ in choice.candidates] == alpha_candidates(DEFAULT_ALPHA_GRID)


@pytest.mark.parametrize("bits", [8, 4])
def test_search_keeps_no_smoothing_on_balanced_channels(bits: int) -> None:
    x, weights = _balanced_layer()
    act, w = _absmaxes(x, weights)
    choice = search_alpha(x, weights, act, w, _recipe(bits, bits))
    # every alpha gives s = 1 exactly, so every candidate ties with no smoothing, which wins ties
    assert all(loss == choice.loss_unsmoothed for _, loss in choice.candidates)
    assert choice.alpha is None and choice.scale is None and choice.loss > 0


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_search_picks_a_strong_alpha_on_outlier_channels(bits: int) -> None:
    x, weights = _outlier_layer()
    act, w = _absmaxes(x, weights)
    recipe = _recipe(bits, bits)
    choice = search_alpha(x, weights, act, w, recipe)
    assert choice.alpha is not None and choice.alpha >= 0.5, choice.candidates
    assert choice.loss == min(loss for _, loss in choice.candidates)
    # migration removes most of the error (at W4A4 the 4-bit weights' own error remains)
    assert choice.loss < (0.3 if bits >= 6 else 0.7) * choice.loss_unsmoothed
    assert choice.loss_unsmoothed == pytest.approx(quantized_output_error(x, weights, recipe))
    assert choice.scale is not None
    torch.testing.assert_close(choice.scale, smoothing_scales(act, w, choice.alpha))
    assert quantized_output_error(x, weights, recipe, choice.scale) == pytest.approx(choice.loss, rel=1e-5)
    # the outlier channels are the ones scaled down the most
    assert set(torch.topk(choice.scale, 3).indices.tolist()) == {0, 1, 2}


def test_search_only_tries_the_given_grid() -> None:
    x, weights = _outlier_layer()
    act, w = _absmaxes(x, weights)
    choice = search_alpha(x, weights, act, w, _recipe(4, 4), grid=(0.0, 0.25))
    assert [a for a, _ in choice.candidates] == [None, 0.0, 0.25]
    assert choice.alpha in (None, 0.0, 0.25)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_auto_smoothing_leaves_fp_model_unchanged(name: str) -> None:
    model = FACTORIES[name]()
    ids = make_calibration(num_samples=3, seq_len=24, seed=7).input_ids
    ref = _out(model, ids)
    report = MethodReport(method="smoothquant")
    choices = smooth_groups(model, make_calibration(), "auto", report, recipe=_recipe(4, 4), search_tokens=64)
    assert choices and any(c.scale is not None for c in choices.values())  # the outlier norms get smoothed
    out = _out(model, ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    by_name = {layer.name: layer.metrics for layer in report.layers}
    for key, choice in choices.items():
        metrics = by_name[key]
        assert metrics["searched"] == 1.0 and metrics["loss"] <= metrics["loss_unsmoothed"]
        assert metrics["smoothed"] == float(choice.scale is not None)
        if choice.alpha is not None:
            assert metrics["alpha"] == choice.alpha and choice.alpha in DEFAULT_ALPHA_GRID


def test_auto_without_quantization_folds_nothing() -> None:
    model = make_tiny_llama(kv_heads=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    choices = smooth_groups(model, make_calibration(), "auto", recipe=_recipe(16, 16), search_tokens=64)
    assert choices and all(c.alpha is None for c in choices.values())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_auto_needs_the_recipe() -> None:
    with pytest.raises(ValueError, match="recipe"):
        smooth_groups(make_tiny_opt(), make_calibration(), "auto")


def test_method_reports_the_chosen_alphas() -> None:
    model = make_tiny_opt()
    recipe = _recipe(4, 4, alpha_grid=[0.3, 0.5, 0.7, 0.9], search_tokens=128)
    q = get_method("smoothquant").calibrate(model, make_calibration(), recipe)
    report = q.quant_report
    summary = report.summary
    assert summary["alpha_auto"] == 1.0 and summary["alpha_candidates"] == 5
    assert summary["smoothable_groups"] == 6  # 2 blocks x (attn_in, attn_out, mlp_in)
    assert summary["smoothed_groups"] + summary["unsmoothed_by_search"] == 6
    chosen = [layer.metrics["alpha"] for layer in report.layers if layer.metrics.get("smoothed") == 1.0]
    assert len(chosen) == summary["smoothed_groups"] >= 1
    assert set(chosen) <= {0.3, 0.5, 0.7, 0.9}
    assert summary["alpha_min"] == min(chosen) and summary["alpha_max"] == max(chosen)
    assert summary["loss_ratio_mean"] <= 1.0


@pytest.mark.parametrize("name", ["llama-gqa", "opt"])
def test_auto_beats_rtn_at_w4a4(name: str) -> None:
    fp = FACTORIES[name]()
    calibration = make_calibration(num_samples=8, seq_len=32, seed=0)
    ids = make_calibration(num_samples=4, seq_len=32, seed=1).input_ids  # held out
    ref = _out(fp, ids)
    rtn_recipe = Recipe.model_validate({"method": {"name": "rtn"}, "weight": {"bits": 4}, "activation": {"bits": 4}})
    rtn = get_method("rtn").calibrate(copy.deepcopy(fp), calibration, rtn_recipe)
    sq = get_method("smoothquant").calibrate(copy.deepcopy(fp), calibration, _recipe(4, 4, search_tokens=256))

    def err(model: torch.nn.Module) -> float:
        return float((_out(model, ids) - ref).pow(2).mean() / ref.pow(2).mean())

    assert err(sq) < 0.9 * err(rtn), (err(sq), err(rtn))
