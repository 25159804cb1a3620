"""The online transform's extra cost in ``act_quant_s8`` alone, LLaMA-7B activation widths, 2048 tokens and 1.

For K = 4096 (Kronecker 64 x 64, Hadamard 4096, and FlatQuant's o_proj transform: 32 heads (x) the identity
of 128) and K = 11008 (Kronecker 86 x 128, Hadamard block 256): the
per-token int8 quantization without a transform, with each transform, and the difference (what the transform
adds), each transform twice: with its factors staged once (``frags``, as ``kernels.dispatch`` runs it) and rebuilt
from the float32 factors in every block (no ``frags``). CUDA-graph-replayed medians over eight input copies
(``benchmarks.kernels.bench``). Run on a CUDA machine: ``python -m benchmarks.act_quant_transform --out DIR``
(prints a table, saves ``act_quant_transform.{json,md}``). The environment switches of the kernel
(``QAAS_ACT_QUANT_WIDE=1`` and the others in kernels/csrc/act_quant.cu) are read once per process: set them on the
command line to time a variant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import kernels
from benchmarks.kernels import bench, kron_heads_case, transform_cases

TOKENS = (2048, 1)
WIDTHS = (4096, 11008)
COPIES = 8


def measure(k: int, m: int, gen: torch.Generator) -> list[dict]:
    ext = kernels._ext.extension()
    clip = torch.tensor(0.95, device="cuda")
    kinds = transform_cases(k, gen) + ([kron_heads_case(k)] if k == 4096 else [])
    xs = [torch.randn(m, k, generator=gen, device="cuda").half() for _ in range(COPIES)]
    rows: list[dict] = []
    base = None
    for name, mode, hb_, a, b, f in kinds:
        for staged, frags in ((True, f), (False, None)) if f is not None else ((False, None),):
            t = bench([lambda x=x, mode=mode, hb_=hb_, a=a, b=b, frags=frags:
                       ext.act_quant_s8(x, clip, mode, hb_, a, b, frags) for x in xs])
            if base is None:
                base = t
            how = "" if mode == 0 else (" (staged once)" if staged else " (rebuilt per block)")
            rows.append(dict(K=k, M=m, transform=name + how, us=t, extra_us=t - base))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    assert kernels.available(), kernels.unavailable_reason()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    env = {k: v for k, v in os.environ.items() if k.startswith("QAAS_ACT_QUANT")}
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [r for m in TOKENS for k in WIDTHS for r in measure(k, m, gen)]
    lines = [
        f"Device: {device}. act_quant_s8 alone, fp16 input; switches: {env or 'defaults'}.",
        "",
        "| tokens | K | transform | time (us) | extra over none (us) |",
        "|---|---|---|---|---|",
    ] + [f"| {r['M']} | {r['K']} | {r['transform']} | {r['us']:.1f} | {r['extra_us']:.1f} |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "act_quant_transform.json").write_text(json.dumps({"device": device, "env": env, "rows": rows}, indent=1))
    (out / "act_quant_transform.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
