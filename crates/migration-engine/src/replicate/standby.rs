//! The standby: receives the seed into its image, then each checkpoint into a staging area,
//! and applies a checkpoint to the image only once `End` arrived with every count and the
//! checksum right (and its state blobs decode); then acks it. A checkpoint cut short or
//! corrupted never touches the image. The primary is lost when the stream ends or breaks,
//! or when nothing (checkpoint or heartbeat) arrives within `heartbeat_timeout`; the caller
//! then fails over with [`failover`] from the last applied checkpoint.

use std::io::{BufReader, BufWriter};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kvm_dirty::{DirtyPageSet, PAGE_SIZE};
use migration::wire::replica::{
    ReplicaAck, ReplicaAckWriter, ReplicaLimits, ReplicaMessage, ReplicaReader, ReplicaSink,
};
use migration::wire::{Hello, MemoryLayout, WireError};
use vmm::state::VcpuState;
use vmm::{MachineState, Platform, SerialOutput, Tracking, Vm};

use crate::error::{MigrationError, Result};
use crate::fake::FakeVm;
use crate::{STATE_KIND_MACHINE, STATE_KIND_VCPU};

/// Where the standby keeps the guest's memory.
pub trait ReplicaImage {
    /// Writes one page (4096 bytes) at `gpa`.
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<()>;
    /// Makes the page at `gpa` zero.
    fn zero_page(&mut self, gpa: u64) -> Result<()>;
    /// Checks a checkpoint's state blobs before the checkpoint is applied (a checkpoint
    /// whose state could not be restored is never applied).
    fn check_states(&self, _states: &[(u32, u32, Vec<u8>)]) -> Result<()> {
        Ok(())
    }
}

impl ReplicaImage for FakeVm {
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        FakeVm::write_page(self, gpa, data)
    }
    fn zero_page(&mut self, gpa: u64) -> Result<()> {
        FakeVm::write_page(self, gpa, &[0u8; PAGE_SIZE as usize])
    }
}

/// A standby image in a real (not started) `vmm::Vm`, built like a migration destination's.
#[derive(Debug)]
pub struct VmImage {
    /// The VM; its vCPUs start only at [`failover`].
    pub vm: Vm,
    platform: Platform,
    vcpus: u32,
    /// Pages that may hold data (a zero page elsewhere costs nothing).
    touched: DirtyPageSet,
}

impl VmImage {
    /// The VM `hello` and `layout` describe, with `tracking` (so the resumed guest can be
    /// replicated or migrated again) and its console on `serial`.
    pub fn create(
        hello: &Hello,
        layout: &MemoryLayout,
        tracking: Tracking,
        serial: &SerialOutput,
    ) -> Result<Self> {
        let platform = Platform::from_wire(hello.machine).ok_or_else(|| {
            MigrationError::Protocol(format!(
                "the primary's machine type {} is unknown to this VMM",
                hello.machine
            ))
        })?;
        let vm = crate::dest::create_vm(platform, hello.vcpus, layout, tracking, serial)?;
        let touched = crate::dest::populated_pages(&vm)?;
        Ok(VmImage {
            vm,
            platform,
            vcpus: hello.vcpus,
            touched,
        })
    }

    fn decode(
        &self,
        states: &[(u32, u32, Vec<u8>)],
    ) -> Result<(Vec<VcpuState>, Option<MachineState>)> {
        let mut vcpus: Vec<Option<VcpuState>> = (0..self.vcpus).map(|_| None).collect();
        let mut machine = None;
        for (kind, instance, data) in states {
            match *kind {
                STATE_KIND_VCPU => {
                    let st = VcpuState::decode(data)?;
                    let slot = vcpus
                        .get_mut(*instance as usize)
                        .filter(|s| s.is_none() && st.index == *instance as usize)
                        .ok_or_else(|| {
                            MigrationError::Protocol(format!(
                                "bad or repeated state for vCPU {instance}"
                            ))
                        })?;
                    *slot = Some(st);
                }
                STATE_KIND_MACHINE if self.platform == Platform::Pvh && machine.is_none() => {
                    machine = Some(MachineState::decode(data)?);
                }
                k => {
                    return Err(MigrationError::Protocol(format!(
                        "unexpected state kind {k} (instance {instance})"
                    )))
                }
            }
        }
        let vcpus = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.ok_or_else(|| MigrationError::Protocol(format!("no state for vCPU {i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        if self.platform == Platform::Pvh && machine.is_none() {
            return Err(MigrationError::Protocol(
                "no machine state for a PVH guest".into(),
            ));
        }
        Ok((vcpus, machine))
    }
}

impl ReplicaImage for VmImage {
    fn write_page(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        self.vm.ram().write_untracked(gpa, data)?;
        self.touched.insert_gpa(gpa);
        Ok(())
    }
    fn zero_page(&mut self, gpa: u64) -> Result<()> {
        if self.touched.contains_gpa(gpa) {
            self.vm.ram().zero_untracked(gpa, PAGE_SIZE)?;
        }
        Ok(())
    }
    fn check_states(&self, states: &[(u32, u32, Vec<u8>)]) -> Result<()> {
        self.decode(states).map(|_| ())
    }
}

/// Restores `cp` (the last applied checkpoint) into the image's VM and starts its vCPUs: the
/// guest resumes from that checkpoint. Every vCPU state is checked against the image first.
/// The output of the checkpoint's epoch (which the primary may have died before releasing)
/// goes out on the console first: output is shown at least once, never lost (the last
/// epoch's may be shown twice).
pub fn failover(image: VmImage, cp: &AppliedCheckpoint) -> Result<Vm> {
    let (vcpus, machine) = image.decode(&cp.states)?;
    let mut sum = crate::dest::IncomingSummary::default();
    crate::dest::restore(&image.vm, &vcpus, machine.as_ref(), &mut sum)?;
    if let (Some(d), false) = (image.vm.devices(), cp.output.is_empty()) {
        d.replay_output(&cp.output)?;
    }
    let mut vm = image.vm;
    vm.start(None)?;
    Ok(vm)
}

/// Standby parameters.
#[derive(Debug, Clone)]
pub struct StandbyOptions {
    /// The primary is lost when nothing arrives for this long.
    pub heartbeat_timeout: Duration,
    /// Hello and Layout must arrive within this long of the connection.
    pub handshake_timeout: Duration,
    /// Most guest memory a primary may announce (`None`: 1 TiB; the VM maps its RAM
    /// `MAP_NORESERVE`).
    pub max_guest_memory: Option<u64>,
}

impl Default for StandbyOptions {
    fn default() -> Self {
        StandbyOptions {
            heartbeat_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            max_guest_memory: None,
        }
    }
}

/// The last checkpoint applied to the image: what a failover resumes.
#[derive(Debug, Clone, Default)]
pub struct AppliedCheckpoint {
    /// Its epoch.
    pub epoch: u64,
    /// Its state blobs (kind, instance, bytes).
    pub states: Vec<(u32, u32, Vec<u8>)>,
    /// The guest's output during its epoch (released by the primary only once it read the
    /// ack of this checkpoint; replayed by [`failover`]).
    pub output: Vec<u8>,
}

/// How the primary's stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryEnd {
    /// The stream closed or broke, or went silent past the heartbeat timeout: the primary
    /// is presumed dead; fail over.
    Lost {
        /// Why.
        reason: String,
    },
    /// The primary ended replication on purpose: it runs on; do not fail over.
    Shutdown {
        /// Its reason.
        reason: String,
    },
    /// The stream carried something invalid (corrupted or out of protocol): the standby
    /// told the primary, which runs on; do not fail over.
    Invalid {
        /// What was wrong.
        reason: String,
    },
}

/// What the standby saw.
#[derive(Debug, Clone)]
pub struct StandbyReport {
    /// The primary's Hello.
    pub hello: Hello,
    /// Its memory layout.
    pub layout: MemoryLayout,
    /// Whether the initial copy completed.
    pub seeded: bool,
    /// The last applied checkpoint (`None`: not one yet, the image is not a guest).
    pub last: Option<AppliedCheckpoint>,
    /// Checkpoints applied.
    pub applied: u64,
    /// A checkpoint was being received when the stream ended (it was dropped).
    pub dropped_partial: bool,
    /// Heartbeats received.
    pub heartbeats: u64,
    /// Bytes received.
    pub bytes: u64,
    /// How the stream ended.
    pub end: PrimaryEnd,
    /// When the end was noticed.
    pub ended_at: Instant,
}

#[derive(Default)]
struct Staging {
    words: Vec<u64>,
    data: Vec<u8>,
    states: Vec<(u32, u32, Vec<u8>)>,
    output: Vec<u8>,
}

struct Sink<'a, I: ReplicaImage> {
    image: &'a mut I,
    staging: &'a mut Staging,
    err: Option<MigrationError>,
}

impl<I: ReplicaImage> ReplicaSink for Sink<'_, I> {
    fn seed_page(&mut self, gpa: u64, data: Option<&[u8]>) {
        let r = match data {
            Some(d) => self.image.write_page(gpa, d),
            None => self.image.zero_page(gpa),
        };
        if let Err(e) = r {
            self.err.get_or_insert(e);
        }
    }
    fn stage_page(&mut self, gpa: u64, data: Option<&[u8]>) {
        match data {
            Some(d) => {
                self.staging.words.push(gpa);
                self.staging.data.extend_from_slice(d);
            }
            None => self.staging.words.push(gpa | 1),
        }
    }
    fn stage_output(&mut self, data: &[u8]) {
        self.staging.output.extend_from_slice(data);
    }
}

type Reader = ReplicaReader<BufReader<TcpStream>>;
type Acks = ReplicaAckWriter<BufWriter<TcpStream>>;

/// Receives a replication stream into the image `make_image` builds from the primary's
/// Hello and Layout, until the primary is lost or shuts down. An error before the image
/// exists is returned (and told to the primary); after that, how the stream ended is in the
/// report, with the image as of the last applied checkpoint.
pub fn run_standby<I: ReplicaImage>(
    stream: TcpStream,
    opts: &StandbyOptions,
    make_image: &mut dyn FnMut(&Hello, &MemoryLayout) -> Result<I>,
    on_event: &mut dyn FnMut(&str),
) -> Result<(I, StandbyReport)> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(opts.handshake_timeout))?;
    stream.set_write_timeout(Some(opts.heartbeat_timeout.max(Duration::from_secs(1))))?;
    let sock = stream.try_clone()?;
    let mut acks = ReplicaAckWriter::new(BufWriter::new(stream.try_clone()?));
    let limits = ReplicaLimits {
        max_guest_bytes: opts.max_guest_memory.unwrap_or(1 << 40),
        max_checkpoint_bytes: None,
    };
    let mut rd = ReplicaReader::new(BufReader::with_capacity(1 << 20, stream), limits);
    let r = handshake(&mut rd, &mut acks, make_image);
    let (hello, layout, mut image) = match r {
        Ok(x) => x,
        Err(e) => {
            let _ = acks.send(&ReplicaAck::Error(e.to_string()));
            return Err(e);
        }
    };
    on_event(&format!(
        "replicating: {} vCPU(s), {} MiB, primary tracker {}",
        hello.vcpus,
        layout.total_bytes() >> 20,
        hello.tracker.name()
    ));
    // Until a checkpoint is applied there is nothing to fail over to: the primary gets the
    // (longer) handshake timeout to start tracking and seed; the heartbeat timeout applies
    // from the first applied checkpoint on.
    sock.set_read_timeout(Some(opts.handshake_timeout.max(opts.heartbeat_timeout)))?;
    let mut rep = StandbyReport {
        hello,
        layout,
        seeded: false,
        last: None,
        applied: 0,
        dropped_partial: false,
        heartbeats: 0,
        bytes: 0,
        end: PrimaryEnd::Lost {
            reason: String::new(),
        },
        ended_at: Instant::now(),
    };
    rep.end = receive(
        &mut rd, &mut acks, &mut image, &mut rep, opts, &sock, on_event,
    );
    rep.ended_at = Instant::now();
    rep.bytes = rd.bytes();
    if let PrimaryEnd::Invalid { reason } = &rep.end {
        let _ = acks.send(&ReplicaAck::Error(reason.clone()));
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
    Ok((image, rep))
}

fn handshake<I: ReplicaImage>(
    rd: &mut Reader,
    acks: &mut Acks,
    make_image: &mut dyn FnMut(&Hello, &MemoryLayout) -> Result<I>,
) -> Result<(Hello, MemoryLayout, I)> {
    let hello = match rd.recv(&mut NoPages)? {
        ReplicaMessage::Hello(h) => h,
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected Hello, got {m:?}"
            )))
        }
    };
    let layout = match rd.recv(&mut NoPages)? {
        ReplicaMessage::Layout(l) => l,
        m => {
            return Err(MigrationError::Protocol(format!(
                "expected Layout, got {m:?}"
            )))
        }
    };
    let image = make_image(&hello, &layout)?;
    acks.send(&ReplicaAck::Ready)?;
    Ok((hello, layout, image))
}

struct NoPages;
impl ReplicaSink for NoPages {
    fn seed_page(&mut self, _: u64, _: Option<&[u8]>) {}
    fn stage_page(&mut self, _: u64, _: Option<&[u8]>) {}
}

/// Why a stream error means the primary is gone (fail over) or the stream is invalid.
fn classify(e: WireError, timeout: Duration) -> PrimaryEnd {
    match e {
        WireError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            PrimaryEnd::Lost {
                reason: format!(
                    "nothing from the primary within the heartbeat timeout of {timeout:?}"
                ),
            }
        }
        e @ (WireError::Io(_) | WireError::Closed { .. } | WireError::Truncated { .. }) => {
            PrimaryEnd::Lost {
                reason: e.to_string(),
            }
        }
        e => PrimaryEnd::Invalid {
            reason: e.to_string(),
        },
    }
}

fn receive<I: ReplicaImage>(
    rd: &mut Reader,
    acks: &mut Acks,
    image: &mut I,
    rep: &mut StandbyReport,
    opts: &StandbyOptions,
    sock: &TcpStream,
    on_event: &mut dyn FnMut(&str),
) -> PrimaryEnd {
    let mut staging = Staging::default();
    let mut in_checkpoint = false;
    loop {
        let mut sink = Sink {
            image: &mut *image,
            staging: &mut staging,
            err: None,
        };
        let m = rd.recv(&mut sink);
        if let Some(e) = sink.err.take() {
            return PrimaryEnd::Invalid {
                reason: format!("writing the standby's image failed: {e}"),
            };
        }
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                rep.dropped_partial = in_checkpoint;
                let timeout = if rep.applied == 0 {
                    opts.handshake_timeout.max(opts.heartbeat_timeout)
                } else {
                    opts.heartbeat_timeout
                };
                return classify(e, timeout);
            }
        };
        match m {
            ReplicaMessage::SeedDone(pages) => {
                rep.seeded = true;
                on_event(&format!("initial copy complete: {pages} pages"));
            }
            ReplicaMessage::Begin(_) => {
                in_checkpoint = true;
                staging.words.clear();
                staging.data.clear();
                staging.states.clear();
                staging.output.clear();
            }
            ReplicaMessage::State {
                kind,
                instance,
                data,
            } => staging.states.push((kind, instance, data)),
            ReplicaMessage::End(h) => {
                in_checkpoint = false;
                if let Err(e) = apply(image, &mut staging, rep, h.epoch) {
                    return PrimaryEnd::Invalid {
                        reason: format!("checkpoint {} not applied: {e}", h.epoch),
                    };
                }
                if rep.applied == 1 {
                    if let Err(e) = sock.set_read_timeout(Some(opts.heartbeat_timeout)) {
                        return PrimaryEnd::Lost {
                            reason: format!("setting the heartbeat timeout: {e}"),
                        };
                    }
                }
                if let Err(e) = acks.send(&ReplicaAck::Applied(h.epoch)) {
                    return classify(e, opts.heartbeat_timeout);
                }
            }
            ReplicaMessage::Heartbeat { .. } => rep.heartbeats += 1,
            ReplicaMessage::Shutdown(reason) => return PrimaryEnd::Shutdown { reason },
            _ => {}
        }
    }
}

/// Applies a complete, verified checkpoint: its states checked first, then its pages
/// written, then it becomes the last applied checkpoint.
fn apply<I: ReplicaImage>(
    image: &mut I,
    staging: &mut Staging,
    rep: &mut StandbyReport,
    epoch: u64,
) -> Result<()> {
    image.check_states(&staging.states)?;
    let mut off = 0usize;
    for &w in &staging.words {
        if w & 1 != 0 {
            image.zero_page(w & !(PAGE_SIZE - 1))?;
        } else {
            image.write_page(w, &staging.data[off..off + PAGE_SIZE as usize])?;
            off += PAGE_SIZE as usize;
        }
    }
    let last = rep.last.get_or_insert_with(AppliedCheckpoint::default);
    last.epoch = epoch;
    std::mem::swap(&mut last.states, &mut staging.states);
    std::mem::swap(&mut last.output, &mut staging.output);
    staging.words.clear();
    staging.data.clear();
    staging.states.clear();
    staging.output.clear();
    rep.applied += 1;
    Ok(())
}
