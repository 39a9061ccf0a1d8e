//! A network link between a source QEMU and the sidecar that tests can break: a loopback
//! forwarder that relays every connection to a target address and can
//! - **cut** every connection at once: `shutdown()` on both of its sockets with a zero
//!   linger, so both ends get a reset (a bare `close()` from another thread would not wake
//!   a blocked `recv`, and nothing would be sent);
//! - **freeze**: stop relaying in both directions without closing anything, as a silent
//!   partition does (neither end notices until a timeout of its own);
//! - count the bytes it relayed towards the target, so a test can cut at a chosen point
//!   by waiting for the count instead of sleeping.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One relayed connection's sockets (duplicates, for cutting).
struct Pair {
    client: socket2::Socket,
    upstream: socket2::Socket,
    /// 1 = the first connection accepted, ...
    index: u32,
}

#[derive(Default)]
struct State {
    pairs: Vec<Pair>,
    accepted: u32,
}

/// A breakable link; dropping it stops accepting (relayed connections stay up).
pub struct Link {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    frozen: watch::Sender<bool>,
    /// Bytes relayed from clients to the target, all connections together.
    forwarded: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn cut_socket(s: &socket2::Socket) {
    let _ = s.set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(std::net::Shutdown::Both);
}

impl Link {
    /// Starts relaying connections made to a new loopback port to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Link> {
        Link::start_on("127.0.0.1:0".parse().expect("an address"), target).await
    }

    /// Starts relaying connections made to `bind` (an address of this host) to `target`.
    pub async fn start_on(bind: SocketAddr, target: SocketAddr) -> std::io::Result<Link> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let frozen = watch::Sender::new(false);
        let forwarded = watch::Sender::new(0u64);
        let (st, fr, fw) = (state.clone(), frozen.clone(), forwarded.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let dup = |s: &TcpStream| socket2::SockRef::from(s).try_clone();
                let (Ok(c), Ok(u)) = (dup(&client), dup(&upstream)) else {
                    continue;
                };
                {
                    let mut s = st.lock().unwrap_or_else(|p| p.into_inner());
                    s.accepted += 1;
                    let index = s.accepted;
                    s.pairs.push(Pair {
                        client: c,
                        upstream: u,
                        index,
                    });
                }
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(relay(cr, uw, fr.subscribe(), Some(fw.clone())));
                tokio::spawn(relay(ur, cw, fr.subscribe(), None));
            }
        });
        Ok(Link {
            addr,
            state,
            frozen,
            forwarded,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u32 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .accepted
    }

    /// Cuts every relayed connection (both sides get a reset).
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for p in s.pairs.drain(..) {
            cut_socket(&p.client);
            cut_socket(&p.upstream);
        }
    }

    /// Cuts only the relayed connection that was accepted `index`-th (1 = first); the
    /// others stay up. Returns whether it was found.
    pub fn cut_connection(&self, index: u32) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = s.pairs.iter().position(|p| p.index == index) else {
            return false;
        };
        let p = s.pairs.remove(i);
        cut_socket(&p.client);
        cut_socket(&p.upstream);
        true
    }

    /// Stops relaying in both directions without closing anything (a silent partition);
    /// new connections made meanwhile are frozen too.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Relays again.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Bytes relayed towards the target so far.
    pub fn forwarded(&self) -> u64 {
        *self.forwarded.borrow()
    }

    /// Waits until at least `n` bytes in total have been relayed towards the target.
    pub async fn wait_forwarded(&self, n: u64, timeout: Duration) -> bool {
        let mut rx = self.forwarded.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    count: Option<watch::Sender<u64>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = frozen.wait_for(|f| *f) => continue,
        };
        // A freeze that starts now holds these bytes until the thaw.
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if let Some(c) = &count {
            c.send_modify(|v| *v += n as u64);
        }
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_counts_freezes_and_cuts() {
        let target = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let taddr = target.local_addr().unwrap();
        let link = Link::start(taddr).await.unwrap();
        let mut client = TcpStream::connect(link.addr()).await.unwrap();
        let (mut server, _) = target.accept().await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        server.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
        assert!(link.wait_forwarded(5, Duration::from_secs(5)).await);
        link.freeze();
        client.write_all(b"x").await.unwrap();
        let r = tokio::time::timeout(Duration::from_millis(200), server.read(&mut b)).await;
        assert!(r.is_err(), "nothing crosses a frozen link");
        link.thaw();
        server.read_exact(&mut b[..1]).await.unwrap();
        assert_eq!(b[0], b'x');
        link.cut();
        let mut rest = Vec::new();
        let r = server.read_to_end(&mut rest).await;
        assert!(r.is_err() || rest.is_empty(), "the target sees the cut");
        assert_eq!(link.accepted(), 1);
    }
}
