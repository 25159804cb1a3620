"""OS+: channel-wise shift and scale, the fast scale search, FP-exact migration (LLaMA, OPT, BERT),
artifact rebuild of the norm-with-bias, and lower quantized output error than RTN."""

from __future__ import annotations

import copy

import pytest
import torch

from quant.calibration.stats import ChannelStats, collect_group_stats
from quant.methods.base import get_method
from quant.methods.osplus import (
    apply_osplus,
    plan_group,
    quantized_output_error,
    scales_for_threshold,
    search_scale,
    threshold_candidates,
)
from quant.methods.scaling import MigrationTarget
from quant.models.adapters import get_adapter
from quant.modules.linear import QuantLinear
from quant.modules.norms import RMSNormWithBias
from quant.modules.registry import install_modules, record_modules
from quant.recipes.schema import OSPlusParams, Recipe
from tests.conftest import make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

FACTORIES = {
    "llama-gqa": lambda: make_tiny_llama(kv_heads=2),
    "llama-mha": lambda: make_tiny_llama(kv_heads=4),
    "opt": make_tiny_opt,
    "bert": make_tiny_bert,
}


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _rel_mse(out, ref) -> float:
    return float((out - ref).pow(2).mean() / ref.pow(2).mean())


def _recipe(bits: int, method: str = "osplus", **params) -> Recipe:
    return Recipe.model_validate(
        {"method": {"name": method, **params}, "weight": {"bits": bits}, "activation": {"bits": bits}}
    )


def _outlier_tokens(n: int = 256, c: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    x[:, :2] *= 40.0  # two outlier channels
    weights = [torch.randn(48, c, generator=g) / c**0.5, torch.randn(16, c, generator=g) / c**0.5]
    return x, weights


# ----------------------------------------------------------------------------- search pieces


def test_threshold_candidates_are_geometric_from_max_to_min() -> None:
    r = torch.tensor([0.5, 2.0, 8.0, 1.0])
    t = threshold_candidates(r, 5)
    torch.testing.assert_close(t, torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5]))
    assert threshold_candidates(torch.full((3,), 2.0), 10).tolist() == [2.0]


def test_scales_for_threshold() -> None:
    r = torch.tensor([0.5, 2.0, 8.0])
    torch.testing.assert_close(scales_for_threshold(r, 2.0), torch.tensor([1.0, 1.0, 4.0]))
    torch.testing.assert_close(scales_for_threshold(r, 8.0), torch.ones(3))
    torch.testing.assert_close(scales_for_threshold(r, 0.25), r / 0.25)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_search_picks_candidate_no_worse_than_no_scaling(bits: int) -> None:
    x, weights = _outlier_tokens()
    recipe = _recipe(bits)
    r = x.abs().amax(0)
    result = search_scale(x, weights, r, recipe, grid=12)
    assert len(result.candidates) == 12
    assert result.candidates[0][0] == pytest.approx(float(r.max()))  # first candidate: no scaling
    assert result.baseline_loss == pytest.approx(quantized_output_error(x, weights, recipe))
    assert result.loss == min(loss for _, loss in result.candidates)
    assert result.loss <= result.baseline_loss
    # with outlier channels the best candidate actually scales, and strictly helps
    assert result.loss < 0.5 * result.baseline_loss
    assert result.threshold < float(r.max()) and result.scale.max() > 1.0
    torch.testing.assert_close(result.scale, scales_for_threshold(r, result.threshold))
    assert quantized_output_error(x, weights, recipe, result.scale) == pytest.approx(result.loss, rel=1e-5)


def test_search_without_quantization_keeps_no_scaling() -> None:
    x, weights = _outlier_tokens()
    fp = Recipe.model_validate({"method": {"name": "osplus"}, "weight": {"bits": 16}, "activation": {"bits": 16}})
    result = search_scale(x, weights, x.abs().amax(0), fp, grid=6)
    assert result.baseline_loss == pytest.approx(0.0, abs=1e-6)
    assert torch.all(result.scale == 1.0)


def test_plan_auto_shift_is_kept_only_when_it_helps() -> None:
    x, weights = _outlier_tokens(seed=1)
    target = MigrationTarget("norm", True, True)
    params = OSPlusParams(search_grid=10)
    recipe = _recipe(6)
    # asymmetric outlier channels: a shift removes most of their range
    shifted = x.clone()
    shifted[:, :2] = shifted[:, :2].abs() * 0.1 + 30.0
    stats = ChannelStats(max=shifted.amax(0), min=shifted.amin(0), tokens=len(shifted), sample=shifted)
    plan = plan_group(stats, target, weights, params, recipe, "auto")
    assert plan.shift is not None and plan.loss <= plan.loss_other_shift <= plan.loss_unmigrated
    # one rare extreme token sets a channel's centre far from where every other token lives
    rare = _outlier_tokens(seed=2)[0] / 40.0
    rare[0, 5] = 200.0
    stats = ChannelStats(max=rare.amax(0), min=rare.amin(0), tokens=len(rare), sample=rare)
    plan = plan_group(stats, MigrationTarget("norm", False, True), weights, params, recipe, "auto")
    forced = plan_group(stats, MigrationTarget("norm", False, True), weights, params, recipe, "always")
    assert forced.shift is not None and forced.loss > forced.loss_unmigrated
    assert plan.shift is None and plan.loss == plan.loss_unmigrated <= plan.loss_other_shift


# ----------------------------------------------------------------------------- on models


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("policy", ["always", "auto"])
def test_migration_leaves_fp_model_unchanged(name: str, policy: str) -> None:
    model = FACTORIES[name]()
    ids = make_calibration(num_samples=3, seq_len=24, seed=7).input_ids
    ref = _out(model, ids)
    recipe = _recipe(4)
    migrations = apply_osplus(model, make_calibration(), recipe.method, recipe, shift_policy=policy)
    assert migrations and any(m.plan.search is not None or m.plan.shift is not None for m in migrations)
    out = _out(model, ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    if policy == "always":
        assert all(m.plan.shift is not None for m in migrations if m.target.can_shift)


@pytest.mark.parametrize("name", ["llama-gqa", "opt", "bert"])
def test_shift_centres_channel_ranges(name: str) -> None:
    model = FACTORIES[name]()
    calibration = make_calibration()
    adapter = get_adapter(model)
    before = collect_group_stats(model, adapter, calibration)
    recipe = _recipe(8, shift=True, scale=False)
    migrations = apply_osplus(model, calibration, recipe.method, recipe, shift_policy="always")
    shifted = {m.key for m in migrations if m.plan.shift is not None}
    assert {k.split(":")[1] for k in shifted} == {"attn_in", "mlp_in"}
    after = collect_group_stats(model, get_adapter(model), calibration)
    for key in shifted:
        b, a = before[key], after[key]
        assert float(b.center.abs().max()) > 0.05 * float(b.half_range.max())  # asymmetric before
        assert float(a.center.abs().max()) < 1e-4 * float(a.half_range.max()) + 1e-5  # centred after
        torch.testing.assert_close(a.half_range, b.half_range, rtol=1e-4, atol=1e-4)  # no scaling
    if name.startswith("llama"):
        assert isinstance(model.model.layers[0].input_layernorm, RMSNormWithBias)


def test_attn_out_takes_scale_only_through_value() -> None:
    model = make_tiny_opt()
    recipe = _recipe(4)
    migrations = {m.key: m for m in apply_osplus(model, make_calibration(), recipe.method, recipe)}
    m = migrations["model.decoder.layers.0:attn_out"]
    assert m.target.site == "producer" and m.plan.shift is None and m.plan.search is not None
    assert "model.decoder.layers.0:mlp_out" not in migrations  # ReLU: nothing can absorb it


def test_method_quantizes_reports_and_rebuilds_from_layout() -> None:
    recipe = _recipe(4)
    model = get_method("osplus").calibrate(make_tiny_llama(kv_heads=2), make_calibration(), recipe)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    report = model.quant_report
    assert report.method == "osplus" and report.summary["scaled_groups"] >= 6
    assert report.summary["loss_ratio_mean"] <= 1.0
    for layer in report.layers:
        if layer.metrics.get("migrated") == 1.0:
            assert layer.metrics["loss"] <= layer.metrics["loss_unmigrated"] + 1e-9
    layout = record_modules(model)
    norms = {n for n, v in layout.items() if v["type"] == "rms_norm_with_bias"}
    shifted = {l.name for l in report.layers if l.metrics.get("shifted") == 1.0}
    assert len(norms) == len(shifted)
    fresh = make_tiny_llama(kv_heads=2, seed=5)
    install_modules(fresh, layout)
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = make_calibration(num_samples=2, seq_len=12, seed=3).input_ids
    torch.testing.assert_close(_out(fresh, ids), _out(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_beats_rtn(name: str, bits: int) -> None:
    fp = FACTORIES[name]()
    calibration = make_calibration(num_samples=8, seq_len=32, seed=0)
    ids = make_calibration(num_samples=4, seq_len=32, seed=1).input_ids  # held out
    ref = _out(fp, ids)
    rtn = get_method("rtn").calibrate(copy.deepcopy(fp), calibration, _recipe(bits, method="rtn"))
    osp = get_method("osplus").calibrate(copy.deepcopy(fp), calibration, _recipe(bits))
    err_rtn, err_os = _rel_mse(_out(rtn, ids), ref), _rel_mse(_out(osp, ids), ref)
    assert err_os < 0.95 * err_rtn, (err_os, err_rtn)


def test_no_shift_into_bias_free_linears_kept_in_floating_point() -> None:
    recipe = Recipe.model_validate(
        {
            "method": {"name": "osplus"},
            "weight": {"bits": 4},
            "activation": {"bits": 4},
            "skip_modules": ["lm_head", "self_attn.q_proj"],
        }
    )
    fp = make_tiny_llama(kv_heads=2)
    ids = make_calibration(num_samples=2, seq_len=12, seed=3).input_ids
    model = get_method("osplus").calibrate(copy.deepcopy(fp), make_calibration(), recipe)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear and q_proj.bias is None
    attn_in = [l for l in model.quant_report.layers if l.name.endswith("attn_in")]
    assert attn_in and all(l.metrics["shifted"] == 0.0 for l in attn_in)
    assert any(l.metrics.get("shifted") == 1.0 for l in model.quant_report.layers if l.name.endswith("mlp_in"))
    fresh = make_tiny_llama(kv_heads=2, seed=5)
    install_modules(fresh, record_modules(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_out(fresh, ids), _out(model, ids), rtol=0, atol=0)


def test_small_sample_budget_runs_several_passes_and_stays_exact() -> None:
    model = make_tiny_opt()
    ids = make_calibration(num_samples=2, seq_len=16, seed=9).input_ids
    ref = _out(model, ids)
    recipe = _recipe(4, search_tokens=64)
    budget = 64 * 64 * 4  # one group's full sample at a time
    migrations = apply_osplus(model, make_calibration(), recipe.method, recipe, sample_budget_bytes=budget)
    assert len(migrations) == 6  # (attn_in, attn_out, mlp_in) x 2 blocks, one pass each
    assert all(m.plan.search is not None for m in migrations)
    assert float((_out(model, ids) - ref).norm() / ref.norm()) < 1e-4
