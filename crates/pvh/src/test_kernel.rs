//! The project's PVH test kernel, assembled at run time with iced-x86 and wrapped into an ELF
//! with a `XEN_ELFNOTE_PHYS32_ENTRY` note by [`crate::elf::write`] (no cross toolchain).
//!
//! What it does, keeping CPL0 work minimal because PVM emulates every CPL0 instruction:
//! 1. BSP, 32-bit entry (CPL0): saves EBX (start info), masks the 8259 PICs (firmware such as
//!    SeaBIOS leaves the PIT ticking on them), loads its GDT, enables PAE, long mode
//!    (and SYSCALL/SYSRET) and paging with static identity page tables (first 8 GiB, 2 MiB
//!    pages, User bit set), far-jumps to 64-bit code.
//! 2. 64-bit CPL0 (BSP and APs): APIC ID from CPUID = CPU index, per-CPU stack, LTR (per-CPU
//!    TSS: RSP0 and an I/O permission bitmap), LIDT, STAR, then SYSRETQ to ring 3 with
//!    RFLAGS.IF = 1.
//! 3. Ring 3 (native speed): the BSP prints [`BANNER`], checks the start-info magic, parses
//!    its command line (see [`Cmdline`]), prints the parameters and the RAM it found in the
//!    e820 map, checks the working sets fit, starts its LAPIC timer, copies the AP trampoline
//!    below 1 MiB, starts `cpus - 1` APs with INIT/SIPI (xAPIC ICR, all-excluding-self), and
//!    waits until they report in. Every CPU then dirties `dirty_mb` MiB of its own `ws_mb` MiB
//!    working set per report (paced by `period_ticks` timer ticks), printing a progress line
//!    after each, `reports` times or until [`POWER_OFF_KEY`] arrives on COM1; the BSP waits
//!    for all CPUs and writes `exit` to [`crate::EXIT_PORT`].
//!
//! Ring 0 is entered again only by interrupts (the timer ISR: EOI, per-CPU tick count, IRETQ)
//! and by `ud2`, whose #UD handler halts until the next interrupt: the kernel's "wait" call
//! (on PVM neither `syscall` nor `int n` gets ring 3 into ring 0; see `docs/pvh.md`).
//!
//! APs start in real mode at [`TRAMPOLINE_GPA`] (below 1 MiB; the BSP copies the trampoline
//! there from its data page), switch to 32-bit protected mode and join step 1 after its GDT
//! load. Serial output is `out` from ring 3, allowed by the TSS I/O permission bitmap (PVM
//! does not honour RFLAGS.IOPL here), with a ring-3 spinlock so lines do not interleave.
//!
//! Output lines (each ends with `\n`):
//! - `ringvisor PVH test kernel v1`
//! - `params ws_mb=W dirty_mb=D reports=R cpus=C exit=E tick_us=T period_ticks=P pace=0|1`
//! - `memmap entries=N ram_kib=K`
//! - `boot writes N` (with `boot_writes`)
//! - `timer tsc-deadline T` (with `timer=tsc-deadline`: TSC ticks per timer tick, measured
//!   against the LAPIC timer's count, without interrupts)
//! - `cpu I up` (each AP)
//! - `cpu I tsc_per_tick N` (each CPU, with `pace=1`: the TSC ticks per timer tick it paces
//!   with, the `timer tsc-deadline` calibration or else measured over 32 periodic ticks; the
//!   report schedule starts right after this line)
//! - `cpu I progress R pages P ticks T tsc X` (P = pages written by that CPU so far, T = its
//!   ticks, X = TSC ticks from the start of its report schedule to this report: `rdtsc` when
//!   the pacing wait ended, in ring 3, where it is native on PVM; parsed by [`Progress`])
//! - `poweroff E`
//!
//! Exceptions other than #UD have no handler: they end in a triple fault, reported by the VMM
//! as `ExitStatus::Crashed` with the registers.

use iced_x86::code_asm::*;

use crate::elf::{self, Class, OutSegment};
use crate::error::{PvhError, Result};

/// Power-off status when the start info magic is wrong.
pub const BAD_MAGIC_STATUS: u8 = 0xee;
/// Power-off status when `WS_GPA + cpus * ws_mb` MiB exceeds the RAM below 4 GiB.
pub const NO_FIT_STATUS: u8 = 0xef;
/// A byte the kernel reads on COM1 that makes it power off (checked after every report).
pub const POWER_OFF_KEY: u8 = b'q';
/// First line the kernel prints.
pub const BANNER: &str = "ringvisor PVH test kernel v1";
/// Where the BSP copies the AP trampoline before the SIPI (real mode, SIPI vector 0x08). The
/// image itself has one segment at 1 MiB: memory below 1 MiB belongs to the firmware until the
/// kernel runs (SeaBIOS under QEMU), so the kernel places its trampoline itself, as Linux does.
pub const TRAMPOLINE_GPA: u64 = 0x8000;
/// Trampoline bytes copied.
const TRAMPOLINE_BYTES: usize = 0x100;
/// Where the trampoline sits in the data page.
const TRAMPOLINE_COPY: u64 = 0xc00;
/// The 32-bit entry (the PVH entry point).
pub const KERNEL_GPA: u64 = 0x10_0000;
/// 64-bit code.
const CODE64_GPA: u64 = 0x10_0400;
/// Data page: GDT, variables, strings.
const DATA_GPA: u64 = 0x10_3000;
/// PML4, PDPT, then [`MAPPED_GIB`] page directories.
const PML4_GPA: u64 = 0x10_4000;
const PDPT_GPA: u64 = 0x10_5000;
const PD_GPA: u64 = 0x10_6000;
/// GiB of guest physical memory the identity page tables map (2 MiB pages): the RAM below
/// the MMIO hole and up to 4 GiB of RAM above 4 GiB.
pub const MAPPED_GIB: u64 = 8;
/// IDT page (256 gates).
const IDT_GPA: u64 = PD_GPA + MAPPED_GIB * 0x1000;
/// Per-CPU TSSes (RSP0 and the I/O permission bitmap), `TSS_STRIDE` apart.
const TSS_GPA: u64 = IDT_GPA + 0x1000;
const TSS_STRIDE: u64 = 0x140;
/// Per-CPU stacks (bss).
const STACKS_GPA: u64 = TSS_GPA + 0x1000;
const STACK_BYTES: u64 = 0x4000;
/// Most CPUs the kernel runs on.
pub const MAX_CPUS: u64 = 8;
/// Start of the working sets: CPU `i` dirties `[WS_GPA + i * ws, WS_GPA + (i + 1) * ws)`.
pub const WS_GPA: u64 = 0x100_0000;

// Data page offsets.
const GDTR: u64 = 0x40;
const IDTR: u64 = 0x70;
/// Per-CPU timer ticks (u64 each).
const TICKS: u64 = 0x600;
const SI_PTR: u64 = 0x50;
const CPUS_UP: u64 = 0x58;
const LOCK: u64 = 0x60;
const DONE: u64 = 0x68;
const P_WS: u64 = 0x80;
const P_DIRTY: u64 = 0x88;
const P_REPORTS: u64 = 0x90;
const P_CPUS: u64 = 0x98;
const P_EXIT: u64 = 0xa0;
const P_TICK_US: u64 = 0xa8;
const P_PERIOD: u64 = 0xb0;
const P_PACE: u64 = 0xb8;
const P_BOOT_WRITES: u64 = 0xc0;
const P_ISR_WRITES: u64 = 0xc8;
/// Set by the BSP's ring 3 just before the `ud2` that asks the #UD handler (CPL0) for the
/// boot writes instead of a halt.
const BOOT_REQ: u64 = 0xd0;
/// Bytes the timer ISR's writes cycle over: every CPU's working set.
const ISR_SPAN: u64 = 0xd8;
/// Per-CPU position (byte offset from `WS_GPA`) of the timer ISR's next write (u64 each).
const ISR_POS: u64 = 0x700;
/// Per-CPU TSC at the start of the report schedule (every CPU: reports print their TSC from
/// it), and TSC ticks per timer tick (`pace=1`), u64 each.
const TSC_BASE: u64 = 0x680;
const TSC_PER_TICK: u64 = 0x6c0;
/// `timer=tsc-deadline` present: 0; absent: 1 (the kernel's parser returns 0 for a key with
/// no digits after it, and the default otherwise).
const P_TIMER_PERIODIC: u64 = 0xe0;
/// Working sets are linear: offset `o` from `WS_GPA` is at `WS_GPA + o` below `HOLE_AT` (the
/// end of RAM below 4 GiB) and `HOLE_SKIP` bytes higher from there on (past the MMIO hole,
/// in the RAM above 4 GiB), so `ws_mb` can cover all of a guest's RAM.
const HOLE_AT: u64 = 0xe8;
const HOLE_SKIP: u64 = 0xf0;
/// `random=1`: each write goes to a pseudo-random page of the working set (an LCG per CPU).
const P_RANDOM: u64 = 0xf8;
/// Per-CPU TSC deadline last armed (u64 each); non-zero once this CPU's LAPIC timer is in
/// TSC-deadline mode.
const DL_ON: u64 = 0x740;
/// TSC ticks per timer tick, measured by the BSP; non-zero switches every CPU's timer ISR to
/// TSC-deadline mode (re-armed with `wrmsr IA32_TSC_DEADLINE` at every tick).
const DL_PER_TICK: u64 = 0x780;
/// LAPIC timer counts (ns) over which the BSP measures the TSC rate for
/// `timer=tsc-deadline`.
const DL_CALIBRATION_NS: u32 = 20_000_000;
/// LVT timer: masked (bit 16), one-shot mode.
const LVT_MASKED: i32 = 0x1_0000;
/// `IA32_TSC_DEADLINE`.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// LVT timer mode bits 17-18 = 0b10: TSC-deadline.
const LVT_TSC_DEADLINE: i32 = 0x4_0000;
/// Timer ticks over which `pace=1` measures the TSC rate.
const CALIBRATION_TICKS: i32 = 32;
const STRINGS: u64 = 0x100;
/// GDT: the fixed descriptors, then one 16-byte TSS descriptor per CPU.
const GDT_OFF: u64 = 0x800;
const SEL_TSS0: u16 = 0x38;
/// TSS with an I/O permission bitmap allowing ports 0..IO_PORTS from ring 3.
const IO_PORTS: usize = 0x600;
const TSS_LIMIT: usize = 0x68 + IO_PORTS / 8;
const GDT_BYTES: usize = GDT.len() * 8 + MAX_CPUS as usize * 16;

// GDT selectors; see `STAR_HI` for the ring-3 pair SYSRET loads.
const SEL_CODE64: u16 = 0x08;
const SEL_DATA: u16 = 0x10;
const SEL_CODE32: u16 = 0x18;
const GDT: [u64; 7] = [
    0,
    0x00af_9a00_0000_ffff, // 0x08 code64 DPL0
    0x00cf_9200_0000_ffff, // 0x10 data DPL0
    0x00cf_9a00_0000_ffff, // 0x18 code32 DPL0 (AP trampoline)
    0x00cf_f200_0000_ffff, // 0x20 data DPL3 (SYSRET's SS)
    0x00af_fa00_0000_ffff, // 0x28 code64 DPL3 (SYSRET's CS)
    0x00cf_f200_0000_ffff, // 0x30 data DPL3 (unused)
];

const MSR_EFER: u32 = 0xc000_0080;
const EFER_LME: u32 = 0x100;
const EFER_SCE: u32 = 0x1;
const MSR_STAR: u32 = 0xc000_0081;
/// STAR: SYSCALL CS = 0x08; SYSRET base 0x18, so 64-bit SYSRET loads SS = 0x20|3, CS = 0x28|3.
const STAR_HI: u32 = 0x0018_0008;
const CR4_PAE: u32 = 0x20;
/// PG | WP | NE | ET | MP | PE.
const CR0_LONG: u32 = 0x8001_0033;
/// Ring-3 RFLAGS: IF = 1 (timer interrupts) and IOPL = 3 (PVM does not honour IOPL on this
/// path, so port access really goes through the TSS I/O bitmap).
const RFLAGS_USER: i32 = 0x3202;
/// Timer interrupt vector and the LAPIC's spurious vector.
const TIMER_VECTOR: u64 = 0x20;
const SPURIOUS_VECTOR: u64 = 0xff;
/// #UD: ring 3's `ud2` is its "halt until the next interrupt" call.
const HALT_VECTOR: u64 = 6;
const IDT_GATES: usize = 256;
const LAPIC: u64 = 0xfee0_0000;
/// ICR: all excluding self, level assert, INIT.
const ICR_INIT_ALL: u32 = 0x000c_4500;
/// ICR: all excluding self, level assert, start-up with the trampoline's page.
const ICR_SIPI_ALL: u32 = 0x000c_4600 | (TRAMPOLINE_GPA >> 12) as u32;
const START_MAGIC: u32 = crate::boot::START_MAGIC;
/// 8259 PIC interrupt-mask registers (OCW1) and the value that masks every IRQ line.
const PIC_MASTER_DATA: u32 = 0x21;
const PIC_SLAVE_DATA: u32 = 0xa1;
const PIC_MASK_ALL: u32 = 0xff;

/// Build-time options of the test kernel (its workload comes from the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TestKernelParams {
    /// Wrap the kernel into an ELF32 file instead of ELF64.
    pub elf32: bool,
}

/// The test kernel's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cmdline {
    /// Working set per CPU, MiB.
    pub ws_mb: u64,
    /// MiB written per progress report.
    pub dirty_mb: u64,
    /// Progress reports per CPU before power-off (0 = until [`POWER_OFF_KEY`] arrives on
    /// the serial port).
    pub reports: u64,
    /// CPUs to run on (the BSP starts `cpus - 1` APs; clamped to 1..=8).
    pub cpus: u64,
    /// Power-off status.
    pub exit: u8,
    /// LAPIC timer period in microseconds (0 = timer off).
    pub tick_us: u64,
    /// Pace reports: report `r` waits for `r * period_ticks` timer ticks (0 = unpaced).
    pub period_ticks: u64,
    /// `pace=1`: report `r` waits until the TSC has advanced by `r * period_ticks` ticks'
    /// worth (the TSC rate measured over the first 32 ticks), as a kernel keeps time with a
    /// clocksource: ticks the host coalesced (a vCPU that did not run when its timer fired)
    /// then do not delay the schedule. `pace=0` (the default) counts ticks.
    pub tsc_pace: bool,
    /// `boot_writes=N`: before starting its timer and the APs, the BSP makes N 8-byte stores
    /// at CPL0, one per page cycling over its working set (like a kernel building page
    /// tables at boot). On PVM every CPL0 store is emulated and becomes its own dirty-ring
    /// entry, in batches that do not stop at the ring's soft limit. Prints
    /// `boot writes N` when done. 0 (the default) = none.
    pub boot_writes: u64,
    /// `isr_writes=N`: every timer interrupt, the ISR (CPL0) makes N 8-byte stores, one per
    /// page, cycling over all CPUs' working sets (an interrupt handler touching memory).
    /// 0 (the default) = only the tick counter.
    pub isr_writes: u64,
    /// `timer=tsc-deadline`: after measuring the TSC rate against the LAPIC timer's count
    /// over 20 ms (BSP, before the APs start, no interrupts involved; prints `timer
    /// tsc-deadline T` with T TSC ticks per tick), every CPU's LAPIC timer runs in
    /// TSC-deadline mode, re-armed by its ISR with a CPL0 `wrmsr IA32_TSC_DEADLINE` one tick
    /// after the last deadline (ticks on a TSC grid, whatever the ISR's latency), the CPU
    /// halting between ticks: how Linux and the third-party guest of issue 14 keep time.
    /// With `pace=1` the pacing uses T. False (the default) = periodic mode.
    pub tsc_deadline: bool,
    /// `random=1`: every write goes to a pseudo-random page of the CPU's working set (a
    /// 64-bit LCG per CPU, the page taken from its high 32 bits), as a guest whose writes are
    /// spread at random over its memory; `random=0` (the default) writes the working set in
    /// order, wrapping around.
    pub random: bool,
}

impl Default for Cmdline {
    /// The values the kernel uses for keys missing from its command line.
    fn default() -> Self {
        Cmdline {
            ws_mb: 4,
            dirty_mb: 1,
            reports: 3,
            cpus: 1,
            exit: 0,
            tick_us: 1000,
            period_ticks: 0,
            tsc_pace: false,
            boot_writes: 0,
            isr_writes: 0,
            tsc_deadline: false,
            random: false,
        }
    }
}

impl Cmdline {
    /// The command-line string (`boot_writes`, `isr_writes` and `timer` only when not the
    /// default).
    pub fn render(&self) -> String {
        let mut extra = String::new();
        if self.boot_writes != 0 {
            extra += &format!(" boot_writes={}", self.boot_writes);
        }
        if self.isr_writes != 0 {
            extra += &format!(" isr_writes={}", self.isr_writes);
        }
        if self.tsc_deadline {
            extra += " timer=tsc-deadline";
        }
        if self.random {
            extra += " random=1";
        }
        format!(
            "ws_mb={} dirty_mb={} reports={} cpus={} exit={} tick_us={} period_ticks={} pace={}{extra}",
            self.ws_mb,
            self.dirty_mb,
            self.reports,
            self.cpus,
            self.exit,
            self.tick_us,
            self.period_ticks,
            u8::from(self.tsc_pace)
        )
    }

    /// RAM the kernel needs for this command line (the RAM below the MMIO hole and, past it,
    /// the RAM from 4 GiB up to [`MAPPED_GIB`]: working sets continue across the hole; with
    /// less it powers off with [`NO_FIT_STATUS`]).
    pub fn memory_needed(&self) -> u64 {
        WS_GPA + self.cpus.clamp(1, MAX_CPUS) * (self.ws_mb << 20).max(4096)
    }
}

/// One progress line of the kernel, `cpu I progress R pages P ticks T tsc X`.
///
/// Kernels before the TSC field printed the line without `tsc X`; it parses, with `tsc`
/// `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// CPU index.
    pub cpu: u64,
    /// Report number (1, 2, ...).
    pub report: u64,
    /// Pages that CPU has written so far.
    pub pages: u64,
    /// Timer ticks that CPU has taken so far.
    pub ticks: u64,
    /// TSC ticks from the start of that CPU's report schedule (the end of its `pace=1`
    /// calibration, else the start of its work) to this report.
    pub tsc: Option<u64>,
}

impl Progress {
    /// Parses one line (without its `\n`); `None` for any other line, a malformed one or a
    /// number out of range.
    pub fn parse(line: &str) -> Option<Progress> {
        let w: Vec<&str> = line.split_ascii_whitespace().collect();
        let (fixed, tsc) = match w.as_slice() {
            ["cpu", c, "progress", r, "pages", p, "ticks", t] => ([c, r, p, t], None),
            ["cpu", c, "progress", r, "pages", p, "ticks", t, "tsc", x] => {
                ([c, r, p, t], Some(x.parse().ok()?))
            }
            _ => return None,
        };
        let [cpu, report, pages, ticks] = fixed.map(|v| v.parse::<u64>().ok());
        Some(Progress {
            cpu: cpu?,
            report: report?,
            pages: pages?,
            ticks: ticks?,
            tsc,
        })
    }

    /// Every progress line of `console`, in order.
    pub fn all(console: &str) -> Vec<Progress> {
        console.lines().filter_map(Progress::parse).collect()
    }
}

impl std::fmt::Display for Progress {
    /// The line as the kernel prints it (without `\n`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cpu {} progress {} pages {} ticks {}",
            self.cpu, self.report, self.pages, self.ticks
        )?;
        match self.tsc {
            Some(x) => write!(f, " tsc {x}"),
            None => Ok(()),
        }
    }
}

/// `cpu`'s TSC ticks per timer tick from its `cpu I tsc_per_tick N` line in `console`
/// (printed with `pace=1`): what its report pacing waits for, per tick of `period_ticks`.
pub fn tsc_per_tick(console: &str, cpu: u64) -> Option<u64> {
    console.lines().find_map(|l| {
        let w: Vec<&str> = l.split_ascii_whitespace().collect();
        match w.as_slice() {
            ["cpu", c, "tsc_per_tick", n] if c.parse::<u64>().ok()? == cpu => n.parse().ok(),
            _ => None,
        }
    })
}

/// Data page builder: fixed variables, then NUL-terminated strings.
struct Data {
    page: Vec<u8>,
    next: u64,
}

impl Data {
    fn new() -> Self {
        let mut page = vec![0u8; 4096];
        let g = GDT_OFF as usize;
        for (i, d) in GDT.iter().enumerate() {
            page[g + i * 8..g + i * 8 + 8].copy_from_slice(&d.to_le_bytes());
        }
        for c in 0..MAX_CPUS {
            let base = TSS_GPA + c * TSS_STRIDE;
            let tss_lo = TSS_LIMIT as u64
                | ((base & 0xff_ffff) << 16)
                | (0x89 << 40) // present, 64-bit TSS (available)
                | (((base >> 24) & 0xff) << 56);
            let o = g + GDT.len() * 8 + c as usize * 16;
            page[o..o + 8].copy_from_slice(&tss_lo.to_le_bytes());
            page[o + 8..o + 16].copy_from_slice(&(base >> 32).to_le_bytes());
        }
        let limit = (IDT_GATES * 16 - 1) as u16;
        page[IDTR as usize..IDTR as usize + 2].copy_from_slice(&limit.to_le_bytes());
        page[IDTR as usize + 2..IDTR as usize + 10].copy_from_slice(&IDT_GPA.to_le_bytes());
        let limit = (GDT_BYTES - 1) as u16;
        page[GDTR as usize..GDTR as usize + 2].copy_from_slice(&limit.to_le_bytes());
        page[GDTR as usize + 2..GDTR as usize + 10]
            .copy_from_slice(&(DATA_GPA + GDT_OFF).to_le_bytes());
        Data {
            page,
            next: STRINGS,
        }
    }

    /// Adds a NUL-terminated string; returns its guest address.
    fn string(&mut self, s: &str) -> Result<u64> {
        let at = self.next as usize;
        let end = at + s.len() + 1;
        if end > TICKS as usize {
            return Err(PvhError::Assemble("data page full".into()));
        }
        self.page[at..at + s.len()].copy_from_slice(s.as_bytes());
        self.next = end as u64;
        Ok(DATA_GPA + at as u64)
    }
}

fn asm_err(e: IcedError) -> PvhError {
    PvhError::Assemble(e.to_string())
}

/// Real-mode AP trampoline at `TRAMPOLINE_GPA` (CS = 0x0800, IP = 0 after the SIPI).
fn trampoline(ap_entry32: u32) -> std::result::Result<Vec<u8>, IcedError> {
    const GDTR16: u64 = 0x40;
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.lgdt(ptr((TRAMPOLINE_GPA + GDTR16) as u16))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    // jmp far dword SEL_CODE32:ap_entry32 (operand-size prefix: 32-bit offset).
    let mut far = vec![0x66, 0xea];
    far.extend_from_slice(&ap_entry32.to_le_bytes());
    far.extend_from_slice(&SEL_CODE32.to_le_bytes());
    a.db(&far)?;
    let mut code = a.assemble(0)?;
    code.resize(GDTR16 as usize, 0xcc);
    // 16-bit LGDT reads a 16-bit limit and a 24-bit base.
    code.extend_from_slice(&((GDT_BYTES - 1) as u16).to_le_bytes());
    code.extend_from_slice(&((DATA_GPA + GDT_OFF) as u32).to_le_bytes());
    Ok(code)
}

/// 32-bit entry: returns the code and the offset of the AP entry in it.
fn entry32() -> std::result::Result<(Vec<u8>, u32), IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut ap = a.create_label();
    a.mov(dword_ptr((DATA_GPA + SI_PTR) as u32), ebx)?;
    // Firmware may leave the 8259 PICs unmasked with the PIT ticking (SeaBIOS under QEMU:
    // IRQ 0 on vector 0x08, through LAPIC LINT0 in ExtINT mode). Ring 3 runs with IF = 1 and
    // the IDT has no gate for those vectors, so the first PIT tick would triple-fault the BSP
    // right after SYSRET. Mask both PICs (BSP only; the kernel never uses them).
    a.mov(al, PIC_MASK_ALL)?;
    a.out(PIC_SLAVE_DATA, al)?;
    a.out(PIC_MASTER_DATA, al)?;
    a.lgdt(ptr((DATA_GPA + GDTR) as u32))?;
    a.set_label(&mut ap)?;
    a.mov(eax, cr4)?;
    a.or(eax, CR4_PAE as i32)?;
    a.mov(cr4, eax)?;
    a.mov(eax, PML4_GPA as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.or(eax, (EFER_LME | EFER_SCE) as i32)?;
    a.wrmsr()?;
    a.mov(eax, CR0_LONG)?;
    a.mov(cr0, eax)?;
    a.jmp_far(SEL_CODE64, CODE64_GPA as u32)?;
    let r = a.assemble_options(
        KERNEL_GPA,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let ap_ip = r.label_ip(&ap)?;
    Ok((r.inner.code_buffer, (ap_ip - KERNEL_GPA) as u32))
}

/// Addresses of the strings the 64-bit code prints or matches.
struct Strings {
    banner: u64,
    bad_magic: u64,
    no_fit: u64,
    params: u64,
    keys: [(u64, usize, u64, u64); 12], // (address, length, data offset, default)
    boot_writes: u64,
    timer_dl: u64,
    memmap: u64,
    ram_kib: u64,
    cpu: u64,
    up: u64,
    progress: u64,
    pages: u64,
    ticks: u64,
    tsc: u64,
    tsc_per_tick: u64,
    poweroff: u64,
    empty: u64,
}

fn strings(d: &mut Data) -> Result<Strings> {
    let def = Cmdline::default();
    let mut key = |k: &str, off: u64, default: u64| -> Result<(u64, usize, u64, u64)> {
        Ok((d.string(k)?, k.len(), off, default))
    };
    let keys = [
        key("ws_mb=", P_WS, def.ws_mb)?,
        key("dirty_mb=", P_DIRTY, def.dirty_mb)?,
        key("reports=", P_REPORTS, def.reports)?,
        key("cpus=", P_CPUS, def.cpus)?,
        key("exit=", P_EXIT, u64::from(def.exit))?,
        key("tick_us=", P_TICK_US, def.tick_us)?,
        key("period_ticks=", P_PERIOD, def.period_ticks)?,
        key("pace=", P_PACE, u64::from(def.tsc_pace))?,
        key("boot_writes=", P_BOOT_WRITES, def.boot_writes)?,
        key("isr_writes=", P_ISR_WRITES, def.isr_writes)?,
        key("timer=tsc-deadline", P_TIMER_PERIODIC, 1)?,
        key("random=", P_RANDOM, u64::from(def.random))?,
    ];
    Ok(Strings {
        banner: d.string(&format!("{BANNER}\n"))?,
        bad_magic: d.string("bad start info magic\n")?,
        no_fit: d.string("working sets do not fit in RAM below 4 GiB\n")?,
        params: d.string("params")?,
        keys,
        boot_writes: d.string("boot writes ")?,
        timer_dl: d.string("timer tsc-deadline ")?,
        memmap: d.string("memmap entries=")?,
        ram_kib: d.string(" ram_kib=")?,
        cpu: d.string("cpu ")?,
        up: d.string(" up\n")?,
        progress: d.string(" progress ")?,
        pages: d.string(" pages ")?,
        ticks: d.string(" ticks ")?,
        tsc: d.string(" tsc ")?,
        tsc_per_tick: d.string(" tsc_per_tick ")?,
        poweroff: d.string("poweroff ")?,
        empty: d.string("")?,
    })
}

/// 64-bit code: the CPL0 prologue at `CODE64_GPA`, then the ring-3 program.
/// Addresses of the interrupt handlers, for the IDT.
struct Isrs {
    timer: u64,
    spurious: u64,
    halt: u64,
}

type Asm = std::result::Result<(), IcedError>;

/// Labels that more than one piece of the 64-bit code jumps to, calls or sets.
struct Shared {
    park: CodeLabel,
    user: CodeLabel,
    putc: CodeLabel,
    puts: CodeLabel,
    putdec: CodeLabel,
    lock: CodeLabel,
    unlock: CodeLabel,
    param: CodeLabel,
    halt_isr: CodeLabel,
    wait_tick: CodeLabel,
    timer_start: CodeLabel,
    ap_main: CodeLabel,
    worker: CodeLabel,
    poweroff: CodeLabel,
    timer_isr: CodeLabel,
    spurious_isr: CodeLabel,
    report: CodeLabel,
    finished: CodeLabel,
    idle: CodeLabel,
    wait_done: CodeLabel,
}

fn code64(s: &Strings) -> std::result::Result<(Vec<u8>, Isrs), IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut l = Shared {
        park: a.create_label(),
        user: a.create_label(),
        putc: a.create_label(),
        puts: a.create_label(),
        putdec: a.create_label(),
        lock: a.create_label(),
        unlock: a.create_label(),
        param: a.create_label(),
        halt_isr: a.create_label(),
        wait_tick: a.create_label(),
        timer_start: a.create_label(),
        ap_main: a.create_label(),
        worker: a.create_label(),
        poweroff: a.create_label(),
        timer_isr: a.create_label(),
        spurious_isr: a.create_label(),
        report: a.create_label(),
        finished: a.create_label(),
        idle: a.create_label(),
        wait_done: a.create_label(),
    };

    cpl0_entry(&mut a, &mut l)?;
    bsp_start(&mut a, &mut l, s)?;
    bsp_memory(&mut a, &mut l, s)?;
    bsp_timer_and_aps(&mut a, &mut l, s)?;
    worker_start(&mut a, &mut l, s)?;
    worker_pace(&mut a, &mut l)?;
    worker_report(&mut a, &mut l, s)?;
    subroutines(&mut a, &mut l)?;
    param_subroutine(&mut a, &mut l)?;
    timer_isr(&mut a, &mut l)?;
    halt_isr(&mut a, &mut l)?;
    let r = a.assemble_options(
        CODE64_GPA,
        iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )?;
    let isrs = Isrs {
        timer: r.label_ip(&l.timer_isr)?,
        spurious: r.label_ip(&l.spurious_isr)?,
        halt: r.label_ip(&l.halt_isr)?,
    };
    Ok((r.inner.code_buffer, isrs))
}

/// CPL0 entry: segments, TR, IDT, this CPU's stack, then SYSRET to ring 3; CPUs past
/// `MAX_CPUS` park.
fn cpl0_entry(a: &mut CodeAssembler, l: &mut Shared) -> Asm {
    a.mov(eax, u32::from(SEL_DATA))?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, 1u32)?;
    a.cpuid()?;
    a.shr(ebx, 24)?;
    a.mov(r15d, ebx)?;
    a.cmp(r15d, MAX_CPUS as i32)?;
    a.jae(l.park)?;
    // TR = this CPU's TSS descriptor (for the I/O permission bitmap).
    a.lea(eax, ptr(r15 * 2))?;
    a.shl(eax, 3)?;
    a.add(eax, i32::from(SEL_TSS0))?;
    a.ltr(ax)?;
    a.lidt(ptr(DATA_GPA + IDTR))?;
    a.lea(rax, qword_ptr(r15 + 1))?;
    a.shl(rax, 14)?;
    a.mov(rcx, STACKS_GPA)?;
    a.add(rax, rcx)?;
    a.mov(rsp, rax)?;
    // SYSRET to ring 3: RIP = RCX, RFLAGS = R11.
    a.mov(ecx, MSR_STAR)?;
    a.mov(edx, STAR_HI)?;
    a.xor(eax, eax)?;
    a.wrmsr()?;
    a.mov(r11d, RFLAGS_USER as u32)?;
    a.lea(rcx, ptr(l.user))?;
    a.sysretq()?;
    a.set_label(&mut l.park)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(l.park)?;

    Ok(())
}

/// Ring 3 from here on. The BSP: banner, start-info magic, command-line parameters.
fn bsp_start(a: &mut CodeAssembler, l: &mut Shared, s: &Strings) -> Asm {
    // ---- ring 3 ----
    let mut magic_ok = a.create_label();
    let mut have_cmdline = a.create_label();
    a.set_label(&mut l.user)?;
    a.mov(r13, DATA_GPA)?;
    a.test(r15, r15)?;
    a.jnz(l.ap_main)?;
    // BSP.
    a.mov(rsi, s.banner)?;
    a.call(l.puts)?;
    a.mov(rbx, qword_ptr(r13 + SI_PTR as i32))?;
    a.cmp(dword_ptr(rbx), START_MAGIC as i32)?;
    a.je(magic_ok)?;
    a.mov(rsi, s.bad_magic)?;
    a.call(l.puts)?;
    a.mov(qword_ptr(r13 + P_EXIT as i32), i32::from(BAD_MAGIC_STATUS))?;
    a.jmp(l.poweroff)?;
    a.set_label(&mut magic_ok)?;
    a.mov(r12, qword_ptr(rbx + 24))?;
    a.test(r12, r12)?;
    a.jnz(have_cmdline)?;
    a.mov(r12, s.empty)?;
    a.set_label(&mut have_cmdline)?;
    for &(key, len, off, default) in &s.keys {
        a.mov(rsi, key)?;
        a.mov(edi, len as u32)?;
        a.mov(rax, default)?;
        a.call(l.param)?;
        a.mov(qword_ptr(r13 + off as i32), rax)?;
    }
    // cpus clamped to 1..=MAX_CPUS.
    let mut cpus_lo = a.create_label();
    let mut cpus_hi = a.create_label();
    a.mov(rax, qword_ptr(r13 + P_CPUS as i32))?;
    a.test(rax, rax)?;
    a.jnz(cpus_lo)?;
    a.mov(qword_ptr(r13 + P_CPUS as i32), 1)?;
    a.set_label(&mut cpus_lo)?;
    a.cmp(rax, MAX_CPUS as i32)?;
    a.jbe(cpus_hi)?;
    a.mov(qword_ptr(r13 + P_CPUS as i32), MAX_CPUS as i32)?;
    a.set_label(&mut cpus_hi)?;
    // "params k=v ..."
    a.mov(rsi, s.params)?;
    a.call(l.puts)?;
    // The original keys only, so the line is the same as before the newer keys existed.
    for &(key, _, off, _) in &s.keys[..8] {
        a.mov(al, b' ' as u32)?;
        a.call(l.putc)?;
        a.mov(rsi, key)?;
        a.call(l.puts)?;
        a.mov(rax, qword_ptr(r13 + off as i32))?;
        a.call(l.putdec)?;
    }
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    Ok(())
}

/// The BSP: the memory map, the hole, and whether the working sets fit.
fn bsp_memory(a: &mut CodeAssembler, l: &mut Shared, s: &Strings) -> Asm {
    // Memory map: count RAM (type 1) bytes.
    let mut mm_loop = a.create_label();
    let mut mm_skip = a.create_label();
    let mut mm_done = a.create_label();
    a.mov(rsi, qword_ptr(rbx + 40))?;
    a.mov(ecx, dword_ptr(rbx + 48))?;
    a.mov(r9, rcx)?;
    a.xor(r8d, r8d)?;
    a.xor(r10d, r10d)?;
    a.xor(r11d, r11d)?;
    let mut mm_low = a.create_label();
    a.set_label(&mut mm_loop)?;
    a.test(ecx, ecx)?;
    a.jz(mm_done)?;
    a.cmp(dword_ptr(rsi + 16), 1)?;
    a.jne(mm_skip)?;
    a.add(r8, qword_ptr(rsi + 8))?;
    // r10 = highest end of a RAM entry below 4 GiB (the page tables map only 4 GiB).
    a.mov(rax, qword_ptr(rsi))?;
    a.add(rax, qword_ptr(rsi + 8))?;
    a.mov(rdx, 1u64 << 32)?;
    a.cmp(rax, rdx)?;
    a.jbe(mm_low)?;
    // r11 = highest end of RAM above 4 GiB, at most what the page tables map.
    a.mov(rdx, MAPPED_GIB << 30)?;
    a.cmp(rax, rdx)?;
    a.cmova(rax, rdx)?;
    a.cmp(rax, r11)?;
    a.cmovb(rax, r11)?;
    a.mov(r11, rax)?;
    a.jmp(mm_skip)?;
    a.set_label(&mut mm_low)?;
    a.cmp(rax, r10)?;
    a.jbe(mm_skip)?;
    a.mov(r10, rax)?;
    a.set_label(&mut mm_skip)?;
    a.add(rsi, 24)?;
    a.dec(ecx)?;
    a.jmp(mm_loop)?;
    a.set_label(&mut mm_done)?;
    a.mov(rsi, s.memmap)?;
    a.call(l.puts)?;
    a.mov(rax, r9)?;
    a.call(l.putdec)?;
    a.mov(rsi, s.ram_kib)?;
    a.call(l.puts)?;
    a.mov(rax, r8)?;
    a.shr(rax, 10)?;
    a.call(l.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    // The working sets must lie in RAM: WS_GPA + cpus * ws_mb MiB <= r10.
    let mut fits = a.create_label();
    let mut no_high = a.create_label();
    a.mov(rax, qword_ptr(r13 + P_WS as i32))?;
    a.shl(rax, 20)?;
    a.mov(ecx, 4096u32)?;
    a.cmp(rax, rcx)?;
    a.cmovb(rax, rcx)?;
    a.imul_2(rax, qword_ptr(r13 + P_CPUS as i32))?;
    a.mov(qword_ptr(r13 + ISR_SPAN as i32), rax)?;
    // The hole: from r10 (end of low RAM) to 4 GiB; RAM continues at 4 GiB up to r11.
    a.mov(qword_ptr(r13 + HOLE_AT as i32), r10)?;
    a.mov(rcx, 1u64 << 32)?;
    a.sub(rcx, r10)?;
    a.mov(qword_ptr(r13 + HOLE_SKIP as i32), rcx)?;
    a.mov(rcx, WS_GPA)?;
    a.add(rax, rcx)?;
    // Room: r10 plus the RAM above 4 GiB (r11 - 4 GiB, or none).
    a.mov(rcx, r10)?;
    a.test(r11, r11)?;
    a.jz(no_high)?;
    a.add(rcx, r11)?;
    a.mov(rdx, 1u64 << 32)?;
    a.sub(rcx, rdx)?;
    a.set_label(&mut no_high)?;
    a.cmp(rax, rcx)?;
    a.jbe(fits)?;
    a.mov(rsi, s.no_fit)?;
    a.call(l.puts)?;
    a.mov(qword_ptr(r13 + P_EXIT as i32), i32::from(NO_FIT_STATUS))?;
    a.jmp(l.poweroff)?;
    a.set_label(&mut fits)?;
    Ok(())
}

/// The BSP: boot stores, its timer, the TSC-deadline calibration, starting the APs; then
/// an AP's entry.
fn bsp_timer_and_aps(a: &mut CodeAssembler, l: &mut Shared, s: &Strings) -> Asm {
    // boot_writes: the #UD handler makes the stores at CPL0 when BOOT_REQ is set.
    let mut no_boot_writes = a.create_label();
    a.cmp(qword_ptr(r13 + P_BOOT_WRITES as i32), 0)?;
    a.je(no_boot_writes)?;
    a.mov(qword_ptr(r13 + BOOT_REQ as i32), 1)?;
    a.ud2()?;
    a.mov(rsi, s.boot_writes)?;
    a.call(l.puts)?;
    a.mov(rax, qword_ptr(r13 + P_BOOT_WRITES as i32))?;
    a.call(l.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.set_label(&mut no_boot_writes)?;
    a.call(l.timer_start)?;
    // timer=tsc-deadline: the TSC rate against the LAPIC timer's own count, which KVM derives
    // from the host's monotonic clock (1 count = 1 ns: KVM's APIC bus runs at 1 GHz), with
    // the timer one-shot and masked, counting down from the maximum for DL_CALIBRATION_NS.
    // No interrupt is involved, so a tick the host coalesces (a vCPU that did not run when
    // it fired: one in eight periodic ticks under load) cannot bias it. Then the periodic
    // timer again; storing DL_PER_TICK switches every CPU's ISR to TSC-deadline mode. A
    // count that does not run leaves the timer periodic (no `timer tsc-deadline` line).
    let mut no_dl = a.create_label();
    let mut dl_wait = a.create_label();
    a.cmp(qword_ptr(r13 + P_TIMER_PERIODIC as i32), 0)?;
    a.jne(no_dl)?;
    a.cmp(qword_ptr(r13 + P_TICK_US as i32), 0)?;
    a.je(no_dl)?;
    a.mov(rcx, LAPIC)?;
    a.mov(dword_ptr(rcx + 0x320), LVT_MASKED | TIMER_VECTOR as i32)?;
    a.mov(dword_ptr(rcx + 0x3e0), 0xb)?;
    a.mov(dword_ptr(rcx + 0x380), -1)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r9, rax)?;
    a.mov(r10d, dword_ptr(rcx + 0x390))?;
    a.test(r10d, r10d)?;
    a.jz(no_dl)?;
    a.set_label(&mut dl_wait)?;
    a.pause()?;
    a.mov(eax, dword_ptr(rcx + 0x390))?;
    a.mov(edx, r10d)?;
    a.sub(edx, eax)?;
    a.cmp(edx, DL_CALIBRATION_NS)?;
    a.jb(dl_wait)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, r9)?;
    a.mov(r9, rax)?;
    a.mov(eax, dword_ptr(rcx + 0x390))?;
    a.mov(r8d, r10d)?;
    a.sub(r8d, eax)?;
    // DL_PER_TICK = TSC ticks * tick ns / count ns (128-bit product).
    a.mov(rax, qword_ptr(r13 + P_TICK_US as i32))?;
    a.imul_3(rax, rax, 1000)?;
    a.mul(r9)?;
    a.div(r8)?;
    a.mov(qword_ptr(r13 + DL_PER_TICK as i32), rax)?;
    a.call(l.timer_start)?;
    a.mov(rsi, s.timer_dl)?;
    a.call(l.puts)?;
    a.mov(rax, qword_ptr(r13 + DL_PER_TICK as i32))?;
    a.call(l.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.set_label(&mut no_dl)?;
    // Start the APs: software-enable the LAPIC, INIT then SIPI to all but self, wait for them.
    let mut wait_up = a.create_label();
    a.cmp(qword_ptr(r13 + P_CPUS as i32), 1)?;
    a.jbe(l.worker)?;
    a.mov(rsi, DATA_GPA + TRAMPOLINE_COPY)?;
    a.mov(edi, TRAMPOLINE_GPA as u32)?;
    a.mov(ecx, TRAMPOLINE_BYTES as u32)?;
    a.rep().movsb()?;
    a.mov(rax, LAPIC)?;
    a.mov(dword_ptr(rax + 0xf0), 0x1ff)?;
    a.mov(dword_ptr(rax + 0x310), 0)?;
    a.mov(dword_ptr(rax + 0x300), ICR_INIT_ALL as i32)?;
    a.mov(dword_ptr(rax + 0x300), ICR_SIPI_ALL as i32)?;
    a.set_label(&mut wait_up)?;
    a.call(l.wait_tick)?;
    a.mov(rcx, qword_ptr(r13 + P_CPUS as i32))?;
    a.dec(rcx)?;
    a.cmp(qword_ptr(r13 + CPUS_UP as i32), rcx)?;
    a.jb(wait_up)?;
    a.jmp(l.worker)?;

    // AP: count in, say so.
    a.set_label(&mut l.ap_main)?;
    a.call(l.timer_start)?;
    a.lock().inc(qword_ptr(r13 + CPUS_UP as i32))?;
    a.call(l.lock)?;
    a.mov(rsi, s.cpu)?;
    a.call(l.puts)?;
    a.mov(rax, r15)?;
    a.call(l.putdec)?;
    a.mov(rsi, s.up)?;
    a.call(l.puts)?;
    a.call(l.unlock)?;

    Ok(())
}

/// The worker (every CPU): TSC calibration for paced reports, its working set, and the
/// report loop with its writes; the pacing and the report line follow.
fn worker_start(a: &mut CodeAssembler, l: &mut Shared, s: &Strings) -> Asm {
    // Worker: r12 = working set base, r14 = its pages, rbx = position, rbp = report number,
    // r10 = pages written.
    let mut write = a.create_label();
    let mut nowrap = a.create_label();
    let mut print = a.create_label();
    let mut ws_ok = a.create_label();
    a.set_label(&mut l.worker)?;
    worker_calibrate(a, l, s)?;
    a.mov(r14, qword_ptr(r13 + P_WS as i32))?;
    a.shl(r14, 8)?;
    a.test(r14, r14)?;
    a.jnz(ws_ok)?;
    a.mov(r14d, 1)?;
    a.set_label(&mut ws_ok)?;
    a.mov(rax, r14)?;
    a.shl(rax, 12)?;
    a.imul_2(rax, r15)?;
    a.mov(r12, WS_GPA)?;
    a.add(r12, rax)?;
    a.xor(ebx, ebx)?;
    a.xor(ebp, ebp)?;
    a.xor(r10d, r10d)?;
    a.set_label(&mut l.report)?;
    // reports = 0: run until asked to power off.
    let mut more = a.create_label();
    a.mov(rax, qword_ptr(r13 + P_REPORTS as i32))?;
    a.test(rax, rax)?;
    a.jz(more)?;
    a.cmp(rbp, rax)?;
    a.jae(l.finished)?;
    a.set_label(&mut more)?;
    a.inc(rbp)?;
    a.mov(rcx, qword_ptr(r13 + P_DIRTY as i32))?;
    a.shl(rcx, 8)?;
    a.jz(print)?;
    a.set_label(&mut write)?;
    let mut in_order = a.create_label();
    let mut have_page = a.create_label();
    a.cmp(qword_ptr(r13 + P_RANDOM as i32), 0)?;
    a.je(in_order)?;
    // random=1: rbx is the LCG state (Knuth's MMIX constants); page = (state >> 32) * pages
    // >> 32, in [0, pages).
    a.mov(rax, 6_364_136_223_846_793_005u64)?;
    a.imul_2(rbx, rax)?;
    a.mov(rax, 1_442_695_040_888_963_407u64)?;
    a.add(rbx, rax)?;
    a.mov(rax, rbx)?;
    a.shr(rax, 32)?;
    a.imul_2(rax, r14)?;
    a.shr(rax, 32)?;
    a.jmp(have_page)?;
    a.set_label(&mut in_order)?;
    a.cmp(rbx, r14)?;
    a.jb(nowrap)?;
    a.xor(ebx, ebx)?;
    a.set_label(&mut nowrap)?;
    a.mov(rax, rbx)?;
    a.inc(rbx)?;
    a.set_label(&mut have_page)?;
    a.shl(rax, 12)?;
    a.add(rax, r12)?;
    let mut below_hole = a.create_label();
    a.cmp(rax, qword_ptr(r13 + HOLE_AT as i32))?;
    a.jb(below_hole)?;
    a.add(rax, qword_ptr(r13 + HOLE_SKIP as i32))?;
    a.set_label(&mut below_hole)?;
    a.inc(r10)?;
    a.mov(qword_ptr(rax), r10)?;
    a.dec(rcx)?;
    a.jnz(write)?;
    a.set_label(&mut print)?;
    Ok(())
}

/// `pace=1` (with the timer on and reports paced): this CPU's TSC ticks per timer tick, the
/// BSP's `timer=tsc-deadline` calibration if there is one (the deadline ticks' own period,
/// measured without interrupts), else measured over `CALIBRATION_TICKS` periodic ticks from
/// a tick edge; printed. Then, for every CPU, the report schedule starts (`TSC_BASE`: reports
/// are due, and their `tsc` counted, from here).
fn worker_calibrate(a: &mut CodeAssembler, l: &mut Shared, s: &Strings) -> Asm {
    let mut no_calibration = a.create_label();
    let mut calibrated = a.create_label();
    let mut edge = a.create_label();
    let mut span = a.create_label();
    a.cmp(qword_ptr(r13 + P_PACE as i32), 0)?;
    a.je(no_calibration)?;
    a.cmp(qword_ptr(r13 + P_TICK_US as i32), 0)?;
    a.je(no_calibration)?;
    a.cmp(qword_ptr(r13 + P_PERIOD as i32), 0)?;
    a.je(no_calibration)?;
    a.mov(rax, qword_ptr(r13 + DL_PER_TICK as i32))?;
    a.test(rax, rax)?;
    a.jnz(calibrated)?;
    a.mov(r8, qword_ptr(r13 + r15 * 8 + TICKS as i32))?;
    a.set_label(&mut edge)?;
    a.call(l.wait_tick)?;
    a.cmp(qword_ptr(r13 + r15 * 8 + TICKS as i32), r8)?;
    a.je(edge)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r9, rax)?;
    a.mov(r8, qword_ptr(r13 + r15 * 8 + TICKS as i32))?;
    a.add(r8, CALIBRATION_TICKS)?;
    a.set_label(&mut span)?;
    a.call(l.wait_tick)?;
    a.cmp(qword_ptr(r13 + r15 * 8 + TICKS as i32), r8)?;
    a.jb(span)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, r9)?;
    a.xor(edx, edx)?;
    a.mov(ecx, CALIBRATION_TICKS as u32)?;
    a.div(rcx)?;
    a.set_label(&mut calibrated)?;
    a.mov(qword_ptr(r13 + r15 * 8 + TSC_PER_TICK as i32), rax)?;
    // "cpu I tsc_per_tick N": what the pacing uses, so a reader can check the schedule.
    a.call(l.lock)?;
    a.mov(rsi, s.cpu)?;
    a.call(l.puts)?;
    a.mov(rax, r15)?;
    a.call(l.putdec)?;
    a.mov(rsi, s.tsc_per_tick)?;
    a.call(l.puts)?;
    a.mov(rax, qword_ptr(r13 + r15 * 8 + TSC_PER_TICK as i32))?;
    a.call(l.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.call(l.unlock)?;
    a.set_label(&mut no_calibration)?;
    // The schedule starts now (report r is due r periods from here with pace=1; every
    // report's `tsc` counts from here).
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(r13 + r15 * 8 + TSC_BASE as i32), rax)?;
    Ok(())
}

/// The pacing wait before a report line.
fn worker_pace(a: &mut CodeAssembler, l: &mut Shared) -> Asm {
    // Pacing: wait until this CPU has seen report * period_ticks ticks (pace=0), or until its
    // TSC has advanced by that many ticks' worth (pace=1).
    let mut pace = a.create_label();
    let mut paced = a.create_label();
    let mut tick_pace = a.create_label();
    let mut tsc_wait = a.create_label();
    a.cmp(qword_ptr(r13 + P_PACE as i32), 0)?;
    a.je(tick_pace)?;
    a.cmp(qword_ptr(r13 + r15 * 8 + TSC_PER_TICK as i32), 0)?;
    a.je(tick_pace)?;
    a.mov(r8, qword_ptr(r13 + P_PERIOD as i32))?;
    a.imul_2(r8, rbp)?;
    a.imul_2(r8, qword_ptr(r13 + r15 * 8 + TSC_PER_TICK as i32))?;
    a.add(r8, qword_ptr(r13 + r15 * 8 + TSC_BASE as i32))?;
    a.set_label(&mut tsc_wait)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.cmp(rax, r8)?;
    a.jae(paced)?;
    a.call(l.wait_tick)?;
    a.jmp(tsc_wait)?;
    a.set_label(&mut tick_pace)?;
    a.mov(rax, qword_ptr(r13 + P_PERIOD as i32))?;
    a.imul_2(rax, rbp)?;
    a.set_label(&mut pace)?;
    a.cmp(qword_ptr(r13 + r15 * 8 + TICKS as i32), rax)?;
    a.jae(paced)?;
    a.call(l.wait_tick)?;
    a.jmp(pace)?;
    a.set_label(&mut paced)?;
    Ok(())
}

/// The report line, the power-off request, and the end of the run.
fn worker_report(a: &mut CodeAssembler, l: &mut Shared, s: &Strings) -> Asm {
    // r9 = TSC since the schedule start, read when the pacing wait ended (before the print
    // lock, which another CPU may hold). Ring 3 (CR4.TSD clear): native on PVM.
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.sub(rax, qword_ptr(r13 + r15 * 8 + TSC_BASE as i32))?;
    a.mov(r9, rax)?;
    a.call(l.lock)?;
    a.mov(rsi, s.cpu)?;
    a.call(l.puts)?;
    a.mov(rax, r15)?;
    a.call(l.putdec)?;
    a.mov(rsi, s.progress)?;
    a.call(l.puts)?;
    a.mov(rax, rbp)?;
    a.call(l.putdec)?;
    a.mov(rsi, s.pages)?;
    a.call(l.puts)?;
    a.mov(rax, r10)?;
    a.call(l.putdec)?;
    a.mov(rsi, s.ticks)?;
    a.call(l.puts)?;
    a.mov(rax, qword_ptr(r13 + r15 * 8 + TICKS as i32))?;
    a.call(l.putdec)?;
    a.mov(rsi, s.tsc)?;
    a.call(l.puts)?;
    a.mov(rax, r9)?;
    a.call(l.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.call(l.unlock)?;
    // Power-off request: a `q` received on COM1 (LSR.DR set, then read RBR).
    a.mov(edx, u32::from(crate::serial::COM1_PORT) + 5)?;
    a.in_(al, dx)?;
    a.test(al, 1)?;
    a.jz(l.report)?;
    a.mov(edx, u32::from(crate::serial::COM1_PORT))?;
    a.in_(al, dx)?;
    a.cmp(al, i32::from(POWER_OFF_KEY))?;
    a.jne(l.report)?;
    a.jmp(l.poweroff)?;
    a.set_label(&mut l.finished)?;
    a.lock().inc(qword_ptr(r13 + DONE as i32))?;
    a.test(r15, r15)?;
    a.jnz(l.idle)?;
    a.set_label(&mut l.wait_done)?;
    a.call(l.wait_tick)?;
    a.mov(rax, qword_ptr(r13 + DONE as i32))?;
    a.cmp(rax, qword_ptr(r13 + P_CPUS as i32))?;
    a.jb(l.wait_done)?;
    a.set_label(&mut l.poweroff)?;
    a.call(l.lock)?;
    a.mov(rsi, s.poweroff)?;
    a.call(l.puts)?;
    a.mov(rax, qword_ptr(r13 + P_EXIT as i32))?;
    a.call(l.putdec)?;
    a.mov(al, b'\n' as u32)?;
    a.call(l.putc)?;
    a.mov(rax, qword_ptr(r13 + P_EXIT as i32))?;
    a.mov(edx, u32::from(crate::vm::EXIT_PORT))?;
    a.out(dx, al)?;
    // Idle (an AP that is done, or after power-off): halt in the in-kernel LAPIC.
    a.set_label(&mut l.idle)?;
    a.ud2()?;
    a.jmp(l.idle)?;

    Ok(())
}

/// Ring-3 subroutines: timer_start, wait_tick, putc, puts, putdec, lock, unlock.
fn subroutines(a: &mut CodeAssembler, l: &mut Shared) -> Asm {
    // timer_start: this CPU's LAPIC timer, periodic, vector TIMER_VECTOR, divide by 1 (KVM's
    // APIC bus runs at 1 GHz, so the initial count is the period in ns). Clobbers rax, rcx.
    let mut timer_off = a.create_label();
    a.set_label(&mut l.timer_start)?;
    a.mov(rcx, LAPIC)?;
    a.mov(dword_ptr(rcx + 0xf0), 0x100 | SPURIOUS_VECTOR as i32)?;
    a.mov(rax, qword_ptr(r13 + P_TICK_US as i32))?;
    a.test(rax, rax)?;
    a.jz(timer_off)?;
    a.imul_3(rax, rax, 1000)?;
    a.mov(dword_ptr(rcx + 0x3e0), 0xb)?;
    a.mov(dword_ptr(rcx + 0x320), 0x2_0000 | TIMER_VECTOR as i32)?;
    a.mov(dword_ptr(rcx + 0x380), eax)?;
    a.set_label(&mut timer_off)?;
    a.ret()?;
    // wait_tick: with the timer on, halt until the next interrupt (`ud2`, whose #UD handler is
    // the CPL0 halt below); without it, `pause`.
    let mut no_tick = a.create_label();
    a.set_label(&mut l.wait_tick)?;
    a.cmp(qword_ptr(r13 + P_TICK_US as i32), 0)?;
    a.je(no_tick)?;
    a.ud2()?;
    a.ret()?;
    a.set_label(&mut no_tick)?;
    a.pause()?;
    a.ret()?;

    // putc: al -> COM1. Clobbers edx.
    a.set_label(&mut l.putc)?;
    a.mov(edx, u32::from(crate::serial::COM1_PORT))?;
    a.out(dx, al)?;
    a.ret()?;
    // puts: rsi = NUL-terminated string. Clobbers rax, rdx, rsi.
    let mut puts_done = a.create_label();
    a.set_label(&mut l.puts)?;
    a.mov(al, byte_ptr(rsi))?;
    a.test(al, al)?;
    a.jz(puts_done)?;
    a.call(l.putc)?;
    a.inc(rsi)?;
    a.jmp(l.puts)?;
    a.set_label(&mut puts_done)?;
    a.ret()?;
    // putdec: rax in decimal. Clobbers rax, rcx, rdx, rdi, rsi.
    let mut dec_loop = a.create_label();
    a.set_label(&mut l.putdec)?;
    a.sub(rsp, 32)?;
    a.lea(rdi, qword_ptr(rsp + 31))?;
    a.mov(byte_ptr(rdi), 0)?;
    a.mov(ecx, 10u32)?;
    a.set_label(&mut dec_loop)?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.add(dl, b'0' as u32)?;
    a.dec(rdi)?;
    a.mov(byte_ptr(rdi), dl)?;
    a.test(rax, rax)?;
    a.jnz(dec_loop)?;
    a.mov(rsi, rdi)?;
    a.call(l.puts)?;
    a.add(rsp, 32)?;
    a.ret()?;
    // lock / unlock: the print spinlock. Clobber eax.
    let mut lock_got = a.create_label();
    a.set_label(&mut l.lock)?;
    a.mov(eax, 1u32)?;
    a.xchg(dword_ptr(r13 + LOCK as i32), eax)?;
    a.test(eax, eax)?;
    a.jz(lock_got)?;
    a.pause()?;
    a.jmp(l.lock)?;
    a.set_label(&mut lock_got)?;
    a.ret()?;
    a.set_label(&mut l.unlock)?;
    a.mov(dword_ptr(r13 + LOCK as i32), 0)?;
    a.ret()?;
    Ok(())
}

/// Ring-3 subroutine `param`.
fn param_subroutine(a: &mut CodeAssembler, l: &mut Shared) -> Asm {
    // param: value of key rsi (length rdi, including '=') in the command line r12, in
    // decimal, or rax if absent. A key matches at the start or after a space.
    // Clobbers rcx, r8, r9.
    let mut scan = a.create_label();
    let mut check = a.create_label();
    let mut cmp_loop = a.create_label();
    let mut next = a.create_label();
    let mut matched = a.create_label();
    let mut digit = a.create_label();
    let mut param_ret = a.create_label();
    a.set_label(&mut l.param)?;
    a.mov(r8, r12)?;
    a.set_label(&mut scan)?;
    a.cmp(byte_ptr(r8), 0)?;
    a.je(param_ret)?;
    a.cmp(r8, r12)?;
    a.je(check)?;
    a.cmp(byte_ptr(r8 - 1), b' ' as i32)?;
    a.jne(next)?;
    a.set_label(&mut check)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut cmp_loop)?;
    a.cmp(rcx, rdi)?;
    a.je(matched)?;
    a.mov(r9b, byte_ptr(rsi + rcx))?;
    a.cmp(r9b, byte_ptr(r8 + rcx))?;
    a.jne(next)?;
    a.inc(rcx)?;
    a.jmp(cmp_loop)?;
    a.set_label(&mut next)?;
    a.inc(r8)?;
    a.jmp(scan)?;
    a.set_label(&mut matched)?;
    a.add(r8, rdi)?;
    a.xor(eax, eax)?;
    a.set_label(&mut digit)?;
    a.movzx(ecx, byte_ptr(r8))?;
    a.sub(ecx, b'0' as i32)?;
    a.cmp(ecx, 9)?;
    a.ja(param_ret)?;
    a.imul_3(rax, rax, 10)?;
    a.add(rax, rcx)?;
    a.inc(r8)?;
    a.jmp(digit)?;
    a.set_label(&mut param_ret)?;
    a.ret()?;

    Ok(())
}

/// CPL0 interrupt handlers: the timer (with the TSC-deadline re-arm and isr_writes) and
/// spurious.
fn timer_isr(a: &mut CodeAssembler, l: &mut Shared) -> Asm {
    // ---- CPL0 interrupt handlers (from ring 3 through the IDT, on the TSS's RSP0) ----
    let mut isr_done = a.create_label();
    let mut isr_loop = a.create_label();
    let mut isr_nowrap = a.create_label();
    a.set_label(&mut l.timer_isr)?;
    a.push(rax)?;
    a.mov(rax, LAPIC)?;
    a.mov(dword_ptr(rax + 0xb0), 0)?; // EOI
    a.mov(rax, DATA_GPA + TICKS)?;
    a.inc(qword_ptr(rax + r15 * 8))?;
    // TSC-deadline mode (once DL_PER_TICK is measured): on this CPU's first tick after that,
    // switch its LVT timer to TSC-deadline mode; every tick, arm the next deadline one tick
    // after the last one (a CPL0 WRMSR), so ticks stay on a grid of DL_PER_TICK TSC ticks
    // however late the interrupt is handled, as Linux's tick keeps absolute expiry times
    // (arming from now would stretch every tick by the ISR's latency: 2-8% at 2 ms on PVM,
    // more under one VMM than the other, and `pace=1` calibrates on these ticks). If the
    // last deadline is not within one tick before now (the first tick, ticks coalesced while
    // the vCPU did not run, or a TSC that moved with a migration), arm from now.
    let mut no_deadline = a.create_label();
    let mut dl_armed = a.create_label();
    let mut dl_from_now = a.create_label();
    a.mov(rax, DATA_GPA)?;
    a.cmp(qword_ptr(rax + DL_PER_TICK as i32), 0)?;
    a.je(no_deadline)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(r8)?;
    a.mov(r8, rax)?;
    a.cmp(qword_ptr(r8 + r15 * 8 + DL_ON as i32), 0)?;
    a.jne(dl_armed)?;
    a.mov(rcx, LAPIC)?;
    a.mov(
        dword_ptr(rcx + 0x320),
        LVT_TSC_DEADLINE | TIMER_VECTOR as i32,
    )?;
    a.set_label(&mut dl_armed)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    // rcx = now - last (unsigned: a last deadline after now wraps to a huge value).
    a.mov(rcx, rax)?;
    a.sub(rcx, qword_ptr(r8 + r15 * 8 + DL_ON as i32))?;
    a.cmp(rcx, qword_ptr(r8 + DL_PER_TICK as i32))?;
    a.jae(dl_from_now)?;
    a.mov(rax, qword_ptr(r8 + r15 * 8 + DL_ON as i32))?;
    a.set_label(&mut dl_from_now)?;
    a.add(rax, qword_ptr(r8 + DL_PER_TICK as i32))?;
    a.mov(qword_ptr(r8 + r15 * 8 + DL_ON as i32), rax)?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 32)?;
    a.mov(ecx, MSR_TSC_DEADLINE)?;
    a.wrmsr()?;
    a.mov(rax, r8)?;
    a.pop(r8)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.set_label(&mut no_deadline)?;
    // isr_writes: N stores at CPL0, one per page, cycling over every working set.
    a.mov(rax, DATA_GPA)?;
    a.cmp(qword_ptr(rax + P_ISR_WRITES as i32), 0)?;
    a.je(isr_done)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(r8)?;
    a.mov(rcx, qword_ptr(rax + P_ISR_WRITES as i32))?;
    a.mov(rdx, qword_ptr(rax + r15 * 8 + ISR_POS as i32))?;
    a.set_label(&mut isr_loop)?;
    a.cmp(rdx, qword_ptr(rax + ISR_SPAN as i32))?;
    a.jb(isr_nowrap)?;
    a.xor(edx, edx)?;
    a.set_label(&mut isr_nowrap)?;
    a.mov(r8, WS_GPA)?;
    a.add(r8, rdx)?;
    let mut isr_below_hole = a.create_label();
    a.cmp(r8, qword_ptr(rax + HOLE_AT as i32))?;
    a.jb(isr_below_hole)?;
    a.add(r8, qword_ptr(rax + HOLE_SKIP as i32))?;
    a.set_label(&mut isr_below_hole)?;
    a.mov(qword_ptr(r8 + 8), rcx)?;
    a.add(rdx, 4096)?;
    a.dec(rcx)?;
    a.jnz(isr_loop)?;
    a.mov(qword_ptr(rax + r15 * 8 + ISR_POS as i32), rdx)?;
    a.pop(r8)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.set_label(&mut isr_done)?;
    a.pop(rax)?;
    a.iretq()?;
    a.set_label(&mut l.spurious_isr)?;
    a.iretq()?;
    Ok(())
}

/// CPL0 #UD handler: halt until an interrupt, or the boot stores.
fn halt_isr(a: &mut CodeAssembler, l: &mut Shared) -> Asm {
    // #UD from ring 3's `ud2`: halt until an interrupt (handled by the ISR above, which returns
    // here), then back to ring 3 past the `ud2`. HLT at CPL0 is handled by KVM's in-kernel
    // LAPIC: the vCPU thread blocks in KVM_RUN. On PVM neither `syscall` (it reached LSTAR
    // still at CPL 3) nor `int 0x80` (triple fault) gets ring 3 into ring 0; exceptions and
    // interrupts do.
    // With BOOT_REQ set (the BSP, once, before its timer starts) it makes the boot_writes
    // stores instead: N 8-byte stores at CPL0, one per page cycling over the BSP's working set.
    let mut halt = a.create_label();
    let mut boot_loop = a.create_label();
    let mut boot_nowrap = a.create_label();
    a.set_label(&mut l.halt_isr)?;
    a.push(rax)?;
    a.mov(rax, DATA_GPA)?;
    a.cmp(qword_ptr(rax + BOOT_REQ as i32), 0)?;
    a.je(halt)?;
    a.mov(qword_ptr(rax + BOOT_REQ as i32), 0)?;
    a.push(rcx)?;
    a.push(rdx)?;
    a.push(r8)?;
    a.mov(rcx, qword_ptr(rax + P_BOOT_WRITES as i32))?;
    // r8 = the end of the BSP's working set (at least one page).
    a.mov(r8, qword_ptr(rax + P_WS as i32))?;
    a.shl(r8, 20)?;
    a.mov(edx, 4096u32)?;
    a.cmp(r8, rdx)?;
    a.cmovb(r8, rdx)?;
    a.mov(rdx, WS_GPA)?;
    a.add(r8, rdx)?;
    a.push(r9)?;
    a.set_label(&mut boot_loop)?;
    let mut boot_below_hole = a.create_label();
    a.mov(r9, rdx)?;
    a.cmp(r9, qword_ptr(rax + HOLE_AT as i32))?;
    a.jb(boot_below_hole)?;
    a.add(r9, qword_ptr(rax + HOLE_SKIP as i32))?;
    a.set_label(&mut boot_below_hole)?;
    a.mov(qword_ptr(r9), rcx)?;
    a.add(rdx, 4096)?;
    a.cmp(rdx, r8)?;
    a.jb(boot_nowrap)?;
    a.mov(rdx, WS_GPA)?;
    a.set_label(&mut boot_nowrap)?;
    a.dec(rcx)?;
    a.jnz(boot_loop)?;
    a.pop(r9)?;
    a.pop(r8)?;
    a.pop(rdx)?;
    a.pop(rcx)?;
    a.pop(rax)?;
    a.add(qword_ptr(rsp), 2)?;
    a.iretq()?;
    a.set_label(&mut halt)?;
    a.pop(rax)?;
    a.sti()?;
    a.hlt()?;
    a.add(qword_ptr(rsp), 2)?;
    a.iretq()?;
    Ok(())
}

/// An IDT page with 64-bit interrupt gates (DPL 0): timer, spurious, and #UD (the halt call).
fn idt(isrs: &Isrs) -> Vec<u8> {
    let mut t = vec![0u8; IDT_GATES * 16];
    for (v, off, dpl) in [
        (TIMER_VECTOR, isrs.timer, 0u64),
        (SPURIOUS_VECTOR, isrs.spurious, 0),
        (HALT_VECTOR, isrs.halt, 0),
    ] {
        let lo = (off & 0xffff)
            | (u64::from(SEL_CODE64) << 16)
            | ((0x8e | (dpl << 5)) << 40) // present, DPL, 64-bit interrupt gate
            | (((off >> 16) & 0xffff) << 48);
        let o = v as usize * 16;
        t[o..o + 8].copy_from_slice(&lo.to_le_bytes());
        t[o + 8..o + 16].copy_from_slice(&(off >> 32).to_le_bytes());
    }
    t
}

/// Per-CPU TSSes: RSP0 = the middle of the CPU's stack (ring 3 uses the upper half), and an
/// I/O permission bitmap allowing ports below `IO_PORTS`.
fn tsses() -> Vec<u8> {
    let mut t = vec![0u8; 4096];
    for c in 0..MAX_CPUS {
        let o = (c * TSS_STRIDE) as usize;
        let rsp0 = STACKS_GPA + c * STACK_BYTES + STACK_BYTES / 2;
        t[o + 4..o + 12].copy_from_slice(&rsp0.to_le_bytes());
        t[o + 0x66..o + 0x68].copy_from_slice(&0x68u16.to_le_bytes());
        t[o + TSS_LIMIT] = 0xff;
    }
    t
}

/// Static identity page tables for the first `MAPPED_GIB` GiB: 2 MiB pages, present, writable, user.
fn page_tables() -> Vec<u8> {
    const P_RW_US: u64 = 0x7;
    const PS: u64 = 0x80;
    let mut t = vec![0u8; (2 + MAPPED_GIB as usize) * 4096];
    let mut put = |page: usize, idx: usize, v: u64| {
        let o = page * 4096 + idx * 8;
        t[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    put(0, 0, PDPT_GPA | P_RW_US);
    for g in 0..MAPPED_GIB as usize {
        put(1, g, (PD_GPA + 4096 * g as u64) | P_RW_US);
        for m in 0..512usize {
            let addr = ((g as u64) << 30) | ((m as u64) << 21);
            put(2 + g, m, addr | P_RW_US | PS);
        }
    }
    t
}

/// Assembles the test kernel and returns its ELF bytes.
pub fn build(params: &TestKernelParams) -> Result<Vec<u8>> {
    let mut data = Data::new();
    let strs = strings(&mut data)?;
    let (e32, ap_off) = entry32().map_err(asm_err)?;
    let (c64, isrs) = code64(&strs).map_err(asm_err)?;
    let tramp = trampoline(KERNEL_GPA as u32 + ap_off).map_err(asm_err)?;
    if tramp.len() > TRAMPOLINE_BYTES {
        return Err(PvhError::Assemble("trampoline larger than its slot".into()));
    }
    let t = TRAMPOLINE_COPY as usize;
    data.page[t..t + tramp.len()].copy_from_slice(&tramp);
    if KERNEL_GPA + e32.len() as u64 > CODE64_GPA || CODE64_GPA + c64.len() as u64 > DATA_GPA {
        return Err(PvhError::Assemble("code larger than its slot".into()));
    }
    let mut image = vec![0u8; (STACKS_GPA - KERNEL_GPA) as usize];
    let at = |a: u64| (a - KERNEL_GPA) as usize;
    image[..e32.len()].copy_from_slice(&e32);
    image[at(CODE64_GPA)..at(CODE64_GPA) + c64.len()].copy_from_slice(&c64);
    image[at(DATA_GPA)..at(DATA_GPA) + 4096].copy_from_slice(&data.page);
    image[at(PML4_GPA)..at(IDT_GPA)].copy_from_slice(&page_tables());
    image[at(IDT_GPA)..at(TSS_GPA)].copy_from_slice(&idt(&isrs));
    image[at(TSS_GPA)..at(STACKS_GPA)].copy_from_slice(&tsses());
    let class = if params.elf32 {
        Class::Elf32
    } else {
        Class::Elf64
    };
    Ok(elf::write(
        class,
        &[OutSegment {
            paddr: KERNEL_GPA,
            data: image,
            memsz: STACKS_GPA + MAX_CPUS * STACK_BYTES - KERNEL_GPA,
        }],
        Some(KERNEL_GPA as u32),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_kernel_is_a_pvh_elf_with_one_segment_at_1mib_and_a_bss() {
        for elf32 in [false, true] {
            let f = build(&TestKernelParams { elf32 }).unwrap();
            let img = elf::parse(&f).unwrap();
            assert_eq!(img.entry, KERNEL_GPA as u32);
            assert_eq!(img.class == Class::Elf32, elf32);
            assert_eq!(img.segments.len(), 1);
            assert_eq!(img.segments[0].paddr, KERNEL_GPA);
            assert!(img.segments[0].memsz > img.segments[0].filesz);
        }
    }

    #[test]
    fn progress_line_round_trips_and_the_old_form_still_parses() {
        let p = Progress {
            cpu: 3,
            report: 17,
            pages: 4352,
            ticks: 170,
            tsc: Some(u64::MAX),
        };
        let line = p.to_string();
        assert_eq!(
            line,
            "cpu 3 progress 17 pages 4352 ticks 170 tsc 18446744073709551615"
        );
        assert_eq!(Progress::parse(&line), Some(p));
        let old = Progress { tsc: None, ..p };
        assert_eq!(old.to_string(), "cpu 3 progress 17 pages 4352 ticks 170");
        assert_eq!(Progress::parse(&old.to_string()), Some(old));
        let console = format!("{BANNER}\ncpu 0 tsc_per_tick 4200000\n{line}\ncpu 1 up\n{old}\n");
        assert_eq!(Progress::all(&console), vec![p, old]);
        assert_eq!(tsc_per_tick(&console, 0), Some(4_200_000));
        assert_eq!(tsc_per_tick(&console, 1), None);
    }

    #[test]
    fn malformed_progress_lines_are_not_reports() {
        for bad in [
            "",
            "cpu 0 up",
            "cpu 0 progress 1 pages 2",
            "cpu 0 progress 1 pages 2 ticks",
            "cpu 0 progress 1 pages 2 ticks 3 tsc",
            "cpu 0 progress 1 pages 2 ticks 3 tsc 4 5",
            "cpu 0 progress 1 pages 2 ticks 3 tsx 4",
            "cpu 0 progress 1 pages -2 ticks 3",
            "cpu 0 progress 1 pages 2 ticks 3 tsc 18446744073709551616",
            "cpu x progress 1 pages 2 ticks 3 tsc 4",
            "cpu 0 progress 1 pages 2 ticks 3\u{0}",
        ] {
            assert_eq!(Progress::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn cmdline_renders_every_key() {
        let c = Cmdline {
            ws_mb: 2,
            dirty_mb: 1,
            reports: 5,
            cpus: 2,
            exit: 7,
            tick_us: 500,
            period_ticks: 10,
            tsc_pace: true,
            ..Cmdline::default()
        };
        assert_eq!(
            c.render(),
            "ws_mb=2 dirty_mb=1 reports=5 cpus=2 exit=7 tick_us=500 period_ticks=10 pace=1"
        );
        let deadline = Cmdline {
            tsc_deadline: true,
            ..c
        };
        assert!(deadline.render().ends_with(" pace=1 timer=tsc-deadline"));
        assert_eq!(c.memory_needed(), WS_GPA + (4 << 20));
    }
}
