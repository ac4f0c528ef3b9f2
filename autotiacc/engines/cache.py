"""What a process that builds many candidates of one model reuses between them.

A trial worker builds candidate after candidate of the same model; many differ only in what
does not change the graph (an ONNX Runtime session option, a thread count, the precision knob's
`int8_static`, which quantizes the same fp32 export). `BuildCache` keeps the costly, pure parts
of a build (the exported ONNX graph, its calibration ranges, a quantized graph, a traced
TorchScript module) by a key naming everything they depend on: the caller's `reuse_key` (the
workload's token and the device; set only by the tuner's own processes, never by `plan.apply`,
whose model a user may have changed since) and the graph-changing knob configs.

Entries live in memory (the last few, bounded in bytes) and, where the tune names a folder
(`BUILD_CACHE_ENV`, set for the final re-measurement's fresh processes), on disk too, so a
finalist and its twin (see `knobs.ort`) export once. Each hit adds the seconds its first build
took to `saved_s`, which the candidate's notes report.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

BUILD_CACHE_ENV = "AUTOTIACC_BUILD_CACHE"
MEMORY_BYTES = 512 << 20  # ~5 resnet50 fp32 exports; older entries go first
MEMORY_OBJECTS = 1  # a live object (a TorchScript module) holds a copy of the model's weights


def digest(key: Any) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()[:32]


class BuildCache:
    """bytes (memory and disk) and live objects (memory only) by key; see the module doc."""

    def __init__(self) -> None:
        self._bytes: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._objects: OrderedDict[str, tuple[Any, float]] = OrderedDict()
        self.hits = 0
        self.saved_s = 0.0

    def data(self, key: Any, make: Callable[[], bytes]) -> bytes:
        """The bytes built by `make()` for `key` (None: not reusable, always built)."""
        return self._get(self._bytes, key, make, disk=True)

    def obj(self, key: Any, make: Callable[[], Any]) -> Any:
        """A live object built by `make()` for `key`, kept in this process only."""
        return self._get(self._objects, key, make, disk=False)

    def _get(self, store: OrderedDict, key: Any, make: Callable[[], Any], *, disk: bool) -> Any:
        if key is None:
            return make()
        name = digest(key)
        found = store.get(name) or (self._disk_get(name) if disk else None)
        if found is None:
            t0 = time.perf_counter()
            found = (make(), time.perf_counter() - t0)
            if disk:
                self._disk_put(name, *found)
        else:
            self.hits += 1
            self.saved_s += found[1]  # what building it again would have cost
        store[name] = found
        store.move_to_end(name)
        while len(self._objects) > MEMORY_OBJECTS:
            self._objects.popitem(last=False)
        while len(self._bytes) > 1 and sum(len(v) for v, _ in self._bytes.values()) > MEMORY_BYTES:
            self._bytes.popitem(last=False)
        return found[0]

    @staticmethod
    def _folder() -> Path | None:
        where = os.environ.get(BUILD_CACHE_ENV)
        return Path(where) if where else None

    def _disk_get(self, name: str) -> tuple[bytes, float] | None:
        folder = self._folder()
        if folder is None or not (folder / name).is_file():
            return None
        try:
            seconds = float((folder / f"{name}.s").read_text())
            return (folder / name).read_bytes(), seconds
        except (OSError, ValueError):
            return None  # half-written by a process killed meanwhile: build it again

    def _disk_put(self, name: str, value: bytes, seconds: float) -> None:
        folder = self._folder()
        if folder is None:
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path, payload in ((folder / f"{name}.s", str(seconds).encode()), (folder / name, value)):
                tmp = path.with_name(f".{path.name}.{os.getpid()}")
                tmp.write_bytes(payload)
                tmp.replace(path)  # atomic: a reader sees the whole file or none (the data last)
        except OSError:
            pass  # a full or read-only disk costs the reuse, not the candidate


BUILDS = BuildCache()  # this process's


@contextlib.contextmanager
def shared_builds(run_dir: str | Path) -> Iterator[dict[str, str]]:
    """The environment that lets fresh processes share builds through `<run_dir>/cache/builds`,
    removed afterwards (exported graphs: hundreds of MB on big models)."""
    folder = Path(run_dir) / "cache" / "builds"
    try:
        yield {BUILD_CACHE_ENV: str(folder)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # unless something else keeps its cache there
