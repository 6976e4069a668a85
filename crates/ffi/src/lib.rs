//! C ABI of bufferheap: PyTorch's pluggable CUDA allocator entry points plus statistics and control
