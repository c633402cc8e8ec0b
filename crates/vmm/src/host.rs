//! What this host can hold: the bound a destination puts on the guest memory a source may
//! announce, before anything is mapped or registered with KVM.
//!
//! Guest RAM is mapped `MAP_NORESERVE` and committed page by page as it is written, but KVM
//! allocates per-memslot metadata up front and a guest that was given its RAM will use it, so
//! a destination must not accept more than the host can back. The bound is `MemAvailable +
//! SwapFree` from `/proc/meminfo`; under strict overcommit (`vm.overcommit_memory = 2`, where
//! the kernel ignores `MAP_NORESERVE` and charges every mapping) it is further capped by what
//! is left of the commit limit, `CommitLimit - Committed_AS`.

use crate::error::{Result, VmmError};

/// The host's memory figures the bound is computed from, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostMemory {
    /// `MemAvailable`.
    pub available: u64,
    /// `SwapFree`.
    pub swap_free: u64,
    /// `CommitLimit`.
    pub commit_limit: u64,
    /// `Committed_AS`.
    pub committed: u64,
    /// `/proc/sys/vm/overcommit_memory` (0 heuristic, 1 always, 2 strict).
    pub overcommit: u32,
}

impl HostMemory {
    /// Reads `/proc/meminfo` and `/proc/sys/vm/overcommit_memory`.
    pub fn read() -> Result<Self> {
        let io = |what: &str, e: std::io::Error| VmmError::Config(format!("reading {what}: {e}"));
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").map_err(|e| io("/proc/meminfo", e))?;
        let overcommit = std::fs::read_to_string("/proc/sys/vm/overcommit_memory")
            .map_err(|e| io("/proc/sys/vm/overcommit_memory", e))?;
        Self::parse(&meminfo, &overcommit)
    }

    /// Parses the two files' contents.
    pub fn parse(meminfo: &str, overcommit: &str) -> Result<Self> {
        let field = |name: &str| -> Result<u64> {
            meminfo
                .lines()
                .find_map(|l| {
                    let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                    let kib = rest.trim().strip_suffix("kB")?.trim();
                    kib.parse::<u64>().ok()
                })
                .map(|kib| kib.saturating_mul(1024))
                .ok_or_else(|| VmmError::Config(format!("/proc/meminfo has no {name} line")))
        };
        Ok(HostMemory {
            available: field("MemAvailable")?,
            swap_free: field("SwapFree")?,
            commit_limit: field("CommitLimit")?,
            committed: field("Committed_AS")?,
            overcommit: overcommit.trim().parse().map_err(|_| {
                VmmError::Config(format!("vm.overcommit_memory is {:?}", overcommit.trim()))
            })?,
        })
    }

    /// The most guest memory this host can take now, in bytes.
    pub fn guest_memory_limit(&self) -> u64 {
        let free = self.available.saturating_add(self.swap_free);
        if self.overcommit == 2 {
            free.min(self.commit_limit.saturating_sub(self.committed))
        } else {
            free
        }
    }
}

/// [`HostMemory::guest_memory_limit`] of this host now.
pub fn guest_memory_limit() -> Result<u64> {
    Ok(HostMemory::read()?.guest_memory_limit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:          500000 kB\n\
        MemAvailable:   20000000 kB\nSwapTotal:       1000000 kB\nSwapFree:         800000 kB\n\
        CommitLimit:    13000000 kB\nCommitted_AS:    9000000 kB\n";

    #[test]
    fn the_bound_is_available_plus_swap_capped_by_the_commit_limit_when_strict() {
        let h = HostMemory::parse(MEMINFO, "0\n").unwrap();
        assert_eq!(h.guest_memory_limit(), 20_800_000 * 1024);
        let h = HostMemory::parse(MEMINFO, "1").unwrap();
        assert_eq!(h.guest_memory_limit(), 20_800_000 * 1024);
        let h = HostMemory::parse(MEMINFO, "2").unwrap();
        assert_eq!(h.guest_memory_limit(), 4_000_000 * 1024);
    }

    #[test]
    fn missing_fields_are_typed_errors() {
        assert!(HostMemory::parse("MemTotal: 1 kB\n", "0").is_err());
        assert!(HostMemory::parse(MEMINFO, "x").is_err());
    }

    #[test]
    fn this_host_has_a_bound() {
        let h = HostMemory::read().unwrap();
        assert!(h.guest_memory_limit() > 0);
    }
}
