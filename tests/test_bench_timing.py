"""Benchmark timing with stated samples, on fake clocks: counts, not milliseconds, decide how often a case runs."""

import pytest

from bench.timing import Reps, Timing, quantile, time_ms, warm


class FakeClock:
    """Time advances only when the timed function says so: no test depends on this machine's speed."""

    name = "fake"

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def counted(clock, durations):
    """A timed function whose n-th call takes durations[n] (the last one repeated), and its call log."""
    calls = []

    def fn():
        d = durations[min(len(calls), len(durations) - 1)]
        calls.append(d)
        clock.t += d

    return fn, calls


@pytest.mark.parametrize("dt,reps,timed", [
    (0.01, Reps(warmup=5, min_reps=20, min_time_s=0.5), 50),  # the duration minimum decides: 50 x 10 ms
    (0.1, Reps(warmup=5, min_reps=20, min_time_s=0.5), 20),  # the repetition minimum decides
    (0.001, Reps(warmup=2, min_reps=10, min_time_s=1.0, max_reps=30), 30),  # the cap wins over min_time_s
    (0.0, Reps(warmup=0, min_reps=4, min_time_s=1.0, max_reps=9), 9),  # a call the clock cannot see: the cap
])
def test_time_ms_runs_warmups_apart_then_both_minimums(dt, reps, timed):
    clock = FakeClock()
    fn, calls = counted(clock, [dt])
    setups = []
    t = time_ms(fn, reps, setup=lambda: setups.append(len(calls)), clock=clock)
    assert len(calls) == reps.warmup + timed
    assert setups == list(range(reps.warmup + timed))  # setup before every call, warm-ups included
    assert (t.samples, t.warmup, t.timer) == (timed, reps.warmup, "fake")
    assert t.timed_s == pytest.approx(dt * timed)
    assert reps.planned(dt) == timed if dt else True


def test_warmups_are_never_in_the_timing():
    clock = FakeClock()
    fn, calls = counted(clock, [5.0, 5.0, 0.01])  # two slow first calls (compilation, caches)
    t = time_ms(fn, Reps(warmup=2, min_reps=10, min_time_s=0.0), clock=clock)
    assert t.samples == 10 and t.max_ms == pytest.approx(10.0) and t.ms == pytest.approx(10.0)


def test_spread_is_median_p20_p80_of_the_samples():
    clock = FakeClock()
    durations = [0.0] + [k / 1000 for k in range(1, 11)]  # one warm-up, then 1..10 ms
    fn, _ = counted(clock, durations)
    t = time_ms(fn, Reps(warmup=1, min_reps=10, min_time_s=0.0, max_reps=10), clock=clock)
    ms = [float(k) for k in range(1, 11)]
    assert t.ms == pytest.approx(5.5) and t.p20 == pytest.approx(quantile(ms, 0.2)) and t.p80 == pytest.approx(
        quantile(ms, 0.8))
    assert (t.min_ms, t.max_ms) == (pytest.approx(1.0), pytest.approx(10.0))
    row = t.row()
    assert {"ms", "p20", "p80", "samples", "warmup", "timed_s", "timer", "spread"} <= row.keys()
    assert row["spread"] == pytest.approx((t.p80 - t.p20) / t.ms)


def test_reps_are_validated_and_planned():
    with pytest.raises(ValueError, match="min_reps"):
        Reps(min_reps=0)
    with pytest.raises(ValueError, match="max_reps"):
        Reps(min_reps=10, max_reps=5)
    r = Reps(warmup=3, min_reps=20, min_time_s=2.0, max_reps=1000)
    assert (r.planned(0.5), r.planned(0.01), r.planned(1e-6)) == (20, 200, 1000)
    clock = FakeClock()
    fn, calls = counted(clock, [0.25])
    assert warm(fn, r, clock=clock) == [0.25] * 3 and len(calls) == 3


def test_faster_beyond_the_spread():
    a = Timing(ms=1.0, p20=0.95, p80=1.05, min_ms=0.9, max_ms=1.1, mean_ms=1.0, samples=20, warmup=5, timed_s=0.02, timer="x")
    b = Timing(ms=1.2, p20=1.1, p80=1.3, min_ms=1.0, max_ms=1.4, mean_ms=1.2, samples=20, warmup=5, timed_s=0.02, timer="x")
    c = Timing(ms=1.1, p20=1.0, p80=1.2, min_ms=1.0, max_ms=1.3, mean_ms=1.1, samples=20, warmup=5, timed_s=0.02, timer="x")
    assert a.clearly_faster_than(b) and not a.clearly_faster_than(c) and not b.clearly_faster_than(a)


def test_the_step_benchmark_times_counted_steps_from_the_restored_state():
    """bench_step.time_step: one first call (compilation) apart, the warm-ups, the model restored, the timed steps."""
    from bench.bench_step import time_step

    clock = FakeClock()
    log = []

    class Model:
        def __init__(self):
            self.w = 0

        def state_dict(self):
            return {"w": self.w}

        def load_state_dict(self, st):
            log.append(("restore", self.w))
            self.w = st["w"]

    model = Model()

    def step(x):
        model.w += 1
        clock.t += 0.05
        log.append("step")

    t, first = time_step(step, (None,), model, Reps(warmup=4, min_reps=30, min_time_s=2.0), clock=clock)
    assert log[:5] == ["step"] * 5 and log[5] == ("restore", 5)  # first call + 4 warm-ups, then the restore
    assert log.count("step") == 1 + 4 + 40 and (t.samples, t.warmup) == (40, 4)  # 2 s at 50 ms: 40 > 30
    assert first >= 0


def test_the_step_decision_names_its_samples_and_refuses_overlapping_spreads():
    from bench.bench_step import decide, decisions

    def row(variant, ms, lo, hi):
        return dict(px=32, batch=256, variant=variant, ms=ms, p20=lo, p80=hi, samples=30, warmup=5, timer="cuda-event")

    rows = [row("a_reference", 90, 89, 91), row("b_fast(compile=default=auto,graph=off)", 20, 19.5, 20.5),
            row("b_fast(compile=default=auto,graph=on)", 12, 11.8, 12.3)]
    (d,) = decisions(rows)
    assert d["decision"] == "train.graph" and d["choice"] == "on" and d["rests_on"]["off"]["samples"] == 30
    assert d["rests_on"]["on"] == {"ms": 12, "p20": 11.8, "p80": 12.3, "samples": 30, "warmup": 5, "timer": "cuda-event"}
    close = decide("train.graph", {"off": row("x", 12.2, 11.9, 12.6), "on": row("y", 12.0, 11.7, 12.4)})
    assert close["choice"] == "undecided" and close["fastest"] == "on"


def test_the_loader_timing_counts_batches_across_epochs_and_closes_the_loader():
    from bench.bench_data import time_loader

    clock = FakeClock()
    events = []

    class Loader:
        def __iter__(self):
            events.append("iter")

            def epoch():
                try:
                    for _ in range(7):  # a short epoch: the timing runs through several
                        clock.t += 0.1
                        yield (_Batch(4), None, None)
                finally:
                    events.append("iterator closed")

            return epoch()

        def close(self):
            events.append("loader closed")

    t, batch, left = time_loader(Loader, Reps(warmup=8, min_reps=40, min_time_s=3.0), clock=clock)
    assert (t.warmup, t.samples, batch) == (8, 40, 4) and t.ms == pytest.approx(100.0)
    assert events.count("iter") == 7 and events[-2:] == ["iterator closed", "loader closed"] and left == 0


def test_a_bursty_loader_is_rated_by_wall_time_over_whole_epochs():
    """16 workers deliver 16 batches in a burst per epoch: one 1.6 s wait, then 15 free batches. The rate is
    images over wall time (10 img/s here: 16 x 1 image per 1.6 s), not the median batch (a free one);
    warm-up is a whole epoch and the timed batches span at least two."""
    from bench.bench_data import rate_row, time_loader

    clock = FakeClock()

    class Loader:
        def __len__(self):
            return 16

        def __iter__(self):
            for i in range(16):
                # every worker decodes at once, then the queue holds 16 batches, taken in a microsecond each
                clock.t += 1.6 if i == 0 else 1e-6
                yield (_Batch(1), None, None)

    t, batch, _ = time_loader(Loader, Reps(warmup=2, min_reps=4, min_time_s=0.0), clock=clock)
    assert t.warmup == 16 and t.samples >= 32
    row = rate_row(t, batch)
    assert row["img_per_s"] == pytest.approx(10.0, rel=0.05) and row["img_per_s_median"] > 1000


class _Batch:
    def __init__(self, n):
        self.shape = (n,)


def test_tune_launch_keeps_the_default_unless_a_candidate_wins_beyond_the_spread(monkeypatch):
    import bench.tune_launch as tl

    def timing(ms, half):
        return Timing(ms=ms, p20=ms - half, p80=ms + half, min_ms=ms - half, max_ms=ms + half, mean_ms=ms, samples=20,
                      warmup=5, timed_s=1.0, timer="fake")

    class Sink:
        def emit(self, row):
            pass

    def run(times):
        it = iter(times)
        monkeypatch.setattr(tl, "measure", lambda fn, setup, reps: (next(it), "graph replay"))
        monkeypatch.setattr(tl, "workloads", lambda fam, dev, tiny: {"w": (lambda: None, None)})
        import torch

        return tl.tune_family("ema", torch.device("cpu"), True, float("inf"), Sink())

    within = run([timing(1.0, 0.1), timing(0.95, 0.1)])  # 5% faster, inside the spread: the default stays
    assert within["best"] == tl.multi_tensor_candidates(True)[0] and not within["candidates"][1]["beats_default"]
    beyond = run([timing(1.0, 0.02), timing(0.8, 0.02)])
    assert beyond["best"] == tl.multi_tensor_candidates(True)[1] and beyond["candidates"][1]["timings"]["w"]["samples"] == 20
    assert beyond["rule"].startswith("the default unless")


def test_dali_settings_change_only_beyond_the_defaults_drift_and_a_minimum_gain():
    from bench.bench_data import choose_dali_settings

    d = (8, 0.65)
    # 10% faster than the defaults' best, whose two timings drifted 2%: the pair wins
    won = choose_dali_settings(d, {d: 1000.0, (4, 0.9): 1100.0, (8, 0.9): 1020.0}, [980.0, 1000.0], auto_threads=8)
    assert won["choice"] == {"data.dali_threads": 4, "data.dali_hw_decoder_load": 0.9}
    assert won["default"] == {"data.dali_threads": 0, "data.dali_hw_decoder_load": 0.65}  # 8 is auto's here
    auto = choose_dali_settings(d, {d: 1000.0, (8, 0.9): 1100.0}, [1000.0, 1000.0], auto_threads=8)
    assert auto["choice"] == {"data.dali_threads": 0, "data.dali_hw_decoder_load": 0.9}  # stays auto, not a fixed 8
    assert won["x_default"] == pytest.approx(1.1) and won["default_drift"] == pytest.approx(0.02)
    assert won["rests_on"]["defaults, each timing"] == [980.0, 1000.0]
    # the same gain inside a 12% drift of the defaults: undecided, the defaults stay
    drift = choose_dali_settings(d, {d: 1000.0, (4, 0.9): 1100.0}, [880.0, 1000.0], auto_threads=8)
    assert drift["choice"] == "keep the defaults" and drift["fastest"]["data.dali_threads"] == 4
    assert drift["needed_gain"] == pytest.approx(0.12)
    # 2% faster without drift: under the 3% minimum gain
    small = choose_dali_settings(d, {d: 1000.0, (4, 0.65): 1020.0}, [1000.0, 1000.0], auto_threads=8)
    assert small["choice"] == "keep the defaults" and small["needed_gain"] == pytest.approx(0.03)
    # the defaults fastest
    assert choose_dali_settings(d, {d: 1000.0, (2, 0.65): 700.0}, [1000.0, 990.0])["choice"] == "keep the defaults"


def test_the_dali_grid_resolves_auto_threads_as_the_product_and_refuses_bad_values(monkeypatch):
    from bench.bench_data import dali_grid
    from vssl_fast.data.folder_dali import dali_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dali_threads(0) == 8 and dali_threads(3) == 3
    assert dali_grid("0,4,8", "0.65,0.9") == [(4, 0.65), (4, 0.9), (8, 0.65), (8, 0.9)]  # auto is 8 here: once
    assert dali_grid("", "0.9") == [(8, 0.9)]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks on 16 cores: 2 threads each
    assert dali_threads(0) == 2
    for threads, hw, what in (("4,x", "", "integers"), ("-1", "", ">= 0"), ("", "1.5", "[0, 1]")):
        with pytest.raises(SystemExit, match=what.replace("[", r"\[")):
            dali_grid(threads, hw)


def test_launches_per_step_count_the_hosts_launch_calls_and_the_devices_kernels():
    """bench_step's profiler count (a card only), on events as torch.profiler names them."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from bench.bench_step import count_launches

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    ev = lambda name, dev=cpu: SimpleNamespace(name=name, device_type=dev)  # noqa: E731
    eager = [ev("aten::mm"), ev("cudaLaunchKernel"), ev("cuLaunchKernel"), ev("cudaMemcpyAsync"),
             ev("ampere_sgemm", cuda), ev("triton_lars", cuda), ev("cudaStreamSynchronize")]
    eager += [ev("Memcpy HtoD (Pinned -> Device)", cuda), ev("Memset (Device)", cuda), ev("cudaLaunchHostFunc")]
    assert count_launches(eager) == dict(host_launches=3, graph_launches=0, gpu_kernels=2, gpu_copies=2,
                                         other_launch_apis=["cudaLaunchHostFunc"])  # an API the list misses: named
    captured = [ev("cudaGraphLaunch")] + [ev(f"k{i}", cuda) for i in range(40)]
    assert count_launches(captured) == dict(host_launches=1, graph_launches=1, gpu_kernels=40, gpu_copies=0,
                                            other_launch_apis=[])


def test_launches_are_profiled_after_every_case_is_timed(monkeypatch):
    """CUPTI stays attached once the profiler starts: the kept fast steps are profiled at the end, each
    giving a 'launches' row after every timing row."""
    import torch

    import bench.bench_step as bs

    order = []
    monkeypatch.setattr(bs, "profile_launches", lambda step, xs: order.append("profile") or {"host_launches": 7})
    kept, emitted = [], []
    rows = bs.run_case(16, 2, torch.device("cpu"), True, graph_modes=("off", "on"), keep=kept,
                       emit=lambda r: emitted.append(r.get("kind", "timing")))
    assert len(kept) == 2 and order == [] and all(r.get("kind") != "launches" for r in rows)
    out = bs.profile_kept(kept, emit=lambda r: emitted.append(r["kind"]))
    assert [r["variant"] for r in out] == [r["variant"] for r in rows if r["variant"].startswith("b_fast")]
    assert order == ["profile"] * 2 and emitted[-2:] == ["launches"] * 2 and "launches" not in emitted[:-2]
    assert kept == [] and out[0]["host_launches"] == 7


def test_the_step_variants_time_each_resolved_compile_mode_once():
    """--compile-modes auto,none at 224 px (auto resolves to none there) times the 'none' step once."""
    import torch

    from bench.bench_step import variants

    names = [n for n, _ in variants(224, 2, torch.device("cpu"), True, ("auto", "none"), ("off",))]
    fast = [n for n in names if n.startswith("b_fast")]
    assert len(fast) == len(set(n.split(",")[0].replace("=auto", "") for n in fast)) == 1, fast
