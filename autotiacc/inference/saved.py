"""Saved models (TorchScript `.pt`/`.ts`, `torch.export` `.pt2`): loading them, and messages
that name the cause and the fix when they do not load or do not run on the inputs given.

torch's own messages mislead here: a state_dict handed over as a model is "a corrupted
checkpoint", a `.pt2` exported at batch 1 and run at another batch says only "Guard failed",
and a TorchScript shape error carries a 25-line traceback of serialized code.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import WorkloadError

_TS_LOCATION = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


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


def load_saved(kind: str, path: Path) -> tuple[Any, list[list[Any]] | None]:
    """(module, the input shapes a `.pt2` was exported with; None for TorchScript)."""
    import torch

    try:
        with _quiet_torch_loader():
            if kind == "torchscript":
                return torch.jit.load(str(path), map_location="cpu"), None
            program = torch.export.load(str(path))
            return program.module(), exported_input_shapes(program)
    except Exception as exc:  # noqa: BLE001 - garbage file, wrong format
        raise WorkloadError(unreadable(kind, path, exc)) from None


def exported_input_shapes(program: Any) -> list[list[Any]]:
    """The shapes of the program's user inputs; a dynamic dim shows as its symbol (s0)."""
    names = set(program.graph_signature.user_inputs)
    return [[d if isinstance(d, int) else str(d) for d in node.meta["val"].shape]
            for node in program.graph.nodes if node.op == "placeholder" and node.name in names
            and hasattr(node.meta.get("val"), "shape")]


def unreadable(kind: str, path: Path, exc: Exception) -> str:
    """Why a saved file does not load, and what to give instead."""
    if kind == "torchscript":
        what = _plain_torch_save(path)
        if what:
            return what
    ts = kind == "torchscript"
    hint = ("save it with torch.jit.save(torch.jit.script(m), path)" if ts
            else "save it with torch.export.save(torch.export.export(m, args), path)")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return (f"{path}: not a readable {'TorchScript archive' if ts else 'torch.export program'} "
            f"({type(exc).__name__}: {first[:200]}); {hint}.")


def _plain_torch_save(path: Path) -> str | None:
    """A `torch.save` file instead of a TorchScript archive: a state_dict (read with
    weights_only=True, which runs no code) or a pickled module (never unpickled here)."""
    import pickle
    import zipfile

    import torch

    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: this is something else
        return None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # a damaged archive
            return None
        return (f"{path}: a pickled model (torch.save(model)), not a TorchScript archive; autotiacc does not unpickle "
                "it (that can run any code). Give a model.py whose build_model() loads it, or save it with "
                "torch.jit.save(torch.jit.script(model), path).")
    except Exception:  # noqa: BLE001 - not a torch.save file either: the caller's message stands
        return None
    if isinstance(obj, Mapping):
        tensors = sum(1 for v in obj.values() if isinstance(v, torch.Tensor))
        return (f"{path}: a state_dict ({tensors} tensors of weights), not a model: it holds no code to run. Give a "
                "model.py whose build_model() builds the model and loads it (m = MyModel(); "
                "m.load_state_dict(torch.load(path)); return m) and whose example_inputs(batch_size) makes its inputs.")
    return None


def forward_problem(kind: str, path: Path, message: str, inputs: tuple, exported: list[list[Any]] | None) -> str:
    """A saved model that raised on the inputs built from --input-shape: one line with the
    shapes (and dtypes) it got, where it failed, and the fix."""
    shown = ", ".join("x".join(str(d) for d in t.shape) + " " + str(t.dtype).replace("torch.", "") for t in inputs)
    if kind == "export" and "Guard failed" in message and exported:
        want = ", ".join(str(s) for s in exported)
        fix = " ".join(f"--input-shape {'x'.join(str(d) for d in s)}" for s in exported)
        return (f"{path}: this torch.export program is specialised to the input shapes it was exported with ({want}) "
                f"and got {shown} ({first_line(message)}); re-export it with dynamic dims "
                f"(torch.export.export(m, args, dynamic_shapes=...)), or tune it at those shapes: {fix}.")
    return (f"{path}: the saved model raised on inputs {shown} (from --input-shape, --input-dtype): "
            f"{torchscript_error(message)}; give the shapes (--input-shape, --input-dtype) it takes.")


def torchscript_error(message: str) -> str:
    """The error and where it happened, out of a TorchScript interpreter traceback."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if "Traceback of TorchScript" not in message or not lines:
        return first_line(message)
    places = _TS_LOCATION.findall(message)
    where = f" (at {Path(places[-1][0]).name}:{places[-1][1]} in {places[-1][2]})" if places else ""
    return lines[-1][:300] + where


def first_line(message: str) -> str:
    return (message.strip().splitlines() or [""])[0][:300]
