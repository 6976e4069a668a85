"""GPT-2 training with DistributedDataParallel over NCCL, one process per GPU (torchrun).

usage: torchrun --nproc-per-node 2 bench/ddp.py native|expandable|bufferheap|bufferheap-direct [--steps N]
Each rank prints one JSON line: its device, s/step, peak memory used on its own GPU, losses.
Rank 0 also lists, from nvidia-smi, how much memory every process holds on every GPU, so a
stray allocation of one rank on another rank's GPU shows."""
import argparse, json, os, random, subprocess, time

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["native", "expandable", "bufferheap", "bufferheap-direct"])
ap.add_argument("--steps", type=int, default=20)
a = ap.parse_args()
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
# An inherited setting must not leak in: "native" is PyTorch's default allocator.
for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
    os.environ.pop(var, None)
if a.mode == "expandable":
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
import torch
import torch.distributed as dist
if a.mode.startswith("bufferheap"):
    import bufferheap
    bufferheap.torch.install(direct=a.mode == "bufferheap-direct")
rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
torch.cuda.set_device(local)
dist.init_process_group("nccl", device_id=torch.device("cuda", local))
from transformers import GPT2Config, GPT2LMHeadModel
torch.manual_seed(0)
model = torch.nn.parallel.DistributedDataParallel(GPT2LMHeadModel(GPT2Config()).cuda(), device_ids=[local])
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
lengths = random.Random(0)
data = torch.Generator(device="cuda").manual_seed(1 + rank)
free0, _ = torch.cuda.mem_get_info()
peak, losses = 0, []
def step():
    global peak
    L = lengths.choice([128, 256, 384, 512, 640, 768, 896, 1024])
    x = torch.randint(0, 50257, (8, L), device="cuda", generator=data)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=x, labels=x)
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    losses.append(out.loss.item())
    peak = max(peak, free0 - torch.cuda.mem_get_info()[0])
step(); torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(a.steps):
    step()
torch.cuda.synchronize()
dt = (time.perf_counter() - t0) / a.steps
res = dict(mode=a.mode, rank=rank, device=torch.cuda.current_device(), sec_per_step=dt,
           peak_used_gib=peak / 2**30, losses=losses)
if a.mode.startswith("bufferheap"):
    stats = bufferheap.memory_stats(local)
    res["reserved_peak_gib"] = stats["reserved_bytes.all.peak"] / 2**30
    res.update({k: stats.get(k) for k in ("num_map_calls", "num_unmap_calls", "num_device_waits")})
dist.barrier()
if rank == 0:
    q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id,used_memory", "--format=csv,noheader"],
                       capture_output=True, text=True)
    res["per_process_gpu_memory"] = q.stdout.strip().splitlines()
res["pid"] = os.getpid()
print(json.dumps(res), flush=True)
dist.barrier()
dist.destroy_process_group()
