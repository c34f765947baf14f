//! The freestanding runtime: the stack sizes (the stacks and the entry are in
//! [`crate::entry`]), the C memory functions the compiler calls, the heap, and the panic
//! handler.

use core::alloc::{GlobalAlloc, Layout};
use core::arch::asm;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::NonNull;

use linked_list_allocator::Heap;

/// Bytes of stack (in .bss, no guard page: see [`check_stack`]).
pub const STACK_SIZE: usize = 512 << 10;
/// Bytes of heap (in .bss): the virtqueues, the network buffers, the sockets' buffers and
/// the key-value map.
pub const HEAP_SIZE: usize = 8 << 20;

/// Exit status: the start info or the command line is missing or wrong.
pub const EXIT_BAD_BOOT: u32 = 2;
/// Exit status: a virtio device is missing or refused to initialize.
pub const EXIT_DEVICE: u32 = 3;
/// Exit status: the heap is exhausted.
pub const EXIT_NO_MEMORY: u32 = 4;
/// Exit status: the disk log could not be read at boot.
pub const EXIT_DISK: u32 = 5;
/// Exit status: the stack overflowed.
pub const EXIT_STACK: u32 = 6;
/// Exit status: a panic.
pub const EXIT_PANIC: u32 = 101;

/// Bytes of stack of each worker vCPU (1 and up; in .bss). Workers write pages and count:
/// they need little.
pub const WORKER_STACK_SIZE: usize = 64 << 10;

unsafe extern "C" {
    /// The lowest byte of vCPU 0's stack (defined in entry.rs).
    static colo_stack_bottom: u8;
    /// One past the last byte of the image, .bss included (defined by link.ld).
    static __image_end: u8;
}

/// Written at the bottom of the stack at boot; gone if the stack overflowed.
const STACK_CANARY: u64 = 0x5354_4143_4b21_4f4b;

fn stack_bottom() -> *mut u64 {
    (&raw const colo_stack_bottom).cast::<u64>().cast_mut()
}

/// Puts the canary at the bottom of the stack. Call once, early.
pub fn init_stack_canary() {
    // SAFETY: the bottom 8 bytes of the stack are ours (.bss, page-aligned) and far below
    // the frames in use this early.
    unsafe { stack_bottom().write_volatile(STACK_CANARY) };
}

/// Stops the VM if the canary at the bottom of the stack was overwritten.
pub fn check_stack() {
    // SAFETY: as in init_stack_canary; reading 8 aligned bytes of our own .bss.
    let v = unsafe { stack_bottom().read_volatile() };
    if v != STACK_CANARY {
        crate::fatal!(
            EXIT_STACK,
            "stack overflow (more than {} KiB)",
            STACK_SIZE >> 10
        );
    }
}

/// One past the end of the image in guest memory.
pub fn image_end() -> u64 {
    (&raw const __image_end) as u64
}

/// `memcpy`, written with `rep movsb` so that the compiler cannot turn it into a call to
/// itself.
///
/// # Safety
/// The C contract: `src` readable and `dest` writable for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges; the direction flag is clear (ABI).
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// `memmove`: copies forwards, or backwards when `dest` overlaps the end of `src`.
///
/// # Safety
/// The C contract: `src` readable and `dest` writable for `n` bytes (they may overlap).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize).wrapping_sub(src as usize) >= n {
        // dest is below src, or past its end: a forward copy never overwrites unread
        // bytes.
        // SAFETY: the caller's contract is memcpy's, and the forward order is safe for
        // this overlap.
        unsafe { memcpy(dest, src, n) };
    } else {
        // SAFETY: the caller guarantees both ranges; copying from the last byte down with
        // the direction flag set never overwrites unread bytes; the flag is cleared again
        // before the block ends, as the ABI wants.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dest.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dest
}

/// `memset`, written with `rep stosb`.
///
/// # Safety
/// The C contract: `dest` writable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; the direction flag is clear (ABI).
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dest => _,
            in("al") c as u8,
            options(nostack, preserves_flags)
        );
    }
    dest
}

/// `memcmp`, written with `repe cmpsb` (slice comparisons compile to calls to it).
///
/// # Safety
/// The C contract: `a` and `b` readable for `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let left: usize;
    // SAFETY: the caller guarantees both ranges; `repe cmpsb` reads at most n bytes of
    // each, forwards (the direction flag is clear).
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n => left,
            inout("rsi") a => _,
            inout("rdi") b => _,
            options(nostack, readonly)
        );
    }
    // The last pair compared is the first difference, or the last (equal) pair.
    let i = n - left - 1;
    // SAFETY: i < n.
    let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
    i32::from(x) - i32::from(y)
}

/// `bcmp`: like [`memcmp`], only zero or non-zero matters.
///
/// # Safety
/// As [`memcmp`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}

/// The prebuilt liballoc refers to it; with `panic = "abort"` nothing unwinds, so it is
/// never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// Backing store of the heap.
struct HeapMemory(UnsafeCell<MaybeUninit<[u8; HEAP_SIZE]>>);

// SAFETY: no interrupts, and only vCPU 0 allocates (the workers of the other vCPUs never
// do); only GuestAlloc::init touches it.
unsafe impl Sync for HeapMemory {}

static HEAP_MEMORY: HeapMemory = HeapMemory(UnsafeCell::new(MaybeUninit::uninit()));

/// The global allocator: a first-fit heap over [`HEAP_MEMORY`]. Running out of memory is
/// fatal ([`EXIT_NO_MEMORY`]); the service checks [`heap_free`] before it grows.
struct GuestAlloc(UnsafeCell<Heap>);

// SAFETY: only vCPU 0 allocates (workers never do: see worker.rs), there are no
// interrupts, and the allocator never calls itself: no two accesses to the heap ever
// overlap.
unsafe impl Sync for GuestAlloc {}

impl GuestAlloc {
    /// Exclusive access to the heap.
    ///
    /// # Safety
    /// No other reference to the heap may be alive (see the `Sync` impl: true as long as
    /// callers drop it before returning).
    #[allow(clippy::mut_from_ref, reason = "exclusive by the safety contract")]
    unsafe fn heap(&self) -> &mut Heap {
        // SAFETY: the caller guarantees exclusivity.
        unsafe { &mut *self.0.get() }
    }
}

#[global_allocator]
static ALLOCATOR: GuestAlloc = GuestAlloc(UnsafeCell::new(Heap::empty()));

// SAFETY: alloc returns blocks from the heap that fit the layout, or does not return;
// dealloc gives back only what alloc handed out (the GlobalAlloc contract).
unsafe impl GlobalAlloc for GuestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: no other heap reference is alive (single-threaded, not reentrant).
        let heap = unsafe { self.heap() };
        match heap.allocate_first_fit(layout) {
            Ok(p) => p.as_ptr(),
            Err(()) => {
                let (used, size) = (heap.used(), heap.size());
                crate::fatal!(
                    EXIT_NO_MEMORY,
                    "out of memory: {} bytes (align {}) wanted, {used} of {size} heap bytes used",
                    layout.size(),
                    layout.align()
                )
            }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: no other heap reference is alive; `ptr` came from `alloc` with `layout`
        // (the caller's contract), so it is non-null and the heap's own.
        unsafe { self.heap().deallocate(NonNull::new_unchecked(ptr), layout) }
    }
}

/// Hands the heap memory to the allocator. Call once, before anything allocates.
pub fn init_heap() {
    // SAFETY: called once at boot before any allocation, so no heap reference is alive;
    // HEAP_MEMORY is a static used for nothing else, HEAP_SIZE bytes long.
    unsafe {
        ALLOCATOR
            .heap()
            .init(HEAP_MEMORY.0.get().cast::<u8>(), HEAP_SIZE)
    }
}

/// Heap bytes still free (possibly fragmented).
pub fn heap_free() -> usize {
    // SAFETY: no other heap reference is alive; this one is dropped before returning.
    unsafe { ALLOCATOR.heap().free() }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::console::flush();
    crate::println!("panic: {info}");
    crate::arch::exit(EXIT_PANIC)
}
