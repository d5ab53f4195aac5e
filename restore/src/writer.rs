//! Laying a snapshot out on disk (or, for `verify`, only checking it).
//!
//! Files are written in manifest order as their chunks arrive, hashed as they are written,
//! and checked against their recorded size and BLAKE3 at the end; then mode, owner (when run
//! as root) and mtime are set. Directory times are set last, deepest first, since writing
//! into a directory changes its mtime. A file that fails verification is removed, never left
//! looking complete, and named in the report. Nothing is ever written through a symlink.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use exclave::manifest::{Entry, EntryKind};
use filetime::FileTime;

use crate::fetch::Item;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub chunks: u64,
    /// Files that failed, each with the reason (naming the chunk).
    pub failures: Vec<Failure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

pub struct Writer {
    /// `None` for verify: check everything, write nothing.
    target: Option<PathBuf>,
    overwrite: bool,
    is_root: bool,
    current: Option<Current>,
    dirs: Vec<(PathBuf, Arc<Entry>)>,
    symlinks: HashSet<Vec<u8>>,
    pub report: Report,
    strip: Option<Vec<u8>>,
    /// Whether `finish` makes what was written durable (see `not_durable`).
    durable: bool,
}

struct Current {
    entry: Arc<Entry>,
    file: Option<File>,
    path: Option<PathBuf>,
    hasher: blake3::Hasher,
    written: u64,
    /// Bytes already handed to the disk (see `start_writeback`).
    flushed: u64,
    failed: Option<String>,
}

/// A target must be absent or empty unless `overwrite`. An absent one is created; the guard
/// returned removes it again if it is still empty when dropped before `keep`: a restore that
/// fails before writing (wrong key, no node, no such snapshot) leaves nothing behind.
pub fn check_target(target: &Path, overwrite: bool) -> Result<TargetGuard> {
    match std::fs::read_dir(target) {
        Ok(mut it) => {
            if it.next().is_some() && !overwrite {
                bail!("target {} is not empty; use --overwrite to restore into it anyway", target.display());
            }
            Ok(TargetGuard(None))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
            Ok(TargetGuard(Some(target.to_path_buf())))
        }
        Err(e) => Err(e).with_context(|| format!("reading target {}", target.display())),
    }
}

/// See `check_target`.
#[must_use = "dropping the guard removes the target it created"]
pub struct TargetGuard(Option<PathBuf>);

impl TargetGuard {
    /// The restore succeeded: the target stays, empty or not.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TargetGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            // Only an empty directory can be removed: what a restore wrote is never deleted.
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl Writer {
    pub fn new(target: Option<PathBuf>, overwrite: bool) -> Writer {
        Writer {
            target,
            overwrite,
            // SAFETY-free: geteuid has no preconditions.
            is_root: nix_is_root(),
            current: None,
            dirs: Vec::new(),
            symlinks: HashSet::new(),
            report: Report::default(),
            strip: None,
            durable: true,
        }
    }

    /// Leaves what is written to the kernel's own writeback: for a WAL file handed to
    /// PostgreSQL's `restore_command`, which needs it read, not durable (a recovery that
    /// crashes fetches it again; a spooled copy is checked before it is served). `syncfs`
    /// flushes the whole file system, so each fetch otherwise waited for every dirty page
    /// of the machine.
    pub fn not_durable(mut self) -> Writer {
        self.durable = false;
        self
    }

    /// Restores the tree under the top-level name `root` into the target itself (a
    /// point-in-time restore puts `pgdata/` where the operator asked for the data directory).
    pub fn strip_root(mut self, root: &str) -> Writer {
        self.strip = Some(root.as_bytes().to_vec());
        self
    }

    fn path_of(&self, e: &Entry) -> Option<PathBuf> {
        let rel: &[u8] = match &self.strip {
            Some(root) if e.path == *root => b"",
            Some(root) => e.path.strip_prefix(root.as_slice()).and_then(|r| r.strip_prefix(b"/")).unwrap_or(&e.path),
            None => &e.path,
        };
        self.target.as_ref().map(|t| if rel.is_empty() { t.clone() } else { t.join(std::ffi::OsStr::from_bytes(rel)) })
    }

    /// Refuses entries below a symlink restored earlier (a manifest cannot make us write
    /// through a link), and in overwrite mode below a pre-existing symlink.
    fn check_ancestors(&self, e: &Entry) -> Result<()> {
        let mut prefix = Vec::new();
        let parts: Vec<&[u8]> = e.path.split(|b| *b == b'/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(part);
            if self.symlinks.contains(&prefix) {
                bail!("{} lies below the symlink {}", e.path_lossy(), String::from_utf8_lossy(&prefix));
            }
            if self.overwrite
                && let Some(t) = &self.target
                && std::fs::symlink_metadata(t.join(std::ffi::OsStr::from_bytes(&prefix)))
                    .map(|m| m.file_type().is_symlink())
                    .unwrap_or(false)
            {
                bail!("{} lies below an existing symlink in the target", e.path_lossy());
            }
        }
        Ok(())
    }

    pub fn item(&mut self, item: Item) -> Result<()> {
        match item {
            Item::Begin(e) => self.begin(e),
            Item::Data { entry, offset, data } => {
                let Some(cur) = self.current.as_mut() else { return Ok(()) };
                if !Arc::ptr_eq(&cur.entry, &entry) || cur.failed.is_some() {
                    return Ok(());
                }
                self.report.chunks += 1;
                match data {
                    Ok(d) => {
                        debug_assert_eq!(offset, cur.written);
                        cur.hasher.update(&d);
                        cur.written += d.len() as u64;
                        if let Some(f) = cur.file.as_mut() {
                            if let Err(e) = f.write_all(&d) {
                                cur.failed = Some(format!("write failed: {e}"));
                            } else if self.durable && cur.written - cur.flushed >= WRITEBACK_STEP {
                                start_writeback(f, cur.flushed, cur.written);
                                cur.flushed = cur.written;
                            }
                        }
                    }
                    Err(e) => cur.failed = Some(format!("{e:#}")),
                }
                Ok(())
            }
            Item::End(e) => self.end(e),
        }
    }

    fn begin(&mut self, e: Arc<Entry>) -> Result<()> {
        let path = self.path_of(&e);
        let mut failed = self.check_ancestors(&e).err().map(|x| x.to_string());
        let mut file = None;
        if failed.is_none()
            && let Some(p) = &path
        {
            let r: std::io::Result<()> = (|| {
                if self.overwrite
                    && let Ok(m) = std::fs::symlink_metadata(p)
                    && !(m.is_dir() && matches!(e.kind, EntryKind::Dir))
                {
                    if m.is_dir() {
                        std::fs::remove_dir_all(p)?;
                    } else {
                        std::fs::remove_file(p)?;
                    }
                }
                match &e.kind {
                    EntryKind::Dir => std::fs::create_dir_all(p),
                    EntryKind::Symlink { target } => std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), p),
                    EntryKind::File { .. } => {
                        file = Some(std::fs::OpenOptions::new().write(true).create_new(true).open(p)?);
                        Ok(())
                    }
                }
            })();
            if let Err(err) = r {
                failed = Some(format!("cannot create: {err}"));
            }
        }
        if let EntryKind::Symlink { .. } = e.kind {
            self.symlinks.insert(e.path.clone());
        }
        self.current =
            Some(Current { entry: e, file, path, hasher: blake3::Hasher::new(), written: 0, flushed: 0, failed });
        Ok(())
    }

    fn end(&mut self, e: Arc<Entry>) -> Result<()> {
        let Some(mut cur) = self.current.take() else { return Ok(()) };
        if !Arc::ptr_eq(&cur.entry, &e) {
            bail!("restore stream out of order at {}", e.path_lossy());
        }
        // A small file's pages are left to the final syncfs: starting writeback of each one
        // is a syscall and a small I/O per file where one flush does them all.
        if let Some(f) = &cur.file
            && self.durable
            && cur.failed.is_none()
            && cur.written >= WRITEBACK_MIN
        {
            start_writeback(f, cur.flushed, cur.written);
        }
        if cur.failed.is_none()
            && let EntryKind::File { size, blake3, .. } = &e.kind
        {
            if cur.written != *size {
                cur.failed = Some(format!("restored {} bytes, the manifest says {size}", cur.written));
            } else if cur.hasher.finalize().as_bytes() != blake3 {
                cur.failed = Some("file BLAKE3 does not match the one recorded at backup".into());
            }
        }
        if let Some(why) = cur.failed {
            if let (Some(p), EntryKind::File { .. }) = (&cur.path, &e.kind) {
                let _ = std::fs::remove_file(p);
            }
            self.report.failures.push(Failure { path: e.path_lossy(), error: why });
            return Ok(());
        }
        match &e.kind {
            EntryKind::File { size, .. } => {
                self.report.files += 1;
                self.report.bytes += size;
            }
            EntryKind::Dir => self.report.dirs += 1,
            EntryKind::Symlink { .. } => self.report.symlinks += 1,
        }
        if let Some(p) = cur.path {
            match (&e.kind, cur.file.take()) {
                (EntryKind::Dir, _) => self.dirs.push((p, e)),
                // Through the open descriptor: no second open, no path walks.
                (EntryKind::File { .. }, Some(f)) => self.apply_file_metadata(f, &e),
                _ => self.apply_metadata(&p, &e),
            }
        }
        Ok(())
    }

    /// Owner (as root), mode, then times of a file just written, on its descriptor (owner
    /// first: changing it clears set-id bits the mode may set).
    fn apply_file_metadata(&mut self, f: File, e: &Entry) {
        let mtime = FileTime::from_unix_time(e.mtime_sec, e.mtime_nsec);
        let r = (|| {
            if self.is_root {
                std::os::unix::fs::fchown(&f, Some(e.uid), Some(e.gid))?;
            }
            f.set_permissions(std::fs::Permissions::from_mode(e.mode))?;
            filetime::set_file_handle_times(&f, Some(mtime), Some(mtime))
        })();
        if let Err(err) = r {
            self.report.failures.push(Failure { path: e.path_lossy(), error: format!("cannot set metadata: {err}") });
        }
    }

    fn apply_metadata(&mut self, p: &Path, e: &Entry) {
        let mtime = FileTime::from_unix_time(e.mtime_sec, e.mtime_nsec);
        let is_link = matches!(e.kind, EntryKind::Symlink { .. });
        if self.is_root {
            let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok();
            if let Some(c) = c {
                // lchown never follows a symlink; the path is a valid C string.
                #[allow(unsafe_code)]
                let _ = unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) };
            }
        }
        let r = if is_link {
            filetime::set_symlink_file_times(p, mtime, mtime)
        } else {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(e.mode))
                .and_then(|_| filetime::set_file_times(p, mtime, mtime))
        };
        if let Err(err) = r {
            self.report.failures.push(Failure { path: e.path_lossy(), error: format!("cannot set metadata: {err}") });
        }
    }

    /// Sets directory metadata, deepest first, then makes everything durable with one
    /// `syncfs` (one flush for the whole restore instead of one per file). Call once every
    /// entry is written.
    pub fn finish(&mut self) -> Result<&Report> {
        if let Some(cur) = self.current.take() {
            bail!("restore stream ended inside {}", cur.entry.path_lossy());
        }
        let mut dirs = std::mem::take(&mut self.dirs);
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, e) in dirs {
            self.apply_metadata(&p, &e);
        }
        if let Some(t) = self.target.as_ref().filter(|_| self.durable) {
            let dir = File::open(t).with_context(|| format!("opening {}", t.display()))?;
            nix::unistd::syncfs(&dir).with_context(|| format!("flushing {} to disk", t.display()))?;
        }
        Ok(&self.report)
    }
}

/// Dirty data of a file is handed to the disk every this many bytes.
const WRITEBACK_STEP: u64 = 32 << 20;
/// Files smaller than this are not handed to the disk one by one (see `end`).
const WRITEBACK_MIN: u64 = 1 << 20;

/// Starts writing `from..to` of `f` to disk without waiting for it, so that the disk works
/// while later files are fetched and the final `syncfs` finds little left to do (and dirty
/// pages never pile up in memory). Advisory: an error only means `syncfs` does the work.
fn start_writeback(f: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    if to > from {
        // sync_file_range only reads its arguments; the descriptor is open for the call.
        #[allow(unsafe_code)]
        let _ = unsafe {
            libc::sync_file_range(f.as_raw_fd(), from as i64, (to - from) as i64, libc::SYNC_FILE_RANGE_WRITE)
        };
    }
}

fn nix_is_root() -> bool {
    // geteuid cannot fail and has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}
