"""The Workload contract: everything batchscope needs to know about a user's training job.

A workload is a bundle of factories and functions, never live state. batchscope builds its own
model and optimizer from the factories, asks the batch source for a batch of the size it wants
(the batch size is always injected as an argument), and runs forward/backward/step itself. It
never sets attributes on user objects.

Ways in:
- construct `Workload(...)` directly in Python;
- `Workload.from_objects(model, optimizer, loss, make_batch, ...)` for an existing model;
- a `package.module:function` entry point returning a `Workload` (`load_entry_point`);
- a built-in name from `batchscope.workloads` (`resolve_workload` handles all three).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from batchscope.checks import require_int, require_positive_number
from batchscope.errors import UsageError

Batch = Any
"""Whatever the workload's batch source yields and its loss consumes (tensor tuple, dict...)."""

ModelFactory = Callable[[torch.device], nn.Module]
OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
BatchFactory = Callable[[int, torch.device, torch.Generator], Batch]
EpochBatches = Callable[[int, torch.device, int], Iterator[Batch]]
Evaluate = Callable[[nn.Module, torch.device], float]

OptimizerFamily = Literal["sgd", "adam"]
Unit = Literal["examples", "tokens"]
Schedule = Literal["cosine", "constant"]


@dataclass(frozen=True)
class Workload:
    """A training job described by factories.

    Attributes:
        name: short identifier shown in reports.
        build_model: `device -> nn.Module` placed on that device, in train mode.
        build_optimizer: `(parameters, lr) -> Optimizer`; the LR is batchscope's to choose.
        loss: `(model, batch) -> scalar loss`, reduced by mean over the batch (see
            `loss_reduction`); batchscope calls backward and step itself.
        make_batch: `(batch_size, device, generator) -> batch` of exactly `batch_size`
            examples, drawn from the training distribution (augmented as in training).
        reference_batch_size / reference_lr: the settings the user trains with today;
            LR scaling rules are stated relative to them.
        epoch_batches: `(batch_size, device, seed) -> iterator` over one shuffled epoch of
            the training set (last partial batch dropped); needed for sweeps and adaptive runs.
        data_loader: `(batch_size, device) -> iterator` over the user's real input pipeline,
            when it differs from `make_batch` (used to detect data-loading bottlenecks).
        worst_case_batch: `(batch_size, device) -> batch` with the largest input shape
            (e.g. longest sequence) for memory probes; defaults to `make_batch`.
        evaluate: `(model, device) -> metric` on held-out data, for sweeps and adaptive runs.
        batch_at: `(indices, device, generator) -> batch` of the training examples at `indices`
            (a 1-D int64 CPU tensor into 0..dataset_size-1), augmented as in training; lets an
            adaptive run cut each epoch into batches whose size changes (`batchscope.adaptive`).
        count: `batch -> units` (examples or tokens) in a batch; defaults to `batch_size`.
        dataset_size: training examples available; caps the batch when batches cannot
            exceed the dataset.
    """

    name: str
    build_model: ModelFactory
    build_optimizer: OptimizerFactory
    loss: LossFn
    make_batch: BatchFactory
    reference_batch_size: int
    reference_lr: float
    epoch_batches: EpochBatches | None = None
    data_loader: Callable[[int, torch.device], Iterator[Batch]] | None = None
    worst_case_batch: Callable[[int, torch.device], Batch] | None = None
    evaluate: Evaluate | None = None
    batch_at: Callable[[torch.Tensor, torch.device, torch.Generator], Batch] | None = None
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    count: Callable[[Batch], int] | None = None
    unit: Unit = "examples"
    dataset_size: int | None = None
    optimizer_family: OptimizerFamily = "sgd"
    schedule: Schedule = "cosine"
    warmup_epochs: float = 0.0
    loss_reduction: Literal["mean", "sum"] = "mean"
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    description: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Frozen: store plain ints, so a numpy integer is described and serialised as a number.
        object.__setattr__(self, "reference_batch_size",
                           require_int("reference_batch_size", self.reference_batch_size))
        object.__setattr__(self, "reference_lr", require_positive_number(
            "reference_lr", self.reference_lr, hint="the LR used at reference_batch_size"))
        _require_choice("unit", self.unit, ("examples", "tokens"))
        _require_choice("optimizer_family", self.optimizer_family, ("sgd", "adam"))
        _require_choice("schedule", self.schedule, ("cosine", "constant"))
        _require_choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        if self.dataset_size is not None:
            object.__setattr__(self, "dataset_size", require_int("dataset_size", self.dataset_size))
        for name in ("build_model", "build_optimizer", "loss", "make_batch"):
            if not callable(getattr(self, name)):
                raise UsageError(f"Workload.{name} must be callable, got {getattr(self, name)!r}")

    # -- helpers every probe uses -------------------------------------------------------------

    def sample(self, batch_size: int, device: torch.device, generator: torch.Generator) -> Batch:
        """A training batch of exactly `batch_size` examples."""
        return self.make_batch(batch_size, device, generator)

    def worst_case(self, batch_size: int, device: torch.device) -> Batch:
        """The most memory-hungry batch of that size (memory probes use it)."""
        if self.worst_case_batch is not None:
            return self.worst_case_batch(batch_size, device)
        generator = torch.Generator(device="cpu").manual_seed(0)
        return self.make_batch(batch_size, device, generator)

    def units_in(self, batch: Batch, batch_size: int) -> int:
        """Examples or tokens in `batch` (the throughput unit)."""
        return int(self.count(batch)) if self.count is not None else batch_size

    def with_settings(self, **changes: Any) -> "Workload":
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)

    def describe(self) -> dict[str, Any]:
        """JSON-safe summary: reference settings and capabilities."""
        return {
            "name": self.name,
            "description": self.description,
            "reference_batch_size": self.reference_batch_size,
            "reference_lr": self.reference_lr,
            "optimizer_family": self.optimizer_family,
            "schedule": self.schedule,
            "warmup_epochs": self.warmup_epochs,
            "unit": self.unit,
            "dataset_size": self.dataset_size,
            "metric": self.metric_name if self.evaluate is not None else None,
            "autocast_dtype": str(self.autocast_dtype).replace("torch.", "")
            if self.autocast_dtype is not None
            else None,
            "channels_last": self.channels_last,
            "settings": {k: _json_safe(v) for k, v in self.settings.items()},
        }

    # -- adapters -----------------------------------------------------------------------------

    @classmethod
    def from_objects(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss: LossFn,
        make_batch: BatchFactory,
        *,
        reference_batch_size: int,
        name: str = "user-workload",
        **options: Any,
    ) -> "Workload":
        """Wrap an existing model and optimizer.

        batchscope trains the given model in place during probes and restores it afterwards
        (see `batchscope.guard`); the optimizer is never stepped: a fresh one of the same class
        and hyper-parameters is built, so the user's optimizer state stays untouched.
        """
        if not isinstance(model, nn.Module):
            raise UsageError(f"model={type(model).__name__} is not a torch.nn.Module")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer={type(optimizer).__name__} is not a torch.optim.Optimizer")
        defaults = dict(optimizer.defaults)
        reference_lr = float(options.pop("reference_lr", defaults.get("lr", 0.0)))
        optimizer_class = type(optimizer)
        model_device = _module_device(model)

        def build_model(device: torch.device) -> nn.Module:
            if model_device is not None and model_device.type != torch.device(device).type:
                raise UsageError(
                    f"the model lives on {model_device} but the device asked for is {device}; "
                    f"move the model there first or pass a model factory instead"
                )
            return model

        def build_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
            return optimizer_class(params, **{**defaults, "lr": lr})

        family = options.pop(
            "optimizer_family", "adam" if "adam" in optimizer_class.__name__.lower() else "sgd"
        )
        return cls(
            name=name,
            build_model=build_model,
            build_optimizer=build_optimizer,
            loss=loss,
            make_batch=make_batch,
            reference_batch_size=reference_batch_size,
            reference_lr=reference_lr,
            optimizer_family=family,
            **options,
        )


def load_entry_point(spec: str) -> Workload:
    """Resolve `package.module:function` and call it; the result must be a `Workload`.

    Import errors *inside* the user's module propagate with their traceback; only a wrong
    spec (bad format, module or attribute missing) becomes a one-line `UsageError`.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"entry point {spec!r} is not of the form 'package.module:function'; "
            f"write e.g. 'mypkg.train:make_workload'"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise UsageError(
                f"entry point {spec!r}: module {module_name!r} not found; check the name and "
                f"that its directory is on PYTHONPATH"
            ) from None
        raise
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UsageError(
                f"entry point {spec!r}: {module_name!r} has no attribute {attr!r}; "
                f"name a function that returns a batchscope.Workload"
            )
        target = getattr(target, part)
    workload = _call_entry_point(spec, target)
    if not isinstance(workload, Workload):
        raise UsageError(
            f"entry point {spec!r} returned {type(workload).__name__}, not a batchscope.Workload"
        )
    return workload


def _call_entry_point(spec: str, target: Any) -> Any:
    """`target()` for a callable entry point, `target` itself otherwise. The signature is checked
    first rather than a TypeError caught around the call: a TypeError raised inside the user's
    function is their bug and keeps its traceback."""
    if isinstance(target, Workload) or not callable(target):
        return target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins and C types have no signature: just call
        return target()
    try:
        signature.bind()
    except TypeError as exc:
        raise UsageError(
            f"entry point {spec!r} must be callable with no arguments ({exc}); name a function "
            f"that takes none and returns a batchscope.Workload"
        ) from None
    return target()


def resolve_workload(name_or_spec: str | Workload, **options: Any) -> Workload:
    """A `Workload` from a built-in name, a `module:function` entry point, or itself."""
    if isinstance(name_or_spec, Workload):
        if options:
            raise UsageError(
                f"options {sorted(options)} apply to built-in workloads given by name; a Workload "
                f"object is already configured (use workload.with_settings(...))"
            )
        return name_or_spec
    if ":" in name_or_spec:
        if options:
            raise UsageError(
                f"options {sorted(options)} apply to built-in workloads only, not to entry "
                f"point {name_or_spec!r}"
            )
        return load_entry_point(name_or_spec)
    from batchscope.workloads import get_workload

    return get_workload(name_or_spec, **options)


def _require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _module_device(model: nn.Module) -> torch.device | None:
    for tensor in model.parameters():
        return tensor.device
    return None


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
