//! Host-memory backend for bufferheap: system memory, unified (shared == private), events complete at once
