"""FlatQuant: learnable Kronecker-factored affine transforms, calibrated block by block.

Per transformer block (following the reference implementation, ruikangliu/FlatQuant):

* ``attn_in``: one transform ``P = P1 (x) P2`` (``n1 * n2 = hidden``, ``n1`` near ``sqrt(hidden)``)
  shared by q/k/v, preceded by a per-channel smoothing diagonal ``d``;
* ``attn_out``: ``P = O (x) V``: ``O [heads, heads]`` mixes the heads of o_proj's input online while the
  head-dim factor ``V [head_dim, head_dim]`` is folded into v_proj's output (so the V cache is stored in
  the ``V`` basis, the reference's ``vcache_trans``) and costs nothing online;
* ``mlp_in``: one transform with diagonal shared by gate/up (fc1 for OPT);
* ``mlp_out``: one transform with diagonal for down_proj (fc2).

Each factor is parametrised as ``U diag(s) V^T`` with ``U, V`` orthogonal (Cayley map from a random
orthogonal start), so ``P`` starts as a random rotation and its inverse-transpose ``U diag(1/s) V^T``
is available in closed form (the stable inverse used for folding ``W' = (W / d) @ P^{-T}``).
Learnable clipping: per output channel sigmoid-parametrised ratios of the weight's row max / min, and
one sigmoid-parametrised ratio per linear for the per-token activation range (both initialised at
``sigmoid(4)``). The transforms, diagonals and clips are trained with AdamW (clips at 10x the learning
rate), linear warm-up and a cosine schedule, minimising the MSE between the fake-quantized block's output
and the floating-point block's output (loss normalised by its own value, as in the reference).

After training, the inverses are folded into the weights (float64), the learned weight clip is
applied, the smoothing diagonal is folded into the preceding norm (or into up_proj for down_proj) where
that is exact, and the linears are replaced by :class:`QuantLinear` with the
:class:`KroneckerTransform` as their online input transform and the learned activation clip ratio. The
quantized block's outputs are fed forward as the next block's inputs (the targets stay the FP model's).
With KV-cache quantization the quantizer of :mod:`quant.modules.kv_cache` is attached from the start,
so training sees it: values are quantized in the learned ``V`` basis, and queries/keys are rotated by
a learned orthogonal head-dim matrix (the reference's K-cache transform, here restricted to rotations
so that the quantizer's single ``rotation`` buffer serves both) that starts from the quantizer's Hadamard.

Not in the loop: the reference's learnable KV-cache clipping (the recipe's fixed ``kv_cache.clip_ratio``
is used).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from quant.calibration.capture import call_block, capture_block_inputs
from quant.calibration.data import CalibrationData
from quant.methods.base import MethodReport, ProgressCallback, QuantizationMethod, no_progress, register_method, sub_progress
from quant.methods.common import build_quant_linear, finalize, is_skipped, quantize_linears
from quant.models.adapters import BlockInfo, LinearGroup, get_adapter
from quant.modules.linear import set_module
from quant.quantizers.core import fake_quantize
from quant.quantizers.weight import group_size_for, quantize_weight_rtn
from quant.recipes.schema import FlatQuantParams, Recipe
from quant.transforms.kronecker import KroneckerTransform, kron_factors, kronecker_matmul

CLIP_INIT = 4.0  # sigmoid(4) ~ 0.982, the reference's initial clip ratio
CLIP_LR_MULT = 10.0
WARMUP_STEPS = 16
SMAX_FLOOR = 1e-5


# ------------------------------------------------------------------------------------------ parametrisation
def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal ``[n, n]`` matrix (QR of a Gaussian with the sign fix), float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class OrthogonalFactor(nn.Module):
    """``Q = Q0 @ cayley(A)``: ``Q0`` a fixed random orthogonal start, ``A`` a learnable skew matrix."""

    def __init__(self, n: int, generator: torch.Generator | None = None, base: torch.Tensor | None = None) -> None:
        super().__init__()
        self.n = n
        if base is None:
            if generator is None:
                raise ValueError("an OrthogonalFactor needs a generator or a base matrix")
            base = random_orthogonal(n, generator)
        self.register_buffer("base", base.detach().float().clone())
        self.skew = nn.Parameter(torch.zeros(n, n, device=base.device))

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        a = torch.triu(self.skew.to(dtype), diagonal=1)
        a = a - a.transpose(0, 1)
        eye = torch.eye(self.n, dtype=dtype, device=a.device)
        cayley = torch.linalg.solve(eye + a, eye - a)  # (I + A)^{-1} (I - A), orthogonal for skew A
        return self.base.to(dtype) @ cayley


class AffineFactor(nn.Module):
    """An invertible ``[n, n]`` factor ``P = U diag(s) V^T`` with ``P^{-T} = U diag(1/s) V^T``."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        super().__init__()
        self.n = n
        self.u = OrthogonalFactor(n, generator)
        self.v = OrthogonalFactor(n, generator)
        self.s = nn.Parameter(torch.ones(n))
        # within one block forward, linears sharing this factor reuse one computation (see BlockFlat.wrapped)
        self.cache_enabled = False
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def clear_cache(self) -> None:
        self._cached = None

    def matrices(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, P^{-T})``, computed outside autocast in ``dtype``."""
        use_cache = self.cache_enabled and dtype == torch.float32
        if use_cache and self._cached is not None:
            return self._cached
        with _no_autocast(self.s.device):
            u, v, s = self.u.matrix(dtype), self.v.matrix(dtype), self.s.to(dtype)
            out = (u * s) @ v.transpose(0, 1), (u / s) @ v.transpose(0, 1)
        if use_cache:
            self._cached = out
        return out


@dataclass
class KronMatrices:
    left: torch.Tensor
    left_inv_t: torch.Tensor
    right: torch.Tensor
    right_inv_t: torch.Tensor
    scale: torch.Tensor | None


class FlatTransform(nn.Module):
    """Trainable ``x -> (x * d) @ (P1 (x) P2)``.

    ``right_online=False`` (o_proj): the right factor is not applied to the activation here because the
    producer (v_proj) already emits its output in that basis; it is still part of the weight fold.
    """

    def __init__(
        self,
        left: AffineFactor,
        right: AffineFactor | None,
        n2: int,
        scale: torch.Tensor | None = None,
        right_online: bool = True,
    ) -> None:
        super().__init__()
        self.left = left
        self.right = right
        self.n1, self.n2 = left.n, n2
        self.right_online = right_online
        self.scale = nn.Parameter(scale.float().clone()) if scale is not None else None

    @property
    def size(self) -> int:
        return self.n1 * self.n2

    def matrices(self, dtype: torch.dtype = torch.float32) -> KronMatrices:
        left, left_inv_t = self.left.matrices(dtype)
        if self.right is not None:
            right, right_inv_t = self.right.matrices(dtype)
        else:
            right = right_inv_t = torch.eye(self.n2, dtype=dtype, device=left.device)
        scale = None if self.scale is None else self.scale.to(dtype)
        return KronMatrices(left, left_inv_t, right, right_inv_t, scale)

    def apply(self, x: torch.Tensor, m: KronMatrices) -> torch.Tensor:
        if m.scale is not None:
            x = x * m.scale.to(x.dtype)
        right = m.right if self.right_online else torch.eye(self.n2, dtype=m.left.dtype, device=m.left.device)
        return kronecker_matmul(x, m.left.to(x.dtype), right.to(x.dtype))

    def fold(self, weight: torch.Tensor, m: KronMatrices) -> torch.Tensor:
        """``(W / d) @ (P1 (x) P2)^{-T}``: the weight that undoes :meth:`apply` (with the producer's basis)."""
        if m.scale is not None:
            weight = weight / m.scale.to(weight.dtype)
        return kronecker_matmul(weight, m.left_inv_t.to(weight.dtype), m.right_inv_t.to(weight.dtype))

    def online(self, fold_scale: bool) -> KroneckerTransform:
        """The runtime transform (float32 factors); the diagonal is left out when folded elsewhere."""
        m = self.matrices(torch.float64)
        right = m.right if self.right_online else torch.eye(self.n2, dtype=torch.float64)
        scale = None if (m.scale is None or fold_scale) else m.scale
        return KroneckerTransform(m.left.detach().cpu(), right.detach().cpu(), None if scale is None else scale.detach().cpu())


# ------------------------------------------------------------------------------------------ training linear
@dataclass(frozen=True)
class _QSpec:
    bits: int
    symmetric: bool
    group_size: int | None = None


class FlatLinear(nn.Module):
    """Stands in for a block linear during calibration: transform -> act fake-quant (learned clip) ->
    linear with the folded, clipped (optionally output-transformed) and fake-quantized weight."""

    def __init__(
        self,
        linear: nn.Linear,
        transform: FlatTransform | None,
        weight_q: _QSpec | None,
        act_q: _QSpec | None,
        learn_clip: bool,
        act_clip_default: float,
        out_factor: AffineFactor | None = None,
    ) -> None:
        super().__init__()
        self.linear = linear
        self.transform = transform
        self.out_factor = out_factor
        self.weight_q = weight_q
        self.act_q = act_q
        self.act_clip_default = act_clip_default
        out_features = linear.out_features
        device = linear.weight.device
        self.act_logit = nn.Parameter(torch.full((1,), CLIP_INIT, device=device)) if (learn_clip and act_q) else None
        if learn_clip and weight_q:
            self.w_logit_max = nn.Parameter(torch.full((out_features, 1), CLIP_INIT, device=device))
            self.w_logit_min = nn.Parameter(torch.full((out_features, 1), CLIP_INIT, device=device))
        else:
            self.w_logit_max = self.w_logit_min = None

    # ---------------------------------------------------------------- pieces shared with the fold
    def act_clip_ratio(self) -> float | torch.Tensor:
        return torch.sigmoid(self.act_logit) if self.act_logit is not None else self.act_clip_default

    def clip_weight(self, w: torch.Tensor) -> torch.Tensor:
        if self.w_logit_max is None:
            return w
        wmax = w.amax(dim=1, keepdim=True) * torch.sigmoid(self.w_logit_max).to(w.dtype)
        wmin = w.amin(dim=1, keepdim=True) * torch.sigmoid(self.w_logit_min).to(w.dtype)
        return torch.clamp(w, min=wmin, max=wmax)

    def out_transform(
        self, w: torch.Tensor, b: torch.Tensor | None, vt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows of ``w`` (and ``b``) re-expressed per head in the ``vt`` basis: ``v' = v @ blockdiag(vt)``."""
        hd = vt.shape[0]
        heads = w.shape[0] // hd
        w = torch.matmul(vt.transpose(0, 1).to(w.dtype), w.reshape(heads, hd, -1)).reshape(w.shape)
        if b is not None:
            b = (b.reshape(heads, hd) @ vt.to(b.dtype)).reshape(-1)
        return w, b

    def effective_weight(
        self, m: KronMatrices | None, vt: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Folded + clipped (+ output-transformed) weight and bias, before weight quantization."""
        w = self.linear.weight.to(dtype)
        b = None if self.linear.bias is None else self.linear.bias.to(dtype)
        if self.transform is not None and m is not None:
            w = self.transform.fold(w, m)
        w = self.clip_weight(w)
        if vt is not None:
            w, b = self.out_transform(w, b, vt)
        return w, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.transform.matrices() if self.transform is not None else None
        vt = self.out_factor.matrices()[0] if self.out_factor is not None else None
        if m is not None:
            x = self.transform.apply(x, m)
        if self.act_q is not None:
            x = fake_quantize(x, self.act_q.bits, self.act_q.symmetric, self.act_clip_ratio())
        w, b = self.effective_weight(m, vt, torch.float32)
        if self.weight_q is not None:
            w = fake_quantize(w, self.weight_q.bits, self.weight_q.symmetric, group_size=self.weight_q.group_size)
        return F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))


# ------------------------------------------------------------------------------------------ one block
def _diag_init(
    params: FlatQuantParams, group: LinearGroup, x_smax: torch.Tensor | None
) -> torch.Tensor | None:
    if not params.learn_scale:
        return None
    n = group.in_features
    if params.diag_init == "one" or x_smax is None:
        return torch.ones(n)
    w_smax = torch.cat([lin.weight.detach().float() for lin in group.linears.values()], dim=0).abs().amax(dim=0)
    x_smax = x_smax.float().to(w_smax.device).clamp(min=SMAX_FLOOR)
    alpha = params.diag_alpha
    return (w_smax.pow(1 - alpha) / x_smax.pow(alpha)).clamp(min=SMAX_FLOOR).cpu()


class BlockFlat(nn.Module):
    """All trainable FlatQuant state of one block and the logic to train-wrap, fold and install it."""

    def __init__(
        self,
        block: BlockInfo,
        recipe: Recipe,
        params: FlatQuantParams,
        x_smax: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        kv_rotation: torch.Tensor | None = None,
    ) -> None:
        """``kv_rotation``: the head-dim rotation of the block's KV quantizer (Q and K); when given, it is
        the start of a learnable orthogonal key transform (the reference's K-cache transform)."""
        super().__init__()
        self.info = block
        self.recipe = recipe
        g = generator if generator is not None else torch.Generator().manual_seed(params.seed + block.index)
        x_smax = x_smax or {}
        wq = recipe.weight
        act = recipe.activation
        self.transforms = nn.ModuleDict()
        self.linears = nn.ModuleDict()  # sanitised name -> FlatLinear
        self.names: dict[str, str] = {}  # sanitised -> full module name
        self.fold_targets: dict[str, str] = {}  # group kind -> where the diagonal folds: "norm" | "producer" | ""
        self.v_factor: AffineFactor | None = None
        self.v_proj_name: str | None = None
        self.k_factor = OrthogonalFactor(kv_rotation.shape[0], base=kv_rotation) if kv_rotation is not None else None
        self.act_clips: dict[str, float] = {}  # learned activation clip ratios, filled by ``install``

        skipped = {name for grp in block.groups for name in grp.linears if is_skipped(name, recipe)}
        attn = block.attention
        head_mode = False
        try:
            out_grp = block.group("attn_out")
        except KeyError:
            out_grp = None
        if attn is not None and out_grp is not None and out_grp.producer is not None:
            o_lin = next(iter(out_grp.linears.values()))
            v_lin = out_grp.producer
            head_mode = (
                o_lin.in_features == attn.num_heads * attn.head_dim
                and v_lin.out_features == attn.num_kv_heads * attn.head_dim
                and out_grp.producer_name not in skipped
                and not any(n in skipped for n in out_grp.linears)
            )
        if head_mode:
            assert attn is not None and out_grp is not None
            self.v_factor = AffineFactor(attn.head_dim, g)
            self.v_proj_name = out_grp.producer_name

        for grp in block.groups:
            live = [n for n in grp.linears if n not in skipped]
            if not live:
                continue
            if grp.kind == "attn_out" and head_mode:
                assert attn is not None
                t = FlatTransform(AffineFactor(attn.num_heads, g), self.v_factor, attn.head_dim, right_online=False)
                self.fold_targets[grp.kind] = ""
            else:
                n1, n2 = kron_factors(grp.in_features)
                scale = None if grp.kind == "attn_out" else _diag_init(params, grp, x_smax.get(grp.kind))
                t = FlatTransform(AffineFactor(n1, g), AffineFactor(n2, g) if n2 > 1 else None, n2, scale)
                self.fold_targets[grp.kind] = self._fold_target(grp, skipped) if scale is not None else ""
            self.transforms[grp.kind] = t
            for name in live:
                lin = grp.linears[name]
                key = name.replace(".", "__")
                self.names[key] = name
                self.linears[key] = FlatLinear(
                    lin,
                    t,
                    _QSpec(wq.bits, wq.symmetric, group_size_for(wq, lin.in_features)) if wq.enabled else None,
                    _QSpec(act.bits, act.symmetric) if act.enabled else None,
                    params.learn_clip,
                    act.clip_ratio,
                    out_factor=self.v_factor if name == self.v_proj_name else None,
                )
        self.to(next(block.module.parameters()).device)

    @staticmethod
    def _fold_target(grp: LinearGroup, skipped: set[str]) -> str:
        """Where the smoothing diagonal can be folded exactly (else it stays in the online transform)."""
        if any(n in skipped for n in grp.linears):
            return ""
        if grp.kind in ("attn_in", "mlp_in"):
            norm = grp.norm
            if norm is not None and not grp.norm_feeds_residual and isinstance(getattr(norm, "weight", None), torch.Tensor):
                return "norm"
        if grp.kind == "mlp_out" and grp.producer is not None and grp.producer_is_elementwise:
            return "producer"
        return ""

    # ---------------------------------------------------------------- training
    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        trans, diag, clips = [], [], []
        for name, p in self.named_parameters():
            if name.endswith("act_logit") or name.endswith("w_logit_max") or name.endswith("w_logit_min"):
                clips.append(p)
            elif name.endswith(".scale"):
                diag.append(p)
            elif name.endswith(".skew") or name.endswith(".s"):
                trans.append(p)
        # parameters are shared between linears: named_parameters already de-duplicates them
        groups = [{"params": trans, "lr": lr}, {"params": diag, "lr": lr}, {"params": clips, "lr": lr * CLIP_LR_MULT}]
        return [g for g in groups if g["params"]]

    @contextlib.contextmanager
    def wrapped(self, model: nn.Module) -> Iterator[None]:
        """Swap the block's linears for their FlatLinear stand-ins for the duration of the context."""
        for key, fl in self.linears.items():
            set_module(model, self.names[key], fl)
        quantizer = self._kv_quantizer()
        hook = None
        if quantizer is not None and self.k_factor is not None:
            factor = self.k_factor

            def set_rotation(mod: nn.Module, _args: tuple) -> None:
                with _no_autocast(factor.skew.device):
                    mod.rotation = factor.matrix()  # differentiable while training

            hook = quantizer.register_forward_pre_hook(set_rotation)
        factors = [m for m in self.modules() if isinstance(m, AffineFactor)]

        def fresh_factors(*_args: Any) -> None:  # parameters change between forwards
            for f in factors:
                f.clear_cache()

        for f in factors:
            f.cache_enabled = True
        block_hooks = [
            self.info.module.register_forward_pre_hook(fresh_factors),
            self.info.module.register_forward_hook(fresh_factors),
        ]
        try:
            yield
        finally:
            for h in block_hooks:
                h.remove()
            for f in factors:
                f.cache_enabled = False
                f.clear_cache()
            for key, fl in self.linears.items():
                set_module(model, self.names[key], fl.linear)
            if hook is not None:
                hook.remove()
                quantizer.rotation = self.key_rotation()

    def _kv_quantizer(self) -> nn.Module | None:
        from quant.modules.kv_cache import CHILD_NAME

        attn = self.info.attention
        return None if attn is None else attn.module._modules.get(CHILD_NAME)

    @torch.no_grad()
    def key_rotation(self) -> torch.Tensor | None:
        """The learned orthogonal head-dim rotation of queries and keys (float32), if any."""
        if self.k_factor is None:
            return None
        with _no_autocast(self.k_factor.skew.device):
            return self.k_factor.matrix(torch.float64).float()

    # ---------------------------------------------------------------- folding
    @torch.no_grad()
    def fold(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, KroneckerTransform, float | None]]:
        """Fold transforms into the linears' float weights and the diagonals into norms / producers.

        Returns, per full linear name, the folded weight and bias (float64, before rounding), the online
        transform and the learned activation clip ratio. The block's modules are updated in place
        (linears keep their class; their weights are now in the transformed basis).
        """
        mats = {kind: t.matrices(torch.float64) for kind, t in self.transforms.items()}
        vt = self.v_factor.matrices(torch.float64)[0] if self.v_factor is not None else None
        folded: dict[str, tuple[torch.Tensor, torch.Tensor | None, KroneckerTransform, float | None]] = {}
        kind_of = {name: grp.kind for grp in self.info.groups for name in grp.linears}
        online = {kind: t.online(fold_scale=bool(self.fold_targets.get(kind))) for kind, t in self.transforms.items()}
        for key, fl in self.linears.items():
            name = self.names[key]
            kind = kind_of[name]
            w, b = fl.effective_weight(mats[kind], vt if name == self.v_proj_name else None, torch.float64)
            clip = float(fl.act_clip_ratio()) if fl.act_logit is not None else None
            folded[name] = (w, b, online[kind], clip)
        # the diagonals: into the norm (weight and bias) or into the producer's output rows
        for grp in self.info.groups:
            target = self.fold_targets.get(grp.kind, "")
            scale = mats[grp.kind].scale if grp.kind in mats else None
            if not target or scale is None:
                continue
            if target == "norm":
                norm = grp.norm
                norm.weight.data = (norm.weight.data.double() * scale.to(norm.weight.device)).to(norm.weight.dtype)
                bias = getattr(norm, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias.data = (bias.data.double() * scale.to(bias.device)).to(bias.dtype)
            elif target == "producer":
                pname = grp.producer_name
                if pname in folded:
                    w, b, t, clip = folded[pname]
                    s = scale.to(w.device)
                    folded[pname] = (w * s.unsqueeze(1), None if b is None else b * s, t, clip)
                else:  # producer kept in floating point (skipped): scale its float weight directly
                    prod = grp.producer
                    prod.weight.data = (prod.weight.data.double() * scale.to(prod.weight.device).unsqueeze(1)).to(prod.weight.dtype)
                    if prod.bias is not None:
                        prod.bias.data = (prod.bias.data.double() * scale.to(prod.bias.device)).to(prod.bias.dtype)
        for name, (w, b, _, _) in folded.items():
            lin = self.linears[name.replace(".", "__")].linear
            lin.weight.data = w.to(device=lin.weight.device, dtype=lin.weight.dtype)
            if b is not None:
                lin.bias.data = b.to(device=lin.bias.device, dtype=lin.bias.dtype)
        return folded

    @torch.no_grad()
    def install(self, model: nn.Module, quantize_now: bool = True) -> dict[str, KroneckerTransform]:
        """Fold, then replace the linears by QuantLinear (RTN weights with the learned clip) when
        ``quantize_now``; otherwise leave the folded float linears for a later rounder (GPTQ).

        Returns the online transform per linear name (the method hands them to ``quantize_linears``).
        """
        folded = self.fold()
        recipe = self.recipe
        learned_wclip = any(fl.w_logit_max is not None for fl in self.linears.values())
        spec = recipe.weight.model_copy(update={"clip_search": False}) if learned_wclip else recipe.weight
        transforms: dict[str, KroneckerTransform] = {}
        self.act_clips = {}
        for name, (w, _, online, clip) in folded.items():
            transform = _clone_transform(online)
            transforms[name] = transform
            if clip is not None:
                self.act_clips[name] = clip
            if not quantize_now:
                continue
            lin = model.get_submodule(name)
            quantized = quantize_weight_rtn(w.float(), spec) if recipe.weight.enabled else None
            set_module(model, name, build_quant_linear(lin, recipe, transform, clip, quantized=quantized))
        return transforms


def _clone_transform(t: KroneckerTransform) -> KroneckerTransform:
    """A private copy per linear (shared buffers would alias tensors in the saved state dict)."""
    return KroneckerTransform(t.left.clone(), t.right.clone(), None if t.scale is None else t.scale.clone())


# ------------------------------------------------------------------------------------------ helpers
def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _lr_lambda(total_steps: int, warmup: bool):
    """Reference schedule: linear warm-up from 1% over 16 steps, times cosine annealing to 1e-3."""

    def factor(step: int) -> float:
        cos = 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
        warm = min(1.0, 0.01 + 0.99 * step / WARMUP_STEPS) if warmup else 1.0
        return warm * cos

    return factor


@contextlib.contextmanager
def _kv_quantizer_detached(block: BlockInfo) -> Iterator[None]:
    """Temporarily remove the block's KV quantizer (FP targets are computed without it)."""
    from quant.modules.kv_cache import CHILD_NAME

    attn = block.attention.module if block.attention is not None else None
    child = attn._modules.pop(CHILD_NAME, None) if attn is not None else None
    try:
        yield
    finally:
        if child is not None:
            attn._modules[CHILD_NAME] = child


@dataclass
class _Streams:
    fp: list[torch.Tensor]
    quant: list[torch.Tensor]
    kwargs: list[dict[str, Any]] = field(default_factory=list)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# ------------------------------------------------------------------------------------------ the method
@register_method
class FlatQuantMethod(QuantizationMethod):
    name = "flatquant"

    def calibrate(
        self,
        model: nn.Module,
        calibration: CalibrationData,
        recipe: Recipe,
        progress: ProgressCallback = no_progress,
    ) -> nn.Module:
        if not isinstance(recipe.method, FlatQuantParams):
            raise ValueError("recipe.method must be FlatQuantParams for the flatquant method")
        params = recipe.method
        start = time.perf_counter()
        adapter = get_adapter(model)
        report = MethodReport(method=self.name)
        blocks = adapter.iter_blocks()
        device = next(blocks[0].module.parameters()).device
        use_gptq = recipe.weight.enabled and recipe.weight.algorithm == "gptq"
        progress(0.0, "flatquant: capturing block inputs")
        model.eval()  # no dropout in the FP targets or the training forward
        inputs = capture_block_inputs(model, adapter, calibration, device)
        streams = _Streams(fp=list(inputs.hidden), quant=list(inputs.hidden), kwargs=inputs.kwargs)
        del inputs  # the streams own the block-0 inputs now (freed as they advance)
        rotate_kv = False
        if recipe.kv_cache.enabled:
            from quant.modules.kv_cache import attach_kv_quantizer

            attn0 = blocks[0].attention
            rotate_kv = attn0 is not None and _is_power_of_two(attn0.head_dim)
            attach_kv_quantizer(model, adapter, recipe.kv_cache, rotate=rotate_kv)
        all_transforms: dict[str, KroneckerTransform] = {}
        all_clips: dict[str, float] = {}
        self._key_rotations: dict[str, torch.Tensor | None] = {}
        block_share = 0.9 if use_gptq else 0.98
        for i, block in enumerate(blocks):
            t0 = time.perf_counter()
            metrics, transforms, clips = self._calibrate_block(model, block, streams, recipe, params, use_gptq)
            all_transforms.update(transforms)
            all_clips.update(clips)
            metrics["seconds"] = time.perf_counter() - t0
            report.add(block.name, **metrics)
            for name, clip in clips.items():
                report.add(name, act_clip=clip)
            progress(
                block_share * (i + 1) / len(blocks),
                f"flatquant: block {i + 1}/{len(blocks)} loss {metrics.get('loss_final', float('nan')):.4g}",
            )
        if use_gptq:
            quantize_linears(
                model,
                adapter,
                recipe,
                transforms=all_transforms,
                act_clips=all_clips,
                calibration=calibration,
                progress=sub_progress(progress, block_share, 0.99),
            )
        finalize(model, adapter, recipe, rotate_kv=rotate_kv)
        self._install_key_rotations(blocks)
        block_metrics = [l.metrics for l in report.layers if "loss_final" in l.metrics]
        if block_metrics:
            report.summary["loss_final_mean"] = sum(m["loss_final"] for m in block_metrics) / len(block_metrics)
            report.summary["loss_quantized_mean"] = sum(m["loss_quantized"] for m in block_metrics) / len(block_metrics)
        report.summary["blocks"] = float(len(blocks))
        report.calibration_seconds = time.perf_counter() - start
        model.quant_report = report
        progress(1.0, f"flatquant: {len(all_transforms)} linears quantized")
        return model

    @torch.no_grad()
    def _install_key_rotations(self, blocks: list[BlockInfo]) -> None:
        """``finalize`` attaches fresh KV quantizers (Hadamard start): load the learned key rotations."""
        from quant.modules.kv_cache import CHILD_NAME

        for block in blocks:
            rotation = self._key_rotations.get(block.name)
            quantizer = block.attention.module._modules.get(CHILD_NAME) if block.attention is not None else None
            current = getattr(quantizer, "rotation", None)
            if rotation is not None and isinstance(current, torch.Tensor):
                current.copy_(rotation.to(device=current.device, dtype=current.dtype))

    # ---------------------------------------------------------------- one block
    def _calibrate_block(
        self,
        model: nn.Module,
        block: BlockInfo,
        streams: _Streams,
        recipe: Recipe,
        params: FlatQuantParams,
        use_gptq: bool,
    ) -> tuple[dict[str, float], dict[str, KroneckerTransform], dict[str, float]]:
        module = block.module
        ref = next(module.parameters())
        device, dtype0 = ref.device, ref.dtype
        # kwargs live on the block's device; float tensors in them (rotary tables, additive masks) are
        # cast to the compute dtype per call (see ``_run`` / ``_train``), never stored twice
        kwargs = [_to_device(kw, device) for kw in streams.kwargs]
        for p in module.parameters():
            p.requires_grad_(False)
        module.float()

        # 1) FP targets (no KV quantizer), collecting per-channel input maxima for the diag init
        x_smax = self._fp_pass(model, block, streams, kwargs, dtype0)

        # 2) trainable state, training against the FP targets from the quantized stream
        kv_rotation = None
        if block.attention is not None:
            from quant.modules.kv_cache import CHILD_NAME

            quantizer = block.attention.module._modules.get(CHILD_NAME)
            kv_rotation = getattr(quantizer, "rotation", None) if quantizer is not None else None
        flat = BlockFlat(block, recipe, params, x_smax, kv_rotation=kv_rotation)
        amp = params.amp and device.type == "cuda"
        metrics: dict[str, float] = {}
        with flat.wrapped(model):
            losses = self._train(flat, module, streams, kwargs, params, device, amp)
            if use_gptq:  # the next block's inputs come from the fake-quantized block
                streams.quant = self._run(module, streams.quant, kwargs, dtype0)
        if losses:
            metrics["loss_first_epoch"] = losses[0]
            metrics["loss_final"] = losses[-1]
        module.to(dtype0)
        for p in flat.parameters():
            p.requires_grad_(False)

        # 3) fold, quantize, and feed the quantized block's outputs forward
        transforms = flat.install(model, quantize_now=not use_gptq)
        if not use_gptq:
            quant_out = self._run(module, streams.quant, kwargs, dtype0)
            metrics["loss_quantized"] = _mse(quant_out, streams.fp)
            streams.quant = quant_out
        else:
            metrics["loss_quantized"] = _mse(streams.quant, streams.fp)
        if "loss_final" not in metrics:
            metrics["loss_final"] = metrics["loss_quantized"]
        self._key_rotations[block.name] = flat.key_rotation()
        return metrics, transforms, dict(flat.act_clips)

    @torch.no_grad()
    def _fp_pass(
        self, model: nn.Module, block: BlockInfo, streams: _Streams, kwargs: list[dict[str, Any]], dtype0: torch.dtype
    ) -> dict[str, torch.Tensor]:
        smax: dict[str, torch.Tensor] = {}
        hooks = []
        for grp in block.groups:
            if grp.kind == "attn_out":
                continue
            first = next(iter(grp.linears.values()))

            def hook(_mod: nn.Module, args: tuple, kind: str = grp.kind) -> None:
                x = args[0].detach()
                amax = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
                smax[kind] = amax if kind not in smax else torch.maximum(smax[kind], amax)

            hooks.append(first.register_forward_pre_hook(hook))
        try:
            with _kv_quantizer_detached(block):
                streams.fp = self._run(block.module, streams.fp, kwargs, dtype0)
        finally:
            for h in hooks:
                h.remove()
        return smax

    @staticmethod
    @torch.no_grad()
    def _run(
        module: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], out_dtype: torch.dtype
    ) -> list[torch.Tensor]:
        ref = next(module.parameters())
        return [
            call_block(module, h.to(device=ref.device, dtype=ref.dtype), _cast_floats(kw, ref.dtype)).to(out_dtype)
            for h, kw in zip(hidden, kwargs)
        ]

    def _train(
        self,
        flat: BlockFlat,
        module: nn.Module,
        streams: _Streams,
        kwargs: list[dict[str, Any]],
        params: FlatQuantParams,
        device: torch.device,
        amp: bool,
    ) -> list[float]:
        """AdamW over the block's FlatQuant parameters (block in float32; bf16 autocast if ``amp``)."""
        groups = flat.param_groups(params.lr)
        if params.epochs == 0 or not groups:
            return []
        targets = streams.fp
        optimizer = torch.optim.AdamW(groups)
        total = params.epochs * len(streams.quant)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, params.warmup))
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        )
        epoch_losses: list[float] = []
        with torch.enable_grad():
            for _ in range(params.epochs):
                total_loss = 0.0
                for h, kw, target in zip(streams.quant, kwargs, targets):
                    with autocast:
                        out = call_block(module, h.to(device=device, dtype=torch.float32), _cast_floats(kw, torch.float32))
                    loss = F.mse_loss(out.float(), target.to(device=device, dtype=torch.float32))
                    value = float(loss.detach())
                    total_loss += value
                    optimizer.zero_grad(set_to_none=True)
                    if value > 0 and math.isfinite(value):
                        (loss / loss.detach()).backward()
                        optimizer.step()
                    scheduler.step()
                epoch_losses.append(total_loss / max(1, len(streams.quant)))
        optimizer.zero_grad(set_to_none=True)
        return epoch_losses


def _mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for o, t in zip(outputs, targets):
        total += float(F.mse_loss(o.float(), t.float(), reduction="sum"))
        count += o.numel()
    return total / max(1, count)
