//! A package manager through the HTTP proxy: Debian's apt-get updates its
//! lists from, and downloads a package out of, a repository served on
//! loopback, with `Acquire::http::Proxy` pointing at the gateway. apt keeps
//! all its state in the test's directory; the machine's is not touched.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::servers::PythonHttpServer;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// Builds `linkgate-probe_1.0_all.deb` (with a pseudo-random payload) in
/// `repo`, and a flat repository index for it; returns the package's bytes.
fn make_repository(work: &Path, repo: &Path) -> Vec<u8> {
    let pkg = work.join("pkg");
    std::fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(pkg.join("usr/share/doc/linkgate-probe")).unwrap();
    std::fs::write(
        pkg.join("DEBIAN/control"),
        "Package: linkgate-probe\nVersion: 1.0\nArchitecture: all\n\
         Maintainer: linkgate tests <tests@example.invalid>\nDescription: test package\n",
    )
    .unwrap();
    std::fs::write(
        pkg.join("usr/share/doc/linkgate-probe/payload"),
        pseudo_random(300 * 1024, 51),
    )
    .unwrap();
    let deb = repo.join("linkgate-probe_1.0_all.deb");
    let status = Command::new("dpkg-deb")
        .arg("--build")
        .args([&pkg, &deb])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("dpkg-deb is needed for this test (Debian package dpkg)");
    assert!(status.success());
    let bytes = std::fs::read(&deb).unwrap();
    std::fs::write(
        repo.join("Packages"),
        format!(
            "Package: linkgate-probe\nVersion: 1.0\nArchitecture: all\n\
             Maintainer: linkgate tests <tests@example.invalid>\n\
             Filename: ./linkgate-probe_1.0_all.deb\nSize: {}\nSHA256: {}\n\
             Description: test package\n\n",
            bytes.len(),
            sha256_hex(&bytes)
        ),
    )
    .unwrap();
    bytes
}

#[test]
fn apt_get_updates_and_downloads_through_the_proxy() {
    let work = tempfile::tempdir().unwrap();
    let repo = work.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let deb = make_repository(work.path(), &repo);
    let origin = PythonHttpServer::start(&repo);
    let gateway = RunningGateway::start(
        "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"web\"\ntype = \"http\"\n\
         listen = \"127.0.0.1:0\"\ndestinations = [\"localhost\"]\n",
    );
    let state = work.path().join("state");
    let cache = work.path().join("cache");
    for dir in [
        state.join("lists/partial"),
        cache.join("archives/partial"),
        work.path().join("out"),
    ] {
        std::fs::create_dir_all(dir).unwrap();
    }
    std::fs::write(state.join("status"), "").unwrap();
    let sources = work.path().join("sources.list");
    std::fs::write(
        &sources,
        format!(
            "deb [trusted=yes] http://localhost:{}/ ./\n",
            origin.addr.port()
        ),
    )
    .unwrap();
    let options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        "Dir::Etc::SourceParts=/nonexistent".to_string(),
        format!("Dir::State={}", state.display()),
        format!("Dir::State::status={}", state.join("status").display()),
        format!("Dir::Cache={}", cache.display()),
        "Debug::NoLocking=1".to_string(),
        "APT::Sandbox::User=root".to_string(),
        format!("Acquire::http::Proxy=http://{}/", gateway.addr("web")),
    ];
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        for option in &options {
            command.args(["-o", option]);
        }
        let out = command
            .args(args)
            .current_dir(work.path().join("out"))
            .output()
            .expect("apt-get is needed for this test");
        assert!(
            out.status.success(),
            "apt-get {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    apt(&["update"]);
    apt(&["download", "linkgate-probe"]);
    let got = std::fs::read(work.path().join("out/linkgate-probe_1.0_all.deb")).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&deb));
    let target = format!(
        "http://localhost:{}/./linkgate-probe_1.0_all.deb",
        origin.addr.port()
    );
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let audits = gateway.audits();
        if audits.iter().any(|a| {
            a["target"] == target.as_str()
                && a["result"] == "ok"
                && a["bytes_down"].as_u64() == Some(deb.len() as u64)
        }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{audits:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
