//! vCPU threads: the run loop, a reliable kick (signal + `immediate_exit`), parking at a guest
//! sync point or on request, and ring-full handling.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_dirty::RingSet;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::error::{Result, VmmError};
use crate::guest::{off, vcpu_ctrl_gpa, SLEEP_PORT, SYNC_PORT};
use crate::memory::GuestRam;
use crate::sys::{self, ImmediateExit};

/// `KVM_EXIT_DIRTY_RING_FULL` (kvm-ioctls reports it as `Unsupported(31)`).
const EXIT_DIRTY_RING_FULL: u32 = 31;

/// Why a vCPU is parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parked {
    /// The guest reached its sync point (`out` to [`SYNC_PORT`]).
    Sync,
    /// The VMM asked it to pause (kick).
    Paused,
}

#[derive(Debug, Default)]
struct Ctl {
    pause_req: bool,
    parked: Option<Parked>,
    /// Bumped by every resume, so a parked thread knows it was released.
    epoch: u64,
    quit: bool,
    done: Option<std::result::Result<(), String>>,
}

/// Counters of one vCPU (monotonic).
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// KVM_RUN returns.
    pub exits: AtomicU64,
    /// Sync-port exits.
    pub syncs: AtomicU64,
    /// Ring-full exits.
    pub ring_full: AtomicU64,
    /// Nanoseconds spent handling ring-full exits (harvest + reset on this thread).
    pub ring_full_ns: AtomicU64,
    /// Returns with EINTR (kicks).
    pub kicks: AtomicU64,
    /// Guest sleep requests (pacing) and nanoseconds slept.
    pub sleeps: AtomicU64,
    /// Nanoseconds slept on guest request.
    pub sleep_ns: AtomicU64,
    /// Nanoseconds the VMM delayed this vCPU (dirty-limit throttling).
    pub throttle_ns: AtomicU64,
    /// Times this vCPU's thread was held (dirty limit out of budget) instead of entering the
    /// guest.
    pub holds: AtomicU64,
}

/// How a [`VmmError::VcpuFailed`] text for `KVM_EXIT_INTERNAL_ERROR` starts (followed by
/// `suberror N data [...]`, then the registers).
pub const INTERNAL_ERROR_PREFIX: &str = "KVM_EXIT_INTERNAL_ERROR: ";
/// How a [`VmmError::VcpuFailed`] text for a guest crash (triple fault, reset or shutdown
/// request) starts.
pub const CRASH_PREFIX: &str = "guest crashed: ";

/// Hook called on the vCPU thread after every ring-full exit is handled (dirty-limit uses it
/// to delay a vCPU). Gets the vCPU index.
pub type RingFullHook = Arc<dyn Fn(usize) + Send + Sync>;

/// One vCPU shared between its thread and the controller.
pub struct VcpuShared {
    index: usize,
    // Field order: `imm` points into `fd`'s kvm_run mapping; both live in this struct, so the
    // pointer never outlives the mapping.
    imm: ImmediateExit,
    fd: Mutex<VcpuFd>,
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Fraction of each throttle period this vCPU must sleep, in parts per million.
    throttle_ppm: AtomicU64,
    /// Set by the vCPU thread while it waits out a hold (so the ticker need not kick it).
    in_hold: std::sync::atomic::AtomicBool,
    /// Set when this vCPU's thread ended because the guest powered off.
    powered_off: std::sync::atomic::AtomicBool,
    /// Counters.
    pub counters: VcpuCounters,
}

/// Throttle period: a throttled vCPU is kicked once per period and sleeps its share of it.
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);
/// Most of a period a vCPU can be made to sleep (QEMU caps its CPU throttle at 99%).
pub const MAX_THROTTLE: f64 = 0.99;
/// `throttle_ppm` value meaning "held": the vCPU does not run until released.
const HOLD_PPM: u64 = 1_000_000;

impl std::fmt::Debug for VcpuShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuShared")
            .field("index", &self.index)
            .finish()
    }
}

impl VcpuShared {
    pub(crate) fn new(index: usize, mut fd: VcpuFd) -> Self {
        let imm = ImmediateExit::of(&mut fd);
        VcpuShared {
            index,
            imm,
            fd: Mutex::new(fd),
            ctl: Mutex::new(Ctl::default()),
            cv: Condvar::new(),
            throttle_ppm: AtomicU64::new(0),
            in_hold: std::sync::atomic::AtomicBool::new(false),
            powered_off: std::sync::atomic::AtomicBool::new(false),
            counters: VcpuCounters::default(),
        }
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes this vCPU sleep `fraction` (0..=0.99) of its time, in [`THROTTLE_PERIOD`] slices
    /// (0 removes the throttle). Takes effect while its VM's vCPUs run.
    pub fn set_throttle(&self, fraction: f64) {
        let f = if fraction.is_finite() {
            fraction.clamp(0.0, MAX_THROTTLE)
        } else {
            0.0
        };
        self.throttle_ppm
            .store((f * 1e6).round() as u64, Ordering::Relaxed);
    }

    /// Holds this vCPU (it stops running within one [`THROTTLE_PERIOD`]) or releases it.
    /// A hold replaces any throttle fraction; releasing leaves the vCPU unthrottled.
    pub fn set_hold(&self, hold: bool) {
        self.throttle_ppm
            .store(if hold { HOLD_PPM } else { 0 }, Ordering::Relaxed);
    }

    /// Whether this vCPU is held.
    pub fn held(&self) -> bool {
        self.throttle_ppm.load(Ordering::Relaxed) >= HOLD_PPM
    }

    /// The current throttle fraction (1.0 while held).
    pub fn throttle(&self) -> f64 {
        self.throttle_ppm.load(Ordering::Relaxed) as f64 / 1e6
    }

    /// Index of this vCPU.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Locks the vCPU fd (for register access while the vCPU is parked or not started).
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks this (vCPU) thread until resumed or told to quit. Returns false on quit.
    fn park(&self, why: Parked) -> bool {
        let mut c = self.ctl();
        let epoch = c.epoch;
        c.parked = Some(why);
        self.cv.notify_all();
        while c.epoch == epoch && !c.quit {
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        c.parked = None;
        !c.quit
    }

    /// Sleeps up to `d` on this (vCPU) thread, waking early on a pause request or quit.
    pub(crate) fn nap(&self, d: Duration) {
        let deadline = Instant::now() + d;
        let mut c = self.ctl();
        while !c.pause_req && !c.quit {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            c = self
                .cv
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn finish(&self, r: std::result::Result<(), String>) {
        let mut c = self.ctl();
        c.done = Some(r);
        self.cv.notify_all();
    }
}

fn exit_detail(fd: &VcpuFd, what: &str) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "{what}: rip={:#x} rsp={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rflags={:#x} cs={:#x} cpl={} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
            r.rip, r.rsp, r.rax, r.rbx, r.rcx, r.rdx, r.rflags, s.cs.selector, s.cs.dpl, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        ),
        _ => what.to_string(),
    }
}

/// The instruction bytes at the vCPU's RIP (`KVM_TRANSLATE` of CS.base + RIP, then guest
/// RAM), for reports of instructions KVM could not run.
fn code_at_rip(fd: &VcpuFd, ram: &GuestRam) -> String {
    let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) else {
        return "code at rip: registers unreadable".into();
    };
    let linear = s.cs.base.wrapping_add(r.rip);
    let t = match fd.translate_gva(linear) {
        Ok(t) if t.valid != 0 => t,
        Ok(_) => return format!("code at rip: linear {linear:#x} is not mapped"),
        Err(e) => return format!("code at rip: KVM_TRANSLATE {linear:#x}: {e}"),
    };
    let mut bytes = [0u8; 16];
    // Stop at the page end: the next page may map elsewhere.
    let n = (0x1000 - (t.physical_address & 0xfff)).min(16) as usize;
    match ram.read(t.physical_address, &mut bytes[..n]) {
        Ok(()) => format!(
            "code at rip (gpa {:#x}): {}",
            t.physical_address,
            bytes[..n]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(e) => format!("code at rip (gpa {:#x}): {e}", t.physical_address),
    }
}

/// Per-thread context of the run loop.
pub(crate) struct RunCtx {
    pub(crate) ring: Option<Arc<RingSet>>,
    pub(crate) hook: Option<RingFullHook>,
    pub(crate) ram: Arc<GuestRam>,
    pub(crate) tsc_khz: u64,
    /// The PVH platform's devices (`None` on the workload machine, whose only ports are the
    /// sync and sleep ports).
    pub(crate) devices: Option<Arc<crate::devices::Devices>>,
}

/// Handles the exits of the PVH platform; `None` when the exit is not a platform one.
fn platform_exit(
    exit: &mut std::result::Result<VcpuExit<'_>, kvm_ioctls::Error>,
    dev: &crate::devices::Devices,
) -> Option<std::result::Result<bool, String>> {
    use crate::devices::PioAction;
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => Some(Ok(matches!(
            dev.pio_write(*port, data),
            PioAction::PowerOff(_)
        ))),
        Ok(VcpuExit::IoIn(port, data)) => {
            dev.pio_read(*port, data);
            Some(Ok(false))
        }
        Ok(VcpuExit::MmioRead(_, data)) => {
            data.fill(0xff);
            Some(Ok(false))
        }
        Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => Some(Ok(false)),
        Ok(VcpuExit::SystemEvent(ty, _)) => Some(Err(format!(
            "{CRASH_PREFIX}the guest asked for a reset or shutdown (system event {ty})"
        ))),
        _ => None,
    }
}

fn run_loop(v: &VcpuShared, cx: &RunCtx) -> std::result::Result<(), String> {
    let ring = cx.ring.as_deref();
    let hook = cx.hook.as_ref();
    let mut last_wake = Instant::now();
    loop {
        {
            let c = v.ctl();
            if c.quit {
                return Ok(());
            }
            if c.pause_req {
                drop(c);
                v.imm.set(false);
                if !v.park(Parked::Paused) {
                    return Ok(());
                }
                continue;
            }
        }
        let mut fd = v.fd();
        let mut exit = fd.run();
        v.counters.exits.fetch_add(1, Ordering::Relaxed);
        if let Some(dev) = cx.devices.as_deref() {
            match platform_exit(&mut exit, dev) {
                Some(Ok(false)) => continue,
                Some(Ok(true)) => {
                    v.powered_off
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                    return Ok(());
                }
                Some(Err(e)) => {
                    drop(exit);
                    return Err(exit_detail(&fd, &e));
                }
                None => {}
            }
        }
        match exit {
            Ok(VcpuExit::IoOut(port, _)) if port == SYNC_PORT && cx.devices.is_none() => {
                drop(fd);
                v.counters.syncs.fetch_add(1, Ordering::Relaxed);
                if !v.park(Parked::Sync) {
                    return Ok(());
                }
            }
            Ok(VcpuExit::IoOut(port, _)) if port == SLEEP_PORT && cx.devices.is_none() => {
                drop(fd);
                let ticks = cx
                    .ram
                    .read_u64(vcpu_ctrl_gpa(v.index) + off::SLEEP_TSC)
                    .unwrap_or(0);
                // At most 100 ms per request, whatever the guest asks.
                let ns = (ticks.saturating_mul(1_000_000) / cx.tsc_khz.max(1)).min(100_000_000);
                v.counters.sleeps.fetch_add(1, Ordering::Relaxed);
                v.counters.sleep_ns.fetch_add(ns, Ordering::Relaxed);
                v.nap(Duration::from_nanos(ns));
            }
            Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                drop(fd);
                let t = Instant::now();
                v.counters.ring_full.fetch_add(1, Ordering::Relaxed);
                let Some(ring) = ring else {
                    return Err("dirty-ring-full exit but no ring set".into());
                };
                ring.handle_ring_full(v.index)
                    .map_err(|e| format!("ring-full handling failed: {e}"))?;
                v.counters
                    .ring_full_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if let Some(h) = hook {
                    h(v.index);
                }
            }
            Ok(VcpuExit::Intr) => {}
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                v.counters.kicks.fetch_add(1, Ordering::Relaxed);
                // A kick with no pause request behind it (or one already handled): clear it so
                // the next KVM_RUN enters the guest.
                if !v.ctl().pause_req {
                    v.imm.set(false);
                    // Throttled (dirty limit or auto-converge): sleep in proportion to the
                    // time run since the last throttle sleep, so that run : sleep equals
                    // (1 - f) : f whatever the kick period and its jitter.
                    let ppm = v.throttle_ppm.load(Ordering::Relaxed);
                    if ppm >= HOLD_PPM {
                        // Held (dirty limit out of budget): wait until released.
                        let t = Instant::now();
                        v.counters.holds.fetch_add(1, Ordering::Relaxed);
                        v.in_hold.store(true, Ordering::Relaxed);
                        while v.throttle_ppm.load(Ordering::Relaxed) >= HOLD_PPM {
                            {
                                let c = v.ctl();
                                if c.pause_req || c.quit {
                                    break;
                                }
                            }
                            v.nap(Duration::from_millis(1));
                        }
                        v.in_hold.store(false, Ordering::Relaxed);
                        v.counters
                            .throttle_ns
                            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    } else if ppm > 0 {
                        let f = ppm as f64 / 1e6;
                        let ran = last_wake.elapsed();
                        let d = ran.mul_f64(f / (1.0 - f)).min(Duration::from_millis(200));
                        v.nap(d);
                        v.counters
                            .throttle_ns
                            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
                    }
                    last_wake = Instant::now();
                }
            }
            Ok(VcpuExit::Shutdown) => {
                return Err(exit_detail(
                    &fd,
                    "guest crashed: triple fault (KVM_EXIT_SHUTDOWN)",
                ))
            }
            Ok(VcpuExit::InternalError) => {
                let (sub, data) = sys::internal_error(&mut fd);
                let code = code_at_rip(&fd, &cx.ram);
                return Err(exit_detail(
                    &fd,
                    &format!("{INTERNAL_ERROR_PREFIX}suberror {sub} data {data:x?} (on PVM: an instruction the emulator cannot run); {code}"),
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(format!(
                    "KVM_EXIT_FAIL_ENTRY reason {reason:#x} on cpu {cpu}"
                ))
            }
            Ok(other) => {
                let d = format!("unexpected exit {other:?}");
                return Err(exit_detail(&fd, &d));
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        }
    }
}

/// The running vCPUs of a VM.
#[derive(Debug)]
pub struct Vcpus {
    shared: Vec<Arc<VcpuShared>>,
    threads: Vec<Option<JoinHandle<()>>>,
    ticker_stop: Arc<std::sync::atomic::AtomicBool>,
    ticker: Option<JoinHandle<()>>,
}

/// Kicks every throttled vCPU once per [`THROTTLE_PERIOD`], and a held vCPU that is still
/// running within a millisecond. Holds the vCPU threads' pthread ids; it is stopped and
/// joined before those threads are joined.
fn ticker(shared: Vec<Arc<VcpuShared>>, ids: Vec<u64>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let mut last_period = Instant::now();
    let mut active = false;
    while !stop.load(Ordering::Relaxed) {
        // Fine-grained only while some vCPU is limited; otherwise wake rarely.
        std::thread::sleep(Duration::from_millis(if active { 1 } else { 5 }));
        active = shared
            .iter()
            .any(|v| v.throttle_ppm.load(Ordering::Relaxed) > 0);
        let period = last_period.elapsed() >= THROTTLE_PERIOD;
        if period {
            last_period = Instant::now();
        }
        for (v, &id) in shared.iter().zip(&ids) {
            let ppm = v.throttle_ppm.load(Ordering::Relaxed);
            let held = ppm >= HOLD_PPM;
            let kick = (held && !v.in_hold.load(Ordering::Relaxed)) || (ppm > 0 && !held && period);
            if kick {
                v.imm.set(true);
                sys::kick_pthread(id);
            }
        }
    }
}

impl Vcpus {
    /// Spawns one thread per vCPU. They start running the guest immediately.
    pub(crate) fn start(shared: Vec<Arc<VcpuShared>>, cx: RunCtx) -> Result<Self> {
        sys::install_kick_handler()?;
        let cx = Arc::new(cx);
        let mut threads = Vec::with_capacity(shared.len());
        for v in &shared {
            let v = v.clone();
            let cx = cx.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", v.index))
                .spawn(move || {
                    // The guest is untrusted input: the filter is on before the first
                    // KVM_RUN, and a thread that cannot install it does not run the guest.
                    let r = sandbox::apply(sandbox::ThreadKind::Vcpu)
                        .map_err(|e| format!("vCPU thread: {e}"))
                        .and_then(|()| run_loop(&v, &cx));
                    v.finish(r);
                })
                .map_err(VmmError::Thread)?;
            threads.push(Some(h));
        }
        let ids = threads.iter().flatten().map(sys::pthread_id).collect();
        let ticker_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (sh, st) = (shared.clone(), ticker_stop.clone());
        let ticker = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || ticker(sh, ids, st))
            .map_err(VmmError::Thread)?;
        Ok(Vcpus {
            shared,
            threads,
            ticker_stop,
            ticker: Some(ticker),
        })
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
    }

    /// vCPU `i`.
    pub fn get(&self, i: usize) -> &Arc<VcpuShared> {
        &self.shared[i]
    }

    /// All vCPUs.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<VcpuShared>> {
        self.shared.iter()
    }

    fn failure(&self) -> Option<VmmError> {
        self.shared.iter().find_map(|v| match &v.ctl().done {
            Some(Err(e)) => Some(VmmError::VcpuFailed {
                vcpu: v.index,
                what: e.clone(),
            }),
            Some(Ok(())) if v.powered_off.load(Ordering::SeqCst) => {
                Some(VmmError::PoweredOff { vcpu: v.index })
            }
            Some(Ok(())) => Some(VmmError::VcpuFailed {
                vcpu: v.index,
                what: "vCPU thread ended".into(),
            }),
            None => None,
        })
    }

    /// First vCPU failure, if any (a crashed guest, an emulation failure).
    pub fn check(&self) -> Result<()> {
        match self.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Kicks vCPU `i` out of KVM_RUN (no pause): used to flush per-CPU state into the rings.
    pub fn kick(&self, i: usize) {
        self.shared[i].imm.set(true);
        if let Some(h) = &self.threads[i] {
            sys::kick_thread(h);
        }
    }

    /// Makes vCPU `i` sleep `fraction` (0..=0.99) of its time, in [`THROTTLE_PERIOD`] slices
    /// (0 removes the throttle). Used by the dirty limit and by auto-converge.
    pub fn set_throttle(&self, i: usize, fraction: f64) {
        if let Some(v) = self.shared.get(i) {
            v.set_throttle(fraction);
        }
    }

    /// vCPU `i`'s current throttle fraction.
    pub fn throttle(&self, i: usize) -> f64 {
        self.shared.get(i).map(|v| v.throttle()).unwrap_or(0.0)
    }

    /// Asks every vCPU to park and waits until all are parked (at a sync point or paused).
    pub fn pause_all(&self, timeout: Duration) -> Result<()> {
        for (i, v) in self.shared.iter().enumerate() {
            v.ctl().pause_req = true;
            v.cv.notify_all();
            self.kick(i);
        }
        self.wait_parked(timeout, |p| p.is_some())
    }

    /// Waits until every vCPU is parked at its guest sync point.
    pub fn wait_all_synced(&self, timeout: Duration) -> Result<()> {
        self.wait_parked(timeout, |p| p == Some(Parked::Sync))
    }

    fn wait_parked(&self, timeout: Duration, ok: impl Fn(Option<Parked>) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for v in &self.shared {
            let mut c = v.ctl();
            loop {
                if ok(c.parked) {
                    break;
                }
                if c.done.is_some() {
                    drop(c);
                    return Err(self.failure().expect("done is set"));
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(VmmError::VcpuFailed {
                        vcpu: v.index,
                        what: format!("did not park within {timeout:?}"),
                    });
                }
                c =
                    v.cv.wait_timeout(c, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
            }
        }
        Ok(())
    }

    /// Releases every parked vCPU (and clears pause requests).
    pub fn resume_all(&self) {
        for v in &self.shared {
            let mut c = v.ctl();
            c.pause_req = false;
            c.epoch += 1;
            v.cv.notify_all();
        }
    }

    /// Stops and joins every vCPU thread. Returns the first failure, if any.
    pub fn shutdown(&mut self) -> Result<()> {
        self.ticker_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.ticker.take() {
            let _ = t.join();
        }
        let failure = self.failure().filter(|e| {
            !matches!(e, VmmError::VcpuFailed { what, .. } if what == "vCPU thread ended")
                && !matches!(e, VmmError::PoweredOff { .. })
        });
        for (i, v) in self.shared.iter().enumerate() {
            let mut c = v.ctl();
            c.quit = true;
            v.cv.notify_all();
            drop(c);
            self.kick(i);
        }
        for t in &mut self.threads {
            if let Some(h) = t.take() {
                let _ = h.join();
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Vcpus {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
