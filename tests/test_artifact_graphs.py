"""Artifacts of plans that use CUDA graphs: the artifact entry records them (no saved format holds
a graph) and `load_artifact` captures them again on CUDA, or says on a machine without CUDA that
it runs without them."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

import autotiacc
from autotiacc.errors import HardwareMismatchWarning
from autotiacc.inference.artifacts import cuda_graphs_entry, export_for_plan
from autotiacc.inference.plan import Plan
from autotiacc.inference.workload import load_workload
from autotiacc.knobs import ExecutionConfig, configs_from_params

from .conftest import MODELS

GRAPHED = {"execution": {"backend": "eager", "cuda_graphs": True}}


def _export(tmp_path, values, device="cpu"):
    wl = load_workload(MODELS / "tiny_mlp.py")
    Plan(knobs=configs_from_params(values), device=device).save(tmp_path / "plan.json")
    return wl, export_for_plan(tmp_path, wl)


def test_cuda_graphs_are_recorded_in_the_artifact_entry():
    assert cuda_graphs_entry(ExecutionConfig(backend="torchscript", cuda_graphs=True))["source"] == \
        "cuda_graphs around the torchscript runner"
    for mode in ("reduce-overhead", "max-autotune"):  # torch.compile's own graphs: AOTI packages have none
        assert cuda_graphs_entry(ExecutionConfig(backend="compile", compile_mode=mode))["capture_at_load"]
    for cfg in (ExecutionConfig(), ExecutionConfig(backend="compile", compile_mode="max-autotune-no-cudagraphs")):
        assert cuda_graphs_entry(cfg) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU side: no CUDA to capture on")
def test_graphed_artifact_keeps_the_record_and_runs_without_graphs_on_cpu(tmp_path):
    wl, entry = _export(tmp_path, GRAPHED)
    assert entry["cuda_graphs"]["capture_at_load"] and "eager" in entry["cuda_graphs"]["source"]
    saved = json.loads((tmp_path / "plan.json").read_text())["extra"]["artifact"]
    assert saved["cuda_graphs"] == entry["cuda_graphs"]  # carried through plan.json and read back
    assert autotiacc.load_plan(tmp_path).extra["artifact"]["cuda_graphs"] == entry["cuda_graphs"]
    x = wl.example_inputs()
    with pytest.warns(HardwareMismatchWarning, match="CUDA graph.*exported for cpu.*runs without one"):
        fast = autotiacc.load_artifact(tmp_path)
    assert torch.allclose(fast(*x), wl.build_model()(*x), rtol=1e-4, atol=1e-5)


def test_artifact_without_graphs_records_none_and_loads_quietly(tmp_path):
    wl, entry = _export(tmp_path, {})
    assert "cuda_graphs" not in entry
    with warnings.catch_warnings():
        warnings.simplefilter("error", HardwareMismatchWarning)
        autotiacc.load_artifact(tmp_path)(*wl.example_inputs())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("values", [GRAPHED, {"execution": {"backend": "torchscript", "cuda_graphs": True}}])
def test_graphed_artifact_is_captured_again_on_cuda(tmp_path, values):
    from autotiacc.knobs.cuda_graphs import CUDAGraphRunner

    wl, entry = _export(tmp_path, values, device="cuda")
    fast = autotiacc.load_artifact(tmp_path)
    assert isinstance(fast, CUDAGraphRunner)
    x = tuple(t.cuda() for t in wl.example_inputs())
    ref = wl.build_model().cuda()(*x)
    assert torch.allclose(fast(*x), ref, rtol=1e-3, atol=1e-4) and fast.graphs == 1
