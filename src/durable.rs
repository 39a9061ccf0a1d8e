//! Files that must be whole or absent, and survive a crash: reports, digests, ready and
//! state files, snapshots. Written to a new temporary file created exclusively and without
//! following links, synced, renamed over the target, and the directory synced, so a reader
//! (or a sidecar restarted after a power loss) never sees a half-written file.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically and durably (mode 0600).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomically_with_mode(path, bytes, 0o600)
}

/// [`write_atomically`] with another mode, for files others must read or run (an
/// installed hook, a unit).
pub fn write_atomically_with_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (tmp, mut f) = create_temporary(path)?;
    let written = f
        .write_all(bytes)
        .and_then(|_| f.set_permissions(std::fs::Permissions::from_mode(mode)))
        .and_then(|_| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent(path))
}

/// Like [`write_atomically`], but never replaces what is at `path` (a file, or a link
/// planted there, which is left untouched): `AlreadyExists` then. For a record that must
/// not overwrite another's, e.g. the hook's failure report next to the sidecar's own.
pub fn write_atomically_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (tmp, mut f) = create_temporary(path)?;
    let written = f.write_all(bytes).and_then(|_| f.sync_all());
    drop(f);
    let placed = written.and_then(|_| {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        renameat2(
            AT_FDCWD,
            &tmp,
            AT_FDCWD,
            path,
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(io::Error::from)
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(parent(path))
}

/// Finishes a file written through [`create_temporary`]: syncs it, renames it over `path`
/// and syncs the directory (the temporary is removed on failure). For files too large to
/// hold in memory before [`write_atomically`].
pub fn commit_temporary(tmp: &Path, file: File, path: &Path) -> io::Result<()> {
    let synced = file.sync_all();
    drop(file);
    if let Err(e) = synced.and_then(|_| std::fs::rename(tmp, path)) {
        let _ = std::fs::remove_file(tmp);
        return Err(e);
    }
    sync_dir(parent(path))
}

/// Opens `path` for appending (created 0600 if missing) without following a link at its
/// name: for logs that live next to reports.
pub fn open_append_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// Creates `path` (which must not exist) with `bytes` and syncs it: for files inside a
/// directory that is itself renamed into place once whole.
pub fn write_new_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Creates a new temporary file next to `path`, exclusively and without following a link
/// planted at its name.
pub fn create_temporary(path: &Path) -> io::Result<(PathBuf, File)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a path without a file name"))?
        .to_string_lossy()
        .into_owned();
    for attempt in 0..16u32 {
        let tmp = parent(path).join(format!(
            ".{name}.{}.{}.{attempt}.tmp",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

/// Syncs a directory, so a rename or a new entry in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_whole_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report.json");
        write_atomically(&p, b"one").unwrap();
        write_atomically(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn a_new_only_write_leaves_an_existing_file_or_link_alone() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let p = d.path().join("report.json");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = write_atomically_new(&p, b"new").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // No temporary left behind; a free name is written.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 2);
        let q = d.path().join("other.json");
        write_atomically_new(&q, b"one").unwrap();
        assert_eq!(std::fs::read(&q).unwrap(), b"one");
    }

    #[test]
    fn appending_refuses_a_link_at_the_name() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let p = d.path().join("x.log");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        let e = open_append_no_follow(&p).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ELOOP));
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn a_symlink_at_the_target_is_replaced_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let p = d.path().join("ready.json");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        write_atomically(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(
            !std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }
}
