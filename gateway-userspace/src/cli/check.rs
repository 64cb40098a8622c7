//! `gateway check`: loads the datapath into the kernel (the verifier passes every program)
//! and reads its counters, without attaching anything.

use super::CliError;
use crate::datapath::{Datapath, TC_PROGRAM, XDP_PROGRAM};

pub(super) fn run() -> Result<(), CliError> {
    let datapath = Datapath::load().map_err(|source| CliError::Load { source })?;
    // Reading the counters proves the maps are usable, not only created.
    datapath
        .global_stats()
        .map_err(|source| CliError::Counters { source })?;
    println!(
        "datapath loaded and verified: programs {XDP_PROGRAM} and {TC_PROGRAM}, maps {}",
        gateway_common::maps::ALL.join(", ")
    );
    if let Ok(counts) = datapath.verified_instructions() {
        let counts: Vec<String> = counts
            .iter()
            .filter_map(|(name, n)| n.map(|n| format!("{name} {n}")))
            .collect();
        if !counts.is_empty() {
            println!(
                "instructions the verifier processed (of at most 1000000): {}",
                counts.join(", ")
            );
        }
    }
    Ok(())
}
