"""Optimization knobs; importing this package registers the built-in ones."""
from .base import (BuildState, Knob, KnobConfig, SearchContext, all_knobs, config_from_dict,
                   config_to_dict, configs_from_params, describe, get_knob, register)
from .execution import ExecutionConfig, ExecutionKnob
from .layout import LayoutConfig, LayoutKnob
from .ort import OrtConfig, OrtKnob
from .precision import PrecisionConfig, PrecisionKnob
from .runtime import RuntimeConfig, RuntimeKnob

__all__ = [
    "BuildState", "Knob", "KnobConfig", "SearchContext", "all_knobs", "config_from_dict", "config_to_dict",
    "configs_from_params", "describe", "get_knob", "register", "ExecutionConfig", "ExecutionKnob",
    "LayoutConfig", "LayoutKnob", "OrtConfig", "OrtKnob", "PrecisionConfig", "PrecisionKnob", "RuntimeConfig",
    "RuntimeKnob",
]
