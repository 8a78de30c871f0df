//! A real browser through the HTTP proxy: headless Chromium (Debian package
//! `chromium`) loads a page whose script only arrives through the proxy.

mod common;

use std::time::Duration;

use common::servers::PythonHttpServer;
use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// Chromium with `--proxy-server` loads a page and the script it includes
/// through the gateway (the script writes a token into the page, so the
/// dumped DOM shows it came through). Only `localhost` is allowed: the
/// browser's own background requests (updates, time, accounts) are refused
/// without any name being resolved, so nothing leaves loopback.
#[test]
fn headless_chromium_loads_a_page_and_its_script_through_the_proxy() {
    let site = tempfile::tempdir().unwrap();
    let token = format!("token-{}", sha256_hex(&pseudo_random(16, 41)));
    std::fs::write(
        site.path().join("page.html"),
        "<html><head><title>linkgate</title></head><body><p id=\"x\">not yet</p>\
         <script src=\"page.js\"></script></body></html>",
    )
    .unwrap();
    std::fs::write(
        site.path().join("page.js"),
        format!("document.getElementById('x').textContent = '{token}';"),
    )
    .unwrap();
    let origin = PythonHttpServer::start(site.path());
    let gateway = RunningGateway::start(
        "[gateway]\nlog = \"json\"\n\n[[service]]\nname = \"web\"\ntype = \"http\"\n\
         listen = \"127.0.0.1:0\"\ndestinations = [\"localhost\"]\n",
    );
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://localhost:{}/page.html", origin.addr.port());
    let proxy = format!("--proxy-server=http://{}", gateway.addr("web"));
    let out = headless_chromium(
        profile.path(),
        // Chromium sends loopback addresses around a proxy unless told.
        &["--proxy-bypass-list=<-loopback>", &proxy, "--dump-dom"],
        &url,
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(&format!("<p id=\"x\">{token}</p>")),
        "{dom}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both requests are in the audit log as forwarded by the proxy.
    let page = format!("http://localhost:{}/page.html", origin.addr.port());
    let script = format!("http://localhost:{}/page.js", origin.addr.port());
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let audits = gateway.audits();
        let ok = |target: &str| {
            audits
                .iter()
                .any(|a| a["target"] == target && a["result"] == "ok" && a["reason"] == "200 OK")
        };
        if ok(&page) && ok(&script) {
            // Whatever else the browser asked for was refused, not resolved.
            assert!(
                audits.iter().all(|a| a["result"] == "ok"
                    || a["result"] == "denied"
                    || a["reason"] == "client went away before the response ended"),
                "{audits:?}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{audits:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
