//! A real PostgreSQL server for tests, from the Debian packages `.ci/run` installs.
//!
//! Each server has its own data directory, port and socket directory under a temporary
//! directory, and is stopped (immediate mode) when its handle drops. PostgreSQL refuses to
//! run as root, so under root the server programs run as the `postgres` user, in a
//! directory that user owns; files the server itself must read (the agent binary and its
//! settings, for `archive_command`) are copied there with `share`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::World;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_tcp_port, ok, run, stdout};

/// The bin directory of the newest installed PostgreSQL (`EXCLAVE_PG_BIN` wins).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("EXCLAVE_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (/usr/lib/postgresql): .ci/run installs it")
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().expect("no PostgreSQL server under /usr/lib/postgresql").1
}

fn is_root() -> bool {
    // geteuid cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid() == 0
    }
}

pub struct PgServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub bin: PathBuf,
    running: bool,
}

impl PgServer {
    /// Initialises and starts a server; `conf` is appended to postgresql.conf.
    pub fn start(conf: &str) -> PgServer {
        let mut s = PgServer::init(conf);
        s.start_existing();
        s
    }

    /// A server's directory with no data directory yet (for a restored one).
    pub fn empty() -> PgServer {
        let dir = tempfile::Builder::new().prefix("exclave-pg-").tempdir_in("/tmp").expect("tempdir");
        let s = PgServer { dir, port: free_tcp_port(), bin: bin_dir(), running: false };
        s.own(s.dir.path());
        s
    }

    /// Initialises a server without starting it.
    pub fn init(conf: &str) -> PgServer {
        let s = PgServer::empty();
        ok(run(s.as_server(
            Command::new(s.bin.join("initdb"))
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync", "-D"])
                .arg(s.data()),
        )));
        s.configure(conf);
        s
    }

    /// Readies a data directory restored into `data()` to run as this server.
    pub fn adopt_data(&self, conf: &str) {
        let target = self.data();
        self.own(&target);
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        self.configure(conf);
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("pgdata")
    }

    /// Sets the port and socket directory, then appends `conf`.
    pub fn configure(&self, conf: &str) {
        let path = self.data().join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("postgresql.conf");
        text.push_str(&format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nfsync = off\n{conf}\n",
            self.port,
            self.dir.path().display()
        ));
        std::fs::write(&path, text).expect("write postgresql.conf");
    }

    pub fn start_existing(&mut self) {
        let log = self.dir.path().join("server.log");
        let o = run(self.as_server(
            Command::new(self.bin.join("pg_ctl"))
                .args(["-w", "-t", "120", "-D"])
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .arg("start"),
        ));
        assert!(o.status.success(), "pg_ctl start failed: {}\nlog:\n{}", stdout(&o), self.log());
        self.running = true;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if self.running {
            let _ = run(self.as_server(
                Command::new(self.bin.join("pg_ctl")).args(["-w", "-m", "fast", "-D"]).arg(self.data()).arg("stop"),
            ));
            self.running = false;
        }
    }

    /// A libpq connection string for database `db`.
    pub fn conn(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname={db}", self.port)
    }

    /// Runs SQL through psql; returns unaligned, tuples-only output.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let o = ok(run(Command::new(self.bin.join("psql")).args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-d",
            &self.conn(db),
            "-c",
            sql,
        ])));
        stdout(&o).trim().to_string()
    }

    /// Waits until `sql` prints `want` (e.g. the end of recovery).
    pub fn wait_for(&self, db: &str, sql: &str, want: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let o = run(Command::new(self.bin.join("psql")).args(["-X", "-At", "-d", &self.conn(db), "-c", sql]));
            last = format!("{}{}", stdout(&o).trim(), crate::stderr(&o).trim());
            if o.status.success() && stdout(&o).trim() == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("{sql} did not give {want:?} within {timeout:?}; last: {last}\nlog:\n{}", self.log());
    }

    /// Copies `src` (a file or directory) into the server's directory, readable by the
    /// server's user; returns the copy's path.
    pub fn share(&self, src: &Path, name: &str) -> PathBuf {
        let dst = self.dir.path().join(name);
        ok(run(Command::new("cp").arg("-a").arg(src).arg(&dst)));
        self.own(&dst);
        dst
    }

    /// Copies a program and the agent/restore settings of `w` (PKI, lux key) here, so the
    /// server's user can run them (`archive_command`, `restore_command`); writes an agent
    /// config for `nodes`. Returns (program copy, config path, pki copy, key copy).
    pub fn share_client(
        &self,
        w: &World,
        program: &str,
        nodes: &[std::net::SocketAddr],
    ) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let prog = self.share(&crate::bin(program), program);
        let pki = self.share(&w.pki(), "pki");
        let key = self.share(&w.path("lux.key"), "lux.key");
        let cfg = self.dir.path().join(format!("{program}.toml"));
        let nodes: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
        std::fs::write(
            &cfg,
            format!(
                "node = [{}]\npki = \"{}\"\nidentity = \"rnpp\"\nkey-file = \"{}\"\n",
                nodes.join(", "),
                pki.display(),
                key.display()
            ),
        )
        .expect("write config");
        self.own(&cfg);
        (prog, cfg, pki, key)
    }

    /// Gives `path` (recursively) to the server's user.
    pub fn own(&self, path: &Path) {
        if is_root() {
            ok(run(Command::new("chown").arg("-R").arg("postgres:postgres").arg(path)));
        }
    }

    /// `cmd` run as the server's user.
    pub fn as_server<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        if is_root() {
            let prog = cmd.get_program().to_owned();
            let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
            let mut wrapped = Command::new("runuser");
            wrapped.args(["-u", "postgres", "--"]).arg(prog).args(args);
            *cmd = wrapped;
        }
        cmd
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = run(self.as_server(
                Command::new(self.bin.join("pg_ctl"))
                    .args(["-w", "-m", "immediate", "-D"])
                    .arg(self.data())
                    .arg("stop"),
            ));
        }
    }
}
