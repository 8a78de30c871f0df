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
    out.push_str("# HELP linkgate_bytes_total Bytes relayed so far (counted as they move).\n# TYPE linkgate_bytes_total counter\n");
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
    out.push_str("# HELP linkgate_datagrams_total Datagrams relayed by udp services and SOCKS UDP.\n# TYPE linkgate_datagrams_total counter\n");
    let carries_datagrams = |s: &&super::ServiceStatus| {
        s.kind == "udp"
            || s.kind == "socks"
            || s.counters.datagrams_up + s.counters.datagrams_down > 0
    };
    for s in status.services.iter().filter(carries_datagrams) {
        let _ = writeln!(
            out,
            "linkgate_datagrams_total{{service=\"{}\",direction=\"up\"}} {}\nlinkgate_datagrams_total{{service=\"{}\",direction=\"down\"}} {}",
            s.name, s.counters.datagrams_up, s.name, s.counters.datagrams_down
        );
    }
    out.push_str("# HELP linkgate_datagrams_dropped_total Datagrams dropped (caps, full socket buffers, busy or down links).\n# TYPE linkgate_datagrams_dropped_total counter\n");
    for s in status.services.iter().filter(carries_datagrams) {
        let _ = writeln!(
            out,
            "linkgate_datagrams_dropped_total{{service=\"{}\"}} {}",
            s.name, s.counters.datagrams_dropped
        );
    }
    out.push_str("# HELP linkgate_connection_duration_seconds Duration of finished connections.\n# TYPE linkgate_connection_duration_seconds histogram\n");
    for s in &status.services {
        let c = &s.counters;
        let mut cumulative = 0;
        for (i, bound) in crate::metrics::DURATION_BUCKETS.iter().enumerate() {
            cumulative += c.duration_buckets.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "linkgate_connection_duration_seconds_bucket{{service=\"{}\",le=\"{bound}\"}} {cumulative}",
                s.name
            );
        }
        let count: u64 = c.duration_buckets.iter().sum();
        let _ = writeln!(
            out,
            "linkgate_connection_duration_seconds_bucket{{service=\"{}\",le=\"+Inf\"}} {count}",
            s.name
        );
        let _ = writeln!(
            out,
            "linkgate_connection_duration_seconds_sum{{service=\"{}\"}} {}\nlinkgate_connection_duration_seconds_count{{service=\"{}\"}} {count}",
            s.name, c.duration_sum_s, s.name
        );
    }
    out.push_str("# HELP linkgate_user_bytes_total Bytes relayed by authenticated user (counted as they move).\n# TYPE linkgate_user_bytes_total counter\n");
    for (user, [up, down]) in crate::metrics::user_bytes() {
        let user = label(&user);
        let _ = writeln!(
            out,
            "linkgate_user_bytes_total{{user=\"{user}\",direction=\"up\"}} {up}\nlinkgate_user_bytes_total{{user=\"{user}\",direction=\"down\"}} {down}"
        );
    }
    out.push_str("# HELP linkgate_cap_rate_bytes_per_second A bandwidth cap's configured rate, each direction.\n# TYPE linkgate_cap_rate_bytes_per_second gauge\n");
    for c in &status.caps {
        let _ = writeln!(
            out,
            "linkgate_cap_rate_bytes_per_second{{cap=\"{}\"}} {}",
            label(&c.name),
            c.bytes_per_second
        );
    }
    out.push_str("# HELP linkgate_cap_bytes_total Bytes through a bandwidth cap.\n# TYPE linkgate_cap_bytes_total counter\n");
    for c in &status.caps {
        let name = label(&c.name);
        let _ = writeln!(
            out,
            "linkgate_cap_bytes_total{{cap=\"{name}\",direction=\"up\"}} {}\nlinkgate_cap_bytes_total{{cap=\"{name}\",direction=\"down\"}} {}",
            c.bytes_up, c.bytes_down
        );
    }
    out.push_str("# HELP linkgate_cap_use How much of a cap's burst is used now (1: traffic is held to the cap).\n# TYPE linkgate_cap_use gauge\n");
    for c in &status.caps {
        let name = label(&c.name);
        let _ = writeln!(
            out,
            "linkgate_cap_use{{cap=\"{name}\",direction=\"up\"}} {:.3}\nlinkgate_cap_use{{cap=\"{name}\",direction=\"down\"}} {:.3}",
            c.use_up, c.use_down
        );
    }
    out.push_str("# HELP linkgate_cap_wait_seconds_total Time connections waited on a cap, all together.\n# TYPE linkgate_cap_wait_seconds_total counter\n");
    for c in &status.caps {
        let _ = writeln!(
            out,
            "linkgate_cap_wait_seconds_total{{cap=\"{}\"}} {:.3}",
            label(&c.name),
            c.waited_seconds
        );
    }
    out.push_str("# HELP linkgate_link_bandwidth_bytes_per_second The rate a link's sending is paced to (`[[peer]] bandwidth`).\n# TYPE linkgate_link_bandwidth_bytes_per_second gauge\n");
    for l in &status.links {
        if let Some(rate) = l.bandwidth_bytes_per_second {
            let _ = writeln!(
                out,
                "linkgate_link_bandwidth_bytes_per_second{{peer=\"{}\"}} {rate}",
                l.peer
            );
        }
    }
    out.push_str("# HELP linkgate_link_auto_pace_bytes_per_second The rate a link without `bandwidth` paces itself to (0: unpaced).\n# TYPE linkgate_link_auto_pace_bytes_per_second gauge\n");
    for l in status
        .links
        .iter()
        .filter(|l| l.state == "up" && l.bandwidth.is_none())
    {
        let _ = writeln!(
            out,
            "linkgate_link_auto_pace_bytes_per_second{{peer=\"{}\"}} {}",
            l.peer,
            l.auto_pace_bytes_per_second.unwrap_or(0)
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
    out.push_str("# HELP linkgate_link_bytes_total Bytes on the wire of a link, every session since the gateway started.\n# TYPE linkgate_link_bytes_total counter\n");
    for l in &status.links {
        let _ = writeln!(
            out,
            "linkgate_link_bytes_total{{peer=\"{p}\",direction=\"sent\"}} {}\nlinkgate_link_bytes_total{{peer=\"{p}\",direction=\"received\"}} {}",
            l.bytes_sent_total,
            l.bytes_received_total,
            p = l.peer
        );
    }
    out.push_str("# HELP linkgate_link_rtt_seconds Smoothed round-trip time of a link.\n# TYPE linkgate_link_rtt_seconds gauge\n");
    for l in &status.links {
        if let Some(rtt) = l.rtt_ms {
            let _ = writeln!(
                out,
                "linkgate_link_rtt_seconds{{peer=\"{}\"}} {}",
                l.peer,
                rtt / 1000.0
            );
        }
    }
    out.push_str("# HELP linkgate_link_datagrams_dropped Datagrams that arrived on the link's current session and were dropped (the gateway's queue was full).\n# TYPE linkgate_link_datagrams_dropped gauge\n");
    for l in status.links.iter().filter(|l| l.state == "up") {
        let _ = writeln!(
            out,
            "linkgate_link_datagrams_dropped{{peer=\"{}\"}} {}",
            l.peer, l.datagrams_dropped
        );
    }
    out.push_str("# HELP linkgate_link_streams Streams open on a link.\n# TYPE linkgate_link_streams gauge\n");
    for l in status.links.iter().filter(|l| l.state == "up") {
        let _ = writeln!(
            out,
            "linkgate_link_streams{{peer=\"{}\"}} {}",
            l.peer, l.streams
        );
    }
    out.push_str("# HELP linkgate_link_reconnects_total Sessions of a link after its first.\n# TYPE linkgate_link_reconnects_total counter\n");
    for l in &status.links {
        let _ = writeln!(
            out,
            "linkgate_link_reconnects_total{{peer=\"{}\"}} {}",
            l.peer, l.reconnects
        );
    }
    out.push_str("# HELP linkgate_link_handshake_failures_total Failed link handshakes on this gateway's listeners, by reason.\n# TYPE linkgate_link_handshake_failures_total counter\n");
    for (reason, n) in crate::links::handshake_failures() {
        let _ = writeln!(
            out,
            "linkgate_link_handshake_failures_total{{reason=\"{reason}\"}} {n}"
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.push_str(
            "# HELP linkgate_open_fds Open file descriptors.\n# TYPE linkgate_open_fds gauge\n",
        );
        let _ = writeln!(out, "linkgate_open_fds {}", fds.count());
    }
    out
}

/// A label value with Prometheus' escapes (user names are the operator's,
/// but a backslash or quote must not break the line).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
