//! The one way Haven and its example apps frame bytes on disk, and the one fsync of a
//! directory ([`sync_path`]).
//!
//! A *frame* is `len: u32 LE | crc32(body): u32 LE | body`. Journals are frames back to
//! back ([`Frames`]); a small file of one value is an 8-byte magic naming its format and
//! version, then one frame ([`encode_file`], [`decode_file`]). Metadata that can only be
//! written after a streamed payload goes at the end of its file, framed the other way
//! round so it is found from the end: `body | len | crc32(body)` ([`append_footer`],
//! [`parse_footer`]). Readers tell a *torn* tail
//! (what a writer killed mid-append leaves: cut it off and go on) from *damage* (what no
//! crash explains: refuse, naming the offset), by one rule for every file:
//! - fewer bytes left than a header, or a length past the end of the file: torn;
//! - a checksum that does not match on the file's last frame: torn;
//! - a length above the reader's limit, or a bad checksum with more frames after it:
//!   damaged.

use std::fmt;
use std::fs::File;
use std::io;
use std::path::Path;

/// Bytes in front of every body: length and checksum.
pub const HEADER_LEN: usize = 8;

/// Bytes of a format magic at the start of a one-value file.
pub const MAGIC_LEN: usize = 8;

/// Appends one frame holding `body` to `out`.
pub fn append(out: &mut Vec<u8>, body: &[u8]) -> Result<(), TooLarge> {
    out.reserve(HEADER_LEN + body.len());
    let open = begin(out);
    out.extend_from_slice(body);
    finish(out, open).map(|_| ())
}

/// A frame being written in place: its body is whatever is appended to the buffer
/// between [`begin`] and [`finish`], so an encoder can write straight into it.
#[must_use]
pub struct Open {
    at: usize,
}

/// Starts a frame at the end of `out`, with room for its header.
pub fn begin(out: &mut Vec<u8>) -> Open {
    let at = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    Open { at }
}

/// Writes the header of the frame `open` began, over everything appended since; returns
/// the frame's whole length. A body too large for a frame is taken off `out` again.
pub fn finish(out: &mut Vec<u8>, open: Open) -> Result<usize, TooLarge> {
    let body_at = open.at + HEADER_LEN;
    let body_len = out.len() - body_at;
    let Ok(len) = u32::try_from(body_len) else {
        out.truncate(open.at);
        return Err(TooLarge(body_len));
    };
    let crc = crc32fast::hash(&out[body_at..]);
    out[open.at..open.at + 4].copy_from_slice(&len.to_le_bytes());
    out[open.at + 4..body_at].copy_from_slice(&crc.to_le_bytes());
    Ok(HEADER_LEN + body_len)
}

/// One frame holding `body`.
pub fn frame(body: &[u8]) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::new();
    append(&mut out, body)?;
    Ok(out)
}

/// Bytes after a body framed at the end of a file: length and checksum.
pub const FOOTER_LEN: usize = 8;

/// Appends `body` and its footer (length, checksum) to `out`.
pub fn append_footer(out: &mut Vec<u8>, body: &[u8]) -> Result<(), TooLarge> {
    let len = u32::try_from(body.len()).map_err(|_| TooLarge(body.len()))?;
    out.reserve(body.len() + FOOTER_LEN);
    out.extend_from_slice(body);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    Ok(())
}

/// A footer's body length and stored checksum; [`checksum_matches`] checks the body once
/// it has been read from in front of the footer.
pub fn parse_footer(footer: &[u8; FOOTER_LEN]) -> (usize, u32) {
    parse_header(footer)
}

/// Whether `body` is what a frame or footer with checksum `crc` was written with.
pub fn checksum_matches(body: &[u8], crc: u32) -> bool {
    crc32fast::hash(body) == crc
}

/// A body whose length does not fit a frame's `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge(pub usize);

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a body of {} bytes does not fit a frame (4 GiB)", self.0)
    }
}

impl std::error::Error for TooLarge {}

/// What the next frame of a file turned out to be; its body borrowed ([`Frames`]) or read
/// ([`read_frame`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Next<B> {
    /// A whole frame whose checksum matches: its body.
    Body(B),
    /// No byte left.
    End,
    /// An incomplete or unchecked last frame, as a killed writer leaves.
    Torn(String),
    /// Damage no crash explains.
    Damaged(String),
}

/// Frames back to back in `bytes`, read in order; [`Frames::offset`] is where the next one
/// starts, so after a [`Next::Torn`] it is the length of the intact prefix.
pub struct Frames<'a> {
    bytes: &'a [u8],
    offset: usize,
    max_len: usize,
}

impl<'a> Frames<'a> {
    /// Frames in `bytes` whose bodies are at most `max_len` bytes: a larger length is
    /// damage, never a record (a header is written whole, with its body).
    pub fn new(bytes: &'a [u8], max_len: usize) -> Self {
        Self {
            bytes,
            offset: 0,
            max_len,
        }
    }

    /// Where the next frame starts.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The next frame; the offset moves past it only when it is whole.
    pub fn next_frame(&mut self) -> Next<&'a [u8]> {
        let bytes = self.bytes;
        let rest = &bytes[self.offset..];
        let Some((header, after)) = start(rest) else {
            return partial(rest.len() as u64);
        };
        let next = judge(header, after.len() as u64, self.max_len, |len| {
            Ok::<_, std::convert::Infallible>(&after[..len])
        });
        let next = match next {
            Ok(next) => next,
            Err(never) => match never {},
        };
        if let Next::Body(body) = next {
            self.offset += HEADER_LEN + body.len();
        }
        next
    }
}

/// The next frame of `reader`, which holds `remaining` more bytes of its file; for files
/// too large to read whole. After anything but [`Next::Body`] the reader's position is
/// unspecified.
pub fn read_frame(
    reader: &mut impl io::Read,
    remaining: u64,
    max_len: usize,
) -> io::Result<Next<Vec<u8>>> {
    if remaining < HEADER_LEN as u64 {
        return Ok(partial(remaining));
    }
    let mut header = [0u8; HEADER_LEN];
    reader.read_exact(&mut header)?;
    judge(&header, remaining - HEADER_LEN as u64, max_len, |len| {
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        Ok(body)
    })
}

/// The header at the start of `rest` and what follows it, if a whole header is there.
fn start(rest: &[u8]) -> Option<(&[u8; HEADER_LEN], &[u8])> {
    rest.split_first_chunk::<HEADER_LEN>()
}

/// No frame (nothing left), or a header cut short: the end of a file.
fn partial<B>(remaining: u64) -> Next<B> {
    match remaining {
        0 => Next::End,
        n => Next::Torn(format!("a partial frame header of {n} bytes")),
    }
}

/// The rule of the crate docs, for a frame with `header` and `available` bytes after it
/// in its file; `body(len)` fetches the body once its length is known to be there.
fn judge<B: AsRef<[u8]>, E>(
    header: &[u8; HEADER_LEN],
    available: u64,
    max_len: usize,
    body: impl FnOnce(usize) -> Result<B, E>,
) -> Result<Next<B>, E> {
    let (len, crc) = parse_header(header);
    if len > max_len {
        return Ok(Next::Damaged(format!(
            "a frame length of {len} bytes, above {max_len}"
        )));
    }
    if len as u64 > available {
        return Ok(Next::Torn(format!(
            "a frame of {len} bytes of which only {available} were written"
        )));
    }
    let body = body(len)?;
    Ok(if crc32fast::hash(body.as_ref()) == crc {
        Next::Body(body)
    } else if len as u64 == available {
        Next::Torn("a last frame with a bad checksum".to_string())
    } else {
        Next::Damaged("a frame with a bad checksum".to_string())
    })
}

fn parse_header(header: &[u8; HEADER_LEN]) -> (usize, u32) {
    let [l0, l1, l2, l3, c0, c1, c2, c3] = *header;
    (
        u32::from_le_bytes([l0, l1, l2, l3]) as usize,
        u32::from_le_bytes([c0, c1, c2, c3]),
    )
}

/// A one-value file: `magic` (format and version), then one frame of `body`.
pub fn encode_file(magic: &[u8; MAGIC_LEN], body: &[u8]) -> Result<Vec<u8>, TooLarge> {
    let mut out = Vec::with_capacity(MAGIC_LEN + HEADER_LEN + body.len());
    out.extend_from_slice(magic);
    append(&mut out, body)?;
    Ok(out)
}

/// Why a one-value file was refused, and at which offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDamage {
    pub offset: u64,
    pub reason: String,
}

impl fmt::Display for FileDamage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at offset {}: {}", self.offset, self.reason)
    }
}

/// The body of a one-value file written by [`encode_file`] with `magic`. The frame must
/// end the file: a file is written whole, so anything else is damage.
pub fn decode_file<'a>(magic: &[u8; MAGIC_LEN], bytes: &'a [u8]) -> Result<&'a [u8], FileDamage> {
    let short = || FileDamage {
        offset: 0,
        reason: format!("file is only {} bytes", bytes.len()),
    };
    let (found, framed) = bytes.split_first_chunk::<MAGIC_LEN>().ok_or_else(short)?;
    if framed.len() < HEADER_LEN {
        return Err(short());
    }
    if found != magic {
        let reason = format!(
            "bad magic {:?} (expected {:?})",
            String::from_utf8_lossy(found),
            String::from_utf8_lossy(magic)
        );
        return Err(FileDamage { offset: 0, reason });
    }
    let at_magic = |damage: FileDamage| FileDamage {
        offset: damage.offset + MAGIC_LEN as u64,
        reason: damage.reason,
    };
    let body = decode_prefix(framed).map_err(at_magic)?;
    let after = framed.len() - HEADER_LEN - body.len();
    if after > 0 {
        let reason = format!(
            "a frame length of {} bytes, and {} bytes follow it",
            body.len(),
            body.len() + after
        );
        return Err(at_magic(FileDamage { offset: 0, reason }));
    }
    Ok(body)
}

/// The body of the frame at the start of `bytes`, whatever follows it (a file overwritten
/// in place may keep the tail of a longer earlier value). Offsets are from the start of
/// `bytes`.
pub fn decode_prefix(bytes: &[u8]) -> Result<&[u8], FileDamage> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(FileDamage {
            offset: 0,
            reason: format!("a partial frame header of {} bytes", bytes.len()),
        });
    };
    let (len, crc) = parse_header(header);
    let Some(body) = rest.get(..len) else {
        let reason = format!(
            "a frame length of {len} bytes, and {} bytes follow it",
            rest.len()
        );
        return Err(FileDamage { offset: 0, reason });
    };
    if !checksum_matches(body, crc) {
        return Err(FileDamage {
            offset: HEADER_LEN as u64,
            reason: "checksum mismatch".to_string(),
        });
    }
    Ok(body)
}

/// fsyncs a file or a directory by path. For a directory this makes its entries (files
/// created, renamed or removed in it) durable: without it, a renamed or new file can
/// vanish at a power cut although its own data was synced.
pub fn sync_path(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// [`sync_path`] of the directory holding `path` (`.` for a bare file name): makes a
/// rename to `path` durable.
pub fn sync_parent_dir(path: &Path) -> io::Result<()> {
    sync_path(parent_dir(path))
}

/// The directory holding `path` (`.` for a bare file name).
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for body in bodies {
            append(&mut out, body).unwrap();
        }
        out
    }

    #[test]
    fn frames_round_trip_in_order() {
        let bytes = journal(&[b"one", b"", b"three"]);
        let mut frames = Frames::new(&bytes, 16);
        assert_eq!(frames.next_frame(), Next::Body(&b"one"[..]));
        assert_eq!(frames.next_frame(), Next::Body(&b""[..]));
        assert_eq!(frames.next_frame(), Next::Body(&b"three"[..]));
        assert_eq!(frames.next_frame(), Next::End);
        assert_eq!(frames.offset(), bytes.len());
    }

    #[test]
    fn a_frame_written_in_place_is_the_frame_appended_whole() {
        let mut in_place = b"before".to_vec();
        let open = begin(&mut in_place);
        in_place.extend_from_slice(b"body");
        assert_eq!(finish(&mut in_place, open), Ok(HEADER_LEN + 4));
        let mut whole = b"before".to_vec();
        append(&mut whole, b"body").unwrap();
        assert_eq!(in_place, whole);
    }

    #[test]
    fn every_cut_of_the_last_frame_is_torn_and_keeps_the_prefix() {
        let bytes = journal(&[b"first", b"second"]);
        let whole_first = HEADER_LEN + 5;
        for cut in whole_first + 1..bytes.len() {
            let mut frames = Frames::new(&bytes[..cut], 16);
            assert_eq!(frames.next_frame(), Next::Body(&b"first"[..]));
            assert!(
                matches!(frames.next_frame(), Next::Torn(_)),
                "cut at {cut} is torn"
            );
            assert_eq!(frames.offset(), whole_first);
        }
    }

    #[test]
    fn a_bad_checksum_is_torn_at_the_end_and_damage_before_it() {
        let mut bytes = journal(&[b"first", b"second"]);
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let mut frames = Frames::new(&bytes, 16);
        assert_eq!(frames.next_frame(), Next::Body(&b"first"[..]));
        assert_eq!(
            frames.next_frame(),
            Next::Torn("a last frame with a bad checksum".to_string())
        );
        bytes[last] ^= 1;
        bytes[HEADER_LEN] ^= 1;
        assert_eq!(
            Frames::new(&bytes, 16).next_frame(),
            Next::Damaged("a frame with a bad checksum".to_string())
        );
    }

    #[test]
    fn a_reader_sees_what_a_slice_sees() {
        let mut bytes = journal(&[b"first", b"second"]);
        for cut in 0..=bytes.len() {
            let mut reader = &bytes[..cut];
            let mut frames = Frames::new(&bytes[..cut], 16);
            let mut remaining = cut as u64;
            loop {
                let streamed = read_frame(&mut reader, remaining, 16).unwrap();
                let sliced = frames.next_frame();
                assert_eq!(streamed, map_body(&sliced), "cut at {cut}");
                let Next::Body(body) = sliced else { break };
                remaining -= (HEADER_LEN + body.len()) as u64;
            }
        }
        bytes[HEADER_LEN] ^= 1;
        let mut reader = &bytes[..];
        assert_eq!(
            read_frame(&mut reader, bytes.len() as u64, 16).unwrap(),
            Next::Damaged("a frame with a bad checksum".to_string())
        );
    }

    fn map_body(next: &Next<&[u8]>) -> Next<Vec<u8>> {
        match next {
            Next::Body(body) => Next::Body(body.to_vec()),
            Next::End => Next::End,
            Next::Torn(reason) => Next::Torn(reason.clone()),
            Next::Damaged(reason) => Next::Damaged(reason.clone()),
        }
    }

    #[test]
    fn a_length_above_the_limit_is_damage() {
        let bytes = journal(&[b"seventeen bytes!!"]);
        assert_eq!(
            Frames::new(&bytes, 16).next_frame(),
            Next::Damaged("a frame length of 17 bytes, above 16".to_string())
        );
    }

    #[test]
    fn a_file_round_trips_and_damage_names_the_offset() {
        let mut bytes = encode_file(b"HVNTEST1", b"value").unwrap();
        assert_eq!(decode_file(b"HVNTEST1", &bytes), Ok(&b"value"[..]));
        assert_eq!(
            decode_file(b"HVNTEST2", &bytes).unwrap_err().to_string(),
            "at offset 0: bad magic \"HVNTEST1\" (expected \"HVNTEST2\")"
        );
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            decode_file(b"HVNTEST1", &bytes).unwrap_err().to_string(),
            "at offset 16: checksum mismatch"
        );
        assert_eq!(
            decode_file(b"HVNTEST1", &bytes[..last])
                .unwrap_err()
                .to_string(),
            "at offset 8: a frame length of 5 bytes, and 4 bytes follow it"
        );
        assert_eq!(
            decode_file(b"HVNTEST1", b"HVN").unwrap_err().to_string(),
            "at offset 0: file is only 3 bytes"
        );
    }

    #[test]
    fn a_footer_is_found_from_the_end() {
        let mut file = b"payload".to_vec();
        append_footer(&mut file, b"meta").unwrap();
        let (rest, footer) = file.split_last_chunk::<FOOTER_LEN>().unwrap();
        let (len, crc) = parse_footer(footer);
        let body = &rest[rest.len() - len..];
        assert_eq!(body, b"meta");
        assert!(checksum_matches(body, crc));
        assert!(!checksum_matches(b"metb", crc));
    }

    #[test]
    fn directories_sync() {
        let dir = tempfile::tempdir().unwrap();
        sync_path(dir.path()).unwrap();
        sync_parent_dir(&dir.path().join("absent-file")).unwrap();
        assert!(sync_path(&dir.path().join("absent")).is_err());
    }
}
