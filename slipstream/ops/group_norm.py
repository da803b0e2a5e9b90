"""GroupNorm with low-precision I/O and fp32 statistics, optionally followed by a fused SiLU.

:func:`group_norm` is the public op. Eager calls run a plain ``torch.autograd.Function`` that calls
the Triton kernels in :mod:`slipstream.ops.kernels.group_norm` where :func:`use_triton` says so, and
the pure-PyTorch :func:`group_norm_reference` / :func:`group_norm_backward_reference` otherwise.
Under ``torch.compile`` it traces, by default (:data:`slipstream.config.compiled_group_norm`
``= "inductor"``), as :func:`group_norm_reference`'s math, which Inductor fuses; with ``"kernel"`` as
the custom ops ``slipstream::group_norm_forward`` and ``slipstream::group_norm_backward``, which run
the same code as eager calls (no graph breaks either way).

Both read (N, C, *) tensors in whatever layout they come in: contiguous and channels_last tensors
are read and written in place, and the output has the input's memory layout. A tensor whose spatial
dims do not flatten to one stride (a strided slice) is copied once, contiguously.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from slipstream import config
from slipstream.ops._backend import use_triton

__all__ = ["group_norm", "group_norm_reference", "group_norm_backward_reference", "ACTIVATIONS"]

#: Activations :func:`group_norm` can fuse after the norm.
ACTIVATIONS = (None, "silu")
# Dtypes the Triton kernels read and write; others (float64) take the PyTorch path.
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 math for 16/32-bit inputs; float64 stays float64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalized(x: Tensor, num_groups: int, mean: Tensor, rstd: Tensor) -> Tensor:
    """(x - mean) * rstd per group, as an (N, C, S) tensor in the statistics' dtype."""
    n, c = x.shape[:2]
    grouped = _by_group(x, num_groups).to(mean.dtype)
    return ((grouped - mean[..., None]) * rstd[..., None]).reshape(n, c, math.prod(x.shape[2:]))


def _by_group(t: Tensor, num_groups: int) -> Tensor:
    """An (N, C, *) tensor as (N, G, elements of a group); sizes spelled out, so an empty batch reshapes too."""
    return t.reshape(t.shape[0], num_groups, t.shape[1] // num_groups * math.prod(t.shape[2:]))


def _per_channel(t: Optional[Tensor], default: float, like: Tensor) -> Tensor:
    """``t`` as a (C, 1) column in ``like``'s dtype, or a constant when the parameter is absent."""
    if t is None:
        return torch.full((1, 1), default, dtype=like.dtype, device=like.device)
    return t.to(like.dtype)[:, None]


def _in_layout_of(x: Tensor, values: Tensor, dtype: torch.dtype) -> Tensor:
    """``values`` (viewable as ``x.shape``) written into a new tensor with ``x``'s memory layout."""
    out = torch.empty_like(x, dtype=dtype)
    out.copy_(values.reshape(x.shape))
    return out


def group_norm_reference(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    silu: bool = False,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch forward: ``(y, mean, rstd)`` with fp32 math (float64 for float64 input).

    ``y`` has ``x``'s shape and memory layout, dtype ``out_dtype`` (default ``x.dtype``); ``mean`` and
    ``rstd`` are (N, G) in the math dtype.

    Example:
        >>> y, mean, rstd = group_norm_reference(torch.randn(2, 4, 3), 2)
        >>> y.shape, mean.shape
        (torch.Size([2, 4, 3]), torch.Size([2, 2]))
    """
    grouped = _by_group(x, num_groups).to(_compute_dtype(x))
    if grouped.numel() == 0:  # nothing to normalize (var_mean would warn of zero degrees of freedom)
        var = mean = grouped.new_zeros(grouped.shape[:2])
    else:
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
    rstd = torch.rsqrt(var + eps)
    z = _normalized(x, num_groups, mean, rstd) * _per_channel(weight, 1.0, mean) + _per_channel(bias, 0.0, mean)
    if silu:
        z = torch.nn.functional.silu(z)
    return _in_layout_of(x, z, out_dtype or x.dtype), mean, rstd


def group_norm_backward_reference(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Pure-PyTorch backward of :func:`group_norm_reference`: ``(dx, dweight, dbias)``.

    ``dx`` has ``x``'s layout and dtype; ``dweight``/``dbias`` are None where the parameter is None.

    Example:
        >>> x = torch.randn(2, 4, 3)
        >>> y, mean, rstd = group_norm_reference(x, 2)
        >>> dx, dw, db = group_norm_backward_reference(torch.randn_like(y), x, None, None, mean, rstd, 2)
        >>> dx.shape, dw
        (torch.Size([2, 4, 3]), None)
    """
    xhat = _normalized(x, num_groups, mean, rstd)
    w = _per_channel(weight, 1.0, mean)
    g = dy.reshape(xhat.shape).to(mean.dtype)
    if silu:
        z = xhat * w + _per_channel(bias, 0.0, mean)
        sig = torch.sigmoid(z)
        g = g * sig * (1 + z * (1 - sig))
    dweight = None if weight is None else (g * xhat).sum(dim=(0, 2)).to(weight.dtype)
    dbias = None if bias is None else g.sum(dim=(0, 2)).to(bias.dtype)
    gw = _by_group(g * w, num_groups)
    xhat = xhat.reshape(gw.shape)
    dx = (gw - gw.mean(-1, keepdim=True) - xhat * (gw * xhat).mean(-1, keepdim=True)) * rstd[..., None]
    return _in_layout_of(x, dx, x.dtype), dweight, dbias


def _kernels_apply(x: Tensor) -> bool:
    return use_triton(x) and x.dtype in _KERNEL_DTYPES and x.numel() > 0


def _forward_impl(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                  silu: bool, out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, rstd)`` from the Triton kernels or the PyTorch fallback."""
    if _kernels_apply(x):
        from slipstream.ops.kernels import group_norm as kernels

        return kernels.forward(x, weight, bias, num_groups, eps, silu, out_dtype)
    return group_norm_reference(x, num_groups, weight, bias, eps, silu, out_dtype)


def _backward_impl(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                   rstd: Tensor, num_groups: int, silu: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(dx, dweight, dbias)`` from the Triton kernels or the PyTorch fallback."""
    if _kernels_apply(x):
        from slipstream.ops.kernels import group_norm as kernels

        return kernels.backward(dy, x, weight, bias, mean, rstd, num_groups, silu)
    return group_norm_backward_reference(dy, x, weight, bias, mean, rstd, num_groups, silu)


@torch.library.custom_op("slipstream::group_norm_forward", mutates_args=())
def _forward_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    num_groups: int,
    eps: float,
    silu: bool,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(x, weight, bias, num_groups, eps, silu, out_dtype)


@_forward_op.register_fake
def _forward_fake(x, weight, bias, num_groups, eps, silu, out_dtype):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_compute_dtype(x))
    return torch.empty_like(x, dtype=out_dtype), stats, torch.empty_like(stats)


# Custom ops return tensors only: an absent parameter's gradient travels as an empty tensor.
@torch.library.custom_op("slipstream::group_norm_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = _backward_impl(dy, x, weight, bias, mean, rstd, num_groups, silu)
    if dweight is not None and dbias is not None:
        dbias = dbias.clone()  # the kernels' dweight and dbias may be views of one buffer; op outputs may not alias
    return dx, _or_empty(dweight, x), _or_empty(dbias, x)


def _or_empty(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_empty(0) if grad is None else grad


@_backward_op.register_fake
def _backward_fake(dy, x, weight, bias, mean, rstd, num_groups, silu):
    return (
        torch.empty_like(x),
        _or_empty(None if weight is None else torch.empty_like(weight), x),
        _or_empty(None if bias is None else torch.empty_like(bias), x),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, num_groups, _eps, silu, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups = num_groups
    ctx.silu = silu


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _backward_op(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
    return (
        dx,
        None if weight is None else dweight,
        None if bias is None else dbias,
        None, None, None, None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupNorm(torch.autograd.Function):
    """The same forward and backward as the custom ops, minus the custom-op dispatcher's overhead.

    Eager calls go through here (about 0.1 ms less per forward + backward on a typical host, which
    adds up over the dozens of norms of a CNN); traced calls use the custom ops.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu, out_dtype):
        y, mean, rstd = _forward_impl(x, weight, bias, num_groups, eps, silu, out_dtype)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.silu, ctx.eps = num_groups, silu, eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        if torch.is_grad_enabled():  # create_graph=True: gradient penalties, double backward
            return _gradients_with_graph(ctx, grad_y)
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = _backward_impl(grad_y, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu)
        return dx, dweight, dbias, None, None, None, None


def _gradients_with_graph(ctx, grad_y: Tensor) -> tuple[Optional[Tensor], ...]:
    """The gradients as differentiable PyTorch ops, from :func:`_math_in_torch_ops` recomputed in fp32.

    The kernels and the fallback treat the saved statistics as constants, so their gradients would
    differentiate wrongly a second time; PyTorch's own group norm differentiates twice.
    """
    x, weight, bias, _, _ = ctx.saved_tensors
    compute = _compute_dtype(x)
    y = _math_in_torch_ops(x, weight, bias, ctx.num_groups, ctx.eps, ctx.silu, compute)
    inputs = (x, weight, bias)
    found = iter(torch.autograd.grad(y, [t for t, need in zip(inputs, ctx.needs_input_grad) if need],
                                     grad_y.to(compute), create_graph=True))
    grads = [next(found).to(t.dtype) if need else None for t, need in zip(inputs, ctx.needs_input_grad)]
    return (*grads, None, None, None, None)


def check_activation(activation: Optional[str]) -> None:
    """Raise ValueError unless ``activation`` is one of :data:`ACTIVATIONS`.

    Example:
        >>> check_activation("silu")
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r} is not supported; allowed values: {ACTIVATIONS}")


def _check_x(x: Tensor, num_groups: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *), got {tuple(x.shape)}")
    if x.shape[1] % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the {x.shape[1]} channels of x")


def _validate(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor],
              eps: float, activation: Optional[str], out_dtype: Optional[torch.dtype]) -> None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
    _check_x(x, num_groups)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(param).__name__}")
        if param.shape != (x.shape[1],) or not param.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor of shape ({x.shape[1]},), got "
                             f"{param.dtype} {tuple(param.shape)}")
        if param.device != x.device:
            raise ValueError(f"{name} must be on x's device ({x.device}), got {param.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number > 0, got {type(eps).__name__} {eps!r}")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    check_activation(activation)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype or None, got {out_dtype!r}")


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    activation: Optional[str] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """GroupNorm of an (N, C, *) tensor with fp32 statistics, then ``activation`` if given.

    Computes what ``F.group_norm`` (followed by ``F.silu`` for ``activation='silu'``) computes, with
    fp32 math whatever the input dtype, reading and writing the tensors' own dtypes: bf16/fp16 in,
    bf16/fp16 out, no fp32 copies. On CUDA it is one Triton kernel launch forward and one backward
    (plus a small sum for the weight and bias gradients); contiguous and channels_last inputs are
    read in place and the output keeps the input's memory layout. Elsewhere it runs in PyTorch.
    Results are deterministic.

    Args:
        x: input of shape (N, C, *), float16, bfloat16, float32 (or float64, PyTorch path only).
        num_groups: number of groups G; must divide C.
        weight, bias: optional per-channel affine parameters of shape (C,), any float dtype.
        eps: added to the variance, > 0.
        activation: ``None`` or ``'silu'`` (fused into forward and backward).
        out_dtype: dtype of the output (default ``x.dtype``); for example bf16 from fp32 input
            under autocast.

    Example:
        >>> x = torch.randn(2, 8, 5, 5)
        >>> y = group_norm(x, 4, torch.ones(8), torch.zeros(8), activation='silu')
        >>> torch.allclose(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 4)), atol=1e-5)
        True
    """
    _validate(x, num_groups, weight, bias, eps, activation, out_dtype)
    return _group_norm(x, num_groups, weight, bias, float(eps), activation, out_dtype)


def group_norm_of_module(module: torch.nn.GroupNorm, x: Tensor, activation: Optional[str] = None,
                         out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`group_norm` with ``module``'s groups, parameters and eps, which are valid by construction.

    Only ``x`` is checked: a module calls this on every forward, and checking its own parameters
    again cost host time per call.

    Example:
        >>> gn = torch.nn.GroupNorm(2, 4)
        >>> x = torch.randn(3, 4, 5)
        >>> torch.allclose(group_norm_of_module(gn, x), gn(x), atol=1e-6)
        True
    """
    if x.dim() >= 2 and x.shape[1] != module.num_channels:
        raise ValueError(f"x must have {module.num_channels} channels (dim 1), got shape {tuple(x.shape)}")
    _check_x(x, module.num_groups)
    check_activation(activation)
    return _group_norm(x, module.num_groups, module.weight, module.bias, float(module.eps), activation, out_dtype)


def _math_in_torch_ops(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], num_groups: int, eps: float,
                       silu: bool, out_dtype: torch.dtype) -> Tensor:
    """The op's function as ``F.group_norm`` in fp32: ``out_dtype`` out, in x's layout.

    What Inductor fuses, what ``torch.func`` transforms, and what a gradient with a graph comes from.

    ATen's group norm, not :func:`group_norm_reference`'s tensor ops: Inductor lowers it with its own
    GroupNorm decomposition, forward and backward, as it does for a model compiled without us, so the
    graph is compile alone's but for the output cast. With the reference's ops traced instead,
    resnet50_gn's compiled step (CUDA graphs, H100) ran 0.64x as fast as compile alone; with this, 1.30x
    (the cast is fused into Inductor's GroupNorm kernel, which then writes bf16 instead of fp32).
    """
    compute = _compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        y = F.group_norm(x.to(compute), num_groups, None if weight is None else weight.to(compute),
                         None if bias is None else bias.to(compute), eps)
        if silu:
            y = F.silu(y)
    return y.to(out_dtype)


def _group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                activation: Optional[str], out_dtype: Optional[torch.dtype]) -> Tensor:
    args = (x, weight, bias, num_groups, eps, activation == "silu", out_dtype or x.dtype)
    if torch.compiler.is_compiling():
        path = config.compiled_group_norm
        if path == "inductor":
            return _math_in_torch_ops(*args)
        if path != "kernel":
            raise ValueError(f"slipstream.config.compiled_group_norm must be 'inductor' or 'kernel', got {path!r}")
        return _forward_op(*args)[0]  # the custom op: no graph breaks, our kernels
    if torch._C._are_functorch_transforms_active():  # vmap, grad, jacrev: PyTorch ops, which they transform
        return _math_in_torch_ops(*args)
    return _EagerGroupNorm.apply(*args)
