//! Writing passes to the stream: pages read from the VM, zero markers, `max-bandwidth`
//! pacing, progress and cancel checks every 256 pages.

use std::io::BufWriter;
use std::net::TcpStream;

use std::time::{Duration, Instant};
use tls::{Channel, ChannelReader, ChannelWriter};

use kvm_dirty::PAGE_SIZE;
use migration::wire::{AckReader, Encoder, IterationMarker, PageKind};

use super::{FailPoint, Populated, Progress, SourceOptions};
use crate::error::{MigrationError, Result};
use crate::job::Control;
use crate::seam::MigratableVm;

/// Pages between two checkpoints (progress, pacing, cancel) and in one batch frame.
const CHECKPOINT_PAGES: u64 = 256;

/// Reads the destination's answers.
pub(super) type Acks = AckReader<ChannelReader>;

pub(super) struct Sender<'a> {
    pub(super) vm: &'a dyn MigratableVm,
    pub(super) ctl: &'a Control,
    sock: TcpStream,
    pub(super) fail_at: Option<FailPoint>,
    pub(super) enc: Encoder<BufWriter<ChannelWriter>>,
    limiter: migration::bandwidth::TokenBucket,
    /// Bytes and seconds spent sending data, for the bandwidth estimate.
    bw_bytes: u64,
    bw_secs: f64,
    /// Encoder byte count at the last limiter accounting.
    accounted: u64,
}

impl<'a> Sender<'a> {
    /// Sets up the socket (and TLS, with `opts.tls`: the handshake verifies the destination
    /// for `host`) and the encoder; returns the sender and the reader of the destination's
    /// answers.
    pub(super) fn open(
        vm: &'a dyn MigratableVm,
        stream: TcpStream,
        host: &str,
        ctl: &'a Control,
        opts: &SourceOptions,
    ) -> Result<(Self, Acks)> {
        let io_timeout = Duration::from_secs(60);
        stream.set_nodelay(true)?;
        // Attached before the TLS handshake, so a cancel wakes a handshake that waits.
        ctl.attach_socket(stream.try_clone()?)?;
        let sock = stream.try_clone()?;
        let chan = match &opts.tls {
            Some(t) => t.connect(stream, host, io_timeout)?,
            None => Channel::plain(stream),
        };
        sock.set_write_timeout(Some(io_timeout))?;
        sock.set_read_timeout(Some(io_timeout))?;
        // Frame CRCs only where nothing else checks the bytes: on a TLS channel whose peer
        // agreed that the AEAD authenticates every byte, both directions leave them out.
        let frame_crc = !chan.aead_integrity();
        let (reader, writer) = chan.split()?;
        let acks = AckReader::new(reader).with_frame_crc(frame_crc);
        let s = Sender {
            vm,
            ctl,
            sock,
            fail_at: opts.fail_at,
            // A batch is written every CHECKPOINT_PAGES pages, so each checkpoint sees the
            // bytes of the pages before it: max-bandwidth paces the pass being sent (with
            // 1024-page batches a short pass went out unpaced and its debt was paid by the
            // next one) and the bandwidth estimate is that of the paced link.
            enc: Encoder::with_batch_pages(
                BufWriter::with_capacity(1 << 20, writer),
                CHECKPOINT_PAGES as u32,
            )
            .with_frame_crc(frame_crc),
            limiter: migration::bandwidth::TokenBucket::new(opts.max_bandwidth.unwrap_or(0)),
            bw_bytes: 0,
            bw_secs: 0.0,
            accounted: 0,
        };
        Ok((s, acks))
    }

    pub(super) fn cut(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }

    /// Best effort: tells the destination to drop everything (it never waits long for a
    /// destination that stopped reading).
    pub(super) fn abort(&mut self, reason: &str) {
        let _ = self.sock.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = self.enc.send_abort(reason);
    }

    pub(super) fn bandwidth(&self, fallback: f64) -> f64 {
        if self.bw_secs > 0.01 && self.bw_bytes > 0 {
            self.bw_bytes as f64 / self.bw_secs
        } else {
            fallback
        }
    }

    /// Every 256 pages: publishes progress, applies a changed max-bandwidth, paces the
    /// pre-copy passes and notices a cancel.
    pub(super) fn checkpoint(&mut self, final_pass: bool, n: u64) -> Result<()> {
        let tx = self.enc.stats();
        let max_bw = self.ctl.on_pages(tx, n).unwrap_or(0);
        if max_bw != self.limiter.rate() {
            self.limiter.set_rate(max_bw);
        }
        // max-bandwidth caps the pre-copy passes, which share the link with a running
        // guest; the final pass runs with the guest paused, where every millisecond is
        // downtime, so it goes at full speed (QEMU's completion stage does the same).
        if !final_pass {
            let d = self
                .limiter
                .reserve(tx.bytes - self.accounted, Instant::now());
            if !d.is_zero() {
                self.ctl.sleep(d);
            }
        }
        self.accounted = tx.bytes;
        self.ctl.check()
    }

    /// Sends one pass: a marker with the exact count, then every page. Returns
    /// (pages, zero pages, bytes, seconds).
    pub(super) fn pass(
        &mut self,
        iteration: u32,
        pages: u64,
        final_pass: bool,
        gpas: &mut dyn Iterator<Item = u64>,
        progress: &mut dyn FnMut(&Progress),
        dirty_pages: u64,
    ) -> Result<(u64, u64, u64, f64)> {
        let t = Instant::now();
        tracing::debug!(iteration, pages, final_pass, "migration pass");
        let s0 = self.enc.stats();
        self.ctl.update(|l, _| {
            l.x.pass = iteration;
            l.x.pass_pages_total = pages;
            l.x.pass_pages_sent = 0;
            l.ram.remaining = pages * PAGE_SIZE;
        });
        self.enc.begin_iteration(&IterationMarker {
            iteration,
            pages,
            final_pass,
        })?;
        let mut n = 0u64;
        let mut zero = 0u64;
        let mut last_report = Instant::now();
        // The bulk pass skips reading pages never populated (they are zero); later passes
        // send pages the guest dirtied, which are populated.
        let mut populated = (iteration == 0).then(|| Populated::new(self.vm));
        let fail_here = match self.fail_at {
            Some(FailPoint::BulkPass) => iteration == 0,
            Some(FailPoint::DirtyPass) => iteration == 1 && !final_pass,
            Some(FailPoint::Switchover) => final_pass,
            _ => false,
        };
        for gpa in gpas {
            if fail_here && n == pages / 2 {
                self.cut();
            }
            let skip = match populated.as_mut() {
                Some(p) => !p.may_hold_data(gpa)?,
                None => false,
            };
            if skip {
                self.enc.push_zero_page(gpa)?;
                zero += 1;
            } else {
                let vm = self.vm;
                if self.enc.push_page_with(gpa, |dst| vm.read_page(gpa, dst))? == PageKind::Zero {
                    zero += 1;
                }
            }
            n += 1;
            if n.is_multiple_of(CHECKPOINT_PAGES) {
                self.checkpoint(final_pass, n)?;
                if last_report.elapsed() > Duration::from_millis(100) {
                    last_report = Instant::now();
                    progress(&Progress {
                        iteration,
                        pass_sent: n,
                        pass_pages: pages,
                        bytes: self.accounted,
                        bandwidth: self.bandwidth(0.0),
                        dirty_pages,
                    });
                }
            }
        }
        if n != pages {
            return Err(MigrationError::Internal(format!(
                "pass {iteration} announced {pages} pages but produced {n}"
            )));
        }
        self.enc.flush()?;
        let tx = self.enc.stats();
        self.ctl.on_pages(tx, n);
        let bytes = tx.bytes - s0.bytes;
        let secs = t.elapsed().as_secs_f64();
        if pages - zero > 0 {
            self.bw_bytes += bytes;
            self.bw_secs += secs;
        }
        Ok((n, zero, bytes, secs))
    }
}
