"""Per-layer precision regions: wrap chosen submodules in a lower precision (the `groups` of
the precision knob). Which groups to lower, and in what, is found in autotiacc.profiling.sensitivity.

A group is a submodule path. Lowering wraps it in a `PrecisionRegion`: an autocast region, or
weights cast to bf16/fp16 with inputs cast on the way in, or dynamic int8 for a Linear; floating
outputs are cast back to the group's original dtype, so the layers around it see what they saw before.
"""
from __future__ import annotations

from typing import Any, Iterable

from ..torch_compat import tree_map
from .int8 import quantize_int8_dynamic

# Per-group modes, in the fixed order Optuna sees them (its categorical choices must not change).
GROUP_MODES = ("fp32", "bf16_autocast", "fp16_autocast", "bf16_weights", "fp16_weights", "int8_dynamic")
LOWERED_MODES = GROUP_MODES[1:]

def param_name(path: str) -> str:
    """The Optuna parameter of one group, e.g. `prec[layer3.conv1]`."""
    return f"prec[{path}]"


def is_group_param(name: str) -> bool:
    return name.startswith("prec[") and name.endswith("]")


def _dtype(mode: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode.split("_")[0]]


def _cast_floats(obj: Any, dtype) -> Any:
    import torch

    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t, obj)


def _region_class():
    """Defined lazily so that importing autotiacc does not import torch."""
    import torch

    class PrecisionRegion(torch.nn.Module):
        """Runs `inner` in a lower precision; floating outputs come back in `restore_dtype`."""

        def __init__(self, inner: torch.nn.Module, mode: str, device_type: str) -> None:
            super().__init__()
            self.mode, self.device_type = mode, device_type
            params = [p for p in inner.parameters() if p.is_floating_point()]
            self.restore_dtype = params[0].dtype if params else torch.float32
            if mode.endswith("_weights"):
                inner = inner.to(_dtype(mode))
            elif mode == "int8_dynamic":
                if type(inner) is not torch.nn.Linear:
                    raise ValueError(f"int8_dynamic lowers nn.Linear only, got {type(inner).__name__}")
                inner = quantize_int8_dynamic(torch.nn.Sequential(inner))[0]
            self.inner = inner

        def __getattr__(self, name: str) -> Any:
            # Parents read attributes of their children (nn.TransformerEncoder checks
            # layers[0].self_attn...): answer for the wrapped module.
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(super().__getattr__("inner"), name)

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            if self.mode.endswith("_autocast"):
                with torch.autocast(device_type=self.device_type, dtype=_dtype(self.mode)):
                    out = self.inner(*args, **kwargs)
            elif self.mode.endswith("_weights"):
                dtype = _dtype(self.mode)
                out = self.inner(*_cast_floats(args, dtype), **_cast_floats(kwargs, dtype))
            else:
                out = self.inner(*args, **kwargs)
            return _cast_floats(out, self.restore_dtype)

    return PrecisionRegion


def apply_group_precision(model: Any, groups: Iterable[tuple[str, str]], device: str = "cpu") -> Any:
    """Wrap each (path, mode) submodule of `model` in place; fp32 groups are left alone.

    Raises ValueError naming the group when a path is not a submodule of this model.
    """
    import torch

    region = _region_class()
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    for path, mode in groups:
        if mode == "fp32":
            continue
        if mode not in GROUP_MODES:
            raise ValueError(f"group {path!r} got mode {mode!r}: use one of {', '.join(GROUP_MODES)}.")
        if not path:
            raise ValueError("a precision group needs a submodule path; the whole model is the global `mode`.")
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
            inner = parent.get_submodule(name)
        except (AttributeError, torch.jit.Error) as exc:
            raise ValueError(f"precision group {path!r} is not a submodule of this model ({exc}).") from None
        setattr(parent, name, region(inner, mode, device_type))
    return model
