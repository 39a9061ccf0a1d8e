//! The metrics endpoint out of file descriptors: its accepts fail with EMFILE while
//! connections wait, and it must pause with growing back-off (not spin a core), count the
//! failures, and serve again once descriptors are back. A test binary of its own, since it
//! lowers the whole process's descriptor limit.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use postcopy_sidecar::daemon::metrics::Metrics;
use postcopy_sidecar::daemon::metrics_endpoint::{EndpointLimits, serve};

#[test]
fn out_of_descriptors_the_endpoint_backs_off_and_serves_again_after() {
    let metrics = Arc::new(Metrics::new());
    let endpoint = serve(
        "127.0.0.1:0".parse().unwrap(),
        metrics.clone(),
        EndpointLimits::default(),
    )
    .expect("metrics endpoint");
    let addr = endpoint.addr();
    // Client sockets made while descriptors can still be had; connecting needs none.
    let waiting: Vec<socket2::Socket> = (0..4)
        .map(|_| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap())
        .collect();
    // Every descriptor number below the lowest free one is taken: a limit there leaves
    // none for the endpoint's accept.
    let lowest_free = nix::unistd::dup(std::io::stderr()).unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    {
        use std::os::fd::AsRawFd;
        let limit = lowest_free.as_raw_fd() as u64;
        drop(lowest_free);
        setrlimit(Resource::RLIMIT_NOFILE, limit, hard).unwrap();
    }
    let began = Instant::now();
    for s in &waiting {
        s.connect(&addr.into()).expect("queued by the kernel");
    }
    // Pauses of 5, 10, 20, … ms: the 8th failure comes at least 635 ms after the first.
    let guard = began + Duration::from_secs(30);
    while metrics.endpoint_accept_errors.get() < 8 {
        assert!(Instant::now() < guard, "accept never failed 8 times");
        std::thread::sleep(Duration::from_millis(5)); // polling a counter
    }
    let took = began.elapsed();
    let errors = metrics.endpoint_accept_errors.get();
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    eprintln!("{errors} failed accepts in {took:?}");
    assert!(
        took >= Duration::from_millis(600),
        "{errors} in {took:?}: no back-off"
    );
    assert!(errors <= 9, "{errors} in {took:?}");

    // Descriptors are back: the waiting connections are taken and a scrape is answered.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body)
        .expect("an answer after the back-off");
    assert!(body.starts_with("HTTP/1.1 200 "), "{body}");
    let counted: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("postcopy_sidecar_metrics_accept_errors_total "))
        .expect("the accept-error counter")
        .parse()
        .unwrap();
    assert!(counted >= 8.0, "{body}");
    // Taken before the scrape's (the kernel queues in order) and still open; the
    // scrape's own may or may not be counted out yet.
    assert!(
        metrics.endpoint_open.get() >= waiting.len() as i64,
        "the waiting connections were not taken: {}",
        metrics.endpoint_open.get()
    );
    drop(waiting);
    endpoint.abort();
}
