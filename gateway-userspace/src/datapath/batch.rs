//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH`: thousands of entries per syscall
//! instead of two syscalls per entry (`get_next_key` then `lookup`), which is what aya 0.14's
//! `HashMap::iter` does. On this VM a 1M-entry conntrack walk drops from seconds to a small
//! fraction of one (`cargo xtask bench conntrack` measures both). aya 0.14 has no batch
//! operations (the crate's other raw `bpf(2)` call is in `elem`).

use std::os::fd::{AsFd, AsRawFd};

use bytemuck::Pod;

/// `enum bpf_cmd` value of `BPF_MAP_LOOKUP_BATCH` (linux/bpf.h; Linux 5.6+).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries asked for per call. A hash map's batch never splits a bucket, so this must exceed
/// the longest bucket (a few entries); the call reports `ENOSPC` otherwise and we grow it.
const CHUNK: usize = 4096;

/// Calls `each` on every entry of the hash (or LRU hash) map behind `fd`, whose keys are `K`
/// and values `V` (sizes as the map was created). Entries added or removed during the walk may
/// or may not be seen; none is seen twice.
pub fn for_each<K: Pod, V: Pod>(
    fd: impl AsFd,
    mut each: impl FnMut(&K, &V),
) -> std::io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    let mut chunk = CHUNK;
    let mut keys = vec![K::zeroed(); chunk];
    let mut values = vec![V::zeroed(); chunk];
    // The position token: a bucket index for hash maps (4 bytes); room for 8.
    let mut token = [0u64; 2];
    let mut started = false;
    loop {
        let mut attr = BatchAttr {
            in_batch: if started { token.as_ptr() as u64 } else { 0 },
            out_batch: token[1..].as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix for this command; `keys` and `values`
        // hold `count` elements of the map's key and value sizes; the tokens are 8 bytes each.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        match err.as_ref().and_then(|e| e.raw_os_error()) {
            Some(libc::ENOSPC) if attr.count == 0 => {
                chunk *= 2;
                keys.resize(chunk, K::zeroed());
                values.resize(chunk, V::zeroed());
                continue;
            }
            None | Some(libc::ENOENT) => {}
            Some(_) => return Err(err.unwrap()),
        }
        for i in 0..attr.count as usize {
            each(&keys[i], &values[i]);
        }
        if err.is_some() {
            // ENOENT: the walk is over.
            return Ok(());
        }
        token[0] = token[1];
        started = true;
    }
}
