"""Start N rank processes (torchrun-compatible environment) for one trial, with a timeout.

Each rank is the core sandbox (`isolation.start_child`): it reports ok/exception through a pipe.
Ranks are not daemonic, so they may start DataLoader workers. The first rank that fails,
dies or overruns the timeout ends the trial: the other ranks are killed at once (they would
otherwise wait in a collective forever) and the failure names the rank and its cause.
"""
from __future__ import annotations

import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

from ..isolation import Outcome, _kill, start_child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _died(code: int | None) -> str:
    if code is not None and code < 0:
        sig = signal.Signals(-code).name
        return f"died with {sig}" + (" (killed: out of memory or by a user)" if -code == signal.SIGKILL else "")
    return f"exited with code {code} before reporting"


def run_ranks(fn: Callable[..., Any], nproc: int, *args: Any, timeout: float, log_dir: str | Path | None = None,
              pid_file: str | Path | None = None, **kwargs: Any) -> tuple[Outcome, list[Outcome]]:
    """Run `fn(*args, **kwargs)` in `nproc` spawned ranks; returns (overall, per-rank outcomes).

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set as torchrun sets them.
    `pid_file` receives one rank pid per line once all ranks run (for monitoring or tests).
    """
    port = free_port()
    procs, pipes = [], []
    t0 = time.perf_counter()
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    for rank in range(nproc):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        log = str(Path(log_dir) / f"rank{rank}.log") if log_dir else None
        # not daemonic: a rank must be able to start its own DataLoader workers
        proc, recv = start_child(fn, args, kwargs, log_path=log, env=env, daemon=False)
        procs.append(proc)
        pipes.append(recv)
    if pid_file:
        Path(pid_file).write_text("".join(f"{p.pid}\n" for p in procs))
    results: list[Outcome | None] = [None] * nproc
    failure: Outcome | None = None
    try:
        deadline = t0 + max(timeout, 0.1)
        while failure is None and any(r is None for r in results):
            if time.perf_counter() > deadline:
                late = [r for r in range(nproc) if results[r] is None]
                failure = Outcome("timeout", error=f"rank {late[0]} gave no result within {timeout:.0f} s; all ranks "
                                  "were killed", seconds=time.perf_counter() - t0)
                break
            for rank in range(nproc):
                if results[rank] is None:
                    results[rank] = _collect(procs[rank], pipes[rank], rank, t0, wait=0.05)
                res = results[rank]
                if res is not None and not res.ok:
                    failure = _root_cause(procs, pipes, results, rank)
                    break
    finally:
        for proc in procs:
            if proc.is_alive():
                if failure is None:
                    proc.join(timeout=10)
                if proc.is_alive():
                    _kill(proc)
        for pipe in pipes:
            pipe.close()
    per_rank = [r or Outcome("killed", error="killed after another rank failed") for r in results]
    if failure is not None:
        return failure, per_rank
    return Outcome("ok", value=[r.value for r in per_rank], seconds=time.perf_counter() - t0), per_rank


def _collect(proc, pipe, rank: int, t0: float, *, wait: float) -> Outcome | None:
    """This rank's report, a crash if it died without one (a closed pipe polls readable), or None."""
    if pipe.poll(wait):
        try:
            status, value, err, tb = pipe.recv()
            return Outcome(status, value, err, tb, time.perf_counter() - t0)
        except EOFError:
            proc.join(timeout=5)
            return Outcome("crash", error=f"rank {rank} {_died(proc.exitcode)}", seconds=time.perf_counter() - t0)
    if not proc.is_alive():
        proc.join(timeout=1)
        return Outcome("crash", error=f"rank {rank} {_died(proc.exitcode)}", seconds=time.perf_counter() - t0)
    return None


def _root_cause(procs, pipes, results: list, first: int, grace_s: float = 2.0) -> Outcome:
    """When one rank fails, its peers soon fail too (a collective loses its partner). Wait a
    moment and blame a rank that *died* over ranks that merely saw the connection drop."""
    deadline = time.perf_counter() + grace_s
    while time.perf_counter() < deadline:
        for rank in range(len(procs)):
            if results[rank] is None:
                results[rank] = _collect(procs[rank], pipes[rank], rank, time.perf_counter(), wait=0.0)
        if any(r is not None and r.status in ("crash", "oom") for r in results):
            break
        time.sleep(0.05)
    failed = [(rank, r) for rank, r in enumerate(results) if r is not None and not r.ok]
    failed.sort(key=lambda rr: (rr[1].status not in ("crash", "oom"), rr[0] != first))
    rank, res = failed[0]
    msg = res.error if res.error.startswith(f"rank {rank}") else f"rank {rank}: {res.error}"
    others = [f"rank {k} then failed: {r.error.strip()[:160]}" for k, r in failed[1:]]
    return Outcome(res.status, error="; ".join([msg, *others]), traceback=res.traceback, seconds=res.seconds)

