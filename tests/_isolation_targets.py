"""Module-level functions a spawned trial process can import (spawn pickles them by name)."""
import os
import signal
import time


def add(a, b):
    return a + b


def raises():
    raise ValueError("candidate exploded")


def hangs():
    time.sleep(600)


def segfaults():
    import ctypes

    ctypes.string_at(0)


def killed():
    os.kill(os.getpid(), signal.SIGKILL)


def memory_error():
    raise MemoryError("cannot allocate 1 TiB")


def prints_then_returns(x):
    print("hello from the trial")
    return x


CALLS = {"n": 0}


def counter():
    """Module-level state: a warm worker keeps it between calls."""
    CALLS["n"] += 1
    return os.getpid(), CALLS["n"]


def exits(code):
    os._exit(code)


def sys_exits(code):
    import sys

    sys.exit(code)


def inductor_cache_dir():
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return cache_dir()


def hangs_after_saying(entered):
    """Writes the file `entered` once inside, then never returns: the caller knows it is stuck here."""
    open(entered, "w").close()
    time.sleep(600)


def meets(mine, other, value):
    """Writes the file `mine`, then returns `value` once the file `other` exists: two such calls
    return only when they ran at the same time (one after the other, the first gives up)."""
    open(mine, "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists(other):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no call wrote {other} while this one ran")
        time.sleep(0.01)
    return value


def process_facts(matmul_n: int = 0):
    """Who this worker's parent is, what it sees of its environment, and a parallel op's result."""
    import sys

    import torch

    total = float((torch.ones(matmul_n, matmul_n) @ torch.ones(matmul_n, matmul_n)).sum()) if matmul_n else 0.0
    return {"pid": os.getpid(), "ppid": os.getppid(), "threads": torch.get_num_threads(), "matmul": total,
            "inductor_loaded": "torch._inductor.config" in sys.modules,
            "env": {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "ZYGOTE_TEST_MARK")}}


def process_gone(pid: int) -> bool:
    """The process has ended: gone, or a zombie its parent has not reaped yet (it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped meanwhile (reading a reaped pid's stat: ESRCH)
        return True
