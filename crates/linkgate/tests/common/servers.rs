//! Real servers the tests relay to: Python's http.server and echo servers.

#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Starts `python3 -m http.server` on a free loopback port serving `dir`.
pub struct PythonHttpServer {
    child: std::process::Child,
    pub addr: SocketAddr,
}

impl PythonHttpServer {
    pub fn start(dir: &std::path::Path) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "0",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 is needed for this test");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 43127 (http://127.0.0.1:43127/) ..."
        let port: u16 = first
            .split("port ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected http.server banner: {first}"));
        PythonHttpServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for PythonHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo server on a free loopback port; returns its address.
pub async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = socket.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A server that records everything it receives (per connection, appended)
/// and answers nothing; returns its address and the shared record.
pub async fn sink_server() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `data` on a new connection to `addr`, half-closes, and returns
/// everything that came back until the other side closed.
pub async fn round_trip(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = stream.into_split();
    let sent = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    back
}

/// pyftpdlib serving a folder to user alice (password "secret").
pub struct FtpServer {
    child: std::process::Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: tempfile::TempDir,
}

impl FtpServer {
    /// Starts it on a free port.
    pub fn start() -> FtpServer {
        Self::start_with("", "FTPHandler")
    }

    /// Starts one that also offers explicit TLS (AUTH TLS, RFC 4217) with a
    /// self-signed certificate made for the run, plain FTP still allowed:
    /// what clients that use TLS "if available" meet in the wild.
    pub fn start_tls() -> FtpServer {
        let setup = r#"
import datetime, os, tempfile
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256()))
pem = tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False)
pem.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()))
pem.write(cert.public_bytes(serialization.Encoding.PEM))
pem.close()
from pyftpdlib.handlers import TLS_FTPHandler
TLS_FTPHandler.certfile = pem.name
"#;
        Self::start_with(setup, "TLS_FTPHandler")
    }

    /// Starts pyftpdlib with `handler` after running `setup`.
    fn start_with(setup: &str, handler: &str) -> FtpServer {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            r#"
{setup}
from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import {handler}
from pyftpdlib.servers import FTPServer
import logging
logging.disable(logging.CRITICAL)
a = DummyAuthorizer()
a.add_user("alice", "secret", {dir:?}, perm="elradfmw")
{handler}.authorizer = a
s = FTPServer(("127.0.0.1", 0), {handler})
print(s.address[1], flush=True)
s.serve_forever()
"#,
            dir = dir.path().to_str().unwrap()
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 with pyftpdlib is needed for this test");
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .parse()
            .expect("pyftpdlib did not start (pip install pyftpdlib pyopenssl)");
        FtpServer { child, port, dir }
    }

    /// Where a file named `name` in the served folder lives.
    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for FtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking TCP server on 127.0.0.1:0 that runs `handler` on a thread of
/// its own for each client (for servers that misbehave on purpose).
pub fn thread_server<F>(handler: F) -> SocketAddr
where
    F: Fn(std::net::TcpStream) + Clone + Send + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let handler = handler.clone();
            std::thread::spawn(move || handler(client));
        }
    });
    addr
}
