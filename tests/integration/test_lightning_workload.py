"""`batchscope.lightning.workload` / `tune` on a real LightningModule and LightningDataModule
(a small CNN on a real CIFAR-10 subset): the workload is the module's own job, tuning leaves
the user's module exactly as it was, and what batchscope cannot use is refused in one line."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict, UserDict, defaultdict
from collections.abc import Mapping

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

import batchscope.lightning as bl  # noqa: E402
from batchscope.errors import UsageError  # noqa: E402
from batchscope.lightning.module_workload import TILE_FROM, _repeat_to  # noqa: E402
from batchscope.workloads.cifar10_data import find_archive  # noqa: E402
from batchscope.workloads.cifar_source import CifarSource  # noqa: E402
from batchscope.workloads.models import small_cnn  # noqa: E402

TRAIN_SIZE = 2_000
LR = 0.05


def _cifar_tensors(size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = CifarSource(find_archive(), size, size).host(split)
    x = torch.tensor(images).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
    return x, torch.tensor(labels)


def _distinct(images: torch.Tensor) -> int:
    return len({image.numpy().tobytes() for image in images})


class CifarModule(pl.LightningModule):
    """What a Lightning user writes: logs from training_step, returns a dict, configures two
    param groups (no weight decay on biases) and a scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_cnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss, "examples": len(y)}

    def configure_optimizers(self):
        decay = [p for n, p in self.named_parameters() if not n.endswith("bias")]
        no_decay = [p for n, p in self.named_parameters() if n.endswith("bias")]
        optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                                     {"params": no_decay, "weight_decay": 0.0, "lr": LR / 2}],
                                    lr=LR, momentum=0.9)
        # Its first value is LR / 10: the base is what batchscope must read.
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
        return {"optimizer": optimizer, "lr_scheduler": warmup}


class CifarData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.setup_calls = 0

    def setup(self, stage: str) -> None:
        self.setup_calls += 1
        self.train_set = TensorDataset(*_cifar_tensors(TRAIN_SIZE))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


@pytest.fixture(scope="module")
def data() -> CifarData:
    return CifarData()


def test_the_workload_is_the_modules_own_job(data):
    torch.manual_seed(0)
    module = CifarModule()
    job = bl.workload(module, data)
    cpu = torch.device("cpu")

    assert (job.reference_batch_size, job.reference_lr) == (64, LR)
    assert (job.dataset_size, job.optimizer_family, job.name) == (TRAIN_SIZE, "sgd", "CifarModule")
    assert data.setup_calls == 1

    model = job.build_model(cpu)
    assert model is not module and model.training
    for mine, theirs in zip(model.parameters(), module.parameters()):
        assert mine is not theirs and torch.equal(mine, theirs)

    # Both groups keep their hyper-parameters; the chosen LR is the largest group's, the other
    # keeps its ratio to it (the scheduler's first value, LR / 10, is not mistaken for the base).
    optimizer = job.build_optimizer(model.parameters(), 0.2)
    groups = optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert [g["lr"] for g in groups] == [0.2, 0.1]
    assert all(g["momentum"] == 0.9 and "initial_lr" not in g for g in groups)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters()}

    # A batch of the size asked for, drawn without replacement from the real dataset; the loss
    # is training_step's (cross-entropy, computed here by hand) with self.log skipped silently.
    batch = job.sample(96, cpu, torch.Generator().manual_seed(1))
    x, y = batch
    assert x.shape == (96, 3, 32, 32) and _distinct(x) == 96
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y)
        assert torch.equal(job.loss(model, batch), expected)

    # One epoch: full batches only, every example at most once.
    batches = list(job.epoch_batches(300, cpu, 0))
    assert [len(b[1]) for b in batches] == [300] * (TRAIN_SIZE // 300)
    seen = torch.cat([b[0] for b in batches])
    assert _distinct(seen) == len(seen) == 1800


def test_tune_on_a_lightning_module_recommends_and_leaves_the_module_as_it_was(data, tmp_path):
    torch.manual_seed(0)
    module = CifarModule().eval()  # a mode tuning must not switch
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()

    result = bl.tune(module, data, device="cpu", budget_s=12, memory_budget="256MiB",
                     out_dir=tmp_path)
    rec = result.recommendation

    assert not module.training
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert data.train_dataloader().batch_size == 64
    # The plan's batch fits under the memory limit, the LR follows the linear rule from the
    # module's own base, and the noise scale was measured on its real gradients.
    assert rec.batch_size <= result.memory.recommended_batch_size * rec.grad_accumulation
    assert (rec.base_batch_size, rec.base_learning_rate, rec.lr_rule) == (64, LR, "linear")
    assert math.isclose(rec.learning_rate, LR * rec.batch_size / 64, rel_tol=1e-12)
    assert result.noise is not None and result.plan.noise_scale > 0
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["workload"]["name"] == "CifarModule"
    assert (tmp_path / "report.html").exists()


def test_the_memory_probes_batch_repeats_a_few_hundred_real_examples(data):
    job = bl.workload(CifarModule(), data)
    x, y = job.worst_case(1000, torch.device("cpu"))
    assert x.shape == (1000, 3, 32, 32) and y.shape == (1000,)
    # 256 distinct real images, each repeated in order: row i is row i mod 256.
    assert _distinct(x) == TILE_FROM == 256
    assert torch.equal(x[256:512], x[:256]) and torch.equal(y[768:], y[:232])
    # A batch that cannot be repeated (strings in it) is drawn in full instead.
    words = TensorDataset(torch.arange(300.0).unsqueeze(1))
    tagged = DataLoader(words, batch_size=4, collate_fn=lambda rows: (torch.stack([r[0] for r in rows]),
                                                                      [f"id{int(r[0])}" for r in rows]))
    values, tags = bl.workload(CifarModule(), train_dataloader=tagged).worst_case(290, torch.device("cpu"))
    assert len(set(tags)) == 290 and values.shape == (290, 1)


class _Stream(IterableDataset):
    def __iter__(self):
        yield from zip(torch.randn(8, 3), torch.zeros(8, dtype=torch.long))


class _Manual(CifarModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _NeedsTrainer(CifarModule):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1]) * self.trainer.accumulate_grad_batches


class _SkipsBatches(CifarModule):
    def training_step(self, batch, batch_idx):
        return None


class _TwoOptimizers(CifarModule):
    def configure_optimizers(self):
        return [torch.optim.SGD(self.parameters(), lr=0.1), torch.optim.Adam(self.parameters())]


class _NoStep(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)


def _loader(dataset, **kwargs) -> DataLoader:
    return DataLoader(dataset, **kwargs)


@pytest.mark.parametrize(("module", "loader", "message"), [
    (nn.Linear(3, 2), None, "is not a lightning.pytorch.LightningModule"),
    (_NoStep(), None, "does not implement training_step"),
    (_Manual(), None, "uses manual optimization"),
    (_TwoOptimizers(), None, "returned 2 optimizers"),
    (CifarModule(), _loader(_Stream(), batch_size=4), "map-style dataset"),
    (CifarModule(), _loader(TensorDataset(torch.randn(8, 3)), batch_size=None), "has no batch_size"),
])
def test_what_batchscope_cannot_use_is_refused_in_one_line(module, loader, message):
    loader = loader if loader is not None else _loader(TensorDataset(torch.randn(8, 3)), batch_size=4)
    with pytest.raises(UsageError, match=message) as caught:
        bl.workload(module, train_dataloader=loader)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("module", "message"), [
    (_NeedsTrainer(), "training_step uses self.trainer.*pass loss="),
    (_SkipsBatches(), "returned NoneType, not a scalar loss"),
])
def test_a_training_step_batchscope_cannot_call_is_named_with_the_fix(module, message):
    x, y = _cifar_tensors(200)
    job = bl.workload(module, train_dataloader=DataLoader(TensorDataset(x, y), batch_size=32))
    model = job.build_model(torch.device("cpu"))
    with pytest.raises(UsageError, match=message):
        job.loss(model, job.sample(8, torch.device("cpu"), torch.Generator().manual_seed(0)))


def test_precision_and_a_manual_optimization_module_with_its_own_loss(data):
    def loss(model, batch):
        return F.cross_entropy(model(batch[0]), batch[1])

    job = bl.workload(_Manual(), data, loss=loss, precision="bf16-mixed")
    assert job.autocast_dtype is torch.bfloat16 and job.loss is loss
    assert bl.workload(CifarModule(), data, precision="32-true").autocast_dtype is None
    with pytest.raises(UsageError, match="precision='64' is not one of 32, 32-true, bf16-mixed, 16-mixed"):
        bl.workload(CifarModule(), data, precision="64")


class _OneCycle(CifarModule):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        # It starts at max_lr / 25 = 0.004: the LR the module trains at is its peak, 0.1.
        return [optimizer], [torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=100)]


class _Cyclic(CifarModule):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        cyclic = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.4,
                                                   base_momentum=0.8, max_momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cyclic, "interval": "step"}}


@pytest.mark.parametrize(("module", "peak", "momentum_at_peak"), [(_OneCycle(), 0.1, 0.85),
                                                                  (_Cyclic(), 0.4, 0.8)])
def test_a_cyclic_schedules_peak_is_the_reference_lr_with_its_momentum(data, module, peak, momentum_at_peak):
    # Both start at their low LR and high momentum; the module trains up to the peak, where
    # the cycled momentum is at its low.
    job = bl.workload(module, data)
    assert job.reference_lr == peak
    model = job.build_model(torch.device("cpu"))
    for params in (model.parameters(), [next(model.parameters())]):  # its copy's, or others
        group = job.build_optimizer(params, 0.3).param_groups[0]
        assert group["lr"] == 0.3 and group["momentum"] == momentum_at_peak
        assert not {"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum"} & set(group)


class _Logits(nn.Module):
    """Returns its inputs as the logits; the unused BatchNorm is there for its train flag."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_top1_accuracy_scores_a_known_model_and_gives_the_modes_back():
    # The inputs are the logits themselves: 3 of the 4 argmaxes match their labels.
    logits = torch.eye(4)
    labels = torch.tensor([0, 1, 2, 0])
    model = _Logits()
    model.norm.eval()  # a mixed state to give back
    loader = DataLoader(TensorDataset(logits, labels), batch_size=3)
    assert bl.top1_accuracy(loader)(model, torch.device("cpu")) == 0.75
    assert model.training and not model.norm.training
    with pytest.raises(UsageError, match="needs \\(inputs, labels, ...\\) batches"):
        bl.top1_accuracy(DataLoader(TensorDataset(logits), batch_size=2))(model, torch.device("cpu"))


def test_top1_accuracy_counts_positions_and_refuses_scores_it_cannot_read():
    cpu = torch.device("cpu")
    # Per-position labels: logits (N, C, T) against labels (N, T); 5 of 6 positions right.
    logits = torch.zeros(2, 3, 3)
    labels = torch.tensor([[0, 1, 2], [2, 2, 0]])
    for n in range(2):
        for t in range(3):
            logits[n, labels[n, t], t] = 1.0
    logits[1, :, 2] = torch.tensor([0.0, 1.0, 0.0])  # one wrong
    rng = torch.get_rng_state()
    shuffled = DataLoader(TensorDataset(logits, labels), batch_size=1, shuffle=True)
    assert bl.top1_accuracy(shuffled)(_Logits(), cpu) == 5 / 6
    assert torch.equal(torch.get_rng_state(), rng)  # the loader's shuffling seed did not come from it
    one_hot = DataLoader(TensorDataset(torch.eye(4), torch.eye(4)), batch_size=4)
    single_logit = DataLoader(TensorDataset(torch.ones(4, 1), torch.zeros(4, dtype=torch.long)), batch_size=4)
    for loader in (one_hot, single_logit):
        with pytest.raises(UsageError, match="needs class scores \\(N, C, ...\\) with C >= 2"):
            bl.top1_accuracy(loader)(_Logits(), cpu)


def test_a_real_sweep_runs_on_the_lightning_workload(data, tmp_path):
    import batchscope

    held_out = DataLoader(TensorDataset(*_cifar_tensors(500, "test")), batch_size=250)
    job = bl.workload(CifarModule(), data, evaluate=bl.top1_accuracy(held_out))
    result = batchscope.sweep(job, [64, 128], lr_rule="linear", epochs=2, out_dir=tmp_path,
                              pruning=False, device="cpu", report=False)
    assert [t.key for t in result.trials] == ["b64-linear", "b128-linear"]
    for trial in result.trials:
        assert trial.outcome == "complete" and trial.steps_done == 2 * (TRAIN_SIZE // trial.batch_size)
        assert trial.learning_rate == pytest.approx(LR * trial.batch_size / 64)
        assert 0.0 <= trial.final_metric <= 1.0 and len(trial.curve) == 4
    # On 500 test images: well above chance (0.10) after two epochs (0.34 and 0.30 when written).
    assert max(t.final_metric for t in result.trials) > 0.2


def test_one_source_of_data_exactly():
    with pytest.raises(UsageError, match="exactly one of datamodule"):
        bl.workload(CifarModule())


def _numbered(size: int) -> DataLoader:
    """Example i is the value i (and label 0): a batch's rows name the examples drawn."""
    return DataLoader(TensorDataset(torch.arange(float(size)).unsqueeze(1),
                                    torch.zeros(size, dtype=torch.long)), batch_size=4)


def test_a_batch_larger_than_the_dataset_has_every_example_before_any_repeats():
    cpu = torch.device("cpu")
    job = bl.workload(CifarModule(), train_dataloader=_numbered(50))

    # Up to the dataset's size: the first permutation's prefix, exactly as before batches
    # could exceed the dataset (results measured then do not move).
    drawn = job.sample(30, cpu, torch.Generator().manual_seed(3))[0][:, 0].long()
    assert torch.equal(drawn, torch.randperm(50, generator=torch.Generator().manual_seed(3))[:30])

    # Beyond it: exactly the size asked, one permutation after another from the same generator.
    rows = job.sample(120, cpu, torch.Generator().manual_seed(3))[0][:, 0].long()
    generator = torch.Generator().manual_seed(3)
    passes = [torch.randperm(50, generator=generator) for _ in range(3)]
    assert rows.shape == (120,) and torch.equal(rows, torch.cat(passes)[:120])
    assert sorted(rows[:50].tolist()) == sorted(rows[50:100].tolist()) == list(range(50))
    assert len(set(rows[100:].tolist())) == 20
    assert torch.equal(rows, job.sample(120, cpu, torch.Generator().manual_seed(3))[0][:, 0].long())

    # The memory probe's batch on a dataset smaller than TILE_FROM: all 50, repeated in order.
    tiled = job.worst_case(130, cpu)[0][:, 0]
    assert tiled.shape == (130,) and sorted(tiled[:50].tolist()) == list(range(50))
    assert torch.equal(tiled[50:100], tiled[:50]) and torch.equal(tiled[100:], tiled[:30])


def test_an_unrepeatable_batch_larger_than_the_dataset_is_drawn_in_full():
    # Strings in the batch: the memory probe's batch is drawn, not tiled; it must still hold
    # every row it is measured for.
    words = TensorDataset(torch.arange(300.0).unsqueeze(1))
    tagged = DataLoader(words, batch_size=4, collate_fn=lambda rows: (torch.stack([r[0] for r in rows]),
                                                                      [f"id{int(r[0])}" for r in rows]))
    values, tags = bl.workload(CifarModule(), train_dataloader=tagged).worst_case(700, torch.device("cpu"))
    assert values.shape == (700, 1) and len(tags) == 700
    assert len(set(tags[:300])) == len(set(tags[300:600])) == 300 and len(set(tags[600:])) == 100


def test_the_pipeline_check_gets_a_batch_larger_than_the_dataset():
    # An epoch at that size holds no full batch; the endless loader must not spin on empty
    # epochs (it did: next() never returned), it yields the size asked.
    job = bl.workload(CifarModule(), train_dataloader=_numbered(50))
    assert list(job.epoch_batches(120, torch.device("cpu"), 0)) == []
    got: list = []
    worker = threading.Thread(target=lambda: got.append(next(job.data_loader(120, torch.device("cpu")))),
                              daemon=True)
    worker.start()
    worker.join(timeout=60)  # a hang guard, not a timing: it returns in milliseconds
    assert not worker.is_alive(), "data_loader(120) on 50 examples never yielded"
    rows = got[0][0][:, 0]
    assert rows.shape == (120,) and sorted(rows[:50].tolist()) == list(range(50))


class Features(UserDict):
    """A batch like HuggingFace's BatchEncoding: a UserDict whose keys read as attributes."""

    def __getattr__(self, name: str):
        try:
            return self.__dict__["data"][name]
        except KeyError:
            raise AttributeError(name) from None


class _FeatureSet(Dataset):
    def __init__(self, size: int) -> None:
        self.inputs, self.targets = torch.randn(size, 3), torch.arange(size) % 2

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Features:
        return Features(inputs=self.inputs[index], targets=self.targets[index])


class _ReadsByAttribute(pl.LightningModule):
    def __init__(self, seen) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)
        self.seen = seen  # a builtin method: the model's deep copies share it

    def training_step(self, batch, batch_idx):
        self.seen((type(batch), len(batch.targets)))
        return F.cross_entropy(self.layer(batch.inputs), batch.targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _NoMemory:
    def reset(self) -> None:
        pass

    def peak_bytes(self) -> int:
        return 0


def test_the_memory_probes_tiled_batch_keeps_the_batchs_own_mapping_type():
    import batchscope

    # 300 examples: the probe's batch at the dataset's size is 256 real ones, tiled.
    seen: list = []
    job = bl.workload(_ReadsByAttribute(seen.append),
                      train_dataloader=DataLoader(_FeatureSet(300), batch_size=8))
    batch = job.worst_case(300, torch.device("cpu"))
    assert type(batch) is Features and batch.inputs.shape == (300, 3)
    assert torch.equal(batch.targets[256:], batch.targets[:44])

    result = batchscope.probe_memory(job, device="cpu", memory_budget="1GiB",
                                     start_batch_size=300, meter=_NoMemory())
    assert result.max_batch_size == 300
    assert (Features, 300) in seen and {kind for kind, _ in seen} == {Features}


class _NeedsATokenizer(dict):
    def __init__(self, tokenizer, data) -> None:
        super().__init__(data)
        self.tokenizer = tokenizer


class _ReadOnly(Mapping):
    """A Mapping that can be neither built from a dict alone nor assigned to."""

    def __init__(self, tokenizer, data) -> None:
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def test_a_mapping_batch_is_rebuilt_as_its_own_type_or_else_a_dict():
    ordered = _repeat_to(OrderedDict(b=torch.arange(2), a=torch.arange(2)), 3)
    assert type(ordered) is OrderedDict and list(ordered) == ["b", "a"]
    assert torch.equal(ordered["a"], torch.tensor([0, 1, 0]))
    # Types whose constructor takes more than a dict: a copy of the batch with the values put in,
    # its own attributes (a defaultdict's factory, a tokenizer) kept and the original untouched.
    counts = defaultdict(list, x=torch.arange(2))
    tiled = _repeat_to(counts, 3)
    assert type(tiled) is defaultdict and tiled.default_factory is list and tiled["y"] == []
    assert torch.equal(tiled["x"], torch.tensor([0, 1, 0])) and list(counts) == ["x"]
    tokenized = _repeat_to(_NeedsATokenizer("tok", {"x": torch.arange(2)}), 3)
    assert type(tokenized) is _NeedsATokenizer and tokenized.tokenizer == "tok"
    assert torch.equal(tokenized["x"], torch.tensor([0, 1, 0]))
    # Neither buildable nor assignable: the values, as a plain dict.
    plain = _repeat_to(_ReadOnly(None, {"x": torch.arange(2)}), 3)
    assert type(plain) is dict and torch.equal(plain["x"], torch.tensor([0, 1, 0]))
