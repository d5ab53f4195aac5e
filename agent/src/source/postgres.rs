//! A `postgres` source: a logical dump (pg_dump) with verification facts taken in the same
//! snapshot, or a base backup (pg_basebackup) for point-in-time restore with archived WAL.
//!
//! Dump format: pg_dump's custom format, uncompressed (`-Fc -Z0`). Uncompressed, because
//! unchanged rows then give identical bytes from one day to the next and content-defined
//! chunking deduplicates them (zstd compresses each new chunk afterwards anyway); custom
//! rather than plain SQL, because pg_restore can then restore single tables, in parallel;
//! to standard output, so it streams through the chunker without a spool file.
//!
//! Consistency: the agent opens a REPEATABLE READ transaction, exports its snapshot, takes
//! the facts in it and runs `pg_dump --snapshot`, holding the transaction until the dump
//! has been read, so the facts describe exactly the dumped data.
//!
//! Row hash: `hashtextextended(row::text, 0)`, PostgreSQL's own 64-bit hash; a table's
//! checksum is the sum of every row's hash, as a decimal (order-independent). It is 3.6x
//! faster than md5 on pgbench_accounts (0.92 s vs 3.32 s for 5 M rows), and the facts were
//! the long pole of a dump. The hash is the same across PostgreSQL versions (hash
//! partitioning relies on it) but not across byte orders: a drill on a big-endian server
//! can use `md5` facts (`RowHash::Md5`), which the facts name in `row_hash`. The session
//! fixes TimeZone, DateStyle, IntervalStyle, extra_float_digits and bytea_output so the
//! text of a row is the same in any later session, e.g. a drill's on a restored database.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use exclave::facts::DbFacts;
use postgres::Client;

use super::command::ChildSpec;

pub use exclave::facts::postgres::{RowHash, connect, current_facts, table_facts};

/// The program `name` from `pg_bin`, or from PATH.
pub fn program(pg_bin: Option<&Path>, name: &str) -> PathBuf {
    pg_bin.map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name))
}

/// Major version of a PostgreSQL client program (`pg_dump (PostgreSQL) 15.18 ...` → 15).
pub fn client_major(prog: &Path) -> Result<u32> {
    let out = ChildSpec::new(prog, ["--version"]).output()?;
    let text = String::from_utf8_lossy(&out);
    text.split_once(')')
        .and_then(|(_, v)| v.trim().split(['.', ' ']).next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("{} --version printed {:?}", prog.display(), text.trim()))
}

/// An open REPEATABLE READ transaction whose snapshot pg_dump shares. Dropping it ends the
/// transaction, so it must live until the dump has been read.
pub struct DumpSession {
    client: Client,
    pub snapshot: String,
    pub database: String,
    pub server_version: String,
    pub server_major: u32,
}

impl DumpSession {
    pub fn open(conn: &str) -> Result<DumpSession> {
        let mut client = connect(conn)?;
        client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")?;
        let row = client.query_one(
            "SELECT pg_export_snapshot(), current_database(), current_setting('server_version'), \
             current_setting('server_version_num')::int / 10000",
            &[],
        )?;
        Ok(DumpSession {
            snapshot: row.get(0),
            database: row.get(1),
            server_version: row.get(2),
            server_major: row.get::<_, i32>(3) as u32,
            client,
        })
    }

    pub fn facts(&mut self, taken_at: i64) -> Result<DbFacts> {
        Ok(table_facts(&mut self.client, &self.database, &self.server_version, taken_at, RowHash::HashTextExtended)?)
    }
}

impl Drop for DumpSession {
    fn drop(&mut self) {
        let _ = self.client.batch_execute("ROLLBACK");
    }
}

/// Refuses a pg_dump older than the server (it could not read the newer catalog).
pub fn check_dump_version(pg_dump: &Path, server_major: u32) -> Result<()> {
    let major = client_major(pg_dump)?;
    if major < server_major {
        bail!(
            "{} is version {major} but the server is PostgreSQL {server_major}: pg_dump must be at least as new as \
             the server (set `pg-bin` to the bin directory of PostgreSQL {server_major} or later)",
            pg_dump.display()
        );
    }
    Ok(())
}

pub fn dump_command(pg_dump: &Path, conn: &str, snapshot: &str) -> ChildSpec {
    ChildSpec::new(
        pg_dump,
        [
            "--format=custom".to_string(),
            "--compress=0".to_string(),
            "--no-password".to_string(),
            format!("--snapshot={snapshot}"),
            format!("--dbname={conn}"),
        ],
    )
}

/// A base backup as one tar stream; WAL comes from the archive (`wal-push`), and the server
/// waits until the WAL the backup needs has been archived before pg_basebackup ends.
pub fn base_backup_command(pg_basebackup: &Path, conn: &str) -> ChildSpec {
    ChildSpec::new(
        pg_basebackup,
        [
            "--pgdata=-".to_string(),
            "--format=tar".to_string(),
            "--wal-method=none".to_string(),
            "--checkpoint=fast".to_string(),
            "--no-password".to_string(),
            format!("--dbname={conn}"),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use exclave::facts::postgres::redact;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(redact("postgresql://app:secret@db:5432/rnpp"), "postgresql://app:***@db:5432/rnpp");
        assert_eq!(redact("host=db password=secret dbname=x"), "host=db password=*** dbname=x");
        assert_eq!(redact("host=/run/postgresql dbname=x"), "host=/run/postgresql dbname=x");
    }

    #[test]
    fn row_hashes_are_named_and_old_facts_mean_md5() {
        for h in [RowHash::HashTextExtended, RowHash::Md5] {
            assert_eq!(RowHash::from_name(h.name()).unwrap(), h);
        }
        assert_eq!(RowHash::from_name("").unwrap(), RowHash::Md5);
        assert!(RowHash::from_name("sha1").is_err());
    }

    #[test]
    fn client_major_parses_version_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pg_dump");
        std::fs::write(&p, "#!/bin/sh\necho 'pg_dump (PostgreSQL) 14.9 (Debian 14.9-1)'\n").unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert_eq!(client_major(&p).unwrap(), 14);
        let e = format!("{:#}", check_dump_version(&p, 16).unwrap_err());
        assert!(e.contains("version 14 but the server is PostgreSQL 16"), "{e}");
        check_dump_version(&p, 13).unwrap();
    }
}
