//! Third-party servers the link transport tests put between two gateways:
//! squid (an office's forward proxy, with Basic auth), nginx (TLS in
//! front of a hub's ws:// listener), microsocks and Dante (SOCKS5), and a test CA
//! with a certificate for 127.0.0.1 and localhost. Each server is started
//! by the test on a free loopback port and stopped by its PID when dropped.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port free right now. These servers cannot bind port 0 and
/// report it, so the port is taken from the kernel and handed over.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts TCP connections on `addr`.
fn wait_listening(addr: SocketAddr, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{what} did not start on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(command: &mut Command) {
    let out = command.output().expect("tool is installed");
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Squid's unprivileged user reads the files it needs there.
fn open_dir(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A server process stopped (by its PID) when dropped.
pub struct Server {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Stopped with SIGTERM first: a server whose worker processes
    /// outlive a killed parent (Dante's keep relaying).
    terminate: bool,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.terminate {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(command: &mut Command, log: &Path) -> Child {
    let file = std::fs::File::create(log).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (is it installed? see .ci/run)"))
}

/// squid on a free port, requiring HTTP Basic auth as `user`/`password`
/// for everything, CONNECT to any port included.
pub fn squid(user: &str, password: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    open_dir(dir.path());
    let hash = Command::new("openssl")
        .args(["passwd", "-apr1", password])
        .output()
        .expect("openssl");
    let passwd = dir.path().join("passwd");
    std::fs::write(
        &passwd,
        format!("{user}:{}", String::from_utf8_lossy(&hash.stdout).trim()),
    )
    .unwrap();
    let port = free_port();
    let config = dir.path().join("squid.conf");
    std::fs::write(
        &config,
        format!(
            "http_port 127.0.0.1:{port}\npid_filename none\ncache_log /dev/stderr\naccess_log none\n\
             cache deny all\nshutdown_lifetime 0 seconds\n\
             auth_param basic program /usr/lib/squid/basic_ncsa_auth {passwd}\n\
             auth_param basic realm linkgate-test\nacl authed proxy_auth REQUIRED\n\
             http_access allow authed\nhttp_access deny all\n",
            passwd = passwd.display()
        ),
    )
    .unwrap();
    let log = dir.path().join("squid.log");
    let mut child = spawn(Command::new("squid").arg("-N").arg("-f").arg(&config), &log);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "squid", &mut child, &log);
    Server {
        child,
        addr,
        log,
        terminate: false,
        _dir: Some(dir),
    }
}

/// microsocks (SOCKS5) on a free port, with a user name and password.
pub fn microsocks(user: &str, password: &str) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let log = dir.path().join("microsocks.log");
    let mut child = spawn(
        Command::new("microsocks").args([
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            password,
        ]),
        &log,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "microsocks", &mut child, &log);
    Server {
        child,
        addr,
        log,
        terminate: false,
        _dir: Some(dir),
    }
}

/// Dante (danted, SOCKS5) on a free port without a login, relaying TCP and
/// UDP (UDP ASSOCIATE) for loopback clients, sending from 127.0.0.1.
pub fn dante() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("danted.conf");
    std::fs::write(
        &config,
        format!(
            "logoutput: stderr\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\n\
             clientmethod: none\nsocksmethod: none\n\
             client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
             socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: connect udpassociate udpreply }}\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("danted.log");
    let pid_file = dir.path().join("danted.pid");
    let mut child = spawn(
        Command::new("danted")
            .arg("-f")
            .arg(&config)
            .args(["-N", "1", "-p"])
            .arg(&pid_file),
        &log,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "danted", &mut child, &log);
    Server {
        child,
        addr,
        log,
        terminate: true,
        _dir: Some(dir),
    }
}

/// A test CA and a certificate it signed for `127.0.0.1` and `localhost`.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn test_certs() -> TestCerts {
    let dir = tempfile::tempdir().unwrap();
    open_dir(dir.path());
    let at = |name: &str| dir.path().join(name);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=linkgate test CA",
        ])
        .args(ec)
        .arg("-keyout")
        .arg(at("ca-key.pem"))
        .arg("-out")
        .arg(at("ca.pem")));
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=localhost"])
        .args(ec)
        .arg("-keyout")
        .arg(at("key.pem"))
        .arg("-out")
        .arg(at("req.pem")));
    std::fs::write(
        at("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(at("req.pem"))
        .arg("-CA")
        .arg(at("ca.pem"))
        .arg("-CAkey")
        .arg(at("ca-key.pem"))
        .arg("-extfile")
        .arg(at("ext.cnf"))
        .arg("-out")
        .arg(at("cert.pem")));
    for file in ["key.pem", "cert.pem", "ca.pem"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(at(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    TestCerts {
        ca: at("ca.pem"),
        cert: at("cert.pem"),
        key: at("key.pem"),
        _dir: dir,
    }
}

/// nginx on a free port terminating TLS with `certs` and passing the
/// WebSocket upgrade on `path` to `upstream` (a hub's ws:// listener), as
/// a reverse proxy in front of a hub would.
pub fn nginx_tls_to_ws(certs: &TestCerts, path: &str, upstream: SocketAddr) -> Server {
    let dir = tempfile::tempdir().unwrap();
    open_dir(dir.path());
    let port = free_port();
    let d = dir.path().display();
    let config = dir.path().join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr warn;\nevents {{}}\n\
             http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
             server {{\n  listen 127.0.0.1:{port} ssl;\n  ssl_certificate {cert};\n  ssl_certificate_key {key};\n\
             location {path} {{\n   proxy_pass http://{upstream};\n   proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n   proxy_set_header Connection \"upgrade\";\n\
             proxy_read_timeout 1h;\n   proxy_buffering off;\n  }}\n }}\n}}\n",
            cert = certs.cert.display(),
            key = certs.key.display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("nginx.log");
    let mut child = spawn(
        Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&config),
        &log,
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, "nginx", &mut child, &log);
    Server {
        child,
        addr,
        log,
        terminate: false,
        _dir: Some(dir),
    }
}
