//! Who is on the other end of a connection, and what it may do.
//!
//! Identities are certificate subjects (common name) issued by the cluster CA:
//!
//! | subject | role |
//! |---|---|
//! | `node:<id>` | an embassy storage node |
//! | `agent:<tenant>:<name>` | a backup agent of one tenant: may write, never read or delete |
//! | `restore:<tenant>` | a disaster-recovery team of one tenant: may read, never write |
//! | `admin` | a site operator: cluster status, never tenant data |
//!
//! The tenant of a request is always the one in the certificate: nothing a client sends can
//! name another tenant.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Node { id: String },
    Agent { tenant: String, name: String },
    Restore { tenant: String },
    Admin,
}

/// What a request needs from its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Upload chunks and commit snapshots of the caller's tenant.
    WriteTenant,
    /// Ask which chunks exist in the caller's tenant (agents, for deduplication).
    QueryTenant,
    /// List snapshots and read chunks of the caller's tenant.
    ReadTenant,
    /// Node status and cluster status.
    Operate,
    /// Change the cluster's membership (admin only).
    Administer,
    /// Speak to another node as a cluster member: Raft messages, chunk replication and
    /// anti-entropy fetches of any tenant's envelopes (nodes only; they never hold a key).
    Peer,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("certificate subject {0:?} is not an Exclave identity (node:ID, agent:TENANT:NAME, restore:TENANT, admin)")]
    Unknown(String),
    #[error("{what} {value:?} is invalid: use 1-64 characters of a-z, 0-9, '-', '_', '.'")]
    BadName { what: &'static str, value: String },
}

pub fn check_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 64
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && !value.starts_with('.');
    if ok { Ok(()) } else { Err(IdentityError::BadName { what, value: value.to_string() }) }
}

impl Identity {
    pub fn parse(subject: &str) -> Result<Identity, IdentityError> {
        let parts: Vec<&str> = subject.split(':').collect();
        let unknown = || IdentityError::Unknown(subject.to_string());
        let id = match parts.as_slice() {
            ["node", id] => {
                check_name("node id", id)?;
                Identity::Node { id: id.to_string() }
            }
            ["agent", tenant, name] => {
                check_name("tenant", tenant)?;
                check_name("agent name", name)?;
                Identity::Agent { tenant: tenant.to_string(), name: name.to_string() }
            }
            ["restore", tenant] => {
                check_name("tenant", tenant)?;
                Identity::Restore { tenant: tenant.to_string() }
            }
            ["admin"] => Identity::Admin,
            _ => return Err(unknown()),
        };
        Ok(id)
    }

    pub fn subject(&self) -> String {
        match self {
            Identity::Node { id } => format!("node:{id}"),
            Identity::Agent { tenant, name } => format!("agent:{tenant}:{name}"),
            Identity::Restore { tenant } => format!("restore:{tenant}"),
            Identity::Admin => "admin".to_string(),
        }
    }

    pub fn tenant(&self) -> Option<&str> {
        match self {
            Identity::Agent { tenant, .. } | Identity::Restore { tenant } => Some(tenant),
            _ => None,
        }
    }

    pub fn may(&self, p: Permission) -> bool {
        matches!(
            (self, p),
            (Identity::Agent { .. }, Permission::WriteTenant | Permission::QueryTenant)
                | (Identity::Restore { .. }, Permission::ReadTenant)
                | (Identity::Admin | Identity::Node { .. }, Permission::Operate)
                | (Identity::Admin, Permission::Administer)
                | (Identity::Node { .. }, Permission::Peer)
        )
    }

    /// Reads the identity from a DER certificate's subject common name.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, IdentityError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| IdentityError::Unknown(format!("unparsable certificate: {e}")))?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| IdentityError::Unknown("certificate without common name".into()))?;
        Identity::parse(cn)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.subject())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_round_trip() {
        for s in ["node:n1", "agent:lux:rnpp", "restore:lux", "admin"] {
            assert_eq!(Identity::parse(s).unwrap().subject(), s);
        }
    }

    #[test]
    fn malformed_subjects_are_refused() {
        for s in ["", "node", "agent:lux", "agent:LUX:x", "restore:lux:extra", "root", "node:../x", "agent::x"] {
            assert!(Identity::parse(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn permissions_follow_roles() {
        let agent = Identity::parse("agent:lux:rnpp").unwrap();
        let restore = Identity::parse("restore:lux").unwrap();
        let admin = Identity::Admin;
        assert!(agent.may(Permission::WriteTenant) && !agent.may(Permission::ReadTenant));
        assert!(restore.may(Permission::ReadTenant) && !restore.may(Permission::WriteTenant));
        assert!(!restore.may(Permission::QueryTenant));
        assert!(!admin.may(Permission::ReadTenant) && !admin.may(Permission::WriteTenant));
        let node = Identity::parse("node:n1").unwrap();
        assert!(node.may(Permission::Peer) && !node.may(Permission::Administer) && !node.may(Permission::ReadTenant));
        assert!(admin.may(Permission::Administer) && !admin.may(Permission::Peer));
        assert!(!agent.may(Permission::Peer) && !restore.may(Permission::Peer) && !agent.may(Permission::Administer));
        assert_eq!(agent.tenant(), Some("lux"));
        assert_eq!(admin.tenant(), None);
    }
}
