"""Property tests: malformed plans and strategies raise only `PlanError` / `StrategyError`,
naming the file, and nothing is imported, run or written while they are read."""
import copy
import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autotiacc.inference.shapes.bucketed
import autotiacc.inference.layer_precision
import autotiacc.inference.verify
import autotiacc.inference.workload
import autotiacc.inference.evaluate
import autotiacc.engine.workers  # noqa: F401
from autotiacc.errors import PlanError, StrategyError
from autotiacc.hardware import fingerprint_differences, fingerprint_id
from autotiacc.inference.shapes.buckets import ShapePlan, spec_from_values
from autotiacc.inference.plan import Plan, load_plan
from autotiacc.knobs import configs_from_params
from autotiacc.strategy import load_strategy
from autotiacc.training.config import TrainConfig
from autotiacc.training.plan import TrainingPlan, load_training_plan

# Any JSON value: what a corrupt or hand-edited file may hold at any field.
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
NASTY = st.sampled_from(["false", "no", "os.system", "builtins.eval", "../../etc/passwd", "1e9", 1e9, 1.5, -3,
                         2**62, float("inf"), [], {}, None, True, "", "cuda:x"])
VALUE = JSON | NASTY


def _good_plan() -> dict:
    plan = Plan(knobs=configs_from_params({"runtime": {"threads": 2}}), fingerprint={"torch": "2"},
                workload={"name": "m", "kind": "python", "input_shapes": [[1, 4]], "input_dtypes": ["float32"],
                          "batch_size": 1, "param_shapes_sha256": "ab"},
                speedup=1.5, level=1, tolerance=0.02,
                extra={"measured_env": {"OMP_WAIT_POLICY": "PASSIVE"},
                       "artifact": {"file": "artifact.pt2", "format": "export", "sha256": "00"}},
                shapes=ShapePlan(spec_from_values({"edges": {"batch_size": [1, 2]}, "padded": [True, False],
                                                   "knobs": [{"execution": {"backend": "onnxruntime"}}, {}]},
                                                  {"batch_size": [(0, 0)]}),
                                 traffic=[{"batch_size": 1, "weight": 1.0}], serve_batch=2, p99_budget_ms=5.0,
                                 measured={"p99_mix_ms": 1.0}))
    return plan.to_dict()


def _good_training_plan() -> dict:
    return TrainingPlan(config=TrainConfig(), batch_size=8, workload={"name": "t", "kind": "train"}).to_dict()


def _paths(d, prefix=()):
    """Every (path, value) in a nested dict/list, the root included."""
    yield prefix, d
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, prefix + (i,))


def _set(d, path, value):
    for p in path[:-1]:
        d = d[p]
    d[path[-1]] = value


@st.composite
def malformed(draw, base):
    """A good plan with one to three fields replaced by random values, or a truncation."""
    d = copy.deepcopy(base)
    if draw(st.integers(0, 9)) == 0:  # truncated / corrupt bytes
        text = json.dumps(d)
        return text[: draw(st.integers(0, len(text) - 1))]
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p, _ in _paths(d) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        if draw(st.booleans()) and isinstance(path[-1], str) and len(path) > 1:
            parent = d
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
        else:
            _set(d, path, draw(VALUE))
    return json.dumps(d, allow_nan=True)


def _assert_nothing_imported(before: set) -> None:
    """Only autotiacc's own modules may load lazily; nothing a file names, no user file."""
    new = set(sys.modules) - before
    assert all(m.startswith("autotiacc.") for m in new), new


def _assert_only_error(tmp_path, text, load, error=PlanError):
    path = tmp_path / "plan.json"
    path.write_text(text)
    before_modules, before_files = set(sys.modules), sorted(p.name for p in tmp_path.iterdir())
    try:
        load(path)
    except error as exc:
        assert str(path) in str(exc), str(exc)
        assert "\n" not in str(exc)
    _assert_nothing_imported(before_modules)
    assert sorted(p.name for p in tmp_path.iterdir()) == before_files


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


FUZZ = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
pytestmark = pytest.mark.filterwarnings("ignore:.*was saved as version")


@FUZZ
@given(text=malformed(_good_plan()))
def test_malformed_plans_raise_only_plan_error(fuzz_dir, text):
    tmp = fuzz_dir

    def load_and_read(path):
        plan = load_plan(path)
        # what verify and apply read from a loaded plan, before any work
        fingerprint_differences(plan.fingerprint, {})
        fingerprint_id(plan.fingerprint)
        _ = plan.label, plan.to_dict()
        if plan.shapes is not None:  # what apply and the report read of the buckets
            _ = plan.shapes.spec.buckets(), plan.shapes.spec.label(), plan.shapes.to_dict()

    _assert_only_error(tmp, text, load_and_read)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=malformed(_good_plan()))
def test_verify_refuses_malformed_plans_before_touching_the_model(fuzz_dir, text):
    """`verify` reads the whole plan before the model file: a malformed plan is a PlanError; a
    plan that loads goes on to the model file (here missing: a WorkloadError, nothing run)."""
    from autotiacc.errors import WorkloadError
    from autotiacc.inference.verify import verify_plan

    missing = fuzz_dir / "no-such-model.py"

    def verify(path):
        try:
            verify_plan(path, missing)
        except WorkloadError as exc:
            assert "no such file" in str(exc)

    _assert_only_error(fuzz_dir, text, verify)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=malformed(_good_training_plan()))
def test_malformed_training_plans_raise_only_plan_error(fuzz_dir, text):
    tmp = fuzz_dir
    _assert_only_error(tmp, text, lambda p: load_training_plan(p).label)


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.update(fingerprint="x"), "`fingerprint` got 'x'"),
    (lambda d: d.update(extra=[]), "`extra` got []"),
    (lambda d: d.update(workload="abc"), "`workload` got 'abc'"),
    (lambda d: d.update(speedup="fast"), "`speedup` got 'fast'"),
    (lambda d: d["knobs"][-1]["_data"].update(freezing="false"), "`freezing` got 'false'"),
    (lambda d: d["knobs"][0]["_data"].update(inference_mode="no"), "`inference_mode` got 'no'"),
    (lambda d: d["knobs"][0]["_data"].update(threads=1e9), "`threads` got 1000000000.0"),
    (lambda d: d["knobs"][0]["_data"].update(threads=1.5), "`threads` got 1.5"),
    (lambda d: d["knobs"][0]["_data"].update(threads=10**9), "`threads` got 1000000000"),
    (lambda d: d["knobs"][0].update(_type="os.system"), "unknown _type 'os.system'"),
    (lambda d: d["extra"]["artifact"].update(file="../../x.so"), "not a path"),
    (lambda d: d["workload"].update(input_dtypes=["float99"]), "`workload.input_dtypes` got 'float99'"),
    (lambda d: d["shapes"].update(serve_batch="8"), "`serve_batch` got '8'"),
])
def test_plan_field_errors_name_the_file_and_the_field(tmp_path, edit, expected):
    d = _good_plan()
    edit(d)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError) as info:
        load_plan(path)
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_the_good_plan_loads(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_good_plan()))
    assert load_plan(path).knobs["runtime"].threads == 2


# -- strategies --------------------------------------------------------------------------------
GOOD_STRATEGY = {
    "name": "mine", "objective": "latency", "trial_timeout_s": 60, "measure_s": 1.0, "final_measure_s": 2.0,
    "final_top_k": 2, "patience": 5, "prune_factor": 1.5, "max_trial_share": 0.5,
    "knobs": {"execution": {"backend": ["eager", "torchscript"], "freezing": [True]},
              "precision": {"mode": ["fp32", "bf16_autocast"], "group_modes": ["bf16_autocast"]},
              "layout": {"channels_last": [False, True]}, "runtime": {"threads": "auto", "inference_mode": [True]}},
    "enqueue": [{}, {"execution": {"backend": "torchscript"}}],
}


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=malformed(GOOD_STRATEGY))
def test_malformed_strategies_raise_only_strategy_error(fuzz_dir, text):
    import yaml

    tmp = fuzz_dir
    path = tmp / "s.yaml"
    try:  # half the cases as YAML (the format users write), half as JSON (valid YAML too)
        text = yaml.dump(json.loads(text), Dumper=yaml.CSafeDumper) if len(text) % 2 else text
    except ValueError:
        pass
    path.write_text(text)
    before_modules, before_files = set(sys.modules), sorted(p.name for p in tmp.iterdir())
    try:
        s = load_strategy(str(path))
    except StrategyError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc), str(exc)
    else:  # what loaded is usable as it stands: every knob space and starting point is valid
        from autotiacc.knobs import SearchContext, all_knobs, configs_from_params

        ctx = SearchContext(cores=2)
        for k in all_knobs():
            for f in ("backend", "mode", "channels_last", "threads"):
                if hasattr(k.default(), f):
                    k.choices(f, s.space(k.name), ctx)
        for entry in s.enqueue:
            configs_from_params(entry)
    _assert_nothing_imported(before_modules)
    assert sorted(p.name for p in tmp.iterdir()) == before_files


@pytest.mark.parametrize("text, expected", [
    ("name: x\nknobs:\n  runtime:\n    threads: [0, -3]\n", "`threads` got -3"),
    ("name: x\nknobs:\n  execution:\n    backend: [eager, tensorrt]\n", "`backend` got 'tensorrt'"),
    ("name: x\nknobs:\n  execution:\n    backnd: [eager]\n", "did you mean `backend`?"),
    ("name: x\npatiense: 3\n", "did you mean `patience`?"),
    ("name: x\ntrial_timeout_s: -5\n", "`trial_timeout_s` got -5"),
    ("name: x\nmax_trial_share: 0\n", "`max_trial_share` got 0"),
    ("name: x\npatience: 0\n", "`patience` got 0"),
    ("name: x\nobjective: speed\n", "`objective` got 'speed'"),
    ("name: x\nenqueue:\n  - {execution: {backend: trt}}\n", "enqueue entry 1"),
])
def test_strategy_errors_name_the_file_and_the_fix(tmp_path, text, expected):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(StrategyError) as info:
        load_strategy(str(path))
    assert str(path) in str(info.value) and expected in str(info.value), str(info.value)


def test_builtin_strategies_load():
    from autotiacc.strategy import builtin_strategies

    assert {load_strategy(n).name for n in builtin_strategies()} == set(builtin_strategies())
