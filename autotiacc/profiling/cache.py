"""The profile and sensitivity pass is reused across runs of the same workload on the same
machine: it is filed under a user cache folder, keyed by the workload's identity (file hash,
parameter shapes, inputs) and the machine's fingerprint id.

`AUTOTIACC_CACHE_DIR` overrides the folder (default `$XDG_CACHE_HOME/autotiacc`, else
`~/.cache/autotiacc`); deleting it only costs the next tune its profile again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .schema import PROFILE_FILE, done_steps, partial

_IDENTITY_KEYS = ("kind", "param_shapes_sha256", "input_shapes", "input_dtypes", "batch_size", "file_sha256")


def cache_root() -> Path:
    """The user cache folder autotiacc keeps across runs (profiles, compiled graphs)."""
    return Path(os.environ.get("AUTOTIACC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "autotiacc"))


def cache_dir() -> Path:
    return cache_root() / "profiles"


def profile_key(identity: dict[str, Any], fingerprint: dict[str, Any], extra: list[Any]) -> str:
    from ..hardware import fingerprint_id

    what = {"workload": {k: identity.get(k) for k in _IDENTITY_KEYS}, "fingerprint": fingerprint_id(fingerprint),
            "extra": extra}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class CachedProfile:
    """What the cache holds for this run: `reuse` when `run_dir/profile.json` is a profile to
    use as it is (this run's own on resume, or a complete cached one); `start`, a partial
    cached profile this run's profiling step completes."""

    reuse: bool = False
    start: dict[str, Any] | None = None


@contextlib.contextmanager
def cached_profile(run_dir: Path, identity: dict[str, Any], fingerprint: dict[str, Any], *, key_extra: list[Any],
                   resume: bool) -> Iterator[CachedProfile]:
    """Yields what the cache holds for this run (see `CachedProfile`); after the profiling
    step, files `run_dir/profile.json` in the cache, complete or partial.

    A profile cut at its share of the budget is kept, marked `partial`; each later run of the
    same workload and machine spends its own share to complete it, until it is complete and
    then reused for free. A profile never replaces one that finished more of the work."""
    here = Path(run_dir) / PROFILE_FILE
    cached = cache_dir() / f"{profile_key(identity, fingerprint, key_extra)}.json"
    found = CachedProfile(reuse=resume and here.is_file())
    if not found.reuse and cached.is_file():
        try:
            prof = json.loads(cached.read_text())
            if partial(prof):
                found.start = prof
            else:
                shutil.copyfile(cached, here)
                found.reuse = True
        except (OSError, ValueError):
            pass
    yield found
    if found.reuse or not here.is_file():
        return
    try:
        prof = json.loads(here.read_text())
        if any(str(u).startswith("the profile (") for u in prof.get("unavailable", [])):
            return  # a failed or skipped profile is not worth keeping
        old = json.loads(cached.read_text()) if cached.is_file() else None
        if old is not None and done_steps(old) > done_steps(prof):
            return  # never replace an analysis by one that finished less of it
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(prof))
        tmp.replace(cached)
    except (OSError, ValueError):
        pass  # the cache is an optimisation; a read-only home must not fail the tune
