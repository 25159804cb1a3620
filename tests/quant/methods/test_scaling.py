"""Exact channel-wise migration into norms, producer linears and (post-LN) residual biases."""

from __future__ import annotations

import pytest
import torch

from quant.methods.scaling import migrate_group, migration_target, residual_output_linear, weight_absmax
from quant.models.adapters import get_adapter
from quant.modules.norms import RMSNormWithBias
from tests.conftest import VOCAB, make_tiny_bert, make_tiny_llama, make_tiny_opt


def _out(model, ids):
    with torch.no_grad():
        o = model(input_ids=ids)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


def _sites(model) -> dict[str, tuple[str, bool, bool]]:
    adapter = get_adapter(model)
    block = adapter.block(0)
    out = {}
    for g in block.groups:
        t = migration_target(adapter, block, g)
        out[g.kind] = (t.site, t.can_scale, t.can_shift)
    return out


def test_migration_targets_per_architecture() -> None:
    assert _sites(make_tiny_llama(kv_heads=2)) == {
        "attn_in": ("norm", True, True),  # RMSNorm: shift through a norm-with-bias
        "attn_out": ("none", False, False),  # GQA: V channels are shared by several heads
        "mlp_in": ("norm", True, True),
        "mlp_out": ("producer", True, False),  # up_proj -> down_proj, scale only
    }
    assert _sites(make_tiny_llama(kv_heads=4))["attn_out"] == ("producer", True, False)
    assert _sites(make_tiny_opt()) == {
        "attn_in": ("norm", True, True),
        "attn_out": ("producer", True, False),
        "mlp_in": ("norm", True, True),
        "mlp_out": ("none", False, False),  # ReLU between fc1 and fc2
    }
    assert _sites(make_tiny_bert()) == {
        "attn_in": ("norm", False, True),  # post-LN: residual compensates shifts only
        "attn_out": ("producer", True, False),
        "mlp_in": ("norm", False, True),
        "mlp_out": ("none", False, False),
    }


@pytest.mark.parametrize(
    "factory,kinds",
    [
        (lambda: make_tiny_llama(kv_heads=4), ("attn_in", "attn_out", "mlp_in", "mlp_out")),
        (make_tiny_opt, ("attn_in", "attn_out", "mlp_in")),
        (make_tiny_bert, ("attn_in", "attn_out", "mlp_in")),
    ],
)
def test_random_migrations_leave_the_fp_model_unchanged(factory, kinds) -> None:
    model = factory()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _out(model, ids)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    for block in adapter.iter_blocks():
        for group in block.groups:
            if group.kind not in kinds:
                continue
            t = migration_target(adapter, block, group)
            c = group.in_features
            scale = torch.exp(torch.randn(c, generator=g)) if t.can_scale else None
            shift = torch.randn(c, generator=g) * 3 if t.can_shift else None
            migrate_group(model, adapter, block, group, scale, shift)
    out = _out(model, ids)
    assert float((out - ref).norm() / ref.norm()) < 1e-4
    if model.config.model_type == "llama":
        assert isinstance(model.model.layers[0].input_layernorm, RMSNormWithBias)
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_post_ln_shift_goes_to_the_residual_branch_bias() -> None:
    model = make_tiny_bert()
    adapter = get_adapter(model)
    block = adapter.block(1)
    group = block.group("attn_in")
    out_linear = residual_output_linear(block, group)
    assert out_linear is block.module.attention.output.dense
    assert residual_output_linear(block, block.group("mlp_in")) is block.module.output.dense
    before_bias = out_linear.bias.detach().clone()
    norm_weight = group.norm.weight.detach().clone()
    z = torch.linspace(-2, 2, group.in_features)
    migrate_group(model, adapter, block, group, None, z)
    torch.testing.assert_close(out_linear.bias, before_bias + z)
    torch.testing.assert_close(group.norm.weight, norm_weight)  # no scale on a post-LN norm
    with pytest.raises(ValueError, match="scale"):
        migrate_group(model, adapter, block, group, torch.ones(group.in_features), None)


def test_forbidden_sites_raise() -> None:
    model = make_tiny_llama(kv_heads=2)
    adapter = get_adapter(model)
    block = adapter.block(0)
    with pytest.raises(ValueError, match="grouped-query"):
        migrate_group(model, adapter, block, block.group("attn_out"), torch.ones(64), None)
    with pytest.raises(ValueError, match="shift"):
        migrate_group(model, adapter, block, block.group("mlp_out"), None, torch.zeros(128))


def test_weight_absmax_over_all_linears_of_the_group() -> None:
    model = make_tiny_opt()
    group = get_adapter(model).block(0).group("attn_in")
    expected = torch.stack([l.weight.abs().amax(0) for l in group.linears.values()]).amax(0)
    torch.testing.assert_close(weight_absmax(group), expected)
