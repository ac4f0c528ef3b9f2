"""The `autotiacc` command: parses, calls the library, prints. Errors are one line, exit 2."""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .errors import AutotiaccError
from .outputs import check_output_dir, check_output_file, write_or_keep, written_or_error
from .progress import ProgressBar

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Profiling-guided auto-tuning of PyTorch models, measured on this machine.")
_STATE: dict[str, Any] = {"debug": False, "run_dir": None, "started": None}


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"autotiacc: error: {msg}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our errors into one line on stderr and exit 2 (traceback only with --debug)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AutotiaccError as exc:
            if _STATE["debug"]:
                traceback.print_exc()
            _fail(str(exc))
        except KeyboardInterrupt:
            run_dir = _STATE["run_dir"]
            if run_dir is not None and (Path(run_dir) / "run.json").is_file():
                typer.echo(f"autotiacc: interrupted; finished trials are kept (continue with --resume --out {run_dir}).",
                           err=True)
            else:
                typer.echo("autotiacc: interrupted before any trial was recorded; nothing was kept.", err=True)
            raise typer.Exit(130) from None
    return wrapper


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks.")) -> None:
    _STATE["debug"] = debug


@app.command()
@guarded
def tune(
    file: Path = typer.Argument(..., help="model.py, TorchScript .pt/.ts, or torch.export .pt2"),
    budget: str = typer.Option("30m", "--budget", "-b", help="whole tune, compile time included: 90s, 10m, 1h30m"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/<model>-<time>)"),
    level: Optional[int] = typer.Option(None, "--level", help="0 no precision change, 1 reduced precision (default), "
                                        "2 aggressive"),
    strategy: str = typer.Option("inference-latency", "--strategy", help="preset name or YAML file"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch size to tune for"),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="max relative L2 error vs fp32 eager"),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default DIR/study.db)"),
    study: str = typer.Option("autotiacc", "--study", help="study name inside the storage"),
    resume: bool = typer.Option(False, "--resume", help="continue the study in --out after an interruption"),
    seed: int = typer.Option(0, "--seed"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="e.g. 1x3x224x224 (repeatable)"),
    input_dtype: Optional[list[str]] = typer.Option(None, "--input-dtype", help="dtype per input (default float32)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available, else CPU), cpu or cuda[:N]"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    traffic: Optional[Path] = typer.Option(None, "--traffic", help="shape mix CSV/JSON (batch_size, dims, weight): "
                                           "tune buckets for it"),
    p99_ms: Optional[float] = typer.Option(None, "--p99-ms", help="p99 latency budget over the traffic mix (ms)"),
    mode: str = typer.Option("infer", "--mode", help="infer (model.py, latency) or train (train.py, samples/s)"),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="--mode train: processes (real torch.distributed ranks, "
                                        "gloo on CPU; default 1)"),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="peak memory limit of a candidate (device "
                                             "memory on CUDA, RSS on CPU), e.g. 4GiB"),
    export: bool = typer.Option(False, "--export", help="also save a deployable artifact (AOTInductor, "
                                "torch.export or TorchScript) named in the plan with its sha256"),
    heartbeat: int = typer.Option(10, "--heartbeat", help="with --storage: seconds between trial heartbeats; "
                                  "a dead worker's trials fail after 3 missed beats"),
) -> None:
    """Search for the fastest plan for FILE within the budget; writes plan, trials and report."""
    _refuse_other_modes_flags(mode, {"--level": level, "--input-shape": input_shape, "--input-dtype": input_dtype,
                                     "--traffic": traffic, "--p99-ms": p99_ms, "--export": export or None,
                                     "--nproc": nproc})
    if mode == "train":
        _tune_training(file, budget=budget, out=out, nproc=1 if nproc is None else nproc, max_memory=max_memory, batch_size=batch_size,
                       tolerance=tolerance, storage=storage, study=study, resume=resume, seed=seed, device=device,
                       quiet=quiet, heartbeat=heartbeat,
                       strategy="training" if strategy == "inference-latency" else strategy)
        return
    from .inference.task import tune as run_tune

    workload, options = _inference_setup(
        file, budget=budget, out=out, level=1 if level is None else level, strategy=strategy, batch_size=batch_size, tolerance=tolerance,
        storage=storage, study=study, resume=resume, seed=seed, input_shape=input_shape, input_dtype=input_dtype,
        device=device, traffic=traffic, p99_ms=p99_ms, max_memory=max_memory, heartbeat=heartbeat)
    bar = ProgressBar(options.budget_s, quiet)
    try:
        result = run_tune(workload, options, bar)
    finally:
        bar.close()
    exported = _export_hook(result.run_dir, workload) if export else None
    _print_result(result, options.budget_s)
    if exported is False:
        raise typer.Exit(1)


def _inference_setup(file: Path, *, budget: str, out: Optional[Path], batch_size: Optional[int],
                     max_memory: Optional[str], device: str, strategy: str, storage: Optional[str], heartbeat: int,
                     traffic: Optional[Path], input_shape: Optional[list[str]], input_dtype: Optional[list[str]],
                     **options: Any) -> tuple[Any, Any]:
    """`tune`'s flags checked (bad ones refused before any work), then the model file's whole
    contract, in a child killed at the end of the budget. Returns (workload, TuneOptions)."""
    from .device import parse_memory, resolve_device
    from .durations import parse_duration
    from .engine.space import strategy_for
    from .inference.task import MIN_BUDGET_S, TuneOptions
    from .inference.workload import load_workload

    started = _started()
    budget_s = parse_duration(budget)
    if batch_size is not None and batch_size <= 0:
        raise _bad(f"`--batch-size` got {batch_size}: use a positive integer.")
    _check_out(out, options["resume"])
    max_memory_mib = parse_memory(max_memory) if max_memory else None
    device = resolve_device(device, allow_meta=False)
    strategy_for("inference", strategy)  # a bad strategy is refused before any work
    if budget_s >= MIN_BUDGET_S and storage is not None:  # a bad URL is refused before profiling
        from .engine.storage import open_storage

        open_storage(storage, heartbeat_s=heartbeat)
    out = out or Path("runs") / f"{file.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    tune_options = TuneOptions(budget_s=budget_s, out_dir=out, strategy=strategy, storage=storage, device=device,
                               study_name=options.pop("study"), command=_command(), p99_ms=options.pop("p99_ms"),
                               traffic_file=str(traffic) if traffic else None, heartbeat_s=heartbeat, started=started,
                               max_memory_mib=max_memory_mib, **options)
    left = max(budget_s, MIN_BUDGET_S) - (time.monotonic() - started)
    workload = load_workload(file, batch_size=batch_size, input_shapes=input_shape, input_dtypes=input_dtype,
                             timeout=max(left, 5.0), limit=f"the {budget_s:.0f} s --budget", device=device,
                             tolerance=tune_options.effective_tolerance, budget_s=budget_s)
    _STATE["run_dir"] = out
    return workload, tune_options


def _print_result(result: Any, budget_s: float) -> None:
    from .report import write_report
    from .result_lines import tune_lines, wall_line

    for line in tune_lines(result, write_report(result.run_dir), budget_s) + [wall_line(_started(), budget_s)]:
        typer.echo(line)


# the flags only one mode reads; given to the other, one line says so instead of dropping them
_MODE_FLAGS = {"infer": ("--level", "--input-shape", "--input-dtype", "--traffic", "--p99-ms", "--export"),
               "train": ("--nproc",)}


def _refuse_other_modes_flags(mode: str, given: dict[str, Any]) -> None:
    if mode not in _MODE_FLAGS:
        raise _bad(f"`--mode` got {mode!r}: use infer (a model.py) or train (a train.py).")
    other = "train" if mode == "infer" else "infer"
    wrong = [flag for flag in _MODE_FLAGS[other] if given.get(flag) is not None]
    if "--export" in wrong:  # the one flag whose reason is not obvious from its name
        raise _bad("`--export` saves an inference artifact: it only applies to --mode infer; drop it with --mode "
                   "train (training plans are applied with autotiacc.training.apply).")
    if wrong:
        many = len(wrong) > 1
        raise _bad(f"{', '.join(f'`{w}`' for w in wrong)} only appl{'y' if many else 'ies'} to --mode {other}; drop "
                   f"{'them' if many else 'it'} with --mode {mode}.")


def _started() -> float:
    """When the command started (time.monotonic()): the budget counts from there."""
    return _STATE["started"] or time.monotonic()


def _command() -> str:
    """The command line as run.json records it: never a storage password."""
    from .engine.storage import redact

    return redact(" ".join(["autotiacc", *sys.argv[1:]]))


def _check_out(out: Optional[Path], resume: bool) -> None:
    if out is not None and out.exists() and not out.is_dir():
        raise _bad(f"`--out` {out} is a file, not a folder; give a folder for the run (created if missing).")
    if resume and out is None:
        raise _bad("`--resume` needs `--out DIR`, the run directory of the tune to continue.")
    if resume and not (Path(out) / "run.json").exists():
        raise _bad(f"`--resume`: {out} holds no tune to continue (no run.json); drop --resume to start one.")
    if resume:  # what a resume reads back must be readable: one line now, not a traceback later
        from .report.inference import read_json_file

        read_json_file(Path(out) / "run.json")
    if resume and (Path(out) / "study.db").is_file() and not _is_sqlite_db(Path(out) / "study.db"):
        raise _bad(f"`--resume`: {Path(out) / 'study.db'} is not a readable SQLite database (damaged); restore it "
                   "from a copy, or start a new tune with another --out.")
    check_output_dir(out or Path("runs"))  # writable (the default goes under runs/), before any work


def _is_sqlite_db(path: Path) -> bool:
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            con.close()
    except sqlite3.Error:
        return False


def _bad(msg: str) -> AutotiaccError:
    from .errors import UserInputError

    return UserInputError(msg)


@app.command()
@guarded
def report(run_dir: Optional[Path] = typer.Argument(None, help="a tune's run directory"),
           storage: Optional[str] = typer.Option(None, "--storage", help="render a shared study from its "
                                                 "Optuna storage URL instead of a run directory"),
           study: str = typer.Option("autotiacc", "--study", help="study name inside --storage"),
           out: Optional[Path] = typer.Option(None, "--out", "-o", help="with --storage: where to write "
                                              "(default runs/<study>-report)")) -> None:
    """Re-render report.md, report.html and plots from a run directory alone (or a shared storage)."""
    from .report import write_report
    from .report import is_training_run, write_training_report

    if storage is not None:
        from .engine.storage import materialize_run_dir

        if run_dir is not None:
            raise _bad(f"give either RUN_DIR ({run_dir}) or `--storage`, not both; with --storage use --out DIR.")
        out = out or Path("runs") / f"{study}-report"
        check_output_dir(out)
        run_dir = written_or_error(lambda: materialize_run_dir(storage, study, out), out, what="the study's records")
    elif run_dir is None:
        raise _bad("`RUN_DIR` is missing: give a tune's run directory, or --storage URL --study NAME.")
    elif run_dir.is_dir():  # the report is written into it
        check_output_dir(run_dir, flag="`RUN_DIR`", fix="the report is written into it: copy the run directory to a "
                         "folder you can write, and report the copy")
    written = written_or_error(lambda: (write_training_report if is_training_run(run_dir) else write_report)(run_dir),
                               run_dir, what="the report")
    for path in written.values():
        typer.echo(str(path))


@app.command()
@guarded
def env(device: str = typer.Option("auto", "--device", help="auto, cpu or cuda[:N]")) -> None:
    """Print the hardware/software fingerprint a plan records, and the GPU (or that there is none)."""
    from .device import resolve_device
    from .hardware import env_lines

    for line in env_lines(resolve_device(device, allow_meta=False)):
        typer.echo(line)


@app.command()
@guarded
def compare(
    runs: list[Path] = typer.Argument(..., help="run directories and/or experiment CSV files"),
    out: Path = typer.Option(Path("comparison"), "--out", "-o", help="folder for compare.md/.html/.csv + plots"),
) -> None:
    """Table and plots across tuning runs and experiment CSVs."""
    from .report import write_comparison

    check_output_dir(out)
    for path in written_or_error(lambda: write_comparison(runs, out), out, what="the comparison").values():
        typer.echo(str(path))


def _tune_training(file: Path, *, quiet: bool, **kwargs: Any) -> None:
    """`tune --mode train`: the training tuner (autotiacc.training) with the same progress bar."""
    from .durations import parse_duration
    from .report import write_training_report
    from .result_lines import training_lines, wall_line
    from .training.tuner import tune_training_file

    budget_s = parse_duration(kwargs["budget"])
    bar = ProgressBar(budget_s, quiet)
    started = _started()
    try:
        result = tune_training_file(file, **{**kwargs, "study": None if kwargs["study"] == "autotiacc" else
                                             kwargs["study"]}, command=_command(), progress=bar, started=started)
    finally:
        bar.close()
    for line in training_lines(result, write_training_report(result.run_dir), budget_s, kwargs["nproc"]):
        typer.echo(line)
    typer.echo(wall_line(started, budget_s))


def _export_hook(run_dir: Path, workload) -> bool:
    """After the plan is written: export its artifact; a failure is reported, the tune kept."""
    from .inference.artifacts import export_for_plan

    try:
        entry = export_for_plan(run_dir / "plan.json", workload)
    except Exception as exc:  # noqa: BLE001 - the tune's results stand; the plan records the error
        typer.echo(f"autotiacc: export failed, recorded in plan.json: {type(exc).__name__}: {exc}", err=True)
        return False
    typer.echo(f"artifact: {run_dir / entry['file']} ({entry['format']}, sha256 {entry['sha256'][:16]}..., "
               f"built in {entry['build_s']:.0f}s; load with autotiacc.load_artifact)")
    return True


@app.command()
@guarded
def verify(
    plan: Path = typer.Argument(..., help="plan.json (or its run directory)"),
    file: Path = typer.Argument(..., help="the model file the plan was tuned for"),
    tolerance: float = typer.Option(0.25, "--tolerance", help="fraction of the recorded speed-up that may be "
                                    "lost before it counts as drift"),
    measure_s: float = typer.Option(3.0, "--measure-s", help="seconds of timing windows (the plan and eager each "
                                    "in its own process, in turns)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda[:N]; default: the device the plan "
                                         "was made for (an error if this machine has none)"),
) -> None:
    """Re-measure a saved plan here vs the eager baseline; exit 1 on drift (speed, accuracy, hardware)."""
    from .inference.verify import verify_plan
    from .machine_load import unreliable_text

    result = verify_plan(plan, file, tolerance=tolerance, measure_s=measure_s, device=device)
    for line in result.lines:
        typer.echo(line)
    if result.ok:
        busy = f", but {unreliable_text(result.measured.get('reliability'))}: re-run it on a quiet machine" \
            if unreliable_text(result.measured.get("reliability")) else ""
        typer.echo(f"verify: OK — the plan holds on this machine{busy}.")
        return
    for problem in result.problems:
        typer.echo(f"verify: DRIFT: {problem}", err=True)
    raise typer.Exit(1)


@app.command("profile")
@guarded
def profile_cmd(
    file: Path = typer.Argument(..., help="model.py, TorchScript .pt/.ts, or torch.export .pt2"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="batch size to profile"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="directory for profile.json, or a .json file"),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", help="e.g. 1x3x224x224 (repeatable)"),
    input_dtype: Optional[list[str]] = typer.Option(None, "--input-dtype", help="dtype per input (default float32)"),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available, else CPU), cpu or cuda[:N]"),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="also lower each group alone and measure its error"),
    tolerance: float = typer.Option(2e-2, "--tolerance", help="relative L2 error a lowered group may add"),
    top: int = typer.Option(10, "--top", help="modules to list"),
) -> None:
    """Per-module time share (self and inclusive), FLOPs, bytes and peak memory of FILE."""
    if batch_size is not None and batch_size <= 0:  # flags and the output first: refused before torch loads
        raise _bad(f"`--batch-size` got {batch_size}: use a positive integer.")
    if not tolerance > 0:
        raise _bad(f"`--tolerance` got {tolerance}: use a positive number, e.g. 0.02.")
    if out is not None and out.suffix == ".json":
        check_output_file(out)
    else:
        check_output_dir(out or Path("runs"), accept="a folder (created if missing) or a .json file name")
    from .device import resolve_device
    from .engine.workers import run_isolated
    from .inference.layer_precision import CHECKS
    from .inference.workload import CHECK_TIMEOUT_S, load_workload
    from .knobs.precision_groups import LOWERED_MODES
    from .profiling.schema import PROFILE_FILE, save_profile, summary_lines
    from .profiling.search import run_profile

    device = resolve_device(device, allow_meta=False)
    workload = load_workload(file, batch_size=batch_size, input_shapes=input_shape, input_dtypes=input_dtype,
                             timeout=CHECK_TIMEOUT_S, limit="autotiacc profile's limit", device=device,
                             tolerance=tolerance)
    # in a worker process, in the environment of this command, as in a tune
    prof, why = run_profile(workload, run_isolated, device=device, tolerance=tolerance, checks=CHECKS, target_s=1.5,
                            modes=list(LOWERED_MODES) if sensitivity else [], timeout=900)
    if prof is None:
        raise _bad(f"profiling {file} failed in its process: {why}")
    out = out or Path("runs") / f"{workload.name}-profile-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out if out.suffix == ".json" else out / PROFILE_FILE
    for line in summary_lines(prof, top):
        typer.echo(line)
    typer.echo(f"written: {write_or_keep(lambda path: save_profile(prof, path), out, what='the profile')}")


def main() -> None:
    _STATE["started"] = time.monotonic()  # imports (torch, optuna) on a loaded machine count too
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning:torch.onnx")
    app()


if __name__ == "__main__":
    main()

