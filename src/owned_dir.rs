//! Directories the sidecar and its hook make files in: checked before use, so a file of
//! theirs (a ready, state or report file, the hook's record) cannot be planted, swapped or
//! redirected by another user.
//!
//! A directory is usable when it is a real directory (not a symbolic link), owned by the
//! expected user, and writable by nobody else (no group or world write bit). Files are
//! then written with [`crate::durable`], which never follows a link at a file's name.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a directory may not hold the sidecar's files.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    /// A symbolic link where a directory should be: it could point anywhere.
    #[error("{path} is a symbolic link, not a directory of its own")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// Something else than a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// Another user owns it, and so may replace what is in it.
    #[error("{path} belongs to uid {found}, not to uid {expected}: refusing to write in it")]
    ForeignOwner {
        /// The path.
        path: PathBuf,
        /// Its owner.
        found: u32,
        /// Who should own it.
        expected: u32,
    },
    /// Group or world may create and remove entries in it.
    #[error(
        "{path} has mode {mode:04o}: writable by its group or by everyone, refusing to write \
         in it (chmod go-w it)"
    )]
    Writable {
        /// The path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file system said no.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The effective uid of this process: who must own its directories.
pub fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Checks that `dir` is a directory of its own (not a link), owned by `owner`, and not
/// writable by group or world.
pub fn check(dir: &Path, owner: u32) -> Result<(), DirError> {
    let meta = std::fs::symlink_metadata(dir).map_err(|source| DirError::Io {
        what: "examining",
        path: dir.to_path_buf(),
        source,
    })?;
    let path = || dir.to_path_buf();
    if meta.file_type().is_symlink() {
        return Err(DirError::Symlink { path: path() });
    }
    if !meta.is_dir() {
        return Err(DirError::NotADirectory { path: path() });
    }
    if meta.uid() != owner {
        return Err(DirError::ForeignOwner {
            path: path(),
            found: meta.uid(),
            expected: owner,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Writable { path: path(), mode });
    }
    Ok(())
}

/// Makes `dir` with exactly `mode` unless it exists (its missing parents with the default
/// mode), then [`check`]s it against this process's uid. An existing directory keeps its
/// mode: it is only refused if others may write in it.
pub fn ensure(dir: &Path, mode: u32) -> Result<(), DirError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| DirError::Io {
            what: "creating",
            path: parent.to_path_buf(),
            source,
        })?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {
            // The umask may have taken bits away: set exactly what was asked.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(
                |source| DirError::Io {
                    what: "setting the mode of",
                    path: dir.to_path_buf(),
                    source,
                },
            )?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(DirError::Io {
                what: "creating",
                path: dir.to_path_buf(),
                source,
            });
        }
    }
    check(dir, own_uid())
}

/// [`check`]s the directory a file of ours goes into (`.` for a bare file name).
pub fn check_parent_of(file: &Path) -> Result<(), DirError> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    check(dir, own_uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_gets_exactly_the_mode_asked_for() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b");
        ensure(&p, 0o700).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        // Again: it exists and passes.
        ensure(&p, 0o700).unwrap();
    }

    #[test]
    fn a_world_writable_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run");
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure(&p, 0o700).unwrap_err();
        assert!(matches!(e, DirError::Writable { mode: 0o777, .. }), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = check(&p, own_uid()).unwrap_err();
        assert!(matches!(e, DirError::Writable { mode: 0o770, .. }), "{e}");
    }

    #[test]
    fn a_foreign_owned_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run");
        std::fs::create_dir(&p).unwrap();
        let other = own_uid() ^ 0x5a5a;
        let e = check(&p, other).unwrap_err();
        assert!(
            matches!(e, DirError::ForeignOwner { found, expected, .. }
                if found == own_uid() && expected == other),
            "{e}"
        );
        // The real case: another user owns it (the tests run as root, which can hand a
        // directory over).
        std::os::unix::fs::chown(&p, Some(65534), None).expect("chown (tests run as root)");
        let e = ensure(&p, 0o700).unwrap_err();
        assert!(
            matches!(e, DirError::ForeignOwner { found: 65534, .. }),
            "{e}"
        );
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure(&link, 0o700).unwrap_err();
        assert!(matches!(e, DirError::Symlink { .. }), "{e}");
        let e = check_parent_of(&link.join("ready")).unwrap_err();
        assert!(matches!(e, DirError::Symlink { .. }), "{e}");
    }
}
