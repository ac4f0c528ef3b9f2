"""The `Engine` interface and the registry engines add themselves to (`autotiacc.engines` looks
them up; the engines' modules import only this one, so no engine imports the package that lists it)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..torch_compat import tree_flatten


@dataclass
class BuildState:
    """A candidate under construction; knobs mutate it in ascending `Knob.order`.

    `input_casts` transform each input tensor per call; `build_contexts` wrap tracing or
    compiling; `call_contexts` wrap every call; the execution knob sets `runner` last.
    """

    model: Any
    example_inputs: tuple
    device: str = "cpu"
    input_casts: list[Callable[[Any], Any]] = field(default_factory=list)
    build_contexts: list[Callable[[], Any]] = field(default_factory=list)
    call_contexts: list[Callable[[], Any]] = field(default_factory=list)
    runner: Callable[..., Any] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    # engine name -> its options knob's config (`autotiacc.engines`: e.g. the `ort` knob's)
    engine_options: dict[str, Any] = field(default_factory=dict)
    # input tuples an engine calibrates int8 scales on (the test data); None: `example_inputs`
    calibration: list[tuple] | None = None
    # what an earlier build of this plan recorded for the engine to replay (int8 scales)
    recorded: dict[str, Any] = field(default_factory=dict)
    # set by a process that builds many candidates of one model (a trial worker): engines may
    # reuse what they built for an earlier candidate with this key and the same graph (exports)
    reuse_key: Any = None

    def cast_inputs(self, inputs: tuple) -> tuple:
        for cast in self.input_casts:
            inputs = tuple(cast(t) for t in inputs)
        return inputs


class Engine(ABC):
    """One deployment engine; subclasses are registered with `register_engine`."""

    name: ClassVar[str]  # the execution knob's `backend` value
    artifact_format: ClassVar[str]  # the plan's `extra.artifact.format`
    artifact_file: ClassVar[str]  # the artifact's file name in the run directory
    install_hint: ClassVar[str]  # what to pip install when it is missing
    static_int8: ClassVar[bool] = False  # builds the precision knob's `int8_static` (its own quantizer)
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")  # device types it is searched on
    # its runner serves the input shapes it was built at only (traffic buckets must pad to them)
    fixed_shapes: ClassVar[bool] = True

    def companions(self, path: Path) -> list[Path]:
        """Files `save` writes beside the artifact at `path`, which loading needs (hashed and
        checked with it)."""
        return []

    @abstractmethod
    def available(self) -> bool:
        """Whether the engine's package imports here (it is searched only then)."""

    @abstractmethod
    def build(self, state: Any, config: Any) -> Callable[..., Any]:
        """A callable used like the prepared model `state.model` (torch tensors in and out, on
        `state.device`), built from `state.example_inputs` with the options in `config`."""

    @abstractmethod
    def save(self, module: Any, inputs: tuple, path: Path, config: Any, device: str, *,
             state: Any = None) -> dict[str, Any] | None:
        """Write the artifact of `module` (precision and layout already applied) to `path`;
        `state` is the `BuildState` the other knobs prepared (engine options, int8 notes, the
        calibration data). Returns fields for the plan's artifact entry (e.g. the options the
        artifact must be loaded with), or None."""

    @abstractmethod
    def load(self, path: Path, entry: dict[str, Any], device: str) -> Callable[..., Any]:
        """A callable over the artifact at `path` (sha256 already checked), run with the options
        recorded in the plan's artifact `entry`, exactly as they were measured."""


def require(package: str, eng: Engine) -> None:
    """Import `package` or raise an ImportError that says what to install for backend `eng.name`."""
    import importlib

    try:
        importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(f"backend={eng.name} needs `{eng.install_hint}`.") from exc


def example_io(state: Any) -> tuple[tuple, Any]:
    """`state`'s example inputs after its input casts, and the pytree spec of the model's output
    at them (the structure an engine's runner returns its outputs in)."""
    import torch

    inputs = state.cast_inputs(state.example_inputs)
    with torch.no_grad():
        _, spec = tree_flatten(state.model(*inputs))
    return inputs, spec


_ENGINES: dict[str, Engine] = {}


def register_engine(cls: type[Engine]) -> type[Engine]:
    """Class decorator: make an engine known by its `name`."""
    _ENGINES[cls.name] = cls()
    return cls
