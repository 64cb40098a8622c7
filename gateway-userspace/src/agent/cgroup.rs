//! The cgroup the agent attaches to: checked before anything is loaded (a cgroup v2
//! directory, not the machine's root cgroup), and found again from its id for `status`.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::AgentError;

/// cgroup2's magic number (statfs `f_type`, linux/magic.h `CGROUP2_SUPER_MAGIC`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A cgroup v2 directory, open.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// The kernel's id of the cgroup: its directory's inode number on cgroup2 (kernfs gives a
    /// node's id as its inode number on 64-bit machines), as a cgroup link reports it.
    pub id: u64,
    pub file: File,
}

impl Cgroup {
    /// Opens `path` if it is a cgroup v2 directory other than a hierarchy's root. The root is
    /// refused: attached there, the agent would see every socket of the machine. The root is
    /// the one cgroup without a `cgroup.type` file (the kernel's `CFTYPE_NOT_ON_ROOT`,
    /// Documentation/admin-guide/cgroup-v2.rst).
    pub fn open(path: &Path) -> Result<Self, AgentError> {
        let bad = |reason: &'static str| AgentError::BadCgroup {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|_| bad("no such directory"))?;
        if !meta.is_dir() {
            return Err(bad("not a directory"));
        }
        let fs = nix::sys::statfs::statfs(path).map_err(|_| bad("cannot statfs it"))?;
        if fs.filesystem_type().0 != CGROUP2_SUPER_MAGIC {
            return Err(bad(
                "not a cgroup v2 directory (cgroup v1 has no socket hooks; on a hybrid host, v2 is under /sys/fs/cgroup/unified)",
            ));
        }
        if !path.join("cgroup.type").exists() {
            return Err(bad(
                "the root cgroup: the agent attaches to a container's cgroup or a slice of them",
            ));
        }
        let file = File::open(path).map_err(AgentError::io("opening", path))?;
        Ok(Cgroup {
            path: path.canonicalize().unwrap_or_else(|_| path.to_owned()),
            id: meta.ino(),
            file,
        })
    }
}

/// The directory of the cgroup with id `id` under the machine's cgroup v2 mounts (walked
/// depth-first, at most `limit` directories), if it is there.
pub fn find_by_id(id: u64, limit: usize) -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let roots = mounts.lines().filter_map(|line| {
        // `... mount-point options ... - fstype source super-options`
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    });
    let mut seen = 0;
    for root in roots {
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > limit {
                return None;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            if meta.ino() == id {
                return Some(dir);
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_or_a_file_is_refused() {
        let err = Cgroup::open(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert!(err.to_string().contains("no such directory"), "{err}");
        let err = Cgroup::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = Cgroup::open(Path::new("/proc")).unwrap_err();
        assert!(err.to_string().contains("not a cgroup v2"), "{err}");
    }
}
