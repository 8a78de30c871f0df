//! The service manager's notification protocol (systemd's `sd_notify`,
//! DESIGN §1), through the `sd-notify` crate: `READY=1` once every listener
//! is bound, `RELOADING=1` (with `MONOTONIC_USEC`) and `READY=1` around a
//! reload, `STOPPING=1` on a stop signal, `STATUS=` lines for `systemctl
//! status`, and `WATCHDOG=1` every half `WATCHDOG_USEC`. Without
//! `NOTIFY_SOCKET` every call does nothing.

use std::time::Duration;

use sd_notify::NotifyState;

/// Whether a service manager listens (`NOTIFY_SOCKET` is set); callers
/// skip building status lines nobody reads.
pub fn enabled() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn send(states: &[NotifyState<'_>]) {
    if !enabled() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Every listener is bound: units ordered after this one may start.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload starts now.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The gateway is stopping (draining its connections).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining connections"),
    ]);
}

/// A new status line for `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// With `WATCHDOG_USEC` set (for this process), pings every half of it
/// from a task on the gateway's own runtime: a runtime that is wedged
/// stops pinging, and the service manager restarts the gateway.
pub fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (interval / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
