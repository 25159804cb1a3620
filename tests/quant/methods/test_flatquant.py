"""FlatQuant on tiny random models: exact folding, decreasing calibration loss, better than RTN at W4A4.

Tiny random models (with injected channel outliers) check mechanics and relative behaviour only.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_calibration, make_tiny_llama, make_tiny_opt
from quant.methods.base import MethodReport, get_method
from quant.methods.flatquant import BlockFlat
from quant.models.adapters import get_adapter
from quant.modules.linear import QuantLinear
from quant.recipes.presets import get_preset
from quant.recipes.schema import FlatQuantParams, Recipe
from quant.transforms.kronecker import KroneckerTransform


def _recipe(preset: str, **method: object) -> Recipe:
    data = get_preset(preset).to_dict()
    data["method"].update(method)
    return Recipe.from_dict(data)


def _fp_recipe(**method: object) -> Recipe:
    data = get_preset("flatquant-w4a4").to_dict()
    data["weight"] = {"bits": 16}
    data["activation"] = {"bits": 16}
    data["method"].update(method)
    return Recipe.from_dict(data)


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits.float()


@torch.no_grad()
def _kl(fp: torch.nn.Module, q: torch.nn.Module, ids: torch.Tensor) -> float:
    lp = _logits(fp, ids).log_softmax(-1)
    lq = _logits(q, ids).log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_opt], ids=["llama-gqa", "opt"])
def test_folding_perturbed_transforms_leaves_fp_model_unchanged(make) -> None:
    """Non-orthogonal factors, random diagonals, V folded into v_proj and o_proj's per-head factor:
    with nothing quantized the folded model computes the same function."""
    fp = make()
    model = copy.deepcopy(fp)
    recipe = _fp_recipe(diag_init="one")
    params = recipe.method
    assert isinstance(params, FlatQuantParams)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    for block in adapter.iter_blocks():
        flat = BlockFlat(block, recipe, params)
        with torch.no_grad():
            for name, p in flat.named_parameters():
                if name.endswith(".skew"):
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif name.endswith(".s"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
                elif name.endswith(".scale"):
                    p.copy_(0.3 + 2 * torch.rand(p.shape, generator=g))
        assert flat.v_factor is not None  # head-wise o_proj transform in use
        flat.install(model, quantize_now=True)
    quant_linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quant_linears) == 2 * (7 if make is make_tiny_llama else 6)
    assert all(isinstance(m.transform, KroneckerTransform) for m in quant_linears)
    ids = make_calibration(num_samples=4, seq_len=24, seed=3).input_ids
    assert _rel(_logits(fp, ids), _logits(model, ids)) < 1e-4


def test_method_without_quantization_is_identity() -> None:
    fp = make_tiny_llama()
    q = get_method("flatquant").calibrate(copy.deepcopy(fp), make_calibration(), _fp_recipe(epochs=0))
    ids = make_calibration(num_samples=4, seq_len=24, seed=3).input_ids
    assert _rel(_logits(fp, ids), _logits(q, ids)) < 1e-5
    # the smoothing diagonal went into the norms: q/k/v's online transform carries no scale
    attn_q = q.model.layers[0].self_attn.q_proj
    assert isinstance(attn_q, QuantLinear) and attn_q.transform.scale is None
    o = q.model.layers[0].self_attn.o_proj
    assert (o.transform.n1, o.transform.n2) == (4, 16)  # heads x head_dim
    torch.testing.assert_close(o.transform.right, torch.eye(16))  # V folded into v_proj, not online


def test_calibration_loss_decreases_and_report() -> None:
    model = make_tiny_llama()
    seen: list[float] = []
    q = get_method("flatquant").calibrate(
        model, make_calibration(), _recipe("flatquant-w4a4", epochs=4), lambda f, m: seen.append(f)
    )
    report = q.quant_report
    assert isinstance(report, MethodReport) and report.method == "flatquant"
    blocks = [l for l in report.layers if "loss_final" in l.metrics]
    assert len(blocks) == 2
    for layer in blocks:
        m = layer.metrics
        assert m["loss_final"] < m["loss_first_epoch"]
        assert m["seconds"] > 0
        # the folded, really-quantized block matches the trained fake-quant block
        assert m["loss_quantized"] == pytest.approx(m["loss_final"], rel=0.3)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert report.calibration_seconds > 0
    clips = [l.metrics["act_clip"] for l in report.layers if "act_clip" in l.metrics]
    assert len(clips) == 14 and all(0.0 < c < 1.0 for c in clips)


def test_flatquant_beats_rtn_at_w4a4() -> None:
    fp = make_tiny_llama()
    calib = make_calibration(num_samples=8, seq_len=32)
    ids = make_calibration(num_samples=8, seq_len=32, seed=1).input_ids
    rtn = get_method("rtn").calibrate(copy.deepcopy(fp), calib, get_preset("rtn-w4a4"))
    flat = get_method("flatquant").calibrate(copy.deepcopy(fp), calib, _recipe("flatquant-w4a4", epochs=4))
    kl_rtn, kl_flat = _kl(fp, rtn, ids), _kl(fp, flat, ids)
    err_rtn = _rel(_logits(fp, ids), _logits(rtn, ids))
    err_flat = _rel(_logits(fp, ids), _logits(flat, ids))
    assert kl_flat < 0.6 * kl_rtn, (kl_flat, kl_rtn)
    print(f"W4A4 tiny llama: KL rtn={kl_rtn:.4f} flatquant={kl_flat:.4f}; rel err rtn={err_rtn:.3f} flatquant={err_flat:.3f}")
    assert err_flat < err_rtn, (err_flat, err_rtn)


def test_kv_cache_quantizer_and_artifact_roundtrip() -> None:
    from quant.modules.kv_cache import KVQuantizer, sylvester_hadamard

    fp = make_tiny_llama()
    q = get_method("flatquant").calibrate(copy.deepcopy(fp), make_calibration(), _recipe("flatquant-w4a4kv4", epochs=1))
    attn = q.model.layers[1].self_attn
    assert isinstance(attn.kv_quantizer, KVQuantizer) and attn.kv_quantizer.bits == 4
    # the learned key rotation (Hadamard start) replaced the fresh quantizer's Hadamard and is orthogonal
    rot = attn.kv_quantizer.rotation.double()
    torch.testing.assert_close(rot @ rot.T, torch.eye(16, dtype=torch.float64), atol=1e-5, rtol=0)
    assert not torch.allclose(rot, sylvester_hadamard(16, torch.float64), atol=1e-6)
    ids = make_calibration(num_samples=2, seq_len=24, seed=5).input_ids
    assert torch.isfinite(_logits(q, ids)).all()
    # a QuantLinear with a Kronecker transform rebuilds from config + state dict
    layer = q.model.layers[0].mlp.down_proj
    rebuilt = QuantLinear.from_config(layer.config())
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(3, layer.in_features)
    torch.testing.assert_close(rebuilt(x), layer(x))
    assert layer.config()["transform"]["kind"] == "kronecker"


def test_gptq_weight_rounding_path() -> None:
    data = get_preset("flatquant-w4a8").to_dict()
    data["method"]["epochs"] = 1
    data["weight"]["algorithm"] = "gptq"
    fp = make_tiny_llama()
    q = get_method("flatquant").calibrate(copy.deepcopy(fp), make_calibration(), Recipe.from_dict(data))
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(isinstance(m.transform, KroneckerTransform) for m in layers)
    ids = make_calibration(num_samples=4, seq_len=24, seed=3).input_ids
    assert _rel(_logits(fp, ids), _logits(q, ids)) < 0.5
