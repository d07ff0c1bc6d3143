//! The frame: header, trailer, and why a body is not one.

/// The app's 8-byte magic, first in every snapshot it writes.
pub type Magic = [u8; 8];

/// Version of the frame format written and read.
pub const VERSION: u32 = 1;

/// Length of the header: magic, version, two lengths, header CRC.
pub const HEADER_LEN: u64 = 32;

/// Length of the trailer: the CRC-32 of everything before it.
pub const TRAILER_LEN: u64 = 4;

/// Bytes read from a file per streamed chunk (and buffered per restore file).
pub const CHUNK_LEN: u64 = 256 * 1024;

/// Why a body is not a valid snapshot frame; an app's `400` body is `invalid
/// snapshot: {this}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("truncated")]
    Truncated,
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    Version(u32),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("lengths overflow")]
    Overflow,
    #[error("trailing bytes after the checksum")]
    Trailing,
    #[error("checksum mismatch")]
    Checksum,
}

/// The header's variable part: the two files' lengths, in frame order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub first_len: u64,
    pub second_len: u64,
}

pub(crate) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut le = [0u8; 4];
    le.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(le)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

impl Header {
    /// The 32 header bytes under `magic`.
    pub fn encode(self, magic: &Magic) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN as usize);
        out.extend_from_slice(magic);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.first_len.to_le_bytes());
        out.extend_from_slice(&self.second_len.to_le_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a whole header; its own CRC catches garbled lengths before
    /// anything is written.
    pub fn decode(magic: &Magic, bytes: &[u8]) -> Result<Header, Invalid> {
        Header::decode_checked(magic, bytes, |_| Ok(()))
    }

    /// [`Header::decode`] with the app's own checks of the lengths, made once
    /// the header checksum matched and before the overflow check.
    pub fn decode_checked<R: From<Invalid>>(
        magic: &Magic,
        bytes: &[u8],
        check: impl FnOnce(Header) -> Result<(), R>,
    ) -> Result<Header, R> {
        if bytes.get(..magic.len()) != Some(&magic[..]) {
            return Err(Invalid::BadMagic.into());
        }
        if bytes.len() < HEADER_LEN as usize {
            return Err(Invalid::Truncated.into());
        }
        let version = le_u32(bytes, 8);
        if version != VERSION {
            return Err(Invalid::Version(version).into());
        }
        if crc32fast::hash(&bytes[..28]) != le_u32(bytes, 28) {
            return Err(Invalid::HeaderChecksum.into());
        }
        let header = Header {
            first_len: le_u64(bytes, 12),
            second_len: le_u64(bytes, 20),
        };
        check(header)?;
        header.total_len().ok_or(Invalid::Overflow)?;
        Ok(header)
    }

    /// The lengths in frame order.
    pub fn lens(self) -> [u64; 2] {
        [self.first_len, self.second_len]
    }

    /// Offset of the end of the first file's bytes.
    pub fn first_end(self) -> u64 {
        HEADER_LEN.saturating_add(self.first_len)
    }

    /// Offset of the end of the second file's bytes (the trailer's start).
    pub fn body_end(self) -> u64 {
        self.first_end().saturating_add(self.second_len)
    }

    /// Offsets of the ends of the two files' bytes.
    pub(crate) fn ends(self) -> [u64; 2] {
        [self.first_end(), self.body_end()]
    }

    /// Length of the whole frame; `None` if it overflows.
    pub fn total_len(self) -> Option<u64> {
        HEADER_LEN
            .checked_add(self.first_len)?
            .checked_add(self.second_len)?
            .checked_add(TRAILER_LEN)
    }
}

/// A whole snapshot of `first` and `second` under `magic`, built in memory
/// (for tests and small states; [`crate::Streamer`] streams large ones).
pub fn frame(magic: &Magic, first: &[u8], second: &[u8]) -> Vec<u8> {
    let mut out = Header {
        first_len: first.len() as u64,
        second_len: second.len() as u64,
    }
    .encode(magic);
    out.extend_from_slice(first);
    out.extend_from_slice(second);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGIC: Magic = *b"HAVENTST";

    #[test]
    fn header_round_trips_and_damage_is_named() {
        for header in [
            Header {
                first_len: 10,
                second_len: 16,
            },
            Header {
                first_len: 0,
                second_len: 99,
            },
        ] {
            let bytes = header.encode(&MAGIC);
            assert_eq!(bytes.len() as u64, HEADER_LEN);
            assert_eq!(Header::decode(&MAGIC, &bytes), Ok(header));
            for at in [0, 7] {
                let mut bad = bytes.clone();
                bad[at] ^= 1;
                assert_eq!(Header::decode(&MAGIC, &bad), Err(Invalid::BadMagic));
            }
            assert_eq!(Header::decode(b"HAVENOTH", &bytes), Err(Invalid::BadMagic));
            let mut bad = bytes.clone();
            bad[8] = 2;
            assert_eq!(Header::decode(&MAGIC, &bad), Err(Invalid::Version(2)));
            for at in [13, 21] {
                let mut bad = bytes.clone();
                bad[at] ^= 1;
                assert_eq!(Header::decode(&MAGIC, &bad), Err(Invalid::HeaderChecksum));
            }
            assert_eq!(
                Header::decode(&MAGIC, &bytes[..20]),
                Err(Invalid::Truncated)
            );
        }
        for (first_len, second_len) in [(u64::MAX - 8, 8), (u64::MAX, 1)] {
            let huge = Header {
                first_len,
                second_len,
            };
            assert_eq!(
                Header::decode(&MAGIC, &huge.encode(&MAGIC)),
                Err(Invalid::Overflow)
            );
        }
    }

    #[test]
    fn the_app_checks_lengths_before_the_overflow_check() {
        #[derive(Debug, PartialEq)]
        enum Reason {
            Frame(Invalid),
            Odd(u64),
        }
        impl From<Invalid> for Reason {
            fn from(e: Invalid) -> Self {
                Reason::Frame(e)
            }
        }
        let odd = |h: Header| {
            if h.second_len.is_multiple_of(8) {
                Ok(())
            } else {
                Err(Reason::Odd(h.second_len))
            }
        };
        for (second_len, why) in [(9, Reason::Odd(9)), (8, Reason::Frame(Invalid::Overflow))] {
            let header = Header {
                first_len: u64::MAX,
                second_len,
            };
            let bytes = header.encode(&MAGIC);
            assert_eq!(Header::decode_checked(&MAGIC, &bytes, odd), Err(why));
        }
    }

    #[test]
    fn frame_is_header_files_and_checksum() {
        let bytes = frame(&MAGIC, b"ab", b"cde");
        assert_eq!(bytes.len() as u64, HEADER_LEN + 5 + TRAILER_LEN);
        assert_eq!(
            Header::decode(&MAGIC, &bytes[..32]),
            Ok(Header {
                first_len: 2,
                second_len: 3
            })
        );
        assert_eq!(&bytes[32..37], b"abcde");
        assert_eq!(crc32fast::hash(&bytes[..37]), le_u32(&bytes, 37));
    }
}
