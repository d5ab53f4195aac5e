//! The compose stack of `deploy/compose.yaml`, brought up with `docker-compose` from images
//! built of our own binaries: the agent daemon backs up through it, Prometheus scrapes every
//! target, one node container is killed, the node-down alert fires in Prometheus, and the
//! register restores from another node. Skipped, saying so, only where Docker is absent.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use exclave_chaos_tests::*;

struct Stack {
    state: tempfile::TempDir,
    project: String,
}

impl Stack {
    fn script(&self, verb: &str) -> std::process::Output {
        let target = bin("exclave-replicator").parent().unwrap().parent().unwrap().to_path_buf();
        run(Command::new(repo_root().join("deploy/compose.sh"))
            .arg(verb)
            .env("EXCLAVE_STACK", self.state.path())
            .env("COMPOSE_PROJECT_NAME", &self.project)
            .env("CARGO_TARGET_DIR", target)
            .env("PROFILE", "debug")
            .env("NO_BUILD", "1")
            .env("SIZE", "4"))
    }

    fn compose(&self, args: &[&str]) -> std::process::Output {
        run(Command::new("docker-compose")
            .args(["-f"])
            .arg(repo_root().join("deploy/compose.yaml"))
            .args(args)
            .env("EXCLAVE_STACK", self.state.path())
            .env("COMPOSE_PROJECT_NAME", &self.project))
    }

    fn path(&self, p: &str) -> PathBuf {
        self.state.path().join(p)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = self.compose(&["logs", "--no-color", "--tail", "30"]);
            eprintln!("the stack's logs:\n{}{}", stdout(&logs), stderr(&logs));
        }
        let o = self.script("down");
        if !o.status.success() {
            eprintln!("compose down: {}{}", stdout(&o), stderr(&o));
        }
    }
}

/// Prometheus's HTTP API through the published port.
fn prometheus(path: &str) -> serde_json::Value {
    let (code, body) = http_get(9090, path);
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<String>) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn restore_cmd(stack: &Stack, verb: &str, node: &str) -> Command {
    let mut c = Command::new(bin("exclave-restore"));
    c.args([verb, "--node", node, "--pki"])
        .arg(stack.path("pki"))
        .args(["--identity", "dr", "--key-file"])
        .arg(stack.path("lux.key"));
    c
}

#[test]
fn compose_stack_backs_up_scrapes_survives_a_killed_node_and_restores() {
    let docker = Command::new("docker").arg("info").output();
    if !docker.as_ref().is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: no Docker engine here (`docker info` failed); the compose stack test needs one");
        return;
    }
    let stack = Stack { state: tempfile::tempdir().unwrap(), project: format!("exclavetest{}", std::process::id()) };
    let up = stack.script("up");
    assert!(up.status.success(), "compose.sh up:\n{}{}", stdout(&up), stderr(&up));

    // The agent daemon's first scheduled run commits through the stack.
    let n1 = "172.31.213.11:7401";
    wait_for("a snapshot of the register", Duration::from_secs(120), || {
        let o = run(restore_cmd(&stack, "snapshots", n1).args(["--source", "register", "--json"]));
        (o.status.success() && json(&o).as_array().is_some_and(|a| !a.is_empty())).then(String::new)
    });

    // Prometheus scrapes the three nodes and the agent.
    wait_for("every target up", Duration::from_secs(60), || {
        let t = prometheus("/api/v1/targets");
        let active = t["data"]["activeTargets"].as_array().unwrap().clone();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        (active.len() == 4 && up == 4).then(String::new)
    });
    let leader = prometheus("/api/v1/query?query=sum(exclave_raft%7Bfield%3D%22is_leader%22%7D)");
    assert_eq!(leader["data"]["result"][0]["value"][1], "1", "{leader}");

    // One node container killed: the others keep serving, Prometheus sees it down and the
    // node-down alert becomes active.
    let o = stack.compose(&["kill", "n1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("ExclaveNodeDown active", Duration::from_secs(60), || {
        let a = prometheus("/api/v1/alerts");
        a["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["labels"]["alertname"] == "ExclaveNodeDown" && a["labels"]["instance"] == "172.31.213.11:9464")
            .then(String::new)
    });

    // The register restores from another embassy, byte for byte.
    let to = stack.path("restored");
    let o =
        ok(run(restore_cmd(&stack, "restore", "172.31.213.13:7401").args(["--source", "register", "--to"]).arg(&to)));
    assert!(stdout(&o).contains("restored"), "{}", stdout(&o));
    assert_same_tree(&stack.path("register"), &to.join("register"));
}
