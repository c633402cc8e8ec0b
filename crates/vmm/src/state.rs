//! vCPU state for migration: registers, special registers, XSAVE (FPU/SSE/AVX), XCRs, pending
//! events and the MSRs a long-mode guest depends on (TSC first). Encoded as JSON, which keeps
//! the blob self-describing and versionable. Decoding is strict: unknown or missing fields, and
//! a KVM structure whose byte array is not exactly its size, are typed errors
//! ([`StateError`]); nothing is zero-padded or cut. [`VcpuState::check`] then checks what the
//! state asks the destination to run (see [`crate::check`]).

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;

use crate::check::{self, GuestPhys, StateError};
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
    0x1a0,       // MISC_ENABLE
    0x3b,        // TSC_ADJUST
    0x4b56_4d00, // kvmclock WALL_CLOCK_NEW
    0x4b56_4d01, // kvmclock SYSTEM_TIME_NEW
    0x4b56_4d02, // ASYNC_PF_EN
    0x4b56_4d03, // STEAL_TIME
    0x4b56_4d04, // PV_EOI_EN
];

/// IA32_TSC_DEADLINE: restored after the LAPIC (KVM ignores it unless the LAPIC timer is in
/// TSC-deadline mode), so it is kept apart from [`SAVED_MSRS`].
pub const MSR_TSC_DEADLINE: u32 = 0x6e0;

/// The MSRs of [`SAVED_MSRS`] (and [`MSR_TSC_DEADLINE`] for VMs with an in-kernel LAPIC) that
/// this host's KVM exposes (`KVM_GET_MSR_INDEX_LIST`), in save order.
pub fn msrs_to_save(sys: &kvm_ioctls::Kvm, irqchip: bool) -> Result<Vec<u32>> {
    let list = sys
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let have = list.as_slice();
    let mut v: Vec<u32> = SAVED_MSRS
        .iter()
        .copied()
        .filter(|m| have.contains(m))
        .collect();
    if irqchip && have.contains(&MSR_TSC_DEADLINE) {
        v.push(MSR_TSC_DEADLINE);
    }
    Ok(v)
}

/// Everything needed to continue a vCPU elsewhere.
#[derive(Debug, serde::Serialize)]
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
    /// The in-kernel LAPIC's registers (VMs with an in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// Multiprocessing state (running, halted, waiting for INIT/SIPI), with an irqchip.
    pub mp_state: Option<kvm_mp_state>,
}

/// [`VcpuState`] as it arrives: the KVM structures as raw byte arrays, so that their lengths
/// are checked before anything is built from them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVcpuState {
    version: u32,
    index: usize,
    regs: Vec<u8>,
    sregs: Vec<u8>,
    xsave: Vec<u8>,
    xcrs: Vec<u8>,
    events: Vec<u8>,
    msrs: Vec<(u32, u64)>,
    lapic: Option<Vec<u8>>,
    mp_state: Option<Vec<u8>>,
}

/// Builds a KVM structure from exactly `size_of::<T>()` bytes (kvm-bindings' own
/// deserializer pads or cuts, so the length is checked first).
pub(crate) fn exact<T>(what: &'static str, b: &[u8]) -> std::result::Result<T, StateError>
where
    T: for<'de> serde::Deserialize<'de>,
{
    let expected = std::mem::size_of::<T>();
    if b.len() != expected {
        return Err(StateError::Length {
            what,
            expected,
            got: b.len(),
        });
    }
    let de = serde::de::value::BytesDeserializer::<serde::de::value::Error>::new(b);
    T::deserialize(de).map_err(|e| StateError::Decode {
        what,
        reason: e.to_string(),
    })
}

/// MP states a migrated vCPU may be in (`KVM_MP_STATE_RUNNABLE` ..= `SIPI_RECEIVED`).
const MP_STATE_MAX: u32 = kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED;

/// What a destination checks a [`VcpuState`] against.
pub struct CheckEnv<'a> {
    /// The MSRs this VM saves and restores: the blob must carry exactly these.
    pub msrs: &'a [u32],
    /// Whether the VM has an in-kernel irqchip (the blob must then carry LAPIC and MP state,
    /// and must not otherwise).
    pub irqchip: bool,
    /// The vCPU's CPUID (which CR4/EFER features it may use).
    pub cpuid: &'a [kvm_bindings::kvm_cpuid_entry2],
    /// Guest memory, as received (for the RIP's page walk).
    pub mem: &'a dyn GuestPhys,
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

fn msr_list(entries: &[kvm_msr_entry]) -> Result<Msrs> {
    Msrs::from_entries(entries).map_err(|e| VmmError::State(format!("MSR list: {e:?}")))
}

/// Whether `KVM_GET_MSRS` reads MSR `index` on this vCPU.
pub fn msr_readable(fd: &VcpuFd, index: u32) -> bool {
    let Ok(mut one) = msr_list(&[kvm_msr_entry {
        index,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(fd.get_msrs(&mut one), Ok(1))
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (parked or stopped).
    /// `msrs` comes from [`msrs_to_save`]; `irqchip` says whether the VM has an in-kernel
    /// LAPIC (whose registers and the MP state are then saved too).
    pub fn save(index: usize, fd: &VcpuFd, msr_indices: &[u32], irqchip: bool) -> Result<Self> {
        let wanted: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msr_list(&wanted)?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        if n != wanted.len() {
            return Err(VmmError::State(format!(
                "KVM_GET_MSRS read {n} of {} MSRs (first refused: {:#x})",
                wanted.len(),
                wanted[n].index
            )));
        }
        let (lapic, mp_state) = if irqchip {
            (
                Some(fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?),
                Some(fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?),
            )
        } else {
            (None, None)
        };
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
            lapic,
            mp_state,
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
        // The LAPIC before the MSRs: the TSC-deadline MSR only sticks once the LAPIC timer is
        // in TSC-deadline mode (the order QEMU uses too).
        if let Some(l) = &self.lapic {
            fd.set_lapic(l).map_err(kvm("KVM_SET_LAPIC"))?;
        }
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
        if let Some(m) = self.mp_state {
            fd.set_mp_state(m).map_err(kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// Encodes to bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data always serialises")
    }

    /// Decodes bytes produced by [`VcpuState::encode`], strictly: the version this build
    /// reads, every field present and no other, each KVM structure exactly its size.
    pub fn decode(b: &[u8]) -> Result<Self> {
        Ok(Self::decode_strict(b)?)
    }

    fn decode_strict(b: &[u8]) -> std::result::Result<Self, StateError> {
        let raw: RawVcpuState = serde_json::from_slice(b).map_err(|e| StateError::Decode {
            what: "vCPU state",
            reason: e.to_string(),
        })?;
        if raw.version != STATE_VERSION {
            return Err(StateError::Version {
                what: "vCPU state",
                found: raw.version,
                supported: STATE_VERSION,
            });
        }
        Ok(VcpuState {
            version: raw.version,
            index: raw.index,
            regs: exact("kvm_regs", &raw.regs)?,
            sregs: exact("kvm_sregs", &raw.sregs)?,
            xsave: exact("kvm_xsave", &raw.xsave)?,
            xcrs: exact("kvm_xcrs", &raw.xcrs)?,
            events: exact("kvm_vcpu_events", &raw.events)?,
            msrs: raw.msrs,
            lapic: raw
                .lapic
                .map(|b| exact("kvm_lapic_state", &b))
                .transpose()?,
            mp_state: raw
                .mp_state
                .map(|b| exact("kvm_mp_state", &b))
                .transpose()?,
        })
    }

    /// Checks, before anything is restored, that this state is one the destination can run:
    /// the MSR list is exactly `env.msrs`, LAPIC and MP state are present exactly when the VM
    /// has an irqchip, CR0/CR4/EFER hold only supported bits in a valid combination, and a
    /// vCPU that will run (not waiting for INIT/SIPI) fetches from executable guest RAM.
    pub fn check(&self, env: &CheckEnv<'_>) -> std::result::Result<(), StateError> {
        let vcpu = self.index;
        check::check_msrs(vcpu, &self.msrs, env.msrs)?;
        let irq = |what| Err(StateError::Irqchip { vcpu, what });
        match (env.irqchip, self.lapic.is_some(), self.mp_state) {
            (true, true, Some(m)) if m.mp_state <= MP_STATE_MAX => {}
            (true, true, Some(_)) => return irq("unknown MP state"),
            (true, _, _) => return irq("LAPIC or MP state missing on a machine with an irqchip"),
            (false, false, None) => {}
            (false, _, _) => return irq("LAPIC or MP state for a machine without an irqchip"),
        }
        check::check_control_registers(vcpu, &self.sregs, env.cpuid)?;
        let waiting = self.mp_state.is_some_and(|m| {
            m.mp_state == kvm_bindings::KVM_MP_STATE_UNINITIALIZED
                || m.mp_state == kvm_bindings::KVM_MP_STATE_INIT_RECEIVED
                || m.mp_state == kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED
        });
        if !waiting {
            check::check_rip(vcpu, self.regs.rip, &self.sregs, env.mem)?;
        }
        Ok(())
    }
}
