//! The kernel command line: the user's (or [`DEFAULT`]), then the entries colo owns (the
//! devices it announces), checked against the kernel's limit before anything is built.

use linux_loader::cmdline::Cmdline;

use super::Error;

/// The command line when none is given:
/// - `console=ttyS0`: the kernel's console on colo's 16550 at 0x3f8;
/// - `earlyprintk=serial,ttyS0`: the boot console, so lines come out before the serial
///   driver is up (on a host that emulates guest kernel code that is many seconds);
/// - `panic=-1`: a panic resets the machine at once (through the FADT's reset register),
///   which ends the VM;
/// - `pci=off`: colo's machine has no PCI bus (its devices are virtio-mmio);
/// - `8250.nr_uarts=1`: one serial port, no probes of absent ones;
/// - `i8042.noaux i8042.nomux i8042.dumbkbd`: no mouse or multiplexer probing of the
///   keyboard controller.
pub const DEFAULT: &str = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 pci=off \
                           8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// The longest command line of the PVH boot path, with its terminating NUL: x86 Linux's
/// `COMMAND_LINE_SIZE`.
pub const PVH_MAX: usize = 2048;

/// The longest command line of a bzImage, with its NUL: its header's `cmdline_size` plus
/// one since boot protocol 2.06, 256 before.
pub fn bzimage_max(version: u16, cmdline_size: u32) -> usize {
    if version >= 0x0206 {
        cmdline_size as usize + 1
    } else {
        256
    }
}

/// The command line: `user` (or [`DEFAULT`]) followed by `owned`, at most `max` bytes with
/// the NUL.
///
/// # Errors
/// [`Error::CmdlineTooLong`] past `max`, [`Error::Cmdline`] for what linux-loader refuses
/// (characters that are not printable ASCII, unbalanced quotes).
pub fn build(user: Option<&str>, owned: &[String], max: usize) -> Result<Cmdline, Error> {
    let base = user.unwrap_or(DEFAULT).trim();
    // linux-loader checks what is inserted, not what it parses: check the user's part.
    if !base.chars().all(|c| matches!(c, ' '..='~')) {
        return Err(Error::Cmdline(linux_loader::cmdline::Error::InvalidAscii));
    }
    let len = base.len() + owned.iter().map(|o| o.len() + 1).sum::<usize>();
    if len + 1 > max {
        return Err(Error::CmdlineTooLong { len, max: max - 1 });
    }
    let mut c = if base.is_empty() {
        Cmdline::new(max)
    } else {
        Cmdline::try_from(base, max)
    }
    .map_err(Error::Cmdline)?;
    for o in owned {
        c.insert_str(o).map_err(Error::Cmdline)?;
    }
    Ok(c)
}

/// The command line as the kernel will read it.
///
/// # Errors
/// [`Error::Cmdline`] if it cannot be a C string (it always can once built).
pub fn text(c: &Cmdline) -> Result<String, Error> {
    let s = c.as_cstring().map_err(Error::Cmdline)?;
    Ok(s.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_keeps_the_serial_console_and_colo_appends_its_own_entries() {
        let c = build(
            None,
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            PVH_MAX,
        )
        .unwrap();
        let t = text(&c).unwrap();
        assert!(t.starts_with("console=ttyS0 "), "{t}");
        assert!(t.ends_with(" virtio_mmio.device=4K@0xd0000000:5"), "{t}");
        let c = build(Some("  root=/dev/vda  "), &[], PVH_MAX).unwrap();
        assert_eq!(text(&c).unwrap(), "root=/dev/vda");
    }

    #[test]
    fn a_command_line_too_long_is_refused_with_the_numbers() {
        let long = "a".repeat(PVH_MAX);
        match build(Some(&long), &[], PVH_MAX) {
            Err(Error::CmdlineTooLong { len, max }) => assert_eq!((len, max), (2048, 2047)),
            other => panic!("{other:?}"),
        }
        let just = "a".repeat(PVH_MAX - 1);
        assert!(build(Some(&just), &[], PVH_MAX).is_ok());
        let e = build(Some("x"), &["y".repeat(PVH_MAX)], PVH_MAX).unwrap_err();
        assert!(e.to_string().contains("at most 2047"), "{e}");
    }

    #[test]
    fn a_command_line_with_a_control_character_is_refused() {
        assert!(matches!(
            build(Some("console=ttyS0\u{7}"), &[], PVH_MAX),
            Err(Error::Cmdline(_))
        ));
    }

    #[test]
    fn bzimage_limits_follow_the_boot_protocol() {
        assert_eq!(bzimage_max(0x020f, 2047), 2048);
        assert_eq!(bzimage_max(0x0205, 2047), 256);
    }
}
