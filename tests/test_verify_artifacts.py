"""Production reuse: deployable artifacts with a recorded sha256, and `autotiacc verify`."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import MODELS, run_cli

TINY = '''
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))

def example_inputs(batch_size: int = 2):
    return (torch.randn(batch_size, 3, 8, 8),)
'''


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("model") / "tiny.py"
    p.write_text(TINY)
    return p


@pytest.fixture(scope="module")
def tuned(tiny, tmp_path_factory) -> Path:
    """One real tune with --export; its run directory. The verify tests read its plan and
    artifact, not its search: the short strategy (baseline and one candidate) is enough, and its
    patience ends the tune (a budget a loaded machine does not spend before the baseline)."""
    out = tmp_path_factory.mktemp("run") / "run"
    proc = _cli("tune", str(tiny), "--budget", "3m", "--strategy", str(MODELS / "short_strategy.yaml"), "--out",
                str(out), "--quiet", "--export", timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "artifact:" in proc.stdout
    return out


def _plan_copy(run: Path, dest: Path, **edits) -> Path:
    shutil.copytree(run, dest)
    data = json.loads((dest / "plan.json").read_text())
    for key, value in edits.items():
        if key == "fingerprint":
            data["fingerprint"].update(value)
        else:
            data[key] = value
    (dest / "plan.json").write_text(json.dumps(data))
    return dest / "plan.json"


# -- artifacts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("values,fmt", [({"precision": {"mode": "bf16_autocast"}}, "export"),
                                        ({"execution": {"backend": "torchscript"}}, "torchscript"),
                                        ({"execution": {"backend": "onnxruntime"}}, "onnx")])
def test_artifact_round_trip_and_tamper(tiny, tmp_path, values, fmt):
    import torch

    import autotiacc
    from autotiacc.errors import PlanError
    from autotiacc.inference.artifacts import export_for_plan
    from autotiacc.inference.plan import Plan
    from autotiacc.inference.workload import load_workload
    from autotiacc.knobs import configs_from_params

    wl = load_workload(tiny)
    Plan(knobs=configs_from_params(values)).save(tmp_path / "plan.json")
    entry = export_for_plan(tmp_path, wl)
    assert entry["format"] == fmt and len(entry["sha256"]) == 64
    assert autotiacc.load_plan(tmp_path).extra["artifact"]["sha256"] == entry["sha256"]
    x = wl.example_inputs()
    ref = wl.build_model()(*x)
    for where in (tmp_path, tmp_path / "plan.json", tmp_path / entry["file"]):
        out = autotiacc.load_artifact(where)(*x)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        assert torch.allclose(out, ref, rtol=0.05, atol=0.05)
    art = tmp_path / entry["file"]
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    with pytest.raises(PlanError, match="does not match the plan's"):
        autotiacc.load_artifact(tmp_path)


def test_load_artifact_needs_a_recorded_hash(tiny, tmp_path):
    import autotiacc
    from autotiacc.errors import PlanError
    from autotiacc.inference.plan import Plan
    from autotiacc.knobs import configs_from_params

    loose = tmp_path / "artifact.ts"
    loose.write_bytes(b"not a model")
    with pytest.raises(PlanError, match="no plan.json beside it"):
        autotiacc.load_artifact(loose)
    with pytest.raises(PlanError, match="does not match"):
        autotiacc.load_artifact(loose, sha256="0" * 64)
    Plan(knobs=configs_from_params({})).save(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="names no artifact"):
        autotiacc.load_artifact(tmp_path)


def test_failed_export_is_recorded_in_the_plan(tmp_path):
    """torch.export refuses data-dependent control flow instead of baking in one branch."""
    from autotiacc.inference.artifacts import export_for_plan
    from autotiacc.inference.plan import Plan, load_plan
    from autotiacc.inference.workload import load_workload
    from autotiacc.knobs import configs_from_params

    Plan(knobs=configs_from_params({})).save(tmp_path / "plan.json")
    with pytest.raises(Exception):  # noqa: B017 - torch.export's own error type, which differs across versions
        export_for_plan(tmp_path, load_workload(Path(__file__).parent / "models" / "branchy.py"))
    entry = load_plan(tmp_path).extra["artifact"]
    assert entry["format"] == "export" and "DataDependent" in entry["error"] and "sha256" not in entry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no half-written file


@pytest.mark.slow
def test_aoti_package_runs(tiny, tmp_path):
    import torch

    import autotiacc
    from autotiacc.inference.artifacts import export_for_plan
    from autotiacc.inference.plan import Plan
    from autotiacc.inference.workload import load_workload
    from autotiacc.knobs import configs_from_params

    wl = load_workload(tiny)
    Plan(knobs=configs_from_params({"execution": {"backend": "compile", "freezing": True}})).save(tmp_path / "plan.json")
    entry = export_for_plan(tmp_path, wl)
    assert entry["format"] == "aoti"
    x = wl.example_inputs()
    assert torch.allclose(autotiacc.load_artifact(tmp_path)(*x), wl.build_model()(*x), rtol=1e-3, atol=1e-4)


# -- verify ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_verify_passes_where_it_was_tuned(tuned, tiny):
    from autotiacc.inference.verify import verify_plan

    # A wider tolerance than the default: CI machines are shared and a tiny model's ratio moves.
    result = verify_plan(tuned / "plan.json", tiny, tolerance=0.4)
    assert result.ok, result.problems
    assert result.measured["speedup"] > 0 and result.measured["n"] >= 10
    assert any(line.startswith("artifact artifact.") and "sha256 ok" in line for line in result.lines)
    import torch

    import autotiacc

    artifact = autotiacc.load_artifact(tuned)  # the exported artifact of a real tune loads and runs
    shape = autotiacc.load_plan(tuned).extra["artifact"]["input_shapes"][0]  # specialised to the tuned shape
    assert artifact(torch.randn(*shape)).shape == (shape[0], 10)


@pytest.mark.slow
def test_verify_flags_doctored_figures_other_hardware_and_a_tampered_artifact(tuned, tiny, tmp_path):
    """One re-measurement through the CLI reports every drift it finds: a recorded speed-up this
    machine cannot reach, a plan from other hardware/software, and an artifact whose bytes changed."""
    # 1e9x: no machine's noise reaches it (at 1000x, a loaded machine's eager windows of 0.03 to
    # 60 ms, divided by 750, overlapped the plan's, and the speed drift went unflagged 2 times in 3)
    plan = _plan_copy(tuned, tmp_path / "doctored", speedup=1e9,
                      fingerprint={"torch": "2.0.0", "cpu_model": "Other CPU 9000"})
    art = next(p for p in plan.parent.iterdir() if p.name.startswith("artifact."))
    art.write_bytes(art.read_bytes() + b"\0")
    proc = _cli("verify", str(plan), str(tiny))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "slower than recorded beyond noise" in proc.stderr and "1000000000.00x recorded" in proc.stderr, proc.stdout
    drift = [line for line in proc.stderr.splitlines() if line.startswith("verify: DRIFT: ")]
    assert any("different hardware/software: cpu_model" in line for line in drift), proc.stderr
    assert any("torch: plan has '2.0.0'" in line for line in drift), proc.stderr
    assert any("does not match the plan's sha256" in line for line in drift), proc.stderr


def test_verify_rejects_bad_input(tiny, tmp_path):
    proc = _cli("verify", str(tmp_path / "missing.json"), str(tiny))
    assert proc.returncode == 2 and "no such plan file" in proc.stderr
    from autotiacc.inference.plan import Plan
    from autotiacc.knobs import configs_from_params

    Plan(knobs=configs_from_params({}), workload={"param_shapes_sha256": "0" * 16, "name": "other"}).save(
        tmp_path / "plan.json")
    proc = _cli("verify", str(tmp_path / "plan.json"), str(tiny), "--tolerance", "1.5")
    assert proc.returncode == 2 and "`--tolerance` got 1.5" in proc.stderr
    proc = _cli("verify", str(tmp_path / "plan.json"), str(tiny))
    assert proc.returncode == 2 and "parameter shapes differ" in proc.stderr


def test_export_archive_with_pickled_payload_is_refused(tiny, tmp_path):
    """Even with a matching hash (plan edited too), torch.export.load is never asked to unpickle."""
    import zipfile

    import autotiacc
    from autotiacc.errors import PlanError
    from autotiacc.inference.artifacts import export_for_plan, sha256_of
    from autotiacc.inference.plan import Plan
    from autotiacc.inference.workload import load_workload
    from autotiacc.knobs import configs_from_params

    Plan(knobs=configs_from_params({})).save(tmp_path / "plan.json")
    entry = export_for_plan(tmp_path, load_workload(tiny))
    art = tmp_path / entry["file"]
    with zipfile.ZipFile(art) as z:
        items = {n: z.read(n) for n in z.namelist()}
    key = next(n for n in items if n.endswith("model_weights_config.json"))
    cfg = json.loads(items[key])
    next(iter(cfg["config"].values()))["use_pickle"] = True
    items[key] = json.dumps(cfg).encode()
    with zipfile.ZipFile(art, "w") as z:
        for name, data in items.items():
            z.writestr(name, data)
    plan = json.loads((tmp_path / "plan.json").read_text())
    plan["extra"]["artifact"]["sha256"] = sha256_of(art)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanError, match="stored pickled"):
        autotiacc.load_artifact(tmp_path)
