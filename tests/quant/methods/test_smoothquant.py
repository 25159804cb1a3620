"""SmoothQuant: scale formula, FP-exact folding, which groups are smoothed, and lower quantized
output error than RTN on tiny models with channel outliers."""

from __future__ import annotations

import copy

import pytest
import torch

from quant.calibration.stats import collect_group_stats, group_key
from quant.methods.base import get_method
from quant.methods.scaling import weight_absmax
from quant.methods.smoothquant import smooth_model, smoothing_scales
from quant.models.adapters import get_adapter
from quant.modules.linear import QuantLinear
from quant.recipes.schema import Recipe
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


def _recipe(method: str, bits: int, **params) -> Recipe:
    return Recipe.model_validate(
        {"method": {"name": method, **params}, "weight": {"bits": bits}, "activation": {"bits": bits}}
    )


def test_smoothing_scales_formula() -> None:
    act = torch.tensor([16.0, 1.0, 0.0, 4.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(act, w, alpha=0.5)
    expected = torch.tensor([4.0 / 1.0, 1.0 / 2.0, 1e-5 ** 0.5 / 2 ** 0.5, 2.0 / 1e-5 ** 0.5])
    torch.testing.assert_close(s, expected)
    torch.testing.assert_close(smoothing_scales(act.clamp(min=1), w.clamp(min=1), 1.0), act.clamp(min=1))
    torch.testing.assert_close(smoothing_scales(act.clamp(min=1), w.clamp(min=1), 0.0), 1 / w.clamp(min=1))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_smoothing_leaves_fp_model_unchanged(name: str) -> None:
    model = FACTORIES[name]()
    ids = make_calibration(num_samples=3, seq_len=24, seed=7).input_ids
    ref = _out(model, ids)
    smoothed = smooth_model(model, make_calibration(), alpha=0.5)
    assert smoothed >= 2  # bert: attn_out only (2 blocks)
    out = _out(model, ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-4


def test_smoothing_flattens_channels_and_skips_unabsorbable_groups() -> None:
    model = make_tiny_llama(kv_heads=2)
    adapter = get_adapter(model)
    calibration = make_calibration()
    before = collect_group_stats(model, adapter, calibration)
    v_rows = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    o_proj = model.model.layers[0].self_attn.o_proj.weight.detach().clone()
    smooth_model(model, calibration, alpha=0.5)
    after = collect_group_stats(model, get_adapter(model), calibration)
    for key in before:
        ratio_before = before[key].absmax.max() / before[key].absmax.median()
        ratio_after = after[key].absmax.max() / after[key].absmax.median()
        if key.endswith("attn_out"):  # GQA: left unsmoothed
            torch.testing.assert_close(after[key].absmax, before[key].absmax)
        else:
            assert ratio_after < ratio_before
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.weight, o_proj)
    # v_proj changed only through the attn_in columns, never its rows: column ratios match q_proj's
    v_now = model.model.layers[0].self_attn.v_proj.weight
    assert not torch.equal(v_now, v_rows)
    torch.testing.assert_close(v_now / v_rows, (v_now / v_rows)[:1].expand_as(v_now), rtol=1e-5, atol=1e-6)


def test_scale_matches_statistics_for_one_group() -> None:
    model = make_tiny_opt()
    adapter = get_adapter(model)
    calibration = make_calibration()
    block = adapter.block(1)
    group = block.group("mlp_in")
    act = collect_group_stats(model, adapter, calibration)[group_key(block, group)].absmax
    expected = smoothing_scales(act, weight_absmax(group), 0.7)
    w0 = model.model.decoder.layers[1].fc1.weight.detach().clone()
    smooth_model(model, calibration, alpha=0.7)
    torch.testing.assert_close(model.model.decoder.layers[1].fc1.weight, w0 * expected.unsqueeze(0))


def test_bert_post_ln_norms_are_left_unsmoothed() -> None:
    model = make_tiny_bert()
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "LayerNorm" in n}
    value_w = model.encoder.layer[0].attention.self.value.weight.detach().clone()
    smooth_model(model, make_calibration(), alpha=0.5)
    for n, p in model.named_parameters():
        if n in norms:
            torch.testing.assert_close(p, norms[n], rtol=0, atol=0)
    assert not torch.equal(model.encoder.layer[0].attention.self.value.weight, value_w)  # attn_out via value


def test_method_quantizes_and_reports() -> None:
    model = make_tiny_opt()
    q = get_method("smoothquant").calibrate(model, make_calibration(), _recipe("smoothquant", 8, alpha=0.5))
    assert isinstance(q.model.decoder.layers[0].self_attn.q_proj, QuantLinear)
    assert isinstance(q.model.decoder.layers[1].fc2, QuantLinear)
    report = q.quant_report
    assert report.method == "smoothquant"
    assert report.summary["smoothed_groups"] == 6  # 2 blocks x (attn_in, attn_out, mlp_in)
    smoothed = [l for l in report.layers if l.metrics["smoothed"] == 1.0]
    assert len(smoothed) == 6
    assert all(l.metrics["act_channel_ratio_after"] < l.metrics["act_channel_ratio_before"] for l in smoothed)


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "opt"])
@pytest.mark.parametrize("bits", [8, 6, 4])
def test_beats_rtn(name: str, bits: int) -> None:
    fp = FACTORIES[name]()
    calibration = make_calibration(num_samples=8, seq_len=32, seed=0)
    ids = make_calibration(num_samples=4, seq_len=32, seed=1).input_ids  # held out
    ref = _out(fp, ids)
    rtn = get_method("rtn").calibrate(copy.deepcopy(fp), calibration, _recipe("rtn", bits))
    sq = get_method("smoothquant").calibrate(copy.deepcopy(fp), calibration, _recipe("smoothquant", bits, alpha=0.5))
    err_rtn, err_sq = _rel_mse(_out(rtn, ids), ref), _rel_mse(_out(sq, ids), ref)
    assert err_sq < 0.9 * err_rtn, (err_sq, err_rtn)
