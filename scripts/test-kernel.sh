#!/usr/bin/env bash
# Test setup for the Linux boot test (colo-machine's tests/linux_boot.rs): a real Linux
# kernel and a tiny initramfs, cached under target/test-kernel/.
#
#   vmlinux     the PVH ELF of Debian's cloud kernel: the real linux-image-*-cloud-amd64
#               package that linux-image-cloud-amd64 depends on, downloaded with
#               `apt-get download`, its /boot/vmlinuz-* bzImage unpacked here (the payload
#               is compressed; the first xz/zstd/gzip/lz4 stream that decompresses to an
#               ELF with the Xen PVH note is it)
#   bzImage     that vmlinuz, as the package ships it (the Linux boot protocol path)
#   initrd.img  a busybox (Debian busybox-static) initramfs whose /init mounts proc, prints
#               COLO-INIT-OK and powers off
#   kernel-version  which package the files came from
#
# Idempotent: files already there are kept (delete the folder to start over). Runs as root
# on a fresh Debian machine (installs what it needs with apt-get); prints one line per step.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/test-kernel
mkdir -p "$out"

if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -s "$out/initrd.img" ] \
  && [ -s "$out/kernel-version" ]; then
  echo "==> test kernel: cached in $out ($(cat "$out/kernel-version"))"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
need=(busybox-static cpio xz-utils zstd gzip lz4)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
updated=
apt_update() {
  if [ -z "$updated" ]; then
    $SUDO apt-get update -qq
    updated=1
  fi
}
if ((${#missing[@]})); then
  echo "==> test kernel: installing ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The real image package: what the meta package depends on.
image_pkg() {
  apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-cloud-amd64$/ { print $2; exit }'
}
pkg=$(image_pkg || true)
if [ -z "$pkg" ]; then
  apt_update
  pkg=$(image_pkg || true)
fi
if [ -z "$pkg" ]; then
  echo "test kernel: apt-cache finds no linux-image-*-cloud-amd64 behind linux-image-cloud-amd64" >&2
  exit 1
fi

echo "==> test kernel: apt-get download $pkg"
(cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1) || {
  apt_update
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
}
deb=$(ls "$work"/*.deb)
dpkg-deb -x "$deb" "$work/pkg"
vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-* | head -n1)
[ -s "$vmlinuz" ] || { echo "test kernel: no /boot/vmlinuz-* in $deb" >&2; exit 1; }

# The bzImage payload: try every offset of every known compression magic, the way the
# kernel's scripts/extract-vmlinux does, and keep the first stream that decompresses to
# an ELF.
is_elf() { [ "$(head -c4 "$1" | od -An -tx1 | tr -d ' \n')" = "7f454c46" ]; }
try() { # magic (grep -P bytes), decompressor...
  local magic=$1
  shift
  local off
  for off in $(LC_ALL=C grep -aboP "$magic" "$vmlinuz" | cut -d: -f1); do
    tail -c "+$((off + 1))" "$vmlinuz" | "$@" >"$work/vmlinux" 2>/dev/null || true
    if [ -s "$work/vmlinux" ] && is_elf "$work/vmlinux"; then
      echo "==> test kernel: payload at offset $off ($1)"
      return 0
    fi
  done
  return 1
}
try '\xfd7zXZ\x00' xz -dcq \
  || try '\x28\xb5\x2f\xfd' zstd -dcq \
  || try '\x1f\x8b\x08' gzip -dcq \
  || try '\x02\x21\x4c\x18' lz4 -dcq \
  || { echo "test kernel: no xz/zstd/gzip/lz4 stream in $vmlinuz decompresses to an ELF" >&2; exit 1; }

# A PVH kernel carries a XEN_ELFNOTE_PHYS32_ENTRY note: name size 4, descriptor size 4 or
# 8, type 18, name "Xen".
if ! LC_ALL=C grep -aqP '\x04\x00\x00\x00[\x04\x08]\x00\x00\x00\x12\x00\x00\x00Xen\x00' "$work/vmlinux"; then
  echo "test kernel: the vmlinux has no Xen note (not built with CONFIG_PVH)" >&2
  exit 1
fi

# The initramfs.
echo "==> test kernel: busybox initramfs"
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys}
cp /bin/busybox "$root/bin/busybox"
for a in sh mount echo poweroff cat; do ln -s busybox "$root/bin/$a"; done
cat >"$root/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc
echo "COLO-INIT-OK: $(cat /proc/version)"
poweroff -f
EOF
chmod 755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9n) >"$work/initrd.img"

mv "$work/vmlinux" "$out/vmlinux"
cp "$vmlinuz" "$out/bzImage"
mv "$work/initrd.img" "$out/initrd.img"
echo "$pkg $(basename "$vmlinuz")" >"$out/kernel-version"
echo "==> test kernel: $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes), $out/bzImage, $out/initrd.img ($(stat -c %s "$out/initrd.img") bytes)"
