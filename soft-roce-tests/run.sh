#!/usr/bin/env bash
# Runs the verbs device tests (soft-roce-tests/tests/verbs.rs, the #[ignore]d `device_*`
# tests) on a real RDMA device.
#
# - With COLO_RDMA_DEVICE and COLO_RDMA_ADDR set (InfiniBand, or rxe you set up yourself),
#   it uses that device.
# - Otherwise, where the kernel has soft-RoCE, it creates an rxe device on a netdev
#   (COLO_RXE_NETDEV, default: the interface of the default route), runs the tests on it
#   and deletes it again. Needs root.
# - On a kernel without RDMA it prints "skipped: kernel has no RDMA support" and exits 0.
#
# The same scenarios run on the in-process queue pair in the normal test command.
set -euo pipefail
cd "$(dirname "$0")/.."

skip() {
  echo "skipped: $*"
  exit 0
}

created=""
cleanup() {
  if [ -n "$created" ]; then
    rdma link delete "$created" || echo "warning: could not delete rxe device $created" >&2
  fi
}
trap cleanup EXIT

if [ -z "${COLO_RDMA_DEVICE:-}" ] || [ -z "${COLO_RDMA_ADDR:-}" ]; then
  if [ ! -d /sys/module/rdma_rxe ]; then
    if command -v modprobe >/dev/null 2>&1; then
      modprobe rdma_rxe 2>/dev/null || true
    fi
  fi
  if [ ! -d /sys/module/rdma_rxe ] && [ ! -d /sys/class/infiniband ]; then
    skip "kernel has no RDMA support (no rdma_rxe module, no /sys/class/infiniband)"
  fi
  [ -d /sys/module/rdma_rxe ] || skip "kernel has no soft-RoCE (rdma_rxe); set COLO_RDMA_DEVICE and COLO_RDMA_ADDR to test a hardware device"
  command -v rdma >/dev/null 2>&1 || { echo "the rdma tool (iproute2) is missing: apt-get install iproute2" >&2; exit 1; }
  [ "$(id -u)" -eq 0 ] || { echo "creating an rxe device needs root" >&2; exit 1; }
  netdev="${COLO_RXE_NETDEV:-$(ip -o -4 route show default | awk '{print $5; exit}')}"
  [ -n "$netdev" ] || { echo "no netdev for rxe: set COLO_RXE_NETDEV" >&2; exit 1; }
  addr="$(ip -o -4 addr show dev "$netdev" | awk '{print $4; exit}' | cut -d/ -f1)"
  [ -n "$addr" ] || { echo "netdev $netdev has no IPv4 address" >&2; exit 1; }
  # Reuse an rxe device already on this netdev, else create one.
  dev="$(rdma link show 2>/dev/null | awk -v n="$netdev" '$0 ~ ("netdev " n "( |$)") {split($2, a, "/"); print a[1]; exit}')"
  if [ -z "$dev" ]; then
    dev=colo_rxe0
    echo "==> rdma link add $dev type rxe netdev $netdev"
    rdma link add "$dev" type rxe netdev "$netdev"
    created="$dev"
  fi
  export COLO_RDMA_DEVICE="$dev" COLO_RDMA_ADDR="$addr"
fi

# Registration pins memory: lift the locked-memory limit as far as allowed.
ulimit -l unlimited 2>/dev/null || ulimit -l "$(ulimit -H -l)" || true
echo "==> device $COLO_RDMA_DEVICE at $COLO_RDMA_ADDR, memlock $(ulimit -l)"
cargo test -p colo-soft-roce-tests --test verbs -- --ignored --test-threads=1
