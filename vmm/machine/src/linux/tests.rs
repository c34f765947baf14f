//! The Linux loader on tiny hand-made kernels: a PVH ELF whose 32-bit entry prints the
//! command line it finds through the start info on the serial port, and the bad inputs
//! that must be refused before any VM exists.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use colo_memory::{GuestLayout, GuestMemory, GuestRegion};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::backend::NetBackend;
use crate::devices::console::ConsoleSink;
use crate::runner::VmHandle;
use crate::{Guest, GuestExit, Machine, VmConfig};

/// Where the tiny kernel is loaded and entered.
const TINY_ENTRY: u64 = 0x10_0000;

/// 32-bit code: if `[ebx]` is the PVH start info magic, print the command line at
/// `[ebx + 24]` on COM1; then a newline and `hlt` forever.
const TINY_CODE: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0x81, 0x3b, 0x78, 0xc5, 0x6e, 0x33, // cmp dword [ebx], 0x336ec578
    0x75, 0x0d, // jne done
    0x8b, 0x73, 0x18, // mov esi, [ebx + 24]
    0x8a, 0x06, // loop: mov al, [esi]
    0x84, 0xc0, // test al, al
    0x74, 0x04, // je done
    0xee, // out dx, al
    0x46, // inc esi
    0xeb, 0xf6, // jmp loop
    0xb0, 0x0a, // done: mov al, '\n'
    0xee, // out dx, al
    0xf4, // hlt
    0xeb, 0xfd, // jmp hlt
];

/// An x86-64 ELF with one PT_LOAD of `TINY_CODE` at 1 MiB and, with `pvh`, a PT_NOTE
/// holding XEN_ELFNOTE_PHYS32_ENTRY (an 8-byte descriptor, as Linux writes it).
fn tiny_kernel(pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let code_off = 64 + 56 * u64::from(phnum);
    let note_off = code_off + TINY_CODE.len() as u64;
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&8u32.to_le_bytes());
    note.extend_from_slice(&18u32.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&TINY_ENTRY.to_le_bytes());
    let mut f = vec![0u8; 64];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[24..32].copy_from_slice(&TINY_ENTRY.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes());
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let phdr = |kind: u32, flags: u32, off: u64, addr: u64, size: u64, memsz: u64| {
        let mut p = Vec::with_capacity(56);
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(&flags.to_le_bytes());
        for v in [off, addr, addr, size, memsz, 4] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p
    };
    let n = TINY_CODE.len() as u64;
    f.extend(phdr(1, 5, code_off, TINY_ENTRY, n, 0x1000));
    if pvh {
        f.extend(phdr(
            4,
            4,
            note_off,
            0,
            note.len() as u64,
            note.len() as u64,
        ));
    }
    f.extend_from_slice(TINY_CODE);
    if pvh {
        f.extend_from_slice(&note);
    }
    f
}

/// A scratch directory removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!(
            "colo-linux-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ram(mib: u64) -> (GuestMemory, GuestLayout) {
    let len = mib << 20;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), len as usize)]).unwrap();
    let layout = GuestLayout::new(
        4096,
        vec![GuestRegion {
            slot: 0,
            gpa: 0,
            len,
        }],
    )
    .unwrap();
    (mem, layout)
}

fn guest(kernel: &Path) -> LinuxGuest {
    LinuxGuest {
        kernel: kernel.into(),
        initrd: None,
        cmdline: None,
    }
}

#[test]
fn a_pvh_kernel_gets_its_start_info_memory_map_command_line_and_initrd() {
    let d = Dir::new("load");
    let mut g = guest(&d.file("vmlinux", &tiny_kernel(true)));
    g.initrd = Some(d.file("initrd", &[7u8; 10_000]));
    g.cmdline = Some("console=ttyS0 hello".into());
    let (mem, layout) = ram(64);
    let l = load(&mem, &layout, &g, &["colo=1".into()], None).unwrap();
    assert_eq!(
        l.entry,
        Entry::Pvh {
            rip: TINY_ENTRY,
            start_info: START_INFO_GPA
        }
    );
    assert_eq!(l.cmdline, "console=ttyS0 hello colo=1");
    // The initrd at the top of RAM, page-aligned.
    let (at, size) = l.initrd.unwrap();
    assert_eq!((at, size), ((64 << 20) - 3 * 4096, 10_000));
    let r64 = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
    let r32 = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).unwrap();
    let s = START_INFO_GPA;
    assert_eq!(r32(s), XEN_HVM_START_MAGIC);
    assert_eq!(r32(s + 4), 1, "version");
    assert_eq!(r32(s + 12), 1, "one module");
    assert_eq!(r64(s + 16), MODLIST_GPA);
    assert_eq!(r64(s + 24), CMDLINE_GPA);
    assert_eq!(r64(s + 40), MEMMAP_GPA);
    assert_eq!(r32(s + 48), l.e820.len() as u32);
    assert_eq!(r64(MODLIST_GPA), at);
    assert_eq!(r64(MODLIST_GPA + 8), size);
    for (i, e) in l.e820.iter().enumerate() {
        let a = MEMMAP_GPA + 24 * i as u64;
        assert_eq!(
            (r64(a), r64(a + 8), r32(a + 16)),
            (e.addr, e.size, e.kind.code())
        );
    }
    let mut c = vec![0u8; l.cmdline.len() + 1];
    mem.read_slice(&mut c, GuestAddress(CMDLINE_GPA)).unwrap();
    assert_eq!(&c[..l.cmdline.len()], l.cmdline.as_bytes());
    assert_eq!(c[l.cmdline.len()], 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(at)).unwrap(), 7);
}

#[test]
fn bad_kernels_initrds_and_command_lines_are_refused_with_what_is_wrong() {
    let d = Dir::new("bad");
    let (mem, layout) = ram(64);
    let pvh = d.file("vmlinux", &tiny_kernel(true));
    let mut arm = tiny_kernel(true);
    arm[18] = 183; // EM_AARCH64
    let cases: Vec<(LinuxGuest, &str)> = vec![
        (
            guest(Path::new("/nonexistent/vmlinux")),
            "cannot read the kernel",
        ),
        (
            guest(&d.file("text", b"just some text, not a kernel at all")),
            "neither an ELF vmlinux nor a bzImage",
        ),
        (guest(&d.file("empty", b"")), "neither an ELF"),
        (
            guest(&d.file("nopvh", &tiny_kernel(false))),
            "without the Xen PVH entry note",
        ),
        (guest(&d.file("arm", &arm)), "not a 64-bit x86 one"),
        (
            LinuxGuest {
                initrd: Some(d.file("big", &vec![0u8; 64 << 20])),
                ..guest(&pvh)
            },
            "does not fit",
        ),
        (
            LinuxGuest {
                initrd: Some(d.file("zero", b"")),
                ..guest(&pvh)
            },
            "does not fit",
        ),
        (
            LinuxGuest {
                initrd: Some("/nonexistent/initrd".into()),
                ..guest(&pvh)
            },
            "cannot read the initrd",
        ),
        (
            LinuxGuest {
                cmdline: Some("x".repeat(3000)),
                ..guest(&pvh)
            },
            "3000 bytes; this kernel takes at most 2047",
        ),
    ];
    for (g, want) in cases {
        let e = load(&mem, &layout, &g, &[], None).unwrap_err().to_string();
        assert!(e.contains(want), "{g:?}: {e:?} should say {want:?}");
    }
}

#[test]
fn a_kernel_whose_segments_miss_ram_is_refused_and_names_the_ram() {
    let d = Dir::new("small");
    let g = guest(&d.file("vmlinux", &tiny_kernel(true)));
    // 1 MiB of RAM: the segment at 1 MiB lies past its end.
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let layout = GuestLayout::of_guest(&mem, 4096).unwrap();
    let e = load(&mem, &layout, &g, &[], None).unwrap_err().to_string();
    assert!(e.contains("into 1 MiB of RAM"), "{e}");
}

#[test]
fn the_real_bzimage_gets_a_zero_page_with_colos_e820_map_and_a_64_bit_entry() {
    let Some(dir) = crate::testing::test_kernel_dir(&["vmlinux", "bzImage", "initrd.img"]) else {
        return;
    };
    let g = LinuxGuest {
        kernel: dir.join("bzImage"),
        initrd: Some(dir.join("initrd.img")),
        cmdline: None,
    };
    let (mem, layout) = ram(256);
    let l = load(&mem, &layout, &g, &[], None).unwrap();
    let Entry::Linux64 { rip, zero_page } = l.entry else {
        panic!("{:?}", l.entry);
    };
    assert_eq!((rip, zero_page), (0x10_0200, ZERO_PAGE_GPA));
    let zp = mem
        .read_obj::<boot_params>(GuestAddress(ZERO_PAGE_GPA))
        .unwrap();
    let hdr = zp.hdr;
    let (flag, magic, loader, cmd, image, size) = (
        hdr.boot_flag,
        hdr.header,
        hdr.type_of_loader,
        hdr.cmd_line_ptr,
        hdr.ramdisk_image,
        hdr.ramdisk_size,
    );
    assert_eq!((flag, magic, loader), (BOOT_FLAG, HDRS, LOADER_OTHER));
    assert_eq!(u64::from(cmd), CMDLINE_GPA);
    let (at, len) = l.initrd.unwrap();
    assert_eq!((u64::from(image), u64::from(size)), (at, len));
    assert_eq!(usize::from(zp.e820_entries), l.e820.len());
    for (i, e) in l.e820.iter().enumerate() {
        let t = zp.e820_table[i];
        let (addr, sz, kind) = (t.addr, t.size, t.r#type);
        assert_eq!((addr, sz, kind), (e.addr, e.size, e.kind.code()));
    }
}

#[test]
fn a_pvh_guest_reads_its_command_line_through_the_start_info_and_prints_it_on_com1() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is absent");
        return;
    }
    let d = Dir::new("run");
    let disk = d.file("disk.img", &vec![0u8; 1 << 20]);
    let (tx, rx) = crossbeam_channel::unbounded();
    let m = Machine::new(VmConfig {
        name: "pvh".into(),
        ram: 64 << 20,
        vcpus: 1,
        guest: Guest::Linux(LinuxGuest {
            cmdline: Some("console=ttyS0 colo-pvh-test".into()),
            ..guest(&d.file("vmlinux", &tiny_kernel(true)))
        }),
        disk,
        disk_backend: None,
        net: NetBackend::none(),
        mac: [2, 0, 0, 0, 0, 1],
        console: ConsoleSink::Channel(tx),
    })
    .unwrap();
    let cmdline = m.linux_boot().unwrap().cmdline.clone();
    assert!(
        cmdline.starts_with("console=ttyS0 colo-pvh-test"),
        "{cmdline}"
    );
    let vm = VmHandle::start(m, false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut lines = Vec::new();
    while !lines.contains(&cmdline) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    // The guest halts with interrupts off: the vCPU blocks in KVM until stopped.
    assert_eq!(vm.stop().unwrap(), GuestExit::Stopped);
    assert!(lines.contains(&cmdline), "{lines:?}");
}
