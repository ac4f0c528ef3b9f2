"""The GPU-first search and the profile that adds up, proven on CPU: the CUDA space is computed
without CUDA, seeds are ordered by crafted diagnoses, new config fields round-trip, the
profiler attribution adds up on crafted timelines and on a real convnet forward."""
from __future__ import annotations

import json

import optuna
import pytest
import torch
from torch import nn

from autotiacc.engine.space import seed_allowed
from autotiacc.errors import PlanError, UserInputError
from autotiacc.knobs import ExecutionConfig, SearchContext, config_from_dict, config_to_dict, get_knob
from autotiacc.knobs import all_knobs
from autotiacc.profiling.attribution import Span, attribute, profile_forwards, range_name, summarise
from autotiacc.profiling.diagnosis import diagnose, order_seeds
from autotiacc.profiling.gpu import peak_from_name, peak_from_specs
from autotiacc.strategy import load_strategy


def _allowed(entry, strategy, ctx) -> bool:
    return seed_allowed(entry, all_knobs(), strategy, ctx)


def _cuda(level: int = 1) -> SearchContext:
    return SearchContext(device="cuda", level=level, has_conv=True)


def _cpu(level: int = 1) -> SearchContext:
    return SearchContext(device="cpu", level=level, has_conv=True)


# -- the space --------------------------------------------------------------------------------
def test_cuda_only_choices_are_offered_for_cuda_only():
    s = load_strategy("inference-latency")
    ex, prec, rt = get_knob("execution"), get_knob("precision"), get_knob("runtime")
    assert ex.choices("cuda_graphs", s.space("execution"), _cpu()) == [False]
    assert ex.choices("cuda_graphs", s.space("execution"), _cuda()) == [False, True]
    assert ex.choices("compile_mode", s.space("execution"), _cpu(1)) == ["default"]
    # on CUDA autotuned kernels are level 1; max-autotune (adds CUDA graphs) stays level 2
    assert ex.choices("compile_mode", s.space("execution"), _cuda(1)) == [
        "default", "max-autotune-no-cudagraphs", "reduce-overhead"]
    assert "max-autotune" in ex.choices("compile_mode", s.space("execution"), _cuda(2))
    assert "tf32" not in prec.choices("mode", s.space("precision"), _cpu())
    assert "tf32" in prec.choices("mode", s.space("precision"), _cuda())
    assert rt.choices("cudnn_benchmark", s.space("runtime"), _cpu()) == [False]
    assert rt.choices("cudnn_benchmark", s.space("runtime"), _cuda()) == [False, True]


def test_sampled_configs_use_cuda_graphs_on_cuda_only():
    s = load_strategy("inference-latency")
    ex = get_knob("execution")

    def sampled(ctx):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        out = []
        for _ in range(60):
            trial = study.ask()
            out.append(ex.suggest(trial, s.space("execution"), ctx))
            study.tell(trial, 1.0)
        return out

    assert not any(c.cuda_graphs for c in sampled(_cpu()))
    on_cuda = sampled(_cuda())
    assert any(c.cuda_graphs for c in on_cuda)
    assert all(c.backend in ("eager", "torchscript") for c in on_cuda if c.cuda_graphs)


@pytest.mark.parametrize("name", ["inference-latency", "inference-throughput", "quick"])
def test_cuda_seeds_are_searchable_on_cuda_and_skipped_on_cpu(name):
    s = load_strategy(name)
    assert s.enqueue_cuda and s.seeds(cuda=True) == s.enqueue_cuda and s.seeds(cuda=False) == s.enqueue
    assert s.enqueue_cuda[0] == {}
    for seed in s.enqueue_cuda:  # the YAML names only values its own space offers on CUDA
        assert _allowed(seed, s, _cuda(2)), seed
    at_level1 = [e for e in s.enqueue_cuda if _allowed(e, s, _cuda(1))]
    assert len(at_level1) >= len(s.enqueue_cuda) - 1  # only max-autotune waits for level 2
    gpu_only = [e for e in s.enqueue_cuda if e.get("execution", {}).get("cuda_graphs")
                or e.get("runtime", {}).get("cudnn_benchmark")]
    assert gpu_only and not any(_allowed(e, s, _cpu(2)) for e in gpu_only)


def test_strategy_rejects_a_seed_list_that_is_not_a_list(tmp_path):
    bad = tmp_path / "s.yaml"
    bad.write_text("name: x\nknobs: {}\nenqueue_cuda: {execution: {backend: eager}}\n")
    with pytest.raises(UserInputError, match="`enqueue_cuda` must be a list"):
        load_strategy(str(bad))


# -- configs ----------------------------------------------------------------------------------
def test_cuda_graphs_round_trips_and_old_plans_still_load():
    cfg = ExecutionConfig(backend="torchscript", cuda_graphs=True)
    back = config_from_dict(json.loads(json.dumps(config_to_dict(cfg))))
    assert back == cfg
    old = {"_type": "ExecutionConfig", "_version": 1,
           "_data": {"backend": "compile", "compile_mode": "reduce-overhead", "freezing": False, "dynamic": None}}
    assert config_from_dict(old) == ExecutionConfig(backend="compile", compile_mode="reduce-overhead")
    bad = {"_type": "ExecutionConfig", "_version": 1, "_data": {"backend": "compile", "cuda_graphs": True}}
    with pytest.raises(PlanError, match="reduce-overhead"):
        config_from_dict(bad)


def test_cuda_graph_runner_refuses_without_cuda_with_the_fix():
    from autotiacc.inference.candidate import OptimizedModel
    from autotiacc.knobs import configs_from_params

    model, x = nn.Linear(4, 2).eval(), torch.randn(3, 4)
    configs = configs_from_params({"execution": {"backend": "eager", "cuda_graphs": True}})
    with pytest.raises(UserInputError, match="`cuda_graphs` needs a CUDA device, got device 'cpu'"):
        OptimizedModel(model, configs, example_inputs=(x,), device="cpu")
    with pytest.raises(UserInputError, match="needs a CUDA device, got device 'meta'"):
        OptimizedModel(nn.Linear(4, 2, device="meta"), configs, example_inputs=(x.to("meta"),), device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="sees no CUDA device"):
            OptimizedModel(model, configs, example_inputs=(x,), device="cuda")


# -- diagnosis and seed order -----------------------------------------------------------------
H100 = {"flops_fp32": 67e12, "bytes_per_s": 3.35e12, "source": "test"}


def test_diagnosis_names_the_bound_with_its_figures():
    launch = diagnose(device="cuda", forward_ms=3.5, busy_ms=0.95, device_events=160, flops=8e9,
                      bytes_moved=2e8, peaks=H100)
    assert launch["kind"] == "launch-bound" and "27%" in launch["reason"] and "160 kernels" in launch["reason"]
    assert launch["figures"]["mean_kernel_us"] == pytest.approx(950 / 160)
    compute = diagnose(device="cuda", forward_ms=10, busy_ms=9.5, device_events=160, flops=4e11, bytes_moved=2e9,
                       peaks=H100)
    assert compute["kind"] == "compute-bound"  # 63 % of peak FLOP/s vs 6 % of bandwidth
    memory = diagnose(device="cuda", forward_ms=10, busy_ms=9.5, device_events=160, flops=1e10, bytes_moved=2e10,
                      peaks=H100)
    assert memory["kind"] == "memory-bound"
    unknown = diagnose(device="cuda", forward_ms=10, busy_ms=9.5, device_events=1, flops=1, bytes_moved=1)
    assert unknown["kind"] is None and "unknown" in unknown["reason"]
    cpu = diagnose(device="cpu", forward_ms=1.0, busy_ms=0.9, device_events=40, flops=1e6, bytes_moved=1e5)
    assert cpu["kind"] is None and "not diagnosed on CPU" in cpu["reason"]
    assert diagnose(device="cpu", forward_ms=1.0, busy_ms=0.3, device_events=40, flops=1, bytes_moved=1)["kind"] \
        == "overhead-bound"


def test_peaks_from_device_specs_match_the_data_sheets():
    flops, bw = peak_from_specs(sms=132, major=9, minor=0, sm_clock_mhz=1980, mem_clock_mhz=2619, bus_width_bits=5120)
    assert flops == pytest.approx(66.9e12, rel=0.01) and bw == pytest.approx(3.35e12, rel=0.01)  # H100 SXM
    flops, bw = peak_from_specs(sms=40, major=7, minor=5, sm_clock_mhz=1590, mem_clock_mhz=5001, bus_width_bits=256)
    assert flops == pytest.approx(8.1e12, rel=0.01) and bw == pytest.approx(320e9, rel=0.01)  # T4
    assert peak_from_name("NVIDIA H200")[1] == 4.8e12 and peak_from_name("Some New GPU") is None


def _kinds(seed):
    ex = seed.get("execution", {})
    graphs = ex.get("cuda_graphs") or ex.get("compile_mode") in ("reduce-overhead", "max-autotune")
    reduced = seed.get("precision", {}).get("mode", "fp32")[:4] in ("fp16", "bf16")
    return graphs, reduced, ex.get("compile_mode", "").startswith("max-autotune")


def test_launch_bound_profile_puts_cuda_graphs_first():
    seeds = load_strategy("inference-latency").enqueue_cuda
    diag = diagnose(device="cuda", forward_ms=3.5, busy_ms=0.95, device_events=160, flops=8e9, bytes_moved=2e8)
    ordered = order_seeds(seeds, diag)
    assert ordered[0] == {} and sorted(map(json.dumps, ordered)) == sorted(map(json.dumps, seeds))
    n_graphs = sum(_kinds(s)[0] for s in seeds)
    assert n_graphs >= 4 and all(_kinds(s)[0] for s in ordered[1:1 + n_graphs])


def test_compute_bound_profile_puts_reduced_precision_and_autotuning_first():
    seeds = load_strategy("inference-latency").enqueue_cuda
    diag = diagnose(device="cuda", forward_ms=10, busy_ms=9.5, device_events=160, flops=4e11, bytes_moved=2e9,
                    peaks=H100)
    ordered = order_seeds(seeds, diag)
    first = ordered[1]
    assert _kinds(first)[1] and _kinds(first)[2]  # fp16 weights + autotuned kernels
    reduced = [i for i, s in enumerate(ordered) if _kinds(s)[1]]
    assert reduced == list(range(1, 1 + len(reduced)))  # every reduced-precision seed before the rest


def test_memory_bound_puts_precision_and_layout_first_and_no_diagnosis_keeps_the_order():
    seeds = load_strategy("inference-latency").enqueue_cuda
    diag = {"kind": "memory-bound"}
    ordered = order_seeds(seeds, diag)
    assert all(_kinds(s)[1] and s.get("layout", {}).get("channels_last") for s in ordered[1:4])
    assert order_seeds(seeds, None) == seeds
    assert order_seeds(seeds, {"kind": None, "reason": "not diagnosed on CPU"}) == seeds
    cpu = load_strategy("inference-latency").enqueue
    ordered = order_seeds(cpu, {"kind": "overhead-bound"})
    backends = [e.get("execution", {}).get("backend", "eager") for e in ordered]
    n_graph = sum(b != "eager" for b in backends)  # TorchScript, ONNX Runtime, compile: no Python per op
    assert ordered[0] == {} and all(b != "eager" for b in backends[1:1 + n_graph])
    assert ordered[1] == {"execution": {"backend": "torchscript"}}  # ties keep the cheap build first


# -- attribution ------------------------------------------------------------------------------
def _range(path, start, end):
    return Span("range", range_name(path), start, end)


def test_cpu_attribution_is_exact_on_a_crafted_trace():
    """Two forwards; `b` is called twice, `b.c` nested; ops go to their innermost range; the
    self times of one forward add up to it exactly."""
    spans = [_range("", 0, 100), _range("a", 5, 40), Span("op", "aten::mm", 10, 30, id=1, self_us=20),
             _range("b", 45, 60), Span("op", "aten::relu", 46, 50, id=2, self_us=4), _range("b.c", 50, 58),
             Span("op", "aten::add", 51, 57, id=3, self_us=5), Span("op", "aten::add_", 52, 53, id=6, self_us=1),
             _range("b", 70, 90),
             Span("op", "aten::relu", 71, 80, id=4, self_us=9),
             _range("", 200, 250), _range("a", 210, 240), Span("op", "aten::mm", 212, 238, id=5, self_us=26),
             _range("stray", 300, 310)]  # a module called outside the model's forward
    f1, f2 = attribute(spans, device=False)
    assert f1.wall_us == 100 and f2.wall_us == 50
    m = f1.modules
    assert m["a"][:3] == [1, 35, 20] and m["b"][0] == 2 and m["b"][1] == (15 - 8) + 20 and m["b"][2] == 13
    assert m["b.c"][1:3] == [8, 6] and m[""][1] == 100 - 35 - 15 - 20
    assert sum(v[1] for v in m.values()) == pytest.approx(f1.wall_us)
    assert f1.busy_us == 39 and f1.ops == 4


def test_device_attribution_charges_idle_gaps_to_the_kernel_that_waited():
    """CUDA: kernels belong to the module whose op launched them; each kernel takes the idle
    gap before it; CPU time after the last kernel goes to the model."""
    spans = [_range("", 0, 100), _range("conv", 0, 30), Span("op", "aten::conv2d", 5, 25, id=7),
             _range("fc", 30, 60), Span("op", "aten::mm", 35, 55, id=8),
             Span("device", "k_conv", 20, 40, link=7), Span("device", "k_mm", 60, 70, link=8),
             Span("device", "k_mm2", 72, 80, link=8), Span("device", "unrelated", 85, 90, link=99)]
    (f,) = attribute(spans, device=True)
    assert f.wall_us == 100 and f.device_events == 3 and f.busy_us == 38
    assert f.modules["conv"][1:] == [40, 20, 1]  # 20 us idle before it + 20 us kernel
    assert f.modules["fc"][1:] == [40, 18, 2]  # 20 idle + 10 kernel, 2 idle + 8 kernel
    assert f.modules[""][1] == 20  # 80 -> 100 on the CPU after the last kernel
    assert sum(v[1] for v in f.modules.values()) == pytest.approx(f.wall_us)


def test_idle_time_is_rescaled_to_the_plain_forward():
    spans = [_range("", 0, 100), _range("a", 0, 50), Span("op", "x", 0, 40, id=1, self_us=40),
             _range("b", 50, 100), Span("op", "y", 50, 70, id=2, self_us=20)]
    att = summarise(attribute(spans, device=False), plain_ms=0.08)  # profiler added 20 us
    # busy 60 us stays; idle 40 us (10 in a, 30 in b, none in the model itself) is scaled to 20 us
    assert att.idle_scale == pytest.approx(0.5)
    assert att.modules["a"][1] == pytest.approx((40 + 5) / 1e3)
    assert att.modules["b"][1] == pytest.approx((20 + 15) / 1e3)
    assert sum(v[1] for v in att.modules.values()) == pytest.approx(0.08)
    # a plain forward slower than the profiled one is noise: idle time is not scaled up
    noisy = summarise(attribute(spans, device=False), plain_ms=0.2)
    assert noisy.idle_scale == 1.0 and sum(v[1] for v in noisy.modules.values()) == pytest.approx(0.1)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.block(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_attributed_shares_add_up_to_the_plain_forward_on_cpu():
    """Done-means on CPU: the module self-time shares sum to 95-105 % of the forward measured
    without the profiler. The CPU is shared: best of three attempts."""
    from autotiacc.profiling.forward import profile_model

    torch.manual_seed(0)
    model, x = TinyConvNet().eval(), torch.randn(2, 3, 32, 32)
    sums = []
    for _ in range(3):
        prof = profile_model(model, (x,), target_s=0.6, warmup_s=0.2)
        sums.append(prof["shares_sum"])
        if 0.95 <= sums[-1] <= 1.05:
            break
    assert any(0.95 <= s <= 1.05 for s in sums), sums
    mods = {m["path"]: m for m in prof["modules"]}
    assert mods["stem.0"]["busy_ms"] > 0 and mods["stem.0"]["self_ms"] >= mods["stem.0"]["busy_ms"] - 1e-9
    assert mods["stem"]["inclusive_ms"] == pytest.approx(sum(mods[p]["self_ms"] for p in ("stem", "stem.0", "stem.1",
                                                                                            "stem.2")))
    assert prof["diagnosis"]["figures"]["ops_per_forward"] > 5
    assert prof["diagnosis"]["kind"] in (None, "overhead-bound")


def test_profile_forwards_leaves_the_model_as_it_was():
    model, x = TinyConvNet().eval(), torch.randn(1, 3, 16, 16)
    before = model(x)
    profile_forwards(model, (x,), device="cpu", target_s=0.1, warmup_s=0.05)
    assert all("forward" not in m.__dict__ for m in model.modules())  # the ranged forwards are gone
    assert torch.equal(model(x), before)


def test_report_states_the_diagnosis_and_the_attribution():
    from types import SimpleNamespace

    from autotiacc.report.profile import profile_sections

    prof = {"method": "profiler_attribution", "device": "cuda", "nvtx": True, "shares_sum": 1.0, "busy_ms": 0.95,
            "timer_overhead": 0.4, "idle_scale": 0.6, "forward": {"median_ms": 3.5, "spread": 0.01, "n": 50},
            "modules": [], "diagnosis": diagnose(device="cuda", forward_ms=3.5, busy_ms=0.95, device_events=160,
                                                 flops=8e9, bytes_moved=2e8, peaks=H100)}
    (title, lines), = profile_sections(SimpleNamespace(profile=prof, plan=None, trials=None))
    text = "\n".join(lines)
    assert "diagnosis: launch-bound" in text and "kernels/forward 160" in text and "NVTX range per module" in text
    assert "busy share 27%" in text


def test_cuda_graph_replays_bookkeeping_runs_on_cpu():
    """What runs around the capture, for real on CPU (`GraphReplays`, which CUDAGraphRunner is with
    a CUDA capture): one replay per input signature, inputs copied into the static buffers, outputs
    cloned (the next replay overwrites the static ones), a warned fallback past MAX_GRAPHS. The
    capture given replays the runner on the static inputs into the static outputs, as a CUDA graph
    does; the CUDA capture itself is checked on a GPU (experiments/gpu_graphs_profile_check.py)."""
    import warnings

    from autotiacc.knobs import cuda_graphs

    captured = []

    class Replay:
        def __init__(self, fn, static, out):
            self.fn, self.static, self.out = fn, static, out

        def replay(self):
            self.out.copy_(self.fn(*self.static))

    def capture_on_cpu(runner, inputs):
        captured.append([tuple(t.shape) for t in inputs])
        static = [torch.empty_like(t).copy_(t) for t in inputs]
        out = runner(*static).clone()
        return Replay(runner, static, out), static, out

    lin = nn.Linear(4, 3).eval()
    r = cuda_graphs.GraphReplays(lin, capture_on_cpu)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        ya, yb = r(a), r(b)
        assert torch.allclose(ya, lin(a)) and torch.allclose(yb, lin(b)) and captured == [[(2, 4)]]
        assert not torch.allclose(ya, yb)  # ya was cloned: the second replay did not overwrite it
        for n in range(2, 2 + cuda_graphs.MAX_GRAPHS - 1):
            r(torch.randn(n + 1, 4))
        assert r.graphs == cuda_graphs.MAX_GRAPHS == len(captured)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            c = torch.randn(9, 4)
            assert torch.allclose(r(c), lin(c)) and r.graphs == cuda_graphs.MAX_GRAPHS == len(captured)
        assert any("without a CUDA graph" in str(w.message) for w in seen)
    with pytest.raises(UserInputError, match="tensor inputs only"):
        r(a, 3)
    with pytest.raises(UserInputError, match="needs a CUDA device, got device 'cpu'"):
        cuda_graphs.CUDAGraphRunner(lin, "cpu")


def test_profile_and_sensitivity_put_the_model_on_the_device():
    """The model is a pytree leaf: mapping `.to` over tensors left it on the CPU on CUDA."""
    from autotiacc.device import to_device

    moved = to_device(TinyConvNet(), "meta")
    assert {p.device.type for p in moved.parameters()} == {"meta"}
    scripted = torch.jit.script(nn.Linear(2, 2))
    assert next(to_device(scripted, "meta").parameters()).device.type == "meta"


def test_the_tunes_stage_one_on_cuda_starts_with_what_the_diagnosis_names():
    """The Optuna params the tune enqueues (engine.space.seeds over the ordered entries): on a
    launch-bound CUDA model the first after the baseline replay CUDA graphs in fp16 with
    channels_last; on CPU the same strategy enqueues its CPU entries, none CUDA-only."""
    from autotiacc.engine.space import seeds
    from autotiacc.knobs import all_knobs

    s = load_strategy("inference-latency")
    launch = {"kind": "launch-bound"}
    on_cuda = seeds(s, all_knobs(), _cuda(1), entries=order_seeds(s.seeds(cuda=True), launch))
    assert on_cuda[0]["backend"] == "eager" and not on_cuda[0]["cuda_graphs"] and on_cuda[0]["mode"] == "fp32"
    first = on_cuda[1]
    assert (first["cuda_graphs"] or first["compile_mode"] == "reduce-overhead") and first["mode"] == "fp16_weights"
    assert first["channels_last"] and not any(p["compile_mode"] == "max-autotune" for p in on_cuda)  # level 2 only
    on_cpu = seeds(s, all_knobs(), _cpu(1), entries=order_seeds(s.seeds(cuda=False), launch))
    assert len(on_cpu) >= 5 and not any(p["cuda_graphs"] or p["cudnn_benchmark"] or p["mode"] == "tf32" for p in on_cpu)
