//! What every program's command line offers besides its own work: shell completions
//! (`completions bash|zsh|fish|elvish|powershell`) and man pages (`man --out DIR`), both
//! generated from the same clap definition as `--help`, so they cannot drift from it.

use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Writes the completion script for `shell` to standard output.
pub fn completions(mut cmd: clap::Command, shell: Shell) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// `man --out DIR` of every program: writes the pages and prints each path.
pub fn print_man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    for p in man_pages(cmd, dir)? {
        println!("{}", p.display());
    }
    Ok(())
}

/// Writes one man page per command and subcommand into `dir` (`exclave-agent.1`,
/// `exclave-agent-backup.1`, ...) and returns their paths.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    // `build` fills in what derive leaves implicit (help subcommands, display names).
    let mut cmd = cmd;
    cmd.build();
    page(&cmd, cmd.get_name(), dir, &mut written)?;
    Ok(written)
}

fn page(cmd: &clap::Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let named = cmd.clone().name(name.to_string()).bin_name(name.replace('-', " "));
    let mut out = Vec::new();
    clap_mangen::Man::new(named).render(&mut out)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, out)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> clap::Command {
        clap::Command::new("exclave-demo")
            .about("A demo")
            .subcommand(clap::Command::new("backup").about("Back up").subcommand(clap::Command::new("now")))
            .subcommand(clap::Command::new("restore").about("Restore"))
    }

    #[test]
    fn a_page_per_command_and_subcommand() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pages = man_pages(demo(), dir.path()).expect("pages");
        let names: Vec<String> =
            pages.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect();
        assert_eq!(
            names,
            ["exclave-demo.1", "exclave-demo-backup.1", "exclave-demo-backup-now.1", "exclave-demo-restore.1"]
        );
        let top = std::fs::read_to_string(&pages[0]).expect("page");
        assert!(top.starts_with(".ie") || top.contains(".TH exclave-demo 1"), "{top}");
        assert!(top.contains("backup") && top.contains("restore"), "{top}");
    }
}
