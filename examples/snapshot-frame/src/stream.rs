//! Streaming a snapshot out.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::format::{CHUNK_LEN, HEADER_LEN, Header, Magic};
use crate::fsutil::{IoError, io_err, read_exact_at};

/// One file to stream: a handle that keeps its bytes (the app only appends
/// to it, or renames new files over it), and the length that holds exactly
/// the changes answered so far.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: Arc<File>,
    pub len: u64,
    /// Named in errors.
    pub path: PathBuf,
}

/// The `200` answer to `GET /_haven/snapshot` with a streamed `body` of `len`
/// bytes: `application/octet-stream`, `Content-Length` set. A read error
/// mid-way aborts the body, which the client sees as a short one.
pub fn snapshot_response(len: u64, body: Body) -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(len)),
        ],
        body,
    )
        .into_response()
}

/// One snapshot being streamed: header, the two files, trailer.
#[derive(Debug)]
pub struct Streamer {
    magic: Magic,
    /// `None` for an absent (optional) file, streamed as length `0`.
    sources: [Option<Source>; 2],
    header: Header,
    offset: u64,
    crc: crc32fast::Hasher,
}

impl Streamer {
    /// A snapshot of `sources`, in frame order, under `magic`.
    pub fn new(magic: Magic, sources: [Option<Source>; 2]) -> Streamer {
        let [first_len, second_len] = sources.each_ref().map(|s| s.as_ref().map_or(0, |s| s.len));
        Streamer {
            magic,
            sources,
            header: Header {
                first_len,
                second_len,
            },
            offset: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    /// The whole snapshot's length.
    pub fn total_len(&self) -> u64 {
        self.header.total_len().unwrap_or(u64::MAX)
    }

    /// The snapshot as a streamed body.
    pub fn into_body(self) -> Body {
        Body::from_stream(futures::stream::try_unfold(self, Streamer::next))
    }

    /// The answer to `GET /_haven/snapshot`: see [`snapshot_response`].
    pub fn into_response(self) -> Response {
        snapshot_response(self.total_len(), self.into_body())
    }

    /// The next chunk, with the streamer to continue from.
    async fn next(mut self) -> Result<Option<(Bytes, Streamer)>, IoError> {
        let chunk = if self.offset == 0 {
            Bytes::from(self.header.encode(&self.magic))
        } else if self.offset < self.header.body_end() {
            self.read_chunk().await?
        } else if self.offset < self.total_len() {
            let trailer = Bytes::copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
            self.offset = self.total_len();
            return Ok(Some((trailer, self)));
        } else {
            return Ok(None);
        };
        self.crc.update(&chunk);
        self.offset += chunk.len() as u64;
        Ok(Some((chunk, self)))
    }

    /// Reads the next at most [`CHUNK_LEN`] bytes of the file being streamed.
    async fn read_chunk(&self) -> Result<Bytes, IoError> {
        let part = usize::from(self.offset >= self.header.first_end());
        let start = [HEADER_LEN, self.header.first_end()][part];
        let end = self.header.ends()[part];
        let Some(source) = self.sources[part].clone() else {
            // Unreachable: an absent file has length 0.
            return Err(IoError {
                path: PathBuf::new(),
                action: "read an absent file for a snapshot",
                source: io::ErrorKind::NotFound.into(),
            });
        };
        let at = self.offset - start;
        let len = usize::try_from(CHUNK_LEN.min(end - self.offset)).unwrap_or(0);
        let path = source.path.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; len];
            read_exact_at(&source.file, &mut buf, at)
                .map_err(io_err(&source.path, "read the files for a snapshot"))?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| io_err(&path, "read the files for a snapshot")(io::Error::other(e)))?
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use futures::TryStreamExt;

    use super::*;
    use crate::format::frame;

    const MAGIC: Magic = *b"HAVENTST";

    async fn collect(streamer: Streamer) -> Vec<u8> {
        let chunks: Vec<Bytes> = futures::stream::try_unfold(streamer, Streamer::next)
            .try_collect()
            .await
            .unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn streams_the_noted_lengths_in_the_frame() {
        let dir = tempfile::tempdir().unwrap();
        let source = |name: &str, content: &[u8], len: u64| {
            let path = dir.path().join(name);
            let mut file = File::create(&path).unwrap();
            file.write_all(content).unwrap();
            Some(Source {
                file: Arc::new(File::open(&path).unwrap()),
                len,
                path,
            })
        };
        let big: Vec<u8> = (0..CHUNK_LEN as usize * 2 + 5).map(|i| i as u8).collect();
        // Bytes past the noted length (a later append) are not streamed.
        let streamer = Streamer::new(
            MAGIC,
            [
                source("a", b"first+", 5),
                source("b", &big, big.len() as u64),
            ],
        );
        assert_eq!(streamer.total_len(), HEADER_LEN + 5 + big.len() as u64 + 4);
        assert_eq!(collect(streamer).await, frame(&MAGIC, b"first", &big));
        let streamer = Streamer::new(MAGIC, [None, source("c", b"x", 1)]);
        assert_eq!(collect(streamer).await, frame(&MAGIC, b"", b"x"));
        let response = Streamer::new(MAGIC, [None, None]).into_response();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_LENGTH], "36");
    }
}
