"""End-to-end greedy generation speed: a LLaMA-7B-shaped model (RANDOM weights: speed only, no quality
claim) in fp16 vs quantized W4A16 (g128, asymmetric) and W8A8 (per-channel weights, per-token
activations) through QuantLinear + kernels.dispatch, and with an fp16 vs int8 (KV8) vs int4 (KV4)
quantized KV cache.

    python -m benchmarks.e2e_generation --layers 8 --new-tokens 64 --out benchmarks/results
    # KV rows only (FP16 weights with FP16 / KV8 / KV4 cache), graph decode timed from position 4000:
    python -m benchmarks.e2e_generation --schemes FP16 --kv 16,8,4 --context 4000 --out benchmarks/results

Rows: every weight scheme of ``--schemes`` with an fp16 KV cache, plus, for each weight scheme of
``--kv-weights`` (default FP16), one row per quantized KV format of ``--kv`` (8 and/or 4 bits,
asymmetric per token per head, no rotation). KV rows use the real quantized caches: eager = HF
``generate`` with ``quant.modules.quantized_kv_cache.QuantizedKVCache`` (``kv_decode_attention`` at
decode); graph = ``StaticDecoder(kv_bits=...)`` (``kv_quantize`` + ``kv_decode_attention`` in the graph).
``--context N`` times the graph decode from position N (positions between the prompt and N are left
unfilled, zero codes: speed only), to see the KV cache at long context where it dominates the bytes.

Two measurements per scheme, batch 1, greedy:
- eager: Hugging Face ``generate`` (dynamic KV cache); per-token time includes Python/launch overhead;
  decode tokens/s = (new_tokens - 1) / (t(new_tokens) - t(1)).
- graph: ``benchmarks.graph_decode.StaticDecoder`` (static KV cache) with one decode step captured in
  a CUDA graph and replayed ``new_tokens`` times, timed with CUDA events: the GPU-bound decode rate.
  Its tokens are first checked equal to the same decoder run eagerly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmarks.graph_decode import KV_BITS


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def quantize_model(model: nn.Module, scheme: str) -> int:
    from quant.modules.linear import QuantLinear, set_module
    from quant.quantizers.weight import quantize_weight_rtn
    from quant.recipes.schema import ActivationQuantSpec, WeightQuantSpec

    if scheme == "W4A16":
        wspec = WeightQuantSpec(bits=4, granularity="per_group", group_size=128, symmetric=False, clip_search=False)
        aspec = ActivationQuantSpec(bits=16)
    elif scheme == "W8A8":
        wspec = WeightQuantSpec(bits=8, granularity="per_channel", symmetric=True, clip_search=False)
        aspec = ActivationQuantSpec(bits=8, symmetric=True)
    else:
        raise ValueError(scheme)
    n = 0
    for name, mod in list(model.model.layers.named_modules()):
        if isinstance(mod, nn.Linear):
            qw = quantize_weight_rtn(mod.weight.detach().float(), wspec)
            q = QuantLinear.from_quantized(qw, mod.bias, aspec, weight_symmetric=wspec.symmetric)
            set_module(model.model.layers, name, q.to("cuda"))  # scales stay float32
            n += 1
    torch.cuda.empty_cache()
    return n


def attach_kv(model: nn.Module, bits: int) -> None:
    """KV-cache quantizers (asymmetric per token per head, no rotation) so the quantized cache can serve it."""
    from quant.models.adapters import get_adapter
    from quant.modules.kv_cache import attach_kv_quantizer
    from quant.recipes.schema import KVCacheQuantSpec

    attach_kv_quantizer(model, get_adapter(model), KVCacheQuantSpec(bits=bits), rotate=False)


@torch.no_grad()
def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, reps: int = 3,
                  cache_factory: Callable[[], Any] | None = None) -> float:
    def once(nt: int) -> float:
        extra = {} if cache_factory is None else {"past_key_values": cache_factory()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=nt, min_new_tokens=nt, do_sample=False, pad_token_id=0,
                             **extra)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + nt
        return time.perf_counter() - t0

    once(4)  # warm-up
    ts = sorted(once(new_tokens) for _ in range(reps))
    t1 = sorted(once(1) for _ in range(reps))
    return ts[len(ts) // 2], t1[len(t1) // 2]


@torch.no_grad()
def time_graph_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, reps: int = 5, kv_bits: int = 16,
                      context: int = 0) -> dict:
    from benchmarks.graph_decode import GraphedDecodeStep, StaticDecoder

    tokens = prompt[0].tolist()
    start = max(len(tokens), context)
    dec = StaticDecoder(model, max_len=start + new_tokens + 8, kv_bits=kv_bits)
    check = min(16, new_tokens)
    eager = dec.generate(tokens, check)
    dec.prefill(tokens)
    graphed = GraphedDecodeStep(dec)
    replayed = [int(dec.ids.item())]
    for _ in range(check - 1):
        graphed.replay(1)
        replayed.append(int(dec.ids.item()))
    times = []
    for _ in range(reps):
        dec.prefill(tokens)
        if context > len(tokens):
            dec.seek(context)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graphed.replay(new_tokens)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    t = sorted(times)[len(times) // 2]
    return {"graph_decode_tokens_per_s": new_tokens / t, "graph_ms_per_token": 1e3 * t / new_tokens,
            "graph_tokens_match_eager": replayed == eager, "graph_start_position": start,
            "kv_cache_MiB": dec.kv_cache_bytes() / 2**20}


SCHEMES = ("FP16", "W4A16", "W8A8")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def plan_rows(schemes: list[str], kv_bits: list[int], kv_weights: list[str]) -> list[tuple[str, int]]:
    """(weight scheme, KV bits) per row: each scheme with an fp16 cache (when 16 is in ``kv_bits``) and each
    quantized KV format for the schemes of ``kv_weights``, in that order; 16 = fp16 cache."""
    for s in schemes + kv_weights:
        if s not in SCHEMES:
            raise ValueError(f"unknown weight scheme {s!r} (one of {SCHEMES})")
    for b in kv_bits:
        if b not in KV_BITS:
            raise ValueError(f"KV bits must be one of {KV_BITS}, got {b}")
    rows: list[tuple[str, int]] = []
    for scheme in schemes:
        if 16 in kv_bits:
            rows.append((scheme, 16))
        if scheme in kv_weights:
            rows += [(scheme, b) for b in kv_bits if b != 16]
    return rows


def row_name(scheme: str, kv_bits: int) -> str:
    return scheme if kv_bits == 16 else f"{scheme} + KV{kv_bits}"


def run_row(scheme: str, kv_bits: int, args: argparse.Namespace, prompt: torch.Tensor) -> dict:
    from kernels import dispatch

    model = build_model(args.layers)
    nq = 0
    if scheme != "FP16":
        from quant.modules.linear import QuantLinear

        nq = quantize_model(model, scheme)
        q = next(m for m in model.modules() if isinstance(m, QuantLinear))
        x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.float16)
        assert dispatch.supports(q, x), f"{scheme}: dispatch does not take the layer"
    row: dict = {"scheme": row_name(scheme, kv_bits), "weights": scheme, "kv_bits": kv_bits, "quant_linears": nq}
    factory = None
    if kv_bits != 16:
        from kernels import ops
        from quant.modules.quantized_kv_cache import QuantizedKVCache

        assert ops.KV_CUDA_KERNELS_REGISTERED, "the extension lacks the KV kernels (kernels/csrc/kv_attention.cu)"
        attach_kv(model, kv_bits)
        factory = lambda: QuantizedKVCache.from_model(model)  # noqa: E731
    try:
        t_full, t_one = time_generate(model, prompt, args.new_tokens, cache_factory=factory)
        row.update({"total_s": t_full, "first_token_s": t_one,
                    "decode_tokens_per_s": (args.new_tokens - 1) / (t_full - t_one),
                    "overall_tokens_per_s": args.new_tokens / t_full})
    except Exception as exc:  # report, keep the graph figures
        row["eager_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        row.update(time_graph_decode(model, prompt, args.new_tokens, kv_bits=kv_bits, context=args.context))
    except Exception as exc:  # report, keep the eager figures
        row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["gpu_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def render(results: dict, args: argparse.Namespace) -> str:
    rows = results["rows"]
    base = next((r.get("decode_tokens_per_s") for r in rows if r["scheme"] == "FP16"), None)
    gbase = next((r.get("graph_decode_tokens_per_s") for r in rows if r["scheme"] == "FP16"), None)
    start = max(args.prompt, args.context)
    lines = [
        f"Device: {results['device']}. LLaMA-7B-shaped ({args.layers} of 32 decoder layers, hidden 4096, "
        f"MLP 11008, vocab 32000, 32 KV heads, head_dim 128), RANDOM weights (speed only), batch 1, greedy, "
        f"prompt {args.prompt}, {args.new_tokens} new tokens. Eager: HF generate (KV rows: with the quantized "
        f"cache `QuantizedKVCache`), median of 3. Graph: static-cache decoder (KV rows: int8/int4 static cache, "
        f"`kv_quantize` + `kv_decode_attention`), one decode step per CUDA-graph replay, median of 5, decode "
        f"timed from position {start}{' (unfilled context: speed only)' if args.context > args.prompt else ''} "
        f"(tokens checked equal to the eager static decoder's). Ratios vs the FP16 row.",
        "",
        "| scheme | graph decode tok/s | vs FP16 | ms/token | KV cache (MiB) | eager decode tok/s | vs FP16 "
        "| first token (ms) | peak GPU mem (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r.get("graph_decode_tokens_per_s")
        if g:
            gcol = f"{g:.1f} | {_ratio(g, gbase)} | {r['graph_ms_per_token']:.3f} | {r['kv_cache_MiB']:.1f}"
            if not r.get("graph_tokens_match_eager", False):
                gcol += " (tokens differ from eager!)"
        else:
            gcol = f"failed: {r.get('graph_error', '?')} | - | - | -"
        e = r.get("decode_tokens_per_s")
        ecol = (f"{e:.1f} | {_ratio(e, base)} | {1e3 * r['first_token_s']:.1f}" if e
                else f"failed: {r.get('eager_error', '?')} | - | -")
        lines.append(f"| {r['scheme']} | {gcol} | {ecol} | {r['gpu_mem_GiB']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--schemes", default="FP16,W4A16,W8A8", help="weight schemes (comma list)")
    ap.add_argument("--kv", default="16,8,4", help="KV cache bits of the rows: 16 (fp16), 8, 4 (comma list)")
    ap.add_argument("--kv-weights", default="FP16", help="weight schemes that get the quantized-KV rows")
    ap.add_argument("--context", type=int, default=0, help="time the graph decode from this position")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    from kernels import available, unavailable_reason

    plan = plan_rows(_csv(args.schemes), [int(b) for b in _csv(args.kv)], _csv(args.kv_weights))
    assert available(), unavailable_reason()
    prompt = torch.randint(1, 32000, (1, args.prompt), device="cuda")
    results = {"device": torch.cuda.get_device_name(), "layers": args.layers, "prompt": args.prompt,
               "new_tokens": args.new_tokens, "context": args.context, "weights": "random (speed only)", "rows": []}
    for scheme, kv_bits in plan:
        row = run_row(scheme, kv_bits, args, prompt)
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    md = render(results, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_generation.json").write_text(json.dumps(results, indent=1))
    (out / "e2e_generation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
