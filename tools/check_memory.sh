#!/usr/bin/env bash
# Memory checks of the code that touches raw memory (the host backend's system calls and
# copies, the engine driving it):
#   1. valgrind memcheck over the host backend's tests, the engine's interface and lifetime
#      tests and the eight-thread host-memory test (a debug build; any error or definite leak
#      fails; tools/valgrind.supp lists accepted exceptions, none at present);
#   2. with --sanitizers and a nightly toolchain that has the sanitizer runtimes: the same tests
#      (and the engine's own) under AddressSanitizer with LeakSanitizer (tools/lsan.supp, none
#      at present), and the concurrency tests under ThreadSanitizer (tools/tsan.supp:
#      reports inside the uninstrumented standard library only).
# Miri needs the nightly `miri` component, which this machine's nightly lacks (and cannot
# fetch); the script says so when asked for it.
#
# Usage: tools/check_memory.sh [--sanitizers]
set -euo pipefail
cd "$(dirname "$0")/.."

sanitizers=0
for arg in "$@"; do
    case "$arg" in
        --sanitizers) sanitizers=1 ;;
        *) echo "usage: $0 [--sanitizers]" >&2; exit 2 ;;
    esac
done

# Test executables of a cargo test selection, one path per line.
test_bins() {
    cargo test "$@" --no-run --message-format=json 2>/dev/null |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])
'
}

status=0

if ! command -v valgrind >/dev/null; then
    echo "valgrind is not installed (apt-get install valgrind)" >&2
    exit 1
fi

echo "== valgrind memcheck"
cargo test -p bufferheap-host -p bufferheap-core --no-run >/dev/null 2>&1 || {
    echo "build failed" >&2
    exit 1
}
host_bin=$(test_bins -p bufferheap-host --lib)
interface_bin=$(test_bins -p bufferheap-core --test interface)
concurrency_bin=$(test_bins -p bufferheap-core --test concurrency)
lifetime_bin=$(test_bins -p bufferheap-core --test lifetime)
vg=(valgrind --quiet --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite
    --show-leak-kinds=definite --track-origins=yes --suppressions=tools/valgrind.supp)
run_vg() {
    local name=$1
    shift
    local start=$SECONDS
    if "${vg[@]}" "$@" >"target/valgrind-$name.log" 2>&1; then
        echo "$name: clean ($((SECONDS - start)) s; $(grep -Eo '[0-9]+ passed' "target/valgrind-$name.log" | head -1))"
    else
        echo "$name: FAILED, see target/valgrind-$name.log"
        tail -40 "target/valgrind-$name.log"
        status=1
    fi
}
run_vg host "$host_bin" --test-threads 1
run_vg interface "$interface_bin" --test-threads 1
run_vg lifetime "$lifetime_bin" --test-threads 1
BUFFERHEAP_CONCURRENCY_OPS=${BUFFERHEAP_CONCURRENCY_OPS:-1000} BUFFERHEAP_CONCURRENCY_TIMEOUT_SECS=1200 \
    run_vg concurrency-host "$concurrency_bin" eight_threads_host_memory

if [ "$sanitizers" = 1 ]; then
    if ! cargo +nightly --version >/dev/null 2>&1; then
        echo "no nightly toolchain: AddressSanitizer and ThreadSanitizer skipped"
        exit "$status"
    fi
    target=$(rustc -vV | sed -n 's/^host: //p')
    echo "== AddressSanitizer (nightly)"
    asan() {
        LSAN_OPTIONS="suppressions=$PWD/tools/lsan.supp" RUSTFLAGS="-Zsanitizer=address" \
            CARGO_TARGET_DIR=target/asan cargo +nightly test --target "$target" "$@"
    }
    if { asan -p bufferheap-host --lib &&
        asan -p bufferheap-core --lib --test interface --test lifetime --test concurrency; } \
        >target/asan.log 2>&1; then
        echo "asan: clean ($(grep -Eo '[0-9]+ passed' target/asan.log | awk '{s+=$1} END {print s}') tests)"
    else
        echo "asan: FAILED, see target/asan.log"
        grep -E "ERROR: AddressSanitizer|SUMMARY" target/asan.log | head
        status=1
    fi
    echo "== ThreadSanitizer (nightly; the standard library is not instrumented)"
    # The standard library comes uninstrumented, which rustc refuses unless told otherwise.
    # Its synchronisation is then invisible: tools/tsan.supp drops the reports inside it.
    if TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/tools/tsan.supp" \
        RUSTFLAGS="-Zsanitizer=thread -Cunsafe-allow-abi-mismatch=sanitizer" \
        CARGO_TARGET_DIR=target/tsan cargo +nightly test --target "$target" \
        -p bufferheap-core --test concurrency -- --test-threads 1 >target/tsan.log 2>&1; then
        echo "tsan: clean ($(grep -Eo '[0-9]+ passed' target/tsan.log | head -1))"
    else
        echo "tsan: FAILED, see target/tsan.log"
        grep -E "WARNING: ThreadSanitizer|SUMMARY" target/tsan.log | head
        status=1
    fi
    if ! cargo +nightly miri --version >/dev/null 2>&1; then
        echo "miri: not installed for the nightly toolchain (rustup component add miri); skipped"
    fi
fi
exit "$status"
