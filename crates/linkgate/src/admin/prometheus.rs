//! `/metrics`: the status in Prometheus' text format.

use std::fmt::Write as _;

use super::Status;

/// The Prometheus text for `status`.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    out.push_str("# HELP linkgate_connections_active Connections being served.\n# TYPE linkgate_connections_active gauge\n");
    for s in &status.services {
        let _ = writeln!(
            out,
            "linkgate_connections_active{{service=\"{}\"}} {}",
            s.name, s.counters.active
        );
    }
    out.push_str("# HELP linkgate_connections_total Finished connections (HTTP: requests) by result.\n# TYPE linkgate_connections_total counter\n");
    for s in &status.services {
        let c = &s.counters;
        for (result, n) in [
            ("ok", c.ok),
            ("denied", c.denied),
            ("auth_failed", c.auth_failed),
            ("error", c.error),
        ] {
            let _ = writeln!(
                out,
                "linkgate_connections_total{{service=\"{}\",result=\"{result}\"}} {n}",
                s.name
            );
        }
    }
    out.push_str("# HELP linkgate_bytes_total Bytes relayed by finished connections.\n# TYPE linkgate_bytes_total counter\n");
    for s in &status.services {
        let _ = writeln!(
            out,
            "linkgate_bytes_total{{service=\"{}\",direction=\"up\"}} {}",
            s.name, s.counters.bytes_up
        );
        let _ = writeln!(
            out,
            "linkgate_bytes_total{{service=\"{}\",direction=\"down\"}} {}",
            s.name, s.counters.bytes_down
        );
    }
    out.push_str("# HELP linkgate_link_up Whether the link to a peer is up.\n# TYPE linkgate_link_up gauge\n");
    for l in &status.links {
        let _ = writeln!(
            out,
            "linkgate_link_up{{peer=\"{}\"}} {}",
            l.peer,
            u8::from(l.state == "up")
        );
    }
    out
}
