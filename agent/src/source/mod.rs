//! Sources: what a snapshot of each kind is made of, and how it is made consistent.
//!
//! A source is prepared into `Item`s that the pipeline reads in order, each becoming one
//! top-level name in the snapshot:
//!
//! | kind             | items                                                          |
//! |------------------|----------------------------------------------------------------|
//! | `path`           | each path, as a tree                                           |
//! | `command`        | `OUTPUT-NAME` (the command's standard output)                  |
//! | `sqlite`         | `FILE` (an online-backup copy), `FILE.facts.json`              |
//! | `postgres` dump  | `DB.dump` (pg_dump -Fc -Z0), `DB.facts.json`                   |
//! | `postgres` base  | `pgdata/` (pg_basebackup's tar stream, unpacked)               |
//!
//! Whatever must stay alive while the items are read (the PostgreSQL transaction whose
//! snapshot pg_dump shares, the SQLite copy's directory) is held by `Prepared`.

pub mod command;
pub mod path;
pub mod postgres;
pub mod sqlite;

use std::any::Any;

use anyhow::{Context, Result};
use exclave::facts::DbFacts;

use crate::config::{PgMethod, SourceConfig, SourceKind};
pub use command::ChildSpec;
pub use path::{Listed, Root, roots, walk};

/// One top-level name of a snapshot and where its content comes from.
pub enum Item {
    /// Files and directories under a path.
    Tree(Root),
    /// One file: a child's standard output, complete only if the child exits with 0.
    Output { name: String, child: ChildSpec },
    /// A tar stream on a child's standard output, unpacked into entries under `name/`.
    Tar { name: String, child: ChildSpec },
    /// One open file, read to its end as it is cut and recorded with owner 0 and the given
    /// time, so the same bytes always give the same manifest entry whoever pushes them
    /// (archived WAL).
    File { name: String, file: std::fs::File, mtime: i64 },
    /// The verification facts, as JSON, once they arrive: they are taken while the dump
    /// streams, so the snapshot costs the longer of the two rather than their sum.
    Facts { name: String, mtime: i64, rx: std::sync::mpsc::Receiver<TakenFacts> },
}

impl Item {
    pub fn name(&self) -> &str {
        match self {
            Item::Tree(r) => &r.name,
            Item::Output { name, .. } | Item::Tar { name, .. } | Item::File { name, .. } | Item::Facts { name, .. } => {
                name
            }
        }
    }
}

/// Facts as taken, and how long taking them took.
pub type TakenFacts = (Result<DbFacts>, std::time::Duration);

fn timed_facts(f: impl FnOnce() -> Result<DbFacts>) -> TakenFacts {
    let t = std::time::Instant::now();
    let r = f();
    (r, t.elapsed())
}

/// A source ready to be read.
pub struct Prepared {
    pub items: Vec<Item>,
    /// Kept alive until the items have been read.
    pub hold: Vec<Box<dyn Any + Send>>,
}

/// Keeps the exporting transaction (and so the snapshot pg_dump imports) open until the
/// backup is over; dropping it lets the facts thread end the transaction.
struct SessionHold(#[allow(dead_code)] std::sync::mpsc::Sender<()>);

/// A name usable as a top-level snapshot name (no `/`, not empty, not a dot name).
fn item_name(raw: &str) -> String {
    let s: String = raw.chars().map(|c| if c == '/' || c.is_control() { '_' } else { c }).collect();
    if s.is_empty() || s == "." || s == ".." { "database".into() } else { s }
}

pub fn prepare(source: &str, cfg: &SourceConfig, time: i64) -> Result<Prepared> {
    let mut p = Prepared { items: Vec::new(), hold: Vec::new() };
    match cfg.kind {
        SourceKind::Path => p.items = roots(&cfg.paths)?.into_iter().map(Item::Tree).collect(),
        SourceKind::Command => {
            let (prog, args) = cfg.command.split_first().context("`command` is empty")?;
            let name = cfg.output_name.clone().unwrap_or_else(|| format!("{source}.out"));
            p.items.push(Item::Output { name, child: ChildSpec::new(prog, args) });
        }
        SourceKind::Sqlite => {
            let db = cfg.database.as_deref().context("`database` is required")?;
            let file = item_name(&db.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            let spool = cfg.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
            let dir = tempfile::Builder::new()
                .prefix("exclave-sqlite-")
                .tempdir_in(&spool)
                .with_context(|| format!("creating a staging directory in {}", spool.display()))?;
            let copy = dir.path().join(&file);
            sqlite::copy(db, &copy)?;
            let (tx, rx) = std::sync::mpsc::channel();
            let _ = tx.send(timed_facts(|| sqlite::facts(&copy, time)));
            p.items.push(Item::Tree(Root { path: copy, name: file.clone() }));
            p.items.push(Item::Facts { name: format!("{file}.facts.json"), mtime: time, rx });
            p.hold.push(Box::new(dir));
        }
        SourceKind::Postgres => {
            let conn = cfg.connection.as_deref().context("`connection` is required")?;
            match cfg.method {
                PgMethod::Dump => {
                    let pg_dump = postgres::program(cfg.pg_bin.as_deref(), "pg_dump");
                    let mut session = postgres::DumpSession::open(conn)?;
                    postgres::check_dump_version(&pg_dump, session.server_major)?;
                    let db = item_name(&session.database);
                    let child = postgres::dump_command(&pg_dump, conn, &session.snapshot);
                    let (tx, rx) = std::sync::mpsc::channel();
                    let (release, released) = std::sync::mpsc::channel::<()>();
                    std::thread::Builder::new().name("pg-facts".into()).spawn(move || {
                        let _ = tx.send(timed_facts(|| session.facts(time)));
                        // Returns when the hold is dropped; the session (transaction) ends then.
                        let _ = released.recv();
                    })?;
                    p.items.push(Item::Output { name: format!("{db}.dump"), child });
                    p.items.push(Item::Facts { name: format!("{db}.facts.json"), mtime: time, rx });
                    p.hold.push(Box::new(SessionHold(release)));
                }
                // A streamed source's snapshots are base backups; its WAL comes from the stream.
                PgMethod::Base | PgMethod::Stream => {
                    let prog = postgres::program(cfg.pg_bin.as_deref(), "pg_basebackup");
                    p.items
                        .push(Item::Tar { name: "pgdata".into(), child: postgres::base_backup_command(&prog, conn) });
                }
            }
        }
    }
    Ok(p)
}
