//! Byte layout of segment records and metadata files (see the crate docs for the spec).

use std::path::Path;
use std::path::PathBuf;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::LogError;

/// First 8 bytes of every segment file this version writes: format name + version.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"HVNLOG02";

/// First 8 bytes of a segment written before records were `haven_frame` frames. Such
/// segments are read, and never appended to: the next append starts a new segment.
pub(crate) const SEGMENT_MAGIC_V1: &[u8; 8] = b"HVNLOG01";

/// Length of the segment header ([`SEGMENT_MAGIC`]).
pub(crate) const SEGMENT_HEADER_LEN: u64 = SEGMENT_MAGIC.len() as u64;

/// How a segment's records count their length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentFormat {
    /// `HVNLOG02`: a record is a `haven_frame` frame whose body is the kind byte and the
    /// payload, so its length field counts the kind byte.
    Framed,
    /// `HVNLOG01`: the same bytes, but the length field counts the payload only.
    V1,
}

impl SegmentFormat {
    /// The format a segment's first bytes name, if any.
    pub(crate) fn of_header(header: &[u8]) -> Option<Self> {
        match header.get(..SEGMENT_MAGIC.len())? {
            h if h == SEGMENT_MAGIC => Some(SegmentFormat::Framed),
            h if h == SEGMENT_MAGIC_V1 => Some(SegmentFormat::V1),
            _ => None,
        }
    }

    /// Bytes the length field counts besides the payload.
    fn counted_besides_payload(self) -> u32 {
        match self {
            SegmentFormat::Framed => 1,
            SegmentFormat::V1 => 0,
        }
    }
}

/// First 8 bytes of every metadata file: format name + version.
pub(crate) const META_MAGIC: &[u8; 8] = b"HVNMETA1";

/// `len: u32 | crc: u32 | kind: u8` in front of every record's payload: the `haven_frame`
/// header, then the first byte of the frame's body.
pub(crate) const RECORD_HEADER_LEN: usize = haven_frame::HEADER_LEN + 1;

/// Where a metadata file's payload starts: after the magic and the frame header.
const META_PAYLOAD_OFFSET: u64 = (haven_frame::MAGIC_LEN + haven_frame::HEADER_LEN) as u64;

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

/// CRC of a record: the frame's checksum of its body, the kind byte and the payload, so a
/// flipped kind is caught too.
fn record_crc(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

/// Serializes `entry` straight into `out` as one record, a `haven_frame` frame of the kind
/// byte and the payload; returns the record length. On error `out` is as it was.
pub(crate) fn encode_entry_record<T: Serialize>(
    entry: &T,
    out: &mut Vec<u8>,
) -> Result<u32, LogError> {
    let encode_error = |reason: String| LogError::Encode {
        what: "log entry",
        reason,
    };
    let at = out.len();
    let open = haven_frame::begin(out);
    out.push(KIND_ENTRY);
    if let Err(e) = postcard::to_io(entry, &mut *out) {
        out.truncate(at);
        return Err(encode_error(e.to_string()));
    }
    let record_len = haven_frame::finish(out, open).map_err(|e| encode_error(e.to_string()))?;
    // The whole record (header included) must fit the index's u32 length field.
    u32::try_from(record_len).map_err(|_| {
        out.truncate(at);
        encode_error(format!(
            "entry of {} bytes exceeds the 4 GiB record limit",
            record_len - RECORD_HEADER_LEN
        ))
    })
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
    /// Reads a header from the first [`RECORD_HEADER_LEN`] bytes of `buf`, a record of a
    /// segment in `format`. An all-zero header parses (see [`Self::is_zero`]); a framed
    /// record whose length field cannot hold its kind byte has no header.
    pub(crate) fn parse(buf: &[u8], format: SegmentFormat) -> Option<Self> {
        let h = buf.get(..RECORD_HEADER_LEN)?;
        let field = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
        let kind = h[8];
        let len = match field.checked_sub(format.counted_besides_payload()) {
            Some(len) => len,
            None if crc == 0 && kind == 0 => 0,
            None => return None,
        };
        Some(RecordHeader { len, crc, kind })
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

/// Validates and decodes one complete, in-memory record (header + payload) of a segment
/// in `format`.
///
/// `file` and `offset` only label errors.
pub(crate) fn decode_entry_record<T: DeserializeOwned>(
    record: &[u8],
    format: SegmentFormat,
    file: &Path,
    offset: u64,
) -> Result<T, LogError> {
    let header = RecordHeader::parse(record, format)
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

/// Frames a metadata value as a `haven_frame` one-value file: [`META_MAGIC`], then one
/// frame of `postcard(value)`.
pub(crate) fn encode_meta<T: Serialize>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, LogError> {
    let encode_error = |reason: String| LogError::Encode { what, reason };
    let payload = postcard::to_stdvec(value).map_err(|e| encode_error(e.to_string()))?;
    haven_frame::encode_file(META_MAGIC, &payload).map_err(|e| encode_error(e.to_string()))
}

/// Validates and decodes a metadata file's bytes; errors name `file` and the failing offset.
pub(crate) fn decode_meta<T: DeserializeOwned>(bytes: &[u8], file: &Path) -> Result<T, LogError> {
    let payload = haven_frame::decode_file(META_MAGIC, bytes).map_err(|damage| {
        LogError::corrupt(file, damage.offset, format!("metadata {}", damage.reason))
    })?;
    postcard::from_bytes(payload)
        .map_err(|e| LogError::corrupt(file, META_PAYLOAD_OFFSET, e.to_string()))
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
        let framed = SegmentFormat::Framed;
        let got: String = decode_entry_record(&buf, framed, Path::new("f"), 0).unwrap();
        assert_eq!(got, "hello");
        let body = match haven_frame::Frames::new(&buf, usize::MAX).next_frame() {
            haven_frame::Next::Body(body) => body.to_vec(),
            other => panic!("not a frame: {other:?}"),
        };
        assert_eq!(body[0], KIND_ENTRY, "the frame's body starts with the kind");
        buf[RECORD_HEADER_LEN + 1] ^= 0x40;
        let err = decode_entry_record::<String>(&buf, framed, Path::new("f"), 7).unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt log record in f at offset 7: checksum mismatch"
        );
    }

    #[test]
    fn a_v1_record_differs_only_in_its_length_field() {
        let mut buf = Vec::new();
        encode_entry_record(&"hello".to_string(), &mut buf).unwrap();
        let mut v1 = buf.clone();
        let field = u32::from_le_bytes([v1[0], v1[1], v1[2], v1[3]]);
        v1[..4].copy_from_slice(&(field - 1).to_le_bytes());
        let got: String = decode_entry_record(&v1, SegmentFormat::V1, Path::new("f"), 0).unwrap();
        assert_eq!(got, "hello");
        let err = decode_entry_record::<String>(&v1, SegmentFormat::Framed, Path::new("f"), 0)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "corrupt log record in f at offset 0: record length does not match its header"
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
