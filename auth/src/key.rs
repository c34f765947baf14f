//! The pair key: 32 random bytes that both sides of one pair hold and nobody else does.
//!
//! On disk it is one line of 64 hex digits (`colo keygen --out FILE` writes it with mode
//! 0600). A key file that its group or others may read, or that is not exactly one key, is
//! refused with what is wrong.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a pair key.
pub const KEY_LEN: usize = 32;

/// Why a key cannot be made, read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file cannot be read, created or written.
    #[error("pair key file {path}: {what}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Its group or others may read or write it.
    #[error(
        "pair key file {path} has mode {mode:04o}: its group or others can read it; \
         make it private (chmod 600 {path})"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not one line of 64 hex digits.
    #[error(
        "pair key file {path} does not hold a key ({why}); make one with `colo keygen --out FILE`"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
    /// The OS has no randomness to give.
    #[error("cannot draw random bytes from the OS")]
    Random(#[source] getrandom::Error),
}

/// A pair key. Its bytes never appear in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey([u8; KEY_LEN]);

impl std::fmt::Debug for PairKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PairKey(id {:016x})", self.pair_id())
    }
}

impl PairKey {
    /// A fresh random key.
    ///
    /// # Errors
    /// [`KeyError::Random`] if the OS cannot give random bytes.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = [0u8; KEY_LEN];
        getrandom::fill(&mut k).map_err(KeyError::Random)?;
        Ok(Self(k))
    }

    /// A key from its bytes (tests, and the well-known key of `--insecure`).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key's bytes, for the MAC.
    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The pair's id: the first 8 bytes of HMAC-SHA256(key, "colo pair id"). It names
    /// the pair in logs and lets a side tell "another pair" from "a wrong key" without
    /// saying anything about the key.
    pub fn pair_id(&self) -> u64 {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(b"colo pair id");
        let out = m.finalize().into_bytes();
        u64::from_be_bytes(out[..8].try_into().expect("8 bytes"))
    }

    /// Reads a key file: refused if its group or others have any access to it.
    ///
    /// # Errors
    /// [`KeyError::Io`], [`KeyError::Exposed`] or [`KeyError::Malformed`].
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |what| {
            move |source| KeyError::Io {
                path: path.into(),
                what,
                source,
            }
        };
        let meta = std::fs::metadata(path).map_err(io("read its mode"))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.into(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(io("read it"))?;
        Self::parse(&text).map_err(|why| KeyError::Malformed {
            path: path.into(),
            why,
        })
    }

    /// Parses the text of a key file.
    ///
    /// # Errors
    /// What is wrong with it.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let hex = text.trim();
        if hex.len() != 2 * KEY_LEN {
            return Err("not 64 hex digits");
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or("not hex")?, 16)
                .map_err(|_| "not hex")?;
        }
        Ok(Self(k))
    }

    /// Writes the key to a new file with mode 0600 (refuses to replace an existing one).
    ///
    /// # Errors
    /// [`KeyError::Io`] if the file exists or cannot be written.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |what| {
            move |source| KeyError::Io {
                path: path.into(),
                what,
                source,
            }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io("create it (it must not exist yet)"))?;
        let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(f, "{hex}").map_err(io("write it"))?;
        f.sync_all().map_err(io("sync it"))
    }
}
