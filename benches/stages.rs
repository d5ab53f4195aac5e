//! Single-thread throughput of each stage of the agent's pipeline, measured with the
//! project's own code on real input files, and the resulting "stage limit" for this machine.
//!
//!   cargo bench --bench stages -- FILE_OR_DIR [FILE_OR_DIR...]
//!
//! The inputs are read into memory (at most `CAP` bytes; if they are larger, the same
//! fraction of every file is taken, so the mix of data classes is kept). Each stage is
//! repeated until it has run for at least `MIN_TIME`. MB/s means 10^6 bytes per second.
//!
//! Output: one `stage <name> <MB/s>` line per stage, `limit_mbps <value> cores <N>`, and the
//! same as one `JSON {...}` line. The limit is N / sum(1 / throughput) over the stages the
//! agent runs on every byte: cut, chunk id, whole-file hash and seal (seal = zstd + nonce +
//! AES-256-GCM, so the separate zstd and AES figures are informative only).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use exclave::chunker::{ChunkerParams, chunk_all};
use exclave::envelope::{DEFAULT_ZSTD_LEVEL, Sealer};
use exclave::keys::{MasterKey, TenantKeys};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const CAP: u64 = 512 * 1024 * 1024;
const MIN_TIME: Duration = Duration::from_millis(500);

type Res<T> = Result<T, String>;

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Res<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.is_dir() {
        let mut entries = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        entries.sort();
        for p in entries {
            collect(&p, out)?;
        }
    } else if meta.is_file() {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Reads the files, taking the same leading fraction of each when they exceed `CAP`.
fn load(paths: &[PathBuf]) -> Res<Vec<Vec<u8>>> {
    let mut files = Vec::new();
    for p in paths {
        collect(p, &mut files)?;
    }
    let mut total = 0u64;
    for f in &files {
        total += std::fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?.len();
    }
    let mut out = Vec::with_capacity(files.len());
    for f in &files {
        let mut data = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
        if total > CAP {
            let keep = (data.len() as u128 * CAP as u128 / total as u128) as usize;
            data.truncate(keep);
        }
        if !data.is_empty() {
            out.push(data);
        }
    }
    Ok(out)
}

/// Runs `pass` (one pass over all `bytes`) until `MIN_TIME` has elapsed; returns MB/s.
fn measure(bytes: u64, mut pass: impl FnMut() -> Res<()>) -> Res<f64> {
    pass()?; // warm-up: allocations, page faults, caches
    let start = Instant::now();
    let mut passes = 0u64;
    while passes == 0 || start.elapsed() < MIN_TIME {
        pass()?;
        passes += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((bytes * passes) as f64 / secs / 1e6)
}

fn run(paths: &[PathBuf]) -> Res<()> {
    let files = load(paths)?;
    let bytes: u64 = files.iter().map(|f| f.len() as u64).sum();
    if bytes == 0 {
        return Err("no input bytes (give files or directories)".into());
    }
    let params = ChunkerParams::default();
    let cuts = files.iter().map(|f| chunk_all(params, f).map_err(|e| e.to_string())).collect::<Res<Vec<_>>>()?;
    let chunk_count: usize = cuts.iter().map(Vec::len).sum();
    let chunks = || files.iter().zip(&cuts).flat_map(|(f, c)| c.iter().map(move |r| &f[r.clone()]));
    eprintln!(
        "input: {} files, {:.1} MiB, {} chunks (avg {:.1} KiB)",
        files.len(),
        bytes as f64 / 1048576.0,
        chunk_count,
        bytes as f64 / chunk_count.max(1) as f64 / 1024.0
    );

    let keys = TenantKeys::from_master("bench", MasterKey::from_bytes([7u8; 32]));
    let mut stages: Vec<(&str, f64)> = Vec::new();

    stages.push((
        "cut",
        measure(bytes, || {
            for f in &files {
                black_box(chunk_all(params, black_box(f)).map_err(|e| e.to_string())?);
            }
            Ok(())
        })?,
    ));

    stages.push((
        "chunk_id",
        measure(bytes, || {
            for c in chunks() {
                black_box(keys.chunk_id(black_box(c)));
            }
            Ok(())
        })?,
    ));

    stages.push((
        "file_hash",
        measure(bytes, || {
            for f in &files {
                black_box(blake3::hash(black_box(f)));
            }
            Ok(())
        })?,
    ));

    let mut zstd = zstd::bulk::Compressor::new(DEFAULT_ZSTD_LEVEL).map_err(|e| e.to_string())?;
    let mut zbuf = Vec::new();
    stages.push((
        "zstd",
        measure(bytes, || {
            for c in chunks() {
                zbuf.clear();
                zbuf.reserve(zstd::zstd_safe::compress_bound(c.len()));
                black_box(zstd.compress_to_buffer(black_box(c), &mut zbuf).map_err(|e| e.to_string())?);
            }
            Ok(())
        })?,
    ));

    let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[9u8; 32]).map_err(|e| e.to_string())?);
    let mut abuf = Vec::new();
    let mut counter = 0u64;
    stages.push((
        "aes256gcm",
        measure(bytes, || {
            for c in chunks() {
                abuf.clear();
                abuf.extend_from_slice(c);
                counter += 1;
                let mut nonce = [0u8; NONCE_LEN];
                nonce[..8].copy_from_slice(&counter.to_le_bytes());
                let tag = cipher
                    .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&[0u8; 16]), &mut abuf)
                    .map_err(|_| "seal failed".to_string())?;
                black_box(&abuf);
                black_box(tag.as_ref()[0]);
            }
            Ok(())
        })?,
    ));

    let ids: Vec<_> = chunks().map(|c| keys.chunk_id(c)).collect();
    let mut sealer = Sealer::new(&keys, DEFAULT_ZSTD_LEVEL).map_err(|e| e.to_string())?;
    let mut sealed = 0u64;
    stages.push((
        "seal",
        measure(bytes, || {
            sealed = 0;
            for (c, id) in chunks().zip(&ids) {
                let env = sealer.seal(id, black_box(c)).map_err(|e| e.to_string())?;
                sealed += env.len() as u64;
                black_box(env);
            }
            Ok(())
        })?,
    ));
    eprintln!("sealed size: {:.1}% of input", sealed as f64 * 100.0 / bytes as f64);

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_byte: f64 = stages
        .iter()
        .filter(|(name, _)| matches!(*name, "cut" | "chunk_id" | "file_hash" | "seal"))
        .map(|(_, mbps)| 1.0 / mbps)
        .sum();
    let limit = cores as f64 / per_byte;

    for (name, mbps) in &stages {
        println!("stage {name} {mbps:.1}");
    }
    println!("limit_mbps {limit:.1} cores {cores}");
    let fields: Vec<String> = stages.iter().map(|(name, mbps)| format!("\"{name}\":{mbps:.1}")).collect();
    println!(
        "JSON {{\"input_bytes\":{bytes},\"stages_mbps\":{{{}}},\"limit_mbps\":{limit:.1},\"cores\":{cores}}}",
        fields.join(",")
    );
    Ok(())
}

fn main() -> ExitCode {
    // `cargo bench` appends `--bench`; anything starting with `-` is not an input.
    let paths: Vec<PathBuf> =
        std::env::args_os().skip(1).filter(|a| !a.to_string_lossy().starts_with('-')).map(PathBuf::from).collect();
    if paths.is_empty() {
        eprintln!("usage: cargo bench --bench stages -- FILE_OR_DIR [FILE_OR_DIR...]");
        return ExitCode::from(2);
    }
    match run(&paths) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
