"""OSTQuant: learnable orthogonal and scaling transforms, trained end to end (Hu et al. 2025).

Starting point: the QuaRot rewrite of :mod:`quant.methods.quarot` (norms fused into their readers,
OPT LayerNorms turned into RMSNorms over a mean-free residual). On top of it OSTQuant *learns*:

* ``R1`` (``hidden x hidden``, orthogonal): the residual-stream rotation (embeddings ``E R1``, readers
  ``W R1``, writers ``R1^T W``, lm_head ``W R1``);
* ``R2`` per block (``head_dim x head_dim``, orthogonal): a per-head rotation of the values,
  ``v_proj`` rows ``blockdiag(R2)^T W_v`` and ``o_proj`` columns ``W_o blockdiag(R2)``;
* scaling vectors paired with them, folded on one side and inverted on the other (exact in FP):
  ``s_attn`` / ``s_mlp`` per block: the unit norm before q/k/v (gate/up, fc1) gets weight ``1 / s`` and its
  readers ``W R1 diag(s)``; ``s_v``: ``v_proj`` rows divided by ``s_v``, ``o_proj`` columns multiplied
  by ``s_v`` (repeated over the query heads of a key/value group); ``s_up`` (gated MLPs only): ``up_proj``
  rows divided, ``down_proj`` columns multiplied (``silu(g) * u / s = (silu(g) * u) / s``).

Fixed: the online Hadamard before ``down_proj`` / ``fc2`` (``W <- W H``, ``HadamardTransform`` on the
``QuantLinear``) and the head-dim Hadamard on queries/keys for KV quantization (KV quantizer,
``rotate=True``).

Rotations start from QuaRot's (random Hadamard ``R1``, Hadamard ``R2``) and move on the Stiefel manifold with Cayley SGD
(Li et al. 2020: ``X <- (I + t/2 A)^{-1} (I - t/2 A) X`` with ``A = G X^T - X G^T`` and step
``t = min(lr, 1 / ||A||)``, exactly orthogonal up to rounding); scales are trained in log space with
Adam. Loss: with ``end_to_end`` the KL-Top divergence (KL between the FP and the fake-quantized model's
next-token distributions restricted to the FP model's top-k tokens, renormalised); otherwise the
block-wise MSE between every block's output hidden state of the quantized model and the FP one (in the
rotated basis, normalised by the FP energy), summed over blocks and trained jointly since R1 is
shared. During training weights (per output channel / group) and activations (per token, through the
online Hadamard where installed) are fake-quantized with straight-through rounding, and the KV cache
through the attached KV quantizer. The FP teacher is the same model run with its own (fused) weights.

After training everything is folded into the weights, QSUR (:mod:`quant.evaluation.qsur`) of every
linear's input is measured on the original model and on the folded model (inputs as the quantizer
sees them, after the online Hadamard) and reported, then ``quantize_linears`` + ``finalize``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from quant.calibration.data import CalibrationData
from quant.evaluation.qsur import linear_input_qsur, qsur_report
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import finalize, is_skipped, quantize_linears
from quant.methods.quarot import check_rotatable, finish_lm_head, fuse_norms
from quant.models.adapters import ModelAdapter, get_adapter
from quant.modules.kv_cache import ATTENTION_NAME, attach_kv_quantizer, detach_kv_quantizer
from quant.quantizers.core import fake_quantize
from quant.quantizers.weight import group_size_for, scale_zero_for_weight
from quant.recipes.schema import OSTQuantParams, Recipe, WeightQuantSpec
from quant.transforms.hadamard import HadamardTransform, fwht, hadamard_matrix, random_hadamard

F64 = torch.float64


# ----------------------------------------------------------------------------- structure
@dataclass
class BlockPlan:
    index: int
    attn_norm: str
    mlp_norm: str
    attn_in: list[str]
    value: str
    out: str
    mlp_in: list[str]
    up: str | None  # elementwise producer of the MLP output projection's input (gated MLPs)
    down: str
    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class ModelPlan:
    embeddings: list[str]
    lm_head: str
    blocks: list[BlockPlan] = field(default_factory=list)

    @property
    def linears(self) -> list[str]:
        return [n for b in self.blocks for n in (*b.attn_in, b.out, *b.mlp_in, b.down)]


def build_plan(adapter: ModelAdapter) -> ModelPlan:
    head = adapter.lm_head()
    plan = ModelPlan(embeddings=[n for n, _ in adapter.embeddings()], lm_head=head[0])
    for block in adapter.iter_blocks():
        attn_in, attn_out = block.group("attn_in"), block.group("attn_out")
        mlp_in, mlp_out = block.group("mlp_in"), block.group("mlp_out")
        info = block.attention
        elementwise_up = mlp_out.producer is not None and mlp_out.producer_is_elementwise
        plan.blocks.append(
            BlockPlan(
                index=block.index,
                attn_norm=attn_in.norm_name,
                mlp_norm=mlp_in.norm_name,
                attn_in=list(attn_in.linears),
                value=attn_out.producer_name,
                out=next(iter(attn_out.linears)),
                mlp_in=list(mlp_in.linears),
                up=mlp_out.producer_name if elementwise_up else None,
                down=next(iter(mlp_out.linears)),
                heads=info.num_heads,
                kv_heads=info.num_kv_heads,
                head_dim=info.head_dim,
            )
        )
    return plan


# ----------------------------------------------------------------------------- learnable state
class OSTState(nn.Module):
    """R1, per-block R2 and the log-scales. Init: unit scales, ``R1`` the random Hadamard QuaRot uses
    for ``seed`` and ``R2`` the plain head Hadamard, i.e. exactly QuaRot's rotation (its start point)."""

    def __init__(self, model: nn.Module, plan: ModelPlan, hidden: int, seed: int = 0) -> None:
        super().__init__()
        ref = model.get_parameter(f"{plan.lm_head}.weight")
        kw = {"dtype": torch.float32, "device": ref.device}
        self.r1 = nn.Parameter(random_hadamard(hidden, seed, **kw))
        # R2 starts from the plain head Hadamard QuaRot folds, so the untrained state *is* QuaRot
        self.r2 = nn.ParameterList([nn.Parameter(hadamard_matrix(b.head_dim, **kw)) for b in plan.blocks])
        self.log_s_attn = nn.ParameterList([nn.Parameter(torch.zeros(hidden, **kw)) for _ in plan.blocks])
        self.log_s_mlp = nn.ParameterList([nn.Parameter(torch.zeros(hidden, **kw)) for _ in plan.blocks])
        self.log_s_v = nn.ParameterList(
            [nn.Parameter(torch.zeros(b.kv_heads * b.head_dim, **kw)) for b in plan.blocks]
        )
        self.log_s_up = nn.ParameterDict(
            {
                str(b.index): nn.Parameter(torch.zeros(model.get_submodule(b.down).in_features, **kw))
                for b in plan.blocks
                if b.up is not None
            }
        )

    def rotations(self) -> list[nn.Parameter]:
        return [self.r1, *self.r2]

    def scales(self) -> list[nn.Parameter]:
        return [*self.log_s_attn, *self.log_s_mlp, *self.log_s_v, *self.log_s_up.values()]


def _base(model: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    return model.get_parameter(name).detach().to(dtype)


def _maybe_bias(model: nn.Module, linear: str, dtype: torch.dtype) -> torch.Tensor | None:
    b = model.get_submodule(linear).bias
    return None if b is None else b.detach().to(dtype)


def fake_quantize_weight(weight: torch.Tensor, spec: WeightQuantSpec) -> torch.Tensor:
    """Differentiable stand-in for :func:`quantize_weight_rtn`: same groups, and with ``clip_search``
    the same per-(row, group) clip ratio (searched on the detached weight, held fixed for the step),
    so training sees the rounding the final weights will get."""
    out_f, in_f = weight.shape
    g = group_size_for(spec, in_f)
    ratio: torch.Tensor | float = 1.0
    if spec.clip_search:
        w = weight.detach().float()
        best, _ = scale_zero_for_weight(w, spec, g)
        plain, _ = scale_zero_for_weight(w, spec.model_copy(update={"clip_search": False}), g)
        ratio = (best / plain).clamp(max=1.0).reshape(-1, 1)
    return fake_quantize(weight, spec.bits, spec.symmetric, ratio, g)


def transformed_params(
    model: nn.Module,
    plan: ModelPlan,
    state: OSTState,
    online: set[str],
    weight_quant: dict[str, WeightQuantSpec] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every parameter the transforms touch, as a differentiable function of ``state``.

    ``model`` holds the fused floating-point weights (never modified during training); ``online``
    names the MLP output projections with an online Hadamard (folded here as ``W H``);
    ``compute_dtype`` (default float32; training passes the model's dtype when it is lower, to bound
    memory; the final fold uses float64) is the arithmetic precision;
    ``weight_quant`` (name -> spec) fake-quantizes those weights with STE rounding (:func:`fake_quantize_weight`).
    """
    dt = compute_dtype or torch.float32
    r1 = state.r1.to(dt)
    out: dict[str, torch.Tensor] = {}
    for name in plan.embeddings:
        out[f"{name}.weight"] = _base(model, f"{name}.weight", dt) @ r1
    for i, b in enumerate(plan.blocks):
        s_a, s_m, s_v = (x[i].to(dt).exp() for x in (state.log_s_attn, state.log_s_mlp, state.log_s_v))
        r2 = state.r2[i].to(dt)
        out[f"{b.attn_norm}.weight"] = 1.0 / s_a
        out[f"{b.mlp_norm}.weight"] = 1.0 / s_m
        for name in b.attn_in:
            out[f"{name}.weight"] = (_base(model, f"{name}.weight", dt) @ r1) * s_a
        # values: rotate every head by R2, then divide by s_v
        wv = out[f"{b.value}.weight"].reshape(b.kv_heads, b.head_dim, -1)
        wv = torch.einsum("ji,kjc->kic", r2, wv).reshape(b.kv_heads * b.head_dim, -1)
        out[f"{b.value}.weight"] = wv / s_v.unsqueeze(1)
        bv = _maybe_bias(model, b.value, dt)
        if bv is not None:
            out[f"{b.value}.bias"] = (bv.reshape(b.kv_heads, b.head_dim) @ r2).reshape(-1) / s_v
        # output projection: columns by R2 and s_v (repeated over each group's query heads), rows by R1
        s_o = s_v.reshape(b.kv_heads, b.head_dim).repeat_interleave(b.heads // b.kv_heads, dim=0).reshape(-1)
        wo = _base(model, f"{b.out}.weight", dt)
        wo = (wo.reshape(wo.shape[0], b.heads, b.head_dim) @ r2).reshape(wo.shape) * s_o
        out[f"{b.out}.weight"] = r1.T @ wo
        bo = _maybe_bias(model, b.out, dt)
        if bo is not None:
            out[f"{b.out}.bias"] = bo @ r1
        for name in b.mlp_in:
            out[f"{name}.weight"] = (_base(model, f"{name}.weight", dt) @ r1) * s_m
        wd = _base(model, f"{b.down}.weight", dt)
        if b.up is not None:
            s_u = state.log_s_up[str(b.index)].to(dt).exp()
            out[f"{b.up}.weight"] = out[f"{b.up}.weight"] / s_u.unsqueeze(1)
            bu = _maybe_bias(model, b.up, dt)
            if bu is not None:
                out[f"{b.up}.bias"] = bu / s_u
            wd = wd * s_u
        if b.down in online:
            wd = fwht(wd)  # W @ H (H symmetric)
        out[f"{b.down}.weight"] = r1.T @ wd
        bd = _maybe_bias(model, b.down, dt)
        if bd is not None:
            out[f"{b.down}.bias"] = bd @ r1
    out[f"{plan.lm_head}.weight"] = _base(model, f"{plan.lm_head}.weight", dt) @ r1
    for name, spec in (weight_quant or {}).items():
        key = f"{name}.weight"
        out[key] = fake_quantize_weight(out[key], spec)
    for key, value in out.items():
        out[key] = value.to(model.get_parameter(key).dtype)
    return out


@torch.no_grad()
def fold_state(model: nn.Module, plan: ModelPlan, state: OSTState, online: set[str]) -> None:
    """Write the transformed floating-point weights into ``model`` (computed in float64)."""
    for key, value in transformed_params(model, plan, state, online, compute_dtype=F64).items():
        model.get_parameter(key).data.copy_(value)


@torch.no_grad()
def cayley_step(x: nn.Parameter, lr: float) -> None:
    """One Cayley-SGD step on the orthogonal group (float64 solve; exact orthogonality kept)."""
    if x.grad is None:
        return
    xd, g = x.detach().to(F64), x.grad.to(F64)
    a = g @ xd.T - xd @ g.T
    tau = min(lr, 1.0 / (float(a.norm()) + 1e-12))
    eye = torch.eye(a.shape[0], dtype=F64, device=a.device)
    new = torch.linalg.solve(eye + 0.5 * tau * a, (eye - 0.5 * tau * a) @ xd)
    x.data.copy_(new.to(x.dtype))


# ----------------------------------------------------------------------------- losses
def kl_top_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """KL(p_FP || p_Q) over the FP model's top-k tokens (both distributions renormalised on them)."""
    k = min(k, teacher_logits.shape[-1])
    top, idx = teacher_logits.float().topk(k, dim=-1)
    log_p = F.log_softmax(top, dim=-1)
    log_q = F.log_softmax(student_logits.float().gather(-1, idx), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def blockwise_mse_loss(
    teacher_hidden: tuple[torch.Tensor, ...],
    student_hidden: tuple[torch.Tensor, ...],
    r1: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over blocks of the normalised MSE between the quantized block outputs and the rotated FP
    ones (padding positions, where ``mask == 0``, excluded)."""
    total = student_hidden[0].new_zeros((), dtype=torch.float32)
    keep = None if mask is None else mask.bool()
    for t, s in zip(teacher_hidden[1:], student_hidden[1:]):
        target, pred = t.float() @ r1, s.float()
        if keep is not None:
            target, pred = target[keep], pred[keep]
        total = total + (pred - target).pow(2).mean() / target.pow(2).mean().clamp(min=1e-12)
    return total


# ----------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    losses: list[float]
    epoch_losses: list[float]


class _ActQuant:
    """Forward pre-hooks fake-quantizing linear inputs (after the online Hadamard) while ``active``."""

    def __init__(self, model: nn.Module, names: list[str], recipe: Recipe, online: set[str]) -> None:
        self.active = False
        self.hooks = []
        act = recipe.activation
        for name in names:
            has_h = name in online

            def hook(mod: nn.Module, args: tuple, has_h: bool = has_h) -> tuple | None:
                if not self.active:
                    return None
                x = args[0]
                if has_h:
                    x = fwht(x)
                if act.enabled:
                    x = fake_quantize(x, act.bits, act.symmetric, act.clip_ratio)
                return (x, *args[1:])

            self.hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def train_transforms(
    model: nn.Module,
    adapter: ModelAdapter,
    plan: ModelPlan,
    state: OSTState,
    calibration: CalibrationData,
    recipe: Recipe,
    quantized: list[str],
    online: set[str],
    progress: ProgressCallback = no_progress,
) -> TrainResult:
    params = recipe.method
    assert isinstance(params, OSTQuantParams)
    device = state.r1.device
    weight_quant = {n: recipe.weight for n in quantized} if recipe.weight.enabled else {}
    model_dtype = model.get_parameter(f"{plan.lm_head}.weight").dtype
    compute_dtype = model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float32
    base_impl = getattr(model.config, "_attn_implementation", None) or "sdpa"
    kv = attach_kv_quantizer(model, adapter, recipe.kv_cache, rotate=True) if recipe.kv_cache.enabled else {}
    if kv:
        model.config._attn_implementation = base_impl
    acts = _ActQuant(model, quantized, recipe, online)
    adam = torch.optim.Adam(state.scales(), lr=params.lr_scale)
    n_batches = (calibration.num_samples + calibration.batch_size - 1) // calibration.batch_size
    total = max(1, params.epochs * n_batches)
    losses: list[float] = []
    epoch_losses: list[float] = []
    mse = not params.end_to_end
    try:
        for epoch in range(params.epochs):
            running = []
            for ids, mask in calibration.batches(device):
                with torch.no_grad():
                    teacher = model(ids, attention_mask=mask, use_cache=False, output_hidden_states=mse)
                if kv:
                    model.config._attn_implementation = ATTENTION_NAME
                acts.active = True
                try:
                    p = transformed_params(model, plan, state, online, weight_quant, compute_dtype)
                    student = functional_call(
                        model, p, (ids,), {"attention_mask": mask, "use_cache": False, "output_hidden_states": mse}
                    )
                finally:
                    acts.active = False
                    if kv:
                        model.config._attn_implementation = base_impl
                if mse:
                    loss = blockwise_mse_loss(teacher.hidden_states, student.hidden_states, state.r1, mask)
                else:
                    loss = kl_top_loss(teacher.logits, student.logits, params.kl_top_k, mask)
                state.zero_grad(set_to_none=True)
                loss.backward()
                for r in state.rotations():
                    cayley_step(r, params.lr_rotation)
                adam.step()
                losses.append(float(loss.detach()))
                running.append(losses[-1])
                progress(len(losses) / total, f"ostquant: epoch {epoch + 1}/{params.epochs} loss {losses[-1]:.5f}")
            epoch_losses.append(sum(running) / max(1, len(running)))
    finally:
        acts.remove()
        if kv:
            detach_kv_quantizer(model)
            model.config._attn_implementation = base_impl
    return TrainResult(losses=losses, epoch_losses=epoch_losses)


@register_method
class OSTQuantMethod(QuantizationMethod):
    name = "ostquant"

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        start = time.perf_counter()
        params = recipe.method
        if not isinstance(params, OSTQuantParams):
            raise TypeError(f"ostquant got a recipe for {params.name!r}")
        adapter = get_adapter(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        progress(0.0, "ostquant: QSUR of the original inputs")
        check_rotatable(adapter)
        before = linear_input_qsur(model, adapter, calibration)
        fuse_norms(model, adapter)
        plan = build_plan(adapter)
        quantized = [n for n in plan.linears if not is_skipped(n, recipe)]
        online = {b.down for b in plan.blocks if not is_skipped(b.down, recipe)}
        state = OSTState(model, plan, adapter.hidden_size, seed=0)
        progress(0.05, "ostquant: training rotations and scales")
        result = train_transforms(
            model, adapter, plan, state, calibration, recipe, quantized, online, sub_progress(progress, 0.05, 0.85)
        )
        fold_state(model, plan, state, online)
        transforms = {n: HadamardTransform(model.get_submodule(n).in_features).to(state.r1.device) for n in online}
        progress(0.86, "ostquant: QSUR of the transformed inputs")
        after = linear_input_qsur(model, adapter, calibration, transforms)
        finish_lm_head(model, adapter)
        layers = quantize_linears(
            model, adapter, recipe, transforms=transforms, calibration=calibration, progress=sub_progress(progress, 0.88, 0.98)
        )
        report = MethodReport(method=self.name)
        for name in plan.linears:
            metrics = qsur_report(before[name], after[name])
            metrics["online_hadamard"] = float(name in online)
            layer = layers.get(name)
            metrics.update(getattr(layer, "quant_stats", None) or {})
            report.add(name, **metrics)
        n = max(1, len(plan.linears))
        report.summary.update(
            qsur_before_mean=sum(before[x].relative for x in plan.linears) / n,
            qsur_after_mean=sum(after[x].relative for x in plan.linears) / n,
            quantized_layers=float(len(layers)),
            train_steps=float(len(result.losses)),
        )
        if result.epoch_losses:
            report.summary.update(loss_first_epoch=result.epoch_losses[0], loss_last_epoch=result.epoch_losses[-1])
        finalize(model, adapter, recipe, rotate_kv=True)
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"ostquant: {len(layers)} linears quantized")
        return model
