//! SQLite facts (for the agent, which takes them from its copy, and for restore drills, which
//! take them from the restored file), and the integrity check both run.
//!
//! Row hash: BLAKE3 over each column's type tag and value (integers and reals as 8 bytes LE,
//! text and blobs length-prefixed); a table's checksum is the wrapping sum of the first 16
//! bytes of every row hash, as 32 hex digits, so the row order does not matter.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{DbFacts, FACTS_FORMAT, FactsError, TableFacts};

fn db_err(what: String) -> impl Fn(rusqlite::Error) -> FactsError {
    move |e| FactsError::Database(format!("{what}: {e}"))
}

/// Opens a database read-only, and says clearly when the file is not one.
pub fn open_read_only(path: &Path) -> Result<Connection, FactsError> {
    if !path.is_file() {
        return Err(FactsError::Database(format!(
            "SQLite database {} does not exist or is not a file",
            path.display()
        )));
    }
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(db_err(format!("opening {}", path.display())))?;
    c.busy_timeout(Duration::from_secs(10)).map_err(db_err("setting a busy timeout".into()))?;
    // Opening is lazy; the first read says whether this is a database at all.
    c.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
        .map_err(db_err(format!("{} is not a readable SQLite database", path.display())))?;
    Ok(c)
}

/// `PRAGMA integrity_check` of an open database: `ok`, or what SQLite found.
pub fn integrity_check(c: &Connection) -> Result<String, FactsError> {
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(db_err("PRAGMA integrity_check".into()))
}

/// Facts of the database at `path` (a copy, or a restored file).
pub fn facts(path: &Path, taken_at: i64) -> Result<DbFacts, FactsError> {
    let c = open_read_only(path)?;
    let e = |what: &str| db_err(format!("{what} of {}", path.display()));
    let mut names: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'")
        .map_err(e("listing the tables"))?
        .query_map([], |r| r.get(0))
        .map_err(e("listing the tables"))?
        .collect::<rusqlite::Result<_>>()
        .map_err(e("listing the tables"))?;
    names.sort();
    let mut tables = Vec::new();
    for name in names {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let mut stmt = c.prepare(&format!("SELECT * FROM {quoted}")).map_err(e("reading a table"))?;
        let cols = stmt.column_count();
        let mut rows = stmt.query([]).map_err(e("reading a table"))?;
        let (mut n, mut sum) = (0u64, 0u128);
        while let Some(row) = rows.next().map_err(e("reading a row"))? {
            let mut h = blake3::Hasher::new();
            for i in 0..cols {
                use rusqlite::types::ValueRef::*;
                match row.get_ref(i).map_err(e("reading a value"))? {
                    Null => h.update(&[0]),
                    Integer(v) => h.update(&[1]).update(&v.to_le_bytes()),
                    Real(v) => h.update(&[2]).update(&v.to_le_bytes()),
                    Text(t) => h.update(&[3]).update(&(t.len() as u64).to_le_bytes()).update(t),
                    Blob(b) => h.update(&[4]).update(&(b.len() as u64).to_le_bytes()).update(b),
                };
            }
            let mut first = [0u8; 16];
            first.copy_from_slice(&h.finalize().as_bytes()[..16]);
            sum = sum.wrapping_add(u128::from_le_bytes(first));
            n += 1;
        }
        tables.push(TableFacts { name, rows: n, checksum: format!("{sum:032x}") });
    }
    Ok(DbFacts {
        format: FACTS_FORMAT,
        engine: "sqlite".into(),
        database: path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        server_version: rusqlite::version().to_string(),
        taken_at,
        row_hash: "blake3".into(),
        tables,
    })
}
