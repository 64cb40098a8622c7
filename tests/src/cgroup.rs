//! Child cgroups v2 for tests (`gateway agent`'s): one per test under the machine's cgroup v2
//! mount, named `gwt<pid>x<n>-<role>` like the harness's namespaces, removed on drop with
//! whatever process is still in it (the tests' own servers). Never the root cgroup itself.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::netns::{PREFIX, unique_prefix};

/// Where the machine's cgroup v2 hierarchy is mounted: /sys/fs/cgroup/unified on a hybrid
/// host (as here), else /sys/fs/cgroup itself.
pub fn cgroup2_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

/// A child cgroup, removed on drop (its processes killed first).
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    /// Creates `gwt<pid>x<n>-<role>` under [`cgroup2_root`], after removing those left by test
    /// processes that are gone.
    #[track_caller]
    pub fn new(role: &str) -> Self {
        sweep_stale();
        let path = cgroup2_root().join(format!("{}-{role}", unique_prefix()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        CgroupGuard { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pids in the cgroup now.
    pub fn pids(&self) -> Vec<i32> {
        pids(&self.path)
    }
}

fn pids(path: &Path) -> Vec<i32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Kills every process in the cgroup at `path` (moving out those that do not die), then
/// removes it. Never panics (it runs in `Drop`).
fn remove(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = pids(path);
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            // Out to the parent, so that the directory can go.
            if let Some(parent) = path.parent() {
                for pid in pids {
                    let _ = fs::write(parent.join("cgroup.procs"), pid.to_string());
                }
            }
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a plain pid and signal.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_dir(path);
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        remove(&self.path);
    }
}

/// Removes the test cgroups of processes that are gone.
fn sweep_stale() {
    let Ok(entries) = fs::read_dir(cgroup2_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists()) {
            remove(&entry.path());
        }
    }
}
