//! The guest's CPL0 start: the PVH entry (vCPU 0), the real-mode trampoline of the other
//! vCPUs, and the tables both build on. Everything here runs once per vCPU and is short,
//! plain code: on this project's hosts KVM emulates guest CPL0 code one instruction at a
//! time (no `iretq`, which KVM's emulator lacks in protected mode: the drop to CPL3 is a
//! `sysexit`).
//!
//! vCPU 0 enters [`colo_pvh_entry`] in 32-bit protected mode, paging off, `ebx` = the PVH
//! `hvm_start_info` (colo_guest_abi::boot). The others wait, uninitialized, until vCPU 0
//! sends INIT and two SIPIs ("all excluding self") through its local APIC; they start in
//! real mode at the trampoline ([`TRAMPOLINE_GPA`], linked there as a segment of its own),
//! which loads the GDT and jumps to the same 32-bit path. Then every vCPU:
//! 1. turns on long mode on the static identity map (4 GiB in 2 MiB pages, U and W set, so
//!    CPL3 code reaches RAM, the devices and nothing the guest did not map);
//! 2. takes a CPL0 stack and a TSS of its own, by its APIC id (the TSS gives the CPL0
//!    stack to exceptions from CPL3, and its I/O bitmap allows the VMM's three ports and
//!    no other);
//! 3. loads the IDT (vCPU 0 fills it, and then starts the others): every exception stops
//!    the VM with `EXIT_EXCEPTION` + the vector, the registers as the ABI says;
//! 4. `sysexit`s to CPL3 with interrupts off, onto its CPL3 stack, into `guest_main`
//!    (vCPU 0) or `worker_main`, with `rdi` = the start info and `rsi` = its index.

use core::arch::global_asm;

use colo_guest_abi::boot::{
    EXIT_EXCEPTION, MAX_VCPUS, PORT_CONSOLE, PORT_EXIT, PORT_IDLE, PORT_SLEEP_CONTROL,
    TRAMPOLINE_GPA,
};

use crate::rt::{EXIT_BAD_BOOT, STACK_SIZE, WORKER_STACK_SIZE};

/// GDT selectors. `sysexit` with SYSENTER_CS = [`KERNEL_CS`] loads CS = KERNEL_CS + 32
/// and SS = KERNEL_CS + 40 (RPL 3): the user segments sit there.
const KERNEL_CS: u32 = 0x08;
const KERNEL_DS: u32 = 0x10;
const KERNEL_CS32: u32 = 0x18;
const USER_DS: u32 = 0x30 | 3;
/// The first TSS descriptor (16 bytes each, one per vCPU).
const TSS0: u32 = 0x38;

/// The I/O permission bitmap: the guest writes each of colo's three ports with
/// `out dx, eax`, which touches the port and the three after it, so all of those must be
/// allowed; they share one byte. The sleep control port is written with `out dx, al`: one
/// bit of a later byte. Every other byte denies all its ports, and the byte after the last
/// is the terminator the CPU wants.
const IOMAP_BYTE: u16 = PORT_CONSOLE / 8;
const _: () = assert!((PORT_EXIT + 3) / 8 == IOMAP_BYTE && PORT_CONSOLE <= PORT_IDLE);
const IOMAP_MASK: u8 =
    !(((1u16 << (PORT_EXIT + 4 - PORT_CONSOLE)) - 1) << (PORT_CONSOLE % 8)) as u8;
const POWER_BYTE: u16 = PORT_SLEEP_CONTROL / 8;
const _: () = assert!(POWER_BYTE > IOMAP_BYTE);
const POWER_MASK: u8 = !(1u8 << (PORT_SLEEP_CONTROL % 8));
/// Bytes of one TSS: 0x68, the bitmap and its terminator, rounded up to 16.
const TSS_BYTES: u32 = 0x68 + POWER_BYTE as u32 + 2;
const TSS_SIZE: u32 = TSS_BYTES.next_multiple_of(16);
/// The descriptor's limit and type (an available 64-bit TSS, present).
const TSS_DESC_LOW: u64 = (TSS_BYTES as u64 - 1) | (0x89 << 40);

/// Bytes of each vCPU's CPL0 stack (setup and exception handlers only).
const KSTACK_SIZE: u32 = 4096;

/// CR0: PE | MP | ET | NE | WP | AM | PG (EM clear: compiled Rust uses SSE).
const CR0: u32 = 0x8005_0033;
/// CR4: PAE | OSFXSR | OSXMMEXCPT.
const CR4: u32 = 0x620;
const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 0x100;
const MSR_SYSENTER_CS: u32 = 0x174;
/// xAPIC registers (the in-kernel LAPIC): spurious vector (bit 8: enabled) and the
/// interrupt command register.
const APIC_SVR: u32 = 0xfee0_00f0;
const APIC_ICR: u32 = 0xfee0_0300;
/// ICR: all excluding self (0xc << 16), level assert (0x4000), INIT (0x500) or START-UP
/// (0x600) with the trampoline's page as the vector.
const ICR_INIT: u32 = 0x000c_4500;
const ICR_SIPI: u32 = 0x000c_4600 | (TRAMPOLINE_GPA >> 12) as u32;

global_asm!(
    // The PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18): what makes this an ordinary PVH
    // kernel for the loader.
    ".pushsection .note.Xen, \"a\", @note",
    ".p2align 2",
    ".long 4, 4, 18",
    ".asciz \"Xen\"",
    ".long colo_pvh_entry",
    ".popsection",

    // The trampoline: real mode, CS = TRAMPOLINE_GPA >> 4, IP = 0.
    ".pushsection .trampoline, \"ax\", @progbits",
    ".code16",
    ".global colo_trampoline",
    "colo_trampoline:",
    "    cli",
    "    cld",
    "    mov %cs, %ax",
    "    mov %ax, %ds",
    "    lgdtl colo_tramp_gdtr - colo_trampoline",
    "    mov %cr0, %eax",
    "    orl $1, %eax",
    "    mov %eax, %cr0",
    "    ljmpl ${cs32}, $colo_ap_entry32",
    ".p2align 3",
    "colo_tramp_gdtr:",
    "    .word colo_gdt_end - colo_gdt - 1",
    "    .long colo_gdt",
    ".code64",
    ".popsection",

    ".pushsection .text.colo_entry, \"ax\", @progbits",
    ".code32",
    ".global colo_pvh_entry",
    "colo_pvh_entry:",
    "    cli",
    "    cld",
    "    movl %ebx, colo_start_info",
    "    xorl %esi, %esi",
    "    jmp 1f",
    "colo_ap_entry32:",
    "    movl ${kds}, %eax",
    "    movl %eax, %ds",
    "    movl %eax, %es",
    "    movl %eax, %ss",
    // The index is the APIC id (KVM's vCPU id).
    "    movl $1, %eax",
    "    cpuid",
    "    shrl $24, %ebx",
    "    movl %ebx, %esi",
    "1:",
    "    movl %cr4, %eax",
    "    orl ${cr4}, %eax",
    "    movl %eax, %cr4",
    "    movl $colo_pml4, %eax",
    "    movl %eax, %cr3",
    "    movl ${efer}, %ecx",
    "    rdmsr",
    "    orl ${lme}, %eax",
    "    wrmsr",
    "    movl ${cr0}, %eax",
    "    movl %eax, %cr0",
    "    lgdtl colo_gdtr",
    "    ljmpl ${cs64}, $2f",
    ".code64",
    "2:",
    "    movl ${kds}, %eax",
    "    movl %eax, %ds",
    "    movl %eax, %es",
    "    movl %eax, %ss",
    "    xorl %eax, %eax",
    "    movl %eax, %fs",
    "    movl %eax, %gs",
    "    cmpl ${max_vcpus}, %esi",
    "    jae 9f",
    // This vCPU's CPL0 stack.
    "    movl %esi, %eax",
    "    shll $12, %eax",
    "    leaq colo_kstacks + {kstack}(%rip), %rsp",
    "    addq %rax, %rsp",
    // Its TSS descriptor: base = colo_tss + index * TSS_SIZE (below 4 GiB).
    "    imull ${tss_size}, %esi, %eax",
    "    leaq colo_tss(%rip), %rdx",
    "    addq %rax, %rdx",
    "    movq %rdx, %rax",
    "    andl $0xffffff, %eax",
    "    shlq $16, %rax",
    "    movq %rdx, %rcx",
    "    shrq $24, %rcx",
    "    shlq $56, %rcx",
    "    orq %rcx, %rax",
    "    movabsq ${tss_low}, %rcx",
    "    orq %rcx, %rax",
    "    movl %esi, %ecx",
    "    shll $4, %ecx",
    "    leaq colo_gdt + {tss0}(%rip), %rdx",
    "    addq %rcx, %rdx",
    "    movq %rax, (%rdx)",
    "    movq $0, 8(%rdx)",
    "    leal {tss0}(%rcx), %eax",
    "    ltr %ax",
    "    testl %esi, %esi",
    "    jnz 3f",
    "    call colo_fill_idt",
    "    call colo_start_aps",
    "    xorl %esi, %esi",
    "3:",
    "    lidt colo_idtr(%rip)",
    "    movl ${sysenter_cs}, %ecx",
    "    movl ${cs64}, %eax",
    "    xorl %edx, %edx",
    "    wrmsr",
    "    movl ${uds}, %eax",
    "    movl %eax, %ds",
    "    movl %eax, %es",
    // CPL3: vCPU 0 the service on the big stack, vCPU i a worker on slot i - 1 of the
    // worker stacks (its top is colo_worker_stacks + i * size). rsp + 8 is 16-aligned,
    // as after a call.
    "    testl %esi, %esi",
    "    jnz 4f",
    "    leaq colo_stack_top(%rip), %rcx",
    "    leaq {main}(%rip), %rdx",
    "    jmp 5f",
    "4:",
    "    imull ${worker_stack}, %esi, %eax",
    "    leaq colo_worker_stacks(%rip), %rcx",
    "    addq %rax, %rcx",
    "    leaq {worker}(%rip), %rdx",
    "5:",
    "    subq $8, %rcx",
    "    movq colo_start_info(%rip), %rdi",
    "    sysexitq",
    // An index past the stacks: stop the VM.
    "9:",
    "    movl ${bad_boot}, %eax",
    "    movw ${port_exit}, %dx",
    "6:",
    "    outl %eax, %dx",
    "    jmp 6b",

    // The IDT: an interrupt gate per exception vector, to its stub (clobbers rax, rcx,
    // rdx, rsi, rdi, r8).
    "colo_fill_idt:",
    "    leaq colo_idt(%rip), %rdi",
    "    leaq colo_exc_table(%rip), %rsi",
    "    movl $32, %ecx",
    "7:",
    "    movq (%rsi), %rax",
    "    movl %eax, %edx",
    "    andl $0xffff, %edx",
    "    orl ${cs64_hi}, %edx",
    "    movabsq $0x00008e0000000000, %r8",
    "    orq %r8, %rdx",
    "    movq %rax, %r8",
    "    shrq $16, %r8",
    "    andl $0xffff, %r8d",
    "    shlq $48, %r8",
    "    orq %r8, %rdx",
    "    movq %rdx, (%rdi)",
    "    shrq $32, %rax",
    "    movq %rax, 8(%rdi)",
    "    addq $16, %rdi",
    "    addq $8, %rsi",
    "    decl %ecx",
    "    jnz 7b",
    "    ret",

    // INIT, then START-UP twice (the second is ignored by a vCPU the first started), to
    // every other vCPU. The local APIC must be enabled to send. Clobbers rax, rdi.
    "colo_start_aps:",
    "    movl ${apic_svr}, %edi",
    "    movl (%rdi), %eax",
    "    orl $0x100, %eax",
    "    movl %eax, (%rdi)",
    "    movl ${apic_icr}, %edi",
    "    movl ${icr_init}, (%rdi)",
    "    movl ${icr_sipi}, (%rdi)",
    "    movl ${icr_sipi}, (%rdi)",
    "    ret",

    // Exception stubs: push an error code where the CPU does not, then the vector.
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "colo_exc_\\v:",
    "    pushq $0",
    "    pushq $\\v",
    "    jmp colo_exc_common",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "colo_exc_\\v:",
    "    pushq $\\v",
    "    jmp colo_exc_common",
    ".endr",
    // rbx = vector, rsi = error code, rdi = rip, rcx = rsp of the faulting code; the
    // status says which exception.
    "colo_exc_common:",
    "    popq %rbx",
    "    popq %rsi",
    "    movq (%rsp), %rdi",
    "    movq 24(%rsp), %rcx",
    "    leal {exit_exception}(%rbx), %eax",
    "    movw ${port_exit}, %dx",
    "8:",
    "    outl %eax, %dx",
    "    jmp 8b",
    ".popsection",

    ".pushsection .rodata.colo_exc_table, \"a\", @progbits",
    ".p2align 3",
    "colo_exc_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad colo_exc_\\v",
    ".endr",
    ".popsection",

    ".pushsection .data.colo_tables, \"aw\", @progbits",
    // Identity map of the first 4 GiB: PML4 -> PDPT -> four page directories of 2 MiB
    // pages, every entry present, writable and user (0x7; 0x87 with the page size bit).
    ".p2align 12",
    "colo_pml4:",
    "    .quad colo_pdpt + 7",
    "    .fill 511, 8, 0",
    "colo_pdpt:",
    "    .quad colo_pd + 7",
    "    .quad colo_pd + 0x1000 + 7",
    "    .quad colo_pd + 0x2000 + 7",
    "    .quad colo_pd + 0x3000 + 7",
    "    .fill 508, 8, 0",
    "colo_pd:",
    "    .set colo_page, 0",
    "    .rept 2048",
    "    .quad (colo_page << 21) | 0x87",
    "    .set colo_page, colo_page + 1",
    "    .endr",
    // The GDT; the TSS descriptors are filled in by each vCPU.
    ".p2align 4",
    "colo_gdt:",
    "    .quad 0",
    "    .quad 0x00af9b000000ffff", // 0x08 kernel code, 64-bit
    "    .quad 0x00cf93000000ffff", // 0x10 kernel data
    "    .quad 0x00cf9b000000ffff", // 0x18 kernel code, 32-bit (the trampoline's)
    "    .quad 0",                  // 0x20 (sysexit's 32-bit user code: unused)
    "    .quad 0x00affb000000ffff", // 0x28 user code, 64-bit, DPL 3
    "    .quad 0x00cff3000000ffff", // 0x30 user data, DPL 3
    "    .fill {max_vcpus} * 2, 8, 0",
    "colo_gdt_end:",
    ".p2align 3",
    "colo_gdtr:",
    "    .word colo_gdt_end - colo_gdt - 1",
    "    .quad colo_gdt",
    ".p2align 4",
    "colo_idt:",
    "    .fill 64, 8, 0",
    "colo_idtr:",
    "    .word 32 * 16 - 1",
    "    .quad colo_idt",
    // One TSS per vCPU: rsp0 = the top of its CPL0 stack, the I/O bitmap at 0x68.
    ".p2align 4",
    "colo_tss:",
    "    .set colo_cpu, 0",
    "    .rept {max_vcpus}",
    "    .long 0",
    "    .quad colo_kstacks + (colo_cpu + 1) * {kstack}",
    "    .fill 11, 8, 0",
    "    .word 0",
    "    .word 0x68",
    "    .fill {iomap_byte}, 1, 0xff",
    "    .byte {iomap_mask}",
    "    .fill {power_byte} - {iomap_byte} - 1, 1, 0xff",
    "    .byte {power_mask}",
    "    .byte 0xff",
    "    .fill {tss_size} - {tss_bytes}, 1, 0",
    "    .set colo_cpu, colo_cpu + 1",
    "    .endr",
    ".p2align 3",
    ".global colo_start_info",
    "colo_start_info:",
    "    .quad 0",
    ".popsection",

    ".pushsection .bss.colo_stacks, \"aw\", @nobits",
    ".p2align 12",
    "colo_kstacks:",
    "    .skip {max_vcpus} * {kstack}",
    ".global colo_stack_bottom",
    "colo_stack_bottom:",
    "    .skip {stack}",
    "colo_stack_top:",
    "colo_worker_stacks:",
    "    .skip {worker_stacks}",
    ".popsection",

    cs32 = const KERNEL_CS32,
    cs64 = const KERNEL_CS,
    cs64_hi = const KERNEL_CS << 16,
    kds = const KERNEL_DS,
    uds = const USER_DS,
    tss0 = const TSS0,
    tss_size = const TSS_SIZE,
    tss_bytes = const TSS_BYTES,
    tss_low = const TSS_DESC_LOW,
    iomap_byte = const IOMAP_BYTE,
    iomap_mask = const IOMAP_MASK,
    power_byte = const POWER_BYTE,
    power_mask = const POWER_MASK,
    kstack = const KSTACK_SIZE,
    cr0 = const CR0,
    cr4 = const CR4,
    efer = const MSR_EFER,
    lme = const EFER_LME,
    sysenter_cs = const MSR_SYSENTER_CS,
    apic_svr = const APIC_SVR,
    apic_icr = const APIC_ICR,
    icr_init = const ICR_INIT,
    icr_sipi = const ICR_SIPI,
    max_vcpus = const MAX_VCPUS,
    bad_boot = const EXIT_BAD_BOOT,
    port_exit = const PORT_EXIT,
    exit_exception = const EXIT_EXCEPTION,
    stack = const STACK_SIZE,
    worker_stack = const WORKER_STACK_SIZE,
    worker_stacks = const (MAX_VCPUS as usize - 1) * WORKER_STACK_SIZE,
    main = sym crate::guest_main,
    worker = sym crate::worker::worker_main,
    options(att_syntax),
);
