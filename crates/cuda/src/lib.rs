//! CUDA backend for bufferheap: device memory through the driver API, VMM page-mapped heaps, pinned shared memory, CUDA events
