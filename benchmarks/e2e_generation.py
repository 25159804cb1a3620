"""End-to-end greedy generation speed: a LLaMA-7B-shaped model (RANDOM weights: speed only, no quality
claim) in fp16 vs quantized W4A16 (g128, asymmetric) and W8A8 (per-channel weights, per-token
activations) through QuantLinear + kernels.dispatch.

    python -m benchmarks.e2e_generation --layers 8 --new-tokens 64 --out benchmarks/results

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

import torch
from torch import nn


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


@torch.no_grad()
def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int, reps: int = 3) -> float:
    def once(nt: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=nt, min_new_tokens=nt, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        assert out.shape[1] == prompt.shape[1] + nt
        return time.perf_counter() - t0

    once(4)  # warm-up
    ts = sorted(once(new_tokens) for _ in range(reps))
    t1 = sorted(once(1) for _ in range(reps))
    return ts[len(ts) // 2], t1[len(t1) // 2]


@torch.no_grad()
def time_graph_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, reps: int = 5) -> dict:
    from benchmarks.graph_decode import GraphedDecodeStep, StaticDecoder

    tokens = prompt[0].tolist()
    dec = StaticDecoder(model, max_len=len(tokens) + new_tokens + 8)
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
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graphed.replay(new_tokens)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    t = sorted(times)[len(times) // 2]
    return {"graph_decode_tokens_per_s": new_tokens / t, "graph_ms_per_token": 1e3 * t / new_tokens,
            "graph_tokens_match_eager": replayed == eager}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    from kernels import available, dispatch, unavailable_reason

    assert available(), unavailable_reason()
    prompt = torch.randint(1, 32000, (1, args.prompt), device="cuda")
    results = {"device": torch.cuda.get_device_name(), "layers": args.layers, "prompt": args.prompt,
               "new_tokens": args.new_tokens, "weights": "random (speed only)", "rows": []}
    for scheme in ["FP16", "W4A16", "W8A8"]:
        model = build_model(args.layers)
        if scheme != "FP16":
            nq = quantize_model(model, scheme)
            from quant.modules.linear import QuantLinear

            q = next(m for m in model.modules() if isinstance(m, QuantLinear))
            x = torch.randn(1, 1, 4096, device="cuda", dtype=torch.float16)
            assert dispatch.supports(q, x), f"{scheme}: dispatch does not take the layer"
        else:
            nq = 0
        t_full, t_one = time_generate(model, prompt, args.new_tokens)
        decode_tps = (args.new_tokens - 1) / (t_full - t_one)
        row = {"scheme": scheme, "quant_linears": nq, "total_s": t_full, "first_token_s": t_one,
               "decode_tokens_per_s": decode_tps, "overall_tokens_per_s": args.new_tokens / t_full,
               "gpu_mem_GiB": torch.cuda.max_memory_allocated() / 2**30}
        try:
            row.update(time_graph_decode(model, prompt, args.new_tokens))
        except Exception as exc:  # report, keep the eager figures
            row["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = results["rows"][0]["decode_tokens_per_s"]
    gbase = results["rows"][0].get("graph_decode_tokens_per_s")
    lines = [
        f"Device: {results['device']}. LLaMA-7B-shaped ({args.layers} of 32 decoder layers, hidden 4096, "
        f"MLP 11008, vocab 32000), RANDOM weights (speed only), batch 1, greedy, prompt {args.prompt}, "
        f"{args.new_tokens} new tokens. Eager: HF generate, median of 3. Graph: static-cache decoder, one "
        f"decode step per CUDA-graph replay, median of 5 (tokens checked equal to the eager decoder's).",
        "",
        "| scheme | graph decode tok/s | vs FP16 | ms/token | eager decode tok/s | vs FP16 | first token (ms) "
        "| peak GPU mem (GiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        g = r.get("graph_decode_tokens_per_s")
        gcol = (f"{g:.1f} | {g / gbase:.2f}x | {r['graph_ms_per_token']:.3f}" if g and gbase
                else f"failed: {r.get('graph_error', '?')} | - | -")
        if g and not r.get("graph_tokens_match_eager", False):
            gcol += " (tokens differ from eager!)"
        lines.append(f"| {r['scheme']} | {gcol} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s'] / base:.2f}x | {1e3 * r['first_token_s']:.1f} | {r['gpu_mem_GiB']:.1f} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_generation.json").write_text(json.dumps(results, indent=1))
    (out / "e2e_generation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
