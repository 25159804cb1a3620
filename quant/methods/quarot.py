"""QuaRot: rotate the model with (randomized) Hadamard matrices so no activation has outliers.

Computational invariance (QuaRot, Ashkboos et al. 2024): with RMSNorm ``n(x) = x / rms(x)`` and an
orthogonal ``Q``, ``n(x Q) = n(x) Q``. So once every norm has weight 1 (its scale folded into the
linears that read it), the whole residual stream can live in a rotated basis:

* embeddings ``E <- E Q`` (OPT: the positional table too);
* every residual *reader* (q/k/v, gate/up or fc1, lm_head) ``W <- W Q``;
* every residual *writer* (o_proj/out_proj, down_proj/fc2) ``W <- Q^T W``, ``b <- b Q``.

``Q`` is a random Hadamard ``diag(s) H`` (:func:`quant.transforms.hadamard.random_hadamard`; for a
non-power-of-two hidden size a block-diagonal Hadamard, which mixes within blocks only). In addition:

* per-head Hadamard on the attention values: ``v_proj`` rows ``W_v <- blockdiag(H)^T W_v`` and
  ``o_proj`` columns ``W_o <- W_o blockdiag(H)`` (exact: softmax mixes tokens, not head channels; the
  same ``H`` for every head keeps it exact under grouped-query attention);
* an online Hadamard before ``down_proj`` / ``fc2`` (a ``HadamardTransform`` on the ``QuantLinear``,
  with ``W <- W H`` folded), since the MLP's nonlinearity blocks an offline rotation there (a size that
  is not a power of two gets the block-diagonal Hadamard of :mod:`quant.transforms.hadamard`: weaker
  mixing, e.g. 256-channel blocks for 11008). The reference also mixes across heads online before
  ``o_proj``; that is not done here (on the tiny test models it did not lower the error);
* a head-dim Hadamard on queries and keys for KV-cache quantization, applied online by the KV
  quantizer (``finalize(..., rotate_kv=True)``).

LayerNorm models (OPT, pre-LN only): ``LN(x) = g * (x - mean(x)) / std(x) + b``. We fold ``g`` and
``b`` into the readers, then make every residual writer mean-free (embedding rows, writer weights and
biases centred over the hidden dim). The residual stream is then mean-free, where LayerNorm without
affine equals RMSNorm with the same eps, so each LayerNorm is replaced by a unit-weight
:class:`quant.modules.norms.RMSNormWithBias` (a registered module type: artifacts rebuild it) and the
rotation proceeds as for LLaMA. Post-LN and encoder models raise :class:`UnsupportedArchitecture`.

All folding is done in float64 and cast back, so the rotated model is equal to the original in
floating point up to rounding before anything is quantized.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from quant.calibration.data import CalibrationData
from quant.evaluation.qsur import linear_input_qsur, qsur_report
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import finalize, is_skipped, quantize_linears
from quant.models.adapters import BlockInfo, ModelAdapter, UnsupportedArchitecture, get_adapter
from quant.modules.linear import QuantLinear, set_module
from quant.modules.norms import RMSNormWithBias, norm_eps
from quant.recipes.schema import FP_BITS, ActivationQuantSpec, QuaRotParams, Recipe
from quant.transforms.hadamard import HadamardTransform, hadamard_block_size, hadamard_matrix, random_hadamard

F64 = torch.float64


# ------------------------------------------------------------------------------- checks
def check_rotatable(adapter: ModelAdapter) -> None:
    """Raise :class:`UnsupportedArchitecture` unless the residual stream can be rotated."""
    if adapter.arch == "llama":
        return
    if adapter.arch == "opt":
        cfg = adapter.config
        if not getattr(cfg, "do_layer_norm_before", True):
            raise UnsupportedArchitecture("rotation needs a pre-LN OPT model (do_layer_norm_before=True)")
        dec = adapter.model.model.decoder
        if getattr(dec, "project_in", None) is not None or getattr(dec, "project_out", None) is not None:
            raise UnsupportedArchitecture("rotation does not support OPT models with project_in/project_out")
        if adapter.final_norm() is None:
            raise UnsupportedArchitecture("rotation needs the OPT final layer norm")
        return
    raise UnsupportedArchitecture(
        f"rotation methods support pre-norm decoders (LLaMA family, OPT); got {adapter.arch!r} "
        f"({'post-LN ' if adapter.post_ln else ''}{'decoder' if adapter.is_decoder else 'encoder'})"
    )


# ------------------------------------------------------------------------------- helpers
def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device)


def _lm_head(adapter: ModelAdapter) -> nn.Linear:
    head = adapter.lm_head()
    if head is None or not isinstance(head[1], nn.Linear):
        raise UnsupportedArchitecture("rotation needs a linear lm_head")
    return head[1]


def untie_lm_head(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give lm_head its own weight (the embedding and the head get different folds)."""
    head = _lm_head(adapter)
    for _, emb in adapter.embeddings():
        if getattr(emb, "weight", None) is head.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def finish_lm_head(model: nn.Module, adapter: ModelAdapter) -> None:
    """Call once all rewrites are done. A LayerNorm's bias folded into ``lm_head`` (OPT) gives the head
    a bias the stock (bias-free) head cannot hold, so a head with a bias becomes a floating-point
    :class:`QuantLinear` (16-bit weights and activations; a registered type that artifacts rebuild)."""
    name, head = adapter.lm_head()
    if not isinstance(head, nn.Linear) or head.bias is None:
        return
    layer = QuantLinear.from_quantized(
        head.weight.detach().float(), head.bias.detach().float(), ActivationQuantSpec(bits=FP_BITS)
    )
    set_module(model, name, layer.to(device=head.weight.device, dtype=head.weight.dtype))


def residual_readers(block: BlockInfo) -> list[nn.Linear]:
    return [l for g in block.groups if g.kind in ("attn_in", "mlp_in") for l in g.linears.values()]


def residual_writers(block: BlockInfo) -> list[nn.Linear]:
    return [l for g in block.groups if g.kind in ("attn_out", "mlp_out") for l in g.linears.values()]


def _fold_norm_into(linears: list[nn.Linear], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``W (g * n + b) + c == (W diag g) n + (W b + c)``."""
    for lin in linears:
        w = lin.weight.data.to(F64)
        if bias is not None:
            extra = w @ bias.to(device=w.device, dtype=F64)
            if lin.bias is None:
                lin.bias = nn.Parameter(extra.to(lin.weight.dtype), requires_grad=False)
            else:
                _set(lin.bias, lin.bias.data.to(F64) + extra)
        _set(lin.weight, w * weight.to(device=w.device, dtype=F64).unsqueeze(0))


def _unit_norm(norm: nn.Module) -> nn.Module:
    """A unit-weight RMSNorm replacing ``norm`` (same module for RMSNorm; RMSNormWithBias for LayerNorm)."""
    if isinstance(norm, nn.LayerNorm):
        new = RMSNormWithBias(norm.normalized_shape[0], norm_eps(norm, 1e-5))
        return new.to(device=norm.weight.device, dtype=norm.weight.dtype)
    norm.weight.data.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.data.zero_()
    return norm


@torch.no_grad()
def _center_writers(model: nn.Module, adapter: ModelAdapter) -> None:
    """Make every residual writer mean-free over the hidden dim (LayerNorm -> RMSNorm equivalence)."""
    for _, emb in adapter.embeddings():
        w = emb.weight.data.to(F64)
        _set(emb.weight, w - w.mean(dim=1, keepdim=True))
    for block in adapter.iter_blocks():
        for lin in residual_writers(block):
            w = lin.weight.data.to(F64)
            _set(lin.weight, w - w.mean(dim=0, keepdim=True))
            if lin.bias is not None:
                b = lin.bias.data.to(F64)
                _set(lin.bias, b - b.mean())


@torch.no_grad()
def fuse_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Fold every norm's affine into its readers and leave unit-weight RMSNorms (see module doc)."""
    check_rotatable(adapter)
    untie_lm_head(model, adapter)
    if adapter.norm_type == "layer":
        _center_writers(model, adapter)
    for block in adapter.iter_blocks():
        for group in block.groups:
            if group.norm is None:
                continue
            norm = group.norm
            _fold_norm_into(list(group.linears.values()), norm.weight.data, getattr(norm, "bias", None))
            new = _unit_norm(norm)
            if new is not norm:
                set_module(model, group.norm_name, new)
    name, norm = adapter.final_norm()
    _fold_norm_into([_lm_head(adapter)], norm.weight.data, getattr(norm, "bias", None))
    new = _unit_norm(norm)
    if new is not norm:
        set_module(model, name, new)


@torch.no_grad()
def rotate_residual(model: nn.Module, adapter: ModelAdapter, q: torch.Tensor) -> None:
    """Express the residual stream in the basis ``x Q`` (norms must already have unit weight)."""
    for _, emb in adapter.embeddings():
        w = emb.weight.data.to(F64)
        _set(emb.weight, w @ q.to(w.device, F64))
    for block in adapter.iter_blocks():
        for lin in residual_readers(block):
            w = lin.weight.data.to(F64)
            _set(lin.weight, w @ q.to(w.device, F64))
        for lin in residual_writers(block):
            w = lin.weight.data.to(F64)
            qd = q.to(w.device, F64)
            _set(lin.weight, qd.T @ w)
            if lin.bias is not None:
                _set(lin.bias, lin.bias.data.to(F64) @ qd)
    head = _lm_head(adapter)
    w = head.weight.data.to(F64)
    _set(head.weight, w @ q.to(w.device, F64))


def value_output_linears(block: BlockInfo) -> tuple[nn.Linear, nn.Linear]:
    group = block.group("attn_out")
    if group.producer is None:
        raise UnsupportedArchitecture(f"{block.name}: no value projection to fold a head rotation into")
    return group.producer, next(iter(group.linears.values()))


@torch.no_grad()
def rotate_value_heads(block: BlockInfo, h: torch.Tensor) -> None:
    """Per-head rotation of the values: ``W_v <- blockdiag(h)^T W_v``, ``W_o <- W_o blockdiag(h)``."""
    info = block.attention
    v, o = value_output_linears(block)
    hd = info.head_dim
    hh = h.to(v.weight.device, F64)
    wv = v.weight.data.to(F64).reshape(info.num_kv_heads, hd, -1)
    _set(v.weight, torch.einsum("ji,kjc->kic", hh, wv).reshape(v.weight.shape))
    if v.bias is not None:
        _set(v.bias, (v.bias.data.to(F64).reshape(info.num_kv_heads, hd) @ hh).reshape(-1))
    wo = o.weight.data.to(F64).reshape(o.out_features, info.num_heads, hd)
    _set(o.weight, (wo @ hh).reshape(o.weight.shape))


def mlp_out_linears(adapter: ModelAdapter) -> dict[str, nn.Linear]:
    return {n: l for b in adapter.iter_blocks() for n, l in b.group("mlp_out").linears.items()}


@torch.no_grad()
def install_online_hadamards(adapter: ModelAdapter, recipe: Recipe | None = None) -> dict[str, HadamardTransform]:
    """Fold ``H`` into each MLP output projection's weight; returns the online transforms to install."""
    transforms: dict[str, HadamardTransform] = {}
    for name, lin in mlp_out_linears(adapter).items():
        if recipe is not None and is_skipped(name, recipe):
            continue
        t = HadamardTransform(lin.in_features).to(lin.weight.device)
        _set(lin.weight, t.fold_into_weight(lin.weight.data.to(F64)))
        transforms[name] = t
    return transforms


def apply_quarot(
    model: nn.Module, adapter: ModelAdapter, seed: int = 0, online_down_proj: bool = True, recipe: Recipe | None = None
) -> dict[str, HadamardTransform]:
    """All floating-point QuaRot rewrites (no quantization); returns the online transforms per linear."""
    fuse_norms(model, adapter)
    q = random_hadamard(adapter.hidden_size, seed, F64)
    rotate_residual(model, adapter, q)
    for block in adapter.iter_blocks():
        rotate_value_heads(block, hadamard_matrix(block.attention.head_dim, F64))
    return install_online_hadamards(adapter, recipe) if online_down_proj else {}


@register_method
class QuaRotMethod(QuantizationMethod):
    name = "quarot"
    # calibration data feeds the QSUR report (and GPTQ weight rounding when the recipe asks for it)
    needs_calibration = True

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        start = time.perf_counter()
        params = recipe.method
        if not isinstance(params, QuaRotParams):
            raise TypeError(f"quarot got a recipe for {params.name!r}")
        adapter = get_adapter(model)
        check_rotatable(adapter)
        progress(0.0, "quarot: QSUR of the original inputs")
        before = linear_input_qsur(model, adapter, calibration)
        progress(0.03, "quarot: fusing norms and rotating")
        transforms = apply_quarot(model, adapter, params.seed, params.online_down_proj, recipe)
        after = linear_input_qsur(model, adapter, calibration, transforms)
        progress(0.1, "quarot: quantizing linears")
        layers = quantize_linears(
            model, adapter, recipe, transforms=transforms, calibration=calibration, progress=sub_progress(progress, 0.1, 0.95)
        )
        finish_lm_head(model, adapter)
        report = MethodReport(method=self.name)
        for name in before:
            metrics = qsur_report(before[name], after[name])
            metrics["online_hadamard"] = float(name in transforms)
            metrics.update(getattr(layers.get(name), "quant_stats", None) or {})
            report.add(name, **metrics)
        hidden = adapter.hidden_size
        n = max(1, len(before))
        report.summary.update(
            qsur_before_mean=sum(q.relative for q in before.values()) / n,
            qsur_after_mean=sum(q.relative for q in after.values()) / n,
            quantized_layers=float(len(layers)),
            residual_hadamard_block=float(hadamard_block_size(hidden)),
            hidden_size=float(hidden),
            online_hadamards=float(len(transforms)),
        )
        finalize(model, adapter, recipe, rotate_kv=True)
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"quarot: {len(layers)} linears quantized")
        return model
