//! One object's stored bytes: a header, then the content in chunks, each authenticated.
//!
//! ```text
//! header (40 bytes): magic "HVNARC01" | flags u8 (bit 0: encrypted) | 3 zero bytes
//!                    | chunk_len u32 LE | key id [8] | nonce prefix [16]
//! chunks:            sealed(content[i*chunk_len ..][..chunk_len]) | tag [16], ...
//! ```
//!
//! Encrypted chunks are XChaCha20-Poly1305 with nonce `prefix | i u64 LE` where the top
//! bit of `i` marks the last chunk (the STREAM construction): dropping, reordering or
//! truncating chunks fails authentication. The associated data is the header and the
//! object's name, so an object renamed or copied under another name is refused too.
//! Plaintext objects (only when the operator wrote `encrypt = false`) carry a BLAKE3 tag
//! over the same inputs instead: damage is still detected, forgery is not prevented.
//! Chunks let a checkpoint of any size stream through a small buffer.

use chacha20poly1305::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::Aead;
use chacha20poly1305::aead::Payload;
use rand::RngCore;

use crate::ArchiveError;
use crate::key::ArchiveKey;
use crate::key::KEY_ID_LEN;
use crate::key::hex;

/// `HVNARC` and the sealed layout's version in two digits.
pub const MAGIC: &[u8; 8] = b"HVNARC01";
const SEAL_VERSION: u32 = 1;
pub const HEADER_LEN: usize = 40;
pub const TAG_LEN: usize = 16;
/// Content per chunk: large enough that tags cost nothing, small enough to stream.
pub const CHUNK_LEN: usize = 1 << 20;
/// A reader refuses larger chunks rather than allocate what a damaged header claims.
const MAX_CHUNK_LEN: usize = 16 << 20;
const LAST_CHUNK: u64 = 1 << 63;
const ENCRYPTED: u8 = 1;

/// How objects are protected: with the key, or (only when configured so) in plaintext.
#[derive(Clone, Debug)]
pub enum Protection {
    Encrypted(ArchiveKey),
    Plaintext,
}

impl Protection {
    pub fn describe(&self) -> String {
        match self {
            Self::Encrypted(key) => {
                format!("encrypted (XChaCha20-Poly1305, key {})", hex(&key.id()))
            }
            Self::Plaintext => "PLAINTEXT (encrypt = false)".to_string(),
        }
    }
}

struct Header {
    encrypted: bool,
    chunk_len: usize,
    key_id: [u8; KEY_ID_LEN],
    nonce_prefix: [u8; 16],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8] = if self.encrypted { ENCRYPTED } else { 0 };
        out[12..16].copy_from_slice(&(self.chunk_len as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.key_id);
        out[24..40].copy_from_slice(&self.nonce_prefix);
        out
    }

    fn decode(name: &str, bytes: &[u8]) -> Result<Self, ArchiveError> {
        if bytes.len() < HEADER_LEN {
            return Err(ArchiveError::damaged(
                name,
                "shorter than its header (truncated)",
            ));
        }
        if bytes[..6] == MAGIC[..6] && bytes[..8] != MAGIC[..] {
            let digits = std::str::from_utf8(&bytes[6..8]).ok();
            if let Some(found) = digits.and_then(|d| d.parse().ok()) {
                return Err(ArchiveError::Version {
                    name: name.to_string(),
                    found,
                    known: SEAL_VERSION,
                });
            }
        }
        if &bytes[..8] != MAGIC {
            return Err(ArchiveError::damaged(
                name,
                "not a Haven archive object (bad magic)",
            ));
        }
        let chunk_len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
        if chunk_len == 0 || chunk_len > MAX_CHUNK_LEN {
            return Err(ArchiveError::damaged(
                name,
                format!("chunk length {chunk_len}"),
            ));
        }
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&bytes[16..24]);
        let mut nonce_prefix = [0u8; 16];
        nonce_prefix.copy_from_slice(&bytes[24..40]);
        Ok(Self {
            encrypted: bytes[8] & ENCRYPTED != 0,
            chunk_len,
            key_id,
            nonce_prefix,
        })
    }
}

/// Seals one object's content chunk by chunk, in order.
pub struct Sealer {
    name: String,
    header: [u8; HEADER_LEN],
    nonce_prefix: [u8; 16],
    cipher: Option<XChaCha20Poly1305>,
    next: u64,
}

impl Sealer {
    pub fn new(name: &str, protection: &Protection) -> Self {
        let mut nonce_prefix = [0u8; 16];
        rand::rng().fill_bytes(&mut nonce_prefix);
        let (cipher, key_id) = match protection {
            Protection::Encrypted(key) => {
                (Some(XChaCha20Poly1305::new(key.bytes().into())), key.id())
            }
            Protection::Plaintext => (None, [0u8; KEY_ID_LEN]),
        };
        let header = Header {
            encrypted: cipher.is_some(),
            chunk_len: CHUNK_LEN,
            key_id,
            nonce_prefix,
        };
        Self {
            name: name.to_string(),
            header: header.encode(),
            nonce_prefix,
            cipher,
            next: 0,
        }
    }

    pub fn header(&self) -> &[u8; HEADER_LEN] {
        &self.header
    }

    /// Seals the next chunk (at most [`CHUNK_LEN`] bytes; only the last may be shorter).
    pub fn seal_chunk(&mut self, content: &[u8], last: bool) -> Vec<u8> {
        assert!(
            content.len() <= CHUNK_LEN,
            "chunk of {} bytes",
            content.len()
        );
        let counter = chunk_counter(self.next, last);
        self.next += 1;
        let aad = associated_data(&self.header, &self.name);
        match &self.cipher {
            Some(cipher) => {
                let nonce = nonce(&self.nonce_prefix, counter);
                let payload = Payload {
                    msg: content,
                    aad: &aad,
                };
                // Encryption fails only for messages beyond 256 GiB; chunks are 1 MiB.
                cipher
                    .encrypt(&nonce, payload)
                    .unwrap_or_else(|_| unreachable!("XChaCha20-Poly1305 refused a 1 MiB chunk"))
            }
            None => {
                let mut out = content.to_vec();
                out.extend_from_slice(&plain_tag(&aad, counter, content));
                out
            }
        }
    }
}

/// Seals a small object whole.
pub fn seal(name: &str, content: &[u8], protection: &Protection) -> Vec<u8> {
    let mut sealer = Sealer::new(name, protection);
    let mut out =
        Vec::with_capacity(HEADER_LEN + content.len() + TAG_LEN * (1 + content.len() / CHUNK_LEN));
    out.extend_from_slice(sealer.header());
    // An empty object is one empty chunk, flagged last like any final chunk.
    let chunks: Vec<&[u8]> = match content.is_empty() {
        true => vec![&[]],
        false => content.chunks(CHUNK_LEN).collect(),
    };
    for (i, chunk) in chunks.iter().enumerate() {
        out.extend(sealer.seal_chunk(chunk, i + 1 == chunks.len()));
    }
    out
}

/// Opens an object chunk by chunk; the header comes first.
pub struct Opener {
    name: String,
    header: [u8; HEADER_LEN],
    nonce_prefix: [u8; 16],
    cipher: Option<XChaCha20Poly1305>,
    chunk_len: usize,
    next: u64,
}

impl Opener {
    pub fn new(name: &str, header: &[u8], protection: &Protection) -> Result<Self, ArchiveError> {
        let decoded = Header::decode(name, header)?;
        let cipher = match (protection, decoded.encrypted) {
            (Protection::Encrypted(key), true) => {
                if key.id() != decoded.key_id {
                    return Err(ArchiveError::WrongKey {
                        name: name.to_string(),
                        found: hex(&decoded.key_id),
                        expected: hex(&key.id()),
                    });
                }
                Some(XChaCha20Poly1305::new(key.bytes().into()))
            }
            (Protection::Encrypted(_), false) => {
                return Err(ArchiveError::Plaintext {
                    name: name.to_string(),
                });
            }
            (Protection::Plaintext, true) => {
                return Err(ArchiveError::damaged(
                    name,
                    "it is encrypted and no key was given",
                ));
            }
            (Protection::Plaintext, false) => None,
        };
        let mut copy = [0u8; HEADER_LEN];
        copy.copy_from_slice(&header[..HEADER_LEN]);
        Ok(Self {
            name: name.to_string(),
            header: copy,
            nonce_prefix: decoded.nonce_prefix,
            cipher,
            chunk_len: decoded.chunk_len,
            next: 0,
        })
    }

    /// Bytes one full sealed chunk takes in the object.
    pub fn sealed_chunk_len(&self) -> usize {
        self.chunk_len + TAG_LEN
    }

    pub fn open_chunk(&mut self, sealed: &[u8], last: bool) -> Result<Vec<u8>, ArchiveError> {
        let index = self.next;
        let failed = || {
            ArchiveError::damaged(
                &self.name,
                format!("chunk {index} failed authentication (tampered or truncated)"),
            )
        };
        if sealed.len() < TAG_LEN || sealed.len() > self.sealed_chunk_len() {
            return Err(failed());
        }
        let counter = chunk_counter(index, last);
        self.next += 1;
        let aad = associated_data(&self.header, &self.name);
        match &self.cipher {
            Some(cipher) => {
                let payload = Payload {
                    msg: sealed,
                    aad: &aad,
                };
                cipher
                    .decrypt(&nonce(&self.nonce_prefix, counter), payload)
                    .map_err(|_| failed())
            }
            None => {
                let (content, tag) = sealed.split_at(sealed.len() - TAG_LEN);
                if plain_tag(&aad, counter, content) != tag {
                    return Err(failed());
                }
                Ok(content.to_vec())
            }
        }
    }
}

/// Opens a small object whole.
pub fn open(name: &str, stored: &[u8], protection: &Protection) -> Result<Vec<u8>, ArchiveError> {
    let mut opener = Opener::new(name, stored, protection)?;
    let mut rest = &stored[HEADER_LEN..];
    let mut content = Vec::with_capacity(rest.len());
    loop {
        let take = rest.len().min(opener.sealed_chunk_len());
        let (chunk, after) = rest.split_at(take);
        content.extend(opener.open_chunk(chunk, after.is_empty())?);
        rest = after;
        if rest.is_empty() {
            return Ok(content);
        }
    }
}

fn chunk_counter(index: u64, last: bool) -> u64 {
    assert!(index < LAST_CHUNK, "chunk index {index} overflows");
    if last { index | LAST_CHUNK } else { index }
}

fn nonce(prefix: &[u8; 16], counter: u64) -> XNonce {
    let mut bytes = [0u8; 24];
    bytes[..16].copy_from_slice(prefix);
    bytes[16..].copy_from_slice(&counter.to_le_bytes());
    bytes.into()
}

fn associated_data(header: &[u8; HEADER_LEN], name: &str) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(name.as_bytes());
    aad
}

fn plain_tag(aad: &[u8], counter: u64, content: &[u8]) -> [u8; TAG_LEN] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(aad);
    hasher.update(&counter.to_le_bytes());
    hasher.update(content);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&hasher.finalize().as_bytes()[..TAG_LEN]);
    tag
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Protection {
        Protection::Encrypted(ArchiveKey::generate())
    }

    #[test]
    fn content_of_every_size_comes_back_and_is_not_in_the_stored_bytes() {
        let protection = key();
        for len in [
            0,
            1,
            100,
            CHUNK_LEN - 1,
            CHUNK_LEN,
            CHUNK_LEN + 1,
            2 * CHUNK_LEN + 7,
        ] {
            let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let stored = seal("log/1", &content, &protection);
            assert_eq!(
                open("log/1", &stored, &protection).unwrap(),
                content,
                "{len}"
            );
        }
        let marker = b"a-marker-that-must-not-be-stored-in-clear";
        let stored = seal("log/1", marker, &protection);
        assert!(!stored.windows(marker.len()).any(|w| w == marker));
    }

    #[test]
    fn a_flipped_byte_a_truncation_a_rename_and_another_key_are_all_refused() {
        let protection = key();
        let content: Vec<u8> = (0..(2 * CHUNK_LEN + 5)).map(|i| i as u8).collect();
        let stored = seal("log/1", &content, &protection);
        let mut flipped = stored.clone();
        flipped[HEADER_LEN + 10] ^= 1;
        let damaged = open("log/1", &flipped, &protection)
            .unwrap_err()
            .to_string();
        assert_eq!(
            damaged,
            "object log/1 is damaged: chunk 0 failed authentication (tampered or truncated)"
        );
        let cut = &stored[..HEADER_LEN + 2 * (CHUNK_LEN + TAG_LEN)];
        let truncated = open("log/1", cut, &protection).unwrap_err().to_string();
        assert_eq!(
            truncated,
            "object log/1 is damaged: chunk 1 failed authentication (tampered or truncated)"
        );
        assert!(open("log/2", &stored, &protection).is_err());
        let other = open("log/1", &stored, &key()).unwrap_err();
        assert!(matches!(other, ArchiveError::WrongKey { .. }), "{other}");
    }

    #[test]
    fn plaintext_objects_are_checked_and_refused_where_encryption_is_expected() {
        let stored = seal("m", b"hello", &Protection::Plaintext);
        assert_eq!(
            open("m", &stored, &Protection::Plaintext).unwrap(),
            b"hello"
        );
        let mut flipped = stored.clone();
        flipped[HEADER_LEN] ^= 1;
        assert!(open("m", &flipped, &Protection::Plaintext).is_err());
        let refused = open("m", &stored, &key()).unwrap_err().to_string();
        assert_eq!(
            refused,
            "object m is stored in plaintext, and this archive is configured to be encrypted: refusing it"
        );
    }
}
