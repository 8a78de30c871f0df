//! End-to-end tests of the FTP proxy: pyftpdlib as the server; Python's
//! ftplib and curl as clients, in passive and active mode, logging in
//! through the proxy (`USER user@host:port`) or to a fixed target.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::servers::FtpServer;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

fn ftp_config(extra: &str) -> String {
    format!(
        "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"ftp\"\ntype = \"ftp\"\n\
         listen = \"127.0.0.1:0\"\n{extra}\n"
    )
}

/// Runs an ftplib session: downloads big.bin, uploads `upload` as up.bin,
/// lists; prints the download's SHA-256 and the listing.
fn ftplib_session(gateway_port: u16, user: &str, passive: bool, upload: &Path) -> String {
    let script = format!(
        r#"
import ftplib, hashlib
f = ftplib.FTP()
f.connect("127.0.0.1", {gateway_port}, timeout=15)
f.login({user:?}, "secret")
f.set_pasv({passive})
data = bytearray()
f.retrbinary("RETR big.bin", data.extend)
print(hashlib.sha256(data).hexdigest())
with open({upload:?}, "rb") as up:
    f.storbinary("STOR up.bin", up)
print(sorted(f.nlst()))
f.quit()
"#,
        passive = if passive { "True" } else { "False" },
        upload = upload.to_str().unwrap(),
    );
    python(&script)
}

fn check_session(server: &FtpServer, gateway: &RunningGateway, user: &str, passive: bool) {
    let big = pseudo_random(3 * 1024 * 1024 + 17, 11);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let upload = gateway.dir.path().join("upload.bin");
    let sent = pseudo_random(2 * 1024 * 1024 + 5, 12);
    std::fs::write(&upload, &sent).unwrap();
    let _ = std::fs::remove_file(server.path("up.bin"));
    let out = ftplib_session(gateway.addr("ftp").port(), user, passive, &upload);
    let mut lines = out.lines();
    assert_eq!(
        lines.next().unwrap(),
        sha256_hex(&big),
        "download corrupted"
    );
    assert_eq!(lines.next().unwrap(), "['big.bin', 'up.bin']");
    assert_eq!(
        sha256_file(&server.path("up.bin")),
        sha256_hex(&sent),
        "upload corrupted"
    );
}

#[test]
fn ftplib_passive_and_active_through_the_proxy_login() {
    let server = FtpServer::start();
    let gateway = RunningGateway::start(&ftp_config(""));
    let user = format!("alice@127.0.0.1:{}", server.port);
    check_session(&server, &gateway, &user, true);
    check_session(&server, &gateway, &user, false);
    let audits = gateway.wait_for_audits(2, WAIT);
    for record in &audits {
        assert_eq!(record["result"], "ok", "{record}");
        assert_eq!(record["target"], format!("127.0.0.1:{}", server.port));
        // Data connections are counted with the session.
        assert!(record["bytes_down"].as_u64().unwrap() > 3 * 1024 * 1024);
        assert!(record["bytes_up"].as_u64().unwrap() > 2 * 1024 * 1024);
    }
}

#[test]
fn ftplib_logs_in_normally_to_a_fixed_target() {
    let server = FtpServer::start();
    let gateway = RunningGateway::start(&ftp_config(&format!(
        "target = \"127.0.0.1:{}\"",
        server.port
    )));
    check_session(&server, &gateway, "alice", true);
    check_session(&server, &gateway, "alice", false);
}

/// With `passive_ports`, every passive data port the gateway offers is in
/// that range (what a firewall in front of it opens), and transfers work.
/// A PASV whose port the client never uses is replaced by the next one (as
/// servers do): ten unused ones do not use up the session's data slots.
#[test]
fn passive_ports_confine_the_data_ports_offered() {
    let server = FtpServer::start();
    std::fs::write(server.path("small.txt"), b"hello").unwrap();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let low = probe.local_addr().unwrap().port().min(65000);
    drop(probe);
    let gateway = RunningGateway::start(&ftp_config(&format!(
        "target = \"127.0.0.1:{}\"\npassive_ports = \"{low}-{}\"",
        server.port,
        low + 20
    )));
    let script = format!(
        r#"
import ftplib
f = ftplib.FTP()
f.connect("127.0.0.1", {port}, timeout=15)
f.login("alice", "secret")
for _ in range(10):
    data = bytearray()
    f.retrbinary("RETR small.txt", data.extend)
    assert data == b"hello", data
    print(f.makepasv()[1])
f.quit()
"#,
        port = gateway.addr("ftp").port()
    );
    let out = python(&script);
    let ports: Vec<u16> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ports.len(), 10);
    assert!(
        ports.iter().all(|p| (low..=low + 20).contains(p)),
        "{ports:?} not in {low}-{}",
        low + 20
    );
}

#[test]
fn control_and_data_connections_go_through_via() {
    let server = FtpServer::start();
    let proxy = RunningGateway::start(
        "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"s\"\ntype = \"socks\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let gateway = RunningGateway::start(&ftp_config(&format!(
        "target = \"127.0.0.1:{}\"\nvia = \"socks5://{}\"",
        server.port,
        proxy.addr("s")
    )));
    check_session(&server, &gateway, "alice", true);
    check_session(&server, &gateway, "alice", false);
    // Each session: one control connection, then a data connection for the
    // download, the upload and the listing, all through the SOCKS proxy.
    let records = proxy.wait_for_audits(8, WAIT);
    let targets: Vec<&str> = records
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    let control = format!("127.0.0.1:{}", server.port);
    assert_eq!(
        targets.iter().filter(|t| **t == control).count(),
        2,
        "{targets:?}"
    );
    assert!(records.iter().all(|r| r["result"] == "ok"), "{records:?}");
    let moved: u64 = records
        .iter()
        .map(|r| r["bytes_down"].as_u64().unwrap())
        .sum();
    assert!(
        moved > 2 * 3 * 1024 * 1024,
        "only {moved} bytes came through the proxy"
    );
}

/// curl over IPv4 and over IPv6 (a client on ::1, the server on IPv4):
/// extended passive by default, and active (EPRT) with `-P -`.
#[test]
fn curl_downloads_in_extended_passive_and_active_mode() {
    let server = FtpServer::start();
    let big = pseudo_random(5 * 1024 * 1024, 13);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let gateway = RunningGateway::start(&ftp_config(&format!(
        "target = \"127.0.0.1:{port}\"\n\n[[service]]\nname = \"ftp6\"\ntype = \"ftp\"\n\
         listen = \"[::1]:0\"\ntarget = \"127.0.0.1:{port}\"",
        port = server.port
    )));
    // curl uses EPSV by default, and EPRT (then PORT) with -P.
    let urls = [
        format!("ftp://{}/big.bin", gateway.addr("ftp")),
        format!("ftp://{}/big.bin", gateway.addr("ftp6")),
    ];
    for (url, active) in urls.iter().flat_map(|url| [(url, None), (url, Some("-"))]) {
        let out = gateway.dir.path().join("down.bin");
        let mut curl = Command::new("curl");
        curl.args(["-sS", "--fail", "--user", "alice:secret", "-o"])
            .arg(&out);
        if let Some(address) = active {
            curl.args(["-P", address]);
        }
        let status = curl
            .arg(url)
            .status()
            .expect("curl is needed for this test");
        assert!(
            status.success(),
            "curl {url} (active: {active:?}) failed: {status}"
        );
        assert_eq!(
            sha256_file(&out),
            sha256_hex(&big),
            "{url} active: {active:?}"
        );
    }
}

/// The proxy login `USER user@host:port` with curl: the `@` and `:` of the
/// user name are percent-encoded in the URL (the command line the README
/// shows).
#[test]
fn curl_logs_in_through_the_proxy_with_user_at_host_in_the_url() {
    let server = FtpServer::start();
    let data = pseudo_random(300_000, 16);
    std::fs::write(server.path("file.bin"), &data).unwrap();
    let gateway = RunningGateway::start(&ftp_config(""));
    let out = gateway.dir.path().join("got.bin");
    let url = format!(
        "ftp://alice%40127.0.0.1%3A{}:secret@{}/file.bin",
        server.port,
        gateway.addr("ftp")
    );
    let status = Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(&out)
        .arg(&url)
        .status()
        .expect("curl is needed for this test");
    assert!(status.success(), "curl {url}: {status}");
    assert_eq!(sha256_file(&out), sha256_hex(&data));
}

#[test]
fn lftp_mirrors_both_ways_in_passive_and_active_mode() {
    let server = FtpServer::start();
    let big = pseudo_random(4 * 1024 * 1024 + 3, 14);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let gateway = RunningGateway::start(&ftp_config(""));
    let local = gateway.dir.path().join("sent.bin");
    let sent = pseudo_random(1024 * 1024 + 9, 15);
    std::fs::write(&local, &sent).unwrap();
    for passive in ["yes", "no"] {
        let got = gateway.dir.path().join(format!("got-{passive}.bin"));
        let script = format!(
            "set ftp:ssl-allow no; set ftp:passive-mode {passive}; set net:max-retries 1; \
             get big.bin -o {got}; put {local} -o up-{passive}.bin; bye",
            got = got.display(),
            local = local.display(),
        );
        // lftp's proxy-style login: the user names the server.
        let user = format!("alice@127.0.0.1:{},secret", server.port);
        let out = Command::new("lftp")
            .args([
                "-u",
                &user,
                "-p",
                &gateway.addr("ftp").port().to_string(),
                "-e",
                &script,
            ])
            .arg("127.0.0.1")
            .output()
            .expect("lftp is needed for this test (Debian package lftp)");
        assert!(
            out.status.success(),
            "lftp (passive {passive}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256_file(&got), sha256_hex(&big), "passive {passive}");
        let uploaded = server.path(&format!("up-{passive}.bin"));
        assert_eq!(
            sha256_file(&uploaded),
            sha256_hex(&sent),
            "passive {passive}"
        );
    }
}

/// A server that offers TLS: clients that use it "if available" (lftp's and
/// FileZilla's defaults) must not break the session through the proxy,
/// which cannot pass TLS on (it reads the commands). AUTH gets 534 from the
/// gateway, FEAT no longer lists the TLS features, and lftp with its default
/// settings downloads in plain FTP.
#[test]
fn clients_that_try_tls_go_on_without_it() {
    let server = FtpServer::start_tls();
    let big = pseudo_random(1024 * 1024 + 11, 17);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let gateway = RunningGateway::start(&ftp_config(&format!(
        "target = \"127.0.0.1:{}\"",
        server.port
    )));
    let port = gateway.addr("ftp").port();
    let script = format!(
        r#"
import ftplib
f = ftplib.FTP()
f.connect("127.0.0.1", {port}, timeout=15)
feat = f.sendcmd("FEAT")
print("EPSV" in feat, "AUTH" in feat, "PBSZ" in feat, "PROT" in feat)
try:
    f.sendcmd("AUTH TLS")
except ftplib.error_perm as e:
    print(str(e)[:4])
f.login("alice", "secret")
print(f.sendcmd("PWD")[:3])
f.quit()
"#
    );
    assert_eq!(python(&script), "True False False False\n534 \n257\n");
    let got = gateway.dir.path().join("got.bin");
    let out = Command::new("lftp")
        .args(["-u", "alice,secret", "-p", &port.to_string(), "-e"])
        .arg(format!(
            "set net:max-retries 1; get big.bin -o {}; bye",
            got.display()
        ))
        .arg("127.0.0.1")
        .output()
        .expect("lftp is needed for this test (Debian package lftp)");
    assert!(
        out.status.success(),
        "lftp with default TLS settings failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256_file(&got), sha256_hex(&big));
}

#[test]
fn with_auth_the_client_logs_in_to_the_proxy_first() {
    let server = FtpServer::start();
    let big = pseudo_random(1024 * 1024, 16);
    std::fs::write(server.path("big.bin"), &big).unwrap();
    let gateway = RunningGateway::start(
        "[gateway]\nlog = \"json\"\n\n[[user]]\nname = \"carol\"\npassword = \"wonderland\"\n\n\
         [[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"127.0.0.1:0\"\nauth = \"password\"\n",
    );
    let script = format!(
        r#"
import ftplib, hashlib
f = ftplib.FTP()
f.connect("127.0.0.1", {gateway_port}, timeout=15)
try:
    f.sendcmd("USER alice@127.0.0.1:{server_port}")
    f.sendcmd("PASS secret")
    print("no proxy login needed?!")
except ftplib.error_perm as e:
    print(str(e)[:3])
f.sendcmd("USER carol")
try:
    f.sendcmd("PASS wrong")
except ftplib.error_perm as e:
    print(str(e)[:3])
f.sendcmd("USER carol")
print(f.sendcmd("PASS wonderland")[:3])
f.login("alice@127.0.0.1:{server_port}", "secret")
data = bytearray()
f.retrbinary("RETR big.bin", data.extend)
print(hashlib.sha256(data).hexdigest())
f.quit()
"#,
        gateway_port = gateway.addr("ftp").port(),
        server_port = server.port,
    );
    let lines: Vec<String> = python(&script).lines().map(String::from).collect();
    assert_eq!(lines, ["530", "530", "230", &sha256_hex(&big)]);
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["user"], "carol");
    assert_eq!(audits[0]["result"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pipeline_of_commands_is_answered_in_order() {
    let server = FtpServer::start();
    let gateway = RunningGateway::start(&ftp_config(&format!(
        "target = \"127.0.0.1:{}\"",
        server.port
    )));
    let mut session = RawSession::open(&gateway).await;
    assert!(session.reply().await.starts_with("220 "));
    // Far more commands than the gateway keeps in flight, in one write.
    let mut burst = b"USER alice\r\nPASS secret\r\n".to_vec();
    for i in 0..500 {
        burst.extend_from_slice(format!("MKD d{i}\r\n").as_bytes());
    }
    session.send(&burst).await;
    assert!(session.reply().await.starts_with("331 "));
    assert!(session.reply().await.starts_with("230 "));
    for i in 0..500 {
        let reply = session.reply().await;
        assert!(
            reply.starts_with("257 ") && reply.contains(&format!("/d{i}\"")),
            "{reply}"
        );
    }
}

/// A raw control connection to the gateway.
struct RawSession {
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>>,
    write: tokio::net::tcp::OwnedWriteHalf,
}

impl RawSession {
    async fn open(gateway: &RunningGateway) -> RawSession {
        let stream = tokio::net::TcpStream::connect(gateway.addr("ftp"))
            .await
            .unwrap();
        let (read, write) = stream.into_split();
        let lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(read));
        RawSession { lines, write }
    }

    async fn send(&mut self, bytes: &[u8]) {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut self.write, bytes).await;
    }

    /// The next reply line; fails the test if none comes.
    async fn reply(&mut self) -> String {
        tokio::time::timeout(WAIT, self.lines.next_line())
            .await
            .expect("no reply")
            .unwrap()
            .expect("connection closed")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_bad_input() {
    let gateway = RunningGateway::start(&ftp_config(
        "destinations = [\"*.corp.example\"]\nhandshake_timeout = \"2s\"",
    ));
    let mut session = RawSession::open(&gateway).await;
    assert!(session.reply().await.starts_with("220 "));
    session.send(b"LIST\r\n").await;
    assert!(session.reply().await.starts_with("530 "));
    // TLS cannot pass through the gateway: refused, and the session goes on.
    session.send(b"AUTH TLS\r\n").await;
    let no_tls = session.reply().await;
    assert!(
        no_tls.starts_with("534 ") && no_tls.contains("TLS is not available"),
        "{no_tls}"
    );
    // A line that is no command gets 500 and the session goes on.
    session.send(b"12 34\r\n").await;
    assert!(session.reply().await.starts_with("500 "));
    session.send(b"USER anonymous\r\n").await;
    assert!(session.reply().await.starts_with("501 "));
    // Not in destinations: refused before any connection is made.
    session.send(b"USER alice@127.0.0.1:21\r\n").await;
    let refusal = session.reply().await;
    assert!(
        refusal.starts_with("530 ") && refusal.contains("destinations"),
        "{refusal}"
    );
    let audits = gateway.wait_for_audits(1, WAIT);
    assert_eq!(audits[0]["result"], "denied");
    // An overlong command line ends the session with 500.
    let mut flood = RawSession::open(&gateway).await;
    assert!(flood.reply().await.starts_with("220 "));
    flood.send(&[b'A'; 20_000]).await;
    assert!(flood.reply().await.starts_with("500 "));
    // A client that never logs in is cut off after handshake_timeout.
    let mut idle = RawSession::open(&gateway).await;
    assert!(idle.reply().await.starts_with("220 "));
    assert!(idle.reply().await.starts_with("421 "));
}

/// Over a link, the reply that ends a login (here the login deadline's
/// 421) reaches the client, and the connection then closes cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_a_link_the_reply_that_ends_a_login_arrives_before_a_clean_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let hub_services = "[[service]]\nname = \"ftp\"\ntype = \"ftp\"\nlisten = \"link\"\n\
         allow = \"peer:spoke\"\nhandshake_timeout = \"1s\"\n";
    let spoke_services = "[[service]]\nname = \"ftp\"\ntype = \"mapping\"\n\
         listen = \"127.0.0.1:0\"\ntarget = \"link://hub/ftp\"\n";
    let (_hub, spoke) = common::pair::start_pair(hub_services, spoke_services, None);
    let mut client = tokio::net::TcpStream::connect(spoke.addr("ftp"))
        .await
        .unwrap();
    client.write_all(b"NOOP\r\n").await.unwrap();
    let mut received = Vec::new();
    let ended = tokio::time::timeout(WAIT, client.read_to_end(&mut received))
        .await
        .expect("the connection stays open");
    let text = String::from_utf8_lossy(&received).to_string();
    assert!(
        ended.is_ok(),
        "reset instead of a clean close: {ended:?} after {text:?}"
    );
    assert!(text.contains("\r\n421 "), "{text}");
}
