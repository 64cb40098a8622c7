//! Taking one element out of a hash map atomically with `BPF_MAP_LOOKUP_AND_DELETE_ELEM`
//! (Linux 5.14+ for hash maps): the value removed is the value returned, so a caller that
//! checked an entry before removing it learns whether it removed what it checked. aya 0.14
//! offers the command for queues and stacks only.

use std::os::fd::{AsFd, AsRawFd};

use bytemuck::Pod;

/// `enum bpf_cmd` value of `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (linux/bpf.h).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The element members of `union bpf_attr` (linux/bpf.h): map fd, key, value, flags.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Removes the entry of `key` from the hash map behind `fd` (keys `K`, values `V`, sizes as the
/// map was created) and returns the value it held; `None` if there was none.
///
/// # Errors
/// The syscall's error, `ENOENT` excepted.
pub fn take<K: Pod, V: Pod>(fd: impl AsFd, key: &K) -> std::io::Result<Option<V>> {
    let mut value = V::zeroed();
    let mut attr = ElemAttr {
        map_fd: fd.as_fd().as_raw_fd() as u32,
        key: key as *const K as u64,
        value: &mut value as *mut V as u64,
        ..ElemAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for this command; `key` and `value` point to
    // one key and one value of the map's sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &mut attr as *mut ElemAttr,
            size_of::<ElemAttr>() as u32,
        )
    };
    if rc == 0 {
        return Ok(Some(value));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}
