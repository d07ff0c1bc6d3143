//! A log object's content: consecutive committed entries, each with its index, term and
//! entry time, and the entry itself as Haven's log encodes it (opaque here: the archive
//! sits below the consensus layer and never interprets an entry).

use bytes::Bytes;
use serde::Deserialize;
use serde::Serialize;

use crate::ArchiveError;
use crate::FORMAT_VERSION;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedEntry {
    pub index: u64,
    pub term: u64,
    /// The leader's clock when the entry was proposed (microseconds since the Unix epoch);
    /// for entries without one (membership, blank), the previous entry's.
    pub time_us: i64,
    pub payload: Bytes,
}

#[derive(Serialize, Deserialize)]
struct Body {
    version: u32,
    entries: Vec<ArchivedEntry>,
}

/// Encodes entries that must be consecutive; panics otherwise (a caller's bug).
pub fn encode(entries: &[ArchivedEntry]) -> Vec<u8> {
    assert!(!entries.is_empty(), "an empty log object");
    assert!(
        entries.windows(2).all(|w| w[1].index == w[0].index + 1),
        "log object entries must be consecutive"
    );
    let body = Body {
        version: FORMAT_VERSION,
        entries: entries.to_vec(),
    };
    postcard::to_stdvec(&body).unwrap_or_else(|e| unreachable!("postcard to a Vec: {e}"))
}

/// Decodes a log object and checks its entries are exactly `first..=last`, as its name says.
pub fn decode(
    name: &str,
    content: &[u8],
    first: u64,
    last: u64,
) -> Result<Vec<ArchivedEntry>, ArchiveError> {
    let body: Body = postcard::from_bytes(content)
        .map_err(|e| ArchiveError::damaged(name, format!("undecodable entries: {e}")))?;
    if body.version != FORMAT_VERSION {
        return Err(ArchiveError::Version {
            name: name.to_string(),
            found: body.version,
            known: FORMAT_VERSION,
        });
    }
    let indexes: Vec<u64> = body.entries.iter().map(|e| e.index).collect();
    let expected: Vec<u64> = (first..=last).collect();
    if indexes != expected {
        return Err(ArchiveError::damaged(
            name,
            format!(
                "holds entries {:?}..={:?}, {} of them, where its name says {first}..={last}",
                indexes.first(),
                indexes.last(),
                indexes.len()
            ),
        ));
    }
    Ok(body.entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> ArchivedEntry {
        ArchivedEntry {
            index,
            term: 1,
            time_us: 1_000 + index as i64,
            payload: Bytes::from(format!("entry {index}")),
        }
    }

    #[test]
    fn a_format_version_this_reader_does_not_know_is_refused_by_name() {
        let newer = Body {
            version: FORMAT_VERSION + 1,
            entries: vec![entry(1)],
        };
        let content = postcard::to_stdvec(&newer).unwrap();
        let refused = decode("log/x", &content, 1, 1).unwrap_err().to_string();
        assert_eq!(
            refused,
            format!(
                "object log/x: format version {} is not known to this Haven (it reads {FORMAT_VERSION})",
                FORMAT_VERSION + 1
            )
        );
    }

    #[test]
    fn entries_come_back_and_a_name_that_disagrees_is_refused() {
        let entries: Vec<_> = (5..=9).map(entry).collect();
        let content = encode(&entries);
        assert_eq!(decode("l", &content, 5, 9).unwrap(), entries);
        let wrong = decode("l", &content, 5, 10).unwrap_err().to_string();
        assert_eq!(
            wrong,
            "object l is damaged: holds entries Some(5)..=Some(9), 5 of them, where its name says 5..=10"
        );
    }
}
