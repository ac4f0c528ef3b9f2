"""Deployable artifacts: the plan's model saved in a form production loads without autotiacc's
search dependencies (no Optuna, no tuner), named in the plan together with its sha256.

Which form depends on the plan's backend:
- `compile`      -> AOTInductor package (`torch._inductor.aoti_compile_and_package`), C++ compiled;
- `torchscript`  -> TorchScript archive (traced, frozen);
- an engine (`autotiacc.engines`: `onnxruntime`, `openvino`) -> the engine's own file (ONNX; OpenVINO
  IR, `.xml` with its `.bin` beside it), saved and loaded by the engine's module with the options that
  were measured (`engine_options` in the entry);
- `eager`        -> `torch.export` program (plain PyTorch);
- int8 plans torch.export cannot carry (see `artifact_format`) -> TorchScript.

Precision and layout knobs are baked into the artifact (input casts, autocast, output dtypes);
runtime settings (threads, inference_mode) are not part of a graph, so the plan's entry lists
them for the serving code. The artifact is specialised to the tuned input shapes.

CUDA graphs (`cuda_graphs` around eager/TorchScript, or torch.compile's `reduce-overhead` and
`max-autotune`) are no part of any file format: a graph is a capture of kernel launches at fixed
addresses on one GPU, made in the serving process. The entry records them (`cuda_graphs`) and
`load_artifact` captures them again on CUDA (`knobs.cuda_graphs.CUDAGraphRunner`, the runner the
tune measured; an AOTInductor package is loaded with its single-threaded runner, whose launches
can be captured). Where there is no CUDA it runs without them and warns that the plan's speed-up
was measured with them.

Loading checks the sha256 recorded in the plan *before* handing the file to torch (and of every
file beside it that the artifact needs, `extra_files`): a tampered or swapped artifact raises
`PlanError`. `torch.export.load` would unpickle payloads an archive
marks as pickled (weights_only=False), so export archives holding any are refused as well.
An AOTInductor package is native code: the hash check is what guards it; keep plan.json
where only you can write it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
import warnings
from pathlib import Path
from typing import Any

from ..device import cuda_available, is_cuda, to_device
from ..errors import HardwareMismatchWarning, PlanError
from ..torch_compat import aoti_compile_and_package, aoti_load_package, tree_flatten, tree_unflatten

EXPORT_TIMEOUT_S = 1800.0  # an AOTInductor build of a large model on 2 cores; not counted against --budget
TORCH_FORMATS = {"aoti": "artifact.aoti.pt2", "export": "artifact.export.pt2", "torchscript": "artifact.ts"}


def formats() -> dict[str, str]:
    """Artifact format -> file name: PyTorch's own, and each engine's (`autotiacc.engines`)."""
    from ..engines import engines

    return {**TORCH_FORMATS, **{e.artifact_format: e.artifact_file for e in engines().values()}}


def artifact_format(knobs: dict) -> str:
    """The artifact form a plan with these knob configs is exported as: by its execution backend,
    except int8 plans that torch.export cannot carry, which are TorchScript: `int8_dynamic`
    (torch.export cannot flatten torch.ao's packed int8 params, so no AOTInductor package either)
    and eager `int8_weights` (torch.export saves torchao's int8 weights pickled; loading refuses)."""
    backend = knobs["execution"].backend
    mode = getattr(knobs.get("precision"), "mode", "")
    if (mode == "int8_dynamic" and backend in ("eager", "compile")) or (mode == "int8_weights" and backend == "eager"):
        return "torchscript"
    from ..engines import engine

    if (eng := engine(backend)) is not None:
        return eng.artifact_format
    return {"compile": "aoti", "torchscript": "torchscript"}.get(backend, "export")


def files_problem(art: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with the artifact at `art` and the files beside it that it needs, measured
    against the plan's `entry` (their sha256); None when every file is there as recorded."""
    from ..engines import by_format

    actual = sha256_of(art)
    if actual != entry.get("sha256"):
        return (f"{art}: sha256 {actual[:16]}... does not match the plan's {str(entry.get('sha256'))[:16]}...; "
                "the artifact was modified or swapped")
    eng = by_format(entry.get("format"))
    recorded = entry.get("extra_files") or {}
    for companion in eng.companions(art) if eng else []:
        if companion.name not in recorded:
            return f"{art}: the plan records no sha256 for {companion.name}, which the artifact needs"
        if not companion.is_file():
            return f"{companion}: missing beside {art.name}"
        if sha256_of(companion) != recorded[companion.name]:
            return f"{companion}: sha256 does not match the plan's; the artifact was modified or swapped"
    return None


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _deployable(model: Any, knobs: dict, example_inputs: tuple, device: str, state: Any = None):
    """An nn.Module that is `model` with the graph-level knobs (precision, layout) applied to
    `state` (a `BuildState`; a new one by default) and outputs cast back to the model's dtypes,
    so it is a drop-in replacement when exported. Engine options and int8 notes stay in `state`."""
    import torch

    from ..knobs import BuildState, all_knobs

    with torch.no_grad():
        ref_dtypes = [t.dtype if isinstance(t, torch.Tensor) else None
                      for t in tree_flatten(model(*example_inputs))[0]]
    state = state or BuildState(model=model, example_inputs=tuple(example_inputs), device=device)
    for knob in all_knobs():
        if knob.name not in ("runtime", "execution"):  # runtime is serving config, execution is the export
            knob.apply(state, knobs.get(knob.name, knob.default()))

    state.notes["export_scope"] = "model"  # the module path of `state.model` in the exported graph

    class Deployable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = state.model

        def forward(self, *inputs):
            inputs = state.cast_inputs(inputs)
            with contextlib.ExitStack() as stack:
                for make in state.call_contexts:
                    stack.enter_context(make())
                out = self.model(*inputs)
            leaves, spec = tree_flatten(out)
            if len(leaves) == len(ref_dtypes):
                leaves = [t.to(d) if isinstance(t, torch.Tensor) and d is not None and t.is_floating_point()
                          and t.dtype != d else t for t, d in zip(leaves, ref_dtypes)]
            return tree_unflatten(leaves, spec)

    return Deployable().eval()


def export_artifact(plan, workload, run_dir: str | Path) -> dict[str, Any]:
    """Build the plan's model, save it as the artifact its backend allows, and return the plan
    entry {"format", "file", "sha256", ...}. Raises on failure (the caller records it)."""
    import torch

    from ..engines import by_format
    from ..knobs import BuildState

    run_dir = Path(run_dir)
    fmt = artifact_format(plan.knobs)
    path = run_dir / formats()[fmt]
    device = plan.target_device()  # a CUDA plan exported where there is no CUDA: PlanError, says why
    model = to_device(workload.build_model(), device)
    inputs = to_device(workload.example_inputs(), device)
    t0 = time.perf_counter()
    # an engine that calibrates (int8_static) replays the plan's scales, else the tune's data
    calibrates = getattr(plan.knobs.get("precision"), "mode", "") == "int8_static"
    calibration = [x for x, _ in to_device(list(workload.test_data()), device)] if calibrates else None
    state = BuildState(model=model, example_inputs=tuple(inputs), device=device, recorded=plan.engine_records(),
                       calibration=calibration)
    wrapper = _deployable(model, plan.knobs, inputs, device, state)
    eng = by_format(fmt)
    tmp = path.with_name(".tmp-" + path.name)  # torch wants the .pt2 suffix
    pairs = [(tmp, path)] + (list(zip(eng.companions(tmp), eng.companions(path))) if eng else [])
    try:
        engine_entry = _save(fmt, wrapper, inputs, tmp, plan.knobs["execution"], device, state)
        for made, final in pairs:
            made.replace(final)
    finally:
        for made, _ in pairs:
            made.unlink(missing_ok=True)  # half-written on failure
    runtime = dataclasses.asdict(plan.knobs["runtime"]) if "runtime" in plan.knobs else {}
    entry = {"format": fmt, "file": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size,
             "build_s": round(time.perf_counter() - t0, 2), "torch": torch.__version__, "device": device,
             "input_shapes": [list(t.shape) for t in inputs],
             "input_dtypes": [str(t.dtype).replace("torch.", "") for t in inputs], "runtime": runtime,
             **(engine_entry or {})}
    if len(pairs) > 1:  # files the artifact needs beside it (an OpenVINO IR's weights)
        entry["extra_files"] = {final.name: sha256_of(final) for _, final in pairs[1:]}
    graphs = cuda_graphs_entry(plan.knobs["execution"])
    if graphs:
        entry["cuda_graphs"] = graphs
    return entry


def cuda_graphs_entry(execution) -> dict[str, Any] | None:
    """What the artifact entry records about the plan's CUDA graphs (None when it has none):
    they are captured again at load, since no saved format holds them (see the module doc)."""
    from ..knobs.execution import compile_options

    if execution.cuda_graphs:
        source = f"cuda_graphs around the {execution.backend} runner"
    elif execution.backend == "compile" and compile_options(execution).get("triton.cudagraphs"):
        source = f"torch.compile mode {execution.compile_mode}"
    else:
        return None
    return {"capture_at_load": True, "source": source,
            "why": "a CUDA graph is captured in the serving process on its GPU; no saved format holds one"}


def _save(fmt: str, wrapper, inputs: tuple, tmp: Path, execution, device: str, state=None) -> dict[str, Any] | None:
    import torch

    from ..engines import by_format

    with torch.no_grad():
        if (eng := by_format(fmt)) is not None:  # the engine writes the artifact it measured
            return eng.save(wrapper, inputs, tmp, execution, device, state=state)
        elif fmt == "torchscript":
            traced = torch.jit.freeze(torch.jit.trace(wrapper, inputs, check_trace=False))
            torch.jit.save(traced, str(tmp))
        else:
            program = torch.export.export(wrapper, inputs)
            if fmt == "aoti":
                mode = execution.compile_mode
                options = {"freezing": True} if execution.freezing else {}
                if mode in ("max-autotune", "max-autotune-no-cudagraphs"):
                    options["max_autotune"] = True
                aoti_compile_and_package(program, str(tmp), inductor_configs=options)
            else:
                torch.export.save(program, str(tmp))


class ExportFailed(RuntimeError):
    """The artifact could not be built or saved (the child's error, as recorded in the plan)."""


def export_for_plan(plan_path: str | Path, workload) -> dict[str, Any]:
    """Export the artifact of the plan at `plan_path` next to it and record it in the plan
    (`extra["artifact"]`). A failure is recorded there too (`{"error": ...}`) and re-raised."""
    from ..engine.workers import run_isolated
    from .plan import load_plan

    plan_path = Path(plan_path)
    if plan_path.is_dir():
        plan_path = plan_path / "plan.json"
    plan = load_plan(plan_path)
    # in a child: it builds the user's model (their code never runs in the tuner's process)
    outcome = run_isolated(export_artifact, plan, workload, plan_path.parent, timeout=EXPORT_TIMEOUT_S)
    if not outcome.ok:  # recorded in the plan, then reported by the caller
        plan.extra["artifact"] = {"format": artifact_format(plan.knobs), "error": outcome.error.strip()[:500]}
        plan.save(plan_path)
        raise ExportFailed(outcome.error.strip()[:500])
    entry = outcome.value
    plan.extra["artifact"] = entry
    plan.save(plan_path)
    return entry


def _entry_for(path: Path) -> tuple[Path, dict[str, Any]]:
    """Find the artifact and its plan entry from a run dir, a plan.json or the artifact file."""
    from .plan import load_plan

    if path.is_dir() or path.suffix == ".json":
        plan = load_plan(path)
        entry = plan.extra.get("artifact")
        where = path if path.is_dir() else path.parent
        if not entry or "file" not in entry:
            raise PlanError(f"{path}: the plan names no artifact" + (f" (export failed: {entry['error']})" if entry and
                            "error" in entry else "") + "; run `autotiacc tune ... --export`.")
        return where / entry["file"], entry
    plan_file = path.parent / "plan.json"
    if not plan_file.is_file():
        raise PlanError(f"{path}: no plan.json beside it, so its sha256 cannot be checked; keep the artifact "
                        "in its run directory or pass `sha256=` from the plan.")
    entry = load_plan(plan_file).extra.get("artifact") or {}
    if entry.get("file") != path.name:
        raise PlanError(f"{path}: {plan_file} does not name this file as its artifact "
                        f"(it names {entry.get('file')!r}); load the artifact the plan names.")
    return path, entry


def load_artifact(path: str | Path, *, sha256: str | None = None):
    """Load a deployable artifact after checking its sha256 against the plan's record.

    `path` is a run directory, its plan.json, or the artifact file itself (then the plan.json
    beside it, or `sha256=`, gives the expected hash). Returns a callable used like the model.
    """
    path = Path(path)
    if not path.exists():
        raise PlanError(f"`path` {path}: no such file or directory; give a run directory, plan.json or artifact.")
    if sha256 is not None and path.is_file() and path.suffix != ".json":
        fmt = next((f for f, name in formats().items() if path.name.endswith(name[len("artifact"):])), None)
        art, entry = path, {"sha256": sha256, "format": fmt}
    else:
        art, entry = _entry_for(path)
    if not art.is_file():
        raise PlanError(f"{art}: the artifact the plan names is missing; re-export with `autotiacc tune ... --export`.")
    problem = files_problem(art, entry)
    if problem:
        raise PlanError(f"{problem}. Refusing to load it; re-export it.")
    graphs_on = _graphs_device(art, entry)
    runner = _load_verified(art, entry.get("format"), entry, single_threaded=graphs_on is not None)
    if graphs_on is None:
        return runner
    from ..knobs.cuda_graphs import CUDAGraphRunner

    return CUDAGraphRunner(runner, graphs_on)  # captured on the first call with each input signature


def _graphs_device(path: Path, entry: dict[str, Any]) -> str | None:
    """The CUDA device to capture the artifact's graphs on; None when it records none or there is
    no CUDA to capture them on (then it says so: the plan's figures were measured with them)."""
    graphs = entry.get("cuda_graphs")
    if not graphs:
        return None
    device = str(entry.get("device") or "cpu")
    if is_cuda(device) and cuda_available():
        return device
    where = f"it was exported for {device}" if not is_cuda(device) else "this process sees no CUDA device"
    warnings.warn(f"{path}: the plan replays its model as a CUDA graph ({graphs.get('source', 'cuda_graphs')}), "
                  f"which is captured at load on a GPU, but {where}: it runs without one, so the plan's speed-up "
                  "may not hold here.", HardwareMismatchWarning, stacklevel=3)
    return None


def _load_device(entry: dict[str, Any]) -> str:
    """Where a TorchScript artifact's weights go: the device it was exported on, if this process has it."""
    device = str(entry.get("device") or "cpu")
    return device if device.startswith("cuda") and cuda_available() else "cpu"


def _load_verified(path: Path, fmt: str | None, entry: dict[str, Any], *, single_threaded: bool = False):
    import torch

    if fmt == "aoti":
        # the AOTI runtime's worker threads break stream capture; its single-threaded runner can be
        # captured as a CUDA graph (pytorch PR 148601)
        return aoti_load_package(str(path), run_single_threaded=single_threaded)
    if fmt == "export":
        _refuse_pickled_payloads(path)
        return torch.export.load(str(path)).module()
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location=_load_device(entry))
        # optimize_for_inference (as the torchscript backend measured) does not survive
        # save/load ("required keyword attribute 'value'"), so it is applied after loading.
        return torch.jit.optimize_for_inference(module)
    from ..engines import by_format

    if (eng := by_format(fmt)) is not None:
        return eng.load(path, entry, _load_device(entry))
    raise PlanError(f"{path}: unknown artifact format {fmt!r}; expected one of {', '.join(formats())}.")


def _refuse_pickled_payloads(path: Path) -> None:
    """Refuse a torch.export archive that would make torch unpickle anything but plain tensors:
    weights or constants flagged `use_pickle`, custom/opaque objects, or a payload that
    `torch.load(weights_only=True)` rejects (torch falls back to weights_only=False there)."""
    import io
    import json
    import zipfile

    import torch
    from torch.export.pt2_archive.constants import CUSTOM_OBJ_FILENAME_PREFIX, OPAQUE_OBJ_FILENAME_PREFIX

    def refuse(what: str) -> PlanError:
        return PlanError(f"{path}: {what}; refusing to load an export archive that needs unpickling.")

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if name.endswith("_config.json") and "/data/" in name:
                    for fqn, meta in (json.loads(archive.read(name)).get("config") or {}).items():
                        target = str(meta.get("path_name", ""))
                        if meta.get("use_pickle") or target.startswith((CUSTOM_OBJ_FILENAME_PREFIX,
                                                                        OPAQUE_OBJ_FILENAME_PREFIX)):
                            raise refuse(f"`{fqn}` is stored pickled")
                elif name.endswith(".pt"):
                    try:
                        torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                    except Exception as exc:  # noqa: BLE001 - anything but plain tensors
                        raise refuse(f"{name} is not a weights-only payload ({type(exc).__name__})") from None
    except zipfile.BadZipFile:
        raise PlanError(f"{path}: not a torch.export archive (bad zip).") from None
