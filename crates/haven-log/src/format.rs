//! Byte layout of segment records and metadata files (see the crate docs for the spec).

use std::path::Path;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::LogError;

/// First 8 bytes of every segment file: format name + version.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"HVNLOG01";

/// Length of the segment header ([`SEGMENT_MAGIC`]).
pub(crate) const SEGMENT_HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;

/// First 8 bytes of every metadata file: format name + version.
pub(crate) const META_MAGIC: &[u8; 8] = b"HVNMETA1";

/// `len: u32 | crc: u32 | kind: u8` in front of every record's payload.
pub(crate) const RECORD_HEADER_LEN: usize = 9;

/// `magic: [u8; 8] | len: u32 | crc: u32` in front of a metadata payload.
const META_HEADER_LEN: usize = 16;

/// Record kind of a Raft log entry. Other values are reserved for later versions.
pub(crate) const KIND_ENTRY: u8 = 1;

/// File name of the segment whose first entry has index `first_index`.
///
/// Zero-padded so that lexical order equals numeric order in directory listings.
pub(crate) fn segment_file_name(first_index: u64) -> String {
    format!("{first_index:020}.seg")
}

/// Parses a segment file name back into its first index; `None` for foreign files.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Full path of a segment file.
pub(crate) fn segment_path(seg_dir: &Path, first_index: u64) -> PathBuf {
    seg_dir.join(segment_file_name(first_index))
}

/// CRC of a record: covers the kind byte and the payload, so a flipped kind is caught too.
fn record_crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// Serializes `entry` and appends one framed record to `out`; returns the record length.
pub(crate) fn encode_entry_record<T: Serialize>(
    entry: &T,
    out: &mut Vec<u8>,
) -> Result<u32, LogError> {
    let payload = postcard::to_stdvec(entry).map_err(|e| LogError::Encode {
        what: "log entry",
        reason: e.to_string(),
    })?;
    // The whole record (header included) must fit the index's u32 length field.
    let too_big = || LogError::Encode {
        what: "log entry",
        reason: format!(
            "entry of {} bytes exceeds the 4 GiB record limit",
            payload.len()
        ),
    };
    let len = u32::try_from(payload.len()).map_err(|_| too_big())?;
    let record_len = len
        .checked_add(RECORD_HEADER_LEN as u32)
        .ok_or_else(too_big)?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&record_crc(KIND_ENTRY, &payload).to_le_bytes());
    out.push(KIND_ENTRY);
    out.extend_from_slice(&payload);
    Ok(record_len)
}

/// The fixed part of a record, as read from disk (not yet validated).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordHeader {
    /// Payload length (excludes the 9-byte header).
    pub(crate) len: u32,
    pub(crate) crc: u32,
    pub(crate) kind: u8,
}

impl RecordHeader {
    /// Reads a header from the first [`RECORD_HEADER_LEN`] bytes of `buf`.
    pub(crate) fn parse(buf: &[u8]) -> Option<Self> {
        let h = buf.get(..RECORD_HEADER_LEN)?;
        Some(RecordHeader {
            len: u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
            crc: u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
            kind: h[8],
        })
    }

    /// Total on-disk size of the record this header starts.
    pub(crate) fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.len)
    }

    /// True if `payload` matches the stored checksum.
    pub(crate) fn crc_ok(&self, payload: &[u8]) -> bool {
        record_crc(self.kind, payload) == self.crc
    }

    /// True for an all-zero header: what a preallocated or never-written region looks like.
    pub(crate) fn is_zero(&self) -> bool {
        self.len == 0 && self.crc == 0 && self.kind == 0
    }
}

/// Validates and decodes one complete, in-memory record (header + payload).
///
/// `file` and `offset` only label errors.
pub(crate) fn decode_entry_record<T: DeserializeOwned>(
    record: &[u8],
    file: &Path,
    offset: u64,
) -> Result<T, LogError> {
    let header = RecordHeader::parse(record)
        .ok_or_else(|| LogError::corrupt(file, offset, "short record header"))?;
    let payload = record
        .get(RECORD_HEADER_LEN..)
        .filter(|p| p.len() as u64 == u64::from(header.len))
        .ok_or_else(|| {
            LogError::corrupt(file, offset, "record length does not match its header")
        })?;
    if !header.crc_ok(payload) {
        return Err(LogError::corrupt(file, offset, "checksum mismatch"));
    }
    decode_payload(&header, payload, file, offset)
}

/// Decodes a payload whose checksum has already been verified.
pub(crate) fn decode_payload<T: DeserializeOwned>(
    header: &RecordHeader,
    payload: &[u8],
    file: &Path,
    offset: u64,
) -> Result<T, LogError> {
    if header.kind != KIND_ENTRY {
        return Err(LogError::corrupt(
            file,
            offset,
            format!("unknown record kind {}", header.kind),
        ));
    }
    postcard::from_bytes(payload).map_err(|e| {
        LogError::corrupt(
            file,
            offset,
            format!("checksum ok but entry does not decode: {e}"),
        )
    })
}

/// Frames a metadata value: `magic | len | crc | postcard(value)`.
pub(crate) fn encode_meta<T: Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, LogError> {
    let payload = postcard::to_stdvec(value).map_err(|e| LogError::Encode {
        what,
        reason: e.to_string(),
    })?;
    let len = u32::try_from(payload.len()).map_err(|_| LogError::Encode {
        what,
        reason: "metadata too large".to_string(),
    })?;
    let mut out = Vec::with_capacity(META_HEADER_LEN + payload.len());
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Validates and decodes a metadata file's bytes; errors name `file` and the failing offset.
pub(crate) fn decode_meta<T: DeserializeOwned>(bytes: &[u8], file: &Path) -> Result<T, LogError> {
    let header = bytes.get(..META_HEADER_LEN).ok_or_else(|| {
        LogError::corrupt(
            file,
            0,
            format!("metadata file is only {} bytes", bytes.len()),
        )
    })?;
    if &header[..8] != META_MAGIC {
        return Err(LogError::corrupt(
            file,
            0,
            "bad metadata magic (expected HVNMETA1)",
        ));
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    let crc = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    let payload = &bytes[META_HEADER_LEN..];
    if payload.len() != len {
        let reason = format!(
            "metadata length {len} does not match the {} payload bytes",
            payload.len()
        );
        return Err(LogError::corrupt(file, 8, reason));
    }
    if crc32fast::hash(payload) != crc {
        return Err(LogError::corrupt(
            file,
            META_HEADER_LEN as u64,
            "metadata checksum mismatch",
        ));
    }
    postcard::from_bytes(payload)
        .map_err(|e| LogError::corrupt(file, META_HEADER_LEN as u64, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(segment_file_name(1), "00000000000000000001.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.seg"), None);
    }

    #[test]
    fn record_round_trip_and_crc() {
        let mut buf = Vec::new();
        let len = encode_entry_record(&"hello".to_string(), &mut buf).unwrap();
        assert_eq!(len as usize, buf.len());
        let got: String = decode_entry_record(&buf, Path::new("f"), 0).unwrap();
        assert_eq!(got, "hello");
        buf[RECORD_HEADER_LEN + 1] ^= 0x40;
        let err = decode_entry_record::<String>(&buf, Path::new("f"), 7).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt log record in f at offset 7: checksum mismatch"
        );
    }

    #[test]
    fn meta_round_trip_and_corruption() {
        let mut bytes = encode_meta("x", &Some(5u64)).unwrap();
        assert_eq!(
            decode_meta::<Option<u64>>(&bytes, Path::new("m")).unwrap(),
            Some(5)
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            decode_meta::<Option<u64>>(&bytes, Path::new("m")),
            Err(LogError::Corrupt { .. })
        ));
    }
}
