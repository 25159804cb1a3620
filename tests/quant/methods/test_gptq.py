from __future__ import annotations

import pytest
import torch

from quant.methods.base import get_method
from quant.modules.linear import QuantLinear
from quant.recipes.presets import get_preset
from quant.recipes.schema import Recipe
from tests.conftest import make_calibration, make_tiny_bert, make_tiny_llama, make_tiny_opt

BUILDERS = {"llama": make_tiny_llama, "opt": make_tiny_opt, "bert": make_tiny_bert}


def _output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_gptq_method_end_to_end(arch: str) -> None:
    build = BUILDERS[arch]
    fp, model = build(), build()
    calib = make_calibration(num_samples=8, seq_len=32)
    progress: list[float] = []
    body = get_preset("gptq-w4a8").to_dict()
    body["weight"]["gptq"]["block_size"] = 16  # several lazy batches per layer
    recipe = Recipe.model_validate(body)
    q = get_method("gptq").calibrate(model, calib, recipe, lambda f, m: progress.append(f))
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == (7 if arch == "llama" else 6) * 2
    assert progress == sorted(progress) and progress[-1] == 1.0
    report = q.quant_report
    assert report.method == "gptq" and len(report.layers) == len(layers)
    assert all(l.metrics["hessian_tokens"] == 8 * 32 for l in report.layers)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        rel = float((_output(q, ids) - _output(fp, ids)).norm() / _output(fp, ids).norm())
    assert 0.0 < rel < 0.5


def test_gptq_beats_rtn_on_calibration_outputs() -> None:
    """On the calibration data itself, GPTQ's block outputs are closer to FP than RTN's (W3 per channel)."""
    calib = make_calibration(num_samples=8, seq_len=32)
    base = get_preset("rtn-w4a16-g128").to_dict()
    base["weight"] = {"bits": 3, "granularity": "per_channel", "symmetric": True}
    base["activation"] = {"bits": 16}
    ids = calib.input_ids
    with torch.no_grad():
        ref = make_tiny_llama()(ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        recipe = Recipe.model_validate({**base, "method": {"name": method}})
        q = get_method(method).calibrate(make_tiny_llama(), calib, recipe)
        with torch.no_grad():
            errs[method] = float((q(ids).logits - ref).norm() / ref.norm())
    assert errs["gptq"] < errs["rtn"], errs
    out_errs = [l.metrics["output_rel_err"] for l in q.quant_report.layers]
    assert all(0.0 < e < 1.0 for e in out_errs)


def test_gptq_needs_calibration() -> None:
    with pytest.raises(ValueError, match="calibration"):
        from quant.methods.common import quantize_linears
        from quant.models.adapters import get_adapter

        model = make_tiny_llama()
        quantize_linears(model, get_adapter(model), get_preset("gptq-w4a8"), calibration=None)


def test_linears_outside_blocks_fall_back_to_rtn() -> None:
    from quant.methods.common import quantize_linears
    from quant.models.adapters import get_adapter

    model = make_tiny_llama()
    names = ["model.layers.0.mlp.down_proj", "lm_head"]
    body = get_preset("gptq-w4a8").to_dict()
    body["skip_modules"] = []
    done = quantize_linears(model, get_adapter(model), Recipe.model_validate(body), calibration=make_calibration(),
                            names=names)
    assert set(done) == set(names)
    assert "output_rel_err" in done["model.layers.0.mlp.down_proj"].quant_stats
    assert done["lm_head"].quant_stats == {"rtn_fallback": 1.0}
    assert isinstance(model.lm_head, QuantLinear)


def test_gptq_with_online_transform() -> None:
    """A method that folds an orthogonal transform into a linear gets GPTQ on the transformed inputs."""
    from quant.methods.common import quantize_linears
    from quant.models.adapters import get_adapter
    from quant.transforms.hadamard import HadamardTransform

    fp, model = make_tiny_llama(), make_tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    t = HadamardTransform(lin.in_features, signs=torch.randint(0, 2, (lin.in_features,)).float() * 2 - 1)
    with torch.no_grad():
        lin.weight.copy_(t.fold_into_weight(lin.weight))
    calib = make_calibration()
    body = get_preset("gptq-w8a8").to_dict()
    body["activation"] = {"bits": 16}
    done = quantize_linears(model, get_adapter(model), Recipe.model_validate(body), transforms={name: t},
                            calibration=calib)
    layer = done[name]
    assert layer.transform is t and 0.0 < layer.quant_stats["output_rel_err"] < 1e-3
    ids = calib.input_ids[:2]
    with torch.no_grad():
        ref = fp(ids).logits
        rel = float((model(ids).logits - ref).norm() / ref.norm())
    assert rel < 0.02, rel
