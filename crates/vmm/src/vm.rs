//! Building a VM in the order KVM requires: dirty ring (or manual protect) before memslots
//! and vCPUs, memslots before page tables, vCPUs last. [`Vm::create`] does every step, so the
//! wrong order cannot be expressed.

use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_regs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_dirty::bitmap::{enable_manual_protect, ManualProtect};
use kvm_dirty::{
    enable_dirty_ring, BitmapTracker, ClearLogTracker, DirtyTracker, MmapRing, RingCapability,
    RingSet, RingTracker, TrackerMode,
};
use kvm_ioctls::{Kvm, VmFd};

use crate::devices::{Devices, SerialOutput, COM1_GSI};
use crate::error::{Result, VmmError};
use crate::guest::{self, VcpuCtrl};
use crate::logging::{DirtyLogGuard, DirtyLogging, LoggedTracker};
use crate::machine::{MachineState, Platform, MMIO_HOLE_END, MMIO_HOLE_START};
use crate::memory::{GuestRam, RamBacking, RegionSpec};
use crate::stats::KvmStats;
use crate::vcpu::{RingFullHook, VcpuShared, Vcpus};
use crate::x86::{self, CODE_GPA, CTRL_GPA, MAX_VCPUS};

/// `rate_pages_per_s` of [`Vm::set_dirty_workload`] for a guest that writes as fast as it can.
pub const UNPACED: u64 = u64::MAX;

/// Dirty tracking the VM is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Tracking {
    /// Per-vCPU dirty rings of this many entries.
    Ring {
        /// Entries per vCPU ring.
        entries: u32,
    },
    /// `KVM_GET_DIRTY_LOG`.
    Bitmap,
    /// Manual protect + `KVM_CLEAR_DIRTY_LOG`.
    ClearLog,
}

impl Tracking {
    /// The tracker mode.
    pub fn mode(self) -> TrackerMode {
        match self {
            Tracking::Ring { .. } => TrackerMode::Ring,
            Tracking::Bitmap => TrackerMode::Bitmap,
            Tracking::ClearLog => TrackerMode::ClearLog,
        }
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Guest RAM regions besides the system region (slot 0 at GPA 0, 4 MiB, always present).
    pub memory: Vec<RegionSpec>,
    /// Dirty tracking.
    pub tracking: Tracking,
}

/// A VM with guest memory, page tables, the workload program and created (not yet running)
/// vCPUs.
pub struct Vm {
    // Drop order matters: vCPUs (threads joined, fds closed), the rings, then the VM fd, and the
    // guest memory last, so KVM never sees a slot whose mapping is gone while a vCPU can run.
    vcpus: Option<Vcpus>,
    created: Vec<Arc<VcpuShared>>,
    /// Each vCPU's binary statistics, opened once at creation (the vCPU thread holds the
    /// vCPU fd while it runs); the reason where they could not be.
    stats: Vec<std::result::Result<KvmStats, String>>,
    logging: Arc<DirtyLogging>,
    ring: Option<Arc<RingSet>>,
    manual: Option<ManualProtect>,
    ring_cap: Option<RingCapability>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    config: VmConfig,
    platform: Platform,
    devices: Option<Arc<Devices>>,
    msrs: Vec<u32>,
    ram: Arc<GuestRam>,
}

/// The KVM vCPU statistic [`Vm::guest_faults`] sums: `pf_taken`, every page fault KVM's MMU
/// handled for the guest (`kvm_mmu_page_fault`), whether fixed on the fast path (`pf_fast`:
/// a write-protect fault of dirty logging), by installing a mapping (`pf_fixed`), by
/// emulation or found spurious. It is the count that includes the write-protect faults that
/// re-protecting a pass's pages costs the guest.
pub const GUEST_FAULTS_STAT: &str = "pf_taken";

/// KVM's real-mode TSS area on the PVH platform (three pages in the MMIO hole, not RAM; Intel
/// VMX needs it inside the 4 GiB space).
const TSS_ADDR: usize = 0xfffb_d000;

/// CPUID.1:ECX bit 24: the LAPIC timer's TSC-deadline mode.
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 13: CMPXCHG16B.
const CPUID1_ECX_CX16: u32 = 1 << 13;
/// KVM's paravirtual features (CPUID 0x40000001 EAX) that a guest uses through hypercalls:
/// PV_UNHALT (7, `KVM_HC_KICK_CPU`), PV_SEND_IPI (11), PV_SCHED_YIELD (13) and
/// HC_MAP_GPA_RANGE (16).
const KVM_PV_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13) | (1 << 16);

/// The PVH platform's changes to the CPUID KVM supports (besides the APIC IDs):
/// - the TSC-deadline bit when KVM emulates it (KVM leaves advertising it to the VMM);
/// - CMPXCHG16B off: PVM hosts cannot emulate `lock cmpxchg16b` at guest CPL0, and it is the
///   one CPUID bit of theirs a VMM can clear; a guest loses only a fast path without it;
/// - KVM's hypercall-based PV features off: `VMCALL` at guest CPL0 never completes on a PVM
///   host (RIP stays on it), so e.g. Linux's PV IPIs would hang its SMP boot. The PV clock,
///   PV EOI and steal time (MSR-based) stay.
pub fn pvh_cpuid(c: &mut kvm_bindings::CpuId, tsc_deadline: bool) {
    for e in c.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                if tsc_deadline {
                    e.ecx |= CPUID1_ECX_TSC_DEADLINE;
                }
                e.ecx &= !CPUID1_ECX_CX16;
            }
            0x4000_0001 => e.eax &= !KVM_PV_HYPERCALL_FEATURES,
            _ => {}
        }
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("config", &self.config).finish()
    }
}

/// Opens `/dev/kvm` with a typed error.
pub fn open_kvm() -> Result<Kvm> {
    Kvm::new().map_err(|source| VmmError::NoKvm { source })
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

impl Vm {
    /// Creates the VM, its memory and its vCPUs (loaded with the workload program, parked
    /// before their first instruction until [`Vm::start`]).
    pub fn create(config: &VmConfig) -> Result<Vm> {
        Self::build(config, None, RamBacking::default())
    }

    /// [`Vm::create`] with guest RAM backed as `backing` asks (the default is transparent huge
    /// pages where the host offers them).
    pub fn create_with_backing(config: &VmConfig, backing: RamBacking) -> Result<Vm> {
        Self::build(config, None, backing)
    }

    /// Creates a PVH-platform VM: `config.memory` is all of its RAM (no system region; no
    /// region may overlap the 3-4 GiB MMIO hole), with KVM's in-kernel LAPIC/IOAPIC/PIC and PIT,
    /// COM1 writing to `serial`, and the power-off port. The vCPUs are at their reset state
    /// (with CPUID and an initialised FPU); the caller sets the boot vCPU's entry state and
    /// the other vCPUs' MP state, or restores migrated state.
    pub fn create_pvh(config: &VmConfig, serial: &SerialOutput) -> Result<Vm> {
        Self::build(config, Some(serial), RamBacking::default())
    }

    fn build(config: &VmConfig, pvh: Option<&SerialOutput>, backing: RamBacking) -> Result<Vm> {
        let platform = if pvh.is_some() {
            Platform::Pvh
        } else {
            Platform::Workload
        };
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "vcpus must be in 1..={MAX_VCPUS}, got {}",
                config.vcpus
            )));
        }
        if let Some(r) = config.memory.iter().find(|r| {
            platform == Platform::Pvh && r.gpa < MMIO_HOLE_END && r.end() > MMIO_HOLE_START
        }) {
            return Err(VmmError::Config(format!(
                "region [{:#x}, {:#x}) overlaps the MMIO hole [{MMIO_HOLE_START:#x}, {MMIO_HOLE_END:#x})",
                r.gpa,
                r.end()
            )));
        }
        if let Some(r) = config
            .memory
            .iter()
            .find(|r| platform == Platform::Workload && (r.slot == 0 || r.gpa < x86::SYSTEM_BYTES))
        {
            return Err(VmmError::Config(format!(
                "region at {:#x} (slot {}) collides with the system region (slot 0, below {:#x})",
                r.gpa,
                r.slot,
                x86::SYSTEM_BYTES
            )));
        }
        let kvm = open_kvm()?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // 1. Tracking capabilities that must precede slots and vCPUs.
        let (ring_cap, manual) = match config.tracking {
            Tracking::Ring { entries } => (Some(enable_dirty_ring(&vm, entries, 0)?), None),
            Tracking::ClearLog => (None, Some(enable_manual_protect(&vm)?)),
            Tracking::Bitmap => (None, None),
        };
        // 2. The PVH platform's in-kernel irqchip and PIT (before any vCPU).
        let mut devices = None;
        if let Some(serial) = pvh {
            vm.set_tss_address(TSS_ADDR)
                .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
            vm.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            vm.create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
            let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| VmmError::Config(format!("eventfd: {e}")))?;
            vm.register_irqfd(&irq, COM1_GSI)
                .map_err(kvm_err("KVM_IRQFD"))?;
            devices = Some(Arc::new(Devices::new(serial, irq)?));
        }
        // 3. Memory and memslots.
        let mut specs = Vec::new();
        if platform == Platform::Workload {
            specs.push(x86::system_region());
        }
        specs.extend_from_slice(&config.memory);
        let ram = Arc::new(GuestRam::with_backing(&specs, backing)?);
        // Dirty logging stays off until a user needs it (`Vm::dirty_logging`).
        let mut logging = DirtyLogging::register(vm.clone(), ram.clone())?;
        // 4. Tables and program (workload machine).
        if platform == Platform::Workload {
            x86::write_gdt(&ram)?;
            x86::build_page_tables(&ram)?;
            let code = guest::dirty_workload(CODE_GPA)?;
            ram.write(CODE_GPA, &code)?;
        }
        // 5. vCPUs.
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
        let mut msrs = crate::state::msrs_to_save(&kvm, platform.has_irqchip())?;
        let mut created = Vec::with_capacity(config.vcpus);
        let mut rings = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm
                .create_vcpu(i as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut c = x86::vcpu_cpuid(cpuid.clone(), i as u32);
            if platform == Platform::Pvh {
                pvh_cpuid(&mut c, tsc_deadline);
            }
            fd.set_cpuid2(&c).map_err(kvm_err("KVM_SET_CPUID2"))?;
            if platform == Platform::Pvh {
                // x87 control word and MXCSR as after FNINIT / reset (all exceptions masked).
                let fpu = kvm_fpu {
                    fcw: 0x37f,
                    mxcsr: 0x1f80,
                    ..Default::default()
                };
                fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
                if let Some(cap) = ring_cap {
                    rings.push(MmapRing::map(&fd, cap.size.entries()).map_err(|e| {
                        VmmError::Dirty(kvm_dirty::DirtyError::RingMmap { vcpu: i, source: e })
                    })?);
                }
                created.push(Arc::new(VcpuShared::new(i, fd)));
                continue;
            }
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&x86::long_mode_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            let regs = kvm_regs {
                rip: CODE_GPA,
                rsp: x86::stack_top(i),
                rflags: x86::RFLAGS_IOPL3,
                rdi: CTRL_GPA,
                rsi: guest::vcpu_ctrl_gpa(i),
                r8: 0x9e37_79b9_7f4a_7c15 ^ ((i as u64 + 1) * 0x1234_5678_9abc_def1),
                ..Default::default()
            };
            fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
            if let Some(cap) = ring_cap {
                rings.push(MmapRing::map(&fd, cap.size.entries()).map_err(|e| {
                    VmmError::Dirty(kvm_dirty::DirtyError::RingMmap { vcpu: i, source: e })
                })?);
            }
            created.push(Arc::new(VcpuShared::new(i, fd)));
        }
        let ring = match ring_cap {
            Some(cap) => Some(Arc::new(RingSet::new(
                vm.clone(),
                cap,
                &ram.slot_specs(),
                rings,
                Some(ram.vmm_log().clone()),
            )?)),
            None => None,
        };
        logging.set_ring(ring.clone());
        // Keep only the MSRs this host's KVM reads for this vCPU configuration (one listed
        // in KVM_GET_MSR_INDEX_LIST may still be refused, e.g. a PV MSR without its CPUID
        // bit), so saving never fails on one of them.
        if let Some(v0) = created.first() {
            let fd = v0.fd();
            msrs.retain(|&m| crate::state::msr_readable(&fd, m));
        }
        let stats = created
            .iter()
            .map(|v| KvmStats::open_vcpu(&v.fd()).map_err(|e| e.to_string()))
            .collect();
        Ok(Vm {
            vcpus: None,
            created,
            stats,
            logging: Arc::new(logging),
            ring,
            manual,
            ring_cap,
            vm,
            _kvm: kvm,
            config: config.clone(),
            platform,
            devices,
            msrs,
            ram,
        })
    }

    /// Which machine this is.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// The PVH platform's port-I/O devices (console, power-off).
    pub fn devices(&self) -> Option<&Arc<Devices>> {
        self.devices.as_ref()
    }

    /// Saves the VM-wide device state of a PVH machine (vCPUs paused); `None` for the
    /// workload machine, which has none.
    pub fn save_machine(&self) -> Result<Option<MachineState>> {
        match &self.devices {
            Some(d) => Ok(Some(MachineState::save(&self.vm, d, self.tsc_khz().ok())?)),
            None => Ok(None),
        }
    }

    /// Restores the interrupt controllers, PIT and UART of a PVH machine (before
    /// [`Vm::restore_vcpus`]).
    pub fn restore_machine_devices(&self, st: &MachineState) -> Result<()> {
        let d = self.devices.as_ref().ok_or_else(|| {
            VmmError::State("machine state for a VM without the PVH platform".into())
        })?;
        if let Some(khz) = st.tsc_khz {
            for v in &self.created {
                let fd = v.fd();
                if fd.get_tsc_khz().ok() != Some(khz) {
                    fd.set_tsc_khz(khz).map_err(|e| {
                        VmmError::State(format!(
                            "this host cannot run the guest's TSC at {khz} kHz (KVM_SET_TSC_KHZ: {e})"
                        ))
                    })?;
                }
            }
        }
        st.restore_devices(&self.vm, d)
    }

    /// Restores the KVM clock of a PVH machine (after the vCPUs, just before they run).
    pub fn restore_machine_clock(&self, st: &MachineState) -> Result<()> {
        st.restore_clock(&self.vm)
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Guest memory.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The VM fd.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The ring set (ring tracking only).
    pub fn ring_set(&self) -> Option<&Arc<RingSet>> {
        self.ring.as_ref()
    }

    /// The ring capability in use (ring tracking only).
    pub fn ring_capability(&self) -> Option<RingCapability> {
        self.ring_cap
    }

    /// Adds a user of dirty logging: while the guard lives, every trackable memslot
    /// (`RegionSpec::log_dirty`) is registered with `KVM_MEM_LOG_DIRTY_PAGES`. Logging is off
    /// from boot and goes off again (rings drained and discarded) when the last guard drops.
    /// Trackers from [`Vm::tracker`] hold one from `start` to `stop`; dirty-rate measurements
    /// and the dirty limiter hold one while they run.
    pub fn dirty_logging(&self) -> Result<DirtyLogGuard> {
        self.logging.acquire()
    }

    /// Users of dirty logging right now (0 = memslots registered without the flag).
    pub fn dirty_logging_users(&self) -> usize {
        self.logging.users()
    }

    /// `(slot, flags)` of every memslot as this VMM last passed them to
    /// `KVM_SET_USER_MEMORY_REGION` (KVM has no ioctl that reads a slot's flags back).
    pub fn memslot_flags(&self) -> Vec<(u16, u32)> {
        self.logging.slot_flags()
    }

    /// A dirty tracker of the VM's mode over every slot, with VMM writes merged in. It turns
    /// dirty logging on in `start` and releases it in `stop` (or when dropped).
    pub fn tracker(&self) -> Result<Box<dyn DirtyTracker>> {
        let inner = self.raw_tracker()?;
        Ok(Box::new(LoggedTracker::new(inner, self.logging.clone())))
    }

    fn raw_tracker(&self) -> Result<Box<dyn DirtyTracker>> {
        let slots = self.ram.slot_specs();
        let log = Some(self.ram.vmm_log().clone());
        Ok(match self.config.tracking {
            Tracking::Ring { .. } => Box::new(RingTracker::new(
                self.ring.clone().expect("ring VMs have a ring set"),
            )),
            Tracking::Bitmap => Box::new(BitmapTracker::new(self.vm.clone(), &slots, log)?),
            Tracking::ClearLog => Box::new(ClearLogTracker::new(
                self.vm.clone(),
                self.manual.expect("clear-log VMs have manual protect"),
                &slots,
                log,
            )?),
        })
    }

    /// Sets the iteration value the workload writes.
    pub fn set_iteration(&self, v: u64) -> Result<()> {
        self.ram.write_u64(CTRL_GPA + guest::CTRL_ITERATION, v)
    }

    /// Sets or clears the stop flag (vCPUs park at their sync point while it is set).
    pub fn set_stop(&self, stop: bool) -> Result<()> {
        self.ram
            .write_u64(CTRL_GPA + guest::CTRL_STOP, u64::from(stop))
    }

    /// Configures vCPU `i`'s workload.
    pub fn set_workload(&self, i: usize, ctrl: &VcpuCtrl) -> Result<()> {
        for (off, v) in ctrl.fields() {
            self.ram.write_u64(guest::vcpu_ctrl_gpa(i) + off, v)?;
        }
        Ok(())
    }

    /// Writes vCPU `i` has done so far.
    pub fn nr_writes(&self, i: usize) -> Result<u64> {
        self.ram
            .read_u64(guest::vcpu_ctrl_gpa(i) + guest::off::NR_WRITES)
    }

    /// Resets vCPU `i`'s write counter (a tracked VMM write).
    pub fn reset_nr_writes(&self, i: usize) -> Result<()> {
        self.ram
            .write_u64(guest::vcpu_ctrl_gpa(i) + guest::off::NR_WRITES, 0)
    }

    /// The guest TSC frequency in kHz (for pacing guest work in TSC ticks).
    pub fn tsc_khz(&self) -> Result<u32> {
        self.created[0]
            .fd()
            .get_tsc_khz()
            .map_err(kvm_err("KVM_GET_TSC_KHZ"))
    }

    /// Configures every vCPU to dirty its share of `[base, base + pages)` at `rate` pages/s
    /// in total, with unique values so every write changes memory. [`UNPACED`] runs as fast
    /// as the vCPUs can; 0 is an idle guest (one write per second per vCPU, so it still shows
    /// progress, sleeping in between).
    pub fn set_dirty_workload(
        &self,
        base: u64,
        pages: u64,
        pattern: guest::Pattern,
        rate_pages_per_s: u64,
    ) -> Result<()> {
        self.set_split_workload(base, pages, pattern, rate_pages_per_s, self.created.len())
    }

    /// Like [`Vm::set_dirty_workload`], but only the first `dirtying` vCPUs dirty the working
    /// set; the others run a compute loop that rewrites one page of their own (their progress
    /// counter then measures how much CPU they get, e.g. under a throttle).
    pub fn set_split_workload(
        &self,
        base: u64,
        pages: u64,
        pattern: guest::Pattern,
        rate_pages_per_s: u64,
        dirtying: usize,
    ) -> Result<()> {
        let dirtying = dirtying.clamp(1, self.created.len());
        let n = dirtying as u64;
        let per = (pages / n).max(1);
        let tsc_hz = u64::from(self.tsc_khz()?) * 1000;
        for i in dirtying..self.created.len() {
            // One page of the vCPU's (otherwise unused) stack area in the system region.
            let page = x86::stack_top(i) & !0xfff;
            self.set_workload(
                i,
                &VcpuCtrl {
                    base: page,
                    pages: 1,
                    stride: 1,
                    pattern: guest::Pattern::Sequential,
                    unique_values: true,
                    burst_pages: 0,
                    burst_tsc: 0,
                    sleep_min_tsc: 0,
                },
            )?;
        }
        for i in 0..dirtying {
            let per_vcpu_rate = (rate_pages_per_s / n).max(1);
            // Bursts of about 1 ms of work; sleep in the VMM when 200 us or more ahead.
            let burst = (per_vcpu_rate / 1000).clamp(1, 4096);
            let (burst_pages, burst_tsc) = if rate_pages_per_s == UNPACED {
                (0, 0)
            } else {
                (burst, (tsc_hz * burst / per_vcpu_rate).max(1))
            };
            self.set_workload(
                i,
                &VcpuCtrl {
                    base: base + i as u64 * per * kvm_dirty::PAGE_SIZE,
                    pages: per,
                    stride: 1,
                    pattern,
                    unique_values: true,
                    burst_pages,
                    burst_tsc,
                    sleep_min_tsc: tsc_hz / 5000,
                },
            )?;
        }
        Ok(())
    }

    /// Saves every vCPU's state. The vCPUs must be parked (or not started).
    pub fn save_vcpus(&self) -> Result<Vec<crate::state::VcpuState>> {
        self.created
            .iter()
            .enumerate()
            .map(|(i, v)| {
                crate::state::VcpuState::save(i, &v.fd(), &self.msrs, self.platform.has_irqchip())
            })
            .collect()
    }

    /// Checks migrated vCPU states before anything is restored
    /// ([`crate::state::VcpuState::check`]): one per vCPU, in order, against this VM's MSR
    /// list, irqchip, each vCPU's CPUID and the guest memory as it is now.
    pub fn check_vcpu_states(&self, states: &[crate::state::VcpuState]) -> Result<()> {
        if states.len() != self.created.len() {
            return Err(VmmError::State(format!(
                "{} vCPU states for {} vCPUs",
                states.len(),
                self.created.len()
            )));
        }
        for (i, (v, s)) in self.created.iter().zip(states).enumerate() {
            if s.index != i {
                return Err(VmmError::State(format!(
                    "state of vCPU {} in place of vCPU {i}",
                    s.index
                )));
            }
            let cpuid = v
                .fd()
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("KVM_GET_CPUID2"))?;
            s.check(&crate::state::CheckEnv {
                msrs: &self.msrs,
                irqchip: self.platform.has_irqchip(),
                cpuid: cpuid.as_slice(),
                mem: &*self.ram,
            })?;
        }
        Ok(())
    }

    /// Restores every vCPU's state (before [`Vm::start`]), after
    /// [`Vm::check_vcpu_states`] accepted all of them.
    pub fn restore_vcpus(&self, states: &[crate::state::VcpuState]) -> Result<()> {
        self.check_vcpu_states(states)?;
        let xsave2 = self
            .vm
            .check_extension_raw(kvm_bindings::KVM_CAP_XSAVE2.into())
            .max(0) as usize;
        for (v, s) in self.created.iter().zip(states) {
            s.restore(&v.fd(), xsave2)?;
        }
        Ok(())
    }

    /// The binary statistics of vCPU `i` (`KVM_GET_STATS_FD`, opened when the vCPU was
    /// created); an error if there is no such vCPU or this KVM has none.
    pub fn vcpu_stats(&self, i: usize) -> Result<&KvmStats> {
        match self.stats.get(i) {
            Some(Ok(s)) => Ok(s),
            Some(Err(reason)) => Err(VmmError::Stats {
                vcpu: i,
                reason: reason.clone(),
            }),
            None => Err(VmmError::Config(format!("no vCPU {i}"))),
        }
    }

    /// The value of KVM's binary statistic `name` (e.g. `halt_exits`, `halt_wakeup`) of vCPU
    /// `i`; `None` if this KVM does not have it.
    pub fn vcpu_stat(&self, i: usize, name: &str) -> Result<Option<u64>> {
        let s = self.vcpu_stats(i)?;
        s.read(name).map_err(|e| VmmError::Stats {
            vcpu: i,
            reason: e.to_string(),
        })
    }

    /// The sum over every vCPU of KVM's statistic `name` (a counter such as
    /// [`GUEST_FAULTS_STAT`]); `None` if any vCPU lacks it.
    pub fn vcpu_stat_sum(&self, name: &str) -> Result<Option<u64>> {
        let mut sum = 0u64;
        for i in 0..self.stats.len() {
            match self.vcpu_stat(i, name)? {
                Some(v) => sum = sum.wrapping_add(v),
                None => return Ok(None),
            }
        }
        Ok(Some(sum))
    }

    /// Page faults the guest took that KVM handled, summed over the vCPUs
    /// ([`GUEST_FAULTS_STAT`]); `None` if this KVM does not count them.
    pub fn guest_faults(&self) -> Result<Option<u64>> {
        self.vcpu_stat_sum(GUEST_FAULTS_STAT)
    }

    /// The created vCPUs (for register access before start or while parked).
    pub fn vcpu_handles(&self) -> &[Arc<VcpuShared>] {
        &self.created
    }

    /// Starts the vCPU threads. `hook` runs on a vCPU thread after each ring-full exit.
    pub fn start(&mut self, hook: Option<RingFullHook>) -> Result<()> {
        if self.vcpus.is_some() {
            return Err(VmmError::Config("vCPUs already started".into()));
        }
        let tsc_khz = u64::from(self.tsc_khz()?);
        let v = Vcpus::start(
            self.created.clone(),
            crate::vcpu::RunCtx {
                ring: self.ring.clone(),
                hook,
                ram: self.ram.clone(),
                tsc_khz,
                devices: self.devices.clone(),
            },
        )?;
        self.vcpus = Some(v);
        Ok(())
    }

    /// The running vCPUs (an error before [`Vm::start`]).
    pub fn vcpus(&self) -> Result<&Vcpus> {
        self.vcpus
            .as_ref()
            .ok_or_else(|| VmmError::Config("vCPUs not started".into()))
    }

    /// Stops and joins the vCPU threads (the VM stays, so it can be restarted or inspected).
    pub fn stop(&mut self) -> Result<()> {
        match self.vcpus.take() {
            Some(mut v) => v.shutdown(),
            None => Ok(()),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_cpuid_clears_cx16_and_hypercall_pv_features_and_sets_tsc_deadline() {
        let e = |function, eax, ecx| kvm_bindings::kvm_cpuid_entry2 {
            function,
            eax,
            ecx,
            ..Default::default()
        };
        let mut c = kvm_bindings::CpuId::from_entries(&[
            e(1, 0, !CPUID1_ECX_TSC_DEADLINE),
            e(0x4000_0001, 0x0100_7efb, 0),
            e(7, 0x2, 0x1234),
        ])
        .unwrap();
        pvh_cpuid(&mut c, true);
        let s = c.as_slice();
        assert_eq!(s[0].ecx, !CPUID1_ECX_CX16);
        // kvmclock (0, 3), PV EOI (6), steal time (5), clocksource stable (24) stay.
        assert_eq!(s[1].eax, 0x0100_567b);
        assert_eq!((s[2].eax, s[2].ecx), (0x2, 0x1234));
        pvh_cpuid(&mut c, false);
        assert_eq!(
            c.as_slice()[0].ecx & CPUID1_ECX_TSC_DEADLINE,
            CPUID1_ECX_TSC_DEADLINE
        );
    }
}
