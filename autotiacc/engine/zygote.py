"""A fork server for worker processes: torch imported once, every worker forked from it.

Importing torch costs ~1.3 s of CPU here and a tune starts many processes: the trial worker
and its replacements, the profile, and the final re-measurement's fresh processes (three for
the baseline and one per candidate, all starting at once on two cores). A *zygote* is one
process, started like a worker (`python -c`, so the caller's `__main__` is never
re-imported), that imports torch and then only forks: each child runs the worker loop of
`worker_child.py` as a process started with `python -c` would, minus the import.

Forking is safe here because the zygote never runs an op: what makes a forked torch child
hang (an OpenMP pool started by a parallel region in the parent) and what breaks one (an
initialised CUDA context) never exist in it. Each child starts with the zygote's heap, the same
allocation history a fresh process has right after `import torch`.

Environment: variables read when a library loads (OMP_*, MKL_*, MALLOC_*, LD_PRELOAD, and
inductor's settings, preloaded here) must be the worker's from the start, so a zygote serves
one environment; `zygote_for` keeps one per environment. Variables read later (`LAZY_ENV`:
inductor's cache folder, a DDP rank's variables) are set in the child after the fork, so a tune's workers and its
profile share one zygote.

The child's exit status reaches the caller through the zygote (its parent), which reports
every death: `ForkedProcess` offers the part of `subprocess.Popen` that `Worker` uses. The
chain of PR_SET_PDEATHSIG (tuner -> zygote -> child) means `kill -9` of the tuner leaves no
process behind. `AUTOTIACC_FORKSERVER=0` turns the fork server off (every worker spawned).
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_ENTRY = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from autotiacc.engine.zygote import serve; serve(sys.argv[2:])")
# Read when used, not when a module loads: inductor's cache folder (at each compile), a rank's
# place in a process group (at init_process_group), the GPUs a process sees (at CUDA's start,
# which the zygote never reaches). DDP ranks differ in these and share one zygote.
LAZY_ENV = frozenset({"TORCHINDUCTOR_CACHE_DIR", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT", "CUDA_VISIBLE_DEVICES"})
LAZY_PREFIXES = ("AUTOTIACC_", "PYTEST_")  # ours (read at call time), pytest's (the test's name, every test)
MAX_IDLE_ZYGOTES = 2  # zygotes without a live child kept for later workers (tests use a few environments)
IDLE_EXIT_S = 600.0  # a zygote with no child and no request for this long ends (a notebook's optimize() done)
_CHILD_CRASH = 1  # the exit code of a child that could not become a worker


def enabled() -> bool:
    return (os.environ.get("AUTOTIACC_FORKSERVER", "1") != "0" and hasattr(socket, "send_fds")
            and hasattr(os, "fork"))


def _lazy(name: str) -> bool:
    return name in LAZY_ENV or name.startswith(LAZY_PREFIXES)


def _key(env: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in env.items() if not _lazy(k)))


def _gpu_present() -> bool:
    """An NVIDIA or AMD GPU device file: then the zygote imports torch only. Importing inductor
    may probe the driver (Triton's checks), and a child forked after the driver was initialised
    cannot use CUDA."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/dev/kfd").exists()


def preload_compile() -> None:
    """On a CPU-only machine, torch.compile's stack: ~2.5 s here, paid once per zygote instead
    of once per process that compiles. Imported after the first requests are served, so the
    tune's first child (the model check) need not wait for it."""
    if not _gpu_present():
        from ..torch_compat import preload_compile_stack

        preload_compile_stack()


# -- the zygote's side ---------------------------------------------------------------------------
def serve(argv: list[str]) -> None:
    """The zygote's main loop: import torch, then fork a worker for every request until the
    caller closes the socket; report each child's pid and, when it ends, its exit code."""
    from .worker_child import _die_with_parent, import_torch

    sock_fd, parent = int(argv[0]), int(argv[1])
    _die_with_parent(parent)
    # Ctrl-C in a terminal reaches the whole process group: the tuner decides what ends (it
    # closes the socket), and the zygote must not die printing a traceback meanwhile
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    import_torch()

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a child's death wakes the select below
    children: set[int] = set()
    compile_loaded = False
    while True:
        readers: list[Any] = [sock, wake_r]
        ready, _, _ = select.select(readers, [], [], 0 if not compile_loaded else IDLE_EXIT_S)
        if not ready and not compile_loaded:  # nothing asked for now: the compile stack, once
            preload_compile()
            compile_loaded = True
            continue
        if not ready and not children:
            break
        if wake_r in ready:
            os.read(wake_r, 512)
        if not _reap(sock, children):
            break
        if sock in ready:
            try:
                msg, fds, _, _ = socket.recv_fds(sock, 65536, 4)
            except OSError:
                break
            if not msg:  # the caller closed the socket: the children die with us (PDEATHSIG)
                break
            req = json.loads(msg)
            pid = os.fork()
            if pid == 0:
                _become_worker(sock, wake_r, wake_w, req, fds)
            children.add(pid)
            for fd in fds:
                os.close(fd)
            if not _send(sock, {"id": req["id"], "pid": pid}):
                break
    os._exit(0)


def _reap(sock: socket.socket, children: set[int]) -> bool:
    """Report every child that ended; False when the caller is gone."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True
        if pid == 0:
            return True
        children.discard(pid)
        if not _send(sock, {"exit": pid, "code": os.waitstatus_to_exitcode(status)}):
            return False


def _send(sock: socket.socket, msg: dict[str, Any]) -> bool:
    try:
        sock.send(json.dumps(msg).encode())
        return True
    except OSError:
        return False


def _become_worker(sock: socket.socket, wake_r: int, wake_w: int, req: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: drop the zygote's plumbing, take the request's environment and
    output, and run the worker loop; never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a worker as `python -c` starts one
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        from .worker_child import STACK_FD_ENV, main

        env = req["env"]
        for k in [k for k in os.environ if k not in env]:
            del os.environ[k]
        os.environ.update(env)
        call_r, res_w, stack_fd, *log = fds
        os.environ[STACK_FD_ENV] = str(stack_fd)  # its number here, not the caller's
        if log:
            os.dup2(log[0], 1)
            os.dup2(log[0], 2)
            os.close(log[0])
        main([str(call_r), str(res_w), str(os.getppid())])
    finally:
        os._exit(_CHILD_CRASH)


# -- the caller's side ---------------------------------------------------------------------------
class Zygote:
    """The caller's handle on one zygote process (one environment)."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, _PACKAGE_PARENT, str(theirs.fileno()), str(os.getpid())],
                stdin=subprocess.DEVNULL, env=env, pass_fds=(theirs.fileno(),), close_fds=True)
        finally:
            theirs.close()
        self.sock = ours
        self.pids: dict[int, int] = {}  # request id -> child pid
        self.exits: dict[int, int] = {}  # child pid -> exit code (negative: the signal)
        self.live = 0  # children started and not yet reported ended
        self._next = 0
        self._lock = threading.Lock()

    def spawn(self, env: dict[str, str], fds: list[int]) -> "ForkedProcess":
        """Ask for a worker with `env` whose call/result pipes, stack file (and log, if a fourth fd) are `fds`.
        Returns at once: the child exists once the zygote has imported torch."""
        with self._lock:
            self._next += 1
            rid = self._next
            socket.send_fds(self.sock, [json.dumps({"id": rid, "env": env}).encode()], fds)
            self.live += 1
        return ForkedProcess(self, rid)

    def pump(self, wait: float = 0.0) -> None:
        """Read the zygote's reports (pids, deaths) that have arrived, waiting up to `wait` s for one."""
        with self._lock:
            while True:
                ready, _, _ = select.select([self.sock], [], [], wait)
                if not ready:
                    return
                wait = 0.0
                try:
                    data = self.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:  # the zygote died: so did its children (PDEATHSIG)
                    self._orphan_all()
                    return
                msg = json.loads(data)
                if "pid" in msg:
                    self.pids[msg["id"]] = msg["pid"]
                else:
                    self.exits[msg["exit"]] = msg["code"]
                    self.live -= 1

    def _orphan_all(self) -> None:
        # the children's reports are lost with the zygote; every unreported one counts as crashed
        for pid in self.pids.values():
            if pid not in self.exits:
                self.exits[pid] = _CHILD_CRASH
        self.live = 0
        self.proc.poll()

    def idle(self) -> bool:
        """No child running (as far as the zygote has reported)."""
        self.pump()
        return self.live == 0

    def dead(self) -> bool:
        return self.sock.fileno() < 0 or self.proc.poll() is not None

    def close(self) -> None:
        """End the zygote (and, through PDEATHSIG, any child still running)."""
        try:
            self.sock.close()
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ForkedProcess:
    """A worker forked by a zygote, with the part of `subprocess.Popen` `Worker` uses:
    `pid`, `poll`, `wait`, `kill`. Exit codes follow Popen's (negative: killed by that signal)."""

    def __init__(self, zygote: Zygote, rid: int) -> None:
        self.zygote, self.rid = zygote, rid
        self.returncode: int | None = None
        self._pidfd: int | None = None  # tells when the process ends before the zygote reports it

    def __del__(self) -> None:
        if self._pidfd is not None and self._pidfd >= 0:
            os.close(self._pidfd)

    @property
    def pid(self) -> int:
        """The child's pid (waits while the zygote is still importing torch)."""
        while self.rid not in self.zygote.pids:
            if self.zygote.dead():
                self.zygote.pump()
                return self.zygote.pids.get(self.rid, -1)
            self.zygote.pump(wait=0.5)
        return self.zygote.pids[self.rid]

    def poll(self) -> int | None:
        if self.returncode is None:
            self.zygote.pump()
            pid = self.zygote.pids.get(self.rid)
            if pid is not None and pid in self.zygote.exits:
                self.returncode = self.zygote.exits[pid]
            elif self.zygote.dead():
                self.zygote.pump()
                self.returncode = self.zygote.exits.get(pid, _CHILD_CRASH) if pid else _CHILD_CRASH
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired("worker", float(timeout or 0.0))
            self.zygote.pump(wait=min(0.2, left) if left is not None else 0.2)
        assert self.returncode is not None
        return self.returncode

    def _fd(self) -> int:
        """A pidfd of the child (-1 where there is none): the zygote reports deaths only between
        its own imports, and a pidfd also keeps a signal from reaching a recycled pid."""
        if self._pidfd is None:
            try:
                self._pidfd = os.pidfd_open(self.pid) if self.pid > 0 else -1
            except (OSError, AttributeError):  # gone already, or no pidfd (Linux < 5.3)
                self._pidfd = -1
        return self._pidfd

    def join(self, timeout: float) -> bool:
        """Wait until the process has ended, whether or not the zygote has reported it yet."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            fd = self._fd()
            left = deadline - time.monotonic()
            if fd >= 0 and select.select([fd], [], [], max(0.0, min(left, 0.2)))[0]:
                return True
            if fd < 0:
                self.zygote.pump(wait=max(0.0, min(left, 0.2)))
            if left <= 0:
                return False
        return True

    def kill(self) -> None:
        if self.poll() is not None:
            return
        fd = self._fd()
        try:
            if fd >= 0:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            elif self.pid > 0 and self.poll() is None:  # not yet reported dead, so the pid is still ours
                os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_ZYGOTES: dict[tuple, Zygote] = {}


def fork_worker(env: dict[str, str], fds: list[int]) -> ForkedProcess:
    """A worker with exactly `env`, forked by the zygote of that environment (started if need be)."""
    try:
        return zygote_for(env).spawn(env, fds)
    except OSError:  # the zygote died since it was last used: a new one, once
        time.sleep(0.1)
        return zygote_for(env).spawn(env, fds)


def zygote_for(env: dict[str, str]) -> Zygote:
    """The zygote serving `env` (started on first use; its variables read at load time must
    match), ending idle zygotes of other environments beyond `MAX_IDLE_ZYGOTES`."""
    key = _key(env)
    z = _ZYGOTES.get(key)
    if z is None or z.dead():
        if z is not None:
            z.close()
        z = _ZYGOTES[key] = Zygote({k: v for k, v in env.items() if not _lazy(k)})
    _ZYGOTES[key] = _ZYGOTES.pop(key)  # most recently used last
    idle = [k for k, o in _ZYGOTES.items() if o is not z and o.idle()]
    for k in idle[: max(0, len(idle) - MAX_IDLE_ZYGOTES)]:  # the least recently used first
        _ZYGOTES.pop(k).close()
    return z


@atexit.register
def close_all() -> None:
    """End every zygote (at exit, or in a test that wants none left)."""
    while _ZYGOTES:
        _ZYGOTES.popitem()[1].close()
