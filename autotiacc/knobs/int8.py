"""int8 weights for `nn.Linear` layers: the two ways this torch offers, behind one place.

- `int8_dynamic`: torch.ao's dynamic quantization (`quantize_dynamic`): int8 weights (one scale
  per tensor) and activations quantized per call, run by fbgemm/qnnpack kernels on the **CPU
  only**. Built into torch, no extra dependency; torch marks `torch.ao.quantization` deprecated
  in favour of torchao (the warning is silenced here: when torch drops it, the candidate fails at
  build and the tune records why).
- `int8_weights`: weight-only int8 (one scale per output channel; activations stay floating) by
  torchao's `Int8WeightOnlyConfig`, on CPU and CUDA. torchao is an optional extra
  (`pip install 'autotiacc[quant]'`), imported only when this mode is built.

Neither is assumed fast: on a CPU without VNNI, or at large batch, int8 may lose to fp32. The
tuner measures them and the accuracy guard checks them like every other candidate.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any


def torchao_available() -> bool:
    """Whether torchao can be imported here (looked up, not imported: importing it costs seconds)."""
    return importlib.util.find_spec("torchao") is not None


def has_linear(model: Any) -> bool:
    """Whether `model` has an `nn.Linear` (TorchScript modules: by their original name)."""
    import torch

    modules = model.modules() if hasattr(model, "modules") else []
    return any(isinstance(m, torch.nn.Linear) or getattr(m, "original_name", None) == "Linear" for m in modules)


def quantize_int8_dynamic(module: Any) -> Any:
    """`module` with every `nn.Linear` replaced by torch.ao's dynamic int8 Linear (a new module)."""
    import torch

    with warnings.catch_warnings():  # torch.ao.quantization is marked for migration to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)


def quantize_int8_weights(module: Any) -> Any:
    """`module` with the weights of every `nn.Linear` stored as int8 (torchao, in place)."""
    # torchao logs, at import, the native kernels it cannot load on this machine, and torch warns
    # about one of its pytree registrations: neither concerns the candidate
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ImportError("precision mode int8_weights needs torchao: pip install 'autotiacc[quant]' "
                          "(or torchao), or drop int8_weights from the strategy.") from exc
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    quantize_(module, Int8WeightOnlyConfig())
    return module
