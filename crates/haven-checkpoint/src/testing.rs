//! Small checkpoints and deliberate damage, for the tests of this crate and of the crates
//! above it (feature `testing`).

use std::fs;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::format::CaptureMode;
use crate::format::CheckpointInfo;
use crate::format::CheckpointSpec;
use crate::format::PayloadSource;
use crate::format::TEMP_PREFIX;
use crate::format::write_created_at;

/// The metadata of a test checkpoint at `index`, cluster `c1`.
pub fn spec(index: u64, term: u64, mode: CaptureMode) -> CheckpointSpec {
    CheckpointSpec {
        cluster: "c1".into(),
        index,
        term,
        entry_time_us: 1_700_000_000_000_000 + index as i64,
        mode,
        haven_state: vec![1, 2, 3, index as u8],
    }
}

/// A small hooks checkpoint in `dir`, created at `created_us`.
pub fn tiny(dir: &Path, index: u64, created_us: i64) -> CheckpointInfo {
    let src = dir.join(format!("{TEMP_PREFIX}src-{index}"));
    fs::write(&src, index.to_le_bytes()).unwrap();
    let info = write_created_at(
        dir,
        spec(index, 2, CaptureMode::Hooks),
        PayloadSource::File(&src),
        created_us,
    )
    .unwrap();
    fs::remove_file(&src).unwrap();
    info
}

/// Flips one bit of the byte at `offset`.
pub fn flip(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], offset).unwrap();
}
