"""The allocator's share of a CPU forward: page faults per call are measured, named in the
diagnosis when large, and the environment variables that change them are recorded with a plan."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from autotiacc.engine.fidelity import SPEED_ENV, measured_env
from autotiacc.profiling.diagnosis import allocator_finding

CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from autotiacc.profiling.forward import _page_faults_per_call
big = lambda: torch.ones(64, 2**18).sum()  # 64 MiB per call: above glibc's largest dynamic mmap threshold
print(json.dumps(_page_faults_per_call(big, calls=4)))
"""


def _faults(env: dict[str, str]) -> float:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", CHILD, root], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_page_faults_per_call_see_the_allocator_mapping_blocks_afresh():
    default = _faults({})
    assert default > 10_000  # the block's 16,384 pages mapped and faulted in afresh on every call
    assert "MALLOC_" in allocator_finding(default)
    # (settings that keep blocks mapped help eager convnet here, but how much varies with glibc's
    # arenas and threads from process to process: experiments/allocator.py measures it, not a test)


def test_allocator_finding_only_above_a_mebibyte_of_fresh_pages():
    assert allocator_finding(None) is None and allocator_finding(10) is None
    text = allocator_finding(13_648)
    assert "13648 minor page faults" in text and "53 MiB" in text


def test_malloc_settings_are_recorded_as_speed_relevant(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert "GLIBC_TUNABLES" in SPEED_ENV
    assert measured_env()["MALLOC_MMAP_THRESHOLD_"] == "1073741824"


def test_a_cpu_profile_records_page_faults_and_the_report_names_the_allocator():
    from autotiacc.profiling.forward import profile_model
    from autotiacc.report.profile import _diagnosis_lines
    from torch import nn
    import torch

    model = nn.Sequential(nn.Linear(8, 8)).eval()
    prof = profile_model(model, (torch.ones(2, 8),), target_s=0.05, warmup_s=0.02)
    assert prof["page_faults_per_forward"] is not None and prof["page_faults_per_forward"] >= 0
    diag = dict(prof["diagnosis"], allocator=allocator_finding(20_000))
    assert any("**allocator**" in line for line in _diagnosis_lines(diag))
