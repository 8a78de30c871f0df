//! Test harness: runs the real `linkgate` binary on a config with port-0
//! listeners, learns the bound addresses from its log, and collects its
//! JSON log records (audit records among them).

#![allow(dead_code)]

pub mod pair;
pub mod proxies;
pub mod relay;
pub mod servers;
pub mod shaper;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs headless Chromium (Debian package `chromium`) on `url` with a
/// fresh profile in `profile` and the browser's own background traffic
/// turned off, plus `extra` arguments (`--dump-dom`, `--screenshot=...`,
/// a proxy).
pub fn headless_chromium(profile: &Path, extra: &[&str], url: &str) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium is needed for this test (Debian package chromium)")
}

/// Path of the binary under test.
pub fn linkgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_linkgate"))
}

/// A running gateway process; killed (by its PID) when dropped.
pub struct RunningGateway {
    pub child: Child,
    pub dir: tempfile::TempDir,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set once the whole of stderr was read (the process closed it).
    read_all: Arc<std::sync::atomic::AtomicBool>,
}

impl RunningGateway {
    /// Writes `config` to a temp dir and starts `linkgate run -c` on it,
    /// waiting until it logs "linkgate started" (or fails).
    pub fn start(config: &str) -> RunningGateway {
        Self::start_in(tempfile::tempdir().unwrap(), config)
    }

    /// Like [`RunningGateway::start`], in a given directory (so a restarted
    /// gateway finds its identity file again).
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> RunningGateway {
        Self::start_with_env(dir, config, &[])
    }

    /// Like [`RunningGateway::start_in`], with extra environment variables.
    pub fn start_with_env(
        dir: tempfile::TempDir,
        config: &str,
        env: &[(&str, &str)],
    ) -> RunningGateway {
        let path = dir.path().join("linkgate.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(linkgate_bin())
            .envs(env.iter().copied())
            .args(["run", "-c"])
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn linkgate");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let read_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stderr = child.stderr.take().unwrap();
        let (sink, done) = (lines.clone(), read_all.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let gateway = RunningGateway {
            child,
            dir,
            lines,
            read_all,
        };
        gateway.wait_for_line(|l| l.contains("linkgate started"), Duration::from_secs(20));
        gateway
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until a line satisfies `pred`; panics with the log on timeout.
    pub fn wait_for_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                return line;
            }
            if Instant::now() > deadline {
                panic!(
                    "no matching log line within {timeout:?}; log:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON log records (lines that parse as JSON objects).
    pub fn records(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    /// Audit records written so far.
    pub fn audits(&self) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["message"] == "audit")
            .collect()
    }

    /// Waits until `count` audit records exist and returns them.
    pub fn wait_for_audits(&self, count: usize, timeout: Duration) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let audits = self.audits();
            if audits.len() >= count {
                return audits;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected {count} audit records within {timeout:?}, got {}; log:\n{}",
                    audits.len(),
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The addresses service `name` listens on, from its "listening" records.
    pub fn addrs(&self, name: &str) -> Vec<SocketAddr> {
        self.records()
            .iter()
            .filter(|r| r["message"] == "listening" && r["service"] == name)
            .map(|r| r["listen"].as_str().unwrap().parse().unwrap())
            .collect()
    }

    /// The first address of service `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .addrs(name)
            .first()
            .unwrap_or_else(|| panic!("service {name} not listening"))
    }

    /// Sends a signal to the gateway process (by PID, with kill(1)).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// How many log lines satisfy `pred`.
    pub fn count_lines(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.lines().iter().filter(|l| pred(l)).count()
    }

    /// Stops the process (SIGTERM), waits for it, and hands back its
    /// directory for a restart.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.signal("TERM");
        self.wait_exit(std::time::Duration::from_secs(20));
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Waits for the process to exit, up to `timeout`, and for its last
    /// log lines to be read (they may still be in the pipe when it exits).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                while !self.read_all.load(std::sync::atomic::Ordering::SeqCst)
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "gateway did not exit within {timeout:?}; log:\n{}",
                    self.lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `linkgate ARGS` to completion with `stdin` fed in; returns
/// (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: &str) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(linkgate_bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command may exit without reading its input (a refused request):
    // a broken pipe here is not the test's failure.
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a Python 3 script (a third-party client: ftplib, requests, PySocks,
/// telnetlib...); fails the test with its stderr unless it succeeds;
/// returns what it printed.
pub fn python(script: &str) -> String {
    let out = Command::new("python3")
        .args(["-c", script])
        .output()
        .expect("python3 is needed for this test");
    assert!(
        out.status.success(),
        "python3 script failed (.ci/run installs its packages): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the script prints UTF-8")
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 as hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(data))
}

/// SHA-256 of a file as hex.
pub fn sha256_file(path: &Path) -> String {
    sha256_hex(&std::fs::read(path).unwrap())
}

/// A config with one JSON-logging mapping service `web` from `listen` to `target`.
pub fn mapping_config(listen: &str, target: SocketAddr, extra: &str) -> String {
    format!(
        "[gateway]\nlog = \"json\"\nshutdown_grace = \"10s\"\n\n[[service]]\nname = \"web\"\ntype = \"mapping\"\n\
         listen = \"{listen}\"\ntarget = \"{target}\"\n{extra}\n"
    )
}

/// An address on which nothing listens (bound, then released).
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}
