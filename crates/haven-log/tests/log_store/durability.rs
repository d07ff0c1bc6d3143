//! Reopen, torn tails, corruption, group commit, truncate/purge persistence, fail-stop.

use std::fs;
use std::fs::OpenOptions;
use std::io::Write;

use haven_log::LogError;
use haven_log::LogOptions;
use openraft::LogState;
use openraft::RaftLogReader;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use openraft::type_config::TypeConfigExt;

use crate::common::*;

#[tokio::test]
async fn reopen_returns_every_entry_vote_and_state() {
    let dir = tempdir();
    let opts = LogOptions {
        segment_bytes: 2048,
        cache_bytes: 4096,
    };
    let all = entries(1, 0..1000);
    let mut s = open(dir.path(), opts);
    append_chunked(&mut s, &all, 7).await;
    s.save_vote(&vote(5, 2)).await.unwrap();
    s.save_committed(Some(log_id(1, 900))).await.unwrap();
    let state = s.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, 999)));
    drop(s);

    assert!(
        segment_files(dir.path()).len() >= 5,
        "expected several segments"
    );
    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(0..1000).await.unwrap(), all);
    assert_eq!(
        s.try_get_log_entries(333..=444).await.unwrap(),
        all[333..=444].to_vec()
    );
    assert_eq!(
        s.try_get_log_entries(990..).await.unwrap(),
        all[990..].to_vec()
    );
    assert_eq!(s.read_vote().await.unwrap(), Some(vote(5, 2)));
    assert_eq!(s.read_committed().await.unwrap(), Some(log_id(1, 900)));
    assert_eq!(s.get_log_state().await.unwrap(), state);

    // The reopened store keeps appending after the recovered tail.
    let more = entries(2, 1000..1010);
    append(&mut s, more.clone()).await.unwrap();
    drop(s);
    let mut s = open(dir.path(), small_segments());
    let mut want = all;
    want.extend(more);
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
}

/// Writes 50 entries in small segments and returns them with the last segment's path.
async fn fifty_entries(dir: &std::path::Path) -> (Vec<Ent>, std::path::PathBuf) {
    let all = entries(1, 0..50);
    let mut s = open(dir, small_segments());
    append_chunked(&mut s, &all, 4).await;
    drop(s);
    let last = segment_files(dir).pop().unwrap();
    assert!(
        record_spans(&last).len() >= 2,
        "last segment should hold several records"
    );
    (all, last)
}

#[tokio::test]
async fn torn_tail_short_record_is_cut_off() {
    let dir = tempdir();
    let (all, last) = fifty_entries(dir.path()).await;
    let spans = record_spans(&last);
    let (last_off, _) = *spans.last().unwrap();
    let len = fs::metadata(&last).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), all[..49].to_vec());
    assert_eq!(
        s.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 48))
    );
    assert_eq!(
        fs::metadata(&last).unwrap().len(),
        last_off,
        "file cut at the torn record"
    );

    // The log continues cleanly where the repair left it.
    append(&mut s, vec![entry(2, 49)]).await.unwrap();
    drop(s);
    let mut s = open(dir.path(), small_segments());
    let got = s.try_get_log_entries(..).await.unwrap();
    assert_eq!(got.len(), 50);
    assert_eq!(got[49], entry(2, 49));
}

#[tokio::test]
async fn torn_tail_zero_fill_is_removed() {
    let dir = tempdir();
    let (all, last) = fifty_entries(dir.path()).await;
    let len = fs::metadata(&last).unwrap().len();
    OpenOptions::new()
        .append(true)
        .open(&last)
        .unwrap()
        .write_all(&[0u8; 100])
        .unwrap();

    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), all);
    assert_eq!(fs::metadata(&last).unwrap().len(), len);
}

#[tokio::test]
async fn torn_tail_zeroed_final_record_is_cut_off() {
    let dir = tempdir();
    let (all, last) = fifty_entries(dir.path()).await;
    let (off, rec_len) = *record_spans(&last).last().unwrap();
    let mut bytes = fs::read(&last).unwrap();
    bytes[off as usize..(off + rec_len) as usize].fill(0);
    fs::write(&last, bytes).unwrap();

    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), all[..49].to_vec());
}

#[tokio::test]
async fn torn_tail_bad_checksum_in_final_record_is_cut_off() {
    let dir = tempdir();
    let (all, last) = fifty_entries(dir.path()).await;
    let (off, rec_len) = *record_spans(&last).last().unwrap();
    flip_byte(&last, off + rec_len - 2);

    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), all[..49].to_vec());
}

#[tokio::test]
async fn flipped_byte_in_early_record_refuses_to_open() {
    let dir = tempdir();
    let (_all, _last) = fifty_entries(dir.path()).await;
    let first = segment_files(dir.path()).remove(0);
    let (off, rec_len) = record_spans(&first)[2];
    flip_byte(&first, off + rec_len / 2);

    let err = Store::open(dir.path(), small_segments()).unwrap_err();
    let LogError::Corrupt { file, offset, .. } = &err else {
        panic!("expected Corrupt, got {err:?}");
    };
    assert_eq!((file, *offset), (&first, off));
    let want = format!(
        "corrupt log record in {} at offset {off}: checksum mismatch",
        first.display()
    );
    assert_eq!(err.to_string(), want);
}

/// Damage before the final record of the last segment is corruption, not a torn tail.
#[tokio::test]
async fn flipped_byte_in_last_segment_before_its_end_refuses_to_open() {
    let dir = tempdir();
    let (_all, last) = fifty_entries(dir.path()).await;
    let (off, rec_len) = record_spans(&last)[0];
    flip_byte(&last, off + rec_len - 1);

    let err = Store::open(dir.path(), small_segments()).unwrap_err();
    let want = format!(
        "corrupt log record in {} at offset {off}: checksum mismatch",
        last.display()
    );
    assert_eq!(err.to_string(), want);
}

#[tokio::test]
async fn bad_segment_header_refuses_to_open() {
    let dir = tempdir();
    fifty_entries(dir.path()).await;
    let first = segment_files(dir.path()).remove(0);
    flip_byte(&first, 3);
    let err = Store::open(dir.path(), small_segments()).unwrap_err();
    assert!(
        matches!(&err, LogError::Corrupt { offset: 0, file, .. } if *file == first),
        "{err}"
    );
}

#[tokio::test]
async fn corrupt_vote_file_refuses_to_open() {
    let dir = tempdir();
    let mut s = open(dir.path(), small_segments());
    s.save_vote(&vote(3, 1)).await.unwrap();
    drop(s);
    let path = dir.path().join("vote");
    let len = fs::metadata(&path).unwrap().len();
    flip_byte(&path, len - 1);
    let err = Store::open(dir.path(), small_segments()).unwrap_err();
    let want = format!(
        "corrupt log record in {} at offset 16: metadata checksum mismatch",
        path.display()
    );
    assert_eq!(err.to_string(), want);
}

#[tokio::test]
async fn group_commit_shares_fsyncs_between_appends() {
    let dir = tempdir();
    let mut s = open(dir.path(), LogOptions::default());
    let mut pending = Vec::new();
    for i in 0..200 {
        let (tx, rx) = C::oneshot();
        s.append(vec![entry(1, i)], IOFlushed::signal(tx))
            .await
            .unwrap();
        pending.push(rx);
    }
    for rx in pending {
        rx.await.unwrap().unwrap();
    }
    let st = s.stats();
    assert_eq!(st.append_calls, 200);
    assert_eq!(st.entries_appended, 200);
    assert!(st.fsyncs < 50, "200 appends cost {} fsyncs", st.fsyncs);

    // Control: appends that wait for each other cannot share, so the counter must grow by one
    // fsync per append. This proves the counter above is real.
    for i in 200..220 {
        append(&mut s, vec![entry(1, i)]).await.unwrap();
    }
    assert!(s.stats().fsyncs >= st.fsyncs + 20);
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), entries(1, 0..220));
}

#[tokio::test]
async fn truncate_and_purge_persist_across_reopen() {
    let dir = tempdir();
    let mut s = open(dir.path(), small_segments());
    let mut want = entries(1, 0..100);
    append_chunked(&mut s, &want, 3).await;

    s.truncate_after(Some(log_id(1, 80))).await.unwrap();
    want.truncate(81);
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
    drop(s);

    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), want);
    let newer = entries(2, 81..90);
    append(&mut s, newer.clone()).await.unwrap();
    want.extend(newer);

    let segments_before = segment_files(dir.path()).len();
    s.purge(log_id(1, 30)).await.unwrap();
    assert!(
        segment_files(dir.path()).len() < segments_before,
        "purge deletes old segments"
    );
    drop(s);

    let mut s = open(dir.path(), small_segments());
    assert_eq!(
        s.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(1, 30)),
            last_log_id: Some(log_id(2, 89)),
        }
    );
    assert_eq!(
        s.try_get_log_entries(..).await.unwrap(),
        want[31..].to_vec()
    );
    assert!(s.try_get_log_entries(0..31).await.unwrap().is_empty());
}

#[tokio::test]
async fn purge_past_the_end_then_append_survives_reopen() {
    let dir = tempdir();
    let mut s = open(dir.path(), LogOptions::default());
    append(&mut s, entries(1, 0..5)).await.unwrap();
    s.purge(log_id(1, 9)).await.unwrap();
    append(&mut s, entries(2, 10..12)).await.unwrap();
    drop(s);

    let mut s = open(dir.path(), LogOptions::default());
    assert_eq!(
        s.get_log_state().await.unwrap(),
        LogState {
            last_purged_log_id: Some(log_id(1, 9)),
            last_log_id: Some(log_id(2, 11)),
        }
    );
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), entries(2, 10..12));
}

#[tokio::test]
async fn truncate_everything_then_rewrite() {
    let dir = tempdir();
    let mut s = open(dir.path(), small_segments());
    append_chunked(&mut s, &entries(1, 0..20), 5).await;
    s.truncate_after(None).await.unwrap();
    assert!(segment_files(dir.path()).is_empty());
    append(&mut s, entries(3, 0..3)).await.unwrap();
    drop(s);
    let mut s = open(dir.path(), small_segments());
    assert_eq!(s.try_get_log_entries(..).await.unwrap(), entries(3, 0..3));
}

#[tokio::test]
async fn disk_reads_recheck_checksums() {
    let dir = tempdir();
    let mut s = open(dir.path(), small_segments());
    append_chunked(&mut s, &entries(1, 0..20), 5).await;
    let first = segment_files(dir.path()).remove(0);
    let (off, rec_len) = record_spans(&first)[1];
    // Overwrite in place (same inode) so the open store sees the damage.
    let mut bytes = fs::read(&first).unwrap();
    bytes[(off + rec_len / 2) as usize] ^= 0x5a;
    OpenOptions::new()
        .write(true)
        .open(&first)
        .unwrap()
        .write_all(&bytes)
        .unwrap();

    let err = s.try_get_log_entries(0..5).await.unwrap_err();
    let want = format!("at offset {off}: checksum mismatch");
    assert!(err.to_string().contains(&want), "{err}");
}

/// After a failed write the store rejects every later write, even once the cause is gone.
#[tokio::test]
async fn write_failure_stops_all_later_writes() {
    let dir = tempdir();
    let mut s = open(dir.path(), LogOptions::default());
    let seg_dir = dir.path().join("segments");
    fs::remove_dir(&seg_dir).unwrap();

    let err = append(&mut s, entries(1, 0..1)).await.unwrap_err();
    assert!(err.to_string().contains("segments"), "{err}");

    fs::create_dir(&seg_dir).unwrap();
    let (tx, _rx) = C::oneshot();
    let err = s
        .append(entries(1, 1..2), IOFlushed::signal(tx))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("stopped after an earlier write failure"),
        "{err}"
    );
    assert!(s.save_vote(&vote(1, 1)).await.is_err());
    assert!(s.truncate_after(None).await.is_err());
    assert!(
        fs::read_dir(&seg_dir).unwrap().next().is_none(),
        "nothing written after the failure"
    );
}

/// `committed` is a hint (a lower committed index is always safe): a damaged one is
/// ignored with a warning instead of keeping the node down, while the vote, which Raft's
/// safety rests on, is still refused when damaged.
#[tokio::test]
async fn damaged_committed_file_is_ignored_but_a_damaged_vote_is_not() {
    for damage in ["truncate", "flip"] {
        let dir = tempdir();
        let mut s = open(dir.path(), small_segments());
        append(&mut s, entries(1, 0..5)).await.unwrap();
        s.save_vote(&vote(3, 1)).await.unwrap();
        s.save_committed(Some(log_id(1, 4))).await.unwrap();
        drop(s);
        let path = dir.path().join("committed");
        let len = fs::metadata(&path).unwrap().len();
        assert!(len > 16, "committed file of {len} bytes");
        match damage {
            "truncate" => truncate_file(&path, 10),
            _ => flip_byte(&path, len - 1),
        }
        let mut s = open(dir.path(), small_segments());
        assert_eq!(s.read_committed().await.unwrap(), None, "{damage}");
        assert_eq!(s.read_vote().await.unwrap(), Some(vote(3, 1)));
        assert_eq!(s.try_get_log_entries(..).await.unwrap(), entries(1, 0..5));
        // The next commit overwrites the damaged file with a good one.
        s.save_committed(Some(log_id(1, 4))).await.unwrap();
        s.save_vote(&vote(3, 1)).await.unwrap(); // a barrier: the writer has run
        drop(s);
        let mut s = open(dir.path(), small_segments());
        assert_eq!(s.read_committed().await.unwrap(), Some(log_id(1, 4)));
    }

    let dir = tempdir();
    let mut s = open(dir.path(), small_segments());
    s.save_vote(&vote(3, 1)).await.unwrap();
    drop(s);
    let path = dir.path().join("vote");
    truncate_file(&path, 10);
    let err = Store::open(dir.path(), small_segments()).unwrap_err();
    let want = format!(
        "corrupt log record in {} at offset 0: metadata file is only 10 bytes",
        path.display()
    );
    assert_eq!(err.to_string(), want);
}

fn truncate_file(path: &std::path::Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}
