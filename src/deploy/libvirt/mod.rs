//! `postcopy-sidecar libvirt-hook`: the sidecar as a libvirt qemu hook, so that a stock
//! `virsh migrate --postcopy` to this host goes through it.
//!
//! ```text
//! deploy/libvirt/qemu                  the hook file (a shim that execs `libvirt-hook hook`)
//! deploy/libvirt/libvirt-hook.toml     its configuration, as shipped
//! deploy/systemd/postcopy-sidecar@.service
//! src/deploy/libvirt/
//!   xml.rs      reading the domain XML, the memfd check, adding the sidecar's QMP monitor
//!   config.rs   the configuration file
//!   hook.rs     what each libvirt event does
//!   launch.rs   starting, watching and stopping one sidecar (direct or systemd)
//!   install.rs  `install` / `uninstall`
//! ```
//! The recipe, the design choices and the privileges are in `deploy/README.md`.

pub mod config;
pub mod hook;
pub mod install;
pub mod launch;
pub mod xml;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use config::Config;
use hook::{Event, Hook};
use install::{InstallOptions, install, uninstall};
use xml::DomainXml;

/// Where the hook's configuration lives on a host.
pub const DEFAULT_CONFIG: &str = "/etc/postcopy-sidecar/libvirt-hook.toml";

/// Arguments of `libvirt-hook`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The hook's configuration file.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `libvirt-hook` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run as libvirt's qemu hook (the installed hook file calls this): DOMAIN OPERATION
    /// SUB-OPERATION [EXTRA], the domain XML on stdin.
    Hook {
        /// Domain name.
        domain: String,
        /// Operation (migrate, prepare, start, started, stopped, release, ...).
        op: String,
        /// Sub-operation (begin, end).
        sub: String,
        /// Extra argument.
        #[arg(default_value = "-")]
        extra: String,
    },
    /// Install the hook, its configuration (kept if present) and the systemd unit under
    /// SYSCONFDIR; restart libvirtd afterwards.
    Install {
        /// System configuration directory: SYSCONFDIR/libvirt/hooks/qemu,
        /// SYSCONFDIR/postcopy-sidecar/libvirt-hook.toml,
        /// SYSCONFDIR/systemd/system/postcopy-sidecar@.service.
        #[arg(long, default_value = "/etc")]
        sysconfdir: PathBuf,
        /// The binary the hook runs (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// Install as hooks/qemu.d/postcopy-sidecar (libvirt 6.5+), beside another hooks/qemu.
        #[arg(long)]
        drop_in: bool,
        /// Replace a hooks/qemu that is not ours.
        #[arg(long)]
        force: bool,
    },
    /// Remove the hook and the unit (the configuration and the reports stay).
    Uninstall {
        /// As for install.
        #[arg(long, default_value = "/etc")]
        sysconfdir: PathBuf,
        /// As for install.
        #[arg(long)]
        drop_in: bool,
    },
    /// Check a domain XML (a file, or stdin) as the migrate hook does, and print the XML
    /// the hook would hand libvirt (with the sidecar's monitor).
    CheckXml {
        /// The domain XML (`virsh dumpxml --migratable DOMAIN`); stdin when omitted.
        file: Option<PathBuf>,
    },
}

fn fail(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("postcopy-sidecar: {e}");
    ExitCode::from(1)
}

/// Runs `libvirt-hook`.
pub fn run(args: Args) -> ExitCode {
    match args.command {
        Command::Hook {
            domain,
            op,
            sub,
            extra,
        } => run_hook(
            args.config,
            Event {
                domain,
                op,
                sub,
                extra,
            },
        ),
        Command::Install {
            sysconfdir,
            binary,
            drop_in,
            force,
        } => {
            let binary = match binary.map_or_else(std::env::current_exe, Ok) {
                Ok(b) => b,
                Err(e) => return fail(format!("finding this binary's path: {e}")),
            };
            report_done(install(&InstallOptions {
                sysconfdir,
                binary,
                drop_in,
                force,
            }))
        }
        Command::Uninstall {
            sysconfdir,
            drop_in,
        } => report_done(uninstall(&sysconfdir, drop_in)),
        Command::CheckXml { file } => check_xml(args.config, file),
    }
}

fn report_done(r: Result<Vec<String>, install::InstallError>) -> ExitCode {
    match r {
        Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn run_hook(config_path: PathBuf, ev: Event) -> ExitCode {
    // Always drain stdin: libvirt writes the whole domain XML to it.
    let mut xml = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut xml) {
        return fail(format!("reading the domain XML from stdin: {e}"));
    }
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        // A broken configuration blocks incoming migrations (loudly), never a domain's
        // ordinary start or stop.
        Err(e) if ev.op == "migrate" => return fail(e),
        Err(e) => {
            eprintln!("postcopy-sidecar: {e}; ignoring {} {}", ev.op, ev.sub);
            return ExitCode::SUCCESS;
        }
    };
    let binary = match config.binary.clone().map_or_else(std::env::current_exe, Ok) {
        Ok(b) => b,
        Err(e) => return fail(format!("finding the sidecar binary: {e}")),
    };
    let hook = Hook {
        config_path,
        config,
        binary,
    };
    let mut out = std::io::stdout().lock();
    match hook.handle(&ev, &xml, &mut out) {
        Ok(()) => match out.flush() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(format!("writing to libvirt: {e}")),
        },
        Err(e) => fail(e),
    }
}

fn check_xml(config_path: PathBuf, file: Option<PathBuf>) -> ExitCode {
    let text = match &file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display())),
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map(|_| s)
                .map_err(|e| format!("stdin: {e}"))
        }
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    // Without an installed configuration, check against the defaults.
    let config = if config_path.exists() {
        match Config::load(&config_path) {
            Ok(c) => c,
            Err(e) => return fail(e),
        }
    } else {
        Config::default()
    };
    let xml = match DomainXml::parse(&text) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if let Err(e) = xml.check_memory() {
        return fail(e);
    }
    let name = xml.name().unwrap_or("?");
    let paths = match hook::DomainPaths::new(&config.run_dir, name) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    print!("{}", xml.with_monitor(&paths.qmp));
    ExitCode::SUCCESS
}
