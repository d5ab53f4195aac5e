//! Harness for tests that run the real Exclave binaries on loopback with real certificates.
//!
//! The binaries are taken from the target directory these tests were built into
//! (`cargo build --workspace --bins` first; the README's test command does), or from
//! `EXCLAVE_BIN_DIR`. Every process is killed when its handle drops, every directory is a
//! temporary one.

pub mod netns;
pub mod postgres;

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Average chunk size of the backups tests make, unless a test passes its own `--chunk-avg`.
/// Tests back up a few MiB and check what happens to some chunks and not others; the default
/// (1 MiB) would cut such a tree into a handful of chunks. Tests of the default pass
/// `--chunk-avg 1048576`.
pub const TEST_CHUNK_AVG: &str = "65536";

pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("EXCLAVE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent().and_then(Path::parent).expect("target directory").to_path_buf()
        }
    };
    let p = dir.join(name);
    assert!(p.exists(), "{} not found: run `cargo build --workspace --bins` before the tests", p.display());
    p
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("spawn")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
pub fn ok(o: Output) -> Output {
    assert!(o.status.success(), "command failed ({:?}):\nstdout:\n{}\nstderr:\n{}", o.status, stdout(&o), stderr(&o));
    o
}

pub fn free_port() -> u16 {
    unused_port(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok())
}

/// A TCP port nothing listens on now (`free_port` checks UDP, where the nodes listen).
pub fn free_tcp_port() -> u16 {
    unused_port(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A port below Linux's ephemeral range (32768 - 60999) that `free` says is unused: a node
/// restarted on its port must find it still free, and a port the kernel hands out could have
/// gone meanwhile to any process's outgoing socket. Each test process walks its own sequence
/// (from its pid), so parallel tests rarely try the same port.
fn unused_port(free: impl Fn(u16) -> bool) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + k.wrapping_mul(7_919)) % SPAN) as u16;
        if free(port) {
            return port;
        }
    }
    panic!("no unused port between {LOW} and {}", LOW + SPAN);
}

/// A PKI and keys for tenant `lux` (agent `rnpp`, restore `dr`), tenant `est` (agent `pop`,
/// restore `drest`), an admin, and nodes `n1`..`n3`.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> World {
        let dir = tempfile::tempdir().expect("tempdir");
        let w = World { dir };
        let r = bin("exclave-replicator");
        let pki = w.pki();
        ok(run(Command::new(&r).args(["pki", "init", "--dir"]).arg(&pki)));
        let issue = |args: &[&str]| ok(run(Command::new(&r).args(["pki", "issue", "--dir"]).arg(&pki).args(args)));
        for n in ["n1", "n2", "n3", "n4"] {
            issue(&["--role", "node", "--name", n, "--host", "127.0.0.1"]);
        }
        issue(&["--role", "agent", "--name", "rnpp", "--tenant", "lux"]);
        issue(&["--role", "restore", "--name", "dr", "--tenant", "lux"]);
        issue(&["--role", "agent", "--name", "pop", "--tenant", "est"]);
        issue(&["--role", "restore", "--name", "drest", "--tenant", "est"]);
        issue(&["--role", "admin", "--name", "admin"]);
        for (t, f) in [("lux", "lux.key"), ("est", "est.key")] {
            ok(run(Command::new(bin("exclave-agent")).args(["keys", "init", "--tenant", t, "--out"]).arg(w.path(f))));
        }
        w
    }

    /// Issues a node certificate for `name` at `host` (an address of a `netns::Net` host).
    pub fn issue_node(&self, name: &str, host: &str) {
        ok(run(Command::new(bin("exclave-replicator"))
            .args(["pki", "issue", "--dir"])
            .arg(self.pki())
            .args(["--role", "node", "--name", name, "--host", host])));
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn pki(&self) -> PathBuf {
        self.path("pki")
    }

    pub fn start_node(&self, name: &str) -> Node {
        self.start_node_at(name, &self.path(&format!("data-{name}")), free_port())
    }

    pub fn start_node_at(&self, name: &str, data: &Path, port: u16) -> Node {
        // A small reserve: test nodes write little, and a busy CI disk should not fail them.
        self.start_node_with(name, data, port, &["--min-free-mib", "64"])
    }

    pub fn start_node_with(&self, name: &str, data: &Path, port: u16, extra: &[&str]) -> Node {
        let node = Node::spawn_with(self, name, data, port, extra);
        node.wait_ready();
        node
    }

    /// `exclave-agent backup` as agent `rnpp` of tenant lux, with `--json`.
    /// Starts founding members `names` of one cluster on loopback and waits for a leader.
    pub fn start_cluster(&self, names: &[&str]) -> Vec<Node> {
        self.start_cluster_with(names, &[])
    }

    /// As `start_cluster`, with `extra` flags for every node.
    pub fn start_cluster_with(&self, names: &[&str], extra: &[&str]) -> Vec<Node> {
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let nodes: Vec<Node> = names
            .iter()
            .zip(&ports)
            .map(|(name, port)| {
                let mut args: Vec<String> = vec!["--min-free-mib".into(), "64".into()];
                args.extend(extra.iter().map(|s| s.to_string()));
                for (other, p) in names.iter().zip(&ports).filter(|(o, _)| *o != name) {
                    args.push("--peer".into());
                    args.push(format!("{other}=127.0.0.1:{p}"));
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Node::spawn_with(self, name, &self.path(&format!("data-{name}")), *port, &args)
            })
            .collect();
        for n in &nodes {
            n.wait_ready();
        }
        self.wait_leader(&nodes);
        nodes
    }

    /// As `start_cluster`, each node also serving HTTP (`--metrics`) on a port of its own:
    /// the nodes and their HTTP ports, in order.
    pub fn start_cluster_http(&self, names: &[&str]) -> (Vec<Node>, Vec<u16>) {
        let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
        let http: Vec<u16> = names.iter().map(|_| free_tcp_port()).collect();
        let nodes: Vec<Node> = (0..names.len())
            .map(|i| {
                let mut args = vec!["--min-free-mib".to_string(), "64".into()];
                args.extend(["--metrics".to_string(), format!("127.0.0.1:{}", http[i])]);
                for j in (0..names.len()).filter(|j| *j != i) {
                    args.extend(["--peer".to_string(), format!("{}=127.0.0.1:{}", names[j], ports[j])]);
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Node::spawn_with(self, names[i], &self.path(names[i]), ports[i], &args)
            })
            .collect();
        for n in &nodes {
            n.wait_ready();
        }
        self.wait_leader(&nodes);
        (nodes, http)
    }

    /// `cluster status --json` as seen by `node`.
    pub fn cluster_status(&self, node: &Node) -> Option<serde_json::Value> {
        let o = run(Command::new(bin("exclave-replicator"))
            .args(["cluster", "status", "--json", "--node", &node.addr.to_string(), "--pki"])
            .arg(self.pki()));
        o.status.success().then(|| json(&o))
    }

    /// `node`'s own entry of `cluster status --json` (its role, term, indexes, backfill...).
    pub fn member_status(&self, node: &Node) -> serde_json::Value {
        self.cluster_status(node).expect("cluster status")["members"][0]["status"].clone()
    }

    /// Ids of the snapshots of `source` that `node` lists, oldest first.
    pub fn snapshot_ids(&self, node: &Node, source: &str) -> Vec<String> {
        let o = ok(run(self.restore_cmd(node, "snapshots").args(["--source", source, "--json"])));
        json(&o).as_array().expect("list").iter().map(|s| s["id"].as_str().expect("id").to_string()).collect()
    }

    /// Sets a tenant's protection window (`retention protect`, as admin): tests of retention
    /// itself set 0 days so that what a policy releases goes at once.
    pub fn protect(&self, node: &Node, tenant: &str, days: u32) {
        ok(run(Command::new(bin("exclave-replicator"))
            .args(["retention", "protect", "--tenant", tenant, "--days", &days.to_string()])
            .args(["--node", &node.addr.to_string(), "--pki"])
            .arg(self.pki())));
    }

    /// Waits until the running nodes among `nodes` agree on a leader; returns its index.
    #[track_caller]
    pub fn wait_leader(&self, nodes: &[Node]) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for n in nodes.iter().filter(|n| n.running()) {
                if let Some(st) = self.cluster_status(n) {
                    let leader = st["members"][0]["status"]["leader"].as_str().map(str::to_string);
                    if let Some(l) = leader
                        && let Some(i) = nodes.iter().position(|n| n.name == l && n.running())
                    {
                        return i;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no leader elected within 30 s");
    }

    /// Waits until `node` itself hears from a leader (a restarted node may lag the others).
    #[track_caller]
    pub fn wait_sees_leader(&self, node: &Node) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            if let Some(st) = self.cluster_status(node) {
                let me = &st["members"][0]["status"];
                if me["leader"].is_string() && me["stale"].is_null() {
                    return;
                }
                last = me.clone();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = node.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{} heard from no leader within 30 s; last status: {last}\nlog tail:\n{}",
            node.name,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// Waits until `node` has applied the cluster's commit index (as `leader` reports it) and
    /// holds every indexed chunk.
    #[track_caller]
    pub fn wait_backfilled(&self, node: &Node, leader: &Node) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            let commit = self.cluster_status(leader).and_then(|s| s["members"][0]["status"]["commit_index"].as_u64());
            if let (Some(commit), Some(st)) = (commit, self.cluster_status(node)) {
                let me = st["members"][0]["status"].clone();
                let scanned = me["scanned_at"].as_u64().unwrap_or(0);
                if me["applied_index"].as_u64() >= Some(commit) && scanned >= commit && me["chunks_missing"] == 0 {
                    return me;
                }
                last = me;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{} did not backfill within 60 s; last status: {last}", node.name);
    }

    pub fn backup_to(&self, nodes: &[&Node], source: &str, paths: &[&Path]) -> Output {
        let mut c = Command::new(bin("exclave-agent"));
        c.args(["backup", "--json"]);
        for n in nodes {
            c.args(["--node", &n.addr.to_string()]);
        }
        c.arg("--pki").arg(self.pki()).args(["--identity", "rnpp", "--key-file"]).arg(self.path("lux.key"));
        c.args(["--source", source]).args(["--chunk-avg", TEST_CHUNK_AVG]).args(paths);
        run(&mut c)
    }

    pub fn backup(&self, node: &Node, source: &str, paths: &[&Path]) -> Output {
        self.backup_as(node, "rnpp", "lux.key", source, paths, &[])
    }

    pub fn backup_as(
        &self,
        node: &Node,
        identity: &str,
        key: &str,
        source: &str,
        paths: &[&Path],
        extra: &[&str],
    ) -> Output {
        let mut c = Command::new(bin("exclave-agent"));
        c.args(["backup", "--json", "--node", &node.addr.to_string(), "--pki"])
            .arg(self.pki())
            .args(["--identity", identity, "--key-file"])
            .arg(self.path(key))
            .args(["--source", source]);
        if !extra.contains(&"--chunk-avg") {
            c.args(["--chunk-avg", TEST_CHUNK_AVG]);
        }
        c.args(extra).args(paths);
        run(&mut c)
    }

    /// `exclave-restore <verb>` as `dr` of tenant lux with the lux key.
    pub fn restore_cmd(&self, node: &Node, verb: &str) -> Command {
        let mut c = Command::new(bin("exclave-restore"));
        c.args([verb, "--node", &node.addr.to_string(), "--pki"])
            .arg(self.pki())
            .args(["--identity", "dr", "--key-file"])
            .arg(self.path("lux.key"));
        c
    }

    pub fn restore(&self, node: &Node, source: &str, snapshot: &str, to: &Path) -> Output {
        run(self
            .restore_cmd(node, "restore")
            .args(["--source", source, "--snapshot", snapshot, "--json", "--to"])
            .arg(to))
    }

    pub fn verify(&self, node: &Node, source: &str, snapshot: &str) -> Output {
        run(self.restore_cmd(node, "verify").args(["--source", source, "--snapshot", snapshot, "--json"]))
    }
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    pub data: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
    pki: PathBuf,
    extra: Vec<String>,
    /// Network namespace the node runs in (`netns::Net`), if any.
    netns: Option<String>,
    /// Extra environment of the node's process (test hooks such as EXCLAVE_TEST_CRASH_AT).
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn spawn(w: &World, name: &str, data: &Path, port: u16) -> Node {
        Node::spawn_with(w, name, data, port, &[])
    }

    pub fn spawn_with(w: &World, name: &str, data: &Path, port: u16, extra: &[&str]) -> Node {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        Node::spawn_in(w, name, data, addr, None, extra)
    }

    /// A node listening on `addr`, inside network namespace `netns` if given.
    pub fn spawn_in(w: &World, name: &str, data: &Path, addr: SocketAddr, netns: Option<&str>, extra: &[&str]) -> Node {
        let log = w.path(&format!("{name}-{}-{}.log", addr.port(), std::process::id()));
        let mut node = Node {
            name: name.into(),
            addr,
            data: data.into(),
            log,
            child: None,
            pki: w.pki(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_string),
            env: Vec::new(),
        };
        node.launch();
        node
    }

    fn launch(&mut self) {
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let mut cmd = match &self.netns {
            // `ip netns exec` enters the namespace and execs the node: same process, same pid.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("exclave-replicator"));
                c
            }
            None => Command::new(bin("exclave-replicator")),
        };
        let child = cmd
            .args(["run", "--name", &self.name, "--listen", &self.addr.to_string(), "--pki"])
            .arg(&self.pki)
            .arg("--data")
            .arg(&self.data)
            .args(&self.extra)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("spawn node");
        self.child = Some(child);
    }

    /// Starts a stopped node again with the same settings and waits until it serves.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is running", self.name);
        let before = self.log_text().matches("storage node ready").count();
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_text().matches("storage node ready").count() <= before {
            assert!(Instant::now() < deadline, "node {} did not restart:\n{}", self.name, self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The process id of the running node.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("the node is running")
    }

    /// Stops the node (SIGKILL), sets its environment, starts it again and waits until it serves.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        self.kill();
        self.env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.restart();
    }

    /// Waits for the process to die by itself (an abort at a test hook); true if it did.
    pub fn wait_dead(&mut self, timeout: Duration) -> bool {
        let died = self.wait_exit(timeout).is_some();
        if died {
            self.child = None;
        }
        died
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.log_text().contains("storage node ready") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("node {} did not start:\n{}", self.name, self.log_text());
    }

    /// Waits for the process to exit by itself (for nodes expected to fail at start).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        // A pid from our own child; kill(2) with SIGTERM has no memory effects.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        let st = self.wait_exit(Duration::from_secs(20));
        self.child = None;
        st
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a restore must reproduce of one path.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    File(blake3::Hash),
    Dir,
    Symlink(PathBuf),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub mode: u32,
    pub mtime: (i64, i64),
    pub size: u64,
}

/// Content and metadata of a tree, keyed by relative path.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, Meta> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.expect("walk");
        let m = e.path().symlink_metadata().expect("lstat");
        let kind = if m.file_type().is_symlink() {
            Kind::Symlink(std::fs::read_link(e.path()).expect("readlink"))
        } else if m.is_dir() {
            Kind::Dir
        } else {
            Kind::File(blake3::hash(&std::fs::read(e.path()).expect("read")))
        };
        let rel = e.path().strip_prefix(root).expect("prefix").to_path_buf();
        let mode = if m.file_type().is_symlink() { 0 } else { m.permissions().mode() & 0o7777 };
        out.insert(rel, Meta { kind, mode, mtime: (m.mtime(), m.mtime_nsec()), size: m.len() });
    }
    out
}

#[track_caller]
pub fn assert_same_tree(a: &Path, b: &Path) {
    let (ta, tb) = (tree(a), tree(b));
    let keys_a: Vec<_> = ta.keys().collect();
    let keys_b: Vec<_> = tb.keys().collect();
    assert_eq!(keys_a, keys_b, "restored tree lists other paths");
    for (k, ma) in &ta {
        let mb = &tb[k];
        if k.as_os_str().is_empty() {
            continue; // the roots themselves: the target dir is ours
        }
        assert_eq!(ma.kind, mb.kind, "content of {}", k.display());
        assert_eq!(ma.mode, mb.mode, "mode of {}", k.display());
        assert_eq!(ma.mtime, mb.mtime, "mtime of {}", k.display());
    }
}

/// A deterministic sample tree: text, random and repetitive files, nested and empty
/// directories, a symlink, odd modes and times. About `size` bytes.
pub fn sample_tree(dir: &Path, seed: u64, size: usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir.join("registers/persons")).expect("mkdir");
    std::fs::create_dir_all(dir.join("documents/2025/01")).expect("mkdir");
    std::fs::create_dir_all(dir.join("empty/deeper")).expect("mkdir");
    let mut rows = String::new();
    let mut i = 0u64;
    while rows.len() < size / 2 {
        rows.push_str(&format!(
            "{i}\t{}\tVirtanen\t{}-{:02}-{:02}\tHelsinki\t{}\n",
            ["Aino", "Juhani", "Maria", "Eero"][(i % 4) as usize],
            1930 + rng.random_range(0..90),
            rng.random_range(1..13),
            rng.random_range(1..29),
            rng.random_range(0..1_000_000u32)
        ));
        i += 1;
    }
    std::fs::write(dir.join("registers/persons/persons.tsv"), rows.as_bytes()).expect("write");
    let mut noise = vec![0u8; size / 4];
    rng.fill(&mut noise[..]);
    std::fs::write(dir.join("documents/2025/01/scan-0001.pdf"), &noise).expect("write");
    for n in 0..20 {
        let body = format!("<decision id=\"{n}\">{}</decision>\n", "granted ".repeat(50 + n * 37));
        std::fs::write(dir.join(format!("documents/2025/01/decision-{n:03}.xml")), body).expect("write");
    }
    std::fs::write(dir.join("registers/zero-length"), b"").expect("write");
    std::fs::write(dir.join("registers/repetitive.bin"), vec![7u8; size / 8]).expect("write");
    std::os::unix::fs::symlink("persons/persons.tsv", dir.join("registers/current")).expect("symlink");
    std::fs::set_permissions(dir.join("registers/persons/persons.tsv"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::set_permissions(dir.join("registers/zero-length"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let t = filetime::FileTime::from_unix_time(1_700_000_000, 123_456_789);
    filetime::set_file_mtime(dir.join("documents/2025/01/scan-0001.pdf"), t).expect("mtime");
    filetime::set_file_mtime(dir.join("empty/deeper"), t).expect("mtime");
}

/// Rewrites, in a stopped node's store, the envelope of chunk `id` of tenant lux with
/// `tamper` (in its pack file, where its location in the index says); with `fix_checksum`, also
/// rewrites the location's storage checksum to match (a node that lies), leaving only the AEAD
/// to catch it. The location layout is documented at the top of replicator/src/store.rs.
pub fn tamper_chunk(data: &Path, id: &exclave::ChunkId, fix_checksum: bool, tamper: impl Fn(&mut Vec<u8>)) {
    use std::os::unix::fs::FileExt;
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(false);
    let cfs = rocksdb::DB::list_cf(&opts, data).expect("tamper");
    let db = rocksdb::DB::open_cf(&opts, data, &cfs).expect("tamper");
    let mut key = b"lux\0".to_vec();
    key.extend_from_slice(&id.0);
    let index = db.cf_handle("chunk_index").expect("tamper");
    let mut loc = db.get_cf(index, &key).expect("tamper").expect("chunk indexed");
    assert_eq!(loc.len(), 48);
    let pack = u32::from_le_bytes(loc[..4].try_into().expect("tamper"));
    let offset = u64::from_le_bytes(loc[4..12].try_into().expect("tamper"));
    let len = u32::from_le_bytes(loc[12..16].try_into().expect("tamper")) as usize;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(data.join("packs").join(format!("{pack:08}.pack")))
        .expect("tamper");
    let mut env = vec![0u8; len];
    file.read_exact_at(&mut env, offset).expect("tamper");
    tamper(&mut env);
    file.write_all_at(&env, offset).expect("tamper");
    file.sync_all().expect("tamper");
    if fix_checksum {
        loc[16..].copy_from_slice(blake3::hash(&env).as_bytes());
        db.put_cf(index, &key, &loc).expect("tamper");
    }
    db.flush().expect("tamper");
}

/// A stopped node's store and the name of its active catalog family (`catalog` or
/// `catalog_b`, as the pointer `cc` in the raft family says).
fn open_catalog(data: &Path) -> (rocksdb::DB, &'static str) {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(false);
    let cfs = rocksdb::DB::list_cf(&opts, data).expect("tamper");
    let db = rocksdb::DB::open_cf(&opts, data, &cfs).expect("tamper");
    let raft = db.cf_handle("raft").expect("tamper");
    let active = match db.get_cf(raft, b"cc").expect("tamper") {
        Some(v) if v == b"catalog_b" => "catalog_b",
        _ => "catalog",
    };
    (db, active)
}

/// Removes, in a stopped node's catalog, the record of snapshot `id` of tenant lux, as someone
/// with the embassy's disks could (keys documented at the top of replicator/src/catalog.rs).
pub fn remove_snapshot_record(data: &Path, id: &str) {
    let (db, active) = open_catalog(data);
    let cat = db.cf_handle(active).expect("tamper");
    let mut ikey = b"ilux\0".to_vec();
    ikey.extend_from_slice(id.as_bytes());
    let loc = db.get_cf(cat, &ikey).expect("tamper").expect("snapshot in the catalog");
    let mut skey = b"slux\0".to_vec();
    skey.extend_from_slice(&loc);
    skey.extend_from_slice(id.as_bytes());
    assert!(db.get_cf(cat, &skey).expect("tamper").is_some(), "snapshot record where the layout says");
    db.delete_cf(cat, &skey).expect("tamper");
    db.delete_cf(cat, &ikey).expect("tamper");
    db.flush_cf(cat).expect("tamper");
}

/// Removes, in a stopped node's catalog, every drill record of tenant lux (keys `D‖tenant‖…`,
/// see replicator/src/catalog.rs); returns how many.
pub fn remove_drill_records(data: &Path) -> usize {
    let (db, active) = open_catalog(data);
    let cat = db.cf_handle(active).expect("tamper");
    let prefix = b"Dlux\0".to_vec();
    let keys: Vec<Box<[u8]>> = db
        .iterator_cf(cat, rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward))
        .map(|kv| kv.expect("tamper").0)
        .take_while(|k| k.starts_with(&prefix))
        .collect();
    for k in &keys {
        db.delete_cf(cat, k).expect("tamper");
    }
    db.flush_cf(cat).expect("tamper");
    keys.len()
}

/// How many keys of a stopped node's catalog start with `prefix` (keys documented at the top
/// of replicator/src/catalog.rs).
pub fn count_catalog_keys(data: &Path, prefix: &[u8]) -> usize {
    let (db, active) = open_catalog(data);
    let cat = db.cf_handle(active).expect("catalog family");
    db.iterator_cf(cat, rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward))
        .map(|kv| kv.expect("catalog read").0)
        .take_while(|k| k.starts_with(prefix))
        .count()
}

/// The workspace's root directory (where `deploy/` and `README.md` are).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("chaos-tests sits in the workspace").to_path_buf()
}

/// `GET path` on loopback: the status code and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("HTTP endpoint");
    // HTTP/1.0: the answer is never chunked and ends with the connection.
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, body.to_string())
}

/// Waits until an HTTP endpoint on loopback accepts connections (the program has started).
pub fn wait_http(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listening on 127.0.0.1:{port} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The body of `GET /metrics` from a metrics endpoint on loopback.
pub fn metrics(port: u16) -> String {
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    body
}

/// `promtool check metrics` on a scrape: the exposition is valid and follows the naming
/// conventions. Fails the test with promtool's words when not.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's `prometheus` package; .ci/run installs it)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(out.status.success(), "promtool check metrics:\n{}{}", stdout(&out), stderr(&out));
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}\n{}", stdout(o), stderr(o)))
}

/// Mounts a tmpfs with `opts` (e.g. "size=1m") on `dir` (made): a small disk to fill. Root only.
pub fn mount_tmpfs(dir: &Path, opts: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir).status().expect("mount");
    assert!(st.success(), "mounting a tmpfs needs root (CI runs as root)");
}

/// Spawns an agent command with a hold test hook (`EXCLAVE_TEST_HOLD_COMMIT` or
/// `EXCLAVE_TEST_HOLD_UPLOAD`, see the agent's `backup::test_hold`) pointing at `hold`, and
/// waits until it is held there; writing `hold` releases it.
pub fn spawn_held(cmd: &mut Command, hook: &str, hold: &Path) -> Child {
    let child = cmd
        .env(hook, hold)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent spawned");
    let waiting = PathBuf::from(format!("{}.waiting", hold.display()));
    let deadline = Instant::now() + Duration::from_secs(60);
    while !waiting.exists() {
        assert!(Instant::now() < deadline, "the agent never reached its hold ({hook})");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Unmounts its directory (lazily) when dropped.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Sends SIGTERM to `child` and waits up to `timeout` for it to exit; its exit code. Panics
/// naming `what` if it is still running then.
pub fn sigterm_and_wait(child: &mut Child, timeout: Duration, what: &str) -> Option<i32> {
    // Sending a signal to our own child cannot violate memory safety.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st.code();
        }
        assert!(Instant::now() < deadline, "{what} ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}
