//! `postcopy-sidecar` command-line entry point: one subcommand per job.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use postcopy_sidecar::inspect;

/// A sidecar for QEMU postcopy live migration.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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
        /// Print the JSON summary instead of the timeline.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Inspect {
            stream,
            return_path,
            preempt,
            json,
        } => run_inspect(stream, return_path, preempt, json),
    }
}

fn run_inspect(
    stream: PathBuf,
    rp: Option<PathBuf>,
    preempt: Vec<PathBuf>,
    json: bool,
) -> ExitCode {
    let read = |p: &PathBuf| inspect::read_capture(p);
    let loaded = (|| {
        let main = read(&stream)?;
        let rp = rp.as_ref().map(read).transpose()?;
        let pre = preempt.iter().map(read).collect::<Result<Vec<_>, _>>()?;
        Ok::<_, inspect::ReadCaptureError>((main, rp, pre))
    })();
    let (main, rp, pre) = match loaded {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let report = inspect::inspect(&main, rp.as_deref(), &pre);
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
