//! The gateway's identity file: its long-term OPAQUE secrets, created with
//! mode 0600 on first use. Peer records made with `linkgate peer-record`
//! are bound to it: replacing the file invalidates them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use link::handshake::Identity;
use rand::rngs::OsRng;

const HEADER: &str = "linkgate-identity-v1";

/// Reads the identity at `path`, or creates it (mode 0600) if missing.
pub fn load_or_create(path: &Path) -> Result<Identity, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).map_err(|why| format!("identity file {}: {why}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let identity = Identity::generate(&mut OsRng);
            let text = format!("{HEADER}\n{}\n", STANDARD.encode(identity.to_bytes()));
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot create identity file {}: {e}", path.display()))?;
            file.write_all(text.as_bytes())
                .map_err(|e| format!("cannot write identity file {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), "created a new gateway identity");
            Ok(identity)
        }
        Err(e) => Err(format!("cannot read identity file {}: {e}", path.display())),
    }
}

fn parse(text: &str) -> Result<Identity, String> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(format!(
            "not a linkgate identity (first line must be {HEADER})"
        ));
    }
    let bytes = STANDARD
        .decode(lines.next().unwrap_or_default().trim())
        .map_err(|_| "the key line is not base64".to_string())?;
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
        std::fs::write(&path, "garbage").unwrap();
        assert!(load_or_create(&path)
            .unwrap_err()
            .contains("not a linkgate identity"));
    }
}
