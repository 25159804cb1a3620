"""Train ``qaas/llama-small``: a small LLaMA-architecture causal LM on the vendored python-docs corpus.

Depends only on torch, transformers, tokenizers and safetensors (runs on the GPU machine, which has no
pydantic), so the corpus split of :mod:`quant.calibration.corpus` is re-implemented here: a document is
held out for evaluation when the SHA-256 of its id falls below 0.10 of the hash range (the same rule);
of the rest (the calibration split), documents in [0.10, 0.13) are a validation set used for model
selection only, and the remainder is the training set.

Two stages, each runnable alone:

``tokenizer``  trains a byte-level BPE (vocabulary 4096, ``<s>`` prepended) with the ``tokenizers``
               library on the training documents and saves it HF-format into ``--model-dir`` (CPU, seconds).
``train``      trains the model with AdamW + cosine decay for several (epoch budget, residual dropout)
               settings (shortest first, as time allows), keeps the checkpoint (evaluated every tenth of
               a run) with the lowest validation loss, reports its held-out
               perplexity (windows exactly as ``build_eval_data`` makes them: consecutive, ``<s>`` + 511
               tokens, documents sorted by id and joined by ``</s>``), and writes the fp16 weights as
               safetensors shards of < 16 MiB plus ``result.json`` into ``--out``.
``assemble``   turns those shards + ``result.json`` into ``model.safetensors``, ``config.json`` and
               ``generation_config.json`` in ``--model-dir``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "quant" / "data" / "python_docs.jsonl.gz"
EVAL_FRACTION = 0.10
VAL_FRACTION = 0.03
VOCAB = 4096
ARCH = dict(
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    hidden_act="silu",
    initializer_range=0.02,
)


def _bucket(doc_id: str) -> float:
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") / 2**64


def load_splits() -> dict[str, list[tuple[str, str]]]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
        docs = sorted((rec["id"], rec["text"]) for rec in map(json.loads, fh) if rec.get("text"))
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "eval": []}
    for doc in docs:
        b = _bucket(doc[0])
        key = "eval" if b < EVAL_FRACTION else "val" if b < EVAL_FRACTION + VAL_FRACTION else "train"
        splits[key].append(doc)
    return splits


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(model_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    splits = load_splits()
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((text for _, text in splits["train"]), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A </s> <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=ARCH["max_position_embeddings"]
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(model_dir)
    # name the class every transformers release knows (5.x maps it to its tokenizers backend)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    chars = sum(len(t) for _, t in splits["train"])
    ntok = sum(len(ids) for ids in tok.encode_batch([t for _, t in splits["train"]]))
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train split {chars} chars -> {ntok} tokens ({chars / ntok:.2f} chars/token)")


# ---------------------------------------------------------------------------------------------- data
def stream(tok, docs: list[tuple[str, str]], eos: int) -> torch.Tensor:
    out: list[int] = []
    for ids in tok([t for _, t in docs], add_special_tokens=False)["input_ids"]:
        out.extend(ids)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


def eval_windows(s: torch.Tensor, bos: int, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows: ``<s>`` + ``seq_len - 1`` tokens (as build_eval_data makes them)."""
    n = (len(s) // (seq_len - 1)) if limit is None else min(limit, len(s) // (seq_len - 1))
    body = s[: n * (seq_len - 1)].view(n, seq_len - 1)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), body], dim=1)


@torch.no_grad()
def mean_loss(model, windows: torch.Tensor, device: str, batch: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i : i + batch].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    model.train()
    return total / count


# ---------------------------------------------------------------------------------------------- training
def add_residual_dropout(model, p: float) -> None:
    """GPT-2-style dropout on the embeddings and on each attention / MLP output (training only; hooks,
    so nothing of it is saved with the weights)."""
    if p <= 0:
        return
    drop = torch.nn.functional.dropout
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: drop(o, p, m.training))
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda m, i, o: (drop(o[0], p, m.training), *o[1:]))
        layer.mlp.register_forward_hook(lambda m, i, o: drop(o, p, m.training))


def train_one(train_s, val_w, args, epochs: float, dropout: float, device: str, log: list) -> tuple[float, dict, float]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, attention_dropout=0.0, **ARCH)
    model = LlamaForCausalLM(cfg).to(device)
    add_residual_dropout(model, dropout)
    tokens_per_step = args.batch * args.seq_len
    steps = max(1, int(epochs * len(train_s) / tokens_per_step))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device == "cuda",
    )
    warmup = min(200, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    best = (float("inf"), None, 0)
    eval_every = max(50, steps // 10)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_s) - args.seq_len, (args.batch,), generator=gen)
        ids = torch.stack([train_s[s : s + args.seq_len] for s in starts.tolist()]).to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = mean_loss(model, val_w, device)
            entry = {"epochs": epochs, "dropout": dropout, "step": step + 1, "train_loss": loss.item(), "val_loss": val,
                     "lr": lr_at(step), "seconds": time.perf_counter() - start}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if val < best[0]:
                best = (val, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}, step + 1)
    seconds = time.perf_counter() - start
    return best[0], {"state": best[1], "step": best[2], "steps": steps, "config": cfg.to_dict()}, seconds


def train(args) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    splits = load_splits()
    train_s = stream(tok, splits["train"], eos)
    val_w = eval_windows(stream(tok, splits["val"], eos), bos, 512, args.max_windows)
    eval_w = eval_windows(stream(tok, splits["eval"], eos), bos, 512, args.max_windows)
    print(f"tokens: train {len(train_s)}, val windows {len(val_w)}, held-out windows {len(eval_w)} (512 tokens)", flush=True)

    log: list[dict] = []
    results = []
    budget_start = time.perf_counter()
    per_epoch = None
    for item in args.sweep:
        epochs, dropout = (float(x) for x in item.split(":"))
        if per_epoch is not None and (time.perf_counter() - budget_start) + per_epoch * epochs > args.time_budget:
            print(f"skipping {item}: over the time budget", flush=True)
            continue
        val, ckpt, seconds = train_one(train_s, val_w, args, epochs, dropout, device, log)
        per_epoch = seconds / epochs
        results.append({"epochs": epochs, "dropout": dropout, "best_val_loss": val, "best_step": ckpt["step"],
                        "steps": ckpt["steps"], "seconds": seconds})
        print(json.dumps(results[-1]), flush=True)
        if val <= min(r["best_val_loss"] for r in results):
            chosen = (item, ckpt)

    epochs, ckpt = chosen
    cfg = LlamaConfig(**{k: v for k, v in ckpt["config"].items() if k not in ("architectures", "transformers_version")})
    model = LlamaForCausalLM(cfg).to(device)
    model.load_state_dict(ckpt["state"])
    model.eval()
    held_out = {}
    for seq_len in (512, 1024):
        w = eval_windows(stream(tok, splits["eval"], eos), bos, seq_len, args.max_windows)
        held_out[str(seq_len)] = {"windows": len(w), "ppl": math.exp(mean_loss(model, w, device, batch=16))}
    held_out_fp16 = math.exp(mean_loss(model.half(), eval_w, device))
    print(f"chosen: {epochs} epochs (step {ckpt['step']}/{ckpt['steps']}); held-out ppl {held_out}, fp16 {held_out_fp16:.3f}", flush=True)

    state = {k: v.half().contiguous() for k, v in ckpt["state"].items()}
    shards: list[dict] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if size + nbytes > 12 * 2**20 and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    for i, shard in enumerate(shards):
        save_file(shard, str(out / f"shard-{i}.safetensors"))
    n_params = sum(v.numel() for v in state.values())
    result = {
        "config": ckpt["config"],
        "chosen_epochs": epochs,
        "chosen_step": ckpt["step"],
        "parameters": n_params,
        "train_tokens": len(train_s),
        "held_out_ppl": held_out,
        "held_out_ppl_fp16_512": held_out_fp16,
        "sweep": results,
        "log": log,
        "hyperparameters": {k: getattr(args, k) for k in ("lr", "batch", "seq_len", "weight_decay", "seed", "sweep")},
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shards": len(shards),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))


def assemble(args) -> None:
    from safetensors.torch import load_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    src = Path(args.out)
    result = json.loads((src / "result.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for i in range(result["shards"]):
        state.update(load_file(str(src / f"shard-{i}.safetensors")))
    cfg_dict = {k: v for k, v in result["config"].items() if k not in ("architectures", "transformers_version", "dtype", "torch_dtype")}
    cfg = LlamaConfig(**cfg_dict)
    cfg.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("rotary" not in m for m in missing):
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    model = model.half()
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    model.save_pretrained(args.model_dir)
    (Path(args.model_dir) / "training.json").write_text(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=1))
    print(f"assembled {sum(v.numel() for v in state.values())} parameters into {args.model_dir}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=["tokenizer", "train", "assemble"])
    p.add_argument("--model-dir", default=str(REPO / "models" / "qaas-llama-small"))
    p.add_argument("--out", default="train_out")
    p.add_argument("--sweep", nargs="+", default=["6:0", "12:0", "24:0", "48:0"],
                   help="EPOCHS:RESIDUAL_DROPOUT runs, shortest first; the lowest validation loss wins "
                        "(the default is the sweep that produced the committed weights)")
    p.add_argument("--time-budget", type=float, default=400.0, help="seconds of training for the whole sweep")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-windows", type=int, default=None, help="cap validation/held-out windows (smoke tests)")
    args = p.parse_args()
    if args.stage == "tokenizer":
        train_tokenizer(Path(args.model_dir))
    elif args.stage == "train":
        train(args)
    else:
        assemble(args)


if __name__ == "__main__":
    main()
