//! Reads the built-in guest's disk log (its record format is shared with the guest in
//! `colo-guest-abi`), to check after a run that every acknowledged write is on the disk.

use std::collections::BTreeMap;

use colo_guest_abi::record;

/// Replays the log in `disk` as the guest does at boot: records from byte 0 until the end
/// marker or the first record that is not whole and valid. Later SETs of a key win.
pub fn replay(disk: &[u8]) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let mut at = 0;
    while let Some(h) = disk.get(at..at + record::HEADER) {
        let h: &[u8; record::HEADER] = h.try_into().expect("HEADER bytes");
        let record::Header::Set { key_len, value_len } = record::Header::parse(h) else {
            break;
        };
        let len = record::record_len(key_len, value_len);
        let Some(rec) = disk.get(at..at + len) else {
            break;
        };
        let Some((k, v)) = record::decode(rec, key_len, value_len) else {
            break;
        };
        map.insert(
            String::from_utf8_lossy(k).into_owned(),
            String::from_utf8_lossy(v).into_owned(),
        );
        at += len;
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_reads_records_until_the_end_or_a_torn_one() {
        let mut log = Vec::new();
        record::encode(b"a", b"1", &mut log);
        record::encode(b"b", b"2", &mut log);
        record::encode(b"a", b"3", &mut log);
        let whole = log.len();
        record::encode(b"c", b"4", &mut log);
        log[whole + 9] ^= 1; // tear the last record
        log.extend_from_slice(&[0; 64]);
        let m = replay(&log);
        assert_eq!(m.len(), 2);
        assert_eq!(m["a"], "3");
        assert_eq!(m["b"], "2");
        assert!(replay(&[0; 16]).is_empty());
        assert!(replay(&[0xc5, 1]).is_empty());
    }
}
