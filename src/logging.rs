//! Log setup shared by every program: `tracing` to standard error, filtered by `RUST_LOG`
//! (or the program's default), so standard output stays free for results and `--json`.

/// Installs the subscriber; `default` applies when `RUST_LOG` is unset or invalid.
pub fn init(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a journal or a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
