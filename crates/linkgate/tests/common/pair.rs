//! Two gateways joined by a link, as the link tests start them: a hub
//! that exports services to the spoke, and a spoke that dials it.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::RunningGateway;

pub const WAIT: Duration = Duration::from_secs(30);
pub const PASSWORD: &str = "correct horse battery staple";

pub fn hub_config(services: &str) -> String {
    format!(
        "[gateway]\nname = \"hub\"\nlog = \"json\"\nshutdown_grace = \"2s\"\n\n[link]\nlisten = \"127.0.0.1:0\"\n\n\
         [[peer]]\nname = \"spoke\"\npassword = \"{PASSWORD}\"\n\n{services}"
    )
}

pub fn spoke_config(connect: SocketAddr, password: &str, user: &str, services: &str) -> String {
    format!(
        "[gateway]\nname = \"spoke\"\nlog = \"json\"\nshutdown_grace = \"2s\"\n\n\
         [[peer]]\nname = \"hub\"\nconnect = \"{connect}\"\nuser = \"{user}\"\npassword = \"{password}\"\n\n{services}"
    )
}

pub fn link_addr(gateway: &RunningGateway) -> SocketAddr {
    gateway
        .records()
        .iter()
        .find(|r| r["message"] == "listening for links")
        .and_then(|r| r["listen"].as_str()?.parse().ok())
        .expect("hub listens for links")
}

/// Hub exporting `web` (→ `target`) to the spoke; spoke mapping `web` → link://hub/web.
pub fn hub_service(target: SocketAddr) -> String {
    format!(
        "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"link\"\ntarget = \"{target}\"\nallow = [\"peer:spoke\"]\n"
    )
}

pub const SPOKE_SERVICE: &str =
    "[[service]]\nname = \"web\"\ntype = \"mapping\"\nlisten = \"127.0.0.1:0\"\ntarget = \"link://hub/web\"\n";

pub fn wait_link_up(gateway: &RunningGateway, count: usize) {
    let deadline = Instant::now() + WAIT;
    while gateway.count_lines(|l| l.contains("\"link up\"")) < count {
        assert!(
            Instant::now() < deadline,
            "link not up; log:\n{}",
            gateway.lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a hub and a spoke whose link goes through `via` (if given).
pub fn start_pair(
    hub_services: &str,
    spoke_services: &str,
    relay_to: Option<&dyn Fn(SocketAddr) -> SocketAddr>,
) -> (RunningGateway, RunningGateway) {
    let hub = RunningGateway::start(&hub_config(hub_services));
    let hub_link = link_addr(&hub);
    let connect = relay_to.map_or(hub_link, |f| f(hub_link));
    let spoke = RunningGateway::start(&spoke_config(connect, PASSWORD, "spoke", spoke_services));
    wait_link_up(&spoke, 1);
    (hub, spoke)
}
