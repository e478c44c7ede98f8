#!/usr/bin/env bash
# Runs the cargo-fuzz (libFuzzer) targets in fuzz/ for a bounded time each.
# Not part of `cargo test` or .ci/run: fuzzing is run on purpose.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
#   seconds-per-target   default 60
#   target...            default: every fuzz/fuzz_targets/*.rs
#
# Environment:
#   FUZZ_JOBS=N          run N targets at once (default 1; the machine has 2 cores)
#   FUZZ_SANITIZER=S     address (default) or none; falls back to none if an
#                        ASan build is impossible on this toolchain
#
# The toolchain is stable Rust; cargo fuzz needs nightly-only flags, which
# RUSTC_BOOTSTRAP=1 unlocks. The build stays inside fuzz/ (its own workspace,
# target dir fuzz/target). Seeds in fuzz/corpus/<target>/ are read only; what
# a run discovers goes to fuzz/target/corpus/<target>/ and is kept between
# runs. Crash inputs land in fuzz/artifacts/<target>/.
#
# Prints one line per target (executions, exec/s, corpus size, result) and
# exits non-zero if any target crashed.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz_dir="$root/fuzz"
seconds=${1:-60}
if [ $# -gt 0 ]; then shift; fi
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
    echo "usage: $0 [seconds-per-target] [target...]" >&2
    exit 2
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for f in "$fuzz_dir"/fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi
for t in "${targets[@]}"; do
    if [ ! -f "$fuzz_dir/fuzz_targets/$t.rs" ]; then
        echo "no such fuzz target: $t" >&2
        exit 2
    fi
done

export RUSTC_BOOTSTRAP=1
export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

jobs=${FUZZ_JOBS:-1}
sanitizer=${FUZZ_SANITIZER:-address}
cd "$fuzz_dir"

echo "== building fuzz targets (sanitizer: $sanitizer)"
if ! cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$sanitizer"; then
    if [ "$sanitizer" = none ]; then
        exit 1
    fi
    echo "== build with -s $sanitizer failed; retrying with -s none" >&2
    sanitizer=none
    cargo fuzz build --fuzz-dir "$fuzz_dir" -s "$sanitizer"
fi

logs="$fuzz_dir/target/fuzz-logs"
mkdir -p "$logs"

# Runs one target; writes its summary line to $logs/<target>.result.
run_target() {
    local t=$1
    local work="$fuzz_dir/target/corpus/$t"
    local seeds="$fuzz_dir/corpus/$t"
    local artifacts="$fuzz_dir/artifacts/$t"
    local log="$logs/$t.log"
    mkdir -p "$work" "$seeds" "$artifacts"
    local before
    before=$(ls -1 "$artifacts")
    local extra=()
    if [ -f "$fuzz_dir/dict/$t.dict" ]; then
        extra+=("-dict=$fuzz_dir/dict/$t.dict")
    fi
    local rc=0
    # The first corpus directory is the one libFuzzer adds to; the seeds
    # are only read.
    cargo fuzz run --fuzz-dir "$fuzz_dir" -s "$sanitizer" "$t" "$work" "$seeds" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        ${extra[@]+"${extra[@]}"} >"$log" 2>&1 || rc=$?

    local execs rate corpus result new
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(find "$work" -type f | wc -l)
    new=$(comm -13 <(echo "$before") <(ls -1 "$artifacts") | grep -E '^(crash|leak|timeout|oom|slow-unit)-' || true)
    if [ "$rc" -eq 0 ] && [ -z "$new" ]; then
        result=ok
    elif [ -n "$new" ]; then
        result="CRASH: $(echo "$new" | sed "s|^|$artifacts/|" | paste -sd ' ')"
    else
        result="FAILED (exit $rc, see $log)"
    fi
    printf '%-13s %6ss %12s %9s %7s  %s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" "$corpus" "$result" \
        >"$logs/$t.result"
}

echo "== fuzzing ${#targets[@]} target(s) for ${seconds}s each, $jobs at a time; logs in $logs"
running=0
for t in "${targets[@]}"; do
    rm -f "$logs/$t.result"
    run_target "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait || true

printf '\n%-13s %7s %12s %9s %7s  %s\n' target time execs exec/s corpus result
status=0
for t in "${targets[@]}"; do
    if [ -f "$logs/$t.result" ]; then
        line=$(cat "$logs/$t.result")
    else
        line="$t: no result (see $logs/$t.log)"
    fi
    echo "$line"
    case "$line" in
        *" ok") ;;
        *) status=1 ;;
    esac
done
if [ "$status" -ne 0 ]; then
    echo
    echo "A target failed. Reproduce with:"
    echo "  cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir \$PWD -s $sanitizer <target> <artifact>"
fi
exit "$status"
