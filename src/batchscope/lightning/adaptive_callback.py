"""`AdaptiveBatchSizeCallback`: batchscope's adaptive batch size (`AdaptiveBatchSize`) in `Trainer.fit`.

The callback builds the controller from `tune`'s result when the fit starts, hands the train
DataLoader a batch sampler whose batch grows as the controller decides, runs each training step
(micro-batches, noise sample, LR, optimizer step), stops the fit when the planned epochs of
examples are done, carries its state in Lightning checkpoints and writes the run's record.

It needs manual optimization: a step is split into a number of micro-batches that changes from
step to step (a measured step runs as two or more equal ones, a batch larger than fits in memory
as several), and automatic optimization runs exactly one backward per batch it is handed (its
`accumulate_grad_batches` counts whole batches, on a fixed cycle of the batch index).

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from batchscope.lightning import AdaptiveBatchSizeCallback

    adaptive = AdaptiveBatchSizeCallback(result, epochs=30, dataset_size=len(train_set))

    class Classifier(pl.LightningModule):
        def __init__(self, adaptive):
            super().__init__()
            self.automatic_optimization = False      # the callback runs each step
            self.adaptive = adaptive
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            return self.adaptive.training_step(self, batch, lambda b: F.cross_entropy(self.net(b[0]), b[1]))

        def configure_optimizers(self):              # one optimizer, no scheduler: the callback sets the LR
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

        def train_dataloader(self):
            return DataLoader(train_set, batch_sampler=self.adaptive.batch_sampler(len(train_set)),
                              num_workers=4)

    trainer = pl.Trainer(callbacks=[adaptive], max_epochs=1000)   # the callback ends the fit after 30 epochs
    trainer.fit(Classifier(adaptive))                             # DDP: add use_distributed_sampler=False
    print(adaptive.controller.changes)   # when the batch grew, at which noise scale
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch.utils.data import Sampler

from batchscope.adaptive import AdaptiveBatchSampler, AdaptiveBatchSize, save_adaptive_run
from batchscope.atomic import check_writable_directory
from batchscope.checks import require_int
from batchscope.errors import UsageError
from batchscope.lightning._import import import_lightning

if TYPE_CHECKING:
    from batchscope.tuning import TuneResult

pl = import_lightning()

# What from_tune takes besides the model, optimizer and plan (the callback supplies the scaler
# and Lightning the process group).
OPTIONS = ("measure_every", "decide_every", "min_samples", "ema_beta", "noise_scale",
           "max_growth", "min_gain", "allow_shrink")


class AdaptiveBatchSizeCallback(pl.Callback):
    """The adaptive mode inside `Trainer.fit` (module docstring).

    Args:
        result: `batchscope.tune`'s (or `batchscope.lightning.tune`'s) result. Under DDP every
            rank starts from rank 0's, so the other ranks may pass None (and skip tuning:
            Lightning's "ddp" strategy runs the script, tune included, on every rank, all on
            the first GPU before the fit sets each rank's device).
        epochs / dataset_size: the run's length: `epochs` passes over `dataset_size` examples
            (the LR schedule runs over them; the fit stops when they are done).
        out_dir: where rank 0 writes `run.json` and `report.html` when the fit ends.
        log: log `adaptive/batch_size` (global), `adaptive/lr` and `adaptive/noise_scale` every
            step through `LightningModule.log`.
        options: passed to `AdaptiveBatchSize.from_tune` (`OPTIONS`).

    `controller` is the `AdaptiveBatchSize` of the current (or last) fit, None before one starts
    (under ddp_spawn it lives in the spawned ranks only: read the run from `out_dir`).
    """

    def __init__(self, result: "TuneResult | None", *, epochs: float, dataset_size: int,
                 out_dir: str | Path | None = None, log: bool = True, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise UsageError(f"unknown option(s) {', '.join(unknown)} for AdaptiveBatchSizeCallback; "
                             f"use {', '.join(OPTIONS)}")
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
            raise UsageError(f"epochs={epochs!r} must be a positive number of epochs to train")
        self.result = result
        self.epochs = float(epochs)
        self.dataset_size = require_int("dataset_size", dataset_size)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.log_metrics = bool(log)
        self.options = options
        self.controller: AdaptiveBatchSize | None = None
        self._pending_state: Mapping[str, Any] | None = None  # a checkpoint's, until on_fit_start
        self._trainer: Any = None
        self._sampler: AdaptiveBatchSampler | None = None
        self._sampler_key: tuple[Any, ...] | None = None
        self._sampler_owner: AdaptiveBatchSize | None = None  # the controller it was made for

    # -- what the user's code calls -------------------------------------------------------------

    def batch_sampler(self, dataset_size: int, *, shuffle: bool = True, seed: int = 0,
                      drop_last: bool = False) -> Sampler[list[int]]:
        """For the train DataLoader: `DataLoader(train_set, batch_sampler=cb.batch_sampler(len(train_set)))`.
        Each epoch is one seeded permutation cut into batches of the size in use when each is
        drawn; under DDP each rank gets its equal, disjoint share of every global batch."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1 and _uses_distributed_sampler(trainer):
            raise UsageError("the adaptive batch sampler already gives each rank its share of every "
                             "batch; pass Trainer(use_distributed_sampler=False) so Lightning does not "
                             "replace it")
        key = (require_int("dataset_size", dataset_size), bool(shuffle), int(seed), bool(drop_last))
        return _LazyBatches(self, key)

    def training_step(self, pl_module: Any, batch: Any,
                      loss_fn: Callable[[Any], torch.Tensor]) -> torch.Tensor:
        """The whole optimizer step, for the module's `training_step` to return: `loss_fn(micro)`
        (the mean loss of a micro-batch) is back-propagated for each micro-batch, weighted so the
        gradient is the whole batch's mean; then the noise sample and the decision
        (`AdaptiveBatchSize.step`, before the optimizer unscales or clips), the optimizer step and
        zero_grad. Returns the batch's mean loss, detached."""
        adaptive = self._controller()
        # Lightning's wrapper: its step() runs the precision plugin (GradScaler unscale, step,
        # update; on_before_optimizer_step, where clipping belongs) and counts global_step.
        optimizer = pl_module.optimizers()
        examples_before = adaptive.examples_seen
        losses = []
        for micro, weight in adaptive.micro_batches(batch):  # sets this step's LR
            loss = weight * loss_fn(micro)
            pl_module.manual_backward(loss)
            losses.append(loss.detach())
        adaptive.step()
        optimizer.step()
        optimizer.zero_grad()
        if self.log_metrics:
            size = adaptive.examples_seen - examples_before
            values = {"adaptive/batch_size": float(size),
                      "adaptive/lr": adaptive.learning_rate(size, examples_before)}
            if adaptive.noise_scale is not None:
                values["adaptive/noise_scale"] = float(adaptive.noise_scale)
            for name, value in values.items():  # equal on every rank: no sync needed
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=size)
        return torch.stack(losses).sum()

    # -- Lightning's hooks ----------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if pl_module.automatic_optimization:
            raise UsageError(f"{type(pl_module).__name__} uses automatic optimization; "
                             "AdaptiveBatchSizeCallback needs manual optimization: set "
                             "self.automatic_optimization = False in its __init__ and return "
                             "callback.training_step(self, batch, loss_fn) from training_step")
        strategy = trainer.strategy
        if not isinstance(strategy, (pl.strategies.SingleDeviceStrategy, pl.strategies.DDPStrategy)):
            raise UsageError(f"strategy {type(strategy).__name__} is not supported by "
                             "AdaptiveBatchSizeCallback; use one device or strategy='ddp'")
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise UsageError(f"configure_optimizers() gave {len(optimizers)} optimizers; "
                             "AdaptiveBatchSizeCallback trains with exactly one")
        if trainer.lr_scheduler_configs:
            raise UsageError("configure_optimizers() returned an LR scheduler; AdaptiveBatchSizeCallback "
                             "sets every step's LR itself (tune's rule, cosine over examples): return "
                             "the optimizer alone")
        interval = trainer.val_check_interval
        if isinstance(interval, float) and interval != 1.0:
            raise UsageError(f"val_check_interval={interval} (a share of an epoch) needs a fixed number "
                             "of batches an epoch, which a growing batch does not have; pass an int "
                             "(validate every k steps) or 1.0")
        problem = None
        if self.out_dir is not None and trainer.is_global_zero:
            try:  # refuse now rather than lose the record at the end of the fit
                check_writable_directory(self.out_dir)
            except OSError as exc:
                problem = (f"out_dir={str(self.out_dir)!r} is not writable ({exc.strerror}); "
                           "pass a writable directory")
        if trainer.is_global_zero and self.result is None:
            problem = "rank 0 has no tune result: pass AdaptiveBatchSizeCallback(result=batchscope.tune(...))"
        self._release()
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            # Under strategy="ddp" every rank ran the script, tune included, before the process
            # group existed, so each may hold its own result (or None, if the script tuned on
            # rank 0 only): all start from rank 0's. Rank 0's problem travels with it, so every
            # rank stops, not rank 0 alone while the others wait.
            box = [self.result, problem]
            torch.distributed.broadcast_object_list(box, src=0)
            self.result, problem = box
        if problem is not None:
            raise UsageError(problem)
        # Under DDP strategy.model is the DistributedDataParallel wrapper (same parameters as the
        # module): the controller needs its no_sync() so that only a step's last micro-batch
        # all-reduces (Lightning's manual_backward then skips DDP's prepare_for_backward).
        self.controller = AdaptiveBatchSize.from_tune(
            self.result, strategy.model, optimizers[0], epochs=self.epochs,
            dataset_size=self.dataset_size, scaler=getattr(trainer.precision_plugin, "scaler", None),
            **self.options)
        # DDP and single-device strategies restore callbacks before on_fit_start.
        if self._pending_state is not None:
            self.controller.load_state_dict(self._pending_state)
            self._pending_state = None
        self._trainer = trainer

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Checked between passes, as the plain loop's `while not adaptive.finished` is: the
        # sampler has then stopped drawing at the schedule's end, and a loader reading ahead
        # cannot make `finished` true while its batches are still to be trained.
        if self.controller is not None and self.controller.finished:
            trainer.should_stop = True

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        adaptive = self.controller
        if adaptive is None:
            return
        if trainer.is_global_zero:
            if not adaptive.finished and adaptive.schedule is not None:
                warnings.warn(f"the fit ended after {adaptive.examples_seen} of the schedule's "
                              f"{adaptive.schedule.total_examples} examples (max_epochs, max_steps or "
                              "another callback stopped it); resume from a checkpoint to finish",
                              stacklevel=2)
            if self.out_dir is not None:
                save_adaptive_run(adaptive, self.out_dir)
        self._release()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()  # the noise hooks come off the user's model whatever happened

    def state_dict(self) -> dict[str, Any]:
        if self.controller is not None:
            return {"adaptive": self.controller.state_dict()}
        return {} if self._pending_state is None else {"adaptive": dict(self._pending_state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("adaptive")
        if state is None:
            return
        if self.controller is not None and self._trainer is not None:
            self.controller.load_state_dict(state)  # strategies that restore after setup
        else:
            self._pending_state = state

    # -- internals ------------------------------------------------------------------------------

    def _controller(self) -> AdaptiveBatchSize:
        if self.controller is None or self._trainer is None:
            raise UsageError("AdaptiveBatchSizeCallback is not running: pass it to "
                             "Trainer(callbacks=[...]) and call training_step() inside trainer.fit()")
        return self.controller

    def _release(self) -> None:
        """Remove the hooks; the controller stays readable (`controller.changes`, `history`)."""
        if self.controller is not None:
            self.controller.close()
        self._trainer = None

    def _sampler_for(self, key: tuple[Any, ...]) -> AdaptiveBatchSampler:
        """The controller's sampler for this fit (made once: a reloaded train_dataloader() gets the
        same one, which knows its epoch and, after a resume, where the trained batches ended)."""
        adaptive = self._controller()
        if self._sampler is None or self._sampler_owner is not adaptive:
            dataset_size, shuffle, seed, drop_last = key
            self._sampler = adaptive.batch_sampler(dataset_size, shuffle=shuffle, seed=seed,
                                                   drop_last=drop_last)
            self._sampler_key, self._sampler_owner = key, adaptive
        elif key != self._sampler_key:
            raise UsageError(f"batch_sampler() settings {key} differ from the train loader's "
                             f"{self._sampler_key} (dataset_size, shuffle, seed, drop_last); it is "
                             "for the train DataLoader only, one per fit")
        return self._sampler


class _LazyBatches(Sampler[list[int]]):
    """What `batch_sampler()` returns. The controller's sampler is looked up when the loader is
    iterated, which Lightning does after on_fit_start and after restoring a checkpoint, so a
    DataLoader built before `fit` works too. It has no `__len__` on purpose: an epoch's number
    of batches falls as the batch grows, and Lightning, given a length, would end epochs and
    time validation by the count it read at the start; without one each epoch runs to the
    loader's end and validates there."""

    def __init__(self, callback: AdaptiveBatchSizeCallback, key: tuple[Any, ...]) -> None:
        self._callback = callback
        self._key = key

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._callback._sampler_for(self._key))


def _uses_distributed_sampler(trainer: Any) -> bool:
    # Lightning keeps Trainer(use_distributed_sampler=...) on its accelerator connector only.
    connector = getattr(trainer, "_accelerator_connector", None)
    return bool(getattr(connector, "use_distributed_sampler", False))

