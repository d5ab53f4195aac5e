//! A scratch PostgreSQL server for drills: its own data directory in the drill's scratch
//! space, listening only on a Unix socket there (no TCP port to collide with or expose),
//! trust authentication for its own socket, and stopped (immediate) when dropped.
//! PostgreSQL refuses to run as root, so under root the server programs run as the `postgres`
//! user (`runuser`), which is given the scratch directory.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The bin directory to use: `--pg-bin`, else the newest `/usr/lib/postgresql/N/bin`, else
/// `None` (programs from PATH).
pub fn bin_dir(flag: Option<&Path>) -> Option<PathBuf> {
    if let Some(d) = flag {
        return Some(d.to_path_buf());
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

fn program(bin: Option<&Path>, name: &str) -> PathBuf {
    bin.map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name))
}

/// Runs `cmd`, as the server's user under root; fails with its stderr.
fn run_as_server(prog: &Path, args: &[&std::ffi::OsStr], what: &str) -> Result<String> {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(prog);
        c
    } else {
        Command::new(prog)
    };
    let out =
        cmd.args(args).stdin(Stdio::null()).output().with_context(|| {
            format!("cannot run {} ({what}): is PostgreSQL installed? (--pg-bin DIR)", prog.display())
        })?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim().lines().last().unwrap_or_default()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Major version of a PostgreSQL program (`pg_restore (PostgreSQL) 15.18` → 15).
pub fn major_of(prog: &Path) -> Result<u32> {
    let out = Command::new(prog)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}: is PostgreSQL installed? (--pg-bin DIR)", prog.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_once(')')
        .and_then(|(_, v)| v.trim().split(['.', ' ']).next())
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("{} --version printed {:?}", prog.display(), text.trim()))
}

pub struct Scratch {
    bin: Option<PathBuf>,
    /// The socket directory; also holds `server.log`.
    dir: PathBuf,
    data: PathBuf,
    running: bool,
}

impl Scratch {
    /// Initialises and starts a server in `dir` (created; given to `postgres` under root).
    pub fn start(bin: Option<PathBuf>, dir: &Path) -> Result<Scratch> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if is_root() {
            // The server's user must be able to reach its directory through the drill's.
            if let Some(parent) = dir.parent() {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o711));
            }
            let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir).status()?;
            if !st.success() {
                bail!("cannot give {} to the postgres user (is there one?)", dir.display());
            }
        }
        let s = Scratch { bin, dir: dir.to_path_buf(), data: dir.join("data"), running: false };
        let data = s.data();
        run_as_server(
            &program(s.bin.as_deref(), "initdb"),
            &[
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--no-sync".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
            "initdb of the scratch server",
        )?;
        // No JIT: a scratch server gains nothing from it, and the drill's hardened unit
        // forbids writable executable memory (MemoryDenyWriteExecute).
        let conf = format!(
            "\nlisten_addresses = ''\nunix_socket_directories = '{}'\nport = 5432\nfsync = off\n\
             full_page_writes = off\nsynchronous_commit = off\nmax_wal_size = '2GB'\njit = off\n",
            s.dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, conf.as_bytes()))
            .context("configuring the scratch server")?;
        let mut s = s;
        let log = s.dir.join("server.log");
        run_as_server(
            &program(s.bin.as_deref(), "pg_ctl"),
            &[
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "start".as_ref(),
            ],
            "starting the scratch server",
        )?;
        s.running = true;
        Ok(s)
    }

    /// Starts a server on a restored data directory whose `postgresql.auto.conf` already
    /// has its settings (socket in `dir`, `hba_file` = `dir/pg_hba.conf`, written here);
    /// returns once it accepts connections (a recovering server: once consistent).
    pub fn recover(
        bin: Option<PathBuf>,
        scratch: &Path,
        dir: &Path,
        data: &Path,
        timeout: std::time::Duration,
    ) -> Result<Scratch> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("pg_hba.conf"),
            "# an exclave drill's scratch server: its own socket only\nlocal all all trust\n",
        )
        .context("writing the drill's pg_hba.conf")?;
        // A Debian-style cluster keeps postgresql.conf outside its data directory.
        if !data.join("postgresql.conf").exists() {
            std::fs::write(data.join("postgresql.conf"), "# the base backup had none; see postgresql.auto.conf\n")?;
        }
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))?;
        if is_root() {
            // The server's user must reach the data directory and the spool through the drill's.
            let mut up = data.parent();
            while let Some(p) = up {
                let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711));
                if p == scratch {
                    break;
                }
                up = p.parent();
            }
            for d in [dir, data] {
                let st = Command::new("chown").arg("-R").arg("postgres:postgres").arg(d).status()?;
                if !st.success() {
                    bail!("cannot give {} to the postgres user (is there one?)", d.display());
                }
            }
        }
        let mut s = Scratch { bin, dir: dir.to_path_buf(), data: data.to_path_buf(), running: false };
        let log = s.dir.join("server.log");
        let secs = timeout.as_secs().max(1).to_string();
        let started = run_as_server(
            &program(s.bin.as_deref(), "pg_ctl"),
            &[
                "-w".as_ref(),
                "-t".as_ref(),
                secs.as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "start".as_ref(),
            ],
            "starting the recovering server",
        );
        // Stopped on drop even when pg_ctl gave up waiting.
        s.running = true;
        if let Err(e) = started {
            bail!("{e:#}: {}", s.log_problem());
        }
        Ok(s)
    }

    pub fn data(&self) -> PathBuf {
        self.data.clone()
    }

    /// Whether the server still runs (it removes its pid file when it stops, also after a
    /// fatal error in recovery).
    pub fn is_running(&self) -> bool {
        self.data.join("postmaster.pid").exists()
    }

    /// What the server's log says went wrong: its FATAL and PANIC lines, else its last lines.
    pub fn log_problem(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let bad: Vec<&str> = log.lines().filter(|l| l.contains("FATAL:") || l.contains("PANIC:")).collect();
        let lines: Vec<&str> = if bad.is_empty() {
            log.lines().rev().take(3).collect::<Vec<_>>().into_iter().rev().collect()
        } else {
            bad
        };
        let text = lines.join(" / ");
        if text.is_empty() { "the server's log is empty".into() } else { format!("server log: {text}") }
    }

    /// A libpq connection string to `db` on the scratch server's socket.
    pub fn conn(&self, db: &str) -> String {
        format!("host={} port=5432 user=postgres dbname={db}", self.dir.display())
    }

    /// Creates `db` and loads a custom-format dump into it with `jobs` parallel jobs.
    pub fn restore_dump(&self, db: &str, dump: &Path, jobs: usize) -> Result<()> {
        let host = self.dir.display().to_string();
        let createdb = program(self.bin.as_deref(), "createdb");
        let out = Command::new(&createdb)
            .args(["-h", &host, "-p", "5432", "-U", "postgres", db])
            .output()
            .with_context(|| format!("cannot run {}", createdb.display()))?;
        if !out.status.success() {
            bail!("createdb {db} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let pg_restore = program(self.bin.as_deref(), "pg_restore");
        let out = Command::new(&pg_restore)
            .args(["-h", &host, "-p", "5432", "-U", "postgres", "--no-owner", "--no-privileges", "--exit-on-error"])
            .arg(format!("--jobs={}", jobs.max(1)))
            .args(["-d", db])
            .arg(dump)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}: is PostgreSQL installed? (--pg-bin DIR)", pg_restore.display()))?;
        if !out.status.success() {
            bail!(
                "pg_restore of {} failed ({}): {}",
                dump.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim().lines().take(3).collect::<Vec<_>>().join(" / ")
            );
        }
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.running {
            let data = self.data();
            let _ = run_as_server(
                &program(self.bin.as_deref(), "pg_ctl"),
                &["-w".as_ref(), "-m".as_ref(), "immediate".as_ref(), "-D".as_ref(), data.as_os_str(), "stop".as_ref()],
                "stopping the scratch server",
            );
        }
    }
}
