"""Greedy decoding of a Hugging Face LLaMA-family model with a static KV cache, one token per step,
written with the model's own modules (norms, projections, MLP, rotary embedding) so that a whole
decode step can be captured in one CUDA graph and replayed without Python.

Used by ``benchmarks/e2e_generation.py`` to measure decode tokens/s where the GPU, not the Python
interpreter, sets the pace (HF ``generate`` in eager mode at batch 1 is launch-bound). Quantized
layers (``QuantLinear``) run through ``kernels.dispatch`` like anywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StaticDecoder:
    """Batch-1 greedy decoder over ``model`` (a ``LlamaForCausalLM``-like model) with a KV cache of
    ``max_len`` positions. State lives in tensors (``ids``, ``pos``) so :meth:`step` has no Python-side
    dependence on the position and can be captured in a CUDA graph."""

    def __init__(self, model: nn.Module, max_len: int) -> None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb
        self.model = model
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        emb = model.get_input_embeddings().weight
        dev, dt = emb.device, emb.dtype
        self.max_len = max_len
        shape = (1, self.kv_heads, max_len, self.head_dim)
        layers = model.model.layers
        self.k_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in layers]
        self.v_cache = [torch.zeros(shape, device=dev, dtype=dt) for _ in layers]
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.positions = torch.arange(max_len, device=dev)

    @torch.no_grad()
    def step(self) -> None:
        """Consume ``ids`` at position ``pos``; write the greedy next token to ``ids``; advance ``pos``."""
        m = self.model.model
        x = m.embed_tokens(self.ids)
        cos, sin = m.rotary_emb(x, self.pos.view(1, 1))
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            self.k_cache[i].index_copy_(2, self.pos, k)
            self.v_cache[i].index_copy_(2, self.pos, v)
            o = F.scaled_dot_product_attention(
                q, self.k_cache[i], self.v_cache[i], attn_mask=mask, enable_gqa=self.kv_heads != self.heads
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(1, 1, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.model.lm_head(m.norm(x))
        self.ids.copy_(logits[:, -1:].argmax(dim=-1))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> None:
        """Reset to position 0 and feed ``prompt`` token by token (through :meth:`step`); afterwards ``ids``
        holds the first generated token."""
        self.pos.zero_()
        for token in prompt:
            self.ids.fill_(int(token))
            self.step()

    @torch.no_grad()
    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Eager greedy generation (reference for the graph-replayed decoding)."""
        if len(prompt) + new_tokens > self.max_len:
            raise ValueError(f"prompt + new tokens exceed the cache ({self.max_len})")
        self.prefill(prompt)
        out = [int(self.ids.item())]
        for _ in range(new_tokens - 1):
            self.step()
            out.append(int(self.ids.item()))
        return out


class GraphedDecodeStep:
    """One :meth:`StaticDecoder.step` captured in a CUDA graph (after warm-up on a side stream)."""

    def __init__(self, decoder: StaticDecoder, warmup: int = 3) -> None:
        self.decoder = decoder
        saved_pos, saved_ids = decoder.pos.clone(), decoder.ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                decoder.step()
        torch.cuda.current_stream().wait_stream(stream)
        decoder.pos.copy_(saved_pos)
        decoder.ids.copy_(saved_ids)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            decoder.step()
        decoder.pos.copy_(saved_pos)  # capture does not run the kernels' effects reliably: restore
        decoder.ids.copy_(saved_ids)

    def replay(self, steps: int) -> None:
        for _ in range(steps):
            self.graph.replay()
