//! Backend choice at the SYN: the app's Maglev table (computed in userspace) indexed by the
//! flow hash that userspace also knows (`FlowKey4::maglev_slot`), probing up to
//! `MAGLEV_PROBES` slots past a backend that stopped accepting.

use gateway_common::{
    DropReason,
    maps::{BACKEND_ACCEPTING, Backend4, FlowKey4, MAGLEV_PROBES, MAGLEV_SIZE},
};

use crate::maps::{BACKENDS, MAGLEV};

/// The backend for a new flow of `app_id`: its id and address.
#[inline(always)]
pub fn choose(app_id: u32, key: &FlowKey4) -> Result<(u32, Backend4), DropReason> {
    let table = MAGLEV.get_ptr(app_id).ok_or(DropReason::NoBackend)?;
    let start = key.maglev_slot();
    // Userspace predicts this choice with the same walk (gateway-userspace's `maglev::choose`):
    // a change here changes it there.
    for i in 0..MAGLEV_PROBES {
        let mut slot = start + i;
        if slot >= MAGLEV_SIZE {
            slot -= MAGLEV_SIZE;
        }
        // Verifier workaround: LLVM proves `slot < MAGLEV_SIZE` from the modulo and drops the
        // bounds check, but the verifier cannot follow its multiply-based modulo. A volatile
        // read hides the proof, so the check below stays.
        // SAFETY: reading a local.
        let slot = unsafe { core::ptr::read_volatile(&slot) };
        // SAFETY: a value pointer from the map; read-only.
        let Some(&id) = (unsafe { (*table).slots.get(slot as usize) }) else {
            break;
        };
        if id == 0 {
            break;
        }
        if let Some(backend) = BACKENDS.get(id)
            && backend.flags & BACKEND_ACCEPTING != 0
        {
            return Ok((id, *backend));
        }
    }
    Err(DropReason::NoBackend)
}

/// Whether backend `id` still takes new flows (its accepting flag, as userspace set it).
#[inline(always)]
pub fn accepting(id: u32) -> bool {
    BACKENDS
        .get(id)
        .is_some_and(|b| b.flags & BACKEND_ACCEPTING != 0)
}
