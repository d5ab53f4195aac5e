//! Verification facts of a database snapshot: what a restore drill later compares.
//!
//! Taken by the agent inside the same consistent view as the dump (PostgreSQL: the exported
//! snapshot of the dump; SQLite: the online-backup copy), and stored in the snapshot as a
//! file `<database>.facts.json` next to the dump, so they are encrypted like any data and
//! the embassy never sees table names or counts.
//!
//! Layout (JSON, `format` 1):
//! ```text
//! { "format": 1, "engine": "postgresql"|"sqlite", "database": "...", "server_version": "...",
//!   "taken_at": <unix seconds>, "row_hash": "hashtextextended"|"md5"|"blake3",
//!   "tables": [ { "name": "schema.table", "rows": N, "checksum": "..." }, ... ] }   // sorted by name
//! ```
//! A table's checksum is order-independent (a sum of per-row hashes), so a restore that
//! loads rows in another physical order still matches. Each engine defines its row hash
//! (see the agent's source modules); facts are only ever compared within one engine.

use serde::{Deserialize, Serialize};

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub const FACTS_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableFacts {
    pub name: String,
    pub rows: u64,
    pub checksum: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbFacts {
    pub format: u32,
    pub engine: String,
    pub database: String,
    pub server_version: String,
    pub taken_at: i64,
    /// How each row was hashed for the checksums (the engine's modules define the names);
    /// a restored database is checked with the same one.
    #[serde(default)]
    pub row_hash: String,
    pub tables: Vec<TableFacts>,
}

#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error("verification facts are malformed: {0}")]
    Malformed(String),
    #[error("verification facts format {0} is not supported by this build")]
    UnsupportedFormat(u32),
    #[error("{0}")]
    Database(String),
}

impl DbFacts {
    pub fn to_json(&self) -> Vec<u8> {
        // Plain data into a Vec cannot fail to serialise.
        #[allow(clippy::expect_used)]
        let mut v = serde_json::to_vec_pretty(self).expect("facts to JSON");
        v.push(b'\n');
        v
    }

    pub fn from_json(bytes: &[u8]) -> Result<DbFacts, FactsError> {
        let f: DbFacts = serde_json::from_slice(bytes).map_err(|e| FactsError::Malformed(e.to_string()))?;
        if f.format != FACTS_FORMAT {
            return Err(FactsError::UnsupportedFormat(f.format));
        }
        Ok(f)
    }

    /// Differences between the facts recorded at snapshot time (`self`) and those of a
    /// restored database, one readable line each; empty when they agree.
    pub fn differences(&self, restored: &DbFacts) -> Vec<String> {
        let mut out = Vec::new();
        if self.engine != restored.engine {
            out.push(format!("engine {} recorded, {} restored", self.engine, restored.engine));
            return out;
        }
        if self.row_hash != restored.row_hash {
            out.push(format!(
                "row hash {:?} recorded, {:?} computed: checksums cannot be compared",
                self.row_hash, restored.row_hash
            ));
            return out;
        }
        let find = |list: &[TableFacts], name: &str| list.iter().find(|t| t.name == name).cloned();
        for t in &self.tables {
            match find(&restored.tables, &t.name) {
                None => out.push(format!("table {} is missing from the restored database", t.name)),
                Some(r) if r.rows != t.rows => {
                    out.push(format!("table {}: {} rows recorded, {} restored", t.name, t.rows, r.rows))
                }
                Some(r) if r.checksum != t.checksum => {
                    out.push(format!("table {}: same row count ({}) but the contents differ", t.name, t.rows))
                }
                Some(_) => {}
            }
        }
        for r in &restored.tables {
            if find(&self.tables, &r.name).is_none() {
                out.push(format!("table {} was not in the snapshot", r.name));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(tables: &[(&str, u64, &str)]) -> DbFacts {
        DbFacts {
            format: FACTS_FORMAT,
            engine: "sqlite".into(),
            database: "db".into(),
            server_version: "3".into(),
            taken_at: 1,
            row_hash: "blake3".into(),
            tables: tables
                .iter()
                .map(|(n, r, c)| TableFacts { name: n.to_string(), rows: *r, checksum: c.to_string() })
                .collect(),
        }
    }

    #[test]
    fn json_round_trips_and_checks_the_format() {
        let f = facts(&[("a", 1, "x")]);
        assert_eq!(DbFacts::from_json(&f.to_json()).unwrap(), f);
        let mut g = f.clone();
        g.format = 9;
        assert!(matches!(DbFacts::from_json(&g.to_json()), Err(FactsError::UnsupportedFormat(9))));
        assert!(DbFacts::from_json(b"{").is_err());
    }

    #[test]
    fn differences_name_each_table() {
        let rec = facts(&[("a", 1, "x"), ("b", 2, "y"), ("c", 3, "z")]);
        assert!(rec.differences(&rec).is_empty());
        let got = facts(&[("a", 1, "x"), ("b", 2, "other"), ("d", 0, "0")]);
        let d = rec.differences(&got);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[0].contains("table b") && d[0].contains("contents differ"));
        assert!(d[1].contains("table c is missing"));
        assert!(d[2].contains("table d was not in the snapshot"));
        let fewer = facts(&[("a", 0, "x"), ("b", 2, "y"), ("c", 3, "z")]);
        assert_eq!(rec.differences(&fewer), vec!["table a: 1 rows recorded, 0 restored".to_string()]);
        let other_hash = DbFacts { row_hash: "md5".into(), ..rec.clone() };
        assert!(rec.differences(&other_hash)[0].contains("cannot be compared"));
    }
}
