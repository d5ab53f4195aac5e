//! Archived PostgreSQL WAL: reading the file `wal-push` is given. Naming is shared with the
//! restore side (`exclave::wal`); a second push of the same file is a no-op because the
//! cluster answers a commit of an existing id with the snapshot already there, and the
//! agent compares roots.

use std::path::Path;

use anyhow::{Context, Result};

/// Reads a WAL file whole (a segment is 16 MiB by default).
pub fn read(path: &Path) -> Result<(String, Vec<u8>)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string();
    exclave::wal::check_file_name(&name)?;
    let data = std::fs::read(path).with_context(|| format!("reading WAL file {}", path.display()))?;
    Ok((name, data))
}
