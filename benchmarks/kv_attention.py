"""Decode attention over a quantized KV cache: qaas int8 / int4 kernels vs torch fp16 SDPA on an fp16 cache.

Run on a CUDA machine after ``python -m kernels.build``:
    python -m benchmarks.kv_attention --out DIR
One decode step (one query token per sequence, all sequences at length L), Hq = 32 query heads, head_dim 128.
The fp16 baseline is ``F.scaled_dot_product_attention`` on an fp16 cache with the query heads of each KV head
folded into the query length (GQA without replicating K/V).
Timings are medians of CUDA-graph replays of back-to-back calls, rotating among enough cache copies that
every call streams its cache from HBM rather than L2 (as benchmarks/kernels.py does). GB/s counts the
bytes a step must move: the cache codes plus scale/zero (fp32) plus q and out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from benchmarks.kernels import bench, copies  # the same CUDA-graph timing and L2-defeating rotation

HQ, D = 32, 128
BATCHES = [1, 16]
KV_HEADS = [32, 8]
LENGTHS = [1024, 4096, 16384]


def step_bytes(b: int, hkv: int, length: int, bits: int) -> int:
    """Bytes one decode step must move: K and V (codes + fp32 scale and zero per token per head), q, out."""
    per_token = 2 * D * 2 if bits == 16 else 2 * (D * bits // 8 + 8)
    return b * hkv * length * per_token + 2 * b * HQ * D * 2


def time_fp16(b: int, hkv: int, length: int) -> float:
    n = copies(step_bytes(b, hkv, length, 16))
    # GQA folded into the query length: the HQ/hkv query heads of a KV head are the query rows of one
    # non-causal attention over that head's cache (same math, cache read once, flash backend eligible)
    q = torch.randn(b, hkv, HQ // hkv, D, device="cuda", dtype=torch.float16)
    caches = [
        (torch.randn(b, hkv, length, D, device="cuda", dtype=torch.float16),
         torch.randn(b, hkv, length, D, device="cuda", dtype=torch.float16))
        for _ in range(n)
    ]
    fns = [lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v) for k, v in caches]
    us = bench(fns)
    del caches
    torch.cuda.empty_cache()
    return us


def time_quantized(b: int, hkv: int, length: int, bits: int) -> float:
    n = copies(step_bytes(b, hkv, length, bits))
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.float16)
    lens = torch.full((b,), length, dtype=torch.int32, device="cuda")
    caches = []
    for _ in range(n):
        k = torch.ops.qaas.kv_quantize(torch.randn(b, hkv, length, D, device="cuda", dtype=torch.float16), bits, False, 1.0)
        v = torch.ops.qaas.kv_quantize(torch.randn(b, hkv, length, D, device="cuda", dtype=torch.float16), bits, False, 1.0)
        caches.append((*k, *v))
    fns = [lambda c=c: torch.ops.qaas.kv_decode_attention(q, *c, bits, lens, D**-0.5) for c in caches]
    us = bench(fns)
    del caches
    torch.cuda.empty_cache()
    return us


def run_config(b: int, hkv: int, length: int) -> list[dict]:
    rows = []
    base = time_fp16(b, hkv, length)
    for name, bits in (("torch fp16 SDPA", 16), ("qaas int8 KV", 8), ("qaas int4 KV", 4)):
        us = base if bits == 16 else time_quantized(b, hkv, length, bits)
        nbytes = step_bytes(b, hkv, length, bits)
        rows.append({
            "batch": b, "q_heads": HQ, "kv_heads": hkv, "head_dim": D, "length": length, "kernel": name,
            "bits": bits, "us": us, "speedup_vs_fp16": base / us, "bytes": nbytes, "GBps": nbytes / (us * 1e-6) / 1e9,
        })
        print(f"B={b} Hkv={hkv} L={length} {name}: {us:.1f} us, {rows[-1]['GBps']:.0f} GB/s", flush=True)
    return rows


def to_markdown(rows: list[dict], device: str) -> str:
    lines = [
        f"# KV-cache decode attention ({device})",
        "",
        f"One decode step, Hq={HQ}, head_dim={D}, all sequences at length L; CUDA-graph replay medians, caches "
        "rotated past L2. GB/s = bytes a step must move (codes + fp32 scale/zero + q/out) / time.",
        "",
        "| B | Hkv | L | kernel | time (us) | speedup vs fp16 | MB moved | GB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['kv_heads']} | {r['length']} | {r['kernel']} | {r['us']:.1f} | "
            f"{r['speedup_vs_fp16']:.2f}x | {r['bytes'] / 1e6:.1f} | {r['GBps']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.kv_attention needs CUDA")
    if not (kernels.available() and kernels.ops.KV_CUDA_KERNELS_REGISTERED):
        raise SystemExit(f"qaas kv kernels not built: {kernels.unavailable_reason() or 'rebuild with kv_attention.cu'}")
    device = torch.cuda.get_device_name()
    rows: list[dict] = []
    for b in BATCHES:
        for hkv in KV_HEADS:
            for length in LENGTHS:
                rows += run_config(b, hkv, length)
    md = to_markdown(rows, device)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_attention.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    (out / "kv_attention.md").write_text(md)


if __name__ == "__main__":
    main()
