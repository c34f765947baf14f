//! Rewriting TCP sequence space, the way QEMU's filter-rewriter does, plus the timestamp
//! option: the header is decoded by etherparse, its numbers changed, the checksum computed
//! anew over the pseudo header, header and payload, and the header written back in place.
//! Its length never changes.

use etherparse::{NetSlice, SlicedPacket, TcpOptionElement, TcpOptions, TransportSlice};

use super::offset_in;

/// Why a frame could not be rewritten. The frame is left untouched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RewriteError {
    /// The frame is not an unfragmented TCP segment.
    #[error("not an unfragmented TCP segment")]
    NotTcp,
    /// The segment is too long for its checksum's length field.
    #[error("TCP segment too long to checksum")]
    TooLong,
}

/// What to add (modulo 2^32) to each number of a TCP segment. Subtracting is adding the
/// two's complement (`x.wrapping_neg()`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deltas {
    /// Added to the sequence number.
    pub seq: u32,
    /// Added to the acknowledgment number and every SACK block edge (when ACK is set).
    pub ack: u32,
    /// Added to the timestamp option's TSval.
    pub tsval: u32,
    /// Added to the timestamp option's TSecr.
    pub tsecr: u32,
}

/// What a rewrite did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// SACK blocks or timestamps needed translating but the options could not be re-encoded
    /// in the same layout, so they were left as they were.
    pub options_untranslated: bool,
}

/// Applies `d` to the TCP segment in `frame` and sets a correct checksum.
///
/// # Errors
/// [`RewriteError`] when the frame is not an unfragmented TCP segment or is too long to
/// checksum; the frame is then unchanged.
pub fn rewrite_tcp(frame: &mut [u8], d: Deltas) -> Result<Rewritten, RewriteError> {
    let (offset, header, options_untranslated) = {
        let view: &[u8] = frame;
        let sliced = SlicedPacket::from_ethernet(view).map_err(|_| RewriteError::NotTcp)?;
        if sliced.is_ip_payload_fragmented() {
            return Err(RewriteError::NotTcp);
        }
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            return Err(RewriteError::NotTcp);
        };
        let mut h = tcp.to_header();
        h.sequence_number = h.sequence_number.wrapping_add(d.seq);
        let sack = if h.ack { d.ack } else { 0 };
        if h.ack {
            h.acknowledgment_number = h.acknowledgment_number.wrapping_add(d.ack);
        }
        let options_untranslated = !translate_options(&mut h, sack, d.tsval, d.tsecr);
        h.checksum = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => {
                let ih = ip.header();
                h.calc_checksum_ipv4_raw(ih.source(), ih.destination(), tcp.payload())
            }
            Some(NetSlice::Ipv6(ip)) => {
                let ih = ip.header();
                h.calc_checksum_ipv6_raw(ih.source(), ih.destination(), tcp.payload())
            }
            _ => return Err(RewriteError::NotTcp),
        }
        .map_err(|_| RewriteError::TooLong)?;
        (
            offset_in(view, tcp.slice()),
            h.to_bytes(),
            options_untranslated,
        )
    };
    let dst = frame
        .get_mut(offset..offset + header.len())
        .ok_or(RewriteError::NotTcp)?;
    dst.copy_from_slice(&header);
    Ok(Rewritten {
        options_untranslated,
    })
}

/// Adds `sack` to the SACK block edges and `tsval`/`tsecr` to the timestamps. Returns
/// false when something needed translating but the options cannot be read or re-encoded
/// to the same length (they are then left as they were); true otherwise.
fn translate_options(h: &mut etherparse::TcpHeader, sack: u32, tsval: u32, tsecr: u32) -> bool {
    if (sack, tsval, tsecr) == (0, 0, 0) || h.options.is_empty() {
        return true;
    }
    let Ok(mut elements) = h
        .options_iterator()
        .collect::<Result<Vec<TcpOptionElement>, _>>()
    else {
        return false;
    };
    let mut changed = false;
    for e in &mut elements {
        match e {
            TcpOptionElement::SelectiveAcknowledgement(first, rest) if sack != 0 => {
                changed = true;
                *first = (first.0.wrapping_add(sack), first.1.wrapping_add(sack));
                for block in rest.iter_mut().flatten() {
                    *block = (block.0.wrapping_add(sack), block.1.wrapping_add(sack));
                }
            }
            TcpOptionElement::Timestamp(val, ecr) if tsval != 0 || tsecr != 0 => {
                changed = true;
                *val = val.wrapping_add(tsval);
                // An echo of zero means "nothing to echo" (RFC 7323): leave it.
                if *ecr != 0 {
                    *ecr = ecr.wrapping_add(tsecr);
                }
            }
            _ => {}
        }
    }
    if !changed {
        return true;
    }
    match TcpOptions::try_from_elements(&elements) {
        Ok(o) if o.len() == h.options.len() => {
            h.options = o;
            true
        }
        _ => false,
    }
}
