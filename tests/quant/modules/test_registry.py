from __future__ import annotations

import torch

from quant.methods.base import get_method
from quant.modules.linear import QuantLinear
from quant.modules.registry import get_module_type, install_modules, record_modules, registered_module_types
from quant.recipes.presets import get_preset
from tests.conftest import make_calibration, make_tiny_llama


def test_builtin_types_registered() -> None:
    keys = registered_module_types()
    assert "quant_linear" in keys and "kv_quantizer" in keys
    assert get_module_type("quant_linear").cls is QuantLinear


def test_quant_linear_config_round_trip() -> None:
    from quant.quantizers.weight import quantize_weight_rtn
    from quant.recipes.schema import ActivationQuantSpec, WeightQuantSpec

    torch.manual_seed(0)
    w = torch.randn(16, 32)
    spec = WeightQuantSpec(bits=4, granularity="per_group", group_size=16, symmetric=False)
    layer = QuantLinear.from_quantized(quantize_weight_rtn(w, spec), torch.randn(16), ActivationQuantSpec(bits=8),
                                       act_clip_ratio=0.9, weight_symmetric=False)
    clone = QuantLinear.from_config(layer.config())
    assert clone.config() == layer.config()
    clone.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(3, 32)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)


def test_record_and_reinstall_layout() -> None:
    recipe = get_preset("rtn-w4a4kv4")
    model = get_method("rtn").calibrate(make_tiny_llama(), make_calibration(), recipe)
    layout = record_modules(model)
    kinds = {v["type"] for v in layout.values()}
    assert kinds == {"quant_linear", "kv_quantizer"}
    assert "model.layers.0.self_attn.q_proj" in layout
    assert "model.layers.1.self_attn.kv_quantizer" in layout
    assert not any(n.endswith("lm_head") for n in layout)  # skipped module stays float

    fresh = make_tiny_llama(seed=1)
    installed = install_modules(fresh, layout)
    assert set(installed) == set(layout)
    assert fresh.config._attn_implementation == model.config._attn_implementation == "qaas_kv"
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
