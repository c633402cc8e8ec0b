//! vCPU state for migration: registers, special registers, XSAVE (FPU/SSE/AVX), XCRs, pending
//! events and the MSRs a long-mode guest depends on (TSC first). Encoded as JSON, which keeps
//! the blob self-describing and versionable; a corrupt blob is a typed error.

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;

use crate::error::{Result, VmmError};

/// Current format version.
pub const STATE_VERSION: u32 = 1;

/// MSRs saved and restored (those KVM does not expose cannot be read and are skipped).
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // FMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
];

/// Everything needed to continue a vCPU elsewhere.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VcpuState {
    /// Format version.
    pub version: u32,
    /// vCPU index.
    pub index: usize,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// XSAVE area.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// (index, value) of each saved MSR.
    pub msrs: Vec<(u32, u64)>,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries).map_err(|e| VmmError::State(format!("MSR list: {e:?}")))
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (parked or stopped).
    pub fn save(index: usize, fd: &VcpuFd) -> Result<Self> {
        let wanted: Vec<kvm_msr_entry> = SAVED_MSRS
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&wanted)?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            version: STATE_VERSION,
            index,
            regs: fd.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            events: fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    /// Writes this state into a vCPU that is not running. `xsave_bytes` is the VM's
    /// `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)` (0 when the capability is absent).
    pub fn restore(&self, fd: &VcpuFd, xsave_bytes: usize) -> Result<()> {
        if self.version != STATE_VERSION {
            return Err(VmmError::State(format!(
                "vCPU state version {} (this build reads {STATE_VERSION})",
                self.version
            )));
        }
        fd.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        crate::sys::set_xsave(fd, &self.xsave, xsave_bytes)?;
        fd.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = msr_list(&entries)?;
        let n = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != entries.len() {
            return Err(VmmError::State(format!(
                "KVM_SET_MSRS accepted {n} of {} MSRs (first refused: {:#x})",
                entries.len(),
                entries[n].index
            )));
        }
        fd.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Encodes to bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data always serialises")
    }

    /// Decodes bytes produced by [`VcpuState::encode`].
    pub fn decode(b: &[u8]) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| VmmError::State(e.to_string()))
    }
}
