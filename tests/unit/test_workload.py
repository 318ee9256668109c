"""The Workload contract: validation, adapters and entry points."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from batchscope.errors import UsageError
from batchscope.workload import Workload, load_entry_point, resolve_workload


def _linear_workload(**changes):
    fields = dict(
        name="linear",
        build_model=lambda device: nn.Linear(4, 1).to(device),
        build_optimizer=lambda params, lr: torch.optim.SGD(params, lr=lr),
        loss=lambda model, batch: nn.functional.mse_loss(model(batch[0]), batch[1]),
        make_batch=lambda b, device, g: (torch.randn(b, 4, generator=g), torch.randn(b, 1, generator=g)),
        reference_batch_size=32,
        reference_lr=0.1,
    )
    fields.update(changes)
    return Workload(**fields)


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("reference_batch_size", 0, "reference_batch_size=0"),
        ("reference_batch_size", 12.5, "reference_batch_size=12.5"),
        ("reference_lr", -1.0, "reference_lr=-1.0"),
        ("reference_lr", True, "reference_lr=True"),
        ("reference_lr", float("inf"), "reference_lr=inf"),
        ("unit", "pixels", "unit='pixels'"),
        ("optimizer_family", "lamb", "optimizer_family='lamb'"),
        ("dataset_size", 0, "dataset_size=0"),
        ("loss", None, "Workload.loss must be callable"),
    ],
)
def test_bad_fields_name_the_value(field, value, fragment):
    with pytest.raises(UsageError) as excinfo:
        _linear_workload(**{field: value})
    message = str(excinfo.value)
    assert fragment in message
    assert "\n" not in message


def test_numpy_integer_sizes_are_stored_as_plain_ints():
    workload = _linear_workload(reference_batch_size=np.int64(32), dataset_size=np.int32(1000))
    assert type(workload.reference_batch_size) is int and workload.reference_batch_size == 32
    assert type(workload.dataset_size) is int and workload.dataset_size == 1000


def test_units_default_to_batch_size_and_use_count_when_given():
    generator = torch.Generator().manual_seed(0)
    plain = _linear_workload()
    batch = plain.sample(8, torch.device("cpu"), generator)
    assert plain.units_in(batch, 8) == 8
    tokens = _linear_workload(unit="tokens", count=lambda batch: batch[0].numel())
    assert tokens.units_in(batch, 8) == 32


def test_worst_case_defaults_to_a_deterministic_sample():
    workload = _linear_workload()
    first = workload.worst_case(5, torch.device("cpu"))
    second = workload.worst_case(5, torch.device("cpu"))
    assert first[0].shape == (5, 4)
    assert torch.equal(first[0], second[0])


def test_from_objects_builds_a_fresh_optimizer_with_the_users_hyperparameters():
    model = nn.Linear(3, 2)
    user_optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.8, 0.95))
    workload = Workload.from_objects(
        model, user_optimizer, loss=lambda m, b: m(b).sum(),
        make_batch=lambda b, d, g: torch.randn(b, 3, generator=g), reference_batch_size=16,
    )
    assert workload.reference_lr == pytest.approx(3e-4)
    assert workload.optimizer_family == "adam"
    assert workload.build_model(torch.device("cpu")) is model
    built = workload.build_optimizer(model.parameters(), 1e-3)
    assert built is not user_optimizer
    assert built.defaults["betas"] == (0.8, 0.95)
    assert built.defaults["lr"] == 1e-3
    assert user_optimizer.defaults["lr"] == pytest.approx(3e-4)


def test_from_objects_refuses_a_device_mismatch_clearly():
    model = nn.Linear(3, 2)
    workload = Workload.from_objects(
        model, torch.optim.SGD(model.parameters(), lr=0.1), loss=lambda m, b: m(b).sum(),
        make_batch=lambda b, d, g: torch.randn(b, 3), reference_batch_size=16,
    )
    with pytest.raises(UsageError, match="lives on cpu but the device asked for is meta"):
        workload.build_model(torch.device("meta"))


@pytest.fixture()
def entry_module(tmp_path, monkeypatch):
    package = tmp_path / "userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from batchscope import Workload

        def make():
            return Workload(
                name="entry", build_model=lambda d: nn.Linear(2, 1),
                build_optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr),
                loss=lambda m, b: m(b).sum(), make_batch=lambda b, d, g: torch.zeros(b, 2),
                reference_batch_size=8, reference_lr=0.01)

        def not_a_workload():
            return 42

        def needs_arg(x):
            return x

        def misuses_a_type():
            return len(5)  # the user's own TypeError, raised inside their function
    """))
    (package / "broken.py").write_text("import module_that_does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg"
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


def test_entry_point_resolves(entry_module):
    workload = load_entry_point(f"{entry_module}.train:make")
    assert workload.name == "entry"
    assert resolve_workload(f"{entry_module}.train:make").reference_lr == 0.01


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("userpkg.train", "not of the form"),
        ("userpkg.nope:make", "module 'userpkg.nope' not found"),
        ("userpkg.train:missing", "has no attribute 'missing'"),
        ("userpkg.train:not_a_workload", "returned int, not a batchscope.Workload"),
    ],
)
def test_bad_entry_points_are_one_line_usage_errors(entry_module, spec, fragment):
    with pytest.raises(UsageError) as excinfo:
        load_entry_point(spec)
    assert fragment in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_an_import_error_inside_user_code_keeps_its_traceback(entry_module):
    with pytest.raises(ModuleNotFoundError, match="module_that_does_not_exist_xyz"):
        load_entry_point(f"{entry_module}.broken:make")


@pytest.mark.parametrize(
    ("spec", "missing"),
    [("userpkg.train:needs_arg", "x"), ("os.path:join", "a"), ("torch.nn:Linear", "in_features")],
)
def test_an_entry_point_that_needs_arguments_is_a_one_line_usage_error(entry_module, spec, missing):
    with pytest.raises(UsageError) as excinfo:
        load_entry_point(spec)
    assert str(excinfo.value) == (
        f"entry point {spec!r} must be callable with no arguments (missing a required argument: "
        f"{missing!r}); name a function that takes none and returns a batchscope.Workload")


def test_a_type_error_inside_the_users_function_is_theirs_with_its_traceback(entry_module):
    with pytest.raises(TypeError, match="object of type 'int' has no len") as excinfo:
        load_entry_point(f"{entry_module}.train:misuses_a_type")
    assert not isinstance(excinfo.value, UsageError)
    assert excinfo.traceback[-1].name == "misuses_a_type"
