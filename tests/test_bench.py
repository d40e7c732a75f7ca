"""Every benchmark is one command that runs end to end at a tiny size on the CPU (GPU figures: bench/RESULTS.md)."""

import json

import pytest


@pytest.mark.parametrize("name", ["bench_cosine_loss", "bench_ema", "bench_lamb", "bench_lars"])
def test_bench_tiny_runs_and_writes_rows(name, tmp_path, capsys):
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    out = tmp_path / "rows.jsonl"
    rows = mod.main(["--tiny", "--out", str(out)])
    text = capsys.readouterr().out
    assert "| provider |" in text or "| provider | ms |" in text or " provider " in text
    timed = [r for r in rows if "ms" in r]
    base = "loop" if name == "bench_ema" else "reference"
    want = {"fused", "eager", "compiled"} if name == "bench_cosine_loss" else {"ours", base}
    assert want <= {r["provider"] for r in timed}
    assert all(r["ms"] > 0 for r in timed)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len(rows)
    for r in lines:
        assert {"device", "torch", "triton", "git", "date"} <= r.keys()


def test_bench_data_tiny(tmp_path, capsys):
    from bench import bench_data

    rows = bench_data.main(["--tiny", "--jpeg-dir", str(tmp_path / "j"), "--out", str(tmp_path / "rows.jsonl")])
    paths = {r["path"]: r for r in rows}
    assert paths["cifar_device"]["img_per_s"] > 0 and paths["torchvision_cpu_baseline"]["img_per_s"] > 0
    sizes = [p.stat().st_size for p in (tmp_path / "j" / "train").rglob("*.jpg")]
    assert len(sizes) == 32 and 40_000 < sum(sizes) / len(sizes) < 120_000  # photo-like 500x375 JPEGs
