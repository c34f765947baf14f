//! The guest console: bytes the guest hands over through the console port or transmits on
//! the serial port (`devices::serial`), cut into lines and passed to a sink.

use crossbeam_channel::Sender;

/// Where console lines go.
#[derive(Debug, Clone)]
pub enum ConsoleSink {
    /// Printed on stdout, prefixed with the VM's name.
    Stdout(String),
    /// Logged with tracing at info level.
    Log(String),
    /// Sent to a channel (tests, the controller).
    Channel(Sender<String>),
    /// Dropped.
    Discard,
}

/// Longest line kept; longer output is cut into several lines.
const MAX_LINE: usize = 4096;

/// The console device.
#[derive(Debug)]
pub(crate) struct Console {
    sink: ConsoleSink,
    line: Vec<u8>,
}

impl Console {
    /// A console writing to `sink`.
    pub(crate) fn new(sink: ConsoleSink) -> Self {
        Self {
            sink,
            line: Vec::new(),
        }
    }

    /// Takes guest bytes.
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.line.len() >= MAX_LINE {
                self.emit();
                if b == b'\n' {
                    continue;
                }
            }
            if b != b'\r' {
                self.line.push(b);
            }
        }
    }

    fn emit(&mut self) {
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        match &self.sink {
            ConsoleSink::Stdout(name) => println!("[{name}] {text}"),
            ConsoleSink::Log(name) => tracing::info!(target: "guest", vm = %name, "{text}"),
            ConsoleSink::Channel(tx) => {
                let _ = tx.send(text);
            }
            ConsoleSink::Discard => {}
        }
    }
}

impl Drop for Console {
    /// A last line without its newline (a guest that died mid-line) is not lost.
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
    }
}

/// What the serial port transmits.
impl std::io::Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.put(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
