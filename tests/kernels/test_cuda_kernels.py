"""GPU checks: each CUDA kernel against its reference on fresh random inputs (outputs poisoned first).

Collected only where CUDA is (marker ``gpu``, tests/conftest.py); on a CUDA machine a missing build fails (run ``python -m kernels.build``).
Error bounds (METHOD.md): ||out - ref|| / ||ref|| against float64 references; fp16 outputs land near 5e-4.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from kernel_test_utils import DenseHadamard, KronTransform, make_layer, rel_err
from kernel_test_utils import poison_cuda as _poison
from kernel_test_utils import rand_codes as _rand_codes
from kernel_test_utils import w4a16_case as _w4a16_case

import kernels
from kernels import dispatch, reference
from quant.quantizers.packing import unpack_int4

pytestmark = pytest.mark.gpu  # collected only where CUDA is (tests/conftest.py)
DEV = "cuda"


@pytest.fixture(autouse=True)
def _extension_built() -> None:
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.ops.CUDA_KERNELS_REGISTERED


def _graph_replayed(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` captured in a CUDA graph and replayed once: its output as the replay left it."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out


# act_quant / act_quant_s8 cases: (mode, k, hb, n1). The tensor-core kernel takes fp16 Hadamard blocks of
# 256..16384 and Kronecker factors that are multiples of 16 up to 128; the scalar kernel everything else.
ACT_TC_CASES = [
    (1, 4096, 4096, 0),  # Hadamard 4096 = H_64 (x) H_64, one chunk per row
    (1, 11008, 256, 0),  # Hadamard 256 = H_16 (x) H_16, 43 chunks per row (43 units over 8 warps)
    (2, 4096, 0, 64),  # Kronecker 64 x 64
    (2, 4096, 0, 128),  # Kronecker 128 x 32 (rectangular, n1 > n2)
    (2, 11008, 0, 86),  # Kronecker 86 x 128: n1 padded to 96 (a shared zero row), 8 units per token
    (2, 2560, 0, 20),  # Kronecker 20 x 128: n1 padded to 32
    # left-only Kronecker (identity right factor passed as p2=None: FlatQuant's o_proj transform, heads (x) I):
    (3, 4096, 0, 32),  # 32 heads x 128: the left-only kernel, step 2 only
    (3, 4096, 0, 64),  # 64 x 64
    (3, 11008, 0, 86),  # n1 padded to 96
    (3, 2560, 0, 20),  # n1 padded to 32
    (3, 4096, 0, 128),  # n1 128: no narrow variant, so the general kernel with an explicit identity
]
# no transform: the vectorised kernel (fp16 / bf16, K % 8 == 0, K <= 16384; 1..16 16-byte vectors per thread,
# the last one partly used) or, past those limits, the scalar kernel; identical codes either way
ACT_NONE_CASES = [(0, 4096, 0, 0), (0, 11008, 0, 0), (0, 1000, 0, 0), (0, 16384, 0, 0), (0, 1004, 0, 0), (0, 16392, 0, 0)]
ACT_SCALAR_CASES = [
    (1, 4096, 128, 0),  # Hadamard block < 256: butterflies
    (2, 1024, 0, 8),  # Kronecker 8 x 128: n1 < 16, scalar kernel
]
# Tolerances against the float64 reference. The tensor-core transform's default precision (FAST: fp16 P and T,
# one product, reciprocal-scale quantization; FlatQuant's own kernel precision) moves ~1% of int8 codes by one
# step and the scale by ~1e-4; the compensated mode (QAAS_ACT_QUANT_FAST=0) and the scalar kernel are
# float32-accurate.
TC_MAX_FLIPS, TC_SCALE_TOL = 5e-2, 1e-3
PRECISE_MAX_FLIPS, PRECISE_SCALE_TOL = 1e-2, 1e-5
# M: 1 token; 37 (one token per block); 300 (several tokens per round); 1501 (several rounds per block on
# 132 SMs, double-buffered loads, and a ragged last round of one token where rounds hold 2 or 4 tokens)
ACT_TOKENS = [1, 37, 300, 1501]


LEFT = 3  # case tag: Kronecker with an identity right factor, passed as p2=None (the op's mode 2)


def _op_mode(mode: int) -> int:
    return reference.MODE_KRONECKER if mode == LEFT else mode


def _act_inputs(mode: int, k: int, n1: int, m: int, seed: int, dtype: torch.dtype = torch.float16):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 2 + 0.1).to(dtype)
    clip = torch.tensor(0.9)
    p1 = p2 = None
    if mode in (2, LEFT):
        n2 = k // n1
        p1 = torch.randn(n1, n1, generator=gen) / n1**0.5 + torch.eye(n1)
        if mode == 2:
            p2 = torch.randn(n2, n2, generator=gen) / n2**0.5 + torch.eye(n2)
    return x, clip, p1, p2


def _dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEV)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "mode,k,hb,n1,m",
    [c + (m,) for c in ACT_TC_CASES for m in ACT_TOKENS] + [c + (37,) for c in ACT_SCALAR_CASES]
    + [c + (m,) for c in ACT_NONE_CASES for m in (1, 300)],
)
def test_act_quant(bits: int, mode: int, k: int, hb: int, n1: int, m: int) -> None:
    x, clip, p1, p2 = _act_inputs(mode, k, n1, m, seed=k + mode + bits + m)
    codes_ref, scale_ref = reference.act_quant_ref(x.double(), bits, clip, _op_mode(mode), hb, p1, p2)
    _poison(m * k)
    codes, scale = torch.ops.qaas.act_quant(x.to(DEV), bits, clip.to(DEV), _op_mode(mode), hb, _dev(p1), _dev(p2))
    torch.cuda.synchronize()
    assert codes.shape == (m, k if bits == 8 else k // 2) and codes.dtype == torch.uint8 and scale.shape == (m,)
    codes, scale = codes.cpu(), scale.cpu()
    tc = (mode, k, hb, n1) in ACT_TC_CASES
    max_flips, scale_tol = (TC_MAX_FLIPS, TC_SCALE_TOL) if tc else (PRECISE_MAX_FLIPS, PRECISE_SCALE_TOL)
    assert torch.isfinite(scale).all() and rel_err(scale, scale_ref) < scale_tol
    u, u_ref = (unpack_int4(codes), unpack_int4(codes_ref)) if bits == 4 else (codes, codes_ref)
    assert int(u.min()) >= 1 and int(u.max()) <= 2**bits - 1  # symmetric: code 0 unused
    diff = (u.int() - u_ref.int()).abs()
    if mode == 0:
        assert int(diff.max()) == 0  # same float32 division and round-half-even: identical codes
    else:  # transformed values differ from the float64 reference by rounding: boundary flips of one step
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < max_flips
    deq = (u.double() - 2 ** (bits - 1)) * scale.double()[:, None]
    deq_ref = (u_ref.double() - 2 ** (bits - 1)) * scale_ref.double()[:, None]
    # an int4 flip moves a value by 1/7 of the token's range: with the fp16-operand default's ~1% flips the
    # dequantized tensors differ by ~1.0-1.5% (H100 run v6d), a tenth of int4's own rounding error (~10%)
    assert rel_err(deq, deq_ref) < (3e-2 if tc and bits == 4 else 1e-2)


def _check_s8(q, s, c, q_ref, s_ref, c_ref, exact: bool, max_flips: float, scale_tol: float) -> None:
    m, k = q_ref.shape
    assert q.dtype == torch.int8 and q.shape == (m, k)
    assert s.dtype == torch.float32 and s.shape == (m,) and c.dtype == torch.int32 and c.shape == (m,)
    q, s, c = q.cpu(), s.cpu(), c.cpu()
    assert torch.isfinite(s).all() and rel_err(s, s_ref) < scale_tol
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    # a_corr is exactly 128 * the row sum of the codes returned (int32, no rounding anywhere)
    assert torch.equal(c.long(), 128 * q.long().sum(dim=1))
    diff = (q.int() - q_ref.int()).abs()
    if exact:
        assert int(diff.max()) == 0 and torch.equal(c, c_ref)
    else:
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < max_flips
        # and it differs from the reference's only by the code flips of its row
        assert bool(((c.long() - c_ref.long()).abs() <= 128 * (diff > 0).sum(dim=1)).all())


@pytest.mark.parametrize(
    "mode,k,hb,n1,m,dtype",
    [c + (m, torch.float16) for c in ACT_TC_CASES for m in ACT_TOKENS]
    + [c + (37, torch.float16) for c in ACT_SCALAR_CASES]
    + [c + (m, dt) for c in ACT_NONE_CASES for m in (1, 300) for dt in (torch.float16, torch.bfloat16)]
    + [(0, 4096, 0, 0, 37, torch.float32)]  # no transform, fp32: scalar kernel
    + [(2, 4096, 0, 64, 37, torch.bfloat16), (1, 4096, 4096, 0, 37, torch.float32)]  # scalar kernel: bf16/fp32
    + [(LEFT, 4096, 0, 32, 37, torch.bfloat16)],  # left-only, bf16: scalar kernel with an explicit identity
)
def test_act_quant_s8(mode: int, k: int, hb: int, n1: int, m: int, dtype: torch.dtype) -> None:
    x, clip, p1, p2 = _act_inputs(mode, k, n1, m, seed=3 * k + mode + m, dtype=dtype)
    q_ref, s_ref, c_ref = reference.act_quant_s8_ref(x.double(), clip, _op_mode(mode), hb, p1, p2)
    _poison(m * k)
    q, s, c = torch.ops.qaas.act_quant_s8(x.to(DEV), clip.to(DEV), _op_mode(mode), hb, _dev(p1), _dev(p2))
    torch.cuda.synchronize()
    tc = (mode, k, hb, n1) in ACT_TC_CASES and dtype == torch.float16
    max_flips, scale_tol = (TC_MAX_FLIPS, TC_SCALE_TOL) if tc else (PRECISE_MAX_FLIPS, PRECISE_SCALE_TOL)
    _check_s8(q, s, c, q_ref, s_ref, c_ref, exact=mode == 0, max_flips=max_flips, scale_tol=scale_tol)


@pytest.mark.parametrize("mode,k,hb,n1", ACT_TC_CASES)
@pytest.mark.parametrize("m", [1, 1501])
def test_act_quant_staged_fragments_give_identical_codes(mode: int, k: int, hb: int, n1: int, m: int) -> None:
    """The factors staged once (act_quant_fragments, what the dispatcher passes as ``frags``) and copied by every
    block give the same codes, scales and row sums as the in-kernel staging, bit for bit, for every output form."""
    x, clip, p1, p2 = _act_inputs(mode, k, n1, m, seed=11 * k + mode + m)
    x, clip, p1, p2 = x.to(DEV), clip.to(DEV), _dev(p1), _dev(p2)
    ext = kernels._ext.extension()
    frags = ext.act_quant_fragments(x, _op_mode(mode), hb, p1, p2)
    n2 = k // n1 if n1 else 0
    assert frags.dtype == torch.int16 and frags.numel() > 0 and frags.numel() % 256 == 0
    if mode == 2:  # P2 (n2 x n2) and P1 (n1 padded to a multiple of 16) as fp16 fragments (the FAST default)
        assert frags.numel() == n2 * n2 + (-(-n1 // 16) * 16) ** 2
    for bits in (8, 4):
        want = torch.ops.qaas.act_quant(x, bits, clip, _op_mode(mode), hb, p1, p2)
        _poison(m * k)
        got = torch.ops.qaas.act_quant(x, bits, clip, _op_mode(mode), hb, p1, p2, frags)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), bits
    want = ext.act_quant_s8(x, clip, _op_mode(mode), hb, p1, p2)
    _poison(m * k)
    got = ext.act_quant_s8(x, clip, _op_mode(mode), hb, p1, p2, frags)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_act_quant_fragments_only_where_the_tensor_core_kernel_runs() -> None:
    ext = kernels._ext.extension()
    x = torch.randn(4, 4096, device=DEV).half()
    assert ext.act_quant_fragments(x, 0, 0, None, None).numel() == 0  # no transform
    assert ext.act_quant_fragments(x.bfloat16(), 1, 4096, None, None).numel() == 0  # bf16: scalar kernel
    p8 = torch.eye(8, device=DEV)
    assert ext.act_quant_fragments(x[:, :1024].contiguous(), 2, 0, p8, torch.eye(128, device=DEV)).numel() == 0  # n1 < 16
    assert ext.act_quant_fragments(x, 1, 4096, None, None).numel() == 2 * 64 * 64  # Hadamard 4096 = H_64 (x) H_64


def test_act_quant_rejects_fragments_of_another_transform() -> None:
    ext = kernels._ext.extension()
    x = torch.randn(4, 4096, device=DEV).half()
    clip = torch.tensor(0.9, device=DEV)
    p64 = torch.eye(64, device=DEV)
    other = ext.act_quant_fragments(x, 1, 4096, None, None)  # Hadamard 64 (x) 64: 8192 words
    heads = ext.act_quant_fragments(x, 2, 0, torch.eye(32, device=DEV), None)  # left-only 32 heads: 1024 words
    with pytest.raises(RuntimeError, match="frags must be act_quant_fragments"):
        ext.act_quant_s8(x, clip, 2, 0, p64, p64, heads)
    with pytest.raises(RuntimeError, match="frags must be act_quant_fragments"):
        ext.act_quant_s8(x, clip, 2, 0, p64, p64, other.float())  # wrong dtype


def test_dispatch_rebuilds_staged_fragments_when_the_transform_changes() -> None:
    """The dispatcher's cached ``frags`` follow the layer's transform: replaced or edited in place, the factors are
    staged again (a stale copy would quantize with the old transform)."""
    k = 1024
    t = KronTransform(32, 32)
    layer = make_layer(k, 768, 8, 8, transform=t, clip=0.95).to(DEV).half()
    x = torch.randn(1, 200, k, device=DEV, dtype=torch.float16)
    out0 = layer(x)
    cache = layer.__dict__[dispatch._CACHE_ATTR]
    frags0 = cache["act_frags"][1]
    assert frags0 is not None and frags0.numel() == 2 * 32 * 32
    assert layer(x) is not None and cache["act_frags"][1] is frags0  # reused while nothing changed
    with torch.no_grad():
        t.left.mul_(1.5)  # in place: the float32 copy the dispatcher derives is rebuilt, then the fragments
    out1 = layer(x)
    assert cache["act_frags"][1] is not frags0
    ref1 = layer.reference_forward(x.float())
    assert rel_err(out1, ref1) < 2e-2 and rel_err(out1, out0) > 1e-2


_ENV_VARIANT_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests/kernels")
import kernels
from kernels import reference
from quant.quantizers.packing import unpack_int4
from test_cuda_kernels import ACT_TC_CASES, _act_inputs, _check_s8, _dev, _op_mode, _poison
from kernel_test_utils import rel_err
max_flips, scale_tol = float(sys.argv[1]), float(sys.argv[2])
assert kernels.available() and kernels.ops.CUDA_KERNELS_REGISTERED
for mode, k, hb, n1 in ACT_TC_CASES:
    for m in (1, 1501):
        x, clip, p1, p2 = _act_inputs(mode, k, n1, m, seed=7 * k + mode + m)
        for bits in (8, 4):
            codes_ref, scale_ref = reference.act_quant_ref(x.double(), bits, clip, _op_mode(mode), hb, p1, p2)
            _poison(m * k)
            codes, scale = torch.ops.qaas.act_quant(x.cuda(), bits, clip.cuda(), _op_mode(mode), hb, _dev(p1), _dev(p2))
            codes, scale = codes.cpu(), scale.cpu()
            assert torch.isfinite(scale).all() and rel_err(scale, scale_ref) < scale_tol, (mode, k, m, bits)
            u, u_ref = (unpack_int4(codes), unpack_int4(codes_ref)) if bits == 4 else (codes, codes_ref)
            diff = (u.int() - u_ref.int()).abs()
            flips = float((diff > 0).float().mean())
            assert int(diff.max()) <= 1 and flips < max_flips, (mode, k, m, bits, int(diff.max()), flips)
        q_ref, s_ref, c_ref = reference.act_quant_s8_ref(x.double(), clip, _op_mode(mode), hb, p1, p2)
        _poison(m * k)
        q, s, c = torch.ops.qaas.act_quant_s8(x.cuda(), clip.cuda(), _op_mode(mode), hb, _dev(p1), _dev(p2))
        _check_s8(q, s, c, q_ref, s_ref, c_ref, exact=False, max_flips=max_flips, scale_tol=scale_tol)
        # the factors staged once (in this precision mode: with the low parts when compensated): identical results
        frags = kernels._ext.extension().act_quant_fragments(x.cuda(), _op_mode(mode), hb, _dev(p1), _dev(p2))
        again = torch.ops.qaas.act_quant_s8(x.cuda(), clip.cuda(), _op_mode(mode), hb, _dev(p1), _dev(p2), frags)
        assert all(torch.equal(a, b) for a, b in zip(again, (q, s, c))), (mode, k, m)
print("ok")
"""


@pytest.mark.parametrize(
    "env,max_flips,scale_tol",
    [
        # compensated products (P = Phi + Plo, T = Thi + Tlo, true division): float32-accurate, so only values
        # within float32 rounding of a boundary flip. (The default, FAST, rounds P and T to fp16 once: ~1% of int8
        # codes, under 0.1% of int4 codes, scale off by ~1e-4; still never more than one code.)
        ({"QAAS_ACT_QUANT_FAST": "0"}, 1e-2, 1e-5),
        # the one-block-per-SM variant everywhere (the default takes the two-block one for n1 <= 64)
        ({"QAAS_ACT_QUANT_WIDE": "1"}, 5e-2, 1e-3),
        # the scalar kernel on the tensor-core shapes (A/B switch)
        ({"QAAS_ACT_QUANT_TC": "0"}, 1e-2, 1e-5),
    ],
)
def test_act_quant_env_variants(env: dict[str, str], max_flips: float, scale_tol: float) -> None:
    """The environment switches are read once per process: each variant runs in a fresh interpreter."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _ENV_VARIANT_SCRIPT, str(max_flips), str(scale_tol)],
        cwd=root,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
@pytest.mark.parametrize("k,n,group", [(4096, 4096, 128), (11008, 512, 128), (1024, 1000, 256), (512, 1000, 32)])
def test_w4a16_gemv(tokens: int, k: int, n: int, group: int) -> None:
    gen = torch.Generator().manual_seed(tokens * 7 + k + n)
    qw, scale, zero, bias, x, ref = _w4a16_case(gen, tokens, k, n, group)
    _poison(tokens * n * 2)
    out = torch.ops.qaas.w4a16_gemm(x.to(DEV), qw.to(DEV), scale.to(DEV), zero.to(DEV), group, bias.to(DEV))
    assert out.dtype == torch.float16 and out.shape == (tokens, n)
    assert rel_err(out, ref) < 2e-3


def test_dequant_w4_exact() -> None:
    gen = torch.Generator().manual_seed(5)
    n, k, group = 300, 1024, 128
    qw = _rand_codes((n, k), 4, gen)
    scale = torch.rand(n, k // group, generator=gen) + 0.01
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    _poison(n * k * 2)
    out = torch.ops.qaas.dequant_w4(qw.to(DEV), scale.to(DEV), zero.to(DEV), group).cpu()
    assert torch.equal(out, reference.dequant_w4_ref(qw, scale, zero, group))


@pytest.mark.parametrize("n,k,group", [(304, 1024, 128), (48, 384, 128), (16, 128, 32)])
def test_dequant_w4_tiled_exact(n: int, k: int, group: int) -> None:
    """The prefill dequantisation of codes in the decode kernel's tiled order equals that of the rows."""
    gen = torch.Generator().manual_seed(n + k)
    qw = _rand_codes((n, k), 4, gen)
    scale = torch.rand(n, k // group, generator=gen) + 0.01
    zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
    tiled = reference.pack_w4_tiled(qw).to(DEV)
    _poison(n * k * 2)
    out = torch.ops.qaas.dequant_w4_tiled(tiled, scale.to(DEV), zero.to(DEV), group).cpu()
    assert torch.equal(out, reference.dequant_w4_ref(qw, scale, zero, group))
    with pytest.raises(RuntimeError, match="tiled"):
        kernels._ext.extension().dequant_w4(tiled[:-1].contiguous(), scale[:-1].to(DEV), zero[:-1].to(DEV), group, True)


@pytest.mark.parametrize("a_bits,w_bits", [(8, 8), (8, 4), (4, 4), (4, 8)])
@pytest.mark.parametrize("m,n,k", [(1, 256, 4096), (77, 1000, 4096), (300, 4096, 11008), (2048, 512, 256)])
def test_int8_gemm(a_bits: int, w_bits: int, m: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(m + n + k + a_bits * 3 + w_bits)
    a = _rand_codes((m, k), a_bits, gen)
    w = _rand_codes((n, k), w_bits, gen)
    sa = torch.rand(m, generator=gen) * 0.01 + 1e-3
    sw = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = (torch.randn(n, generator=gen) * 0.1).half()
    ref = reference.int8_gemm_ref(a, a_bits, sa, w, w_bits, sw, bias)  # float64 math, fp16 out
    _poison(m * n * 2)
    out = torch.ops.qaas.int8_gemm(a.to(DEV), a_bits, sa.to(DEV), w.to(DEV), w_bits, sw.to(DEV), bias.to(DEV))
    assert out.shape == (m, n) and out.dtype == torch.float16
    assert rel_err(out, ref) < 1e-3


def test_scale_epilogue_and_int_mm_baseline() -> None:
    gen = torch.Generator().manual_seed(9)
    m, n, k = 64, 512, 1024
    a, w = _rand_codes((m, k), 8, gen), _rand_codes((n, k), 8, gen)
    sa, sw = torch.rand(m, generator=gen) + 0.01, torch.rand(n, generator=gen) * 1e-3
    qa = (a.to(DEV) ^ 0x80).view(torch.int8)
    qw = (w.to(DEV) ^ 0x80).view(torch.int8)
    acc = torch._int_mm(qa, qw.t())
    out = torch.ops.qaas.scale_epilogue(acc, sa.to(DEV), sw.to(DEV), None)
    assert rel_err(out, reference.int8_gemm_ref(a, 8, sa, w, 8, sw, None)) < 1e-3


@pytest.mark.parametrize(
    "w_bits,a_bits,group,sym,transform",
    [
        (4, 16, 128, False, None),
        (8, 8, None, True, None),
        (4, 8, None, True, "hadamard"),
        (4, 4, None, True, "hadamard"),
        (4, 4, None, True, "kronecker"),
    ],
)
@pytest.mark.parametrize("tokens", [1, 40])
def test_quantlinear_cuda_dispatch(w_bits, a_bits, group, sym, transform, tokens) -> None:
    k = 1024
    t = {None: None, "hadamard": DenseHadamard(k, 256), "kronecker": KronTransform(32, 32)}[transform]
    layer = make_layer(k, 768, w_bits, a_bits, group_size=group, w_symmetric=sym, transform=t, clip=0.95)
    layer = layer.to(DEV).half()
    x = torch.randn(2, tokens, k, device=DEV, dtype=torch.float16)
    assert dispatch.supports(layer, x)
    out = layer(x)
    ref = layer.reference_forward(x.float())  # float32 reference of the same quantized layer
    assert out.shape == (2, tokens, 768)
    assert rel_err(out, ref) < (3e-3 if a_bits == 16 else 2e-2)


@pytest.mark.parametrize("variant", range(8))
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("k,n", [(4096, 1000), (11008, 256), (1024, 4096), (4096, 11008), (8192, 48)])
def test_w4a16_tensor_core_variants(variant: int, tokens: int, k: int, n: int) -> None:
    ext = kernels._ext.extension()
    assert int(ext.w4a16_num_variants()) == 8  # 0-4 register streaming, 5-7 bulk-copy streaming
    gen = torch.Generator().manual_seed(variant * 101 + tokens + k + n)
    group = 128
    qw, scale, zero, bias, x, ref = _w4a16_case(gen, tokens, k, n, group)
    _poison(tokens * n * 2)
    out = ext.w4a16_gemm_variant(x.to(DEV), qw.to(DEV), scale.to(DEV), zero.to(DEV), group, bias.to(DEV), variant)
    assert out.shape == (tokens, n) and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("variant", [-1, *range(10)])
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("k,n,group", [(4096, 1000, 128), (11008, 256, 128), (1024, 4096, 256), (4096, 11008, 128),
                                       (8192, 48, 1024), (256, 40, 128)])
def test_w4a16_packed_variants(variant: int, tokens: int, k: int, n: int, group: int) -> None:
    """The packed-metadata decode kernel (w4a16_packed.cu), every variant incl. the PDL launches and the shared-memory
    activations (and their fallback past 48 KB), N not a multiple of 16 (padded metadata tiles) and groups of
    several 128-k blocks."""
    ext = kernels._ext.extension()
    assert int(ext.w4a16_packed_num_variants()) == 10
    gen = torch.Generator().manual_seed(variant * 31 + tokens + k + n + group)
    qw, scale, zero, bias, x, ref = _w4a16_case(gen, tokens, k, n, group)
    meta = reference.pack_w4_meta(scale, zero).to(DEV)
    _poison(tokens * n * 2)
    out = ext.w4a16_gemm_packed_variant(x.to(DEV), qw.to(DEV), meta, group, bias.to(DEV), variant)
    assert out.shape == (tokens, n) and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("variant", range(12))
@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("k,n,group", [(4096, 1000, 128), (11008, 256, 128), (1024, 4096, 256), (256, 40, 128),
                                       (512, 48, 512)])
def test_w4a16_packed_tiled(variant: int, tokens: int, k: int, n: int, group: int) -> None:
    """The decode kernel over codes in the tiled order (reference.pack_w4_tiled), plain and PDL, one and two 128-k
    blocks per round, three blocks per SM, two tiles per block (N = 40 / 48 / 1000: an odd tile count, the last block's
    second tile clamped), N not a multiple of 16 (zero rows padding the last tile); variants 8 / 9 the persistent
    folded-zero-point kernel (w4a16_folded.cu) where its staged activations fit in 32 KB (1 token; 5 tokens at
    K <= 1024), else variant 0 / 1. Variants 0 / 1 run the lean kernel (stepped pointers) at 1 and 5 tokens with groups
    of 128 (at K = 256 14 of its 16 warps have no 128-k block), the general one at 16 tokens and other groups;
    variants 10 / 11 the lean kernel in 4-warp blocks (K = 256: 2 of 4 warps idle) where it applies, else 0 / 1."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(variant * 17 + tokens + k + n)
    qw, scale, zero, bias, x, ref = _w4a16_case(gen, tokens, k, n, group)
    meta = reference.pack_w4_meta(scale, zero).to(DEV)
    tiled = reference.pack_w4_tiled(qw).to(DEV)
    _poison(tokens * n * 2)
    out = ext.w4a16_gemm_packed_tiled(x.to(DEV), tiled, meta, group, bias.to(DEV), n, variant)
    assert out.shape == (tokens, n) and rel_err(out, ref) < 2e-3
    with pytest.raises(RuntimeError, match="pack_w4_tiled"):
        ext.w4a16_gemm_packed_tiled(x.to(DEV), qw.to(DEV) if n % 16 else qw[:-1].to(DEV), meta, group, None, n, 0)


@pytest.mark.parametrize("variant", [8, 9])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("k,n", [(4096, 8200), (11008, 4400)])
def test_w4a16_folded_activation_range(variant: int, tokens: int, k: int, n: int) -> None:
    """The folded-zero-point decode kernel (w4a16_folded.cu) cancels 1024 x the activation sums in its fp32
    accumulator and scales odd k by 1/16 in fp16: outlier channels (x 300) and subnormal activations (which x / 16
    rounds) must still give the reference result, against the tiled kernel's own error on the same inputs. N = 8200 /
    4400: 513 / 275 tiles (the last one padded), more than the folded kernel's persistent grid of two blocks per SM on
    an H100 / H200, so blocks loop over several tiles (at K = 11008 with 86 128-k blocks split unevenly over 16 warps).
    Where the staged activations exceed its 32 KB of shared memory (8 tokens, and 3 at K = 11008) the tiled kernel
    runs instead."""
    ext = kernels._ext.extension()
    group = 128
    gen = torch.Generator().manual_seed(variant * 5 + tokens + k)
    qw, scale, zero, bias, x, _ = _w4a16_case(gen, tokens, k, n, group)
    x = x.float()
    x[:, torch.randperm(k, generator=gen)[:16]] *= 300.0  # outlier channels, as in LLM activations
    tiny = torch.randperm(k, generator=gen)[: k // 4]
    x[:, tiny] = torch.randn(tokens, k // 4, generator=gen) * 3e-5  # around the fp16 subnormal range (< 6.1e-5)
    x = x.half()
    ref = reference.w4a16_gemm_ref(x.double(), qw, scale, zero, group, bias)
    meta = reference.pack_w4_meta(scale, zero).to(DEV)
    tiled = reference.pack_w4_tiled(qw).to(DEV)
    _poison(tokens * n * 2)
    out = ext.w4a16_gemm_packed_tiled(x.to(DEV), tiled, meta, group, bias.to(DEV), n, variant)
    base = ext.w4a16_gemm_packed_tiled(x.to(DEV), tiled, meta, group, bias.to(DEV), n, variant & 1)
    assert rel_err(out, ref) < 2e-3
    assert rel_err(out, ref) < 2 * rel_err(base, ref) + 1e-4


@pytest.mark.parametrize("variant", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("tokens", [17, 32, 40, 64, 100, 257])
@pytest.mark.parametrize("k,n,group", [(4096, 1000, 128), (11008, 256, 128), (1024, 4096, 256), (256, 40, 128),
                                       (512, 48, 512)])
def test_w4a16_batched(variant: int, tokens: int, k: int, n: int, group: int) -> None:
    """The batched GEMM over tiled codes (w4a16_batched.cu), every variant: token counts past one token tile and not a
    multiple of it (the last tile's missing tokens read the last token and are never stored), row blocks past N (tiles
    clamped, N not a multiple of 16), K = 11008 (86 128-k blocks split unevenly across the cluster), groups of several
    128-k blocks; the output poisoned beforehand."""
    ext = kernels._ext.extension()
    assert int(ext.w4a16_batched_num_variants()) == 4
    gen = torch.Generator().manual_seed(variant * 13 + tokens + k + n + group)
    qw, scale, zero, bias, x, ref = _w4a16_case(gen, tokens, k, n, group)
    meta = reference.pack_w4_meta(scale, zero).to(DEV)
    tiled = reference.pack_w4_tiled(qw).to(DEV)
    _poison(tokens * n * 2)
    out = ext.w4a16_gemm_batched(x.to(DEV), tiled, meta, group, bias.to(DEV), n, variant)
    assert out.shape == (tokens, n) and rel_err(out, ref) < 2e-3


@pytest.mark.parametrize("splits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("variant", [1, 2])
def test_w4a16_batched_cluster_splits(splits: int, variant: int) -> None:
    """Every cluster size the host may pick (1..8 blocks splitting K, also odd ones and more splits than a warp's share
    of 128-k blocks) gives the reference result, without bias too; bad arguments are refused."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(splits * 7 + variant)
    k, n, group, tokens = 1152, 4096, 128, 48
    qw, scale, zero, _, x, ref = _w4a16_case(gen, tokens, k, n, group, with_bias=False)
    meta = reference.pack_w4_meta(scale, zero).to(DEV)
    tiled = reference.pack_w4_tiled(qw).to(DEV)
    _poison(tokens * n * 2)
    out = ext.w4a16_gemm_batched(x.to(DEV), tiled, meta, group, None, n, variant, splits)
    assert rel_err(out, ref) < 2e-3
    with pytest.raises(RuntimeError, match="splits"):
        ext.w4a16_gemm_batched(x.to(DEV), tiled, meta, group, None, n, variant, 9)
    with pytest.raises(RuntimeError, match="pack_w4_tiled"):
        ext.w4a16_gemm_batched(x.to(DEV), tiled[:-16], meta, group, None, n, variant, splits)
    with pytest.raises(RuntimeError, match="variant"):
        ext.w4a16_gemm_batched(x.to(DEV), tiled, meta, group, None, n, 4, splits)


def test_w4a16_dispatch_sm90_past_decode_in_graph() -> None:
    """QuantLinear past 16 tokens on the Hopper wgmma GEMM: its operands built once (reordered codes, fp16 scale and
    zero term), the output exactly the extension call's and within the float32 reference's bound at 24 .. 2048 tokens;
    after a decode call tiles qweight in place the reordered codes are rebuilt from the rows; a CUDA graph replay
    equals the eager call."""
    ext = kernels._ext.extension()
    k, n = 2048, 1024
    layer = make_layer(k, n, 4, 16, group_size=128, w_symmetric=False).to(DEV).half()
    for tokens in (24, 128, 129, 2048):
        x = torch.randn(tokens, k, device=DEV, dtype=torch.float16)
        out = layer(x)
        assert rel_err(out, layer.reference_forward(x.float())) < 3e-3
        codes, s16, z16 = dispatch._sm90_w4_operands(layer, ext, x)
        assert torch.equal(out, ext.w4a16_gemm_sm90(x, codes, s16, z16, 128, dispatch._bias(layer), -1, -1))
    assert not layer.codes_tiled  # the decode kernels' order is made by a decode call, not by the GEMM
    first_codes = dispatch._sm90_w4_operands(layer, ext, x)[0]
    layer(torch.randn(1, k, device=DEV, dtype=torch.float16))
    assert layer.codes_tiled
    x = torch.randn(40, k, device=DEV, dtype=torch.float16)
    eager = layer(x)
    assert rel_err(eager, layer.reference_forward(x.float())) < 3e-3
    assert torch.equal(dispatch._sm90_w4_operands(layer, ext, x)[0], first_codes)  # rebuilt from the same rows
    assert torch.equal(_graph_replayed(lambda: layer(x)), eager)


def test_w4a16_dispatch_sm90_falls_back_where_fp16_scales_overflow() -> None:
    """Scales whose fp16 rounding (times the largest code) is not finite keep the layer off the Hopper GEMM: the
    batched GEMM runs instead, still equal to the reference."""
    k, n = 1024, 256
    layer = make_layer(k, n, 4, 16, group_size=128, w_symmetric=False).to(DEV).half()
    with torch.no_grad():
        layer.w_scale[0, 0] = 5000.0  # 15 * 5000 past the fp16 range
    x = torch.randn(32, k, device=DEV, dtype=torch.float16) * 1e-3
    assert dispatch._sm90_w4_operands(layer, kernels._ext.extension(), x) is None
    out = layer(x)
    assert layer.codes_tiled and rel_err(out, layer.reference_forward(x.float())) < 3e-3


def test_w4a16_dispatch_batched_tokens_in_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the Hopper GEMM (QAAS_W4A16_SM90=0), QuantLinear at 17..W4A16_BATCHED_MAX_TOKENS tokens: the first call
    tiles the codes and runs the batched GEMM (equal to the torch.ops path and to the float32 reference), also replayed
    from a CUDA graph (cluster launches captured); past the limit the dequantise + cuBLAS path reads the same tiled
    codes."""
    monkeypatch.setenv("QAAS_W4A16_SM90", "0")
    k, n = 2048, 1024
    layer = make_layer(k, n, 4, 16, group_size=128, w_symmetric=False).to(DEV).half()
    for tokens in (24, dispatch.W4A16_BATCHED_MAX_TOKENS, dispatch.W4A16_BATCHED_MAX_TOKENS + 1):
        x = torch.randn(tokens, k, device=DEV, dtype=torch.float16)
        out = layer(x)
        assert layer.codes_tiled and rel_err(out, layer.reference_forward(x.float())) < 3e-3
    x = torch.randn(40, k, device=DEV, dtype=torch.float16)
    eager = layer(x)
    meta, _ = dispatch._packed_w4_meta(layer)
    assert torch.equal(eager, torch.ops.qaas.w4a16_gemm_packed_tiled(x, layer.qweight, meta, 128, dispatch._bias(layer), n))
    assert torch.equal(_graph_replayed(lambda: layer(x)), eager)


def test_w4a16_packed_pdl_chain_in_graph() -> None:
    """PDL variants chained in a CUDA graph where each call consumes the previous call's output (the dependency
    griddepcontrol.wait must honour): equal to the same chain run with the non-PDL variant, and to the reference."""
    ext = kernels._ext.extension()
    gen = torch.Generator().manual_seed(77)
    n = k = 1024
    group = 128
    layers = []
    for _ in range(6):
        qw = _rand_codes((n, k), 4, gen)
        scale = torch.rand(n, k // group, generator=gen) * 0.004 + 0.001
        zero = torch.randint(0, 16, (n, k // group), generator=gen).float()
        layers.append((qw, scale, zero))
    x0 = torch.randn(1, k, generator=gen).half()
    expect = x0.double()
    for qw, scale, zero in layers:
        expect = reference.w4a16_gemm_ref(expect.half().double(), qw, scale, zero, group, None).double()
    dev_layers = [(qw.to(DEV), reference.pack_w4_meta(s, z).to(DEV)) for qw, s, z in layers]
    x_in = x0.to(DEV)

    def chain(variant: int) -> torch.Tensor:
        h = x_in
        for qw, meta in dev_layers:
            h = ext.w4a16_gemm_packed_variant(h, qw, meta, group, None, variant)
        return h

    plain = chain(0)
    torch.cuda.synchronize()
    chain(1)  # warm up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(1)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, plain)
    assert rel_err(out, expect) < 5e-3


def test_w4a16_dispatch_chain_with_pdl_matches_reference() -> None:
    """Three W4A16 layers chained through QuantLinear: the first call builds the packed words (plain launch), later
    calls launch with PDL (weights unchanged); eager and CUDA-graph replays equal the float32 reference."""
    k = 1024
    layers = [make_layer(k, k, 4, 16, group_size=128, w_symmetric=False).to(DEV).half() for _ in range(3)]
    x = torch.randn(1, k, device=DEV, dtype=torch.float16)

    def run() -> torch.Tensor:
        h = x
        for layer in layers:
            h = layer(h)
        return h

    def ref() -> torch.Tensor:
        h = x.float()
        for layer in layers:
            h = layer.reference_forward(h.half().float())
        return h

    assert all(dispatch.supports(layer, x) for layer in layers)
    first = run()
    assert all(dispatch._packed_w4_meta(layer)[1] for layer in layers)  # stable from now on: PDL launches
    second = run()
    assert torch.equal(first, second)
    assert torch.equal(_graph_replayed(run), first)
    assert rel_err(first, ref()) < 5e-3


def test_w4a16_dispatch_many_tiles_uses_the_folded_kernel() -> None:
    """A wide W4A16 layer (5 tiles per SM) at 1 token runs the 4-warp-block tiled variant (plain), then on the next
    call (weights unchanged) the persistent folded kernel with PDL, at 6 tokens (past that kernel's shared memory at
    K = 4096) the 4-warp blocks with PDL, and at 12 tokens (two token groups) the default with PDL: all equal to the
    float32 reference."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = 16 * 5 * sms, 4096
    layer = make_layer(k, n, 4, 16, group_size=128, w_symmetric=False).to(DEV).half()
    assert dispatch.tiled_decode_variant(n, k, 1, sms, False) == dispatch.TILED_SMALL_BLOCKS
    assert dispatch.tiled_decode_variant(n, k, 1, sms, True) == dispatch.TILED_FOLDED_PDL
    assert dispatch.tiled_decode_variant(n, k, 6, sms, True) == dispatch.TILED_SMALL_BLOCKS + 1
    assert dispatch.tiled_decode_variant(n, k, 12, sms, True) == dispatch.TILED_DEFAULT + 1
    for tokens in (1, 1, 6, 12):
        x = torch.randn(tokens, k, device=DEV, dtype=torch.float16)
        out = layer(x)
        assert layer.codes_tiled and rel_err(out, layer.reference_forward(x.float())) < 3e-3


@pytest.mark.parametrize("tiles_per_sm,k", [(2, 11008), (2.5, 4096)])
def test_w4a16_dispatch_default_and_three_per_sm_band(tiles_per_sm: float, k: int) -> None:
    """Within one wave of two blocks per SM (here K = 11008, LLaMA-7B's down_proj) the dispatcher takes the default
    variant (the lean kernel at <= 8 tokens, plain, then PDL once the weights are unchanged); between 2 and 3 tiles per
    SM three blocks per SM: equal to the float32 reference at 1 and 4 tokens."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n = int(16 * tiles_per_sm * sms)
    layer = make_layer(k, n, 4, 16, group_size=128, w_symmetric=False).to(DEV).half()
    want = dispatch.TILED_DEFAULT if tiles_per_sm <= 2 else dispatch.TILED_THREE_PER_SM
    assert dispatch.tiled_decode_variant(n, k, 1, sms, False) == want
    assert dispatch.tiled_decode_variant(n, k, 4, sms, True) == want + 1
    for tokens in (1, 1, 4):
        x = torch.randn(tokens, k, device=DEV, dtype=torch.float16)
        out = layer(x)
        assert layer.codes_tiled and rel_err(out, layer.reference_forward(x.float())) < 3e-3


def test_memory_probe_runs() -> None:
    ext = kernels._ext.extension()
    buf = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device=DEV)
    for mode in range(5):
        out = ext.memory_probe(buf, mode)
        assert out.dtype == torch.int32 and out.numel() >= 1
    with pytest.raises(RuntimeError, match="mode"):
        ext.memory_probe(buf, 5)


def test_sm90_gemm_is_built() -> None:
    """The device build carries CUTLASS (kernels/device_run.sh installs the pinned wheel first)."""
    assert kernels._ext.extension().has_sm90_gemm()


@pytest.mark.parametrize("config", [-1, 0, 1, 2, 3])
@pytest.mark.parametrize("m,n,k", [(1, 256, 4096), (77, 1008, 4096), (300, 4096, 11008), (2048, 512, 256), (130, 11008, 64)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_w8a8_gemm_sm90(config: int, m: int, n: int, k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(m * 3 + n + k + config + 17 * with_bias)
    ua = _rand_codes((m, k), 8, gen)
    qa = (ua.int() - 128).to(torch.int8)
    corr = (qa.sum(dim=1, dtype=torch.int64) * 128).to(torch.int32)
    w = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8)  # full code range, 0 included
    sa = torch.rand(m, generator=gen) * 0.01 + 1e-3
    sw = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = (torch.randn(n, generator=gen) * 0.1).half() if with_bias else None
    ref = reference.int8_gemm_ref(ua, 8, sa, w, 8, sw, bias)
    assert torch.equal(ref, reference.w8a8_gemm_sm90_ref(qa, sa, corr, w, sw, bias))
    _poison(m * n * 2)
    out = torch.ops.qaas.w8a8_gemm_sm90(qa.to(DEV), sa.to(DEV), corr.to(DEV), w.to(DEV), sw.to(DEV),
                                        None if bias is None else bias.to(DEV), config)
    assert out.shape == (m, n) and out.dtype == torch.float16 and torch.isfinite(out).all()
    assert rel_err(out, ref) < 1e-3


@pytest.mark.parametrize("transform", [None, "hadamard", "kronecker"])
@pytest.mark.parametrize("tokens", [1, 200])
def test_quantlinear_w8a8_takes_sm90_path(transform, tokens) -> None:
    k = 1024
    t = {None: None, "hadamard": DenseHadamard(k, 1024), "kronecker": KronTransform(32, 32)}[transform]
    layer = make_layer(k, 768, 8, 8, transform=t, clip=0.95).to(DEV).half()
    x = torch.randn(3, tokens, k, device=DEV, dtype=torch.float16)
    assert dispatch.supports(layer, x) and dispatch._use_sm90_gemm(layer, x.reshape(-1, k))
    out = layer(x)
    ref = layer.reference_forward(x.float())
    assert out.shape == (3, tokens, 768) and rel_err(out, ref) < 2e-2


def test_unpack_w4_u8_exact() -> None:
    gen = torch.Generator().manual_seed(21)
    qw = _rand_codes((300, 1024), 4, gen)
    _poison(300 * 1024)
    out = torch.ops.qaas.unpack_w4_u8(qw.to(DEV)).cpu()
    assert torch.equal(out, reference.unpack_w4_u8_ref(qw))


@pytest.mark.parametrize("tokens", [1, 200])
def test_quantlinear_w4a8_takes_sm90_path_for_prefill(tokens) -> None:
    k = 1024
    layer = make_layer(k, 768, 4, 8, transform=DenseHadamard(k, 1024), clip=0.95).to(DEV).half()
    x = torch.randn(2, tokens, k, device=DEV, dtype=torch.float16)
    assert dispatch.supports(layer, x)
    assert dispatch._use_sm90_gemm(layer, x.reshape(-1, k)) == (2 * tokens >= dispatch.SM90_GEMM_MIN_TOKENS[4])
    out = layer(x)
    assert rel_err(out, layer.reference_forward(x.float())) < 2e-2
