//! The gateway's identity file: its long-term secrets (OPAQUE's, from which
//! the key-mode static key is derived too). Peer records made with
//! `linkgate peer-record` are bound to it: replacing the file invalidates
//! them.
//!
//! Handled as sshd handles private keys: the file is opened without
//! following symlinks, refused when it is not a regular file owned by the
//! user running the gateway or when group or others may read it (the
//! message names the file and the fix), and created atomically (written to
//! a temporary file, synced, linked into place) so a crash never leaves a
//! half-written identity.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use link::handshake::Identity;
use rand::rngs::OsRng;
use rustix::fs::{Mode, OFlags};
use zeroize::Zeroizing;

const HEADER: &str = "linkgate-identity-v1";

/// Reads the identity at `path`, or creates it (mode 0600) if missing.
pub fn load_or_create(path: &Path) -> Result<Identity, String> {
    let shown = path.display();
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => {
            let mut file = std::fs::File::from(fd);
            check_private(&file, path)?;
            let mut text = Zeroizing::new(String::new());
            file.read_to_string(&mut text)
                .map_err(|e| format!("cannot read identity file {shown}: {e}"))?;
            parse(&text).map_err(|why| format!("identity file {shown}: {why}"))
        }
        Err(rustix::io::Errno::NOENT) => create(path),
        Err(rustix::io::Errno::LOOP) => Err(format!(
            "identity file {shown} is a symbolic link; point [gateway] identity at the file itself"
        )),
        Err(e) => Err(format!("cannot read identity file {shown}: {e}")),
    }
}

/// Refuses a file that others could read or that someone else owns.
fn check_private(file: &std::fs::File, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read identity file {shown}: {e}"))?;
    if !meta.is_file() {
        return Err(format!("identity file {shown} is not a regular file"));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(format!(
            "identity file {shown} belongs to user id {}, not to the user running the gateway ({me}): run chown {me} {shown}",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "identity file {shown} may be read by others (mode {mode:04o}): it holds this gateway's secret keys; run chmod 600 {shown}"
        ));
    }
    Ok(())
}

/// Makes a new identity: a temporary file beside `path`, written and
/// synced, then hard-linked into place (which fails if another process
/// created one meanwhile: then that one is used), then the directory synced.
fn create(path: &Path) -> Result<Identity, String> {
    let shown = path.display();
    let identity = Identity::generate(&mut OsRng);
    let text = Zeroizing::new(format!(
        "{HEADER}\n{}\n",
        STANDARD.encode(identity.to_bytes())
    ));
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let cannot = |e: std::io::Error| format!("cannot create identity file {shown}: {e}");
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            // Never write through a symlink planted at the temporary name.
            .custom_flags(OFlags::NOFOLLOW.bits() as i32)
            .open(&temp)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(cannot(e));
    }
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return load_or_create(path),
        Err(e) => return Err(cannot(e)),
    }
    if let Ok(dir) = std::fs::File::open(dir) {
        let _ = dir.sync_all();
    }
    tracing::info!(path = %shown, "created a new gateway identity");
    Ok(identity)
}

fn parse(text: &str) -> Result<Identity, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!(
            "not a linkgate identity (first line must be {HEADER})"
        ));
    }
    let bytes = Zeroizing::new(
        STANDARD
            .decode(lines.next().unwrap_or_default().trim())
            .map_err(|_| "the key line is not base64".to_string())?,
    );
    Identity::from_bytes(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_with_mode_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.key");
        let first = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_or_create(&path).unwrap();
        assert_eq!(first.to_bytes(), again.to_bytes());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create(&path)
            .unwrap_err()
            .contains("not a linkgate identity"));
    }

    #[test]
    fn readable_by_others_or_a_symlink_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.key");
        load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(err.contains("may be read by others (mode 0644)"), "{err}");
        assert!(
            err.contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = load_or_create(&link).unwrap_err();
        assert!(err.contains("is a symbolic link"), "{err}");
        assert!(load_or_create(&path).is_ok());
    }
}
