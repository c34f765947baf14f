//! Rewriting TCP sequence space, the way QEMU's filter-rewriter does: the header is decoded
//! by etherparse, its numbers changed, the checksum computed anew over the pseudo header,
//! header and payload, and the header written back in place. Its length never changes.

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

/// What a rewrite did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    /// SACK blocks were present but their option layout could not be reproduced, so they
    /// were left as they were.
    pub sack_untranslated: bool,
}

/// Adds `seq_delta` to the segment's sequence number and, when it has the ACK flag,
/// `ack_delta` to its acknowledgment number and to every SACK block edge; then sets a
/// correct checksum. Deltas wrap, so subtracting is adding the two's complement.
///
/// # Errors
/// [`RewriteError`] when the frame is not an unfragmented TCP segment or is too long to
/// checksum; the frame is then unchanged.
pub fn rewrite_tcp(
    frame: &mut [u8],
    seq_delta: u32,
    ack_delta: u32,
) -> Result<Rewritten, RewriteError> {
    let (offset, header, sack_untranslated) = {
        let view: &[u8] = frame;
        let sliced = SlicedPacket::from_ethernet(view).map_err(|_| RewriteError::NotTcp)?;
        if sliced.is_ip_payload_fragmented() {
            return Err(RewriteError::NotTcp);
        }
        let Some(TransportSlice::Tcp(tcp)) = &sliced.transport else {
            return Err(RewriteError::NotTcp);
        };
        let mut h = tcp.to_header();
        h.sequence_number = h.sequence_number.wrapping_add(seq_delta);
        let mut sack_untranslated = false;
        if h.ack && ack_delta != 0 {
            h.acknowledgment_number = h.acknowledgment_number.wrapping_add(ack_delta);
            sack_untranslated = !translate_sack(&mut h, ack_delta);
        }
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
            sack_untranslated,
        )
    };
    let dst = frame
        .get_mut(offset..offset + header.len())
        .ok_or(RewriteError::NotTcp)?;
    dst.copy_from_slice(&header);
    Ok(Rewritten { sack_untranslated })
}

/// Adds `delta` to the edges of the SACK option. Returns false when there is a SACK
/// option but the options cannot be re-encoded to the same length (they are then left as
/// they were); true otherwise.
fn translate_sack(h: &mut etherparse::TcpHeader, delta: u32) -> bool {
    let Ok(mut elements) = h
        .options_iterator()
        .collect::<Result<Vec<TcpOptionElement>, _>>()
    else {
        // Options etherparse cannot read: whatever SACK blocks they hold stay as they are.
        return false;
    };
    let mut any = false;
    for e in &mut elements {
        if let TcpOptionElement::SelectiveAcknowledgement(first, rest) = e {
            any = true;
            *first = (first.0.wrapping_add(delta), first.1.wrapping_add(delta));
            for block in rest.iter_mut().flatten() {
                *block = (block.0.wrapping_add(delta), block.1.wrapping_add(delta));
            }
        }
    }
    if !any {
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
