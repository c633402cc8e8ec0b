//! The model throughput benchmark behind `ringvisor bench gic`: ITS commands processed per
//! second (command queue in guest memory, run by GITS_CWRITER writes) and LPIs delivered per
//! second (an MSI through GITS_TRANSLATER, acknowledged with ICC_IAR1_EL1 and completed with
//! ICC_EOIR1_EL1 on the target PE). It is a program that reports numbers, not a timed test.

use std::time::Instant;

use serde::Serialize;
use thiserror::Error;

use crate::config::GicConfig;
use crate::cpuif::IccReg;
use crate::error::ConfigError;
use crate::its::ItsCommand;
use crate::mem::{GuestMem, VecMem};
use crate::regs::*;
use crate::Gic;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BenchParams {
    /// Number of PEs in the model.
    pub pes: usize,
    /// ITS commands to execute.
    pub its_commands: u64,
    /// LPIs to deliver end to end.
    pub lpis: u64,
    /// Distinct events (LPIs) the delivery phase cycles through.
    pub events: u32,
}

impl Default for BenchParams {
    fn default() -> Self {
        BenchParams {
            pes: 4,
            its_commands: 200_000,
            lpis: 200_000,
            events: 1024,
        }
    }
}

/// Benchmark results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchReport {
    /// The parameters used.
    pub params: BenchParams,
    /// ITS commands executed.
    pub its_commands: u64,
    /// Seconds spent in the model executing them.
    pub its_seconds: f64,
    /// Commands per second.
    pub its_commands_per_sec: f64,
    /// Commands the ITS rejected (must be 0: the mix is valid).
    pub its_command_errors: u64,
    /// LPIs acknowledged with the expected INTID and completed.
    pub lpis_delivered: u64,
    /// LPIs that were not acknowledged as expected (must be 0).
    pub lpis_lost: u64,
    /// Seconds for the delivery phase.
    pub lpi_seconds: f64,
    /// LPIs delivered per second.
    pub lpis_per_sec: f64,
    /// Guest pages the model dirtied (write log) during the run.
    pub dirty_pages: u64,
}

impl BenchReport {
    /// Renders the report as a markdown table.
    pub fn to_markdown(&self) -> String {
        format!(
            "| metric | value |\n|---|---|\n\
             | PEs | {} |\n\
             | ITS commands executed | {} |\n\
             | ITS commands / s | {:.0} |\n\
             | ITS command errors | {} |\n\
             | LPIs delivered (MSI -> IAR1 -> EOIR1) | {} |\n\
             | LPIs lost | {} |\n\
             | LPIs delivered / s | {:.0} |\n\
             | guest pages dirtied by the model | {} |\n",
            self.params.pes,
            self.its_commands,
            self.its_commands_per_sec,
            self.its_command_errors,
            self.lpis_delivered,
            self.lpis_lost,
            self.lpis_per_sec,
            self.dirty_pages,
        )
    }
}

/// Why the benchmark could not run.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The parameters describe an invalid model.
    #[error("invalid benchmark model: {0}")]
    Config(#[from] ConfigError),
    /// Setting up guest memory failed.
    #[error("benchmark setup failed: {0}")]
    Setup(String),
}

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 8 << 20;
const PROP: u64 = RAM;
const PEND: u64 = RAM + 0x1_0000; // + pe * 64 KiB
const DT: u64 = RAM + 0x40_0000;
const CT: u64 = RAM + 0x41_0000;
const CMDQ: u64 = RAM + 0x42_0000; // 64 KiB: 2048 commands
const ITT: u64 = RAM + 0x50_0000; // device d at + d * 256 KiB (16 Ki events)
const QUEUE_PAGES: u64 = 16;
const GITS: u64 = 0x0808_0000;

fn setup(pes: usize) -> Result<Gic<VecMem>, BenchError> {
    if pes == 0 || pes > 16 {
        return Err(BenchError::Setup(format!("{pes} PEs: use 1..=16")));
    }
    let mut gic = Gic::new(GicConfig::virt(pes), VecMem::new(RAM, RAM_SIZE))?;
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(e.to_string());
    gic.mem_mut()
        .write(PROP, &vec![0xa1u8; 0x1_0000 - 0x400])
        .map_err(|e| setup(&e))?;
    gic.write(0x0800_0000, 4, GICD_CTLR_ENABLE_G1 as u64)
        .map_err(|e| setup(&e))?;
    for pe in 0..pes {
        let rd = gic.config().rd_base(pe);
        for (off, w, v) in [
            (GICR_WAKER, 4, 0),
            (GICR_PROPBASER, 8, PROP | 15),
            (GICR_PENDBASER, 8, PEND + pe as u64 * 0x1_0000),
            (GICR_CTLR, 4, GICR_CTLR_ENABLE_LPIS as u64),
        ] {
            gic.write(rd + off, w, v).map_err(|e| setup(&e))?;
        }
        gic.icc_write(pe, IccReg::Pmr, 0xFF)
            .map_err(|e| setup(&e))?;
        gic.icc_write(pe, IccReg::Igrpen1, 1)
            .map_err(|e| setup(&e))?;
    }
    for (off, v) in [
        (GITS_BASER, GITS_BASER_VALID | (2 << 8) | DT),
        (GITS_BASER + 8, GITS_BASER_VALID | (2 << 8) | CT),
        (GITS_CBASER, GITS_CBASER_VALID | CMDQ | (QUEUE_PAGES - 1)),
    ] {
        gic.write(GITS + off, 8, v).map_err(|e| setup(&e))?;
    }
    gic.write(GITS + GITS_CTLR, 4, GITS_CTLR_ENABLED as u64)
        .map_err(|e| setup(&e))?;
    Ok(gic)
}

/// Queues `cmds` and runs them; returns the time spent in the CWRITER writes.
fn run_commands(
    gic: &mut Gic<VecMem>,
    slot: &mut u64,
    cmds: &[ItsCommand],
) -> Result<f64, BenchError> {
    let slots = QUEUE_PAGES * 4096 / 32;
    let mut secs = 0.0;
    for chunk in cmds.chunks((slots - 1) as usize) {
        for c in chunk {
            gic.mem_mut()
                .write(CMDQ + *slot * 32, &c.to_bytes())
                .map_err(|e| BenchError::Setup(e.to_string()))?;
            *slot = (*slot + 1) % slots;
        }
        let t = Instant::now();
        gic.write(GITS + GITS_CWRITER, 8, *slot * 32)
            .map_err(|e| BenchError::Setup(e.to_string()))?;
        secs += t.elapsed().as_secs_f64();
    }
    Ok(secs)
}

/// Runs the benchmark.
pub fn run(p: &BenchParams) -> Result<BenchReport, BenchError> {
    let mut gic = setup(p.pes)?;
    let events = p.events.clamp(1, 1 << 14);
    let mut slot = 0u64;
    // Map collections and two devices.
    let mut cmds: Vec<ItsCommand> = (0..p.pes)
        .map(|pe| ItsCommand::Mapc {
            icid: pe as u16,
            rdbase: pe as u64,
            valid: true,
        })
        .collect();
    for d in 0..2u32 {
        cmds.push(ItsCommand::Mapd {
            device: d,
            size: 13,
            itt: ITT + d as u64 * 0x4_0000,
            valid: true,
        });
    }
    run_commands(&mut gic, &mut slot, &cmds)?;

    // Phase 1: a mix of map / trigger / clear / invalidate / move / discard commands.
    let mut mix = Vec::with_capacity(p.its_commands as usize);
    let mut i = 0u64;
    while (mix.len() as u64) < p.its_commands {
        let event = (i % events as u64) as u32;
        let intid = LPI_BASE + event;
        let icid = (i % p.pes as u64) as u16;
        let next = ((i + 1) % p.pes as u64) as u16;
        mix.extend_from_slice(&[
            ItsCommand::Mapti {
                device: 0,
                event,
                intid,
                icid,
            },
            ItsCommand::Int { device: 0, event },
            ItsCommand::Inv { device: 0, event },
            ItsCommand::Movi {
                device: 0,
                event,
                icid: next,
            },
            ItsCommand::Clear { device: 0, event },
            ItsCommand::Discard { device: 0, event },
            ItsCommand::Sync { rdbase: 0 },
        ]);
        i += 1;
    }
    mix.truncate(p.its_commands as usize);
    let before = gic.its_commands_processed(0).unwrap_or(0);
    let its_seconds = run_commands(&mut gic, &mut slot, &mix)?;
    let its_commands = gic.its_commands_processed(0).unwrap_or(0) - before;

    // Phase 2: end-to-end delivery on device 1.
    let mut map = Vec::new();
    for event in 0..events {
        map.push(ItsCommand::Mapti {
            device: 1,
            event,
            intid: LPI_BASE + event,
            icid: (event as usize % p.pes) as u16,
        });
    }
    map.push(ItsCommand::Invall { icid: 0 });
    run_commands(&mut gic, &mut slot, &map)?;
    let mut delivered = 0u64;
    let mut lost = 0u64;
    gic.set_msi_device_id(1);
    let t = Instant::now();
    for n in 0..p.lpis {
        let event = (n % events as u64) as u32;
        let pe = event as usize % p.pes;
        let _ = gic.write(GITS + GITS_TRANSLATER, 4, event as u64);
        match gic.icc_read(pe, IccReg::Iar1) {
            Ok(v) if v == (LPI_BASE + event) as u64 => {
                delivered += 1;
                let _ = gic.icc_write(pe, IccReg::Eoir1, v);
            }
            _ => lost += 1,
        }
    }
    let lpi_seconds = t.elapsed().as_secs_f64();
    // A clock too coarse to see the phase at all still yields a finite, positive rate.
    let rate = |n: u64, s: f64| n as f64 / s.max(1e-9);
    let mut pages = Vec::new();
    gic.write_log().drain_pages_into(&mut pages);
    let its_command_errors = gic.its_errors(0).map_or(0, |e| e.1);
    Ok(BenchReport {
        params: *p,
        its_commands,
        its_seconds,
        its_commands_per_sec: rate(its_commands, its_seconds),
        its_command_errors,
        lpis_delivered: delivered,
        lpis_lost: lost,
        lpi_seconds,
        lpis_per_sec: rate(delivered, lpi_seconds),
        dirty_pages: pages.len() as u64,
    })
}
