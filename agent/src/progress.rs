//! Progress on a terminal. A size scan runs beside the backup (as restic's does), so the
//! display starts as a counter and becomes a bar with percentage and ETA once the total is
//! known. The scan reads only metadata and stops when the backup ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::backup::mib;
use crate::pipeline::Stats;
use crate::source::Root;

pub struct Progress {
    bar: indicatif::ProgressBar,
    task: tokio::task::JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl Progress {
    pub fn start(roots: Vec<Root>, stats: Arc<Stats>) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        let total = Arc::new(AtomicU64::new(0));
        let scanned = Arc::new(AtomicBool::new(false));
        {
            let (stop, total, scanned) = (stop.clone(), total.clone(), scanned.clone());
            std::thread::spawn(move || {
                for root in &roots {
                    for e in walkdir::WalkDir::new(&root.path).follow_links(false).into_iter().flatten() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if e.file_type().is_file()
                            && let Ok(m) = e.metadata()
                        {
                            total.fetch_add(m.len(), Ordering::Relaxed);
                        }
                    }
                }
                scanned.store(true, Ordering::Relaxed);
            });
        }
        let bar = indicatif::ProgressBar::new_spinner();
        #[allow(clippy::expect_used)]
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}").expect("static template"),
        );
        let b = bar.clone();
        let task = tokio::spawn(async move {
            let mut is_bar = false;
            loop {
                let read = Stats::get(&stats.bytes_read);
                let msg = format!(
                    "{} files, new {}, uploaded {}",
                    Stats::get(&stats.files),
                    mib(Stats::get(&stats.new_bytes)),
                    mib(Stats::get(&stats.uploaded_bytes)),
                );
                if scanned.load(Ordering::Relaxed) {
                    if !is_bar {
                        #[allow(clippy::expect_used)]
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}  {msg}",
                            )
                            .expect("static template")
                            .progress_chars("=> "),
                        );
                        is_bar = true;
                    }
                    // A file may grow while it is read: never let the position pass the length.
                    b.set_length(total.load(Ordering::Relaxed).max(read));
                } else {
                    b.set_message(format!("read {} (sizing the source...), {msg}", mib(read)));
                }
                b.set_position(read);
                if is_bar {
                    b.set_message(msg);
                }
                b.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Progress { bar, task, stop }
    }

    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
        self.bar.finish_and_clear();
    }
}
