#!/usr/bin/env bash
# The project's test command (README.md). Works on a fresh Debian machine with the Rust
# toolchain: installs the system packages the build needs if they are missing, then runs
# rustfmt, clippy and the whole test suite with every feature (so the verbs RDMA backend is
# compiled and linted even where no RDMA device exists, and the libfabric one runs), and a short run of every fuzz
# target.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: rdma-sys needs the verbs and rdma_cm headers, libclang (bindgen) and
# pkg-config; the libfabric backend (feature `ofi`) libfabric's headers, and its tests run
# the one-sided pipeline over libfabric's real `tcp` provider on loopback; the namespace tests (netcmp, colo run, the cut-link test) need ip(8) and nft;
# the cluster tests run the resource agent (ocf/colo) under Debian's Corosync and Pacemaker
# (vmm/tests/cluster.rs, in a namespace of their own) and resource-agents' ocf-tester
# (vmm/tests/ocf_agent.rs), with crmsh to configure the cluster.
need=(libibverbs-dev librdmacm-dev libfabric-dev libclang-dev pkg-config iproute2 nftables
  pacemaker corosync crmsh resource-agents)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> installing missing packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# QEMU's Python QMP library: the QMP test drives colo's socket with it (it skips, saying
# why, where it cannot be imported). pip first; apt for pip itself if that is missing.
if ! python3 -c 'import qemu.qmp' 2>/dev/null; then
  echo "==> installing qemu.qmp (QEMU's Python QMP client)"
  if ! python3 -m pip --version >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-pip >/dev/null
  fi
  python3 -m pip install --quiet qemu.qmp ||
    python3 -m pip install --quiet --break-system-packages qemu.qmp
fi

# The Linux boot test's kernel and initramfs (cached under target/test-kernel; the script
# installs busybox-static, cpio and the decompressors it needs itself).
echo "==> test kernel"
bash scripts/test-kernel.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy --all-features -D warnings"
cargo clippy --workspace --all-features --all-targets -- -D warnings

# The README's main command builds colo-vmm alone with its default features, which the
# workspace-wide builds above never do (there every optional feature is on).
echo "==> cargo check -p colo-vmm (default features)"
cargo check -p colo-vmm

echo "==> cargo test --all-features"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --all-features 2>&1 | tee "$log"
# Refuse a green run that executed nothing.
passed=$(grep -Eo '^test result: ok\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
if [ "$passed" -eq 0 ]; then
  echo "no tests ran: refusing to call this a pass" >&2
  exit 1
fi
echo "==> $passed tests passed"

# Bad input: every cargo-fuzz target replays its corpus and seeds, then fuzzes a few
# seconds, the whole step within 5 minutes (cargo-fuzz is installed if missing); where it
# cannot be, one line says why and the targets' bodies run as 10,000-case proptests.
# Long runs are by hand: scripts/fuzz.sh long SECONDS (README.md, "Fuzzing").
echo "==> fuzz"
bash scripts/fuzz.sh short

# The verbs device tests: on rxe where the kernel has it; a clear skip line elsewhere.
echo "==> soft-RoCE device tests"
bash soft-roce-tests/run.sh
