"""GPTQ weight rounding (Frantar et al., 2023) and its block-sequential driver.

``gptq_quantize(W, H, spec)`` rounds a weight ``W [out, in]`` column by column, compensating each
column's rounding error on the not-yet-quantized columns through the inverse Hessian of the layer
inputs, ``H = 2/n * sum x x^T`` (so that ``||(W - Q) X||`` rather than ``||W - Q||`` is minimised):

- dampening: ``H += damp_percent * mean(diag H) * I``; inputs that are always zero ("dead" columns)
  get ``H_ii = 1`` and a zero weight;
- the upper Cholesky factor of ``H^-1`` gives the error-propagation rows directly;
- lazy batches: errors are applied inside a block of ``block_size`` columns immediately and to the
  columns after the block once per block (one matmul);
- ``act_order``: columns are processed in order of decreasing ``H_ii``. Groups always remain
  *contiguous input-channel groups* of the original order (what :class:`QuantizedWeight` stores):
  with ``static_groups`` every group's scale/zero is computed from the original weight before any
  update; otherwise a group's scale/zero is computed when the first of its columns is reached, from
  the current (error-updated) values of all its columns.

``gptq_blockwise`` runs the calibration data block by block (``quant.calibration.capture``), and
within a block group by group (true-sequential: a group's Hessian is taken with the earlier groups of
the block already quantized); the Hessian is of each linear's *transformed* input (the
``InputTransform`` the method gives for that linear); quantized block outputs feed the next block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch import nn

from quant.calibration.capture import advance, call_block, capture_block_inputs
from quant.calibration.data import CalibrationData
from quant.quantizers.weight import QuantizedWeight, group_size_for, scale_zero_for_weight
from quant.recipes.schema import Recipe, WeightQuantSpec
from quant.transforms.base import InputTransform

if TYPE_CHECKING:
    from quant.methods.base import ProgressCallback
    from quant.models.adapters import ModelAdapter


@dataclass
class GPTQResult:
    weight: QuantizedWeight
    loss: float  # sum over entries of (w - q)^2 / [H^-1]_jj^2 / 2 (the GPTQ objective increase)
    damp: float  # dampening actually added to the diagonal


def _inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; dampening grows until ``H`` is positive definite."""
    n = H.shape[0]
    mean_diag = float(torch.diag(H).mean())
    base = damp_percent * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(8):
        damp = base * (10.0**attempt)
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            # H^-1 = L^-T L^-1 (a triangular solve: much faster than cholesky_inverse on CPU)
            Linv = torch.linalg.solve_triangular(L, eye, upper=False)
            Hinv = Linv.T @ Linv
            U, info = torch.linalg.cholesky_ex((Hinv + Hinv.T) / 2, upper=True)
            if int(info) == 0:
                return U, damp
    raise RuntimeError("GPTQ: Hessian is not positive definite even with strong dampening")


@torch.no_grad()
def gptq_quantize_ex(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec) -> GPTQResult:
    if not spec.enabled:
        raise ValueError("GPTQ needs quantized weights (bits < 16)")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match weight in_features {in_f}")
    opts = spec.gptq
    gs = group_size_for(spec, in_f)
    n_groups = in_f // gs
    lo, hi = (1, 2**spec.bits - 1) if spec.symmetric else (0, 2**spec.bits - 1)

    W = W.detach().clone().float()
    H = H.detach().clone().float().to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scale = torch.zeros(out_f, n_groups, device=W.device)
    zero = torch.zeros(out_f, n_groups, device=W.device)
    ready = torch.zeros(n_groups, dtype=torch.bool)
    if opts.static_groups or n_groups == 1:
        for g in range(n_groups):
            s, z = scale_zero_for_weight(W[:, g * gs : (g + 1) * gs], spec, gs)
            scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
        ready[:] = True

    if opts.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(in_f, device=W.device)
    position = torch.empty_like(perm)
    position[perm] = torch.arange(in_f, device=W.device)  # original column -> processing position
    W = W[:, perm]
    H = H[perm][:, perm]
    Hinv, damp = _inverse_hessian_factor(H, opts.damp_percent)

    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=W.device)
    losses = torch.zeros(out_f, device=W.device)
    block = opts.block_size
    order = perm.tolist()
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = order[i1 + i]
            g = col // gs
            if not ready[g]:
                # current values of the group's columns (none of them is quantized yet)
                pos = position[g * gs : (g + 1) * gs]
                cur = torch.empty(out_f, gs, device=W.device)
                inside = pos < i2
                if bool(inside.any()):
                    cur[:, inside] = W1[:, pos[inside] - i1]
                if bool((~inside).any()):
                    later = pos[~inside]
                    cur[:, ~inside] = W[:, later] - Err1[:, :i] @ Hinv[i1 : i1 + i, later]
                s, z = scale_zero_for_weight(cur, spec, gs)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                ready[g] = True
            w = W1[:, i]
            d = Hinv1[i, i]
            u = torch.clamp(torch.round(w / scale[:, g]) + zero[:, g], lo, hi)
            q = (u - zero[:, g]) * scale[:, g]
            codes[:, col] = u.to(torch.uint8)
            err = (w - q) / d
            losses += (w - q).pow(2) / d.pow(2) / 2
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    qw = QuantizedWeight(codes=codes, scale=scale, zero=zero, bits=spec.bits, group_size=gs)
    return GPTQResult(weight=qw, loss=float(losses.sum()), damp=damp)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: WeightQuantSpec) -> QuantizedWeight:
    """GPTQ-rounded :class:`QuantizedWeight` of ``W [out, in]`` given the input Hessian ``H [in, in]``."""
    return gptq_quantize_ex(W, H, spec).weight


# ---------------------------------------------------------------------------------- Hessians
class HessianAccumulator:
    """Running ``2/n * sum x x^T`` over the (transformed, unpadded) tokens a linear reads."""

    def __init__(self, n: int, device: torch.device, transform: InputTransform | None = None) -> None:
        self.sum = torch.zeros(n, n, dtype=torch.float32, device=device)
        self.count = 0
        self.transform = transform

    @torch.no_grad()
    def add(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        if self.transform is not None:
            x = self.transform(x)
        if token_mask is not None and tuple(token_mask.shape) == tuple(x.shape[:-1]):
            x = x[token_mask.bool()]
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += x.T @ x
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


@torch.no_grad()
def relative_output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: relative squared error of the layer output on the calibration inputs."""
    W, Wq, H = W.float(), Wq.float(), H.float()
    dW = Wq - W
    num = float(((dW @ H) * dW).sum())
    den = float(((W @ H) * W).sum())
    return num / den if den > 0 else math.inf


# ---------------------------------------------------------------------------------- block-wise driver
@torch.no_grad()
def gptq_blockwise(
    model: nn.Module,
    adapter: "ModelAdapter",
    recipe: Recipe,
    calibration: CalibrationData,
    transforms: dict[str, InputTransform],
    act_clips: dict[str, float],
    names: Iterable[str],
    progress: "ProgressCallback",
) -> dict[str, nn.Module]:
    """GPTQ every linear of ``names`` block by block; installs QuantLinear; returns them by name."""
    from quant.methods.common import build_quant_linear
    from quant.modules.linear import set_module

    wanted = set(names)
    device = next(model.parameters()).device
    inputs = capture_block_inputs(model, adapter, calibration, device)
    token_masks = [m for _, m in calibration.batches(device)]
    blocks = adapter.iter_blocks()
    done: dict[str, nn.Module] = {}
    for b, block in enumerate(blocks):
        for group in block.groups:
            targets = {n: l for n, l in group.linears.items() if n in wanted and isinstance(l, nn.Linear)}
            if not targets:
                continue
            # linears of a group read the same input: one Hessian per distinct transform
            accs: dict[int, HessianAccumulator] = {}
            key_of: dict[str, int] = {}
            for n, lin in targets.items():
                t = transforms.get(n)
                key = id(t) if t is not None else 0
                if key not in accs:
                    accs[key] = HessianAccumulator(lin.in_features, lin.weight.device, t)
                key_of[n] = key
            batch_index = {"i": 0}

            def make_hook(acc: HessianAccumulator):
                def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
                    i = batch_index["i"]
                    acc.add(args[0], token_masks[i] if i < len(token_masks) else None)

                return hook

            first = {}
            for n, key in key_of.items():
                first.setdefault(key, n)
            handles = [targets[n].register_forward_pre_hook(make_hook(accs[k])) for k, n in first.items()]
            try:
                for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
                    batch_index["i"] = i
                    call_block(block.module, h, kw)
            finally:
                for handle in handles:
                    handle.remove()
            for n, lin in targets.items():
                H = accs[key_of[n]].hessian()
                W = lin.weight.detach().float()
                res = gptq_quantize_ex(W, H, recipe.weight)
                layer = build_quant_linear(lin, recipe, transforms.get(n), act_clips.get(n), quantized=res.weight)
                Wq = res.weight.dequantize(torch.float32).to(W.device)
                layer.quant_stats = {
                    "gptq_loss": res.loss,
                    "weight_rel_err": float((Wq - W).norm() / W.norm().clamp(min=1e-12)),
                    "output_rel_err": relative_output_error(W, Wq, H),
                    "hessian_tokens": float(accs[key_of[n]].count),
                }
                set_module(model, n, layer)
                done[n] = layer
            del accs
        outputs = [call_block(block.module, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        inputs = advance(inputs, outputs)
        progress((b + 1) / len(blocks), f"gptq: block {b + 1}/{len(blocks)}")
    # linears outside the transformer blocks have no block-wise Hessian here: round them with RTN
    for n in sorted(wanted - set(done)):
        lin = model.get_submodule(n)
        if isinstance(lin, nn.Linear):
            layer = build_quant_linear(lin, recipe, transforms.get(n), act_clips.get(n))
            layer.quant_stats = {"rtn_fallback": 1.0}
            set_module(model, n, layer)
            done[n] = layer
    return done
