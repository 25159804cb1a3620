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
from kernels import dispatch
from quant.quantizers.packing import pack_int4

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
TOKENS = [1, 16, 2048]
PEAK_FP16_TFLOPS = 700.0  # brief's figure for this machine (dense fp16, cuBLAS-reachable)
PEAK_INT8_TOPS = 940.0  # brief's figure
L2_DEFEAT_BYTES = 256 << 20


def bench(fns: list[Callable[[], object]], iters: int = 40, reps: int = 9) -> float:
    """Median microseconds per call of CUDA-graph-replayed ``fns`` (rotated)."""
    for _ in range(3):
        for f in fns:
            f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(iters):
            fns[i % len(fns)]()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / iters)
    del g
    return statistics.median(times)


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


def run_shape(k: int, n: int, m: int, bw: float, gen: torch.Generator) -> list[dict]:
    dev = "cuda"
    rows: list[dict] = []
    flops = 2.0 * m * n * k

    def rand_codes(r: int, c: int, bits: int) -> torch.Tensor:
        u = torch.randint(1, 2**bits, (r, c), generator=gen, dtype=torch.uint8)
        return (pack_int4(u) if bits == 4 else u).to(dev)

    # fp16 baseline ------------------------------------------------------------------------------
    nc = copies(n * k * 2)
    ws = [(torch.randn(n, k, generator=gen) / k**0.5).half().to(dev) for _ in range(nc)]
    xs = [torch.randn(m, k, generator=gen).half().to(dev) for _ in range(nc)]
    t_fp16 = bench([lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs)])
    fp16_bytes = n * k * 2 + m * k * 2 + m * n * 2
    rows.append(dict(kernel="fp16 cuBLAS (F.linear)", us=t_fp16, bytes=fp16_bytes, ops=flops,
                     roof=roofline_pct(t_fp16, fp16_bytes, flops, PEAK_FP16_TFLOPS, bw)))
    del ws
    torch.cuda.empty_cache()

    # W4A16 ----------------------------------------------------------------------------------------
    group = 128
    nc4 = copies(n * k // 2)
    w4 = [(rand_codes(n, k, 4), (torch.rand(n, k // group, generator=gen) * 0.01).to(dev),
           torch.randint(0, 16, (n, k // group), generator=gen).float().to(dev)) for _ in range(nc4)]
    xs4 = [xs[i % len(xs)] for i in range(nc4)]
    ext = kernels._ext.extension()
    if m <= dispatch.GEMV_MAX_TOKENS:
        fn = [lambda q=q, x=x: ext.w4a16_gemm(x, q[0], q[1], q[2], group, None) for q, x in zip(w4, xs4)]
        name = "W4A16 gemv (qaas)"
    else:
        fn = [lambda q=q, x=x: F.linear(x, ext.dequant_w4(q[0], q[1], q[2], group)) for q, x in zip(w4, xs4)]
        name = "W4A16 dequant+cuBLAS (qaas)"
    t = bench(fn)
    w4_bytes = n * k / 2 + 2 * 4 * n * (k // group) + m * k * 2 + m * n * 2
    rows.append(dict(kernel=name, us=t, bytes=w4_bytes, ops=flops, speedup=t_fp16 / t,
                     roof=roofline_pct(t, w4_bytes, flops, PEAK_FP16_TFLOPS, bw)))
    del w4
    torch.cuda.empty_cache()

    # integer paths: act_quant + int8 tensor-core GEMM ---------------------------------------------
    clip = torch.tensor(0.95, device=dev)
    for a_bits, w_bits in [(8, 8), (8, 4), (4, 4)]:
        wb = n * k * w_bits // 8
        ncw = copies(wb)
        wq = [(rand_codes(n, k, w_bits), (torch.rand(n, generator=gen) * 0.01 + 1e-3).to(dev)) for _ in range(ncw)]
        xq = [xs[i % len(xs)] for i in range(ncw)]
        label = f"W{w_bits}A{a_bits}"
        codes0, sa0 = ext.act_quant(xs[0], a_bits, clip, 0, 0, None, None)
        t_gemm = bench([lambda q=q: ext.int8_gemm(codes0, a_bits, sa0, q[0], w_bits, q[1], None) for q in wq])
        gemm_bytes = wb + m * k * a_bits / 8 + m * n * 2 + 4 * (m + n)
        rows.append(dict(kernel=f"{label} int8-mma GEMM only (qaas)", us=t_gemm, bytes=gemm_bytes, ops=flops,
                         speedup=t_fp16 / t_gemm, roof=roofline_pct(t_gemm, gemm_bytes, flops, PEAK_INT8_TOPS, bw)))

        def layer_fn(q, x, mode=0, hb=0, p1=None, p2=None):
            codes, sa = ext.act_quant(x, a_bits, clip, mode, hb, p1, p2)
            return ext.int8_gemm(codes, a_bits, sa, q[0], w_bits, q[1], None)

        t_layer = bench([lambda q=q, x=x: layer_fn(q, x) for q, x in zip(wq, xq)])
        lb = gemm_bytes + m * k * 2
        rows.append(dict(kernel=f"{label} act_quant+GEMM layer (qaas)", us=t_layer, bytes=lb, ops=flops,
                         speedup=t_fp16 / t_layer, roof=roofline_pct(t_layer, lb, flops, PEAK_INT8_TOPS, bw)))
        if a_bits == 8 and w_bits == 8 and m > 16:
            qa = (codes0 ^ 0x80).view(torch.int8)
            wi = [((q[0] ^ 0x80).view(torch.int8), q[1]) for q in wq]
            t_im = bench([lambda q=q: torch._int_mm(qa, q[0].t()) for q in wi])
            t_imep = bench([lambda q=q: ext.scale_epilogue(torch._int_mm(qa, q[0].t()), sa0, q[1], None) for q in wi])
            rows.append(dict(kernel="W8A8 torch._int_mm only (cuBLASLt)", us=t_im, bytes=gemm_bytes, ops=flops,
                             speedup=t_fp16 / t_im, roof=roofline_pct(t_im, gemm_bytes, flops, PEAK_INT8_TOPS, bw)))
            rows.append(dict(kernel="W8A8 torch._int_mm + qaas epilogue", us=t_imep, bytes=gemm_bytes, ops=flops,
                             speedup=t_fp16 / t_imep, roof=roofline_pct(t_imep, gemm_bytes, flops, PEAK_INT8_TOPS, bw)))
        # fused online transform cost, relative to this layer (act_quant + GEMM, no transform)
        hb = dispatch.hadamard_block_for(k)
        n1 = {4096: 64, 11008: 86}[k]
        p1 = torch.randn(n1, n1, generator=gen).to(dev)
        p2 = torch.randn(k // n1, k // n1, generator=gen).to(dev)
        for tname, mode, extra in [("none", 0, {}), (f"hadamard b{hb}", 1, {"hb": hb}),
                                   (f"kronecker {n1}x{k // n1}", 2, {"p1": p1, "p2": p2})]:
            aq = bench([lambda x=x: ext.act_quant(x, a_bits, clip, mode, extra.get("hb", 0), extra.get("p1"), extra.get("p2"))
                        for x in xq])
            aq_bytes = m * k * 2 + m * k * a_bits / 8 + 4 * m
            rows.append(dict(kernel=f"{label} act_quant [{tname}] alone", us=aq, bytes=aq_bytes, ops=0.0,
                             roof=roofline_pct(aq, aq_bytes, 0.0, PEAK_INT8_TOPS, bw)))
            if mode:
                tl = bench([lambda q=q, x=x: layer_fn(q, x, mode, extra.get("hb", 0), extra.get("p1"), extra.get("p2"))
                            for q, x in zip(wq, xq)])
                rows.append(dict(kernel=f"{label} layer with [{tname}]", us=tl, bytes=lb, ops=flops,
                                 speedup=t_fp16 / tl, transform_overhead_pct=100.0 * (tl - t_layer) / tl,
                                 roof=roofline_pct(tl, lb, flops, PEAK_INT8_TOPS, bw)))
        del wq
        torch.cuda.empty_cache()
    for r in rows:
        r.update(K=k, N=n, M=m)
    return rows


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
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    t0 = time.time()
    ceilings = measure_ceilings()
    print("ceilings", json.dumps(ceilings), flush=True)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for k, n in SHAPES:
        for m in map(int, args.tokens.split(",")):
            rows.extend(run_shape(k, n, m, ceilings["copy_TBps"], gen))
            print(f"done K={k} N={n} M={m} ({time.time() - t0:.0f}s)", flush=True)
    md = to_markdown(rows, ceilings, device)
    (out / "kernels.json").write_text(json.dumps({"device": device, "ceilings": ceilings, "rows": rows}, indent=1))
    (out / "kernels.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
