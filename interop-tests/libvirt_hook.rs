//! The libvirt hook against Debian's real libvirtd (9.0) and QEMU 10.0: two libvirt "hosts"
//! on this machine (support/libvirt.rs), stock `virsh`, and the hook installed by
//! `postcopy-sidecar libvirt-hook install` into each host's private SYSCONFDIR.
//!
//! What one machine cannot do as two hosts would, and what the tests do instead:
//! - two kernels: two libvirtds in their own mount namespaces, with their own host UUIDs;
//! - the destination's public address for the sidecar next to QEMU on loopback: the
//!   sidecar listens on 127.0.0.2 and QEMU on 127.0.0.1 (`--listen-address 127.0.0.1`);
//! - separate file systems: the destination gets its own serial-log path through `virsh
//!   migrate --xml` (both QEMUs would otherwise write one file);
//! - the host-wide `vm.unprivileged_userfaultfd=1` postcopy needs for libvirt's unprivileged
//!   QEMU: the hosts that migrate with postcopy run QEMU as root in their private qemu.conf.
//!
//! They need `scripts/setup.sh` (libvirt, QEMU, the guest kernel and initramfs, systemd's
//! `systemd-analyze`); without it they fail, never skip.

#[path = "support/certs.rs"]
mod certs;
#[path = "support/libvirt.rs"]
mod libvirt;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libvirt::{LibvirtHost, QemuUser, wait_for};
use postcopy_sidecar::deploy::libvirt::xml::MEMFD_XML;
use postcopy_sidecar::lab::link::Link;
use postcopy_sidecar::lab::{GuestImage, WlLine, Workload, WorkloadMode, parse_wl_line};
use postcopy_sidecar::qmp::Qmp;

const BIN: &str = env!("CARGO_BIN_EXE_postcopy-sidecar");
const HOST_A: &str = "11111111-2222-3333-4444-00000000000a";
const HOST_B: &str = "11111111-2222-3333-4444-00000000000b";

/// A test directory that QEMU running as libvirt-qemu can traverse.
fn test_dir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// A firmware-only q35 guest (no kernel: it idles in the BIOS), `memfd` choosing its RAM.
fn firmware_domain(name: &str, memfd: bool, extra: &str) -> String {
    let mb = if memfd { MEMFD_XML } else { "" };
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>96</memory>
  {mb}
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices><memballoon model='none'/></devices>
  {extra}
</domain>
"
    )
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn reports(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|x| x == "json"));
    v.sort();
    v
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The hook fires at each event of a real domain's life, and for a domain whose XML
/// carries the sidecar's monitor (as one that arrived through a sidecar does) it makes the
/// monitor's directory for QEMU, which runs as libvirt's unprivileged user here: QEMU
/// creates the socket there and it answers QMP. A plain start launches no sidecar.
#[test]
fn hook_follows_a_real_domains_lifecycle() {
    let dir = test_dir("lv-life-");
    let mut a = LibvirtHost::prepare(&dir.path().join("a"), "a", HOST_A, QemuUser::Default);
    a.install_sidecar_hook("listen = \"127.0.0.2\"\ndomains = [\"lc\"]\n", false);
    let calls = a.record_hook_calls();
    a.start();

    // The domain as the migrate hook would have handed it to libvirt.
    let plain = dir.path().join("lc-plain.xml");
    std::fs::write(&plain, firmware_domain("lc", true, "")).unwrap();
    let cfg = a.sysconf.join("postcopy-sidecar/libvirt-hook.toml");
    let out = std::process::Command::new(BIN)
        .args(["libvirt-hook", "--config"])
        .arg(&cfg)
        .arg("check-xml")
        .arg(&plain)
        .output()
        .unwrap();
    assert!(out.status.success(), "check-xml: {}", stderr(&out));
    let with_monitor = dir.path().join("lc.xml");
    std::fs::write(&with_monitor, &out.stdout).unwrap();

    a.virsh_ok(&["create", with_monitor.to_str().unwrap()]);
    let expect_start = [
        "lc prepare begin -",
        "lc start begin -",
        "lc started begin -",
    ];
    wait_for("the start events", Duration::from_secs(60), || {
        (lines(&calls).len() >= 3).then_some(())
    });
    assert_eq!(lines(&calls), expect_start);

    let qemu_dir = a.sidecar_run_dir().join("lc/qemu");
    let sock = qemu_dir.join("qmp.sock");
    let pid = a.qemu_pid("lc").expect("QEMU pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        !uid_line.split_whitespace().nth(1).unwrap().eq("0"),
        "QEMU should run unprivileged here: {uid_line}"
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&qemu_dir).unwrap();
    assert_eq!(
        (meta.uid().to_string(), meta.mode() & 0o777),
        (
            uid_line.split_whitespace().nth(1).unwrap().to_string(),
            0o770
        ),
        "the monitor directory belongs to QEMU's user"
    );
    // QEMU created its monitor there and it speaks QMP.
    let greeting = {
        use std::io::BufRead;
        let s = wait_for("the monitor socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        });
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    assert!(greeting.contains("\"QMP\""), "{greeting}");
    assert!(
        reports(&a.report_dir()).is_empty(),
        "a plain start must not launch a sidecar"
    );

    a.virsh_ok(&["destroy", "lc"]);
    wait_for("the stop events", Duration::from_secs(60), || {
        (lines(&calls).len() >= 5).then_some(())
    });
    assert_eq!(lines(&calls)[3..], ["lc stopped end -", "lc release end -"]);
    assert!(
        !a.sidecar_run_dir().join("lc").exists(),
        "release cleans up"
    );

    // A domain whose XML names the sidecar's monitor outside the hook's run directory:
    // the start hook refuses it (libvirt does not start it) and touches nothing there.
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let own = a.sidecar_run_dir().join("lc/qemu/qmp.sock");
    let xml = std::fs::read_to_string(&with_monitor).unwrap();
    assert!(xml.contains(own.to_str().unwrap()), "{xml}");
    let foreign = dir.path().join("lx.xml");
    std::fs::write(
        &foreign,
        xml.replace(
            own.to_str().unwrap(),
            elsewhere.join("qmp.sock").to_str().unwrap(),
        )
        .replace("<name>lc</name>", "<name>lx</name>"),
    )
    .unwrap();
    let o = a.virsh(&["create", foreign.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "a foreign monitor path must fail the start"
    );
    assert!(
        stderr(&o).contains(&format!(
            "domain 'lx' names the sidecar's monitor socket {}",
            elsewhere.join("qmp.sock").display()
        )),
        "virsh said: {}",
        stderr(&o)
    );
    assert!(!a.running().contains(&"lx".to_string()));
    let meta = std::fs::metadata(&elsewhere).unwrap();
    assert_eq!(
        (
            meta.uid(),
            meta.mode() & 0o777,
            std::fs::read_dir(&elsewhere).unwrap().count()
        ),
        (0, 0o755, 0),
        "the foreign directory is left as it was"
    );
}

/// Real `virsh migrate` attempts that the hooks must stop, with the documented message,
/// the source keeping the domain: a domain without memfd RAM (the `migrate` hook), and a
/// sidecar that cannot listen, on an address not on this host or on a port the
/// destination QEMU holds on the wildcard address (the `started` hook, which holds the
/// source back until the sidecar is ready). Then the same domain, its marker fixed with
/// `virsh metadata`, goes through the sidecar in precopy (no postcopy asked) and the
/// report says so.
#[test]
fn hooks_refuse_bad_migrations_with_clear_messages_then_carry_one() {
    let dir = test_dir("lv-fail-");
    let mut a = LibvirtHost::prepare(&dir.path().join("a"), "a", HOST_A, QemuUser::Root);
    let mut b = LibvirtHost::prepare(&dir.path().join("b"), "b", HOST_B, QemuUser::Root);
    // As a drop-in, after the recorder: a failing hook ends libvirt's chain.
    b.install_sidecar_hook("listen = \"127.0.0.2\"\n", true);
    let calls = b.record_hook_calls();
    a.start();
    let set_marker = |dom: &str, xml: &str| {
        a.virsh_ok(&[
            "metadata",
            dom,
            "urn:postcopy-sidecar:1",
            "--key",
            "ps",
            "--set",
            xml,
            "--live",
        ]);
    };

    // 1. Private RAM: the migrate hook refuses, saying which XML to add.
    let p = dir.path().join("private.xml");
    std::fs::write(&p, firmware_domain("private", false, "")).unwrap();
    a.virsh_ok(&["create", p.to_str().unwrap()]);
    set_marker("private", "<sidecar/>");
    let m = dir.path().join("memfd.xml");
    std::fs::write(&m, firmware_domain("memfd", true, "")).unwrap();
    a.virsh_ok(&["create", m.to_str().unwrap()]);
    b.seed_capabilities_from(&a);
    b.start();
    let migrate = |dom: &str, port: u16| {
        a.virsh(&[
            "migrate",
            "--live",
            dom,
            &b.uri,
            "--migrateuri",
            &format!("tcp://127.0.0.2:{port}"),
            "--listen-address",
            "127.0.0.1",
        ])
    };
    let o = migrate("private", free_port());
    assert!(!o.status.success());
    let msg = format!(
        "guest RAM of domain 'private' is not in a shared memfd (no <memoryBacking><source>, \
         access private); postcopy through the sidecar needs {MEMFD_XML} in the domain XML: add \
         it on the source (virsh edit private) and restart the domain there, then migrate"
    );
    assert!(stderr(&o).contains(&msg), "virsh said: {}", stderr(&o));
    assert_eq!(lines(&calls), ["private migrate begin -"]);
    assert!(a.running().contains(&"private".to_string()));
    assert!(b.running().is_empty());

    // 2. A listen address the sidecar cannot bind: the started hook fails the migration
    // with the sidecar's own error, and a report records it.
    set_marker("memfd", "<sidecar listen='192.0.2.1'/>");
    let port = free_port();
    let o = migrate("memfd", port);
    assert!(!o.status.success());
    let want = format!(
        "the sidecar for domain 'memfd' did not become ready: it exited: listening on \
         192.0.2.1:{port}: Cannot assign requested address"
    );
    assert!(stderr(&o).contains(&want), "virsh said: {}", stderr(&o));
    assert!(a.running().contains(&"memfd".to_string()));
    let r = reports(&b.report_dir());
    assert_eq!(r.len(), 1, "{r:?}");
    let failed = json(&r[0]);
    assert_eq!(failed["outcome"], "failed");
    assert!(failed["error"].as_str().unwrap().contains(&want));
    // libvirt then stops the half-made destination: the hook cleans up after it.
    wait_for("the destination's release", Duration::from_secs(60), || {
        lines(&calls)
            .contains(&"memfd release end -".to_string())
            .then_some(())
    });

    // 3. Marker fixed, but QEMU left on libvirt's default wildcard listen address (no
    // --listen-address): the sidecar cannot take the port, and says how to fix it.
    set_marker("memfd", "<sidecar/>");
    let port = free_port();
    let o = a.virsh(&[
        "migrate",
        "--live",
        "memfd",
        &b.uri,
        "--migrateuri",
        &format!("tcp://127.0.0.2:{port}"),
    ]);
    assert!(!o.status.success());
    let want = format!(
        "did not become ready: it exited: cannot listen on 127.0.0.2:{port}: the address is in use"
    );
    assert!(stderr(&o).contains(&want), "virsh said: {}", stderr(&o));
    assert!(
        stderr(&o).contains("--listen-address 127.0.0.1"),
        "{}",
        stderr(&o)
    );
    wait_for(
        "the destination's second release",
        Duration::from_secs(60),
        || {
            (lines(&calls)
                .iter()
                .filter(|l| *l == "memfd release end -")
                .count()
                == 2)
                .then_some(())
        },
    );

    // 4. Both fixed: the migration goes through the sidecar (precopy only).
    let o = migrate("memfd", free_port());
    assert!(o.status.success(), "virsh migrate: {}", stderr(&o));
    assert_eq!(b.running(), ["memfd"]);
    let r = reports(&b.report_dir());
    assert_eq!(
        r.len(),
        3,
        "one report per attempt that launched a sidecar: {r:?}"
    );
    let ok = r
        .iter()
        .map(|p| json(p))
        .find(|j| j["outcome"] == "completed");
    let ok = ok.unwrap_or_else(|| panic!("no completed report among {r:?}"));
    assert_eq!(ok["postcopy"]["pages"], 0);
    assert_eq!(ok["destination"]["migration_status"], "completed");
    assert!(ok["precopy"]["pages"].as_u64().unwrap() > 0);
}

fn free_port() -> u16 {
    postcopy_sidecar::lab::free_tcp_port().unwrap()
}

/// Two libvirt hosts with the hook on `b`, and the Linux guest `t1` running on `a` with
/// the workload verifying its memory.
struct LinuxPair {
    a: LibvirtHost,
    b: LibvirtHost,
    calls_a: PathBuf,
    calls_b: PathBuf,
    serial_b: PathBuf,
    dest_xml: PathBuf,
    booted: Duration,
    _dir: tempfile::TempDir,
}

fn wl_lines(p: &Path) -> Vec<WlLine> {
    lines(p).iter().filter_map(|l| parse_wl_line(l)).collect()
}

fn linux_pair(prefix: &str, hook_config: &str) -> LinuxPair {
    linux_pair_with(prefix, |_| (hook_config.to_string(), String::new()))
}

/// Like [`linux_pair`]; `setup` gets the test directory before anything starts and
/// returns the hook's configuration and text for both hosts' qemu.conf.
fn linux_pair_with(prefix: &str, setup: impl FnOnce(&Path) -> (String, String)) -> LinuxPair {
    let t0 = Instant::now();
    let img = GuestImage::find().unwrap_or_else(|e| panic!("{e}"));
    let dir = test_dir(prefix);
    let (hook_config, qemu_conf) = setup(dir.path());
    let mut a = LibvirtHost::prepare(&dir.path().join("a"), "a", HOST_A, QemuUser::Root);
    let mut b = LibvirtHost::prepare(&dir.path().join("b"), "b", HOST_B, QemuUser::Root);
    for h in [&a, &b] {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(h.sysconf.join("libvirt/qemu.conf"))
            .unwrap()
            .write_all(qemu_conf.as_bytes())
            .unwrap();
    }
    b.install_sidecar_hook(&hook_config, false);
    let calls_a = a.record_hook_calls();
    let calls_b = b.record_hook_calls();
    a.start();

    let wl = Workload {
        mib: 96,
        mode: WorkloadMode::Hot,
        hot_mib: 32,
        seed: 7,
    };
    let serial_a = a.root.join("t1.serial");
    let serial_b = b.root.join("t1.serial");
    let xml = format!(
        "<domain type='qemu'>
  <name>t1</name>
  <memory unit='MiB'>256</memory>
  {MEMFD_XML}
  <metadata><ps:sidecar xmlns:ps='urn:postcopy-sidecar:1'/></metadata>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{}</kernel>
    <initrd>{}</initrd>
    <cmdline>console=ttyS0 panic=-1 loglevel=4 {}</cmdline>
  </os>
  <features><acpi/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='file'><source path='{}'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
        img.kernel.display(),
        img.initramfs.display(),
        wl.cmdline(),
        serial_a.display()
    );
    let src_xml = dir.path().join("t1.xml");
    std::fs::write(&src_xml, xml).unwrap();
    a.virsh_ok(&["create", src_xml.to_str().unwrap()]);
    b.seed_capabilities_from(&a);
    b.start();
    wait_for(
        "the guest on the source to verify its memory",
        Duration::from_secs(180),
        || {
            wl_lines(&serial_a)
                .iter()
                .any(|l| matches!(l, WlLine::Progress(_)))
                .then_some(())
        },
    );

    // The destination's XML: the source's, with the serial log on the "other host".
    let dest_xml = dir.path().join("t1-dest.xml");
    let migratable = a.virsh_ok(&["dumpxml", "--migratable", "t1"]);
    let src_path = serial_a.display().to_string();
    assert!(migratable.contains(&src_path));
    std::fs::write(
        &dest_xml,
        migratable.replace(&src_path, &serial_b.display().to_string()),
    )
    .unwrap();
    LinuxPair {
        a,
        b,
        calls_a,
        calls_b,
        serial_b,
        dest_xml,
        booted: t0.elapsed(),
        _dir: dir,
    }
}

/// `t1`'s migration status as its QEMU reports it (through libvirt's passthrough, which
/// works during a migration job).
fn migration_status(h: &LibvirtHost) -> String {
    let o = h.virsh(&[
        "qemu-monitor-command",
        "t1",
        r#"{"execute":"query-migrate"}"#,
    ]);
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .ok()
        .and_then(|v| v["return"]["status"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("? {}", stderr(&o)))
}

/// Every log the hook's sidecars wrote on `host`.
fn sidecar_logs(host: &LibvirtHost) -> String {
    std::fs::read_dir(host.report_dir())
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_default()
}

impl LinuxPair {
    /// The guest on the destination: fresh progress lines and a full verification sweep,
    /// all clean.
    fn assert_guest_healthy(&self) {
        let healthy = wait_for(
            "the guest on the destination to sweep its memory",
            Duration::from_secs(120),
            || {
                let l = wl_lines(&self.serial_b);
                let progress = l
                    .iter()
                    .filter(|x| matches!(x, WlLine::Progress(_)))
                    .count();
                let swept = l.iter().any(|x| matches!(x, WlLine::Sweep { .. }));
                (progress >= 3 && swept).then_some(l)
            },
        );
        for l in &healthy {
            match l {
                WlLine::Progress(p) => assert_eq!(p.mismatches, 0, "{p:?}"),
                WlLine::Sweep { mismatches } => assert_eq!(*mismatches, 0),
                WlLine::Mismatch(m) => panic!("WL mismatch on the destination: {m:?}"),
                WlLine::Fatal(f) => panic!("WL fatal on the destination: {f}"),
                _ => {}
            }
        }
    }

    /// The sidecar's one report, once written.
    fn report(&self) -> serde_json::Value {
        let r = wait_for("the sidecar's report", Duration::from_secs(60), || {
            let r = reports(&self.b.report_dir());
            (r.len() == 1).then(|| r[0].clone())
        });
        let report = json(&r);
        eprintln!("{}", serde_json::to_string_pretty(&report).unwrap());
        report
    }
}

/// A Linux guest migrated by stock `virsh migrate --live --postcopy
/// --postcopy-after-precopy` between two libvirtds on this machine, through the sidecar the
/// destination's hook launched: the report says completed with postcopy pages, and the
/// guest keeps running on the destination with every page it verifies intact.
#[test]
fn virsh_postcopy_goes_through_the_hooks_sidecar_two_libvirtds_on_one_machine() {
    let t0 = Instant::now();
    let p = linux_pair("lv-pc-", "listen = \"127.0.0.2\"\n");
    let port = free_port();
    let t_mig = Instant::now();
    // --bandwidth holds the first precopy pass below the guest's dirty rate, so the
    // migration cannot converge in precopy and libvirt switches to postcopy after it.
    let o = p.a.virsh(&[
        "migrate",
        "--live",
        "--postcopy",
        "--postcopy-after-precopy",
        "t1",
        &p.b.uri,
        "--migrateuri",
        &format!("tcp://127.0.0.2:{port}"),
        "--listen-address",
        "127.0.0.1",
        "--xml",
        p.dest_xml.to_str().unwrap(),
        "--bandwidth",
        "50",
        "--verbose",
    ]);
    let migration = t_mig.elapsed();
    assert!(
        o.status.success(),
        "virsh migrate: {}\nhook calls on b: {:?}",
        stderr(&o),
        lines(&p.calls_b)
    );
    assert_eq!(
        lines(&p.calls_b)[..4],
        [
            "t1 migrate begin -",
            "t1 prepare begin -",
            "t1 start begin -",
            "t1 started begin -"
        ]
    );
    assert!(p.a.running().is_empty(), "the source no longer runs t1");
    assert_eq!(p.b.virsh_ok(&["domstate", "t1"]).trim(), "running");

    let report = p.report();
    assert_eq!(report["outcome"], "completed", "{:?}", report["error"]);
    assert!(
        report["postcopy"]["pages"].as_u64().unwrap() > 0,
        "the migration went through postcopy"
    );
    assert_eq!(report["destination"]["migration_status"], "completed");
    assert_eq!(report["destination"]["running"], true);
    p.assert_guest_healthy();
    // The source's hook saw its domain leave.
    wait_for("the source's stop events", Duration::from_secs(60), || {
        let c = lines(&p.calls_a);
        (c.contains(&"t1 stopped end -".to_string()) && c.contains(&"t1 release end -".to_string()))
            .then_some(())
    });
    eprintln!(
        "boot {:.1}s, virsh migrate {:.1}s, total {:.1}s",
        p.booted.as_secs_f64(),
        migration.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// `virsh migrate --tls --postcopy`: libvirt gives both QEMUs its TLS credentials
/// (`migrate_tls_x509_cert_dir`), so the source's migration is TLS and the destination QEMU
/// expects TLS. The hook's sidecar ends the source's session with the host's server
/// credentials and reaches QEMU with the host's client credentials; the report says
/// completed with postcopy pages, and the guest is intact on the destination.
#[test]
fn virsh_migrate_tls_postcopy_goes_through_the_hooks_sidecar() {
    let p = linux_pair_with("lv-tls-", |dir| {
        let creds = dir.join("pki-qemu");
        let ca = certs::Ca::new("Lab CA");
        // libvirt names the migration URI's host as the source's tls-hostname.
        ca.write_dir(
            &creds,
            Some(&ca.server("host-b", &["127.0.0.2", "127.0.0.1"])),
            Some(&ca.client("host-a")),
        );
        (
            format!(
                "listen = \"127.0.0.2\"\ntls_creds = \"{}\"\n",
                creds.display()
            ),
            format!("migrate_tls_x509_cert_dir = \"{}\"\n", creds.display()),
        )
    });
    let port = free_port();
    let o = p.a.virsh(&[
        "migrate",
        "--live",
        "--postcopy",
        "--postcopy-after-precopy",
        "--tls",
        "t1",
        &p.b.uri,
        "--migrateuri",
        &format!("tcp://127.0.0.2:{port}"),
        "--listen-address",
        "127.0.0.1",
        "--xml",
        p.dest_xml.to_str().unwrap(),
        "--bandwidth",
        "50",
        "--verbose",
    ]);
    assert!(
        o.status.success(),
        "virsh migrate --tls: {}\nsidecar logs: {}",
        stderr(&o),
        sidecar_logs(&p.b)
    );
    let logs = sidecar_logs(&p.b);
    assert!(
        logs.contains("the destination expects TLS"),
        "the sidecar used TLS towards QEMU: {logs}"
    );
    assert_eq!(p.b.virsh_ok(&["domstate", "t1"]).trim(), "running");
    let report = p.report();
    assert_eq!(report["outcome"], "completed", "{:?}", report["error"]);
    assert!(
        report["postcopy"]["pages"].as_u64().unwrap() > 0,
        "the migration went through postcopy"
    );
    p.assert_guest_healthy();
}

/// The source's link to the sidecar is cut in postcopy: both QEMUs pause (the hook's
/// sidecar follows libvirt, so it passes QEMU's own recovery through), the operator
/// repeats the command with `--postcopy-resume`, libvirt recovers the destination and
/// resumes the source to the sidecar, which relays the handshake; the guest is intact.
#[test]
fn virsh_postcopy_resume_recovers_a_cut_through_the_hooks_sidecar() {
    let p = linux_pair("lv-rec-", "listen = \"127.0.0.2\"\n");
    let port = free_port();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The link the cut breaks: the source connects to 127.0.0.3:PORT, relayed to the
    // sidecar on 127.0.0.2:PORT (libvirt gives QEMU and the sidecar the migrateuri's port).
    let link = rt
        .block_on(Link::start_on(
            format!("127.0.0.3:{port}").parse().unwrap(),
            format!("127.0.0.2:{port}").parse().unwrap(),
        ))
        .unwrap();
    // A QMP monitor of the test's own on the destination QEMU: libvirt holds its monitor
    // for the incoming migration job (its passthrough waits for the job to end).
    let test_qmp = p.b.root.join("t1-test.qmp");
    let xml = std::fs::read_to_string(&p.dest_xml).unwrap();
    let xml = xml
        .replacen(
            "<domain type='qemu'>",
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>",
            1,
        )
        .replace(
            "</domain>",
            &format!(
                "  <qemu:commandline>\n    <qemu:arg value='-qmp'/>\n    \
                 <qemu:arg value='unix:{},server=on,wait=off'/>\n  </qemu:commandline>\n</domain>",
                test_qmp.display()
            ),
        );
    assert!(xml.contains("xmlns:qemu="), "{xml}");
    std::fs::write(&p.dest_xml, xml).unwrap();
    let args = |resume: bool| {
        let mut v: Vec<String> = [
            "migrate",
            "--live",
            "--postcopy",
            "--postcopy-after-precopy",
            "t1",
            &p.b.uri,
            "--migrateuri",
            &format!("tcp://127.0.0.3:{port}"),
            "--listen-address",
            "127.0.0.1",
            "--xml",
            p.dest_xml.to_str().unwrap(),
            "--bandwidth",
            "50",
            // Slow enough that postcopy lasts for the cut.
            "--postcopy-bandwidth",
            "2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            v.push("--postcopy-resume".into());
        }
        v
    };
    let dst = std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            let a: Vec<String> = args(false);
            p.a.virsh(&a.iter().map(String::as_str).collect::<Vec<_>>())
        });
        let dst = wait_for(
            "the destination QEMU's test monitor",
            Duration::from_secs(300),
            || {
                test_qmp
                    .exists()
                    .then(|| rt.block_on(Qmp::connect(&test_qmp)).ok())
                    .flatten()
            },
        );
        let cursor = dst.event_cursor();
        rt.block_on(dst.wait_for_event_after(
            cursor,
            |e| e.name == "RESUME",
            Duration::from_secs(300),
        ))
        .expect("the destination runs the guest: postcopy has begun");
        // Under TCG a vCPU delivers interrupts holding QEMU's big lock; on a page that has
        // not arrived, a paused destination's main loop (libvirt's monitor, and QEMU
        // 10.0's accept of the recovery connection) then freezes for good
        // (protocol-spec/postcopy-sequence.md#sequence-recovery). Stopped vCPUs take no
        // interrupt; under KVM this is not needed.
        rt.block_on(dst.execute(qapi::qmp::stop {})).expect("stop");
        let cursor = dst.event_cursor();
        link.cut();
        let st = rt
            .block_on(dst.wait_migration_status_after(
                cursor,
                &["postcopy-paused"],
                Duration::from_secs(60),
            ))
            .expect("the destination pauses");
        assert_eq!(st, postcopy_sidecar::qmp::MigrationStatus::PostcopyPaused);
        let first = h.join().unwrap();
        assert!(
            !first.status.success(),
            "the first virsh migrate must report the broken postcopy; sidecar log:\n{}",
            sidecar_logs(&p.b)
        );
        eprintln!("first virsh migrate: {}", stderr(&first));
        dst
    });
    // libvirt resumes only once the source says postcopy-paused too.
    wait_for("the source to pause", Duration::from_secs(60), || {
        (migration_status(&p.a) == "postcopy-paused").then_some(())
    });
    let ev_cursor = dst.event_cursor();
    let a: Vec<String> = args(true);
    let o = p.a.virsh(&a.iter().map(String::as_str).collect::<Vec<_>>());
    if !o.status.success() {
        eprintln!("destination events: {:?}", dst.events_since(ev_cursor));
        // With LIBVIRT_DEBUG set, both libvirtds log their migration code to a file.
        if std::env::var("LIBVIRT_DEBUG").is_ok() {
            for h in [&p.a, &p.b] {
                let _ = std::fs::copy(
                    h.root.join("libvirtd.log"),
                    format!("/tmp/libvirtd-{}.log", h.name),
                );
            }
        }
        for h in [&p.a, &p.b] {
            let log = h.root.join("log/qemu/t1.log");
            eprintln!(
                "{}: {}",
                log.display(),
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    assert!(
        o.status.success(),
        "virsh migrate --postcopy-resume: {}\nhook calls on b: {:?}\nreports: {:?}\nsidecar log:\n{}",
        stderr(&o),
        lines(&p.calls_b),
        reports(&p.b.report_dir())
            .iter()
            .map(|r| json(r))
            .collect::<Vec<_>>(),
        sidecar_logs(&p.b)
    );
    rt.block_on(dst.execute(qapi::qmp::cont {})).expect("cont");
    assert_eq!(p.b.virsh_ok(&["domstate", "t1"]).trim(), "running");
    let report = p.report();
    assert_eq!(report["outcome"], "completed", "{:?}", report["error"]);
    let rec = report["recoveries"].as_array().unwrap();
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0]["mode"], "pass-through");
    // libvirt's Finish fails if the destination still looks paused once the source is
    // recovering: the sidecar connected it while it judged the source's resume
    // (protocol-spec/postcopy-sequence.md#sequence-early-destination).
    let log = sidecar_logs(&p.b);
    assert!(
        log.contains("connecting the destination while the connection is judged"),
        "no early destination connection for the resume; sidecar log:\n{log}"
    );
    p.assert_guest_healthy();
    drop(link);
}

/// The shipped systemd unit, as installed, passes `systemd-analyze verify` without a
/// warning about it, alone and with the guarded-reads drop-in, and `systemd-analyze
/// security` rates its exposure at most 2.0 (2.5 with the drop-in's capabilities). (This
/// machine runs no systemd, so the unit itself does not run here.)
#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let dir = test_dir("lv-unit-");
    let out = std::process::Command::new(BIN)
        .args(["libvirt-hook", "install", "--sysconfdir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "install: {}", stderr(&out));
    let unit = dir.path().join("systemd/system/postcopy-sidecar@.service");
    // An instance, as the hook starts it.
    let inst = dir.path().join("postcopy-sidecar@t1.service");
    std::fs::copy(&unit, &inst).unwrap();
    let o = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&inst)
        .output()
        .expect("systemd-analyze (package systemd; scripts/setup.sh installs it)");
    let err = stderr(&o);
    assert!(o.status.success(), "systemd-analyze verify: {err}");
    let about_it: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("postcopy-sidecar"))
        .collect();
    assert!(about_it.is_empty(), "warnings: {about_it:?}");

    let exposure = |unit_path: &Path| -> f64 {
        let o = std::process::Command::new("systemd-analyze")
            .env("SYSTEMD_UNIT_PATH", format!("{}:", unit_path.display()))
            .args(["security", "--offline=yes", "postcopy-sidecar@t1.service"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "systemd-analyze security: {}{out}",
            stderr(&o)
        );
        let line = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
        line.split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let base = exposure(dir.path());
    assert!(base <= 2.0, "exposure {base}");
    let drop_in = dir.path().join("postcopy-sidecar@t1.service.d");
    std::fs::create_dir(&drop_in).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/systemd/postcopy-sidecar@.service.d/guarded-reads.conf"
        ),
        drop_in.join("guarded-reads.conf"),
    )
    .unwrap();
    let o = std::process::Command::new("systemd-analyze")
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .args(["verify", "postcopy-sidecar@t1.service"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "verify with the drop-in: {}",
        stderr(&o)
    );
    let guarded = exposure(dir.path());
    assert!(
        guarded > base && guarded <= 2.5,
        "exposure {guarded} (base {base})"
    );
}

/// `virsh migrate --parallel --parallel-connections 4` (multifd, precopy) through the
/// sidecar the destination's hook launched: it follows libvirt's multifd settings,
/// relays the four channels beside main and reports what each carried; the guest is
/// intact on the destination.
#[test]
fn virsh_parallel_migration_goes_through_the_hooks_sidecar_with_four_multifd_channels() {
    let p = linux_pair("lv-mf-", "listen = \"127.0.0.2\"\n");
    let port = free_port();
    let o = p.a.virsh(&[
        "migrate",
        "--live",
        "--parallel",
        "--parallel-connections",
        "4",
        "t1",
        &p.b.uri,
        "--migrateuri",
        &format!("tcp://127.0.0.2:{port}"),
        "--listen-address",
        "127.0.0.1",
        "--xml",
        p.dest_xml.to_str().unwrap(),
        "--verbose",
    ]);
    assert!(
        o.status.success(),
        "virsh migrate: {}\nhook calls on b: {:?}\nsidecar logs on b:\n{}",
        stderr(&o),
        lines(&p.calls_b),
        sidecar_logs(&p.b)
    );
    assert_eq!(p.b.virsh_ok(&["domstate", "t1"]).trim(), "running");
    let report = p.report();
    assert_eq!(report["outcome"], "completed", "{:?}", report["error"]);
    let m = report["multifd"].as_object().expect("multifd figures");
    assert_eq!(m.len(), 4, "{m:?}");
    assert!(
        m.values().all(|f| f["pages"].as_u64().unwrap_or(0) > 0),
        "every channel carried pages: {m:?}"
    );
    p.assert_guest_healthy();
}
