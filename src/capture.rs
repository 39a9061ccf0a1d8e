//! A logging relay for making real captures: it accepts the source's connections, connects
//! each to the destination in the same order, copies bytes both ways unchanged and writes
//! every direction of every connection to its own file. It decodes nothing on purpose, so
//! a capture records what QEMU sent even when our codec would reject it.
//!
//! Files: connection 0 is the main channel (`main.fwd`, and `return-path.rp` for the
//! destination's replies); connection N ≥ 1 is a preempt channel (`preempt{N}.fwd`,
//! `preempt{N}.rp`, the latter always empty with stock QEMU), unless it is a multifd
//! channel, which [`name_multifd_files`] renames after the run by the id in its first
//! packet (`multifd{id}.fwd`, `multifd{id}.rp`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Names of the two files of connection `n`.
pub fn channel_files(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    if n == 0 {
        (dir.join("main.fwd"), dir.join("return-path.rp"))
    } else {
        (
            dir.join(format!("preempt{n}.fwd")),
            dir.join(format!("preempt{n}.rp")),
        )
    }
}

/// Renames the files of every connection that starts with a multifd initial packet to
/// `multifd{id}.*`, so a capture says which file is which channel (protocol-spec/multifd.md).
pub fn name_multifd_files(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let Some(n) = name
            .strip_prefix("preempt")
            .and_then(|r| r.strip_suffix(".fwd"))
        else {
            continue;
        };
        let head: Vec<u8> = std::fs::read(&p)?.into_iter().take(64).collect();
        if let Ok(Some(init)) = crate::wire::MultifdInit::parse(&head) {
            std::fs::rename(&p, dir.join(format!("multifd{}.fwd", init.id)))?;
            let rp = dir.join(format!("preempt{n}.rp"));
            if rp.exists() {
                std::fs::rename(rp, dir.join(format!("multifd{}.rp", init.id)))?;
            }
        }
    }
    Ok(())
}

async fn copy_logged<R, W>(mut from: R, mut to: W, log: PathBuf) -> std::io::Result<u64>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut file = tokio::fs::File::create(&log).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await?;
        total += n as u64;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    file.flush().await?;
    let _ = to.shutdown().await;
    Ok(total)
}

/// A running logging relay.
pub struct LoggingRelay {
    /// Where the source should connect.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<std::io::Result<usize>>,
}

impl LoggingRelay {
    /// Listens on 127.0.0.1 (an ephemeral port) and relays to `dest`, logging into `dir`.
    pub async fn start(dest: SocketAddr, dir: PathBuf) -> std::io::Result<LoggingRelay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut copies = JoinSet::new();
            let mut n = 0;
            loop {
                tokio::select! {
                    acc = listener.accept() => {
                        let (src, _) = acc?;
                        let dst = TcpStream::connect(dest).await?;
                        src.set_nodelay(true)?;
                        dst.set_nodelay(true)?;
                        let (fwd, rp) = channel_files(&dir, n);
                        let (sr, sw) = src.into_split();
                        let (dr, dw) = dst.into_split();
                        copies.spawn(copy_logged(sr, dw, fwd));
                        copies.spawn(copy_logged(dr, sw, rp));
                        n += 1;
                    }
                    done = copies.join_next(), if !copies.is_empty() => {
                        if let Some(r) = done { r.map_err(std::io::Error::other)??; }
                        if copies.is_empty() { return Ok(n); }
                    }
                }
            }
        });
        Ok(LoggingRelay { addr, task })
    }

    /// Waits until every relayed connection has closed; returns how many there were.
    pub async fn wait(self) -> std::io::Result<usize> {
        self.task.await.map_err(std::io::Error::other)?
    }

    /// Stops relaying (connections still open are dropped).
    pub fn abort(&self) {
        self.task.abort();
    }
}
