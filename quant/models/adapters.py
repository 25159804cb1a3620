"""Architecture adapters: where the norms, linears and attention live in each supported model.

Methods talk to an adapter, never to a concrete architecture, so adding an architecture means
adding one adapter class here. A *block* is one transformer layer; inside a block the linears are
organised into :class:`LinearGroup` s: linears that read the same input, together with the module
whose output *is* that input (a norm, for ``attn_in``/``mlp_in``; a linear, for ``attn_out``/``mlp_out``).
That is exactly the information needed to fold a channel-wise transform out of an input and into
a producer (SmoothQuant, OS+, rotations) and to calibrate block by block (GPTQ, FlatQuant, OSTQuant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

GroupKind = Literal["attn_in", "attn_out", "mlp_in", "mlp_out"]


@dataclass
class LinearGroup:
    kind: GroupKind
    linears: dict[str, nn.Linear]  # full module name -> linear, all reading the same input
    norm: nn.Module | None = None  # the norm whose output is the input (attn_in / mlp_in)
    norm_name: str | None = None
    producer: nn.Linear | None = None  # the linear whose output is the input (attn_out: v_proj, mlp_out: up_proj)
    producer_name: str | None = None
    # True where the producer's output channels map 1:1 onto the input channels (up_proj -> down_proj;
    # v_proj -> o_proj only without grouped-query attention, see ``AttentionInfo``).
    producer_is_elementwise: bool = True
    # True where the norm output also feeds the residual stream (post-LN encoders such as BERT):
    # folding a transform into such a norm changes the residual too.
    norm_feeds_residual: bool = False

    @property
    def in_features(self) -> int:
        return next(iter(self.linears.values())).in_features


@dataclass
class AttentionInfo:
    module: nn.Module
    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass
class BlockInfo:
    index: int
    name: str
    module: nn.Module
    groups: list[LinearGroup] = field(default_factory=list)
    attention: AttentionInfo | None = None

    def group(self, kind: GroupKind) -> LinearGroup:
        for g in self.groups:
            if g.kind == kind:
                return g
        raise KeyError(kind)


class ModelAdapter:
    """Base class; subclasses describe one architecture family."""

    arch: str = "base"
    norm_type: Literal["rms", "layer"] = "rms"
    post_ln: bool = False
    is_decoder: bool = True
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # --- to implement --------------------------------------------------------------------
    def blocks_path(self) -> str:
        raise NotImplementedError

    def block(self, index: int) -> BlockInfo:
        raise NotImplementedError

    def embeddings(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def final_norm(self) -> tuple[str, nn.Module] | None:
        raise NotImplementedError

    def lm_head(self) -> tuple[str, nn.Module] | None:
        return ("lm_head", self.model.lm_head) if hasattr(self.model, "lm_head") else None

    # --- shared ----------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self.blocks_path())

    @property
    def num_blocks(self) -> int:
        return len(self.blocks())

    def iter_blocks(self) -> list[BlockInfo]:
        return [self.block(i) for i in range(self.num_blocks)]

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def _attention_info(self, module: nn.Module, name: str) -> AttentionInfo:
        heads = int(self.config.num_attention_heads)
        kv_heads = int(getattr(self.config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(self.config, "head_dim", None) or self.hidden_size // heads)
        return AttentionInfo(module=module, name=name, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


class LlamaFamilyAdapter(ModelAdapter):
    """LLaMA, Mistral, Qwen2 (and other models with the same module names)."""

    arch = "llama"
    norm_type = "rms"
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def blocks_path(self) -> str:
        return "model.layers"

    def block(self, index: int) -> BlockInfo:
        prefix = f"{self.blocks_path()}.{index}"
        layer = self.blocks()[index]
        attn, mlp = layer.self_attn, layer.mlp
        info = self._attention_info(attn, f"{prefix}.self_attn")
        gqa = info.num_kv_heads != info.num_heads
        a, m = f"{prefix}.self_attn", f"{prefix}.mlp"
        groups = [
            LinearGroup(
                "attn_in",
                {f"{a}.q_proj": attn.q_proj, f"{a}.k_proj": attn.k_proj, f"{a}.v_proj": attn.v_proj},
                norm=layer.input_layernorm,
                norm_name=f"{prefix}.input_layernorm",
            ),
            LinearGroup(
                "attn_out",
                {f"{a}.o_proj": attn.o_proj},
                producer=attn.v_proj,
                producer_name=f"{a}.v_proj",
                producer_is_elementwise=not gqa,
            ),
            LinearGroup(
                "mlp_in",
                {f"{m}.gate_proj": mlp.gate_proj, f"{m}.up_proj": mlp.up_proj},
                norm=layer.post_attention_layernorm,
                norm_name=f"{prefix}.post_attention_layernorm",
            ),
            LinearGroup(
                "mlp_out",
                {f"{m}.down_proj": mlp.down_proj},
                producer=mlp.up_proj,
                producer_name=f"{m}.up_proj",
            ),
        ]
        return BlockInfo(index=index, name=prefix, module=layer, groups=groups, attention=info)

    def embeddings(self) -> list[tuple[str, nn.Module]]:
        return [("model.embed_tokens", self.model.model.embed_tokens)]

    def final_norm(self) -> tuple[str, nn.Module] | None:
        return ("model.norm", self.model.model.norm)


class OPTAdapter(ModelAdapter):
    arch = "opt"
    norm_type = "layer"
    model_types = ("opt",)

    def blocks_path(self) -> str:
        return "model.decoder.layers"

    def block(self, index: int) -> BlockInfo:
        prefix = f"{self.blocks_path()}.{index}"
        layer = self.blocks()[index]
        attn = layer.self_attn
        a = f"{prefix}.self_attn"
        groups = [
            LinearGroup(
                "attn_in",
                {f"{a}.q_proj": attn.q_proj, f"{a}.k_proj": attn.k_proj, f"{a}.v_proj": attn.v_proj},
                norm=layer.self_attn_layer_norm,
                norm_name=f"{prefix}.self_attn_layer_norm",
            ),
            LinearGroup("attn_out", {f"{a}.out_proj": attn.out_proj}, producer=attn.v_proj, producer_name=f"{a}.v_proj"),
            LinearGroup(
                "mlp_in", {f"{prefix}.fc1": layer.fc1}, norm=layer.final_layer_norm, norm_name=f"{prefix}.final_layer_norm"
            ),
            # fc2 reads ReLU(fc1(x)): not elementwise-linear in fc1's output, so no producer folding.
            LinearGroup("mlp_out", {f"{prefix}.fc2": layer.fc2}),
        ]
        return BlockInfo(
            index=index, name=prefix, module=layer, groups=groups, attention=self._attention_info(attn, a)
        )

    def embeddings(self) -> list[tuple[str, nn.Module]]:
        dec = self.model.model.decoder
        return [("model.decoder.embed_tokens", dec.embed_tokens), ("model.decoder.embed_positions", dec.embed_positions)]

    def final_norm(self) -> tuple[str, nn.Module] | None:
        norm = self.model.model.decoder.final_layer_norm
        return ("model.decoder.final_layer_norm", norm) if norm is not None else None


class BertAdapter(ModelAdapter):
    """BERT-style post-LN encoders (BertModel or a model with a ``.bert`` / ``.encoder`` body)."""

    arch = "bert"
    norm_type = "layer"
    post_ln = True
    is_decoder = False
    model_types = ("bert",)

    def _body(self) -> nn.Module:
        return getattr(self.model, "bert", self.model)

    def _body_prefix(self) -> str:
        return "bert." if hasattr(self.model, "bert") else ""

    def blocks_path(self) -> str:
        return f"{self._body_prefix()}encoder.layer"

    def block(self, index: int) -> BlockInfo:
        p = self._body_prefix()
        prefix = f"{self.blocks_path()}.{index}"
        layer = self.blocks()[index]
        if index == 0:
            norm, norm_name = self._body().embeddings.LayerNorm, f"{p}embeddings.LayerNorm"
        else:
            norm, norm_name = self.blocks()[index - 1].output.LayerNorm, f"{self.blocks_path()}.{index - 1}.output.LayerNorm"
        sa = layer.attention.self
        s = f"{prefix}.attention.self"
        groups = [
            LinearGroup(
                "attn_in",
                {f"{s}.query": sa.query, f"{s}.key": sa.key, f"{s}.value": sa.value},
                norm=norm,
                norm_name=norm_name,
                norm_feeds_residual=True,
            ),
            LinearGroup(
                "attn_out",
                {f"{prefix}.attention.output.dense": layer.attention.output.dense},
                producer=sa.value,
                producer_name=f"{s}.value",
            ),
            LinearGroup(
                "mlp_in",
                {f"{prefix}.intermediate.dense": layer.intermediate.dense},
                norm=layer.attention.output.LayerNorm,
                norm_name=f"{prefix}.attention.output.LayerNorm",
                norm_feeds_residual=True,
            ),
            # output.dense reads GELU(intermediate.dense(x)): no producer folding.
            LinearGroup("mlp_out", {f"{prefix}.output.dense": layer.output.dense}),
        ]
        return BlockInfo(
            index=index, name=prefix, module=layer, groups=groups, attention=self._attention_info(sa, s)
        )

    def embeddings(self) -> list[tuple[str, nn.Module]]:
        emb = self._body().embeddings
        p = self._body_prefix()
        return [(f"{p}embeddings", emb)]

    def final_norm(self) -> tuple[str, nn.Module] | None:
        return None

    def lm_head(self) -> tuple[str, nn.Module] | None:
        return None


ADAPTERS: tuple[type[ModelAdapter], ...] = (LlamaFamilyAdapter, OPTAdapter, BertAdapter)


class UnsupportedArchitecture(ValueError):
    pass


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    supported = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise UnsupportedArchitecture(f"model_type {model_type!r} is not supported; supported: {supported}")


def supported_model_types() -> list[str]:
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
