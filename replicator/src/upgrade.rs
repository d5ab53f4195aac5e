//! Finalising an upgrade: the catalog's layout is raised only once every member knows it.
//!
//! A layout can change what applying a command writes (layout 2: retention forgets superseded
//! streamed WAL versions). A member that does not know the layout refuses `SetLayout` and goes
//! on applying commands the old way, so its catalog would drift from the others'. So the
//! leader asks every voter and learner which layouts it knows (`Request::KnownLayout`) before
//! it proposes, and proposes nothing unless all of them answer with at least the target. A
//! member that cannot be reached, or that is too old to understand the question (it answers
//! "malformed request"), counts as not knowing.
//!
//! This is a check at the moment of asking: a node of an older version added to the cluster
//! afterwards still stops at (or refuses) the layout, as the README's upgrade steps say.

use std::time::Duration;

use exclave::protocol::{ErrorCode, Reply, Request};

use crate::node::Node;
use crate::server::Failure;

/// How long the leader waits for one member's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The newest layout this process says it knows: the build's own, or, for the tests that stand
/// in for a node of an older version, what `EXCLAVE_TEST_KNOWN_LAYOUT` says.
pub fn known_layout() -> u32 {
    crate::test_hooks::known_layout().unwrap_or(crate::catalog::LAYOUT)
}

/// One member's answer: the newest layout it knows, or why it gave none.
pub type Answer = (String, Result<u32, String>);

/// Why the cluster may not move to layout `target` yet, naming every member in the way; `None`
/// when every member knows it. Pure, for tests.
pub fn refusal(answers: &[Answer], target: u32) -> Option<String> {
    let behind: Vec<String> = answers
        .iter()
        .filter_map(|(name, known)| match known {
            Ok(k) if *k >= target => None,
            Ok(k) => Some(format!("{name} knows catalog layouts up to {k} (upgrade it first)")),
            Err(e) => Some(format!("{name} did not say which layouts it knows ({e})")),
        })
        .collect();
    (!behind.is_empty()).then(|| {
        format!("not finalised, the layout stays as it is: every node must know layout {target}: {}", behind.join("; "))
    })
}

/// Asks every other member, concurrently, which layouts it knows.
pub async fn ask_members(node: &Node) -> Vec<Answer> {
    let v = node.raft.view();
    let me = node.raft.id;
    let others: Vec<u64> = v.voters.iter().chain(v.learners.iter()).copied().filter(|id| *id != me).collect();
    let asks = others.into_iter().map(|id| async move {
        let name = node.peers.name_of(id);
        (name, ask(node, id).await)
    });
    futures::future::join_all(asks).await
}

/// One member's answer. A connection that just broke (the member restarted) is retried until
/// `ASK_TIMEOUT`, so that an upgrade in progress is not refused for a stale connection.
async fn ask(node: &Node, id: u64) -> Result<u32, String> {
    let deadline = tokio::time::Instant::now() + ASK_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = match tokio::time::timeout(left, node.peers.call(id, Request::KnownLayout)).await {
            Ok(Ok(Reply::KnownLayout { known })) => return Ok(known),
            Ok(Ok(Reply::Error { message, .. })) => return Err(message),
            Ok(Ok(_)) => return Err(crate::peers::PeerError::Unexpected("known_layout").to_string()),
            Ok(Err(e)) => e,
            Err(_) => return Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
        };
        if !e.retryable() || tokio::time::Instant::now() + RETRY_PAUSE >= deadline {
            return Err(e.to_string());
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}

/// Refuses with the reason when some member does not know `target`.
pub async fn require_known_everywhere(node: &Node, target: u32) -> Result<(), Failure> {
    let mut answers = ask_members(node).await;
    answers.push((node.name.clone(), Ok(known_layout())));
    match refusal(&answers, target) {
        Some(why) => Err(Failure::new(ErrorCode::Unavailable, why)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finalising_waits_for_every_member_to_know_the_layout() {
        let ok = |n: &str, k: u32| (n.to_string(), Ok(k));
        assert_eq!(refusal(&[ok("n1", 2), ok("n2", 2), ok("n3", 3)], 2), None);
        assert_eq!(refusal(&[], 2), None);
        let why = refusal(&[ok("n1", 2), ok("n2", 1), ("n3".into(), Err("malformed request".into()))], 2).unwrap();
        assert!(why.contains("n2 knows catalog layouts up to 1"), "{why}");
        assert!(why.contains("n3 did not say which layouts it knows (malformed request)"), "{why}");
        assert!(!why.contains("n1"), "{why}");
    }
}
