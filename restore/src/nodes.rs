//! Where a restore reads chunks from: every node named with `--node` that answers. After
//! `spread`, each request goes to the node with the fewest requests in flight (the first node
//! wins ties), so a fast embassy serves more and a slow one less; without it, everything goes
//! to the node connected first. When the node asked serves a chunk that fails (the node says
//! it is damaged or missing, or it does not authenticate or match its id) or stops answering,
//! the chunk is asked of every other node in turn, connected when first needed.
//!
//! Every embassy holds the whole data, so one bad or lost node must cost a restore nothing but
//! time. What went wrong is kept for the report: which node served which chunk badly and
//! where it came from instead (`BadServe`), and which nodes stopped answering (`Failover`). A
//! node that does not answer is not asked again for `RETRY_DOWN`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use exclave::ChunkId;
use exclave::client::{ClientError, NodeClient};
use exclave::envelope::{Opened, Opener};
use exclave::keys::TenantKeys;
use exclave::transport::TlsIdentity;
use serde::Serialize;

/// How deep a chain of deltas a restore follows (the cluster keeps bases as deep, see the
/// catalog's `MAX_DELTA_DEPTH`; agents build depth 1).
const MAX_DELTA_DEPTH: usize = 8;
/// How long a node that did not answer is left alone.
const RETRY_DOWN: Duration = Duration::from_secs(10);
/// How long `spread` waits for a node to answer.
const SPREAD_CONNECT: Duration = Duration::from_secs(3);

/// A chunk a node served that failed, and where a good copy came from.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BadServe {
    pub node: String,
    pub chunk: String,
    pub error: String,
    /// The node that served it correctly, if any did.
    pub recovered_from: Option<String>,
}

/// A node that stopped answering during the restore, and the node that took over.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failover {
    pub node: String,
    pub error: String,
    pub continued_from: Option<String>,
}

enum Conn {
    Untried,
    Up(Arc<NodeClient>),
    Down(Instant),
}

/// Why one chunk could not be had from one node.
enum Miss {
    /// The node answered, and the chunk it gave (or its answer about it) was bad.
    Data(String),
    /// The node did not answer the request.
    Node(String),
}

/// A node requests are spread over.
struct Member {
    client: Arc<NodeClient>,
    in_flight: std::sync::atomic::AtomicUsize,
}

pub struct Nodes {
    primary: Arc<NodeClient>,
    tls: Option<Arc<TlsIdentity>>,
    others: tokio::sync::Mutex<Vec<(SocketAddr, Conn)>>,
    /// The primary first, then the nodes `spread` connected.
    stripe: Mutex<Vec<Arc<Member>>>,
    /// Chunks each node served good, by address.
    served: Mutex<std::collections::BTreeMap<String, u64>>,
    bad: Mutex<Vec<BadServe>>,
    failovers: Mutex<Vec<Failover>>,
}

impl Nodes {
    /// Reads from `primary`, and from the other `addrs` when it fails.
    pub fn new(primary: NodeClient, addrs: &[SocketAddr], tls: Arc<TlsIdentity>) -> Nodes {
        let others = addrs.iter().filter(|a| **a != primary.addr()).map(|a| (*a, Conn::Untried)).collect();
        let primary = Arc::new(primary);
        Nodes {
            stripe: Mutex::new(vec![Arc::new(Member { client: primary.clone(), in_flight: Default::default() })]),
            primary,
            tls: Some(tls),
            others: tokio::sync::Mutex::new(others),
            served: Mutex::new(Default::default()),
            bad: Mutex::new(Vec::new()),
            failovers: Mutex::new(Vec::new()),
        }
    }

    /// Connects, in the background, to every other named node, and spreads requests over
    /// each one as soon as it answers (within a few seconds). Nothing waits for it: a node
    /// that is down costs no time.
    pub fn spread(self: &Arc<Self>) {
        let Some(tls) = self.tls.clone() else { return };
        let nodes = self.clone();
        tokio::spawn(async move {
            let untried: Vec<SocketAddr> = {
                let others = nodes.others.lock().await;
                others.iter().filter(|(_, c)| matches!(c, Conn::Untried)).map(|(a, _)| *a).collect()
            };
            let tries = untried.into_iter().map(|addr| {
                let (nodes, tls) = (nodes.clone(), tls.clone());
                async move {
                    let r = tokio::time::timeout(SPREAD_CONNECT, NodeClient::connect(addr, &tls)).await;
                    let mut others = nodes.others.lock().await;
                    let Some(slot) = others.iter_mut().find(|(a, c)| *a == addr && matches!(c, Conn::Untried)) else {
                        return;
                    };
                    match r {
                        Ok(Ok(c)) => {
                            let c = Arc::new(c);
                            slot.1 = Conn::Up(c.clone());
                            nodes
                                .stripe
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(Arc::new(Member { client: c, in_flight: Default::default() }));
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(node = %addr, error = %e, "a node does not answer; reading from the others");
                            slot.1 = Conn::Down(Instant::now());
                        }
                        Err(_) => {
                            tracing::warn!(node = %addr, "a node did not answer within {SPREAD_CONNECT:?}; reading from the others");
                            slot.1 = Conn::Down(Instant::now());
                        }
                    }
                }
            });
            futures::future::join_all(tries).await;
        });
    }

    /// The open member with the fewest requests in flight (the first of equals).
    fn pick(&self) -> Arc<Member> {
        let stripe = self.stripe.lock().unwrap_or_else(|e| e.into_inner());
        stripe
            .iter()
            .filter(|m| m.client.connection().close_reason().is_none())
            .min_by_key(|m| m.in_flight.load(std::sync::atomic::Ordering::Relaxed))
            .or_else(|| stripe.first())
            .cloned()
            .unwrap_or_else(|| Arc::new(Member { client: self.primary.clone(), in_flight: Default::default() }))
    }

    /// Chunks each node served good (a node that served none is absent).
    pub fn served(&self) -> std::collections::BTreeMap<String, u64> {
        self.served.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count_served(&self, node: &NodeClient, n: u64) {
        if n > 0 {
            *self.served.lock().unwrap_or_else(|e| e.into_inner()).entry(node.addr().to_string()).or_default() += n;
        }
    }

    /// The node connected to first: listings, records and other requests go there.
    pub fn primary(&self) -> &Arc<NodeClient> {
        &self.primary
    }

    pub fn bad_serves(&self) -> Vec<BadServe> {
        self.bad.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn failovers(&self) -> Vec<Failover> {
        self.failovers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The nodes other than `asked` that answer now (the primary first), connecting to them as
    /// needed.
    async fn fallbacks(&self, asked: SocketAddr) -> Vec<Arc<NodeClient>> {
        let mut up: Vec<Arc<NodeClient>> = Vec::new();
        if self.primary.addr() != asked {
            up.push(self.primary.clone());
        }
        let Some(tls) = &self.tls else { return up };
        let mut others = self.others.lock().await;
        for (addr, conn) in others.iter_mut().filter(|(a, _)| *a != asked) {
            match conn {
                Conn::Up(c) if c.connection().close_reason().is_none() => up.push(c.clone()),
                Conn::Down(since) if since.elapsed() < RETRY_DOWN => {}
                _ => match NodeClient::connect(*addr, tls).await {
                    Ok(c) => {
                        let c = Arc::new(c);
                        *conn = Conn::Up(c.clone());
                        up.push(c);
                    }
                    Err(e) => {
                        tracing::warn!(node = %addr, error = %e, "a fallback node does not answer");
                        *conn = Conn::Down(Instant::now());
                    }
                },
            }
        }
        up
    }

    /// Fetches and opens `ids`: from the primary, then what failed from each other node in
    /// turn. Each result is the chunk's plaintext, or why no node could give it. A delta's base
    /// is fetched (all of a batch's bases at once) and opened first, and the delta applied.
    pub async fn fetch_open(&self, keys: &TenantKeys, ids: Vec<ChunkId>) -> Vec<Result<Vec<u8>>> {
        self.fetch_open_depth(keys, ids, 0).await
    }

    fn fetch_open_depth<'a>(
        &'a self,
        keys: &'a TenantKeys,
        ids: Vec<ChunkId>,
        depth: usize,
    ) -> futures::future::BoxFuture<'a, Vec<Result<Vec<u8>>>> {
        Box::pin(async move {
            let opened = self.fetch_any(keys, ids.clone()).await;
            let mut bases: Vec<ChunkId> =
                opened.iter().filter_map(|r| if let Ok(Opened::Delta(d)) = r { Some(d.base) } else { None }).collect();
            if bases.is_empty() {
                return opened
                    .into_iter()
                    .map(|r| match r {
                        Ok(Opened::Plain(p)) => Ok(p),
                        Ok(Opened::Delta(_)) => Err(anyhow!("unreachable: a delta without a base")),
                        Err(e) => Err(e),
                    })
                    .collect();
            }
            bases.sort_unstable();
            bases.dedup();
            let plain: std::collections::HashMap<ChunkId, std::result::Result<Vec<u8>, String>> =
                if depth >= MAX_DELTA_DEPTH {
                    bases.iter().map(|b| (*b, Err(format!("delta chain deeper than {MAX_DELTA_DEPTH}")))).collect()
                } else {
                    let got = self.fetch_open_depth(keys, bases.clone(), depth + 1).await;
                    bases.into_iter().zip(got.into_iter().map(|r| r.map_err(|e| format!("{e:#}")))).collect()
                };
            let keys = keys.clone();
            let n = ids.len();
            tokio::task::spawn_blocking(move || {
                let mut opener = Opener::new(&keys).map_err(|e| anyhow!("{e}"))?;
                anyhow::Ok(
                    ids.iter()
                        .zip(opened)
                        .map(|(id, r)| match r? {
                            Opened::Plain(p) => Ok(p),
                            Opened::Delta(d) => {
                                let base = d.base;
                                match plain.get(&base) {
                                    Some(Ok(b)) => opener.apply_delta(id, d, b).map_err(|e| {
                                        anyhow!("chunk {} does not apply to its base {}: {e}", id.short(), base.short())
                                    }),
                                    Some(Err(e)) => Err(anyhow!(
                                        "chunk {} is a delta on base chunk {}, which could not be read: {e}",
                                        id.short(),
                                        base.short()
                                    )),
                                    None => Err(anyhow!("base chunk {} was not fetched", base.short())),
                                }
                            }
                        })
                        .collect::<Vec<_>>(),
                )
            })
            .await
            .map_err(|e| anyhow!("opening chunks failed: {e}"))
            .and_then(|r| r)
            .unwrap_or_else(|e| (0..n).map(|_| Err(anyhow!("{e:#}"))).collect())
        })
    }

    /// `fetch_open` without applying deltas.
    async fn fetch_any(&self, keys: &TenantKeys, ids: Vec<ChunkId>) -> Vec<Result<Opened>> {
        if ids.is_empty() {
            return Vec::new();
        }
        let member = self.pick();
        member.in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let first = fetch_open_from(&member.client, keys, &ids).await;
        member.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.count_served(&member.client, first.iter().filter(|r| r.is_ok()).count() as u64);
        if first.iter().all(Result::is_ok) {
            return first.into_iter().filter_map(|r| r.ok()).map(Ok).collect();
        }
        let asked = member.client.addr();
        let asked_name = asked.to_string();
        // (index, what the node asked said)
        let mut pending: Vec<(usize, Miss)> = Vec::new();
        let mut out: Vec<Result<Opened>> = Vec::with_capacity(ids.len());
        for (i, r) in first.into_iter().enumerate() {
            match r {
                Ok(d) => out.push(Ok(d)),
                Err(m) => {
                    out.push(Err(anyhow!("not fetched")));
                    pending.push((i, m));
                }
            }
        }
        let mut from: Vec<Option<String>> = vec![None; ids.len()];
        let mut later: Vec<Vec<String>> = vec![Vec::new(); ids.len()];
        for node in self.fallbacks(asked).await {
            let want: Vec<usize> = pending.iter().map(|(i, _)| *i).filter(|i| from[*i].is_none()).collect();
            if want.is_empty() {
                break;
            }
            let got = fetch_open_from(&node, keys, &want.iter().map(|i| ids[*i]).collect::<Vec<_>>()).await;
            self.count_served(&node, got.iter().filter(|r| r.is_ok()).count() as u64);
            for (i, r) in want.into_iter().zip(got) {
                match r {
                    Ok(d) => {
                        out[i] = Ok(d);
                        from[i] = Some(node.addr().to_string());
                    }
                    Err(Miss::Data(e) | Miss::Node(e)) => later[i].push(format!("{}: {e}", node.addr())),
                }
            }
        }
        let mut node_error = None;
        for (i, miss) in pending {
            match miss {
                Miss::Data(e) => {
                    self.bad.lock().unwrap_or_else(|e| e.into_inner()).push(BadServe {
                        node: asked_name.clone(),
                        chunk: ids[i].to_string(),
                        error: e.clone(),
                        recovered_from: from[i].clone(),
                    });
                    if from[i].is_none() {
                        out[i] = Err(anyhow!("{}", with_others(e, &later[i])));
                    }
                }
                Miss::Node(e) => {
                    if from[i].is_none() {
                        out[i] = Err(anyhow!("{}", with_others(e.clone(), &later[i])));
                    }
                    node_error.get_or_insert((e, from[i].clone()));
                }
            }
        }
        if let Some((error, continued_from)) = node_error {
            let mut f = self.failovers.lock().unwrap_or_else(|e| e.into_inner());
            if !f.iter().any(|x| x.node == asked_name) {
                tracing::warn!(node = %asked_name, %error, continued = ?continued_from, "the node stopped answering");
                f.push(Failover { node: asked_name, error, continued_from });
            }
        }
        out
    }

    /// Closes every connection (waiting for the closing handshake of the primary only).
    pub async fn close(self) {
        let Nodes { primary, others, stripe, .. } = self;
        drop(stripe);
        for (_, c) in others.into_inner() {
            if let Conn::Up(c) = c
                && let Ok(c) = Arc::try_unwrap(c)
            {
                c.close().await;
            }
        }
        if let Ok(c) = Arc::try_unwrap(primary) {
            c.close().await;
        }
    }
}

fn with_others(e: String, others: &[String]) -> String {
    if others.is_empty() { e } else { format!("{e}; other nodes: {}", others.join("; ")) }
}

/// One node's answer for each of `ids`, opened and checked on the blocking pool.
async fn fetch_open_from(
    client: &Arc<NodeClient>,
    keys: &TenantKeys,
    ids: &[ChunkId],
) -> Vec<std::result::Result<Opened, Miss>> {
    let envelopes: Vec<std::result::Result<Vec<u8>, Miss>> = match client.get_chunks(ids).await {
        Ok(v) => v
            .into_iter()
            .map(|r| {
                r.map_err(|e| match e {
                    // The node answered about this chunk: damaged, missing, refused.
                    ClientError::Remote { .. } => Miss::Data(e.to_string()),
                    other => Miss::Node(other.to_string()),
                })
            })
            .collect(),
        Err(e) => {
            let msg = format!("{e:#}");
            return ids.iter().map(|_| Err(Miss::Node(msg.clone()))).collect();
        }
    };
    let (keys, ids, n) = (keys.clone(), ids.to_vec(), ids.len());
    tokio::task::spawn_blocking(move || {
        let mut opener = Opener::new(&keys).map_err(|e| e.to_string());
        ids.iter()
            .zip(envelopes)
            .map(|(id, env)| {
                let o = opener.as_mut().map_err(|e| Miss::Data(e.clone()))?;
                o.open_any(id, &env?).map_err(|e| Miss::Data(e.to_string()))
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| (0..n).map(|_| Err(Miss::Node(format!("opening chunks failed: {e}")))).collect())
}
