#!/usr/bin/env bash
# The client's longest wait for a reply across a failover (issue 22 item 4), now measured by
# `colo bench failover`: RUNS runs of `colo pair --pipeline 32 --json --duration 8s`, two
# thirds with the primary killed at a random time (--kill-primary-after, uniform 3-6 s), one
# third crashed at a random checkpoint step (COLO_TEST_CRASH_AT), beside 5 runs with no
# fault. Prints each run, then the distribution (min, median, p90, p99, max) of the
# client's longest wait, its silence across the switch and the failover's timeline, the
# lost/contradicted totals (both must be 0) and the heartbeat timeout.
# Usage: bash scripts/failover-gap.sh [RUNS (default 50)] [COLO binary] [more bench args]
set -euo pipefail
runs=${1:-50}
bin=${2:-target/release/colo}
[ -x "$bin" ] || { echo "no $bin: cargo build --release -p colo-vmm" >&2; exit 2; }
shift $(( $# < 2 ? $# : 2 ))
exec "$bin" bench failover --runs "$runs" "$@"
