//! The daemon's bpffs directory: where the datapath's maps and links are pinned so that they
//! outlive the process (a restart keeps every connection), locked so that one daemon uses it,
//! and removed by `gateway down`.

use std::path::Path;

use tracing::info;

use super::DaemonError;
use crate::datapath;

/// bpffs's magic number (statfs `f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

fn create_dir(dir: &Path) -> Result<(), DaemonError> {
    std::fs::create_dir_all(dir).map_err(DaemonError::io("creating", dir))
}

fn mount(at: &Path) -> Result<(), DaemonError> {
    nix::mount::mount(
        Some("bpf"),
        at,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| DaemonError::Mount {
        path: at.to_owned(),
        source,
    })?;
    info!(path = %at.display(), "mounted a bpffs");
    Ok(())
}

/// Makes `dir` a directory on a bpffs: as it is when it already is one; under its parent when
/// the parent is a bpffs (mounting one on /sys/fs/bpf first when that is where it goes and
/// nothing is mounted there, as under `ip netns exec`); else a bpffs mounted on `dir` itself,
/// which must then be new or empty ([`DaemonError::NotEmpty`]: a mount would hide its files).
pub fn ensure_bpffs(dir: &Path) -> Result<(), DaemonError> {
    if dir.is_dir() && on_bpffs(dir) {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    match parent {
        Some(p) if p.is_dir() && on_bpffs(p) => {}
        Some(p) if p == Path::new("/sys/fs/bpf") && p.is_dir() => mount(p)?,
        _ => {
            let holds_files = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some());
            if holds_files {
                return Err(DaemonError::NotEmpty {
                    path: dir.to_owned(),
                });
            }
            create_dir(dir)?;
            return mount(dir);
        }
    }
    create_dir(dir)
}

/// `gateway down` when no daemon answers: removes the pins in `dir` (detaching the programs,
/// dropping every flow), then the directory, unmounting it if it is a bpffs of its own.
/// Returns the names of the pins removed.
pub fn remove_datapath(dir: &Path) -> Result<Vec<String>, DaemonError> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let removed =
        datapath::remove_pins(dir).map_err(DaemonError::io("removing the pins in", dir))?;
    let own_mount = dir.parent().is_some_and(|p| !on_bpffs(p)) && on_bpffs(dir);
    if own_mount {
        nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
            DaemonError::Unmount {
                path: dir.to_owned(),
                source,
            }
        })?;
    }
    // Left in place if something else is in it.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// Locks `dir` (flock on the directory) for the life of the returned file: one daemon per pin
/// directory.
pub fn lock(dir: &Path) -> Result<std::fs::File, DaemonError> {
    let io = |what| DaemonError::io(what, dir);
    let file = std::fs::File::open(dir).map_err(io("opening"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DaemonError::PinsInUse {
            path: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(e)) => Err(io("locking")(e)),
    }
}
