"""Measurements that know when the machine is busy (issue 18 item 3): the load is sampled around
every timing window (`machine_load`), a busy figure is marked, and the tune's output, its plan,
its report and `verify` say so. The loaded direction is asserted strictly, with real CPU-bound
processes started (and killed) by the test; a quiet verdict only from figures, since a CI
machine may have load of its own."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time

import pytest

from autotiacc.machine_load import (OTHERS_SHARE, LoadProbe, LoadWindow, busy_reason, merge_loads, reliability,
                                    rounds_span_reason, wait_quiet)
from autotiacc.measure import measure_interleaved

from .conftest import MODELS, run_cli

# spins until its time is up (a bound, should the test die before killing it); says when it started
_SPIN = "import time\nprint('spinning', flush=True)\nt = time.monotonic()\nwhile time.monotonic() - t < {s}:\n    pass\n"


@contextlib.contextmanager
def cpu_hogs(n: int = 3, seconds: float = 300):
    """`n` CPU-bound processes (3 on 2 cores: more than the machine has), each ending by itself
    after `seconds` and killed on leaving; yields once every one of them is spinning."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN.format(s=seconds)], stdout=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for p in procs:  # the event: each one has started its loop
            assert p.stdout.readline().strip() == "spinning"
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _window(others: float, *, seconds: float = 1.0, steal: float = 0.0) -> LoadWindow:
    return LoadWindow(seconds=seconds, cores=2, others_cores=others, steal_share=steal, nivcsw_per_s=10.0,
                      load1=1.0, running=1)


def test_short_windows_are_judged_pooled():
    """A tiny model's final times it in many windows under MIN_WINDOW_S, none judged alone: beside two
    CPU-bound processes (1.7 of 2 cores) such a final said "0 of 20 timing windows busy" (measured
    here). Pooled over their seconds they are busy; the same windows on a quiet machine are not."""
    short = [_window(1.7, seconds=0.05).to_dict() for _ in range(20)]
    assert not any(w["busy"] for w in short)  # each alone is too short to judge
    merged = merge_loads(short)
    assert merged["busy"] and merged["busy_windows"] == 0 and merged["others_mean"] == pytest.approx(1.7)
    assert "others used 1.7 cores on average over the 1.0 s timed" in busy_reason(merged)
    assert reliability(merged)["reliable"] is False
    quiet = merge_loads([_window(0.05, seconds=0.05).to_dict() for _ in range(20)])
    assert not quiet["busy"] and busy_reason(quiet) is None
    # summaries merge again (the final's candidates, then the plan's verdict) with the same pooled figure
    again = merge_loads([merge_loads(short[:10]), merge_loads(short[10:])])
    assert again["busy"] and again["seconds"] == pytest.approx(1.0) and again["windows"] == 20
    too_little = merge_loads([_window(1.9, seconds=0.05).to_dict() for _ in range(3)])
    assert not too_little["busy"]  # 0.15 s in all: still too short to judge


def test_contention_is_defined_against_the_usable_cores():
    assert not _window(0.05).busy  # a quiet machine's daemons
    assert not _window(OTHERS_SHARE * 2 - 0.01).busy
    assert _window(OTHERS_SHARE * 2).busy and _window(1.9).busy  # half a core of 2 taken by others
    assert _window(0.0, steal=0.15).busy  # the hypervisor took the time
    assert not _window(1.9, seconds=0.05).busy  # too short to judge with 10 ms ticks
    one_in_ten = merge_loads([_window(1.9).to_dict()] + [_window(0.0).to_dict()] * 9)
    assert one_in_ten["busy_windows"] == 1 and not one_in_ten["busy"] and busy_reason(one_in_ten) is None
    most = merge_loads([_window(1.9).to_dict()] * 6 + [_window(0.0).to_dict()] * 4)
    assert most["busy"] and "load 1.0 on 2 cores" in busy_reason(most) and "6 of 10 timing windows busy" in busy_reason(most)
    assert rounds_span_reason(1.0, 1.4) is None and "1.00x to 1.60x" in rounds_span_reason(1.0, 1.6)
    assert reliability(most)["reliable"] is False and reliability(one_in_ten, (2.0, 2.2))["reliable"] is True


def test_other_processes_on_the_cores_are_seen_as_contention():
    with cpu_hogs(3):
        with LoadProbe() as probe:
            time.sleep(1.0)
        assert probe.window.busy and probe.window.others_cores >= OTHERS_SHARE * probe.window.cores
        # the harness records it with the figures, and a bounded wait for quiet gives up
        t = measure_interleaved({"sleep": lambda: time.sleep(0.002)}, min_rounds=50, target_s=0.5, warmup_s=0)
        assert t["sleep"].busy and t["sleep"].load["others_cores"] >= OTHERS_SHARE * 2
        t0 = time.monotonic()
        assert wait_quiet(0.6) is False and time.monotonic() - t0 < 2.0


def test_a_busy_timing_is_taken_again_once_the_machine_is_quiet():
    """The hogs stop inside the first timing (its 45th call of 60): the rounds were busy, the
    machine then goes quiet, and the rounds are taken again. Needs a machine quiet without the
    hogs. Calls of 5 ms make the first window 0.3 s, above `MIN_WINDOW_S` on a quiet machine too."""
    if not wait_quiet(3.0):
        pytest.skip("this machine is busy without the test's load: a retake cannot be shown here")
    with cpu_hogs(3) as procs:
        calls = []

        def fn():
            calls.append(1)
            time.sleep(0.005)
            if len(calls) == 45:
                for p in procs:
                    p.kill()
                    p.wait()

        t = measure_interleaved({"x": fn}, min_rounds=60, max_rounds=60, warmup_s=0, busy_wait_s=5.0)
    assert t["x"].load.get("retaken") and not t["x"].busy and t["x"].n == 60 and len(calls) >= 120  # warm-up calls besides


@pytest.mark.slow
def test_a_tune_on_a_busy_machine_says_its_figure_is_not_reliable(tmp_path):
    """Three CPU-bound processes on 2 cores beside a tune: the output, the plan (a typed field and
    its note), the report and `verify` all say the figure is not reliable, and why."""
    out = tmp_path / "run"
    with cpu_hogs(3):
        res = run_cli("tune", str(MODELS / "sleepy.py"), "--strategy", str(MODELS / "short_strategy.yaml"),
                      "--budget", "2m", "--out", str(out), "--quiet", timeout=400)
        assert res.returncode == 0, res.stderr
        ver = run_cli("verify", str(out), str(MODELS / "sleepy.py"), "--measure-s", "1", timeout=300)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["label"] == "backend=torchscript"  # the traced graph has no sleep: found however busy
    assert plan["reliable"] is False and "the machine was busy (load" in plan["reliability"]["reasons"][0]
    assert "Not reliable: the machine was busy" in plan["note"]
    assert "NOT RELIABLE" in res.stdout and "measurement: not reliable: the machine was busy (load" in res.stdout
    assert "**Not reliable:** the machine was busy" in (out / "report.md").read_text()
    assert "not reliable: the machine was busy (load" in ver.stdout, ver.stdout + ver.stderr
