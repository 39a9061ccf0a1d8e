//! The HTTP endpoint Prometheus scrapes (`receive --metrics ADDR`), built to be left open
//! on a network that may be hostile without touching the migration.
//!
//! It runs on a thread and tokio runtime of its own, so no number of clients, nor their
//! slowness, can take a worker from the relay. Each connection is bounded in time (the
//! request head must arrive within [`EndpointLimits::header_timeout`], nothing may stall
//! longer than [`EndpointLimits::idle_timeout`], no connection outlives
//! [`EndpointLimits::connection_deadline`]) and in number (past
//! [`EndpointLimits::max_connections`] new ones are closed at once). Only `GET` and `HEAD`
//! of `/metrics` are answered with the metrics; anything else gets a short 404 or 405, and
//! no request body is ever read. What the limits did is counted in the metrics themselves
//! (`postcopy_sidecar_metrics_connections_*`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::backoff::AcceptBackoff;
use super::metrics::Metrics;

/// The one path that serves the metrics (Prometheus' default `metrics_path`).
pub const METRICS_PATH: &str = "/metrics";

/// The largest request head read (hyper's floor is 8 KiB); a larger one is refused (431).
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Header lines allowed in one request.
const MAX_HEADERS: usize = 32;
/// After the connection deadline: time left for a response under way to finish.
const DEADLINE_GRACE: Duration = Duration::from_secs(1);
/// A warning about refused connections at most this often (the rest at debug).
const REFUSAL_WARN_EVERY: Duration = Duration::from_secs(60);

/// What one client may hold of the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointLimits {
    /// The request head must be complete this long after the connection opened or the
    /// previous response was sent (so this is also how long a kept-alive connection may sit
    /// idle between scrapes). A slow-loris client is dropped here.
    pub header_timeout: Duration,
    /// A connection on which no byte moved either way for this long is closed (a client
    /// that stopped reading its response).
    pub idle_timeout: Duration,
    /// No connection lives longer than this, however busy (a response under way gets
    /// [`DEADLINE_GRACE`] more).
    pub connection_deadline: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for EndpointLimits {
    /// 5 s for a request head, 30 s of stall, 60 s in all, 16 connections: ample for a
    /// pair of Prometheus servers scraping every few seconds.
    fn default() -> Self {
        EndpointLimits {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            connection_deadline: Duration::from_secs(60),
            max_connections: 16,
        }
    }
}

/// The running endpoint. Dropping it (or [`MetricsEndpoint::abort`]) stops it: the
/// listener closes and open connections are dropped.
#[must_use = "dropping the endpoint stops it"]
#[derive(Debug)]
pub struct MetricsEndpoint {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

impl MetricsEndpoint {
    /// The address it listens on (the port chosen, for `…:0`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops the endpoint (the same as dropping it; says so at the call site).
    pub fn abort(self) {}
}

/// Binds `addr` now (so a bad address is the caller's error) and serves `metrics` there
/// on a thread of its own within `limits`, until the returned endpoint is dropped.
pub fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    limits: EndpointLimits,
) -> std::io::Result<MetricsEndpoint> {
    let listener = bind(addr)?;
    let bound = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, metrics, limits, stop_rx).await,
                    Err(e) => tracing::error!("metrics endpoint: {e}"),
                }
            });
            // Dropping the runtime drops every connection task with it.
        })?;
    Ok(MetricsEndpoint {
        addr: bound,
        _stop: stop_tx,
    })
}

/// A listening socket like tokio's own: address reuse, so a restarted sidecar can bind
/// while old scrape connections sit in TIME_WAIT, and a backlog of 1024, so a burst of
/// connections waits in the kernel's queue to be refused properly rather than being left
/// half-open. Non-blocking, for the endpoint's runtime.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    limits: EndpointLimits,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = AcceptBackoff::standard("metrics endpoint");
    let mut refusals = RefusalLog::default();
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            a = listener.accept() => a,
        };
        let (sock, peer) = match accepted {
            Ok(a) => {
                backoff.accepted();
                a
            }
            Err(e) => {
                metrics.endpoint_accept_errors.inc();
                let pause = backoff.failed(&e);
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(pause) => continue,
                }
            }
        };
        match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let open = Open::new(metrics.clone(), slot);
                tokio::spawn(carry(sock, peer, open, limits));
            }
            Err(_) => {
                metrics.endpoint_refused.inc();
                refusals.refused(peer, limits.max_connections);
                // A scraper that got through the kernel sees why before the close.
                let _ = sock.try_write(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        }
    }
}

/// Says that connections are being refused once, then again at most every
/// [`REFUSAL_WARN_EVERY`] with how many went meanwhile; each one at debug.
#[derive(Default)]
struct RefusalLog {
    warned: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn refused(&mut self, peer: SocketAddr, max: usize) {
        self.since += 1;
        tracing::debug!(%peer, "metrics endpoint: {max} connections open; refused one");
        if self
            .warned
            .is_none_or(|t| t.elapsed() >= REFUSAL_WARN_EVERY)
        {
            tracing::warn!(
                %peer,
                refused = self.since,
                "metrics endpoint: {max} connections open, closing new ones at once \
                 (postcopy_sidecar_metrics_connections_refused_total)"
            );
            self.warned = Some(Instant::now());
            self.since = 0;
        }
    }
}

/// One connection's place among the open ones: shown in the gauge, freed on drop (also
/// when the runtime drops the task).
struct Open {
    metrics: Arc<Metrics>,
    _slot: OwnedSemaphorePermit,
}

impl Open {
    fn new(metrics: Arc<Metrics>, slot: OwnedSemaphorePermit) -> Open {
        metrics.endpoint_open.inc();
        Open {
            metrics,
            _slot: slot,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.endpoint_open.dec();
    }
}

/// How a connection ended.
enum Ended {
    Served(Result<(), hyper::Error>),
    Idle,
    Deadline,
}

/// Serves one connection within the limits, then counts how it ended.
async fn carry(sock: TcpStream, peer: SocketAddr, open: Open, limits: EndpointLimits) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        sock,
        activity: activity.clone(),
    });
    let m = open.metrics.clone();
    let service = hyper::service::service_fn(move |req| {
        std::future::ready(Ok::<_, Infallible>(answer(req, &m)))
    });
    let mut conn = pin!(
        hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .serve_connection(io, service)
    );
    let mut deadline = pin!(tokio::time::sleep(limits.connection_deadline));
    let ended = loop {
        let stalled_until = activity.last_io() + limits.idle_timeout;
        tokio::select! {
            r = conn.as_mut() => break Ended::Served(r),
            _ = &mut deadline => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(DEADLINE_GRACE, conn.as_mut()).await;
                break Ended::Deadline;
            }
            _ = tokio::time::sleep_until(stalled_until.into()) => {
                if activity.last_io() + limits.idle_timeout <= Instant::now() {
                    break Ended::Idle;
                }
            }
        }
    };
    let metrics = &open.metrics;
    match ended {
        Ended::Served(Ok(())) => {
            // hyper ends a connection that sent nothing at all by its header timer as if
            // the client had closed it: tell the two apart by who went quiet.
            if !activity.peer_closed() && activity.last_read().elapsed() >= limits.header_timeout {
                metrics.endpoint_timed_out("header");
                tracing::debug!(%peer, "metrics endpoint: no request in time; closed");
            }
        }
        Ended::Served(Err(e)) if e.is_timeout() => {
            metrics.endpoint_timed_out("header");
            tracing::debug!(%peer, "metrics endpoint: request head not complete in time; closed");
        }
        Ended::Served(Err(e)) => {
            tracing::debug!(%peer, "metrics endpoint: connection ended: {e}");
        }
        Ended::Idle => {
            metrics.endpoint_timed_out("idle");
            tracing::debug!(%peer, "metrics endpoint: nothing moved for {:?}; closed", limits.idle_timeout);
        }
        Ended::Deadline => {
            metrics.endpoint_timed_out("deadline");
            tracing::debug!(%peer, "metrics endpoint: connection older than {:?}; closed", limits.connection_deadline);
        }
    }
}

/// The response to one request. The body is never read: a request that has one gets its
/// answer and the connection closes after it.
fn answer(req: Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let has_body = !req.body().is_end_stream();
    let mut res = if req.uri().path() != METRICS_PATH {
        short(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        )
    } else if req.method() == Method::GET || req.method() == Method::HEAD {
        // For HEAD hyper sends the head only, with the length of this body.
        let mut r = Response::new(Full::new(Bytes::from(metrics.encode())));
        r.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
        );
        r
    } else {
        let mut r = short(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: GET or HEAD\n",
        );
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        r
    };
    if has_body || res.status() != StatusCode::OK {
        res.headers_mut()
            .insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    res
}

fn short(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// When bytes last moved on a connection, and whether the client closed its side: what
/// the idle limit and the counting of header time-outs go by.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read of at least one byte.
    last_read_ms: AtomicU64,
    /// Milliseconds from `start` to the last read or write of at least one byte.
    last_io_ms: AtomicU64,
    peer_closed: AtomicBool,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            last_io_ms: AtomicU64::new(0),
            peer_closed: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn last_io(&self) -> Instant {
        self.start + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
    }

    fn last_read(&self) -> Instant {
        self.start + Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed))
    }

    fn peer_closed(&self) -> bool {
        self.peer_closed.load(Ordering::Relaxed)
    }

    fn read(&self, n: usize) {
        if n == 0 {
            self.peer_closed.store(true, Ordering::Relaxed);
        } else {
            let now = self.now_ms();
            self.last_read_ms.store(now, Ordering::Relaxed);
            self.last_io_ms.store(now, Ordering::Relaxed);
        }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }
}

/// The connection's socket, noting each read and write in its [`Activity`].
struct Watched {
    sock: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let want = buf.remaining() > 0;
        let r = Pin::new(&mut self.sock).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r
            && want
        {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.sock).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.activity.wrote(n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.sock).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.activity.wrote(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.sock.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.sock).poll_shutdown(cx)
    }
}
