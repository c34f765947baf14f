//! The record layer over `Read`/`Write`: [`SealWriter`], [`OpenReader`] and [`Sealed`].
//!
//! Both halves keep their place across an error such as a read or write timeout
//! (`WouldBlock`, `TimedOut`, `Interrupted`), so a call after it carries on where the last
//! one stopped: a half-sent record is finished, a half-received one is completed. A
//! record error ([`SealError`]) is final.

use std::fmt;
use std::io::{self, BufRead, IoSlice, Read, Write};
use std::ops::Range;

use super::{HEADER_LEN, MAX_RECORD, MAX_WIRE_RECORD, Opened, Opener, SealError, Sealer};

/// The writing half's state, apart from the stream it writes to.
struct WriteState {
    sealer: Sealer,
    /// Room for one record: `buf[..len]` is a header's room and the plaintext gathered so
    /// far, or (once `sealed`) the sealed record being sent.
    buf: Box<[u8]>,
    len: usize,
    sealed: bool,
    /// Bytes of the sealed record already sent.
    sent: usize,
    closed: bool,
}

/// Counts only: the buffer holds plaintext.
impl fmt::Debug for WriteState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WriteState")
            .field("sealer", &self.sealer)
            .field("buffered", &self.buffered())
            .field("sealed", &self.sealed)
            .field("sent", &self.sent)
            .field("closed", &self.closed)
            .finish()
    }
}

impl WriteState {
    fn new(sealer: Sealer) -> Self {
        Self {
            sealer,
            buf: vec![0; MAX_WIRE_RECORD].into_boxed_slice(),
            len: HEADER_LEN,
            sealed: false,
            sent: 0,
            closed: false,
        }
    }

    fn buffered(&self) -> usize {
        if self.sealed {
            0
        } else {
            self.len - HEADER_LEN
        }
    }

    /// Sends the rest of the sealed record, if one is waiting.
    fn drain(&mut self, w: &mut impl Write) -> io::Result<()> {
        if !self.sealed {
            return Ok(());
        }
        while self.sent < self.len {
            match w.write(&self.buf[self.sent..self.len]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.len = HEADER_LEN;
        self.sealed = false;
        self.sent = 0;
        Ok(())
    }

    /// Seals what is gathered (if anything) and sends it.
    fn send(&mut self, w: &mut impl Write) -> io::Result<()> {
        self.drain(w)?;
        let length = self.buffered();
        if length > 0 {
            self.len = self.sealer.seal_into(None, length, &mut self.buf)?;
            self.sealed = true;
            self.drain(w)?;
        }
        Ok(())
    }

    /// Makes room for more plaintext: sends a full (or sealed) record first.
    fn room(&mut self, w: &mut impl Write) -> io::Result<usize> {
        if self.closed {
            return Err(SealError::Closed.into());
        }
        if self.sealed || self.buffered() == MAX_RECORD {
            self.send(w)?;
        }
        Ok(MAX_RECORD - self.buffered())
    }

    /// Appends `data` (which fits) to the plaintext gathered.
    fn gather(&mut self, data: &[u8]) {
        self.buf[self.len..self.len + data.len()].copy_from_slice(data);
        self.len += data.len();
    }

    fn write(&mut self, w: &mut impl Write, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let room = self.room(w)?;
        if room == MAX_RECORD && data.len() >= MAX_RECORD {
            // A whole record from the caller's bytes: encrypted straight into the buffer,
            // sent on the next write or flush like any full record.
            self.len =
                self.sealer
                    .seal_into(Some(&data[..MAX_RECORD]), MAX_RECORD, &mut self.buf)?;
            self.sealed = true;
            return Ok(MAX_RECORD);
        }
        let n = room.min(data.len());
        self.gather(&data[..n]);
        Ok(n)
    }

    fn write_vectored(&mut self, w: &mut impl Write, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let mut room = self.room(w)?;
        let mut n = 0;
        for b in bufs {
            let take = room.min(b.len());
            self.gather(&b[..take]);
            room -= take;
            n += take;
            if room == 0 {
                break;
            }
        }
        Ok(n)
    }

    fn write_gather(&mut self, w: &mut impl Write, parts: &[&[u8]]) -> io::Result<()> {
        for p in parts {
            let mut p = *p;
            while !p.is_empty() {
                let n = self.write(w, p)?;
                p = &p[n..];
            }
        }
        self.flush(w)
    }

    /// `len` bytes that `fill` writes straight into the record buffer, chunk after chunk
    /// in order, then flushed.
    fn write_filled(
        &mut self,
        w: &mut impl Write,
        mut len: usize,
        fill: &mut dyn FnMut(&mut [u8]),
    ) -> io::Result<()> {
        while len > 0 {
            let n = self.room(w)?.min(len);
            fill(&mut self.buf[self.len..self.len + n]);
            self.len += n;
            len -= n;
        }
        self.flush(w)
    }

    fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        self.send(w)?;
        w.flush()
    }

    fn close(&mut self, w: &mut impl Write) -> io::Result<()> {
        if !self.closed {
            self.send(w)?;
            self.len = self.sealer.seal_into(None, 0, &mut self.buf)?;
            self.sealed = true;
            self.closed = true;
        }
        self.drain(w)?;
        w.flush()
    }
}

/// The reading half's state, apart from the stream it reads from.
struct ReadState {
    opener: Opener,
    /// Bytes read and not yet opened lie at `start..filled`; the current record's plaintext
    /// (authenticated) at `plain`.
    buf: Vec<u8>,
    start: usize,
    filled: usize,
    plain: Range<usize>,
    ended: bool,
    failed: Option<SealError>,
}

/// Counts only: the buffer holds plaintext.
impl fmt::Debug for ReadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadState")
            .field("opener", &self.opener)
            .field("unread", &self.plain.len())
            .field("read_ahead", &(self.filled - self.start))
            .field("ended", &self.ended)
            .field("failed", &self.failed)
            .finish()
    }
}

impl ReadState {
    fn new(opener: Opener) -> Self {
        Self {
            opener,
            buf: vec![0; 2 * MAX_WIRE_RECORD],
            start: 0,
            filled: 0,
            plain: 0..0,
            ended: false,
            failed: None,
        }
    }

    /// The current record's authenticated plaintext, reading and opening the next record
    /// when it is used up; empty at the end of the stream.
    fn fill_buf(&mut self, r: &mut impl Read) -> io::Result<&[u8]> {
        while self.plain.is_empty() && !self.ended {
            if let Some(e) = self.failed {
                return Err(e.into());
            }
            let opened = self.opener.open(&mut self.buf[self.start..self.filled]);
            match opened {
                Ok(Opened::Data { plain, consumed }) => {
                    self.plain = self.start + plain.start..self.start + plain.end;
                    self.start += consumed;
                }
                Ok(Opened::End { consumed }) => {
                    self.start += consumed;
                    self.ended = true;
                }
                Ok(Opened::Incomplete { need }) => self.read_more(r, need)?,
                Err(e) => {
                    self.failed = Some(e);
                }
            }
        }
        Ok(&self.buf[self.plain.clone()])
    }

    /// Reads more of a record that needs `need` bytes from `start`.
    fn read_more(&mut self, r: &mut impl Read, need: usize) -> io::Result<()> {
        if self.start == self.filled {
            (self.start, self.filled) = (0, 0);
        } else if self.start + need > self.buf.len() {
            self.buf.copy_within(self.start..self.filled, 0);
            (self.start, self.filled) = (0, self.filled - self.start);
        }
        match r.read(&mut self.buf[self.filled..]) {
            Ok(0) => {
                self.failed = Some(SealError::Truncated {
                    record: self.opener.next_record(),
                    mid_record: self.filled > self.start,
                });
                Ok(())
            }
            Ok(n) => {
                self.filled += n;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn consume(&mut self, n: usize) {
        self.plain.start = (self.plain.start + n).min(self.plain.end);
    }

    fn read(&mut self, r: &mut impl Read, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let plain = self.fill_buf(r)?;
        let n = plain.len().min(out.len());
        out[..n].copy_from_slice(&plain[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// Writes a byte stream as sealed records.
///
/// Bytes are gathered into a record and sent when it is full ([`MAX_RECORD`]), on
/// [`flush`](Write::flush), [`write_gather`](SealWriter::write_gather) or
/// [`close`](SealWriter::close). Unflushed bytes are dropped with the writer: flush after
/// each message, as with a `BufWriter`. A write or flush that fails with an I/O error
/// (say a timeout) can be called again and finishes the record it was sending.
#[derive(Debug)]
pub struct SealWriter<W: Write> {
    inner: W,
    state: WriteState,
}

impl<W: Write> SealWriter<W> {
    /// Seals what is written to `inner` with `sealer`.
    pub fn new(inner: W, sealer: Sealer) -> Self {
        Self {
            inner,
            state: WriteState::new(sealer),
        }
    }

    /// Writes the concatenation of `parts` and flushes: one record when it fits in
    /// [`MAX_RECORD`] (with whatever was written before and not yet flushed), full records
    /// and a last one otherwise.
    ///
    /// # Errors
    /// The stream's error, or [`SealError::Exhausted`] or [`SealError::Closed`] (inside an
    /// [`io::Error`]).
    pub fn write_gather(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        self.state.write_gather(&mut self.inner, parts)
    }

    /// Sends what is gathered, then the end record, so that the reader sees a clean end of
    /// stream; later writes fail with [`SealError::Closed`].
    ///
    /// # Errors
    /// The stream's error (call again to finish), [`SealError::Exhausted`].
    pub fn close(&mut self) -> io::Result<()> {
        self.state.close(&mut self.inner)
    }

    /// The stream.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The stream (writing to it directly breaks the record stream).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for SealWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.state.write(&mut self.inner, data)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.state.write_vectored(&mut self.inner, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.state.flush(&mut self.inner)
    }
}

/// Reads a byte stream of sealed records, handing out only authenticated bytes.
///
/// `read` returns `Ok(0)` only after the writer's end record; a record that fails returns
/// an [`io::Error`] holding a [`SealError`] now and on every later call.
#[derive(Debug)]
pub struct OpenReader<R: Read> {
    inner: R,
    state: ReadState,
}

impl<R: Read> OpenReader<R> {
    /// Opens what is read from `inner` with `opener`.
    pub fn new(inner: R, opener: Opener) -> Self {
        Self {
            inner,
            state: ReadState::new(opener),
        }
    }

    /// The stream.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The stream (reading from it directly breaks the record stream).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

impl<R: Read> Read for OpenReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.state.read(&mut self.inner, out)
    }
}

impl<R: Read> BufRead for OpenReader<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.state.fill_buf(&mut self.inner)
    }

    fn consume(&mut self, n: usize) {
        self.state.consume(n);
    }
}

/// Both directions of one connection over one stream, for a single-threaded user.
#[derive(Debug)]
pub struct Sealed<S: Read + Write> {
    inner: S,
    reading: ReadState,
    writing: WriteState,
}

impl<S: Read + Write> Sealed<S> {
    /// Seals and opens over `inner` with this side's keys.
    pub fn new(inner: S, keys: super::SessionKeys) -> Self {
        let (sealer, opener) = keys.split();
        Self {
            inner,
            reading: ReadState::new(opener),
            writing: WriteState::new(sealer),
        }
    }

    /// See [`SealWriter::write_gather`].
    ///
    /// # Errors
    /// As there.
    pub fn write_gather(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        self.writing.write_gather(&mut self.inner, parts)
    }

    /// Writes `len` bytes that `fill` puts straight into the record buffer (called with
    /// consecutive chunks of it, in order, at most [`MAX_RECORD`] bytes each), then flushes:
    /// for a caller whose bytes are not in a slice of its own (guest memory that others
    /// write meanwhile), with no copy in between.
    ///
    /// # Errors
    /// As [`write_gather`](Self::write_gather).
    pub fn write_filled(&mut self, len: usize, mut fill: impl FnMut(&mut [u8])) -> io::Result<()> {
        self.writing.write_filled(&mut self.inner, len, &mut fill)
    }

    /// See [`SealWriter::close`]; reading goes on.
    ///
    /// # Errors
    /// As there.
    pub fn close(&mut self) -> io::Result<()> {
        self.writing.close(&mut self.inner)
    }

    /// Splits into a reader over this stream (with any bytes it has read ahead) and a
    /// writer over `writer`, a clone of it (`try_clone`), for a reader thread and writer
    /// threads. What was written and not flushed is sent first.
    ///
    /// # Errors
    /// Sending what was not flushed failed (the connection cannot be trusted to go on).
    pub fn into_split<W: Write>(mut self, writer: W) -> io::Result<(OpenReader<S>, SealWriter<W>)> {
        self.writing.send(&mut self.inner)?;
        self.inner.flush()?;
        Ok((
            OpenReader {
                inner: self.inner,
                state: self.reading,
            },
            SealWriter {
                inner: writer,
                state: self.writing,
            },
        ))
    }

    /// The stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The stream (reading or writing it directly breaks the record stream).
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: Read + Write> Read for Sealed<S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.reading.read(&mut self.inner, out)
    }
}

impl<S: Read + Write> BufRead for Sealed<S> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.reading.fill_buf(&mut self.inner)
    }

    fn consume(&mut self, n: usize) {
        self.reading.consume(n);
    }
}

impl<S: Read + Write> Write for Sealed<S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.writing.write(&mut self.inner, data)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.writing.write_vectored(&mut self.inner, bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writing.flush(&mut self.inner)
    }
}
