//! A PVH VM on KVM: in-kernel irqchip and PIT, the UART, guest RAM, one thread per vCPU, the
//! exit port, and INIT/SIPI-started APs.
//!
//! Build order (what KVM requires): VM -> irqchip -> PIT -> memslots -> vCPUs (CPUID, then
//! registers) -> the BSP runnable, the APs `UNINITIALIZED` so that they wait in `KVM_RUN` for
//! the INIT/SIPI the guest's BSP sends through its LAPIC.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_mp_state, kvm_pit_config, kvm_regs, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot as protocol;
use crate::elf;
use crate::error::{PvhError, Result};
use crate::memory::GuestRam;
use crate::serial::{self, SerialOutput, Uart, COM1_GSI, COM1_LEN, COM1_PORT};
use crate::sys::{self, ImmediateExit};

/// The power-off port: a byte written here stops the VM with that byte as its status
/// (ringvisor's convention; QEMU's `isa-debug-exit` at the same port reports `(v << 1) | 1`).
pub const EXIT_PORT: u16 = 0x501;
/// Most vCPUs (the LAPIC IDs must fit the xAPIC's 8 bits and the test kernel's stacks).
pub const MAX_VCPUS: usize = 8;
/// KVM's real-mode TSS area (Intel VMX needs three pages inside the 4 GiB space, not RAM).
const TSS_ADDR: usize = 0xfffb_d000;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvhConfig {
    /// The ELF image.
    pub kernel: Vec<u8>,
    /// The command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// vCPUs (1..=[`MAX_VCPUS`]).
    pub vcpus: usize,
    /// Where serial output goes.
    pub serial: SerialOutput,
}

/// Largest kernel image [`read_kernel`] accepts.
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// Reads a kernel image from `path`, refusing files larger than [`MAX_KERNEL_BYTES`].
pub fn read_kernel(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)
        .map_err(|e| PvhError::Host(format!("opening {}: {e}", path.display())))?;
    let mut buf = Vec::new();
    f.take(MAX_KERNEL_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| PvhError::Host(format!("reading {}: {e}", path.display())))?;
    if buf.len() as u64 > MAX_KERNEL_BYTES {
        return Err(PvhError::Config(format!(
            "{} is larger than {MAX_KERNEL_BYTES} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

impl PvhConfig {
    /// A config with 128 MiB, one vCPU, an empty command line and captured serial output.
    pub fn new(kernel: Vec<u8>) -> Self {
        PvhConfig {
            kernel,
            cmdline: String::new(),
            memory: 128 << 20,
            vcpus: 1,
            serial: SerialOutput::Capture,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    /// The guest wrote this status to [`EXIT_PORT`].
    PowerOff(u8),
    /// A vCPU triple-faulted or the guest asked KVM for a reset/shutdown.
    Crashed {
        /// vCPU index.
        vcpu: usize,
        /// Registers at the time.
        detail: String,
    },
    /// The timeout passed first; the VM was stopped.
    TimedOut,
}

/// One vCPU: the fd and the pointer into its `kvm_run` page live and die together.
struct VcpuSlot {
    index: usize,
    imm: ImmediateExit,
    fd: Mutex<VcpuFd>,
}

impl VcpuSlot {
    fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What vCPU threads report to the waiter (first one wins).
enum Outcome {
    Exit(ExitStatus),
    Error(PvhError),
}

struct Shared {
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    cv: Condvar,
    uart: Mutex<Uart>,
}

impl Shared {
    fn report(&self, o: Outcome) {
        let mut g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(o);
        }
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// A booted (not yet running) PVH VM.
pub struct PvhVm {
    // Drop order: vCPUs, then the VM fd, then guest RAM (KVM never sees a slot whose mapping
    // is gone).
    vcpus: Vec<Arc<VcpuSlot>>,
    shared: Arc<Shared>,
    capture: Arc<Mutex<Vec<u8>>>,
    _irq: EventFd,
    _vm: VmFd,
    _kvm: Kvm,
    ram: GuestRam,
    image: elf::PvhImage,
    start_info: u64,
    ran: bool,
}

impl std::fmt::Debug for PvhVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvhVm")
            .field("vcpus", &self.vcpus.len())
            .field("entry", &self.image.entry)
            .finish()
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PvhError {
    move |source| PvhError::Kvm { op, source }
}

/// CPUID.1:ECX bit 24: TSC-deadline mode of the LAPIC timer.
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// The host's supported CPUID (`KVM_GET_SUPPORTED_CPUID`: only what KVM and the host can
/// give) with vCPU `id`'s APIC ID in leaf 1 and the x2APIC topology leaves, and the
/// TSC-deadline timer advertised when KVM emulates it (`KVM_CAP_TSC_DEADLINE_TIMER`; KVM
/// leaves that bit to the VMM).
pub fn vcpu_cpuid(mut cpuid: CpuId, id: u32, tsc_deadline: bool) -> CpuId {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24);
                if tsc_deadline {
                    e.ecx |= CPUID1_ECX_TSC_DEADLINE;
                }
            }
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    cpuid
}

fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Loads the kernel and builds the VM: the BSP at the PVH entry in 32-bit protected mode
/// (paging off, flat CS/DS, EBX = start info), the APs waiting for INIT/SIPI.
pub fn boot(cfg: &PvhConfig) -> Result<PvhVm> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(PvhError::Config(format!(
            "vcpus must be in 1..={MAX_VCPUS}, got {}",
            cfg.vcpus
        )));
    }
    let image = elf::parse(&cfg.kernel)?;
    let ram = GuestRam::new(cfg.memory)?;
    let start_info = protocol::load(&image, &cfg.kernel, &ram, &cfg.cmdline)?;
    sys::install_kick_handler()?;

    let kvm = Kvm::new().map_err(PvhError::NoKvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("KVM_CREATE_PIT2"))?;
    for (slot, (gpa, region)) in ram.mappings().into_iter().enumerate() {
        sys::register_slot(&vm, slot as u32, gpa, region)?;
    }
    let irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PvhError::Host(format!("eventfd: {e}")))?;
    vm.register_irqfd(&irq, COM1_GSI)
        .map_err(kvm_err("KVM_IRQFD"))?;
    let irq2 = irq
        .try_clone()
        .map_err(|e| PvhError::Host(format!("eventfd clone: {e}")))?;
    let (uart, capture) = serial::build(&cfg.serial, irq2)?;

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(cfg.vcpus);
    for i in 0..cfg.vcpus {
        let mut fd = vm
            .create_vcpu(i as u64)
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&vcpu_cpuid(cpuid.clone(), i as u32, tsc_deadline))
            .map_err(kvm_err("KVM_SET_CPUID2"))?;
        // The x87 control word and MXCSR values after FNINIT / reset (all exceptions masked).
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        if i == 0 {
            // PVH entry state: flat 4 GiB segments (code: execute/read accessed, data:
            // read/write accessed); the selectors are nominal, the kernel loads its own GDT.
            let mut s = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            s.cs = flat(0x08, 0xb);
            let d = flat(0x10, 0x3);
            (s.ds, s.es, s.fs, s.gs, s.ss) = (d, d, d, d, d);
            // A busy 32-bit TSS (type 0xb): VM entry requires a usable TR.
            s.tr = kvm_segment {
                limit: 0x67,
                selector: 0x18,
                type_: 0xb,
                present: 1,
                ..Default::default()
            };
            s.cr0 = 0x11; // PE | ET: protected mode, paging off
            s.cr4 = 0;
            s.efer = 0;
            fd.set_sregs(&s).map_err(kvm_err("KVM_SET_SREGS"))?;
            let r = kvm_regs {
                rip: u64::from(image.entry),
                rbx: start_info,
                rflags: 0x2,
                ..Default::default()
            };
            fd.set_regs(&r).map_err(kvm_err("KVM_SET_REGS"))?;
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        } else {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        }
        let imm = ImmediateExit::of(&mut fd);
        vcpus.push(Arc::new(VcpuSlot {
            index: i,
            imm,
            fd: Mutex::new(fd),
        }));
    }
    Ok(PvhVm {
        vcpus,
        shared: Arc::new(Shared {
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            cv: Condvar::new(),
            uart: Mutex::new(uart),
        }),
        capture,
        _irq: irq,
        _vm: vm,
        _kvm: kvm,
        ram,
        image,
        start_info,
        ran: false,
    })
}

fn regs_detail(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rflags={:#x} cs={:#x} cpl={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rax, r.rbx, r.rcx, r.rdx, r.rflags, s.cs.selector, s.cs.dpl, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        ),
        _ => "registers unavailable".into(),
    }
}

/// What one exit asks the run loop to do.
enum Next {
    Continue,
    Stop(Outcome),
}

fn run_vcpu(slot: &VcpuSlot, shared: &Shared) {
    let mut fd = slot.fd();
    let vcpu = slot.index;
    while !shared.stop.load(Ordering::SeqCst) {
        let next = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let v = data.first().copied().unwrap_or(0);
                if port == EXIT_PORT {
                    Next::Stop(Outcome::Exit(ExitStatus::PowerOff(v)))
                } else if (COM1_PORT..COM1_PORT + COM1_LEN).contains(&port) {
                    let mut u = shared.uart.lock().unwrap_or_else(|p| p.into_inner());
                    // An interrupt that cannot be signalled is not fatal to the output.
                    let _ = u.write((port - COM1_PORT) as u8, v);
                    Next::Continue
                } else {
                    Next::Continue
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                let v = if (COM1_PORT..COM1_PORT + COM1_LEN).contains(&port) {
                    let mut u = shared.uart.lock().unwrap_or_else(|p| p.into_inner());
                    u.read((port - COM1_PORT) as u8)
                } else {
                    0xff
                };
                data.fill(v);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => Next::Continue,
            Ok(VcpuExit::Shutdown) => Next::Stop(Outcome::Exit(ExitStatus::Crashed {
                vcpu,
                detail: format!("triple fault: {}", regs_detail(&fd)),
            })),
            Ok(VcpuExit::SystemEvent(ty, _)) => Next::Stop(Outcome::Exit(ExitStatus::Crashed {
                vcpu,
                detail: format!("system event {ty}: {}", regs_detail(&fd)),
            })),
            Ok(VcpuExit::InternalError) => {
                let (sub, data) = sys::internal_error(&mut fd);
                Next::Stop(Outcome::Error(PvhError::Emulation {
                    vcpu,
                    detail: format!("suberror {sub} data {data:x?}: {}", regs_detail(&fd)),
                }))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                Next::Stop(Outcome::Error(PvhError::VcpuFailed {
                    vcpu,
                    detail: format!("KVM_EXIT_FAIL_ENTRY reason {reason:#x} on host cpu {cpu}"),
                }))
            }
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                Next::Stop(Outcome::Error(PvhError::VcpuFailed {
                    vcpu,
                    detail: format!("{what}: {}", regs_detail(&fd)),
                }))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                slot.imm.set(false);
                Next::Continue
            }
            Err(source) => Next::Stop(Outcome::Error(PvhError::Kvm {
                op: "KVM_RUN",
                source,
            })),
        };
        if let Next::Stop(o) = next {
            shared.report(o);
            break;
        }
    }
}

impl PvhVm {
    /// Runs every vCPU until the guest powers off, crashes or fails, or until `timeout`;
    /// then stops and joins the vCPU threads. A VM runs once.
    pub fn run_until_exit(&mut self, timeout: Option<Duration>) -> Result<ExitStatus> {
        if self.ran {
            return Err(PvhError::Config("this VM has already run".into()));
        }
        self.ran = true;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for slot in &self.vcpus {
            let slot = slot.clone();
            let shared = self.shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("pvh-vcpu{}", slot.index))
                .spawn(move || run_vcpu(&slot, &shared));
            match h {
                Ok(h) => threads.push(h),
                Err(e) => {
                    self.shared
                        .report(Outcome::Error(PvhError::Host(format!("spawn: {e}"))));
                    break;
                }
            }
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        {
            let mut g = self
                .shared
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            while g.is_none() {
                match deadline {
                    Some(d) => {
                        let now = Instant::now();
                        if now >= d {
                            *g = Some(Outcome::Exit(ExitStatus::TimedOut));
                            break;
                        }
                        g = self
                            .shared
                            .cv
                            .wait_timeout(g, d - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    None => g = self.shared.cv.wait(g).unwrap_or_else(|p| p.into_inner()),
                }
            }
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        // Kick until every thread is out: a thread blocked in KVM_RUN (an AP never started,
        // a halted vCPU) returns EINTR; one about to enter sees immediate_exit.
        for slot in &self.vcpus {
            slot.imm.set(true);
        }
        while threads.iter().any(|h| !h.is_finished()) {
            for h in threads.iter().filter(|h| !h.is_finished()) {
                sys::kick_thread(h);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for h in threads {
            if h.join().is_err() {
                return Err(PvhError::Host("a vCPU thread panicked".into()));
            }
        }
        let o = self
            .shared
            .outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match o {
            Some(Outcome::Exit(s)) => Ok(s),
            Some(Outcome::Error(e)) => Err(e),
            None => Err(PvhError::Host("no outcome recorded".into())),
        }
    }

    /// Everything the guest wrote to the serial port so far (up to 64 MiB).
    pub fn serial_output(&self) -> Vec<u8> {
        self.capture
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The PVH entry point.
    pub fn entry(&self) -> u32 {
        self.image.entry
    }

    /// The guest-physical address of `hvm_start_info`.
    pub fn start_info(&self) -> u64 {
        self.start_info
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// A handle that feeds the guest's serial input, usable from other threads while
    /// [`PvhVm::run_until_exit`] runs.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput(self.shared.clone())
    }
}

/// Feeds bytes to the UART's receive FIFO (what a user would type on the console).
#[derive(Clone)]
pub struct SerialInput(Arc<Shared>);

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialInput")
    }
}

impl SerialInput {
    /// Queues `bytes` for the guest; returns how many fit in the 64-byte FIFO.
    pub fn send(&self, bytes: &[u8]) -> usize {
        let mut u = self.0.uart.lock().unwrap_or_else(|p| p.into_inner());
        u.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn vcpu_cpuid_sets_the_apic_id_and_tsc_deadline_and_keeps_the_rest() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0002_0800,
                ecx: 0x8120_2000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let c = CpuId::from_entries(&entries).unwrap();
        let out = vcpu_cpuid(c.clone(), 3, true);
        let e = out.as_slice();
        assert_eq!(e[0].ebx, 0x0302_0800);
        assert_eq!(e[0].ecx, 0x8120_2000 | CPUID1_ECX_TSC_DEADLINE);
        assert_eq!(e[1].edx, 3);
        let e = vcpu_cpuid(c, 1, false);
        assert_eq!(e.as_slice()[0].ecx, 0x8120_2000);
    }

    #[test]
    fn bad_vcpu_counts_are_config_errors() {
        for n in [0, MAX_VCPUS + 1] {
            let cfg = PvhConfig {
                vcpus: n,
                ..PvhConfig::new(Vec::new())
            };
            assert!(matches!(boot(&cfg), Err(PvhError::Config(_))));
        }
    }

    #[test]
    fn missing_kernel_file_is_a_host_error() {
        assert!(matches!(
            read_kernel(std::path::Path::new("/nonexistent/kernel.elf")),
            Err(PvhError::Host(_))
        ));
    }
}
