//! Looking into snapshots without restoring them, for the people who restore: `ls` (what a
//! snapshot holds under a path), `find` (which snapshots hold a file matching a pattern, with
//! its size and time), `diff` (what changed between two snapshots), and the path filter of
//! `restore --include`. Only manifests are read; no file data is fetched.
//!
//! Paths are the snapshot's own, `/`-separated, as `snapshots` and `ls` print them (the top
//! level is the name of each backed-up root).

use std::collections::BTreeMap;

use exclave::manifest::{Entry, EntryKind};
use serde::Serialize;

/// A path filter: `prefix` itself and everything below it.
pub fn is_under(path: &[u8], prefix: &[u8]) -> bool {
    let prefix = trim_slashes(prefix);
    prefix.is_empty() || (path.starts_with(prefix) && (path.len() == prefix.len() || path[prefix.len()] == b'/'))
}

fn trim_slashes(p: &[u8]) -> &[u8] {
    let start = p.iter().position(|b| *b != b'/').unwrap_or(p.len());
    let end = p.iter().rposition(|b| *b != b'/').map(|i| i + 1).unwrap_or(start);
    &p[start..end.max(start)]
}

/// Whether `e` is restored by `restore --include` with these paths: everything under one of
/// them, and the directories above them (so they are made with their modes and times).
pub fn included(e: &Entry, include: &[Vec<u8>]) -> bool {
    include.is_empty()
        || include.iter().any(|inc| {
            is_under(&e.path, inc) || (matches!(e.kind, EntryKind::Dir) && is_under(trim_slashes(inc), &e.path))
        })
}

/// One entry as `ls` and `find` print it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    /// `file`, `dir` or `symlink`.
    pub kind: &'static str,
    pub size: u64,
    pub mode: String,
    pub mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

impl Listed {
    pub fn of(e: &Entry) -> Listed {
        let (kind, size, target) = match &e.kind {
            EntryKind::File { size, .. } => ("file", *size, None),
            EntryKind::Dir => ("dir", 0, None),
            EntryKind::Symlink { target } => ("symlink", 0, Some(String::from_utf8_lossy(target).into_owned())),
        };
        Listed { path: e.path_lossy(), kind, size, mode: format!("{:04o}", e.mode), mtime: e.mtime_sec, target }
    }
}

/// What `diff` compares of an entry: its kind and content (a file's size and BLAKE3, a
/// link's target) and its mode. Times alone do not make a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    kind: &'static str,
    size: u64,
    content: Vec<u8>,
    mode: u32,
}

impl Shape {
    pub fn of(e: &Entry) -> Shape {
        let (kind, size, content) = match &e.kind {
            EntryKind::File { size, blake3, .. } => ("file", *size, blake3.to_vec()),
            EntryKind::Dir => ("dir", 0, Vec::new()),
            EntryKind::Symlink { target } => ("symlink", 0, target.clone()),
        };
        Shape { kind, size, content, mode: e.mode }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    /// `added`, `removed`, `changed` (content or kind), `mode` (permissions only).
    pub change: &'static str,
    pub path: String,
    pub kind: &'static str,
    pub old_size: Option<u64>,
    pub new_size: Option<u64>,
}

/// The changes from `old` to `new`, in path order.
pub fn diff(old: &BTreeMap<Vec<u8>, Shape>, new: &BTreeMap<Vec<u8>, Shape>) -> Vec<Change> {
    let mut out = Vec::new();
    let path = |p: &[u8]| String::from_utf8_lossy(p).into_owned();
    let mut a = old.iter().peekable();
    let mut b = new.iter().peekable();
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((pa, _)), Some((pb, _))) => pa.cmp(pb),
        };
        match order {
            std::cmp::Ordering::Less => {
                let Some((p, s)) = a.next() else { break };
                out.push(Change {
                    change: "removed",
                    path: path(p),
                    kind: s.kind,
                    old_size: Some(s.size),
                    new_size: None,
                });
            }
            std::cmp::Ordering::Greater => {
                let Some((p, s)) = b.next() else { break };
                out.push(Change {
                    change: "added",
                    path: path(p),
                    kind: s.kind,
                    old_size: None,
                    new_size: Some(s.size),
                });
            }
            std::cmp::Ordering::Equal => {
                let (Some((p, sa)), Some((_, sb))) = (a.next(), b.next()) else { break };
                let change = if sa.kind != sb.kind || sa.size != sb.size || sa.content != sb.content {
                    "changed"
                } else if sa.mode != sb.mode {
                    "mode"
                } else {
                    continue;
                };
                out.push(Change {
                    change,
                    path: path(p),
                    kind: sb.kind,
                    old_size: Some(sa.size),
                    new_size: Some(sb.size),
                });
            }
        }
    }
    out
}

/// A `find` pattern: shell wildcards (`*`, `?`, `[...]`) against the file's name, or against
/// its whole path when the pattern has a `/`.
pub struct Pattern {
    glob: glob::Pattern,
    whole_path: bool,
}

impl Pattern {
    pub fn new(text: &str) -> Result<Pattern, glob::PatternError> {
        Ok(Pattern { glob: glob::Pattern::new(text.trim_start_matches('/'))?, whole_path: text.contains('/') })
    }

    pub fn matches(&self, e: &Entry) -> bool {
        let path = e.path_lossy();
        let subject = if self.whole_path { path.as_str() } else { path.rsplit('/').next().unwrap_or(&path) };
        let opts = glob::MatchOptions { require_literal_separator: true, ..glob::MatchOptions::new() };
        self.glob.matches_with(subject, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry { path: path.as_bytes().to_vec(), kind, mode: 0o644, uid: 0, gid: 0, mtime_sec: 0, mtime_nsec: 0 }
    }

    fn file(path: &str, size: u64, byte: u8) -> Entry {
        entry(path, EntryKind::File { size, blake3: [byte; 32], chunks: vec![] })
    }

    #[test]
    fn paths_are_under_their_prefix_only_at_a_separator() {
        assert!(is_under(b"src/docs/a.xml", b"src/docs"));
        assert!(is_under(b"src/docs/a.xml", b"/src/docs/"));
        assert!(is_under(b"src/docs", b"src/docs"));
        assert!(!is_under(b"src/docs2/a.xml", b"src/docs"));
        assert!(!is_under(b"src", b"src/docs"));
        assert!(is_under(b"anything", b""));
    }

    #[test]
    fn include_keeps_the_subtree_and_the_directories_above_it() {
        let inc = vec![b"src/documents/2025".to_vec()];
        assert!(included(&entry("src", EntryKind::Dir), &inc));
        assert!(included(&entry("src/documents", EntryKind::Dir), &inc));
        assert!(included(&file("src/documents/2025/01/a.xml", 1, 1), &inc));
        assert!(!included(&file("src/registers/persons.tsv", 1, 1), &inc));
        assert!(!included(&entry("src/registers", EntryKind::Dir), &inc));
        assert!(!included(&file("src/documents", 1, 1), &[b"src/documents/2025".to_vec()]), "a file is no parent");
        assert!(included(&file("x", 1, 1), &[]));
    }

    #[test]
    fn diff_names_added_removed_changed_and_mode_changes_in_path_order() {
        let shapes = |es: &[Entry]| es.iter().map(|e| (e.path.clone(), Shape::of(e))).collect::<BTreeMap<_, _>>();
        let mut moved = file("c", 5, 3);
        moved.mode = 0o600;
        let mut touched = file("d", 5, 4);
        touched.mtime_sec = 99;
        let old = shapes(&[file("a", 1, 1), file("b", 2, 2), file("c", 5, 3), file("d", 5, 4)]);
        let new = shapes(&[file("b", 2, 9), moved, touched, entry("e", EntryKind::Dir)]);
        let d = diff(&old, &new);
        let got: Vec<(&str, &str)> = d.iter().map(|c| (c.change, c.path.as_str())).collect();
        assert_eq!(got, [("removed", "a"), ("changed", "b"), ("mode", "c"), ("added", "e")]);
        assert_eq!(d[1].old_size, Some(2));
    }

    #[test]
    fn patterns_match_names_or_whole_paths() {
        let e = file("src/documents/2025/01/decision-005.xml", 1, 1);
        assert!(Pattern::new("decision-00?.xml").unwrap().matches(&e));
        assert!(Pattern::new("*.xml").unwrap().matches(&e));
        assert!(!Pattern::new("*.tsv").unwrap().matches(&e));
        assert!(Pattern::new("src/documents/*/01/*.xml").unwrap().matches(&e));
        assert!(!Pattern::new("src/*.xml").unwrap().matches(&e), "* does not cross a /");
        assert!(Pattern::new("[").is_err());
    }
}
