"""`AdaptiveBatchSizeCallback` in real `Trainer.fit` runs on CPU: a real `tune` of the small
CIFAR-10 workload, then a small CNN trained on real CIFAR-10 images by a LightningModule with
manual optimization. Every step's LR is the rule's for the batch Lightning actually handed the
step, the batch grows and each new size reaches the step Lightning's read-ahead says it must,
the fit ends by itself after the planned examples, a mid-epoch checkpoint resumes exactly where
the uninterrupted run went, and two DDP ranks (ddp_spawn, gloo) train equal, disjoint shares and
take the same decisions."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import batchscope  # noqa: E402
from batchscope.analysis.throughput_model import fit_throughput_model  # noqa: E402
from batchscope.cli.main import run as cli  # noqa: E402
from batchscope.errors import UsageError  # noqa: E402
from batchscope.lightning.adaptive_callback import AdaptiveBatchSizeCallback  # noqa: E402
from batchscope.record import RunRecord  # noqa: E402
from batchscope.workloads import get_workload  # noqa: E402
from batchscope.workloads.cifar10_data import find_archive  # noqa: E402
from batchscope.workloads.cifar_source import CifarSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import test_lightning_adaptive_worker as worker  # noqa: E402

pytestmark = pytest.mark.slow

TRAIN_SIZE = 1024
EPOCHS = 1.5  # the fit must stop by itself half-way through its second pass
TOTAL = int(EPOCHS * TRAIN_SIZE)
CANDIDATES = (32, 64, 128)
SETTINGS = {"measure_every": 1, "decide_every": 4, "min_samples": 2}
# Lightning's messages that say nothing about the code under test.
QUIET = (r".*LeafSpec.*", r".*ModelCheckpoint with manual optimization.*", r".*callbacks used to create the checkpoint.*",
         r".*does not have many workers.*")


@pytest.fixture(scope="module")
def tuned():
    workload = get_workload("small-cnn-cifar10", train_size=TRAIN_SIZE, test_size=200)
    return batchscope.tune(workload, device=torch.device("cpu"), budget_s=10, memory_budget="256MiB")


@pytest.fixture(scope="module")
def growing(tuned):
    """tune's result (its LR rule, base, warmup, noise scale) with a step time that is all
    overhead, starting at 32 with up to 128 fitting: a batch twice as large is then faster to
    target whenever the noise scale is above ~10% of the batch, so the policy must double the
    batch at its decisions (CIFAR-10's noise scale at initialisation is ~50)."""
    return dataclasses.replace(
        tuned, candidates=CANDIDATES,
        step_time=fit_throughput_model(list(CANDIDATES), [0.05 + 1e-7 * b for b in CANDIDATES]),
        recommendation=dataclasses.replace(tuned.recommendation, batch_size=32, per_device_batch_size=32,
                                           grad_accumulation=1),
        memory=dataclasses.replace(tuned.memory, recommended_batch_size=128))


@pytest.fixture(scope="module")
def train_set() -> TensorDataset:
    images, labels = CifarSource(find_archive(), TRAIN_SIZE, 200).host("train")
    x = torch.tensor(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
    return TensorDataset(x, torch.tensor(labels), torch.arange(TRAIN_SIZE))


def fit(callback, train_set, root, *, module=None, callbacks=(), ckpt_path=None, **options):
    module = module if module is not None else worker.CifarClassifier(callback, train_set)
    settings = {"max_epochs": 50, "enable_progress_bar": False, "enable_model_summary": False,
                "logger": False, "enable_checkpointing": bool(callbacks), "default_root_dir": str(root),
                **options}
    trainer = pl.Trainer(callbacks=[callback, *callbacks], **settings)
    with warnings.catch_warnings():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        trainer.fit(module, ckpt_path=ckpt_path)
    return SimpleNamespace(trainer=trainer, module=module, steps=module.steps, controller=callback.controller)


class Validated(worker.CifarClassifier):
    """With a validation loop (real test images), noting when it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.validated: list[tuple[int, int]] = []  # (epoch, steps trained so far)

    def val_dataloader(self):
        images, labels = CifarSource(find_archive(), TRAIN_SIZE, 200).host("test")
        x = torch.tensor(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
        return DataLoader(TensorDataset(x, torch.tensor(labels)), batch_size=100)

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0 and not self.trainer.sanity_checking:
            self.validated.append((self.current_epoch, len(self.steps)))


@pytest.fixture(scope="module")
def uninterrupted(growing, train_set, tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning-adaptive")
    callback = AdaptiveBatchSizeCallback(growing, epochs=EPOCHS, dataset_size=TRAIN_SIZE,
                                         out_dir=root / "run", **SETTINGS)
    logger = pl.loggers.CSVLogger(root, name="log")
    done = fit(callback, train_set, root, module=Validated(callback, train_set), logger=logger,
               log_every_n_steps=1, num_sanity_val_steps=0)
    done.root, done.metrics = root, Path(logger.log_dir) / "metrics.csv"
    return done


def test_every_step_trains_at_the_rules_lr_and_the_fit_ends_with_the_schedule(uninterrupted, growing):
    rec, workload = growing.recommendation, growing.record.workload
    warmup = max(rec.warmup_steps * rec.batch_size,
                 math.ceil(float(workload.get("warmup_epochs") or 0) * TRAIN_SIZE))
    assert rec.lr_rule == "linear"
    seen = 0
    for step in uninterrupted.steps:
        size = len(step["indices"])
        # Computed here: linear rule from tune's base, cosine over examples after the warmup.
        if seen < warmup:
            multiplier = min(1.0, (seen + size) / warmup)
        else:
            multiplier = 0.5 * (1 + math.cos(math.pi * min(1.0, (seen - warmup) / (TOTAL - warmup))))
        assert step["lr"] == pytest.approx(rec.base_learning_rate * size / rec.base_batch_size * multiplier,
                                           rel=1e-12)
        seen += size
    controller = uninterrupted.controller
    assert seen == controller.examples_seen == TOTAL and controller.finished
    # max_epochs=50: the callback stopped the fit after the second (half) pass.
    assert uninterrupted.trainer.current_epoch == 2 and uninterrupted.trainer.should_stop
    first_pass = [s for s in uninterrupted.steps if s["epoch"] == 0]
    first = [i for s in first_pass for i in s["indices"]]
    second = [i for s in uninterrupted.steps if s["epoch"] == 1 for i in s["indices"]]
    assert sorted(first) == list(range(TRAIN_SIZE))
    assert len(second) == len(set(second)) == TRAIN_SIZE // 2
    # Validation ran at the end of each pass: Lightning found no length to count batches by
    # (an epoch's count changes as the batch grows) and ran each epoch to the loader's end.
    assert uninterrupted.module.validated == [(0, len(first_pass)), (1, len(uninterrupted.steps))]
    # It trained: the last steps' loss is below the first steps'.
    losses = [s["loss"] for s in uninterrupted.steps]
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4])


def test_the_batch_doubles_and_each_step_sees_the_size_drawn_after_the_last_decision(uninterrupted):
    controller, steps = uninterrupted.controller, uninterrupted.steps
    changes = controller.changes
    assert [(c["previous"], c["batch_size"]) for c in changes] == [(32, 64), (64, 128)]
    assert all(c["step"] % 4 == 0 and c["noise_scale"] > 0 and c["predicted_gain"] >= 0.05 for c in changes)

    def size_after(step: int) -> int:
        return max([32] + [c["batch_size"] for c in changes if c["step"] <= step])

    # Lightning reads one batch ahead: an epoch's first batch is drawn after the previous step,
    # every other batch before the step that precedes it. A batch may be shorter only at the
    # end of an epoch or of the run.
    for k, step in enumerate(steps, start=1):
        expected = size_after(k - 1) if step["batch_idx"] == 0 else size_after(k - 2)
        size = len(step["indices"])
        last_of_epoch = k == len(steps) or steps[k]["epoch"] != step["epoch"]
        assert size == expected or (last_of_epoch and size < expected)
    sizes = [len(s["indices"]) for s in steps]
    assert [h["step"] for h in controller.history] == list(range(4, len(steps) + 1, 4))
    for entry in controller.history:
        assert entry["examples_seen"] == sum(sizes[:entry["step"]])
        assert entry["learning_rate"] == steps[entry["step"] - 1]["lr"]
    # Every step was measured, as two equal micro-batches inside Lightning's training_step.
    assert controller.monitor.tracker.samples == len(steps)
    assert [s["sample"] for s in steps] == [[size // 2, size] for size in sizes]


def test_batch_size_lr_and_noise_scale_are_logged_every_step(uninterrupted):
    with open(uninterrupted.metrics, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("adaptive/batch_size")]
    assert [float(r["adaptive/batch_size"]) for r in rows] == [len(s["indices"]) for s in uninterrupted.steps]
    assert [float(r["adaptive/lr"]) for r in rows] == pytest.approx([s["lr"] for s in uninterrupted.steps],
                                                                     rel=1e-6)
    assert float(rows[-1]["adaptive/noise_scale"]) == pytest.approx(uninterrupted.controller.noise_scale, rel=1e-6)


def test_the_run_record_is_written_and_batchscope_report_redraws_it(uninterrupted):
    run_json = uninterrupted.root / "run" / "run.json"
    record = RunRecord.load(run_json)
    assert record.kind == "adaptive"
    assert record.sections["changes"] == uninterrupted.controller.changes
    assert record.sections["summary"]["examples_seen"] == TOTAL and record.sections["summary"]["finished"]
    html = uninterrupted.root / "again.html"
    with pytest.raises(SystemExit) as exited:
        cli(["report", str(run_json), "--html", str(html)])
    assert exited.value.code == 0 and html.read_text().count("<figure") == 2


def test_a_mid_epoch_checkpoint_resumes_exactly_where_the_uninterrupted_run_went(
        uninterrupted, growing, train_set, tmp_path):
    steps = uninterrupted.steps
    # A few steps after the last change, while the first pass is still going.
    k = uninterrupted.controller.changes[-1]["step"] + 3
    assert steps[k]["epoch"] == steps[k - 1]["epoch"] == 0
    first = AdaptiveBatchSizeCallback(growing, epochs=EPOCHS, dataset_size=TRAIN_SIZE, **SETTINGS)
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=k, save_top_k=-1)
    with pytest.warns(UserWarning, match=f"the fit ended after \\d+ of the schedule's {TOTAL} examples"):
        interrupted = fit(first, train_set, tmp_path, callbacks=[saver], max_steps=k)
    (checkpoint,) = (tmp_path / "ckpt").glob("*.ckpt")
    second = AdaptiveBatchSizeCallback(growing, epochs=EPOCHS, dataset_size=TRAIN_SIZE, **SETTINGS)
    resumed = fit(second, train_set, tmp_path, ckpt_path=checkpoint)

    assert len(interrupted.steps) == k and resumed.steps[0]["batch_idx"] > 0
    assert [(s["indices"], s["lr"]) for s in interrupted.steps + resumed.steps] == \
        [(s["indices"], s["lr"]) for s in steps]
    assert second.controller.changes == uninterrupted.controller.changes
    assert second.controller.examples_seen == TOTAL and resumed.trainer.current_epoch == 2
    expected = uninterrupted.module.state_dict()
    assert all(torch.equal(value, expected[name]) for name, value in resumed.module.state_dict().items())


def test_with_16_mixed_the_precision_plugins_scaler_is_divided_out_of_the_noise_sample(
        uninterrupted, growing, train_set, tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    callback = AdaptiveBatchSizeCallback(growing, epochs=0.25, dataset_size=TRAIN_SIZE, **SETTINGS)
    mixed = fit(callback, train_set, tmp_path,
                plugins=[pl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert callback.controller.monitor.scaler is scaler and mixed.controller.examples_seen == TRAIN_SIZE // 4
    # The first step's |G|^2 (same weights, same batch) matches fp32's, not 2^20 times it.
    assert callback.controller.monitor.tracker.g2_samples[0] == pytest.approx(
        uninterrupted.controller.monitor.tracker.g2_samples[0], rel=0.05)


class TwoOptimizers(worker.CifarClassifier):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.net.features.parameters(), lr=0.1),
                torch.optim.SGD(self.net.classifier.parameters(), lr=0.1)]


class WithScheduler(worker.CifarClassifier):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 10)]


class Automatic(worker.CifarClassifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = True


@pytest.mark.parametrize("module_class, options, message", [
    (Automatic, {}, "Automatic uses automatic optimization; AdaptiveBatchSizeCallback needs manual "
                    "optimization: set self.automatic_optimization = False"),
    (TwoOptimizers, {}, "configure_optimizers\\(\\) gave 2 optimizers"),
    (WithScheduler, {}, "configure_optimizers\\(\\) returned an LR scheduler"),
    (worker.CifarClassifier, {"val_check_interval": 0.5}, "val_check_interval=0.5 \\(a share of an epoch\\)"),
])
def test_a_setup_the_callback_cannot_drive_is_refused_in_one_line(growing, train_set, tmp_path, module_class,
                                                                   options, message):
    callback = AdaptiveBatchSizeCallback(growing, epochs=1, dataset_size=TRAIN_SIZE)
    with pytest.raises(UsageError, match=message):
        fit(callback, train_set, tmp_path, module=module_class(callback, train_set), **options)
    assert callback.controller is None


def test_without_a_tune_result_on_rank_zero_the_fit_is_refused(train_set, tmp_path):
    # Only the other ranks of a DDP job may leave it to rank 0's (see the DDP test).
    callback = AdaptiveBatchSizeCallback(None, epochs=1, dataset_size=TRAIN_SIZE)
    with pytest.raises(UsageError, match="rank 0 has no tune result"):
        fit(callback, train_set, tmp_path, module=worker.CifarClassifier(callback, train_set))


def test_bad_settings_and_misuse_are_one_line_usage_errors(growing, train_set):
    with pytest.raises(UsageError, match="unknown option\\(s\\) lr_rule for AdaptiveBatchSizeCallback"):
        AdaptiveBatchSizeCallback(growing, epochs=1, dataset_size=TRAIN_SIZE, lr_rule="sqrt")
    with pytest.raises(UsageError, match="epochs=0 must be a positive number"):
        AdaptiveBatchSizeCallback(growing, epochs=0, dataset_size=TRAIN_SIZE)
    callback = AdaptiveBatchSizeCallback(growing, epochs=1, dataset_size=TRAIN_SIZE)
    loader = DataLoader(train_set, batch_sampler=callback.batch_sampler(TRAIN_SIZE))
    with pytest.raises(UsageError, match="AdaptiveBatchSizeCallback is not running: pass it to Trainer"):
        next(iter(loader))


class FailsAtStepThree(worker.CifarClassifier):
    def loss(self, batch):
        if len(self.steps) == 2:
            raise RuntimeError("a bug in the user's loss")
        return super().loss(batch)


def test_an_error_during_the_fit_takes_the_noise_hooks_off_the_model(growing, train_set, tmp_path):
    callback = AdaptiveBatchSizeCallback(growing, epochs=1, dataset_size=TRAIN_SIZE, **SETTINGS)
    module = FailsAtStepThree(callback, train_set)
    with pytest.raises(RuntimeError, match="a bug in the user's loss"):
        fit(callback, train_set, tmp_path, module=module)
    assert callback.controller.steps == 2
    assert not any(p._backward_hooks for p in module.parameters())


@pytest.fixture(scope="module")
def ddp_ranks(tuned, train_set, tmp_path_factory):
    """Two CPU ranks under ddp_spawn (gloo). 32 per device with 16 fitting: each rank's share
    runs as two micro-batches, the first under DDP's no_sync; tune's candidates are cut to 32
    so the start (re-planned per device) is 2 x 32 whatever the noise scale."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    shared = dataclasses.replace(
        tuned, candidates=(32,),
        recommendation=dataclasses.replace(tuned.recommendation, batch_size=32, per_device_batch_size=32,
                                           grad_accumulation=1),
        memory=dataclasses.replace(tuned.memory, recommended_batch_size=16))
    directory = tmp_path_factory.mktemp("lightning-adaptive-ddp")
    callback = AdaptiveBatchSizeCallback(shared, epochs=1, dataset_size=TRAIN_SIZE, **SETTINGS)
    # Rank 1 tuned for itself and got another base LR (10x): the callback starts every rank
    # from rank 0's result, or the ranks' LRs would differ.
    own = dataclasses.replace(shared, recommendation=dataclasses.replace(
        shared.recommendation, base_learning_rate=10 * shared.recommendation.base_learning_rate))
    module = worker.CifarClassifier(callback, train_set, out_dir=str(directory), rank_one_result=own)
    environment = dict(os.environ)  # ddp_spawn sets MASTER_ADDR/PORT etc. in this process
    try:
        fit(callback, train_set, directory, module=module, accelerator="cpu", devices=2,
            strategy="ddp_spawn", use_distributed_sampler=False)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_ddp_ranks_train_equal_disjoint_shares_and_take_the_same_decisions(ddp_ranks):
    first, second = ddp_ranks
    assert first["world_size"] == second["world_size"] == 2
    assert first["examples_seen"] == second["examples_seen"] == TRAIN_SIZE and first["finished"]
    covered = []
    for mine, theirs in zip(first["steps"], second["steps"], strict=True):
        assert len(mine["indices"]) == len(theirs["indices"]) == 32
        assert not set(mine["indices"]) & set(theirs["indices"])
        covered += mine["indices"] + theirs["indices"]
    assert sorted(covered) == list(range(TRAIN_SIZE))
    # The same all-reduced noise scales, decisions and LRs on both ranks, and the same weights
    # (a step whose last micro-batch did not all-reduce would have split them).
    assert first["history"] == second["history"] and len(first["history"]) == TRAIN_SIZE // 64 // 4
    assert first["changes"] == second["changes"] == []
    assert [s["lr"] for s in first["steps"]] == [s["lr"] for s in second["steps"]]
    assert first["params"] == second["params"]
    # DDP all-reduced once a step: the first micro-batch ran under the wrapper's no_sync.
    assert first["allreduces"] == second["allreduces"] == len(first["steps"])
    # Measured steps pair each rank's 16-example micro-batches with the 64-example global batch.
    assert all(s["sample"] == [16, 64] for s in first["steps"])
