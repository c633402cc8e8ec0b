//! The host GIC driver: boots the GIC the way Linux does (LPI tables, ITS device /
//! collection / vPE tables, vPE tables shared by CommonLPIAff group and SVPET, command queues),
//! allocates host LPIs, submits ITS commands and waits for them, and owns the
//! per-redistributor locks.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use gic::regs::*;
use gic::{Gic, GicConfig, GuestMem, IccReg, ItsCommand, VecMem};

use crate::{lock, HypError};

/// Where the host's table memory lives and how long polls may spin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostParams {
    /// The GIC to build and drive.
    pub gic: GicConfig,
    /// Base of host RAM the driver allocates tables from.
    pub ram_base: u64,
    /// Size of that RAM.
    pub ram_size: usize,
    /// Maximum reads of a busy/dirty bit before a poll gives up (the model's latency is a
    /// few reads; Linux uses ~1 s of 1 µs polls).
    pub poll_limit: u32,
}

impl Default for HostParams {
    fn default() -> Self {
        HostParams {
            gic: GicConfig::virt_v41(4, 1),
            ram_base: 0x4000_0000,
            ram_size: 32 << 20,
            poll_limit: 1000,
        }
    }
}

/// What the driver probed from the GIC's ID registers at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Number of PEs / redistributors.
    pub pes: usize,
    /// Number of ITSs.
    pub its: usize,
    /// GICR_TYPER.VLPIS && RVPEID && GITS_TYPER.VMAPP.
    pub v41: bool,
    /// GICD_TYPER2.nASSGIcap && GITS_TYPER.VSGI: vSGIs can be used.
    pub vsgi: bool,
    /// GICR_TYPER.Dirty: poll VPENDBASER.Dirty after a load.
    pub dirty: bool,
    /// GITS_TYPER.VMOVP on every ITS (no ITSList / sequence numbers).
    pub vmovp: bool,
    /// vPEID bits (GICD_TYPER2.VID + 1 when VIL, else 16).
    pub vpeid_bits: u8,
    /// LPI INTID bits (GICD_TYPER.IDbits + 1).
    pub lpi_bits: u8,
    /// RD_base of each redistributor.
    pub rd_base: Vec<u64>,
    /// ITS_base of each ITS.
    pub its_base: Vec<u64>,
    /// CommonLPIAff group key of each redistributor (Linux `compute_common_aff`).
    pub rd_group: Vec<u32>,
    /// ITS_Number of each ITS (used in VMOVP ITSLists when VMOVP = 0).
    pub its_number: Vec<u8>,
    /// Index of the vPE table each redistributor uses.
    pub rd_table: Vec<usize>,
    /// Index of the vPE table each ITS uses.
    pub its_table: Vec<usize>,
}

/// Host-side LPI configuration written for every allocated LPI: priority 0xA0, Group 1,
/// enabled.
pub const HOST_LPI_CONFIG: u8 = 0xA0 | LPI_PROP_GROUP1 | LPI_PROP_ENABLE;
/// Page size the driver uses for every ITS / vPE table (probed down from 64 KiB like Linux).
pub const TABLE_PAGE: u64 = 0x1_0000;

/// One vPE configuration table (level 1 of an indirect table, or a flat table).
#[derive(Debug, Clone)]
struct VpeTable {
    base: u64,
    indirect: bool,
    l2: BTreeMap<u64, u64>,
}

#[derive(Debug)]
struct Inner {
    next: u64,
    end: u64,
    next_lpi: u32,
    next_vpeid: u32,
    tables: Vec<VpeTable>,
}

#[derive(Debug)]
struct Queue {
    base: u64,
    slot: u64,
    entries: u64,
}

/// The host GIC driver. Every method takes `&self`: state is behind locks so vCPU threads
/// can call in concurrently, as on Linux.
#[derive(Debug)]
pub struct Host {
    gic: Mutex<Gic<VecMem>>,
    inner: Mutex<Inner>,
    queues: Vec<Mutex<Queue>>,
    rd_locks: Vec<Mutex<()>>,
    info: HostInfo,
    prop: u64,
    poll_limit: u32,
}

fn group_key(aff: u32, common: u32) -> u32 {
    aff & !(0xFFFF_FFFFu32 >> (common.min(3) * 8))
}

impl Host {
    /// Builds the model described by `p.gic` and boots it.
    pub fn boot(p: HostParams) -> Result<Host, HypError> {
        let gic = Gic::new(p.gic.clone(), VecMem::new(p.ram_base, p.ram_size))?;
        let pes = p.gic.num_pes();
        let rd_base: Vec<u64> = (0..pes).map(|i| p.gic.rd_base(i)).collect();
        let its_base: Vec<u64> = p.gic.its.iter().map(|i| i.base).collect();
        let mut h = Host {
            gic: Mutex::new(gic),
            inner: Mutex::new(Inner {
                next: p.ram_base,
                end: p.ram_base + p.ram_size as u64,
                next_lpi: LPI_BASE,
                next_vpeid: 0,
                tables: Vec::new(),
            }),
            queues: Vec::new(),
            rd_locks: (0..pes).map(|_| Mutex::new(())).collect(),
            info: HostInfo {
                pes,
                its: its_base.len(),
                v41: false,
                vsgi: false,
                dirty: false,
                vmovp: true,
                vpeid_bits: 16,
                lpi_bits: 16,
                rd_base,
                its_base,
                rd_group: Vec::new(),
                its_number: Vec::new(),
                rd_table: Vec::new(),
                its_table: Vec::new(),
            },
            prop: 0,
            poll_limit: p.poll_limit,
        };
        h.probe_and_init()?;
        Ok(h)
    }

    /// What was probed at boot.
    pub fn info(&self) -> &HostInfo {
        &self.info
    }

    /// The model, locked (tests and the simulation inspect it; the driver itself only uses
    /// [`Host::read`] / [`Host::write`] / memory).
    pub fn gic(&self) -> MutexGuard<'_, Gic<VecMem>> {
        lock(&self.gic)
    }

    /// An MMIO read.
    pub fn read(&self, addr: u64, width: u8) -> Result<u64, HypError> {
        self.gic()
            .read(addr, width)
            .map_err(|source| HypError::Mmio { addr, source })
    }

    /// An MMIO write.
    pub fn write(&self, addr: u64, width: u8, value: u64) -> Result<(), HypError> {
        self.gic()
            .write(addr, width, value)
            .map_err(|source| HypError::Mmio { addr, source })
    }

    /// Writes host memory (tables the driver owns).
    pub fn mem_write(&self, addr: u64, data: &[u8]) -> Result<(), HypError> {
        self.gic()
            .mem_mut()
            .write(addr, data)
            .map_err(|_| HypError::OutOfMemory(data.len() as u64))
    }

    /// Reads host memory.
    pub fn mem_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), HypError> {
        self.gic()
            .mem()
            .read(addr, buf)
            .map_err(|_| HypError::OutOfMemory(buf.len() as u64))
    }

    /// Allocates `size` bytes of zeroed host memory aligned to `align` (a power of two).
    pub fn alloc(&self, size: u64, align: u64) -> Result<u64, HypError> {
        if !align.is_power_of_two() {
            return Err(HypError::Invalid("alignment must be a power of two"));
        }
        let mut inner = lock(&self.inner);
        let at = inner
            .next
            .checked_add(align - 1)
            .ok_or(HypError::OutOfMemory(size))?
            & !(align - 1);
        let end = at.checked_add(size).ok_or(HypError::OutOfMemory(size))?;
        if end > inner.end {
            return Err(HypError::OutOfMemory(size));
        }
        inner.next = end;
        Ok(at)
    }

    /// Allocates `n` consecutive host LPIs, enabled in the host property table with
    /// [`HOST_LPI_CONFIG`].
    pub fn alloc_lpis(&self, n: u32) -> Result<u32, HypError> {
        let base = {
            let mut inner = lock(&self.inner);
            let base = inner.next_lpi;
            let end = base as u64 + n as u64;
            if end > 1u64 << self.info.lpi_bits {
                return Err(HypError::Exhausted("LPI"));
            }
            inner.next_lpi = end as u32;
            base
        };
        let cfg = vec![HOST_LPI_CONFIG; n as usize];
        self.mem_write(self.prop + (base - LPI_BASE) as u64, &cfg)?;
        Ok(base)
    }

    /// Rewrites a host LPI's configuration byte (followed by an invalidation by the caller).
    pub fn set_lpi_config(&self, lpi: u32, byte: u8) -> Result<(), HypError> {
        let off = lpi
            .checked_sub(LPI_BASE)
            .ok_or(HypError::Invalid("not an LPI"))?;
        self.mem_write(self.prop + off as u64, &[byte])
    }

    /// Allocates a vPEID (< 2^vPEID bits).
    pub fn alloc_vpeid(&self) -> Result<u32, HypError> {
        let mut inner = lock(&self.inner);
        let id = inner.next_vpeid;
        if (id as u64) >> self.info.vpeid_bits != 0 {
            return Err(HypError::Exhausted("vPEID"));
        }
        inner.next_vpeid += 1;
        Ok(id)
    }

    /// The lock of redistributor `pe` (invalidation + SYNCR, VSGIR + VSGIPENDR).
    pub fn rd_lock(&self, pe: usize) -> Result<MutexGuard<'_, ()>, HypError> {
        self.rd_locks
            .get(pe)
            .map(lock)
            .ok_or(HypError::NoSuchPcpu(pe))
    }

    /// RD_base of `pe`.
    pub fn rd(&self, pe: usize) -> Result<u64, HypError> {
        self.info
            .rd_base
            .get(pe)
            .copied()
            .ok_or(HypError::NoSuchPcpu(pe))
    }

    /// VLPI_base of `pe`.
    pub fn vlpi(&self, pe: usize) -> Result<u64, HypError> {
        Ok(self.rd(pe)? + GICR_VLPI_OFFSET)
    }

    /// Whether redistributors `a` and `b` use the same vPE table (VMOVP unnecessary).
    pub fn share_vpe_table(&self, a: usize, b: usize) -> bool {
        self.info.rd_table.get(a).is_some()
            && self.info.rd_table.get(a) == self.info.rd_table.get(b)
    }

    /// Reads a register until `done` holds, at most `poll_limit` times.
    pub fn poll(
        &self,
        addr: u64,
        width: u8,
        what: &'static str,
        done: impl Fn(u64) -> bool,
    ) -> Result<u64, HypError> {
        for _ in 0..self.poll_limit {
            let v = self.read(addr, width)?;
            if done(v) {
                return Ok(v);
            }
        }
        Err(HypError::Timeout(what))
    }

    /// Submits `cmds` to ITS `its` and waits until GITS_CREADR has consumed them. Returns
    /// the first error the ITS recorded for them.
    pub fn its_cmds(&self, its: usize, cmds: &[ItsCommand]) -> Result<(), HypError> {
        let base = *self
            .info
            .its_base
            .get(its)
            .ok_or(HypError::Invalid("no such ITS"))?;
        let q = self
            .queues
            .get(its)
            .ok_or(HypError::Invalid("no such ITS"))?;
        let mut q = lock(q);
        let before = self.gic().its_errors(its).map_or(0, |e| e.1);
        let mut chunk_start = 0;
        while chunk_start < cmds.len() {
            // Never fill the ring: at most entries - 1 commands in flight.
            let chunk = &cmds[chunk_start..cmds.len().min(chunk_start + q.entries as usize - 1)];
            {
                let mut g = self.gic();
                for c in chunk {
                    g.mem_mut()
                        .write(q.base + q.slot * ITS_CMD_SIZE, &c.to_bytes())
                        .map_err(|_| HypError::OutOfMemory(ITS_CMD_SIZE))?;
                    q.slot = (q.slot + 1) % q.entries;
                }
            }
            let target = q.slot * ITS_CMD_SIZE;
            self.write(base + GITS_CWRITER, 8, target)?;
            self.poll(base + GITS_CREADR, 8, "GITS_CREADR", |v| {
                v & GITS_CMDQ_OFFSET_MASK == target || v & GITS_CREADR_STALLED != 0
            })?;
            chunk_start += chunk.len();
        }
        let g = self.gic();
        if let Some((recs, count)) = g.its_errors(its) {
            if count > before {
                let first_new = recs.len().saturating_sub((count - before) as usize);
                if let Some(r) = recs.get(first_new) {
                    return Err(HypError::Command {
                        its,
                        error: r.error,
                    });
                }
            }
        }
        Ok(())
    }

    /// Maps a device on ITS `its` with an ITT for `event_bits` EventID bits.
    pub fn map_device(&self, its: usize, device: u32, event_bits: u8) -> Result<u64, HypError> {
        if !(1..=20).contains(&event_bits) {
            return Err(HypError::Invalid("EventID bits must be 1..=20"));
        }
        let itt = self.alloc(16u64 << event_bits, 256)?;
        self.its_cmds(
            its,
            &[
                ItsCommand::Mapd {
                    device,
                    size: event_bits.saturating_sub(1),
                    itt,
                    valid: true,
                },
                ItsCommand::Sync { rdbase: 0 },
            ],
        )?;
        Ok(itt)
    }

    /// Maps an event to host LPI `lpi` targeting PE `pe` (collection `pe`).
    pub fn map_host_lpi(
        &self,
        its: usize,
        device: u32,
        event: u32,
        lpi: u32,
        pe: usize,
    ) -> Result<(), HypError> {
        self.its_cmds(
            its,
            &[
                ItsCommand::Mapti {
                    device,
                    event,
                    intid: lpi,
                    icid: pe as u16,
                },
                ItsCommand::Inv { device, event },
                ItsCommand::Sync { rdbase: pe as u64 },
            ],
        )
    }

    /// Takes one physical interrupt on PE `pe` (ICC_IAR1 + ICC_EOIR1), if any.
    pub fn take_irq(&self, pe: usize) -> Option<u32> {
        let mut g = self.gic();
        let i = g.icc_read(pe, IccReg::Iar1).ok()? as u32;
        if i == INTID_SPURIOUS {
            return None;
        }
        let _ = g.icc_write(pe, IccReg::Eoir1, i as u64);
        Some(i)
    }

    /// Makes sure vPEID `vpeid` has a level-2 page in every vPE table (every ITS's and every
    /// redistributor group's): Linux `its_alloc_vpe_table`.
    pub fn populate_vpe(&self, vpeid: u32) -> Result<(), HypError> {
        let per_page = TABLE_PAGE / VPE_ENTRY_SIZE;
        let l1 = vpeid as u64 / per_page;
        let ntables = lock(&self.inner).tables.len();
        for t in 0..ntables {
            let (base, indirect, have) = {
                let inner = lock(&self.inner);
                let tb = &inner.tables[t];
                (tb.base, tb.indirect, tb.l2.contains_key(&l1))
            };
            if !indirect || have {
                continue;
            }
            let page = self.alloc(TABLE_PAGE, TABLE_PAGE)?;
            self.mem_write(base + l1 * 8, &(page | GITS_L1E_VALID).to_le_bytes())?;
            lock(&self.inner).tables[t].l2.insert(l1, page);
        }
        Ok(())
    }

    fn probe_and_init(&mut self) -> Result<(), HypError> {
        let gicd = self.gic().config().gicd_base;
        let typer = self.read(gicd + GICD_TYPER, 4)?;
        self.info.lpi_bits = (((typer >> 19) & 0x1F) + 1) as u8;
        let typer2 = self.read(gicd + GICD_TYPER2, 4)? as u32;
        let mut rd_v41 = true;
        let mut dirty = true;
        let mut affs = Vec::new();
        let mut commons = Vec::new();
        for pe in 0..self.info.pes {
            let t = self.read(self.rd(pe)? + GICR_TYPER, 8)?;
            rd_v41 &= t & GICR_TYPER_VLPIS != 0 && t & GICR_TYPER_RVPEID != 0;
            dirty &= t & GICR_TYPER_DIRTY != 0;
            affs.push((t >> 32) as u32);
            commons.push(((t >> GICR_TYPER_COMMONLPIAFF_SHIFT) & 3) as u32);
        }
        let mut its_v41 = self.info.its > 0;
        let mut its_vsgi = true;
        let mut vmovp = true;
        let mut svpet = Vec::new();
        for &b in &self.info.its_base {
            let t = self.read(b + GITS_TYPER, 8)?;
            its_v41 &= t & GITS_TYPER_VMAPP != 0 && t & GITS_TYPER_VIRTUAL != 0;
            its_vsgi &= t & GITS_TYPER_VSGI != 0;
            vmovp &= t & GITS_TYPER_VMOVP != 0;
            svpet.push(((t >> GITS_TYPER_SVPET_SHIFT) & 3) as u32);
        }
        self.info.v41 = rd_v41 && its_v41;
        self.info.vsgi = self.info.v41 && typer2 & GICD_TYPER2_NASSGICAP != 0 && its_vsgi;
        self.info.dirty = dirty;
        self.info.vmovp = vmovp;
        self.info.vpeid_bits = if rd_v41 && typer2 & GICD_TYPER2_VIL != 0 {
            ((typer2 & GICD_TYPER2_VID_MASK) + 1) as u8
        } else {
            16
        };
        self.info.rd_group = affs
            .iter()
            .zip(&commons)
            .map(|(a, c)| group_key(*a, *c))
            .collect();

        // Host LPI property table and per-RD pending tables.
        let lpis = 1u64 << self.info.lpi_bits;
        self.prop = self.alloc(lpis - LPI_BASE as u64, 0x1000)?;
        self.write(gicd + GICD_CTLR, 4, GICD_CTLR_ENABLE_G1 as u64)?;
        for pe in 0..self.info.pes {
            let rd = self.rd(pe)?;
            let pend = self.alloc(lpis / 8, 0x1_0000)?;
            self.write(rd + GICR_WAKER, 4, 0)?;
            self.write(
                rd + GICR_PROPBASER,
                8,
                self.prop | (self.info.lpi_bits as u64 - 1),
            )?;
            self.write(rd + GICR_PENDBASER, 8, pend | GICR_PENDBASER_PTZ)?;
            self.write(rd + GICR_CTLR, 4, GICR_CTLR_ENABLE_LPIS as u64)?;
            let mut g = self.gic();
            let _ = g.icc_write(pe, IccReg::Pmr, 0xFF);
            let _ = g.icc_write(pe, IccReg::Igrpen1, 1);
        }

        // vPE tables: one per sharing group, ITSs with SVPET reuse a sibling's.
        let entries = 1u64 << self.info.vpeid_bits;
        let indirect = entries * VPE_ENTRY_SIZE > TABLE_PAGE;
        let mut its_table = Vec::new();
        let mut rd_table: Vec<usize> = Vec::new();
        if self.info.v41 {
            let new_table = |h: &Host| -> Result<usize, HypError> {
                let base = h.alloc(TABLE_PAGE, TABLE_PAGE)?;
                let mut inner = lock(&h.inner);
                inner.tables.push(VpeTable {
                    base,
                    indirect,
                    l2: BTreeMap::new(),
                });
                Ok(inner.tables.len() - 1)
            };
            // ITSs: an ITS with SVPET != 0 shares with its SVPET siblings (all claim
            // affinity 0 in GITS_MPIDR in this model, so they all match).
            let mut shared_its: Option<usize> = None;
            for s in &svpet {
                let t = match (s, shared_its) {
                    (0, _) => new_table(self)?,
                    (_, Some(t)) => t,
                    (_, None) => {
                        let t = new_table(self)?;
                        shared_its = Some(t);
                        t
                    }
                };
                its_table.push(t);
            }
            // RDs: inherit from an earlier RD of the same group, else from an SVPET ITS
            // whose affinity key matches, else allocate.
            for pe in 0..self.info.pes {
                let key = self.info.rd_group[pe];
                let t = if let Some(j) = (0..pe).find(|&j| self.info.rd_group[j] == key) {
                    rd_table[j]
                } else if let Some(i) =
                    (0..svpet.len()).find(|&i| svpet[i] != 0 && group_key(0, svpet[i]) == key)
                {
                    its_table[i]
                } else {
                    new_table(self)?
                };
                rd_table.push(t);
            }
        }
        self.info.its_table = its_table.clone();
        self.info.rd_table = rd_table.clone();

        for (pe, &t) in rd_table.iter().enumerate() {
            let base = lock(&self.inner).tables[t].base;
            let v = VPROPBASER_VALID
                | if indirect { VPROPBASER_INDIRECT } else { 0 }
                | (2 << VPROPBASER_PAGE_SIZE_SHIFT)
                | base;
            self.write(self.vlpi(pe)? + GICR_VPROPBASER, 8, v)?;
        }

        // ITSs: device, collection (and vPE) tables, command queue, enable, collections.
        for i in 0..self.info.its {
            let b = self.info.its_base[i];
            let dt = self.alloc(TABLE_PAGE, TABLE_PAGE)?;
            let ct = self.alloc(TABLE_PAGE, TABLE_PAGE)?;
            let cq = self.alloc(TABLE_PAGE, TABLE_PAGE)?;
            self.write(b + GITS_BASER, 8, GITS_BASER_VALID | (2 << 8) | dt)?;
            self.write(b + GITS_BASER + 8, 8, GITS_BASER_VALID | (2 << 8) | ct)?;
            if let Some(&t) = its_table.get(i) {
                let base = lock(&self.inner).tables[t].base;
                let v = GITS_BASER_VALID
                    | if indirect { GITS_BASER_INDIRECT } else { 0 }
                    | (2 << 8)
                    | base;
                self.write(b + GITS_BASER + 16, 8, v)?;
            }
            self.write(b + GITS_CBASER, 8, GITS_CBASER_VALID | 0xF | cq)?;
            self.write(b + GITS_CWRITER, 8, 0)?;
            // Without VMOVP, assign ITS numbers by write and read-back.
            let mut ctlr = GITS_CTLR_ENABLED as u64;
            if !self.info.vmovp {
                ctlr |= ((i as u64) & 0xF) << GITS_CTLR_ITS_NUMBER_SHIFT;
            }
            self.write(b + GITS_CTLR, 4, ctlr)?;
            let read = self.read(b + GITS_CTLR, 4)?;
            self.info
                .its_number
                .push(((read >> GITS_CTLR_ITS_NUMBER_SHIFT) & 0xF) as u8);
            self.queues.push(Mutex::new(Queue {
                base: cq,
                slot: 0,
                entries: 16 * 0x1000 / ITS_CMD_SIZE,
            }));
            let maps: Vec<ItsCommand> = (0..self.info.pes)
                .map(|pe| ItsCommand::Mapc {
                    icid: pe as u16,
                    rdbase: pe as u64,
                    valid: true,
                })
                .chain((0..self.info.pes).map(|pe| ItsCommand::Invall { icid: pe as u16 }))
                .collect();
            self.its_cmds(i, &maps)?;
        }
        Ok(())
    }
}
