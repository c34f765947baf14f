//! Release gating, in one place: the thread that lands push epochs in the cache, and the
//! gate that keeps the epoch closing a checkpoint unreleased until the commit has copied
//! it into the SVM.
//!
//! ```text
//!  push transport          landing thread                     controller (secondary)
//!  next_commit(e) ──────▶  cache.land(e); landed = e ──────▶   wait_landed(k) wakes
//!                          e ≠ held: release(e) at once
//!                          e = held (k): wait for the commit   hold(k) (before its reply)
//!                                                     ◀──────  commit_and_release(k)
//!  release(k) ◀──────────  release(k)
//! ```
//!
//! While epoch `k` is held the sender cannot land epoch `k + 1` (the transport's release
//! gate), so the thread has nothing to receive and waits on the gate's condition variable;
//! every wait here is on a condition variable or inside the transport, none is a polling
//! sleep. The thread ends when the push path fails, on [`Landing::interrupt`], or when the
//! [`Landing`] is dropped (it is joined then).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use colo_memory::PageBitmap;
use colo_transport::push::PushReceiver;

use crate::cache::{Committed, RamCache};
use crate::error::{Error, Result};

/// How long the landing thread waits inside the transport for the next epoch before it
/// looks whether it was told to stop. Only an idle or stopping secondary sees this.
const RECEIVE_SLICE: Duration = Duration::from_millis(100);

/// Why the landing thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LandingEnd {
    /// The push transport failed or closed.
    Transport(String),
    /// The cache refused an epoch.
    Cache(String),
    /// [`Landing::interrupt`] was called (the link was lost).
    Interrupted,
    /// The [`Landing`] was dropped.
    Stopped,
}

impl std::fmt::Display for LandingEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transport(e) => write!(f, "push path closed: {e}"),
            Self::Cache(e) => write!(f, "cannot land a push epoch: {e}"),
            Self::Interrupted => f.write_str("interrupted"),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

struct State {
    cache: RamCache,
    /// The push epoch that closes the checkpoint in progress (0: none).
    held: u64,
    /// The highest push epoch landed.
    landed: u64,
    /// The held epoch the commit has copied, so the thread may release it.
    committed: u64,
    /// Set once the thread ends or is told to.
    ended: Option<LandingEnd>,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self, why: LandingEnd) {
        let mut st = self.lock();
        if st.ended.is_none() {
            st.ended = Some(why);
        }
        drop(st);
        self.cond.notify_all();
    }
}

/// Ends a [`Landing`]'s waits from another thread (a heartbeat's verdict).
#[derive(Clone)]
pub struct Interrupt(Arc<Shared>);

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interrupt")
    }
}

impl Interrupt {
    /// Ends the landing: waits return [`Error::Landing`], the thread stops.
    pub fn interrupt(&self) {
        self.0.end(LandingEnd::Interrupted);
    }
}

/// The RAM cache together with the thread that lands push epochs in it and the gate that
/// holds the epoch closing each checkpoint until its commit.
pub struct Landing {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Landing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Landing")
            .field("held", &st.held)
            .field("landed", &st.landed)
            .field("ended", &st.ended)
            .finish_non_exhaustive()
    }
}

impl Landing {
    /// Starts landing the epochs `rx` receives into `cache`, on a thread named
    /// `push-land`. Every epoch is released as soon as it has landed, except the one named
    /// by [`Landing::hold`].
    ///
    /// # Errors
    /// [`Error::Thread`] if the thread cannot start.
    pub fn start(cache: RamCache, rx: Box<dyn PushReceiver>) -> Result<Self> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                cache,
                held: 0,
                landed: 0,
                committed: 0,
                ended: None,
            }),
            cond: Condvar::new(),
        });
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("push-land".into())
            .spawn(move || land_loop(rx, &sh))
            .map_err(Error::Thread)?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Holds push epoch `k` back from release once it lands, until
    /// [`Landing::commit_and_release`]: the epoch that closes the checkpoint. Call it
    /// before answering the checkpoint request, so it precedes the epoch's commit.
    pub fn hold(&self, k: u64) {
        self.shared.lock().held = k;
    }

    /// The highest push epoch landed.
    pub fn landed(&self) -> u64 {
        self.shared.lock().landed
    }

    /// Waits until push epoch `k` has landed in the cache.
    ///
    /// # Errors
    /// [`Error::Landing`] if the landing ended first (the push path failed, or an
    /// interrupt), [`Error::LandTimeout`] after `timeout`.
    pub fn wait_landed(&self, k: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if st.landed >= k {
                return Ok(());
            }
            if let Some(why) = &st.ended {
                return Err(Error::Landing(why.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::LandTimeout {
                    epoch: k,
                    landed: st.landed,
                });
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Runs `f` on the cache (staging the checkpoint's state, reading its status), with
    /// the landing thread kept out meanwhile.
    pub fn with_cache<R>(&self, f: impl FnOnce(&mut RamCache) -> R) -> R {
        f(&mut self.shared.lock().cache)
    }

    /// Commits the staged checkpoint into the SVM ([`RamCache::commit`]) and then lets the
    /// held push epoch `k` go, so the primary's next epoch may land.
    ///
    /// # Errors
    /// As [`RamCache::commit`]; the epoch stays held then.
    pub fn commit_and_release(&self, k: u64, svm_dirty: &PageBitmap) -> Result<Committed> {
        let mut st = self.shared.lock();
        let done = st.cache.commit(svm_dirty)?;
        st.committed = k;
        drop(st);
        self.shared.cond.notify_all();
        Ok(done)
    }

    /// A handle that ends this landing's waits from another thread.
    pub fn interrupter(&self) -> Interrupt {
        Interrupt(Arc::clone(&self.shared))
    }

    /// Ends the landing now (the secondary takes over): waits return, the thread stops.
    pub fn interrupt(&self) {
        self.shared.end(LandingEnd::Interrupted);
    }

    /// Why the landing ended, if it did.
    pub fn ended(&self) -> Option<LandingEnd> {
        self.shared.lock().ended.clone()
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.shared.end(LandingEnd::Stopped);
        if let Some(t) = self.thread.take() {
            // It sees the end within one receive slice.
            let _ = t.join();
        }
    }
}

/// The landing thread: receive, land, release (the held epoch after its commit).
fn land_loop(mut rx: Box<dyn PushReceiver>, sh: &Shared) {
    loop {
        if sh.lock().ended.is_some() {
            return;
        }
        let c = match rx.next_commit(RECEIVE_SLICE) {
            Ok(c) => c,
            Err(colo_transport::Error::Timeout(..)) => continue,
            Err(e) => return sh.end(LandingEnd::Transport(e.to_string())),
        };
        let e = c.epoch;
        let mut st = sh.lock();
        if let Err(err) = st.cache.land(&c) {
            drop(st);
            tracing::error!(error = %err, push_epoch = e, "cannot land a push epoch");
            return sh.end(LandingEnd::Cache(err.to_string()));
        }
        st.landed = e;
        sh.cond.notify_all();
        // The epoch closing a checkpoint stays unreleased until the commit copied it: the
        // sender cannot land the next one meanwhile, so there is nothing to receive.
        while st.held == e && st.committed < e && st.ended.is_none() {
            st = sh.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.ended.is_some() {
            return;
        }
        drop(st);
        if let Err(err) = rx.release(e) {
            return sh.end(LandingEnd::Transport(err.to_string()));
        }
    }
}
