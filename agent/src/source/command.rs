//! Child processes whose standard output is backed up (pg_dump, pg_basebackup, a `command`
//! source): spawning them, reading their output, and deciding whether it is complete.
//!
//! Output is complete only when the child exits with status 0 after its output ended; a
//! non-zero status, a signal or a read error fails the whole snapshot (never a snapshot that
//! looks complete). The tail of the child's standard error is kept for the error message.
//! A child still running when its reader is dropped (the backup failed) is killed.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

/// Most of a child's standard error kept for the error message.
const STDERR_TAIL: usize = 4096;

#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot run {program}: {err}{hint}")]
    Spawn { program: String, err: std::io::Error, hint: &'static str },
    #[error("{program} {status}{stderr}")]
    Failed { program: String, status: String, stderr: String },
    #[error("reading the output of {program}: {err}")]
    Read { program: String, err: std::io::Error },
}

impl ChildSpec {
    pub fn new(program: impl Into<PathBuf>, args: impl IntoIterator<Item = impl Into<OsString>>) -> ChildSpec {
        ChildSpec { program: program.into(), args: args.into_iter().map(Into::into).collect(), env: Vec::new() }
    }

    fn name(&self) -> String {
        self.program.display().to_string()
    }

    pub fn spawn(&self) -> Result<RunningChild, ChildError> {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|err| ChildError::Spawn {
            program: self.name(),
            hint: if err.kind() == std::io::ErrorKind::NotFound { " (not installed, or not on PATH?)" } else { "" },
            err,
        })?;
        let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ChildError::Spawn { program: self.name(), err: std::io::Error::other("no pipes"), hint: "" });
        };
        // Drained on its own thread so a chatty child never blocks on a full stderr pipe.
        let stderr_tail = std::thread::spawn(move || {
            let mut tail = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * STDERR_TAIL {
                    tail.drain(..tail.len() - STDERR_TAIL);
                }
            }
            tail
        });
        Ok(RunningChild { program: self.name(), child: Some(child), stdout, stderr_tail: Some(stderr_tail) })
    }

    /// Runs to completion and returns standard output (for small outputs such as `--version`).
    pub fn output(&self) -> Result<Vec<u8>, ChildError> {
        let mut running = self.spawn()?;
        let mut out = Vec::new();
        running.read_to_end(&mut out).map_err(|err| ChildError::Read { program: running.program.clone(), err })?;
        running.finish()?;
        Ok(out)
    }
}

pub struct RunningChild {
    program: String,
    child: Option<Child>,
    stdout: ChildStdout,
    stderr_tail: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Read for RunningChild {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stdout.read(buf)
    }
}

impl RunningChild {
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Waits for the child (its output must have been read to the end) and checks it
    /// succeeded.
    pub fn finish(mut self) -> Result<(), ChildError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let status = child.wait().map_err(|err| ChildError::Read { program: self.program.clone(), err })?;
        let tail = self.stderr_tail.take().and_then(|t| t.join().ok()).unwrap_or_default();
        if status.success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&tail[tail.len().saturating_sub(STDERR_TAIL)..]).trim().to_string();
        let status = match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(s)) => format!("was killed by signal {s}"),
            _ => "failed".to_string(),
        };
        Err(ChildError::Failed {
            program: self.program.clone(),
            status,
            stderr: if text.is_empty() { String::new() } else { format!(": {text}") },
        })
    }
}

impl RunningChild {
    /// After reading its output failed: the child's own failure, if it has one (it usually
    /// explains the broken stream better than the reader can), else None. A child still
    /// running after a short grace is killed, so nothing waits on a pipe nobody reads.
    pub fn abort(mut self) -> Option<ChildError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        loop {
            match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(status))) if status.success() => return None,
                Some(Ok(Some(_))) => return self.finish().err(),
                Some(Ok(None)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                _ => return None, // dropped here: killed
            }
        }
    }
}

impl Drop for RunningChild {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> ChildSpec {
        ChildSpec::new("/bin/sh", ["-c", script])
    }

    #[test]
    fn output_of_a_successful_child() {
        assert_eq!(sh("printf hello").output().unwrap(), b"hello");
    }

    #[test]
    fn failure_reports_status_and_stderr() {
        let e = sh("echo partial; echo 'connection refused' >&2; exit 3").output().unwrap_err().to_string();
        assert!(e.contains("exited with status 3") && e.contains("connection refused"), "{e}");
        let e = sh("kill -9 $$").output().unwrap_err().to_string();
        assert!(e.contains("killed by signal 9"), "{e}");
        let e = ChildSpec::new("/nonexistent/pg_dump", ["-V"]).output().unwrap_err().to_string();
        assert!(e.contains("cannot run /nonexistent/pg_dump") && e.contains("not installed"), "{e}");
    }

    #[test]
    fn abort_prefers_the_childs_own_failure() {
        let mut c = sh("printf partial; echo 'server closed the connection' >&2; exit 1").spawn().unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        let e = c.abort().expect("the child failed").to_string();
        assert!(e.contains("server closed the connection"), "{e}");
        let c = sh("exec sleep 30").spawn().unwrap();
        let t = std::time::Instant::now();
        assert!(c.abort().is_none());
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn dropping_a_running_child_kills_it() {
        let mut c = sh("echo started; exec sleep 30").spawn().unwrap();
        let mut first = [0u8; 8];
        c.read_exact(&mut first).unwrap();
        let t = std::time::Instant::now();
        drop(c);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
