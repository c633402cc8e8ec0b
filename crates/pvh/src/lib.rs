//! Boots PVH ELF kernels on real KVM.
//!
//! - `elf`: ELF32/ELF64 program headers and the `XEN_ELFNOTE_PHYS32_ENTRY` note; the writer.
//! - `boot`: the PVH boot protocol (start info, e820 map, command line) and image loading.
//! - `memory`: guest RAM below the 3 GiB hole and above 4 GiB.

pub mod boot;
pub mod elf;
pub mod error;
pub mod memory;

pub use error::{LoadError, PvhError, Result};
pub mod serial;
mod sys;
pub mod vm;

pub use serial::SerialOutput;
pub use vm::{boot, read_kernel, ExitStatus, PvhConfig, PvhVm, EXIT_PORT, MAX_VCPUS};
pub mod test_kernel;
