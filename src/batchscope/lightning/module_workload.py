"""A LightningModule and its data, as a batchscope `Workload`.

Lightning's own batch-size finder answers "what fits" by running `trainer.fit` on growing
batches; batchscope needs the pieces of the training job instead (a fresh model, an optimizer
at a chosen LR, the loss of a batch, batches of any size), and the module already holds them:

- the model is a deep copy of the module (Lightning drops the trainer from copies), so tuning
  never trains, moves or switches the mode of the user's module;
- the optimizer is the copy's own `configure_optimizers()`: its class, hyper-parameters and
  param groups (say, no weight decay on biases) are kept, every group's LR scaled by the same
  factor, so the LR batchscope chooses is the largest group's; schedulers are dropped
  (batchscope plans its own schedule: the workload's `schedule`, cosine unless said);
- the loss is the copy's `training_step(batch, 0)` (a tensor, or a dict's "loss"); `self.log`
  calls in it are quietly skipped, as there is no trainer;
- batches come from the train DataLoader's dataset and collate function, at the size asked,
  and its real pipeline (workers, collate) is what the input-pipeline check times.

    import batchscope.lightning
    result = batchscope.lightning.tune(MyModule(), MyDataModule(), budget_s=120, out_dir="runs/t")
    print(result.recommendation.batch_size, result.recommendation.learning_rate)

The same workload goes on the CLI through an entry point: a function returning
`batchscope.lightning.workload(MyModule(), MyDataModule())`, then
`batchscope tune --workload mypkg.tune:make_workload`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import warnings
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from batchscope.errors import UsageError
from batchscope.lightning._import import import_lightning
from batchscope.workload import Workload

# Lightning warns on every `self.log` outside a trainer; tuning has no trainer by design.
_NO_TRAINER_LOG_WARNING = r".*self\.log\(\).*trainer.*"
# Real examples behind a memory probe's batch (repeated up to the size probed).
TILE_FROM = 256


def workload(module: Any, datamodule: Any = None, *, train_dataloader: DataLoader | None = None,
             reference_batch_size: int | None = None, reference_lr: float | None = None,
             precision: str | int | None = None, name: str | None = None,
             **options: Any) -> Workload:
    """The training job of `module` (a LightningModule) on `datamodule`'s train data (or on
    `train_dataloader`), as a `Workload`.

    Args:
        reference_batch_size: the batch trained with today; default: the train loader's (pass
            the effective one when the Trainer accumulates gradients or runs on several devices:
            loader batch x accumulate_grad_batches x devices).
        reference_lr: the LR at that batch; default: the largest param group's LR in
            `configure_optimizers()`.
        precision: the Trainer's precision ("32-true", "bf16-mixed", "16-mixed"): the probes
            then run under the same autocast.
        options: further `Workload` fields (e.g. `evaluate`, `schedule`, `warmup_epochs`,
            `autocast_dtype`, `optimizer_family`).

    `datamodule.setup("fit")` runs once, as `Trainer.fit` would, when the datamodule is given.
    """
    pl = import_lightning()
    if not isinstance(module, pl.LightningModule):
        raise UsageError(f"module={type(module).__name__} is not a lightning.pytorch.LightningModule; "
                         "for a plain nn.Module use batchscope.Workload.from_objects")
    if type(module).training_step is pl.LightningModule.training_step:
        raise UsageError(f"{type(module).__name__} does not implement training_step; batchscope "
                         "takes the loss from it")
    user_loss = options.pop("loss", None)
    if not module.automatic_optimization and user_loss is None:
        raise UsageError(f"{type(module).__name__} uses manual optimization, so its training_step "
                         "steps the optimizer itself; pass loss=lambda model, batch: <the loss> to "
                         "batchscope.lightning.workload")
    if precision is not None:
        options["autocast_dtype"] = _autocast_dtype(precision)
    loader = _train_loader(datamodule, train_dataloader)
    dataset = loader.dataset
    user_optimizer = options.pop("build_optimizer", None)
    if user_optimizer is not None:
        if reference_lr is None:
            raise UsageError("with build_optimizer=... pass reference_lr=<the LR you train with at "
                             "the reference batch>")
        probe_optimizer, largest_lr = None, float(reference_lr)
    else:
        probe_optimizer = _configured_optimizer(module)
        largest_lr = max(_base_lr(group) for group in probe_optimizer.param_groups)
    if reference_batch_size is None:
        if loader.batch_size is None:
            raise UsageError("the train DataLoader has no batch_size (it uses a batch_sampler); "
                             "pass reference_batch_size=<the batch you train with>")
        reference_batch_size = loader.batch_size
    copies: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()

    def build_model(device: torch.device) -> nn.Module:
        model = copy.deepcopy(module).to(device)
        copies[id(next(model.parameters(), None))] = model
        return model.train()

    def build_optimizer(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        params = list(params)
        owner = copies.get(id(params[0])) if params else None
        optimizer = _configured_optimizer(owner) if owner is not None else None
        if optimizer is None or _param_ids(optimizer) != {id(p) for p in params}:
            # Not one of our copies' full parameter set: the class and the largest group's
            # settings (its schedule's keys included), one group.
            first = max(probe_optimizer.param_groups, key=_base_lr)
            optimizer = type(probe_optimizer)(params, **probe_optimizer.defaults)
            optimizer.param_groups[0].update({k: v for k, v in first.items() if k != "params"})
        for group in optimizer.param_groups:
            # A scheduler built in configure_optimizers has moved "lr" to its first value and
            # kept the base ("initial_lr", "max_lr"); the base is what scales, and a later
            # scheduler must record its own.
            group["lr"] = lr * (_base_lr(group) / largest_lr)  # exactly lr for the largest
            if "max_lr" in group and "base_momentum" in group:
                # A cycled momentum is at its low, base_momentum, where the LR peaks.
                if "betas" in group:
                    group["betas"] = (group["base_momentum"], *group["betas"][1:])
                elif "momentum" in group:
                    group["momentum"] = group["base_momentum"]
            for key in ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"):
                group.pop(key, None)
        return optimizer

    def make_batch(batch_size: int, device: torch.device, generator: torch.Generator) -> Any:
        indices = _shuffled_indices(len(dataset), batch_size, generator)
        return _to_device(loader.collate_fn([dataset[int(i)] for i in indices]), device)

    def worst_case_batch(batch_size: int, device: torch.device) -> Any:
        # The memory probe needs the shape, not distinct examples: a few hundred real ones,
        # repeated, spare it tens of thousands of __getitem__ calls (decoding, transforms) a probe.
        # A dataset smaller than that is drawn once, whole, then repeated.
        drawn = min(batch_size, TILE_FROM, len(dataset))
        base = make_batch(drawn, torch.device("cpu"), torch.Generator().manual_seed(0))
        tiled = _repeat_to(base, batch_size)
        return _to_device(tiled if tiled is not None else make_batch(
            batch_size, torch.device("cpu"), torch.Generator().manual_seed(0)), device)

    def batch_at(indices: torch.Tensor, device: torch.device, generator: torch.Generator) -> Any:
        return _to_device(loader.collate_fn([dataset[int(i)] for i in indices]), device)

    def epoch_batches(batch_size: int, device: torch.device, seed: int) -> Iterator[Any]:
        shuffled = _loader_like(loader, batch_size, seed=seed)
        return (_to_device(batch, device) for batch in shuffled)

    def data_loader(batch_size: int, device: torch.device) -> Iterator[Any]:
        # Endless: the input-pipeline check takes what it needs.
        # A pass of a batch larger than the dataset holds one batch (the examples, then
        # further shuffles of them), not none: an endless loop over empty passes never yields.
        per_pass = max(len(dataset), batch_size)
        return (_to_device(batch, device) for epoch in itertools.count()
                for batch in _loader_like(loader, batch_size, seed=epoch, examples=per_pass))

    optimizer_class = type(probe_optimizer) if probe_optimizer is not None else None
    family = "adam" if "adam" in getattr(optimizer_class, "__name__", "").lower() else "sgd"
    return Workload(
        name=name or type(module).__name__,
        build_model=build_model,
        build_optimizer=user_optimizer or build_optimizer,
        loss=user_loss or _training_step_loss,
        make_batch=make_batch,
        reference_batch_size=reference_batch_size,
        reference_lr=largest_lr if reference_lr is None else reference_lr,
        epoch_batches=epoch_batches,
        data_loader=data_loader,
        batch_at=batch_at,
        worst_case_batch=options.pop("worst_case_batch", worst_case_batch),
        dataset_size=len(dataset),
        optimizer_family=options.pop("optimizer_family", family),
        description=options.pop("description", f"LightningModule {type(module).__qualname__}"),
        **options,
    )


def tune(module: Any, datamodule: Any = None, *, train_dataloader: DataLoader | None = None,
         reference_batch_size: int | None = None, reference_lr: float | None = None,
         workload_options: Mapping[str, Any] | None = None, **tune_options: Any) -> Any:
    """`batchscope.tune` on `workload(module, datamodule, ...)`; `tune_options` are tune's
    (`budget_s`, `device`, `target`, `out_dir`, ...). Returns the `TuneResult`."""
    from batchscope.tuning import tune as run_tune

    job = workload(module, datamodule, train_dataloader=train_dataloader,
                   reference_batch_size=reference_batch_size, reference_lr=reference_lr,
                   **dict(workload_options or {}))
    return run_tune(job, **tune_options)


# Lightning's precision names -> the autocast dtype its mixed-precision plugins use.
_PRECISION = {"32": None, "32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def _autocast_dtype(precision: str | int) -> torch.dtype | None:
    if str(precision) not in _PRECISION:
        raise UsageError(f"precision={precision!r} is not one of {', '.join(_PRECISION)}; pass the "
                         "Trainer's precision (true half precision, '16-true'/'bf16-true', is not "
                         "supported: build the model in that dtype and pass precision='32-true')")
    return _PRECISION[str(precision)]


def _train_loader(datamodule: Any, train_dataloader: DataLoader | None) -> DataLoader:
    if (datamodule is None) == (train_dataloader is None):
        raise UsageError("pass exactly one of datamodule=<LightningDataModule> or "
                         "train_dataloader=<DataLoader>")
    if train_dataloader is None:
        if not callable(getattr(datamodule, "train_dataloader", None)):
            raise UsageError(f"datamodule={type(datamodule).__name__} has no train_dataloader(); "
                             "pass a LightningDataModule or train_dataloader=<DataLoader>")
        # What Trainer.fit does before it asks for the loader.
        datamodule.prepare_data()
        datamodule.setup(stage="fit")
        train_dataloader = datamodule.train_dataloader()
    if not isinstance(train_dataloader, DataLoader):
        raise UsageError(f"the train dataloader is a {type(train_dataloader).__name__}, not one "
                         "torch DataLoader; batchscope draws batches from one DataLoader's dataset")
    dataset = train_dataloader.dataset
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Dataset) \
            or not hasattr(dataset, "__len__"):
        raise UsageError(f"the train dataset is a {type(dataset).__name__}: batchscope needs a "
                         "map-style dataset with __len__ (it draws batches of any size by index)")
    if len(dataset) < 2:
        raise UsageError(f"the train dataset has {len(dataset)} example(s); batchscope needs data "
                         "to draw batches from")
    return train_dataloader


def _configured_optimizer(module: nn.Module) -> torch.optim.Optimizer:
    """The single optimizer of `module.configure_optimizers()` (schedulers dropped)."""
    from lightning.pytorch.core.optimizer import _configure_optimizers

    with _no_trainer(f"{type(module).__name__}.configure_optimizers()",
                     "build_optimizer=lambda params, lr: <optimizer>"):
        optimizers, schedulers, _ = _configure_optimizers(module.configure_optimizers())
    if len(optimizers) != 1 or not isinstance(optimizers[0], torch.optim.Optimizer):
        raise UsageError(f"{type(module).__name__}.configure_optimizers() returned "
                         f"{len(optimizers)} optimizers; batchscope tunes one, pass "
                         "build_optimizer=lambda params, lr: <optimizer>")
    optimizer = optimizers[0]
    for config in schedulers:
        scheduler = config.get("scheduler") if isinstance(config, Mapping) else config
        # CyclicLR keeps its peaks on itself (OneCycleLR puts them in the groups): the peak is
        # the LR the module trains at.
        if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "max_lrs"):
            for group, peak in zip(optimizer.param_groups, scheduler.max_lrs):
                group.setdefault("max_lr", float(peak))
    return optimizer


@contextlib.contextmanager
def _no_trainer(what: str, fix: str) -> Iterator[None]:
    """Lightning's "not attached to a `Trainer`" from `what`, as a one-line UsageError naming
    the argument that replaces it."""
    try:
        yield
    except RuntimeError as exc:
        if "not attached to a `Trainer`" not in str(exc):
            raise
        raise UsageError(f"{what} uses self.trainer, which tuning does not run; pass {fix} to "
                         "batchscope.lightning.workload") from None


def _training_step_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss `training_step` returns (batchscope runs backward and step itself)."""
    lightning_module = getattr(model, "_orig_mod", model)  # through torch.compile's wrapper
    step = lightning_module.training_step
    takes_index = len(inspect.signature(step).parameters) >= 2
    with warnings.catch_warnings(), _no_trainer(f"{type(lightning_module).__name__}.training_step",
                                                "loss=lambda model, batch: <the loss>"):
        warnings.filterwarnings("ignore", message=_NO_TRAINER_LOG_WARNING)
        output = step(batch, 0) if takes_index else step(batch)
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise UsageError(f"{type(lightning_module).__name__}.training_step returned "
                         f"{type(output).__name__}, not a scalar loss (or a dict with 'loss'); "
                         "batchscope needs the loss of every batch")
    return loss.reshape(())


def _loader_like(loader: DataLoader, batch_size: int, *, seed: int,
                 examples: int | None = None) -> DataLoader:
    """The user's loader (dataset, collate, workers, pinning) at another batch size, shuffled
    by `seed`, the last partial batch dropped (every step is a full batch). A pass holds
    `examples` examples (default: the dataset once); more than the dataset's are further
    shuffles of it, every example coming once before any comes again."""
    generator = torch.Generator().manual_seed(int(seed))
    # The sampler `shuffle=True` would build, sharing the loader's generator as it would, so
    # a pass of the dataset once is drawn exactly as a shuffled DataLoader draws it.
    sampler = RandomSampler(loader.dataset, num_samples=examples, generator=generator)
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, generator=generator)


def _to_device(batch: Any, device: torch.device) -> Any:
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


def _repeat_to(batch: Any, size: int) -> Any:
    """`batch` with every tensor repeated along its first dimension up to `size` rows; None when
    something in it is not a tensor (a list of strings, say), which cannot be repeated safely."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            return None
        repeats = -(-size // len(batch))
        return batch.repeat(repeats, *([1] * (batch.dim() - 1)))[:size]
    if isinstance(batch, Mapping):
        values = {key: _repeat_to(value, size) for key, value in batch.items()}
        if any(value is None for value in values.values()):
            return None
        return _same_mapping_type(batch, values)
    if isinstance(batch, (tuple, list)):
        parts = [_repeat_to(value, size) for value in batch]
        if any(part is None for part in parts):
            return None
        return type(batch)(*parts) if hasattr(batch, "_fields") else type(batch)(parts)
    return None


def _same_mapping_type(batch: Mapping[Any, Any], values: dict[Any, Any]) -> Mapping[Any, Any]:
    """`values` as a `type(batch)`, as the collate function made it: training_step may read a
    batch by attribute (HuggingFace's BatchEncoding) or check its type. A type whose constructor
    takes other arguments (defaultdict: its factory first) is rebuilt from a shallow copy of the
    batch with the values put in (a wrapper whose copy shares its inner dict then changes the
    batch it came from too: the callers build from a batch they drop); a plain dict only when
    neither works (a read-only Mapping)."""
    if type(batch) is dict:
        return values
    try:
        return type(batch)(values)
    except (TypeError, ValueError):
        pass
    try:
        rebuilt = copy.copy(batch)
        for key, value in values.items():
            rebuilt[key] = value  # type: ignore[index]
        return rebuilt
    except (TypeError, ValueError, AttributeError):
        return values


def _shuffled_indices(dataset_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` indices into 0..dataset_size-1 from `generator`: one random permutation, then
    further independent ones while more are needed, so that every example comes once before
    any comes again. Up to `dataset_size` indices it is exactly the first permutation's prefix
    (batches drawn before batches could exceed the dataset stay as they were)."""
    passes = [torch.randperm(dataset_size, generator=generator)]
    while len(passes) * dataset_size < count:
        passes.append(torch.randperm(dataset_size, generator=generator))
    return torch.cat(passes)[:count]


def _base_lr(group: Mapping[str, Any]) -> float:
    """The LR the group trains at: a cyclic schedule's peak ("max_lr": OneCycleLR, CyclicLR),
    else the base a scheduler keeps ("initial_lr"), else the group's LR."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


def _param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


__all__ = ["workload", "tune"]
