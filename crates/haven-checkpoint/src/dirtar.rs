//! Directory trees for checkpoints: copying a tree while the app is paused, and turning
//! a tree into a tar stream and back.
//!
//! The tar side is ours on both ends, so it stays small: regular files, directories and
//! symlinks, entries sorted by name and headers in [`tar::HeaderMode::Deterministic`] (no
//! owners, fixed mtime) so the same tree always gives the same bytes, and therefore the
//! same checksum. Permission bits are kept exactly, since apps care about them.
//!
//! Unpacking assumes the archive may be hostile (a checkpoint can arrive from a peer):
//! it refuses absolute paths and `..`, never writes through a symlink, and refuses
//! symlinks that resolve outside the target.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::fs::File;
use std::fs::OpenOptions;
use std::io;
use std::io::Read;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::symlink;
use std::path::Component;
use std::path::Path;
use std::path::PathBuf;

/// Permission bits kept in the archive and restored on unpack (rwx for all, setuid,
/// setgid, sticky).
const MODE_MASK: u32 = 0o7777;
/// Copy buffer for unpacking: large enough to keep syscalls few, small enough to not matter.
const COPY_BUF: usize = 256 << 10;
/// How many symlinks one resolution may follow before we call it a loop (as Linux does).
const MAX_LINK_HOPS: usize = 40;

/// Copies a directory tree for a consistent capture while the app is paused: regular
/// files with [`fs::copy`] (on Linux `copy_file_range`, a reflink on filesystems that
/// support it, so the pause stays short), directories, and symlinks as symlinks;
/// permissions are preserved. Sockets, FIFOs and device files are skipped: they are not
/// state. Returns the total bytes of regular files. `dst` must not exist.
pub fn copy_tree(src: &Path, dst: &Path) -> io::Result<u64> {
    let meta = fs::symlink_metadata(src).map_err(|e| at(src, e))?;
    if !meta.is_dir() {
        let reason = format!("{} is not a directory", src.display());
        return Err(io::Error::new(io::ErrorKind::InvalidInput, reason));
    }
    copy_dir(src, dst, &meta)
}

/// One directory of [`copy_tree`]; its permissions are set after its children are in,
/// so a read-only directory can still be filled.
fn copy_dir(src: &Path, dst: &Path, meta: &fs::Metadata) -> io::Result<u64> {
    fs::create_dir(dst).map_err(|e| at(dst, e))?;
    let mut total = 0;
    for entry in fs::read_dir(src).map_err(|e| at(src, e))? {
        let entry = entry.map_err(|e| at(src, e))?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let meta = fs::symlink_metadata(&from).map_err(|e| at(&from, e))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            total += copy_dir(&from, &to, &meta)?;
        } else if kind.is_file() {
            total += fs::copy(&from, &to).map_err(|e| at(&from, e))?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(|e| at(&from, e))?;
            symlink(&target, &to).map_err(|e| at(&to, e))?;
        } else {
            tracing::warn!(path = %from.display(), "skipping a special file (socket, FIFO or device) while copying app state");
        }
    }
    fs::set_permissions(dst, meta.permissions()).map_err(|e| at(dst, e))?;
    Ok(total)
}

/// Removes a tree (or a single file or symlink) if present; a missing path is not an
/// error. Retries once after making directories writable, because extracted trees keep
/// their permissions and a read-only directory cannot be emptied otherwise.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(at(path, e)),
    };
    let result = if meta.is_dir() {
        fs::remove_dir_all(path).or_else(|e| match e.kind() {
            io::ErrorKind::PermissionDenied => {
                make_writable(path)?;
                fs::remove_dir_all(path)
            }
            _ => Err(e),
        })
    } else {
        fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(at(path, e)),
        _ => Ok(()),
    }
}

/// Adds owner rwx to every directory under `dir` so its entries can be removed.
fn make_writable(dir: &Path) -> io::Result<()> {
    let mut perms = fs::symlink_metadata(dir)?.permissions();
    perms.set_mode(perms.mode() | 0o700);
    fs::set_permissions(dir, perms)?;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            make_writable(&entry.path())?;
        }
    }
    Ok(())
}

/// Writes `root`'s contents as a tar stream to `out`, paths relative to `root`, entries
/// sorted by name so the same tree gives the same bytes. Errors name the file. Returns
/// `out` after the end-of-archive blocks.
pub fn tar_directory<W: Write>(root: &Path, out: W) -> io::Result<W> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Deterministic);
    append_children(&mut builder, root, Path::new(""))?;
    builder.into_inner()
}

/// Appends the entries of `dir` (archived as `rel`) depth first, in name order.
fn append_children<W: Write>(
    builder: &mut tar::Builder<W>,
    dir: &Path,
    rel: &Path,
) -> io::Result<()> {
    let mut names = fs::read_dir(dir)
        .and_then(|entries| {
            entries
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<Vec<_>>>()
        })
        .map_err(|e| at(dir, e))?;
    names.sort();
    for name in names {
        let (path, rel) = (dir.join(&name), rel.join(&name));
        let meta = fs::symlink_metadata(&path).map_err(|e| at(&path, e))?;
        if meta.is_dir() {
            let mut header = header_for(&meta, 0);
            builder
                .append_data(&mut header, &rel, io::empty())
                .map_err(|e| at(&path, e))?;
            append_children(builder, &path, &rel)?;
        } else {
            append_leaf(builder, &path, &rel, &meta)?;
        }
    }
    Ok(())
}

/// Appends a regular file or a symlink; skips special files, which are not state.
fn append_leaf<W: Write>(
    builder: &mut tar::Builder<W>,
    path: &Path,
    rel: &Path,
    meta: &fs::Metadata,
) -> io::Result<()> {
    let kind = meta.file_type();
    let result = if kind.is_file() {
        let file = File::open(path)?;
        let mut header = header_for(meta, meta.len());
        builder.append_data(&mut header, rel, ExactReader::new(file, meta.len()))
    } else if kind.is_symlink() {
        let target = fs::read_link(path)?;
        builder.append_link(&mut header_for(meta, 0), rel, target)
    } else {
        tracing::warn!(path = %path.display(), "skipping a special file (socket, FIFO or device) while archiving app state");
        Ok(())
    };
    result.map_err(|e| at(path, e))
}

/// A deterministic header (no owner, fixed mtime) that still carries the exact
/// permission bits, which `HeaderMode::Deterministic` alone would reduce to 644/755.
fn header_for(meta: &fs::Metadata, size: u64) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(meta, tar::HeaderMode::Deterministic);
    header.set_mode(meta.permissions().mode() & MODE_MASK);
    header.set_size(size);
    header
}

/// Reads exactly `len` bytes of a file: a file that shrank after its header was written
/// would otherwise produce a silently broken archive, and one that grew would overrun it.
struct ExactReader {
    inner: io::Take<File>,
    remaining: u64,
}

impl ExactReader {
    fn new(file: File, len: u64) -> Self {
        Self {
            inner: file.take(len),
            remaining: len,
        }
    }
}

impl Read for ExactReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.remaining > 0 && !buf.is_empty() {
            let reason = format!(
                "file shrank by {} bytes while being archived",
                self.remaining
            );
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, reason));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

/// Why [`untar`] failed: the archive's fault, or the target file system's.
#[derive(Debug)]
pub enum UnpackError {
    /// Malformed, undecodable, or trying to escape the target; the reason says which.
    Archive(String),
    /// Writing into the target failed.
    Io { path: PathBuf, source: io::Error },
}

/// Which side of a copy failed: reading blames the source, writing the destination.
pub(crate) enum CopyFailure {
    Read(io::Error),
    Write(io::Error),
}

/// `io::copy` that says which side failed.
pub(crate) fn copy_split(
    reader: &mut impl Read,
    writer: &mut impl Write,
    buf: &mut [u8],
) -> Result<u64, CopyFailure> {
    let mut total = 0;
    loop {
        let n = match reader.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyFailure::Read(e)),
        };
        writer.write_all(&buf[..n]).map_err(CopyFailure::Write)?;
        total += n as u64;
    }
}

/// Unpacks a tar stream into `dest`, an existing empty directory. Files are fsynced,
/// then every directory, then directory permissions are applied deepest first (so a
/// read-only directory could still be filled). See the module doc for the safety rules.
pub fn untar<R: Read>(reader: R, dest: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(reader);
    let mut unpacker = Unpacker::new(dest);
    for entry in archive.entries().map_err(malformed)? {
        unpacker.unpack(entry.map_err(malformed)?)?;
    }
    unpacker.finish()
}

fn malformed(e: io::Error) -> UnpackError {
    UnpackError::Archive(format!("malformed archive: {e}"))
}

/// What unpacking has created so far, to check later entries against.
struct Unpacker<'a> {
    dest: &'a Path,
    /// Symlinks created, relative path -> target; nothing is ever written through one.
    links: HashMap<PathBuf, PathBuf>,
    /// Directories to fsync and whose mode to set at the end (`None`: keep default).
    dirs: HashMap<PathBuf, Option<u32>>,
    buf: Vec<u8>,
}

impl<'a> Unpacker<'a> {
    fn new(dest: &'a Path) -> Self {
        Self {
            dest,
            links: HashMap::new(),
            dirs: HashMap::from([(PathBuf::new(), None)]),
            buf: vec![0; COPY_BUF],
        }
    }

    fn unpack<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let rel = safe_relative(&entry.path().map_err(malformed)?)?;
        let kind = entry.header().entry_type();
        if kind == tar::EntryType::XGlobalHeader {
            return Ok(());
        }
        if rel.as_os_str().is_empty() {
            return match kind {
                tar::EntryType::Directory => Ok(()),
                _ => Err(UnpackError::Archive("entry with an empty path".into())),
            };
        }
        self.check_no_link_on_the_way(&rel)?;
        let mode = || {
            entry
                .header()
                .mode()
                .map(|mode| mode & MODE_MASK)
                .map_err(malformed)
        };
        match kind {
            tar::EntryType::Directory => self.directory(&rel, mode()?),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mode = mode()?;
                self.file(&rel, mode, &mut entry)
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name().map_err(malformed)?;
                let target =
                    target.ok_or_else(|| archive_error(&rel, "symlink without a target"))?;
                self.symlink(&rel, &target)
            }
            other => Err(archive_error(
                &rel,
                &format!("unsupported entry type {other:?}"),
            )),
        }
    }

    /// Refuses an entry whose path (or any parent of it) is a symlink we created: writing
    /// through it could land outside the target.
    fn check_no_link_on_the_way(&self, rel: &Path) -> Result<(), UnpackError> {
        let mut prefix = PathBuf::new();
        for component in rel.components() {
            prefix.push(component);
            if self.links.contains_key(&prefix) {
                let reason = format!("goes through the symlink `{}`", prefix.display());
                return Err(archive_error(rel, &reason));
            }
        }
        Ok(())
    }

    fn directory(&mut self, rel: &Path, mode: u32) -> Result<(), UnpackError> {
        self.parents(rel)?;
        let path = self.dest.join(rel);
        match fs::create_dir(&path) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists || !path.is_dir() => {
                return Err(UnpackError::Io { path, source: e });
            }
            _ => {}
        }
        self.dirs.insert(rel.to_path_buf(), Some(mode));
        Ok(())
    }

    /// Creates the parent directories of `rel` that no entry has created yet.
    fn parents(&mut self, rel: &Path) -> Result<(), UnpackError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        if self.dirs.contains_key(parent) {
            return Ok(());
        }
        let path = self.dest.join(parent);
        fs::create_dir_all(&path).map_err(|source| UnpackError::Io { path, source })?;
        let mut ancestor = PathBuf::new();
        for component in parent.components() {
            ancestor.push(component);
            self.dirs.entry(ancestor.clone()).or_insert(None);
        }
        Ok(())
    }

    fn file(&mut self, rel: &Path, mode: u32, data: &mut impl Read) -> Result<(), UnpackError> {
        self.parents(rel)?;
        let path = self.dest.join(rel);
        let io_error = |source| UnpackError::Io {
            path: path.clone(),
            source,
        };
        let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(archive_error(rel, "appears twice"));
            }
            result => result.map_err(io_error)?,
        };
        match copy_split(data, &mut file, &mut self.buf) {
            Err(CopyFailure::Read(e)) => return Err(malformed(e)),
            Err(CopyFailure::Write(e)) => return Err(io_error(e)),
            Ok(_) => {}
        }
        file.sync_all().map_err(io_error)?;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error)
    }

    fn symlink(&mut self, rel: &Path, target: &Path) -> Result<(), UnpackError> {
        if target.has_root() {
            return Err(archive_error(rel, "is a symlink to an absolute path"));
        }
        self.parents(rel)?;
        let path = self.dest.join(rel);
        match symlink(target, &path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(archive_error(rel, "appears twice"))
            }
            Err(source) => Err(UnpackError::Io { path, source }),
            Ok(()) => {
                self.links.insert(rel.to_path_buf(), target.to_path_buf());
                Ok(())
            }
        }
    }

    /// Checks every symlink against the final set of links (a link can be redirected by
    /// one created after it), fsyncs the directories, then sets their modes deepest first.
    fn finish(self) -> Result<(), UnpackError> {
        for link in self.links.keys() {
            if !resolves_inside(&self.links, link) {
                return Err(archive_error(
                    link,
                    "is a symlink that points outside the target (or loops)",
                ));
            }
        }
        let mut dirs: Vec<_> = self.dirs.into_iter().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, _) in &dirs {
            let path = self.dest.join(rel);
            haven_frame::sync_path(&path).map_err(|source| UnpackError::Io { path, source })?;
        }
        for (rel, mode) in dirs {
            let (path, Some(mode)) = (self.dest.join(rel), mode) else {
                continue;
            };
            fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                .map_err(|source| UnpackError::Io { path, source })?;
        }
        Ok(())
    }
}

fn archive_error(rel: &Path, what: &str) -> UnpackError {
    UnpackError::Archive(format!("archive entry `{}` {what}", rel.display()))
}

/// The entry path as plain names: refuses absolute paths and `..`, drops `.`.
fn safe_relative(path: &Path) -> Result<PathBuf, UnpackError> {
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(name) => rel.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(archive_error(path, "escapes the target (absolute or `..`)"));
            }
        }
    }
    Ok(rel)
}

/// One step of a path walk: a name, or `..`.
enum Step {
    Name(OsString),
    Up,
}

fn steps(path: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
    path.components().filter_map(|component| match component {
        Component::Normal(name) => Some(Step::Name(name.to_os_string())),
        Component::ParentDir => Some(Step::Up),
        _ => None,
    })
}

/// Whether the symlink at `link` resolves inside the target, following the other links
/// (lexical `..` alone is not enough: `b -> .` makes `a -> b/..` escape).
fn resolves_inside(links: &HashMap<PathBuf, PathBuf>, link: &Path) -> bool {
    let Some(target) = links.get(link) else {
        return true;
    };
    let mut at: Vec<OsString> = link
        .parent()
        .map(steps)
        .into_iter()
        .flatten()
        .filter_map(|s| match s {
            Step::Name(name) => Some(name),
            Step::Up => None,
        })
        .collect();
    let mut pending: VecDeque<Step> = steps(target).collect();
    let mut hops = 0;
    while let Some(step) = pending.pop_front() {
        match step {
            Step::Up if at.pop().is_none() => return false,
            Step::Up => {}
            Step::Name(name) => {
                at.push(name);
                let here: PathBuf = at.iter().collect();
                let Some(next) = links.get(&here) else {
                    continue;
                };
                hops += 1;
                if next.has_root() || hops > MAX_LINK_HOPS {
                    return false;
                }
                at.pop();
                for step in steps(next).rev() {
                    pending.push_front(step);
                }
            }
        }
    }
    true
}

/// Adds the path to an error's message, since `io::Error` alone does not say which file.
fn at(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic bytes that zstd cannot shrink much (xorshift64).
    pub(crate) fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            out.extend_from_slice(&seed.to_le_bytes());
        }
        out.truncate(len);
        out
    }

    fn set_mode(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Nested directories, an empty file, a 5 MB pseudo-random file, symlinks (one up a
    /// level, still inside), an empty directory, and unusual permission bits.
    pub(crate) fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("a/b/c")).unwrap();
        fs::create_dir(root.join("empty-dir")).unwrap();
        fs::write(root.join("empty"), b"").unwrap();
        fs::write(root.join("a/b/c/big.bin"), pseudo_random(5 << 20, 7)).unwrap();
        fs::write(root.join("a/notes.txt"), b"hello\n").unwrap();
        fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
        symlink("a/notes.txt", root.join("link")).unwrap();
        symlink("../run.sh", root.join("a/up")).unwrap();
        set_mode(&root.join("a/notes.txt"), 0o640);
        set_mode(&root.join("run.sh"), 0o755);
        set_mode(&root.join("a/b"), 0o750);
        set_mode(&root.join("empty-dir"), 0o700);
    }

    /// Asserts both trees hold the same names, kinds, permission bits, bytes and links.
    pub(crate) fn assert_same_tree(a: &Path, b: &Path) {
        let names = |dir: &Path| {
            let mut names: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(a), names(b), "{} vs {}", a.display(), b.display());
        for name in names(a) {
            let (x, y) = (a.join(&name), b.join(&name));
            let (mx, my) = (
                fs::symlink_metadata(&x).unwrap(),
                fs::symlink_metadata(&y).unwrap(),
            );
            assert_eq!(mx.file_type(), my.file_type(), "{}", y.display());
            if mx.is_symlink() {
                assert_eq!(fs::read_link(&x).unwrap(), fs::read_link(&y).unwrap());
                continue;
            }
            assert_eq!(
                mx.permissions().mode() & MODE_MASK,
                my.permissions().mode() & MODE_MASK,
                "{}",
                y.display()
            );
            if mx.is_dir() {
                assert_same_tree(&x, &y);
            } else {
                assert!(
                    fs::read(&x).unwrap() == fs::read(&y).unwrap(),
                    "{} differs",
                    y.display()
                );
            }
        }
    }

    #[test]
    fn copy_tree_copies_files_dirs_symlinks_and_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        sample_tree(&src);
        let bytes = copy_tree(&src, &dst).unwrap();
        assert_eq!(bytes, (5 << 20) + 6 + 10);
        assert_same_tree(&src, &dst);
    }

    #[test]
    fn copy_tree_refuses_an_existing_destination() {
        let tmp = tempfile::tempdir().unwrap();
        let (src, dst) = (tmp.path().join("src"), tmp.path().join("dst"));
        fs::create_dir(&src).unwrap();
        fs::create_dir(&dst).unwrap();
        let e = copy_tree(&src, &dst).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn remove_tree_removes_trees_files_and_ignores_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        sample_tree(&root);
        set_mode(&root.join("a/b"), 0o500);
        remove_tree(&root).unwrap();
        assert!(!root.exists());
        remove_tree(&root).unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        remove_tree(&file).unwrap();
        assert!(!file.exists());
    }

    #[test]
    fn tar_round_trips_and_is_deterministic() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        sample_tree(&src);
        let first = tar_directory(&src, Vec::new()).unwrap();
        let copy = tmp.path().join("copy");
        copy_tree(&src, &copy).unwrap();
        assert!(
            first == tar_directory(&copy, Vec::new()).unwrap(),
            "same tree, different tar bytes"
        );
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        untar(first.as_slice(), &out).unwrap();
        assert_same_tree(&src, &out);
    }

    /// A tar whose one entry has `name` written straight into the header, bypassing the
    /// checks `tar::Builder` makes, as a hostile peer would.
    fn raw_entry_tar(name: &[u8], data: &[u8]) -> Vec<u8> {
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        let mut builder = tar::Builder::new(Vec::new());
        builder.append(&header, data).unwrap();
        builder.into_inner().unwrap()
    }

    fn untar_error(tar: &[u8]) -> (String, PathBuf, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("a/b/out");
        fs::create_dir_all(&out).unwrap();
        match untar(tar, &out) {
            Err(UnpackError::Archive(reason)) => (reason, out, tmp),
            other => panic!("expected an archive error, got {other:?}"),
        }
    }

    #[test]
    fn untar_refuses_parent_dir_paths() {
        let (reason, out, _tmp) = untar_error(&raw_entry_tar(b"../../evil", b"boom"));
        assert!(reason.contains("escapes the target"), "{reason}");
        assert!(!out.join("../../evil").exists());
        let (reason, _, _tmp) = untar_error(&raw_entry_tar(b"ok/../../evil", b"boom"));
        assert!(reason.contains("escapes the target"), "{reason}");
    }

    #[test]
    fn untar_refuses_absolute_paths() {
        let (reason, _, _tmp) = untar_error(&raw_entry_tar(b"/tmp/haven-evil", b"boom"));
        assert!(reason.contains("escapes the target"), "{reason}");
        assert!(!Path::new("/tmp/haven-evil").exists());
    }

    fn links_tar(links: &[(&str, &str)], file: Option<&str>) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, target) in links {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            builder.append_link(&mut header, name, target).unwrap();
        }
        if let Some(name) = file {
            let mut header = tar::Header::new_gnu();
            header.set_size(4);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, name, &b"boom"[..])
                .unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn untar_refuses_symlinks_pointing_outside() {
        let (reason, _, _tmp) = untar_error(&links_tar(&[("l", "../../x")], None));
        assert!(reason.contains("points outside"), "{reason}");
        let (reason, _, _tmp) = untar_error(&links_tar(&[("l", "/etc/passwd")], None));
        assert!(reason.contains("absolute"), "{reason}");
        // Each link alone looks harmless; together `a` resolves to the target's parent.
        let (reason, _, _tmp) = untar_error(&links_tar(&[("a", "b/.."), ("b", ".")], None));
        assert!(
            reason.contains("`a` is a symlink that points outside"),
            "{reason}"
        );
        let (reason, _, _tmp) = untar_error(&links_tar(&[("a", "b"), ("b", "a")], None));
        assert!(
            reason.contains("points outside the target (or loops)"),
            "{reason}"
        );
    }

    #[test]
    fn untar_never_writes_through_a_symlink() {
        let (reason, out, _tmp) = untar_error(&links_tar(&[("d", "..")], Some("d/evil")));
        assert!(reason.contains("goes through the symlink `d`"), "{reason}");
        assert!(!out.join("../evil").exists());
    }

    #[test]
    fn untar_keeps_inside_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        fs::create_dir(&out).unwrap();
        untar(
            links_tar(&[("x/up", "../y"), ("self", ".")], Some("y")).as_slice(),
            &out,
        )
        .unwrap();
        assert_eq!(fs::read(out.join("x/up")).unwrap(), b"boom");
    }
}
