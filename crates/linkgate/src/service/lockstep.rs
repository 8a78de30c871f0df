//! Polls two futures of one task in lockstep: each poll goes on until
//! neither has made the other (or itself) ready again.
//!
//! Why: the HTTP proxy drives a client connection and its upstream
//! connections inside one task. Handing a request or response from one to the
//! other wakes the task itself; an ordinary poll would return and wait for
//! that wake-up behind every other ready task in the runtime, once per hand-off
//! (several per request). Under load that queueing was most of the tail
//! latency. Here the hand-off is finished inside the same poll instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Rounds per poll before yielding anyway, so that a pair that keeps waking
/// itself cannot starve the other tasks of its thread.
const MAX_ROUNDS: usize = 8;

/// Drives `main` and `helper` (which never completes) together; completes
/// with `main`'s output.
///
/// Guarantees: every wake-up that happens while polling is either handled by
/// another round in the same poll or passed on to the task, so nothing is
/// lost; at most [`MAX_ROUNDS`] rounds run per poll.
pub async fn lockstep<M, H>(main: M, helper: H) -> M::Output
where
    M: Future,
    H: Future<Output = ()>,
{
    let mut main = std::pin::pin!(main);
    let mut helper = std::pin::pin!(helper);
    std::future::poll_fn(move |cx| poll_rounds(cx, main.as_mut(), helper.as_mut())).await
}

fn poll_rounds<M: Future, H: Future<Output = ()>>(
    cx: &mut Context<'_>,
    mut main: Pin<&mut M>,
    mut helper: Pin<&mut H>,
) -> Poll<M::Output> {
    let noting = Arc::new(NotingWaker {
        task: cx.waker().clone(),
        polling: AtomicBool::new(true),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(noting.clone());
    let mut inner = Context::from_waker(&waker);
    let mut output = Poll::Pending;
    for _ in 0..MAX_ROUNDS {
        noting.woken.store(false, Ordering::SeqCst);
        // The helper first, so what it produced reaches `main` in this
        // round, and again after `main`, so what `main` queued goes out now.
        let _ = helper.as_mut().poll(&mut inner);
        output = main.as_mut().poll(&mut inner);
        if output.is_ready() {
            break;
        }
        let _ = helper.as_mut().poll(&mut inner);
        if !noting.woken.load(Ordering::SeqCst) {
            break;
        }
    }
    noting.polling.store(false, Ordering::SeqCst);
    // A wake-up that came during the last round (or from another thread
    // just now) was only noted: pass it on.
    if output.is_pending() && noting.woken.load(Ordering::SeqCst) {
        noting.task.wake_by_ref();
    }
    output
}

/// While the task is being polled, notes wake-ups instead of scheduling the
/// task again; afterwards, wakes the task.
struct NotingWaker {
    task: Waker,
    polling: AtomicBool,
    woken: AtomicBool,
}

impl Wake for NotingWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.polling.load(Ordering::SeqCst) {
            self.task.wake_by_ref();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A hand-off from the helper to `main` completes within one poll.
    #[tokio::test]
    async fn hand_off_completes_in_one_poll() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let mut tx = Some(tx);
        let helper = std::future::poll_fn(move |_| {
            if let Some(tx) = tx.take() {
                let _ = tx.send(7);
            }
            Poll::<()>::Pending
        });
        let mut both = std::pin::pin!(lockstep(rx, helper));
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(matches!(both.as_mut().poll(&mut cx), Poll::Ready(Ok(7))));
    }

    /// A wake-up from elsewhere after the poll still reaches the task.
    #[tokio::test]
    async fn later_wake_ups_reach_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = tx.send(9);
        });
        let helper = std::future::pending::<()>();
        let got = tokio::time::timeout(Duration::from_secs(5), lockstep(rx, helper)).await;
        assert_eq!(got.unwrap().unwrap(), 9);
    }
}
