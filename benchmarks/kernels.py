"""Kernel benchmarks: qaas CUDA kernels vs torch fp16 (cuBLAS) on LLaMA-7B-shaped layers.

Run on a CUDA machine after ``python -m kernels.build``:
    python -m benchmarks.kernels --out benchmarks/results
Each timing is the median over repeats of CUDA-graph replays of back-to-back calls (so Python launch
overhead is excluded, as in a graph-captured decoder), rotating among enough copies of the inputs
that every call reads its weights from HBM rather than L2. Shapes are ``K x N`` (in x out features).
Roofline per row: max(bytes / measured copy bandwidth, ops / peak rate) over the measured time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from kernels import dispatch, reference
from quant.quantizers.packing import pack_int4
from quant.transforms.kronecker import kron_factors

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TOKENS = [1, 16, 2048]
PEAK_FP16_TFLOPS = 700.0  # brief's figure for this machine (dense fp16, cuBLAS-reachable)
PEAK_INT8_TOPS = 940.0  # brief's figure
L2_DEFEAT_BYTES = 256 << 20


def _captured(fns: list[Callable[[], object]], iters: int) -> torch.cuda.CUDAGraph:
    """``iters`` calls of ``fns`` (rotated) captured in a CUDA graph after three eager rounds, replayed once."""
    for _ in range(3):
        for f in fns:
            f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fns[i % len(fns)]()
    g.replay()
    return g


def _replay_us(g: torch.cuda.CUDAGraph, iters: int) -> float:
    """Microseconds per call of one timed replay of ``g`` (``iters`` calls)."""
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    g.replay()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) * 1e3 / iters


def bench(fns: list[Callable[[], object]], iters: int = 40, reps: int = 9) -> float:
    """Median microseconds per call of CUDA-graph-replayed ``fns`` (rotated)."""
    g = _captured(fns, iters)
    torch.cuda.synchronize()
    times = [_replay_us(g, iters) for _ in range(reps)]
    del g
    return statistics.median(times)


def bench_interleaved(fn_lists: list[list[Callable[[], object]]], iters: int = 40, rounds: int = 9) -> list[float]:
    """Median microseconds per call of each of ``fn_lists`` (as :func:`bench`), their graph replays alternated round by
    round, so that clock and power drift over a long run weigh on all of them alike."""
    graphs = [_captured(fns, iters) for fns in fn_lists]
    torch.cuda.synchronize()
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(rounds):
        for g, t in zip(graphs, times):
            t.append(_replay_us(g, iters))
    del graphs
    return [statistics.median(t) for t in times]


def copies(nbytes: int) -> int:
    return max(1, min(16, -(-L2_DEFEAT_BYTES // max(nbytes, 1))))


def measure_ceilings() -> dict[str, float]:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = bench([lambda: dst.copy_(src)], iters=10, reps=7)
    bw = 2 * n / (us * 1e-6) / 1e12
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    us_mm = bench([lambda: a @ b], iters=5, reps=5)
    ai = torch.randint(-127, 127, (8192, 8192), device="cuda", dtype=torch.int8)
    bi = torch.randint(-127, 127, (8192, 8192), device="cuda", dtype=torch.int8)
    us_i8 = bench([lambda: torch._int_mm(ai, bi.t())], iters=5, reps=5)
    del src, dst, a, b, ai, bi
    torch.cuda.empty_cache()
    return {
        "copy_TBps": bw,
        "fp16_mm_8192_TFLOPs": 2 * 8192**3 / (us_mm * 1e-6) / 1e12,
        "int8_int_mm_8192_TOPs": 2 * 8192**3 / (us_i8 * 1e-6) / 1e12,
    }


def roofline_pct(us: float, nbytes: float, ops: float, peak_ops: float, bw_tbps: float) -> float:
    floor = max(nbytes / (bw_tbps * 1e12), ops / (peak_ops * 1e12))
    return 100.0 * floor / (us * 1e-6)


W4A16_VARIANTS = ["4 warps x 4 blocks, double-buffered (v4)", "8 warps x 4 blocks", "8 warps x 2 blocks",
                  "16 warps x 2 blocks", "16 warps x 1 block",
                  "smem streaming, TMA bulk copies", "smem streaming, 16-byte cp.async",
                  "smem streaming, 16-byte cp.async, PDL"]
# kernels/csrc/w4a16_packed.cu kPackedVariants (one packed scale/zero word per row and group)
W4A16_PACKED_VARIANTS = ["16 warps x 1 block", "16 warps x 1 block, PDL", "16 warps x 1 block, 3 blocks/SM",
                         "16 warps x 1 block, 3 blocks/SM, PDL", "16 warps x 2 blocks", "16 warps x 2 blocks, PDL",
                         "8 warps x 4 blocks", "8 warps x 4 blocks, PDL", "16 warps x 1 block, x staged in shared memory",
                         "16 warps x 1 block, x staged in shared memory, PDL"]
# kernels/csrc/w4a16_packed.cu launch_tiled_variant (codes in reference.pack_w4_tiled order); the rows of the two that
# kernels.dispatch launches at the shape (tiled_decode_variant: plain once a layer's codes are tiled, PDL once they are
# unchanged) are marked "(dispatched)"
W4A16_TILED_VARIANTS = ["16 warps x 1 block", "16 warps x 1 block, PDL", "16 warps x 2 blocks",
                        "16 warps x 2 blocks, PDL", "16 warps x 1 block, 3 blocks/SM", "16 warps x 1 block, 3 blocks/SM, PDL",
                        "16 warps x 1 block x 2 row tiles", "16 warps x 1 block x 2 row tiles, PDL",
                        "persistent, zero points folded", "persistent, zero points folded, PDL",
                        "4 warps x 8 blocks/SM", "4 warps x 8 blocks/SM, PDL"]
PDL_NOTE = " (back-to-back W4A16 calls overlap)"


TransformCase = tuple[str, int, int, "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


def staged_fragments(k: int, mode: int, hb: int, p1: torch.Tensor | None, p2: torch.Tensor | None) -> torch.Tensor | None:
    """The transform staged once for the tensor-core act_quant kernel, as ``kernels.dispatch`` passes it (``frags``;
    None without a transform or where that kernel does not run for fp16 rows of ``k``)."""
    if mode == 0:
        return None
    x = torch.empty(1, k, device="cuda", dtype=torch.float16)
    frags = kernels._ext.extension().act_quant_fragments(x, mode, hb, p1, p2)
    return frags if frags.numel() else None


def transform_cases(k: int, gen: torch.Generator) -> list[TransformCase]:
    """(label, mode, hadamard block, p1, p2, frags) for act_quant on rows of ``k``: no transform, the block Hadamard
    the dispatcher picks for ``k``, and a Kronecker transform of ``kron_factors(k)`` (each factor the identity plus
    a random matrix scaled by 1/sqrt(n): dense, well conditioned), drawn on the GPU from ``gen`` (p1 then p2); frags
    as deployed (``staged_fragments``)."""
    n1, n2 = kron_factors(k)
    p1 = torch.randn(n1, n1, generator=gen, device="cuda") / n1**0.5 + torch.eye(n1, device="cuda")
    p2 = torch.randn(n2, n2, generator=gen, device="cuda") / n2**0.5 + torch.eye(n2, device="cuda")
    hb = dispatch.hadamard_block_for(k)
    return [("none", 0, 0, None, None, None), (f"hadamard b{hb}", 1, hb, None, None, staged_fragments(k, 1, hb, None, None)),
            (f"kronecker {n1}x{n2}", 2, 0, p1, p2, staged_fragments(k, 2, 0, p1, p2))]


def kron_heads_case(k: int, heads: int = 32) -> TransformCase:
    """FlatQuant's deployed o_proj transform on rows of ``k``: a heads factor (identity plus a random matrix scaled
    by 1/sqrt(heads), from its own generator so that ``transform_cases``' draws stay as before) (x) the identity of
    the head dimension, called as ``kernels.dispatch`` calls it for the deployed ``KroneckerTransform``: p2=None
    (left-only Kronecker, the right product skipped)."""
    gen = torch.Generator(device="cuda").manual_seed(1234)
    p1 = torch.randn(heads, heads, generator=gen, device="cuda") / heads**0.5 + torch.eye(heads, device="cuda")
    return (f"kronecker-heads {heads}x{k // heads}", 2, 0, p1, None, staged_fragments(k, 2, 0, p1, None))


def add_w4a16_packed_rows(ext, w4: list, xs4: list, group: int, n: int, k: int, m: int, t_fp16: float,
                          add: Callable[..., None]) -> None:
    """Rows of the packed-metadata decode kernel (``w4a16_gemm_packed``): its variants back to back, the default
    and the PDL variant each after a small torch kernel that writes its activations (the decoder's situation:
    the time of that kernel alone is subtracted), and at 1 token the memory probes over the same byte count."""
    flops = 2.0 * m * n * k
    metas = [reference.pack_w4_meta(q[1], q[2]) for q in w4]
    nbytes = n * k / 2 + 4 * metas[0].numel() + m * k * 2 + m * n * 2
    for pdl, label in ((False, "no PDL"), (True, "PDL as dispatched" + PDL_NOTE)):
        t = bench([lambda q=q, mt=mt, x=x, pdl=pdl: ext.w4a16_gemm_packed(x, q[0], mt, group, None, pdl)
                   for q, mt, x in zip(w4, metas, xs4)])
        add(f"W4A16 packed-meta gemv (qaas, default, {label})", t, nbytes, flops, PEAK_FP16_TFLOPS, t_fp16)
    for v in range(int(ext.w4a16_packed_num_variants())):
        label = W4A16_PACKED_VARIANTS[v] + (PDL_NOTE if "PDL" in W4A16_PACKED_VARIANTS[v] else "")
        t = bench([lambda q=q, mt=mt, x=x, v=v: ext.w4a16_gemm_packed_variant(x, q[0], mt, group, None, v)
                   for q, mt, x in zip(w4, metas, xs4)])
        add(f"W4A16 packed-meta variant {v}: {label}", t, nbytes, flops, PEAK_FP16_TFLOPS, t_fp16)
    # the same kernel over codes in the tiled order (reference.pack_w4_tiled: each 16-byte load covers whole lines)
    tiled = [reference.pack_w4_tiled(q[0]) for q in w4]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dispatched = {dispatch.tiled_decode_variant(n, k, m, sms, pdl) for pdl in (False, True)}
    for v, label in enumerate(W4A16_TILED_VARIANTS):
        t = bench([lambda qt=qt, mt=mt, x=x, v=v: ext.w4a16_gemm_packed_tiled(x, qt, mt, group, None, n, v)
                   for qt, mt, x in zip(tiled, metas, xs4)])
        add(f"W4A16 tiled codes variant {v}: {label}" + (" (dispatched)" if v in dispatched else "")
            + (PDL_NOTE if "PDL" in label else ""), t, nbytes, flops, PEAK_FP16_TFLOPS, t_fp16)
    # after a producer kernel: x = x_src * 1 (a kernel, not a copy-engine memcpy), then the GEMV on x
    xbufs = [torch.empty_like(x) for x in xs4]
    t_prod = bench([lambda x=x, xb=xb: torch.mul(x, 1.0, out=xb) for x, xb in zip(xs4, xbufs)])
    for v, label in ((-1, "default"), (1, "variant 1, PDL")):
        t_pair = bench([lambda q=q, mt=mt, x=x, xb=xb, v=v: (torch.mul(x, 1.0, out=xb),
                                                          ext.w4a16_gemm_packed_variant(xb, q[0], mt, group, None, v))
                        for q, mt, x, xb in zip(w4, metas, xs4, xbufs)])
        add(f"W4A16 packed-meta {label}, after a producer kernel ({t_prod:.1f} us, subtracted)", t_pair - t_prod,
            nbytes, flops, PEAK_FP16_TFLOPS, t_fp16)
    if m == 1:
        probe_bytes = int(n * k / 2 + 4 * metas[0].numel())
        probe_bytes -= probe_bytes % 16
        bufs = [torch.randint(0, 255, (probe_bytes,), dtype=torch.uint8, device="cuda") for _ in range(copies(probe_bytes))]
        for mode, label in ((0, "probe: empty kernel (grid of the one-pass read)"),
                            (1, f"probe: read {probe_bytes / 1e6:.1f} MB, one pass, 4 x 16 B per thread in flight"),
                            (2, f"probe: read {probe_bytes / 1e6:.1f} MB, persistent 4 blocks/SM"),
                            (3, f"probe: read {probe_bytes / 1e6:.1f} MB, persistent 2 blocks/SM, 2 x 16 B per thread"),
                            (4, f"probe: read {probe_bytes / 1e6:.1f} MB, persistent 2 blocks/SM, 4 x 16 B per thread")):
            t = bench([lambda b=b, mode=mode: ext.memory_probe(b, mode) for b in bufs])
            add(label, t, 0 if mode == 0 else probe_bytes, 0.0, PEAK_FP16_TFLOPS)
        del bufs


# kernels/csrc/w4a16_batched.cu kBatchedVariants: tokens x rows per block, warps
W4A16_BATCHED_VARIANTS = ["32 tokens x 64 rows, 2x2 warps of 2 tiles", "32 tokens x 128 rows, 4 warps of 2 tiles (default)",
                          "64 tokens x 64 rows, 4 warps of 1 tile", "32 tokens x 64 rows, 4x2 warps of 1 tile"]


def add_w4a16_batched_rows(ext, w4: list, tiled: list, xs4: list, group: int, n: int, k: int, m: int, t_fp16: float,
                           add: Callable[..., None]) -> None:
    """Rows of the batched W4A16 GEMM (``w4a16_gemm_batched``, tiled codes + packed metadata): the default for ``m``
    tokens (what ``kernels.dispatch`` runs up to ``W4A16_BATCHED_MAX_TOKENS``), every variant, and the default with
    fixed cluster splits of K (the host picks them by occupancy)."""
    flops = 2.0 * m * n * k
    metas = [reference.pack_w4_meta(q[1], q[2]) for q in w4]
    nbytes = n * k / 2 + 4 * metas[0].numel() + m * k * 2 + m * n * 2
    on_sm90 = dispatch.w4a16_sm90_applies(ext, n, k, group)
    dispatched = " (dispatched)" if m <= dispatch.W4A16_BATCHED_MAX_TOKENS and not on_sm90 else ""
    cases = [(-1, -1, "default" + dispatched)]
    cases += [(v, -1, f"variant {v}: {label}") for v, label in enumerate(W4A16_BATCHED_VARIANTS)]
    cases += [(1, s, f"variant 1, {s} cluster splits") for s in (1, 2, 4, 8)]
    for v, splits, label in cases:
        t = bench([lambda qt=qt, mt=mt, x=x, v=v, s=splits: ext.w4a16_gemm_batched(x, qt, mt, group, None, n, v, s)
                   for qt, mt, x in zip(tiled, metas, xs4)])
        add(f"W4A16 batched GEMM (qaas, {label})", t, nbytes, flops, PEAK_FP16_TFLOPS, t_fp16)


# kernels/csrc/w4a16_sm90.cuh configurations: weight rows x tokens x k per tile (codes reordered by w4a16_sm90_reorder)
# kernels/csrc/w8a8_sm90.cuh Cfg0..Cfg3 (the extension's w8a8_gemm_sm90 config argument)
W8A8_SM90_CONFIGS = ["128x128x128 ping-pong, cluster 2x1", "128x256x128 cooperative, cluster 1x2", "64x128x256 ping-pong",
                     "128x256x128 cooperative, cluster 2x1"]
W4A16_SM90_CONFIGS = ["128x32x64", "128x64x64", "128x128x64", "128x256x64", "128x32x128", "128x64x128", "128x128x128"]


def add_w4a16_sm90_rows(ext, w4: list, xs4: list, group: int, n: int, k: int, m: int, t_fp16: float,
                        add: Callable[..., None], fp16_fns: list[Callable[[], object]]) -> None:
    """Rows of the Hopper W4A16 GEMM (``w4a16_gemm_sm90``: CUTLASS mixed-input wgmma, stream-K scheduler): its default
    for ``m`` tokens, every configuration under CUTLASS's decomposition heuristic, and the default configuration
    data-parallel and split into 2 / 4 / 8 K slices."""
    flops = 2.0 * m * n * k
    ops4 = [reference.w4a16_sm90_operands(q[1], q[2]) for q in w4]
    reordered = [ext.w4a16_sm90_reorder(q[0]) for q in w4]
    nbytes = n * k / 2 + 2 * 2 * n * (k // group) + m * k * 2 + m * n * 2
    cases = [(-1, -1, "default (dispatched)" if m > dispatch.GEMV_MAX_TOKENS else "default")]
    cases += [(c, -1, f"cfg {c} {label}") for c, label in enumerate(W4A16_SM90_CONFIGS)]
    cases += [(-1, s, f"default, {'data-parallel' if s == 1 else f'split-K {s}'}") for s in (1, 2, 4, 8)]
    for cfg, splits, label in cases:
        t = bench([lambda c=c, o=o, x=x, cfg=cfg, s=splits: ext.w4a16_gemm_sm90(x, c, o[0], o[1], group, None, cfg, s)
                   for c, o, x in zip(reordered, ops4, xs4)])
        add(f"W4A16 wgmma GEMM (qaas sm90, {label})", t, nbytes, flops, PEAK_FP16_TFLOPS, t_fp16)
    # the default against fp16 cuBLAS once more, replays alternated (the rows above run one after the other over
    # minutes, and at compute-bound sizes the GPU's clocks drift between the first and the last of them)
    t16, t = bench_interleaved([fp16_fns, [lambda c=c, o=o, x=x: ext.w4a16_gemm_sm90(x, c, o[0], o[1], group, None)
                                           for c, o, x in zip(reordered, ops4, xs4)]])
    add(f"W4A16 wgmma GEMM (qaas sm90, default, interleaved with fp16 cuBLAS at {t16:.1f} us)", t, nbytes, flops,
        PEAK_FP16_TFLOPS, t16, fp16_interleaved_us=t16)
    del reordered


def run_shape(k: int, n: int, m: int, bw: float, gen: torch.Generator, sections: set[str]) -> list[dict]:
    """Rows for one (K, N, M). ``gen`` is a CUDA generator: inputs are drawn on the GPU (fresh random
    data, never zeros)."""
    dev = "cuda"
    rows: list[dict] = []
    flops = 2.0 * m * n * k

    def rand_codes(r: int, c: int, bits: int) -> torch.Tensor:
        u = torch.randint(1, 2**bits, (r, c), generator=gen, dtype=torch.uint8, device=dev)
        return pack_int4(u) if bits == 4 else u

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev)

    def add(kernel: str, us: float, nbytes: float, ops: float, peak: float, base: float | None = None, **extra) -> None:
        row = dict(kernel=kernel, us=us, bytes=nbytes, ops=ops, roof=roofline_pct(us, nbytes, ops, peak, bw), **extra)
        if base is not None:
            row["speedup"] = base / us
        rows.append(row)

    # fp16 baseline ------------------------------------------------------------------------------
    nc = copies(n * k * 2)
    ws = [(randn(n, k) / k**0.5).half() for _ in range(nc)]
    xs = [randn(m, k).half() for _ in range(nc)]
    fp16_fns = [lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)]
    t_fp16 = bench(fp16_fns)
    add("fp16 cuBLAS (F.linear)", t_fp16, n * k * 2 + m * k * 2 + m * n * 2, flops, PEAK_FP16_TFLOPS)
    ext = kernels._ext.extension()

    # W4A16 ----------------------------------------------------------------------------------------
    if "w4a16" in sections:
        group = 128
        nc4 = copies(n * k // 2)
        w4 = [(rand_codes(n, k, 4), torch.rand(n, k // group, generator=gen, device=dev) * 0.01,
               torch.randint(0, 16, (n, k // group), generator=gen, device=dev).float()) for _ in range(nc4)]
        xs4 = [xs[i % len(xs)] for i in range(nc4)]
        w4_bytes = n * k / 2 + 2 * 4 * n * (k // group) + m * k * 2 + m * n * 2
        on_sm90 = dispatch.w4a16_sm90_applies(ext, n, k, group)  # past decode: kernels.dispatch runs the Hopper GEMM
        if m <= dispatch.GEMV_MAX_TOKENS:
            t = bench([lambda q=q, x=x: ext.w4a16_gemm(x, q[0], q[1], q[2], group, None) for q, x in zip(w4, xs4)])
            add("W4A16 gemv (qaas, default)", t, w4_bytes, flops, PEAK_FP16_TFLOPS, t_fp16)
            for v in range(int(ext.w4a16_num_variants())):
                t = bench([lambda q=q, x=x, v=v: ext.w4a16_gemm_variant(x, q[0], q[1], q[2], group, None, v)
                           for q, x in zip(w4, xs4)])
                add(f"W4A16 gemv variant {v}: {W4A16_VARIANTS[v]}", t, w4_bytes, flops, PEAK_FP16_TFLOPS, t_fp16)
            add_w4a16_packed_rows(ext, w4, xs4, group, n, k, m, t_fp16, add)
        else:
            t = bench([lambda q=q, x=x: F.linear(x, ext.dequant_w4(q[0], q[1], q[2], group, False)) for q, x in zip(w4, xs4)])
            add("W4A16 dequant+cuBLAS (qaas, row-order codes)", t, w4_bytes, flops, PEAK_FP16_TFLOPS, t_fp16)
            if n % 16 == 0 and k % 128 == 0:  # a layer whose codes a decode call tiled (kernels.dispatch)
                tiled = [reference.pack_w4_tiled(q[0]) for q in w4]
                t = bench([lambda qt=qt, q=q, x=x: F.linear(x, ext.dequant_w4(qt, q[1], q[2], group, True))
                           for qt, q, x in zip(tiled, w4, xs4)])
                dispatched = " (dispatched)" if m > dispatch.W4A16_BATCHED_MAX_TOKENS and not on_sm90 else ""
                add("W4A16 dequant+cuBLAS (qaas, tiled codes)" + dispatched, t, w4_bytes, flops, PEAK_FP16_TFLOPS,
                    t_fp16)
                add_w4a16_batched_rows(ext, w4, tiled, xs4, group, n, k, m, t_fp16, add)
                del tiled
        if on_sm90:
            add_w4a16_sm90_rows(ext, w4, xs4, group, n, k, m, t_fp16, add, fp16_fns)
        del w4
    del ws, fp16_fns
    torch.cuda.empty_cache()

    clip = torch.tensor(0.95, device=dev)
    transforms = transform_cases(k, gen)[1:]

    # W8A8 on Hopper wgmma (CUTLASS collective + qaas epilogue) -------------------------------------
    if "sm90" in sections and ext.has_sm90_gemm():
        wb = n * k
        ncw = copies(wb)
        wq = [(rand_codes(n, k, 8), torch.rand(n, generator=gen, device=dev) * 0.01 + 1e-3) for _ in range(ncw)]
        xq = [xs[i % len(xs)] for i in range(ncw)]
        q0, sa0, c0 = ext.act_quant_s8(xs[0], clip, 0, 0, None, None)
        gemm_bytes = wb + m * k + m * n * 2 + 4 * (2 * m + n)
        best = None
        for cfg, cname in enumerate(W8A8_SM90_CONFIGS):
            t = bench([lambda q=q, cfg=cfg: ext.w8a8_gemm_sm90(q0, sa0, c0, q[0], q[1], None, cfg) for q in wq])
            add(f"W8A8 wgmma GEMM only, cfg {cfg} {cname} (qaas)", t, gemm_bytes, flops, PEAK_INT8_TOPS, t_fp16)
            if best is None or t < best[1]:
                best = (cfg, t)
        assert best is not None
        cfg = best[0]

        def sm90_layer(q, x, mode=0, hb_=0, a=None, b=None, f=None):
            qa, sa, ca = ext.act_quant_s8(x, clip, mode, hb_, a, b, f)
            return ext.w8a8_gemm_sm90(qa, sa, ca, q[0], q[1], None, cfg)

        t_layer = bench([lambda q=q, x=x: sm90_layer(q, x) for q, x in zip(wq, xq)])
        lb = gemm_bytes + m * k * 2
        add(f"W8A8 act_quant_s8 + wgmma GEMM (cfg {cfg}) layer (qaas)", t_layer, lb, flops, PEAK_INT8_TOPS, t_fp16)
        aq_bytes = m * k * 2 + m * k + 8 * m
        t_aq = bench([lambda x=x: ext.act_quant_s8(x, clip, 0, 0, None, None) for x in xq])
        add("W8A8 act_quant_s8 [none] alone", t_aq, aq_bytes, 0.0, PEAK_INT8_TOPS)
        for tname, mode, hb_, a, b, f in transforms:
            t = bench([lambda x=x: ext.act_quant_s8(x, clip, mode, hb_, a, b, f) for x in xq])
            add(f"W8A8 act_quant_s8 [{tname}] alone", t, aq_bytes, 0.0, PEAK_INT8_TOPS)
            tl = bench([lambda q=q, x=x: sm90_layer(q, x, mode, hb_, a, b, f) for q, x in zip(wq, xq)])
            add(f"W8A8 wgmma layer with [{tname}]", tl, lb, flops, PEAK_INT8_TOPS, t_fp16,
                transform_overhead_pct=100.0 * (tl - t_layer) / tl)
        # W4A8 on the same GEMM: int4 codes unpacked to uint8 (+120) per call
        w4q = [(rand_codes(n, k, 4), torch.rand(n, generator=gen, device=dev) * 0.01 + 1e-3) for _ in range(copies(wb // 2))]
        x4 = [xs[i % len(xs)] for i in range(len(w4q))]

        def w4a8_layer(q, x):
            qa, sa, ca = ext.act_quant_s8(x, clip, 0, 0, None, None)
            return ext.w8a8_gemm_sm90(qa, sa, ca, ext.unpack_w4_u8(q[0]), q[1], None, cfg)

        t = bench([lambda q=q: ext.unpack_w4_u8(q[0]) for q in w4q])
        add("W4 unpack_w4_u8 alone", t, 1.5 * wb, 0.0, PEAK_INT8_TOPS)
        t = bench([lambda q=q, x=x: w4a8_layer(q, x) for q, x in zip(w4q, x4)])
        add(f"W4A8 act_quant_s8 + unpack + wgmma GEMM (cfg {cfg}) layer (qaas)", t, wb / 2 + m * k * 3 + m * n * 2,
            flops, PEAK_INT8_TOPS, t_fp16)
        del wq, w4q
        torch.cuda.empty_cache()

    # integer paths on mma.sync: act_quant + int8 tensor-core GEMM (W8A8, W4A8, W4A4) ---------------
    if "int" in sections:
        for a_bits, w_bits in [(8, 8), (8, 4), (4, 4)]:
            wb = n * k * w_bits // 8
            ncw = copies(wb)
            wq = [(rand_codes(n, k, w_bits), torch.rand(n, generator=gen, device=dev) * 0.01 + 1e-3) for _ in range(ncw)]
            xq = [xs[i % len(xs)] for i in range(ncw)]
            label = f"W{w_bits}A{a_bits}"
            codes0, sa0 = ext.act_quant(xs[0], a_bits, clip, 0, 0, None, None)
            t_gemm = bench([lambda q=q: ext.int8_gemm(codes0, a_bits, sa0, q[0], w_bits, q[1], None) for q in wq])
            gemm_bytes = wb + m * k * a_bits / 8 + m * n * 2 + 4 * (m + n)
            add(f"{label} int8-mma GEMM only (qaas)", t_gemm, gemm_bytes, flops, PEAK_INT8_TOPS, t_fp16)

            def layer_fn(q, x, mode=0, hb_=0, a=None, b=None, f=None):
                codes, sa = ext.act_quant(x, a_bits, clip, mode, hb_, a, b, f)
                return ext.int8_gemm(codes, a_bits, sa, q[0], w_bits, q[1], None)

            t_layer = bench([lambda q=q, x=x: layer_fn(q, x) for q, x in zip(wq, xq)])
            lb = gemm_bytes + m * k * 2
            add(f"{label} act_quant+GEMM layer (qaas)", t_layer, lb, flops, PEAK_INT8_TOPS, t_fp16)
            if a_bits == 8 and w_bits == 8 and m > 16:
                qa = (codes0 ^ 0x80).view(torch.int8)
                wi = [((q[0] ^ 0x80).view(torch.int8), q[1]) for q in wq]
                t_im = bench([lambda q=q: torch._int_mm(qa, q[0].t()) for q in wi])
                t_imep = bench([lambda q=q: ext.scale_epilogue(torch._int_mm(qa, q[0].t()), sa0, q[1], None) for q in wi])
                add("W8A8 torch._int_mm only (cuBLASLt)", t_im, gemm_bytes, flops, PEAK_INT8_TOPS, t_fp16)
                add("W8A8 torch._int_mm + qaas epilogue", t_imep, gemm_bytes, flops, PEAK_INT8_TOPS, t_fp16)
            aq_bytes = m * k * 2 + m * k * a_bits / 8 + 4 * m
            aq = bench([lambda x=x: ext.act_quant(x, a_bits, clip, 0, 0, None, None) for x in xq])
            add(f"{label} act_quant [none] alone", aq, aq_bytes, 0.0, PEAK_INT8_TOPS)
            for tname, mode, hb_, a, b, f in transforms:  # fused online transform cost, relative to this layer
                aq = bench([lambda x=x: ext.act_quant(x, a_bits, clip, mode, hb_, a, b, f) for x in xq])
                add(f"{label} act_quant [{tname}] alone", aq, aq_bytes, 0.0, PEAK_INT8_TOPS)
                tl = bench([lambda q=q, x=x: layer_fn(q, x, mode, hb_, a, b, f) for q, x in zip(wq, xq)])
                add(f"{label} layer with [{tname}]", tl, lb, flops, PEAK_INT8_TOPS, t_fp16,
                    transform_overhead_pct=100.0 * (tl - t_layer) / tl)
            del wq
            torch.cuda.empty_cache()
    for r in rows:
        r.update(K=k, N=n, M=m)
    return rows


# The four quantized matmul groups of one LLaMA-7B decoder layer. FlatQuant (and QuaRot / OSTQuant) apply ONE
# online transform per distinct activation: q/k/v share the attention input's, gate/up share the MLP input's.
LLAMA7B_LAYER_GROUPS = [("qkv", 4096, 3 * 4096), ("o_proj", 4096, 4096), ("gate_up", 4096, 2 * 11008),
                        ("down_proj", 11008, 4096)]


LAYER_REPEATS = 5

# What the service's methods apply online before each group (quant/methods): FlatQuant a Kronecker transform before
# every group, o_proj's being the heads factor only, O (x) I_head_dim (the head-dim factor is folded into v_proj's
# output: flatquant.py, right_online=False; dispatch passes no right factor and the kernel skips it); QuaRot and
# OSTQuant one block Hadamard before down_proj (the residual rotation and the per-head Hadamard are folded offline).
DEPLOYED_ONLINE = {
    "kronecker": ("o_proj heads-only", {"qkv": "kronecker", "o_proj": "kronecker-heads", "gate_up": "kronecker",
                                        "down_proj": "kronecker"}),
    "hadamard": ("down_proj only", {"qkv": "none", "o_proj": "none", "gate_up": "none", "down_proj": "hadamard"}),
}


def run_layer_share(m: int, gen: torch.Generator) -> list[dict]:
    """Transform overhead per decoder layer at ``m`` tokens: for each group, act_quant_s8 (+ transform) then the
    wgmma W8A8 GEMM with the group's fused output width; the overhead is summed over the four groups and divided by
    the layer's quantized-matmul time (attention and norms excluded: a conservative denominator). Two readings:
    the direct one (medians of interleaved layer timings) and an additive estimate (the no-transform layers plus
    the transform's extra ``act_quant_s8`` time, measured alone: steadier, since the kernels run back to back)."""
    dev = "cuda"
    ext = kernels._ext.extension()
    rows: list[dict] = []
    clip = torch.tensor(0.95, device=dev)
    totals: dict[str, float] = {}
    group_t: dict[str, dict[str, float]] = {}
    group_aq: dict[str, dict[str, float]] = {}
    for name, k, n in LLAMA7B_LAYER_GROUPS:
        kinds = transform_cases(k, gen)
        if name == "o_proj":
            kinds = kinds + [kron_heads_case(k)]
        ncw = copies(n * k)
        wq = [(torch.randint(1, 256, (n, k), generator=gen, dtype=torch.uint8, device=dev),
               torch.rand(n, generator=gen, device=dev) * 0.01 + 1e-3) for _ in range(ncw)]
        xs = [torch.randn(m, k, generator=gen, device=dev).half() for _ in range(ncw)]
        wf = [(torch.randn(n, k, generator=gen, device=dev) / k**0.5).half() for _ in range(copies(2 * n * k))]
        t_fp16 = bench([lambda w=w, x=x: F.linear(x, w) for w, x in zip(wf, xs)])
        del wf
        q0, sa0, c0 = ext.act_quant_s8(xs[0], clip, 0, 0, None, None)
        cfg = min(range(len(W8A8_SM90_CONFIGS)),
                  key=lambda c: bench([lambda q=q, c=c: ext.w8a8_gemm_sm90(q0, sa0, c0, q[0], q[1], None, c)
                                       for q in wq], iters=20, reps=3))

        def layer(q, x, mode, hb_, a, b, f):
            qa, sa, ca = ext.act_quant_s8(x, clip, mode, hb_, a, b, f)
            return ext.w8a8_gemm_sm90(qa, sa, ca, q[0], q[1], None, cfg)

        # Interleaved repeats (none, hadamard, kronecker, none, ...) and medians: a group's time drifts by a few
        # percent between measurements (clocks), as large as the transform's own cost on the wide groups.
        layer_t: dict[str, list[float]] = {}
        aq_t: dict[str, list[float]] = {}
        for _ in range(LAYER_REPEATS):
            for kind, mode, hb_, a, b, f in kinds:
                label = kind.split(" ")[0]
                layer_t.setdefault(label, []).append(bench(
                    [lambda q=q, x=x, mode=mode, hb_=hb_, a=a, b=b, f=f: layer(q, x, mode, hb_, a, b, f)
                     for q, x in zip(wq, xs)]))
                aq_t.setdefault(label, []).append(bench(
                    [lambda x=x, mode=mode, hb_=hb_, a=a, b=b, f=f: ext.act_quant_s8(x, clip, mode, hb_, a, b, f)
                     for x in xs]))
        aq_none = statistics.median(aq_t["none"])
        t_none = statistics.median(layer_t["none"])
        for kind, *_ in kinds:
            label = kind.split(" ")[0]
            t = statistics.median(layer_t[label])
            aq = statistics.median(aq_t[label])
            totals[label] = totals.get(label, 0.0) + t
            group_t.setdefault(name, {})[label] = t
            group_aq.setdefault(name, {})[label] = aq
            totals[f"aq_extra_{label}"] = totals.get(f"aq_extra_{label}", 0.0) + aq - aq_none
            row = dict(kernel=f"{name}: act_quant_s8 [{kind}] + wgmma GEMM (cfg {cfg})", group=name, us=t, K=k, N=n, M=m,
                       speedup=t_fp16 / t, act_quant_us=aq)
            if label != "none":
                row["transform_overhead_pct"] = 100.0 * (t - t_none) / t
            rows.append(row)
        totals["fp16"] = totals.get("fp16", 0.0) + t_fp16
        rows.append(dict(kernel=f"{name}: fp16 cuBLAS (F.linear)", group=name, us=t_fp16, K=k, N=n, M=m))
        del wq, xs
        torch.cuda.empty_cache()
    for label in ("none", "hadamard", "kronecker"):
        row = dict(kernel=f"LAYER TOTAL (4 groups) [{label}]", us=totals[label], K=0, N=0, M=m,
                   speedup=totals["fp16"] / totals[label])
        if label != "none":
            row["transform_overhead_pct"] = 100.0 * (totals[label] - totals["none"]) / totals[label]
        rows.append(row)
    for label in ("hadamard", "kronecker"):
        extra = totals[f"aq_extra_{label}"]
        rows.append(dict(kernel=f"LAYER ESTIMATE [{label}] = [none] layers + transform's extra act_quant time", K=0, N=0,
                         M=m, us=totals["none"] + extra, transform_overhead_pct=100.0 * extra / (totals["none"] + extra)))
    # As deployed: only the groups each method transforms online pay for it (direct and additive readings)
    deployed_extra: dict[str, float] = {}
    for label, (what, plan) in DEPLOYED_ONLINE.items():
        t = sum(group_t[g][plan[g]] for g in plan)
        rows.append(dict(kernel=f"LAYER TOTAL (4 groups) [{label}, as deployed: {what}]", us=t, K=0, N=0, M=m,
                         speedup=totals["fp16"] / t, transform_overhead_pct=100.0 * (t - totals["none"]) / t))
        extra = deployed_extra[label] = sum(group_aq[g][plan[g]] - group_aq[g]["none"] for g in plan)
        rows.append(dict(kernel=f"LAYER ESTIMATE [{label}, as deployed: {what}] = [none] layers + transform's extra "
                         "act_quant time", K=0, N=0, M=m, us=totals["none"] + extra,
                         transform_overhead_pct=100.0 * extra / (totals["none"] + extra)))
    rows.append(dict(kernel="LAYER TOTAL (4 groups) fp16 cuBLAS", us=totals["fp16"], K=0, N=0, M=m))
    # The rest of the decoder layer, the same with or without quantization (fp16): causal SDPA attention over m
    # tokens (32 heads x 128), two RMSNorms, SwiGLU's silu * mul, two residual adds. The transform's share of the
    # whole decoder layer (a second, wider denominator; the rows above divide by the quantized matmuls alone).
    t_rest = _rest_of_decoder_layer_us(m, gen)
    rows.append(dict(kernel="REST OF DECODER LAYER fp16 (SDPA causal attention, 2 RMSNorm, SiLU*mul, 2 adds)", K=0, N=0,
                     M=m, us=t_rest))
    for label in ("hadamard", "kronecker"):
        extra = totals[f"aq_extra_{label}"]
        full = totals["none"] + t_rest + extra
        rows.append(dict(kernel=f"DECODER LAYER ESTIMATE [{label}] = [none] matmul groups + rest + transform's extra",
                         K=0, N=0, M=m, us=full, transform_overhead_pct=100.0 * extra / full))
    for label, (what, _) in DEPLOYED_ONLINE.items():
        full = totals["none"] + t_rest + deployed_extra[label]
        rows.append(dict(kernel=f"DECODER LAYER ESTIMATE [{label}, as deployed: {what}] = [none] matmul groups + rest + "
                         "transform's extra", K=0, N=0, M=m, us=full,
                         transform_overhead_pct=100.0 * deployed_extra[label] / full))
    return rows


def _rest_of_decoder_layer_us(m: int, gen: torch.Generator, hidden: int = 4096, heads: int = 32,
                              mlp: int = 11008) -> float:
    """fp16 time of a LLaMA-7B decoder layer's non-matmul work at ``m`` tokens (CUDA-graph medians)."""
    dev = "cuda"
    hd = hidden // heads
    q, k, v = (torch.randn(1, heads, m, hd, generator=gen, device=dev).half() for _ in range(3))
    x = torch.randn(m, hidden, generator=gen, device=dev).half()
    r = torch.randn(m, hidden, generator=gen, device=dev).half()
    g = torch.randn(m, mlp, generator=gen, device=dev).half()
    u = torch.randn(m, mlp, generator=gen, device=dev).half()
    w = torch.ones(hidden, device=dev).half()

    def rest() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for _ in range(2):
            F.rms_norm(x, (hidden,), w, 1e-6)
            torch.add(x, r)
        F.silu(g) * u

    return bench([rest])


def layer_markdown(rows: list[dict], device: str) -> str:
    lines = [f"Device: {device}. One LLaMA-7B decoder layer's quantized matmuls (W8A8 wgmma), online transform shared "
             "per activation as in FlatQuant; overhead = (with - without) / with.", "",
             "| group | K x N | M | kernel | time (us) | speedup vs fp16 | transform overhead % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        ov = f"{r['transform_overhead_pct']:.1f}" if "transform_overhead_pct" in r else "-"
        grp = r.get("group", "layer")
        lines.append(f"| {grp} | {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['us']:.1f} | {sp} | {ov} |")
    return "\n".join(lines) + "\n"


def to_markdown(rows: list[dict], ceilings: dict[str, float], device: str) -> str:
    lines = [
        f"Device: {device}. Measured ceilings: copy {ceilings['copy_TBps']:.2f} TB/s (read+write), "
        f"fp16 matmul 8192^3 {ceilings['fp16_mm_8192_TFLOPs']:.0f} TFLOP/s, torch._int_mm 8192^3 "
        f"{ceilings['int8_int_mm_8192_TOPs']:.0f} TOP/s. Roofline % uses the measured copy bandwidth and "
        f"{PEAK_FP16_TFLOPS:.0f} TFLOP/s fp16 / {PEAK_INT8_TOPS:.0f} TOP/s int8.",
        "",
        "| K x N | M | kernel | time (us) | speedup vs fp16 | % roofline | transform overhead % |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        ov = f"{r['transform_overhead_pct']:.1f}" if "transform_overhead_pct" in r else "-"
        lines.append(f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel']} | {r['us']:.1f} | {sp} | {r['roof']:.0f} | {ov} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--sections", default="w4a16,sm90,int,layer", help="comma list of w4a16, sm90, int, layer")
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    t0 = time.time()
    ceilings = measure_ceilings()
    print("ceilings", json.dumps(ceilings), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sections = set(args.sections.split(","))
    rows: list[dict] = []
    if "layer" in sections and kernels._ext.extension().has_sm90_gemm():
        lrows = run_layer_share(2048, gen)
        (out / "layer_transform.json").write_text(json.dumps({"device": device, "rows": lrows}, indent=1))
        lmd = layer_markdown(lrows, device)
        (out / "layer_transform.md").write_text(lmd)
        print(lmd, flush=True)
    for k, n in SHAPES:
        for m in map(int, args.tokens.split(",")):
            rows.extend(run_shape(k, n, m, ceilings["copy_TBps"], gen, sections))
            print(f"done K={k} N={n} M={m} ({time.time() - t0:.0f}s)", flush=True)
    md = to_markdown(rows, ceilings, device)
    (out / "kernels.json").write_text(json.dumps({"device": device, "ceilings": ceilings, "rows": rows}, indent=1))
    (out / "kernels.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
