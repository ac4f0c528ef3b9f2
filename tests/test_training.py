"""Training acceleration: configs and plans round-trip, apply in a user loop, the decoded
cache, overflow detection, real gloo ranks (drop-in DDP, a killed rank), an end-to-end tune."""
from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from autotiacc.device import parse_memory
from autotiacc.errors import PlanError, UserInputError, WorkloadError
from autotiacc.training import (ComputeConfig, DataConfig, DDPConfig, MemoryConfig, TrainPrecisionConfig, TrainConfig,
                                TrainingPlan, apply, load_training_plan)
from autotiacc.training.cache import DecodedCache
from autotiacc.training.launch import run_ranks
from autotiacc.training.trial import detect_overflow, heaviest_blocks
from autotiacc.report import write_training_report
from autotiacc.training.tuner import TrainTuneOptions, tune_training
from autotiacc.training.workload import TrainWorkload, load_train_workload

from . import _training_targets as targets
from .conftest import run_cli, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


# -- configs and plans ---------------------------------------------------------------------------
def test_train_config_and_plan_round_trip_through_json(tmp_path):
    cfg = TrainConfig(data=DataConfig(num_workers=2, prefetch_factor=4, persistent_workers=True, cache="memory"),
                      compute=ComputeConfig(channels_last=True, optimizer_impl="foreach", micro_batches=2, threads=1),
                      precision=TrainPrecisionConfig(mode="fp16", fp32_modules=("3",)),
                      memory=MemoryConfig(checkpoint_top=1, checkpoint_modules=("0",)),
                      ddp=DDPConfig(bucket_cap_mb=5.0, static_graph=True, comm_hook="powersgd", powersgd_rank=2))
    assert TrainConfig.from_list(json.loads(json.dumps(cfg.to_list()))) == cfg
    plan = TrainingPlan(config=cfg, batch_size=16, nproc=2, speedup=1.7, note="x")
    path = plan.save(tmp_path / "plan.json")
    back = load_training_plan(tmp_path)
    assert back.config == cfg and back.batch_size == 16 and back.nproc == 2
    assert json.loads(path.read_text())["schema"] == "autotiacc.training_plan"
    assert "num_workers=2" in cfg.label() and TrainConfig().label().startswith("baseline")


def test_bad_training_values_and_plans_name_the_fix(tmp_path):
    with pytest.raises(UserInputError, match="num_workers"):
        DataConfig(num_workers=-1)
    with pytest.raises(UserInputError, match="comm_hook"):
        DDPConfig(comm_hook="int3")
    with pytest.raises(PlanError, match="unknown _type .os.system."):
        TrainConfig.from_list([{"_type": "os.system", "_version": 1, "_data": {}}])
    (tmp_path / "plan.json").write_text(json.dumps({"schema": "autotiacc.plan", "schema_version": 1}))
    with pytest.raises(PlanError, match="load_plan"):
        load_training_plan(tmp_path / "plan.json")
    assert parse_memory("4GiB") == 4096 and parse_memory("512M") == 512
    with pytest.raises(UserInputError, match="--max-memory"):
        parse_memory("lots")
    bad = tmp_path / "train.py"
    bad.write_text("def build_model():\n    return None\n")
    with pytest.raises(WorkloadError, match="train_dataset"):
        load_train_workload(bad)  # the file is imported on first use; loading it here is that use


# -- apply in a user loop -------------------------------------------------------------------------
def test_apply_returns_tuned_loader_and_a_step_that_trains():
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(data=DataConfig(num_workers=1, prefetch_factor=3, persistent_workers=True),
                      compute=ComputeConfig(optimizer_impl="foreach"), precision=TrainPrecisionConfig(mode="bf16"))
    model2, opt2, loader, step = apply(cfg, model, opt, Pairs(), _loss, batch_size=8)
    assert model2 is model and opt2 is opt
    assert loader.num_workers == 1 and loader.prefetch_factor == 3 and loader.persistent_workers
    assert opt.param_groups[0]["foreach"] is True
    losses = [float(step(b)) for _ in range(4) for b in loader]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4])  # it learns


def test_micro_batches_keep_the_global_batch_gradient():
    """Accumulating 4 micro-batches must give the same update as the whole batch."""
    results = []
    for parts in (1, 4):
        model = _tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        _, _, loader, step = apply(TrainConfig(compute=ComputeConfig(micro_batches=parts)), model, opt, Pairs(),
                                   _loss, batch_size=16, shuffle=False)
        loss = step(next(iter(loader)))
        results.append((float(loss), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_step_runs_with_the_plans_thread_count_and_restores_it():
    seen = []

    def loss(model, batch):
        seen.append(torch.get_num_threads())
        return _loss(model, batch)

    model = _tiny()
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    _, _, loader, step = apply(TrainConfig(compute=ComputeConfig(threads=want)), model,
                               torch.optim.SGD(model.parameters(), lr=0.1), Pairs(), loss, batch_size=8)
    step(next(iter(loader)))
    assert seen == [want] and torch.get_num_threads() == before


def test_apply_warns_when_the_plan_was_measured_elsewhere():
    from autotiacc.errors import HardwareMismatchWarning
    from autotiacc.hardware import fingerprint

    model = _tiny()
    plan = TrainingPlan(batch_size=8, fingerprint={**fingerprint("cpu"), "cpu_model": "Some Other CPU"})
    with pytest.warns(HardwareMismatchWarning, match="cpu_model"):
        apply(plan, model, torch.optim.SGD(model.parameters(), lr=0.1), Pairs(), _loss)


def test_apply_rejects_what_it_cannot_use():
    model = _tiny()
    with pytest.raises(UserInputError, match="batch_size"):
        apply(None, model, torch.optim.SGD(model.parameters(), lr=0.1), Pairs(), _loss)
    with pytest.raises(UserInputError, match="fp32_modules"):
        apply(TrainConfig(precision=TrainPrecisionConfig(mode="bf16", fp32_modules=("nope",))), model,
              torch.optim.SGD(model.parameters(), lr=0.1), Pairs(), _loss, batch_size=8)


# -- decoded cache ---------------------------------------------------------------------------------
class Decoding(torch.utils.data.Dataset):
    """Counts decodes; `transform` is random, as augmentations are."""

    def __init__(self):
        self.decodes = 0

    def __len__(self):
        return 6

    def load(self, i):
        self.decodes += 1
        return torch.full((2,), i, dtype=torch.uint8)

    def transform(self, x):
        return x.float() + torch.rand(())

    def __getitem__(self, i):
        return self.transform(self.load(i))


def test_cache_decodes_once_and_keeps_augmentation_random():
    ds = Decoding()
    cache = DecodedCache(ds)
    assert cache.mode == "load" and ds.decodes == 6
    a, b = cache[3], cache[3]
    assert ds.decodes == 6  # no decoding on access
    assert a[0] >= 3 and not torch.equal(a, b)  # the random transform still runs per access
    assert cache.items[3].is_shared()


def test_cache_refuses_random_items_without_a_load_transform_split():
    class Random(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(2)

    with pytest.raises(UserInputError, match="load"):
        DecodedCache(Random())
    assert DecodedCache(Pairs(4)).mode == "item"  # deterministic items are cached whole


class TorchvisionStyle(torch.utils.data.Dataset):
    """JPEG bytes decoded with PIL in __getitem__, a random `transform` attribute (as ImageFolder)."""

    def __init__(self):
        import io

        from PIL import Image

        self.blobs = []
        for i in range(4):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), (60 * i, 10, 200)).save(buf, format="JPEG")
            self.blobs.append(buf.getvalue())
        self.decodes = 0
        self.transform = lambda img: torch.as_tensor(img.getpixel((0, 0))).float() + torch.rand(())

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        import io

        from PIL import Image

        self.decodes += 1
        img = Image.open(io.BytesIO(self.blobs[i])).convert("RGB")
        return (self.transform(img) if self.transform is not None else img), i


def test_cache_keeps_a_torchvision_style_transform_attribute_random():
    ds = TorchvisionStyle()
    cache = DecodedCache(ds)
    assert cache.mode == "attr" and ds.transform is not None
    n = ds.decodes
    (a, la), (b, lb) = cache[2], cache[2]
    assert ds.decodes == n and la == lb == 2  # served from the cache, labels kept
    assert not torch.equal(a, b)  # the random transform still runs per access
    torch.manual_seed(5)
    want = ds[2][0]
    torch.manual_seed(5)
    torch.testing.assert_close(cache[2][0], want)  # same as the uncached item under the same seed


# -- precision fallback and checkpointing --------------------------------------------------------
class Overflowing(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 4)
        self.big = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)
        with torch.no_grad():
            self.big.weight.fill_(3e4)  # fp16 max is 65504: activations overflow in fp16, not in fp32

    def forward(self, x):
        return self.out(self.big(self.inp(x)) * 1e-4)


def test_overflowing_module_is_detected_and_kept_in_fp32():
    torch.manual_seed(0)
    model = Overflowing()
    batch = (torch.ones(8, 4) * 4, torch.zeros(8, 1))
    loss = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    bad = detect_overflow(model, loss, batch, "fp16")
    assert "big" in bad and "inp" not in bad
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)
    cfg = TrainConfig(precision=TrainPrecisionConfig(mode="fp16", fp32_modules=bad))
    ds = torch.utils.data.TensorDataset(*batch)
    _, _, loader, step = apply(cfg, model, opt, ds, loss, batch_size=8)
    assert torch.isfinite(step(next(iter(loader))))


def test_checkpointing_picks_the_largest_activations_and_keeps_gradients():
    model = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 2))
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    assert heaviest_blocks(model, _loss, batch, 1) == ("0",)
    grads = []
    for names in ((), ("0",)):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 512), nn.ReLU(), nn.Linear(512, 2))
        _, _, loader, step = apply(TrainConfig(memory=MemoryConfig(checkpoint_top=1, checkpoint_modules=names)), m,
                                   torch.optim.SGD(m.parameters(), lr=0.0), torch.utils.data.TensorDataset(*batch),
                                   _loss, batch_size=8)
        step(next(iter(loader)))
        grads.append(m[0].weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


# -- real gloo ranks -------------------------------------------------------------------------------
@pytest.mark.slow
def test_drop_in_ddp_applies_plan_settings_and_averages_gradients():
    overall, ranks = run_ranks(targets.ddp_settings, 2, 2.0, timeout=120)
    assert overall.ok, overall.error + overall.traceback
    r0, r1 = overall.value
    assert r0["bucket_bytes"] == 2 * 2**20 and r0["gradient_as_bucket_view"] and not r0["broadcast_buffers"]
    # destroy_process_group() ran before the model was dropped: the group's last reference must be
    # the Python one, released after the reducer (else a 1-in-15 deadlock under load)
    assert r0["group_outlives_reducer"] and r1["group_outlives_reducer"]
    # inputs 1s and 2s: the averaged gradient is 1.5 on both ranks (fp16-compressed, exact here)
    assert r0["grad"] == r1["grad"] == [[1.5, 1.5, 1.5, 1.5]]


@pytest.mark.slow
def test_a_killed_rank_fails_the_trial_quickly_and_names_the_rank():
    # the launcher sees the death, not its timeout (a hang would end as "timeout" after 600 s)
    overall, ranks = run_ranks(targets.rank1_dies, 2, timeout=600)
    assert overall.status != "timeout" and "rank 1" in overall.error and "SIGKILL" in overall.error, overall


HELD_RANK = '''

_loss = loss_fn


def loss_fn(model, batch):
    """TINY_TRAIN's loss; rank 1 of trial 1 (whose log folder TRIALS/0001 exists) says it is inside
    (the file HELD, holding its pid) and stays there until it is killed: the test kills a rank in
    the middle of a trial, however fast or slow the machine."""
    import os
    import time

    if os.environ.get("RANK") == "1" and os.path.isdir(os.path.join(TRIALS, "0001")) and not os.path.exists(HELD):
        with open(HELD + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(HELD + ".tmp", HELD)
        while True:
            time.sleep(0.05)
    return _loss(model, batch)
'''


@pytest.mark.slow
def test_two_process_training_tune_end_to_end_with_a_rank_killed(tmp_path):
    """A real 2-rank gloo tune of a tiny job: DDP knobs searched, per-rank figures reported,
    and killing rank 1 of trial 1 (from outside, by pid) gives a failed trial, not a hang."""
    out = tmp_path / "run"
    held, pids = tmp_path / "held", out / "trials" / "0001.pids"
    train = tmp_path / "train.py"
    train.write_text(targets.TINY_TRAIN + HELD_RANK + f"\nTRIALS, HELD = {str(out / 'trials')!r}, {str(held)!r}\n")
    killed = {}

    def kill_rank1_of_trial1():
        try:  # the rank is held inside trial 1 until this kill
            wait_until("rank 1 of trial 1 held in its loss", held.exists)
            wait_until("trial 1's pid file", lambda: pids.exists() and len(pids.read_text().split()) == 2)
        except AssertionError as exc:
            killed["error"] = str(exc)
            return
        killed["pid"], killed["rank1"] = int(held.read_text()), int(pids.read_text().split()[1])
        os.kill(killed["pid"], signal.SIGKILL)

    watcher = threading.Thread(target=kill_rank1_of_trial1, daemon=True)
    watcher.start()
    # the library call the CLI's `tune --mode train --nproc 2` makes; patience keeps CI time short
    result = tune_training(TrainWorkload(train), TrainTuneOptions(budget_s=150, out_dir=out, nproc=2, patience=3))
    write_training_report(out)
    watcher.join(timeout=5)
    assert "pid" in killed, killed.get("error", "trial 1 never held its rank 1")
    assert killed["pid"] == killed["rank1"]  # the held process was rank 1 of trial 1
    assert result.plan.nproc == 2
    import pandas as pd

    t = pd.read_csv(out / "trials.csv")
    t1 = t[t["number"] == 1].iloc[0]
    assert t1["status"] in ("crash", "oom", "exception") and "rank 1" in t1["reason"], t1["reason"]
    ok = t[t["status"] == "ok"]
    assert len(ok) >= 2  # the tune went on after the killed trial
    assert any(c.startswith("param_ddp.") for c in t.columns)  # DDP knobs were searched
    assert {"rank0_samples_per_s", "rank1_samples_per_s"} <= set(t.columns)
    assert ok["eval_metric"].between(0, 1).all()  # the optional eval_fn hook ran on rank 0
    report = (out / "report.md").read_text()
    assert "rank 1" in report and "samples/s" in report
    plan = json.loads((out / "plan.json").read_text())
    assert plan["nproc"] == 2 and plan["schema"] == "autotiacc.training_plan"


def test_cli_train_mode_errors_are_one_line(tmp_path):
    res = run_cli("tune", str(ROOT / "examples" / "train_jpeg.py"), "--mode", "fit", "--budget", "1m")
    assert res.returncode == 2 and "`--mode` got 'fit'" in res.stderr and "Traceback" not in res.stderr
    not_train = tmp_path / "model.py"
    not_train.write_text("def build_model():\n    pass\n\ndef example_inputs(batch_size=1):\n    pass\n")
    res = run_cli("tune", str(not_train), "--mode", "train", "--budget", "1m", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "train_dataset()" in res.stderr and "Traceback" not in res.stderr
    res = run_cli("tune", str(ROOT / "examples" / "train_jpeg.py"), "--mode", "train", "--max-memory", "lots",
                  "--out", str(tmp_path / "r2"))
    assert res.returncode == 2 and "`--max-memory` got 'lots'" in res.stderr


@pytest.mark.slow
def test_a_hung_rank_times_out_and_no_rank_is_left_running(tmp_path):
    import psutil

    # rank 0 must be inside its hang, and rank 1 done, when the timeout falls: 8 s, or more where
    # two ranks that return at once took longer than 2 s just now (a loaded machine's starts)
    quick, _ = run_ranks(targets.rank_pid, 2, timeout=600)
    assert quick.ok, quick.error
    overall, ranks = run_ranks(targets.rank0_hangs, 2, timeout=max(8.0, 4 * quick.seconds), pid_file=tmp_path / "pids")
    assert overall.status == "timeout" and "rank 0" in overall.error
    assert "in rank0_hangs" in overall.traceback and overall.traceback.startswith("rank 0: ")
    assert ranks[1].ok
    hung = int((tmp_path / "pids").read_text().split()[0])
    assert not psutil.pid_exists(hung) or psutil.Process(hung).status() == psutil.STATUS_ZOMBIE


def test_plans_written_before_the_precision_rename_still_load():
    plan = load_training_plan(ROOT / "experiments" / "results" / "train_jpeg_plan.json")
    assert isinstance(plan.config.precision, TrainPrecisionConfig) and plan.config.precision.mode == "bf16"
    assert "PrecisionConfig" in (ROOT / "experiments" / "results" / "train_jpeg_plan.json").read_text()
    assert {e["_type"] for e in plan.to_dict()["knobs"]} >= {"TrainPrecisionConfig", "DataConfig"}


def test_training_space_is_registered_knobs_and_the_training_strategy():
    """Sampled like inference (knobs + YAML): DDP only with several processes, pin_memory only on
    CUDA, channels_last only with convolutions; never among the inference knobs or plans."""
    import optuna

    from autotiacc.engine.space import sample, seeds
    from autotiacc.knobs import all_knobs, config_from_dict, config_to_dict
    from autotiacc.strategy import load_strategy
    from dataclasses import replace

    from autotiacc.training.config import DDPKnob, train_context

    strategy, knobs = load_strategy("training"), all_knobs("training")
    assert [k.name for k in knobs] == ["data", "compute", "precision", "memory", "ddp"]
    assert not {"data", "ddp", "memory", "compute"} & {k.name for k in all_knobs()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for nproc in (1, 2):
        ctx = train_context(cores=4, nproc=nproc, device="cpu", has_conv=False, fused_ok=True, compile=True)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(12):
            trial = study.ask()
            cfg = TrainConfig(**sample(trial, knobs, strategy, ctx))
            study.tell(trial, 1.0)
            assert not cfg.data.pin_memory and not cfg.compute.channels_last
            assert cfg.data.num_workers <= 4 // nproc
        names = set().union(*(t.params for t in study.trials))
        assert any(n.startswith("ddp.") for n in names) == (nproc > 1)
        assert "data.pin_memory" not in names and "compute.channels_last" not in names
        first = seeds(strategy, knobs, ctx)
        assert TrainConfig.from_flat({k: v for k, v in first[0].items()}) == TrainConfig()  # the baseline first
        assert any(s.get("ddp.comm_hook") == "fp16" for s in first) == (nproc > 1)
        hooks = {t.params.get("ddp.comm_hook") for t in study.trials} - {None}
        assert "bf16" not in hooks and (hooks >= {"none", "fp16"}) == (nproc > 1)  # gloo refuses bf16
    ddp_space = strategy.knobs["ddp"]
    assert "bf16" in DDPKnob().choices("comm_hook", ddp_space, replace(ctx, device="cuda"))
    assert "bf16" not in DDPKnob().choices("comm_hook", ddp_space, ctx)
    with pytest.raises(PlanError, match="unknown _type 'DataConfig'"):
        config_from_dict(config_to_dict(DataConfig()))  # an inference plan never loads a training knob
