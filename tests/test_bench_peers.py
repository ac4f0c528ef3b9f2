"""experiments/bench_peers.py's pieces that need no torchvision: the quiet check (real processes
burning a known amount of CPU, ours and not ours), the fresh-process runner taking variants in
turns on a tiny model, and the table's "plan vs best peer"."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from .conftest import MODELS, ROOT

sys.path.insert(0, str(ROOT / "experiments"))

import bench_peers
from quiet_machine import CpuSample, judge

BURN = "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\nopen(sys.argv[1], 'w').close()\n"


def _wait_for(path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_quiet_check_counts_other_processes_cpu_and_not_our_children(tmp_path):
    """Each burner runs until it has used 0.5 s of CPU (however loaded the machine is): our own
    child lands on our side of the ledger, an orphaned one (not our descendant) on the others'."""
    burner = tmp_path / "burn.py"
    burner.write_text(BURN.format(s=0.5))
    a = CpuSample.now()
    subprocess.run([sys.executable, str(burner), str(tmp_path / "child.done")], check=True)
    b = CpuSample.now()
    assert b.own_s - a.own_s >= 0.45  # the reaped child's CPU is ours
    # `sh` starts the burner in the background and exits: the burner is re-parented, no longer ours
    subprocess.run(["sh", "-c", f"'{sys.executable}' '{burner}' '{tmp_path / 'orphan.done'}' >/dev/null 2>&1 &"],
                   check=True)
    _wait_for(tmp_path / "orphan.done")
    c = CpuSample.now()
    assert c.own_s - b.own_s < 0.3  # the orphan's 0.5 s are not counted as ours
    verdict = judge(b, c, cores=2)
    assert verdict.others_cores * verdict.seconds >= 0.45
    assert not judge(b, c, cores=2, others_max=0.1 / verdict.seconds).quiet
    assert "other processes used" in judge(b, c, cores=2, others_max=0.1 / verdict.seconds).why


def test_judge_names_each_reason_for_busy():
    a = CpuSample(t=0.0, busy_s=0.0, steal_s=0.0, total_s=0.0, own_s=0.0)
    quiet = CpuSample(t=10.0, busy_s=11.0, steal_s=0.1, total_s=20.0, own_s=10.0)  # others: 0.1 cores
    assert judge(a, quiet, cores=2, load1=0.4).quiet and judge(a, quiet, cores=2).why == "quiet"
    busy = CpuSample(t=10.0, busy_s=16.0, steal_s=2.0, total_s=20.0, own_s=10.0)  # others 0.6 cores, steal 10 %
    v = judge(a, busy, cores=2, load1=3.0)
    assert not v.quiet and v.others_cores == pytest.approx(0.6)
    assert all(s in v.why for s in ("other processes used 0.60 cores", "steal 10%", "load average 3.00 on 2 cores"))


@pytest.mark.slow
def test_variants_run_in_fresh_processes_taken_in_turns_with_accuracy(tmp_path, monkeypatch):
    """A B C A B ...: a process per variant per round in this environment (nothing imposed), each
    with its window and its error vs eager fp32. Where OpenVINO is not installed (the `openvino`
    extra), its failure is recorded once and the variant is not run again."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    case = bench_peers.Case("tiny_mlp", MODELS / "tiny_mlp.py", 4)
    variants = ["eager", "torchscript", "openvino-f32"]
    prep, rows = bench_peers.measure_case(case, variants, rounds=2, warmup_s=0.05, window_s=0.1, work=tmp_path,
                                          progress=lambda _: None)
    installed = importlib.util.find_spec("openvino") is not None
    assert prep["openvino"] == "ok" if installed else prep["openvino"].startswith("failed: ModuleNotFoundError")
    assert [r["variant"] for r in rows] == variants + variants[:2] + variants[2:] * installed
    ok = [r for r in rows if r["status"] == "ok"]
    runs = 4 + 2 * installed
    assert len(ok) == runs and len({r["pid"] for r in ok} | {os.getpid()}) == runs + 1  # each its own fresh process
    assert all(r["median_ms"] > 0 and r["calls"] >= 3 for r in ok)
    assert all(r["rel_err"] == 0.0 for r in ok if r["variant"] == "eager")
    assert all(0.0 <= r["rel_err"] < 1e-5 for r in ok)
    assert installed or "ModuleNotFoundError" in rows[2]["error"]
    from autotiacc.engine.fidelity import measured_env

    mine = {k: v for k, v in measured_env().items() if v is not None}
    assert all(r["env"] == mine for r in ok)  # the environment of the command, nothing imposed
    summary = {s["variant"]: s for s in bench_peers.summarize(rows)}
    assert summary["torchscript"]["rounds"] == 2 and summary["torchscript"]["spread"] >= 0
    assert summary["openvino-f32"]["status"] == ("ok" if installed else "failed")


def test_plan_vs_best_peer_takes_the_fastest_peer_within_the_tolerance():
    def row(v, ms, err, busy=0):
        return {"model": "m", "batch": 1, "variant": v, "status": "ok", "median_ms": ms, "rel_err": err, "busy": busy}

    summary = [row("eager", 100.0, 0.0), row("ort", 50.0, 1e-6), row("ort-int8-static", 20.0, 0.05),
               row("openvino", 40.0, 1e-3, busy=1), row("plan", 32.0, 1e-3)]
    assert bench_peers.plan_vs_best_peer(summary, 0.02) == pytest.approx(40 / 32)  # int8 is outside 2e-2
    assert bench_peers.plan_vs_best_peer(summary, 0.1) == pytest.approx(20 / 32)
    table = bench_peers.results_table(summary, {("m", 1): 0.02}, {("m", 1): "backend=onnxruntime"})
    assert table[2] == ("| m | 1 | 100.0 | 50 | 20† | **40*** | 32 (backend=onnxruntime) | 1.25× |")
    with pytest.raises(ValueError, match="not MODEL:BATCH"):
        bench_peers.parse_cases("no_such_model:1")
