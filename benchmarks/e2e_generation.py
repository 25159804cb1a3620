"""End-to-end greedy generation speed: a LLaMA-7B-shaped model (RANDOM weights: speed only, no quality
claim) in fp16 vs quantized W4A16 (g128, asymmetric) and W8A8 (per-channel weights, per-token
activations) through QuantLinear + kernels.dispatch.

    python -m benchmarks.e2e_generation --layers 8 --new-tokens 64 --out benchmarks/results

Generation is Hugging Face ``generate`` in eager mode (batch 1, greedy, dynamic KV cache), so per-token
time includes Python/launch overhead; the decode tokens/s is (new_tokens - 1) / (t(new_tokens) - t(1)).
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
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = results["rows"][0]["decode_tokens_per_s"]
    lines = [
        f"Device: {results['device']}. LLaMA-7B-shaped ({args.layers} of 32 decoder layers, hidden 4096, "
        f"MLP 11008, vocab 32000), RANDOM weights (speed only). HF generate, eager, batch 1, greedy, "
        f"prompt {args.prompt}, {args.new_tokens} new tokens; median of 3.",
        "",
        "| scheme | decode tok/s | vs FP16 | overall tok/s | first token (ms) | peak GPU mem (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['scheme']} | {r['decode_tokens_per_s']:.1f} | {r['decode_tokens_per_s'] / base:.2f}x | "
                     f"{r['overall_tokens_per_s']:.1f} | {1e3 * r['first_token_s']:.1f} | {r['gpu_mem_GiB']:.1f} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e_generation.json").write_text(json.dumps(results, indent=1))
    (out / "e2e_generation.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
