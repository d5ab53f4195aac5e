//! `exclave-restore keys …`: rebuild a tenant key from its holders' shares, abroad, without
//! the agent or anything from the home country but the shares themselves.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use exclave::keys::seal::KdfParams;
use exclave::keys::shares::{self, Share};
use exclave::keys::{Passphrase, inspect_key_file, write_key_file, write_sealed_key_file};

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Rebuild a key file from k of its n shares (`exclave-agent keys split`).
    ///
    /// Checks that the shares belong to one key and one split, counts each once, says how many
    /// more are needed, and checks the rebuilt key against the fingerprint the shares name.
    /// Writes a raw key file (0600), or a sealed one with --seal / --passphrase-file.
    Combine {
        /// A share file, as written by `keys split` or typed back in from paper (repeatable).
        #[arg(long = "share", value_name = "FILE", required = true)]
        shares: Vec<PathBuf>,
        /// The key file to write (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// A sealed share's holder passphrase, as SHARE-FILE=PASSPHRASE-FILE (repeatable; else asked).
        #[arg(long = "share-passphrase-file", value_name = "SHARE=FILE")]
        share_passphrase_files: Vec<String>,
        /// Seal the rebuilt key file under the passphrase in FILE.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Seal the rebuilt key file under a passphrase asked on the terminal.
        #[arg(long)]
        seal: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Say what a key file holds (tenant, fingerprint, epochs, sealed); never key material.
    Show {
        /// The key file.
        file: PathBuf,
    },
}

pub fn run(cmd: KeysCmd) -> Result<i32> {
    match cmd {
        KeysCmd::Combine { shares: files, out, share_passphrase_files, passphrase_file, seal, json } => {
            let mut pass_for = std::collections::BTreeMap::new();
            for p in &share_passphrase_files {
                let (share, file) = p.split_once('=').with_context(|| format!("{p:?}: expected SHARE-FILE=FILE"))?;
                if !files.iter().any(|f| f.as_os_str() == share) {
                    bail!("--share-passphrase-file names {share}, which is not one of the --share files");
                }
                pass_for.insert(share.to_string(), PathBuf::from(file));
            }
            let mut parsed: Vec<(String, Share)> = Vec::new();
            for f in &files {
                let name = f.display().to_string();
                let text = std::fs::read_to_string(f).with_context(|| format!("reading share {name}"))?;
                let share = shares::parse_share(&text).with_context(|| format!("share file {name}"))?;
                let share = if share.info.sealed {
                    let who = format!("share {} ({name})", share.info.number);
                    let pw = Passphrase::from_flag(pass_for.get(&name).cloned()).get(&who).map_err(|e| match e {
                        exclave::keys::KeyError::PassphraseNeeded(_) => anyhow::anyhow!(
                            "{name} is sealed under its holder's passphrase: give --share-passphrase-file {name}=FILE \
                             (on a terminal you are asked)"
                        ),
                        other => other.into(),
                    })?;
                    share.unseal(pw.as_bytes(), &name)?
                } else {
                    share
                };
                parsed.push((name, share));
            }
            let keys = shares::combine(&parsed)?;
            let pass = Passphrase::from_flag(passphrase_file.clone());
            let sealed = if seal || passphrase_file.is_some() {
                let pw = pass.new_passphrase(&out.display().to_string())?;
                let params = KdfParams::default();
                write_sealed_key_file(&out, &keys, pw.as_bytes(), &params)?;
                Some(params)
            } else {
                write_key_file(&out, &keys)?;
                None
            };
            let info = inspect_key_file(&out)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "key_file": out.display().to_string(), "tenant": keys.tenant, "fingerprint": keys.fingerprint,
                        "epochs": (0..=keys.epoch).collect::<Vec<u32>>(), "shares_used": parsed.len(),
                        "sealed": sealed.is_some(),
                    })
                );
            } else {
                println!(
                    "rebuilt the key of {} from {} share(s): {} (fingerprint {}, epochs 0..={}{})",
                    info.tenant,
                    parsed.len(),
                    out.display(),
                    info.fingerprint,
                    info.epoch,
                    if sealed.is_some() { ", sealed" } else { "" }
                );
                println!(
                    "the fingerprint matches the one the shares name; it is the key_fingerprint of the tenant's snapshots"
                );
            }
            Ok(0)
        }
        KeysCmd::Show { file } => {
            let info = inspect_key_file(&file)?;
            println!("key file   {}", file.display());
            println!("tenant     {}", info.tenant);
            println!("key        {}", info.fingerprint);
            println!("epochs     0..={}", info.epoch);
            match info.sealed {
                Some(p) => println!("sealed     yes ({})", p.describe()),
                None => println!("sealed     no"),
            }
            Ok(0)
        }
    }
}
