"""Load what the user gave (model.py, TorchScript `.pt`/`.ts`, `torch.export` `.pt2`, or an
in-memory module) into one `Workload`: a model factory, example inputs, test data, a metric.

A Workload is picklable: file-backed ones pickle as their spec and reload in the trial
process; in-memory ones carry the module itself. A model.py is imported lazily, on first use.

The user's code can hang, exit or crash the process. `Workload.check(timeout=...)` (and
`load_workload(..., timeout=...)`) import, build and run the model once in a spawned child
that is killed after `timeout` seconds, so the first run of the user's code happens there.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import sys
import traceback
import types
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import errors
from ..errors import AutotiaccError, ModelRaisedError, WorkloadError
from ..knobs.int8 import has_linear

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".pth")
EXPORT_SUFFIXES = (".pt2",)
DEFAULT_TEST_BATCHES = 4
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "bool")


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


def load_module(path: Path) -> types.ModuleType:
    """Import the user's Python file once per path (inference and training workloads share it)."""
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
    except SystemExit as exc:
        del sys.modules[name]
        raise WorkloadError(f"{path}: importing it called sys.exit({exc.code!r}); {_NO_EXIT}") from None
    return module


_NO_EXIT = ("a model file must define functions, not end the process: put script code under "
            "`if __name__ == \"__main__\":`.")
CHECK_TIMEOUT_S = 300.0  # load + one forward when no budget bounds it (profile, verify)


@dataclass
class ModelFacts:
    """What one run of the user's code in a child found: enough to set up a search."""

    identity: dict[str, Any]
    module_names: list[str]
    has_conv: bool
    output: str  # e.g. "Tensor[2, 3]"
    has_linear: bool = False  # the int8 precision modes lower nn.Linear layers


@contextlib.contextmanager
def _quiet_torch_loader():
    """torch.export.load logs a traceback before raising on a corrupt file; the error we raise
    from it says everything that matters."""
    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


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
        self._user_module = None
        self.facts: ModelFacts | None = None
        self.check_s = 0.0  # seconds the check took in its child: build, one forward (not the process's start)
        # Names this workload in every process it is sent to: a warm worker reuses its builds by it.
        self.token = uuid.uuid4().hex
        if kind == "python" and self.batch_size is None:
            self.batch_size = 1

    @property
    def _user(self):
        """The user's model.py as a module, imported on first use and checked for the contract."""
        if self.kind != "python":
            return None
        if self._user_module is None:
            module = load_module(self.path)
            for fn in ("build_model", "example_inputs"):
                if not callable(getattr(module, fn, None)):
                    raise WorkloadError(f"{self.path}: defines no `{fn}()`; a model file must define "
                                        "build_model() and example_inputs(batch_size=1, **dims).")
            self._user_module = module
        return self._user_module

    # -- pickling: file-backed workloads travel as their spec ---------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_user_module"] = None  # the child imports the file itself, lazily
        if self.kind != "module":
            state["_module"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

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
        elif self.kind in ("torchscript", "export"):
            model = self._load_saved()
        else:  # pragma: no cover
            raise WorkloadError(f"unknown workload kind {self.kind!r}")
        if hasattr(model, "eval"):
            try:
                model.eval()
            except (NotImplementedError, RuntimeError):  # exported modules refuse eval()
                pass
        return model

    def _load_saved(self):
        import torch

        try:
            with _quiet_torch_loader():
                if self.kind == "torchscript":
                    return torch.jit.load(str(self.path), map_location="cpu")
                return torch.export.load(str(self.path)).module()
        except Exception as exc:  # noqa: BLE001 - garbage file, wrong format
            ts = self.kind == "torchscript"
            hint = ("save it with torch.jit.save(torch.jit.script(m), path)" if ts
                    else "save it with torch.export.save(torch.export.export(m, args), path)")
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise WorkloadError(f"{self.path}: not a readable {'TorchScript archive' if ts else 'torch.export program'} "
                                f"({type(exc).__name__}: {first}); {hint}.") from None

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

    def run_once(self, model, inputs: tuple) -> Any:
        """One forward on `inputs`; the user's exception becomes `ModelRaisedError`, an output
        with no tensor in it a `WorkloadError` (the accuracy guard would compare nothing)."""
        import torch

        try:
            with torch.no_grad():
                out = model(*inputs)
        except Exception as exc:  # noqa: BLE001
            last = traceback.extract_tb(exc.__traceback__)[-1]
            raise ModelRaisedError(
                f"the model raised on its own example inputs: {type(exc).__name__}: {exc} "
                f"(at {Path(last.filename).name}:{last.lineno})") from exc
        if not _tensor_leaves(out):
            raise WorkloadError(f"{self.path or self.name}: the model returned {type(out).__name__} with no tensor in "
                                "it; forward() must return a tensor (or tensors) for the accuracy check to compare.")
        return out

    def check(self, *, timeout: float, limit: str = "") -> ModelFacts:
        """Import, build and run the model once in a spawned child killed after `timeout` s;
        the user's errors, `sys.exit`, `os._exit`, crashes and hangs become one clear error.
        `limit` says where the timeout came from (e.g. "the 20 s --budget")."""
        value, seconds = run_user_code(_probe, self, where=self.path or self.name, timeout=timeout, limit=limit,
                                       stage="importing it, building the model and running it once on its example inputs")
        self.facts, self.check_s = ModelFacts(**value), seconds
        return self.facts

    def validate(self, *, timeout: float = CHECK_TIMEOUT_S, limit: str = "") -> ModelFacts:
        """The facts of one checked run (see `check`); checks only once per workload."""
        return self.facts if self.facts is not None else self.check(timeout=timeout, limit=limit)


def run_user_code(probe: Callable[..., dict[str, Any]], *args: Any, where: Any, stage: str, timeout: float,
                  limit: str = "") -> tuple[dict[str, Any], float]:
    """Run `probe(*args)` (the first run of a user's file) in a child killed after `timeout` s.

    `probe` returns facts, or {"error": AutotiaccError subclass name, "message"}; those, hangs,
    `sys.exit`/`os._exit` and crashes become one clear error. Returns (facts, the probe's own
    seconds in the child)."""
    import os
    import tempfile

    from ..engine.workers import run_isolated

    fd, log = tempfile.mkstemp(prefix="autotiacc-check-", suffix=".log")
    os.close(fd)
    try:  # the child's output goes to a log: a torch loader's logged traceback is noise here
        outcome = run_isolated(probe, *args, timeout=timeout, log_path=log)
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-1:] if not outcome.ok else []
    finally:
        os.unlink(log)
    if outcome.ok and "error" in outcome.value:
        cls = getattr(errors, outcome.value["error"], WorkloadError)
        raise cls(outcome.value["message"])
    if outcome.ok:
        return outcome.value, outcome.call_s or outcome.seconds
    if outcome.status == "timeout":
        raise WorkloadError(f"{where}: {stage} did not finish within {timeout:.0f} s"
                            + (f" ({limit})" if limit else "") + " and was stopped; look for an endless loop or "
                            "a blocking call (sleep, input(), a lock) in it, or allow more time.")
    if outcome.status == "exception":  # raised outside the probe: the arguments did not reach the child
        raise WorkloadError(f"{where}: could not be sent to a child process to run ({outcome.error}).")
    raise WorkloadError(f"{where}: the process ended while {stage} ({outcome.error}"
                        + (f"; last output: {tail[0][:200]}" if tail else "")
                        + f"): os._exit() or a crash in native code; {_NO_EXIT}")


def _tensor_leaves(out: Any) -> list:
    import torch
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_flatten(out)[0] if isinstance(x, torch.Tensor)]


def _probe(workload: Workload) -> dict[str, Any]:
    """Runs in the child of `Workload.check`: the first run of the user's code."""
    import torch

    stage = "importing it"
    try:
        _ = workload._user
        stage = "build_model()"
        model = workload.build_model()
        stage = "example_inputs()"
        inputs = workload.example_inputs()
        stage = "forward() on its example inputs"
        out = workload.run_once(model, inputs)
        stage = "reading its parameters"
        names = [n for n, _ in model.named_modules()] if hasattr(model, "named_modules") else []
        if workload.kind in ("torchscript", "export"):
            has_conv = any("conv" in str(getattr(m, "original_name", type(m).__name__)).lower() for m in model.modules())
        else:
            has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) if hasattr(model, "modules") else False
        leaves = _tensor_leaves(out)
        output = ", ".join(f"Tensor{list(t.shape)}" for t in leaves[:4]) + (" ..." if len(leaves) > 4 else "")
        facts = asdict(ModelFacts(identity=workload.identity(model), module_names=names, has_conv=has_conv,
                                  output=output, has_linear=has_linear(model)))
        stage = "traffic()"  # the tuner calls it in its own process: prove here that it returns
        traffic = workload.user_hook("traffic")
        if traffic is not None:
            try:
                traffic()
            except Exception:  # noqa: BLE001 - its errors are reported with the traffic checks' messages
                pass
        return facts
    except AutotiaccError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    except Exception as exc:  # noqa: BLE001 - anything else of the user's code, with where it happened
        return {"error": "WorkloadError", "message": f"{workload.path or workload.name}: {stage} raised "
                f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    except SystemExit as exc:
        return {"error": "WorkloadError",
                "message": f"{workload.path or workload.name}: {stage} called sys.exit({exc.code!r}); {_NO_EXIT}"}


def _like(t):
    import torch

    if t.is_floating_point():
        return torch.randn_like(t)
    return t.clone()


def load_workload(path: str | Path, *, batch_size: int | None = None, input_shapes: list[str] | None = None,
                  input_dtypes: list[str] | None = None, timeout: float | None = None, limit: str = "") -> Workload:
    """Open the user's file; every way it can be wrong raises `WorkloadError` with the fix.

    With `timeout`, nothing of the file runs in this process: it is imported, built and run once
    in a child (`Workload.check`) killed after `timeout` s. Without, a model.py is imported here."""
    p = Path(path)
    if not p.exists():
        raise WorkloadError(f"{p}: no such file.")
    if not p.is_file():
        raise WorkloadError(f"{p}: is not a file.")
    if input_dtypes:
        bad = [d for d in input_dtypes if d not in INPUT_DTYPES]
        if bad:
            raise WorkloadError(f"`--input-dtype` got {bad[0]!r}: use one of {', '.join(INPUT_DTYPES)}.")
    name = p.stem
    if p.suffix == ".py":
        w = Workload(kind="python", name=name, path=p.resolve(), batch_size=batch_size)
    elif p.suffix in TORCHSCRIPT_SUFFIXES + EXPORT_SUFFIXES:
        if not input_shapes:
            raise WorkloadError(f"{p}: a saved model needs its input shapes: add --input-shape, e.g. 1x3x224x224.")
        kind = "export" if p.suffix in EXPORT_SUFFIXES else "torchscript"
        w = Workload(kind=kind, name=name, path=p.resolve(), batch_size=batch_size,
                     input_shapes=[parse_shape(s) for s in input_shapes], input_dtypes=input_dtypes)
    else:
        raise WorkloadError(f"{p}: unsupported file type {p.suffix!r}; give a model.py, a TorchScript .pt/.ts or a "
                            "torch.export .pt2.")
    if timeout is not None:
        w.check(timeout=timeout, limit=limit)
    elif w.kind == "python":
        _ = w._user  # import now: its errors belong to loading
    else:
        w.build_model()  # a garbage file fails here, not at the first trial
    return w


def workload_from_module(model, example_inputs, *, test_data=None, metric=None, name: str | None = None) -> Workload:
    """Wrap an in-memory module for `autotiacc.optimize`."""
    inputs = as_input_tuple(example_inputs, "example_inputs")
    bs = inputs[0].shape[0] if inputs[0].dim() else 1
    return Workload(kind="module", name=name or type(model).__name__, module=model, inputs=inputs,
                    test_data=list(test_data) if test_data is not None else None, metric=metric,
                    batch_size=bs)
