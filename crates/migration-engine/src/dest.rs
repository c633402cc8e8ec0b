//! The destination side: accept one migration, restore, resume, report.

use std::io::{self, BufWriter, Read};
use std::net::TcpStream;

use std::time::{Duration, Instant};
use tls::{Channel, ChannelReader, ChannelWriter};

use kvm_dirty::PAGE_SIZE;
use migration::digest::IncrementalDigest;
use migration::wire::{
    Ack, AckWriter, Complete, Decoder, DecoderLimits, Hello, MemoryLayout, Message, PageSink,
    WireError,
};
use vmm::state::VcpuState;
use vmm::{GuestRam, MachineState, Platform, RegionSpec, SerialOutput, Tracking, Vm, VmConfig};

use crate::error::{MigrationError, Result};
use crate::source::POPULATED_CHUNK;
use crate::{unix_ns, STATE_KIND_MACHINE, STATE_KIND_VCPU};

/// Destination parameters.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// Dirty tracking of the restored VM (so it can migrate again).
    pub tracking: Tracking,
    /// The preamble, Hello and Layout must all have arrived this long after the connection
    /// was handed to [`receive`], or the peer is cut off ([`MigrationError::Stalled`]).
    pub handshake_timeout: Duration,
    /// After the handshake, every frame must be complete this long after the previous one
    /// (a peer that sends nothing, or a byte now and then, is cut off).
    pub progress_timeout: Duration,
    /// After ReadyToResume, how long the source may take to send Commit (it may first hash
    /// all of its paused memory to compare digests, which takes longer for larger guests).
    pub commit_timeout: Duration,
    /// Most guest memory a source may announce, in bytes; `None`: what this host can hold now
    /// ([`vmm::host::guest_memory_limit`]). A larger layout is refused before anything is
    /// mapped.
    pub max_guest_memory: Option<u64>,
    /// Where a PVH guest's console output goes here.
    pub serial: SerialOutput,
    /// `tls-creds` (+ `tls-authz`): accept only TLS 1.3 with a client certificate from the
    /// CA (and an allowed identity); `None` = plain TCP. The TLS handshake counts against
    /// `handshake_timeout`.
    pub tls: Option<tls::ServerTls>,
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            tracking: Tracking::Ring { entries: 65536 },
            handshake_timeout: Duration::from_secs(10),
            progress_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(60),
            max_guest_memory: None,
            serial: SerialOutput::Capture,
            tls: None,
        }
    }
}

/// What the destination saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IncomingSummary {
    /// Source's tracker.
    pub source_tracker: String,
    /// The guest's machine (`workload` or `pvh`).
    pub machine: String,
    /// Passes received.
    pub iterations: u32,
    /// Pages received (zero markers included).
    pub pages: u64,
    /// Zero markers received.
    pub zero_pages: u64,
    /// Bytes received.
    pub bytes: u64,
    /// From the first byte to the resumed guest, ms.
    pub total_ms: f64,
    /// From Complete to resume (restore + commit round trip), ms.
    pub restore_ms: f64,
    /// When the guest resumed, ns since the Unix epoch.
    pub resumed_unix_ns: u64,
    /// Where the restore time went (devices, vCPUs, clock, digest), ms.
    pub restore_breakdown_ms: Vec<(String, f64)>,
    /// The receive thread's CPU time (read, open TLS records, check frames, apply pages)
    /// and the host's idle time, from the first byte to the resume.
    pub cpu: Option<crate::cpu::CpuReport>,
    /// Whether the stream's frames carried CRC-32Cs (false: TLS with a source that agreed
    /// the AEAD authenticates every byte).
    pub frame_crc: bool,
}

/// Writes received pages into guest memory and keeps the incremental digest current.
struct MemSink<'a> {
    ram: &'a GuestRam,
    digest: IncrementalDigest,
    err: Option<vmm::VmmError>,
    /// Pages that may hold non-zero data: populated while building the VM, or received. A zero
    /// marker for any other page costs nothing (fresh `MAP_NORESERVE` memory is zero), so the
    /// destination keeps up with a bulk pass of zero pages instead of faulting each one in,
    /// which would otherwise land in the downtime.
    touched: kvm_dirty::DirtyPageSet,
}

impl PageSink for MemSink<'_> {
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        if let Err(e) = self.ram.write_untracked(gpa, data) {
            self.err.get_or_insert(e);
        }
        self.touched.insert_gpa(gpa);
        self.digest.record_page(gpa, data);
    }
    fn zero_page(&mut self, gpa: u64) {
        if self.touched.contains_gpa(gpa) {
            if let Err(e) = self.ram.zero_untracked(gpa, PAGE_SIZE) {
                self.err.get_or_insert(e);
            }
        }
        self.digest.record_zero(gpa);
    }
}

/// Receives one migration from `stream` and returns the running VM. Errors before the commit
/// are reported to the source (which keeps its guest).
///
/// Installs the [`sandbox::ThreadKind::Incoming`] seccomp filter on the calling thread
/// before reading anything (per the process's `sandbox::mode()`): call it on a thread
/// dedicated to receiving.
pub fn receive(
    stream: TcpStream,
    opts: &DestOptions,
    on_event: &mut dyn FnMut(&str),
) -> Result<(Vm, IncomingSummary)> {
    let t0 = Instant::now();
    let cpu = crate::cpu::CpuSpan::start(&[]);
    // Everything from here on reads what the peer sent: the calling thread is filtered
    // (for good: run this on a thread of its own).
    sandbox::apply(sandbox::ThreadKind::Incoming)?;
    stream.set_nodelay(true)?;
    let max_guest_bytes = match opts.max_guest_memory {
        Some(b) => b,
        None => vmm::host::guest_memory_limit()?,
    };
    // A failed TLS handshake is answered by a TLS alert, never by a protocol frame.
    let chan = match &opts.tls {
        Some(t) => t.accept(stream, opts.handshake_timeout)?,
        None => Channel::plain(stream),
    };
    // Acks are small; a source that stops reading them must not hold this thread either.
    chan.socket()
        .set_write_timeout(Some(opts.progress_timeout))?;
    let authorized = match &opts.tls {
        Some(t) => t.authorize(chan.peer()),
        None => Ok(()),
    };
    if let Some(peer) = chan.peer() {
        tracing::info!(%peer, "TLS peer verified");
    }
    // No frame CRCs where the peer agreed that the TLS record layer authenticates every
    // byte (an altered byte is a record MAC failure instead); plain TCP keeps them.
    let frame_crc = !chan.aead_integrity();
    let (reader, writer) = chan.split()?;
    let mut acks = AckWriter::new(BufWriter::new(writer)).with_frame_crc(frame_crc);
    let limits = DecoderLimits {
        max_guest_bytes,
        ..DecoderLimits::default()
    };
    let reader = DeadlineReader {
        inner: reader,
        deadline: t0 + opts.handshake_timeout,
        phase: "handshake",
        limit: opts.handshake_timeout,
        expired: false,
    };
    // The channel reader is its own buffer: a TLS record's plaintext goes from where it was
    // opened straight into the frame decoder's buffer.
    let mut dec = Decoder::with_limits(reader, limits).with_frame_crc(frame_crc);
    // An authenticated peer that tls-authz refuses is told why (over TLS) and nothing else.
    let r = authorized
        .map_err(MigrationError::Tls)
        .and_then(|()| receive_inner(&mut dec, &mut acks, opts, on_event, t0, &cpu));
    if let Err(e) = &r {
        // Best effort: tell the source why, so it resumes its guest at once.
        tracing::debug!(error = %e, "incoming migration failed");
        if let Err(send) = acks.send(&Ack::Error(e.to_string())) {
            tracing::debug!(error = %send, "could not tell the source why");
        }
    }
    r
}

struct NullSink;
impl PageSink for NullSink {
    fn write_page(&mut self, _: u64, _: &[u8]) {}
    fn zero_page(&mut self, _: u64) {}
}

/// The socket under the decoder, with a deadline for what is being read: every read waits
/// at most until the deadline, so a peer that trickles bytes cannot stretch it.
struct DeadlineReader {
    inner: ChannelReader,
    deadline: Instant,
    phase: &'static str,
    limit: Duration,
    expired: bool,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read_before(buf, self.deadline) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                self.expired = true;
                Err(io::ErrorKind::TimedOut.into())
            }
            r => r,
        }
    }
}

type Dec = Decoder<DeadlineReader>;
type Acks = AckWriter<BufWriter<ChannelWriter>>;

/// Reads the next message; during the handshake against its deadline, after Complete within
/// `commit_timeout` of now, otherwise within `progress_timeout` of now. A deadline that
/// passes is [`MigrationError::Stalled`].
fn recv(dec: &mut Dec, sink: &mut dyn PageSink, opts: &DestOptions) -> Result<Message> {
    use migration::wire::RxState;
    let (phase, limit) = match dec.state() {
        RxState::AwaitHello | RxState::AwaitLayout => ("handshake", None),
        RxState::Completed => ("commit", Some(opts.commit_timeout)),
        _ => ("progress", Some(opts.progress_timeout)),
    };
    let r = dec.get_mut();
    if let Some(limit) = limit {
        r.deadline = Instant::now() + limit;
        r.phase = phase;
        r.limit = limit;
    }
    match dec.recv(sink) {
        Ok(m) => Ok(m),
        Err(WireError::Io(_)) if dec.get_ref().expired => {
            let r = dec.get_ref();
            Err(MigrationError::Stalled {
                phase: r.phase,
                limit: r.limit,
            })
        }
        Err(e) => Err(e.into()),
    }
}

fn receive_inner(
    dec: &mut Dec,
    acks: &mut Acks,
    opts: &DestOptions,
    on_event: &mut dyn FnMut(&str),
    t0: Instant,
    cpu: &crate::cpu::CpuSpan,
) -> Result<(Vm, IncomingSummary)> {
    let mut sum = IncomingSummary {
        frame_crc: dec.frame_crc(),
        ..IncomingSummary::default()
    };
    let (hello, platform, layout, vm) = handshake(dec, acks, opts, &mut sum, on_event)?;
    let mut sink = MemSink {
        ram: vm.ram(),
        digest: IncrementalDigest::new(&layout),
        err: None,
        touched: populated_pages(&vm)?,
    };
    let (states, machine, complete) = receive_stream(
        dec, acks, opts, &mut sink, &hello, platform, &mut sum, on_event,
    )?;
    let t_complete = Instant::now();
    let digest = sink.digest.digest();
    // The source's digest, when it sent one, is checked before anything is restored: a
    // mismatch is an error answer, never a guest.
    if let Some(source) = &complete.digest {
        source.verify(&digest).map_err(MigrationError::Digest)?;
    }
    restore(&vm, &states, machine.as_ref(), &mut sum)?;
    acks.send(&Ack::ReadyToResume {
        digest: Some(digest),
    })?;
    match recv(dec, &mut NullSink, opts)? {
        Message::Commit => {}
        Message::Abort(reason) => return Err(MigrationError::SourceAborted(reason)),
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected Commit, got {m:?}"
            )))
        }
    }
    let mut vm = vm;
    vm.start(None)?;
    sum.resumed_unix_ns = unix_ns();
    acks.send(&Ack::Resumed {
        unix_ns: sum.resumed_unix_ns,
    })?;
    let st = dec.stats();
    sum.pages = st.pages;
    sum.zero_pages = st.zero_pages;
    sum.bytes = st.bytes;
    sum.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    sum.cpu = Some(cpu.finish());
    sum.restore_ms = t_complete.elapsed().as_secs_f64() * 1e3;
    on_event("resumed: the guest runs here");
    Ok((vm, sum))
}

/// Hello and Layout (refused past `max_guest_memory` by the decoder, before anything is
/// mapped), then the same VM built here and Accepted sent.
fn handshake(
    dec: &mut Dec,
    acks: &mut Acks,
    opts: &DestOptions,
    sum: &mut IncomingSummary,
    on_event: &mut dyn FnMut(&str),
) -> Result<(Hello, Platform, MemoryLayout, Vm)> {
    let hello = match recv(dec, &mut NullSink, opts)? {
        Message::Hello(h) => h,
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected Hello, got {m:?}"
            )))
        }
    };
    sum.source_tracker = hello.tracker.name().to_string();
    let platform = Platform::from_wire(hello.machine).ok_or_else(|| {
        MigrationError::Protocol(format!(
            "the source's machine type {} is unknown to this VMM",
            hello.machine
        ))
    })?;
    sum.machine = platform.name().into();
    let layout = match recv(dec, &mut NullSink, opts)? {
        Message::Layout(l) => l,
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected Layout, got {m:?}"
            )))
        }
    };
    let vm = create_vm(platform, hello.vcpus, &layout, opts.tracking, &opts.serial)?;
    acks.send(&Ack::Accepted)?;
    on_event(&format!(
        "accepted: {} vCPU(s), {} MiB in {} regions, source tracker {}",
        hello.vcpus,
        layout.total_bytes() >> 20,
        layout.regions().len(),
        hello.tracker.name()
    ));
    Ok((hello, platform, layout, vm))
}

/// The VM a source's Hello and Layout describe (not started), or why this VMM cannot build
/// it; shared by the destination and the replication standby.
pub(crate) fn create_vm(
    platform: Platform,
    vcpus: u32,
    layout: &MemoryLayout,
    tracking: Tracking,
    serial: &SerialOutput,
) -> Result<Vm> {
    let memory: Vec<RegionSpec> = layout
        .regions()
        .iter()
        .filter(|r| platform == Platform::Pvh || r.slot != 0)
        .map(|r| {
            Ok(RegionSpec {
                slot: u16::try_from(r.slot).map_err(|_| {
                    MigrationError::Protocol(format!("slot {} out of range", r.slot))
                })?,
                gpa: r.guest_phys_addr,
                bytes: r.size,
                log_dirty: true,
            })
        })
        .collect::<Result<_>>()?;
    let config = VmConfig {
        vcpus: vcpus as usize,
        memory,
        tracking,
    };
    let vm = match platform {
        Platform::Workload => Vm::create(&config)?,
        Platform::Pvh => Vm::create_pvh(&config, serial)?,
    };
    if layout_matches(&vm, layout).is_err() {
        return Err(MigrationError::Protocol(
            "the source's memory layout does not match this VMM's (system region)".into(),
        ));
    }
    Ok(vm)
}

/// Pages the VMM wrote while building `vm` (the workload machine's tables and program): the
/// only ones that may hold data before the stream arrives, i.e. what this process has
/// populated per `/proc/self/pagemap` (every page, if pagemap cannot be read).
pub(crate) fn populated_pages(vm: &Vm) -> Result<kvm_dirty::DirtyPageSet> {
    let mut touched = kvm_dirty::DirtyPageSet::new(&vm.ram().slot_specs());
    let mut bits = Vec::new();
    for r in vm.ram().regions() {
        let pages = r.bytes / PAGE_SIZE;
        let mut first = 0;
        while first < pages {
            let n = (pages - first).min(POPULATED_CHUNK);
            let base = r.gpa + first * PAGE_SIZE;
            vm.ram().populated(base, n, &mut bits)?;
            for i in (0..n).filter(|&i| bits[(i / 64) as usize] >> (i % 64) & 1 == 1) {
                touched.insert_gpa(base + i * PAGE_SIZE);
            }
            first += n;
        }
    }
    Ok(touched)
}

/// Passes, state blobs and Sync barriers up to Complete. State blobs are decoded strictly as
/// they arrive (a bad one ends the migration at once).
#[allow(clippy::too_many_arguments)]
fn receive_stream(
    dec: &mut Dec,
    acks: &mut Acks,
    opts: &DestOptions,
    sink: &mut MemSink<'_>,
    hello: &Hello,
    platform: Platform,
    sum: &mut IncomingSummary,
    on_event: &mut dyn FnMut(&str),
) -> Result<(Vec<VcpuState>, Option<MachineState>, Complete)> {
    let mut states: Vec<Option<VcpuState>> = (0..hello.vcpus).map(|_| None).collect();
    let mut machine: Option<MachineState> = None;
    let complete = loop {
        match recv(dec, sink, opts)? {
            Message::Pages(_) => {
                if let Some(e) = sink.err.take() {
                    return Err(e.into());
                }
            }
            Message::Iteration(m) => {
                sum.iterations = m.iteration + 1;
                on_event(&format!(
                    "pass {}: {} pages{}",
                    m.iteration,
                    m.pages,
                    if m.final_pass {
                        " (final, source paused)"
                    } else {
                        ""
                    }
                ));
            }
            Message::State(b) if b.kind == STATE_KIND_VCPU => {
                let st = VcpuState::decode(&b.data)?;
                let slot = states.get_mut(b.instance as usize).ok_or_else(|| {
                    MigrationError::Protocol(format!(
                        "state for vCPU {} of {}",
                        b.instance, hello.vcpus
                    ))
                })?;
                if st.index != b.instance as usize {
                    return Err(MigrationError::Protocol("vCPU state index mismatch".into()));
                }
                if slot.is_some() {
                    return Err(MigrationError::Protocol(format!(
                        "a second state for vCPU {}",
                        b.instance
                    )));
                }
                *slot = Some(st);
            }
            Message::State(b) if b.kind == STATE_KIND_MACHINE => {
                if platform != Platform::Pvh || b.instance != 0 || machine.is_some() {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected machine state (instance {}) for a {} guest",
                        b.instance,
                        platform.name()
                    )));
                }
                machine = Some(MachineState::decode(&b.data)?);
            }
            Message::State(b) => {
                return Err(MigrationError::Protocol(format!(
                    "unknown state kind {}",
                    b.kind
                )))
            }
            Message::Sync(token) => acks.send(&Ack::Synced(token))?,
            Message::Complete(c) => break c,
            Message::Abort(reason) => return Err(MigrationError::SourceAborted(reason)),
            m => return Err(MigrationError::Protocol(format!("unexpected {m:?}"))),
        }
    };
    let states: Vec<VcpuState> = states
        .into_iter()
        .enumerate()
        .map(|(i, s)| s.ok_or_else(|| MigrationError::Protocol(format!("no state for vCPU {i}"))))
        .collect::<Result<_>>()?;
    if platform == Platform::Pvh && machine.is_none() {
        return Err(MigrationError::Protocol(
            "no machine state for a PVH guest".into(),
        ));
    }
    Ok((states, machine, complete))
}

/// Checks every vCPU state against the received memory and this VM, then restores: devices
/// first (the LAPICs deliver into them), then vCPUs, the clock last.
pub(crate) fn restore(
    vm: &Vm,
    states: &[VcpuState],
    machine: Option<&MachineState>,
    sum: &mut IncomingSummary,
) -> Result<()> {
    let mut mark = Instant::now();
    let mut lap = |what: &str, sum: &mut IncomingSummary| {
        let now = Instant::now();
        sum.restore_breakdown_ms.push((
            what.to_string(),
            now.duration_since(mark).as_secs_f64() * 1e3,
        ));
        mark = now;
    };
    vm.check_vcpu_states(states)?;
    lap("checks", sum);
    if let Some(m) = machine {
        vm.restore_machine_devices(m)?;
        lap("devices", sum);
    }
    vm.restore_vcpus(states)?;
    lap("vCPUs", sum);
    if let Some(m) = machine {
        vm.restore_machine_clock(m)?;
        lap("clock", sum);
    }
    Ok(())
}

fn layout_matches(vm: &Vm, layout: &migration::wire::MemoryLayout) -> std::result::Result<(), ()> {
    let ours = vm.ram().regions();
    if ours.len() != layout.regions().len() {
        return Err(());
    }
    for (a, b) in ours.iter().zip(layout.regions()) {
        if u32::from(a.slot) != b.slot || a.gpa != b.guest_phys_addr || a.bytes != b.size {
            return Err(());
        }
    }
    Ok(())
}
