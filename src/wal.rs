//! Naming of archived PostgreSQL WAL in the catalog, shared by `wal-push` and `wal-fetch`.
//!
//! Each WAL file (segment, timeline history, backup label) is one snapshot of the catalog
//! source `SOURCE.wal`. Snapshot ids are unique per tenant, and two database clusters of a
//! tenant both have a segment `000000010000000000000003`, so the id is the file's name in
//! lower case behind 12 hex digits of BLAKE3 of the source name:
//! `3fa2c1d09b7e-000000010000000000000003`. The id makes a file addressable by name
//! (`FindSnapshot`) and a second push of the same file a no-op.
//!
//! A segment still being written, shipped by the agent's WAL stream, is archived as
//! `SEGMENT.streamed.LLLLLLLL` (L: how many bytes of the segment had been received, 8 hex
//! digits): each shipped version is a file of its own, never a replacement, so no archived
//! name ever changes content. Recovery asks for `SEGMENT`; it is served the complete segment
//! when one is archived, else the longest streamed version (`serving`). A streamed file is
//! the whole segment as `pg_receivewal` keeps it, zeros past L, so PostgreSQL reads it as a
//! segment whose WAL ends early. A streamed version another archived file holds in full is
//! forgotten by retention outside the protection window (the replicator's catalog,
//! `superseded_streams`).

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

/// Whether `name` is a WAL segment's name (24 hex digits: timeline, log, segment).
pub fn is_segment(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The archive name of a streamed version of `segment` holding its first `len` bytes.
pub fn streamed_name(segment: &str, len: u64) -> String {
    format!("{segment}.streamed.{len:08x}")
}

/// The segment and length of a streamed version's name (any case).
pub fn parse_streamed(name: &str) -> Option<(&str, u64)> {
    let (segment, len) = name.split_once(".streamed.")?;
    let len = (len.len() == 8).then(|| u64::from_str_radix(len, 16).ok()).flatten()?;
    is_segment(segment).then_some((segment, len))
}

/// For each name recovery may ask for, the archived file that serves it: itself, or for a
/// segment with no complete copy its longest streamed version. Streamed names are never
/// asked for themselves. Names are compared in lower case.
pub fn serving(archived: &[String]) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let mut longest: std::collections::BTreeMap<String, (u64, String)> = std::collections::BTreeMap::new();
    for name in archived {
        match parse_streamed(name) {
            Some((seg, len)) => {
                let e = longest.entry(seg.to_ascii_lowercase()).or_insert((len, name.clone()));
                if len > e.0 {
                    *e = (len, name.clone());
                }
            }
            None => {
                out.insert(name.to_ascii_lowercase(), name.clone());
            }
        }
    }
    for (seg, (_, name)) in longest {
        out.entry(seg).or_insert(name);
    }
    out
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

    #[test]
    fn streamed_versions_serve_a_segment_only_until_it_is_complete() {
        let v = streamed_name("00000001000000000000000A", 0x1234);
        assert_eq!(v, "00000001000000000000000A.streamed.00001234");
        assert_eq!(parse_streamed(&v), Some(("00000001000000000000000A", 0x1234)));
        assert!(crate::identity::check_name("id", &snapshot_id(&"s".repeat(60), &v).unwrap()).is_ok());
        assert_eq!(parse_streamed("00000001000000000000000A.partial"), None);
        assert_eq!(parse_streamed("0000000100000000000000.streamed.00001234"), None);
        let names: Vec<String> = [
            "00000002.history",
            "000000010000000000000009",
            "00000001000000000000000a.streamed.00001000",
            "00000001000000000000000a",
            "00000001000000000000000b.streamed.00002000",
            "00000001000000000000000b.streamed.00009000",
            "00000001000000000000000b.streamed.00003000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s = serving(&names);
        assert_eq!(s.len(), 4, "{s:?}");
        assert_eq!(s["00000001000000000000000a"], "00000001000000000000000a", "a complete segment wins");
        assert_eq!(s["00000001000000000000000b"], "00000001000000000000000b.streamed.00009000", "the longest wins");
        assert_eq!(s["00000002.history"], "00000002.history");
    }
}
