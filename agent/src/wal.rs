//! Archived PostgreSQL WAL: how a WAL file becomes a snapshot.
//!
//! Each WAL file (segment, timeline history, backup label) is one snapshot of the catalog
//! source `SOURCE.wal`, whose id is the file's name in lower case, holding one file of
//! that name. Ids make the archive addressable by name (`exclave-restore wal-fetch`) and
//! make a second push of the same file a no-op: the cluster answers a commit of an
//! existing id with the snapshot already there, and the agent compares roots.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// The catalog source holding the WAL of `source`.
pub fn catalog_source(source: &str) -> Result<String> {
    let s = format!("{source}.wal");
    exclave::identity::check_name("source name", &s).context("the WAL source name (SOURCE.wal) is too long")?;
    Ok(s)
}

/// The snapshot id of a WAL file name (`000000010000000000000003`, `00000002.history`...).
pub fn snapshot_id(name: &str) -> Result<String> {
    let id = name.to_ascii_lowercase();
    let looks_like_wal = name.len() >= 8 && name.chars().take(8).all(|c| c.is_ascii_hexdigit());
    if !looks_like_wal || exclave::identity::check_name("WAL file name", &id).is_err() {
        bail!("{name:?} is not a PostgreSQL WAL file name");
    }
    Ok(id)
}

/// Reads a WAL file whole (a segment is 16 MiB by default).
pub fn read(path: &Path) -> Result<(String, Vec<u8>)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string();
    snapshot_id(&name)?;
    let data = std::fs::read(path).with_context(|| format!("reading WAL file {}", path.display()))?;
    Ok((name, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names_map_to_snapshot_ids() {
        assert_eq!(snapshot_id("00000001000000000000000A").unwrap(), "00000001000000000000000a");
        assert_eq!(snapshot_id("00000002.history").unwrap(), "00000002.history");
        assert_eq!(
            snapshot_id("000000010000000000000002.00000028.backup").unwrap(),
            "000000010000000000000002.00000028.backup"
        );
        assert!(snapshot_id("postgresql.conf").is_err());
        assert!(snapshot_id("../00000001").is_err());
        assert_eq!(catalog_source("rnpp-db").unwrap(), "rnpp-db.wal");
        assert!(catalog_source(&"x".repeat(61)).is_err());
    }
}
