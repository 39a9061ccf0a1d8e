//! A unix socket that a process of another uid listens on: what a local attacker could
//! plant at a QMP path. Tests use it to see that the sidecar checks `SO_PEERCRED` before it
//! sends a byte (protocol-spec/admission.md; deploy/README.md on `--qmp-uid`).

use std::io::BufRead;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The listening process; dropping it ends the process (the socket file stays).
pub struct PlantedSocket {
    child: Child,
}

impl PlantedSocket {
    /// Starts a process of `uid` listening on `path` (needs root to change uid, and
    /// `/usr/bin/python3`, which the test setup installs); returns once it listens.
    pub fn listen(uid: u32, path: &Path) -> std::io::Result<PlantedSocket> {
        let mut child = Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\n\
                 s.listen(4)\nprint('listening',flush=True)\nsys.stdin.read()\n",
            )
            .arg(path)
            .uid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        if let Some(out) = child.stdout.as_mut() {
            std::io::BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "listening" {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "the planted listener of uid {uid} did not start at {}",
                path.display()
            )));
        }
        Ok(PlantedSocket { child })
    }
}

impl Drop for PlantedSocket {
    fn drop(&mut self) {
        // Its stdin closing ends it.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}
