//! A `sqlite` source: a consistent copy of a database in use, and its verification facts.
//!
//! The copy is made with SQLite's online backup API in a single step, so it is one
//! transaction's view of the database whatever writers do meanwhile (in WAL mode they are
//! not even blocked). The copy is checked with `PRAGMA integrity_check` and the facts are
//! taken from it, so they describe exactly what is backed up.
//! The facts and their row hash are in the core (`exclave::facts::sqlite`), shared with the
//! restore tool's drills.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use exclave::facts::DbFacts;
use rusqlite::{Connection, backup};

/// Copies `src` into a new database at `dst` (one consistent view).
pub fn copy(src: &Path, dst: &Path) -> Result<()> {
    let from = open_read_only(src)?;
    let mut to = Connection::open(dst).with_context(|| format!("creating {}", dst.display()))?;
    let b = backup::Backup::new(&from, &mut to).context("starting the SQLite backup")?;
    // Busy or locked: a writer holds an exclusive lock for a moment (rollback-journal mode).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match b.step(-1).with_context(|| format!("copying {}", src.display()))? {
            backup::StepResult::Done => break,
            backup::StepResult::More => {}
            backup::StepResult::Busy | backup::StepResult::Locked => {
                if std::time::Instant::now() > deadline {
                    bail!("{} stayed locked by a writer for 60 s; no snapshot taken", src.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            _ => {}
        }
    }
    drop(b);
    let check: String = to
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .with_context(|| format!("checking the copy of {}", src.display()))?;
    if check != "ok" {
        bail!("the copy of {} fails PRAGMA integrity_check: {check}", src.display());
    }
    Ok(())
}

fn open_read_only(path: &Path) -> Result<Connection> {
    Ok(exclave::facts::sqlite::open_read_only(path)?)
}

/// Facts of the database at `path` (the copy, or a restored file).
pub fn facts(path: &Path, taken_at: i64) -> Result<DbFacts> {
    Ok(exclave::facts::sqlite::facts(path, taken_at)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_and_facts_agree_with_the_source_and_ignore_row_order() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, copy_path) = (d.path().join("a.db"), d.path().join("b.db"), d.path().join("copy.db"));
        for (p, order) in [(&a, "ASC"), (&b, "DESC")] {
            let c = Connection::open(p).unwrap();
            c.execute_batch("CREATE TABLE person (id INTEGER PRIMARY KEY, name TEXT, photo BLOB, h REAL);").unwrap();
            c.execute_batch(&format!(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 500)
                 INSERT INTO person SELECT i, 'p' || i, CAST(i AS BLOB), i / 3.0 FROM n ORDER BY i {order};"
            ))
            .unwrap();
        }
        copy(&a, &copy_path).unwrap();
        let (fa, fb, fc) = (facts(&a, 1).unwrap(), facts(&b, 1).unwrap(), facts(&copy_path, 1).unwrap());
        assert_eq!(fa.tables, fc.tables);
        assert_eq!(fa.tables[0].rows, 500);
        assert_eq!(fa.tables, fb.tables, "physical order must not matter");
        Connection::open(&b).unwrap().execute("UPDATE person SET name = 'x' WHERE id = 7", []).unwrap();
        assert_eq!(fa.differences(&facts(&b, 1).unwrap()).len(), 1);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("notes.db");
        std::fs::write(&p, b"this is plain text, not SQLite, and long enough to have a header").unwrap();
        let e = format!("{:#}", copy(&p, &d.path().join("c.db")).unwrap_err());
        assert!(e.contains("is not a readable SQLite database"), "{e}");
        let e = format!("{:#}", copy(&d.path().join("missing.db"), &d.path().join("c.db")).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
    }
}
