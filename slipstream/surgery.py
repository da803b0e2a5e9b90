"""Model surgery: the one tree walk every slipstream method uses to swap modules.

Rules (see ``ARCHITECTURE.md``):

* A policy keyed on class ``K`` matches modules whose class is exactly ``K``, subclasses of ``K`` that
  do not override ``forward``, and subclasses registered with :func:`register_same_math` as computing
  the same function as ``K`` (timm's ``LayerNorm`` and ``GroupNorm`` are registered here by name, so
  timm need not be importable). Any other subclass of ``K`` may compute something else (timm's
  ``LayerNorm2d`` normalizes the channels of an NCHW tensor), so it is left alone with a
  :class:`SurgeryWarning` naming it.
* The replacement adopts the original's ``Parameter`` and buffer objects (the same objects), its
  training mode and its hooks (the same hook tables, so handles made before surgery still remove
  them), so an optimizer built before surgery keeps working and ``state_dict`` keys are identical in
  both directions. A module whose state the replacement cannot hold is left alone with a
  :class:`SurgeryWarning`: one with parametrizations (``torch.nn.utils.parametrize``), submodules,
  extra state, state_dict hooks, or parameters and buffers of names the replacement lacks.
* A module reachable from several parents is replaced once; every parent gets the same new module.
* Every replacement is built before any is put in place: if a policy raises (its error names the
  module's path in the model), the model is left unchanged.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

__all__ = [
    "NoEffectWarning",
    "SurgeryWarning",
    "ReplacementFunction",
    "register_same_math",
    "replace_module_classes",
    "count_module_instances",
    "classes_named",
]

#: Builds the replacement of ``module`` (the ``index``-th match of its policy), or returns None to skip it.
ReplacementFunction = Callable[[nn.Module, int], Optional[nn.Module]]


class NoEffectWarning(UserWarning):
    """A method was applied but changed nothing (no matching module, or a precision it does not help)."""


class SurgeryWarning(UserWarning):
    """Surgery left a module alone because replacing it could change the model's math."""


# Subclasses known to compute exactly their base's function, by qualified class name so that the
# packages defining them need not be importable. Values are the base class they match.
_SAME_MATH_BY_NAME: dict[str, type[nn.Module]] = {
    "timm.layers.norm.LayerNorm": nn.LayerNorm,
    "timm.layers.norm.GroupNorm": nn.GroupNorm,
    "timm.layers.norm.GroupNorm1": nn.GroupNorm,
    "timm.models.layers.norm.LayerNorm": nn.LayerNorm,
    "timm.models.layers.norm.GroupNorm": nn.GroupNorm,
    "timm.models.layers.norm.GroupNorm1": nn.GroupNorm,
}


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_same_math(subclass: Union[type[nn.Module], str], base: type[nn.Module]) -> None:
    """Declare that ``subclass`` computes exactly what ``base`` computes, so policies for ``base`` swap it.

    Only register a subclass whose ``forward`` is mathematically identical to ``base.forward`` for
    every input (for example one that only adds a faster code path). ``subclass`` may be a class or
    its qualified name (``'package.module.ClassName'``).

    Example:
        >>> class MyLayerNorm(nn.LayerNorm):
        ...     def forward(self, x):
        ...         return nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        >>> register_same_math(MyLayerNorm, nn.LayerNorm)
    """
    if not (isinstance(base, type) and issubclass(base, nn.Module)):
        raise TypeError(f"base must be an nn.Module subclass, got {base!r}")
    if isinstance(subclass, str):
        name = subclass
    elif isinstance(subclass, type) and issubclass(subclass, base):
        name = _qualified_name(subclass)
    else:
        raise TypeError(f"subclass must be a subclass of {base.__name__} or a qualified class name, got {subclass!r}")
    _SAME_MATH_BY_NAME[name] = base


def _matching_policy_class(cls: type, policy_classes: Iterable[type]) -> Optional[type]:
    """The policy class nearest to ``cls`` in its MRO, or None."""
    keys = set(policy_classes)
    for klass in cls.__mro__:
        if klass in keys:
            return klass
    return None


def _same_math(cls: type, base: type) -> bool:
    if cls is base or cls.forward is base.forward:
        return True
    return _SAME_MATH_BY_NAME.get(_qualified_name(cls)) is base


def _is_wrapped(model: nn.Module) -> bool:
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return True
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(model, FullyShardedDataParallel):
            return True
    except ImportError:  # torch built without distributed support
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        return isinstance(model, FSDPModule)
    except ImportError:
        return False


_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)
# Not carried over: load_state_dict pre-hooks hold a weak reference to the module they were registered on.
_STATE_DICT_HOOK_TABLES = (
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _state_left_behind(old: nn.Module, new: nn.Module) -> Optional[str]:
    """Why ``new`` could not hold ``old``'s state (None when it can): what surgery would silently drop."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(old):
        return "it has parametrizations (torch.nn.utils.parametrize), which the replacement would drop"
    if old._modules:
        return f"it has submodules ({', '.join(old._modules)}), which the replacement would drop"
    if type(old).get_extra_state is not nn.Module.get_extra_state:
        return "it defines get_extra_state, which the replacement would drop"
    if any(getattr(old, table, None) for table in _STATE_DICT_HOOK_TABLES):
        return "it has state_dict or load_state_dict hooks, which are bound to it"
    for kind, own, theirs in (("parameters", old._parameters, new._parameters),
                              ("buffers", old._buffers, new._buffers)):
        missing = [name for name, value in own.items() if value is not None and theirs.get(name) is None]
        if missing:
            return f"its {kind} {missing} have no place in the replacement"
    return None


def _adopt_identity(new: nn.Module, old: nn.Module) -> None:
    """Make ``new`` hold ``old``'s own Parameter/buffer objects, training mode and hook tables."""
    for name, param in old._parameters.items():
        if name in new._parameters:
            new._parameters[name] = param
    for name, buf in old._buffers.items():
        if name in new._buffers:
            new._buffers[name] = buf
    new.train(old.training)
    # The same dict objects (the replacement's own hooks merged in): a RemovableHandle made before surgery
    # removes its hook from the table it was registered in.
    for table in _HOOK_TABLES:
        if hasattr(old, table) and hasattr(new, table):
            hooks = getattr(old, table)
            hooks.update(getattr(new, table))
            setattr(new, table, hooks)
    if hasattr(old, "_is_full_backward_hook"):
        new._is_full_backward_hook = old._is_full_backward_hook


def _add_new_params_to_optimizers(
    old: nn.Module, new: nn.Module, optimizers: Iterable[torch.optim.Optimizer]
) -> None:
    """Parameters the replacement created itself (not adopted) join each optimizer's first group."""
    old_ids = {id(p) for p in old.parameters()}
    fresh = [p for p in new.parameters() if id(p) not in old_ids]
    if not fresh:
        return
    for opt in optimizers:
        known = {id(p) for group in opt.param_groups for p in group["params"]}
        opt.param_groups[0]["params"].extend(p for p in fresh if id(p) not in known)


def replace_module_classes(
    model: nn.Module,
    policies: Mapping[type[nn.Module], ReplacementFunction],
    optimizers: Optional[Union[torch.optim.Optimizer, Iterable[torch.optim.Optimizer]]] = None,
) -> dict[nn.Module, nn.Module]:
    """Replace every module matched by ``policies`` and return ``{old_module: new_module}``.

    Args:
        model: the model to modify in place. The root itself may be replaced: then use
            ``replaced.get(model, model)`` as the new model. It must not be wrapped in DDP or FSDP yet
            (surgery comes before wrapping).
        policies: maps a module class to a function ``(module, index) -> new module or None``.
            Subclasses of a key match as described in this module's docstring.
        optimizers: optimizers built before surgery. Adopted parameters are the same objects, so
            nothing changes for them; parameters a replacement creates itself are added.

    Returns:
        A dict from each replaced module to its replacement (empty when nothing matched).

    Example:
        >>> from slipstream.nn import LPLayerNorm
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        >>> replaced = replace_module_classes(model, {nn.LayerNorm: lambda m, i: LPLayerNorm.from_module(m)})
        >>> type(model[1]).__name__, len(replaced)
        ('LPLayerNorm', 1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _is_wrapped(model):
        raise TypeError(
            f"model is wrapped in {type(model).__name__}; apply surgery to the bare model before "
            "wrapping it in DistributedDataParallel/FSDP"
        )
    for key in policies:
        if not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(f"policies keys must be nn.Module classes, got {key!r}")
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    optimizers = list(optimizers or [])

    replaced: dict[nn.Module, nn.Module] = {}
    visited: set[int] = set()
    warned: set[type] = set()
    match_counts: dict[type, int] = {}

    def leave_alone(module: nn.Module, why: str) -> None:
        cls = type(module)
        if cls not in warned:
            warned.add(cls)
            warnings.warn(f"surgery left {_qualified_name(cls)} alone: {why}", SurgeryWarning, stacklevel=4)

    def replacement_for(module: nn.Module, path: str) -> Optional[nn.Module]:
        if module in replaced:
            return replaced[module]
        if id(module) in visited:
            return None
        visited.add(id(module))
        cls = type(module)
        key = _matching_policy_class(cls, policies)
        if key is None:
            return None
        if not _same_math(cls, key):
            leave_alone(module, f"it subclasses {key.__name__} but overrides forward, so its math may differ. If it "
                                f"computes exactly what {key.__name__} does, call "
                                f"slipstream.surgery.register_same_math({cls.__name__}, {key.__name__}).")
            return None
        index = match_counts.get(key, 0)
        try:
            new = policies[key](module, index)
        except (TypeError, ValueError) as error:
            if type(error) not in (TypeError, ValueError):  # a subclass's constructor may take other arguments
                raise
            raise type(error)(f"{path or 'the model'} ({cls.__name__}): {error}") from error
        if new is None:
            return None
        why = _state_left_behind(module, new)
        if why is not None:
            leave_alone(module, why)
            return None
        match_counts[key] = index + 1
        replaced[module] = new
        return new

    # Build every replacement first, then put them in place: a policy that raises leaves the model as it was.
    root_new = replacement_for(model, "")
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    stack = [] if root_new is not None else [("", model)]
    seen_parents: set[int] = set()
    while stack:  # iterative walk; replacements are not descended into
        prefix, parent = stack.pop()
        if id(parent) in seen_parents:
            continue
        seen_parents.add(id(parent))
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            new = replacement_for(child, path)
            if new is not None:
                swaps.append((parent, name, new))
            elif child not in replaced:
                stack.append((path, child))
    for old, new in replaced.items():
        _adopt_identity(new, old)
        _add_new_params_to_optimizers(old, new, optimizers)
    for parent, name, new in swaps:
        parent._modules[name] = new
    return replaced


def classes_named(model: nn.Module, names: Iterable[str]) -> set[type]:
    """Classes of ``model``'s modules whose qualified names (``module.QualName``) are in ``names``.

    Lets a policy key on a class of a package that need not be importable (timm's ``LayerNorm2d``).

    Example:
        >>> sorted(c.__name__ for c in classes_named(nn.Sequential(nn.ReLU()), ["torch.nn.modules.activation.ReLU"]))
        ['ReLU']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wanted = set(names)
    return {type(m) for m in model.modules() if _qualified_name(type(m)) in wanted}


def count_module_instances(model: nn.Module, module_class: Union[type, tuple[type, ...]]) -> int:
    """Number of distinct modules in ``model`` that are instances of ``module_class``.

    Example:
        >>> count_module_instances(nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4)), nn.LayerNorm)
        2
    """
    return sum(1 for m in model.modules() if isinstance(m, module_class))
