//! The console: text collected in the VMM's console buffer at [`CONSOLE_GPA`] and handed
//! over with one `out` to [`PORT_CONSOLE`] per line (or per full buffer).
//!
//! Use the crate's `print!` and `println!` macros. The buffer position is an atomic so that
//! a panic while printing (the panic handler prints too) cannot alias a `&mut`.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use colo_guest_abi::boot::{CONSOLE_GPA, CONSOLE_LEN, PORT_CONSOLE};

use crate::arch::out32;

/// Bytes written into the console buffer and not yet handed to the VMM.
static POS: AtomicUsize = AtomicUsize::new(0);

/// Appends one byte; flushes at a newline or when the buffer is full.
fn put(byte: u8) {
    let pos = POS.load(Ordering::Relaxed);
    let buf = core::ptr::with_exposed_provenance_mut::<u8>(CONSOLE_GPA as usize);
    // SAFETY: [CONSOLE_GPA, CONSOLE_GPA + CONSOLE_LEN) is the console buffer in identity-
    // mapped RAM (colo_guest_abi::boot), reserved for it; `pos < CONSOLE_LEN` because a
    // full buffer is flushed (and `pos` reset) right after the byte that fills it.
    unsafe { buf.add(pos).write_volatile(byte) };
    let pos = pos + 1;
    POS.store(pos, Ordering::Relaxed);
    if byte == b'\n' || pos as u64 >= CONSOLE_LEN {
        flush();
    }
}

/// Hands whatever is in the buffer to the VMM.
pub fn flush() {
    let n = POS.swap(0, Ordering::Relaxed);
    if n > 0 {
        out32(PORT_CONSOLE, n as u32);
    }
}

/// The console as a [`fmt::Write`] sink.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(put);
        Ok(())
    }
}

/// Prints formatted text (the macros' back end).
pub fn print(args: fmt::Arguments<'_>) {
    // Console::write_str cannot fail.
    let _ = Console.write_fmt(args);
}

/// Prints to the VMM's console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

/// Prints a line to the VMM's console (one `out` per line).
#[macro_export]
macro_rules! println {
    () => { $crate::console::print(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints `fatal: <message>` and stops the VM with a non-zero exit status.
#[macro_export]
macro_rules! fatal {
    ($status:expr, $($arg:tt)*) => {{
        $crate::println!("fatal: {}", format_args!($($arg)*));
        $crate::arch::exit($status)
    }};
}
