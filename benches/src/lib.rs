//! Benchmarks of bufferheap.
