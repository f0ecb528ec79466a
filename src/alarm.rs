//! A reusable timer for hand-written futures and sockets that must wake
//! themselves at a deadline that moves (the database silence watch, the
//! HTTP connection timers).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::time::Sleep;

/// A timer set to one deadline at a time; allocated on first use.
#[derive(Default)]
pub struct Alarm(Option<Pin<Box<Sleep>>>);

impl Alarm {
    /// Ready once `deadline` has passed; otherwise wakes `cx` then.
    pub fn poll_at(&mut self, deadline: Instant, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= deadline {
            self.0 = None;
            return Poll::Ready(());
        }
        let deadline = tokio::time::Instant::from_std(deadline);
        let sleep = match &mut self.0 {
            Some(sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => self.0.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        sleep.as_mut().poll(cx)
    }

    /// Stops waking anyone.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}
