//! The archive against both of its targets: a local directory (`file://`) and a real
//! S3-compatible server (SeaweedFS, started by the test). Each test runs the same
//! scenario on both.

use std::path::Path;

use bytes::Bytes;
use haven_archive::ArchiveError;
use haven_archive::batch::ArchivedEntry;
use haven_archive::epoch;
use haven_archive::key::ArchiveKey;
use haven_archive::reader;
use haven_archive::reader::Reader;
use haven_archive::seal::CHUNK_LEN;
use haven_archive::seal::Protection;
use haven_archive::store::Store;
use haven_archive::store::StoreSettings;
use haven_archive::testing::SeaweedServer;
use haven_archive::writer::ArchiveWriter;
use haven_archive::writer::MAX_UPLOADS_IN_FLIGHT;

const MARKER: &str = "PLAINTEXT-MARKER-7f3a";

fn entry(index: u64) -> ArchivedEntry {
    ArchivedEntry {
        index,
        term: 1,
        time_us: 1_000_000 * index as i64,
        payload: Bytes::from(format!("{MARKER} entry {index}")),
    }
}

fn writer_of(cluster: &str) -> epoch::Writer {
    epoch::Writer {
        cluster: cluster.to_string(),
        site: String::new(),
        service: "orders".to_string(),
        node: 1,
    }
}

/// Both targets: a directory and a prefix of the S3 server's bucket.
async fn targets(server: &SeaweedServer, dir: &Path, prefix: &str) -> Vec<Store> {
    let file = StoreSettings {
        url: format!("file://{}", dir.join(prefix).display()),
        endpoint: None,
    };
    vec![Store::open(&file).unwrap(), server.store(prefix)]
}

async fn ship_range(writer: &mut ArchiveWriter, first: u64, last: u64, per_object: u64) {
    let mut next = first;
    while next <= last {
        let end = (next + per_object - 1).min(last);
        let entries: Vec<_> = (next..=end).map(entry).collect();
        writer.ship_entries(&entries).await.unwrap();
        next = end + 1;
    }
}

fn checkpoint_bytes() -> Vec<u8> {
    (0..(2 * CHUNK_LEN + 12345))
        .map(|i| (i * 7 % 253) as u8)
        .collect()
}

#[tokio::test]
async fn what_is_written_reads_back_whole_and_verifies_on_both_targets() {
    let server = SeaweedServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let protection = Protection::Encrypted(ArchiveKey::generate());
    for store in targets(&server, dir.path(), "roundtrip").await {
        let mut writer = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 1)
            .await
            .unwrap();
        ship_range(&mut writer, 1, 250, 40).await;
        let checkpoint = dir.path().join("checkpoint");
        std::fs::write(&checkpoint, checkpoint_bytes()).unwrap();
        writer
            .ship_checkpoint(&checkpoint, 100, 1, 100_000_000)
            .await
            .unwrap();
        assert_eq!(writer.archived(), Some((250, 250_000_000)));

        let reader = Reader::open(store.clone(), protection.clone())
            .await
            .unwrap();
        let read = reader.entries(101, 250).await.unwrap();
        assert_eq!(read, (101..=250).map(entry).collect::<Vec<_>>());
        let fetched = dir.path().join("fetched");
        let object = &reader.catalog().checkpoints[0];
        reader.fetch_checkpoint(object, &fetched).await.unwrap();
        assert_eq!(std::fs::read(&fetched).unwrap(), checkpoint_bytes());
        assert_eq!(
            reader.index_at_time(130_500_000).await.unwrap(),
            Some((130, 130_000_000))
        );

        let same = |path: &Path| match std::fs::read(path) {
            Ok(bytes) if bytes == checkpoint_bytes() => Ok(()),
            _ => Err("checkpoint differs".to_string()),
        };
        let mut followed = reader.catalog().clone();
        followed.forget_before_newest_checkpoint();
        assert_eq!(followed.last_entry(), reader.catalog().last_entry());
        assert!(followed.log.len() < reader.catalog().log.len());
        let verified = reader::verify(&reader, dir.path(), &same).await;
        assert!(verified.sound(), "{:?}", verified.problems);
        assert_eq!((verified.entries, verified.checkpoints), (250, 1));
        assert_eq!(verified.last_index, Some(250));
    }
    for file in server.data_files() {
        let bytes = std::fs::read(&file).unwrap();
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
            "plaintext in the store's file {}",
            file.display()
        );
    }
}

#[tokio::test]
async fn a_second_writer_resumes_where_the_archive_ends_and_a_gap_is_refused() {
    let server = SeaweedServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let protection = Protection::Encrypted(ArchiveKey::generate());
    for store in targets(&server, dir.path(), "resume").await {
        let mut first = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 1)
            .await
            .unwrap();
        ship_range(&mut first, 1, 90, 30).await;
        // A new leader of the same cluster: it learns the end from the archive, skips
        // what is there and continues without a gap or a double.
        let mut second = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 2)
            .await
            .unwrap();
        assert_eq!(second.archived().map(|(i, _)| i), Some(90));
        let overlapping: Vec<_> = (61..=120).map(entry).collect();
        second.ship_entries(&overlapping).await.unwrap();
        let gap = second.ship_entries(&[entry(125)]).await.unwrap_err();
        assert_eq!(
            gap.to_string(),
            format!(
                "archive {}: entries from 125 would leave a gap after 120",
                store.url()
            )
        );
        let reader = Reader::open(store.clone(), protection.clone())
            .await
            .unwrap();
        let entries = reader.entries(1, 120).await.unwrap();
        let indexes: Vec<u64> = entries.iter().map(|e| e.index).collect();
        assert_eq!(indexes, (1..=120).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn another_cluster_is_refused_and_so_is_a_reader_without_the_key() {
    let server = SeaweedServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let protection = Protection::Encrypted(ArchiveKey::generate());
    for store in targets(&server, dir.path(), "owned").await {
        let mut owner = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 1)
            .await
            .unwrap();
        ship_range(&mut owner, 1, 10, 10).await;
        let Err(refused) =
            ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("b"), 1).await
        else {
            panic!("a second cluster was let in");
        };
        assert_eq!(
            refused.to_string(),
            format!(
                "the archive at {} belongs to cluster \"a/orders\" (epoch 1); this is cluster \"b/orders\": two clusters must not write one archive",
                store.url()
            )
        );
        let stranger = Protection::Encrypted(ArchiveKey::generate());
        let Err(refused) = Reader::open(store.clone(), stranger).await else {
            panic!("read with another key");
        };
        assert!(
            matches!(refused, ArchiveError::WrongKey { .. }),
            "{refused}"
        );
    }
}

/// A `file://` archive in `root` under a new key, and its writer (cluster "a").
async fn file_archive(root: &Path) -> (Store, Protection, ArchiveWriter) {
    let protection = Protection::Encrypted(ArchiveKey::generate());
    let store = Store::open(&StoreSettings {
        url: format!("file://{}", root.display()),
        endpoint: None,
    })
    .unwrap();
    let writer = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 1)
        .await
        .unwrap();
    (store, protection, writer)
}

#[tokio::test]
async fn a_flipped_byte_and_a_truncated_object_are_named_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("damaged");
    let (store, protection, mut writer) = file_archive(&root).await;
    ship_range(&mut writer, 1, 60, 20).await;
    let checkpoint = dir.path().join("checkpoint");
    std::fs::write(&checkpoint, checkpoint_bytes()).unwrap();
    writer
        .ship_checkpoint(&checkpoint, 20, 1, 20_000_000)
        .await
        .unwrap();
    let reader = Reader::open(store.clone(), protection.clone())
        .await
        .unwrap();
    let log_name = reader.catalog().log[1].name.clone();
    let checkpoint_name = reader.catalog().checkpoints[0].name.clone();
    let log_file = root.join(&log_name);
    let mut bytes = std::fs::read(&log_file).unwrap();
    bytes[60] ^= 0x10;
    std::fs::write(&log_file, bytes).unwrap();
    let checkpoint_file = root.join(&checkpoint_name);
    let whole = std::fs::read(&checkpoint_file).unwrap();
    std::fs::write(&checkpoint_file, &whole[..whole.len() - 100]).unwrap();

    let any = |_: &Path| Ok(());
    let verified = reader::verify(&reader, dir.path(), &any).await;
    assert!(!verified.sound());
    let problems = verified.problems.join("\n");
    assert!(
        problems.contains(&format!(
            "object {log_name} is damaged: chunk 0 failed authentication"
        )),
        "{problems}"
    );
    assert!(
        problems.contains(&format!(
            "object {checkpoint_name} is damaged: chunk 2 failed authentication"
        )),
        "{problems}"
    );
    assert!(
        problems.contains(&format!("{checkpoint_name}: differs from its manifest")),
        "{problems}"
    );
    // A restore reads the same objects, and refuses the same way, by name.
    let refused = reader.entries(1, 60).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "object {log_name} is damaged: chunk 0 failed authentication (tampered or truncated)"
        )
    );
    let fetched = dir.path().join("fetched");
    let object = &reader.catalog().checkpoints[0];
    let refused = reader.fetch_checkpoint(object, &fetched).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .starts_with(&format!("object {checkpoint_name} is damaged")),
        "{refused}"
    );
}

/// Objects a newer Haven wrote: a sealed layout, a log object and an epoch marker of a
/// format version this reader does not know are each refused by name, never misread.
#[tokio::test]
async fn a_format_version_this_reader_does_not_know_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("newer");
    let (store, protection, mut writer) = file_archive(&root).await;
    ship_range(&mut writer, 1, 40, 20).await;
    let reader = Reader::open(store.clone(), protection.clone())
        .await
        .unwrap();
    let (first, second) = (&reader.catalog().log[0].name, &reader.catalog().log[1].name);
    let newer = |name: &str| {
        format!("object {name}: format version 2 is not known to this Haven (it reads 1)")
    };

    // The sealed layout: the header's magic names version 02.
    let file = root.join(first);
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..8].copy_from_slice(b"HVNARC02");
    std::fs::write(&file, bytes).unwrap();
    let refused = reader.entries(1, 20).await.unwrap_err();
    assert_eq!(refused.to_string(), newer(first));

    // A log object's content, sealed as this version seals: its body says version 2
    // (postcard's varint of 1 and of 2 is one byte, the body's first).
    let file = root.join(second);
    let mut content =
        haven_archive::seal::open(second, &std::fs::read(&file).unwrap(), &protection).unwrap();
    assert_eq!(content[0], 1);
    content[0] = 2;
    std::fs::write(
        &file,
        haven_archive::seal::seal(second, &content, &protection),
    )
    .unwrap();
    let refused = reader.entries(21, 40).await.unwrap_err();
    assert_eq!(refused.to_string(), newer(second));

    // The epoch marker: a reader refuses to open the archive at all.
    let marker = "epochs/0000000001";
    let file = root.join(marker);
    let stored =
        haven_archive::seal::open(marker, &std::fs::read(&file).unwrap(), &protection).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    json["version"] = 2.into();
    let content = serde_json::to_vec(&json).unwrap();
    std::fs::write(
        &file,
        haven_archive::seal::seal(marker, &content, &protection),
    )
    .unwrap();
    let Err(refused) = Reader::open(store, protection).await else {
        panic!("an archive whose epoch marker is of version 2 was opened");
    };
    assert_eq!(refused.to_string(), newer(marker));
}

/// A writer of `cluster` at `site`.
fn writer_at(cluster: &str, site: &str) -> epoch::Writer {
    epoch::Writer {
        site: site.to_string(),
        ..writer_of(cluster)
    }
}

#[tokio::test]
async fn of_two_promotions_one_wins_the_old_writer_is_fenced_and_the_cut_holds() {
    let server = SeaweedServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let protection = Protection::Encrypted(ArchiveKey::generate());
    for store in targets(&server, dir.path(), "promote").await {
        let mut old = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 1)
            .await
            .unwrap();
        ship_range(&mut old, 1, 60, 30).await;
        let (b, c) = (writer_at("a", "b"), writer_at("a", "c"));
        let (at_b, at_c) = tokio::join!(
            epoch::fence(&store, &protection, &b, Some(1), 2),
            epoch::fence(&store, &protection, &c, Some(1), 2),
        );
        assert!(at_b.is_ok() != at_c.is_ok(), "{at_b:?} {at_c:?}");
        let (winner, loser) = if at_b.is_ok() { (&b, &c) } else { (&c, &b) };
        let lost = at_b.err().or(at_c.err()).unwrap().to_string();
        assert!(lost.contains("another promotion won"), "{lost}");
        // Behind the fence, before any marker: the old writer acknowledges nothing more,
        // and cannot open the archive again.
        let fenced = epoch::check_fence(&store, &protection, 1).await;
        assert!(
            matches!(fenced, Err(ArchiveError::Fenced { newer: 2, .. })),
            "{fenced:?}"
        );
        let reopened =
            ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 3).await;
        assert!(
            matches!(reopened, Err(ArchiveError::Fenced { newer: 2, .. })),
            "{:?}",
            reopened.err()
        );
        let behind = epoch::promote(&store, &protection, loser, 2, 61, 3).await;
        let behind = behind.unwrap_err().to_string();
        assert!(behind.contains("another promotion won"), "{behind}");
        let marker = epoch::promote(&store, &protection, winner, 2, 61, 3)
            .await
            .unwrap();
        // A retried promotion finds its own marker, as it was.
        let again = epoch::promote(&store, &protection, winner, 2, 99, 4)
            .await
            .unwrap();
        assert_eq!(again, marker);
        // The old writer meets the new epoch, and the history ends where it was cut.
        let fenced = epoch::check_not_fenced(&store, &protection, 1).await;
        assert!(
            matches!(fenced, Err(ArchiveError::Fenced { newer: 2, .. })),
            "{fenced:?}"
        );
        let reader = Reader::open(store.clone(), protection.clone())
            .await
            .unwrap();
        assert_eq!(reader.catalog().last_entry().map(|(i, _)| i), Some(60));
        let winner = reader.catalog().newest_epoch().unwrap();
        assert!(["b", "c"].contains(&winner.site.as_str()), "{winner:?}");
        assert_eq!((winner.epoch, winner.start_index), (2, 61));
    }
}

/// Creates `epoch`'s fence for another site on a thread and runtime of its own (with a
/// store client of its own: the writer's connections belong to the test's runtime), so
/// the calling (current-thread) runtime runs none of its upload tasks meanwhile: they are
/// all still in flight when the fence appears.
fn fence_elsewhere(server: &SeaweedServer, store: &Store, protection: &Protection, epoch: u64) {
    let settings = StoreSettings {
        url: store.url().to_string(),
        endpoint: Some(server.endpoint.clone()).filter(|_| store.url().starts_with("s3://")),
    };
    let protection = protection.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Store::open(&settings).unwrap();
        let b = writer_at("a", "b");
        let fenced = runtime.block_on(epoch::fence(&store, &protection, &b, Some(epoch - 1), 9));
        assert_eq!(fenced.unwrap(), epoch);
    })
    .join()
    .unwrap();
}

#[tokio::test]
async fn uploads_in_flight_are_taken_back_in_order_and_a_fence_releases_none_after_it() {
    let server = SeaweedServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let protection = Protection::Encrypted(ArchiveKey::generate());
    for store in targets(&server, dir.path(), "pipeline").await {
        let mut writer = ArchiveWriter::open(store.clone(), protection.clone(), &writer_of("a"), 1)
            .await
            .unwrap();
        let batch = |first: u64| (first..first + 10).map(entry).collect::<Vec<_>>();
        for first in (1..=MAX_UPLOADS_IN_FLIGHT as u64).map(|k| 1 + 10 * (k - 1)) {
            assert!(writer.start_upload(&batch(first), true).unwrap());
        }
        assert!(!writer.has_room());
        // The newest one's PUT waits for the others' before it is even issued.
        assert!(writer.put_pending().is_some());
        let tail = 10 * MAX_UPLOADS_IN_FLIGHT as u64;
        assert_eq!(writer.upload_tail().map(|(i, _)| i), Some(tail));
        let first = writer.finish_upload().await.unwrap().unwrap();
        assert_eq!(
            (first.objects, writer.archived().map(|(i, _)| i)),
            (1, Some(10))
        );
        // Entries already in flight are skipped; a gap after them is refused.
        assert!(!writer.start_upload(&batch(11), true).unwrap());
        let refused = writer.start_upload(&batch(tail + 2), true).unwrap_err();
        assert_eq!(
            refused.to_string(),
            format!(
                "archive {}: entries from {} would leave a gap after {tail}",
                store.url(),
                tail + 2
            )
        );
        // Taken back in index order, each counted only once it is.
        for k in 2..=MAX_UPLOADS_IN_FLIGHT as u64 {
            writer.finish_upload().await.unwrap().unwrap();
            assert_eq!(writer.archived().map(|(i, _)| i), Some(10 * k));
        }
        assert!(writer.finish_upload().await.is_none());
        assert!(writer.put_pending().is_none());

        // A promotion fences the writer while three uploads are in flight: the first
        // fails on the fence read after its PUT, and the later ones are dropped unfinished,
        // so nothing after the archive's confirmed end is ever reported stored.
        for k in 0..3 {
            assert!(
                writer
                    .start_upload(&batch(tail + 1 + 10 * k), true)
                    .unwrap()
            );
        }
        fence_elsewhere(&server, &store, &protection, 2);
        let fenced = writer.finish_upload().await.unwrap();
        assert!(
            matches!(
                fenced,
                Err(ArchiveError::Fenced {
                    newer: 2,
                    ours: 1,
                    ..
                })
            ),
            "{fenced:?}"
        );
        assert_eq!(writer.uploads_in_flight(), 0);
        assert!(writer.finish_upload().await.is_none());
        assert_eq!(writer.archived().map(|(i, _)| i), Some(tail));
    }
}
