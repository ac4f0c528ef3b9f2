"""OpenVINO: the model converted with `openvino.convert_model` and compiled for the CPU plugin with
the openvino knob's properties (`autotiacc.knobs.openvino`); `int8_static` quantizes the converted
model with NNCF (post-training, activation scales calibrated on the test data). The user still
calls a PyTorch callable (torch tensors in and out).

Why `convert_model` and not `torch.compile(backend="openvino")`: it yields the OpenVINO model
itself, which is what NNCF quantizes, what the artifact saves (IR: `.xml` + `.bin`) and what
production loads without torch's compiler stack or Dynamo's guards on every call; the compile
backend keeps OpenVINO behind Dynamo, where neither the IR nor its int8 version can be saved.
Input shapes are fixed at the tuned ones (as the ONNX Runtime session): the CPU plugin then
compiles every kernel for its shapes, the IR is specialised like every other artifact, and traffic
buckets pad to them.

Threads: OpenVINO runs its own pool (TBB), apart from torch's OpenMP threads. In the search a
candidate is timed interleaved with eager torch in one worker, where the two pools may take turns
badly; the final times each candidate alone in its own process (`engine/fidelity.py`), which is
the figure the plan keeps (see experiments/openvino_threads.py for the measured bias).
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path
from typing import Any, Callable

from ..config_io import config_from_dict, config_to_dict
from ..errors import PlanError
from ..torch_compat import tree_unflatten
from .base import Engine, example_io, register_engine, require
from .options import OPENVINO_BACKEND, OpenVINOConfig, openvino_available

INSTALL = "pip install 'autotiacc[openvino]' (openvino; nncf for int8_static)"


def convert(model: Any, inputs: tuple) -> Any:
    """An `openvino.Model` of `model` traced at `inputs`, its input shapes fixed at theirs."""
    import openvino as ov
    import torch

    with torch.no_grad():
        return ov.convert_model(model, example_input=tuple(inputs), input=[tuple(t.shape) for t in inputs])


def _same_signature(batch: tuple, like: tuple) -> bool:
    return len(batch) == len(like) and all(getattr(a, "shape", None) == b.shape and getattr(a, "dtype", None) == b.dtype
                                           for a, b in zip(batch, like))


def calibration_batches(state: Any, inputs: tuple, *, cast: bool = True) -> list[tuple]:
    """The calibration inputs the fixed-shape model can take: those of `state.calibration` with the
    shapes and dtypes of `inputs` (after the candidate's input casts when `cast`), else `inputs` alone."""
    batches = [state.cast_inputs(tuple(b)) if cast else tuple(b) for b in state.calibration or []]
    return [b for b in batches if _same_signature(b, inputs)] or [inputs]


def _model_type(model: Any):
    """NNCF's transformer scheme for models with attention (it keeps softmax and layer norms
    floating, as its documentation recommends for them); None otherwise."""
    import nncf

    names = {type(m).__name__ for m in model.modules()} if hasattr(model, "modules") else set()
    return nncf.ModelType.TRANSFORMER if any(n.endswith("Attention") for n in names) else None


def ignored_patterns(keep_fp32: tuple, prefix: str = "") -> list[str]:
    """NNCF ignored-scope patterns for the nodes of the modules at `keep_fp32`: OpenVINO names a
    node converted from torch `__module.<path>/aten::<op>/...` (`prefix`: where the model sits
    inside a wrapper, e.g. `model.`)."""
    import re

    return [rf"__module\.{re.escape(prefix + path)}(\.|/).*" for path in keep_fp32]


def quantize(ov_model: Any, batches: list[tuple], *, keep_fp32: tuple = (), prefix: str = "", torch_model: Any = None):
    """`ov_model` quantized to int8 by NNCF (post-training, static activation scales from `batches`),
    the modules at `keep_fp32` left floating."""
    try:
        import nncf
    except ImportError as exc:
        raise ImportError(f"precision mode int8_static with backend openvino needs NNCF: {INSTALL}.") from exc
    nncf.set_log_level(logging.ERROR)
    data = nncf.Dataset([[t.detach().cpu().numpy() for t in b] for b in batches])
    scope = nncf.IgnoredScope(patterns=ignored_patterns(keep_fp32, prefix), validate=False) if keep_fp32 else None
    kwargs = {"model_type": kind} if (kind := _model_type(torch_model)) is not None else {}
    with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars, on stdout with no switch
        return nncf.quantize(ov_model, data, subset_size=len(batches), ignored_scope=scope, **kwargs)


@functools.lru_cache(maxsize=1)
def core() -> Any:
    """This process's one `openvino.Core`, kept for its lifetime. Each Core loads its own CPU plugin,
    which installs an alternate signal stack on the calling thread and, when its last compiled
    model is freed, puts back the one it found: plugins freed out of order (a Core per candidate,
    candidates dropped in any order) left the thread on a freed stack, and the next signal handled
    there killed the process (SIGSEGV, si_code SI_KERNEL: pytest died in the NNCF test after ~300
    others)."""
    import openvino as ov

    return ov.Core()


def compiled(ov_model: Any, config: Any) -> Any:
    """`ov_model` (an `openvino.Model` or an IR path) compiled for the CPU plugin with `config`'s properties."""
    model = core().read_model(str(ov_model)) if isinstance(ov_model, (str, Path)) else ov_model
    return core().compile_model(model, "CPU", config.properties())


def runner(compiled_model: Any, device: str, out_spec: Any = None) -> Callable[..., Any]:
    """torch tensors in, torch tensors out (on `device`), in the structure `out_spec` (a pytree
    spec of the model's output; None: one tensor, or a tuple of several). One infer request: calls
    from several threads at once need one runner each."""
    import numpy as np
    import torch

    from ..device import to_device

    request = compiled_model.create_infer_request()
    dev = torch.device(device)

    def run(*args):
        feed = [np.ascontiguousarray(a.detach().cpu().numpy()) for a in args]
        # share_outputs=False: the arrays are copies, not views of buffers the next call overwrites
        result = request.infer(feed, share_inputs=True, share_outputs=False)
        outs = [to_device(torch.from_numpy(np.asarray(o)), dev) for o in result.to_tuple()]
        if out_spec is not None:
            return tree_unflatten(outs, out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    run.compiled = compiled_model  # what it runs, with the properties it was compiled with
    return run


def _options(state: Any) -> Any:
    return (state.engine_options.get(OPENVINO_BACKEND) if state is not None else None) or OpenVINOConfig()


def _openvino_model(model: Any, inputs: tuple, state: Any, *, exported: bool = False) -> Any:
    """`model` converted at `inputs`, quantized when the precision knob asked for int8_static
    (`state.notes`). `exported`: `model` is the deployable wrapper of an export (it casts its
    inputs itself and holds the tuned model at `state.notes["export_scope"]`)."""
    ov_model = convert(model, inputs)
    int8 = state.notes.get("int8_static") if state is not None else None
    if int8 is not None:
        batches = calibration_batches(state, inputs, cast=not exported)
        int8["calibration_batches"] = len(batches)
        scope = state.notes.get("export_scope") if exported else None
        ov_model = quantize(ov_model, batches, keep_fp32=tuple(int8.get("keep_fp32") or ()),
                            prefix=f"{scope}." if scope else "", torch_model=model)
    return ov_model


@register_engine
class OpenVINO(Engine):
    name = "openvino"
    artifact_format = "openvino"
    artifact_file = "artifact.xml"
    install_hint = INSTALL
    static_int8 = True  # NNCF's post-training quantization
    devices = ("cpu",)  # the CPU plugin; OpenVINO's GPU plugin drives Intel GPUs, not CUDA devices

    def available(self) -> bool:
        return openvino_available()

    def companions(self, path: Path) -> list[Path]:
        return [path.with_suffix(".bin")]  # the IR's weights; OpenVINO reads them beside the .xml

    def build(self, state: Any, config: Any) -> Callable[..., Any]:
        require("openvino", self)
        inputs, out_spec = example_io(state)
        return runner(compiled(_openvino_model(state.model, inputs, state), _options(state)), state.device, out_spec)

    def save(self, module: Any, inputs: tuple, path: Path, config: Any, device: str, *,
             state: Any = None) -> dict[str, Any]:
        import openvino as ov

        # f32 weights as measured (save_model compresses them to f16 by default)
        ov.save_model(_openvino_model(module, inputs, state, exported=True), str(path), compress_to_fp16=False)
        return {"engine_options": config_to_dict(_options(state))}  # what `load` compiles with, as measured

    def load(self, path: Path, entry: dict[str, Any], device: str) -> Callable[..., Any]:
        try:
            import openvino  # noqa: F401
        except ImportError:
            raise PlanError(f"{path}: an OpenVINO IR needs openvino: {INSTALL}.") from None
        return runner(compiled(path, options_from_entry(path, entry)), "cpu")


def options_from_entry(path: Path, entry: dict[str, Any]) -> Any:
    """The openvino knob's config recorded in the artifact entry (defaults where it has none)."""
    recorded = entry.get("engine_options")
    if recorded is None:
        return OpenVINOConfig()
    try:
        return config_from_dict(recorded, allowed={"OpenVINOConfig": OpenVINOConfig})
    except PlanError as exc:
        raise PlanError(f"{path}: the plan's `engine_options` for OpenVINO: {exc} Re-export it.") from None
