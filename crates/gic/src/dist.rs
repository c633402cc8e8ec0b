//! The distributor (GICD_* frame): group, enable, pending, active, priority, configuration
//! and routing state of the SPIs, and the global enables. It owns nothing per PE: SGI and PPI
//! state lives in the redistributors ([`crate::redist`]) because affinity routing is always
//! enabled (GICD_CTLR.ARE is RAO/WI), which makes the distributor's INTID 0..31 registers
//! RAZ/WI.

use serde::{Deserialize, Serialize};

use crate::access::{bit, only32, read_bytes, set_bit, set_or_clear, write_bytes};
use crate::config::GicConfig;
use crate::error::{MmioError, StateError};
use crate::regs::*;

/// Saved distributor state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DistState {
    /// GICD_CTLR enable bits (EnableGrp0, EnableGrp1).
    pub ctlr: u32,
    /// GICD_IGROUPR words (word 0, INTIDs 0..31, is unused).
    pub group: Vec<u32>,
    /// GICD_ISENABLER words.
    pub enable: Vec<u32>,
    /// Pending latches.
    pub pending: Vec<u32>,
    /// Input line levels (used by level-sensitive SPIs).
    #[serde(default)]
    pub level: Vec<u32>,
    /// Active bits.
    pub active: Vec<u32>,
    /// GICD_ICFGR words (2 bits per INTID).
    pub cfg: Vec<u32>,
    /// GICD_IPRIORITYR bytes.
    pub priority: Vec<u8>,
    /// GICD_IROUTER values.
    pub router: Vec<u64>,
}

#[derive(Debug, Clone)]
pub(crate) struct Distributor {
    pub(crate) ctlr: u32,
    pub(crate) group: Vec<u32>,
    pub(crate) enable: Vec<u32>,
    /// Pending latches (edge events, GICD_ISPENDR writes).
    pub(crate) pending: Vec<u32>,
    /// Input line levels.
    pub(crate) level: Vec<u32>,
    /// Derived from `cfg`: 1 = edge-triggered.
    edge: Vec<u32>,
    pub(crate) active: Vec<u32>,
    pub(crate) cfg: Vec<u32>,
    pub(crate) priority: Vec<u8>,
    pub(crate) router: Vec<u64>,
    num_irqs: u32,
    typer: u32,
    /// GICD_TYPER2 (0 without GICv4.1).
    typer2: u32,
    /// GICD_CTLR bits software may write.
    ctlr_rw: u32,
}

/// Bank registers of one bit per INTID, 32 INTIDs per word.
#[derive(Clone, Copy)]
enum Bank {
    Group,
    SetEnable,
    ClearEnable,
    SetPending,
    ClearPending,
    SetActive,
    ClearActive,
}

fn bank_at(offset: u64) -> Option<(Bank, u64)> {
    let banks = [
        (GICD_IGROUPR, Bank::Group),
        (GICD_ISENABLER, Bank::SetEnable),
        (GICD_ICENABLER, Bank::ClearEnable),
        (GICD_ISPENDR, Bank::SetPending),
        (GICD_ICPENDR, Bank::ClearPending),
        (GICD_ISACTIVER, Bank::SetActive),
        (GICD_ICACTIVER, Bank::ClearActive),
    ];
    banks
        .iter()
        .find(|(base, _)| offset >= *base && offset < base + 0x80)
        .map(|(base, b)| (*b, (offset - base) / 4))
}

impl Distributor {
    pub(crate) fn new(cfg: &GicConfig) -> Self {
        let num_irqs = cfg.num_irqs();
        let words = (num_irqs / 32) as usize;
        // CPUNumber counts the PEs usable without affinity routing; ARE is RAO/WI here, so
        // none are, and the field reads 0 (as on QEMU).
        let typer = ((num_irqs / 32 - 1) << GICD_TYPER_ITLINES_SHIFT)
            | GICD_TYPER_LPIS
            | (((cfg.lpi_id_bits as u32) - 1) << GICD_TYPER_IDBITS_SHIFT)
            | GICD_TYPER_A3V
            | GICD_TYPER_NO1N;
        Distributor {
            ctlr: 0,
            group: vec![0; words],
            enable: vec![0; words],
            pending: vec![0; words],
            level: vec![0; words],
            edge: vec![0; words],
            active: vec![0; words],
            cfg: vec![0; words * 2],
            priority: vec![0; num_irqs as usize],
            router: vec![0; num_irqs as usize],
            num_irqs,
            typer,
            // GICv4.0 has no GICD_TYPER2 fields (VID/VIL/nASSGIcap are GICv4.1).
            typer2: cfg.v41.as_ref().filter(|v| !v.v4_0).map_or(0, |v| {
                ((v.vpeid_bits as u32 - 1) & GICD_TYPER2_VID_MASK)
                    | GICD_TYPER2_VIL
                    | if v.nassgi_cap {
                        GICD_TYPER2_NASSGICAP
                    } else {
                        0
                    }
            }),
            ctlr_rw: GICD_CTLR_ENABLE_G0
                | GICD_CTLR_ENABLE_G1
                | if cfg.v41.as_ref().is_some_and(|v| v.nassgi_cap) {
                    GICD_CTLR_NASSGIREQ
                } else {
                    0
                },
        }
    }

    pub(crate) fn num_irqs(&self) -> u32 {
        self.num_irqs
    }

    pub(crate) fn is_spi(&self, intid: u32) -> bool {
        (NUM_PRIVATE..self.num_irqs).contains(&intid)
    }

    /// Pending state of word `w`: the latch, plus the input level of level-sensitive INTIDs.
    pub(crate) fn pending_word(&self, w: usize) -> u32 {
        self.pending[w] | (self.level[w] & !self.edge[w])
    }

    /// Drives an SPI's input line. A rising edge of an edge-triggered SPI sets its latch.
    pub(crate) fn set_level(&mut self, intid: u32, high: bool) {
        if !self.is_spi(intid) {
            return;
        }
        if high && !bit(&self.level, intid) && bit(&self.edge, intid) {
            set_bit(&mut self.pending, intid, true);
        }
        set_bit(&mut self.level, intid, high);
    }

    fn recompute_edge(&mut self) {
        for (w, e) in self.edge.iter_mut().enumerate() {
            let lo = self.cfg.get(2 * w).copied().unwrap_or(0);
            let hi = self.cfg.get(2 * w + 1).copied().unwrap_or(0);
            *e = (edge_bits(lo) as u32) | ((edge_bits(hi) as u32) << 16);
        }
    }

    pub(crate) fn set_pending(&mut self, intid: u32, v: bool) {
        if self.is_spi(intid) {
            set_bit(&mut self.pending, intid, v);
        }
    }

    pub(crate) fn set_active(&mut self, intid: u32, v: bool) {
        if self.is_spi(intid) {
            set_bit(&mut self.active, intid, v);
        }
    }

    pub(crate) fn is_active(&self, intid: u32) -> bool {
        bit(&self.active, intid)
    }

    pub(crate) fn is_pending(&self, intid: u32) -> bool {
        self.is_spi(intid) && self.pending_word((intid / 32) as usize) & (1 << (intid % 32)) != 0
    }

    fn words(&self) -> u64 {
        (self.num_irqs / 32) as u64
    }

    pub(crate) fn read(&self, offset: u64, width: u8) -> Result<u64, MmioError> {
        if let Some((bank, n)) = bank_at(offset) {
            only32(offset, width)?;
            if n == 0 || n >= self.words() {
                return Ok(0);
            }
            let n = n as usize;
            let v = match bank {
                Bank::Group => self.group[n],
                Bank::SetEnable | Bank::ClearEnable => self.enable[n],
                Bank::SetPending | Bank::ClearPending => self.pending_word(n),
                Bank::SetActive | Bank::ClearActive => self.active[n],
            };
            return Ok(v as u64);
        }
        match offset {
            GICD_CTLR => {
                only32(offset, width)?;
                Ok((self.ctlr | GICD_CTLR_ARE | GICD_CTLR_DS) as u64)
            }
            GICD_TYPER => {
                only32(offset, width)?;
                Ok(self.typer as u64)
            }
            GICD_TYPER2 => {
                only32(offset, width)?;
                Ok(self.typer2 as u64)
            }
            GICD_IIDR => {
                only32(offset, width)?;
                Ok(IIDR_VALUE as u64)
            }
            o if id_register(o).is_some() => {
                only32(offset, width)?;
                Ok(id_register(o).unwrap_or(0) as u64)
            }
            o if (GICD_IPRIORITYR..GICD_IPRIORITYR + 0x400).contains(&o) => {
                if width != 1 && width != 4 {
                    return Err(MmioError::WidthNotPermitted { offset, width });
                }
                let start = (o - GICD_IPRIORITYR) as usize;
                // INTIDs 0..31 are RAZ/WI here (banked in the redistributors).
                if start < NUM_PRIVATE as usize {
                    return Ok(0);
                }
                Ok(read_bytes(&self.priority, start, width))
            }
            o if (GICD_ITARGETSR..GICD_ITARGETSR + 0x400).contains(&o) => {
                if width != 1 && width != 4 {
                    return Err(MmioError::WidthNotPermitted { offset, width });
                }
                Ok(0)
            }
            o if (GICD_ICFGR..GICD_ICFGR + 0x100).contains(&o) => {
                only32(offset, width)?;
                let n = ((o - GICD_ICFGR) / 4) as usize;
                if n < 2 {
                    return Ok(0);
                }
                Ok(self.cfg.get(n).copied().unwrap_or(0) as u64)
            }
            o if (GICD_IROUTER..GICD_IROUTER + 8 * 1024).contains(&o) => {
                let intid = ((o - GICD_IROUTER) / 8) as u32;
                let reg = GICD_IROUTER + 8 * intid as u64;
                let pos = crate::access::half64(reg, o, width)?;
                let v = if self.is_spi(intid) {
                    self.router[intid as usize]
                } else {
                    0
                };
                Ok(crate::access::read_part(v, pos, width))
            }
            _ => {
                // Reserved and RAZ/WI registers (STATUSR, IGRPMODR, NSACR, SGIR, TYPER2...).
                Ok(0)
            }
        }
    }

    pub(crate) fn write(&mut self, offset: u64, width: u8, value: u64) -> Result<(), MmioError> {
        let v32 = value as u32;
        if let Some((bank, n)) = bank_at(offset) {
            only32(offset, width)?;
            if n == 0 || n >= self.words() {
                return Ok(());
            }
            let n = n as usize;
            match bank {
                Bank::Group => self.group[n] = v32,
                Bank::SetEnable => set_or_clear(&mut self.enable[n], v32, true),
                Bank::ClearEnable => set_or_clear(&mut self.enable[n], v32, false),
                Bank::SetPending => set_or_clear(&mut self.pending[n], v32, true),
                Bank::ClearPending => set_or_clear(&mut self.pending[n], v32, false),
                Bank::SetActive => set_or_clear(&mut self.active[n], v32, true),
                Bank::ClearActive => set_or_clear(&mut self.active[n], v32, false),
            }
            return Ok(());
        }
        match offset {
            GICD_CTLR => {
                only32(offset, width)?;
                self.ctlr = v32 & self.ctlr_rw;
                Ok(())
            }
            o if o == GICD_TYPER || o == GICD_IIDR || id_register(o).is_some() => {
                only32(offset, width)
            }
            o if (GICD_IPRIORITYR..GICD_IPRIORITYR + 0x400).contains(&o) => {
                if width != 1 && width != 4 {
                    return Err(MmioError::WidthNotPermitted { offset, width });
                }
                let start = (o - GICD_IPRIORITYR) as usize;
                if start >= NUM_PRIVATE as usize {
                    write_bytes(&mut self.priority, start, width, value, PRIORITY_MASK);
                }
                Ok(())
            }
            o if (GICD_ITARGETSR..GICD_ITARGETSR + 0x400).contains(&o) => {
                if width != 1 && width != 4 {
                    return Err(MmioError::WidthNotPermitted { offset, width });
                }
                Ok(())
            }
            o if (GICD_ICFGR..GICD_ICFGR + 0x100).contains(&o) => {
                only32(offset, width)?;
                let n = ((o - GICD_ICFGR) / 4) as usize;
                if n >= 2 {
                    if let Some(w) = self.cfg.get_mut(n) {
                        // Bit 0 of each 2-bit field is RES0; bit 1 selects edge triggering.
                        *w = v32 & 0xAAAA_AAAA;
                    }
                    self.recompute_edge();
                }
                Ok(())
            }
            o if (GICD_IROUTER..GICD_IROUTER + 8 * 1024).contains(&o) => {
                let intid = ((o - GICD_IROUTER) / 8) as u32;
                let reg = GICD_IROUTER + 8 * intid as u64;
                let pos = crate::access::half64(reg, o, width)?;
                if self.is_spi(intid) {
                    let r = &mut self.router[intid as usize];
                    *r = crate::access::merge_part(*r, value, pos, width) & GICD_IROUTER_MASK;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The PE affinity an SPI is routed to (Aff3.Aff2.Aff1.Aff0).
    pub(crate) fn route_affinity(&self, intid: u32) -> u32 {
        let r = self.router.get(intid as usize).copied().unwrap_or(0);
        ((((r >> 32) & 0xFF) << 24) | (r & 0xFF_FFFF)) as u32
    }

    pub(crate) fn state(&self) -> DistState {
        DistState {
            ctlr: self.ctlr,
            group: self.group.clone(),
            enable: self.enable.clone(),
            pending: self.pending.clone(),
            level: self.level.clone(),
            active: self.active.clone(),
            cfg: self.cfg.clone(),
            priority: self.priority.clone(),
            router: self.router.clone(),
        }
    }

    pub(crate) fn restore(&mut self, s: &DistState) -> Result<(), StateError> {
        let words = self.group.len();
        for (what, got, want) in [
            ("GICD group words", s.group.len(), words),
            ("GICD enable words", s.enable.len(), words),
            ("GICD pending words", s.pending.len(), words),
            ("GICD active words", s.active.len(), words),
            ("GICD cfg words", s.cfg.len(), words * 2),
            ("GICD priorities", s.priority.len(), self.priority.len()),
            ("GICD routers", s.router.len(), self.router.len()),
        ] {
            if got != want {
                return Err(StateError::Length { what, got, want });
            }
        }
        self.ctlr = s.ctlr & self.ctlr_rw;
        self.group = s.group.clone();
        self.enable = s.enable.clone();
        self.pending = s.pending.clone();
        self.level = if s.level.is_empty() {
            vec![0; words]
        } else if s.level.len() == words {
            s.level.clone()
        } else {
            return Err(StateError::Length {
                what: "GICD level words",
                got: s.level.len(),
                want: words,
            });
        };
        self.active = s.active.clone();
        self.cfg = s.cfg.iter().map(|w| w & 0xAAAA_AAAA).collect();
        self.priority = s.priority.iter().map(|p| p & PRIORITY_MASK).collect();
        self.router = s.router.iter().map(|r| r & GICD_IROUTER_MASK).collect();
        self.recompute_edge();
        Ok(())
    }
}

/// Collects the edge bits (bit 1 of each 2-bit ICFGR field) of 16 INTIDs.
pub(crate) fn edge_bits(cfg: u32) -> u16 {
    let mut r = 0u16;
    for j in 0..16 {
        if cfg & (1 << (2 * j + 1)) != 0 {
            r |= 1 << j;
        }
    }
    r
}
