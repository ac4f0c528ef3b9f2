"""Functions a fake task's worker runs (importable by name, no torch): scripted behaviour."""
import os
import signal
import time


def scripted(action: str, value: float) -> dict:
    """`ok`: return the scripted gain and this worker's pid; `kill`: die by SIGKILL (a crash or
    the OOM killer); `hang`: never return; `raise`: an exception."""
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        time.sleep(3600)
    if action == "raise":
        raise RuntimeError("scripted failure")
    return {"gain": value, "pid": os.getpid()}
