"""W4A16 decode (1 token) against the number of 16-row tiles per SM: is the tile-aligned work split's tail a cost?

At 4096x11008 the 688 16-row tiles fall 5.2 per SM on a 132-SM H200, so a tile-aligned split gives some SMs six
tiles and the rest five. Timing the tiled decode kernels at output widths that give exactly 4, 5 and 6 tiles per SM
next to 11008 shows where 11008 falls: on the 6-tile time (the tail costs a whole tile round), or on the line
between 5 and 6 (the split does not matter). Any other widths (--n), input width (--k), token count (--tokens) and
set of variants (--variants) time the same way: which tiled variant the dispatcher should take where (kernels.dispatch
tiled_decode_variant). Run on a CUDA machine after ``python -m kernels.build``:
    python -m benchmarks.w4a16_balance --out benchmarks/results
Timings as benchmarks.kernels (CUDA-graph replays of back-to-back calls over copies that defeat L2), interleaved
round by round with fp16 cuBLAS at the same shape.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from benchmarks.kernels import W4A16_TILED_VARIANTS, bench_interleaved, copies
from kernels import reference
from quant.quantizers.packing import pack_int4

GROUP = 128


def tiles_per_sm_widths(sms: int) -> list[int]:
    """Output widths of exactly 4, 5 and 6 16-row tiles per SM, and LLaMA-7B's 11008 (5.2 per SM on 132 SMs)."""
    return sorted({16 * sms * 4, 16 * sms * 5, 11008, 16 * sms * 6})


def variant_label(v: int) -> str:
    return W4A16_TILED_VARIANTS[v] if v < len(W4A16_TILED_VARIANTS) else f"variant {v}"


def time_width(ext, k: int, n: int, variants: list[int], gen: torch.Generator, tokens: int = 1) -> dict:
    """Interleaved medians (us) of fp16 cuBLAS and each tiled variant at K=k, N=n and ``tokens`` rows."""
    nc = copies(n * k // 2)
    codes = [pack_int4(torch.randint(1, 16, (n, k), generator=gen, dtype=torch.uint8, device="cuda")) for _ in range(nc)]
    scales = [torch.rand(n, k // GROUP, generator=gen, device="cuda") * 0.01 + 1e-3 for _ in range(nc)]
    zeros = [torch.randint(0, 16, (n, k // GROUP), generator=gen, device="cuda").float() for _ in range(nc)]
    tiled = [reference.pack_w4_tiled(c) for c in codes]
    metas = [reference.pack_w4_meta(s, z) for s, z in zip(scales, zeros)]
    xs = [torch.randn(tokens, k, generator=gen, device="cuda").half() for _ in range(nc)]
    ncf = copies(n * k * 2)
    ws = [(torch.randn(n, k, generator=gen, device="cuda") / k**0.5).half() for _ in range(ncf)]
    fn_lists = [[lambda w=w, x=x: F.linear(x, w) for w, x in zip(ws, xs * ncf)]]
    for v in variants:
        fn_lists.append([lambda qt=qt, mt=mt, x=x, v=v: ext.w4a16_gemm_packed_tiled(x, qt, mt, GROUP, None, n, v)
                         for qt, mt, x in zip(tiled, metas, xs)])
    times = bench_interleaved(fn_lists)
    return {"N": n, "K": k, "tokens": tokens, "fp16_us": times[0],
            "variants": {str(v): t for v, t in zip(variants, times[1:])}}


def to_markdown(rows: list[dict], variants: list[int], sms: int, device: str) -> str:
    tokens = rows[0].get("tokens", 1)
    lines = [f"W4A16 decode, {tokens} token{'s' if tokens > 1 else ''}, K = {rows[0]['K']}, on {device} ({sms} SMs): "
             "us per call (x fp16)", "",
             "| N | tiles / SM | fp16 cuBLAS | " + " | ".join(f"v{v}: {variant_label(v)}" for v in variants) + " |",
             "|---|---|---|" + "---|" * len(variants)]
    for r in rows:
        cells = [f"{r['variants'][str(v)]:.2f} ({r['fp16_us'] / r['variants'][str(v)]:.2f}x)" for v in variants]
        lines.append(f"| {r['N']} | {r['N'] / 16 / sms:.2f} | {r['fp16_us']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", default="", help="comma list of output widths (default: 4, 5, 6 tiles per SM and 11008)")
    ap.add_argument("--variants", default="3,9", help="comma list of w4a16_gemm_packed_tiled variants")
    ap.add_argument("--tokens", type=int, default=1, help="activation rows (1-16: the decode kernels)")
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    ext = kernels._ext.extension()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    widths = [int(n) for n in args.n.split(",")] if args.n else tiles_per_sm_widths(sms)
    variants = [int(v) for v in args.variants.split(",")]
    gen = torch.Generator(device="cuda").manual_seed(7)
    t0 = time.time()
    rows = []
    for n in widths:
        rows.append(time_width(ext, args.k, n, variants, gen, args.tokens))
        print(f"done N={n} ({time.time() - t0:.0f}s)", flush=True)
    device = torch.cuda.get_device_name()
    md = to_markdown(rows, variants, sms, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "w4a16_balance.json").write_text(json.dumps({"device": device, "sms": sms, "rows": rows}, indent=1))
    (out / "w4a16_balance.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
