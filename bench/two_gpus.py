"""One process driving two GPUs through bufferheap: tensors on cuda:0 and cuda:1, peer copies,
results checked, and each device's allocator serving only its device. Prints one JSON line."""
import json
import torch
import bufferheap

bufferheap.torch.install()
assert torch.cuda.device_count() >= 2, "needs two GPUs"
out = {}
a = torch.arange(1 << 24, dtype=torch.float32, device="cuda:0")
b = torch.empty_like(a, device="cuda:1")
b.copy_(a)                                   # peer copy 0 -> 1
c = (b * 2).to("cuda:0")                     # compute on 1, copy back
out["peer_copy_ok"] = bool(torch.equal(c, a * 2))
big1 = torch.empty(512 << 20, dtype=torch.uint8, device="cuda:1")
s0, s1 = bufferheap.memory_stats(0), bufferheap.memory_stats(1)
out["allocated_gib"] = [s0["allocated_bytes.all.current"] / 2**30, s1["allocated_bytes.all.current"] / 2**30]
# each allocator holds exactly its own device's tensors
out["stats_per_device_ok"] = (s0["allocated_bytes.all.current"] >= a.numel() * 4 + c.numel() * 4
                              and s1["allocated_bytes.all.current"] >= b.numel() * 4 + (512 << 20)
                              and s0["allocated_bytes.all.current"] < (512 << 20))
del big1
torch.cuda.synchronize(0); torch.cuda.synchronize(1)
out["ok"] = out["peer_copy_ok"] and out["stats_per_device_ok"]
print(json.dumps(out))
