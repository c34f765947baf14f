//! Role words for a proxy in cluster mode (`colo primary|secondary --role-words`, `colo
//! proxy --cluster`): each side says on its VM's network socket, in order with the VM's
//! frames, what its VM is now, so the proxy knows which VM serves the clients and whether
//! its output waits for commit markers. The transitions:
//!
//! | when | word |
//! |---|---|
//! | a secondary's VM is built (before it runs) | `Follower` |
//! | a primary's secondary is in sync, before the PVM first runs | `Protected` |
//! | a primary starts without a secondary (`--reprotect`) or leaves COLO | `Alone` |
//! | a secondary takes over, before its VM resumes | `Alone` |
//! | a primary re-protects, from the first checkpoint's pause | `Protected` |

use colo_machine::runner::VmHandle;
pub use colo_netcmp::framing::RoleWord;

use super::Params;

/// Says `word` on `vm`'s network socket when `params.role_words` is on (otherwise does
/// nothing). The VM is paused for it, so that the word goes out after every frame the
/// guest sent so far and before any it sends later, and it stays paused: each caller
/// resumes it right after (or runs a checkpoint that does). A failure is logged, not
/// fatal: the VM serves (or follows) all the same, and the proxy keeps its last view.
pub fn announce(vm: &VmHandle, params: &Params, word: RoleWord) {
    if !params.role_words {
        return;
    }
    let said = vm
        .pause()
        .and_then(|_| vm.machine())
        .map(|mut m| m.net_role_word(word));
    match said {
        Ok(Ok(())) => tracing::info!(%word, "role word said to the proxy"),
        Ok(Err(e)) => tracing::warn!(%word, error = %e, "cannot say the role word to the proxy"),
        Err(e) => tracing::warn!(%word, error = %e, "cannot pause the VM to say the role word"),
    }
}
