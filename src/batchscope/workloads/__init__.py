"""Built-in workloads, looked up by name.

    get_workload("resnet18-cifar10")                  # the seed workload
    get_workload("small-cnn-cifar10", train_size=2000)
    list_workloads()                                  # names, summaries, reference settings

Listing never touches data: each entry carries its reference settings statically. Getting a
workload locates its data (a few file checks, `DataNotFoundError` when absent) but decodes
nothing until the first batch. Further workloads can be added with `register`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from batchscope.errors import UsageError
from batchscope.workload import Workload
from batchscope.workloads import resnet18_cifar10 as _resnet18
from batchscope.workloads import small_cnn_cifar10 as _small_cnn

WorkloadFactory = Callable[..., Workload]


@dataclass(frozen=True)
class WorkloadEntry:
    """A registered workload: its factory and what can be said about it without building it."""

    name: str
    factory: WorkloadFactory
    summary: str
    reference: Mapping[str, Any] = field(default_factory=dict)

    def option_names(self) -> tuple[str, ...] | None:
        """The keyword options the factory takes; None when it accepts any (`**kwargs`)."""
        parameters = inspect.signature(self.factory).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return tuple(
            p.name
            for p in parameters
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        )

    def listing(self) -> dict[str, Any]:
        options = self.option_names()
        return {
            "name": self.name,
            "summary": self.summary,
            "options": list(options) if options is not None else None,
            **self.reference,
        }


class WorkloadRegistry:
    """Name -> workload factory. The package keeps one with the built-ins; tests and plugins
    may build their own."""

    def __init__(self) -> None:
        self._entries: dict[str, WorkloadEntry] = {}

    def register(
        self,
        name: str,
        factory: WorkloadFactory,
        *,
        summary: str = "",
        reference: Mapping[str, Any] | None = None,
        replace: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name or ":" in name or name != name.strip():
            raise UsageError(
                f"workload name {name!r} must be a non-empty string without ':' or surrounding "
                f"spaces (':' marks a module:function entry point)"
            )
        if not callable(factory):
            raise UsageError(f"workload {name!r}: factory {factory!r} is not callable")
        if name in self._entries and not replace:
            raise UsageError(
                f"workload {name!r} is already registered; pass replace=True to replace it"
            )
        self._entries[name] = WorkloadEntry(name, factory, summary, dict(reference or {}))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, name: str) -> WorkloadEntry:
        if name not in self._entries:
            raise UsageError(
                f"unknown workload {name!r}; available: {', '.join(self.names())} "
                f"(or give a package.module:function entry point)"
            )
        return self._entries[name]

    def get(self, name: str, **options: Any) -> Workload:
        entry = self.entry(name)
        accepted = entry.option_names()
        if accepted is not None:
            unknown = sorted(set(options) - set(accepted))
            if unknown:
                raise UsageError(
                    f"workload {name!r} has no option {', '.join(map(repr, unknown))}; it "
                    f"accepts: {', '.join(accepted) if accepted else 'no options'}"
                )
        workload = entry.factory(**options)
        if not isinstance(workload, Workload):
            raise UsageError(
                f"workload {name!r}: factory returned {type(workload).__name__}, not a "
                f"batchscope.Workload"
            )
        return workload

    def listing(self) -> list[dict[str, Any]]:
        return [self._entries[name].listing() for name in self.names()]


def _builtin_registry() -> WorkloadRegistry:
    registry = WorkloadRegistry()
    for module in (_resnet18, _small_cnn):
        factory = getattr(module, module.NAME.replace("-", "_"))
        registry.register(module.NAME, factory, summary=module.SUMMARY, reference=module.REFERENCE)
    return registry


_REGISTRY = _builtin_registry()


def get_workload(name: str, **options: Any) -> Workload:
    """The built-in (or registered) workload `name`, built with `options`."""
    return _REGISTRY.get(name, **options)


def list_workloads() -> list[dict[str, Any]]:
    """Every registered workload: name, summary, options and reference settings (cheap: no
    data is read)."""
    return _REGISTRY.listing()


def register(
    name: str,
    factory: WorkloadFactory,
    *,
    summary: str = "",
    reference: Mapping[str, Any] | None = None,
    replace: bool = False,
) -> None:
    """Make `factory(**options) -> Workload` available to `get_workload(name)` and the CLI."""
    _REGISTRY.register(name, factory, summary=summary, reference=reference, replace=replace)


__all__ = [
    "WorkloadEntry",
    "WorkloadRegistry",
    "get_workload",
    "list_workloads",
    "register",
]
