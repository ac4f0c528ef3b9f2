"""The options configs of the engines: what the `ort` and `openvino` knobs search and a plan
records, and what each engine builds, saves and loads with. They live with the engines (the knobs
import them) so that an engine reads its own options without importing the knobs above it."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from ..config_io import MAX_THREADS, KnobConfig, check_choice

GRAPH_OPTIMIZATIONS = ("all", "extended", "basic", "disabled")  # ORT_ENABLE_ALL ... ORT_DISABLE_ALL
EXECUTION_MODES = ("sequential", "parallel")
PRECISIONS = ("f32", "bf16")
HINTS = ("LATENCY", "THROUGHPUT")
ORT_BACKEND = "onnxruntime"
OPENVINO_BACKEND = "openvino"


@dataclass(frozen=True)
class OrtConfig(KnobConfig):
    """ONNX Runtime session options; the defaults are what every session had before this knob
    (spinning off, all graph optimizations, ORT's defaults otherwise), so older plans behave as
    they were measured."""

    spinning: bool = False  # session.intra_op / inter_op.allow_spinning
    inter_threads: int = 0  # 0: ORT's default; used by the parallel execution mode only
    graph_optimization: str = "all"
    execution_mode: str = "sequential"
    memory_pattern: bool = True  # enable_mem_pattern: plan allocations from the first run's shapes
    cpu_arena: bool = True  # enable_cpu_mem_arena

    def __post_init__(self) -> None:
        check_choice("graph_optimization", self.graph_optimization, GRAPH_OPTIMIZATIONS)
        check_choice("execution_mode", self.execution_mode, EXECUTION_MODES)
        if not 0 <= self.inter_threads <= MAX_THREADS:
            raise ValueError(f"`inter_threads` got {self.inter_threads}: use 0 (ORT's default) or a positive count "
                             f"up to {MAX_THREADS}.")


@dataclass(frozen=True)
class OpenVINOConfig(KnobConfig):
    inference_precision: str = "f32"
    performance_hint: str = "LATENCY"
    num_streams: int = 0  # 0: the performance hint decides
    num_threads: int = 0  # 0: OpenVINO's default (every core it may use)

    def __post_init__(self) -> None:
        check_choice("inference_precision", self.inference_precision, PRECISIONS,
                     " (int8 is the precision knob's int8_static mode)")
        check_choice("performance_hint", self.performance_hint, HINTS)
        for name in ("num_streams", "num_threads"):
            value = getattr(self, name)
            if not 0 <= value <= MAX_THREADS:  # beyond any machine: a typo or a corrupt plan
                raise ValueError(f"`{name}` got {value}: use 0 (the hint decides) or a count up to {MAX_THREADS}.")

    def properties(self) -> dict[str, str]:
        """The compile properties of OpenVINO's CPU plugin that this config sets."""
        props = {"INFERENCE_PRECISION_HINT": self.inference_precision, "PERFORMANCE_HINT": self.performance_hint}
        if self.num_streams:
            props["NUM_STREAMS"] = str(self.num_streams)
        if self.num_threads:
            props["INFERENCE_NUM_THREADS"] = str(self.num_threads)
        return props


def openvino_available() -> bool:
    """Whether openvino can be imported here (looked up, not imported)."""
    return importlib.util.find_spec("openvino") is not None
