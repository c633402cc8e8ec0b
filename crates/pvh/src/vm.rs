//! A PVH VM on KVM: in-kernel irqchip and PIT, the UART, guest RAM, one thread per vCPU, the
//! exit port, and INIT/SIPI-started APs.
//!
//! Build order (what KVM requires): VM -> irqchip -> PIT -> memslots -> vCPUs (CPUID, then
//! registers) -> the BSP runnable, the APs `UNINITIALIZED` so that they wait in `KVM_RUN` for
//! the INIT/SIPI the guest's BSP sends through its LAPIC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_mp_state, kvm_regs, kvm_segment, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use vmm::vcpu::{CRASH_PREFIX, INTERNAL_ERROR_PREFIX};
use vmm::{Devices, Tracking, VmConfig, VmmError};

use crate::boot as protocol;
use crate::elf;
use crate::error::{PvhError, Result};
use crate::memory::{self, GuestRam};
use crate::SerialOutput;

/// The power-off port: a byte written here stops the VM with that byte as its status
/// (ringvisor's convention; QEMU's `isa-debug-exit` at the same port reports `(v << 1) | 1`).
pub const EXIT_PORT: u16 = vmm::EXIT_PORT;
/// Most vCPUs (the LAPIC IDs must fit the xAPIC's 8 bits and the test kernel's stacks).
pub const MAX_VCPUS: usize = 8;

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
    /// Dirty tracking for a guest that may be live-migrated (`None`: no dirty logging).
    pub tracking: Option<Tracking>,
    /// The initial ramdisk, passed as module 0 of `hvm_start_info` (`None`: no modules).
    pub initrd: Option<Vec<u8>>,
}

/// Largest kernel image [`read_kernel`] accepts.
pub const MAX_KERNEL_BYTES: u64 = 512 << 20;

/// Reads a kernel image from `path`, refusing files larger than [`MAX_KERNEL_BYTES`].
pub fn read_kernel(path: &std::path::Path) -> Result<Vec<u8>> {
    read_image(path)
}

/// Reads an initrd from `path`, refusing files larger than [`MAX_KERNEL_BYTES`] (whether it
/// fits the guest is checked by [`boot`]).
pub fn read_initrd(path: &std::path::Path) -> Result<Vec<u8>> {
    read_image(path)
}

fn read_image(path: &std::path::Path) -> Result<Vec<u8>> {
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
    /// A config with 128 MiB, one vCPU, an empty command line, captured serial output, no
    /// dirty tracking and no initrd.
    pub fn new(kernel: Vec<u8>) -> Self {
        PvhConfig {
            kernel,
            cmdline: String::new(),
            memory: 128 << 20,
            vcpus: 1,
            serial: SerialOutput::Capture,
            tracking: None,
            initrd: None,
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

/// A flat ring-0 32-bit segment (the PVH entry state).
fn flat(selector: u16, type_: u8) -> kvm_segment {
    vmm::x86::flat_segment(selector, type_, 0, 1, 0, 1)
}

fn vmm_err(e: VmmError) -> PvhError {
    match e {
        VmmError::Kvm { op, source } => PvhError::Kvm { op, source },
        VmmError::NoKvm { source } => PvhError::NoKvm(source),
        VmmError::Config(s) => PvhError::Config(s),
        VmmError::Memory { .. } | VmmError::OutOfBounds { .. } => PvhError::Memory(e.to_string()),
        VmmError::VcpuFailed { vcpu, what } => match what.strip_prefix(INTERNAL_ERROR_PREFIX) {
            Some(detail) => PvhError::Emulation {
                vcpu,
                detail: detail.to_string(),
            },
            None => PvhError::VcpuFailed { vcpu, detail: what },
        },
        other => PvhError::Host(other.to_string()),
    }
}

/// A PVH VM: a `vmm::Vm` on the PVH platform with the kernel loaded, the boot vCPU at the
/// PVH entry and the other vCPUs waiting for INIT/SIPI.
pub struct PvhVm {
    vm: vmm::Vm,
    ram: GuestRam,
    devices: Arc<Devices>,
    entry: u32,
    start_info: u64,
    ran: bool,
}

impl std::fmt::Debug for PvhVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PvhVm")
            .field("vcpus", &self.vcpus())
            .field("entry", &self.entry)
            .finish()
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
    // Everything about the image is checked before KVM is touched.
    let image = elf::parse(&cfg.kernel)?;
    let specs = memory::region_specs(cfg.memory, cfg.tracking.is_some())?;
    let ranges = memory::ram_ranges(cfg.memory);
    protocol::check_placement(&image, &ranges)?;
    if let Some(d) = &cfg.initrd {
        protocol::initrd_placement(&image, &ranges, d.len() as u64)?;
    }
    let vm = vmm::Vm::create_pvh(
        &VmConfig {
            vcpus: cfg.vcpus,
            memory: specs,
            tracking: cfg.tracking.unwrap_or(Tracking::Bitmap),
        },
        &cfg.serial,
    )
    .map_err(vmm_err)?;
    let ram = GuestRam::of(vm.ram().clone());
    let start_info = protocol::load_with(
        &image,
        &cfg.kernel,
        &ram,
        &protocol::BootData {
            cmdline: &cfg.cmdline,
            initrd: cfg.initrd.as_deref(),
            vcpus: cfg.vcpus,
        },
    )?;
    for (i, v) in vm.vcpu_handles().iter().enumerate() {
        let fd = v.fd();
        let kvm = |op: &'static str| move |source| PvhError::Kvm { op, source };
        if i == 0 {
            // PVH entry state: flat 4 GiB segments (code: execute/read accessed, data:
            // read/write accessed); the selectors are nominal, the kernel loads its own GDT.
            let mut s = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
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
            fd.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;
            let r = kvm_regs {
                rip: u64::from(image.entry),
                rbx: start_info,
                rflags: 0x2,
                ..Default::default()
            };
            fd.set_regs(&r).map_err(kvm("KVM_SET_REGS"))?;
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        } else {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        }
    }
    let devices = vm
        .devices()
        .cloned()
        .ok_or_else(|| PvhError::Host("a PVH VM without devices".into()))?;
    Ok(PvhVm {
        vm,
        ram,
        devices,
        entry: image.entry,
        start_info,
        ran: false,
    })
}

/// What a vCPU failure means for a run: a guest crash is an exit status, the rest errors.
fn classify(e: VmmError) -> Result<ExitStatus> {
    match e {
        VmmError::VcpuFailed { vcpu, what } if what.starts_with(CRASH_PREFIX) => {
            Ok(ExitStatus::Crashed { vcpu, detail: what })
        }
        other => Err(vmm_err(other)),
    }
}

/// Waits for `vm` (running) to power off, crash or fail, or for `timeout`; then stops its
/// vCPUs. Works for a booted [`PvhVm`] and for a PVH guest received by migration.
pub fn wait_exit(vm: &mut vmm::Vm, timeout: Option<Duration>) -> Result<ExitStatus> {
    let devices = vm
        .devices()
        .cloned()
        .ok_or_else(|| PvhError::Config("not a PVH-platform VM".into()))?;
    let deadline = timeout.map(|t| Instant::now() + t);
    let outcome = loop {
        if let Some(s) = devices.wait_power_off(Duration::from_millis(2)) {
            break Ok(ExitStatus::PowerOff(s));
        }
        match vm.vcpus().map_err(vmm_err)?.check() {
            Ok(()) | Err(VmmError::PoweredOff { .. }) => {}
            Err(e) => break classify(e),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break Ok(ExitStatus::TimedOut);
        }
    };
    // Stopping joins every vCPU thread (a halted or never-started one is kicked out).
    match (vm.stop(), outcome) {
        (_, Ok(s @ ExitStatus::Crashed { .. })) => Ok(s),
        (_, Err(e)) => Err(e),
        (Err(e), Ok(_)) => classify(e),
        (Ok(()), Ok(s)) => Ok(s),
    }
}

impl PvhVm {
    /// Starts the vCPU threads (the guest runs until [`PvhVm::wait_exit`] or a migration).
    pub fn start(&mut self) -> Result<()> {
        if self.ran {
            return Err(PvhError::Config("this VM has already run".into()));
        }
        self.ran = true;
        self.vm.start(None).map_err(vmm_err)
    }

    /// Waits for the started guest to power off, crash or fail, or for `timeout`; then stops
    /// the vCPU threads.
    pub fn wait_exit(&mut self, timeout: Option<Duration>) -> Result<ExitStatus> {
        wait_exit(&mut self.vm, timeout)
    }

    /// Runs every vCPU until the guest powers off, crashes or fails, or until `timeout`;
    /// then stops and joins the vCPU threads. A VM runs once.
    pub fn run_until_exit(&mut self, timeout: Option<Duration>) -> Result<ExitStatus> {
        self.start()?;
        self.wait_exit(timeout)
    }

    /// Everything the guest wrote to the serial port so far (up to 64 MiB).
    pub fn serial_output(&self) -> Vec<u8> {
        self.devices.serial_output()
    }

    /// The console output with the time each line ended.
    pub fn serial_capture(&self) -> vmm::Capture {
        self.devices.capture()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The PVH entry point.
    pub fn entry(&self) -> u32 {
        self.entry
    }

    /// The guest-physical address of `hvm_start_info`.
    pub fn start_info(&self) -> u64 {
        self.start_info
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vm.vcpu_handles().len()
    }

    /// A handle that feeds the guest's serial input, usable from other threads while
    /// the guest runs.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput(self.devices.clone())
    }

    /// The underlying VM (for migration: `migration_engine::source::migrate` takes it).
    pub fn vm_mut(&mut self) -> &mut vmm::Vm {
        &mut self.vm
    }

    /// The underlying VM.
    pub fn vm(&self) -> &vmm::Vm {
        &self.vm
    }

    /// Gives the underlying VM up (to a control plane that owns it from now on; its
    /// devices, console and power-off port go along).
    pub fn into_vm(self) -> vmm::Vm {
        self.vm
    }
}

/// Feeds bytes to the UART's receive FIFO (what a user would type on the console).
#[derive(Clone)]
pub struct SerialInput(Arc<Devices>);

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialInput")
    }
}

impl SerialInput {
    /// The handle of a VM's devices (for example a PVH guest received by migration).
    pub fn of(devices: Arc<Devices>) -> Self {
        SerialInput(devices)
    }

    /// Queues `bytes` for the guest; returns how many fit in the 64-byte FIFO.
    pub fn send(&self, bytes: &[u8]) -> usize {
        self.0.serial_input(bytes)
    }

    /// Queues all of `bytes`, waiting for the guest to drain the FIFO as needed; returns how
    /// many were queued before `timeout` passed (a guest that does not read its console
    /// cannot block the caller for longer).
    pub fn send_all(&self, bytes: &[u8], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut done = 0;
        while done < bytes.len() {
            done += self.send(&bytes[done..]);
            if done < bytes.len() {
                if Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        done
    }

    /// Copies the VMM's stdin to the guest's console on a thread, until stdin ends (for an
    /// interactive shell on the serial console). Bytes wait while the guest's FIFO is full.
    pub fn forward_stdin(&self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let input = self.clone();
        std::thread::Builder::new()
            .name("serial-stdin".into())
            .spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 256];
                let mut stdin = std::io::stdin().lock();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            let mut at = 0;
                            while at < n {
                                at += input.send_all(&buf[at..n], Duration::from_secs(1));
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
