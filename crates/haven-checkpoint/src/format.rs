//! The checkpoint file: one compressed copy of an app's state at one Raft log index.
//!
//! ```text
//! "HVNCKPT1" | zstd(payload) | trailer (postcard) | trailer len u32 LE | CRC32(trailer) u32 LE | "HVNCKEND"
//! ```
//!
//! The trailer with its length and CRC is a `haven_frame` footer.
//!
//! The payload is a tar of the app's data directory (managed mode) or the raw bytes the
//! app's snapshot endpoint returned (hooks mode). The metadata sits at the end because
//! the checksum and sizes are only known once the payload has been streamed; reading it
//! costs three small positioned reads, so listing thousands of checkpoints stays cheap.
//! The trailer carries the payload length, so the file length must match exactly; a
//! torn or truncated file is recognised by its missing end marker or that mismatch.
//!
//! Everything here is blocking `std::fs` (callers use `spawn_blocking`) and streams
//! through fixed buffers: no function holds a whole payload in memory.

use std::fmt;
use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::BufReader;
use std::io::BufWriter;
use std::io::Read;
use std::io::Seek;
use std::io::SeekFrom;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Deserialize;
use serde::Serialize;

use crate::dirtar;
use crate::dirtar::CopyFailure;
use crate::dirtar::UnpackError;

/// First bytes of every checkpoint file.
pub const MAGIC: &[u8; 8] = b"HVNCKPT1";
/// Last bytes of a completely written checkpoint file.
pub const END_MAGIC: &[u8; 8] = b"HVNCKEND";
/// Trailer length and CRC (the `haven_frame` footer), end magic.
const FOOTER_LEN: u64 = (haven_frame::FOOTER_LEN + END_MAGIC.len()) as u64;
const MIN_LEN: u64 = MAGIC.len() as u64 + FOOTER_LEN;
const TRAILER_VERSION: u32 = 1;
/// A sanity bound so a damaged length cannot make us allocate gigabytes.
const MAX_TRAILER: u64 = 256 << 20;
/// Buffer for streaming to and from checkpoint files.
const BUF: usize = 1 << 20;
/// zstd's default level: fast enough to not dominate a capture, a good ratio on app data.
const ZSTD_LEVEL: i32 = 3;
/// File name prefix of files being written; anything with it is debris after a crash.
pub const TEMP_PREFIX: &str = ".tmp-";

/// How the app's state was captured, which also fixes the payload's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaptureMode {
    /// The app's snapshot endpoint returned the bytes; the payload is those bytes.
    Hooks,
    /// Haven copied the app's data directory; the payload is a tar of it.
    Managed,
}

impl fmt::Display for CaptureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CaptureMode::Hooks => "hooks",
            CaptureMode::Managed => "managed",
        })
    }
}

/// What the caller knows before writing.
#[derive(Debug, Clone)]
pub struct CheckpointSpec {
    pub cluster: String,
    pub index: u64,
    pub term: u64,
    /// Entry time of the last applied entry.
    pub entry_time_us: i64,
    pub mode: CaptureMode,
    /// Opaque bytes owned by the caller.
    pub haven_state: Vec<u8>,
}

/// A checkpoint's metadata, as read from its trailer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub cluster: String,
    pub index: u64,
    pub term: u64,
    pub entry_time_us: i64,
    /// Wall clock when the file was written.
    pub created_us: i64,
    pub mode: CaptureMode,
    /// Uncompressed payload bytes.
    pub app_bytes: u64,
    /// Whole file bytes.
    pub size: u64,
    /// blake3 hex of the compressed payload bytes.
    pub checksum: String,
    /// Where the file was read from or written to (not stored in the file).
    #[serde(skip)]
    pub path: PathBuf,
    pub haven_state: Vec<u8>,
}

/// Where the payload comes from: a directory (managed) or one file (hooks).
#[derive(Debug, Clone, Copy)]
pub enum PayloadSource<'a> {
    Directory(&'a Path),
    File(&'a Path),
}

/// Every message names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file is not a complete, intact checkpoint; `reason` says what is wrong.
    #[error("corrupt checkpoint {}: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot {action} {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// The caller asked for something impossible (e.g. a non-empty extract target).
    #[error("{}: {reason}", .path.display())]
    Invalid { path: PathBuf, reason: String },
}

/// What the trailer stores; `CheckpointInfo` minus what the file itself says, plus the
/// payload length. The version lets a later layout be told apart (postcard is not
/// self-describing).
#[derive(Serialize, Deserialize)]
struct Trailer {
    version: u32,
    cluster: String,
    index: u64,
    term: u64,
    entry_time_us: i64,
    created_us: i64,
    mode: CaptureMode,
    app_bytes: u64,
    payload_len: u64,
    checksum: [u8; 32],
    haven_state: Vec<u8>,
}

impl Trailer {
    fn into_info(self, path: PathBuf, size: u64) -> CheckpointInfo {
        CheckpointInfo {
            cluster: self.cluster,
            index: self.index,
            term: self.term,
            entry_time_us: self.entry_time_us,
            created_us: self.created_us,
            mode: self.mode,
            app_bytes: self.app_bytes,
            size,
            checksum: blake3::Hash::from_bytes(self.checksum).to_hex().to_string(),
            path,
            haven_state: self.haven_state,
        }
    }
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io {
        path,
        action,
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// `ckpt-{index:020}-{term:020}.hvc`: zero padding makes lexical order index order.
pub fn file_name(index: u64, term: u64) -> String {
    format!("ckpt-{index:020}-{term:020}.hvc")
}

/// The `(index, term)` in a name made by [`file_name`]; `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let middle = name.strip_prefix("ckpt-")?.strip_suffix(".hvc")?;
    let (index, term) = middle.split_once('-')?;
    let number = |s: &str| {
        (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    Some((number(index)?, number(term)?))
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Streams source -> (tar if a directory) -> zstd (level 3, single thread) -> a
/// blake3-hashing counting writer -> a temp file `dir/.tmp-<index>-<random>`, fsyncs it,
/// renames it to `dir/<file_name(index, term)>` (replacing a checkpoint of the same index
/// and term) and fsyncs `dir`, so a crash leaves either no file or a complete one under
/// the final name. Creates `dir` if missing. `Managed` takes a directory, `Hooks` a file.
pub fn write(
    dir: &Path,
    spec: CheckpointSpec,
    source: PayloadSource<'_>,
) -> Result<CheckpointInfo, CheckpointError> {
    write_created_at(dir, spec, source, now_us())
}

/// [`write`] with the creation time given, so tests can age checkpoints.
pub(super) fn write_created_at(
    dir: &Path,
    spec: CheckpointSpec,
    source: PayloadSource<'_>,
    created_us: i64,
) -> Result<CheckpointInfo, CheckpointError> {
    match (spec.mode, source) {
        (CaptureMode::Managed, PayloadSource::Directory(root)) => {
            let fill = |out: &mut Chain| dirtar::tar_directory(root, out).map(drop);
            write_with(dir, spec, created_us, (root, "archive"), fill)
        }
        (CaptureMode::Hooks, PayloadSource::File(file)) => {
            let fill = |out: &mut Chain| io::copy(&mut File::open(file)?, out).map(drop);
            write_with(dir, spec, created_us, (file, "read"), fill)
        }
        (mode, PayloadSource::Directory(path) | PayloadSource::File(path)) => Err(invalid(
            path,
            format!(
                "a {mode} checkpoint takes a {}",
                if mode == CaptureMode::Managed {
                    "directory"
                } else {
                    "file"
                }
            ),
        )),
    }
}

/// The writer chain the payload goes into: uncompressed count, zstd, compressed
/// count and hash, buffered file.
type Chain = CountingWriter<zstd::stream::write::Encoder<'static, HashingWriter<BufWriter<File>>>>;

/// Writes a checkpoint whose payload `fill` produces; `source` names the input and the
/// verb used when reading it fails.
fn write_with(
    dir: &Path,
    spec: CheckpointSpec,
    created_us: i64,
    source: (&Path, &'static str),
    fill: impl FnOnce(&mut Chain) -> io::Result<()>,
) -> Result<CheckpointInfo, CheckpointError> {
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let tmp = TempPath::new(dir.join(format!(
        "{TEMP_PREFIX}{}-{:016x}",
        spec.index,
        rand::random::<u64>()
    )));
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp.path)
        .map_err(io_err(&tmp.path, "create"))?;
    let mut out = BufWriter::with_capacity(BUF, file);
    out.write_all(MAGIC).map_err(io_err(&tmp.path, "write"))?;
    let encoder = zstd::stream::write::Encoder::new(HashingWriter::new(out), ZSTD_LEVEL)
        .map_err(io_err(&tmp.path, "start compressing"))?;
    let mut chain = CountingWriter {
        inner: encoder,
        count: 0,
    };
    if let Err(e) = fill(&mut chain) {
        let blame = if chain.inner.get_ref().failed {
            (tmp.path.as_path(), "write")
        } else {
            source
        };
        return Err(io_err(blame.0, blame.1)(e));
    }
    let app_bytes = chain.count;
    let sink = chain.inner.finish().map_err(io_err(&tmp.path, "write"))?;
    let trailer = Trailer {
        version: TRAILER_VERSION,
        cluster: spec.cluster,
        index: spec.index,
        term: spec.term,
        entry_time_us: spec.entry_time_us,
        created_us,
        mode: spec.mode,
        app_bytes,
        payload_len: sink.bytes,
        checksum: *sink.hasher.finalize().as_bytes(),
        haven_state: spec.haven_state,
    };
    let size = finish_file(&tmp.path, sink.inner, &trailer)?;
    let path = dir.join(file_name(trailer.index, trailer.term));
    fs::rename(&tmp.path, &path).map_err(io_err(&path, "rename into place"))?;
    tmp.disarm();
    sync_dir(dir)?;
    Ok(trailer.into_info(path, size))
}

/// Appends trailer and footer, flushes and fsyncs; returns the file's length.
fn finish_file(
    tmp: &Path,
    mut out: BufWriter<File>,
    trailer: &Trailer,
) -> Result<u64, CheckpointError> {
    let bytes = postcard::to_stdvec(trailer)
        .map_err(|e| invalid(tmp, format!("cannot encode the trailer: {e}")))?;
    let len = bytes.len() as u64;
    if len > MAX_TRAILER {
        return Err(invalid(
            tmp,
            format!("trailer of {len} bytes exceeds {MAX_TRAILER} (haven_state too large)"),
        ));
    }
    let mut footer = Vec::with_capacity(bytes.len() + FOOTER_LEN as usize);
    haven_frame::append_footer(&mut footer, &bytes).map_err(|e| invalid(tmp, e.to_string()))?;
    footer.extend_from_slice(END_MAGIC);
    out.write_all(&footer).map_err(io_err(tmp, "write"))?;
    let file = out
        .into_inner()
        .map_err(|e| io_err(tmp, "write")(e.into_error()))?;
    file.sync_all().map_err(io_err(tmp, "fsync"))?;
    Ok(MAGIC.len() as u64 + trailer.payload_len + len + FOOTER_LEN)
}

/// Counts the uncompressed payload bytes.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts and hashes the compressed bytes on their way to the file, so the trailer gets
/// both without a second pass. Remembers a failed write so the error is blamed on the
/// checkpoint file, not on the source.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    bytes: u64,
    failed: bool,
}

impl<W> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: blake3::Hasher::new(),
            bytes: 0,
            failed: false,
        }
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf).inspect_err(|_| self.failed = true)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

/// A path deleted on drop unless disarmed: the temp file or tree of an unfinished write.
struct TempPath {
    path: PathBuf,
    armed: bool,
}

impl TempPath {
    fn new(path: PathBuf) -> Self {
        Self { path, armed: true }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if self.armed {
            let _ = dirtar::remove_tree(&self.path);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    haven_frame::sync_path(dir).map_err(io_err(dir, "fsync directory"))
}

/// An open checkpoint whose trailer checked out.
struct Opened {
    info: CheckpointInfo,
    file: File,
    payload_len: u64,
    checksum: [u8; 32],
}

/// Reads a checkpoint's metadata from its trailer only: checks the magic, the trailer's
/// CRC, and that the file length is exactly what the trailer implies. Does not read the
/// payload; [`verify`] does.
pub fn read_info(path: &Path) -> Result<CheckpointInfo, CheckpointError> {
    open(path).map(|opened| opened.info)
}

fn open(path: &Path) -> Result<Opened, CheckpointError> {
    let file = File::open(path).map_err(io_err(path, "open"))?;
    let len = file.metadata().map_err(io_err(path, "stat"))?.len();
    let read_at = |buf: &mut [u8], offset| {
        file.read_exact_at(buf, offset)
            .map_err(io_err(path, "read"))
    };
    let mut head = [0; MAGIC.len()];
    let head_len = head.len().min(len as usize);
    read_at(&mut head[..head_len], 0)?;
    if head[..head_len] != MAGIC[..head_len] {
        return Err(corrupt(path, "bad magic: not a Haven checkpoint"));
    }
    if len < MIN_LEN {
        return Err(corrupt(path, format!("truncated: only {len} bytes")));
    }
    let mut footer = [0; FOOTER_LEN as usize];
    read_at(&mut footer, len - FOOTER_LEN)?;
    let (trailer_len, stored_crc, end) = split_footer(&footer);
    if end != END_MAGIC {
        return Err(corrupt(path, "truncated or never finished: no end marker"));
    }
    if trailer_len > len - MIN_LEN || trailer_len > MAX_TRAILER {
        return Err(corrupt(
            path,
            format!("truncated: trailer length {trailer_len} does not fit the file of {len} bytes"),
        ));
    }
    let mut bytes = vec![0; trailer_len as usize];
    read_at(&mut bytes, len - FOOTER_LEN - trailer_len)?;
    let trailer = decode_trailer(path, &bytes, stored_crc)?;
    let expected = (MAGIC.len() as u64 + FOOTER_LEN + trailer_len).checked_add(trailer.payload_len);
    if expected != Some(len) {
        let expected = expected.map_or("more than 2^64".into(), |n| n.to_string());
        return Err(corrupt(
            path,
            format!("size mismatch (truncated?): trailer implies {expected} bytes, file has {len}"),
        ));
    }
    let (payload_len, checksum) = (trailer.payload_len, trailer.checksum);
    let info = trailer.into_info(path.to_path_buf(), len);
    Ok(Opened {
        info,
        file,
        payload_len,
        checksum,
    })
}

fn split_footer(footer: &[u8; FOOTER_LEN as usize]) -> (u64, u32, &[u8]) {
    let (framed, end) = footer.split_at(haven_frame::FOOTER_LEN);
    let mut frame_footer = [0; haven_frame::FOOTER_LEN];
    frame_footer.copy_from_slice(framed);
    let (len, crc) = haven_frame::parse_footer(&frame_footer);
    (len as u64, crc, end)
}

fn decode_trailer(path: &Path, bytes: &[u8], stored_crc: u32) -> Result<Trailer, CheckpointError> {
    if !haven_frame::checksum_matches(bytes, stored_crc) {
        let crc = crc32fast::hash(bytes);
        return Err(corrupt(
            path,
            format!("trailer CRC mismatch: stored {stored_crc:08x}, computed {crc:08x}"),
        ));
    }
    let (trailer, rest) = postcard::take_from_bytes::<Trailer>(bytes)
        .map_err(|e| corrupt(path, format!("undecodable trailer: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(
            path,
            format!("undecodable trailer: {} bytes left over", rest.len()),
        ));
    }
    if trailer.version != TRAILER_VERSION {
        return Err(corrupt(
            path,
            format!("unsupported trailer version {}", trailer.version),
        ));
    }
    Ok(trailer)
}

/// [`read_info`], then hashes the whole compressed payload and compares it with the
/// trailer's checksum: the check to run before trusting a file's contents.
pub fn verify(path: &Path) -> Result<CheckpointInfo, CheckpointError> {
    open_verified(path).map(|opened| opened.info)
}

fn open_verified(path: &Path) -> Result<Opened, CheckpointError> {
    let opened = open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0; BUF];
    let (mut offset, end) = (MAGIC.len() as u64, MAGIC.len() as u64 + opened.payload_len);
    while offset < end {
        let n = buf.len().min((end - offset) as usize);
        opened
            .file
            .read_exact_at(&mut buf[..n], offset)
            .map_err(io_err(path, "read"))?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    let actual = hasher.finalize();
    if actual != blake3::Hash::from_bytes(opened.checksum) {
        let reason = format!(
            "checksum mismatch: trailer says {}, payload hashes to {}",
            opened.info.checksum,
            actual.to_hex()
        );
        return Err(corrupt(path, reason));
    }
    Ok(opened)
}

/// The decompressed payload of a checkpoint (the tar stream for managed ones). Fails
/// with `InvalidData` if the payload does not decompress to the trailer's `app_bytes`.
pub struct PayloadReader {
    decoder: zstd::stream::read::Decoder<'static, BufReader<io::Take<File>>>,
    read: u64,
    expected: u64,
    path: PathBuf,
}

impl Read for PayloadReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let path = self.path.display();
        let n = self.decoder.read(buf).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("corrupt checkpoint {path}: undecodable payload: {e}"),
            )
        })?;
        self.read += n as u64;
        if n == 0 && !buf.is_empty() && self.read != self.expected {
            let reason = format!(
                "corrupt checkpoint {path}: payload decompresses to {} bytes, trailer says {}",
                self.read, self.expected
            );
            return Err(io::Error::new(io::ErrorKind::InvalidData, reason));
        }
        Ok(n)
    }
}

/// A reader of the decompressed payload of a checkpoint, verified first so corrupt data
/// is never handed out. The file stays open, so the reader is unaffected by a later
/// rename or delete of the path.
pub fn payload_reader(path: &Path) -> Result<(CheckpointInfo, PayloadReader), CheckpointError> {
    let Opened {
        info,
        mut file,
        payload_len,
        ..
    } = open_verified(path)?;
    file.seek(SeekFrom::Start(MAGIC.len() as u64))
        .map_err(io_err(path, "seek"))?;
    let buffered = BufReader::with_capacity(BUF, file.take(payload_len));
    let decoder = zstd::stream::read::Decoder::with_buffer(buffered)
        .map_err(io_err(path, "start decompressing"))?;
    let reader = PayloadReader {
        decoder,
        read: 0,
        expected: info.app_bytes,
        path: path.to_path_buf(),
    };
    Ok((info, reader))
}

/// Verifies, then unpacks: managed -> untar into `target`, which must not exist or be an
/// empty directory; hooks -> the raw bytes as the file `target`, which must not exist.
/// Unpacks into a temp sibling renamed at the end (and the parent fsynced), so a crash
/// never leaves a half-extracted tree under the final name; on error the sibling is
/// removed. Archive safety rules: see [`archive`].
pub fn extract(path: &Path, target: &Path) -> Result<CheckpointInfo, CheckpointError> {
    let (info, mut reader) = payload_reader(path)?;
    check_target(target, info.mode)?;
    let name = target
        .file_name()
        .ok_or_else(|| invalid(target, "extract target has no file name"))?;
    let parent = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_err(parent, "create directory"))?;
    let tmp = TempPath::new(parent.join(format!(
        ".{}.tmp-extract-{:016x}",
        name.to_string_lossy(),
        rand::random::<u64>()
    )));
    match info.mode {
        CaptureMode::Managed => unpack_tree(path, &mut reader, &tmp.path)?,
        CaptureMode::Hooks => unpack_file(path, &mut reader, &tmp.path)?,
    }
    fs::rename(&tmp.path, target).map_err(io_err(target, "rename into place"))?;
    tmp.disarm();
    sync_dir(parent)?;
    Ok(info)
}

/// Refuses a target that exists, except an empty directory for a managed checkpoint
/// (rename(2) replaces an empty directory atomically).
fn check_target(target: &Path, mode: CaptureMode) -> Result<(), CheckpointError> {
    let meta = match fs::symlink_metadata(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        result => result.map_err(io_err(target, "inspect"))?,
    };
    if mode == CaptureMode::Managed && meta.is_dir() {
        let mut entries = fs::read_dir(target).map_err(io_err(target, "list"))?;
        if entries.next().is_none() {
            return Ok(());
        }
        return Err(invalid(
            target,
            "extract target is a directory that is not empty",
        ));
    }
    Err(invalid(target, "extract target already exists"))
}

fn unpack_tree(path: &Path, reader: &mut PayloadReader, tmp: &Path) -> Result<(), CheckpointError> {
    fs::create_dir(tmp).map_err(io_err(tmp, "create directory"))?;
    dirtar::untar(&mut *reader, tmp).map_err(|e| match e {
        UnpackError::Archive(reason) => corrupt(path, reason),
        UnpackError::Io { path, source } => io_err(&path, "write")(source),
    })?;
    // Read to the end so the zstd frame and the app_bytes count are checked too.
    io::copy(reader, &mut io::sink())
        .map_err(|e| corrupt(path, format!("after the archive: {e}")))?;
    Ok(())
}

fn unpack_file(path: &Path, reader: &mut PayloadReader, tmp: &Path) -> Result<(), CheckpointError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io_err(tmp, "create"))?;
    match dirtar::copy_split(reader, &mut file, &mut vec![0; BUF]) {
        Err(CopyFailure::Read(e)) => return Err(corrupt(path, e.to_string())),
        Err(CopyFailure::Write(e)) => return Err(io_err(tmp, "write")(e)),
        Ok(_) => {}
    }
    file.sync_all().map_err(io_err(tmp, "fsync"))
}

/// Adopts a checkpoint received over the network (already written to `received`, inside
/// or outside `dir`): fsyncs and verifies it, then renames it into `dir` under its
/// canonical name (copying when `received` is on another file system) and fsyncs `dir`.
/// On error `received` stays where it is.
pub fn adopt(dir: &Path, received: &Path) -> Result<CheckpointInfo, CheckpointError> {
    haven_frame::sync_path(received).map_err(io_err(received, "fsync"))?;
    let mut info = verify(received)?;
    fs::create_dir_all(dir).map_err(io_err(dir, "create directory"))?;
    let path = dir.join(file_name(info.index, info.term));
    match fs::rename(received, &path) {
        Err(e) if e.kind() == io::ErrorKind::CrossesDevices => copy_in(dir, received, &path)?,
        result => result.map_err(io_err(&path, "rename into place"))?,
    }
    sync_dir(dir)?;
    info.path = path;
    Ok(info)
}

/// The cross-file-system half of [`adopt`]: copy to a temp file in `dir`, fsync, rename,
/// then remove `received`.
fn copy_in(dir: &Path, received: &Path, path: &Path) -> Result<(), CheckpointError> {
    let tmp = TempPath::new(dir.join(format!("{TEMP_PREFIX}adopt-{:016x}", rand::random::<u64>())));
    fs::copy(received, &tmp.path).map_err(io_err(received, "copy"))?;
    haven_frame::sync_path(&tmp.path).map_err(io_err(&tmp.path, "fsync"))?;
    fs::rename(&tmp.path, path).map_err(io_err(path, "rename into place"))?;
    tmp.disarm();
    if let Err(e) = fs::remove_file(received) {
        tracing::warn!(path = %received.display(), error = %e, "adopted checkpoint copied in, but the received file could not be removed");
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dirtar::tests::assert_same_tree;
    use crate::dirtar::tests::pseudo_random;
    use crate::dirtar::tests::sample_tree;
    use crate::testing::flip;
    use crate::testing::spec;

    fn trailer_len(path: &Path) -> u64 {
        let bytes = fs::read(path).unwrap();
        let at = bytes.len() - FOOTER_LEN as usize;
        u64::from(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()))
    }

    fn reason(e: CheckpointError) -> String {
        match e {
            CheckpointError::Corrupt { reason, .. } => reason,
            other => panic!("expected Corrupt, got {other}"),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn round_trip_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dir) = (tmp.path().join("src"), tmp.path().join("ckpts"));
        sample_tree(&src);
        let info = write(
            &dir,
            spec(42, 3, CaptureMode::Managed),
            PayloadSource::Directory(&src),
        )
        .unwrap();
        assert_eq!(
            info.path,
            dir.join("ckpt-00000000000000000042-00000000000000000003.hvc")
        );
        assert_eq!(
            names(&dir),
            ["ckpt-00000000000000000042-00000000000000000003.hvc"]
        );
        assert_eq!(info.size, fs::metadata(&info.path).unwrap().len());
        assert!(
            info.app_bytes > 5 << 20,
            "tar of the tree: {}",
            info.app_bytes
        );
        assert_eq!(
            (
                info.index,
                info.term,
                info.mode,
                info.haven_state.as_slice()
            ),
            (42, 3, CaptureMode::Managed, &[1, 2, 3, 42][..])
        );
        assert_eq!(read_info(&info.path).unwrap(), info);
        assert_eq!(verify(&info.path).unwrap(), info);
        let out = tmp.path().join("restored");
        assert_eq!(extract(&info.path, &out).unwrap(), info);
        assert_same_tree(&src, &out);
        assert_eq!(
            names(tmp.path()),
            ["ckpts", "restored", "src"],
            "no temp sibling left"
        );
    }

    #[test]
    fn extract_accepts_an_empty_target_directory_and_refuses_a_full_one() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dir) = (tmp.path().join("src"), tmp.path().join("ckpts"));
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"data").unwrap();
        let info = write(
            &dir,
            spec(1, 1, CaptureMode::Managed),
            PayloadSource::Directory(&src),
        )
        .unwrap();
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        extract(&info.path, &out).unwrap();
        assert_eq!(fs::read(out.join("f")).unwrap(), b"data");
        let e = extract(&info.path, &out).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: extract target is a directory that is not empty",
                out.display()
            )
        );
    }

    #[test]
    fn round_trip_file_payload() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dir) = (tmp.path().join("snapshot.bin"), tmp.path().join("ckpts"));
        let bytes = pseudo_random(3 << 20, 11);
        fs::write(&src, &bytes).unwrap();
        let info = write(
            &dir,
            spec(7, 1, CaptureMode::Hooks),
            PayloadSource::File(&src),
        )
        .unwrap();
        assert_eq!(
            (info.app_bytes, info.mode.to_string()),
            (bytes.len() as u64, "hooks".to_string())
        );
        let (read, mut reader) = payload_reader(&info.path).unwrap();
        assert_eq!(read, info);
        let mut payload = Vec::new();
        reader.read_to_end(&mut payload).unwrap();
        assert!(payload == bytes);
        let out = tmp.path().join("restored.bin");
        extract(&info.path, &out).unwrap();
        assert!(fs::read(&out).unwrap() == bytes);
        let e = extract(&info.path, &out).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{}: extract target already exists", out.display())
        );
    }

    #[test]
    fn empty_file_payload_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("empty");
        fs::write(&src, b"").unwrap();
        let info = write(
            tmp.path(),
            spec(1, 1, CaptureMode::Hooks),
            PayloadSource::File(&src),
        )
        .unwrap();
        let out = tmp.path().join("out");
        extract(&info.path, &out).unwrap();
        assert_eq!(fs::read(&out).unwrap(), b"");
    }

    #[test]
    fn same_directory_gives_the_same_checksum() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample_tree(&src);
        let a = write(
            &tmp.path().join("a"),
            spec(1, 1, CaptureMode::Managed),
            PayloadSource::Directory(&src),
        )
        .unwrap();
        let b = write(
            &tmp.path().join("b"),
            spec(1, 1, CaptureMode::Managed),
            PayloadSource::Directory(&src),
        )
        .unwrap();
        assert_eq!(a.checksum, b.checksum);
    }

    #[test]
    fn flipped_payload_byte_fails_verify_and_extract_with_checksum_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample_tree(&src);
        let info = write(
            &tmp.path().join("ckpts"),
            spec(5, 1, CaptureMode::Managed),
            PayloadSource::Directory(&src),
        )
        .unwrap();
        flip(&info.path, 1000);
        let bytes = fs::read(&info.path).unwrap();
        let payload_end = bytes.len() - FOOTER_LEN as usize - trailer_len(&info.path) as usize;
        let actual = blake3::hash(&bytes[MAGIC.len()..payload_end]).to_hex();
        let expected = format!(
            "corrupt checkpoint {}: checksum mismatch: trailer says {}, payload hashes to {actual}",
            info.path.display(),
            info.checksum
        );
        assert_eq!(
            read_info(&info.path).unwrap(),
            info,
            "the trailer alone is still fine"
        );
        assert_eq!(verify(&info.path).unwrap_err().to_string(), expected);
        assert!(payload_reader(&info.path).is_err());
        let out = tmp.path().join("out");
        assert_eq!(extract(&info.path, &out).unwrap_err().to_string(), expected);
        assert!(!out.exists());
        assert_eq!(names(tmp.path()), ["ckpts", "src"], "no temp sibling left");
    }

    #[test]
    fn flipped_trailer_byte_is_a_crc_error() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("f");
        fs::write(&src, b"state").unwrap();
        let info = write(
            tmp.path(),
            spec(5, 1, CaptureMode::Hooks),
            PayloadSource::File(&src),
        )
        .unwrap();
        flip(&info.path, info.size - FOOTER_LEN - 3);
        let reason = reason(read_info(&info.path).unwrap_err());
        assert!(
            reason.starts_with("trailer CRC mismatch: stored "),
            "{reason}"
        );
        let message = verify(&info.path).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!(
                "corrupt checkpoint {}: trailer CRC",
                info.path.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn truncated_file_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("f");
        fs::write(&src, pseudo_random(100_000, 3)).unwrap();
        let info = write(
            tmp.path(),
            spec(5, 1, CaptureMode::Hooks),
            PayloadSource::File(&src),
        )
        .unwrap();
        let whole = fs::read(&info.path).unwrap();
        for len in [
            whole.len() - 1,
            whole.len() - FOOTER_LEN as usize,
            whole.len() / 2,
            20,
            3,
            0,
        ] {
            fs::write(&info.path, &whole[..len]).unwrap();
            let reason = reason(read_info(&info.path).unwrap_err());
            assert!(reason.starts_with("truncated"), "{len} bytes: {reason}");
            assert!(extract(&info.path, &tmp.path().join("out")).is_err());
        }
        // Cut from the middle, footer intact: the size no longer matches the trailer.
        let mut cut = whole[..1000].to_vec();
        cut.extend_from_slice(&whole[2000..]);
        fs::write(&info.path, &cut).unwrap();
        let reason = reason(read_info(&info.path).unwrap_err());
        assert!(reason.starts_with("size mismatch (truncated?)"), "{reason}");
    }

    #[test]
    fn non_checkpoint_file_has_bad_magic() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp
            .path()
            .join("ckpt-00000000000000000001-00000000000000000001.hvc");
        fs::write(&path, b"{\"hello\": \"this is JSON, not a checkpoint\"}").unwrap();
        let e = read_info(&path).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "corrupt checkpoint {}: bad magic: not a Haven checkpoint",
                path.display()
            )
        );
        let e = read_info(&tmp.path().join("missing")).unwrap_err();
        assert!(
            matches!(e, CheckpointError::Io { action: "open", .. }),
            "{e}"
        );
    }

    #[test]
    fn extract_refuses_a_malicious_archive_and_leaves_no_target() {
        let tmp = tempfile::tempdir().unwrap();
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..9].copy_from_slice(b"../escape");
        header.set_size(4);
        header.set_mode(0o644);
        header.set_cksum();
        let fill = |out: &mut Chain| tar::Builder::new(out).append(&header, &b"boom"[..]);
        let dir = tmp.path().join("ckpts");
        let info = write_with(
            &dir,
            spec(9, 1, CaptureMode::Managed),
            0,
            (tmp.path(), "read"),
            fill,
        )
        .unwrap();
        verify(&info.path).unwrap();
        let out = tmp.path().join("out");
        let reason = reason(extract(&info.path, &out).unwrap_err());
        assert!(reason.contains("escapes the target"), "{reason}");
        assert!(!out.exists() && !tmp.path().join("escape").exists());
        assert_eq!(names(tmp.path()), ["ckpts"], "no temp sibling left");
    }

    #[test]
    fn write_errors_name_the_source_and_leave_no_debris() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing");
        let dir = tmp.path().join("ckpts");
        let e = write(
            &dir,
            spec(1, 1, CaptureMode::Hooks),
            PayloadSource::File(&missing),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot read {}: ", missing.display())),
            "{e}"
        );
        let e = write(
            &dir,
            spec(1, 1, CaptureMode::Managed),
            PayloadSource::Directory(&missing),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot archive {}: ", missing.display())),
            "{e}"
        );
        let e = write(
            &dir,
            spec(1, 1, CaptureMode::Managed),
            PayloadSource::File(&missing),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: a managed checkpoint takes a directory",
                missing.display()
            )
        );
        assert!(names(&dir).is_empty());
    }

    #[test]
    fn adopt_moves_a_verified_file_in() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("f");
        fs::write(&src, b"state").unwrap();
        let sent = write(
            &tmp.path().join("peer"),
            spec(12, 4, CaptureMode::Hooks),
            PayloadSource::File(&src),
        )
        .unwrap();
        let received = tmp.path().join("incoming.part");
        fs::rename(&sent.path, &received).unwrap();
        let dir = tmp.path().join("ckpts");
        let info = adopt(&dir, &received).unwrap();
        assert_eq!(info.path, dir.join(file_name(12, 4)));
        assert_eq!(
            info,
            CheckpointInfo {
                path: info.path.clone(),
                ..sent
            }
        );
        assert!(!received.exists());
        verify(&info.path).unwrap();
    }

    #[test]
    fn adopt_refuses_a_corrupt_file_and_leaves_it_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("f");
        fs::write(&src, pseudo_random(10_000, 5)).unwrap();
        let sent = write(
            &tmp.path().join("peer"),
            spec(12, 4, CaptureMode::Hooks),
            PayloadSource::File(&src),
        )
        .unwrap();
        flip(&sent.path, 100);
        let dir = tmp.path().join("ckpts");
        let reason = reason(adopt(&dir, &sent.path).unwrap_err());
        assert!(reason.starts_with("checksum mismatch"), "{reason}");
        assert!(sent.path.exists());
        assert!(!dir.join(file_name(12, 4)).exists());
    }

    #[test]
    fn file_names_sort_by_index_and_parse_back() {
        assert_eq!(
            file_name(7, 2),
            "ckpt-00000000000000000007-00000000000000000002.hvc"
        );
        assert!(file_name(9, 5) < file_name(10, 1));
        assert!(file_name(u64::MAX - 1, 9) < file_name(u64::MAX, 0));
        assert_eq!(
            parse_file_name(&file_name(u64::MAX, 3)),
            Some((u64::MAX, 3))
        );
        assert_eq!(parse_file_name("ckpt-1-2.hvc"), None);
        assert_eq!(parse_file_name(".tmp-1-abc"), None);
        assert_eq!(
            parse_file_name("ckpt-0000000000000000000a-00000000000000000002.hvc"),
            None
        );
    }

    #[test]
    fn payload_reader_is_send() {
        fn assert_send<T: Send + 'static>() {}
        assert_send::<PayloadReader>();
        assert_send::<CheckpointError>();
    }
}
