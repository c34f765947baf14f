//! Who may talk to a colo side: the pair key ([`PairKey`], `colo keygen`) and the mutual
//! authentication that every connection between the two sides (control, each push
//! stream, the disk link) runs before anything else ([`handshake`]).
//!
//! The cryptography is RustCrypto's (`hmac`, `sha2`, `hkdf`) and ring's (AES-256-GCM, in
//! [`seal`]) with nonces from the OS (`getrandom`); nothing here implements a primitive.
//!
//! Threat model, in short (README.md, "Security", says it in full): someone who can reach
//! a side's ports but does not hold the pair key cannot open any channel, so cannot push
//! pages, write the disk buffer, send heartbeats or checkpoint messages; a stray or hostile
//! connection is refused within its handshake timeout and the listener keeps waiting for
//! the real peer. Without encryption, someone who can read the traffic sees guest memory;
//! [`seal`] is the opt-in record layer (AES-256-GCM, keys from the handshake's session
//! secret) that gives a stream confidentiality and integrity.

pub mod fuzzing;
pub mod handshake;
mod key;
pub mod seal;

pub use handshake::{
    AcceptError, AuthError, Channel, Credentials, HANDSHAKE_TIMEOUT, Peer, Role, accept,
    accept_peer, connect,
};
pub use key::{KEY_LEN, KeyError, PairKey};

#[cfg(test)]
mod tests;
