//! The failover state machine, as in QEMU's COLO: none → require → active → completed,
//! with relaunch when failover is asked for while a checkpoint is being loaded (the load
//! finishes first, then failover goes on).

use std::time::Instant;

/// Where failover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// No failover asked for.
    None,
    /// Asked for (lost heartbeat, closed link, or `x-colo-lost-heartbeat`).
    Require,
    /// Asked for while a checkpoint was being loaded: it runs once the load is done.
    Relaunch,
    /// Taking over: the incomplete epoch is dropped, the disk buffer flushed, the SVM
    /// resumed.
    Active,
    /// This side serves alone.
    Completed,
}

/// The machine, with the time of every transition for logs and tests.
#[derive(Debug)]
pub struct Failover {
    state: State,
    history: Vec<(State, Instant)>,
}

impl Default for Failover {
    fn default() -> Self {
        Self {
            state: State::None,
            history: vec![(State::None, Instant::now())],
        }
    }
}

impl Failover {
    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Every state passed through, in order.
    pub fn path(&self) -> Vec<State> {
        self.history.iter().map(|h| h.0).collect()
    }

    fn go(&mut self, to: State) -> bool {
        use State::{Active, Completed, None, Relaunch, Require};
        let ok = matches!(
            (self.state, to),
            (None, Require)
                | (None | Require, Relaunch)
                | (Require | Relaunch, Active)
                | (Active, Completed)
        );
        if ok {
            tracing::info!(from = ?self.state, to = ?to, "failover state");
            self.state = to;
            self.history.push((to, Instant::now()));
        }
        ok
    }

    /// Failover is asked for; `loading` says a checkpoint is being loaded now. Returns
    /// false if failover was already asked for or done.
    pub fn request(&mut self, loading: bool) -> bool {
        if loading {
            self.go(State::Relaunch)
        } else {
            self.go(State::Require)
        }
    }

    /// The takeover starts (after a relaunch: once the load has finished).
    pub fn activate(&mut self) -> bool {
        if self.state == State::None {
            self.go(State::Require);
        }
        self.go(State::Active)
    }

    /// The takeover is done.
    pub fn complete(&mut self) -> bool {
        self.go(State::Completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_normal_path_and_the_relaunch_path() {
        let mut f = Failover::default();
        assert!(f.request(false));
        assert!(!f.request(false), "asked for once");
        assert!(f.activate() && f.complete());
        assert_eq!(
            f.path(),
            [State::None, State::Require, State::Active, State::Completed]
        );
        assert!(
            !f.activate() && !f.request(false),
            "nothing after completed"
        );

        let mut f = Failover::default();
        assert!(f.request(true));
        assert_eq!(f.state(), State::Relaunch);
        assert!(f.activate() && f.complete());
        assert_eq!(
            f.path(),
            [
                State::None,
                State::Relaunch,
                State::Active,
                State::Completed
            ]
        );

        // A takeover without an explicit request passes through require.
        let mut f = Failover::default();
        assert!(f.activate());
        assert_eq!(f.path(), [State::None, State::Require, State::Active]);
        assert!(!Failover::default().complete(), "completed needs active");
    }
}
