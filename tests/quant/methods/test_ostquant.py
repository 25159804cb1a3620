from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from quant.artifacts import ArtifactManifest, load_artifact, save_artifact
from quant.methods.base import get_method
from quant.methods.ostquant import (
    OSTState,
    build_plan,
    cayley_step,
    fake_quantize_weight,
    fold_state,
    kl_top_loss,
)
from quant.methods.quarot import fuse_norms
from quant.models.adapters import UnsupportedArchitecture, get_adapter
from quant.modules.kv_cache import KVQuantizer
from quant.modules.linear import QuantLinear
from quant.quantizers.weight import quantize_weight_rtn
from quant.recipes.schema import Recipe, WeightQuantSpec
from quant.transforms.hadamard import HadamardTransform, fwht
from tests.conftest import make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

MODELS = {
    "llama-gqa": lambda: make_tiny_llama(kv_heads=2),
    "llama-mha": lambda: make_tiny_llama(kv_heads=4),
    "opt": make_tiny_opt,
}


def _recipe(w: int = 4, a: int = 4, kv: int = 16, **method: object) -> Recipe:
    return Recipe.from_dict(
        {"method": {"name": "ostquant", **method}, "weight": {"bits": w}, "activation": {"bits": a}, "kv_cache": {"bits": kv}}
    )


def _kl(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach(), out.detach()
    return float(F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("case", sorted(MODELS))
def test_folded_transforms_with_random_scales_are_equivalent(case: str) -> None:
    model = MODELS[case]()
    ids = make_calibration(num_samples=2, seed=4).input_ids
    ref = model(ids).logits
    adapter = get_adapter(model)
    fuse_norms(model, adapter)
    plan = build_plan(adapter)
    state = OSTState(model, plan, adapter.hidden_size, seed=3)
    with torch.no_grad():
        for p in state.scales():
            p.normal_(0.0, 0.5)  # non-trivial scales on both sides of every pair
    assert len(state.log_s_up) == (2 if case.startswith("llama") else 0)
    online = {b.down for b in plan.blocks}
    fold_state(model, plan, state, online)
    for name in online:
        model.get_submodule(name).register_forward_pre_hook(lambda m, a: (fwht(a[0]),))
    assert _rel(model(ids).logits, ref) < 1e-4


def test_method_at_16_bits_is_equivalent() -> None:
    model = make_tiny_llama()
    ids = make_calibration(num_samples=2, seed=4).input_ids
    ref = model(ids).logits
    q = get_method("ostquant").calibrate(copy.deepcopy(model), make_calibration(num_samples=4), _recipe(16, 16, epochs=0))
    assert _rel(q(ids).logits, ref) < 1e-4
    down = q.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear) and isinstance(down.transform, HadamardTransform)


def test_cayley_step_stays_orthogonal_and_descends() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(16, 16, generator=g)
    x = torch.nn.Parameter(torch.linalg.qr(torch.randn(16, 16, generator=g))[0])
    losses = []
    for _ in range(30):
        loss = (x - target).pow(2).sum()
        losses.append(float(loss.detach()))
        x.grad = None
        loss.backward()
        cayley_step(x, 0.05)
    assert torch.allclose(x.detach() @ x.detach().T, torch.eye(16), atol=1e-5)
    assert losses[-1] < losses[0]


def test_kl_top_loss() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 5, 32, generator=g)
    s = t + 0.3 * torch.randn(2, 5, 32, generator=g)
    assert float(kl_top_loss(t, t.clone(), 8, None)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_top_loss(t, s, 8, None)) > 0
    # k at least the vocabulary: the full KL
    full = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    assert float(kl_top_loss(t, s, 1000, None)) == pytest.approx(float(full), rel=1e-5)
    mask = torch.zeros(2, 5, dtype=torch.long)
    mask[0] = 1
    per_row = F.kl_div(s[0].log_softmax(-1), t[0].log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
    assert float(kl_top_loss(t, s, 32, mask)) == pytest.approx(float(per_row), rel=1e-5)


@pytest.mark.parametrize("spec", [WeightQuantSpec(bits=4), WeightQuantSpec(bits=4, symmetric=False),
                                  WeightQuantSpec(bits=4, granularity="per_group", group_size=16)])
def test_training_weight_quantizer_matches_final_rtn_and_has_gradients(spec: WeightQuantSpec) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 64, generator=g)
    w[:, 5] *= 8.0
    wp = w.clone().requires_grad_(True)
    fq = fake_quantize_weight(wp, spec)
    assert torch.allclose(fq, quantize_weight_rtn(w, spec).dequantize(), atol=1e-5)
    fq.sum().backward()
    assert wp.grad is not None and wp.grad.abs().sum() > 0


def test_training_lowers_the_loss_and_beats_the_start_point() -> None:
    model = make_tiny_llama()
    cal = make_calibration(num_samples=12, seq_len=32, batch_size=12)  # full batch: deterministic steps
    ref = model(cal.input_ids).logits
    start = get_method("ostquant").calibrate(copy.deepcopy(model), cal, _recipe(epochs=0))
    quarot = get_method("quarot").calibrate(copy.deepcopy(model), cal, Recipe.from_dict(
        {"method": {"name": "quarot"}, "weight": {"bits": 4}, "activation": {"bits": 4}}))
    trained = get_method("ostquant").calibrate(copy.deepcopy(model), cal, _recipe(epochs=10, lr_rotation=0.5))
    summary = trained.quant_report.summary
    assert summary["train_steps"] == 10
    assert summary["loss_last_epoch"] < 0.95 * summary["loss_first_epoch"]
    kl_start, kl_quarot, kl_trained = (_kl(ref, m(cal.input_ids).logits) for m in (start, quarot, trained))
    # untrained OSTQuant is QuaRot (same random-Hadamard R1 and head Hadamard R2, unit scales)
    assert kl_start == pytest.approx(kl_quarot, rel=1e-3)
    assert kl_trained < 0.95 * kl_quarot, (kl_trained, kl_quarot)


def test_qsur_is_reported_and_improved() -> None:
    q = get_method("ostquant").calibrate(make_tiny_llama(), make_calibration(), _recipe(epochs=1))
    report = q.quant_report
    by_name = {layer.name: layer.metrics for layer in report.layers}
    assert len(by_name) == 14
    q_proj = by_name["model.layers.0.self_attn.q_proj"]
    assert 0 < q_proj["qsur_before"] < q_proj["qsur_after"] <= 1
    assert q_proj["qsur_log_after"] > q_proj["qsur_log_before"]
    assert by_name["model.layers.0.mlp.down_proj"]["online_hadamard"] == 1.0
    assert report.summary["qsur_after_mean"] > 2 * report.summary["qsur_before_mean"]


def test_blockwise_mse_kv4_opt_and_artifact_round_trip(tmp_path) -> None:
    model = make_tiny_opt()
    cal = make_calibration(num_samples=8, batch_size=8)
    recipe = _recipe(4, 8, kv=4, epochs=4, end_to_end=False, lr_rotation=0.5)
    q = get_method("ostquant").calibrate(copy.deepcopy(model), cal, recipe)
    s = q.quant_report.summary
    assert s["loss_last_epoch"] < s["loss_first_epoch"]
    kvq = [m for m in q.modules() if isinstance(m, KVQuantizer)]
    assert len(kvq) == 2 and all(m.rotate and m.bits == 4 for m in kvq)
    ids = make_calibration(num_samples=2, seed=9).input_ids
    out = q(ids).logits
    assert _kl(model(ids).logits, out) < 0.2
    save_artifact(q, tmp_path, ArtifactManifest(base_model_id="tiny/ostquant-opt", recipe=recipe))
    loaded, manifest = load_artifact(tmp_path)
    assert manifest.recipe.method.name == "ostquant" and not manifest.recipe.method.end_to_end
    assert torch.allclose(loaded(ids).logits, out, atol=1e-5)


def test_encoder_is_rejected() -> None:
    with pytest.raises(UnsupportedArchitecture):
        get_method("ostquant").calibrate(make_tiny_bert(), make_calibration(), _recipe())


def test_recipe_round_trips_through_yaml_and_json() -> None:
    recipe = _recipe(4, 4, kv=4, epochs=3, lr_rotation=0.7, lr_scale=0.02, kl_top_k=50, end_to_end=False)
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_json(recipe.canonical_json()) == recipe
    assert recipe.bits_label == "W4A4KV4"


def test_padding_is_excluded_from_qsur_and_losses() -> None:
    from quant.calibration.data import CalibrationData
    from quant.evaluation.qsur import linear_input_qsur
    from quant.methods.ostquant import blockwise_mse_loss

    model = make_tiny_llama()
    ids = make_calibration(num_samples=4, seq_len=32).input_ids
    mask = torch.ones_like(ids)
    mask[:, 24:] = 0
    padded = ids.clone()
    padded[:, 24:] = 7  # garbage behind the mask
    adapter = get_adapter(model)
    a = linear_input_qsur(model, adapter, CalibrationData(ids[:, :24].contiguous(), batch_size=4))
    b = linear_input_qsur(model, adapter, CalibrationData(padded, attention_mask=mask, batch_size=4))
    name = "model.layers.1.mlp.down_proj"
    assert a[name].tokens == b[name].tokens == 4 * 24
    assert a[name].log_value == pytest.approx(b[name].log_value, rel=1e-4)
    # hidden-state tuples (embeddings, block outputs): equal except behind the mask
    t, s_ = (torch.zeros(2, 5, 8), torch.ones(2, 5, 8)), (torch.zeros(2, 5, 8), torch.ones(2, 5, 8))
    s_[1][:, 3:] = 100.0
    m = torch.ones(2, 5, dtype=torch.long)
    m[:, 3:] = 0
    assert float(blockwise_mse_loss(t, s_, torch.eye(8), m)) == pytest.approx(0.0)
    assert float(blockwise_mse_loss(t, s_, torch.eye(8))) > 1.0
