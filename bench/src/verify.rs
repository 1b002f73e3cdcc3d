//! Checks a replicated VMDK against its source: byte for byte through the flat extent, and
//! with `qemu-img check` and `qemu-img compare` when qemu-img is installed.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Compares two files byte for byte; the error names the first differing offset.
pub fn files_equal(a: &Path, b: &Path) -> Result<()> {
    let (mut fa, mut fb) = (
        File::open(a).with_context(|| format!("opening {}", a.display()))?,
        File::open(b).with_context(|| format!("opening {}", b.display()))?,
    );
    let (la, lb) = (fa.metadata()?.len(), fb.metadata()?.len());
    if la != lb {
        bail!("{} is {la} bytes, {} is {lb}", a.display(), b.display());
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut at = 0u64;
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(());
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            bail!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                at + i as u64
            );
        }
        at += n as u64;
    }
}

/// Whether qemu-img can be run here.
pub fn have_qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `qemu-img check` of a VMDK; the error carries qemu-img's output.
pub fn qemu_check(vmdk: &Path) -> Result<()> {
    let o = Command::new("qemu-img")
        .args(["check", "-f", "vmdk"])
        .arg(vmdk)
        .output()?;
    if !o.status.success() {
        bail!(
            "qemu-img check {}: {}{}",
            vmdk.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// `qemu-img create` of a zero-filled monolithicFlat VMDK of `size` bytes.
pub fn qemu_create_flat_vmdk(vmdk: &Path, size: u64) -> Result<()> {
    let o = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
        ])
        .arg(vmdk)
        .arg(size.to_string())
        .output()?;
    if !o.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// `qemu-img compare` of a VMDK against a raw image: "Images are identical".
pub fn qemu_compare(vmdk: &Path, raw: &Path) -> Result<()> {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "vmdk", "-F", "raw"])
        .arg(vmdk)
        .arg(raw)
        .output()?;
    if !o.status.success() {
        bail!(
            "qemu-img compare {} {}: {}{}",
            vmdk.display(),
            raw.display(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}
