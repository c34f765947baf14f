#!/usr/bin/env bash
# The cargo-fuzz targets of every crate that decodes bytes from the network (auth/fuzz,
# transport/fuzz, netcmp/fuzz, blk/fuzz; README.md, "Fuzzing").
#
#   scripts/fuzz.sh short              the test command's step: every target replays its
#                                      corpus (fuzz/corpus/<target>, if there is one) and
#                                      its seeds (fuzz/seeds/<target>), then fuzzes a few
#                                      seconds; new inputs go to a scratch directory that
#                                      is removed. The whole step keeps within
#                                      COLO_FUZZ_BUDGET seconds (default 300), the build
#                                      included.
#   scripts/fuzz.sh long SECS [TARGET...]
#                                      by hand: each target (default: all) fuzzes SECS
#                                      seconds, growing fuzz/corpus/<target>; prints the
#                                      executions and crashes of each.
#
# cargo-fuzz is installed from crates.io where it is missing. Where it cannot be, or with
# COLO_FUZZ=proptest, the step says why in one line and runs the targets' bodies as
# proptests instead, 10,000 cases each (the `fuzzing` modules' tests). Fuzzing uses the
# stable toolchain: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Z flags.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-short}
projects=(auth transport netcmp blk)
target_dir=$PWD/target/fuzz
export RUSTC_BOOTSTRAP=1
start=$SECONDS
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

# The fallback: the same bodies (colo_*::fuzzing) as proptests, 10,000 cases each.
proptests() {
  echo "fuzz: $1: running the fuzz targets' bodies as proptests, 10,000 cases each, instead"
  local log=$scratch/proptest.log status passed
  set +e
  PROPTEST_CASES=10000 cargo test --workspace --all-features --lib fuzzing >"$log" 2>&1
  status=$?
  set -e
  passed=$( (grep -Eo '^test result: ok\. [0-9]+ passed' "$log" || true) |
    awk '{s+=$4} END {print s+0}')
  if [ "$status" -ne 0 ] || [ "$passed" -eq 0 ]; then
    grep -E '^test .* FAILED$|panicked|^error' "$log" | tail -n 40 >&2 || tail -n 40 "$log" >&2
    echo "fuzz: the proptest equivalents failed (or none ran)" >&2
    exit 1
  fi
  echo "fuzz: $passed tests of the fuzz targets' bodies passed (the proptests with 10,000 cases each)"
}

if [ "${COLO_FUZZ:-}" = proptest ]; then
  proptests "COLO_FUZZ=proptest"
  exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  if ! timeout 900 cargo install cargo-fuzz --locked >"$scratch/install.log" 2>&1; then
    why=$(grep -m1 -E '^error' "$scratch/install.log" || tail -n1 "$scratch/install.log")
    proptests "cargo-fuzz cannot be installed (${why:-no output})"
    exit 0
  fi
fi

# Build every target first (one target directory, so libFuzzer and the shared crates are
# built once). A target that does not build is a failure, not a reason to skip.
for p in "${projects[@]}"; do
  echo "==> cargo fuzz build ($p/fuzz)"
  if ! (cd "$p/fuzz" && timeout 900 cargo fuzz build -a --target-dir "$target_dir") \
    >"$scratch/build.log" 2>&1; then
    grep -v -E '^\s+([0-9]+:|at )' "$scratch/build.log" | tail -n 30 >&2
    echo "fuzz: $p/fuzz does not build" >&2
    exit 1
  fi
done

all=()
for p in "${projects[@]}"; do
  for t in $(cd "$p/fuzz" && cargo fuzz list); do all+=("$p/$t"); done
done

case $mode in
  short)
    budget=${COLO_FUZZ_BUDGET:-300}
    # What is left of the budget, less about 3 s of start-up per target, shared out;
    # 2 to 10 s each.
    left=$((budget - (SECONDS - start) - 3 * ${#all[@]}))
    secs=$((left / ${#all[@]}))
    ((secs > 10)) && secs=10
    ((secs < 2)) && secs=2
    chosen=("${all[@]}")
    ;;
  long)
    secs=${2:?usage: scripts/fuzz.sh long SECONDS [TARGET...]}
    shift 2
    chosen=()
    for want in "$@"; do
      n=${#chosen[@]}
      for pt in "${all[@]}"; do
        if [ "${pt#*/}" = "$want" ]; then chosen+=("$pt"); fi
      done
      if ((${#chosen[@]} == n)); then
        echo "fuzz: no target named $want; the targets: ${all[*]#*/}" >&2
        exit 2
      fi
    done
    ((${#chosen[@]})) || chosen=("${all[@]}")
    ;;
  *)
    echo "usage: scripts/fuzz.sh short | long SECONDS [TARGET...]" >&2
    exit 2
    ;;
esac

files_in() {
  if [ -d "$1" ]; then find "$1" -type f | wc -l; else echo 0; fi
}

echo "==> fuzz: ${#chosen[@]} targets, corpus and seeds replayed, then ${secs}s of fuzzing each"
failed=()
for pt in "${chosen[@]}"; do
  p=${pt%%/*} t=${pt#*/}
  fuzz=$PWD/$p/fuzz
  if [ "$mode" = long ]; then
    out=$fuzz/corpus/$t
  else
    out=$scratch/$t
  fi
  mkdir -p "$out"
  dirs=("$out")
  [ "$mode" = short ] && [ -d "$fuzz/corpus/$t" ] && dirs+=("$fuzz/corpus/$t")
  [ -d "$fuzz/seeds/$t" ] && dirs+=("$fuzz/seeds/$t")
  opts=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1)
  for d in "$fuzz"/*.dict; do [ -e "$d" ] && opts+=(-dict="$d"); done
  log=$scratch/$t.log
  before=$(files_in "$fuzz/artifacts/$t")
  # Run from the project, so that cargo fuzz finds it and a crash lands in
  # $fuzz/artifacts/$t.
  set +e
  (cd "$fuzz" && timeout $((secs + 300)) cargo fuzz run -a --target-dir "$target_dir" "$t" \
    "${dirs[@]}" -- "${opts[@]}") >"$log" 2>&1
  status=$?
  set -e
  crashes=$(($(files_in "$fuzz/artifacts/$t") - before))
  runs=$( (grep -Eo '^stat::number_of_executed_units: [0-9]+' "$log" || true) | awk '{print $2}')
  seeds=$( (grep -Eo 'seed corpus: files: [0-9]+' "$log" || true) | awk '{print $4}')
  if [ "$status" -eq 0 ]; then
    echo "fuzz: $p/$t: ${seeds:-0} corpus and seed inputs replayed, ${runs:-?} executions in ${secs}s, 0 crashes"
  else
    echo "fuzz: $p/$t FAILED (exit $status; $crashes crash inputs saved in $p/fuzz/artifacts/$t); its last lines:" >&2
    # libFuzzer's report and the reproduce line, without cargo-fuzz's own backtrace.
    awk '/^Stack backtrace:/ {exit} !/^#[0-9]+[ \t]+(NEW|REDUCE|pulse)/' "$log" | tail -n 40 >&2
    failed+=("$pt")
  fi
done
echo "==> fuzz: done in $((SECONDS - start))s"
if ((${#failed[@]})); then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
