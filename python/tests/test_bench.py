"""The GPU harness's pure-Python parts: the summary tables, and that every script compiles."""

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_scripts_compile(script):
    py_compile.compile(str(BENCH / script), doraise=True)


def test_run_all_is_valid_bash():
    subprocess.run(["bash", "-n", str(BENCH / "run_all.sh")], check=True)


def _line(**kw):
    return json.dumps(kw) + "\n"


def test_summary_tables(tmp_path):
    losses = [10.0, 9.0, 8.0]
    lines = [
        _line(kind="workload", workload="gpt2", mode="bufferheap", policy="default", error="exit 1", stderr_tail=["boom"]),
        _line(workload="gpt2", mode="native", policy=None, steps=3, sec_per_step=0.08, peak_used_gib=17.5,
              max_reserved_gib=17.2, max_allocated_gib=13.4, losses=losses, last_loss=8.0),
        _line(workload="gpt2", mode="expandable", policy=None, steps=3, sec_per_step=0.07, peak_used_gib=13.8,
              max_reserved_gib=13.5, max_allocated_gib=13.4, losses=[10.0, 9.001, 8.002], last_loss=8.002),
        _line(workload="gpt2", mode="bufferheap", policy="default", steps=3, sec_per_step=0.07, peak_used_gib=13.6,
              max_reserved_gib=13.45, max_allocated_gib=13.4, losses=[10.0, 9.0, 8.001], last_loss=8.001),
        _line(workload="gpt2", mode="bufferheap", policy="mps", steps=3, sec_per_step=0.07, peak_used_gib=20.0,
              max_reserved_gib=19.0, max_allocated_gib=13.4, losses=[10.0, 9.5, 9.0], last_loss=9.0),
        _line(mode="native", policy=None, lo=512, hi=4096, live=64, ns_per_pair=712.3),
        _line(mode="bufferheap", policy="default", lo=512, hi=4096, live=64, ns_per_pair=230.0),
        _line(mode="native", policy=None, lo=1 << 20, hi=64 << 20, live=32, ns_per_pair=864.0),
        _line(kind="micro", workload=None, mode="async", policy=None, error="timed out", stderr_tail=[]),
        "not json\n",
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(lines))
    out = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(path)], capture_output=True, text=True, check=True).stdout
    table = [line for line in out.splitlines() if line.startswith("|") and line.count("|") == 10]
    rows = {line.split("|")[2].strip(): line for line in table}
    assert "| 0.0800 | 17.50 | 17.20 | 13.40 | 1.284 |" in rows["native"] and "(reference)" in rows["native"]
    assert rows["expandable_segments"].rstrip().endswith("| yes |")
    assert rows["bufferheap (default)"].rstrip().endswith("| yes |")
    assert "**no**" in rows["bufferheap (mps)"]
    assert "| 512 B .. 4 KiB, 64 | 712 | 230 | 0.32 |" in out
    assert "| 1 MiB .. 64 MiB, 32 | 864 | – | – |" in out
    # the failure of gpt2/bufferheap was followed by a success: only the microbench failure is listed
    assert "## Failed runs" in out and "microbench / cudaMallocAsync: timed out" in out
    assert "gpt2 / bufferheap" not in out


def test_summary_without_results(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    out = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(path)], capture_output=True, text=True, check=True).stdout
    assert "no results" in out
