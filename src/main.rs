//! `postcopy-sidecar` command-line entry point: one subcommand per job.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::sync::Arc;

use postcopy_sidecar::daemon::metrics::Metrics;
use postcopy_sidecar::daemon::receive::TlsOptions;
use postcopy_sidecar::daemon::receive::{Incoming, Listen, ReceiveOptions, receive};
use postcopy_sidecar::daemon::tls::SourceTls;
use postcopy_sidecar::inspect;
use postcopy_sidecar::session::CutPolicy;
use postcopy_sidecar::session::admission::{AllowList, DistinguishedName};
use postcopy_sidecar::source::{SendOptions, send};
use postcopy_sidecar::verify::command::VerifyOptions;

/// A sidecar for QEMU postcopy live migration.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors. The level comes from RUST_LOG (default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

/// `--log-format`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Decode a captured migration and print its timeline and summary.
    Inspect {
        /// Main stream capture (source → destination), raw or gzip.
        stream: PathBuf,
        /// Return-path capture (destination → source).
        #[arg(long = "return-path")]
        return_path: Option<PathBuf>,
        /// Preempt-channel capture; repeat for several.
        #[arg(long)]
        preempt: Vec<PathBuf>,
        /// Multifd-channel capture (one file per channel); repeat for each.
        #[arg(long)]
        multifd: Vec<PathBuf>,
        /// Print the JSON summary instead of the timeline.
        #[arg(long)]
        json: bool,
    },
    /// Carry an incoming migration to the destination QEMU, taking over its page requests.
    Receive(Box<ReceiveArgs>),
    /// Boot a small local VM and migrate it with postcopy through the sidecar (the main job
    /// on its embedded default; run scripts/setup.sh first, or use scripts/demo.sh).
    Demo {
        /// Guest RAM, MiB.
        #[arg(long, default_value_t = 256)]
        ram_mib: u64,
        /// Memory the guest workload fills and keeps verifying, MiB.
        #[arg(long, default_value_t = 128)]
        workload_mib: u64,
        /// Use the postcopy-preempt channel.
        #[arg(long)]
        preempt: bool,
    },
    /// Drive a source QEMU to migrate (with postcopy) to an address, and wait for the end.
    Send {
        /// The source QEMU's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        /// Where to migrate to (the sidecar's --listen address).
        #[arg(long)]
        to: std::net::SocketAddr,
        /// Switch to postcopy this many seconds after starting; omit to stay in precopy.
        #[arg(long)]
        postcopy_after: Option<f64>,
        /// Use the postcopy-preempt channel.
        #[arg(long)]
        preempt: bool,
        /// Migrate with multifd and this many channels.
        #[arg(long)]
        multifd: Option<u8>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
    },
    /// Compare a destination's guest RAM, after its migration completed, with the digests
    /// `receive --digests` recorded; exits 1 on any mismatch.
    Verify {
        /// The destination QEMU's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        /// The uid QEMU runs as: the process behind --qmp must run as it (SO_PEERCRED).
        /// Default: the owner of the socket's directory, or our own uid.
        #[arg(long)]
        qmp_uid: Option<u32>,
        /// The digest file.
        #[arg(long)]
        digests: PathBuf,
        /// Compare although the guest runs (not exact: the guest changes its memory).
        #[arg(long)]
        allow_running: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Snapshot a running VM for lazy restore: the sidecar receives its migration and
    /// stores the device state and every page. The VM never enters postcopy, so any failure
    /// leaves it running; it ends in the run state it had unless --stop-after.
    Snapshot {
        /// The source QEMU's QMP socket.
        #[arg(long)]
        qmp: PathBuf,
        /// The uid QEMU runs as: the process behind --qmp must run as it (SO_PEERCRED).
        /// Default: the owner of the socket's directory, or our own uid.
        #[arg(long)]
        qmp_uid: Option<u32>,
        /// Snapshot directory to create (built as DIR.partial, renamed when whole).
        #[arg(long)]
        out: PathBuf,
        /// Give up after this many seconds (the VM keeps running).
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// precopy: the VM pauses only for the final pass (the snapshot is its state
        /// then); background: QEMU's background-snapshot, the VM pauses only while device
        /// state is saved (the snapshot is its state at the start).
        #[arg(long, default_value = "precopy")]
        mode: postcopy_sidecar::snapshot::take::SnapshotMode,
        /// Leave the VM paused at the snapshot's point (to move it, not checkpoint it).
        #[arg(long)]
        stop_after: bool,
    },
    /// Restore a snapshot lazily into fresh destination QEMUs (`-incoming defer`): each VM
    /// runs once its device state loads and RAM arrives on demand. Repeat --qmp for clones.
    Restore {
        /// The snapshot directory.
        #[arg(long)]
        from: PathBuf,
        /// A destination QEMU's QMP socket; repeat to restore clones concurrently.
        #[arg(long, required = true)]
        qmp: Vec<PathBuf>,
        /// The uid the destination QEMUs run as (SO_PEERCRED). Default: the owner of each
        /// socket's directory, or our own uid.
        #[arg(long)]
        qmp_uid: Option<u32>,
        /// Write one JSON report per destination into this directory (restore-N.json).
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Read and check every stored page before sending anything (costs one full read).
        #[arg(long)]
        verify_pages: bool,
        /// A destination guest's console log (e.g. QEMU `-serial file:PATH`), one per
        /// --qmp in the same order: the report gives the time to its first progress line.
        #[arg(long)]
        guest_log: Vec<PathBuf>,
        /// Text that marks a progress line in --guest-log.
        #[arg(long, default_value = postcopy_sidecar::restore::progress::DEFAULT_MARKER)]
        progress_marker: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600.0)]
        timeout: f64,
        /// Neither stream the snapshot's recorded working set first nor record one (by
        /// default the first restore records the pages its guest asks for, in order, into
        /// the snapshot directory, and later restores send them ahead of the sweep).
        #[arg(long)]
        no_working_set: bool,
        /// Most MiB per second of pages the background sweep sends to each destination
        /// (pages nobody asked for yet), so clones restored from one store at once leave
        /// it bandwidth for their faults; requested pages and the recorded working set
        /// always go at once. Default: no limit.
        #[arg(long, value_name = "MIB_PER_S", value_parser = parse_sweep_rate)]
        sweep_rate: Option<u64>,
    },
    /// libvirt integration: the qemu hook that runs the sidecar for incoming migrations,
    /// and its installer (deploy/README.md).
    LibvirtHook(postcopy_sidecar::deploy::libvirt::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match cli.command {
        Cmd::Inspect {
            stream,
            return_path,
            preempt,
            multifd,
            json,
        } => run_inspect(stream, return_path, preempt, multifd, json),
        Cmd::Receive(args) => run_receive(*args),
        Cmd::Demo {
            ram_mib,
            workload_mib,
            preempt,
        } => {
            use std::io::IsTerminal;
            let opts = postcopy_sidecar::demo::DemoOptions {
                ram_mib,
                workload_mib,
                preempt,
                live: std::io::stderr().is_terminal(),
            };
            runtime().block_on(async move {
                match postcopy_sidecar::demo::demo(opts).await {
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Cmd::Send {
            qmp,
            to,
            postcopy_after,
            preempt,
            multifd,
            timeout,
        } => {
            let opts = SendOptions {
                qmp,
                to,
                postcopy_after: postcopy_after.map(std::time::Duration::from_secs_f64),
                preempt,
                multifd,
                timeout: std::time::Duration::from_secs_f64(timeout),
            };
            runtime().block_on(async move {
                match send(&opts).await {
                    Ok(r) => {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&r).expect("report serialises")
                        );
                        if r.status == "completed" {
                            ExitCode::SUCCESS
                        } else {
                            eprintln!("error: migration ended in state {}", r.status);
                            ExitCode::from(1)
                        }
                    }
                    Err(e) => {
                        eprintln!("error: source QMP: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Cmd::Snapshot {
            qmp,
            qmp_uid,
            out,
            timeout,
            mode,
            stop_after,
        } => run_snapshot(postcopy_sidecar::snapshot::take::SnapshotOptions {
            qmp,
            qmp_uid,
            out,
            timeout: std::time::Duration::from_secs_f64(timeout),
            mode,
            stop_after,
        }),
        Cmd::Verify {
            qmp,
            qmp_uid,
            digests,
            allow_running,
            json,
        } => run_verify(
            VerifyOptions {
                qmp,
                qmp_uid,
                digests,
                allow_running,
            },
            json,
        ),
        Cmd::Restore {
            from,
            qmp,
            qmp_uid,
            report_dir,
            verify_pages,
            guest_log,
            progress_marker,
            timeout,
            no_working_set,
            sweep_rate,
        } => run_restore(RestoreArgs {
            from,
            qmp,
            qmp_uid,
            report_dir,
            verify_pages,
            guest_log,
            progress_marker,
            timeout,
            no_working_set,
            sweep_rate,
        }),
        Cmd::LibvirtHook(args) => postcopy_sidecar::deploy::libvirt::run(args),
    }
}

/// Arguments of `receive`.
#[derive(clap::Args)]
struct ReceiveArgs {
    /// The destination QEMU's QMP socket (QEMU started with -incoming defer).
    #[arg(long)]
    qmp: PathBuf,
    /// The uid the destination QEMU runs as: the process behind --qmp must run as it
    /// (SO_PEERCRED), else the sidecar refuses. Default: the owner of the socket's
    /// directory, or the sidecar's own uid.
    #[arg(long)]
    qmp_uid: Option<u32>,
    /// Address the source migrates to, e.g. 0.0.0.0:4444; with --follow-incoming an
    /// address alone (e.g. 192.0.2.7) takes the port the destination listens on.
    #[arg(long)]
    listen: Listen,
    /// The destination's manager (libvirt) sets its capabilities and issues
    /// migrate-incoming; the sidecar follows those settings and connects where it listens.
    #[arg(long)]
    follow_incoming: bool,
    /// Seconds to wait for the QMP socket and, with --follow-incoming, for the destination
    /// to listen.
    #[arg(long, default_value_t = 60.0)]
    attach_timeout: f64,
    /// Write this file (JSON) once the sidecar listens for the source.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Use the postcopy-preempt channel (enable it on the source too).
    #[arg(long)]
    preempt: bool,
    /// Keep the main stream's order: never send a requested page that is already queued
    /// ahead of the pages queued before it.
    #[arg(long)]
    no_requests_first: bool,
    /// Ask the source only for the faulting page, never for a window after it.
    #[arg(long)]
    no_prefetch: bool,
    /// Keep zero pages at their place in the stream instead of sending queued data pages
    /// before them.
    #[arg(long)]
    no_data_first: bool,
    /// Open the destination's postcopy-preempt channel from the sidecar and send requested
    /// pages there, ahead of the bulk on main, for a source WITHOUT preempt. Recovering the
    /// migration then needs a sidecar (this one, or one started with --recover).
    #[arg(long, conflicts_with_all = ["preempt", "no_requests_first", "follow_incoming"])]
    own_preempt: bool,
    /// The source migrates with multifd and this many channels: the sidecar turns multifd
    /// on at the destination and relays every channel, checking each packet. (Following a
    /// manager, the destination's own multifd settings decide.)
    #[arg(long, conflicts_with = "own_preempt")]
    multifd: Option<u8>,
    /// MiB of the main stream read ahead of the destination (at least 1).
    #[arg(long, default_value_t = 32)]
    read_ahead_mib: usize,
    /// No live view even on a terminal.
    #[arg(long)]
    quiet: bool,
    /// The destination was started with -S: do not require it to run at the end.
    #[arg(long)]
    allow_paused: bool,
    /// Read the destination's RAM through the sidecar's guarded mapping and check every
    /// postcopy page as QEMU places it; with a paused destination also compare all of its
    /// RAM at the end (a mismatch fails the run).
    #[arg(long)]
    verify: bool,
    /// Write the digests of every delivered page here, for `postcopy-sidecar verify`.
    #[arg(long)]
    digests: Option<PathBuf>,
    /// Serve Prometheus metrics (OpenMetrics text) on this address, e.g. 127.0.0.1:9184.
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Keep serving metrics this many seconds after the migration ended, so the last
    /// scrape sees its outcome.
    #[arg(long, default_value_t = 0.0)]
    metrics_linger: f64,
    /// What to do when the source link breaks in postcopy: `hold` keeps the destination's
    /// connections open (it never notices) and answers the resumed source's recovery
    /// handshake; `pass-through` lets the destination pause and relays QEMU's own recovery.
    /// Default: hold, or pass-through with --follow-incoming.
    #[arg(long, value_parser = parse_cut_policy)]
    on_cut: Option<CutPolicy>,
    /// Seconds of silence from the source in postcopy that count as a cut (TCP keepalive
    /// and TCP_USER_TIMEOUT on the source's sockets follow it).
    #[arg(long, default_value_t = 10.0)]
    silence: f64,
    /// Seconds to wait for the source's first connection.
    #[arg(long, default_value_t = 600.0)]
    accept_timeout: f64,
    /// Seconds to wait for a source that went away in postcopy; then the destination is
    /// released to QEMU's own postcopy-paused state (recoverable directly) and the
    /// sidecar exits 1.
    #[arg(long, default_value_t = 600.0)]
    away_timeout: f64,
    /// Write what a restarted sidecar needs to take this migration over (see --recover),
    /// once it reached postcopy.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Take over a migration paused in postcopy whose sidecar died: read --state-file,
    /// make the paused destination listen again (migrate-recover, out of band), and carry
    /// the source's resume (`migrate` with `resume: true` to --listen).
    #[arg(long, requires = "state_file")]
    recover: bool,
    /// Accept connections only from these addresses or prefixes (comma-separated, e.g.
    /// `192.0.2.10,10.1.0.0/16`); others are refused before a byte is read.
    #[arg(long, value_parser = AllowList::parse)]
    allow_from: Option<AllowList>,
    /// Seconds a new connection has to send its whole opening (header, configuration,
    /// RAM block list) before it is dropped.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// Require TLS from the source, with server credentials in this directory in QEMU's
    /// `tls-creds-x509` layout (ca-cert.pem, server-cert.pem, server-key.pem, optional
    /// ca-crl.pem). The source's client certificate must be signed by ca-cert.pem.
    #[arg(long)]
    tls_creds: Option<PathBuf>,
    /// Only a source whose certificate carries one of these names (repeatable; RFC 4514
    /// like QEMU's tls-authz: `CN=src.example.org,O=Example,C=GB`, any attribute order).
    #[arg(long, requires = "tls_creds", value_parser = DistinguishedName::parse)]
    tls_allow_name: Vec<DistinguishedName>,
    /// Accept a source without a client certificate (QEMU's verify-peer=off). Off by
    /// default: without it anyone who trusts the server certificate could connect.
    #[arg(long, requires = "tls_creds")]
    tls_no_verify_peer: bool,
    /// The host's QEMU TLS credentials (libvirt's migrate_tls_x509_cert_dir), used when
    /// the destination QEMU itself expects TLS (libvirt's --tls): the sidecar connects to
    /// it with client-cert.pem/client-key.pem from here.
    #[arg(long, default_value = postcopy_sidecar::daemon::tls::LIBVIRT_QEMU_CREDS)]
    destination_tls_creds: PathBuf,
    /// The name the destination's certificate must carry (default: the first name in
    /// server-cert.pem of --destination-tls-creds, the certificate a local QEMU presents).
    #[arg(long)]
    destination_tls_name: Option<String>,
}

fn parse_cut_policy(s: &str) -> Result<CutPolicy, String> {
    match s {
        "hold" => Ok(CutPolicy::Hold),
        "pass-through" => Ok(CutPolicy::PassThrough),
        other => Err(format!("{other:?}: expected hold or pass-through")),
    }
}

fn run_receive(a: ReceiveArgs) -> ExitCode {
    use std::io::IsTerminal;
    if !a.follow_incoming && matches!(a.listen, Listen::DestinationPort(_)) {
        eprintln!(
            "error: --listen {} needs a port (or --follow-incoming)",
            a.listen
        );
        return ExitCode::from(2);
    }
    let source = match &a.tls_creds {
        None => None,
        Some(dir) => match SourceTls::load(dir, !a.tls_no_verify_peer, a.tls_allow_name.clone()) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let opts = ReceiveOptions {
        incoming: if a.follow_incoming {
            Incoming::Follow
        } else {
            Incoming::Private
        },
        attach_timeout: std::time::Duration::from_secs_f64(a.attach_timeout),
        ready_file: a.ready_file,
        preempt: a.preempt,
        requests_first: !a.no_requests_first,
        prefetch: !a.no_prefetch,
        data_first: !a.no_data_first,
        own_preempt: a.own_preempt,
        multifd: a.multifd,
        read_ahead: a.read_ahead_mib.max(1) << 20,
        report: a.report,
        live: !a.quiet && std::io::stderr().is_terminal(),
        allow_paused: a.allow_paused,
        verify: a.verify,
        digests: a.digests,
        metrics: a.metrics.map(|_| Arc::new(Metrics::new())),
        on_cut: a.on_cut,
        silence: std::time::Duration::from_secs_f64(a.silence.max(1.0)),
        accept_timeout: std::time::Duration::from_secs_f64(a.accept_timeout),
        away_timeout: std::time::Duration::from_secs_f64(a.away_timeout.max(1.0)),
        state_file: a.state_file,
        takeover: a.recover,
        allow_from: a.allow_from,
        handshake_timeout: std::time::Duration::from_secs_f64(a.handshake_timeout.max(0.1)),
        tls: TlsOptions {
            source,
            host_creds: a.destination_tls_creds,
            destination_name: a.destination_tls_name,
        },
        qmp_uid: a.qmp_uid,
        ..ReceiveOptions::new(a.qmp, a.listen)
    };
    receive_runtime().block_on(async move {
        let mut server = None;
        if let (Some(addr), Some(m)) = (a.metrics, &opts.metrics) {
            use postcopy_sidecar::daemon::metrics_endpoint::{EndpointLimits, serve};
            match serve(addr, m.clone(), EndpointLimits::default()) {
                Ok(endpoint) => {
                    tracing::info!(bound = %endpoint.addr(), "serving metrics");
                    server = Some(endpoint);
                }
                Err(e) => {
                    eprintln!("error: serving metrics on {addr}: {e}");
                    return ExitCode::from(1);
                }
            }
        }
        let metrics = opts.metrics.clone();
        let outcome = receive(opts).await;
        if let (Err(_), Some(m)) = (&outcome, &metrics) {
            // No report: the migration failed before it began (QMP, destination checks).
            m.migration_ended("failed");
        }
        let code = match outcome {
            Ok(r) => {
                print!("{}", r.table());
                if let Some(v) = &r.verify {
                    for rep in v.at_placement.iter().chain(v.exact.iter()) {
                        for line in rep.lines() {
                            println!("{line}");
                        }
                    }
                    if !v.note.is_empty() {
                        println!("verify: {}", v.note);
                    }
                }
                match &r.error {
                    None => ExitCode::SUCCESS,
                    Some(e) => {
                        eprintln!("error: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        };
        // Said first, then lingered: the last scrape sees the outcome, people see it at once.
        if let Some(endpoint) = server {
            tokio::time::sleep(std::time::Duration::from_secs_f64(a.metrics_linger)).await;
            endpoint.abort();
        }
        code
    })
}

fn run_verify(opts: VerifyOptions, json: bool) -> ExitCode {
    use postcopy_sidecar::verify::command::verify;
    runtime().block_on(async move {
        match verify(&opts).await {
            Ok(r) => {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&r).expect("report serialises")
                    );
                } else {
                    for line in r.lines() {
                        println!("{line}");
                    }
                }
                if r.mismatches == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        }
    })
}

fn run_snapshot(opts: postcopy_sidecar::snapshot::take::SnapshotOptions) -> ExitCode {
    runtime().block_on(async move {
        match postcopy_sidecar::snapshot::take::snapshot(&opts).await {
            Ok(r) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("report serialises")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

/// `--sweep-rate`: MiB per second, more than zero, as bytes per second.
fn parse_sweep_rate(s: &str) -> Result<u64, String> {
    match s.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 && m <= 1e9 => Ok((m * (1u64 << 20) as f64) as u64),
        _ => Err(format!(
            "{s:?}: expected MiB per second, a number above 0 (e.g. 200)"
        )),
    }
}

/// The `restore` arguments, as parsed.
struct RestoreArgs {
    from: PathBuf,
    qmp: Vec<PathBuf>,
    qmp_uid: Option<u32>,
    report_dir: Option<PathBuf>,
    verify_pages: bool,
    guest_log: Vec<PathBuf>,
    progress_marker: String,
    timeout: f64,
    no_working_set: bool,
    sweep_rate: Option<u64>,
}

fn run_restore(args: RestoreArgs) -> ExitCode {
    use postcopy_sidecar::restore::progress::ProgressWatch;
    use postcopy_sidecar::restore::{RestoreOptions, Snapshot, restore_clones};
    let RestoreArgs {
        from,
        qmp,
        qmp_uid,
        report_dir,
        verify_pages,
        guest_log,
        progress_marker,
        timeout,
        no_working_set,
        sweep_rate,
    } = args;
    if !guest_log.is_empty() && guest_log.len() != qmp.len() {
        eprintln!(
            "error: {} --guest-log for {} --qmp: give one per destination, in the same order",
            guest_log.len(),
            qmp.len()
        );
        return ExitCode::from(2);
    }
    let snapshot = match Snapshot::open(&from, verify_pages) {
        Ok(s) => std::sync::Arc::new(s),
        Err(e) => {
            eprintln!("error: {} refused: {e}", from.display());
            return ExitCode::from(1);
        }
    };
    // The reports' directory: the sidecar's own, 0700 when it makes it.
    if let Some(d) = &report_dir
        && let Err(e) = postcopy_sidecar::owned_dir::ensure(d, 0o700)
    {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let opts = qmp
        .into_iter()
        .enumerate()
        .map(|(i, qmp)| RestoreOptions {
            qmp,
            qmp_uid,
            report: report_dir
                .as_ref()
                .map(|d| d.join(format!("restore-{i}.json"))),
            timeout: std::time::Duration::from_secs_f64(timeout),
            progress: guest_log.get(i).map(|log| ProgressWatch {
                log: log.clone(),
                marker: progress_marker.clone(),
            }),
            working_set: !no_working_set,
            sweep_rate,
        })
        .collect();
    runtime().block_on(async move {
        let reports = restore_clones(snapshot, opts).await;
        println!(
            "{}",
            serde_json::to_string_pretty(&reports).expect("reports serialise")
        );
        let mut code = ExitCode::SUCCESS;
        for r in &reports {
            if let Some(e) = &r.error {
                eprintln!("error: {}: {e}", r.destination.display());
                code = ExitCode::from(1);
            }
        }
        code
    })
}

/// The receiver's runtime: one thread. Its pumps take turns on one session anyway, and
/// on a host whose cores the two QEMUs need, a second worker only adds cross-thread
/// wake-ups: measured (`BENCH_MODES=direct,sidecar,sidecar-mt`, 5 rounds), two workers
/// took 173 ms of CPU per migration against 146 ms, and left the guest blocked 424 ms
/// against 375 ms. Nothing in it blocks its thread while a migration runs: the guard's
/// fault handling has a thread of its own, and the guarded reads of `--verify` come after
/// the migration completed. (One thread widened libvirt 9.0's resume race until the
/// destination was connected beside the judging of the resume:
/// protocol-spec/postcopy-sequence.md#sequence-early-destination.)
fn receive_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn run_inspect(
    stream: PathBuf,
    rp: Option<PathBuf>,
    preempt: Vec<PathBuf>,
    multifd: Vec<PathBuf>,
    json: bool,
) -> ExitCode {
    let read = |p: &PathBuf| inspect::read_capture(p);
    let loaded = (|| {
        let main = read(&stream)?;
        let rp = rp.as_ref().map(read).transpose()?;
        let pre = preempt.iter().map(read).collect::<Result<Vec<_>, _>>()?;
        let mf = multifd.iter().map(read).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, inspect::ReadCaptureError>((main, rp, pre, mf))
    })();
    let (main, rp, pre, mf) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let report = inspect::inspect(&main, rp.as_deref(), &pre, &mf);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.summary).expect("summary serialises")
        );
    } else {
        for line in &report.timeline {
            println!("{line}");
        }
        let s = &report.summary;
        println!(
            "summary: {} bytes, {} pages, {} zero pages, {} opaque bytes, commands {:?}",
            s.stream_bytes, s.ram.pages, s.ram.zero_pages, s.opaque_bytes, s.commands
        );
    }
    match &report.summary.error {
        None => ExitCode::SUCCESS,
        Some(e) => {
            eprintln!("error: {} at offset {}: {}", e.channel, e.offset, e.message);
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_sweep_rate;

    #[test]
    fn a_sweep_rate_is_mib_per_second_above_zero() {
        assert_eq!(parse_sweep_rate("200"), Ok(200 << 20));
        assert_eq!(parse_sweep_rate("0.5"), Ok(512 << 10));
        for bad in ["0", "-3", "NaN", "inf", "fast", ""] {
            let e = parse_sweep_rate(bad).expect_err(bad);
            assert!(e.contains("MiB per second"), "{bad}: {e}");
        }
    }
}
