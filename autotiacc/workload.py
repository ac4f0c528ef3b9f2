"""Load what the user gave (model.py, TorchScript `.pt`/`.ts`, `torch.export` `.pt2`, or an
in-memory module) into one `Workload`: a model factory, example inputs, test data, a metric.

A Workload is picklable: file-backed ones pickle as their spec and reload in the trial
process; in-memory ones carry the module itself.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import ModelRaisedError, WorkloadError

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".pth")
EXPORT_SUFFIXES = (".pt2",)
DEFAULT_TEST_BATCHES = 4
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


def parse_shape(text: str) -> list[int]:
    try:
        dims = [int(x) for x in text.lower().split("x")]
        if not dims or any(d <= 0 for d in dims):
            raise ValueError
        return dims
    except ValueError:
        raise WorkloadError(f"`--input-shape` got {text!r}: use positive sizes joined by 'x', e.g. 1x3x224x224.") from None


def as_input_tuple(value: Any, where: str) -> tuple:
    """The contract says example inputs are a tensor or a tuple of tensors; enforce it."""
    import torch

    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value)
    raise WorkloadError(
        f"{where} returned {type(value).__name__}"
        + (f" of {[type(v).__name__ for v in value]}" if isinstance(value, (tuple, list)) else "")
        + ": it must return a torch.Tensor or a tuple of torch.Tensor."
    )


def _load_module(path: Path):
    name = f"autotiacc_user_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise WorkloadError(f"{path}: cannot be imported as a Python file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses / pickling inside user code need it registered
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise WorkloadError(f"{path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # noqa: BLE001 - the user's import-time failure, reported whole
        del sys.modules[name]
        raise WorkloadError(f"{path}: importing it raised {type(exc).__name__}: {exc}") from exc
    return module


class Workload:
    """One model to tune, however it was given."""

    def __init__(self, *, kind: str, name: str, path: Path | None = None, batch_size: int | None = None,
                 input_shapes: list[list[int]] | None = None, input_dtypes: list[str] | None = None,
                 dims: dict[str, int] | None = None, module: Any = None,
                 inputs: tuple | None = None, test_data: list | None = None,
                 metric: Callable | None = None) -> None:
        self.kind, self.name, self.path = kind, name, path
        self.input_shapes, self.input_dtypes = input_shapes or [], input_dtypes or []
        self.dims = dict(dims or {})
        self.batch_size = batch_size
        self._module, self._inputs, self._test_data, self._metric = module, inputs, test_data, metric
        self._user = None
        # Names this workload in every process it is sent to: a warm worker reuses its builds by it.
        self.token = uuid.uuid4().hex
        if kind == "python":
            self._user = _load_module(path)
            for fn in ("build_model", "example_inputs"):
                if not callable(getattr(self._user, fn, None)):
                    raise WorkloadError(f"{path}: defines no `{fn}()`; a model file must define "
                                        "build_model() and example_inputs(batch_size=1, **dims).")
            if self.batch_size is None:
                self.batch_size = 1

    # -- pickling: file-backed workloads travel as their spec ---------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_user"] = None
        if self.kind != "module":
            state["_module"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.kind == "python":
            self._user = _load_module(self.path)

    # -- the contract ----------------------------------------------------------------------
    def user_hook(self, name: str) -> Callable | None:
        """An optional function of the user's model.py (`traffic`, `pad_inputs`, ...), or None."""
        fn = getattr(self._user, name, None) if self._user is not None else None
        return fn if callable(fn) else None

    def build_model(self):
        """A fresh model in eval mode; seeded so every process builds identical weights."""
        import copy

        import torch

        torch.manual_seed(0)
        if self.kind == "python":
            try:
                model = self._user.build_model()
            except Exception as exc:  # noqa: BLE001
                raise ModelRaisedError(f"{self.path}: build_model() raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(model, torch.nn.Module):
                raise WorkloadError(f"{self.path}: build_model() returned {type(model).__name__}; "
                                    "it must return a torch.nn.Module.")
        elif self.kind == "module":
            model = copy.deepcopy(self._module)
        elif self.kind == "torchscript":
            model = torch.jit.load(str(self.path), map_location="cpu")
        elif self.kind == "export":
            model = torch.export.load(str(self.path)).module()
        else:  # pragma: no cover
            raise WorkloadError(f"unknown workload kind {self.kind!r}")
        if hasattr(model, "eval"):
            try:
                model.eval()
            except (NotImplementedError, RuntimeError):  # exported modules refuse eval()
                pass
        return model

    def example_inputs(self, batch_size: int | None = None, seed: int = 0, **dims: int) -> tuple:
        import torch

        bs = batch_size or self.batch_size or 1
        torch.manual_seed(seed)
        if self.kind == "python":
            try:
                value = self._user.example_inputs(bs, **{**self.dims, **dims})
            except TypeError as exc:
                raise WorkloadError(f"{self.path}: example_inputs(batch_size, **dims) failed: {exc}") from exc
            except Exception as exc:  # noqa: BLE001
                raise ModelRaisedError(f"{self.path}: example_inputs() raised {type(exc).__name__}: {exc}") from exc
            return as_input_tuple(value, f"{self.path}: example_inputs()")
        if self.kind == "module":
            if seed == 0 or not self._inputs:
                return self._inputs
            return tuple(_like(t) for t in self._inputs)
        out = []
        for i, shape in enumerate(self.input_shapes):
            dtype = getattr(torch, self.input_dtypes[i] if i < len(self.input_dtypes) else "float32")
            shape = [bs if batch_size else shape[0]] + list(shape[1:])
            out.append(torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(0, 10, shape, dtype=dtype))
        return tuple(out)

    def test_data(self) -> list[tuple[tuple, Any]]:
        """The user's test data, else seeded example inputs; targets may be None."""
        if self._test_data is not None:
            return [(as_input_tuple(x, "test_data"), y) for x, y in self._test_data]
        fn = self.user_hook("test_data")
        if fn is not None:
            try:
                items: Iterable = fn()
                return [(as_input_tuple(x, f"{self.path}: test_data() item"), y) for x, y in items]
            except (TypeError, ValueError) as exc:
                raise WorkloadError(f"{self.path}: test_data() must yield (inputs, target) pairs: {exc}") from exc
        return [(self.example_inputs(seed=s), None) for s in range(DEFAULT_TEST_BATCHES)]

    @property
    def metric(self) -> Callable | None:
        return self._metric or self.user_hook("metric")

    # -- identity and validation -------------------------------------------------------------
    def identity(self, model=None) -> dict[str, Any]:
        """What a plan records to recognise this workload later."""
        model = model if model is not None else self.build_model()
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        ident = {"name": self.name, "kind": self.kind, "param_shapes_sha256": h.hexdigest()[:16],
                 "input_shapes": [list(t.shape) for t in self.example_inputs()],
                 "input_dtypes": [str(t.dtype).replace("torch.", "") for t in self.example_inputs()],
                 "batch_size": self.batch_size}
        if self.path is not None:
            ident["file"] = str(self.path)
            ident["file_sha256"] = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()
        return ident

    def validate(self) -> tuple[Any, tuple]:
        """Build the model and run it once on its example inputs; a failure is the user's bug,
        reported with the exception message. Returns (model, reference output)."""
        import torch

        model = self.build_model()
        inputs = self.example_inputs()
        try:
            with torch.no_grad():
                out = model(*inputs)
        except Exception as exc:  # noqa: BLE001
            last = traceback.extract_tb(exc.__traceback__)[-1]
            raise ModelRaisedError(
                f"the model raised on its own example inputs: {type(exc).__name__}: {exc} "
                f"(at {Path(last.filename).name}:{last.lineno})") from exc
        return model, out


def _like(t):
    import torch

    if t.is_floating_point():
        return torch.randn_like(t)
    return t.clone()


def load_workload(path: str | Path, *, batch_size: int | None = None, input_shapes: list[str] | None = None,
                  input_dtypes: list[str] | None = None) -> Workload:
    """Open the user's file; every way it can be wrong raises `WorkloadError` with the fix."""
    p = Path(path)
    if not p.exists():
        raise WorkloadError(f"{p}: no such file.")
    if not p.is_file():
        raise WorkloadError(f"{p}: is not a file.")
    if input_dtypes:
        bad = [d for d in input_dtypes if d not in _DTYPES]
        if bad:
            raise WorkloadError(f"`--input-dtype` got {bad[0]!r}: use one of {', '.join(_DTYPES)}.")
    name = p.stem
    if p.suffix == ".py":
        return Workload(kind="python", name=name, path=p.resolve(), batch_size=batch_size)
    if p.suffix in TORCHSCRIPT_SUFFIXES + EXPORT_SUFFIXES:
        if not input_shapes:
            raise WorkloadError(f"{p}: a saved model needs its input shapes: add --input-shape, e.g. 1x3x224x224.")
        kind = "export" if p.suffix in EXPORT_SUFFIXES else "torchscript"
        w = Workload(kind=kind, name=name, path=p.resolve(), batch_size=batch_size,
                     input_shapes=[parse_shape(s) for s in input_shapes], input_dtypes=input_dtypes)
        try:
            w.build_model()
        except Exception as exc:  # noqa: BLE001 - garbage file, wrong format
            hint = ("save it with torch.jit.save(torch.jit.script(m), path)" if kind == "torchscript"
                    else "save it with torch.export.save(torch.export.export(m, args), path)")
            raise WorkloadError(f"{p}: not a readable {'TorchScript archive' if kind == 'torchscript' else 'torch.export program'} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {hint}.") from None
        return w
    raise WorkloadError(f"{p}: unsupported file type {p.suffix!r}; give a model.py, a TorchScript .pt/.ts or a torch.export .pt2.")


def workload_from_module(model, example_inputs, *, test_data=None, metric=None, name: str | None = None) -> Workload:
    """Wrap an in-memory module for `autotiacc.optimize`."""
    inputs = as_input_tuple(example_inputs, "example_inputs")
    bs = inputs[0].shape[0] if inputs[0].dim() else 1
    return Workload(kind="module", name=name or type(model).__name__, module=model, inputs=inputs,
                    test_data=list(test_data) if test_data is not None else None, metric=metric,
                    batch_size=bs)
