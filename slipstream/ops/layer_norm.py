"""LayerNorm as ``torch.library`` ops: Triton kernels on CUDA, a pure-PyTorch fallback elsewhere.

:func:`layer_norm` is the public op. Under ``torch.compile`` it traces, by default
(:data:`slipstream.config.compiled_layer_norm` ``= "inductor"``), as the same math in PyTorch ops,
which Inductor fuses with the neighbouring ops (whole models launched fewer kernels and spent less
host time that way). With the setting ``"kernel"`` it traces as two ``triton_op`` s,
``slipstream::layer_norm_fwd`` and ``slipstream::layer_norm_bwd``, with a registered autograd
formula: the compiler traces the ops' bodies (shape logic, allocations, ``wrap_triton`` launches, see
:mod:`slipstream.ops._triton_op`), so models that use them trace without graph breaks and the
compiled code launches our kernels itself, with no Python of ours per call. In eager mode the same
two functions run through a plain ``autograd.Function`` with direct launches (less CPU time per
call), so with ``"kernel"`` the op's compiled and eager numerics are identical. Both call the kernels of
:mod:`slipstream.ops.kernels.layer_norm` when :func:`~slipstream.ops._backend.use_triton` says so,
and :func:`layer_norm_forward_reference` / :func:`layer_norm_backward_reference` otherwise (also when
compiling CPU code under Triton's interpreter, whose kernels cannot be traced).

Dtypes: the input is read in its own dtype (fp32, fp16 or bf16; float64 always takes the
fallback), statistics and all arithmetic are fp32, the output is written in ``out_dtype`` (the
input's dtype by default). The backward writes dx in the input's dtype and dW/dB in the
parameters' dtypes, so an fp32 residual stream feeding a bf16 norm needs no cast kernel either way.

Strides: the normalized dimensions must be viewable as one contiguous row; the leading dimensions
may have any single row stride (for example ``x[:, :n]`` of a wider matrix). Any other layout is
copied once, with ``reshape``, before the kernel runs.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from slipstream import config
from slipstream.ops._backend import use_triton
from slipstream.ops._triton_op import body_uses_triton, register_triton_op

__all__ = ["layer_norm", "layer_norm_forward_reference", "layer_norm_backward_reference"]

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_DTYPES = _KERNEL_DTYPES + (torch.float64,)


def layer_norm(
    x: Tensor,
    normalized_shape: Union[int, Sequence[int]],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Layer normalization over the last ``len(normalized_shape)`` dimensions of ``x``.

    Same math as ``torch.nn.functional.layer_norm``, computed in fp32 whatever the input dtype, in
    one fused kernel on CUDA (forward and backward). ``out_dtype`` sets the output dtype (default:
    ``x.dtype``); weight and bias may be fp32 or the input's dtype.

    Example:
        >>> x = torch.randn(4, 10, 32)
        >>> w, b = torch.ones(32), torch.zeros(32)
        >>> y = layer_norm(x, (32,), w, b)
        >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (32,), w, b), atol=1e-5)
        True
    """
    shape = _validate(x, normalized_shape, weight, bias, eps, out_dtype)
    return _layer_norm(x, shape, weight, bias, float(eps), out_dtype)


def layer_norm_of_module(module: torch.nn.LayerNorm, x: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """:func:`layer_norm` with ``module``'s shape, parameters and eps, which are valid by construction.

    Only ``x`` is checked (its dtype, and that it ends in the normalized shape): a module calls this
    on every forward, and checking its own parameters again cost host time per call.

    Example:
        >>> ln = torch.nn.LayerNorm(8)
        >>> x = torch.randn(2, 8)
        >>> torch.allclose(layer_norm_of_module(ln, x), ln(x), atol=1e-6)
        True
    """
    return _layer_norm(x, tuple(module.normalized_shape), module.weight, module.bias, float(module.eps), out_dtype)


def _layer_norm(
    x: Tensor, shape: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    out_dtype: Optional[torch.dtype],
) -> Tensor:
    _check_x(x, shape)
    args = (x, weight, bias, len(shape), eps, out_dtype)
    if torch.compiler.is_compiling():
        path = config.compiled_layer_norm
        if path == "inductor":
            return _math_in_torch_ops(x, shape, weight, bias, eps, out_dtype)
        if path != "kernel":
            raise ValueError(f"slipstream.config.compiled_layer_norm must be 'inductor' or 'kernel', got {path!r}")
        return torch.ops.slipstream.layer_norm_fwd(*args)[0]  # the triton_op, whose launches the compiler sees
    if torch._C._are_functorch_transforms_active():  # vmap, grad, jacrev: PyTorch ops, which they transform
        return _math_in_torch_ops(x, shape, weight, bias, eps, out_dtype)
    return _EagerLayerNorm.apply(*args)


def _math_in_torch_ops(
    x: Tensor, shape: tuple[int, ...], weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
    out_dtype: Optional[torch.dtype],
) -> Tensor:
    """The op's function in PyTorch ops: fp32 math, ``out_dtype`` out.

    What Inductor fuses, what ``torch.func`` transforms, and what a gradient with a graph comes from.
    """
    compute = _compute_dtype(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        y = F.layer_norm(x.to(compute), shape, None if weight is None else weight.to(compute),
                         None if bias is None else bias.to(compute), eps)
    return y.to(out_dtype or x.dtype)


def _validate(
    x: object,
    normalized_shape: object,
    weight: object,
    bias: object,
    eps: object,
    out_dtype: object,
) -> tuple[int, ...]:
    """Check the public arguments but ``x`` (:func:`_check_x` does); return ``normalized_shape`` as a tuple."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(
            f"normalized_shape must be a positive int or a non-empty sequence of them, got {normalized_shape!r}")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(param).__name__}")
        if tuple(param.shape) != shape:
            raise ValueError(f"{name}.shape must equal normalized_shape={shape}, got {tuple(param.shape)}")
        if param.dtype not in _FLOAT_DTYPES or param.device != x.device:
            raise TypeError(f"{name} must be a floating tensor on {x.device}, got {param.dtype} on {param.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number >= 0, got {type(eps).__name__} {eps!r}")
    if not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be None or one of {_FLOAT_DTYPES}, got {out_dtype!r}")
    return shape


def _check_x(x: Tensor, shape: tuple[int, ...]) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x.dtype must be one of {_FLOAT_DTYPES}, got {x.dtype}")
    if x.shape[x.dim() - len(shape):] != shape:
        raise ValueError(
            f"normalized_shape={shape} must equal the last dimensions of x, whose shape is {tuple(x.shape)}")


def _as_rows(t: Tensor, normalized_ndim: int) -> Tensor:
    """``t`` as an ``[M, N]`` matrix with unit column stride (a view when possible, else one copy)."""
    n = math.prod(t.shape[t.dim() - normalized_ndim:])
    rows = t.reshape(-1, n)
    return rows if rows.stride(1) == 1 or n == 1 else rows.contiguous()


def _kernel_rows(t: Tensor, normalized_ndim: int) -> Tensor:
    """``t`` as the kernels read it: itself when contiguous over one normalized dim, else ``_as_rows``.

    Skipping the reshape matters: each view op costs host time on every call, and eager training
    steps of real models are host-bound.
    """
    return t if normalized_ndim == 1 and t.is_contiguous() else _as_rows(t, normalized_ndim)


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    """A weight or bias as a contiguous 1-D tensor (the kernels read it with unit stride)."""
    if t is None or (t.dim() == 1 and t.is_contiguous()):
        return t
    return t.contiguous().view(-1)


def _kernels_apply(x: Tensor, dtype: torch.dtype, traceable: bool) -> bool:
    """Whether the kernels run for input ``x`` (and a second tensor of ``dtype``), or the fallback."""
    if x.dtype not in _KERNEL_DTYPES or dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return False
    return body_uses_triton(x) if traceable else use_triton(x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def layer_norm_forward_reference(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Pure-PyTorch forward of each row of ``x`` (``[M, N]``): ``(y, mean, rstd)``, fp32 math.

    The fallback the custom op runs where no kernel does, and the kernels' reference in tests.
    Float64 inputs are computed in float64.

    Example:
        >>> y, mean, rstd = layer_norm_forward_reference(torch.randn(3, 8), None, None, 1e-5, torch.float32)
        >>> y.shape, mean.shape
        (torch.Size([3, 8]), torch.Size([3]))
    """
    compute = _compute_dtype(x.dtype)
    xf = x.to(compute)
    mean = xf.mean(dim=1)
    centered = xf - mean[:, None]
    rstd = torch.rsqrt(centered.square().mean(dim=1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(out_dtype), mean, rstd


def layer_norm_backward_reference(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, bias_dtype: Optional[torch.dtype]
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Pure-PyTorch gradients of :func:`layer_norm_forward_reference`: ``(dx, dw, db)``, fp32 math.

    ``dx`` is in ``x``'s dtype, ``dw`` in ``weight``'s (None without weight), ``db`` in
    ``bias_dtype`` (None when that is None).

    Example:
        >>> x, w = torch.randn(3, 8), torch.randn(8)
        >>> y, mean, rstd = layer_norm_forward_reference(x, w, None, 1e-5, x.dtype)
        >>> dx, dw, db = layer_norm_backward_reference(torch.randn(3, 8), x, w, mean, rstd, None)
        >>> db is None
        True
    """
    compute = _compute_dtype(x.dtype)
    dyf = dy.to(compute)
    xhat = (x.to(compute) - mean[:, None]) * rstd[:, None]
    g = dyf if weight is None else dyf * weight.to(compute)
    dx = (g - xhat * (g * xhat).mean(dim=1, keepdim=True) - g.mean(dim=1, keepdim=True)) * rstd[:, None]
    dw = None if weight is None else (dyf * xhat).sum(dim=0).to(weight.dtype)
    db = None if bias_dtype is None else dyf.sum(dim=0).to(bias_dtype)
    return dx.to(x.dtype), dw, db


def _forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    normalized_ndim: int,
    eps: float,
    out_dtype: Optional[torch.dtype],
    traceable: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(y, stats)``: y shaped like x; stats ``[2, rows]`` (means, rstds), fp32 (float64 for float64 x).

    ``traceable``: called from the ``triton_op`` body, whose kernel launches tracing must capture.
    """
    out_dtype = out_dtype or x.dtype
    if _kernels_apply(x, x.dtype, traceable):
        from slipstream.ops.kernels import layer_norm as kernels

        y, stats = kernels.forward(_kernel_rows(x, normalized_ndim), _flat(weight), _flat(bias), eps, out_dtype,
                                   traceable=traceable)
        return (y if y.shape == x.shape else y.view(x.shape)), stats
    rows = _as_rows(x, normalized_ndim)
    y, mean, rstd = layer_norm_forward_reference(rows, _flat(weight), _flat(bias), eps, out_dtype)
    return y.reshape(x.shape), torch.stack((mean, rstd))


def _backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    stats: Tensor,
    normalized_ndim: int,
    bias_dtype: Optional[torch.dtype],
    traceable: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(dx, dw, db)``; dw (db) is None when there is no weight (bias); ``traceable`` as in _forward."""
    if _kernels_apply(x, dy.dtype, traceable):
        from slipstream.ops.kernels import layer_norm as kernels

        dx, dw, db = kernels.backward(_kernel_rows(dy, normalized_ndim), _kernel_rows(x, normalized_ndim),
                                      _flat(weight), stats, bias_dtype, traceable=traceable)
    else:
        mean, rstd = stats.unbind()
        dx, dw, db = layer_norm_backward_reference(
            _as_rows(dy, normalized_ndim), _as_rows(x, normalized_ndim), _flat(weight), mean, rstd, bias_dtype
        )
    if normalized_ndim > 1:  # the kernels and the fallback work on flat rows
        shape = x.shape[x.dim() - normalized_ndim:]
        dw = None if dw is None else dw.view(shape)
        db = None if db is None else db.view(shape)
    return (dx if dx.shape == x.shape else dx.view(x.shape)), dw, db


def _save_for_backward(ctx, x, weight, bias, stats, normalized_ndim) -> None:
    ctx.save_for_backward(x, weight, stats)
    ctx.normalized_ndim = normalized_ndim
    ctx.bias_dtype = None if bias is None else bias.dtype


def _gradients(ctx, dy: Tensor, backward) -> tuple[Optional[Tensor], ...]:
    """Gradients for (x, weight, bias, normalized_ndim, eps, out_dtype), computed by ``backward``."""
    x, weight, stats = ctx.saved_tensors
    dx, dw, db = backward(dy, x, weight, stats, ctx.normalized_ndim, ctx.bias_dtype)
    return dx, (None if weight is None else dw), (None if ctx.bias_dtype is None else db), None, None, None


class _EagerLayerNorm(torch.autograd.Function):
    """Eager mode's path: the same functions as the ops, minus their dispatcher round trips.

    Measured on the H100 machine's host, the ops' Python dispatch cost more CPU time per call
    than the kernels take on the GPU; an autograd Function costs a fraction of it.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_ndim, eps, out_dtype):
        y, stats = _forward(x, weight, bias, normalized_ndim, eps, out_dtype)
        _save_for_backward(ctx, x, weight, bias, stats, normalized_ndim)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: gradient penalties, double backward
            return _gradients_with_graph(ctx, dy)
        return _gradients(ctx, dy, _backward)


def _gradients_with_graph(ctx, dy: Tensor) -> tuple[Optional[Tensor], ...]:
    """The gradients as differentiable PyTorch ops, from :func:`_math_in_torch_ops` recomputed in fp32 (fp64 for fp64).

    The kernels and the fallback treat the saved statistics as constants, so their gradients would
    differentiate wrongly a second time; PyTorch's own layer norm differentiates twice.
    """
    x, weight, _ = ctx.saved_tensors
    compute = _compute_dtype(x.dtype)
    leading = tuple(range(x.dim() - ctx.normalized_ndim))
    y = _math_in_torch_ops(x, x.shape[len(leading):], weight, None, ctx.eps, compute)  # no bias: dB is sum(dy)
    wanted = [t for t, need in ((x, ctx.needs_input_grad[0]), (weight, ctx.needs_input_grad[1])) if need]
    found = iter(torch.autograd.grad(y, wanted, dy.to(compute), create_graph=True))
    dx = next(found).to(x.dtype) if ctx.needs_input_grad[0] else None
    dw = next(found).to(weight.dtype) if ctx.needs_input_grad[1] else None
    db = dy.to(compute).sum(leading).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
    return dx, dw, db, None, None, None


def _forward_op_body(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    normalized_ndim: int,
    eps: float,
    out_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, bias, normalized_ndim, eps, out_dtype, traceable=True)


def _backward_op_body(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    stats: Tensor,
    normalized_ndim: int,
    bias_dtype: Optional[torch.dtype],
) -> tuple[Tensor, Tensor, Tensor]:
    """As :func:`_backward`, with empty tensors for absent gradients (an op returns tensors only)."""
    dx, dw, db = _backward(dy, x, weight, stats, normalized_ndim, bias_dtype, traceable=True)
    if dw is not None and db is not None:
        db = db.clone()  # the kernels' dW and dB may be views of one buffer; an op's outputs may not alias
    return dx, (x.new_empty(0) if dw is None else dw), (x.new_empty(0) if db is None else db)


# Their fake (shape-only) implementations are the bodies themselves, run on fake tensors.
_layer_norm_fwd = register_triton_op("slipstream::layer_norm_fwd", _forward_op_body)
_layer_norm_bwd = register_triton_op("slipstream::layer_norm_bwd", _backward_op_body)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, normalized_ndim, _eps, _out_dtype = inputs
    _y, stats = output
    _save_for_backward(ctx, x, weight, bias, stats, normalized_ndim)
    ctx.mark_non_differentiable(stats)


def _backward_of_op(ctx, dy, _dstats):
    return _gradients(ctx, dy, torch.ops.slipstream.layer_norm_bwd)


_layer_norm_fwd.register_autograd(_backward_of_op, setup_context=_setup_context)
