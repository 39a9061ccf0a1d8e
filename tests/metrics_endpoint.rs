//! The metrics endpoint alone (no QEMU) against hostile clients: a slow-loris client and a
//! silent one are dropped by the header timeout while a scrape goes through, connections
//! past the cap are closed at once and counted, a client that stops reading is dropped as
//! idle, a busy kept-alive connection ends at its deadline, and only GET/HEAD of /metrics
//! are answered. Short limits are set per test; each waits on what it asserts (a close, a
//! counter), with a generous guard against hanging.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postcopy_sidecar::daemon::metrics::{EndpointLimitLabels, Metrics};
use postcopy_sidecar::daemon::metrics_endpoint::{EndpointLimits, MetricsEndpoint, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Guard against a test hanging: far beyond any limit set below.
const GUARD: Duration = Duration::from_secs(30);

fn start(limits: EndpointLimits) -> (Arc<Metrics>, MetricsEndpoint) {
    let metrics = Arc::new(Metrics::new());
    let endpoint =
        serve("127.0.0.1:0".parse().unwrap(), metrics.clone(), limits).expect("metrics endpoint");
    (metrics, endpoint)
}

fn timed_out(m: &Metrics, limit: &'static str) -> u64 {
    m.endpoint_timed_out
        .get_or_create(&EndpointLimitLabels { limit })
        .get()
}

/// Waits until `cond` holds (checked as the endpoint's thread updates the counters).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await; // polling a condition
    }
}

/// One GET /metrics with hyper's client: status and body.
async fn scrape(addr: SocketAddr) -> (u16, String) {
    let sock = TcpStream::connect(addr).await.expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = tx.send_request(req).await.expect("GET /metrics");
    let status = res.status().as_u16();
    use http_body_util::BodyExt;
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Reads until the server closes: what it sent, or panics if it never closes.
async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(GUARD, s.read(&mut buf)).await {
            Err(_) => panic!("the server never closed the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `raw` and returns all the server says before it closes.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned()
}

fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_is_dropped_by_the_header_timeout_while_a_scrape_succeeds() {
    let header = Duration::from_secs(2);
    let (metrics, endpoint) = start(EndpointLimits {
        header_timeout: header,
        ..EndpointLimits::default()
    });
    let addr = endpoint.addr();

    // One header byte every 200 ms, never finishing the head.
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let loris = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let opened = Instant::now();
        s.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            .await
            .unwrap();
        let _ = started_tx.send(());
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut sent = 0u32;
        let mut buf = [0u8; 256];
        let deadline = tokio::time::sleep(GUARD);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if s.write_all(b"a").await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => panic!("the server answered an unfinished head: {:?}",
                        String::from_utf8_lossy(&buf[..n])),
                },
                _ = &mut deadline => panic!("the slow client was never dropped"),
            }
        }
        (opened.elapsed(), sent)
    });
    // And one that sends nothing at all.
    let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
    let silent = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let opened = Instant::now();
        let _ = connected_tx.send(());
        let said = read_to_close(&mut s).await;
        (opened.elapsed(), said)
    });
    started_rx.await.unwrap();
    connected_rx.await.unwrap();
    let (status, body) = scrape(addr).await;
    assert_eq!(status, 200);
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    // The scrape ran while both slow clients were connected and not yet dropped.
    assert_eq!(
        sample(&body, "postcopy_sidecar_metrics_connections_open"),
        Some(3.0),
        "{body}"
    );
    assert_eq!(timed_out(&metrics, "header"), 0);

    let (lived, sent) = loris.await.unwrap();
    assert!(sent >= 3, "the slow client sent {sent} bytes");
    assert!(
        lived >= header && lived < header * 5,
        "dropped after {lived:?}"
    );
    let (lived, said) = silent.await.unwrap();
    assert!(said.is_empty(), "{said:?}");
    assert!(
        lived >= header && lived < header * 5,
        "dropped after {lived:?}"
    );
    until("both counted as header time-outs", || {
        timed_out(&metrics, "header") == 2
    })
    .await;
    assert_eq!(timed_out(&metrics, "idle"), 0);
    assert_eq!(timed_out(&metrics, "deadline"), 0);
    // The scrape's own connection closed when its client went: not a time-out.
    until("no connection left open", || {
        metrics.endpoint_open.get() == 0
    })
    .await;
    assert_eq!(timed_out(&metrics, "header"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_at_once_and_a_scrape_works_after() {
    let cap = 4;
    let (metrics, endpoint) = start(EndpointLimits {
        max_connections: cap,
        ..EndpointLimits::default()
    });
    let addr = endpoint.addr();
    // The kernel queues connections in order, so these take the slots.
    let mut holders = Vec::new();
    for _ in 0..cap {
        holders.push(TcpStream::connect(addr).await.unwrap());
    }
    // A flood past the cap: each is closed at once (well before the 5 s header timeout).
    let flood = 1000;
    let began = Instant::now();
    let mut refused = tokio::task::JoinSet::new();
    for _ in 0..flood {
        refused.spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned()
        });
    }
    while let Some(said) = refused.join_next().await {
        let said = said.unwrap();
        assert!(said.starts_with("HTTP/1.1 503 "), "{said:?}");
    }
    let took = began.elapsed();
    eprintln!("{flood} connections past the cap refused in {took:?}");
    assert!(took < EndpointLimits::default().header_timeout, "{took:?}");
    assert_eq!(metrics.endpoint_refused.get(), flood);
    assert_eq!(metrics.endpoint_open.get(), cap as i64);
    assert_eq!(timed_out(&metrics, "header"), 0);

    drop(holders);
    until("the holders' slots are free", || {
        metrics.endpoint_open.get() == 0
    })
    .await;
    let (status, body) = scrape(addr).await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(&body, "postcopy_sidecar_metrics_connections_refused_total"),
        Some(flood as f64),
        "{body}"
    );
    assert_eq!(metrics.endpoint_refused.get(), flood);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_get_and_head_of_the_metrics_path_are_answered() {
    let (_metrics, endpoint) = start(EndpointLimits::default());
    let addr = endpoint.addr();

    let other = exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
    assert!(!other.contains("postcopy_sidecar"), "{other}");

    let delete = exchange(addr, b"DELETE /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(delete.starts_with("HTTP/1.1 405 "), "{delete}");
    assert!(
        delete.to_lowercase().contains("allow: get, head"),
        "{delete}"
    );

    // A body announced and never sent: the answer comes anyway (the body is not awaited)
    // and the connection closes.
    let post = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\nabc",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
    assert!(post.to_lowercase().contains("connection: close"), "{post}");

    let head = exchange(
        addr,
        b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let (headers, rest) = head.split_once("\r\n\r\n").unwrap();
    assert!(rest.is_empty(), "HEAD got a body: {rest:?}");
    assert!(
        headers
            .to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{headers}"
    );

    let get = exchange(
        addr,
        b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(get.starts_with("HTTP/1.1 200 "), "{get}");
    assert!(get.trim_end().ends_with("# EOF"), "{get}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_as_idle() {
    let idle = Duration::from_secs(1);
    let (metrics, endpoint) = start(EndpointLimits {
        idle_timeout: idle,
        ..EndpointLimits::default()
    });
    let addr = endpoint.addr();
    // A small receive window, and pipelined requests whose answers are never read: the
    // server's writes stall.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&addr.into()).unwrap();
    sock.set_nonblocking(true).unwrap();
    let s = TcpStream::from_std(sock.into()).unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        while wr.write_all(req).await.is_ok() {}
    });
    until("the connection counted as idle", || {
        timed_out(&metrics, "idle") == 1
    })
    .await;
    // Closed by the server: what it had queued drains, then the end.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(GUARD, rd.read(&mut buf)).await {
            Err(_) => panic!("the server never closed the stalled connection"),
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {}
        }
    }
    writer.abort();
    assert_eq!(timed_out(&metrics, "header"), 0);
    assert_eq!(timed_out(&metrics, "deadline"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_kept_alive_connection_ends_at_its_deadline() {
    let deadline = Duration::from_secs(1);
    let (metrics, endpoint) = start(EndpointLimits {
        connection_deadline: deadline,
        ..EndpointLimits::default()
    });
    let sock = TcpStream::connect(endpoint.addr()).await.unwrap();
    let opened = Instant::now();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut scrapes = 0u32;
    loop {
        assert!(opened.elapsed() < GUARD, "the connection was never ended");
        if tx.ready().await.is_err() {
            break;
        }
        let req = hyper::Request::get("/metrics")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let Ok(res) = tx.send_request(req).await else {
            break;
        };
        assert_eq!(res.status(), 200);
        use http_body_util::BodyExt;
        if res.into_body().collect().await.is_err() {
            break;
        }
        scrapes += 1;
        // Paced well inside the header timeout, so only the deadline can end it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lived = opened.elapsed();
    let _ = conn.await;
    assert!(scrapes >= 5, "{scrapes} scrapes");
    assert!(lived >= deadline && lived < deadline * 5, "{lived:?}");
    until("counted as a deadline", || {
        timed_out(&metrics, "deadline") == 1
    })
    .await;
    assert_eq!(timed_out(&metrics, "header"), 0);
}
