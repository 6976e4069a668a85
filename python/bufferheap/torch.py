"""bufferheap as PyTorch's CUDA allocator.

    import torch, bufferheap
    bufferheap.torch.install()          # before anything touches CUDA
    x = torch.empty(1 << 20, device="cuda")
    print(bufferheap.memory_stats()["allocated_bytes.all.current"])

Through PyTorch's pluggable wrapper (the default) PyTorch's own torch.cuda.memory_stats(),
memory_allocated(), _snapshot() and _record_memory_history() raise, and so does cuDNN's benchmark
mode; use the functions of the bufferheap module (bufferheap.memory_stats(),
bufferheap.record_memory_history(), bufferheap.snapshot(), ...). With install(direct=True) all of
these work: the statistics calls and their resets read bufferheap's counters, cuDNN learns its
largest workspace, and torch.cuda.memory._record_memory_history(), _snapshot() and
_dump_snapshot() answer with bufferheap's segments and events, with the stacks PyTorch records;
out-of-memory observers (torch._C._cuda_attach_out_of_memory_observer) are called.
torch.cuda.empty_cache() and torch.cuda.set_per_process_memory_fraction() reach bufferheap
through the hooks set here, and so does Tensor.record_stream().
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("bufferheap.torch needs PyTorch with CUDA support (pip install torch)") from e

import bufferheap

from . import _config, _direct, _ffi

_TOO_LATE = (
    "bufferheap.torch.install() must be called before any CUDA tensor is created: CUDA is already "
    "initialized in this process, and PyTorch cannot swap an allocator that is in use. Call it right "
    "after `import torch`, before anything touches CUDA (tensors on 'cuda', .cuda(), "
    "torch.cuda.mem_get_info(), torch.cuda.current_device(), ...)."
)

# What install() did in this process: the settings, and the allocator object (kept alive).
_installed: Optional[Dict[str, str]] = None
_allocator: Any = None
_hooks: List[str] = []


def installed() -> bool:
    """True once install() has made bufferheap PyTorch's CUDA allocator in this process."""
    return _installed is not None


def install(
    policy: str = "default",
    low_watermark_ratio: Optional[float] = None,
    high_watermark_ratio: Optional[float] = None,
    debug: Union[None, bool, int] = None,
    history: Optional[int] = None,
    front_cache_bytes: Optional[int] = None,
    idle_page_fraction: Optional[float] = None,
    unmap_rate_limit: Optional[float] = None,
    direct: bool = False,
) -> Dict[str, Any]:
    """Make bufferheap PyTorch's CUDA allocator for this process.

    `history=N` keeps the last N allocator events, so that `bufferheap.snapshot()` writes a
    trace that `bufferheap replay` and PyTorch's memory viewer can play back.
    `front_cache_bytes` sets what each thread may keep cached in front of the allocator's lock
    (default 1 MiB; 0 turns these caches off).

    `direct=True` registers bufferheap's own C++ allocator class with PyTorch instead of going
    through `torch.cuda.memory.CUDAPluggableAllocator`, whose mutex and map of live pointers cost
    about as much as bufferheap itself on every allocation and free; a full device then raises
    `torch.OutOfMemoryError`. The class is compiled on first use against the running PyTorch
    (cached afterwards; needs a C++ compiler, ninja and PyTorch's CUDA headers).

    Must run before CUDA is initialized. A second call with the same settings does nothing;
    with other settings it raises RuntimeError. Returns what was installed: the library
    path, the settings and the optional hooks PyTorch accepted.
    """
    global _installed, _allocator, _hooks
    wanted = _config.as_dict(_config.configuration(
            policy, low_watermark_ratio, high_watermark_ratio, debug, history, front_cache_bytes, idle_page_fraction,
            unmap_rate_limit,
        ))
    if not isinstance(direct, bool):
        raise TypeError(f"direct must be True or False, not {direct!r}")
    wanted["front"] = "direct" if direct else "pluggable"
    if _installed is not None:
        if wanted != _installed:
            raise RuntimeError(
                f"bufferheap is already PyTorch's allocator with {_installed}; an allocator can be "
                f"installed once per process, so {wanted} cannot take effect"
            )
        return _info()
    if not hasattr(torch._C, "_cuda_customAllocator"):
        raise RuntimeError("this PyTorch build has no CUDA support, so it has no pluggable CUDA allocator")
    if torch.cuda.is_initialized():
        raise RuntimeError(_TOO_LATE)

    library = _ffi.lib()
    # Built before anything is configured, so that a failed build leaves the process as it was.
    front = _direct.build() if direct else None
    bufferheap.configure(
        policy, low_watermark_ratio, high_watermark_ratio, debug, history, front_cache_bytes, idle_page_fraction,
        unmap_rate_limit,
    )
    try:
        if front is not None:
            alloc, hooks = front, _direct.install(library, front)
        else:
            alloc, hooks = _install_pluggable(library)
    except RuntimeError as e:
        if "already initialized" in str(e) or torch.cuda.is_initialized():
            raise RuntimeError(_TOO_LATE) from e
        raise
    _installed, _allocator, _hooks = wanted, alloc, hooks
    return _info()


def _install_pluggable(library: "_ffi.Library"):
    """Installs through PyTorch's CUDAPluggableAllocator; returns it and the hooks it set."""
    alloc = torch.cuda.memory.CUDAPluggableAllocator(str(library.path), "bufferheap_malloc", "bufferheap_free")
    raw = alloc.allocator()
    hooks = []
    for setter, symbol in _ffi.TORCH_HOOKS.items():
        set_hook = getattr(raw, setter, None)
        if set_hook is None or symbol in library.missing:
            continue
        set_hook(library.address(symbol))
        hooks.append(setter)
    torch.cuda.memory.change_current_allocator(alloc)
    return alloc, hooks


def _info() -> Dict[str, Any]:
    return {"library": str(_ffi.lib().path), "settings": dict(_installed or {}), "hooks": list(_hooks)}
