"""Leave the user's objects as they were: snapshot on entry, restore on every way out.

    with StateGuard(model, optimizer) as guard:
        probe_model = guard.protect(build_model(...))   # covered from here on
        ...                                             # success, error or Ctrl-C

Covered: for an nn.Module and all its submodules, each parameter's and buffer's value, dtype,
device, layout and requires_grad (BatchNorm running stats and num_batches_tracked included),
each `.grad` (None stays None) and each train/eval flag; for an Optimizer, per-parameter state
(momentum, Adam moments, step), param_groups (lr, ... and their parameters), defaults, and the
values and grads of its parameters (step() moves them; buffers need the module); any other
object through state_dict()/load_state_dict() (LR schedulers, GradScaler); with rng=True,
python `random`, numpy's global RNG, torch CPU and every device of every available accelerator
(reading CUDA's RNG initialises CUDA, as torch.random.fork_rng does).

Snapshots are CPU copies, so a memory probe does not share the accelerator with them. Restores
write into the user's own tensors (`copy_`), so references and views stay valid; where the block
changed a tensor's dtype, device or layout (`model.half()`), `tensor.data` is reset, which keeps
the object. A `.grad` or optimizer-state tensor the block deleted comes back as a new tensor
with the saved value: holding the original would have kept its device memory during the probe.

Structure: parameters, buffers and submodules added in the block are removed, removed or
replaced ones are put back (the original objects, original values); optimizer param groups and
per-parameter state that appeared in the block are dropped. Hooks and plain attributes are not
tracked. Lazy (uninitialised) parameters are refused: they have no value to snapshot.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from batchscope import device as _device
from batchscope.errors import UsageError

Protected = TypeVar("Protected")
_CPU = torch.device("cpu")


@dataclass(frozen=True)
class _SavedTensor:
    """A CPU copy of a tensor and what it takes to put it back exactly where it was."""

    data: torch.Tensor
    device: torch.device
    stride: tuple[int, ...] | None  # None for sparse layouts, which have no strides
    requires_grad: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _SavedTensor:
        stride = tuple(tensor.stride()) if tensor.layout == torch.strided else None
        return cls(tensor.detach().to(_CPU, copy=True), tensor.device, stride,
                   tensor.requires_grad)

    def fits(self, tensor: torch.Tensor) -> bool:
        if (tensor.device, tensor.dtype, tensor.shape, tensor.layout) != (
            self.device, self.data.dtype, self.data.shape, self.data.layout
        ):
            return False
        return self.stride is None or tuple(tensor.stride()) == self.stride

    def fresh(self) -> torch.Tensor:
        """A new tensor with the saved value, device and layout (never aliasing the copy, so
        the snapshot survives being restored more than once)."""
        if self.stride is None:
            out = self.data.to(self.device, copy=True)
        else:
            out = torch.empty_strided(self.data.shape, self.stride, dtype=self.data.dtype,
                                      device=self.device).copy_(self.data)
        return out.requires_grad_(self.requires_grad)

    def restore_into(self, tensor: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if self.fits(tensor):
                tensor.copy_(self.data)
            else:
                tensor.data = self.fresh().detach()
        if tensor.requires_grad != self.requires_grad:
            tensor.requires_grad_(self.requires_grad)
        return tensor


def _save(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _SavedTensor.of(value)
    if isinstance(value, dict):
        return {key: _save(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return _rebuild(value, [_save(item) for item in value])
    return copy.deepcopy(value)


def _load(saved: Any, current: Any = None) -> Any:
    """The saved value again, written into `current` when that is a matching tensor."""
    if isinstance(saved, _SavedTensor):
        if isinstance(current, torch.Tensor) and saved.fits(current):
            return saved.restore_into(current)
        return saved.fresh()
    if isinstance(saved, dict):
        return {key: _load(item) for key, item in saved.items()}
    if isinstance(saved, (list, tuple)):
        return _rebuild(saved, [_load(item) for item in saved])
    return copy.deepcopy(saved)


def _rebuild(sequence: list | tuple, items: list) -> list | tuple:
    if hasattr(sequence, "_fields"):  # a namedtuple takes its fields as arguments
        return type(sequence)(*items)
    return type(sequence)(items)


@dataclass
class _TensorState:
    tensor: torch.Tensor
    value: _SavedTensor
    grad: _SavedTensor | None

    @classmethod
    def record(cls, tensor: torch.Tensor, registry: dict[int, _TensorState]) -> None:
        """Snapshot `tensor` into `registry` unless an earlier snapshot already holds it."""
        if id(tensor) not in registry:
            grad = None if tensor.grad is None else _SavedTensor.of(tensor.grad)
            registry[id(tensor)] = cls(tensor, _SavedTensor.of(tensor), grad)

    def restore(self) -> None:
        self.value.restore_into(self.tensor)
        if self.grad is None:
            self.tensor.grad = None
        elif self.tensor.grad is None:
            self.tensor.grad = self.grad.fresh()
        else:
            self.grad.restore_into(self.tensor.grad)


@dataclass
class _ModuleState:
    module: nn.Module
    training: bool
    members: tuple[dict[str, Any], dict[str, Any], dict[str, Any]]  # params, buffers, children
    non_persistent: set[str]

    def restore(self) -> None:
        stores = (self.module._parameters, self.module._buffers, self.module._modules)
        for store, saved in zip(stores, self.members):
            for name in saved:
                # A plain attribute set under a member's name (after `del`) would shadow it.
                self.module.__dict__.pop(name, None)
            store.clear()  # members added in the block go; removed or replaced ones return
            store.update(saved)
        self.module._non_persistent_buffers_set = set(self.non_persistent)
        self.module.training = self.training


class _ModuleSnapshot:
    def __init__(self, root: nn.Module, tensors: dict[int, _TensorState]) -> None:
        self.modules: list[_ModuleState] = []
        for module_name, module in root.named_modules(remove_duplicate=True):
            members = (dict(module._parameters), dict(module._buffers), dict(module._modules))
            for name, tensor in (*members[0].items(), *members[1].items()):
                if tensor is not None and is_lazy(tensor):
                    raise UsageError(
                        f"{module_name or type(root).__name__}.{name} is an uninitialised lazy "
                        "parameter; run one forward pass before tuning so its shape is known"
                    )
                if tensor is not None:
                    _TensorState.record(tensor, tensors)
            self.modules.append(_ModuleState(
                module, module.training, members, set(module._non_persistent_buffers_set)))

    def restore(self) -> None:
        for module_state in self.modules:
            module_state.restore()


class _OptimizerSnapshot:
    def __init__(self, optimizer: torch.optim.Optimizer, tensors: dict[int, _TensorState]) -> None:
        self.optimizer = optimizer
        for group in optimizer.param_groups:  # step() moves them, so they are covered too
            for param in group["params"]:
                _TensorState.record(param, tensors)
        # The containers themselves are kept so that restoring preserves their identity.
        self.param_groups = optimizer.param_groups
        self.groups = [
            (group, {key: list(value) if key == "params" else _save(value)
                     for key, value in group.items()})
            for group in optimizer.param_groups
        ]
        self.state = optimizer.state
        self.per_param = [(param, entries, _save(dict(entries)))
                          for param, entries in optimizer.state.items()]
        self.defaults = optimizer.defaults
        self.saved_defaults = _save(dict(optimizer.defaults))

    def restore(self) -> None:
        optimizer = self.optimizer
        optimizer.param_groups = self.param_groups
        self.param_groups[:] = [group for group, _ in self.groups]
        for group, saved in self.groups:
            restored = {key: list(value) if key == "params" else _load(value)
                        for key, value in saved.items()}
            group.clear()
            group.update(restored)
        optimizer.state = self.state
        self.state.clear()  # state first created inside the block (e.g. by a first step) goes
        for param, entries, saved in self.per_param:
            current = dict(entries)
            entries.clear()
            entries.update({key: _load(value, current.get(key)) for key, value in saved.items()})
            self.state[param] = entries
        optimizer.defaults = self.defaults
        self.defaults.clear()
        self.defaults.update(_load(self.saved_defaults))


class _StatefulSnapshot:
    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.saved = _save(obj.state_dict())

    def restore(self) -> None:
        self.obj.load_state_dict(_load(self.saved))


def _snapshot(obj: object, tensors: dict[int, _TensorState]) -> Any:
    """A snapshot of `obj`'s own structure and state; its tensors' values go into `tensors`,
    shared by the whole guard so that a parameter held by a model and its optimizer (or by
    two modules) is copied once."""
    if isinstance(obj, nn.Module):
        return _ModuleSnapshot(obj, tensors)
    if isinstance(obj, torch.optim.Optimizer):
        return _OptimizerSnapshot(obj, tensors)
    if callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    ):
        return _StatefulSnapshot(obj)
    raise UsageError(
        f"cannot protect a {type(obj).__name__}; pass an nn.Module, a torch.optim.Optimizer or "
        "an object with state_dict() and load_state_dict()"
    )


class _RngSnapshot:
    def __init__(self) -> None:
        self.python = random.getstate()
        self.numpy = np.random.get_state()
        self.torch_cpu = torch.get_rng_state()
        self.accelerators: list[tuple[Any, torch.device, torch.Tensor]] = []
        for kind in _device.available_devices():
            if kind == "cpu":
                continue  # torch.get_rng_state above
            backend = getattr(torch, kind)  # torch.cuda / torch.mps / torch.xpu share the API
            for index in range(backend.device_count()):
                where = torch.device(kind, index)
                self.accelerators.append((backend, where, backend.get_rng_state(where)))

    def restore(self) -> None:
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.torch_cpu)
        for backend, where, state in self.accelerators:
            backend.set_rng_state(state, where)


class StateGuard:
    """Context manager: snapshots `objects` (and the RNGs) on entry, restores them on exit,
    whether the block succeeds, raises, or is interrupted; the exception propagates as is."""

    def __init__(self, *objects: object, rng: bool = True) -> None:
        self._objects = objects
        self._rng = rng
        self._snapshots: list[Any] = []
        self._tensors: dict[int, _TensorState] = {}
        self._protected: set[int] = set()
        self._rng_snapshot: _RngSnapshot | None = None
        self._active = False

    def __enter__(self) -> StateGuard:
        if self._active:
            raise UsageError("this StateGuard is already active; use one guard per `with` block")
        try:
            self._rng_snapshot = _RngSnapshot() if self._rng else None
            for obj in self._objects:
                self.protect(obj)
        except BaseException:
            self._forget()
            raise
        self._active = True
        return self

    def protect(self, obj: Protected) -> Protected:
        """Snapshot `obj` now (e.g. a model built inside the block) and restore it on exit.
        Returns `obj`. Protecting an object twice keeps the first snapshot."""
        if id(obj) not in self._protected:
            self._snapshots.append(_snapshot(obj, self._tensors))
            self._protected.add(id(obj))  # the snapshot holds `obj`, so its id stays unique
        return obj

    def restore(self) -> None:
        """Put everything back as snapshotted; the guard stays active and can restore again."""
        failures: list[Exception] = []
        # Membership first (the original tensors back in their modules), then their values;
        # latest snapshot first, so where two overlap the earliest state is what remains.
        for snapshot in [*reversed(self._snapshots), *self._tensors.values()]:
            try:
                snapshot.restore()
            except Exception as failure:  # restore the rest before reporting
                failures.append(failure)
        if self._rng_snapshot is not None:
            self._rng_snapshot.restore()
        if failures:
            raise failures[0]

    def __exit__(self, *exc_info: object) -> None:  # returns None: exceptions propagate
        try:
            self.restore()
        finally:
            self._forget()

    def _forget(self) -> None:
        self._snapshots, self._tensors, self._protected = [], {}, set()
        self._rng_snapshot = None
        self._active = False


def preserve_user_state(*objects: object, rng: bool = True) -> StateGuard:
    """`with preserve_user_state(model, optimizer): ...` reads as what it promises."""
    return StateGuard(*objects, rng=rng)
