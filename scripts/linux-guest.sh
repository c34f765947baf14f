#!/usr/bin/env bash
# The full Linux check: a Linux guest that serves TCP and writes to its disk, protected by
# `colo pair`, with the primary killed while a client talks to it.
#
#   sudo bash scripts/linux-guest.sh [--kernel VMLINUX] [--duration 60] [--kill-after 30]
#                                    [--vcpus N] [--tap NAME]
#
# 1. Kernel: --kernel, or Debian's cloud kernel from scripts/test-kernel.sh (a stock
#    kernel: virtio-mmio, virtio-net and virtio-blk are modules there, so the initramfs
#    loads them from the same package; colo describes the devices in ACPI and on the
#    command line, see vmm/machine/guest-kernel.config).
# 2. Initramfs (target/linux-guest/initrd.img, busybox-static): /init loads the virtio
#    modules, brings up eth0 as 10.0.2.15/24, serves HTTP on port 7000 (busybox httpd,
#    a CGI counts requests), and appends a numbered line to /dev/vda every second.
# 3. `colo pair --kernel ... --initrd ... --disk target/linux-guest/disk.img --tap NAME`
#    runs for --duration seconds; the primary is killed at --kill-after. This script is
#    the client: it fetches http://10.0.2.15:7000/ through the tap once a second and
#    counts the answers before and after the kill.
# 4. It says how far the guest got: the kernel's banner, `Run /init`, the guest's own
#    `COLO-GUEST-UP` line, the client's answers before and after the failover.
#
# On a host with hardware virtualization the whole run takes about --duration seconds and
# ends with answers on both sides of the kill. On hosts whose KVM emulates guest kernel
# code (see ../shared/ENVIRONMENT.md), the kernel boots about 1000x slower and userspace
# may never run: the script then reports the last stage reached and exits 3.
set -euo pipefail
cd "$(dirname "$0")/.."

kernel= duration=60 kill_after=30 vcpus=1 tap=colo-lg0
while (($#)); do
  case $1 in
    --kernel) kernel=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --kill-after) kill_after=$2; shift 2 ;;
    --vcpus) vcpus=$2; shift 2 ;;
    --tap) tap=$2; shift 2 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "linux-guest: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ $duration =~ ^[0-9]+$ && $kill_after =~ ^[0-9]+$ && $vcpus =~ ^[0-9]+$ ]] \
  || ((kill_after >= duration)); then
  echo "linux-guest: --duration and --kill-after are whole seconds, --kill-after < --duration" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "linux-guest: needs root (a tap device)" >&2
  exit 2
fi

out=target/linux-guest
mkdir -p "$out"
bash scripts/test-kernel.sh
if [ -z "$kernel" ]; then
  kernel=target/test-kernel/vmlinux
fi
[ -s "$kernel" ] || { echo "linux-guest: no kernel at $kernel" >&2; exit 2; }

# The virtio modules of Debian's kernel (only for that kernel; a kernel of yours should
# have them built in, see vmm/machine/guest-kernel.config).
mods="$out/modules"
if [ "$kernel" = target/test-kernel/vmlinux ] && [ ! -d "$mods" ]; then
  pkg=$(awk '{print $1}' target/test-kernel/kernel-version)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  echo "==> linux-guest: virtio modules from $pkg"
  (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1)
  dpkg-deb -x "$work"/*.deb "$work/pkg"
  mkdir -p "$mods.tmp"
  for m in virtio virtio_ring virtio_mmio failover net_failover virtio_net virtio_blk; do
    f=$(find "$work/pkg/lib/modules" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || { echo "linux-guest: $m.ko not in $pkg" >&2; exit 1; }
    case $f in
      *.xz) xz -dc "$f" >"$mods.tmp/$m.ko" ;;
      *.zst) zstd -dcq "$f" >"$mods.tmp/$m.ko" ;;
      *) cp "$f" "$mods.tmp/$m.ko" ;;
    esac
  done
  mv "$mods.tmp" "$mods"
fi

echo "==> linux-guest: initramfs"
root=$(mktemp -d)
trap 'rm -rf "$root" ${work:+"$work"}' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,www/cgi-bin,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for a in sh mount echo cat insmod ip httpd dd sleep seq ls; do ln -s busybox "$root/bin/$a"; done
[ -d "$mods" ] && cp "$mods"/*.ko "$root/lib/modules/"
cat >"$root/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
# Load the virtio modules in any order: each pass loads what its dependencies allow.
for pass in 1 2 3 4; do
  for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0
echo "hello from the protected guest" >/www/index.html
cat >/www/cgi-bin/count <<'CGI'
#!/bin/sh
n=$(cat /tmp/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n >/tmp/count
printf 'Content-Type: text/plain\r\n\r\nrequest %s\n' "$n"
CGI
chmod 755 /www/cgi-bin/count
httpd -p 7000 -h /www
echo "COLO-GUEST-UP: $(ls /sys/bus/virtio/devices 2>/dev/null | wc -l) virtio devices, eth0 $(cat /sys/class/net/eth0/address 2>/dev/null)"
# The disk: a numbered line per second, each at its own 512-byte sector.
for i in $(seq 1 100000); do
  echo "tick $i" | dd of=/dev/vda bs=512 seek=$i conv=notrunc 2>/dev/null
  sleep 1
done
EOF
chmod 755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9n) >"$out/initrd.img"

echo "==> linux-guest: building colo"
cargo build --release -q -p colo-vmm
colo=target/release/colo
log="$out/pair.log"
rm -f "$out/disk.img" "$out/disk.img.secondary"
echo "==> linux-guest: colo pair for ${duration}s, primary killed at ${kill_after}s (log: $log)"
"$colo" pair --kernel "$kernel" --initrd "$out/initrd.img" --vcpus "$vcpus" \
  --disk "$out/disk.img" --tap "$tap" --verbose \
  --duration "${duration}s" --kill-primary-after "${kill_after}s" >"$log" 2>&1 &
pair=$!
trap 'kill $pair 2>/dev/null || true; rm -rf "$root" ${work:+"$work"}' EXIT

start=$(date +%s)
before=0 after=0
while kill -0 "$pair" 2>/dev/null; do
  t=$(($(date +%s) - start))
  if reply=$(busybox wget -q -T 1 -O - http://10.0.2.15:7000/cgi-bin/count 2>/dev/null); then
    if ((t < kill_after)); then before=$((before + 1)); else after=$((after + 1)); fi
    echo "  ${t}s: $reply"
  fi
  sleep 1
done
wait "$pair" && rc=0 || rc=$?

stage="the VMs did not start"
grep -q "Linux version" "$log" && stage="the kernel printed its banner"
grep -q "Run /init" "$log" && stage="the kernel started /init"
grep -q "COLO-GUEST-UP" "$log" && stage="the guest's userspace came up ($(grep -m1 -o 'COLO-GUEST-UP.*' "$log"))"
echo "==> linux-guest: colo pair exited $rc; furthest stage: $stage"
echo "==> linux-guest: the guest's last console line: $(grep -E '\[(pvm|svm)\]' "$log" | tail -n1 | sed 's/^.*\[\(pvm\|svm\)\] //')"
echo "==> linux-guest: HTTP answers: $before before the kill, $after after it"
grep -A8 "colo pair summary" "$log" || true
if ((before > 0 && after > 0 && rc == 0)); then
  echo "==> linux-guest: PASS: the Linux guest served across the failover"
  exit 0
fi
echo "==> linux-guest: the guest did not serve on both sides of the kill; on a host whose KVM"
echo "    emulates guest kernel code this is expected (see README, 'Booting your own kernel')"
exit 3
