//! Simulated backend for bufferheap: address ranges only, page mapping modelled, for replaying traces at full scale
