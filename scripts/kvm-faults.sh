#!/usr/bin/env bash
# Counts the shadow-MMU entries KVM sets, per thread, for SECS seconds (default 1), while a
# VM runs (e.g. `colo pair --mode periodic --dirty-rate 25600 --pipeline 2048` in another
# shell). Under dirty logging on this host's shadow paging most follow a write-protect
# fault the vCPU took on its first write to a page since the last log collection, but KVM
# also sets entries for neighbouring pages it prefetches, so this is not a fault count:
# `colo pair --json` gives the vCPU's real fault rate (KVM's `pf_taken` statistic,
# `vcpu_primary_faults_per_s`) and `colo bench colo` the cost of one fault. Also
# prints the median gap between faults on consecutive guest pages: the cost of one fault
# when the guest writes pages back to back (the dirty load does).
# Needs root and tracefs (/sys/kernel/tracing) with the kvmmmu events.
set -euo pipefail
secs=${1:-1}
T=/sys/kernel/tracing
# tracefs is not always mounted (a fresh container): mount it where the kernel expects it.
if [ ! -d "$T/events" ]; then
    mount -t tracefs nodev "$T" 2>/dev/null || true
fi
ev=$T/events/kvmmmu/kvm_mmu_set_spte/enable
if [ ! -w "$ev" ]; then
    echo "kvm-faults: cannot enable $ev (needs root and tracefs with kvmmmu events)" >&2
    exit 2
fi
echo > "$T/trace"
echo 1 > "$ev"
trap 'echo 0 > "$ev"; echo > "$T/trace"' EXIT
sleep "$secs"
echo 0 > "$ev"
python3 - "$T/trace" "$secs" <<'PY'
import collections, re, sys
count, gaps, last = collections.Counter(), [], None
pat = re.compile(r"^\s*(\S+)-\d+\s+\[\d+\]\s+\S+\s+([\d.]+): kvm_mmu_set_spte: gfn (\w+)")
for line in open(sys.argv[1]):
    m = pat.match(line)
    if not m:
        continue
    task, t, g = m.group(1), float(m.group(2)), int(m.group(3), 16)
    count[task] += 1
    if last and last[0] == task and g == last[2] + 1:
        gaps.append((t - last[1]) * 1e6)
    last = (task, t, g)
secs = float(sys.argv[2])
for task, n in count.most_common():
    print(f"{task:28} {n / secs:10.0f} faults/s")
if gaps:
    gaps.sort()
    print(f"median gap between faults on consecutive pages: {gaps[len(gaps) // 2]:.1f} us ({len(gaps)} gaps)")
PY
