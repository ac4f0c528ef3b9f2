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
from pathlib import Path
from typing import Any, Iterator

PROFILE_FILE = "profile.json"
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


@contextlib.contextmanager
def cached_profile(run_dir: Path, identity: dict[str, Any], fingerprint: dict[str, Any], *, key_extra: list[Any],
                   resume: bool, timeout_s: float = 0.0) -> Iterator[bool]:
    """Yields True when `run_dir/profile.json` holds a profile to reuse (this run's own on
    resume, else a cached one copied in); after a fresh profile, files it in the cache.

    A profile whose sensitivity analysis was cut short is reused only by runs that could not
    give it more time (`timeout_s` no larger than the one it had); a complete one by every run."""
    here = Path(run_dir) / PROFILE_FILE
    cached = cache_dir() / f"{profile_key(identity, fingerprint, key_extra)}.json"
    reuse = resume and here.is_file()
    if not reuse and cached.is_file():
        try:
            prof = json.loads(cached.read_text())
            if not _partial(prof) or float(prof.get("cache_timeout_s", 0)) >= timeout_s:
                shutil.copyfile(cached, here)
                reuse = True
        except (OSError, ValueError):
            reuse = False
    yield reuse
    if reuse or not here.is_file():
        return
    try:
        prof = json.loads(here.read_text())
        if any(str(u).startswith("the profile (") for u in prof.get("unavailable", [])):
            return  # a failed or timed-out profile is not worth keeping
        old = json.loads(cached.read_text()) if cached.is_file() else None
        if old is not None and not _partial(old) and _partial(prof):
            return  # never replace a complete analysis by one cut short
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**prof, "cache_timeout_s": timeout_s}))
        tmp.replace(cached)
    except (OSError, ValueError):
        pass  # the cache is an optimisation; a read-only home must not fail the tune


def _partial(prof: dict[str, Any]) -> bool:
    """The sensitivity analysis ran out of time before every group was analysed."""
    return any(g.get("skipped") for g in prof.get("sensitivity") or [])
