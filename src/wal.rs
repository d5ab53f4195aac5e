//! Naming of archived PostgreSQL WAL in the catalog, shared by `wal-push` and `wal-fetch`.
//!
//! Each WAL file (segment, timeline history, backup label) is one snapshot of the catalog
//! source `SOURCE.wal`. Snapshot ids are unique per tenant, and two database clusters of a
//! tenant both have a segment `000000010000000000000003`, so the id is the file's name in
//! lower case behind 12 hex digits of BLAKE3 of the source name:
//! `3fa2c1d09b7e-000000010000000000000003`. The id makes a file addressable by name
//! (`FindSnapshot`) and a second push of the same file a no-op.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WalNameError {
    #[error("{0:?} is not a PostgreSQL WAL file name")]
    NotWal(String),
    #[error("source name {0:?} is too long for its WAL source (SOURCE.wal, at most 64 characters)")]
    SourceTooLong(String),
}

/// The catalog source holding the WAL of `source`.
pub fn catalog_source(source: &str) -> Result<String, WalNameError> {
    let s = format!("{source}.wal");
    crate::identity::check_name("source name", &s).map_err(|_| WalNameError::SourceTooLong(source.to_string()))?;
    Ok(s)
}

/// Checks that `name` looks like a WAL file's name (segment, `.history`, `.backup`...).
pub fn check_file_name(name: &str) -> Result<(), WalNameError> {
    let looks_like_wal = name.len() >= 8
        && name.len() <= 48
        && name.chars().take(8).all(|c| c.is_ascii_hexdigit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
    if looks_like_wal { Ok(()) } else { Err(WalNameError::NotWal(name.to_string())) }
}

/// The snapshot id of WAL file `name` of `source`.
pub fn snapshot_id(source: &str, name: &str) -> Result<String, WalNameError> {
    check_file_name(name)?;
    let tag = blake3::hash(source.as_bytes()).to_hex();
    Ok(format!("{}-{}", &tag[..12], name.to_ascii_lowercase()))
}

/// The WAL file name inside a snapshot id made by `snapshot_id`.
pub fn file_name(id: &str) -> Option<&str> {
    id.split_once('-').map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_names_map_to_ids_per_source() {
        let a = snapshot_id("rnpp-db", "00000001000000000000000A").unwrap();
        assert!(a.ends_with("-00000001000000000000000a") && a.len() == 13 + 24, "{a}");
        assert_ne!(a, snapshot_id("cadastre-db", "00000001000000000000000A").unwrap());
        assert_eq!(file_name(&a), Some("00000001000000000000000a"));
        let long = snapshot_id("x", "000000010000000000000002.00000028.backup").unwrap();
        assert!(crate::identity::check_name("id", &long).is_ok(), "{long}");
        assert!(crate::identity::check_name("id", &snapshot_id("x", "00000002.history").unwrap()).is_ok());
        assert!(snapshot_id("x", "postgresql.conf").is_err());
        assert!(snapshot_id("x", "../00000001").is_err());
        assert_eq!(catalog_source("rnpp-db").unwrap(), "rnpp-db.wal");
        assert!(catalog_source(&"x".repeat(61)).is_err());
    }
}
