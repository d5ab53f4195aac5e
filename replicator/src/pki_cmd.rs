//! `exclave-replicator pki …`: the cluster CA and the certificates it issues: create, issue,
//! renew, revoke (through the cluster; no CA key needed) and list.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Subcommand, ValueEnum};
use exclave::client::connect_any;
use exclave::identity::Identity;
use exclave::pki::{self, Record, Validity};
use exclave::protocol::{Reply, Request, Revocation};
use exclave::transport::TlsIdentity;

#[derive(Subcommand)]
pub enum PkiCmd {
    /// Create a cluster CA: DIR/ca.crt and DIR/ca.key.
    Init {
        /// PKI directory to create.
        #[arg(long)]
        dir: PathBuf,
        /// A name for the cluster, written into the CA's subject.
        #[arg(long, default_value = "exclave")]
        cluster: String,
    },
    /// Issue a certificate: DIR/NAME.crt and DIR/NAME.key (0600), recorded in DIR/issued.jsonl.
    Issue {
        /// PKI directory holding the CA.
        #[arg(long)]
        dir: PathBuf,
        /// What the certificate may do.
        #[arg(long, value_enum)]
        role: Role,
        /// Node id, agent name, or file name of the certificate.
        #[arg(long)]
        name: String,
        /// Tenant (required for agent and restore).
        #[arg(long)]
        tenant: Option<String>,
        /// DNS name or IP address the node is reached at (repeatable; nodes only).
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Days of validity [default: agent 90, restore 180, admin 365, node 730].
        #[arg(long)]
        days: Option<u32>,
    },
    /// Issue a fresh certificate and key for DIR/NAME.crt's identity (the old pair is kept as
    /// NAME.crt.prev and NAME.key.prev). Restart the program that uses it.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Days of validity [default: the role's].
        #[arg(long)]
        days: Option<u32>,
    },
    /// Revoke a certificate in the whole cluster (administrator; the CA key is not needed).
    ///
    /// Committed through Raft: every node refuses the certificate at the handshake and closes
    /// its open connections within seconds; the revocation survives restarts and reaches
    /// nodes that join later.
    Revoke {
        /// The cluster, and the administrator's identity (PKI also holds the certificate to revoke).
        #[command(flatten)]
        conn: crate::cluster::Conn,
        /// The certificate PKI/NAME.crt (its current one; an earlier one by --serial).
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        name: Option<String>,
        /// A certificate by serial number (hex, as `pki list` shows it).
        #[arg(long)]
        serial: Option<String>,
        /// Why, for the record.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// What was issued and revoked, and when each certificate expires.
    List {
        /// PKI directory (its issued.jsonl record).
        #[arg(long)]
        dir: PathBuf,
        /// Also ask the cluster which certificates are revoked (the revocations that count).
        #[arg(long = "node")]
        nodes: Vec<SocketAddr>,
        /// Certificate name for asking the cluster.
        #[arg(long, default_value = "admin")]
        identity: String,
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Role {
    Node,
    Agent,
    Restore,
    Admin,
}

pub async fn run(cmd: PkiCmd) -> Result<()> {
    match cmd {
        PkiCmd::Init { dir, cluster } => {
            pki::init_ca(&dir, &cluster)?;
            println!("created cluster CA in {}", dir.display());
            println!(
                "keep {} offline once every certificate is issued, with a copy abroad: without it no identity can \
                 be issued or renewed after the home country is lost",
                dir.join("ca.key").display()
            );
            Ok(())
        }
        PkiCmd::Issue { dir, role, name, tenant, hosts, days } => {
            let need_tenant = || tenant.clone().context("--tenant is required for this role");
            let identity = match role {
                Role::Node => Identity::Node { id: name.clone() },
                Role::Agent => Identity::Agent { tenant: need_tenant()?, name: name.clone() },
                Role::Restore => Identity::Restore { tenant: need_tenant()? },
                Role::Admin => Identity::Admin,
            };
            // Validate through the parser so that what is issued can be read back.
            let identity = Identity::parse(&identity.subject())?;
            if !hosts.is_empty() && !matches!(role, Role::Node) {
                bail!("--host applies to node certificates only");
            }
            if days == Some(0) {
                bail!("--days must be 1 or more");
            }
            let (crt, key) = pki::issue(&dir, &pki::IssueRequest::new(identity.clone(), name, hosts, days))?;
            let info = pki::read_cert_file(&crt)?;
            println!(
                "issued {identity}: {} and {} (serial {}, valid until {})",
                crt.display(),
                key.display(),
                info.serial,
                pki::format_time(info.not_after)
            );
            Ok(())
        }
        PkiCmd::Renew { dir, name, days } => {
            let info = pki::renew(&dir, &name, days)?;
            println!(
                "renewed {}: {} (serial {}, valid until {}); the previous pair is {name}.crt.prev / {name}.key.prev",
                info.subject,
                dir.join(format!("{name}.crt")).display(),
                info.serial,
                pki::format_time(info.not_after)
            );
            println!(
                "restart the program that uses it; the previous certificate stays valid until it expires unless revoked"
            );
            Ok(())
        }
        PkiCmd::Revoke { conn, name, serial, reason } => {
            revoke(&conn.nodes, &conn.pki, &conn.identity, name.as_deref(), serial.as_deref(), &reason).await
        }
        PkiCmd::List { dir, nodes, identity, json } => list(&dir, &nodes, &identity, json).await,
    }
}

async fn revoke(
    nodes: &[SocketAddr],
    dir: &Path,
    identity: &str,
    name: Option<&str>,
    serial: Option<&str>,
    reason: &str,
) -> Result<()> {
    let (serial, subject) = match (name, serial) {
        (Some(name), _) => {
            exclave::identity::check_name("certificate name", name)?;
            let info = pki::read_cert_file(&dir.join(format!("{name}.crt")))
                .with_context(|| format!("finding the certificate {name} to revoke"))?;
            (info.serial, info.subject)
        }
        (None, Some(serial)) => {
            let serial = serial.trim().to_ascii_lowercase();
            let subject = pki::read_record(dir)?
                .0
                .into_iter()
                .find_map(|r| match r {
                    Record::Issued { serial: s, subject, .. } if s == serial => Some(subject),
                    _ => None,
                })
                .unwrap_or_default();
            (serial, subject)
        }
        (None, None) => bail!("give --name or --serial"),
    };
    let tls = TlsIdentity::load(dir, identity)
        .with_context(|| format!("loading identity {identity:?} from {}", dir.display()))?;
    let own = pki::cert_info(&tls.chain[0]).map_err(anyhow::Error::msg)?;
    if own.serial == serial {
        bail!("{identity} is the certificate this command runs as: revoke it from another administrator's");
    }
    let client = connect_any(nodes, &tls).await?;
    let reply = client
        .call(&[Request::Revoke { serial: serial.clone(), subject: subject.clone(), reason: reason.into() }])
        .await;
    client.close().await;
    match reply? {
        Reply::Ok => {}
        other => bail!("unexpected reply {other:?}"),
    }
    println!(
        "revoked {} (serial {serial}); every node refuses it from now on and closes its connections",
        if subject.is_empty() { "the certificate" } else { &subject }
    );
    let record = Record::Revoked { serial, subject, reason: reason.into(), by: own.subject, time: pki::now_secs() };
    if let Err(e) = pki::append_record(dir, &record) {
        eprintln!("warning: the revocation is committed, but not noted in {}: {e}", dir.join(pki::RECORD).display());
    }
    Ok(())
}

async fn list(dir: &Path, nodes: &[SocketAddr], identity: &str, json: bool) -> Result<()> {
    let (record, warnings) = pki::read_record(dir)?;
    for w in &warnings {
        eprintln!("warning: skipped a damaged record line: {w}");
    }
    let mut revoked: Vec<Revocation> = record
        .iter()
        .filter_map(|r| match r {
            Record::Revoked { serial, subject, reason, by, time } => Some(Revocation {
                serial: serial.clone(),
                subject: subject.clone(),
                reason: reason.clone(),
                by: by.clone(),
                time: *time,
            }),
            _ => None,
        })
        .collect();
    let from_cluster = !nodes.is_empty();
    if from_cluster {
        let tls = TlsIdentity::load(dir, identity)
            .with_context(|| format!("loading identity {identity:?} from {}", dir.display()))?;
        let client = connect_any(nodes, &tls).await?;
        let reply = client.call(&[Request::Certificates]).await;
        client.close().await;
        let Reply::Certificates { revoked: in_force, .. } = reply? else { bail!("unexpected reply to certificates") };
        // The cluster's revocations are the ones that count.
        revoked = in_force;
    }
    let now = pki::now_secs();
    let mut rows = Vec::new();
    for r in &record {
        let Record::Issued { serial, name, subject, not_after, time, .. } = r else { continue };
        let rev = revoked.iter().find(|v| v.serial == *serial);
        let state = match (
            rev,
            pki::validity(
                &pki::CertInfo {
                    subject: subject.clone(),
                    serial: serial.clone(),
                    not_before: 0,
                    not_after: *not_after,
                    hosts: vec![],
                },
                now,
            ),
        ) {
            (Some(_), _) => "revoked".to_string(),
            (None, Validity::Expired) => "expired".to_string(),
            (None, Validity::ExpiresSoon { in_days }) => format!("expires in {in_days} day(s)"),
            (None, _) => "valid".to_string(),
        };
        rows.push(serde_json::json!({
            "name": name, "subject": subject, "serial": serial, "issued": time, "not_after": not_after,
            "state": state, "revoked": rev.map(|v| serde_json::json!({"time": v.time, "by": v.by, "reason": v.reason})),
        }));
    }
    // Revoked certificates this directory did not issue (or whose record is lost).
    let known: std::collections::HashSet<String> =
        rows.iter().filter_map(|r| r["serial"].as_str().map(str::to_string)).collect();
    for v in revoked.iter().filter(|v| !known.contains(&v.serial)) {
        rows.push(serde_json::json!({
            "name": null, "subject": v.subject, "serial": v.serial, "issued": null, "not_after": null,
            "state": "revoked", "revoked": {"time": v.time, "by": v.by, "reason": v.reason},
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<12} {:<24} {:<34} {:<22} STATE", "NAME", "SUBJECT", "SERIAL", "VALID UNTIL");
    for r in &rows {
        let until = r["not_after"].as_i64().map(pki::format_time).unwrap_or_else(|| "?".into());
        let mut state = r["state"].as_str().unwrap_or_default().to_string();
        if let Some(v) = r["revoked"].as_object() {
            let when = v.get("time").and_then(|t| t.as_i64()).map(pki::format_time).unwrap_or_default();
            let why = v.get("reason").and_then(|t| t.as_str()).unwrap_or_default();
            state = format!("revoked {when}{}", if why.is_empty() { String::new() } else { format!(": {why}") });
        }
        println!(
            "{:<12} {:<24} {:<34} {:<22} {state}",
            r["name"].as_str().unwrap_or("-"),
            r["subject"].as_str().unwrap_or_default(),
            r["serial"].as_str().unwrap_or_default(),
            until
        );
    }
    println!(
        "{} certificate(s), {} revoked{}",
        rows.len(),
        rows.iter().filter(|r| r["state"] == "revoked").count(),
        if from_cluster {
            " (revocations as the cluster holds them)"
        } else {
            " (revocations as this directory noted them; add --node to ask the cluster)"
        }
    );
    Ok(())
}
