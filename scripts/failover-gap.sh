#!/usr/bin/env bash
# The client's longest wait for a reply across a failover (issue 22 item 4): N runs of
# `colo pair --pipeline 32 --json`, two thirds with the primary killed at a random time
# (--kill-primary-after, uniform 3-6 s), one third crashed at a random checkpoint step
# (COLO_TEST_CRASH_AT=request|push|state|commit:N). Prints each run and the median, p99
# and max of max_wait_ms, and the lost/contradicted totals (both must be 0).
# Usage: bash scripts/failover-gap.sh [RUNS (default 50)] [COLO binary]
set -euo pipefail
runs=${1:-50}
bin=${2:-target/release/colo}
[ -x "$bin" ] || { echo "no $bin: cargo build --release -p colo-vmm" >&2; exit 2; }
out=$(mktemp)
trap 'rm -f "$out"' EXIT
phases=(request push state commit)
for i in $(seq 1 "$runs"); do
  if (( i % 3 == 0 )); then
    ph=${phases[$((RANDOM % 4))]}:$((RANDOM % 30 + 15))
    what="crash $ph"
    json=$(COLO_TEST_CRASH_AT=$ph "$bin" pair --pipeline 32 --json --duration 8s 2>/dev/null | tail -1)
  else
    k=$(awk -v r=$RANDOM 'BEGIN { printf "%.2f", 3 + 3 * r / 32767 }')
    what="kill $k"
    json=$("$bin" pair --pipeline 32 --json --kill-primary-after "${k}s" --duration 8s 2>/dev/null | tail -1)
  fi
  echo "$what $json" | tee -a "$out" | cut -c1-160
done
python3 - "$out" <<'PY'
import json, math, sys
rows = [json.loads(l.split(" ", 2)[2]) for l in open(sys.argv[1])]
w = sorted(r["max_wait_ms"] for r in rows)
p = lambda q: w[min(len(w) - 1, math.ceil(q * len(w)) - 1)]
print(f"{len(w)} runs: max_wait_ms median {p(0.5):.1f}, p99 {p(0.99):.1f}, max {w[-1]:.1f}; "
      f"lost {sum(r['lost_acked'] for r in rows)}, contradicted {sum(r['contradictions'] for r in rows)}, "
      f"failovers {sum(bool(r['failover']) for r in rows)}")
PY
