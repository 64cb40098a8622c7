//! Map names and map sizes. At most 15 bytes per name: the kernel truncates longer ones.

/// Per-CPU array of `u64`, indexed by [`crate::GlobalStat`] then by [`crate::DropReason`]
/// (at `GlobalStat::COUNT + reason`). Summed over CPUs by userspace at read time.
pub const GLOBAL_STATS: &str = "gw_global_v1";

/// Every map name, for checks.
pub const ALL: &[&str] = &[GLOBAL_STATS];

/// Number of slots in [`GLOBAL_STATS`].
pub const GLOBAL_STATS_LEN: u32 = crate::GlobalStat::COUNT + crate::DropReason::COUNT;

#[cfg(test)]
mod tests {
    #[test]
    fn map_names_fit_the_kernel_limit() {
        for name in super::ALL {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }
}
