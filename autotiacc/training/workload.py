"""Load a user's `train.py` (build_model, train_dataset, loss_fn; optional make_optimizer,
collate_fn, eval_fn, batch_size, and raw_dataset + device_transform for decoding JPEG on the
device) into a picklable `TrainWorkload`.

It travels to trial processes as its path and is imported there, lazily, with the core loader.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelRaisedError, WorkloadError
from ..engine.usercode import Stage, load_module, reported, run_user_code
from .contract import TrainFacts, check_training

REQUIRED = ("build_model", "train_dataset", "loss_fn")
DEFAULT_BATCH_SIZE = 32


class TrainWorkload:
    """One training job to tune, given as a `train.py` following the contract.

    The file is imported on first use, in the process that uses it: a worker, a rank, or the
    check's child (`check`). A checked workload answers the tuner from the child's `facts`, so
    the tuner's process never imports it."""

    def __init__(self, path: str | Path, *, batch_size: int | None = None) -> None:
        self.path = Path(path).resolve()
        if not self.path.is_file() or self.path.suffix != ".py":
            raise WorkloadError(f"`FILE` got {str(path)!r}: training mode needs an existing train.py that defines "
                                "build_model(), train_dataset() and loss_fn(model, batch).")
        if batch_size is not None and batch_size <= 0:
            raise WorkloadError(f"`--batch-size` got {batch_size}: use a positive integer.")
        self.name = self.path.stem
        self._batch_size = int(batch_size) if batch_size else None
        self._module = None
        self.facts: TrainFacts | None = None
        self.check_s = 0.0

    @property
    def _user(self):
        if self._module is None:
            module = load_module(self.path)
            missing = [fn for fn in REQUIRED if not callable(getattr(module, fn, None))]
            if missing:
                raise WorkloadError(f"{self.path}: defines no {', '.join(f'`{m}()`' for m in missing)}; a training "
                                    "file must define build_model(), train_dataset() and loss_fn(model, batch).")
            self._module = module
        return self._module

    @property
    def batch_size(self) -> int:
        """`--batch-size`, else the file's `batch_size`, else 32."""
        if self._batch_size is None:
            self._batch_size = int(getattr(self._user, "batch_size", DEFAULT_BATCH_SIZE))
        return self._batch_size

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_module": None}  # each process imports the file itself, lazily

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def check(self, *, timeout: float, limit: str = "", device: str = "cpu", nproc: int = 1) -> TrainFacts:
        """The up-front check (`contract.check_training`) in a child killed after `timeout` s."""
        value, _ = run_user_code(_checked, self, device, nproc, where=self.path, timeout=timeout, limit=limit,
                                 stage="importing it, building the model and taking one training step")
        self.facts = TrainFacts(**value)
        self._batch_size, self.check_s = self.facts.batch_size, self.facts.first_run_s
        return self.facts

    def validate(self, *, timeout: float = 300.0, limit: str = "", device: str = "cpu", nproc: int = 1) -> TrainFacts:
        """The facts of one checked run (see `check`); checks only once per workload."""
        if self.facts is None:
            self.check(timeout=timeout, limit=limit, device=device, nproc=nproc)
        return self.facts

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self._user, name)(*args)
        except Exception as exc:
            raise ModelRaisedError(f"{self.path}: {name}() raised {type(exc).__name__}: {exc}") from exc
        except SystemExit as exc:
            raise WorkloadError(f"{self.path}: {name}() called sys.exit({exc.code!r}); a training file must return, "
                                "not end the process.") from None

    def build_model(self, seed: int = 0):
        """A fresh model in train mode; seeded so every process and rank starts identical."""
        import torch

        torch.manual_seed(seed)
        model = self._call("build_model")
        if not isinstance(model, torch.nn.Module):
            raise WorkloadError(f"{self.path}: build_model() returned {type(model).__name__}; it must return a "
                                "torch.nn.Module.")
        return model.train()

    def train_dataset(self):
        return self._map_style("train_dataset", self._call("train_dataset"))

    def _map_style(self, name: str, ds: Any) -> Any:
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise WorkloadError(f"{self.path}: {name}() returned {type(ds).__name__}; it must return a "
                                "map-style torch Dataset (with __getitem__ and __len__).")
        return ds

    @property
    def loss_fn(self) -> Callable:
        return self._user.loss_fn

    def hook(self, name: str) -> Callable | None:
        """An optional hook of the training file, or None when it defines none."""
        fn = getattr(self._user, name, None)
        return fn if callable(fn) else None

    @property
    def collate_fn(self) -> Callable | None:
        return self.hook("collate_fn")

    @property
    def eval_fn(self) -> Callable | None:
        return self.hook("eval_fn")

    @property
    def device_transform(self) -> Callable | None:
        return self.hook("device_transform")

    def raw_dataset(self):
        """The encoded dataset for `decode=device`: items `(jpeg_bytes, *targets)`."""
        if self.hook("raw_dataset") is None:
            raise WorkloadError(f"{self.path}: defines no `raw_dataset()`; the plan decodes JPEG on the device "
                                "(decode=device), which reads encoded images from raw_dataset(). Define it, or "
                                "re-tune.")
        return self._map_style("raw_dataset", self._call("raw_dataset"))

    def make_optimizer(self, params):
        """The user's optimizer, else SGD with momentum (lr 0.01): what a plain loop would use."""
        import torch

        params = list(params)
        if callable(getattr(self._user, "make_optimizer", None)):
            return self._call("make_optimizer", params)
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def identity(self, model=None) -> dict[str, Any]:
        model = model if model is not None else self.build_model()
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
        return {"name": self.name, "kind": "train", "file": str(self.path), "batch_size": self.batch_size,
                "param_shapes_sha256": h.hexdigest()[:16],
                "file_sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}


def load_train_workload(path: str | Path, *, batch_size: int | None = None, timeout: float | None = None,
                        limit: str = "", device: str = "cpu", nproc: int = 1) -> TrainWorkload:
    """Open a training file; errors name the missing function.

    With `timeout`, its contract is checked in a child killed after `timeout` s (`check`): a
    hang, an exit, an empty dataset or a NaN loss is one clear error, and nothing of the file
    runs in this process. Without, it is imported here (library use)."""
    workload = TrainWorkload(path, batch_size=batch_size)
    if timeout is not None:
        workload.check(timeout=timeout, limit=limit, device=device, nproc=nproc)
    else:
        _ = workload._user
    return workload


def _checked(workload: TrainWorkload, device: str, nproc: int) -> dict[str, Any]:
    """Runs in the child of `TrainWorkload.check`: the contract check, its failures as one message."""
    stage = Stage()
    return reported(check_training, workload, device, nproc, stage, where=workload.path, stage=stage)
