"""Device handling, proven without a GPU: the `meta` device stands in for CUDA.

A model moved to `meta` runs shape-only forwards, and a tensor on one device meeting weights on
another raises, so "the model stayed on the CPU while the inputs moved" (the first GPU run:
every trial failed) fails these tests through the real trial, profile and training paths.
"""
from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from torch import nn

from autotiacc.inference.candidate import OptimizedModel
from autotiacc.device import (PeakMemory, dist_backend, parse_memory, process_flags, rank_device, read_flags,
                              resolve_device, to_device)
from autotiacc.errors import PlanError, UserInputError
from autotiacc.inference.evaluate import evaluate
from autotiacc.knobs import BuildState, PrecisionConfig, RuntimeConfig, configs_from_params, get_knob
from autotiacc.inference.workload import load_workload, workload_from_module

from .conftest import MODELS, run_cli

QUICK = {"target_s": 0.05, "warmup_s": 0.02}


def _placement():
    w = load_workload(MODELS / "placement.py")
    w._user.CALLS.clear()
    return w, w._user.CALLS


# -- naming and moving ------------------------------------------------------------------------
def test_resolve_device_takes_auto_and_names_the_fix():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu" and resolve_device("meta") == "meta"
    with pytest.raises(UserInputError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(UserInputError, match="got 'meta'"):
        resolve_device("meta", allow_meta=False)
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA device.*--device cpu"):
            resolve_device("cuda:0")
    assert rank_device("cuda", 1) == "cuda:1" and rank_device("cpu", 1) == "cpu"
    assert dist_backend("cuda:1") == "nccl" and dist_backend("cpu") == "gloo"
    assert parse_memory("4GiB") == 4096 and parse_memory("512M") == 512


def test_to_device_moves_modules_inside_containers_not_only_tensors():
    Pair = collections.namedtuple("Pair", "a b")
    model = nn.Linear(2, 2)
    obj = {"model": model, "xs": [torch.ones(1), Pair(torch.zeros(2), 3)], "name": "x"}
    moved = to_device(obj, "meta")
    assert moved["model"].weight.device.type == "meta" and model.weight.device.type == "meta"  # in place
    assert moved["xs"][0].is_meta and moved["xs"][1].a.is_meta and moved["xs"][1].b == 3
    assert isinstance(moved["xs"][1], Pair) and moved["name"] == "x"
    t = torch.ones(3)
    assert to_device(t, "cpu") is t  # already there: no copy


# -- the trial, profile and plan paths -----------------------------------------------------------
def test_evaluate_runs_model_inputs_and_test_data_on_the_target_device():
    """Every call the trial path makes on the user's model has input and weights on `meta`."""
    w, calls = _placement()
    res = evaluate(w, {"eager": {}, "nhwc": {"layout": {"channels_last": True}},
                       "lazy": {"runtime": {"inference_mode": False}}}, device="meta", **QUICK)
    for name, r in res["candidates"].items():
        assert r["status"] == "ok", (name, r.get("reason"))
        assert "accuracy not checked" in r["note"]
    assert calls and {dev for _, dev, _ in calls} == {"meta"}
    assert len({i for i, _, _ in calls}) >= 4  # the baseline and each candidate's own copy


def test_profile_runs_on_the_target_device():
    from autotiacc.profiling.forward import profile_workload

    w, calls = _placement()
    prof = profile_workload(w, device="meta", target_s=0.05)
    assert prof["device"] == "meta" and prof["workload"]["input_shapes"] == [[1, 3, 8, 8]]
    assert calls and {dev for _, dev, _ in calls} == {"meta"}


def test_evaluate_moves_targets_with_outputs_for_the_users_metric():
    """On CPU the metric runs (it raises when outputs and targets sit on different devices)."""
    w, calls = _placement()
    res = evaluate(w, {"eager": {}}, device="cpu", **QUICK)
    r = res["candidates"]["eager"]
    assert r["status"] == "ok", r.get("reason")
    assert r["accuracy"]["metric"] == r["accuracy"]["reference_metric"]


def test_plan_apply_puts_the_model_on_the_plans_device_or_says_why_not(tmp_path):
    from autotiacc.inference.plan import Plan

    model = nn.Sequential(nn.Linear(4, 3))
    fast = Plan(knobs=configs_from_params({}), device="cpu").apply(model, device="meta")
    assert model[0].weight.is_meta and fast(torch.ones(2, 4, device="meta")).shape == (2, 3)
    if not torch.cuda.is_available():
        with pytest.raises(PlanError, match="made for `cuda` and this process has no such device.*device='cpu'"):
            Plan(knobs=configs_from_params({}), device="cuda").apply(nn.Linear(4, 3))
        from autotiacc.inference.verify import verify_plan

        cuda_plan = Plan(knobs=configs_from_params({}), device="cuda").save(tmp_path / "plan.json")
        with pytest.raises(PlanError, match="made for `cuda`"):  # verify says why before measuring anything
            verify_plan(cuda_plan, MODELS / "tiny_mlp.py")


# -- per-candidate process flags -------------------------------------------------------------------
def test_tf32_and_cudnn_benchmark_are_set_per_candidate_and_restored():
    """TF32 and cudnn.benchmark hold inside the candidate's calls only: not in the baseline
    timed beside it, not in the process after it (nor in a user's process after `apply`)."""
    w, calls = _placement()
    before = read_flags()
    values = {"precision": {"mode": "tf32"}, "runtime": {"cudnn_benchmark": True}}
    model = w.build_model()
    cand = OptimizedModel(model, configs_from_params(values), example_inputs=w.example_inputs())
    cand(*w.example_inputs())
    assert read_flags() == before
    mine = [f for i, _, f in calls if i != id(model)]
    theirs = [f for i, _, f in calls if i == id(model)]
    assert mine and all(f["cuda_matmul_tf32"] and f["cudnn_tf32"] and f["cudnn_benchmark"] for f in mine)
    assert theirs and all(f == before for f in theirs)
    res = evaluate(w, {"tf32": values}, device="cpu", **QUICK)
    assert res["candidates"]["tf32"]["status"] == "ok" and read_flags() == before


def test_knob_apply_leaves_process_flags_alone():
    """The knobs' cuda_only filter keeps these out of a CPU search; apply must still be right."""
    before = read_flags()
    state = BuildState(model=nn.Linear(2, 2), example_inputs=(torch.ones(1, 2),))
    get_knob("precision").apply(state, PrecisionConfig(mode="tf32"))
    get_knob("runtime").apply(state, RuntimeConfig(cudnn_benchmark=True))
    assert read_flags() == before
    with process_flags():
        for make in state.call_contexts:
            with make():
                pass
    assert read_flags() == before


def test_process_flags_restore_on_error():
    before = read_flags()
    with pytest.raises(ZeroDivisionError):
        with process_flags(cuda_matmul_tf32=True, float32_matmul_precision="medium"):
            assert read_flags()["float32_matmul_precision"] == "medium"
            raise ZeroDivisionError
    assert read_flags() == before


# -- inference memory ------------------------------------------------------------------------------
def test_every_trial_records_peak_memory_and_max_memory_rejects():
    big = nn.Sequential(nn.Linear(2048, 2048))  # 16 MiB of weights: each candidate copies them
    w = workload_from_module(big, torch.randn(2, 2048))
    res = evaluate(w, {"fits": {}, "too_big": {}}, device="cpu", max_memory_mib=None, **QUICK)
    attrs = res["candidates"]["fits"]["trial_attrs"]
    assert attrs["peak_mem_mib"] >= 12 and attrs["mem_source"].startswith("process RSS")
    res = evaluate(w, {"limited": {}}, device="cpu", max_memory_mib=4.0, **QUICK)
    r = res["candidates"]["limited"]
    assert r["status"] == "rejected" and "over --max-memory 4 MiB" in r["reason"]
    with PeakMemory("meta") as pm:
        pass
    assert pm.peak_mib == 0.0 and pm.source == "none"


# -- training ------------------------------------------------------------------------------------
TRAIN_PLACED = '''
import torch
from torch import nn
from torch.utils.data import Dataset

batch_size = 4
SEEN = []


class Data(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), i % 2


def build_model():
    return nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))


def train_dataset():
    return Data()


def loss_fn(model, batch):
    x, y = batch
    w = next(model.parameters()).device
    if x.device != w or y.device != w:
        raise RuntimeError(f"batch on {x.device}/{y.device}, weights on {w}")
    SEEN.append(str(w))
    return nn.functional.cross_entropy(model(x), y)


def eval_fn(model):
    return float(model(torch.ones(2, 3, 4, 4)).sum())  # data built on the CPU: wrong on any other device
'''


def _train_workload(tmp_path: Path):
    from autotiacc.training.workload import load_train_workload

    p = tmp_path / "train_placed.py"
    p.write_text(TRAIN_PLACED)
    return load_train_workload(p)


def test_training_trial_path_moves_batches_and_optimizer_to_the_device(tmp_path):
    from autotiacc.training import ComputeConfig, DataConfig, TrainConfig
    from autotiacc.training.trial import _Run, split_figures

    wl = _train_workload(tmp_path)
    cfg = TrainConfig(data=DataConfig(num_workers=1), compute=ComputeConfig(channels_last=True, micro_batches=2))
    run = _Run(wl, cfg, wl.train_dataset(), wl.batch_size, 0, device="meta")
    run.window(2)()
    figures = split_figures(run, 2, 2, "meta")
    assert figures["bound"] in ("compute", "data loading")
    assert wl._user.SEEN and set(wl._user.SEEN) == {"meta"}
    assert all(s["momentum_buffer"].is_meta for s in run.opt.state.values() if s.get("momentum_buffer") is not None)


def test_training_apply_moves_model_and_optimizer_state(tmp_path):
    from autotiacc.training import TrainConfig, apply

    wl = _train_workload(tmp_path)
    model = wl.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.zero_grad()
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()  # state on the CPU, as after loading a checkpoint
    _, _, loader, step = apply(TrainConfig(), model, opt, wl.train_dataset(), wl.loss_fn, batch_size=4,
                               device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert all(s["momentum_buffer"].is_meta for s in opt.state.values())
    assert step(next(iter(loader))).is_meta and set(wl._user.SEEN) == {"meta"}


def test_a_failing_eval_fn_is_recorded_not_fatal(tmp_path):
    """eval_fn only feeds the report: one that builds CPU data for a GPU model must not fail the
    baseline (that is how the first GPU training tune ended)."""
    from autotiacc.training.trial import run_eval

    wl = _train_workload(tmp_path)
    model = to_device(wl.build_model(), "meta")
    out = run_eval(wl.eval_fn, model)
    assert "eval_fn raised" in out["eval_error"] and "on meta" in out["eval_error"]
    assert model.training  # put back in train mode
    assert "eval_metric" in run_eval(wl.eval_fn, wl.build_model())


def test_training_stage1_leads_with_gpu_wins_on_cuda():
    from autotiacc.engine.space import seeds, strategy_for
    from autotiacc.knobs.base import all_knobs
    from autotiacc.training.config import train_context

    strategy, knobs = strategy_for("training", "training"), all_knobs("training")

    def first(device, has_conv):
        ctx = train_context(cores=2, nproc=1, device=device, has_conv=has_conv, fused_ok=True, compile=True)
        return seeds(strategy, knobs, ctx)[1]  # after the baseline

    gpu = first("cuda", True)
    assert gpu["data.pin_memory"] is True and gpu["precision.mode"] == "bf16"
    assert gpu["compute.channels_last"] is True and gpu["compute.optimizer_impl"] == "fused"
    assert first("cuda", False)["compute.channels_last"] is False  # the NHWC entry is skipped without convs
    assert first("cpu", True)["data.pin_memory"] is False


# -- the command line ----------------------------------------------------------------------------
def test_cli_env_shows_the_gpu_or_says_there_is_none_and_bad_device_flags_are_one_line():
    r = run_cli("env")
    assert r.returncode == 0, r.stderr
    assert ("- gpu: no CUDA device" in r.stdout) != ("- gpu0:" in r.stdout)
    r = run_cli("tune", str(MODELS / "tiny_mlp.py"), "--device", "tpu", "--budget", "1m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "`--device` got 'tpu'" in r.stderr
    r = run_cli("tune", str(MODELS / "tiny_mlp.py"), "--max-memory", "lots", "--budget", "1m")
    assert r.returncode == 2 and "`--max-memory` got 'lots'" in r.stderr


WIDE = '''
import torch
from torch import nn


def build_model():
    return nn.Sequential(nn.Linear(2048, 2048))  # 16 MiB of weights


def example_inputs(batch_size=2):
    return (torch.randn(batch_size, 2048),)
'''


def test_max_memory_below_the_baseline_is_refused_and_an_all_failed_run_still_renders(tmp_path):
    """--max-memory below what the baseline itself needs (a copy of its 16 MiB of weights, as its
    trial builds it) is refused before anything is written, naming the need: every trial would
    be rejected and the plan would be the baseline, over the limit (it wrote one, exit 0). A run
    whose every trial failed still gets its report (it crashed with KeyError 'speedup')."""
    import json
    import re

    import pandas as pd

    from autotiacc.report import write_report

    model = tmp_path / "wide.py"
    model.write_text(WIDE)
    out = tmp_path / "run"
    r = run_cli("tune", str(model), "--budget", "40s", "--strategy", str(MODELS / "short_strategy.yaml"),
                "--max-memory", "4MiB", "--device", "auto", "--out", str(out), "--quiet", timeout=240)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    need = re.search(r"`--max-memory` of 4 MiB is below what the baseline itself needs: ([0-9.]+) MiB peak on "
                     + resolve_device("auto"), r.stderr)
    assert need and float(need.group(1)) >= 12, r.stderr
    assert not out.exists()
    failed = tmp_path / "failed"  # what such a run recorded: every trial rejected over the limit
    failed.mkdir()
    (failed / "run.json").write_text(json.dumps({"workload": {"name": "wide"}, "sessions": []}))
    pd.DataFrame([{"number": n, "label": label, "status": "rejected", "peak_mem_mib": 17.0,
                   "reason": "peak memory 17 MiB on cpu (process RSS high-water mark) is over --max-memory 4 MiB"}
                  for n, label in enumerate(["baseline (eager fp32)", "torchscript"])]).to_csv(failed / "trials.csv",
                                                                                         index=False)
    write_report(failed)
    report = (failed / "report.md").read_text()
    assert "No trial was measured successfully" in report and "over --max-memory" in report
    assert (failed / "report.html").exists()
