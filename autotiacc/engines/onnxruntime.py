"""ONNX Runtime: the model exported to ONNX (opset 17) and run in an `InferenceSession`; the user
still calls a PyTorch callable (torch tensors in and out)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Callable

from ..device import is_cuda, to_device
from ..errors import PlanError
from . import Engine, register_engine

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


def session(model: bytes | str | Path, *, threads: int = 0, device: str = "cpu"):
    """An `InferenceSession` with the options the tune measures: all graph optimizations, no
    spinning intra-op threads (spinning ORT threads slowed torch candidates timed beside them 2x
    here), `threads` intra-op threads (0: ORT's default), CUDA's provider first on a CUDA device."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    providers = (["CUDAExecutionProvider"] if is_cuda(device) else []) + ["CPUExecutionProvider"]
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=providers)


def runner(sess, device: str, out_spec: Any = None) -> Callable[..., Any]:
    """torch tensors in, torch tensors out (on `device`), in the structure `out_spec` (a pytree
    spec of the model's output; None: one tensor, or a tuple of several)."""
    import numpy as np
    import torch
    import torch.utils._pytree as pytree

    names = [i.name for i in sess.get_inputs()]
    dev = torch.device(device)

    def run(*args):
        feed = {n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(names, args)}
        outs = [to_device(torch.from_numpy(o), dev) for o in sess.run(None, feed)]
        if out_spec is not None:
            return pytree.tree_unflatten(outs, out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


@register_engine
class OnnxRuntime(Engine):
    name = "onnxruntime"
    artifact_format = "onnx"
    artifact_file = "artifact.onnx"
    install_hint = "pip install onnxruntime (extra: autotiacc[onnx])"

    def available(self) -> bool:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False
        return True

    def build(self, state: Any, config: Any) -> Callable[..., Any]:
        import torch
        import torch.utils._pytree as pytree

        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ImportError(f"backend=onnxruntime needs `{self.install_hint}`.") from exc
        inputs = state.cast_inputs(state.example_inputs)
        with torch.no_grad():
            ref = state.model(*inputs)
        _, out_spec = pytree.tree_flatten(ref)
        buf = io.BytesIO()
        export_onnx(state.model, inputs, buf)
        sess = session(buf.getvalue(), threads=state.notes.get("threads", 0), device=state.device)
        run = runner(sess, state.device, out_spec)
        run.onnx_bytes = len(buf.getvalue())
        return run

    def save(self, module: Any, inputs: tuple, path: Path, config: Any, device: str) -> None:
        export_onnx(module, inputs, str(path))  # the exporter the backend measured with

    def load(self, path: Path, entry: dict[str, Any], device: str) -> Callable[..., Any]:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise PlanError(f"{path}: an ONNX artifact needs onnxruntime: pip install 'autotiacc[onnx]'.") from None
        threads = int((entry.get("runtime") or {}).get("threads") or 0)
        return runner(session(path, threads=threads, device=device), device)
