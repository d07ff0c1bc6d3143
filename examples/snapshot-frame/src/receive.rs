//! The streaming, validating reader of a restore body.

use std::fs::File;
use std::io::{BufWriter, Write};

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio::task::JoinError;

use crate::format::{CHUNK_LEN, HEADER_LEN, Header, Invalid, Magic, TRAILER_LEN, le_u32};
use crate::fsutil::{IoError, io_err, remove_if_present};
use crate::http::RestoreError;
use crate::swap::{Files, Staged};

/// The app's own checks of a snapshot's content, fed as it streams in.
pub trait Inspect {
    /// Why the app finds a body invalid: the frame's reasons and its own.
    type Reason: From<Invalid>;

    /// Checks the lengths of a header whose checksum matched.
    fn lengths(&mut self, header: Header) -> Result<(), Self::Reason> {
        let _ = header;
        Ok(())
    }

    /// Sees the next bytes of file `part` (`0` or `1`, in frame order),
    /// before the trailer's checksum is known to match.
    fn bytes(&mut self, part: usize, bytes: &[u8]) {
        let _ = (part, bytes);
    }
}

/// No checks beyond the frame's.
impl Inspect for () {
    type Reason = Invalid;
}

/// Why receiving a body failed.
#[derive(Debug)]
pub enum ReceiveError<R> {
    /// The body is not a valid snapshot.
    Invalid(R),
    /// A temporary file could not be written.
    Io(IoError),
}

impl<R> From<IoError> for ReceiveError<R> {
    fn from(e: IoError) -> Self {
        ReceiveError::Io(e)
    }
}

/// Writes a snapshot's two files to their temporary copies while checking
/// its framing and checksum, chunk by chunk, so a body of any size needs
/// little memory. Blocking.
pub struct Receiver<I: Inspect = ()> {
    magic: Magic,
    /// A required file's is created at once, an optional one's once the
    /// header says the file exists. Dropped (closed) before the files.
    outs: [Option<BufWriter<File>>; 2],
    staged: Staged,
    head: Vec<u8>,
    header: Option<Header>,
    /// Bytes of the snapshot consumed so far.
    offset: u64,
    crc: crc32fast::Hasher,
    trailer: Vec<u8>,
    inspect: I,
}

fn create_tmp(tmp: &std::path::Path) -> Result<BufWriter<File>, IoError> {
    let file = File::create(tmp).map_err(io_err(tmp, "create a restore file"))?;
    Ok(BufWriter::with_capacity(CHUNK_LEN as usize, file))
}

impl<I: Inspect> Receiver<I> {
    /// Starts a restore into `files`' temporary copies, holding the app's
    /// restore lock until the restore is dropped or committed.
    pub fn create(
        magic: Magic,
        files: Files,
        inspect: I,
        restoring: OwnedMutexGuard<()>,
    ) -> Result<Receiver<I>, IoError> {
        let mut receiver = Receiver {
            magic,
            outs: [None, None],
            staged: Staged::new(files, restoring),
            head: Vec::with_capacity(HEADER_LEN as usize),
            header: None,
            offset: 0,
            crc: crc32fast::Hasher::new(),
            trailer: Vec::with_capacity(TRAILER_LEN as usize),
            inspect,
        };
        for (out, part) in receiver.outs.iter_mut().zip(&receiver.staged.files.parts) {
            if part.optional {
                // A stale copy from an earlier attempt must not pass for this one's.
                remove_if_present(&part.tmp)
                    .map_err(io_err(&part.tmp, "delete a stale restore file"))?;
            } else {
                *out = Some(create_tmp(&part.tmp)?);
            }
        }
        Ok(receiver)
    }

    /// Reads the whole body, then checks the framing and the checksum.
    pub fn read(
        mut self,
        chunks: impl IntoIterator<Item = Bytes>,
    ) -> Result<Received<I>, ReceiveError<I::Reason>> {
        for chunk in chunks {
            self.feed(&chunk)?;
        }
        self.finish()
    }

    /// Consumes the next chunk of the body.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), ReceiveError<I::Reason>> {
        while !chunk.is_empty() {
            let taken = self.take(chunk)?;
            chunk = &chunk[taken..];
        }
        Ok(())
    }

    /// Consumes a prefix of `chunk` (at most up to the next region boundary);
    /// returns its length.
    fn take(&mut self, chunk: &[u8]) -> Result<usize, ReceiveError<I::Reason>> {
        let Some(header) = self.header else {
            return self.take_header(chunk);
        };
        if self.offset >= header.body_end() {
            return self.take_trailer(chunk);
        }
        let part = usize::from(self.offset >= header.first_end());
        let end = header.ends()[part];
        let n =
            usize::try_from(end - self.offset).map_or(chunk.len(), |left| left.min(chunk.len()));
        let bytes = &chunk[..n];
        self.crc.update(bytes);
        self.inspect.bytes(part, bytes);
        if let Some(out) = &mut self.outs[part] {
            let tmp = &self.staged.files.parts[part].tmp;
            out.write_all(bytes)
                .map_err(io_err(tmp, "write a restore file"))?;
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn take_header(&mut self, chunk: &[u8]) -> Result<usize, ReceiveError<I::Reason>> {
        let n = (HEADER_LEN as usize - self.head.len()).min(chunk.len());
        self.head.extend_from_slice(&chunk[..n]);
        let seen = self.head.len().min(self.magic.len());
        if self.head[..seen] != self.magic[..seen] {
            return Err(ReceiveError::Invalid(Invalid::BadMagic.into()));
        }
        if self.head.len() == HEADER_LEN as usize {
            let inspect = &mut self.inspect;
            let header = Header::decode_checked(&self.magic, &self.head, |h| inspect.lengths(h))
                .map_err(ReceiveError::Invalid)?;
            self.staged.header = header;
            let present = self.staged.present();
            for (i, part) in self.staged.files.parts.iter().enumerate() {
                if self.outs[i].is_none() && present[i] {
                    self.outs[i] = Some(create_tmp(&part.tmp)?);
                }
            }
            self.header = Some(header);
            self.crc.update(&self.head);
            self.offset = HEADER_LEN;
        }
        Ok(n)
    }

    fn take_trailer(&mut self, chunk: &[u8]) -> Result<usize, ReceiveError<I::Reason>> {
        if self.trailer.len() + chunk.len() > TRAILER_LEN as usize {
            return Err(ReceiveError::Invalid(Invalid::Trailing.into()));
        }
        self.trailer.extend_from_slice(chunk);
        Ok(chunk.len())
    }

    /// Checks that the body was whole and its checksum matches.
    pub fn finish(self) -> Result<Received<I>, ReceiveError<I::Reason>> {
        let invalid = |e: Invalid| ReceiveError::Invalid(e.into());
        let header = self.header.ok_or_else(|| invalid(Invalid::Truncated))?;
        if self.offset < header.body_end() || self.trailer.len() < TRAILER_LEN as usize {
            return Err(invalid(Invalid::Truncated));
        }
        if self.crc.finalize() != le_u32(&self.trailer, 0) {
            return Err(invalid(Invalid::Checksum));
        }
        Ok(Received {
            outs: self.outs,
            staged: self.staged,
            inspect: self.inspect,
        })
    }
}

/// A whole, well-framed body whose checksum matched; its temporary files are
/// not yet durable.
pub struct Received<I> {
    outs: [Option<BufWriter<File>>; 2],
    staged: Staged,
    /// The app's checks, having seen every byte.
    pub inspect: I,
}

impl<I> Received<I> {
    /// The snapshot's header.
    pub fn header(&self) -> Header {
        self.staged.header
    }

    /// Makes the temporary files durable.
    pub fn sync(self) -> Result<Staged, IoError> {
        for (out, part) in self.outs.into_iter().zip(&self.staged.files.parts) {
            if let Some(out) = out {
                out.into_inner()
                    .map_err(|e| e.into_error())
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&part.tmp, "sync a restore file"))?;
            }
        }
        Ok(self.staged)
    }
}

/// The chunks of a restore body, as a blocking iterator.
pub struct Chunks(mpsc::Receiver<Bytes>);

impl Iterator for Chunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        self.0.blocking_recv()
    }
}

/// Copies the request body into the stage's channel; stops early (without
/// error) when the stage has given up on an invalid body.
async fn pump(body: Body, tx: mpsc::Sender<Bytes>) -> Result<(), axum::Error> {
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        if tx.send(chunk?).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Runs `stage` on a blocking thread over the chunks of `body` as they are
/// read. `stage` runs to completion even if the request is dropped. A body
/// that could not be read is reported as such ([`RestoreError::Body`]),
/// whatever `stage` made of its first part; a stage that panicked, through
/// `task_err`.
pub async fn receive<T, R, A>(
    body: Body,
    task_err: impl FnOnce(JoinError) -> A,
    stage: impl FnOnce(Chunks) -> Result<T, RestoreError<R, A>> + Send + 'static,
) -> Result<T, RestoreError<R, A>>
where
    T: Send + 'static,
    R: Send + 'static,
    A: Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let staging = tokio::task::spawn_blocking(move || stage(Chunks(rx)));
    let pumped = pump(body, tx).await;
    let staged = staging.await.map_err(|e| RestoreError::App(task_err(e)))?;
    pumped.map_err(RestoreError::Body)?;
    staged
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;
    use std::sync::Arc;

    use super::*;
    use crate::format::frame;
    use crate::swap::Part;

    const MAGIC: Magic = *b"HAVENTST";

    fn files(dir: &Path, first_optional: bool) -> Files {
        let first = dir.join("first");
        let tmp = dir.join("first.restore.tmp");
        Files {
            dir: dir.to_path_buf(),
            parts: [
                if first_optional {
                    Part::optional(first, tmp)
                } else {
                    Part::required(first, tmp)
                },
                Part::required(dir.join("second"), dir.join("second.restore.tmp")),
            ],
            marker: dir.join("restore.ready"),
            marker_tmp: dir.join("restore.ready.tmp"),
        }
    }

    async fn receiver(dir: &Path, first_optional: bool) -> Receiver {
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        Receiver::create(
            MAGIC,
            files(dir, first_optional),
            (),
            lock.lock_owned().await,
        )
        .unwrap()
    }

    fn reason<T>(result: Result<T, ReceiveError<Invalid>>) -> Invalid {
        match result {
            Err(ReceiveError::Invalid(why)) => why,
            Err(ReceiveError::Io(e)) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_body_in_any_chunks_is_staged_and_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        fs::write(path.join("first"), b"old").unwrap();
        let body = frame(&MAGIC, b"first file", b"second");
        for size in [1, 3, 7, 32, body.len()] {
            let chunks: Vec<Bytes> = body.chunks(size).map(Bytes::copy_from_slice).collect();
            let received = receiver(path, false).await.read(chunks).unwrap();
            assert_eq!(received.header().lens(), [10, 6]);
            let mut staged = received.sync().unwrap();
            assert_eq!(
                fs::read(path.join("first.restore.tmp")).unwrap(),
                b"first file"
            );
            staged.swap_in().unwrap();
            drop(staged);
            assert_eq!(fs::read(path.join("first")).unwrap(), b"first file");
            assert_eq!(fs::read(path.join("second")).unwrap(), b"second");
            assert_eq!(names(path), ["first", "second"]);
        }
    }

    #[tokio::test]
    async fn an_empty_optional_file_is_not_staged_and_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        fs::write(path.join("first"), b"old").unwrap();
        fs::write(path.join("first.restore.tmp"), b"stale").unwrap();
        let body = frame(&MAGIC, b"", b"second");
        let received = receiver(path, true).await.read([Bytes::from(body)]);
        let staged = received.unwrap().sync().unwrap();
        assert_eq!(staged.present(), [false, true]);
        assert_eq!(names(path), ["first", "second.restore.tmp"]);
        let mut staged = staged;
        staged.swap_in().unwrap();
        drop(staged);
        assert_eq!(names(path), ["second"]);
    }

    #[tokio::test]
    async fn damage_is_named_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path();
        let body = frame(&MAGIC, b"first file", b"second");
        let mut flipped = body.clone();
        flipped[HEADER_LEN as usize + 2] ^= 1;
        let mut header_flipped = body.clone();
        header_flipped[14] ^= 1;
        let mut version = body.clone();
        version[8] = 9;
        let mut trailing = body.clone();
        trailing.push(0);
        let cases: Vec<(Vec<u8>, Invalid)> = vec![
            (body[..body.len() - 1].to_vec(), Invalid::Truncated),
            (body[..10].to_vec(), Invalid::Truncated),
            (Vec::new(), Invalid::Truncated),
            (flipped, Invalid::Checksum),
            (header_flipped, Invalid::HeaderChecksum),
            (version, Invalid::Version(9)),
            (trailing, Invalid::Trailing),
            (b"nope".to_vec(), Invalid::BadMagic),
            (b"HAVENTSX and more".to_vec(), Invalid::BadMagic),
        ];
        for (bytes, why) in cases {
            for size in [1, 5, bytes.len().max(1)] {
                let chunks: Vec<Bytes> = bytes.chunks(size).map(Bytes::copy_from_slice).collect();
                let got = receiver(path, true).await.read(chunks);
                assert_eq!(reason(got), why);
                assert!(names(path).is_empty(), "{why}: no temporary file left");
            }
        }
    }

    #[tokio::test]
    async fn the_app_sees_every_byte_and_checks_the_lengths() {
        #[derive(Default)]
        struct Count([Vec<u8>; 2]);
        impl Inspect for Count {
            type Reason = Invalid;
            fn lengths(&mut self, header: Header) -> Result<(), Invalid> {
                if header.second_len == 0 {
                    return Err(Invalid::Truncated);
                }
                Ok(())
            }
            fn bytes(&mut self, part: usize, bytes: &[u8]) {
                self.0[part].extend_from_slice(bytes);
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        let create = |lock: OwnedMutexGuard<()>| {
            Receiver::create(MAGIC, files(dir.path(), false), Count::default(), lock).unwrap()
        };
        let body = Bytes::from(frame(&MAGIC, b"ab", b"cde"));
        let received =
            create(lock.clone().lock_owned().await).read([body.slice(..35), body.slice(35..)]);
        let received = received.ok().unwrap();
        assert_eq!(received.inspect.0, [b"ab".to_vec(), b"cde".to_vec()]);
        drop(received);
        let body = Bytes::from(frame(&MAGIC, b"ab", b""));
        let got = create(lock.lock_owned().await).read([body]);
        assert!(matches!(
            got,
            Err(ReceiveError::Invalid(Invalid::Truncated))
        ));
    }
}
