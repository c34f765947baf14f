//! The resource agent (ocf/colo) passes resource-agents' own `ocf-tester`: valid OCF
//! meta-data, validate-all, monitor of a stopped and a running instance, start and stop
//! (twice each), notify, and promote/demote round trips on a single instance (promoting a
//! side that never followed a primary boots the VM there; demoting stops it and starts a
//! secondary again). Real `colo` processes; its network socket is drained by the test.

mod common;

use std::path::Path;
use std::process::Command;

use common::{COLO, kvm};

#[test]
fn ocf_tester_passes_on_the_agent() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: ocf-tester checks the agent's permissions as root");
        return;
    }
    if !kvm() {
        return;
    }
    if !Command::new("sh")
        .args(["-c", "command -v ocf-tester"])
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!(
            "skipped: ocf-tester is not installed (Debian's resource-agents; scripts/test.sh installs it)"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("colo-ocft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let net = dir.join("net.sock");
    let l = std::os::unix::net::UnixListener::bind(&net).unwrap();
    std::thread::spawn(move || {
        while let Ok((mut c, _)) = l.accept() {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut std::io::sink());
            });
        }
    });
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ocf/colo");
    let o = |kv: String| ["-o".to_string(), kv];
    let out = Command::new("ocf-tester")
        .args(["-n", "colo-ocf-tester"])
        .args(o(format!("binary={COLO}")))
        .args(o("sides=0=127.0.0.1:7650 1=127.0.0.1:7750".into()))
        .args(o("CRM_meta_clone=0".into()))
        .args(o(format!("disk={}/%n.img", dir.display())))
        .args(o(format!("net=socket:{}", net.display())))
        .args(o("insecure=true".into()))
        .args(o(format!("state_dir={}/state", dir.display())))
        .arg(&agent)
        .output()
        .expect("run ocf-tester");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(dir.join("state/0/colo.log")).unwrap_or_default();
    // Nothing of the agent's may be left running.
    let left = Command::new("pgrep")
        .args(["-f", &format!("{}/state", dir.display())])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "ocf-tester failed:\n{text}\ncolo log:\n{log}"
    );
    assert!(text.contains("passed all tests"), "{text}");
    assert!(left.trim().is_empty(), "colo processes left: {left}");
}
