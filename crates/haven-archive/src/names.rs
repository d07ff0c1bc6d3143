//! Object names. Numbers are zero-padded so names sort as their numbers do: a reader that
//! has everything up to some object lists only the names after it.
//!
//! ```text
//! fences/<epoch>                          who promotes to <epoch> (create-only, first)
//! epochs/<epoch>                          who writes from which index (create-only)
//! log/<epoch>/<first>-<last>-<time>       committed entries first..=last, the last one
//!                                         proposed at <time> (µs since the Unix epoch)
//! checkpoints/<epoch>/<index>-<term>-<time>  the state at index
//! manifests/<epoch>/<last>-<written>      every object of the epoch up to last, as
//!                                         of <written> (µs; retention rewrites it)
//! ```
//!
//! Times and terms are in the names so that listing alone answers "which objects hold
//! the state at time T": a point-in-time restore reads only the objects it needs.

pub const FENCES: &str = "fences/";
pub const EPOCHS: &str = "epochs/";
pub const LOG: &str = "log/";
pub const CHECKPOINTS: &str = "checkpoints/";
pub const MANIFESTS: &str = "manifests/";

pub fn fence(epoch: u64) -> String {
    format!("{FENCES}{epoch:010}")
}

pub fn epoch(epoch: u64) -> String {
    format!("{EPOCHS}{epoch:010}")
}

pub fn log_dir(epoch: u64) -> String {
    format!("{LOG}{epoch:010}/")
}

pub fn log(epoch: u64, first: u64, last: u64, time_us: i64) -> String {
    format!(
        "{}{first:020}-{last:020}-{:016}",
        log_dir(epoch),
        time_us.max(0)
    )
}

pub fn checkpoint_dir(epoch: u64) -> String {
    format!("{CHECKPOINTS}{epoch:010}/")
}

pub fn checkpoint(epoch: u64, index: u64, term: u64, time_us: i64) -> String {
    format!(
        "{}{index:020}-{term:010}-{:016}",
        checkpoint_dir(epoch),
        time_us.max(0)
    )
}

pub fn manifest_dir(epoch: u64) -> String {
    format!("{MANIFESTS}{epoch:010}/")
}

pub fn manifest(epoch: u64, last: u64, written_us: i64) -> String {
    format!(
        "{}{last:020}-{:016}",
        manifest_dir(epoch),
        written_us.max(0)
    )
}

/// What a listed name is; `None` for names Haven did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    Epoch(u64),
    Log {
        epoch: u64,
        first: u64,
        last: u64,
        time_us: i64,
    },
    Checkpoint {
        epoch: u64,
        index: u64,
        term: u64,
        time_us: i64,
    },
    Manifest {
        epoch: u64,
        last: u64,
    },
}

fn number(s: &str) -> Option<u64> {
    let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| s.parse().ok())?
}

fn three(tail: &str) -> Option<[u64; 3]> {
    let mut parts = tail.split('-').map(number);
    let three = [parts.next()??, parts.next()??, parts.next()??];
    parts.next().is_none().then_some(three)
}

pub fn parse(name: &str) -> Option<Parsed> {
    if let Some(rest) = name.strip_prefix(EPOCHS) {
        return number(rest).map(Parsed::Epoch);
    }
    let (kind, rest) = name.split_once('/')?;
    let (epoch, tail) = rest.split_once('/')?;
    let epoch = number(epoch)?;
    match format!("{kind}/").as_str() {
        LOG => {
            let [first, last, time] = three(tail)?;
            let time_us = i64::try_from(time).ok()?;
            (first <= last).then_some(Parsed::Log {
                epoch,
                first,
                last,
                time_us,
            })
        }
        CHECKPOINTS => {
            let [index, term, time] = three(tail)?;
            let time_us = i64::try_from(time).ok()?;
            Some(Parsed::Checkpoint {
                epoch,
                index,
                term,
                time_us,
            })
        }
        MANIFESTS => {
            let (last, written) = tail.split_once('-')?;
            number(written)?;
            number(last).map(|last| Parsed::Manifest { epoch, last })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_sort_as_their_numbers() {
        assert_eq!(parse(&epoch(3)), Some(Parsed::Epoch(3)));
        assert_eq!(
            parse(&log(2, 10, 99, 1_765_000_000_000_000)),
            Some(Parsed::Log {
                epoch: 2,
                first: 10,
                last: 99,
                time_us: 1_765_000_000_000_000
            })
        );
        assert_eq!(
            parse(&checkpoint(1, 500, 3, 7)),
            Some(Parsed::Checkpoint {
                epoch: 1,
                index: 500,
                term: 3,
                time_us: 7
            })
        );
        assert_eq!(
            parse(&manifest(1, 7, 99)),
            Some(Parsed::Manifest { epoch: 1, last: 7 })
        );
        assert!(log(1, 9, 9, 5) < log(1, 10, 10, 1));
        assert_eq!(parse("log/0000000001/5-3-1"), None);
        assert_eq!(parse("log/0000000001/1-3"), None);
        assert_eq!(parse("notes.txt"), None);
    }
}
