//! Guest programs, assembled at run time with iced-x86 (no cross toolchain, no downloads).
//!
//! [`dirty_workload`] is the one workload program: each vCPU writes pages of its working set
//! (random or sequential, optionally strided and paced by `rdtsc`), bumps its write counter,
//! and reports to the VMM with an `out` to [`SYNC_PORT`] whenever the shared stop flag is set.
//! It serves the dirty_log_test port (value = iteration), migration (value = iteration +
//! write counter, so every write changes memory) and the sync-cost benchmark (strided
//! sequential sweep of a fixed page set).
//!
//! Control memory (see [`crate::x86`] for addresses):
//! - shared page `CTRL_GPA`: `+0` iteration (u64), `+8` stop flag (u64, non-zero = stop)
//! - per-vCPU page `vcpu_ctrl_gpa(i)`: the [`VcpuCtrl`] fields at the offsets below

use iced_x86::code_asm::*;

use crate::error::{Result, VmmError};
use crate::x86::CTRL_GPA;

/// Port the guest writes to at its stop point.
pub const SYNC_PORT: u16 = 0x5e;
/// Port the guest writes to when it is ahead of its pacing schedule: the VMM puts the vCPU
/// thread to sleep for the TSC ticks stored at [`off::SLEEP_TSC`] (like a guest's HLT, this
/// frees the host CPU instead of spinning).
pub const SLEEP_PORT: u16 = 0x5f;

/// Shared control: current iteration value.
pub const CTRL_ITERATION: u64 = 0;
/// Shared control: stop flag.
pub const CTRL_STOP: u64 = 8;

/// Per-vCPU control offsets.
pub mod off {
    /// Writes done (guest increments).
    pub const NR_WRITES: u64 = 0;
    /// Working set base GPA.
    pub const BASE: u64 = 8;
    /// Working set size in pages.
    pub const PAGES: u64 = 16;
    /// 0 = random, 1 = sequential.
    pub const PATTERN: u64 = 24;
    /// Mask ANDed with the write counter before adding the iteration (0 or !0).
    pub const VALUE_MASK: u64 = 32;
    /// Pages per paced burst (0 = unpaced).
    pub const BURST_PAGES: u64 = 40;
    /// TSC ticks per burst.
    pub const BURST_TSC: u64 = 48;
    /// If the pacing deadline is further than this from now, it is reset to now.
    pub const MAX_LAG_TSC: u64 = 56;
    /// Page stride (page index multiplier).
    pub const STRIDE: u64 = 64;
    /// Ticks to sleep, written by the guest before an `out` to the sleep port.
    pub const SLEEP_TSC: u64 = 72;
    /// Sleep through the VMM only when at least this many ticks ahead (0 = never sleep).
    pub const SLEEP_MIN_TSC: u64 = 80;
}

/// GPA of vCPU `i`'s control page.
pub fn vcpu_ctrl_gpa(i: usize) -> u64 {
    CTRL_GPA + 0x1000 * (i as u64 + 1)
}

/// Access pattern of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pattern {
    /// Uniformly random pages of the working set.
    Random,
    /// Pages in order, wrapping around.
    Sequential,
}

/// What the VMM writes into a vCPU's control page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuCtrl {
    /// Working set base GPA (page aligned).
    pub base: u64,
    /// Working set size in pages (the page index is multiplied by `stride`).
    pub pages: u64,
    /// Page-index multiplier.
    pub stride: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Write iteration + write counter (true) or only the iteration (false).
    pub unique_values: bool,
    /// Pages per paced burst (0 = as fast as possible).
    pub burst_pages: u64,
    /// TSC ticks per burst.
    pub burst_tsc: u64,
    /// When at least this many ticks ahead of schedule, sleep in the VMM instead of spinning
    /// (0 = always spin).
    pub sleep_min_tsc: u64,
}

impl VcpuCtrl {
    /// Serialises to (offset, value) pairs for the control page.
    pub fn fields(&self) -> [(u64, u64); 9] {
        [
            (off::BASE, self.base),
            (off::PAGES, self.pages),
            (off::PATTERN, u64::from(self.pattern == Pattern::Sequential)),
            (
                off::VALUE_MASK,
                if self.unique_values { u64::MAX } else { 0 },
            ),
            (off::BURST_PAGES, self.burst_pages),
            (off::BURST_TSC, self.burst_tsc),
            (off::MAX_LAG_TSC, self.burst_tsc.saturating_mul(8)),
            (off::STRIDE, self.stride.max(1)),
            (off::SLEEP_MIN_TSC, self.sleep_min_tsc),
        ]
    }
}

fn err(e: IcedError) -> VmmError {
    VmmError::Assemble(e.to_string())
}

/// Registers the VMM sets before the first run: `rdi` = shared control page, `rsi` = this
/// vCPU's control page, `r8` = non-zero xorshift seed. `r9`..`r11` hold loop state.
pub fn dirty_workload(ip: u64) -> Result<Vec<u8>> {
    let mut a = CodeAssembler::new(64).map_err(err)?;
    let mut top = a.create_label();
    let mut seq = a.create_label();
    let mut write = a.create_label();
    let mut pace_check = a.create_label();
    let mut spin = a.create_label();
    let mut sync = a.create_label();
    let stop = qword_ptr(rdi + CTRL_STOP as i32);

    a.set_label(&mut top).map_err(err)?;
    a.cmp(stop, 0).map_err(err)?;
    a.jne(sync).map_err(err)?;
    a.cmp(qword_ptr(rsi + off::PATTERN as i32), 0)
        .map_err(err)?;
    a.jne(seq).map_err(err)?;
    // xorshift64 on r8, then index = (r8 >> 32) * pages >> 32 (uniform in [0, pages)).
    for (shl, n) in [(true, 13u32), (false, 7), (true, 17)] {
        a.mov(rax, r8).map_err(err)?;
        if shl {
            a.shl(rax, n).map_err(err)?;
        } else {
            a.shr(rax, n).map_err(err)?;
        }
        a.xor(r8, rax).map_err(err)?;
    }
    a.mov(rax, r8).map_err(err)?;
    a.shr(rax, 32).map_err(err)?;
    a.mul(qword_ptr(rsi + off::PAGES as i32)).map_err(err)?;
    a.shr(rax, 32).map_err(err)?;
    a.jmp(write).map_err(err)?;

    a.set_label(&mut seq).map_err(err)?;
    a.mov(rax, r9).map_err(err)?;
    a.inc(r9).map_err(err)?;
    a.cmp(r9, qword_ptr(rsi + off::PAGES as i32)).map_err(err)?;
    a.jb(write).map_err(err)?;
    a.xor(r9d, r9d).map_err(err)?;

    a.set_label(&mut write).map_err(err)?;
    a.imul_2(rax, qword_ptr(rsi + off::STRIDE as i32))
        .map_err(err)?;
    a.shl(rax, 12).map_err(err)?;
    a.add(rax, qword_ptr(rsi + off::BASE as i32)).map_err(err)?;
    a.mov(rcx, qword_ptr(rsi + off::NR_WRITES as i32))
        .map_err(err)?;
    a.and(rcx, qword_ptr(rsi + off::VALUE_MASK as i32))
        .map_err(err)?;
    a.add(rcx, qword_ptr(rdi + CTRL_ITERATION as i32))
        .map_err(err)?;
    a.mov(qword_ptr(rax), rcx).map_err(err)?;
    a.inc(qword_ptr(rsi + off::NR_WRITES as i32)).map_err(err)?;
    // Pacing: after `burst_pages` writes, wait for the next deadline.
    a.mov(rcx, qword_ptr(rsi + off::BURST_PAGES as i32))
        .map_err(err)?;
    a.test(rcx, rcx).map_err(err)?;
    a.jz(top).map_err(err)?;
    a.dec(r10).map_err(err)?;
    a.jg(top).map_err(err)?;
    a.mov(r10, rcx).map_err(err)?;
    a.add(r11, qword_ptr(rsi + off::BURST_TSC as i32))
        .map_err(err)?;
    a.rdtsc().map_err(err)?;
    a.shl(rdx, 32).map_err(err)?;
    a.or(rax, rdx).map_err(err)?;
    // |now - deadline| > max_lag (e.g. after a pause or a migration): restart pacing from now.
    a.mov(rcx, rax).map_err(err)?;
    a.sub(rcx, r11).map_err(err)?;
    a.mov(rdx, rcx).map_err(err)?;
    a.neg(rdx).map_err(err)?;
    a.cmovs(rdx, rcx).map_err(err)?;
    a.cmp(rdx, qword_ptr(rsi + off::MAX_LAG_TSC as i32))
        .map_err(err)?;
    a.jbe(pace_check).map_err(err)?;
    a.mov(r11, rax).map_err(err)?;
    a.set_label(&mut pace_check).map_err(err)?;
    // Far enough ahead: store the ticks left and ask the VMM to sleep (frees the host CPU).
    let mut spin_only = a.create_label();
    a.mov(rcx, qword_ptr(rsi + off::SLEEP_MIN_TSC as i32))
        .map_err(err)?;
    a.test(rcx, rcx).map_err(err)?;
    a.jz(spin_only).map_err(err)?;
    a.mov(rdx, r11).map_err(err)?;
    a.sub(rdx, rax).map_err(err)?;
    a.jb(spin_only).map_err(err)?; // deadline already passed
    a.cmp(rdx, rcx).map_err(err)?;
    a.jb(spin_only).map_err(err)?;
    a.mov(qword_ptr(rsi + off::SLEEP_TSC as i32), rdx)
        .map_err(err)?;
    a.mov(edx, u32::from(SLEEP_PORT)).map_err(err)?;
    a.out(dx, al).map_err(err)?;
    a.set_label(&mut spin_only).map_err(err)?;
    a.nop().map_err(err)?;
    a.set_label(&mut spin).map_err(err)?;
    a.cmp(stop, 0).map_err(err)?;
    a.jne(sync).map_err(err)?;
    a.rdtsc().map_err(err)?;
    a.shl(rdx, 32).map_err(err)?;
    a.or(rax, rdx).map_err(err)?;
    a.cmp(rax, r11).map_err(err)?;
    a.jb(spin).map_err(err)?;
    a.jmp(top).map_err(err)?;

    a.set_label(&mut sync).map_err(err)?;
    a.mov(edx, u32::from(SYNC_PORT)).map_err(err)?;
    a.out(dx, al).map_err(err)?;
    a.jmp(top).map_err(err)?;
    a.assemble(ip).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    #[test]
    fn workload_assembles_and_decodes_with_the_sync_out() {
        let code = dirty_workload(crate::x86::CODE_GPA).unwrap();
        assert!(code.len() > 64 && code.len() < 512);
        let mut d = Decoder::with_ip(64, &code, crate::x86::CODE_GPA, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut text = String::new();
        for ins in &mut d {
            assert!(!ins.is_invalid());
            f.format(&ins, &mut text);
            text.push('\n');
        }
        assert!(text.contains("out dx,al"), "{text}");
        assert!(text.contains("rdtsc"));
    }
}
