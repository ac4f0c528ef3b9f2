"""Deployment engines outside PyTorch that the execution knob can hand a model to (ONNX Runtime;
more plug in the same way): one module each, registered here by name.

An engine is what a user would otherwise deploy by hand. Its module holds everything about it
in one place: building a runner from the model for a trial, saving the artifact a plan exports,
and loading that artifact in production, so the session measured, the plan applied and the
artifact served are made by the same code with the same options.

Call order: `available()` in the tuner's process (is it searched at all); `build(state, config)`
in the process that builds a candidate (a worker), after the other knobs prepared `state`;
`save(module, inputs, path, config, device, state=...)` when a plan exports its artifact;
`load(path, entry, device)` wherever an artifact is served. Engines import their package
lazily, inside these methods: `import autotiacc` never imports them.
"""
from __future__ import annotations

from .base import _ENGINES, Engine, register_engine

__all__ = ["Engine", "register_engine", "engine", "engines", "by_format"]


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
