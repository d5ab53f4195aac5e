//! PostgreSQL facts (for the agent, in the dump's snapshot, and for restore drills, on the
//! restored database) and the session they are taken in.
//!
//! Row hash: `hashtextextended(row::text, 0)`, PostgreSQL's own 64-bit hash; a table's
//! checksum is the sum of every row's hash, as a decimal (order-independent). The session
//! fixes TimeZone, DateStyle, IntervalStyle, extra_float_digits and bytea_output so the text of
//! a row is the same in any later session, e.g. a drill's on a restored database. See the
//! agent's postgres source for why this hash (and `md5` for older facts).

use postgres::{Client, NoTls};

use super::{DbFacts, FACTS_FORMAT, FactsError, TableFacts};

const SESSION_SETTINGS: &str = "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
     SET extra_float_digits = 1; SET bytea_output = 'hex'";

/// A connection string with any password hidden, for messages and logs.
pub fn redact(conn: &str) -> String {
    if let Some((scheme, rest)) = conn.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:***@{host}");
    }
    conn.split_whitespace()
        .map(|kv| if kv.starts_with("password=") { "password=***".to_string() } else { kv.to_string() })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn connect(conn: &str) -> Result<Client, FactsError> {
    let mut c = Client::connect(conn, NoTls)
        .map_err(|e| FactsError::Database(format!("connecting to PostgreSQL with {:?}: {e}", redact(conn))))?;
    c.batch_execute(SESSION_SETTINGS)
        .map_err(|e| FactsError::Database(format!("setting up the PostgreSQL session: {e}")))?;
    Ok(c)
}

/// How each row is hashed for a table's checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowHash {
    HashTextExtended,
    Md5,
}

impl RowHash {
    pub fn name(self) -> &'static str {
        match self {
            RowHash::HashTextExtended => "hashtextextended",
            RowHash::Md5 => "md5",
        }
    }

    pub fn from_name(name: &str) -> Result<RowHash, FactsError> {
        match name {
            "hashtextextended" => Ok(RowHash::HashTextExtended),
            // Facts written before `row_hash` existed used md5.
            "md5" | "" => Ok(RowHash::Md5),
            other => Err(FactsError::Database(format!("row hash {other:?} is not known to this version"))),
        }
    }

    /// The aggregate giving a table's checksum as text (rows of the table aliased `t`).
    fn checksum_sql(self) -> &'static str {
        match self {
            RowHash::HashTextExtended => "coalesce(sum(hashtextextended(t::text, 0)), 0)::text",
            RowHash::Md5 => "coalesce(sum(('x' || substr(md5(t::text), 1, 16))::bit(64)::bigint::numeric), 0)::text",
        }
    }
}

/// Facts of every ordinary table of the connected database, in the current transaction.
pub fn table_facts(
    c: &mut impl postgres::GenericClient,
    database: &str,
    server_version: &str,
    taken_at: i64,
    hash: RowHash,
) -> Result<DbFacts, FactsError> {
    let db = |what: &str| {
        let what = what.to_string();
        move |e: postgres::Error| FactsError::Database(format!("{what}: {e}"))
    };
    let names: Vec<String> = c
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' \
             ORDER BY 1",
            &[],
        )
        .map_err(db("listing tables"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut tables = Vec::new();
    for name in names {
        // `name` comes from format('%I.%I'), so it is a correctly quoted identifier.
        let row = c
            .query_one(&format!("SELECT count(*), {} FROM {name} AS t", hash.checksum_sql()), &[])
            .map_err(db(&format!("reading table {name}")))?;
        tables.push(TableFacts { name, rows: row.get::<_, i64>(0) as u64, checksum: row.get(1) });
    }
    Ok(DbFacts {
        format: FACTS_FORMAT,
        engine: "postgresql".into(),
        database: database.to_string(),
        server_version: server_version.to_string(),
        taken_at,
        row_hash: hash.name().into(),
        tables,
    })
}

/// Facts of the database as it is now (used on restored databases), rows hashed with `hash`.
pub fn current_facts(conn: &str, taken_at: i64, hash: RowHash) -> Result<DbFacts, FactsError> {
    let e = |e: postgres::Error| FactsError::Database(e.to_string());
    let mut c = connect(conn)?;
    let mut tx = c.build_transaction().isolation_level(postgres::IsolationLevel::RepeatableRead).start().map_err(e)?;
    let row = tx.query_one("SELECT current_database(), current_setting('server_version')", &[]).map_err(e)?;
    let (db, version): (String, String) = (row.get(0), row.get(1));
    table_facts(&mut tx, &db, &version, taken_at, hash)
}
