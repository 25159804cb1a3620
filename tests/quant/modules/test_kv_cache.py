from __future__ import annotations

import pytest
import torch

from quant.models.adapters import get_adapter
from quant.modules.kv_cache import (
    ATTENTION_NAME,
    KVQuantizer,
    attach_kv_quantizer,
    detach_kv_quantizer,
    head_hadamard,
    sylvester_hadamard,
)
from quant.recipes.schema import KVCacheQuantSpec
from tests.conftest import make_tiny_bert, make_tiny_llama, make_tiny_opt

BUILDERS = {"llama": make_tiny_llama, "opt": make_tiny_opt, "bert": make_tiny_bert}


def _output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_hadamard_is_orthogonal() -> None:
    for n in (1, 2, 16, 64):
        h = sylvester_hadamard(n, torch.float64)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    h = head_hadamard(16, torch.float64)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64))
    with pytest.raises(ValueError):
        sylvester_hadamard(12)


def test_quantizer_is_per_token_per_head() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 10, 16) for _ in range(3))
    kvq = KVQuantizer(bits=4, symmetric=False)
    q2, k2, v2 = kvq(q, k, v)
    assert torch.equal(q2, q)  # no rotation: queries untouched
    for t in (k2, v2):
        levels = torch.tensor([row.unique().numel() for row in t.reshape(-1, 16)])
        assert int(levels.max()) <= 16  # at most 2**4 distinct values per (token, head) row
    # quantizing one token does not depend on the others (simulates a quantized cache exactly)
    _, k_one, _ = kvq(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    torch.testing.assert_close(k_one, k2[:, :, :1], rtol=0, atol=0)
    err8 = (KVQuantizer(bits=8)(q, k, v)[1] - k).abs().max()
    err4 = (k2 - k).abs().max()
    assert 0 < err8 < err4


def test_rotation_preserves_scores_and_spreads_outliers() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    k[..., 3] *= 30.0  # an outlier channel, as real keys have
    fp = KVQuantizer(bits=16, rotate=True, head_dim=16)
    qr, kr, _ = fp(q, k, v)
    torch.testing.assert_close(qr @ kr.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-4, rtol=1e-4)
    ref = q @ k.transpose(-1, -2)
    errs = {}
    for rotate in (False, True):
        qq, kq, _ = KVQuantizer(bits=4, symmetric=False, rotate=rotate, head_dim=16)(q, k, v)
        errs[rotate] = float((qq @ kq.transpose(-1, -2) - ref).norm())
    assert errs[True] < errs[False], errs


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_rotation_only_leaves_model_unchanged(arch: str) -> None:
    fp, model = BUILDERS[arch](), BUILDERS[arch]()
    adapter = get_adapter(model)
    attach_kv_quantizer(model, adapter, KVCacheQuantSpec(bits=8), rotate=True)
    for block in adapter.iter_blocks():  # bits 16 keeps only the (exactly cancelling) rotation
        block.attention.module.kv_quantizer.bits = 16
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_output(model, ids), _output(fp, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_attach_and_detach(arch: str) -> None:
    fp, model = BUILDERS[arch](), BUILDERS[arch]()
    adapter = get_adapter(model)
    attached = attach_kv_quantizer(model, adapter, KVCacheQuantSpec(bits=4), rotate=arch != "bert")
    assert len(attached) == adapter.num_blocks
    assert model.config._attn_implementation == ATTENTION_NAME
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = _output(fp, ids), _output(model, ids)
    rel = float((out - ref).norm() / ref.norm())
    assert torch.isfinite(out).all() and 0.0 < rel < 0.5, rel
    assert detach_kv_quantizer(model) == adapter.num_blocks
    with torch.no_grad():
        torch.testing.assert_close(_output(model, ids), ref, atol=1e-5, rtol=1e-5)
    assert attach_kv_quantizer(model, adapter, KVCacheQuantSpec(bits=16), rotate=False) == {}


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_cached_decoding_matches_full_forward(arch: str) -> None:
    model = BUILDERS[arch]()
    attach_kv_quantizer(model, get_adapter(model), KVCacheQuantSpec(bits=8), rotate=True)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
        gen = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 13)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_eager_base_implementation(arch: str) -> None:
    fp, model = BUILDERS[arch](), BUILDERS[arch]()
    model.config._attn_implementation = "eager"
    attached = attach_kv_quantizer(model, get_adapter(model), KVCacheQuantSpec(bits=8), rotate=True)
    assert {q.base_impl for q in attached.values()} == {"eager"}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out8 = model(ids).logits
        for q in attached.values():
            q.bits = 16
        ref = fp(ids).logits
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=1e-4)
    assert 0.0 < float((out8 - ref).norm()) < float(ref.norm()) * 0.2
