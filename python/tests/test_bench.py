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


def test_a_run_whose_losses_went_nan_does_not_match(tmp_path):
    nan = float("nan")
    lines = [
        _line(workload="gpt2", mode="native", policy=None, losses=[10.0, 9.0, 8.0]),
        _line(workload="gpt2", mode="bufferheap", policy="default", losses=[10.0, nan, nan]),
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(lines))
    out = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(path)], capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if "bufferheap (default)" in line)
    assert "**no**" in row and "inf" in row


def test_latency_ratios_are_taken_only_inside_one_run(tmp_path):
    lines = [
        _line(mode="native", policy=None, lo=512, hi=4096, live=64, ns_per_pair=700.0, run="a"),
        _line(mode="bufferheap", policy="default", lo=512, hi=4096, live=64, ns_per_pair=210.0, run="a"),
        _line(mode="native", policy=None, lo=1 << 20, hi=64 << 20, live=32, ns_per_pair=800.0, run="a"),
        _line(mode="bufferheap", policy="default", lo=1 << 20, hi=64 << 20, live=32, ns_per_pair=600.0, run="b"),
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(lines))
    out = subprocess.run([sys.executable, str(BENCH / "summarize.py"), str(path)], capture_output=True, text=True, check=True).stdout
    assert "| 512 B .. 4 KiB, 64 | 700 | 210 | 0.30 |" in out
    assert "| 1 MiB .. 64 MiB, 32 | 800 | 600 | (other run) |" in out


STAND_IN = """#!/usr/bin/env bash
# Stands in for python3: the bench scripts print their arguments; anything else runs.
case "$1" in
  bench/workloads.py) python3 -c 'import json, sys; print(json.dumps({"workload": sys.argv[2], "mode": sys.argv[3], "argv": sys.argv[1:]}))' "$@"; exit ${FAIL:-0};;
  bench/microbench.py) exit ${FAIL:-0};;
  *) exec python3 "$@";;
esac
"""


def _run_all(tmp_path, *args, **env):
    stand_in = tmp_path / "py"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    full_env = {**__import__("os").environ, "OUT": str(tmp_path / "out"), "PYTHON": str(stand_in), "WORKLOADS": "gpt2", **env}
    return subprocess.run(["bash", str(BENCH / "run_all.sh"), *args], capture_output=True, text=True, env=full_env)


def test_run_all_runs_every_mode_once_and_stamps_its_run(tmp_path):
    done = _run_all(tmp_path, "workloads")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    modes = [line["argv"][2] for line in lines]
    assert modes == ["native", "expandable", "async", "bufferheap", "bufferheap-direct"]
    assert len({line["run"] for line in lines}) == 1


def test_run_all_fails_when_a_run_fails_or_the_argument_is_wrong(tmp_path):
    failed = _run_all(tmp_path, "workloads", FAIL="3", MODES="native")
    assert failed.returncode == 1
    errors = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines() if "error" in line]
    assert errors and errors[0]["error"] == "exit 3"
    assert _run_all(tmp_path, "workload").returncode == 2
