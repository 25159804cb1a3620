"""RMSNormWithBias: same function as LLaMA's RMSNorm plus a bias; rebuilt from config by the registry."""

from __future__ import annotations

import torch

from quant.modules.norms import RMSNormWithBias, norm_eps
from quant.modules.registry import get_module_type, module_type_of, registered_module_types
from tests.conftest import make_tiny_llama


def test_matches_llama_rmsnorm_and_adds_bias() -> None:
    norm = make_tiny_llama().model.layers[0].input_layernorm
    layer = RMSNormWithBias.from_rms_norm(norm)
    assert layer.eps == norm_eps(norm) == norm.variance_epsilon
    x = torch.randn(3, 5, 64) * 4
    torch.testing.assert_close(layer(x), norm(x), rtol=0, atol=0)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(64.0))
    torch.testing.assert_close(layer(x), norm(x) + torch.arange(64.0))
    # bf16 inputs follow the same cast order as the HF norm
    xb = x.to(torch.bfloat16)
    torch.testing.assert_close(RMSNormWithBias.from_rms_norm(norm).to(torch.bfloat16)(xb), norm.to(torch.bfloat16)(xb))


def test_config_round_trip_through_registry() -> None:
    layer = RMSNormWithBias(64, eps=1e-5)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.normal_()
    entry = module_type_of(layer)
    assert entry is not None and entry.key == "rms_norm_with_bias"
    assert get_module_type("rms_norm_with_bias").cls is RMSNormWithBias
    assert "rms_norm_with_bias" in registered_module_types()
    rebuilt = RMSNormWithBias.from_config(layer.config())
    rebuilt.load_state_dict(layer.state_dict(), strict=True)
    x = torch.randn(4, 64)
    torch.testing.assert_close(rebuilt(x), layer(x), rtol=0, atol=0)
