//! Boots PVH ELF kernels on real KVM: the boot protocol QEMU (`-kernel`), Cloud Hypervisor and
//! Firecracker-style VMMs use, with the platform such kernels rely on, plus the project's own
//! PVH test kernel. See `docs/pvh.md`.
//!
//! - [`elf`]: ELF32/ELF64 program headers, the `XEN_ELFNOTE_PHYS32_ENTRY` note; the writer.
//! - [`mod@boot`]: the PVH boot protocol (start info, e820 map, command line) and image loading.
//! - [`memory`]: guest RAM below the 3 GiB MMIO hole and above 4 GiB.
//! - [`serial`]: the 16550 UART on 0x3f8 (vm-superio) and where its output goes.
//! - [`vm`]: the KVM VM (in-kernel irqchip and PIT, CPUID, vCPU threads with a kick, the exit
//!   port, APs waiting for INIT/SIPI).
//! - [`test_kernel`]: the run-time assembled PVH test kernel (iced-x86; ring-3 workload).
//! - `sys`: the crate's only `unsafe` code (memslots, `immediate_exit`, the kick signal).
//!
//! ```no_run
//! use std::time::Duration;
//! use pvh::test_kernel::{self, Cmdline, TestKernelParams};
//!
//! let kernel = test_kernel::build(&TestKernelParams::default())?;
//! let cfg = pvh::PvhConfig {
//!     cmdline: Cmdline { cpus: 2, exit: 3, ..Cmdline::default() }.render(),
//!     vcpus: 2,
//!     ..pvh::PvhConfig::new(kernel)
//! };
//! let mut vm = pvh::boot(&cfg)?;
//! let status = vm.run_until_exit(Some(Duration::from_secs(10)))?;
//! assert_eq!(status, pvh::ExitStatus::PowerOff(3));
//! print!("{}", String::from_utf8_lossy(&vm.serial_output()));
//! # Ok::<(), pvh::PvhError>(())
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod boot;
pub mod elf;
pub mod error;
pub mod memory;
pub mod serial;
mod sys;
pub mod test_kernel;
pub mod vm;

pub use error::{LoadError, PvhError, Result};
pub use serial::SerialOutput;
pub use vm::{boot, read_kernel, ExitStatus, PvhConfig, PvhVm, SerialInput, EXIT_PORT, MAX_VCPUS};
