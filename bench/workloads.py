"""Real PyTorch training steps, to compare allocators end to end on one GPU.

usage: PYTHONPATH=python BUFFERHEAP_LIB=dist/libbufferheap_ffi.so \\
       python3 bench/workloads.py WORKLOAD MODE [--policy default|mps] [--steps N] [--seed S] [--record OUT.pkl.gz]

WORKLOAD: gpt2 (GPT-2 124M, AdamW, bf16 autocast, batch 8, sequence length drawn from 128..1024
          each step) | resnet50 (ResNet-50, SGD with momentum, bf16 autocast, batch 32/48/64)
          | vit (ViT-B/16, AdamW, bf16 autocast, batch 32/48/64) | bert (BERT-base masked LM,
          AdamW, bf16 autocast, batch 16, sequence length drawn from 64..512)
MODE:     native | expandable (expandable_segments) | async (cudaMallocAsync) | bufferheap
          | bufferheap-direct (bufferheap through its C++ front, install(direct=True))
--record: pickle a snapshot with the allocation history of the timed steps: PyTorch's own
          (torch.cuda.memory._record_memory_history() and _snapshot()) for native modes and the
          direct front, bufferheap.record_memory_history() and snapshot() through the wrapper.

One warm-up step runs before timing. Prints one JSON line: workload, mode, policy, steps,
sec_per_step, peak_used_gib (largest free-at-start minus free-now of torch.cuda.mem_get_info,
sampled after each step), max_reserved_gib, max_allocated_gib (PyTorch's figures for native
modes, bufferheap's own for bufferheap), step_times (each timed step's seconds: the sequence of
sizes is the same for every allocator at one seed, so runs compare step by step), losses,
last_loss; for bufferheap also its page map/unmap calls, the times it blocked on the device and
the microseconds spent in those waits and in page calls.
"""

import argparse
import gzip
import json
import os
import pickle
import random
import time

GiB = 2**30
ALLOC_CONF = {"native": None, "expandable": "expandable_segments:True", "async": "backend:cudaMallocAsync", "bufferheap": None, "bufferheap-direct": None}

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("workload", choices=["gpt2", "resnet50", "vit", "bert"])
ap.add_argument("mode", choices=list(ALLOC_CONF))
ap.add_argument("--policy", default="default", choices=["default", "mps"], help="bufferheap policy")
ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 40 for gpt2, 30 for resnet50)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--record", help="write a pickled snapshot here (.gz: gzip-compressed)")
a = ap.parse_args()

# The allocator is chosen before torch starts CUDA; an inherited setting must not leak in.
for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
    os.environ.pop(var, None)
if ALLOC_CONF[a.mode]:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF[a.mode]

import torch  # noqa: E402

ours = a.mode.startswith("bufferheap")
if ours:
    import bufferheap

    bufferheap.torch.install(policy=a.policy, direct=a.mode == "bufferheap-direct")

torch.manual_seed(a.seed)
random.seed(a.seed)
dev = "cuda"
free0, _ = torch.cuda.mem_get_info()
peak_used = 0


def sample():
    global peak_used
    free, _ = torch.cuda.mem_get_info()
    peak_used = max(peak_used, free0 - free)


def language_model(model, vocab, batch, seqs):
    """A step of a model that takes token ids and returns its own loss (labels = the input)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        seq = random.choice(seqs)
        x = torch.randint(0, vocab, (batch, seq), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=x, labels=x)  # logits stay alive through the step, as in BASELINES.md
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    return step


def image_classifier(model, opt):
    """A step of an ImageNet-shaped classifier at a batch size drawn from 32/48/64."""

    def step():
        batch = random.choice([32, 48, 64])
        x = torch.randn(batch, 3, 224, 224, device=dev)
        y = torch.randint(0, 1000, (batch,), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config()).to(dev)
    return language_model(model, 50257, 8, [128, 256, 384, 512, 640, 768, 896, 1024]), 40


def bert():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig()).to(dev)
    return language_model(model, 30522, 16, [64, 128, 192, 256, 320, 384, 448, 512]), 40


def resnet50():
    import torchvision

    model = torchvision.models.resnet50(weights=None).to(dev)
    return image_classifier(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)), 30


def vit():
    import torchvision

    model = torchvision.models.vit_b_16(weights=None).to(dev)
    return image_classifier(model, torch.optim.AdamW(model.parameters(), lr=1e-4)), 30


step, default_steps = {"gpt2": gpt2, "resnet50": resnet50, "vit": vit, "bert": bert}[a.workload]()
n = a.steps or default_steps

step()  # warm-up, outside timing and recording
torch.cuda.synchronize()
sample()
# PyTorch's own snapshot calls work on native modes and through bufferheap's direct front.
torch_snapshots = not ours or a.mode == "bufferheap-direct"
if a.record:
    if torch_snapshots:
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=1_500_000)
    else:
        bufferheap.record_memory_history(max_entries=1_500_000)

losses = []
step_times = []
t0 = time.perf_counter()
for _ in range(n):
    ts = time.perf_counter()
    losses.append(step())  # .item() waits for the step's work: the step's own time
    step_times.append(time.perf_counter() - ts)
    sample()
torch.cuda.synchronize()
dt = time.perf_counter() - t0

res = dict(workload=a.workload, mode=a.mode, policy=a.policy if ours else None, steps=n, sec_per_step=dt / n,
           peak_used_gib=peak_used / GiB)
if ours:
    st = bufferheap.memory_stats()
    res["max_reserved_gib"] = bufferheap.max_memory_reserved() / GiB
    res["max_allocated_gib"] = bufferheap.max_memory_allocated() / GiB
else:
    st = torch.cuda.memory_stats()
    res["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    res["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
keys = ["num_device_alloc", "num_device_free", "num_alloc_retries", "num_ooms"]
if ours:
    keys += ["num_map_calls", "num_unmap_calls", "num_device_waits", "device_wait_us", "page_call_us"]
for key in keys:
    res[key] = st.get(key)

if a.record:
    if not torch_snapshots:
        snap = bufferheap.snapshot(a.record)
    else:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        with (gzip.open if a.record.endswith(".gz") else open)(a.record, "wb") as f:
            pickle.dump(snap, f)
    res["record"] = a.record
    res["trace_entries"] = sum(len(t) for t in snap["device_traces"])

res["step_times"] = [round(t, 6) for t in step_times]
res["losses"] = losses
res["last_loss"] = losses[-1]
print(json.dumps(res), flush=True)
