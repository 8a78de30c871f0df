//! Recent events for the console: the latest refusals, failed logins and
//! link changes, in a fixed-size ring (the log has them all; this is what
//! an operator looks at first). Process-wide, like the log itself: every
//! part of the gateway can note an event without carrying a handle.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

/// Events kept.
pub const CAPACITY: usize = 100;

/// What kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A connection refused by a rule or a limit.
    Denied,
    /// A client, peer or admin failed to log in.
    LoginFailed,
    /// A link came up.
    LinkUp,
    /// A link went down.
    LinkDown,
}

/// One event.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Seconds since the Unix epoch.
    pub t: f64,
    /// What kind.
    pub kind: EventKind,
    /// What happened, in words (untrusted parts already escaped).
    pub text: String,
}

static EVENTS: LazyLock<Mutex<VecDeque<Event>>> =
    LazyLock::new(|| Mutex::new(VecDeque::with_capacity(CAPACITY)));

/// Notes an event now.
pub fn note(kind: EventKind, text: impl Into<String>) {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut events = EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    if events.len() == CAPACITY {
        events.pop_front();
    }
    events.push_back(Event {
        t,
        kind,
        text: text.into(),
    });
}

/// The events kept, newest first.
pub fn recent() -> Vec<Event> {
    let events = EVENTS.lock().unwrap_or_else(|p| p.into_inner());
    events.iter().rev().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest_events_first() {
        for i in 0..CAPACITY + 5 {
            note(EventKind::Denied, format!("event {i}"));
        }
        let events = recent();
        assert_eq!(events.len(), CAPACITY);
        assert_eq!(events[0].text, format!("event {}", CAPACITY + 4));
    }
}
