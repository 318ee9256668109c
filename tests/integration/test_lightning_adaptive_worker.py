"""The LightningModule the adaptive-callback tests train (no tests here: the DDP test's spawned
ranks unpickle it by module name, so it lives in a light module free of fixtures)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

pl = pytest.importorskip("lightning.pytorch")

from batchscope.workloads.models import small_cnn  # noqa: E402

ALLREDUCES = [0]  # gradient all-reduces DDP ran in this (spawned) process


def counting_allreduce(state, bucket):  # unannotated: DDP checks annotations by identity
    """DDP's own all-reduce, counted (the model is small enough for one bucket)."""
    ALLREDUCES[0] += 1
    return allreduce_hook(state, bucket)


class CifarClassifier(pl.LightningModule):
    """What a user writes for the callback (manual optimization, the callback's step, its
    sampler), recording what every training_step saw and set. Batches are (images, labels,
    dataset indices)."""

    def __init__(self, adaptive: Any, train_set: Dataset, *, out_dir: str | None = None,
                 rank_one_result: Any = None) -> None:
        super().__init__()
        # Under strategy="ddp" every rank runs the user's script, tune included: rank 1 may
        # hold another result than rank 0 when the fit starts.
        self.rank_one_result = rank_one_result
        self.automatic_optimization = False
        self.adaptive = adaptive
        self.train_set = train_set
        self.out_dir = out_dir
        torch.manual_seed(0)  # every run starts from the same weights
        self.net = small_cnn()
        self.steps: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        if self.trainer.world_size > 1:  # a spawned rank: two ranks share the two test cores
            torch.set_num_threads(1)
        if self.global_rank == 1 and self.rank_one_result is not None:
            self.adaptive.result = self.rank_one_result

    def on_fit_start(self) -> None:
        # Lightning registers DDP communication hooks on CUDA only; this one counts on gloo.
        model = self.trainer.strategy.model
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(None, counting_allreduce)

    def loss(self, batch: Any) -> torch.Tensor:
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        controller = self.adaptive.controller
        samples = controller.monitor.tracker.samples
        loss = self.adaptive.training_step(self, batch, self.loss)
        sample = controller.monitor.tracker.last
        self.steps.append({
            "epoch": self.current_epoch, "batch_idx": batch_idx, "indices": batch[2].tolist(),
            "lr": self.optimizers().param_groups[0]["lr"], "loss": float(loss),
            "sample": [sample.b_small, sample.b_big] if controller.monitor.tracker.samples > samples else None})
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_sampler=self.adaptive.batch_sampler(len(self.train_set), seed=7))

    def on_train_end(self) -> None:
        if self.out_dir is None:  # the DDP test: each rank writes what it trained
            return
        controller = self.adaptive.controller
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps({
            "steps": self.steps, "world_size": controller.world_size, "changes": controller.changes,
            "history": controller.history, "examples_seen": controller.examples_seen,
            "samples": controller.monitor.tracker.samples, "finished": controller.finished,
            "allreduces": ALLREDUCES[0],
            "params": [p.detach().reshape(-1).tolist() for p in self.parameters()]}))
