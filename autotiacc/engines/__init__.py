"""Deployment engines outside PyTorch that the execution knob can hand a model to (ONNX Runtime;
more plug in the same way): one module each, registered here by name.

An engine is what a user would otherwise deploy by hand. Its module holds everything about it
in one place: building a runner from the model for a trial, saving the artifact a plan exports,
and loading that artifact in production, so the session measured, the plan applied and the
artifact served are made by the same code with the same options.

Call order: `available()` in the tuner's process (is it searched at all); `build(state, config)`
in the process that builds a candidate (a worker), after the other knobs prepared `state`;
`save(module, inputs, path, config, device)` when a plan exports its artifact; `load(path, entry,
device)` wherever an artifact is served. Engines import their package lazily, inside these
methods: `import autotiacc` never imports them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar


class Engine(ABC):
    """One deployment engine; subclasses are registered with `register_engine`."""

    name: ClassVar[str]  # the execution knob's `backend` value
    artifact_format: ClassVar[str]  # the plan's `extra.artifact.format`
    artifact_file: ClassVar[str]  # the artifact's file name in the run directory
    install_hint: ClassVar[str]  # what to pip install when it is missing

    @abstractmethod
    def available(self) -> bool:
        """Whether the engine's package imports here (it is searched only then)."""

    @abstractmethod
    def build(self, state: Any, config: Any) -> Callable[..., Any]:
        """A callable used like the prepared model `state.model` (torch tensors in and out, on
        `state.device`), built from `state.example_inputs` with the options in `config`."""

    @abstractmethod
    def save(self, module: Any, inputs: tuple, path: Path, config: Any, device: str) -> None:
        """Write the artifact of `module` (precision and layout already applied) to `path`."""

    @abstractmethod
    def load(self, path: Path, entry: dict[str, Any], device: str) -> Callable[..., Any]:
        """A callable over the artifact at `path` (sha256 already checked), run with the options
        recorded in the plan's artifact `entry`, exactly as they were measured."""


_ENGINES: dict[str, Engine] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine known by its `name`."""
    _ENGINES[cls.name] = cls()
    return cls


def engine(name: str) -> Engine | None:
    """The engine behind backend `name`; None for PyTorch's own backends."""
    _load_builtin()
    return _ENGINES.get(name)


def engines() -> dict[str, Engine]:
    _load_builtin()
    return dict(_ENGINES)


def by_format(fmt: str | None) -> Engine | None:
    """The engine whose artifacts have format `fmt`."""
    return next((e for e in engines().values() if e.artifact_format == fmt), None)


def _load_builtin() -> None:
    # explicit, not an import side effect scattered over the package: the built-in engines
    from . import onnxruntime  # noqa: F401
