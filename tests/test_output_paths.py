"""Every command's output path is checked before any work: one line, exit 2, the user's code never
loaded, nothing written. A write that fails after the work keeps what was measured and says where."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from autotiacc.errors import OutputError
from autotiacc.outputs import write_or_keep, written_or_error

from ._training_targets import TINY_TRAIN
from .conftest import run_cli

# the user's file says when it is loaded: a refusal "before any work" leaves no marker
MARKING = "open({marker!r}, 'w').close()\n"
MODEL = ("import torch\ndef build_model():\n    return torch.nn.Linear(4, 2)\n"
         "def example_inputs(batch_size=1):\n    return (torch.randn(batch_size, 4),)\n")


def _takes_files(folder: Path) -> bool:
    try:
        (folder / ".probe").write_text("")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.fixture
def read_only(tmp_path):
    """make(folder): that folder takes no new file, for this process too (root writes through
    permission bits; then the folder is made immutable, where the file system allows it)."""
    made: list[Path] = []

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        made.append(folder)
        folder.chmod(0o555)
        if _takes_files(folder):
            folder.chmod(0o755)
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
            if _takes_files(folder):
                pytest.skip("no way to make a folder read-only for this user here (root, no chattr)")
        return folder

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def _one_line(res, *expected: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert lines[0].startswith("autotiacc: error:") and all(e in lines[0] for e in expected), lines[0]
    return lines[0]


def _bad_out(tmp_path, read_only, kind: str) -> tuple[Path, str]:
    """An output path of `kind` and what its refusal says."""
    if kind == "file":
        path = tmp_path / "results.txt"
        path.write_text("mine")
        return path, "is a file, not a folder"
    if kind == "under a file":
        (tmp_path / "results.txt").write_text("mine")
        return tmp_path / "results.txt" / "out", "is a file, not a folder"
    return read_only(tmp_path / "locked") / "out", "takes no new file"


@pytest.mark.parametrize("mode, kind", [("infer", "read-only"), ("infer", "under a file"), ("train", "file"),
                                        ("train", "read-only")])
def test_tune_refuses_an_unwritable_out_before_loading_the_model(tmp_path, read_only, mode, kind):
    marker = tmp_path / "loaded"
    text = MARKING.format(marker=str(marker)) + (MODEL if mode == "infer" else TINY_TRAIN)
    (tmp_path / "m.py").write_text(text)
    out, says = _bad_out(tmp_path, read_only, kind)
    res = run_cli("tune", str(tmp_path / "m.py"), "--mode", mode, "--budget", "1m", "--out", str(out), "--quiet",
                  timeout=120)
    _one_line(res, f"`--out` {out}", says)
    assert not marker.exists()  # refused before the model file was loaded


@pytest.mark.parametrize("kind, name", [("file", None), ("under a file", None), ("read-only", "p.json"),
                                        ("folder", "p.json")])
def test_profile_refuses_an_unwritable_out_before_profiling(tmp_path, read_only, kind, name):
    marker = tmp_path / "loaded"
    (tmp_path / "m.py").write_text(MARKING.format(marker=str(marker)) + MODEL)
    if kind == "folder":  # a .json name that is a folder
        out, says = tmp_path / "p.json", "is a folder, not a file"
        out.mkdir()
    else:
        out, says = _bad_out(tmp_path, read_only, kind)
        out = out / name if name else out
    res = run_cli("profile", str(tmp_path / "m.py"), "--out", str(out), timeout=120)
    _one_line(res, f"`--out` {out}", says)
    assert not marker.exists()


def test_a_profile_whose_output_went_away_is_kept_and_the_place_named(tmp_path):
    """The folder passes the check, then a file takes its place while the model profiles: the
    profile is written to a temporary folder instead, and the error line says which."""
    out = tmp_path / "prof"
    (tmp_path / "m.py").write_text(MODEL.replace("    return torch.nn.Linear(4, 2)\n",
                                                 f"    open({str(out)!r}, 'w').close()\n"
                                                 "    return torch.nn.Linear(4, 2)\n"))
    res = run_cli("profile", str(tmp_path / "m.py"), "--out", str(out), timeout=300)
    line = _one_line(res, f"the profile could not be written to {out / 'profile.json'}", "it was kept in ")
    kept = Path(line.split("it was kept in ")[1].split(": move it")[0])
    try:
        prof = json.loads(kept.read_text())
        assert prof["modules"] and kept.name == "profile.json"
    finally:
        shutil.rmtree(kept.parent, ignore_errors=True)


@pytest.mark.parametrize("kind", ["file", "under a file", "read-only"])
def test_compare_refuses_an_unwritable_out_before_reading_its_inputs(tmp_path, read_only, kind):
    out, says = _bad_out(tmp_path, read_only, kind)
    # an input that does not exist: had it been read first, that would be the error
    res = run_cli("compare", str(tmp_path / "no-such-run"), "--out", str(out), timeout=120)
    _one_line(res, f"`--out` {out}", says)


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_report_from_storage_refuses_an_unwritable_out_before_opening_it(tmp_path, read_only, kind):
    out, says = _bad_out(tmp_path, read_only, kind)
    db = tmp_path / "study.db"
    res = run_cli("report", "--storage", f"sqlite:///{db}", "--study", "s", "--out", str(out), timeout=120)
    _one_line(res, f"`--out` {out}", says)
    assert not db.exists()  # the storage was never opened (SQLite creates the file)


def test_report_refuses_a_read_only_run_dir(tmp_path, read_only):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"workload": {"name": "m"}, "sessions": []}))
    (run / "trials.csv").write_text("number,status,label\n0,ok,baseline\n")
    read_only(run)
    _one_line(run_cli("report", str(run), timeout=120), f"`RUN_DIR` {run}", "takes no new file",
              "copy the run directory to a folder you can write")
    assert not (run / "report.md").exists()


def test_write_or_keep_writes_where_asked_or_keeps_it_elsewhere(tmp_path):
    def save(path: Path) -> Path:
        path.write_text("measured")
        return path

    assert write_or_keep(save, tmp_path / "a" / "p.json", what="the profile") == tmp_path / "a" / "p.json"
    (tmp_path / "b").write_text("a file where the folder would go")
    with pytest.raises(OutputError, match="the profile could not be written to .*; it was kept in ") as info:
        write_or_keep(save, tmp_path / "b" / "p.json", what="the profile")
    kept = Path(str(info.value).split("it was kept in ")[1].split(": move it")[0])
    try:
        assert kept.read_text() == "measured" and kept.name == "p.json"
    finally:
        shutil.rmtree(kept.parent)


def test_written_or_error_names_the_place_and_keeps_the_inputs(tmp_path):
    (tmp_path / "cmp").write_text("a file where the folder would go")
    with pytest.raises(OutputError, match=r"the comparison could not be written to .*cmp: .* the inputs are unchanged"):
        written_or_error(lambda: (tmp_path / "cmp" / "compare.md").write_text("x"), tmp_path / "cmp",
                         what="the comparison")
    assert written_or_error(lambda: 42, tmp_path, what="the comparison") == 42
