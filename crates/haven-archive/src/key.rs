//! The archive's secret key: 32 random bytes in a one-line text file.
//!
//! The file says what it is (`haven-archive-key-1 <64 hex digits>`) so a wrong file is
//! named as such instead of failing later as "every object is damaged". Objects record a
//! short key id (a hash of the key, never the key), so a reader told the wrong key says
//! so by name.

use std::fmt;
use std::path::Path;

use rand::RngCore;

use crate::ArchiveError;

pub const KEY_LEN: usize = 32;
pub const KEY_ID_LEN: usize = 8;
const FILE_TAG: &str = "haven-archive-key-1";

#[derive(Clone)]
pub struct ArchiveKey {
    bytes: [u8; KEY_LEN],
}

/// Never prints the key itself.
impl fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArchiveKey({})", hex(&self.id()))
    }
}

impl ArchiveKey {
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rng().fill_bytes(&mut bytes);
        Self { bytes }
    }

    /// The key file's whole text, newline included.
    pub fn to_file_text(&self) -> String {
        format!("{FILE_TAG} {}\n", hex(&self.bytes))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let expected = format!("expected one line '{FILE_TAG} <64 hex digits>'");
        let Some((tag, digits)) = text.trim().split_once(' ') else {
            return Err(format!("not a Haven archive key ({expected})"));
        };
        if tag != FILE_TAG {
            return Err(format!("not a Haven archive key ({expected})"));
        }
        let bytes = unhex(digits.trim())
            .and_then(|b| <[u8; KEY_LEN]>::try_from(b).ok())
            .ok_or_else(|| format!("the key is not 64 hex digits ({expected})"))?;
        Ok(Self { bytes })
    }

    pub fn load(path: &Path) -> Result<Self, ArchiveError> {
        let failed = |reason: String| ArchiveError::Key {
            path: path.to_path_buf(),
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| failed(format!("cannot read it: {e}")))?;
        Self::parse(&text).map_err(failed)
    }

    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// A name for the key that reveals nothing of it.
    pub fn id(&self) -> [u8; KEY_ID_LEN] {
        let derived = blake3::derive_key("haven archive key id 2026-12 v1", &self.bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&derived[..KEY_ID_LEN]);
        id
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(digits: &str) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) || !digits.is_ascii() {
        return None;
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_survives_its_file_and_its_debug_form_hides_it() {
        let key = ArchiveKey::generate();
        let text = key.to_file_text();
        let back = ArchiveKey::parse(&text).unwrap();
        assert_eq!(back.bytes(), key.bytes());
        let shown = format!("{key:?}");
        assert!(!shown.contains(&hex(key.bytes())), "{shown}");
        assert!(shown.contains(&hex(&key.id())));
    }

    #[test]
    fn a_file_that_is_not_a_key_is_named_as_such() {
        let not = ArchiveKey::parse("hello world").unwrap_err();
        assert_eq!(
            not,
            "not a Haven archive key (expected one line 'haven-archive-key-1 <64 hex digits>')"
        );
        let short = ArchiveKey::parse("haven-archive-key-1 abcd").unwrap_err();
        assert_eq!(
            short,
            "the key is not 64 hex digits (expected one line 'haven-archive-key-1 <64 hex digits>')"
        );
    }
}
