"""Fast behaviour checks of the core: parsing, statistics, knobs, plans, workloads, accuracy."""
import json
import warnings

import pytest
import torch

from autotiacc.durations import format_duration, parse_duration
from autotiacc.errors import BudgetError, PlanError, PlanMismatchError, UserInputError, WorkloadError, ModelRaisedError
from autotiacc.inference.accuracy import compare_outputs
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.inference.workload import load_workload, workload_from_module
from autotiacc.knobs import all_knobs, config_from_dict, config_to_dict, configs_from_params, describe
from autotiacc.knobs.execution import ExecutionConfig
from autotiacc.measure import Timing, faster_beyond_noise, mann_whitney_p_less, measure_interleaved
from autotiacc.strategy import builtin_strategies, load_strategy


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("45", 45),
                                          ("2m30s", 150), (" 5M ", 300)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", ["", "ten minutes", "10x", "5m1h", "-5m", "0s", "1h1h", "m"])
def test_parse_duration_rejects(bad):
    with pytest.raises(BudgetError, match="--budget"):
        parse_duration(bad)


def test_timing_statistics():
    t = Timing(samples_ms=[float(x) for x in range(1, 101)])
    assert t.median == pytest.approx(50.5)
    assert t.p90 == pytest.approx(90.1)
    assert t.p99 == pytest.approx(99.01)
    assert t.n == 100
    assert Timing.from_dict(t.to_dict()).samples_ms == t.samples_ms


def test_mann_whitney_and_noise_rule():
    fast, slow = [1.0 + 0.01 * i for i in range(30)], [2.0 + 0.01 * i for i in range(30)]
    assert mann_whitney_p_less(fast, slow) < 1e-6
    assert mann_whitney_p_less(slow, fast) > 0.99
    assert faster_beyond_noise(Timing(fast), Timing(slow))
    assert not faster_beyond_noise(Timing(slow), Timing(fast))
    same = [1.0, 1.1, 0.9, 1.05, 0.95] * 6
    assert not faster_beyond_noise(Timing(same), Timing(list(same)))


def test_measure_interleaved_orders_real_work():
    a = torch.randn(32, 32)
    b = torch.randn(512, 512)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # in a busy test process, OpenMP hand-offs alone took 14 ms per tiny matmul
    try:
        res = measure_interleaved({"small": lambda: a @ a, "big": lambda: b @ b}, min_rounds=10, target_s=0.3,
                                  warmup_s=0.2)
    finally:
        torch.set_num_threads(threads)
    assert res["small"].n == res["big"].n >= 10
    # the fastest sample is the least disturbed by other load on a shared machine (~4000x less work)
    assert min(res["small"].samples_ms) < min(res["big"].samples_ms)


# -- knobs: the contract suite every knob runs -----------------------------------------------------------
KNOB_NAMES = [k.name for k in all_knobs()]


@pytest.mark.parametrize("name", KNOB_NAMES)
def test_knob_default_config_round_trips_json(name):
    knob = next(k for k in all_knobs() if k.name == name)
    cfg = knob.default()
    d = json.loads(json.dumps(config_to_dict(cfg)))
    assert d["_type"] == type(cfg).__name__
    assert config_from_dict(d) == cfg


def test_configs_validate_with_the_fix_in_the_message():
    with pytest.raises(ValueError, match="backend.*use one of"):
        ExecutionConfig(backend="tensorrt")


def test_config_from_dict_refuses_unknown_types_and_fields():
    with pytest.raises(PlanError, match="unknown _type"):
        config_from_dict({"_type": "os.system", "_version": 1, "_data": {}})
    with pytest.raises(PlanError, match="unknown fields"):
        config_from_dict({"_type": "ExecutionConfig", "_version": 1, "_data": {"evil": 1}})


def test_describe_shows_only_changes():
    assert describe(configs_from_params({})).startswith("baseline")
    assert describe(configs_from_params({"execution": {"backend": "torchscript"}})) == "backend=torchscript"


# -- plans -----------------------------------------------------------------------------------------------
def _plan(**knobs) -> Plan:
    from autotiacc.hardware import fingerprint

    return Plan(knobs=configs_from_params(knobs), fingerprint=fingerprint(), speedup=1.7)


def test_plan_round_trip(tmp_path):
    p = _plan(precision={"mode": "bf16_weights"}, execution={"backend": "torchscript"})
    path = p.save(tmp_path / "plan.json")
    q = load_plan(path)
    assert q.knobs == p.knobs and q.speedup == 1.7 and q.fingerprint == p.fingerprint
    assert load_plan(tmp_path).label == p.label  # a run directory works too


@pytest.mark.parametrize("content,match", [("{not json", "not valid JSON"), ("[1, 2]", "not an autotiacc plan"),
                                           (json.dumps({"schema": "autotiacc.plan", "schema_version": 99, "knobs": []}),
                                            "schema version 99")])
def test_bad_plan_files(tmp_path, content, match):
    f = tmp_path / "plan.json"
    f.write_text(content)
    with pytest.raises(PlanError, match=match):
        load_plan(f)
    with pytest.raises(PlanError, match="no such plan"):
        load_plan(tmp_path / "missing.json")


def test_apply_keeps_output_dtype_and_structure():
    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            y = self.lin(x)
            return {"y": y, "pair": (y.sum(dim=1), y.argmax(dim=1))}

    model = TwoHeads().eval()
    x = torch.randn(3, 8)
    fast = _plan(precision={"mode": "bf16_weights"}).apply(model, (x,))
    out, ref = fast(x), model(x)
    assert out["y"].dtype == torch.float32 and out["pair"][0].dtype == torch.float32
    assert out["pair"][1].dtype == torch.int64
    assert torch.allclose(out["y"], ref["y"], rtol=0.05, atol=0.05)
    assert not any(p.dtype == torch.bfloat16 for p in model.parameters())  # the user's model is untouched


def test_apply_builds_lazily_on_first_call():
    model = torch.nn.Linear(4, 2).eval()
    fast = _plan(execution={"backend": "torchscript"}).apply(model)
    x = torch.randn(5, 4)
    assert torch.allclose(fast(x), model(x), atol=1e-6)
    assert fast.build_seconds > 0


def test_plan_from_other_hardware_warns_or_refuses():
    p = _plan()
    p.fingerprint = {**p.fingerprint, "cpu_model": "Imaginary CPU 9000"}
    with pytest.warns(UserWarning, match="other hardware"):
        p.apply(torch.nn.Linear(2, 2))
    with pytest.raises(PlanMismatchError, match="Imaginary CPU 9000"):
        p.apply(torch.nn.Linear(2, 2), strict=True)


# -- accuracy guard --------------------------------------------------------------------------------------
def test_accuracy_guard_reports_and_rejects():
    ref = [torch.ones(4, 4)]
    ok = compare_outputs([torch.ones(4, 4) * 1.001], ref, tolerance=1e-2)
    assert ok.ok and ok.rel_l2 == pytest.approx(1e-3, rel=1e-3)
    bad = compare_outputs([torch.ones(4, 4) * 1.5], ref, tolerance=1e-2)
    assert not bad.ok and "exceeds tolerance" in bad.reason
    nan = compare_outputs([torch.full((4, 4), float("nan"))], ref, tolerance=1e-2)
    assert not nan.ok and "non-finite" in nan.reason
    shape = compare_outputs([torch.ones(2, 4)], ref, tolerance=1e-2)
    assert not shape.ok and "shape" in shape.reason


def test_accuracy_guard_with_user_metric():
    refs = [torch.tensor([[0.1, 0.9]]), torch.tensor([[0.8, 0.2]])]
    targets = [torch.tensor([1]), torch.tensor([0])]
    acc = lambda out, t: float((out.argmax(1) == t).float().mean())  # noqa: E731
    flipped = [torch.tensor([[0.9, 0.1]]), torch.tensor([[0.8, 0.2]])]
    rep = compare_outputs(flipped, refs, tolerance=0.1, metric=acc, targets=targets)
    assert not rep.ok and rep.metric == 0.5 and rep.reference_metric == 1.0


def test_traced_graph_wrong_on_other_branch_is_rejected(models_dir):
    """Data-dependent control flow: tracing bakes in one branch; the guard must catch it."""
    from autotiacc.inference.evaluate import evaluate

    w = load_workload(models_dir / "branchy.py")
    res = evaluate(w, {"ts": {"execution": {"backend": "torchscript"}},
                       "eager_bf16": {"precision": {"mode": "bf16_weights"}}}, target_s=0.1, warmup_s=0.1)
    ts = res["candidates"]["ts"]
    assert ts["status"] == "rejected", ts
    assert "relative error" in ts["reason"]
    assert res["candidates"]["eager_bf16"]["status"] == "ok"


# -- workloads: every bad input gets a clear error ----------------------------------------------------------
def _write(tmp_path, text, name="model.py"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_workload_errors(tmp_path):
    with pytest.raises(WorkloadError, match="no such file"):
        load_workload(tmp_path / "nope.py")
    with pytest.raises(WorkloadError, match="syntax error"):
        load_workload(_write(tmp_path, "def build_model(:\n"))
    with pytest.raises(WorkloadError, match="build_model"):
        load_workload(_write(tmp_path, "def example_inputs(batch_size=1):\n    return 1\n", "m2.py"))
    with pytest.raises(WorkloadError, match="importing it raised ZeroDivisionError"):
        load_workload(_write(tmp_path, "1/0\n", "m3.py"))
    with pytest.raises(WorkloadError, match="unsupported file type"):
        load_workload(_write(tmp_path, "x", "model.txt"))
    with pytest.raises(WorkloadError, match="input-shape"):
        load_workload(_write(tmp_path, "garbage", "model.pt"))
    with pytest.raises(WorkloadError, match="not a readable TorchScript"):
        load_workload(_write(tmp_path, "garbage", "model2.pt"), input_shapes=["1x3"])


def test_example_inputs_must_be_tensors(tmp_path):
    p = _write(tmp_path, "import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n"
                         "def example_inputs(batch_size=1):\n    return [1, 2]\n")
    with pytest.raises(WorkloadError, match="must return a torch.Tensor"):
        load_workload(p).validate()


def test_model_raising_on_its_own_inputs_is_the_users_bug(tmp_path):
    p = _write(tmp_path, "import torch\ndef build_model():\n    return torch.nn.Linear(2, 2)\n"
                         "def example_inputs(batch_size=1):\n    return torch.randn(batch_size, 3)\n")
    with pytest.raises(ModelRaisedError, match="raised on its own example inputs: RuntimeError"):
        load_workload(p).validate()


def test_torchscript_and_export_files(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 3)).eval()
    x = torch.randn(2, 6)
    torch.jit.save(torch.jit.trace(model, (x,)), tmp_path / "m.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "m.pt2")
    for name in ("m.pt", "m.pt2"):
        w = load_workload(tmp_path / name, input_shapes=["2x6"])
        assert w.validate().output == "Tensor[2, 3]"  # run once in a child
        assert torch.allclose(w.build_model()(x), model(x), atol=1e-6)


def test_in_memory_workload_is_picklable():
    import pickle

    w = workload_from_module(torch.nn.Linear(3, 1), torch.randn(2, 3))
    w2 = pickle.loads(pickle.dumps(w))
    assert torch.equal(w2.build_model().weight, w.build_model().weight)
    assert len(w2.test_data()) == 4


def test_strategies_ship_and_validate(tmp_path):
    assert {"inference-latency", "quick"} <= set(builtin_strategies())
    s = load_strategy("quick")
    assert s.knobs["execution"]["backend"]
    with pytest.raises(UserInputError, match="use one of"):
        load_strategy("fastest-please")
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nknobs:\n  warp_drive: {on: [true]}\n")
    with pytest.raises(UserInputError, match="unknown knob 'warp_drive'"):
        load_strategy(str(bad))


def test_plan_warns_when_thread_wait_policy_differs(monkeypatch):
    p = _plan()
    p.extra["measured_env"] = {"OMP_WAIT_POLICY": "PASSIVE"}  # an old plan, measured under PASSIVE
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.warns(UserWarning, match="measured with OMP_WAIT_POLICY 'PASSIVE'.*this process has OMP_WAIT_POLICY unset"):
        p.check_fingerprint()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.check_fingerprint()


def test_plans_record_the_tune_environment_and_warn_only_when_it_differs(monkeypatch):
    from autotiacc.engine.fidelity import measured_env

    for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS"):
        monkeypatch.delenv(k, raising=False)
    p = _plan()
    p.extra["measured_env"] = measured_env()  # what a tune in this (default) environment records
    assert p.extra["measured_env"]["OMP_WAIT_POLICY"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.check_fingerprint()  # production in the same environment: silent
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    with pytest.warns(UserWarning, match="measured with OMP_WAIT_POLICY unset"):
        p.check_fingerprint()


def test_status_enums_are_written_as_their_words():
    """Statuses are enums in the code and the same words on disk: trials.csv, Optuna's user_attrs
    and run records made before the enums read the same."""
    import io
    import json
    import signal

    import pandas as pd

    from autotiacc.engine.status import CallStatus, TrialState, TrialStatus
    from autotiacc.engine.workers import classify_exit

    assert TrialStatus.REJECTED == "rejected" and f"{TrialStatus.REJECTED}" == "rejected"
    assert json.loads(json.dumps({"status": TrialStatus.OK})) == {"status": "ok"}
    buf = io.StringIO()
    pd.DataFrame([{"status": TrialStatus.PRUNED}]).to_csv(buf, index=False)
    assert buf.getvalue().splitlines() == ["status", "pruned"]
    assert TrialStatus("timeout") is TrialStatus.TIMEOUT and TrialState("fail") is TrialState.FAIL
    assert classify_exit(-signal.SIGKILL)[0] is CallStatus.OOM and classify_exit(3)[0] is CallStatus.CRASH
    with pytest.raises(ValueError):
        CallStatus("fine")  # a word nobody defined is an error, not a new status
