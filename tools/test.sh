#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace, then the Python package against the
# real C library (host backend, so no GPU is needed). GPU tests skip themselves, saying so,
# where no CUDA driver is present.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace
# The C library the Python package loads (cargo test builds only its Rust library).
cargo build -p bufferheap-ffi

# The Python package's tests, in a private virtual environment (pytest is their only need).
venv=target/pytest-venv
if [ ! -x "$venv/bin/pytest" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet pytest
fi
BUFFERHEAP_LIB="$PWD/target/debug/libbufferheap_ffi.so" BUFFERHEAP_BACKEND=host \
    PYTHONPATH=python "$venv/bin/pytest" -q python/tests
