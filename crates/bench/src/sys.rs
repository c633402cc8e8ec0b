//! The crate's only `unsafe`: reading the host's time-stamp counter.

/// The host's TSC (`rdtsc`); `None` on an architecture without one.
pub fn rdtsc() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter and touches no memory; every x86-64 CPU has it
        // (CPUID.1:EDX.TSC is architectural on x86-64), and Linux leaves CR4.TSD clear, so
        // it does not fault in user mode.
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}
