"""CPU checks of the tensor-core act_quant kernel's index math, through its statement-by-statement emulation
(``act_quant_tc_sim``): fragment layouts, the output-column permutation, padded X rows, the Sylvester
Hadamard factorisation H_{n1 n2} = H_n1 (x) H_n2 against the FWHT of ``reference.hadamard_blockdiag``, rounds
and ragged tails. The kernel itself is checked on the GPU (``test_cuda_kernels.py``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from act_quant_tc_sim import OUT_S8, OUT_U4, OUT_U8, act_quant_tc_sim, make_plan

from kernels import reference
from quant.quantizers.packing import unpack_int4

pytestmark = pytest.mark.cpu_only  # the GPU machine runs the kernel itself


def _inputs(mode: int, k: int, n1: int, m: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * 2 + 0.1).half()
    p1 = p2 = None
    if mode == 2:
        n2 = k // n1
        p1 = torch.randn(n1, n1, generator=gen) / n1**0.5 + torch.eye(n1)
        p2 = torch.randn(n2, n2, generator=gen) / n2**0.5 + torch.eye(n2)
    return x, p1, p2


def _codes_vs_reference(codes: np.ndarray, x, clip, mode, hb, p1, p2, out):
    """(emulated codes, reference codes, reference scales) as integer tensors of one element per value."""
    if out == OUT_S8:
        q_ref, s_ref, _ = reference.act_quant_s8_ref(x.double(), clip, mode, hb, p1, p2)
        return torch.from_numpy(codes.astype(np.int32)), q_ref.int(), s_ref
    bits = 4 if out == OUT_U4 else 8
    c_ref, s_ref = reference.act_quant_ref(x.double(), bits, clip, mode, hb, p1, p2)
    cc = torch.from_numpy(codes)
    u, u_ref = (unpack_int4(cc), unpack_int4(c_ref)) if bits == 4 else (cc, c_ref)
    return u.int(), u_ref.int(), s_ref


@pytest.mark.parametrize(
    "mode,k,hb,n1,m,out,sms,grid,wide",
    [
        (1, 1024, 256, 0, 3, OUT_U8, 132, None, False),  # H_16 (x) H_16, 4 chunks per row
        (1, 2048, 512, 0, 2, OUT_U4, 132, None, False),  # H_16 (x) H_32
        (1, 4096, 4096, 0, 5, OUT_S8, 2, 1, False),  # H_64 (x) H_64, several rounds in one block
        (2, 4096, 0, 64, 9, OUT_U8, 2, 2, False),  # Kronecker 64 x 64, ragged last round
        (2, 4096, 0, 64, 9, OUT_S8, 2, 2, True),  # same, wide variant (RMAX 2, 4 tokens per round)
        (2, 2048, 0, 128, 7, OUT_U4, 2, 1, False),  # Kronecker 128 x 16
        (2, 3840, 0, 48, 2, OUT_S8, 132, None, False),  # Kronecker 48 x 80
        (1, 1024, 256, 0, 37, OUT_S8, 3, 3, True),  # 4 units per token, 8 tokens per round
        (2, 11008, 0, 86, 2, OUT_S8, 132, None, False),  # Kronecker 86 x 128: n1 padded to 96 (zero row), narrow
        (2, 11008, 0, 86, 3, OUT_U4, 2, 1, False),  # same, several rounds in one block (one token per round)
        (2, 11008, 0, 86, 5, OUT_U8, 2, 1, True),  # wide: two tokens per round (2 units per warp), ragged tail
        (2, 2560, 0, 20, 3, OUT_U4, 2, 1, False),  # Kronecker 20 x 128: n1 padded to 32, 1 chunk per row
    ],
)
def test_tc_emulation_matches_reference(mode, k, hb, n1, m, out, sms, grid, wide) -> None:
    x, p1, p2 = _inputs(mode, k, n1, m, seed=k + m + out)
    clip = torch.tensor(0.9)
    res = act_quant_tc_sim(
        x.numpy(), 0.9, mode, hb, None if p1 is None else p1.numpy(), None if p2 is None else p2.numpy(), out,
        sms=sms, grid=grid, wide_only=wide,
    )
    assert res is not None
    codes, scale, corr = res
    if out == OUT_S8:
        assert np.array_equal(corr.astype(np.int64), 128 * codes.astype(np.int64).sum(1))
    u, u_ref, s_ref = _codes_vs_reference(codes, x, clip, mode, hb, p1, p2, out)
    diff = (u - u_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3
    s = torch.from_numpy(scale.astype(np.float64))
    assert float((s - s_ref.double()).norm() / s_ref.double().norm()) < 1e-5


def test_tc_plan_coverage() -> None:
    """Which shapes take the tensor-core kernel (H100 limits), and with how many tokens per round."""
    plan = make_plan(2048, 4096, 2, 0, 64, 64, OUT_S8, False, 132)
    assert plan is not None and plan["rmax"] == 1 and plan["TB"] == 2  # narrow: two blocks per SM
    plan = make_plan(2048, 11008, 1, 256, 0, 0, OUT_U8, False, 132)
    assert plan is not None and plan["n1"] == 16 and plan["rmax"] == 8 and plan["TB"] == 1  # 43 units: wide
    assert make_plan(1, 16384, 2, 0, 128, 128, OUT_U8, False, 132)["smem"] <= 232448 - 1024
    # 86 padded to 96, FAST (the default): narrow, one token per round, two blocks per SM
    plan = make_plan(2048, 11008, 2, 0, 86, 128, OUT_S8, True, 132)
    assert plan is not None and (plan["n1"], plan["n1_real"], plan["rmax"], plan["TB"]) == (96, 86, 1, 1)
    assert plan["smem"] <= 233472 // 2 - 2048
    # compensated (P hi + lo: too much shared memory for two blocks) or forced wide: two units per warp, 2 tokens
    for fast, wide in ((False, False), (True, True)):
        plan = make_plan(2048, 11008, 2, 0, 86, 128, OUT_S8, fast, 132, wide_only=wide)
        assert plan is not None and (plan["rmax"], plan["TB"]) == (2, 2)
    assert make_plan(1, 4096, 1, 128, 0, 0, OUT_U8, False, 132) is None  # block < 256: butterflies
    assert make_plan(1, 32768, 1, 256, 0, 0, OUT_U8, False, 132) is None  # 128 chunks > 64 register slots


@pytest.mark.parametrize("mode,k,hb,n1,m,out", [(2, 4096, 0, 64, 3, OUT_S8), (2, 11008, 0, 86, 2, OUT_U4),
                                                (1, 4096, 4096, 0, 2, OUT_U8)])
def test_tc_emulation_fast_mode(mode, k, hb, n1, m, out) -> None:
    """FAST (the default; QAAS_ACT_QUANT_FAST=0 selects the compensated mode): fp16 P and T, two products,
    reciprocal-scale quantization. Codes stay within
    one step of the float64 reference with ~1% of them moved (fp16 operands: FlatQuant's kernel precision)."""
    x, p1, p2 = _inputs(mode, k, n1, m, seed=7 * k + m)
    clip = torch.tensor(0.9)
    res = act_quant_tc_sim(x.numpy(), 0.9, mode, hb, None if p1 is None else p1.numpy(),
                           None if p2 is None else p2.numpy(), out, fast=True)
    assert res is not None
    codes, scale, _ = res
    u, u_ref, s_ref = _codes_vs_reference(codes, x, clip, mode, hb, p1, p2, out)
    diff = (u - u_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.03
    s = torch.from_numpy(scale.astype(np.float64))
    assert float((s - s_ref.double()).norm() / s_ref.double().norm()) < 2e-3


@pytest.mark.parametrize("k,n1,m,out,left", [(11008, 86, 1, OUT_S8, False), (2560, 20, 3, OUT_U4, False),
                                             (2560, 20, 2, OUT_S8, True)])
def test_tc_emulation_padding_aware_products_change_nothing(k, n1, m, out, left) -> None:
    """n1 <= N1 - 8 (86 of 96, 20 of 32), FAST: the skipped 8-row tile of step 1 and step 2's m16n8k8 last k tile
    give exactly the codes, scales and sums of the full products (those only add zeros), for the general and the
    left-only kernel."""
    x, p1, p2 = _inputs(2, k, n1, m, seed=5 * k + m)
    args = (x.numpy(), 0.9, 2, 0, p1.numpy(), None if left else p2.numpy(), out)
    skipped = act_quant_tc_sim(*args, fast=True, pad_skip=True)
    full = act_quant_tc_sim(*args, fast=True, pad_skip=False)
    assert skipped is not None and full is not None
    for a, b in zip(skipped, full):
        assert (a is None and b is None) or np.array_equal(a, b)


@pytest.mark.parametrize("k,n1,m,out,sms,grid", [
    (4096, 32, 5, OUT_S8, 2, 1),  # FlatQuant's o_proj: 32 heads (x) I_128, several rounds in one block
    (4096, 64, 9, OUT_U8, 2, 2),  # 64 (x) I_64, ragged last round
    (11008, 86, 2, OUT_U4, 132, None),  # n1 padded to 96: zero row, padding rows not stored
    (2560, 20, 3, OUT_S8, 2, 1),  # n1 padded to 32
])
def test_tc_emulation_left_only(k, n1, m, out, sms, grid) -> None:
    """Kronecker with the identity right factor (p2=None): the left-only kernel's ldmatrix.trans B fragments and
    natural-order two-store output match the reference of P1^T X; X is exact in fp16, so only P1's fp16 rounding
    moves codes."""
    x, p1, _ = _inputs(2, k, n1, m, seed=5 * k + m)
    clip = torch.tensor(0.9)
    res = act_quant_tc_sim(x.numpy(), 0.9, 2, 0, p1.numpy(), None, out, fast=True, sms=sms, grid=grid)
    assert res is not None
    codes, scale, corr = res
    if out == OUT_S8:
        assert np.array_equal(corr.astype(np.int64), 128 * codes.astype(np.int64).sum(1))
    u, u_ref, s_ref = _codes_vs_reference(codes, x, clip, 2, 0, p1, None, out)
    diff = (u - u_ref.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02
    s = torch.from_numpy(scale.astype(np.float64))
    assert float((s - s_ref.double()).norm() / s_ref.double().norm()) < 2e-3
    # the left-only kernel is FAST-only and narrow-only: the compensated mode takes the general kernel
    assert make_plan(m, k, 2, 0, n1, k // n1, out, False, 132, left=True) is None
    assert make_plan(2048, 4096, 2, 0, 32, 128, OUT_S8, True, 132, left=True)["TB"] == 2


def test_fragment_staging_layout() -> None:
    """The fragment-order staging (lane's 8 halves from A rows {g, g+8} x columns {2t, 2t+1, 2t+8, 2t+9}, P2 rows
    in output-slot order) lands every element where ``afrag_pos`` / ``slot_of_col`` (the m16n8k16 A layout and
    the output-column permutation the rest of the kernel reads) say it should."""
    from act_quant_tc_sim import afrag_pos, col_of_slot, slot_of_col

    assert sorted(col_of_slot(s_) for s_ in range(16)) == list(range(16))
    assert all(slot_of_col(col_of_slot(s_)) == s_ for s_ in range(16))
    for is_p2 in (True, False):
        seen = {}
        for lane in range(32):
            gg, tt = lane >> 2, lane & 3
            r0 = col_of_slot(gg) if is_p2 else gg
            r1 = col_of_slot(gg + 8) if is_p2 else gg + 8
            ks = (2 * tt, 2 * tt + 1, 2 * tt + 8, 2 * tt + 9)
            for hh in range(8):
                k = ks[(hh >> 2) * 2 + (hh & 1)]
                r = r1 if (hh >> 1) & 1 else r0
                row = slot_of_col(r) if is_p2 else r  # A row: P2 by output slot, P1 plain
                assert afrag_pos(row, k) == lane * 8 + hh
                seen[(r, k)] = True
        assert len(seen) == 256  # every (row, column) of the 16 x 16 tile exactly once
