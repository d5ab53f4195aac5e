//! A relay that adds what an embassy link has and this kernel cannot emulate (no netem):
//! one-way delay on every datagram or byte, in both directions, and random loss of datagrams.
//! The rate is left to `tc` (token bucket) on the link the relay forwards over.
//!
//! ```text
//! exclave-wan-relay --listen ADDR --to ADDR (--udp | --tcp) [--delay-ms 20] [--loss-percent 0]
//! ```
//!
//! UDP (QUIC): each client address gets its own upstream socket; datagrams are dropped with the
//! given probability, each way, and delivered `delay` after they arrived, in order. TCP (SSH
//! for restic and borg): each connection is piped both ways, every read delivered `delay`
//! later; loss cannot be applied inside a byte stream (TCP's own retransmissions would hide
//! it), so `--loss-percent` applies to UDP only.

#![allow(clippy::unwrap_used)] // a benchmark tool: a panic is the failure report

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;

struct Args {
    listen: SocketAddr,
    to: SocketAddr,
    udp: bool,
    delay: Duration,
    loss: f64,
}

fn args() -> Args {
    let mut a = Args {
        listen: "127.0.0.1:0".parse().unwrap(),
        to: "127.0.0.1:0".parse().unwrap(),
        udp: true,
        delay: Duration::from_millis(20),
        loss: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--listen" => a.listen = v().parse().expect("--listen ADDR"),
            "--to" => a.to = v().parse().expect("--to ADDR"),
            "--udp" => a.udp = true,
            "--tcp" => a.udp = false,
            "--delay-ms" => a.delay = Duration::from_millis(v().parse().expect("--delay-ms N")),
            "--loss-percent" => a.loss = v().parse::<f64>().expect("--loss-percent P") / 100.0,
            "-h" | "--help" => {
                println!(
                    "exclave-wan-relay --listen ADDR --to ADDR (--udp | --tcp) [--delay-ms 20] [--loss-percent 0]"
                );
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Sends each datagram given to it on `sock` (to `to`, or connected) `delay` after it was
/// given, in order (the delay is constant). A datagram the socket cannot take is dropped, as
/// a router drops what its full queue cannot hold: waiting instead would make this relay an
/// unbounded buffer (seen: a round trip of 480 ms on a 40 ms link). The socket's buffer is
/// sized (`QUEUE_BYTES`) like the link's token bucket queue.
fn delayed(delay: Duration, sock: Arc<UdpSocket>, to: Option<SocketAddr>) -> Delayed {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    tokio::spawn(async move {
        while let Some((due, d)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            let _ = match to {
                Some(to) => sock.try_send_to(&d, to),
                None => sock.try_send(&d),
            };
        }
    });
    Delayed { tx, delay }
}

/// The sending end of `delayed`: stamps each datagram with when it is due.
struct Delayed {
    tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
    delay: Duration,
}

impl Delayed {
    fn send(&self, d: Vec<u8>) -> bool {
        self.tx.send((Instant::now() + self.delay, d)).is_ok()
    }
}

/// Send and receive buffer of each UDP socket: about 50 ms at 100 Mbit/s, the queue
/// `bench/wan.sh` gives the link.
const QUEUE_BYTES: usize = 640 * 1024;

fn sized(sock: &std::net::UdpSocket) {
    let s = socket2::SockRef::from(sock);
    let _ = s.set_send_buffer_size(QUEUE_BYTES);
    let _ = s.set_recv_buffer_size(4 * QUEUE_BYTES);
}

async fn udp(a: Args) {
    let front = std::net::UdpSocket::bind(a.listen).unwrap();
    sized(&front);
    front.set_nonblocking(true).unwrap();
    let front = Arc::new(UdpSocket::from_std(front).unwrap());
    let mut clients: HashMap<SocketAddr, Delayed> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = front.recv_from(&mut buf).await.unwrap();
        if a.loss > 0.0 && rand::random::<f64>() < a.loss {
            continue;
        }
        let up = clients.entry(from).or_insert_with(|| {
            let bind: SocketAddr = if a.to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap();
            let sock = std::net::UdpSocket::bind(bind).unwrap();
            sized(&sock);
            sock.connect(a.to).unwrap();
            sock.set_nonblocking(true).unwrap();
            let sock = Arc::new(UdpSocket::from_std(sock).unwrap());
            // Replies: back to this client, delayed and thinned the same way.
            let back = delayed(a.delay, front.clone(), Some(from));
            let (reader, loss) = (sock.clone(), a.loss);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = reader.recv(&mut buf).await {
                    if loss > 0.0 && rand::random::<f64>() < loss {
                        continue;
                    }
                    if !back.send(buf[..n].to_vec()) {
                        break;
                    }
                }
            });
            delayed(a.delay, sock, None)
        });
        let _ = up.send(buf[..n].to_vec());
    }
}

/// Copies `from` into `to`, each read delivered `delay` later.
async fn pipe(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 65536];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn tcp(a: Args) {
    let listener = TcpListener::bind(a.listen).await.unwrap();
    loop {
        let (client, _) = listener.accept().await.unwrap();
        let (to, delay) = (a.to, a.delay);
        tokio::spawn(async move {
            let Ok(upstream) = TcpStream::connect(to).await else { return };
            let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
            let (cr, cw) = client.into_split();
            let (ur, uw) = upstream.into_split();
            tokio::join!(pipe(cr, uw, delay), pipe(ur, cw, delay));
        });
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    eprintln!(
        "relaying {} {} -> {} with {:?} each way{}",
        if a.udp { "udp" } else { "tcp" },
        a.listen,
        a.to,
        a.delay,
        if a.loss > 0.0 { format!(", {:.2} % loss", a.loss * 100.0) } else { String::new() }
    );
    if a.udp { udp(a).await } else { tcp(a).await }
}
