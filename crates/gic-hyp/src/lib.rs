//! A GICv4.1 hypervisor driver written against the [`gic`] model the way Linux's
//! `irq-gic-v3-its.c` / `irq-gic-v4.c` and KVM's `vgic-v4.c` drive real hardware: only through
//! MMIO, ITS commands and tables in memory. On top of it, the virtual GIC a guest sees (the KVM
//! side of the GICv4.1 series), and a simulation comparing GICv3, GICv4.0-style and GICv4.1
//! interrupt delivery.
//!
//! Module map:
//! - [`host`]: [`Host`], the host GIC driver: boot (LPIs, ITS tables, shared vPE tables),
//!   command queues, LPI allocation, per-redistributor locks.
//! - [`vm`]: [`Vm`], one VM's vPEs: allocation, VMAPP on every ITS, residency (vcpu
//!   load/put with the Dirty handshake and doorbell requests), doorbells, VMOVP, vLPI
//!   mapping, register-based invalidation, vSGI configuration and pending state.
//! - [`vgic`]: [`VGic`], the guest-visible distributor/redistributor SGI state: nASSGIcap /
//!   nASSGIreq, switching SGIs between software and hardware, SGI register routing,
//!   ICC_SGI1R dispatch, save/restore.
//! - [`vcpuif`]: [`VcpuIf`], emulated interrupts through list registers (ICH_*_EL2): inject,
//!   load/put (save/restore across vCPU migration), the maintenance interrupt handler.
//! - [`sim`]: `gic-sim`, N vCPUs over M pCPUs in three delivery modes.
//!
//! ```
//! use std::sync::Arc;
//! use gic::regs::*;
//! use gic::IcvReg;
//! use gic_hyp::{Host, HostParams, VGic, Vm, VmParams};
//!
//! let host = Arc::new(Host::boot(HostParams::default()).unwrap());
//! let vm = Vm::create(Arc::clone(&host), VmParams::default()).unwrap();
//! let vgic = VGic::new(vm, true);
//! // The guest makes its SGIs Group 1 and enabled, then asks for active-less SGIs.
//! vgic.sgi_write(1, GICR_IGROUPR0, 0xFFFF).unwrap();
//! vgic.sgi_write(1, GICR_ISENABLER0, 0xFFFF).unwrap();
//! vgic.gicd_write_ctlr(GICD_CTLR_ENABLE_G1 | GICD_CTLR_NASSGIREQ).unwrap();
//! vgic.vcpu_load(1, 2).unwrap();
//! {
//!     let mut g = host.gic();
//!     g.icv_write(2, IcvReg::Pmr, 0xff).unwrap();
//!     g.icv_write(2, IcvReg::Igrpen1, 1).unwrap();
//! }
//! // vCPU 0 sends SGI 3 to vCPU 1: one GITS_SGIR write, nothing to inject in software.
//! assert!(vgic.dispatch_sgi1r(0, (3 << 24) | 0b10).unwrap().is_empty());
//! assert_eq!(host.gic().icv_read(2, IcvReg::Iar1).unwrap(), 3);
//! ```
//!
//! Locking follows the series' fixes: a per-vPE lock pins a vPE's redistributor
//! (`col_idx`) for every redistributor access and for affinity changes (f3a059219bc7), and a
//! per-redistributor lock serialises invalidations and VSGIPENDR reads on one redistributor
//! (9058a4e98064). Lock order: vPE lock, then redistributor lock, then the model.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod host;
pub mod sim;
pub mod vcpuif;
pub mod vgic;
pub mod vm;

use std::sync::{Mutex, MutexGuard};

use gic::{ItsCommandError, MmioError};
use thiserror::Error;

pub use host::{Host, HostInfo, HostParams};
pub use vcpuif::{VcpuIf, VcpuIfState};
pub use vgic::{SgiDebug, VGic, VgicState};
pub use vm::{DoorbellStyle, Vm, VmParams};

/// A driver operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HypError {
    /// The model rejected an MMIO access the driver made.
    #[error("MMIO access at {addr:#x} failed: {source}")]
    Mmio {
        /// Address accessed.
        addr: u64,
        /// Why.
        source: MmioError,
    },
    /// An ITS recorded an error for a command the driver sent.
    #[error("ITS {its} rejected a command: {error}")]
    Command {
        /// ITS index.
        its: usize,
        /// The recorded error.
        error: ItsCommandError,
    },
    /// A poll (CREADR, SYNCR, VPENDBASER.Dirty, VSGIPENDR.Busy) did not finish in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Host memory for tables ran out.
    #[error("host table memory exhausted ({0} bytes requested)")]
    OutOfMemory(u64),
    /// No vPEID or LPI left.
    #[error("no free {0} left")]
    Exhausted(&'static str),
    /// The GIC has no GICv4.1 support.
    #[error("the GIC does not implement GICv4.1 (VLPIS/RVPEID/VMAPP)")]
    NotV41,
    /// The GIC cannot deliver vSGIs (no nASSGIcap / GITS_TYPER.VSGI).
    #[error("the GIC cannot deliver vSGIs")]
    NoVsgi,
    /// A vCPU index is out of range.
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(usize),
    /// A physical CPU index is out of range.
    #[error("physical CPU {0} does not exist")]
    NoSuchPcpu(usize),
    /// A guest register value or argument is invalid.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// Building the model failed.
    #[error("model configuration: {0}")]
    Config(#[from] gic::ConfigError),
    /// The guest's virtual CPU interface rejected an access.
    #[error("virtual CPU interface: {0}")]
    Vcpu(#[from] gic::VcpuError),
}

/// Takes a lock, recovering the data if another thread panicked while holding it (the data
/// protected here stays consistent at every await-free step).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}
