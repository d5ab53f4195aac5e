//! `exclave-agent keys …`: create, seal, unseal, rotate, split and describe tenant key files.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use exclave::keys::seal::KdfParams;
use exclave::keys::{
    KeyMaterial, Passphrase, TenantKeys, inspect_key_file, load_key_file, open_key_file, replace_key_file, shares,
    write_key_file, write_sealed_key_file,
};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create a new tenant key file (mode 0600). Refuses to overwrite.
    ///
    /// Raw by default (for an unattended agent); `--seal` or `--passphrase-file` seals it
    /// under a passphrase with Argon2id (for a key a person opens).
    Init {
        /// Tenant (the administration) the key belongs to.
        #[arg(long)]
        tenant: String,
        /// Key file to create.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        seal: SealArgs,
    },
    /// Say what a key file or share file holds: tenant, fingerprint, epochs, sealed or not.
    ///
    /// Never prints key material and needs no passphrase.
    Show {
        /// A key file, or a share file written by `keys split`.
        file: PathBuf,
        /// Print it as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Seal a raw key file under a passphrase (replaces the file atomically).
    Seal {
        #[arg(long)]
        key_file: PathBuf,
        #[command(flatten)]
        seal: SealArgs,
    },
    /// Turn a sealed key file back into a raw one (replaces the file atomically).
    Unseal {
        #[arg(long)]
        key_file: PathBuf,
        /// File holding the key file's passphrase [env: EXCLAVE_PASSPHRASE_FILE; else asked].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Open a new key epoch: new snapshots are sealed with a fresh random data key.
    ///
    /// Every older epoch stays in the file, so every snapshot stays restorable. Chunk ids do
    /// not change (deduplication goes on across the rotation). Split the key again afterwards:
    /// shares made before hold only the epochs that existed then.
    Rotate {
        #[arg(long)]
        key_file: PathBuf,
        /// File holding the key file's passphrase, if it is sealed [env: EXCLAVE_PASSPHRASE_FILE; else asked].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Split the key into k-of-n shares for named holders (Shamir over GF(256)).
    ///
    /// Writes one text file per share, to print and keep in a safe; any THRESHOLD of them
    /// rebuild the key (`exclave-restore keys combine`), fewer tell nothing. Shares are never
    /// sent to the cluster.
    Split {
        #[arg(long)]
        key_file: PathBuf,
        /// File holding the key file's passphrase, if it is sealed [env: EXCLAVE_PASSPHRASE_FILE; else asked].
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// How many shares to write.
        #[arg(long, default_value_t = 5)]
        shares: u8,
        /// How many shares rebuild the key.
        #[arg(long, default_value_t = 3)]
        threshold: u8,
        /// Directory for the share files (created; files are written 0600).
        #[arg(long)]
        out: PathBuf,
        /// Who holds each share, in order (repeat once per share).
        #[arg(long = "holder", value_name = "NAME")]
        holders: Vec<String>,
        /// Seal each share under its holder's own passphrase.
        #[arg(long)]
        seal_shares: bool,
        /// With --seal-shares: share N's passphrase from FILE, as N=FILE (repeatable; else asked).
        #[arg(long = "share-passphrase-file", value_name = "N=FILE")]
        share_passphrase_files: Vec<String>,
        /// With --seal-shares: Argon2id memory per share, MiB.
        #[arg(long, default_value_t = 256)]
        kdf_memory_mib: u32,
    },
}

/// How to seal a key file.
#[derive(Args)]
pub struct SealArgs {
    /// Seal under the passphrase in FILE [env: EXCLAVE_PASSPHRASE_FILE].
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Seal under a passphrase asked on the terminal (twice).
    #[arg(long)]
    seal: bool,
    /// Argon2id memory, MiB (the cost of every guess, and of every opening).
    #[arg(long, default_value_t = 256)]
    kdf_memory_mib: u32,
    /// Argon2id passes over that memory.
    #[arg(long, default_value_t = 3)]
    kdf_iterations: u32,
}

impl SealArgs {
    fn params(&self) -> Result<KdfParams> {
        let p = KdfParams {
            memory_kib: self.kdf_memory_mib.saturating_mul(1024),
            iterations: self.kdf_iterations,
            ..KdfParams::default()
        };
        p.check().map_err(anyhow::Error::msg)?;
        Ok(p)
    }

    fn wanted(&self) -> bool {
        self.seal || Passphrase::from_flag(self.passphrase_file.clone()).is_given()
    }
}

pub fn run(cmd: KeysCmd) -> Result<i32> {
    match cmd {
        KeysCmd::Init { tenant, out, seal } => {
            exclave::identity::check_name("tenant", &tenant)?;
            let keys = TenantKeys::new(&tenant, KeyMaterial::generate());
            if seal.wanted() {
                let params = seal.params()?;
                let pw =
                    Passphrase::from_flag(seal.passphrase_file.clone()).new_passphrase(&out.display().to_string())?;
                write_sealed_key_file(&out, &keys, pw.as_bytes(), &params)
                    .with_context(|| format!("writing {}", out.display()))?;
                println!(
                    "created sealed key file {} for tenant {tenant} (fingerprint {}; {})",
                    out.display(),
                    keys.fingerprint,
                    params.describe()
                );
            } else {
                write_key_file(&out, &keys).with_context(|| format!("writing {}", out.display()))?;
                println!("created key file {} for tenant {tenant} (fingerprint {})", out.display(), keys.fingerprint);
            }
            println!(
                "without it no backup of {tenant} can ever be read: split it for the embassy's key holders \
                 (exclave-agent keys split --key-file {} --shares 5 --threshold 3 --out DIR)",
                out.display()
            );
            Ok(0)
        }
        KeysCmd::Show { file, json } => show(&file, json),
        KeysCmd::Seal { key_file, seal } => {
            let info = inspect_key_file(&key_file)?;
            if info.sealed.is_some() {
                bail!("{} is sealed already", key_file.display());
            }
            let keys = load_key_file(&key_file, &Passphrase::default())?;
            let params = seal.params()?;
            let pw =
                Passphrase::from_flag(seal.passphrase_file.clone()).new_passphrase(&key_file.display().to_string())?;
            replace_key_file(&key_file, &keys, Some((pw.as_bytes(), &params)))?;
            println!("sealed {} ({})", key_file.display(), params.describe());
            Ok(0)
        }
        KeysCmd::Unseal { key_file, passphrase_file } => {
            let info = inspect_key_file(&key_file)?;
            if info.sealed.is_none() {
                bail!("{} is not sealed", key_file.display());
            }
            let keys = load_key_file(&key_file, &Passphrase::from_flag(passphrase_file))?;
            replace_key_file(&key_file, &keys, None)?;
            println!(
                "unsealed {}: it is now a raw key file (mode 0600); protect it like the key itself",
                key_file.display()
            );
            Ok(0)
        }
        KeysCmd::Rotate { key_file, passphrase_file } => rotate(&key_file, passphrase_file),
        KeysCmd::Split {
            key_file,
            passphrase_file,
            shares,
            threshold,
            out,
            holders,
            seal_shares,
            share_passphrase_files,
            kdf_memory_mib,
        } => {
            let keys = load_key_file(&key_file, &Passphrase::from_flag(passphrase_file))?;
            if !holders.is_empty() && holders.len() != shares as usize {
                bail!("{} --holder given for {shares} shares: name every holder, or none", holders.len());
            }
            if !share_passphrase_files.is_empty() && !seal_shares {
                bail!("--share-passphrase-file needs --seal-shares");
            }
            let pass_files = parse_numbered(&share_passphrase_files, shares)?;
            let params = KdfParams { memory_kib: kdf_memory_mib.saturating_mul(1024), ..KdfParams::default() };
            params.check().map_err(anyhow::Error::msg)?;
            let parts = shares::split(&keys, threshold, shares)?;
            create_private_dir(&out)?;
            let written = chrono::Utc::now().format("%Y-%m-%d").to_string();
            let mut files = Vec::new();
            for (i, share) in parts.iter().enumerate() {
                let holder = holders.get(i).map(String::as_str);
                let n = share.info.number;
                let share = if seal_shares {
                    let who = match holder {
                        Some(h) => format!("share {n} ({h})"),
                        None => format!("share {n}"),
                    };
                    let pw = Passphrase::from_flag(pass_files.get(&n).cloned()).new_passphrase(&who)?;
                    share.seal(pw.as_bytes(), &params)?
                } else {
                    share.clone()
                };
                let path = out.join(format!("{}-share-{n}-of-{shares}.txt", keys.tenant));
                let text = share.to_text(holder, &written)?;
                write_private(&path, text.as_bytes())?;
                files.push((path, holder.map(str::to_string)));
            }
            println!(
                "split the key of {} (fingerprint {}, epochs 0..={}) into {shares} shares; any {threshold} rebuild it:",
                keys.tenant, keys.fingerprint, keys.epoch
            );
            for (path, holder) in &files {
                println!("  {}{}", path.display(), holder.as_ref().map(|h| format!("  for {h}")).unwrap_or_default());
            }
            println!(
                "hand each to its holder (print it, then delete the file); {} together can rebuild the key with \
                 `exclave-restore keys combine`. After a `keys rotate`, split again.",
                threshold
            );
            Ok(0)
        }
    }
}

fn rotate(key_file: &Path, passphrase_file: Option<PathBuf>) -> Result<i32> {
    let name = key_file.display().to_string();
    let (keys, sealing) = open_key_file(key_file, &Passphrase::from_flag(passphrase_file))?;
    let mut material = keys.material().clone();
    let epoch = material.rotate()?;
    let rotated = TenantKeys::new(&keys.tenant, material);
    // A sealed file stays sealed, under the passphrase that opened it.
    replace_key_file(key_file, &rotated, sealing.as_ref().map(|(pw, params)| (pw.as_bytes(), params)))?;
    println!(
        "rotated {name}: new snapshots of {} are sealed with epoch {epoch}; epochs 0..={} stay readable",
        keys.tenant,
        epoch - 1
    );
    println!("shares split before hold only epochs 0..={}: split the key again (exclave-agent keys split)", epoch - 1);
    Ok(0)
}

fn show(file: &Path, json: bool) -> Result<i32> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    if text.contains("EXCLAVE KEY SHARE") {
        let s = shares::parse_share(&text).with_context(|| format!("reading share {}", file.display()))?;
        let i = &s.info;
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "kind": "share", "tenant": i.tenant, "fingerprint": i.fingerprint, "number": i.number,
                    "count": i.count, "threshold": i.threshold, "split": i.split, "sealed": i.sealed,
                })
            );
        } else {
            println!("share      {} of {} (any {} rebuild the key)", i.number, i.count, i.threshold);
            println!("tenant     {}", i.tenant);
            println!("key        {}", i.fingerprint);
            println!("split      {}", i.split);
            println!("sealed     {}", if i.sealed { "yes, under its holder's passphrase" } else { "no" });
        }
        return Ok(0);
    }
    let info = inspect_key_file(file)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "kind": "key", "format": info.format, "tenant": info.tenant, "fingerprint": info.fingerprint,
                "epochs": (0..=info.epoch).collect::<Vec<u32>>(), "current_epoch": info.epoch,
                "sealed": info.sealed.is_some(),
                "kdf": info.sealed.map(|p| serde_json::json!({
                    "algorithm": "argon2id", "memory_kib": p.memory_kib, "iterations": p.iterations,
                    "parallelism": p.parallelism
                })),
            })
        );
    } else {
        println!("key file   {}", file.display());
        println!("tenant     {}", info.tenant);
        println!("key        {}", info.fingerprint);
        println!("epochs     0..={} (new snapshots are sealed with epoch {})", info.epoch, info.epoch);
        match info.sealed {
            Some(p) => println!("sealed     yes ({})", p.describe()),
            None => println!("sealed     no (raw, for unattended agents; keep it 0600)"),
        }
    }
    Ok(0)
}

/// `N=FILE` pairs, N in 1..=count.
fn parse_numbered(pairs: &[String], count: u8) -> Result<std::collections::BTreeMap<u8, PathBuf>> {
    let mut out = std::collections::BTreeMap::new();
    for p in pairs {
        let (n, f) = p.split_once('=').with_context(|| format!("{p:?}: expected N=FILE"))?;
        let n: u8 = n.trim().parse().with_context(|| format!("{p:?}: N is a share number"))?;
        if n == 0 || n > count {
            bail!("{p:?}: there is no share {n} of {count}");
        }
        out.insert(n, PathBuf::from(f));
    }
    Ok(out)
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}
