"""CPU checks (run in CI): the pure-torch references of the qaas kernels agree with quant.quantizers,
the packing convention and QuantLinear.reference_forward; dispatch is inert without the extension."""

from __future__ import annotations

import pytest
import torch
from kernel_test_utils import DenseHadamard, KronTransform, make_layer, rel_err

import kernels
from kernels import dispatch, reference
from quant.quantizers.core import fake_quantize
from quant.quantizers.packing import pack_int4, unpack_int4


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


@pytest.mark.parametrize("n,block", [(64, 64), (96, 32), (48, 16), (8, 2)])
def test_hadamard_matches_dense_sylvester(n: int, block: int) -> None:
    x = torch.randn(5, n, dtype=torch.float64)
    dense = torch.block_diag(*([_sylvester(block)] * (n // block)))
    assert torch.allclose(reference.hadamard_blockdiag(x, block), x @ dense, atol=1e-12)


def test_hadamard_rejects_bad_block() -> None:
    with pytest.raises(ValueError):
        reference.hadamard_blockdiag(torch.randn(2, 48), 32)


def test_kronecker_matches_dense_kron() -> None:
    p1, p2 = torch.randn(4, 4, dtype=torch.float64), torch.randn(6, 6, dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64)
    assert torch.allclose(reference.kronecker_transform(x, p1, p2), x @ torch.kron(p1, p2), atol=1e-12)


def test_kronecker_identity_right_factor_is_left_product() -> None:
    """``p2=None`` (FlatQuant's o_proj transform, heads (x) I) is the product with the identity right factor."""
    p1 = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(3, 24, dtype=torch.float64)
    expected = reference.kronecker_transform(x, p1, torch.eye(6, dtype=torch.float64))
    assert torch.allclose(reference.kronecker_transform(x, p1, None), expected, atol=1e-12)
    with pytest.raises(ValueError):
        reference.kronecker_transform(x, torch.randn(5, 5, dtype=torch.float64), None)


def test_dispatch_leaves_out_an_identity_right_factor() -> None:
    """The deployed KroneckerTransform with an identity right factor runs as left-only Kronecker (p2 not passed),
    and the kernel path still matches the layer's reference forward."""
    from quant.transforms.kronecker import KroneckerTransform

    g = torch.Generator().manual_seed(3)
    left = torch.linalg.qr(torch.randn(8, 8, generator=g))[0] + 0.05 * torch.randn(8, 8, generator=g)
    layer = make_layer(128, 48, 8, 8, transform=KroneckerTransform(left, torch.eye(16)), clip=0.95)
    plan = dispatch.plan_for(layer)
    assert plan is not None and plan.transform.kind == "kronecker"
    assert plan.transform.p1_name and plan.transform.p2_name == ""
    x = torch.randn(5, 128, generator=g) * 2
    out = dispatch.quant_linear_forward(layer, x)
    assert rel_err(out, layer.reference_forward(x)) < 1e-2
    # a right factor that is not exactly the identity is passed
    other = make_layer(128, 48, 8, 8, transform=KroneckerTransform(left, torch.eye(16) * 1.5), clip=0.95)
    assert dispatch.plan_for(other).transform.p2_name != ""


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("mode", [0, 1, 2])
def test_act_quant_ref_agrees_with_fake_quantize(bits: int, mode: int) -> None:
    torch.manual_seed(bits + mode)
    x = torch.randn(7, 64) * 3 + 0.5
    clip = torch.tensor(0.9)
    p1, p2 = torch.randn(8, 8), torch.randn(8, 8)
    codes, scale = torch.ops.qaas.act_quant(x, bits, clip, mode, 16, p1, p2)
    assert codes.dtype == torch.uint8 and scale.shape == (7,)
    assert codes.shape == (7, 64 if bits == 8 else 32)
    u = unpack_int4(codes) if bits == 4 else codes
    assert int(u.min()) >= 1 and int(u.max()) <= 2**bits - 1  # symmetric: the most negative code unused
    xt = reference.apply_transform(x, mode, 16, p1, p2)
    deq = (u.float() - 2 ** (bits - 1)) * scale[:, None]
    assert torch.allclose(deq, fake_quantize(xt, bits, True, clip), atol=1e-5, rtol=1e-5)


def test_act_quant_ops_take_staged_fragments_and_the_reference_ignores_them() -> None:
    """``frags`` (the CUDA kernel's staged factors) changes nothing in the result: the references ignore it, and
    off the extension the dispatcher builds none."""
    torch.manual_seed(3)
    x, clip, p1, p2 = torch.randn(5, 64), torch.tensor(0.9), torch.randn(8, 8), torch.randn(8, 8)
    junk = torch.zeros(256, dtype=torch.int16)
    for a, b in zip(torch.ops.qaas.act_quant(x, 8, clip, 2, 0, p1, p2, junk), torch.ops.qaas.act_quant(x, 8, clip, 2, 0, p1, p2)):
        assert torch.equal(a, b)
    for a, b in zip(torch.ops.qaas.act_quant_s8(x, clip, 2, 0, p1, p2, junk), torch.ops.qaas.act_quant_s8(x, clip, 2, 0, p1, p2)):
        assert torch.equal(a, b)
    layer = make_layer(128, 48, 8, 8, transform=KronTransform(8, 16), clip=0.95)
    dispatch.quant_linear_forward(layer, torch.randn(3, 128))
    assert "act_frags" not in layer.__dict__[dispatch._CACHE_ATTR]


@pytest.mark.parametrize("a_bits,w_bits", [(8, 8), (8, 4), (4, 4)])
def test_int8_gemm_ref_matches_float_math(a_bits: int, w_bits: int) -> None:
    torch.manual_seed(0)
    m, n, k = 5, 12, 64
    ua = torch.randint(1, 2**a_bits, (m, k), dtype=torch.uint8)
    uw = torch.randint(1, 2**w_bits, (n, k), dtype=torch.uint8)
    pack = lambda u, b: pack_int4(u) if b == 4 else u  # noqa: E731
    sa, sw, bias = torch.rand(m) + 0.1, torch.rand(n) + 0.1, torch.randn(n).half()
    out = torch.ops.qaas.int8_gemm(pack(ua, a_bits), a_bits, sa, pack(uw, w_bits), w_bits, sw, bias)
    qa = ua.double() - 2 ** (a_bits - 1)
    qw = uw.double() - 2 ** (w_bits - 1)
    expect = (qa * sa.double()[:, None]) @ (qw * sw.double()[:, None]).t() + bias.double()
    assert out.dtype == torch.float16 and rel_err(out, expect) < 1e-3


def test_pack_w4_meta_roundtrip_and_layout() -> None:
    gen = torch.Generator().manual_seed(3)
    n, g = 37, 6  # N not a multiple of 16: the last tile is padded
    scale = torch.rand(n, g, generator=gen) * 0.05 + 1e-4
    zero = torch.randint(0, 16, (n, g), generator=gen).float()
    meta = reference.pack_w4_meta(scale, zero)
    assert meta.dtype == torch.int32 and meta.shape == (3, g, 8, 2)
    s2, z2 = reference.unpack_w4_meta(meta, n)
    assert torch.equal(z2, zero)
    assert ((s2 - scale).abs() / scale).max() <= 2.0**-20
    # word [tile, group, gg, h] belongs to row 16 * tile + gg + 8 * h
    row, grp = 16 * 1 + 5 + 8, 4
    word = int(meta[1, grp, 5, 1])
    assert word & 0xF == int(zero[row, grp])
    assert meta[2, :, 5:, :].eq(0).all()  # rows 37.. of the padded tile


def test_pack_w4_tiled_roundtrip_and_layout() -> None:
    gen = torch.Generator().manual_seed(4)
    n, k = 37, 256  # the last tile padded with zero rows
    qweight = torch.randint(1, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    tiled = reference.pack_w4_tiled(qweight)
    assert tiled.dtype == torch.uint8 and tiled.shape == (48, k // 2)
    assert torch.equal(reference.unpack_w4_tiled(tiled, n), qweight)
    units = tiled.reshape(-1, 16)
    # unit ((tile * KB + kb) * 2 + h) * 32 + 4 g + t: row 16 tile + 8 h + g, bytes 64 kb + 16 t ..
    tile, kb, h, g, t = 1, 1, 1, 5, 3
    unit = ((tile * (k // 128) + kb) * 2 + h) * 32 + 4 * g + t
    assert torch.equal(units[unit], qweight[16 * tile + 8 * h + g, 64 * kb + 16 * t: 64 * kb + 16 * t + 16])
    padded = tiled.reshape(3, k // 128, 2, 8, 4, 16)[2, :, :, :, :, :].reshape(k // 128, 16, 4, 16)
    assert padded[:, 5:].eq(0).all() and padded[:, :5].ne(0).all()  # rows 37..47 zero, 32..36 kept
    with pytest.raises(ValueError):
        reference.pack_w4_tiled(qweight[:, :100])


@pytest.mark.parametrize(
    "zero,ok",
    [(torch.tensor([[0.0, 15.0]]), True), (torch.tensor([[16.0, 1.0]]), False), (torch.tensor([[-1.0, 1.0]]), False),
     (torch.tensor([[0.5, 1.0]]), False)],
)
def test_w4_meta_packable(zero: torch.Tensor, ok: bool) -> None:
    scale = torch.tensor([[0.01, 0.02]])
    assert reference.w4_meta_packable(scale, zero) is ok
    if not ok:
        with pytest.raises(ValueError, match="zero points"):
            reference.pack_w4_meta(scale, zero)


def test_w4a16_packed_op_matches_reference() -> None:
    layer = make_layer(256, 40, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    meta = reference.pack_w4_meta(layer.w_scale, layer.w_zero)
    x = torch.randn(3, 256).half()
    out = torch.ops.qaas.w4a16_gemm_packed(x, layer.qweight, meta, 128, layer.bias.half())
    ref = torch.ops.qaas.w4a16_gemm(x, layer.qweight, layer.w_scale, layer.w_zero, 128, layer.bias.half())
    assert out.dtype == torch.float16 and rel_err(out, ref.float()) < 1e-3


def test_dispatch_uses_packed_meta_for_w4a16() -> None:
    """The W4A16 decode path builds the packed words once per layer and rebuilds them when the scales change."""
    layer = make_layer(256, 40, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    meta, stable = dispatch._packed_w4_meta(layer)
    assert meta is not None and not stable  # first call: built now, so no programmatic dependent launch
    again, stable = dispatch._packed_w4_meta(layer)
    assert again is meta and stable
    with torch.no_grad():
        layer.w_scale.mul_(2.0)
    meta2, stable = dispatch._packed_w4_meta(layer)
    assert meta2 is not meta and not stable
    with torch.no_grad():
        layer.qweight.add_(0)  # an in-place edit of the codes: not stable for the next call either
    assert dispatch._packed_w4_meta(layer) == (meta2, False)
    s2, _ = reference.unpack_w4_meta(meta2, 40)
    assert torch.allclose(s2, layer.w_scale.float(), rtol=2.0**-19)
    x = torch.randn(2, 256).half()
    out = dispatch.quant_linear_forward(layer, x)
    ref = layer.reference_forward(x.float())
    assert rel_err(out, ref) < 3e-3
    small_group = make_layer(256, 40, w_bits=4, a_bits=16, group_size=32, w_symmetric=False)
    assert dispatch._packed_w4_meta(small_group) == (None, False)  # groups of 32: the float32 kernel


def test_dispatch_tiles_w4a16_codes_at_decode() -> None:
    """The first decode or batched call (<= W4A16_BATCHED_MAX_TOKENS tokens) puts a tileable layer's codes into the
    tiled order (the tiled op then runs); later decode and prefill calls (rows read back through packed_codes) and the state dict stay equal to the reference."""
    layer = make_layer(256, 48, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    rows = layer.qweight.clone()
    for tokens in (2, 1, dispatch.GEMV_MAX_TOKENS + 8, 3):
        x = torch.randn(tokens, 256).half()
        out = dispatch.quant_linear_forward(layer, x)
        assert layer.codes_tiled and rel_err(out, layer.reference_forward(x.float())) < 3e-3
    assert torch.equal(layer.state_dict()["qweight"], rows)
    prefill_first = make_layer(256, 48, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    dispatch.quant_linear_forward(prefill_first, torch.randn(dispatch.W4A16_BATCHED_MAX_TOKENS + 1, 256).half())
    assert not prefill_first.codes_tiled  # a long prefill alone leaves the rows (dequantisation + cuBLAS)
    batched_first = make_layer(256, 48, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    x = torch.randn(dispatch.GEMV_MAX_TOKENS + 1, 256).half()
    out = dispatch.quant_linear_forward(batched_first, x)  # the batched GEMM reads the tiled order too
    assert batched_first.codes_tiled and rel_err(out, batched_first.reference_forward(x.float())) < 3e-3
    small_group = make_layer(256, 48, w_bits=4, a_bits=16, group_size=32, w_symmetric=False)
    dispatch.quant_linear_forward(small_group, torch.randn(1, 256).half())
    assert not small_group.codes_tiled  # groups of 32: the float32-metadata kernel reads rows


def test_dequant_and_w4a16_ref_match_quantized_weight() -> None:
    layer = make_layer(128, 24, w_bits=4, a_bits=16, group_size=32, w_symmetric=False)
    w = layer.dequantized_weight(torch.float32)
    deq = torch.ops.qaas.dequant_w4(layer.qweight, layer.w_scale, layer.w_zero, 32)
    assert torch.allclose(deq.float(), w, atol=1e-3, rtol=1e-3)
    x = torch.randn(3, 128)
    out = torch.ops.qaas.w4a16_gemm(x, layer.qweight, layer.w_scale, layer.w_zero, 32, layer.bias.half())
    assert rel_err(out, x @ w.t() + layer.bias) < 1e-3


def test_w4a16_sm90_operands_and_reference() -> None:
    """The Hopper W4A16 GEMM's operands: fp16 scale and zero term [G, N] from the layer's per-group scale / zero point,
    a code equal to its zero point dequantising to exactly 0, and its reference within the fp16 rounding of the scale
    of the exact W4A16 reference."""
    layer = make_layer(256, 48, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    s16, z16 = reference.w4a16_sm90_operands(layer.w_scale, layer.w_zero)
    assert s16.shape == z16.shape == (2, 48) and s16.dtype == z16.dtype == torch.float16
    assert s16.is_contiguous() and z16.is_contiguous()
    zero_codes = layer.w_zero.t().float()  # (u = z) * scale + zero term == 0 exactly, in fp16 arithmetic
    assert torch.equal((zero_codes.half() * s16 + z16).float(), torch.zeros_like(zero_codes))
    x = torch.randn(5, 256).half()
    bias = layer.bias.half()
    exact = reference.w4a16_gemm_ref(x.double(), layer.qweight, layer.w_scale, layer.w_zero, 128, bias)
    ref = reference.w4a16_gemm_sm90_ref(x.double(), layer.qweight, s16, z16, 128, bias)
    assert ref.shape == (5, 48) and 0 < rel_err(ref, exact) < 2e-3


def test_w4_sm90_layout_and_ops() -> None:
    """The Hopper W4A16 GEMM's code layout: a permutation of the nibbles, a position worked out by hand (row 9,
    col 3: lane 4 * 1 + 1, fragment value 1 + 2 = 3 at position 4 * 1 + 1), atoms of 16 x 16 rows-first; the reorder op
    round-trips and the GEMM op's reference equals w4a16_gemm_sm90_ref over the row-order codes."""
    n, k = 48, 256
    off = reference.w4_sm90_nibble_offsets(n, k)
    assert torch.equal(off.flatten().sort().values, torch.arange(n * k))
    assert int(off[9, 3]) == 8 * 5 + 5
    assert int(off[16, 0]) == 256 and int(off[0, 16]) == 256 * (n // 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        reference.w4_sm90_nibble_offsets(40, 256)
    with pytest.raises(ValueError, match="K of 64"):  # the CUDA reorder's limit, kept by the reference
        reference.pack_w4_sm90(torch.zeros(48, 40, dtype=torch.uint8))
    layer = make_layer(k, n, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    codes = torch.ops.qaas.w4a16_sm90_reorder(layer.qweight)
    assert codes.shape == layer.qweight.shape and not torch.equal(codes, layer.qweight)
    assert torch.equal(reference.unpack_w4_sm90(codes), layer.qweight)
    s16, z16 = reference.w4a16_sm90_operands(layer.w_scale, layer.w_zero)
    x = torch.randn(7, k)
    out = torch.ops.qaas.w4a16_gemm_sm90(x, codes, s16, z16, 128, None)
    assert torch.equal(out, reference.w4a16_gemm_sm90_ref(x, layer.qweight, s16, z16, 128, None))


@pytest.mark.parametrize(
    "w_bits,a_bits,group,sym,transform",
    [
        (4, 16, 32, False, None),  # W4A16, asymmetric per-group
        (8, 8, None, True, None),  # W8A8 per-channel
        (4, 8, None, True, "hadamard"),
        (4, 4, None, True, "hadamard"),
        (4, 4, None, True, "kronecker"),
    ],
)
@pytest.mark.parametrize("tokens", [3, 20])
def test_dispatch_pipeline_matches_reference_forward(w_bits, a_bits, group, sym, transform, tokens) -> None:
    t = {None: None, "hadamard": DenseHadamard(128, 64), "kronecker": KronTransform(8, 16)}[transform]
    layer = make_layer(128, 48, w_bits, a_bits, group_size=group, w_symmetric=sym, transform=t, clip=0.95)
    plan = dispatch.plan_for(layer)
    assert plan is not None
    expected_kind = {None: "none", "hadamard": "hadamard", "kronecker": "kronecker"}[transform]
    assert plan.transform.kind == expected_kind
    if transform == "hadamard":
        assert plan.transform.hadamard_block == 64
    x = torch.randn(tokens, 128) * 2
    out = dispatch.quant_linear_forward(layer, x)  # runs the qaas ops' CPU references
    ref = layer.reference_forward(x)
    assert out.shape == ref.shape
    # fp16 output rounding; with quantized activations rare rounding-boundary flips of one code
    assert rel_err(out, ref) < (2e-3 if a_bits == 16 or transform is None else 1e-2)


def test_unsupported_layers_have_no_plan() -> None:
    assert dispatch.plan_for(make_layer(64, 16, 4, 4, group_size=32)) is None  # group-wise weights, int path
    assert dispatch.plan_for(make_layer(64, 16, 8, 8, w_symmetric=False)) is None  # asymmetric weights
    assert dispatch.plan_for(make_layer(64, 16, 6, 8)) is None  # 6-bit
    fp = make_layer(64, 16, 8, 8)
    fp.act_symmetric = False
    fp.__dict__.pop("_qaas_kernel_plan", None)
    assert dispatch.plan_for(fp) is None


def test_unknown_transform_runs_in_torch() -> None:
    class Scale(DenseHadamard):
        def forward(self, x):  # not Hadamard, not Kronecker
            return x * 1.5

    plan = dispatch.plan_for(make_layer(64, 16, 8, 8, transform=Scale(64, 64)))
    assert plan is not None and plan.transform.kind == "torch"


@pytest.mark.cpu_only
def test_cpu_only_import_and_supports_false() -> None:
    assert not kernels.available() and kernels.unavailable_reason()
    layer = make_layer(64, 16, 8, 8)
    assert dispatch.supports(layer, torch.randn(2, 64)) is False
    out = layer(torch.randn(2, 64))  # QuantLinear.forward falls back to the reference
    assert out.shape == (2, 16)


def test_dequant_w4_tiled_op_matches_rows() -> None:
    layer = make_layer(256, 32, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    rows = torch.ops.qaas.dequant_w4(layer.qweight, layer.w_scale, layer.w_zero, 128)
    tiled = torch.ops.qaas.dequant_w4_tiled(reference.pack_w4_tiled(layer.qweight), layer.w_scale, layer.w_zero, 128)
    assert torch.equal(tiled, rows)


def test_tiled_decode_variant_choice() -> None:
    """At most 8 tokens, by 16-row tiles per SM (t): three blocks per SM at 2 < t <= 3 (plain or PDL); with PDL at 1
    token the persistent folded kernel at t > 3 outside 6 < t <= 7 where its staged activations fit in its shared
    memory; else at t > 4.5 4-warp blocks; else the default; odd variants the PDL twins."""
    sms = 132
    choose = dispatch.tiled_decode_variant
    assert choose(11008, 4096, 1, sms, False) == dispatch.TILED_SMALL_BLOCKS  # 688 tiles: 5.2 per SM
    assert choose(11008, 4096, 8, sms, False) == dispatch.TILED_SMALL_BLOCKS
    assert choose(11008, 4096, 1, sms, True) == dispatch.TILED_FOLDED_PDL
    assert choose(11008, 4096, 3, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1  # fits, but 1 token only
    assert choose(11008, 4096, 4, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert choose(8448, 4096, 2, sms, True) == dispatch.TILED_DEFAULT + 1  # t = 4 at 2 tokens: the default
    # 1 token: the folded kernel but in 6 < t <= 7 (LLaMA-13B gate/up: 864 tiles, 6.5 per SM; t = 6 exactly: folded)
    assert choose(13824, 5120, 1, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert choose(14336, 4096, 1, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert choose(16 * 6 * sms, 4096, 1, sms, True) == dispatch.TILED_FOLDED_PDL
    assert choose(16 * 7 * sms, 4096, 1, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert choose(16 * 7 * sms + 16, 4096, 1, sms, True) == dispatch.TILED_FOLDED_PDL
    assert choose(28672, 8192, 1, sms, True) == dispatch.TILED_FOLDED_PDL  # t = 13.6: past one wave of small blocks
    assert choose(11008, 11008, 1, sms, True) == dispatch.TILED_FOLDED_PDL  # 21.5 KB + 5.4 KB
    assert choose(11008, 11008, 2, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert choose(14336, 16384, 1, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1  # 32 KB: the folded kernel does not fit
    half = 16 * 9 * sms // 2  # t = 4.5 exactly: the default; one tile more: the small blocks
    assert choose(half, 4096, 1, sms, False) == dispatch.TILED_DEFAULT
    assert choose(half, 4096, 4, sms, True) == dispatch.TILED_DEFAULT + 1
    assert choose(half + 16, 4096, 1, sms, False) == dispatch.TILED_SMALL_BLOCKS
    assert choose(half + 16, 4096, 4, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert choose(11008, 4096, 9, sms, False) == dispatch.TILED_DEFAULT  # two token groups
    assert choose(11008, 4096, 9, sms, True) == dispatch.TILED_DEFAULT + 1
    assert choose(4096, 4096, 1, sms, True) == dispatch.TILED_DEFAULT + 1  # 256 tiles: 1.9 per SM
    assert choose(4096, 11008, 1, sms, True) == dispatch.TILED_DEFAULT + 1  # LLaMA-7B down_proj
    # 2 < t <= 3: one wave of three blocks per SM (LLaMA-13B q/k/v/o and down_proj: 320 tiles, 2.4 per SM)
    for k in (5120, 13824):
        assert choose(5120, k, 1, sms, False) == dispatch.TILED_THREE_PER_SM
        assert choose(5120, k, 8, sms, True) == dispatch.TILED_THREE_PER_SM + 1
        assert choose(5120, k, 9, sms, True) == dispatch.TILED_DEFAULT + 1
    two, three = 16 * 2 * sms, 16 * 3 * sms
    assert choose(two, 4096, 1, sms, True) == dispatch.TILED_DEFAULT + 1  # t = 2: one wave of the default
    assert choose(two + 16, 4096, 1, sms, True) == dispatch.TILED_THREE_PER_SM + 1
    assert choose(three, 4096, 1, sms, False) == dispatch.TILED_THREE_PER_SM
    assert choose(three + 16, 4096, 1, sms, True) == dispatch.TILED_FOLDED_PDL  # t > 3
    assert choose(three + 16, 4096, 1, sms, False) == dispatch.TILED_DEFAULT
    assert choose(three + 16, 14336, 1, sms, True) == dispatch.TILED_DEFAULT + 1  # the folded kernel does not fit


def test_folded_decode_fits_the_kernels_shared_memory() -> None:
    """The dispatcher's copy of the folded kernel's shared-memory rule (w4a16_folded.cu folded_smem_bytes <=
    kFoldSmemMax): tokens x K fp16 fragments plus 64 bytes per 128-k block within 48 KB less two 8 KB reduction
    buffers, one to eight tokens."""
    assert dispatch.FOLDED_SMEM_BYTES == 32 * 1024
    assert dispatch.folded_decode_fits(3, 4096) and not dispatch.folded_decode_fits(4, 4096)
    assert dispatch.folded_decode_fits(1, 12288)  # 24 KB + 6 KB
    assert not dispatch.folded_decode_fits(1, 14336)  # 28 KB + 7 KB: a LLaMA-3-8B down_proj runs the tiled kernel
    assert not dispatch.folded_decode_fits(0, 128) and not dispatch.folded_decode_fits(9, 128)
    assert dispatch.folded_decode_fits(8, 1024)  # 16 KB + 512 B


def test_dispatch_w4a16_with_inference_tensors() -> None:
    """A layer built under torch.inference_mode (inference tensors track no version counter) runs the W4A16 path and
    tiles its codes there; outside inference mode its codes stay rows (they cannot be written there)."""
    x = torch.randn(1, 256).half()
    with torch.inference_mode():
        layer = make_layer(256, 48, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
        rows = layer.qweight.clone()
        out = dispatch.quant_linear_forward(layer, x)
        assert layer.codes_tiled and torch.equal(layer.packed_codes(), rows)
        assert rel_err(out, layer.reference_forward(x.float())) < 3e-3
        again = dispatch.quant_linear_forward(layer, x)
        assert torch.equal(again, out)
        other = make_layer(256, 48, w_bits=4, a_bits=16, group_size=128, w_symmetric=False)
    out = dispatch.quant_linear_forward(other, x)
    assert not other.codes_tiled and rel_err(out, other.reference_forward(x.float())) < 3e-3
