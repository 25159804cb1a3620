from __future__ import annotations

import pytest
import torch

from quant.methods.common import build_quant_linear
from quant.modules.linear import QuantLinear
from quant.quantizers.core import fake_quantize
from quant.recipes.presets import get_preset


@pytest.mark.parametrize("preset", ["rtn-w4a4", "rtn-w8a8", "rtn-w4a16-g128", "rtn-w6a6"])
def test_build_forward_and_config_round_trip(preset: str) -> None:
    recipe = get_preset(preset)
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 32)
    layer = build_quant_linear(lin, recipe)
    x = torch.randn(2, 5, 128)
    w = layer.dequantized_weight()
    xq = fake_quantize(x, recipe.activation.bits, recipe.activation.symmetric) if recipe.activation.enabled else x
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(xq, w, lin.bias.detach()))
    # storage: int4 is packed two per byte
    assert layer.qweight.shape[1] == (64 if recipe.weight.bits <= 4 else 128)
    clone = QuantLinear.from_config(layer.config())
    clone.load_state_dict(layer.state_dict(), strict=True)
    torch.testing.assert_close(clone(x), layer(x), rtol=0, atol=0)
    assert clone.config() == layer.config()


def test_fp_weights_kept_when_weight_bits_16() -> None:
    recipe = get_preset("rtn-w8a8").model_copy(
        update={"weight": get_preset("rtn-w8a8").weight.model_copy(update={"bits": 16})}
    )
    lin = torch.nn.Linear(16, 8)
    layer = build_quant_linear(lin, recipe)
    assert layer.weight_bits == 16 and torch.equal(layer.weight, lin.weight)


def test_state_dict_load_refreshes_cached_weight() -> None:
    recipe = get_preset("rtn-w8a8")
    a = build_quant_linear(torch.nn.Linear(16, 8), recipe)
    b = build_quant_linear(torch.nn.Linear(16, 8), recipe)
    x = torch.randn(3, 16)
    b(x)  # fills b's dequantized-weight cache
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_tiled_codes_keep_the_row_interface() -> None:
    """tile_codes puts qweight into the decode kernels' tiled order in place; packed_codes / weight_codes / the state
    dict / copies still mean rows, and any write of the codes (state dict, assignment, in-place) drops the order."""
    import copy

    layer = build_quant_linear(torch.nn.Linear(256, 32), get_preset("rtn-w4a16-g128"))
    rows = layer.qweight.clone()
    w = layer.dequantized_weight()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.tileable() and not layer.codes_tiled
    assert layer.tile_codes() and layer.codes_tiled
    assert layer.qweight.shape == rows.shape and not torch.equal(layer.qweight, rows)
    assert torch.equal(layer.packed_codes(), rows)
    assert torch.equal(layer.state_dict()["qweight"], rows)
    layer.invalidate_cache()
    torch.testing.assert_close(layer.dequantized_weight(), w, rtol=0, atol=0)
    twin = copy.deepcopy(layer)
    assert twin.codes_tiled and torch.equal(twin.packed_codes(), rows)
    layer.load_state_dict(state)
    assert not layer.codes_tiled and torch.equal(layer.qweight, rows)
    assert layer.tile_codes() and layer.tile_codes()  # idempotent: tiled once
    assert torch.equal(layer.packed_codes(), rows)
    with torch.no_grad():
        layer.qweight.copy_(rows)  # rows written in place
    assert not layer.codes_tiled and torch.equal(layer.packed_codes(), rows)
    layer.tile_codes()
    layer.qweight = rows.clone()  # a new codes tensor
    assert not layer.codes_tiled and torch.equal(layer.packed_codes(), rows)
    odd = build_quant_linear(torch.nn.Linear(256, 40), get_preset("rtn-w4a16-g128"))  # N not a multiple of 16
    before = odd.qweight.clone()
    assert not odd.tileable() and not odd.tile_codes() and torch.equal(odd.qweight, before)
