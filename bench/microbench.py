"""Latency of one alloc + one free through PyTorch's own allocator front door.

usage: PYTHONPATH=python BUFFERHEAP_LIB=dist/libbufferheap_ffi.so \\
       python3 bench/microbench.py MODE [--policy default|mps] [--steps N] [--repeats R]

MODE: native | expandable (expandable_segments) | async (cudaMallocAsync) | bufferheap
      | bufferheap-direct (bufferheap through its C++ front, install(direct=True))

A C++ loop (built with torch.utils.cpp_extension.load_inline) calls
c10::cuda::CUDACachingAllocator::raw_alloc / raw_delete, which reach whichever allocator is
installed: a ring of `live` slots, each step frees the slot's old block and allocates a new
one, sizes log-uniform in [lo, hi]; a warm-up pass, then a timed pass of N steps; best of R.
Prints one JSON line per size range: mode, policy, lo, hi, live, ns_per_pair; for bufferheap
also the range's own page map and unmap calls and peak reserved bytes (over its 2 x R passes).
"""

import argparse
import json
import os

RANGES = [(512, 4096, 64), (512, 1 << 20, 256), (1 << 20, 64 << 20, 32)]
ALLOC_CONF = {"native": None, "expandable": "expandable_segments:True", "async": "backend:cudaMallocAsync", "bufferheap": None, "bufferheap-direct": None}

SRC = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <chrono>
#include <cmath>
#include <random>
#include <vector>
double bench(int64_t n, int64_t live, int64_t lo, int64_t hi) {
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<double> u(std::log((double)lo), std::log((double)hi));
  std::vector<size_t> sizes(n);
  for (auto& x : sizes) x = (size_t)std::exp(u(rng));
  std::vector<void*> ring(live, nullptr);
  double r = 0;
  for (int pass = 0; pass < 2; pass++) {
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < n; i++) {
      auto& s = ring[i % live];
      if (s) c10::cuda::CUDACachingAllocator::raw_delete(s);
      s = c10::cuda::CUDACachingAllocator::raw_alloc(sizes[i]);
      TORCH_CHECK(s != nullptr || sizes[i] == 0, "allocation of ", sizes[i], " bytes returned NULL");
    }
    auto t1 = std::chrono::steady_clock::now();
    r = std::chrono::duration<double, std::nano>(t1 - t0).count() / n;
  }
  for (auto& s : ring) if (s) { c10::cuda::CUDACachingAllocator::raw_delete(s); s = nullptr; }
  return r;
}
"""

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("mode", choices=list(ALLOC_CONF))
ap.add_argument("--policy", default="default", choices=["default", "mps"], help="bufferheap policy")
ap.add_argument("--steps", type=int, default=200_000)
ap.add_argument("--repeats", type=int, default=3)
a = ap.parse_args()

for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
    os.environ.pop(var, None)
if ALLOC_CONF[a.mode]:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF[a.mode]

import torch  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

ours = a.mode.startswith("bufferheap")
if ours:
    import bufferheap

    bufferheap.torch.install(policy=a.policy, direct=a.mode == "bufferheap-direct")

torch.zeros(1, device="cuda")
ext = load_inline("bufferheap_microbench", cpp_sources=SRC, functions=["bench"], with_cuda=True, verbose=False)
for lo, hi, live in RANGES:
    r = dict(mode=a.mode, policy=a.policy if ours else None, lo=lo, hi=hi, live=live, steps=a.steps)
    if ours:
        # The counters below are this range's own (its warm-up and timed passes, all repeats).
        bufferheap.reset_accumulated_memory_stats()
        bufferheap.reset_peak_memory_stats()
    r["ns_per_pair"] = min(ext.bench(a.steps, live, lo, hi) for _ in range(a.repeats))
    if ours:
        st = bufferheap.memory_stats()
        r["num_map_calls"] = st.get("num_map_calls")
        r["num_unmap_calls"] = st.get("num_unmap_calls")
        r["max_reserved_gib"] = bufferheap.max_memory_reserved() / 2**30
    print(json.dumps(r), flush=True)
