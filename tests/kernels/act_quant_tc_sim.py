"""CPU emulation of ``act_quant_tc_kernel`` (kernels/csrc/act_quant.cu), statement by statement.

It mirrors the kernel's index arithmetic (P fragment staging, 16 bytes of one lane's fragment at a time, the output-column slot permutation, the compact X
rows and the zero row that padding rows read, the multiply-high row division, ldmatrix lane addressing, the m16n8k16 A/B/C fragment layouts of the PTX ISA, the code
buffer and its write-out) and its arithmetic (fp16 operands, fp32 accumulation, hi/lo splits, the
power-of-two scaling of T, true division and round-half-even), so that the index math can be checked
against :mod:`kernels.reference` without a GPU. Blocks and warps run one after another (barriers are
implicit); it is slow (~10 ms per mma tile per block), meant for small M.
"""

from __future__ import annotations

import math

import numpy as np

F16 = np.float16
F32 = np.float32
LANE = np.arange(32)
G = LANE >> 2
T = LANE & 3
WARPS = 8
MAX_TB = 16
OUT_U8, OUT_U4, OUT_S8 = 0, 1, 2


def rmax_wide(n1: int) -> int:
    return 128 // n1 if n1 <= 64 else (2 if n1 <= 96 else 1)


def rmax_narrow(n1: int) -> int:
    return 64 // n1 if n1 <= 64 else (1 if n1 <= 96 else 0)


def smem_bytes(N1: int, n1: int, n2: int, lo: bool, TB: int, K: int, left: bool = False) -> int:
    # P fragments (left-only: no P2), one zero row, X (compact rows: K / n2 per token, n2 + 8 halves each) x 2
    return (2 * (N1 * N1 + (0 if left else n2 * n2)) * (2 if lo else 1) + (n2 + 8) * 2
            + 2 * TB * (K // n2) * (n2 + 8) * 2)


def min_blocks(n1: int, rmax: int) -> int:
    """Blocks per SM the kernel is compiled for (__launch_bounds__): narrow 3 (n1 <= 64) or 2, wide 1."""
    return (3 if n1 <= 64 else 2) if rmax == rmax_narrow(n1) else 1


def slot_of_col(p):
    return ((p >> 1) & 1) * 8 + (p >> 2) * 2 + (p & 1)


def col_of_slot(s):
    """Physical column of output slot s (the kernel's col_of_slot; the inverse of slot_of_col)."""
    return ((s & 7) >> 1) * 4 + (s >> 3) * 2 + (s & 1)


def afrag_pos(r, c):
    return ((r & 7) * 4 + ((c & 7) >> 1)) * 8 + (c >> 3) * 4 + (r >> 3) * 2 + (c & 1)


# ------------------------------------------------------------------------------------ PTX emulation
def mma16816(d: np.ndarray, a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """d [32, 4] f32 += A (a: [32, 4 regs, 2 halves]) x B (b0, b1: [32, 2 halves]); fp32 accumulation."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    C = np.zeros((16, 8))
    for e in range(2):
        A[G, 2 * T + e] = a[:, 0, e]
        A[G + 8, 2 * T + e] = a[:, 1, e]
        A[G, 2 * T + 8 + e] = a[:, 2, e]
        A[G + 8, 2 * T + 8 + e] = a[:, 3, e]
        B[2 * T + e, G] = b0[:, e]
        B[2 * T + 8 + e, G] = b1[:, e]
        C[G, 2 * T + e] = d[:, e]
        C[G + 8, 2 * T + e] = d[:, 2 + e]
    D = (A @ B + C).astype(F32)
    out = np.empty((32, 4), F32)
    for e in range(2):
        out[:, e] = D[G, 2 * T + e]
        out[:, 2 + e] = D[G + 8, 2 * T + e]
    return out


def mma1688(d: np.ndarray, a0: np.ndarray, a1: np.ndarray, b0: np.ndarray) -> np.ndarray:
    """d [32, 4] f32 += A (16 x 8: a0 rows g, a1 rows g + 8, [32, 2 halves] each) x B (8 x 8: b0 [32, 2 halves])."""
    zero = np.zeros_like(a0)
    return mma16816(d, np.stack([a0, a1, zero, zero], axis=1), b0, np.zeros_like(b0))


def ldsm_x4(sm: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """ldmatrix.x4 (b16, no transpose): lane l supplies the row address (in halves) of row l % 8 of
    matrix l // 8; returns [32, 4 regs, 2 halves], reg m = (row g, cols 2t, 2t+1) of matrix m."""
    assert np.all(addr % 8 == 0), "ldmatrix rows must be 16-byte aligned"
    r = np.empty((32, 4, 2), F16)
    for m in range(4):
        mat = np.stack([sm[addr[8 * m + rr] : addr[8 * m + rr] + 8] for rr in range(8)])
        r[:, m, 0] = mat[G, 2 * T]
        r[:, m, 1] = mat[G, 2 * T + 1]
    return r


def ldsm_x4_trans(sm: np.ndarray, addr: np.ndarray) -> np.ndarray:
    """ldmatrix.x4.trans (b16): the same row addresses; reg m = (rows 2t, 2t+1; col g) of matrix m."""
    assert np.all(addr % 8 == 0), "ldmatrix rows must be 16-byte aligned"
    r = np.empty((32, 4, 2), F16)
    for m in range(4):
        mat = np.stack([sm[addr[8 * m + rr] : addr[8 * m + rr] + 8] for rr in range(8)])
        r[:, m, 0] = mat[2 * T, G]
        r[:, m, 1] = mat[2 * T + 1, G]
    return r


def lds128(sm: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Each lane's 8 consecutive halves at idx (halves) as [32, 4 regs, 2 halves] (reg 0 = halves 0, 1)."""
    assert np.all(idx % 8 == 0)
    return np.stack([sm[i : i + 8] for i in idx]).reshape(32, 4, 2)


def split_pair(a: np.ndarray, b: np.ndarray, fast: bool):
    hi = np.stack([a.astype(F16), b.astype(F16)], axis=-1)
    if fast:
        return hi, np.zeros_like(hi)
    lo = np.stack([(a - hi[:, 0].astype(F32)).astype(F16), (b - hi[:, 1].astype(F32)).astype(F16)], axis=-1)
    return hi, lo


def warp_max(v: np.ndarray) -> F32:
    return F32(np.max(v))


# ------------------------------------------------------------------------------------ host plan
def make_plan(
    M: int, K: int, mode: int, hb: int, n1: int, n2: int, out: int, fast: bool, sms: int,
    smem_optin: int = 232448, smem_per_sm: int = 233472, wide_only: bool = False, left: bool = False,
):
    """The host's tc::make_plan (H100 shared-memory limits by default). ``left``: identity right factor (the
    left-only kernel: FAST, narrow variants only)."""
    if left and (mode != 2 or not fast):
        return None
    if mode == 1:
        if hb < 256 or hb > 16384:
            return None
        L = hb.bit_length() - 1
        n2 = 1 << ((L + 1) // 2)
        n1 = hb // n2
        had, norm = 1, F32(1.0 / math.sqrt(hb))
    elif mode == 2:
        if n2 % 16 or not (16 <= n1 <= 128) or not (16 <= n2 <= 128):
            return None
        had, norm = 0, F32(1.0)
    else:
        return None
    if K % (n1 * n2):
        return None
    n1_real, n1 = n1, (n1 + 15) // 16 * 16  # the kernel pads n1 to a multiple of 16 (N1)
    U = (K // (n1_real * n2)) * (n2 // 16)
    lo = (not fast) and not had
    for narrow in ((1,) if left else (0,) if wide_only else (1, 0)):
        rmax = rmax_narrow(n1) if narrow else rmax_wide(n1)
        slots = WARPS * rmax
        if rmax == 0 or U > slots:
            continue
        limit = smem_per_sm // 2 - 2048 if narrow else smem_optin - 1024
        blocks = sms * (2 if narrow else 1)
        TB = max(1, min(min(MAX_TB, slots // U), (M + blocks - 1) // blocks))
        while TB > 1 and smem_bytes(n1, n1_real, n2, lo, TB, K, left) > limit:
            TB -= 1
        if smem_bytes(n1, n1_real, n2, lo, TB, K, left) > limit:
            continue
        return dict(n1=n1, n1_real=n1_real, n2=n2, had=had, norm=norm, rmax=rmax, TB=TB, left=left,
                    nrounds=(M + TB - 1) // TB, smem=smem_bytes(n1, n1_real, n2, lo, TB, K, left))
    return None


# ------------------------------------------------------------------------------------ the kernel
def act_quant_tc_sim(
    x: np.ndarray,
    clip: float,
    mode: int,
    hb: int,
    p1: np.ndarray | None,
    p2: np.ndarray | None,
    out: int,
    fast: bool = False,
    sms: int = 132,
    grid: int | None = None,
    wide_only: bool = False,
    pad_skip: bool = True,
):
    """Returns (codes, scales, corr) as the kernel writes them, or None where the kernel does not apply.
    ``grid`` (default min(nrounds, sms)) sets the persistent grid, to exercise several rounds per block.
    Kronecker with ``p2=None``: the identity right factor (the left-only kernel). ``pad_skip`` (the kernel's
    ``pad_hi``, FAST only, n1 <= N1 - 8): step 1 skips the all-padding 8-row accumulator tile, step 2 takes its last
    k tile as m16n8k8; False computes them in full, as before."""
    x = np.ascontiguousarray(x, dtype=F16)
    M, K = x.shape
    n1 = p1.shape[0] if p1 is not None else 0
    left = mode == 2 and p2 is None
    n2 = p2.shape[0] if p2 is not None else (K // n1 if left else 0)
    plan = make_plan(M, K, mode, hb, n1, n2, out, fast, sms, wide_only=wide_only, left=left)
    if plan is None:
        return None
    N1, n1r, n2, had, norm, TB, nrounds, RMAX = (
        plan[k] for k in ("n1", "n1_real", "n2", "had", "norm", "TB", "nrounds", "rmax"))
    if grid is None:
        grid = min(nrounds, sms * min_blocks(N1, RMAX))
    NB1 = N1 // 16
    QMAX = 7 if out == OUT_U4 else 127
    lo = (not fast) and not had
    pad_hi = pad_skip and fast and n1r <= N1 - 8
    NB2 = n2 >> 4
    chunks = K // (n1r * n2)
    U = chunks * NB2
    xstr = n2 + 8
    xtok = chunks * n1r * xstr
    CB = K // 2 if out == OUT_U4 else K
    clip_ratio = F32(clip)
    p1f = None if p1 is None else np.asarray(p1, F32).reshape(-1)
    p2f = None if p2 is None else np.asarray(p2, F32).reshape(-1)
    xflat = x.reshape(-1)

    codes = np.full(M * CB, 0xAB, np.uint8)  # poisoned
    scales = np.full(M, np.nan, F32)
    corr = np.full(M, -(2**31), np.int64)

    for block in range(grid):
        # shared memory
        sp2h = np.full(n2 * n2, np.nan, F16)
        sp2l = np.full(n2 * n2, np.nan, F16)
        sp1h = np.full(N1 * N1, np.nan, F16)
        sp1l = np.full(N1 * N1, np.nan, F16)
        # the zero row sits right before X (ldmatrix rows of the padding rows n1..N1-1 read it), then X: 2 buffers
        # of TB tokens of K / n2 compact rows (chunk c starts at row c * n1)
        sxz = np.full(xstr + 2 * TB * xtok, np.nan, F16)
        sxz[:xstr] = 0
        ZERO = 0  # offset of the zero row in sxz; X starts at xstr
        s_amax = np.zeros(MAX_TB, F32)
        s_sum = np.zeros(MAX_TB, np.int64)

        def issue(rnd: int, buf: int) -> None:
            # the round's tokens are consecutive rows of x and of the buffer: one range of 16-byte pieces; piece w
            # lands at halves 8 (w + w // W); the kernel's multiply-high row index, and (W dividing the block's 256
            # threads) its per-thread constant step of 256 pieces = 256 + 256 / W staged pieces
            m0 = rnd * TB
            total = min(TB, M - m0) * (K >> 3)
            W = n2 >> 3
            wmagic = (0xFFFFFFFF // W + 1) & 0xFFFFFFFF
            threads = WARPS * 32
            dst = xstr + buf * TB * xtok
            for tid in range(threads):
                d = 8 * (tid + ((tid * wmagic) >> 32))
                for w in range(tid, total, threads):
                    r = (w * wmagic) >> 32  # __umulhi(w, ceil(2^32 / W)) = w // W
                    assert r == w // W
                    if threads % W == 0:
                        assert d == 8 * (w + r)
                        d += 8 * (threads + threads // W)
                    sxz[dst + 8 * (w + r) : dst + 8 * (w + r) + 8] = xflat[m0 * K + w * 8 : m0 * K + w * 8 + 8]

        if block < nrounds:
            issue(block, 0)
        # P staged in fragment order: thread-iteration q writes lane q % 32's 8 halves of A tile q // 32 (tile row
        # rt, tile column ct): A rows {g, g + 8} (P2: output slots, i.e. physical columns col_of_slot) x columns
        # {2t, 2t + 1, 2t + 8, 2t + 9}; A(r, k) = P[k][r]; P1 entries past n1 (padding) are zero
        def stage(NB: int, is_p2: bool, dh: np.ndarray, dl: np.ndarray) -> None:
            n, pf = (n2, p2f) if is_p2 else (n1r, p1f)
            for q in range(NB * NB * 32):
                tile, lane = q >> 5, q & 31
                gg, tt = lane >> 2, lane & 3
                rt, ct = divmod(tile, NB)
                r0 = rt * 16 + (col_of_slot(gg) if is_p2 else gg)
                r1 = rt * 16 + (col_of_slot(gg + 8) if is_p2 else gg + 8)
                k0 = ct * 16 + 2 * tt
                ks = (k0, k0 + 1, k0 + 8, k0 + 9)
                for hh in range(8):
                    k = ks[(hh >> 2) * 2 + (hh & 1)]
                    r = r1 if (hh >> 1) & 1 else r0
                    if r < n and k < n:
                        p = F32(-1.0 if bin(r & k).count("1") & 1 else 1.0) if had else pf[k * n + r]
                    else:
                        p = F32(0.0)
                    h = F16(p)
                    dh[q * 8 + hh] = h
                    if lo:
                        dl[q * 8 + hh] = F16(p - F32(h))

        if not left:
            stage(NB2, True, sp2h, sp2l)
        stage(NB1, False, sp1h, sp1l)
        # (the layout is the one afrag_pos / slot_of_col describe: checked in test_act_quant_tc_sim)
        lrow = (LANE & 7) + ((LANE >> 4) << 3)
        lcol = ((LANE >> 3) & 1) << 3

        buf = 0
        rnd = block
        while rnd < nrounds:
            if rnd + grid < nrounds:
                issue(rnd + grid, buf ^ 1)
            m0 = rnd * TB
            nt = min(TB, M - m0)
            nunits = nt * U
            xb = xstr + buf * TB * xtok
            y = {}
            ysc = {}
            for warp in range(WARPS):
                for r in range(RMAX):
                    u = warp + r * WARPS
                    if u >= nunits:
                        continue
                    tb, v = divmod(u, U)
                    c, jt = divmod(v, NB2)
                    if left:  # T = X: step 2's B fragments straight from X by ldmatrix.trans, natural columns
                        finv = F32(1.0)
                        th = np.zeros((NB1, 2, 2, 32, 2), F16)
                        tl = np.zeros((NB1, 2, 2, 32, 2), F16)
                        for ka in range(NB1):
                            row = ka * 16 + (LANE & 7) + (((LANE >> 3) & 1) << 3)
                            col = jt * 16 + ((LANE >> 4) << 3)
                            addr = np.where(row >= n1r, ZERO + col, xb + tb * xtok + (c * n1r + row) * xstr + col)
                            bb = ldsm_x4_trans(sxz, addr)
                            th[ka, 0, 0], th[ka, 0, 1], th[ka, 1, 0], th[ka, 1, 1] = (bb[:, m] for m in range(4))
                    else:
                        acc = np.zeros((2 * NB1, 32, 4), F32)
                        xrow = [np.where(na * 16 + lrow >= n1r, ZERO + lcol,
                                         xb + tb * xtok + (c * n1r + na * 16 + lrow) * xstr + lcol) for na in range(NB1)]
                        f2 = (jt * NB2) * 256 + LANE * 8
                        for kb in range(NB2):
                            ah = lds128(sp2h, f2 + kb * 256).astype(np.float64)
                            al = lds128(sp2l, f2 + kb * 256).astype(np.float64) if lo else None
                            for na in range(NB1):
                                bb = ldsm_x4(sxz, xrow[na] + kb * 16).astype(np.float64)
                                acc[2 * na] = mma16816(acc[2 * na], ah, bb[:, 0], bb[:, 1])
                                if not (na == NB1 - 1 and pad_hi):  # (else: padding rows only; left at zero)
                                    acc[2 * na + 1] = mma16816(acc[2 * na + 1], ah, bb[:, 2], bb[:, 3])
                                if lo:
                                    acc[2 * na] = mma16816(acc[2 * na], al, bb[:, 0], bb[:, 1])
                                    acc[2 * na + 1] = mma16816(acc[2 * na + 1], al, bb[:, 2], bb[:, 3])
                        mx = warp_max(np.abs(acc))
                        ebits = int(np.array([mx], F32).view(np.int32)[0] >> 23) & 0xFF
                        ef = min(max(268 - ebits, 27), 227)
                        f = np.array([ef << 23], np.int32).view(F32)[0]
                        finv = np.array([(254 - ef) << 23], np.int32).view(F32)[0]
                        th = np.zeros((NB1, 2, 2, 32, 2), F16)
                        tl = np.zeros((NB1, 2, 2, 32, 2), F16)
                        for ka in range(NB1):
                            for ns in range(2):
                                for half in range(2):
                                    src = acc[2 * ka + half]
                                    hi, lw = split_pair(src[:, 2 * ns] * f, src[:, 2 * ns + 1] * f, fast)
                                    th[ka, ns, half], tl[ka, ns, half] = hi, lw
                    yr = np.zeros((NB1, 2, 32, 4), F32)
                    f1 = LANE * 8
                    for mi in range(NB1):
                        for ka in range(NB1):
                            ah = lds128(sp1h, f1 + (mi * NB1 + ka) * 256).astype(np.float64)
                            bh = th[ka].astype(np.float64)  # [ns, half, lane, 2]
                            if ka == NB1 - 1 and pad_hi:  # T rows 16 ka + 8 .. are padding: k = 8 from a0, a1
                                for ns in range(2):
                                    yr[mi, ns] = mma1688(yr[mi, ns], ah[:, 0], ah[:, 1], bh[ns, 0])
                                continue
                            bl = tl[ka].astype(np.float64)
                            for ns in range(2):
                                yr[mi, ns] = mma16816(yr[mi, ns], ah, bh[ns, 0], bh[ns, 1])
                            if not fast:
                                for ns in range(2):
                                    yr[mi, ns] = mma16816(yr[mi, ns], ah, bl[ns, 0], bl[ns, 1])
                            if lo:
                                al = lds128(sp1l, f1 + (mi * NB1 + ka) * 256).astype(np.float64)
                                for ns in range(2):
                                    yr[mi, ns] = mma16816(yr[mi, ns], al, bh[ns, 0], bh[ns, 1])
                    s = F32(finv * norm)
                    ym = warp_max(np.abs(yr))
                    s_amax[tb] = max(s_amax[tb], F32(ym * s))
                    y[(warp, r)], ysc[(warp, r)] = yr, s
            # (B)
            for warp in range(WARPS):
                for r in range(RMAX):
                    u = warp + r * WARPS
                    if u >= nunits:
                        continue
                    tb, v = divmod(u, U)
                    c, jt = divmod(v, NB2)
                    scale = max(F32(F32(s_amax[tb] * clip_ratio) / F32(QMAX)), F32(1e-8))
                    e0 = c * n1r * n2 + jt * 16 + (2 if left else 4) * T  # lane columns before the exchange
                    inv_scale = F32(F32(1.0) / scale)
                    yr, s = y[(warp, r)], ysc[(warp, r)]
                    rsum = 0
                    for mi in range(NB1):
                        for hr in range(2):
                            row = mi * 16 + G + 8 * hr  # per lane
                            keep = row < n1r  # padding rows are not written
                            e = e0 + row * n2
                            # physical columns 4t .. 4t+3: slots (nj 0, 2t), (0, 2t+1), (1, 2t), (1, 2t+1)
                            vals = [yr[mi, nj, :, 2 * hr + k] for nj in range(2) for k in range(2)]
                            if fast:  # v * ((2^-e * norm) * (1 / scale)) in one FFMA with the magic number:
                                # the exact product (exact in float64) rounded half to even once, then clamped
                                mul = F32(s * inv_scale)
                                qs = [np.clip(np.rint(vv.astype(np.float64) * np.float64(mul)), -QMAX, QMAX)
                                      .astype(np.int64) for vv in vals]
                            else:
                                qs = [
                                    np.clip(np.rint((vv * s).astype(F32) / scale), -QMAX, QMAX).astype(np.int64)
                                    for vv in vals
                                ]
                            base = (m0 + tb) * CB  # straight into the token's row of the output
                            e, qs = e[keep], [qq[keep] for qq in qs]
                            if left:  # columns 2t, 2t+1 and 2t+8, 2t+9 (int8: the kernel exchanges them in the quad
                                # and lane t stores columns 4t .. 4t+3; the same bytes land; int4: two 1-byte stores)
                                z = 8 if out == OUT_U4 else (0 if out == OUT_S8 else 128)
                                cu = [(qq + z) & 0xFF for qq in qs]
                                if out == OUT_U4:
                                    assert np.all(e % 2 == 0)
                                    codes[base + (e >> 1)] = cu[0] | (cu[1] << 4)
                                    codes[base + ((e + 8) >> 1)] = cu[2] | (cu[3] << 4)
                                else:
                                    for k, off in enumerate((0, 1, 8, 9)):
                                        codes[base + e + off] = cu[k]
                                if out == OUT_S8:
                                    rsum += int(sum(int(qq.sum()) for qq in qs))
                            elif out == OUT_U4:
                                w = (qs[0] + 8) | ((qs[1] + 8) << 4) | ((qs[2] + 8) << 8) | ((qs[3] + 8) << 12)
                                assert np.all(e % 4 == 0)
                                codes[base + (e >> 1)] = w & 0xFF
                                codes[base + (e >> 1) + 1] = (w >> 8) & 0xFF
                            else:
                                z = 0 if out == OUT_S8 else 128
                                for k in range(4):
                                    codes[base + e + k] = (qs[k] + z) & 0xFF
                                if out == OUT_S8:
                                    rsum += int(sum(int(qq.sum()) for qq in qs))
                    s_sum[tb] += rsum
            # scales / row sums of the round (the kernel writes them after the next round's barrier, or at the
            # block's end; the accumulators are double-buffered by round parity, so the values are the same)
            for tid in range(nt):
                scales[m0 + tid] = max(F32(F32(s_amax[tid] * clip_ratio) / F32(QMAX)), F32(1e-8))
                corr[m0 + tid] = 128 * s_sum[tid]
                s_amax[tid] = 0
                s_sum[tid] = 0
            buf ^= 1
            rnd += grid

    codes = codes.reshape(M, CB)
    if out == OUT_S8:
        return codes.view(np.int8), scales, corr.astype(np.int32)
    return codes, scales, None
