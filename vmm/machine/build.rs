//! Builds the built-in guest (`vmm/guest/`, a freestanding `no_std` program with its own
//! workspace and Cargo.lock, which shares the crate `vmm/guest-abi/` with the machine)
//! with a nested cargo, and leaves the ELF at `$OUT_DIR/colo-guest.elf` for
//! `src/guest_image.rs` to embed.
//!
//! The nested build gets a clean environment: the outer RUSTFLAGS, wrappers, target
//! directory and profile or target overrides would otherwise leak into it (cargo hands
//! build scripts its own flags through CARGO_ENCODED_RUSTFLAGS). It needs the guest's
//! dependencies from crates.io, or already in the local registry cache when offline.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The host target; the guest is built for it and linked freestanding by its own
/// build script and linker script.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The guest's binary name (guest/Cargo.toml).
const GUEST_BIN: &str = "colo-guest";

/// Rustc flags for the guest: a fixed-address executable with no relocations. No
/// `-Ctarget-cpu`: the guest must run on baseline x86-64 (SSE2 is fine).
const GUEST_RUSTFLAGS: &[&str] = &["-Crelocation-model=static"];

/// Variables of the outer build that must not reach the nested cargo.
const CLEARED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_MANIFEST_PATH",
];

/// Prefixes of variables that configure profiles or targets, which the guest sets itself.
const CLEARED_PREFIXES: &[&str] = &["CARGO_PROFILE_", "CARGO_TARGET_"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    // This crate is vmm/machine; the guest and its ABI crate are its siblings.
    let vmm = manifest_dir.parent().expect("vmm/machine has a parent");
    let guest = vmm.join("guest");

    println!("cargo:rerun-if-changed=build.rs");
    for p in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(p).display());
    }
    // The contract the guest shares with the VMM, a path dependency of both.
    for p in ["src", "Cargo.toml"] {
        println!(
            "cargo:rerun-if-changed={}",
            vmm.join("guest-abi").join(p).display()
        );
    }

    let elf = build_guest(&guest, &out_dir.join("guest-target"));
    let dest = out_dir.join("colo-guest.elf");
    std::fs::copy(&elf, &dest).unwrap_or_else(|e| {
        panic!(
            "copying the guest from {} to {}: {e}",
            elf.display(),
            dest.display()
        )
    });
}

/// Runs the nested `cargo build` and returns the path of the guest ELF.
fn build_guest(guest: &Path, target_dir: &Path) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(guest);
    for (key, _) in env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if CLEARED_VARS.contains(&k) || CLEARED_PREFIXES.iter().any(|p| k.starts_with(p)) {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));

    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} to build the guest: {e}",
            Path::new(&cargo).display()
        )
    });
    if !output.status.success() {
        eprintln!("--- nested cargo (guest) stdout ---");
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("--- nested cargo (guest) stderr ---");
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the guest ({}) failed with {}; the nested cargo's output is above. \
             The first build needs crates.io (or the guest's crates in the local registry \
             cache); `--locked` needs guest/Cargo.lock to be up to date.",
            guest.join("Cargo.toml").display(),
            output.status
        );
    }
    target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN)
}
