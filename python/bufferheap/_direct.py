"""The direct front: bufferheap's own C++ CUDAAllocator, built against the running PyTorch.

PyTorch's pluggable wrapper (``CUDAPluggableAllocator``) takes a mutex and updates a hash map of
live pointers on every allocation and every free, only to hand size, device and stream back to
the plug-in; bufferheap finds them from the address. ``_direct.cpp`` subclasses that wrapper
without the map, calls the C ABI itself, raises ``torch.OutOfMemoryError`` when the device is full and
answers PyTorch's own statistics calls (``torch.cuda.memory_stats()``, ``memory_allocated()``,
``reset_peak_memory_stats()``, ...) with bufferheap's counters, cuDNN's benchmark mode with the
largest buffer it can get (``cacheInfo``; the wrapper raises there), and PyTorch's memory snapshots
(``_record_memory_history()``, ``_snapshot()``, ``_dump_snapshot()``) with bufferheap's segments,
history and the stacks PyTorch records; it calls out-of-memory observers. It is compiled once per PyTorch version by ``torch.utils.cpp_extension`` into PyTorch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), which needs a
C++ compiler, ninja and the CUDA headers PyTorch was built with; later processes reuse the build.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import List

from . import _ffi

SOURCE = Path(__file__).with_name("_direct.cpp")
NAME = "bufferheap_direct"
# The C ABI functions the front calls itself, then the hooks it sets, by PyTorch's setter name.
_CALLS = ("bufferheap_try_malloc", "bufferheap_free", "bufferheap_last_error", "bufferheap_stats_values",
          "bufferheap_reset_peak", "bufferheap_reset_accumulated", "bufferheap_largest_available",
          "bufferheap_memory_snapshot", "bufferheap_record_history", "bufferheap_history_limit")
_HOOKS = ("set_init_fn", "set_reset_fn", "set_memory_fraction_fn", "set_record_stream_fn", "set_base_alloc_fn")
_ERROR_BYTES = 4096


def build_directory() -> Path:
    """Where the front is built: one folder per PyTorch version inside PyTorch's extension cache."""
    import torch
    from torch.utils import cpp_extension

    version = re.sub(r"[^A-Za-z0-9.]+", "_", torch.__version__)
    return Path(cpp_extension.get_default_build_root()) / f"{NAME}-torch{version}"


def build() -> Path:
    """Compiles the front (a no-op when the cached build is current) and returns its path."""
    import torch
    from torch.utils import cpp_extension

    folder = build_directory()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=NAME,
            sources=[str(SOURCE)],
            extra_cflags=["-O2"],
            # The front has no CUDA sources, so no GPU architecture matters; naming one keeps
            # PyTorch from asking the device for its own (which would start CUDA, and with it
            # PyTorch's allocator, before bufferheap's can be installed).
            extra_cuda_cflags=["-gencode=arch=compute_90,code=sm_90"],
            build_directory=str(folder),
            with_cuda=True,
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as e:
        raise RuntimeError(
            f"bufferheap.torch.install(direct=True) could not build its C++ front {SOURCE} against "
            f"PyTorch {torch.__version__} in {folder}: {e}\nThe direct front needs a C++ compiler, ninja "
            "and the CUDA headers PyTorch was built with; install(direct=False) uses PyTorch's pluggable "
            "path, which needs none of them."
        ) from e
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "bufferheap.torch.install(direct=True): building the C++ front started CUDA, and with it "
            "PyTorch's own allocator, so bufferheap's can no longer be installed in this process"
        )
    built = sorted(folder.glob(f"{NAME}*.so"), key=lambda p: p.stat().st_mtime)
    if not built:
        raise RuntimeError(f"bufferheap: building the C++ front left no {NAME}*.so in {folder}")
    return built[-1]


def install(library: "_ffi.Library", front: Path) -> List[str]:
    """Makes the built front PyTorch's CUDA allocator; returns the hooks it set.

    Raises RuntimeError with PyTorch's reason when the allocator cannot be swapped.
    """
    calls = [library.address(name) for name in _CALLS]
    symbols = [_ffi.TORCH_HOOKS[setter] for setter in _HOOKS]
    hooks = {setter: 0 if symbol in library.missing else library.address(symbol) for setter, symbol in zip(_HOOKS, symbols)}
    entry = ctypes.CDLL(str(front)).bufferheap_direct_install
    entry.restype = ctypes.c_int
    entry.argtypes = [ctypes.c_size_t] * (len(_CALLS) + len(_HOOKS)) + [ctypes.c_char_p, ctypes.c_size_t]
    error = ctypes.create_string_buffer(_ERROR_BYTES)
    if entry(*calls, *hooks.values(), error, _ERROR_BYTES) != 0:
        raise RuntimeError(error.value.decode("utf-8", "replace"))
    return [setter for setter, address in hooks.items() if address]
