"""Start N rank processes (torchrun-compatible environment) for one trial, with a timeout.

Each rank is a core sandbox worker (`engine.workers.Worker`), so ranks and inference trials
share one supervisor and one classification of how a process ended. A rank may start its
own DataLoader workers. The first rank that fails, dies or overruns the timeout ends the
trial: the other ranks are killed at once (they would otherwise wait in a collective forever)
and the failure names the rank and its cause.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Callable

from ..engine.status import CallStatus
from ..engine.workers import Outcome, Worker

STACKS = 2  # ranks whose Python stacks a timeout reports (64 ranks' took 64 s)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(fn: Callable[..., Any], nproc: int, *args: Any, timeout: float, log_dir: str | Path | None = None,
              pid_file: str | Path | None = None, **kwargs: Any) -> tuple[Outcome, list[Outcome]]:
    """Run `fn(*args, **kwargs)` in `nproc` rank processes; returns (overall, per-rank outcomes).

    RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT are set as torchrun sets them.
    `pid_file` receives one rank pid per line once all ranks run (for monitoring or tests).
    """
    port = free_port()
    workers: list[Worker] = []
    t0 = time.perf_counter()
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    results: list[Outcome | None] = [None] * nproc
    failure: Outcome | None = None
    try:
        for rank in range(nproc):
            env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            worker = Worker(env=env, log_path=Path(log_dir) / f"rank{rank}.log" if log_dir else None)
            workers.append(worker)
            try:
                worker.submit(fn, args, kwargs, None)
            except BrokenPipeError:  # died at start; its exit code tells why below
                pass
        if pid_file:
            Path(pid_file).write_text("".join(f"{w.pid}\n" for w in workers))
        deadline = t0 + max(timeout, 0.1)
        while failure is None and any(r is None for r in results):
            if time.perf_counter() > deadline:
                late = [r for r in range(nproc) if results[r] is None]
                # a stack takes up to a second to come: a few ranks' tell where they hung
                where = "\n".join(f"rank {r}: {workers[r].stack()}" for r in late[:STACKS])
                failure = Outcome(CallStatus.TIMEOUT, error=f"rank {late[0]} gave no result within {timeout:.0f} s; all ranks "
                                  "were killed", traceback=where, seconds=time.perf_counter() - t0)
                break
            for rank in range(nproc):
                if results[rank] is None:
                    results[rank] = _collect(workers[rank], rank, t0, wait=0.05)
                res = results[rank]
                if res is not None and not res.ok:
                    failure = _root_cause(workers, results, rank)
                    break
    finally:
        for worker in workers:
            if failure is None:
                worker.close(grace_s=10)
            worker.kill()
    per_rank = [r or Outcome(CallStatus.KILLED, error="killed after another rank failed") for r in results]
    if failure is not None:
        return failure, per_rank
    return Outcome(CallStatus.OK, value=[r.value for r in per_rank], seconds=time.perf_counter() - t0), per_rank


def _collect(worker: Worker, rank: int, t0: float, *, wait: float) -> Outcome | None:
    """This rank's report, its death (named by rank), or None while it runs."""
    out = worker.poll(wait)
    if out is None:
        return None
    out.seconds = time.perf_counter() - t0
    if not out.ok and out.error.startswith("process "):
        out.error = f"rank {rank} {out.error[len('process '):]}"
    return out


def _root_cause(workers: list[Worker], results: list, first: int, grace_s: float = 2.0) -> Outcome:
    """When one rank fails, its peers soon fail too (a collective loses its partner). Wait a
    moment and blame a rank that *died* over ranks that merely saw the connection drop."""
    deadline = time.perf_counter() + grace_s
    while time.perf_counter() < deadline:
        for rank in range(len(workers)):
            if results[rank] is None:
                results[rank] = _collect(workers[rank], rank, time.perf_counter(), wait=0.0)
        if any(r is not None and r.status in ("crash", "oom") for r in results):
            break
        time.sleep(0.05)
    failed = [(rank, r) for rank, r in enumerate(results) if r is not None and not r.ok]
    failed.sort(key=lambda rr: (rr[1].status not in ("crash", "oom"), rr[0] != first))
    rank, res = failed[0]
    msg = res.error if res.error.startswith(f"rank {rank}") else f"rank {rank}: {res.error}"
    others = [f"rank {k} then failed: {r.error.strip()[:160]}" for k, r in failed[1:]]
    return Outcome(res.status, error="; ".join([msg, *others]), traceback=res.traceback, seconds=res.seconds)

