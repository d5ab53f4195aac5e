//! The status file a daemon keeps for its `status` command (the agent's snapshots, the drill
//! daemon's drills): JSON, replaced atomically (written beside, then renamed) so a reader
//! never sees half of it, with the daemon's pid so `status` can tell a stopped daemon.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum StatusFileError {
    #[error("{what} {path}: {err}")]
    Io { what: &'static str, path: String, err: std::io::Error },
    #[error("parsing {path}: {err}")]
    Parse { path: String, err: serde_json::Error },
}

/// Reads the status at `path`; `None` when there is none yet.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StatusFileError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|err| StatusFileError::Parse { path: path.display().to_string(), err }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(StatusFileError::Io { what: "reading", path: path.display().to_string(), err }),
    }
}

/// Replaces the status at `path` with `value`.
pub fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), StatusFileError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|err| StatusFileError::Parse { path: path.display().to_string(), err })?;
    std::fs::write(&tmp, bytes).map_err(|err| StatusFileError::Io {
        what: "writing",
        path: tmp.display().to_string(),
        err,
    })?;
    std::fs::rename(&tmp, path).map_err(|err| StatusFileError::Io {
        what: "replacing",
        path: path.display().to_string(),
        err,
    })
}

/// Whether process `pid` exists (0: never).
pub fn process_alive(pid: u32) -> bool {
    // Signal 0 only checks that the process exists.
    #[allow(unsafe_code)]
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    pid != 0 && r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_and_none_is_not_an_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("status.json");
        assert_eq!(load::<Vec<u32>>(&p).unwrap(), None);
        save(&p, &vec![1u32, 2]).unwrap();
        assert_eq!(load::<Vec<u32>>(&p).unwrap(), Some(vec![1, 2]));
        std::fs::write(&p, b"{half").unwrap();
        assert!(load::<Vec<u32>>(&p).unwrap_err().to_string().contains("parsing"));
        assert!(process_alive(std::process::id()));
        assert!(!process_alive(0));
    }
}
