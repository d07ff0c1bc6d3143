//! Logs an older version wrote (`HVNLOG01` segments) open, read and keep working; new
//! records go to new segments in the current format.

use std::fs;

use haven_log::LogOptions;
use openraft::storage::RaftLogReader;
use openraft::storage::RaftLogStorage;

use crate::common::*;

/// A log of `0..100` in small segments, every segment rewritten as `HVNLOG01`.
async fn v1_log(dir: &std::path::Path) -> Vec<Ent> {
    let mut s = open(dir, small_segments());
    let want = entries(1, 0..100);
    append_chunked(&mut s, &want, 4).await;
    drop(s);
    let segments = segment_files(dir);
    assert!(segments.len() > 2, "several segments: {segments:?}");
    for segment in &segments {
        downgrade_to_v1(segment);
    }
    want
}

fn magic(path: &std::path::Path) -> Vec<u8> {
    fs::read(path).unwrap()[..8].to_vec()
}

#[tokio::test]
async fn a_v1_log_reads_back_and_appends_go_to_a_new_current_segment() {
    let dir = tempdir();
    let mut want = v1_log(dir.path()).await;
    let old = segment_files(dir.path());

    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
    let newer = entries(2, 100..110);
    append(&mut s, newer.clone()).await.unwrap();
    want.extend(newer);
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
    drop(s);

    let now = segment_files(dir.path());
    assert_eq!(&now[..old.len()], &old[..], "old segments untouched");
    for segment in &old {
        assert_eq!(magic(segment), b"HVNLOG01");
    }
    for segment in &now[old.len()..] {
        assert_eq!(magic(segment), b"HVNLOG02");
        record_spans(segment);
    }
    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
}

#[tokio::test]
async fn a_truncate_inside_a_v1_segment_then_appends_survive_reopen() {
    let dir = tempdir();
    let mut want = v1_log(dir.path()).await;
    let key = |path: &std::path::PathBuf| -> u64 {
        path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
    };
    let holding_98 = segment_files(dir.path())
        .into_iter()
        .rfind(|p| key(p) <= 98)
        .unwrap();
    assert!(key(&holding_98) < 98, "the cut falls inside a v1 segment");
    let mut s = open(dir.path(), small_segments());
    s.truncate_after(Some(log_id(1, 97))).await.unwrap();
    want.truncate(98);
    let newer = entries(3, 98..104);
    append(&mut s, newer.clone()).await.unwrap();
    want.extend(newer);
    drop(s);
    let mut s = open(dir.path(), LogOptions::default());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
    let last = segment_files(dir.path()).pop().unwrap();
    assert_eq!(magic(&last), b"HVNLOG02");
    assert_eq!(
        magic(&holding_98),
        b"HVNLOG01",
        "the cut v1 segment stays v1"
    );
}

#[tokio::test]
async fn a_torn_tail_of_a_v1_segment_is_cut_off() {
    let dir = tempdir();
    let want = v1_log(dir.path()).await;
    let last = segment_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&last).unwrap().len();
    let file = fs::OpenOptions::new().write(true).open(&last).unwrap();
    file.set_len(len - 3).unwrap();
    drop(file);
    let mut s = open(dir.path(), small_segments());
    assert_eq!(
        s.try_get_log_entries(..).await.unwrap(),
        want[..want.len() - 1].to_vec()
    );
}
