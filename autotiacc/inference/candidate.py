"""Build a candidate from knob configs: the callable a plan's `apply` returns.

The result is used exactly like the model: same inputs, outputs in the model's original
dtype and structure, whatever precision or backend runs inside.
"""
from __future__ import annotations

import contextlib
import copy
import time
import warnings
from typing import Any

from .. import torch_compat
from ..knobs import BuildState, KnobConfig, all_knobs
from ..torch_compat import tree_flatten, tree_unflatten


def _restore(out: Any, like: Any) -> Any:
    """Cast floating tensors of `out` back to the dtypes of the reference output `like`."""
    import torch

    leaves, spec = tree_flatten(out)
    ref_leaves, _ = tree_flatten(like)
    if len(ref_leaves) != len(leaves):
        return out
    fixed = [
        a.to(r.dtype) if isinstance(a, torch.Tensor) and isinstance(r, torch.Tensor)
        and a.is_floating_point() and a.dtype != r.dtype else a
        for a, r in zip(leaves, ref_leaves)
    ]
    return tree_unflatten(fixed, spec)


class OptimizedModel:
    """A model with a plan applied. Call it like the original module.

    Built lazily on the first call when no example inputs were given (tracing and
    compiling need real inputs). `build_seconds` is the time the build and first call took.
    `calibration` (input tuples) and `recorded` (what the plan's build recorded, e.g. int8
    scales) are for engines that calibrate (precision `int8_static`); `reuse_key` lets a
    process that builds many candidates of one model reuse their graphs (`engines.cache`).
    """

    def __init__(self, model: Any, configs: dict[str, KnobConfig], *, example_inputs: tuple | None = None,
                 device: str = "cpu", copy_model: bool = True, calibration: list[tuple] | None = None,
                 recorded: dict[str, Any] | None = None, reuse_key: Any = None) -> None:
        self.original = model
        self.configs = configs
        self.device = device
        self._copy = copy_model
        self._engine_inputs = {"calibration": calibration, "recorded": dict(recorded or {}), "reuse_key": reuse_key}
        self._state: BuildState | None = None
        self._out_like: Any = None
        self.build_seconds = 0.0
        if example_inputs is not None:
            self.build(example_inputs)

    def build(self, example_inputs: tuple) -> "OptimizedModel":
        import torch

        t0 = time.perf_counter()
        # Libraries a build imports may install warning filters for good (sympy, via inductor,
        # does): the caller's filters are theirs, so they are restored after the build.
        with warnings.catch_warnings():
            with torch.no_grad():
                self._out_like = self.original(*example_inputs)  # dtypes/structure to restore
            model = copy.deepcopy(self.original) if self._copy else self.original
            state = BuildState(model=model, example_inputs=tuple(example_inputs), device=self.device,
                               **self._engine_inputs)
            if state.reuse_key is not None:  # the graph-changing configs too (see engines.cache)
                state.reuse_key = (state.reuse_key, *((k.name, k.graph_key(self.configs.get(k.name, k.default())))
                                                      for k in all_knobs()))
            for knob in all_knobs():
                knob.apply(state, self.configs.get(knob.name, knob.default()))
            self._state = state
            self(*example_inputs)  # first call: compilation / autotuning happens here
        self.build_seconds = time.perf_counter() - t0
        return self

    def __call__(self, *inputs: Any) -> Any:
        if self._state is None:
            self.build(inputs)
        state = self._state
        inputs = state.cast_inputs(inputs)
        with contextlib.ExitStack() as stack:
            for make in state.call_contexts:
                stack.enter_context(make())
            out = state.runner(*inputs)
        return _restore(out, self._out_like)

    forward = __call__

    @property
    def notes(self) -> dict[str, Any]:
        return self._state.notes if self._state else {}


def compile_stats() -> dict[str, int]:
    """Dynamo's counters since the last reset: graphs captured, graph breaks, recompiles."""
    return torch_compat.compile_stats()
