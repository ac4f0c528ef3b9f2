"""Decoding JPEG on the training device (`data.decode=device`) and the training trials' budget
parts. The end-to-end tests need torchvision (they skip without it, saying so); the rest run
everywhere: when the option is offered, its plan round trip, and the errors without it."""
from __future__ import annotations

import json
import sys

import optuna
import pytest
import torch

from autotiacc.engine.budget import Budget
from autotiacc.engine.space import sample, seeds
from autotiacc.errors import PlanError, UserInputError
from autotiacc.knobs import all_knobs
from autotiacc.strategy import load_strategy
from autotiacc.training import DataConfig, TrainConfig, TrainingPlan, apply
from autotiacc.training.config import train_context
from autotiacc.training.jpeg import decoder_unavailable, device_decode_unavailable, raw_collate
from autotiacc.training.trial import train_trial
from autotiacc.training.tuner import TrainTuneOptions, TrainingTask, summarize, tune_training
from autotiacc.training.workload import TrainWorkload

from . import _training_targets as targets

NO_TORCHVISION = decoder_unavailable()
needs_torchvision = pytest.mark.skipif(NO_TORCHVISION is not None, reason=f"decode=device end to end needs "
                                       f"torchvision.io.decode_jpeg: {NO_TORCHVISION}")

# 64 small JPEGs (PIL), a dataset that decodes them per item and the two device-decoding hooks
TINY_JPEG = '''
import io

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

batch_size = 8
SEEN = {}


def _jpegs(n=64):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        pixels = (rng.integers(0, 120, size=(32, 32, 3)) + 120 * (i % 2)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        out.append((buf.getvalue(), i % 2))
    return out


class Decoded(Dataset):
    def __init__(self):
        self.items = _jpegs()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        data, label = self.items[i]
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((16, 16), Image.BILINEAR))
        return torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0, label


class Encoded(Decoded):
    def __getitem__(self, i):
        return self.items[i]


def build_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


def train_dataset():
    return Decoded()


def raw_dataset():
    return Encoded()


def device_transform(images):
    SEEN["devices"] = sorted({str(img.device) for img in images})
    x = torch.stack(images).float()
    return nn.functional.interpolate(x, size=(16, 16), mode="bilinear", antialias=True) / 255.0


def loss_fn(model, batch):
    x, y = batch
    SEEN["batch"] = (tuple(x.shape), str(x.dtype), str(x.device), tuple(y.shape))
    return nn.functional.cross_entropy(model(x), y)
'''


@pytest.fixture
def jpeg_file(tmp_path):
    path = tmp_path / "train_jpeg_tiny.py"
    path.write_text(TINY_JPEG)
    return path


@pytest.fixture
def no_torchvision(monkeypatch):
    """torchvision made unimportable in this process (`import torchvision` raises ImportError),
    as where it is not installed or built for another torch."""
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchvision", None)


def _sampled(ctx, n=16):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    strategy, knobs = load_strategy("training"), all_knobs("training")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    configs = []
    for _ in range(n):
        trial = study.ask()
        configs.append(TrainConfig(**sample(trial, knobs, strategy, ctx)))
        study.tell(trial, 1.0)
    return configs, set().union(*(t.params for t in study.trials)), seeds(strategy, knobs, ctx)


# -- everywhere --------------------------------------------------------------------------------
def test_decode_device_is_searched_only_when_offered():
    """The context flag (hooks + torchvision) gates the choice and its stage-1 seed; with it,
    the decoded cache is never combined with device decoding."""
    kw = dict(cores=2, nproc=1, device="cpu", has_conv=True, fused_ok=True, compile=False)
    off, names, first = _sampled(train_context(**kw))
    assert {c.data.decode for c in off} == {"dataset"} and "data.decode" not in names
    assert not any(s.get("data.decode") == "device" for s in first)
    on, names, first = _sampled(train_context(**kw, device_decode=True), n=24)
    assert {c.data.decode for c in on} == {"dataset", "device"} and "data.decode" in names
    assert all(c.data.cache == "none" for c in on if c.data.decode == "device")
    assert any(s.get("data.decode") == "device" for s in first)
    cuda_seeds = _sampled(train_context(**{**kw, "device": "cuda"}, device_decode=True), n=1)[2]
    assert any(s.get("data.decode") == "device" and s.get("data.pin_memory") for s in cuda_seeds)


def test_hooks_missing_or_torchvision_missing_say_why(tmp_path, jpeg_file, no_torchvision):
    plain = tmp_path / "plain.py"
    plain.write_text(targets.TINY_TRAIN)
    assert "`raw_dataset()` or `device_transform()`" in device_decode_unavailable(TrainWorkload(plain))
    half = tmp_path / "half.py"
    half.write_text(targets.TINY_TRAIN + "\ndef raw_dataset():\n    return Noise()\n")
    assert device_decode_unavailable(TrainWorkload(half)) == "the training file defines no `device_transform()`"
    reason = device_decode_unavailable(TrainWorkload(jpeg_file))
    assert reason.startswith("torchvision does not import here (") and "torchvision" in reason[33:]
    # the tuner then leaves the option out and records why
    task = TrainingTask(TrainWorkload(jpeg_file), TrainTuneOptions(budget_s=60, out_dir=tmp_path / "run",
                                                                  device="cpu"))
    task.validate(60)
    assert task.ctx.extras["device_decode"] is False
    assert task.run_record()["device_decode"].startswith("not searched: torchvision does not import")


def test_a_plan_that_decodes_on_the_device_without_torchvision_is_one_clear_error(jpeg_file, no_torchvision):
    w = TrainWorkload(jpeg_file)
    model = w.build_model()
    with pytest.raises(PlanError, match=r"`decode=device` decodes JPEG with torchvision.io.decode_jpeg, but "
                       r"torchvision does not import here .*install the torchvision release built for torch .*"
                       r"decode=dataset"):
        apply(TrainConfig(data=DataConfig(decode="device")), model, w.make_optimizer(model.parameters()),
              w.train_dataset(), w.loss_fn, batch_size=8, raw_dataset=w.raw_dataset(),
              device_transform=w.device_transform)


def test_decode_device_plan_round_trips_and_checks_its_values(tmp_path):
    cfg = TrainConfig(data=DataConfig(decode="device", num_workers=1, pin_memory=True))
    plan = TrainingPlan(config=cfg, batch_size=8)
    path = plan.save(tmp_path / "plan.json")
    back = TrainingPlan.from_dict(json.loads(path.read_text()))
    assert back.config == cfg and "decode=device" in back.label
    # plans written before the option load as decoding in the dataset
    old = plan.to_dict()
    for entry in old["knobs"]:
        entry["_data"].pop("decode", None)
    assert TrainingPlan.from_dict(old).config.data.decode == "dataset"
    with pytest.raises(UserInputError, match="`decode` got 'gpu'"):
        DataConfig(decode="gpu")
    with pytest.raises(UserInputError, match="use one or the other"):
        DataConfig(decode="device", cache="memory")
    bad = plan.to_dict()
    next(e for e in bad["knobs"] if e["_type"] == "DataConfig")["_data"]["decode"] = "gpu"
    with pytest.raises(PlanError, match="`decode` got 'gpu'"):
        TrainingPlan.from_dict(bad)


def test_apply_names_the_missing_hooks_and_raw_items_must_be_encoded(jpeg_file):
    w = TrainWorkload(jpeg_file)
    model = w.build_model()
    with pytest.raises(UserInputError, match="pass `raw_dataset=`.*and `device_transform=`"):
        apply(TrainConfig(data=DataConfig(decode="device")), model, w.make_optimizer(model.parameters()),
              w.train_dataset(), w.loss_fn, batch_size=8)
    images, labels = raw_collate([(b"\xff\xd8jpeg", 1), (torch.tensor([255, 216], dtype=torch.uint8), 0)])
    assert [t.dtype for t in images] == [torch.uint8, torch.uint8] and labels.tolist() == [1, 0]
    with pytest.raises(PlanError, match="must be the encoded JPEG"):
        raw_collate([(torch.zeros(3, 4, 4), 1)])
    with pytest.raises(PlanError, match=r"tuples `\(jpeg_bytes, target, ...\)`"):
        raw_collate([b"\xff\xd8"])


def test_training_trials_record_build_and_timing_for_the_budget_split(tmp_path):
    """The budget split of a training tune shows builds and timing, not one 'rest' lump."""
    path = tmp_path / "train.py"
    path.write_text(targets.TINY_TRAIN)
    rank = train_trial(TrainWorkload(path), TrainConfig(data=DataConfig(num_workers=1)).to_list(), rounds=2)
    assert rank["status"] == "ok" and rank["build_s"] > 0 and rank["measure_s"] > 0
    attrs = summarize([rank], None)
    wall = attrs["build_s"] + attrs["measure_s"] + 1.0  # what the trial's process start adds
    budget = Budget(budget_s=60)
    budget.add_trial({**attrs, "wall_s": wall})
    assert budget.spent["build_s"] == attrs["build_s"] and budget.spent["timing_s"] == attrs["measure_s"]
    assert budget.spent["trial_other_s"] == pytest.approx(1.0)


# -- with torchvision --------------------------------------------------------------------------
@needs_torchvision
def test_decode_device_trains_on_decoded_batches_in_the_step(jpeg_file):
    """The loader yields encoded bytes; the step decodes them on the model's device (here the
    CPU, batched decode_jpeg), and loss_fn gets the batch train_dataset() would collate to."""
    import numpy as np
    from PIL import Image

    w = TrainWorkload(jpeg_file)
    model = w.build_model()
    model, _, loader, step = apply(TrainConfig(data=DataConfig(decode="device")), model,
                                   w.make_optimizer(model.parameters()), w.train_dataset(), w.loss_fn,
                                   batch_size=8, raw_dataset=w.raw_dataset(), device_transform=w.device_transform)
    raw = next(iter(loader))
    assert isinstance(raw[0], list) and raw[0][0].dtype == torch.uint8 and raw[0][0].dim() == 1
    seen = w._user.SEEN
    losses = [float(step(b)) for b, _ in zip(loader, range(6))]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert seen["devices"] == ["cpu"]
    assert seen["batch"] == ((8, 3, 16, 16), "torch.float32", "cpu", (8,))
    # the device decode reads the same pixels as PIL's (within JPEG decoder rounding)
    from torchvision.io import ImageReadMode, decode_jpeg

    data = w.raw_dataset()[0][0]
    mine = decode_jpeg([torch.frombuffer(bytearray(data), dtype=torch.uint8)], mode=ImageReadMode.RGB)[0]
    pil = torch.from_numpy(np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)
    assert (mine.float() - pil.float()).abs().mean() < 2.0


@needs_torchvision
def test_decode_device_trial_passes_the_loss_guard_against_the_baseline(jpeg_file):
    w = TrainWorkload(jpeg_file)
    base = train_trial(w, TrainConfig().to_list(), rounds=2, compare_baseline=False)
    assert base["status"] == "ok"
    cand = train_trial(w, TrainConfig(data=DataConfig(decode="device")).to_list(), rounds=2,
                       reference_losses=[base["losses"]], tolerance=0.2)
    assert cand["status"] == "ok", cand.get("reason")
    assert cand["label"] == "decode=device" and cand["samples_per_s"] > 0 and cand["speedup"] > 0


@pytest.mark.slow
@needs_torchvision
def test_tune_searches_decode_device_and_the_plan_records_it(tmp_path, jpeg_file):
    """A real tune (fresh trial processes) whose space is decode alone: the device-decode trial
    runs, and whichever wins, trials.csv and the report say the option was searched."""
    strategy = tmp_path / "decode.yaml"
    strategy.write_text("name: decode-only\ntask: training\nobjective: throughput\npatience: 2\n"
                        "knobs:\n  data:\n    decode: [dataset, device]\n"
                        "enqueue:\n  - {}\n  - {data: {decode: device}}\n")
    out = tmp_path / "run"
    result = tune_training(TrainWorkload(jpeg_file), TrainTuneOptions(budget_s=90, out_dir=out, device="cpu",
                                                                       strategy=str(strategy), tolerance=0.2))
    import pandas as pd

    t = pd.read_csv(out / "trials.csv")
    dev = t[(t["param_data.decode"] == "device") & (t["status"] != "duplicate")]
    assert len(dev) >= 1 and (dev["status"] == "ok").all(), dev[["status", "reason"]]
    assert dev["build_s"].gt(0).all() and dev["measure_s"].gt(0).all()
    assert json.loads((out / "run.json").read_text())["device_decode"] == "searched"
    assert result.plan.config.data.decode in ("dataset", "device")
