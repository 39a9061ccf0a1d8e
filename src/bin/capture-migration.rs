//! `capture-migration`: runs two real QEMUs on loopback, migrates one to the other through
//! a logging relay (`postcopy_sidecar::capture`), and saves every channel in each direction,
//! gzip-compressed, with a `meta.json` describing the run. The committed captures under
//! `protocol-spec/captures/` are made with it (`scripts/make-captures.sh`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use postcopy_sidecar::capture::LoggingRelay;
use postcopy_sidecar::lab::{QemuBinary, QemuVersion, Vm, VmSpec, Workload, WorkloadMode};

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum Mode {
    Precopy,
    Postcopy,
    Preempt,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
enum GuestKind {
    /// Firmware only: the VM idles in SeaBIOS.
    Idle,
    /// Our Linux guest running the memory workload.
    Linux,
}

/// Capture a real migration between two QEMUs on loopback.
#[derive(Parser, Debug)]
struct Args {
    /// Directory to write the capture into (created).
    #[arg(long)]
    out: PathBuf,
    /// Source QEMU version: 10.0, 7.2 or 11.1.
    #[arg(long, default_value = "10.0")]
    src: String,
    /// Destination QEMU version: 10.0, 7.2 or 11.1.
    #[arg(long, default_value = "10.0")]
    dst: String,
    /// Machine type (needed across versions, e.g. pc-q35-7.2).
    #[arg(long)]
    machine: Option<String>,
    /// Migration mode.
    #[arg(long, value_enum)]
    mode: Mode,
    /// What runs in the VM.
    #[arg(long, value_enum)]
    guest: GuestKind,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 128)]
    ram_mib: u64,
    /// Memory the Linux guest's workload fills, MiB.
    #[arg(long, default_value_t = 24)]
    workload_mib: u64,
    /// Switch to postcopy this long after `migrate`.
    #[arg(long, default_value_t = 300)]
    postcopy_after_ms: u64,
    /// Migrate with multifd and this many channels (uncompressed).
    #[arg(long)]
    multifd: Option<u8>,
}

fn version(s: &str) -> QemuVersion {
    match s {
        "7.2" => QemuVersion::V7_2,
        "11.1" => QemuVersion::V11_1,
        "10.0" => QemuVersion::V10_0,
        other => panic!("unknown QEMU version {other} (use 7.2, 10.0 or 11.1)"),
    }
}

fn gzip(path: &Path) -> std::io::Result<()> {
    let data = std::fs::read(path)?;
    let out = std::fs::File::create(path.with_extension(format!(
        "{}.gz",
        path.extension().unwrap_or_default().to_string_lossy()
    )))?;
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::best());
    gz.write_all(&data)?;
    gz.finish()?;
    std::fs::remove_file(path)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out).expect("output directory");
    let work = tempfile::tempdir().expect("work dir");
    let (sv, dv) = (version(&a.src), version(&a.dst));
    let mut spec = VmSpec::new(QemuBinary::find(sv).expect("source QEMU"))
        .name("cap-src")
        .ram_mib(a.ram_mib);
    if let Some(m) = &a.machine {
        spec = spec.machine(m.clone());
    }
    spec = match a.guest {
        GuestKind::Idle => spec.firmware_only(),
        GuestKind::Linux => spec.linux(Workload {
            mib: a.workload_mib,
            mode: WorkloadMode::Hot,
            hot_mib: 4,
            seed: 1,
        }),
    };
    let src = Vm::spawn(&spec, work.path()).await.expect("source VM");
    if a.guest == GuestKind::Linux {
        src.wait_workload_ready(Duration::from_secs(300))
            .await
            .expect("guest ready");
        src.wait_progress(src.serial().len(), 1, Duration::from_secs(120))
            .await
            .expect("guest progress");
    }
    let dst = Vm::spawn(
        &spec.destination(QemuBinary::find(dv).expect("destination QEMU")),
        work.path(),
    )
    .await
    .expect("destination VM");

    let mut caps = vec![("return-path", true), ("events", true)];
    if a.mode != Mode::Precopy {
        caps.push(("postcopy-ram", true));
    }
    if a.mode == Mode::Preempt {
        caps.push(("postcopy-preempt", true));
    }
    if let Some(n) = a.multifd {
        caps.push(("multifd", true));
        for vm in [&src, &dst] {
            vm.qmp()
                .set_parameters(serde_json::json!({ "multifd-channels": n }))
                .await
                .expect("multifd-channels");
        }
    }
    src.qmp()
        .set_capabilities(&caps)
        .await
        .expect("source capabilities");
    dst.qmp()
        .set_capabilities(&caps)
        .await
        .expect("destination capabilities");
    let port = postcopy_sidecar::lab::free_tcp_port().expect("port");
    let dest_addr = format!("127.0.0.1:{port}").parse().unwrap();
    dst.qmp()
        .migrate_incoming(&format!("tcp:{dest_addr}"))
        .await
        .expect("migrate-incoming");
    let relay = LoggingRelay::start(dest_addr, a.out.clone())
        .await
        .expect("relay");
    src.qmp()
        .migrate_to(&format!("tcp:{}", relay.addr))
        .await
        .expect("migrate");
    if a.mode != Mode::Precopy {
        // A chosen point in the run, not a synchronisation: the switch may happen any time.
        tokio::time::sleep(Duration::from_millis(a.postcopy_after_ms)).await;
        src.qmp()
            .start_postcopy()
            .await
            .expect("migrate-start-postcopy");
    }
    let limit = Duration::from_secs(300);
    let s = src
        .qmp()
        .wait_migration_end(limit)
        .await
        .expect("source end");
    let d = dst
        .qmp()
        .wait_migration_end(limit)
        .await
        .expect("destination end");
    assert_eq!((s.as_str(), d.as_str()), ("completed", "completed"));
    let channels = tokio::time::timeout(limit, relay.wait())
        .await
        .expect("channels close")
        .expect("relay");
    let info = src.qmp().query_migrate_json().await.expect("query-migrate");
    let (smaj, smin, smic) = src.qmp().version().await.unwrap();
    let (dmaj, dmin, dmic) = dst.qmp().version().await.unwrap();
    let machine = src.qmp().machine_type().await.unwrap();
    drop((src, dst));

    postcopy_sidecar::capture::name_multifd_files(&a.out).expect("naming multifd channels");
    for entry in std::fs::read_dir(&a.out).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".fwd") || name.ends_with(".rp") {
            let empty = std::fs::metadata(&p).unwrap().len() == 0;
            if empty && name.ends_with(".rp") && name != "return-path.rp" {
                std::fs::remove_file(&p).unwrap();
            } else {
                gzip(&p).expect("gzip");
            }
        }
    }
    let meta = serde_json::json!({
        "tool": "capture-migration",
        "source_qemu": format!("{smaj}.{smin}.{smic}"),
        "destination_qemu": format!("{dmaj}.{dmin}.{dmic}"),
        "machine": machine,
        "mode": format!("{:?}", a.mode).to_lowercase(),
        "guest": format!("{:?}", a.guest).to_lowercase(),
        "ram_mib": a.ram_mib,
        "workload_mib": if a.guest == GuestKind::Linux { Some(a.workload_mib) } else { None },
        "capabilities": caps.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        "channels": channels,
        "block_page_sizes": {},
        "source_query_migrate": info,
    });
    std::fs::write(
        a.out.join("meta.json"),
        serde_json::to_vec_pretty(&meta).unwrap(),
    )
    .unwrap();
    println!("wrote {} ({channels} connections)", a.out.display());
}
