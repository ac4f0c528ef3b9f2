"""Seeds that follow the hardware: the CPU flags (injected with AUTOTIACC_CPU_FLAGS, both ways:
this machine has avx512_bf16) or the GPU's compute capability say which reduced types run
natively; stage 1 and the per-layer analysis take those first, and say what they moved."""
from __future__ import annotations

import json

import optuna
import pytest

from autotiacc.errors import UserInputError
from autotiacc.hardware import FLAGS_ENV, fingerprint
from autotiacc.knobs.precision_groups import LOWERED_MODES
from autotiacc.profiling.sensitivity import analysis_order
from autotiacc.inference.task import stage_one
from autotiacc.knobs import SearchContext
from autotiacc.native_precision import cuda_types, native_types
from autotiacc.strategy import load_strategy

from .conftest import run_cli

AVX2_ONLY = "avx,avx2,fma"  # the AMD EPYC (Zen 3) of issue 19
WITH_BF16 = "avx,avx2,fma,avx512f,avx512_bf16,avx512_vnni"
REDUCED = ("bf16", "fp16")


def _cpu_ctx(**extras) -> SearchContext:
    ctx = SearchContext(device="cpu", level=1, cores=2, has_conv=True, onnxruntime=True, has_linear=True)
    ctx.extras.update(extras)
    return ctx


def _stage_one(monkeypatch, flags: str, ctx: SearchContext | None = None):
    monkeypatch.setenv(FLAGS_ENV, flags)
    return stage_one(load_strategy("inference-latency"), ctx or _cpu_ctx(), native_types(fingerprint("cpu")))


def _reduced(params: dict) -> bool:
    return any(str(v).startswith(REDUCED) for k, v in params.items() if k == "mode" or k.startswith("prec["))


def test_on_a_cpu_without_bf16_units_stage_one_leads_with_native_candidates(monkeypatch):
    # per-layer starting points (Optuna params) are ordered with the strategy's seeds
    layer = {"precision_fp32": {"prec[body]": "fp32"},
             "precision_enqueue": [{"prec[body]": "bf16_autocast"}, {"prec[body]": "int8_dynamic"}]}
    params, moved = _stage_one(monkeypatch, AVX2_ONLY, _cpu_ctx(**layer))
    first_reduced = next(i for i, p in enumerate(params) if _reduced(p))
    assert first_reduced >= 6 and all(_reduced(p) for p in params[first_reduced:])  # native ones all first
    assert params[0]["backend"] == "eager" and params[0]["mode"] == "fp32"  # the baseline stays first
    assert {"prec[body]": "int8_dynamic"}.items() <= params[first_reduced - 1].items()
    assert len(moved) == sum(map(_reduced, params))  # moved, not removed
    assert {"seed": "mode=bf16_autocast", "why": ["bf16: this CPU has no avx512_bf16/amx_bf16"]} in moved
    assert {"seed": "per-layer prec[body]=bf16_autocast", "why": ["bf16: this CPU has no avx512_bf16/amx_bf16"]} \
        in moved
    assert any(m["why"] == ["fp16: this CPU has no avx512_fp16/amx_fp16"] for m in moved)

    with_bf16, moved_bf16 = _stage_one(monkeypatch, WITH_BF16, _cpu_ctx(**layer))
    assert with_bf16 != params and sorted(map(json.dumps, with_bf16)) == sorted(map(json.dumps, params))
    assert any(p["mode"] == "bf16_autocast" for p in with_bf16[:6])  # the strategy's order: bf16 is 4th
    assert [m["seed"] for m in moved_bf16] == ["mode=fp16_autocast"]  # no avx512_fp16 either way


def test_fingerprint_honours_injected_flags_and_refuses_unknown_names(monkeypatch):
    monkeypatch.setenv(FLAGS_ENV, "avx2 avx,amx_bf16")
    fp = fingerprint("cpu")
    assert fp["cpu_flags"] == ["avx", "avx2", "amx_bf16"] and fp["cpu_flags_source"] == FLAGS_ENV
    assert native_types(fp).runs("bf16") and not native_types(fp).runs("fp16")
    monkeypatch.setenv(FLAGS_ENV, "")
    assert fingerprint("cpu")["cpu_flags"] == [] and native_types(fingerprint("cpu")).lacking(["int8_dynamic"])
    monkeypatch.setenv(FLAGS_ENV, "avx2,avx512bf16")
    with pytest.raises(UserInputError, match=r"AUTOTIACC_CPU_FLAGS.*avx512bf16.*avx512_bf16"):
        fingerprint("cpu")
    monkeypatch.delenv(FLAGS_ENV)
    assert "cpu_flags_source" not in fingerprint("cpu")


def test_arm_flags_and_gpu_capabilities_name_their_own_units():
    arm = native_types({"device": "cpu", "cpu_flags": ["asimd", "asimdhp", "asimddp"]})
    assert arm.runs("fp16") and arm.runs("int8") and arm.why_not("bf16") == "bf16: this CPU has no bf16"
    t4, a100 = cuda_types(7, 5), cuda_types(8, 0)
    assert t4.runs("fp16") and t4.runs("int8") and not t4.runs("fp8")
    assert t4.lacking(["bf16_weights", "fp16_weights", "tf32", "int8_weights"]) == [
        "bf16: this GPU (sm75) has no bf16 tensor cores (sm80+)", "tf32: this GPU (sm75) has no tf32 tensor cores (sm80+)"]
    assert a100.lacking(["bf16_weights", "tf32"]) == [] and not cuda_types(6, 0).runs("fp16")
    assert native_types({"device": "cuda", "capability": "7.5", "cpu_flags": ["avx512_bf16"]}) == t4
    # on a T4 the CUDA seeds that compute in bf16 or TF32 go last; the fp16 ones keep their place
    ctx = SearchContext(device="cuda", level=1, cores=2, has_conv=True)
    params, moved = stage_one(load_strategy("inference-latency"), ctx, t4)
    modes = [p["mode"] for p in params]
    assert {"bf16_weights", "tf32"} == set(modes[-len(moved):]) and len(moved) >= 3
    assert not {"bf16_weights", "tf32"} & set(modes[:-len(moved)]) and modes[2] == "fp16_weights"


def test_per_layer_analysis_checks_the_native_types_first(monkeypatch):
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    assert analysis_order(LOWERED_MODES, "cpu") == [
        "int8_dynamic", "bf16_autocast", "bf16_weights", "fp16_autocast", "fp16_weights"]
    monkeypatch.setenv(FLAGS_ENV, WITH_BF16)
    assert analysis_order(LOWERED_MODES, "cpu") == [
        "bf16_autocast", "bf16_weights", "int8_dynamic", "fp16_autocast", "fp16_weights"]
    monkeypatch.setenv(FLAGS_ENV, WITH_BF16 + ",avx512_fp16")  # a Sapphire Rapids: fp16 is native there
    assert analysis_order(LOWERED_MODES, "cpu") == list(LOWERED_MODES)


@pytest.mark.slow
def test_a_tune_on_a_cpu_without_bf16_units_measures_native_seeds_first_and_says_why(tmp_path, models_dir,
                                                                                    monkeypatch):
    """The real CLI, flags injected: the study's stage-1 queue (every enqueued trial, run or not)
    holds the bf16/fp16 seeds after all native ones; run.json, the plan and the report say why."""
    monkeypatch.setenv(FLAGS_ENV, AVX2_ONLY)
    out = tmp_path / "run"
    res = run_cli("tune", str(models_dir / "tiny_mlp.py"), "--budget", "30s", "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name="autotiacc", storage=f"sqlite:///{out / 'study.db'}")
    queued = [t for t in sorted(study.trials, key=lambda t: t.number) if "fixed_params" in t.system_attrs]
    stage = [t.system_attrs["fixed_params"]["mode"] for t in queued]  # stage 1 in order: run or still waiting
    first_reduced = next(i for i, m in enumerate(stage) if m.startswith(REDUCED))
    assert first_reduced >= 5 and all(m.startswith(REDUCED) for m in stage[first_reduced:])
    run = json.loads((out / "run.json").read_text())
    why = "bf16: this CPU has no avx512_bf16/amx_bf16"
    assert run["fingerprint"]["cpu_flags"] == ["avx", "avx2", "fma"]
    assert run["seed_order"]["native_types"]["bf16"] == [] and run["seed_order"]["native_types"]["int8"] == ["avx2"]
    assert {"seed": "mode=bf16_autocast", "why": [why]} in run["seed_order"]["moved_last"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["extra"]["seed_order"] == run["seed_order"]
    report = (out / "report.md").read_text()
    assert "Stage 1 and this hardware" in report and f"| mode=bf16_autocast | {why} |" in report


def test_training_seeds_follow_the_cpu_flags_too(tmp_path, monkeypatch):
    from autotiacc.training.tuner import TrainingTask, TrainTuneOptions
    from autotiacc.training.workload import TrainWorkload

    from ._training_targets import TINY_TRAIN

    train = tmp_path / "train.py"
    train.write_text(TINY_TRAIN)

    def stage_one_modes(flags: str):
        monkeypatch.setenv(FLAGS_ENV, flags)
        task = TrainingTask(TrainWorkload(train), TrainTuneOptions(budget_s=60, out_dir=tmp_path / "run", nproc=2))
        task.validate(60)
        return [p["precision.mode"] for p in task.seeds()], task.run_record()["seed_order"]

    avx2, order = stage_one_modes(AVX2_ONLY)
    with_bf16, _ = stage_one_modes(WITH_BF16)
    assert avx2[-1] == "bf16" and with_bf16[-1] == "fp32" and sorted(avx2) == sorted(with_bf16)
    assert order == {"native_types": {"bf16": [], "fp16": [], "int8": ["avx2"]},
                     "moved_last": [{"seed": "cache=memory, mode=bf16",
                                     "why": ["bf16: this CPU has no avx512_bf16/amx_bf16"]}]}
