"""Load what the user gave (model.py, TorchScript `.pt`/`.ts`, `torch.export` `.pt2`, or an
in-memory module) into one `Workload`: a model factory, example inputs, test data, a metric.

A Workload is picklable: file-backed ones pickle as their spec and reload in the trial
process; in-memory ones carry the module itself. A model.py is imported lazily, on first use.

The user's code can hang, exit or crash the process, or keep it alive. `Workload.check(timeout=...)`
(and `load_workload(..., timeout=...)`) run the up-front check of the whole contract
(`contract.py`) in a child killed after `timeout` seconds; a checked workload answers the
tuner's questions from what the child reported (`facts`), so the tuner's process never imports
the user's file (`engine.usercode`).
"""
from __future__ import annotations

import functools
import hashlib
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

from ..engine.usercode import Stage, load_module, one_line, reported, run_user_code
from ..errors import BudgetError, ModelRaisedError, UserCodeTimeout, WorkloadError
from ..plan_file import INPUT_DTYPES
from .accuracy import DEFAULT_TOLERANCE, tensor_leaves
from .contract import FIRST_FORWARD, ModelFacts, check_contract
from .saved import load_saved

TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".pth")
EXPORT_SUFFIXES = (".pt2",)
DEFAULT_TEST_BATCHES = 4


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


CHECK_TIMEOUT_S = 300.0  # load + one pass of the contract when no budget bounds it (profile, verify)


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
        self.exported_shapes: list | None = None  # a .pt2's input shapes, once loaded (in the process that loads it)
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

    def default_bench(self) -> Any:
        """The bench (`engine.bench.Bench`) the engine times this workload's variants with when
        the task names no other: its example inputs, checked against the eager reference."""
        from .one_shape import OneShape

        return OneShape()

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
            except Exception as exc:
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
        model, self.exported_shapes = load_saved(self.kind, self.path)
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
            except Exception as exc:
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

    @property
    def has_test_data(self) -> bool:
        return self._test_data is not None or self.user_hook("test_data") is not None

    def test_data(self) -> list[tuple[tuple, Any]]:
        """The user's test data, else seeded example inputs; targets may be None. Test data
        with no batch is refused: the accuracy guard would compare nothing and pass anything."""
        fn = self.user_hook("test_data") if self._test_data is None else None
        if self._test_data is None and fn is None:
            return [(self.example_inputs(seed=s), None) for s in range(DEFAULT_TEST_BATCHES)]
        where = "`test_data`" if fn is None else f"{self.path}: test_data()"
        try:
            items: Iterable = self._test_data if fn is None else fn()
            batches = [(as_input_tuple(x, f"{where} item"), y) for x, y in items]
        except (TypeError, ValueError) as exc:
            raise WorkloadError(f"{where} must yield (inputs, target) pairs: {exc}") from exc
        if not batches:
            raise WorkloadError(f"{where} gave no batch, so the accuracy guard would compare nothing and pass any "
                                "candidate; give at least one (inputs, target) pair, or drop test_data to check on "
                                "seeded example_inputs.")
        return batches

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

    def run_once(self, model, inputs: tuple, what: str = "its own example inputs") -> Any:
        """One forward on `inputs`; the user's exception becomes `ModelRaisedError`, an output
        with no tensor in it a `WorkloadError` (the accuracy guard would compare nothing)."""
        import torch

        try:
            with torch.no_grad():
                out = model(*inputs)
        except Exception as exc:
            last = traceback.extract_tb(exc.__traceback__)[-1]
            raise ModelRaisedError(
                f"the model raised on {what}: {type(exc).__name__}: {one_line(exc)} "
                f"(at {Path(last.filename).name}:{last.lineno})") from exc
        if not tensor_leaves(out):
            raise WorkloadError(f"{self.path or self.name}: the model returned {type(out).__name__} with no tensor in "
                                "it; forward() must return a tensor (or tensors) for the accuracy check to compare.")
        return out

    def check(self, *, timeout: float, limit: str = "", device: str = "cpu",
              tolerance: float = DEFAULT_TOLERANCE[1], budget_s: float | None = None) -> ModelFacts:
        """The up-front check of the whole contract (`contract.check_contract`) on `device`, in a
        child killed after `timeout` s; the user's errors, `sys.exit`, `os._exit`, crashes and
        hangs become one clear error. `limit` says where the timeout came from (e.g. "the 20 s
        --budget"); `tolerance` is the accuracy guard's, which the baseline must pass. With the
        tune's `budget_s`, a model whose forward ran but whose check outlasted the budget is a
        budget too small (`BudgetError`, naming one that fits), not a hang."""
        limit = limit or (f"the {budget_s:.0f} s --budget" if budget_s is not None else "")
        try:
            value, _ = run_user_code(_checked, self, device, tolerance, where=self.path or self.name, timeout=timeout,
                                     limit=limit, stage="importing it, building the model and running it on its "
                                     "example inputs and test data")
        except UserCodeTimeout as exc:
            forward_s = _forward_seconds(exc.stages)
            if budget_s is None or forward_s is None:
                raise
            raise BudgetError(_too_small_to_check(budget_s, forward_s, timeout)) from None
        self.facts = ModelFacts(**value)
        self.check_s = self.facts.first_run_s
        return self.facts

    def validate(self, *, timeout: float = CHECK_TIMEOUT_S, limit: str = "", device: str = "cpu",
                 tolerance: float = DEFAULT_TOLERANCE[1], budget_s: float | None = None) -> ModelFacts:
        """The facts of one checked run (see `check`); checks only once per workload."""
        if self.facts is None:
            self.check(timeout=timeout, limit=limit, device=device, tolerance=tolerance, budget_s=budget_s)
        return self.facts

    def hook_defined(self, name: str) -> bool:
        """Whether the file defines the optional hook `name`: from the check's facts once checked
        (the tuner's process never imports the file), else by importing it here."""
        if self.facts is not None:
            return name in self.facts.hooks
        return self.user_hook(name) is not None

    def in_child(self, fn: Callable[..., Any], *args: Any, stage: str, timeout: float = CHECK_TIMEOUT_S) -> Any:
        """`fn(self, *args)`, which runs the user's code: in a child once this workload was
        checked in one (the tuner's process), else here (library use: the caller's own process)."""
        if self.facts is None:
            return fn(self, *args)
        where = self.path or self.name
        value, _ = run_user_code(functools.partial(reported, fn, where=where, stage=stage), self, *args, where=where,
                                 stage=stage, timeout=timeout)
        return value


def _forward_seconds(stages: list[tuple[float, str]]) -> float | None:
    """How long the first forward took in a stopped check, if it finished."""
    for (t, stage), (after, _) in zip(stages, stages[1:]):
        if stage == FIRST_FORWARD:
            return after - t
    return None


def _too_small_to_check(budget_s: float, forward_s: float, ran_s: float) -> str:
    from ..durations import suggest_budget

    # a trial warms up and times the baseline beside a candidate; the final re-builds each in fresh processes
    trial_s, final_s = 10 * forward_s + 5, 20 * forward_s + 15
    return (f"`--budget` of {budget_s:.0f}s is too small for this model: one forward takes {forward_s:.1f}s here, and "
            f"checking its contract (a forward on each test batch, the baseline built as its trial builds it) ran "
            f"{ran_s:.0f}s, to the end of the budget, before the baseline could be measured; give --budget "
            f"{suggest_budget(setup_s=ran_s + 10 * forward_s, trial_s=trial_s, final_s=final_s)} or more.")


def _checked(workload: Workload, device: str, tolerance: float) -> dict[str, Any]:
    """Runs in the child of `Workload.check`: the contract check, its failures as one message."""
    stage = Stage()
    return reported(check_contract, workload, device, tolerance, stage, where=workload.path or workload.name,
                    stage=stage)


def _like(t):
    import torch

    if t.is_floating_point():
        return torch.randn_like(t)
    return t.clone()


def load_workload(path: str | Path, *, batch_size: int | None = None, input_shapes: list[str] | None = None,
                  input_dtypes: list[str] | None = None, timeout: float | None = None, limit: str = "",
                  device: str = "cpu", tolerance: float = DEFAULT_TOLERANCE[1],
                  budget_s: float | None = None) -> Workload:
    """Open the user's file; every way it can be wrong raises `WorkloadError` with the fix.

    With `timeout`, nothing of the file runs in this process: its whole contract is checked in a
    child (`Workload.check`, on `device`, with the guard's `tolerance`) killed after `timeout` s.
    Without, a model.py is imported here (library use, in the caller's own process)."""
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
        w.check(timeout=timeout, limit=limit, device=device, tolerance=tolerance, budget_s=budget_s)
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
