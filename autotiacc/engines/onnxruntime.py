"""ONNX Runtime: the model exported to ONNX (opset 17) and run in an `InferenceSession`; the user
still calls a PyTorch callable (torch tensors in and out)."""
from __future__ import annotations

import io
import weakref
from pathlib import Path
from typing import Any, Callable

from ..config_io import config_from_dict, config_to_dict
from ..device import is_cuda, to_device
from ..errors import PlanError
from ..torch_compat import tree_flatten, tree_unflatten
from .base import BuildState, Engine, register_engine
from .cache import BUILDS
from .options import OrtConfig
from .ort_int8 import feed

OPSET = 17


def export_onnx(model: Any, inputs: tuple, target: Any) -> list[str]:
    """Export `model` at `inputs` to `target` (a path or a binary file) with the legacy exporter;
    returns the input names."""
    import torch

    names = [f"input_{i}" for i in range(len(inputs))]
    # nn.TransformerEncoder's fused fast path (`_transformer_encoder_layer_fwd`) has no ONNX
    # export: trace the equivalent composite ops instead; the session fuses them itself.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(model, inputs, target, dynamo=False, input_names=names, opset_version=OPSET,
                              do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return names


def _export_bytes(model: Any, inputs: tuple) -> bytes:
    buf = io.BytesIO()
    export_onnx(model, inputs, buf)
    return buf.getvalue()


_MODEL_TOKENS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()  # int8_outputs' models


def model_graph(model: Any, inputs: tuple, state: Any = None, *, casts_inputs: bool = False) -> bytes:
    """The ONNX graph the session runs: `model` exported at `inputs` (fp32, or whatever precision
    the other knobs gave it), quantized to static int8 when the precision knob asked for it
    (`state.notes["int8_static"]`). `casts_inputs`: `model` applies `state`'s input casts itself
    (an artifact's wrapper), so calibration feeds it raw inputs. A worker reuses the export and
    the calibration across candidates of one graph (`engines.cache`, keyed by `state.reuse_key`)."""
    key = None
    if state is not None and state.reuse_key is not None:
        key = ("onnx", OPSET, state.reuse_key, [(tuple(t.shape), str(t.dtype)) for t in inputs])
    graph = BUILDS.data(key, lambda: _export_bytes(model, inputs))
    int8 = (state.notes.get("int8_static") if state is not None else None)
    if int8 is None:
        return graph
    from .ort_int8 import static_int8_graph

    return static_int8_graph(graph, key, state, int8, casts_inputs=casts_inputs)


GRAPH_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
                "disabled": "ORT_DISABLE_ALL"}
SPINNING = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def session_options(options: Any = None, *, threads: int = 0):
    """`SessionOptions` from the `ort` knob's config (`engines.options.OrtConfig`; None: its defaults,
    which are what every session had before it: all graph optimizations, no spinning threads)
    and the runtime knob's `threads` (intra-op; 0: ORT's default)."""
    import onnxruntime as ort

    options = options or OrtConfig()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_LEVELS[options.graph_optimization])
    opts.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if options.execution_mode == "parallel"
                           else ort.ExecutionMode.ORT_SEQUENTIAL)
    opts.enable_mem_pattern = options.memory_pattern
    opts.enable_cpu_mem_arena = options.cpu_arena
    for entry in SPINNING:
        opts.add_session_config_entry(entry, "1" if options.spinning else "0")
    if threads:
        opts.intra_op_num_threads = threads
    if options.inter_threads:
        opts.inter_op_num_threads = options.inter_threads
    return opts


def session(model: bytes | str | Path, *, threads: int = 0, device: str = "cpu", options: Any = None):
    """An `InferenceSession` with `session_options(options, threads=threads)`, CUDA's provider
    first on a CUDA device."""
    import onnxruntime as ort

    providers = (["CUDAExecutionProvider"] if is_cuda(device) else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model),
                                session_options(options, threads=threads), providers=providers)


def session_summary(sess) -> dict[str, Any]:
    """The options a live session really has (read back from it, not from what was asked)."""
    opts = sess.get_session_options()
    levels = {v: k for k, v in GRAPH_LEVELS.items()}
    return {"intra_threads": opts.intra_op_num_threads, "inter_threads": opts.inter_op_num_threads,
            "graph_optimization": levels.get(opts.graph_optimization_level.name, opts.graph_optimization_level.name),
            "execution_mode": "parallel" if opts.execution_mode.name == "ORT_PARALLEL" else "sequential",
            "memory_pattern": opts.enable_mem_pattern, "cpu_arena": opts.enable_cpu_mem_arena,
            "spinning": opts.get_session_config_entry(SPINNING[0]) != "0", "providers": sess.get_providers()}


def runner(sess, device: str, out_spec: Any = None) -> Callable[..., Any]:
    """torch tensors in, torch tensors out (on `device`), in the structure `out_spec` (a pytree
    spec of the model's output; None: one tensor, or a tuple of several)."""
    import torch

    names = [i.name for i in sess.get_inputs()]
    dev = torch.device(device)

    def run(*args):
        outs = [to_device(torch.from_numpy(o), dev) for o in sess.run(None, feed(names, args))]
        if out_spec is not None:
            return tree_unflatten(outs, out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    run.session = sess  # what it runs with: `session_summary(run.session)`
    return run


@register_engine
class OnnxRuntime(Engine):
    name = "onnxruntime"
    artifact_format = "onnx"
    artifact_file = "artifact.onnx"
    install_hint = "pip install onnxruntime (extra: autotiacc[onnx])"
    static_int8 = True  # QDQ, calibrated: engines.ort_int8

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def build(self, state: Any, config: Any) -> Callable[..., Any]:
        import torch

        self._need_package(ImportError)
        inputs = state.cast_inputs(state.example_inputs)
        with torch.no_grad():
            ref = state.model(*inputs)
        _, out_spec = tree_flatten(ref)
        graph = model_graph(state.model, inputs, state)
        sess = session(graph, threads=state.notes.get("threads", 0), device=state.device,
                       options=state.engine_options.get(self.name))
        state.notes["session"] = session_summary(sess)
        run = runner(sess, state.device, out_spec)
        run.onnx_bytes = len(graph)
        return run

    def save(self, module: Any, inputs: tuple, path: Path, config: Any, device: str, *,
             state: Any = None) -> dict[str, Any]:
        Path(path).write_bytes(model_graph(module, inputs, state, casts_inputs=True))  # the graph the backend measured
        options = (state.engine_options.get(self.name) if state is not None else None) or OrtConfig()
        entry = {"engine_options": config_to_dict(options)}
        int8 = (state.notes.get("int8_static") or {}).get("record") if state is not None else None
        if int8:  # the scales are in the file; what it was quantized with, for a person to read
            entry["int8_static"] = {k: v for k, v in int8.items() if k != "ranges"}
        return entry

    def load(self, path: Path, entry: dict[str, Any], device: str) -> Callable[..., Any]:
        self._need_package(PlanError, f"{path}: an ONNX artifact")
        threads = int((entry.get("runtime") or {}).get("threads") or 0)
        options = entry.get("engine_options")  # absent in artifacts older than the `ort` knob: its defaults
        options = config_from_dict(options, {"OrtConfig": OrtConfig}) if options is not None else OrtConfig()
        return runner(session(path, threads=threads, device=device, options=options), device)

    def int8_outputs(self, model: Any, batches: list[tuple], paths: list[str]) -> list[Any]:
        """`model`'s outputs on `batches` with only the submodules `paths` in static int8,
        calibrated on `batches` (the sensitivity pass lowers one group at a time); the export
        and the calibration are made once per model in this process (`engines.cache`)."""
        import uuid

        import torch

        token = _MODEL_TOKENS.setdefault(model, uuid.uuid4().hex)  # never a reused id()
        state = BuildState(model=model, example_inputs=tuple(batches[0]), calibration=batches,
                           reuse_key=("int8_outputs", token), notes={"int8_static": {"only": list(paths)}})
        with torch.no_grad():
            _, spec = tree_flatten(model(*batches[0]))
        run = runner(session(model_graph(model, tuple(batches[0]), state)), "cpu", spec)
        return [run(*x) for x in batches]

    def _need_package(self, error: type[Exception], what: str = "backend=onnxruntime") -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise error(f"{what} needs onnxruntime: {self.install_hint}.") from None
