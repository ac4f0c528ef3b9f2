"""Which number types a device runs natively, read from the fingerprint, and the stage-1 order
that follows from it.

A CPU without bf16 units converts bf16 to fp32 and back around every operation: on an AVX2-only
EPYC bf16 autocast ran ~60x slower than eager on resnet50 (compile + freezing + bf16: 2.4 s per
image), while the same seeds won on a Xeon with avx512_bf16. Candidates that need a unit the
device lacks therefore go to the end of stage 1 (never removed: the measurement decides), and
the per-layer analysis checks the native types first.

- CPU: the flags of `hardware.cpu_flags()`; `AUTOTIACC_CPU_FLAGS` replaces them (tests, what-ifs).
- CUDA: the compute capability (bf16 and TF32 need sm80+, fp16 tensor cores sm70+, int8 sm72+,
  fp8 sm89+).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, TypeVar

# type -> CPU flags of the units that compute in it. int8 without a dot-product unit (VNNI, Arm's
# asimddp/i8mm) still runs integer kernels: fbgemm's AVX2 path (vpmaddubsw), qnnpack's NEON one.
X86_UNITS: dict[str, tuple[str, ...]] = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni", "avx2"),
}
ARM_UNITS: dict[str, tuple[str, ...]] = {"bf16": ("bf16",), "fp16": ("asimdhp",), "int8": ("i8mm", "asimddp", "asimd")}
ARM_FLAGS = ("asimd", "neon", "sve")  # any of them: an Arm CPU
# type -> lowest CUDA compute capability with tensor cores (or units) for it
CUDA_CAPABILITY: dict[str, tuple[int, int]] = {"tf32": (8, 0), "bf16": (8, 0), "fp16": (7, 0), "int8": (7, 2),
                                               "fp8": (8, 9)}
# precision mode (global or per layer) -> the type it computes in; absent: fp32 compute (int8_weights
# is weight-only: dequantised into fp32 matmuls)
MODE_TYPE = {"tf32": "tf32", "bf16_autocast": "bf16", "bf16_weights": "bf16", "fp16_autocast": "fp16",
             "fp16_weights": "fp16", "int8_dynamic": "int8", "int8_static": "int8", "bf16": "bf16",
             "fp16": "fp16"}  # last two: training

T = TypeVar("T")


@dataclass(frozen=True)
class NativeTypes:
    """The reduced types `device` ("cpu" or "cuda") computes in natively: `units`, type -> the
    units here that do it (CPU flags, or "sm86"); a type without any runs emulated or not at all.
    `needs`: type -> what would run it (the flags, or "sm80+"), for the reasons."""

    device: str
    units: dict[str, tuple[str, ...]] = field(default_factory=dict)
    needs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    name: str = "CPU"  # "CPU", or "GPU (sm75)"

    def runs(self, kind: str) -> bool:
        return kind == "fp32" or bool(self.units.get(kind))

    def mode_runs(self, mode: str) -> bool:
        """Whether precision mode `mode` (e.g. "bf16_autocast") computes in a native type."""
        return self.runs(MODE_TYPE.get(mode, "fp32"))

    def why_not(self, kind: str) -> str | None:
        """E.g. "bf16: this CPU has no avx512_bf16/amx_bf16"; None when `kind` runs natively."""
        if self.runs(kind):
            return None
        need = "/".join(self.needs.get(kind, ())) or "unit for it"
        if self.device == "cuda":
            return f"{kind}: this {self.name} has no {kind} tensor cores ({need})"
        return f"{kind}: this {self.name} has no {need}"

    def lacking(self, modes: Iterable[str]) -> list[str]:
        """One reason per type that `modes` compute in and this device lacks, in order."""
        kinds = dict.fromkeys(MODE_TYPE.get(m, "fp32") for m in modes)
        return [why for k in kinds if (why := self.why_not(k))]

    def summary(self) -> dict[str, list[str]]:
        """type -> its units here (empty: not native)."""
        return {k: list(self.units.get(k, ())) for k in self.needs}

    def seed_record(self, moved: list[dict[str, Any]]) -> dict[str, Any]:
        """run.json's and the plan's `seed_order`: the units found, the seeds moved last and why."""
        return {"native_types": self.summary(), "moved_last": moved}


def native_types(fp: dict[str, Any]) -> NativeTypes:
    """From a fingerprint (`hardware.fingerprint`): its `cpu_flags`, or on CUDA its `capability`."""
    if fp.get("device") == "cuda" and fp.get("capability"):
        return cuda_types(*(int(x) for x in str(fp["capability"]).split(".")[:2]))
    have = set(fp.get("cpu_flags") or ())
    table = ARM_UNITS if have.intersection(ARM_FLAGS) else X86_UNITS
    return NativeTypes("cpu", {k: tuple(f for f in flags if f in have) for k, flags in table.items()}, table)


def cuda_types(major: int, minor: int) -> NativeTypes:
    """Compute capability `major`.`minor`: the types its tensor cores (or units) compute in."""
    sm = f"sm{major}{minor}"
    return NativeTypes("cuda", {k: (sm,) for k, need in CUDA_CAPABILITY.items() if (major, minor) >= need},
                       {k: (f"sm{a}{b}+",) for k, (a, b) in CUDA_CAPABILITY.items()}, f"GPU ({sm})")


def native_types_here(device: str) -> NativeTypes:
    """This process's device, without the rest of the fingerprint (cheap: for worker processes)."""
    from .device import is_cuda
    from .hardware import cpu_flags

    if is_cuda(device):
        import torch

        return cuda_types(*torch.cuda.get_device_capability(device))
    return native_types({"device": "cpu", "cpu_flags": cpu_flags()})


def native_first(modes: Iterable[str], native: NativeTypes) -> list[str]:
    """`modes` (precision modes) computing in a native type first, then the others, each part
    in its order but fp16 last on a CPU: without units it ran 25-45x the fp32 forward, the
    costliest to analyse and the least likely to pay (experiments/results/trials_per_minute/session15)."""
    def late(m: str) -> tuple[bool, bool]:
        emulated = not native.mode_runs(m)
        return emulated, emulated and native.device == "cpu" and MODE_TYPE.get(m) == "fp16"

    return sorted(modes, key=late)


def by_hardware(items: list[T], native: NativeTypes, modes_of: Callable[[T], Iterable[str]]
                ) -> tuple[list[T], list[tuple[T, list[str]]]]:
    """`items` (stage-1 seeds) with those whose precision modes (`modes_of`) this device runs
    natively first, the others after them, each part in its given order; and the moved items
    with the reasons."""
    moved = [(it, why) for it in items if (why := native.lacking(modes_of(it)))]
    late = {id(it) for it, _ in moved}
    return [it for it in items if id(it) not in late] + [it for it, _ in moved], moved
