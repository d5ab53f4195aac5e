//! Where a passphrase comes from: `--passphrase-file FILE`, else the file named by
//! `EXCLAVE_PASSPHRASE_FILE` (systemd: `LoadCredential=passphrase:/etc/exclave/lux.pass` and
//! `Environment=EXCLAVE_PASSPHRASE_FILE=%d/passphrase`), else a prompt when standard input is
//! a terminal. A passphrase file holds the passphrase; one trailing newline is not part of it.
//! Like key files, it must not be readable by other users.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::KeyError;

pub const ENV: &str = "EXCLAVE_PASSPHRASE_FILE";

/// How to obtain a passphrase when one is needed.
#[derive(Debug, Clone, Default)]
pub struct Passphrase {
    file: Option<PathBuf>,
}

impl Passphrase {
    /// From a `--passphrase-file` flag (or the environment, or a prompt, when it is absent).
    pub fn from_flag(file: Option<PathBuf>) -> Self {
        Passphrase { file }
    }

    /// The file to read, if the flag or the environment names one.
    pub fn file(&self) -> Option<PathBuf> {
        self.file.clone().or_else(|| std::env::var_os(ENV).filter(|v| !v.is_empty()).map(PathBuf::from))
    }

    /// Whether a passphrase is available without asking anyone.
    pub fn is_given(&self) -> bool {
        self.file().is_some()
    }

    /// The passphrase that opens `what` (a file name, said in the prompt and in errors).
    pub fn get(&self, what: &str) -> Result<Zeroizing<String>, KeyError> {
        if let Some(f) = self.file() {
            return read_file(&f);
        }
        if std::io::stdin().is_terminal() {
            let p = Zeroizing::new(
                rpassword::prompt_password(format!("Passphrase for {what}: "))
                    .map_err(|e| KeyError::Passphrase(format!("cannot read it from the terminal: {e}")))?,
            );
            return non_empty(p);
        }
        Err(KeyError::PassphraseNeeded(what.to_string()))
    }

    /// A new passphrase for `what`: from the file, or asked twice on a terminal.
    pub fn new_passphrase(&self, what: &str) -> Result<Zeroizing<String>, KeyError> {
        if let Some(f) = self.file() {
            return read_file(&f);
        }
        if !std::io::stdin().is_terminal() {
            return Err(KeyError::Passphrase(format!(
                "sealing {what} needs a passphrase: give --passphrase-file FILE (or run on a terminal to be asked)"
            )));
        }
        let ask = |prompt: String| {
            rpassword::prompt_password(prompt)
                .map(Zeroizing::new)
                .map_err(|e| KeyError::Passphrase(format!("cannot read it from the terminal: {e}")))
        };
        let first = non_empty(ask(format!("New passphrase for {what}: "))?)?;
        let again = ask(format!("Repeat the passphrase for {what}: "))?;
        if *first != *again {
            return Err(KeyError::Passphrase("the two passphrases differ; nothing was written".into()));
        }
        Ok(first)
    }
}

fn non_empty(p: Zeroizing<String>) -> Result<Zeroizing<String>, KeyError> {
    if p.is_empty() {
        return Err(KeyError::Passphrase("an empty passphrase protects nothing".into()));
    }
    Ok(p)
}

/// Reads a passphrase file: permissions checked, one trailing newline dropped.
pub fn read_file(path: &Path) -> Result<Zeroizing<String>, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let p = path.display().to_string();
    let meta =
        std::fs::metadata(path).map_err(|e| KeyError::Passphrase(format!("cannot read passphrase file {p}: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Passphrase(format!(
            "passphrase file {p} is readable by other users (mode {mode:o}); run `chmod 600 {p}` first"
        )));
    }
    let raw = Zeroizing::new(
        std::fs::read(path).map_err(|e| KeyError::Passphrase(format!("cannot read passphrase file {p}: {e}")))?,
    );
    let mut text = Zeroizing::new(
        String::from_utf8(raw.to_vec())
            .map_err(|_| KeyError::Passphrase(format!("passphrase file {p} is not UTF-8 text")))?,
    );
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    non_empty(text).map_err(|_| KeyError::Passphrase(format!("passphrase file {p} is empty")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn files_lose_one_newline_and_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pass");
        std::fs::write(&f, "two words\r\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(&*read_file(&f).unwrap(), "two words");
        std::fs::write(&f, "keep\n\n").unwrap();
        assert_eq!(&*read_file(&f).unwrap(), "keep\n");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_file(&f).unwrap_err().to_string().contains("empty"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_file(&f).unwrap_err().to_string().contains("chmod 600"));
        assert!(read_file(&dir.path().join("absent")).unwrap_err().to_string().contains("cannot read"));
    }
}
