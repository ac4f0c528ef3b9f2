"""Calibrated static int8 for ONNX Runtime (precision mode `int8_static`): ORT's QDQ quantizer
(`onnxruntime.quantization.quantize_static`) over the fp32 graph the backend exports, with
activation ranges calibrated (MinMax) on the user's test data, or on seeded example inputs
when the model file has none.

Types (ORT's guidance for x86, `quantize_static`'s docstring and the quantization docs): QDQ
format, uint8 activations (asymmetric: a ReLU's output uses all 256 levels) and int8 weights,
one scale per output channel (per-channel keeps convolutions with uneven filters accurate), and
7-bit weights (`reduce_range`) on a CPU without VNNI: there the u8 x s8 multiply (vpmaddubsw)
adds pairs of products into int16, which saturates with full-range weights; a CPU with VNNI
(avx512_vnni, avx_vnni or amx_int8) accumulates in int32 and keeps all 8 bits. The choice is
recorded with the plan (`QuantSettings`), so a plan applied elsewhere quantizes as measured.

Calibration is separate from quantization (`calibrate`), so a process builds it once per graph
and the candidates that differ only in what stays fp32 reuse it (`engines.cache`). The ranges
are recorded in the plan (compact: tensor -> [lowest, highest, dtype]) and replayed through
`quantize_static(calibration_cache_path=...)` where this onnxruntime has it (1.32 does), so
`plan.apply` quantizes with the scales that were measured; an older one calibrates again.

Layers kept in fp32 are module paths (the profile's groups); the legacy exporter names nodes
after the module scopes they were traced in (`/layer2/short/short.0/Conv`), which `module_path`
reads back (`layer2.short.0`). A kept group keeps the nodes that feed it too (`nodes_under`):
a quantized producer would hand it int8-rounded values.
"""
from __future__ import annotations

import inspect
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from .cache import BUILDS

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
MAX_CALIBRATION_BATCHES = 8  # a few batches set MinMax ranges; more cost the budget, not accuracy
QUANT_TYPES = ("QUInt8", "QInt8")


@dataclass(frozen=True)
class QuantSettings:
    per_channel: bool = True
    reduce_range: bool = False
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"

    @classmethod
    def for_this_cpu(cls) -> "QuantSettings":
        from ..hardware import cpu_flags

        return cls(reduce_range=not any(f in cpu_flags() for f in VNNI_FLAGS))

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> "QuantSettings":
        """The settings a plan recorded (typed; anything else is refused), else this CPU's."""
        data = (record or {}).get("settings")
        if not isinstance(data, dict):
            return cls.for_this_cpu()
        from ..errors import PlanError
        from ..config_io import field_type_errors

        wrong = field_type_errors(cls, data) + [f"`{k}` got {data[k]!r}, expected one of {', '.join(QUANT_TYPES)}"
                                                for k in ("activation_type", "weight_type")
                                                if k in data and data[k] not in QUANT_TYPES]
        unknown = sorted(set(data) - set(asdict(cls())))
        if wrong or unknown:
            raise PlanError("int8_static settings: " + "; ".join(wrong + [f"unknown field {k!r}" for k in unknown]))
        return cls(**data)


def recorded_ranges(record: dict[str, Any] | None) -> dict[str, list] | None:
    """The ranges a plan recorded ({tensor: [lowest, highest, dtype]}), checked; None if none."""
    ranges = (record or {}).get("ranges")
    if ranges is None:
        return None
    from ..errors import PlanError
    from ..config_io import matches_type

    bound = float | list[float]
    if not (isinstance(ranges, dict) and all(
            isinstance(v, list) and len(v) == 3 and matches_type(v[0], bound) and matches_type(v[1], bound)
            and v[2] in ("float32", "float16") for v in ranges.values())):
        raise PlanError("`extra.int8_static.ranges` is not {tensor: [lowest, highest, dtype]} as a tune records it; "
                        "re-tune, or delete it to calibrate again.")
    return ranges


def in_scope(ranges: dict[str, list] | None, graph: bytes, scope: str) -> dict[str, list] | None:
    """`ranges` recorded on the candidate's graph, renamed for `graph`, which holds that model
    under the module `scope` (an artifact's wrapper: `/x/Gemm_output_0` is `/model/x/Gemm_output_0`
    there); None when they do not name every float tensor `graph`'s nodes produce (then it calibrates)."""
    if not ranges or not scope:
        return ranges
    import onnx

    inferred = onnx.shape_inference.infer_shapes(onnx.load_from_string(graph)).graph
    floats = {v.name for v in [*inferred.value_info, *inferred.output]
              if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}

    def name(k: str) -> str:  # node outputs `/a/Op_output_0`; parameters `a.weight`; inputs as they are
        return f"/{scope}{k}" if k.startswith("/") else f"{scope}.{k}" if f"{scope}.{k}" in floats else k

    renamed = {name(k): v for k, v in ranges.items()}
    return renamed if floats <= set(renamed) else None


def module_path(node_name: str) -> str:
    """The module path a node of the legacy exporter was traced in: each scope of its name is a
    child's attribute (a container's child is written `parent.index`), the last part the op."""
    scopes = node_name.strip("/").split("/")[:-1]
    return ".".join(s.rsplit(".", 1)[-1] for s in scopes)


# ops that only move data: a kept group's input is traced back through them to its producer
PASS_THROUGH = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Cast"})


def nodes_under(graph: bytes, paths: Iterable[str], *, feeders: bool = False) -> list[str]:
    """Names of the nodes of ONNX `graph` traced inside any of the submodules `paths`. With
    `feeders`, also the nodes that produce their inputs (through data-movement ops): a quantized
    producer hands its consumers dequantized int8 values, so a group kept in fp32 keeps the
    nodes that feed it too (a Mul scaling a Linear's input in the parent module, say)."""
    import onnx

    paths = [p for p in paths if p]
    nodes = onnx.load_from_string(graph).graph.node
    inside = [n for n in nodes if any(module_path(n.name) == p or module_path(n.name).startswith(p + ".")
                                      for p in paths)]
    names = [n.name for n in inside]
    if not feeders:
        return names
    producer = {out: n for n in nodes for out in n.output}
    seen, todo = set(names), [i for n in inside for i in n.input]
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        names.append(node.name)
        if node.op_type in PASS_THROUGH:
            todo.extend(node.input)
    return names


class _Feeds:
    """ORT's CalibrationDataReader over a list of feeds ({input name: array})."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


def _quiet():
    """ORT's quantizer logs advice at WARNING on the root logger (pre-processing, per-channel)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    return root, level


def calibrate(graph: bytes, feeds: list[dict[str, Any]]) -> dict[str, list]:
    """MinMax ranges of every float tensor of `graph` over `feeds`: {tensor: [lowest, highest, dtype]}."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator

    root, level = _quiet()
    try:
        with tempfile.TemporaryDirectory(prefix="autotiacc-calib-") as tmp:
            model = Path(tmp) / "model.onnx"
            model.write_bytes(graph)
            cal = create_calibrator(model, None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                    calibrate_method=CalibrationMethod.MinMax)
            cal.collect_data(_Feeds(feeds))
            ranges = cal.compute_data()
    finally:
        root.setLevel(level)
    return {name: [t.lowest.tolist(), t.highest.tolist(), str(t.lowest.dtype)] for name, t in ranges.data.items()}


def replays_ranges() -> bool:
    """Whether this onnxruntime's quantize_static takes recorded ranges (calibration_cache_path)."""
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


def _cache_file(ranges: dict[str, list], path: Path) -> Path:
    """`ranges` in the JSON form quantize_static's calibration cache reads (TensorsData.to_dict)."""
    def array(values, dtype):
        return {"data": values, "dtype": dtype, "CLS": "numpy.array"}

    data = {name: {"lowest": array(lo, dt), "highest": array(hi, dt), "CLS": "TensorData"}
            for name, (lo, hi, dt) in ranges.items()}
    method = {"CLS": "CalibrationMethod", "value": "CalibrationMethod.MinMax"}
    path.write_text(json.dumps({"CLS": "TensorsData", "data": data, "smooth_quant": False,
                                "calibration_method": method}))
    return path


def quantize(graph: bytes, settings: QuantSettings, *, ranges: dict[str, list] | None = None,
             feeds: list[dict[str, Any]] | None = None, exclude: Iterable[str] = (),
             only: Iterable[str] | None = None) -> bytes:
    """The QDQ int8 graph of fp32 `graph`: scales from `ranges` where this onnxruntime replays
    them, else calibrated on `feeds`. Nodes in `exclude` stay fp32; with `only`, only those
    nodes are quantized (the sensitivity pass quantizes one group at a time)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    root, level = _quiet()
    try:
        with tempfile.TemporaryDirectory(prefix="autotiacc-int8-") as tmp:
            src, out = Path(tmp) / "model.onnx", Path(tmp) / "int8.onnx"
            src.write_bytes(graph)
            kwargs: dict[str, Any] = {}
            if ranges and replays_ranges():
                kwargs["calibration_cache_path"] = str(_cache_file(ranges, Path(tmp) / "calibration.json"))
                reader = None
            elif feeds:
                reader = _Feeds(feeds)
            else:
                raise ValueError("int8_static needs calibration data or recorded ranges this onnxruntime can replay")
            quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=settings.per_channel,
                            reduce_range=settings.reduce_range,
                            activation_type=getattr(QuantType, settings.activation_type),
                            weight_type=getattr(QuantType, settings.weight_type), nodes_to_exclude=list(exclude),
                            nodes_to_quantize=list(only) if only is not None else None, **kwargs)
            return out.read_bytes()
    finally:
        root.setLevel(level)


def feed(names: list[str], args: tuple) -> dict[str, Any]:
    """An ORT feed ({input name: array}) from torch tensors."""
    import numpy as np

    return {n: np.ascontiguousarray(a.detach().cpu().numpy()) for n, a in zip(names, args)}


def static_int8_graph(graph: bytes, key: Any, state: Any, int8: dict[str, Any], *, casts_inputs: bool) -> bytes:
    """fp32 `graph` quantized, the groups in `int8["keep_fp32"]` left in fp32 (or, with
    `int8["only"]`, only those groups quantized); scales replayed from the plan's record
    (`state.recorded`) or calibrated on `state.calibration` (else the example inputs). Records
    what it used in `int8["record"]`. `key`: the graph's reuse key (`engines.cache`), or None.
    `casts_inputs`: the graph applies `state`'s input casts itself (an artifact's wrapper, which
    holds the model under the module `state.notes["export_scope"]`)."""
    recorded = state.recorded.get("int8_static") or {}
    settings = QuantSettings.from_record(recorded)
    scope = state.notes.get("export_scope", "") if casts_inputs else ""
    ranges, feeds = in_scope(recorded_ranges(recorded), graph, scope), None
    if ranges and not replays_ranges():
        import warnings

        warnings.warn("this onnxruntime's quantize_static cannot replay the int8 scales the plan recorded (it has no "
                      "calibration_cache_path); calibrating on the inputs at hand instead, so its accuracy may differ "
                      "from what was measured. Upgrade onnxruntime, or serve the plan's exported artifact.",
                      stacklevel=3)
        ranges = None
    if ranges is None:
        names = [f"input_{i}" for i in range(len(state.example_inputs))]
        batches = (state.calibration or [state.example_inputs])[:MAX_CALIBRATION_BATCHES]
        feeds = [feed(names, tuple(x) if casts_inputs else state.cast_inputs(tuple(x))) for x in batches]
        if replays_ranges():  # calibrated once per graph: the next candidate of it quantizes at once
            ranges = json.loads(BUILDS.data(key and (key, "ranges", len(feeds)),
                                            lambda: json.dumps(calibrate(graph, feeds)).encode()))
    exclude = nodes_under(graph, [f"{scope}.{p}" if scope else p for p in int8.get("keep_fp32", ())], feeders=True)
    only = nodes_under(graph, [f"{scope}.{p}" if scope else p for p in int8["only"]]) if "only" in int8 else None
    out = BUILDS.data(key and (key, "int8", settings, tuple(exclude), only and tuple(only)),
                      lambda: quantize(graph, settings, ranges=ranges, feeds=feeds, exclude=exclude, only=only))
    int8["record"] = {"settings": asdict(settings), "ranges": ranges, "excluded_nodes": len(exclude),
                      "calibrated_on": "recorded ranges" if feeds is None else f"{len(feeds)} batches"}
    return out
