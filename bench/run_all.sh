#!/usr/bin/env bash
# Run every allocator mode of every workload, and the latency microbenchmark, each in its own
# Python process (an allocator can be installed only once per process), then print the tables.
#
# usage: bash bench/run_all.sh [all|workloads|micro|summary]
#   env: OUT        results folder (default ./out); lines are appended to $OUT/results.jsonl,
#                   each run's stderr kept in $OUT/logs/
#        BUFFERHEAP_LIB  the built libbufferheap_ffi.so (default: dist/libbufferheap_ffi.so if present)
#        MODES      default "native expandable async bufferheap bufferheap-direct"
#        POLICIES   bufferheap policies to run (default "default"; e.g. "default mps")
#        WORKLOADS  default "gpt2 resnet50"
#        STEPS      timed steps per workload (default: the script's own, 40 / 30)
#        MICRO_STEPS  steps per microbenchmark pass (default 200000)
#        TIMEOUT    seconds per process (default 900)
# Every line gets the invocation's id ("run"); the summary compares timings only inside one.
# A failed or timed-out process adds an {"error": ...} line and the rest go on; the script
# then exits 1 after printing the tables.
# On an H100 the whole set takes about 5 minutes; `workloads` and `micro` split it.
# To try the harness without the real library, build the C stand-in used by the tests:
#   gcc -shared -fPIC -O2 -DWITH_CUDA -o /tmp/libfake.so python/tests/fake_ffi.c -lpthread -ldl -lm
#   BUFFERHEAP_LIB=/tmp/libfake.so bash bench/run_all.sh
# (it caches by power-of-two size and ignores record_stream: its figures mean nothing).
set -u
cd "$(dirname "$0")/.."
what=${1:-all}
case "$what" in
    all | workloads | micro | summary) ;;
    *)
        echo "usage: bash bench/run_all.sh [all|workloads|micro|summary] (not '$what')" >&2
        exit 2
        ;;
esac
OUT=${OUT:-./out}
MODES=${MODES:-native expandable async bufferheap bufferheap-direct}
POLICIES=${POLICIES:-default}
WORKLOADS=${WORKLOADS:-gpt2 resnet50}
TIMEOUT=${TIMEOUT:-900}
PY=${PYTHON:-python3}
if [ -z "${BUFFERHEAP_LIB:-}" ] && [ -f dist/libbufferheap_ffi.so ]; then
    export BUFFERHEAP_LIB=$PWD/dist/libbufferheap_ffi.so
fi
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/logs"
results=$OUT/results.jsonl
RUN=$(date -u +%Y%m%dT%H%M%SZ)-$$
failed=0

# run NAME KIND WORKLOAD MODE POLICY -- command...
run() {
    local name=$1 kind=$2 workload=$3 mode=$4 policy=$5
    shift 6
    echo "== $name" >&2
    local log=$OUT/logs/$name.err tmp=$OUT/logs/$name.out start=$SECONDS
    timeout --kill-after=30 "$TIMEOUT" "$@" >"$tmp" 2>"$log"
    local rc=$? took=$((SECONDS - start))
    # Each line gets this invocation's id.
    grep '^{' "$tmp" | "$PY" -c '
import json, sys
for line in sys.stdin:
    try:
        print(json.dumps({**json.loads(line), "run": sys.argv[1]}))
    except ValueError:
        pass
' "$RUN" >>"$results"
    if [ $rc -ne 0 ]; then
        failed=1
        echo "   failed (exit $rc), see $log" >&2
        "$PY" - "$kind" "$workload" "$mode" "$policy" "$rc" "$log" "$took" "$TIMEOUT" "$RUN" >>"$results" <<'EOF'
import json, sys
kind, workload, mode, policy, rc, log, took, limit, run = sys.argv[1:]
tail = open(log, errors="replace").read().strip().splitlines()[-15:]
# timeout answers 124, or 137 when the command outlived the grace period too; 137 before the
# limit is a kill from elsewhere (the kernel's out-of-memory killer, say).
timed_out = rc == "124" or (rc == "137" and int(took) >= int(limit))
error = "timed out" if timed_out else ("killed (SIGKILL)" if rc == "137" else f"exit {rc}")
print(json.dumps(dict(kind=kind, workload=workload or None, mode=mode, policy=policy or None,
                      error=error, stderr_tail=tail, run=run)))
EOF
    fi
}

# mode_runs MODE: the (mode, policy) pairs for one mode, one per line
mode_runs() {
    if [ "${1#bufferheap}" != "$1" ]; then
        for p in $POLICIES; do echo "$1 $p"; done
    else
        echo "$1 -"
    fi
}

if [ "$what" = all ] || [ "$what" = workloads ]; then
    for w in $WORKLOADS; do
        for m in $MODES; do
            while read -r mode policy; do
                args=("$w" "$mode") suffix=""
                [ "$policy" != - ] && args+=(--policy "$policy") && suffix=-$policy
                [ -n "${STEPS:-}" ] && args+=(--steps "$STEPS")
                run "$w-$mode$suffix" workload "$w" "$mode" "${suffix#-}" -- "$PY" bench/workloads.py "${args[@]}"
            done < <(mode_runs "$m")
        done
    done
fi

if [ "$what" = all ] || [ "$what" = micro ]; then
    for m in $MODES; do
        while read -r mode policy; do
            args=("$mode") suffix=""
            [ "$policy" != - ] && args+=(--policy "$policy") && suffix=-$policy
            [ -n "${MICRO_STEPS:-}" ] && args+=(--steps "$MICRO_STEPS")
            run "micro-$mode$suffix" micro "" "$mode" "${suffix#-}" -- "$PY" bench/microbench.py "${args[@]}"
        done < <(mode_runs "$m")
    done
fi

"$PY" bench/summarize.py "$results" || exit 1
exit $failed
