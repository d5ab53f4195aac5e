//! Walking a `path` source: what is backed up, in what order, and what happens when the
//! tree changes underneath.
//!
//! Each backed-up path becomes a root named after its last component; entries are visited
//! depth-first in name order (parents before children), symlinks are recorded, never
//! followed. A file that vanishes between listing and reading, or cannot be read, is
//! skipped with a warning; a file that changes while being read is kept as read, with a
//! warning. Devices, sockets and FIFOs are skipped (reading a FIFO would block forever).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use exclave::manifest::{Entry, EntryKind};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("source path {0} does not exist")]
    Missing(PathBuf),
    #[error("cannot read source path {path}: {err}")]
    Unreadable { path: PathBuf, err: std::io::Error },
    #[error("two source paths share the name {0:?}; back them up as separate sources")]
    DuplicateRoot(String),
}

/// One thing to back up, as listed.
#[derive(Debug, Clone)]
pub struct Listed {
    pub fs_path: PathBuf,
    pub entry: Entry,
}

/// A validated root: a path and the name it gets in the snapshot.
#[derive(Debug, Clone)]
pub struct Root {
    pub path: PathBuf,
    pub name: String,
}

pub fn roots(paths: &[PathBuf]) -> Result<Vec<Root>, SourceError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for p in paths {
        std::fs::symlink_metadata(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SourceError::Missing(p.clone())
            } else {
                SourceError::Unreadable { path: p.clone(), err: e }
            }
        })?;
        let abs = std::path::absolute(p).map_err(|e| SourceError::Unreadable { path: p.clone(), err: e })?;
        let name = abs
            .components()
            .rfind(|c| matches!(c, std::path::Component::Normal(_)))
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".to_string());
        if !seen.insert(name.clone()) {
            return Err(SourceError::DuplicateRoot(name));
        }
        out.push(Root { path: p.clone(), name });
    }
    Ok(out)
}

/// Builds the manifest entry for one listed path (without chunks for files).
pub fn entry_for(rel: Vec<u8>, meta: &std::fs::Metadata, fs_path: &Path) -> Option<Entry> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_symlink() {
        let target = std::fs::read_link(fs_path).ok()?;
        EntryKind::Symlink { target: target.as_os_str().as_bytes().to_vec() }
    } else if ft.is_file() {
        EntryKind::File { size: meta.len(), blake3: [0; 32], chunks: Vec::new() }
    } else {
        return None;
    };
    Some(Entry {
        path: rel,
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
    })
}

/// Lists a root lazily, depth-first in name order. Errors inside the tree become warnings.
pub fn walk<'a>(root: &'a Root, warn: &'a mut dyn FnMut(String)) -> impl Iterator<Item = Listed> + 'a {
    walkdir::WalkDir::new(&root.path).follow_links(false).sort_by_file_name().into_iter().filter_map(move |item| {
        let de = match item {
            Ok(de) => de,
            Err(e) => {
                let p = e.path().map(|p| p.display().to_string()).unwrap_or_default();
                warn(format!("skipped {p}: {}", e.io_error().map(|e| e.to_string()).unwrap_or_else(|| e.to_string())));
                return None;
            }
        };
        let mut rel = root.name.as_bytes().to_vec();
        if let Ok(suffix) = de.path().strip_prefix(&root.path)
            && !suffix.as_os_str().is_empty()
        {
            rel.push(b'/');
            rel.extend_from_slice(suffix.as_os_str().as_bytes());
        }
        let meta = match de.metadata() {
            Ok(m) => m,
            Err(e) => {
                warn(format!("skipped {}: {e}", de.path().display()));
                return None;
            }
        };
        match entry_for(rel, &meta, de.path()) {
            Some(entry) => Some(Listed { fs_path: de.path().to_path_buf(), entry }),
            None => {
                warn(format!("skipped {}: not a regular file, directory or symlink", de.path().display()));
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_named_and_checked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/rnpp")).unwrap();
        std::fs::create_dir_all(d.path().join("b/rnpp")).unwrap();
        let r = roots(&[d.path().join("a/rnpp")]).unwrap();
        assert_eq!(r[0].name, "rnpp");
        assert!(matches!(
            roots(&[d.path().join("a/rnpp"), d.path().join("b/rnpp")]),
            Err(SourceError::DuplicateRoot(_))
        ));
        assert!(matches!(roots(&[d.path().join("nope")]), Err(SourceError::Missing(_))));
    }

    #[test]
    fn walk_lists_parents_first_in_name_order_and_skips_fifos() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("src");
        std::fs::create_dir_all(base.join("b/empty")).unwrap();
        std::fs::write(base.join("b/z.txt"), b"z").unwrap();
        std::fs::write(base.join("a.txt"), b"a").unwrap();
        std::os::unix::fs::symlink("a.txt", base.join("link")).unwrap();
        let fifo = std::ffi::CString::new(base.join("pipe").as_os_str().as_bytes()).unwrap();
        // mkfifo has no safe std wrapper; the path is a valid C string.
        #[allow(unsafe_code)]
        unsafe {
            libc::mkfifo(fifo.as_ptr(), 0o644)
        };
        let root = roots(&[base]).unwrap().remove(0);
        let mut warnings = Vec::new();
        let mut w = |m: String| warnings.push(m);
        let paths: Vec<String> = walk(&root, &mut w).map(|l| l.entry.path_lossy()).collect();
        assert_eq!(paths, ["src", "src/a.txt", "src/b", "src/b/empty", "src/b/z.txt", "src/link"]);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("pipe"));
    }
}
