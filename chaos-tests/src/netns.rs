//! Separate hosts for tests: each node in its own network namespace, joined by a bridge in
//! a switch namespace of its own (so the host's firewall, e.g. Docker's FORWARD DROP, never
//! sees the bridged traffic), which a veth also links to the test's namespace, where agents
//! and restores run.
//!
//! ```text
//!   ns exnN-1 (10.77.N.1) ─veth─┐
//!   ns exnN-2 (10.77.N.2) ─veth─┼─ ns exnN-sw: bridge ─veth─ the test process (10.77.N.254)
//!   ns exnN-3 (10.77.N.3) ─veth─┘
//! ```
//!
//! `cut(i)` drops every packet between host i and the other hosts inside host i's namespace
//! (iptables), so the node is alive and reachable from the test but partitioned from its
//! peers; `heal(i)` removes the rules. Needs root (CI runs as root). Everything is deleted
//! when the `Net` drops.

use std::process::Command;

use crate::{ok, run};

pub struct Net {
    tag: u8,
    hosts: usize,
}

fn ip(args: &[&str]) {
    ok(run(Command::new("ip").args(args)));
}

impl Net {
    /// `hosts` namespaces on subnet 10.77.`tag`.0/24 (a tag per test process avoids clashes).
    pub fn new(hosts: usize) -> Net {
        let tag = (std::process::id() % 200 + 20) as u8;
        let net = Net { tag, hosts };
        let sw = net.switch();
        // Left over from a killed run with the same tag.
        for ns in (1..=hosts).map(|i| net.ns(i)).chain([sw.clone()]) {
            let _ = run(Command::new("ip").args(["netns", "del", &ns]));
        }
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "name", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        let attach = |outer: &str| {
            ip(&["link", "set", outer, "netns", &sw]);
            ip(&["-n", &sw, "link", "set", outer, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", outer, "up"]);
        };
        for i in 1..=hosts {
            let ns = net.ns(i);
            let (inner, outer) = (format!("exv{tag}h{i}"), format!("exv{tag}b{i}"));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", "name", &inner, "type", "veth", "peer", "name", &outer]);
            ip(&["link", "set", &inner, "netns", &ns]);
            attach(&outer);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.addr(i)), "dev", &inner]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        let (local, outer) = (format!("exv{tag}r"), format!("exv{tag}s"));
        ip(&["link", "add", "name", &local, "type", "veth", "peer", "name", &outer]);
        attach(&outer);
        ip(&["addr", "add", &format!("10.77.{tag}.254/24"), "dev", &local]);
        ip(&["link", "set", &local, "up"]);
        net
    }

    fn switch(&self) -> String {
        format!("exn{}-sw", self.tag)
    }

    /// Name of host `i`'s namespace (1-based).
    pub fn ns(&self, i: usize) -> String {
        format!("exn{}-{i}", self.tag)
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("10.77.{}.{i}", self.tag)
    }

    fn iptables(&self, i: usize, op: &str) {
        for j in (1..=self.hosts).filter(|j| *j != i) {
            let peer = self.addr(j);
            for (chain, dir) in [("INPUT", "-s"), ("OUTPUT", "-d")] {
                ok(run(Command::new("ip").args([
                    "netns",
                    "exec",
                    &self.ns(i),
                    "iptables",
                    op,
                    chain,
                    dir,
                    &peer,
                    "-j",
                    "DROP",
                ])));
            }
        }
    }

    /// Partitions host `i` from every other host (the test still reaches it).
    pub fn cut(&self, i: usize) {
        self.iptables(i, "-A");
    }

    pub fn heal(&self, i: usize) {
        self.iptables(i, "-D");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting the namespaces deletes their veths, and so the test's end of the link.
        for ns in (1..=self.hosts).map(|i| self.ns(i)).chain([self.switch()]) {
            let _ = run(Command::new("ip").args(["netns", "del", &ns]));
        }
    }
}
