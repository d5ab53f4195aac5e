//! Log setup shared by every program: `tracing` to standard error, filtered by `RUST_LOG`
//! (or the program's default), so standard output stays free for results and `--json`.

/// Installs the subscriber; `default` applies when `RUST_LOG` is unset or invalid. Also makes
/// output closed early (`... --json | head`) end the program quietly.
pub fn init(default: &str) {
    quiet_on_closed_output();
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

/// Output piped into a reader that stops early (`head`): exit quietly with status 141, as a
/// Unix tool killed by SIGPIPE does, instead of a panic message. Rust ignores SIGPIPE so that
/// a closed socket is an error to handle, not a death; `println!` then panics on a closed
/// standard output, and this hook turns exactly that panic into the quiet exit.
pub fn quiet_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
