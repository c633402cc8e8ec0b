//! One VM's vPEs: what KVM's `vgic-v4.c` asks of Linux's GICv4.1 driver.
//!
//! - creation: a vPEID, a zeroed VPT and one doorbell LPI per vCPU, one vLPI property table
//!   (VConf) per VM; every vPE mapped on every ITS with VMAPP + VINVALL at once (Alloc on the
//!   first map) so vSGIs always work; doorbells left enabled ("GICv4.1 understands the life
//!   cycle of doorbells").
//! - residency: `vcpu_load` re-targets the vPE (VMOVP unless the redistributors share the vPE
//!   table), writes GICR_VPENDBASER and waits for Dirty (COMMIT_VPE); `vcpu_put` requests the
//!   doorbell only when the vCPU blocks and records PendingLast under the vPE lock.
//! - vLPIs: DISCARD + VMAPTI (doorbell 1023 on v4.1), VMOVI, back to a host LPI; register
//!   based INVLPIR/INVALLR with V = 1 under the vPE and redistributor locks, waiting on SYNCR.
//! - vSGIs: VSGI for configuration and clearing, GITS_SGIR for pending, GICR_VSGIR /
//!   GICR_VSGIPENDR for read-back.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use gic::regs::*;
use gic::ItsCommand;
use serde::{Deserialize, Serialize};

use crate::host::Host;
use crate::{lock, HypError};

/// How a non-resident vPE gets its attention back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DoorbellStyle {
    /// GICv4.1: the vPE's default doorbell, requested in VPENDBASER.DB when the vCPU blocks,
    /// delivered at most once per non-residency phase.
    PerVpe,
    /// GICv4.0 style: every vLPI carries the vCPU's doorbell as an individual doorbell
    /// (VMAPTI/VMOVI), raised on every vLPI that arrives while the vPE is not resident.
    PerVlpi,
}

/// Parameters of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmParams {
    /// Number of vCPUs (vPEs).
    pub vcpus: usize,
    /// vINTID bits of the vLPI space (VMAPP VPT_size + 1), 14..=16.
    pub vlpi_bits: u8,
    /// Doorbell scheme.
    pub doorbells: DoorbellStyle,
}

impl Default for VmParams {
    fn default() -> Self {
        VmParams {
            vcpus: 4,
            vlpi_bits: 14,
            doorbells: DoorbellStyle::PerVpe,
        }
    }
}

/// vSGI configuration as the VSGI command carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgiConfig {
    /// Enabled.
    pub enabled: bool,
    /// Group 1.
    pub group1: bool,
    /// Priority (bits \[7:4\] reach the GIC).
    pub priority: u8,
}

/// Driver-side state of one vPE (Linux `struct its_vpe`), behind its `vpe_lock`.
#[derive(Debug, Clone)]
struct Vpe {
    vpeid: u32,
    /// Redistributor the vPE is mapped to (`col_idx`).
    col_idx: usize,
    vpt: u64,
    db: u32,
    resident: bool,
    /// Set by put (read back from VPENDBASER) and by the doorbell handler.
    pending_last: bool,
    sgi: [SgiConfig; 16],
}

/// A vLPI mapping of a device event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VlpiMap {
    vcpu: usize,
    vintid: u32,
    host_lpi: u32,
    host_pe: usize,
}

/// A VM's vPEs on a GICv4.1 host.
#[derive(Debug)]
pub struct Vm {
    host: Arc<Host>,
    params: VmParams,
    vpes: Vec<Mutex<Vpe>>,
    vconf: u64,
    db_base: u32,
    /// Serialises VMAPP/VMOVP for this VM (Linux's per-VM `vmapp_lock`).
    vmapp_lock: Mutex<()>,
    vlpis: Mutex<BTreeMap<(usize, u32, u32), VlpiMap>>,
}

impl Vm {
    /// Allocates the VM's vPEs and maps every one on every ITS (VMAPP + VINVALL), then
    /// configures its 16 vSGIs as disabled, priority 0, Group 0 (the vSGI domain's
    /// activation).
    pub fn create(host: Arc<Host>, params: VmParams) -> Result<Vm, HypError> {
        if !host.info().v41 {
            return Err(HypError::NotV41);
        }
        if !(14..=host.info().lpi_bits).contains(&params.vlpi_bits) || params.vcpus == 0 {
            return Err(HypError::Invalid("vLPI bits or vCPU count"));
        }
        let vlpis = 1u64 << params.vlpi_bits;
        let vconf = host.alloc(vlpis - LPI_BASE as u64, 0x1_0000)?;
        // vLPIs start disabled with a default priority, Group 1.
        let cfg = vec![0xA0 | LPI_PROP_GROUP1; (vlpis - LPI_BASE as u64) as usize];
        host.mem_write(vconf, &cfg)?;
        let db_base = host.alloc_lpis(params.vcpus as u32)?;
        let mut vpes = Vec::new();
        for i in 0..params.vcpus {
            let vpeid = host.alloc_vpeid()?;
            host.populate_vpe(vpeid)?;
            let vpt = host.alloc(vlpis / 8, 0x1_0000)?;
            vpes.push(Mutex::new(Vpe {
                vpeid,
                col_idx: i % host.info().pes,
                vpt,
                db: db_base + i as u32,
                resident: false,
                pending_last: false,
                sgi: [SgiConfig::default(); 16],
            }));
        }
        let vm = Vm {
            host,
            params,
            vpes,
            vconf,
            db_base,
            vmapp_lock: Mutex::new(()),
            vlpis: Mutex::new(BTreeMap::new()),
        };
        for i in 0..vm.vpes.len() {
            if params.doorbells == DoorbellStyle::PerVlpi {
                let db = lock(vm.vpe(i)?).db;
                vm.set_v40_doorbell(db, false)?;
            }
            vm.map_everywhere(i, true)?;
            if vm.host.info().vsgi {
                for sgi in 0..16 {
                    vm.vsgi_configure(i, sgi, SgiConfig::default())?;
                }
            }
        }
        Ok(vm)
    }

    /// The host.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Parameters the VM was created with.
    pub fn params(&self) -> VmParams {
        self.params
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vpes.len()
    }

    /// vPEID of `vcpu`.
    pub fn vpeid(&self, vcpu: usize) -> Result<u32, HypError> {
        Ok(lock(self.vpe(vcpu)?).vpeid)
    }

    /// Doorbell LPI of `vcpu`.
    pub fn doorbell(&self, vcpu: usize) -> Result<u32, HypError> {
        Ok(lock(self.vpe(vcpu)?).db)
    }

    /// The redistributor `vcpu`'s vPE is mapped to.
    pub fn col_idx(&self, vcpu: usize) -> Result<usize, HypError> {
        Ok(lock(self.vpe(vcpu)?).col_idx)
    }

    /// The VM's vLPI property table.
    pub fn vconf(&self) -> u64 {
        self.vconf
    }

    fn vpe(&self, vcpu: usize) -> Result<&Mutex<Vpe>, HypError> {
        self.vpes.get(vcpu).ok_or(HypError::NoSuchVcpu(vcpu))
    }

    fn vmapp_cmd(&self, v: &Vpe, valid: bool, alloc: bool) -> ItsCommand {
        ItsCommand::Vmapp {
            vpeid: v.vpeid,
            rdbase: v.col_idx as u64,
            valid,
            alloc,
            // Linux never sets PTZ on v4.1: a re-mapped VPT may hold state.
            ptz: false,
            vconf: self.vconf,
            default_db: v.db,
            vpt: v.vpt,
            vpt_size: self.params.vlpi_bits - 1,
        }
    }

    /// VMAPP (V = 1) + VINVALL + VSYNC on every ITS; Alloc on the first. Then INVDB so the
    /// doorbell's configuration is current everywhere.
    fn map_everywhere(&self, vcpu: usize, valid: bool) -> Result<(), HypError> {
        let _m = lock(&self.vmapp_lock);
        let v = lock(self.vpe(vcpu)?);
        let n = self.host.info().its;
        for its in 0..n {
            let alloc = if valid { its == 0 } else { its + 1 == n };
            let mut cmds = vec![self.vmapp_cmd(&v, valid, alloc)];
            if valid {
                cmds.push(ItsCommand::Vinvall { vpeid: v.vpeid });
                cmds.push(ItsCommand::Vsync { vpeid: v.vpeid });
            }
            self.host.its_cmds(its, &cmds)?;
        }
        if valid {
            self.host.its_cmds(
                0,
                &[
                    ItsCommand::Invdb { vpeid: v.vpeid },
                    ItsCommand::Sync {
                        rdbase: v.col_idx as u64,
                    },
                ],
            )?;
        }
        Ok(())
    }

    /// Unmaps every vPE from every ITS (VMAPP V = 0, Alloc on the last).
    pub fn destroy(self) -> Result<(), HypError> {
        for i in 0..self.vpes.len() {
            if lock(self.vpe(i)?).resident {
                self.vcpu_put(i, false)?;
            }
            self.map_everywhere(i, false)?;
        }
        Ok(())
    }

    /// Moves `vcpu`'s vPE to redistributor `pcpu` (Linux `its_vpe_set_affinity`): nothing if
    /// already there, no VMOVP if both redistributors share the vPE table. Returns whether a
    /// VMOVP was sent.
    pub fn set_affinity(&self, vcpu: usize, pcpu: usize) -> Result<bool, HypError> {
        if pcpu >= self.host.info().pes {
            return Err(HypError::NoSuchPcpu(pcpu));
        }
        let _m = lock(&self.vmapp_lock);
        let mut v = lock(self.vpe(vcpu)?);
        if v.col_idx == pcpu {
            return Ok(false);
        }
        let from = v.col_idx;
        v.col_idx = pcpu;
        if self.host.share_vpe_table(from, pcpu) {
            return Ok(false);
        }
        let info = self.host.info();
        let its_list = info
            .its_number
            .iter()
            .fold(0u16, |acc, n| acc | (1 << (*n & 0xF)));
        let cmd = ItsCommand::Vmovp {
            vpeid: v.vpeid,
            rdbase: pcpu as u64,
            seq: 0,
            its_list,
            db_valid: true,
            default_db: v.db,
        };
        if info.vmovp {
            self.host
                .its_cmds(0, &[cmd, ItsCommand::Vsync { vpeid: v.vpeid }])?;
        } else {
            // Every ITS gets the same VMOVP (v4.1 maps every vPE everywhere).
            for its in 0..info.its {
                self.host
                    .its_cmds(its, &[cmd, ItsCommand::Vsync { vpeid: v.vpeid }])?;
            }
        }
        Ok(true)
    }

    /// vcpu_load: re-target to `pcpu`, make resident with vGrp1En = `g1en`, then wait for
    /// the VPT parse (Dirty). Returns whether a VMOVP was sent.
    pub fn vcpu_load(&self, vcpu: usize, pcpu: usize, g1en: bool) -> Result<bool, HypError> {
        let moved = self.vcpu_load_no_commit(vcpu, pcpu, g1en)?;
        self.vcpu_commit(vcpu)?;
        Ok(moved)
    }

    /// vcpu_load without the COMMIT_VPE wait (the guest must not be entered before
    /// [`Vm::vcpu_commit`]).
    pub fn vcpu_load_no_commit(
        &self,
        vcpu: usize,
        pcpu: usize,
        g1en: bool,
    ) -> Result<bool, HypError> {
        let moved = self.set_affinity(vcpu, pcpu)?;
        let mut v = lock(self.vpe(vcpu)?);
        if v.resident {
            return Err(HypError::Invalid("vCPU already loaded"));
        }
        let val = VPENDBASER_VALID | if g1en { VPENDBASER_VGRP1EN } else { 0 } | v.vpeid as u64;
        if self.params.doorbells == DoorbellStyle::PerVlpi {
            // GICv4.0: the doorbell is only wanted while blocked; drop a stale one.
            self.set_v40_doorbell(v.db, false)?;
        }
        self.host
            .write(self.host.vlpi(pcpu)? + GICR_VPENDBASER, 8, val)?;
        v.resident = true;
        v.pending_last = false;
        Ok(moved)
    }

    /// GICv4.0-style doorbell mask/unmask: rewrite the doorbell LPI's enable bit and
    /// invalidate it at every redistributor (GICv4.0 has no INVDB; DirectLPI's INVLPIR does
    /// the job). Masking also clears a doorbell left pending.
    fn set_v40_doorbell(&self, db: u32, enabled: bool) -> Result<(), HypError> {
        let byte = crate::host::HOST_LPI_CONFIG & if enabled { 0xFF } else { !LPI_PROP_ENABLE };
        self.host.set_lpi_config(db, byte)?;
        for pe in 0..self.host.info().pes {
            let rd = self.host.rd(pe)?;
            let _rd = self.host.rd_lock(pe)?;
            self.host.write(rd + GICR_INVLPIR, 8, db as u64)?;
            if !enabled {
                self.host.write(rd + GICR_CLRLPIR, 8, db as u64)?;
            }
        }
        Ok(())
    }

    /// COMMIT_VPE: poll VPENDBASER.Dirty until the redistributor has parsed the VPT (only
    /// when GICR_TYPER.Dirty says it reports that).
    pub fn vcpu_commit(&self, vcpu: usize) -> Result<(), HypError> {
        if !self.host.info().dirty {
            return Ok(());
        }
        let pe = lock(self.vpe(vcpu)?).col_idx;
        self.host.poll(
            self.host.vlpi(pe)? + GICR_VPENDBASER,
            8,
            "VPENDBASER.Dirty after load",
            |r| r & VPENDBASER_DIRTY == 0,
        )?;
        Ok(())
    }

    /// vcpu_put: make non-resident. With `blocking` (the vCPU is in WFI) and per-vPE
    /// doorbells, request the doorbell (DB = 1, PendingLast = 0); otherwise write
    /// PendingLast = 1 ("we'll be back"). Returns the recorded pending state: PendingLast as
    /// read back once Dirty clears, forced to true for a non-blocking v4.1 put (Linux).
    pub fn vcpu_put(&self, vcpu: usize, blocking: bool) -> Result<bool, HypError> {
        let mut v = lock(self.vpe(vcpu)?);
        if !v.resident {
            return Ok(v.pending_last);
        }
        let a = self.host.vlpi(v.col_idx)? + GICR_VPENDBASER;
        let cur = self.host.read(a, 8)?;
        let want_db = blocking && self.params.doorbells == DoorbellStyle::PerVpe;
        let mut n = cur & !(VPENDBASER_VALID | VPENDBASER_PENDING_LAST | VPENDBASER_DB);
        n |= if want_db {
            VPENDBASER_DB
        } else {
            VPENDBASER_PENDING_LAST
        };
        self.host.write(a, 8, n)?;
        let r = match self.host.poll(a, 8, "VPENDBASER.Dirty after put", |r| {
            r & VPENDBASER_DIRTY == 0
        }) {
            Ok(r) => r,
            // Linux logs and pretends PendingLast = 1.
            Err(_) => VPENDBASER_PENDING_LAST,
        };
        v.resident = false;
        if blocking && self.params.doorbells == DoorbellStyle::PerVlpi {
            self.set_v40_doorbell(v.db, true)?;
        }
        // v4.1 without a doorbell: "we'll be back", the vCPU is not going to sleep.
        v.pending_last = r & VPENDBASER_PENDING_LAST != 0
            || (!blocking && self.params.doorbells == DoorbellStyle::PerVpe);
        Ok(v.pending_last)
    }

    /// Whether `vcpu` is resident.
    pub fn is_resident(&self, vcpu: usize) -> Result<bool, HypError> {
        Ok(lock(self.vpe(vcpu)?).resident)
    }

    /// KVM's `kvm_vgic_vcpu_pending_irq` for the GICv4 part: PendingLast as recorded at put
    /// or set by the doorbell.
    pub fn vcpu_pending(&self, vcpu: usize) -> Result<bool, HypError> {
        Ok(lock(self.vpe(vcpu)?).pending_last)
    }

    /// The doorbell handler: if `lpi` is one of this VM's doorbells, record that the vCPU
    /// has work (under its vPE lock) and return the vCPU to wake.
    pub fn handle_doorbell(&self, lpi: u32) -> Option<usize> {
        let vcpu = lpi.checked_sub(self.db_base)? as usize;
        let m = self.vpes.get(vcpu)?;
        lock(m).pending_last = true;
        Some(vcpu)
    }

    /// Forwards device event (`its`, `device`, `event`), currently translated to host LPI
    /// `host_lpi` on PE `host_pe`, to `vcpu` as vINTID `vintid` with priority `prio`
    /// (Linux `its_vlpi_map`): first time DISCARD + VMAPTI, later VMOVI; then the vLPI's
    /// configuration and a register-based invalidation.
    #[allow(clippy::too_many_arguments)]
    pub fn map_vlpi(
        &self,
        vcpu: usize,
        its: usize,
        device: u32,
        event: u32,
        vintid: u32,
        host_lpi: u32,
        host_pe: usize,
        prio: u8,
    ) -> Result<(), HypError> {
        if !(LPI_BASE..(1u32 << self.params.vlpi_bits)).contains(&vintid) {
            return Err(HypError::Invalid("vINTID out of range"));
        }
        let (vpeid, db) = {
            let v = lock(self.vpe(vcpu)?);
            (v.vpeid, v.db)
        };
        let ind_db = match self.params.doorbells {
            DoorbellStyle::PerVpe => INTID_NO_DOORBELL,
            DoorbellStyle::PerVlpi => db,
        };
        let prev = lock(&self.vlpis).get(&(its, device, event)).copied();
        self.host.mem_write(
            self.vconf + (vintid - LPI_BASE) as u64,
            &[(prio & LPI_PROP_PRIORITY_MASK) | LPI_PROP_GROUP1 | LPI_PROP_ENABLE],
        )?;
        match prev {
            Some(p) if p.vintid == vintid => {
                let cmd = ItsCommand::Vmovi {
                    device,
                    event,
                    vpeid,
                    db_valid: true,
                    db: ind_db,
                };
                self.host
                    .its_cmds(its, &[cmd, ItsCommand::Vsync { vpeid }])?;
            }
            _ => {
                self.host.its_cmds(
                    its,
                    &[
                        ItsCommand::Discard { device, event },
                        ItsCommand::Vmapti {
                            device,
                            event,
                            vpeid,
                            vintid,
                            db: ind_db,
                        },
                        ItsCommand::Vsync { vpeid },
                    ],
                )?;
            }
        }
        lock(&self.vlpis).insert(
            (its, device, event),
            VlpiMap {
                vcpu,
                vintid,
                host_lpi,
                host_pe,
            },
        );
        self.inv_vlpi(vcpu, vintid)
    }

    /// Undoes [`Vm::map_vlpi`]: DISCARD, MAPTI back to the host LPI, vLPI disabled.
    pub fn unmap_vlpi(&self, its: usize, device: u32, event: u32) -> Result<(), HypError> {
        let Some(m) = lock(&self.vlpis).remove(&(its, device, event)) else {
            return Err(HypError::Invalid("event is not forwarded"));
        };
        self.host.its_cmds(
            its,
            &[
                ItsCommand::Discard { device, event },
                ItsCommand::Sync { rdbase: 0 },
            ],
        )?;
        self.host
            .map_host_lpi(its, device, event, m.host_lpi, m.host_pe)?;
        self.host.mem_write(
            self.vconf + (m.vintid - LPI_BASE) as u64,
            &[0xA0 | LPI_PROP_GROUP1],
        )?;
        self.inv_vlpi(m.vcpu, m.vintid)
    }

    /// Number of vLPIs forwarded to `vcpu` (KVM's `vlpi_count`).
    pub fn vlpi_count(&self, vcpu: usize) -> usize {
        lock(&self.vlpis)
            .values()
            .filter(|m| m.vcpu == vcpu)
            .count()
    }

    /// Changes a vLPI's configuration (enable, priority) and invalidates it.
    pub fn set_vlpi_config(
        &self,
        vcpu: usize,
        vintid: u32,
        enable: bool,
        prio: u8,
    ) -> Result<(), HypError> {
        let idx = vintid
            .checked_sub(LPI_BASE)
            .filter(|&i| (i as u64) < (1u64 << self.params.vlpi_bits) - LPI_BASE as u64)
            .ok_or(HypError::Invalid("vINTID out of range"))?;
        let byte = (prio & LPI_PROP_PRIORITY_MASK)
            | LPI_PROP_GROUP1
            | if enable { LPI_PROP_ENABLE } else { 0 };
        self.host.mem_write(self.vconf + idx as u64, &[byte])?;
        self.inv_vlpi(vcpu, vintid)
    }

    /// Register-based invalidation (`direct_lpi_inv`): vPE lock pins the redistributor,
    /// redistributor lock keeps a single invalidation in flight, then wait on SYNCR.
    fn inv_vlpi(&self, vcpu: usize, vintid: u32) -> Result<(), HypError> {
        let v = lock(self.vpe(vcpu)?);
        let val = GICR_INV_V | ((v.vpeid as u64) << GICR_INV_VPEID_SHIFT) | vintid as u64;
        self.rd_invalidate(v.col_idx, GICR_INVLPIR, val)
    }

    /// vPE-wide invalidation at the redistributor (`its_vpe_4_1_invall`), waiting for SYNCR
    /// ("Wait for completion of redistributor's INVALL operation").
    pub fn invall(&self, vcpu: usize) -> Result<(), HypError> {
        let v = lock(self.vpe(vcpu)?);
        let val = GICR_INV_V | ((v.vpeid as u64) << GICR_INV_VPEID_SHIFT);
        self.rd_invalidate(v.col_idx, GICR_INVALLR, val)
    }

    fn rd_invalidate(&self, pe: usize, reg: u64, val: u64) -> Result<(), HypError> {
        let _rd = self.host.rd_lock(pe)?;
        let rd = self.host.rd(pe)?;
        self.host.write(rd + reg, 8, val)?;
        self.host.poll(rd + GICR_SYNCR, 4, "GICR_SYNCR", |s| {
            s as u32 & GICR_SYNCR_BUSY == 0
        })?;
        Ok(())
    }

    /// Configures vSGI `sgi` of `vcpu` (VSGI with Clear = 0) on the first ITS.
    pub fn vsgi_configure(&self, vcpu: usize, sgi: u8, cfg: SgiConfig) -> Result<(), HypError> {
        if !self.host.info().vsgi {
            return Err(HypError::NoVsgi);
        }
        let mut v = lock(self.vpe(vcpu)?);
        let s = v
            .sgi
            .get_mut(sgi as usize)
            .ok_or(HypError::Invalid("SGI number"))?;
        *s = cfg;
        let vpeid = v.vpeid;
        self.host.its_cmds(
            0,
            &[
                ItsCommand::Vsgi {
                    vpeid,
                    sgi,
                    enable: cfg.enabled,
                    clear: false,
                    group1: cfg.group1,
                    priority: cfg.priority & 0xF0,
                },
                ItsCommand::Vsync { vpeid },
            ],
        )
    }

    /// The vSGI configuration last sent for `vcpu`.
    pub fn vsgi_config(&self, vcpu: usize, sgi: u8) -> Result<SgiConfig, HypError> {
        lock(self.vpe(vcpu)?)
            .sgi
            .get(sgi as usize)
            .copied()
            .ok_or(HypError::Invalid("SGI number"))
    }

    /// Makes vSGI `sgi` pending on `vcpu` with a GITS_SGIR write.
    pub fn vsgi_set_pending(&self, vcpu: usize, sgi: u8) -> Result<(), HypError> {
        if !self.host.info().vsgi || sgi > 15 {
            return Err(HypError::NoVsgi);
        }
        let vpeid = self.vpeid(vcpu)?;
        let base = self.host.info().its_base[0];
        self.host
            .write(base + GITS_SGIR, 8, ((vpeid as u64) << 32) | sgi as u64)
    }

    /// Clears vSGI `sgi`'s pending state (VSGI with Clear = 1).
    pub fn vsgi_clear_pending(&self, vcpu: usize, sgi: u8) -> Result<(), HypError> {
        if !self.host.info().vsgi || sgi > 15 {
            return Err(HypError::NoVsgi);
        }
        let vpeid = self.vpeid(vcpu)?;
        self.host.its_cmds(
            0,
            &[
                ItsCommand::Vsgi {
                    vpeid,
                    sgi,
                    enable: false,
                    clear: true,
                    group1: false,
                    priority: 0,
                },
                ItsCommand::Vsync { vpeid },
            ],
        )
    }

    /// Reads `vcpu`'s pending vSGIs through GICR_VSGIR / GICR_VSGIPENDR on the
    /// redistributor the vPE is mapped to, under the vPE lock (pins `col_idx` against a
    /// racing affinity change) and the redistributor lock.
    pub fn vsgi_pending(&self, vcpu: usize) -> Result<u16, HypError> {
        if !self.host.info().vsgi {
            return Err(HypError::NoVsgi);
        }
        let v = lock(self.vpe(vcpu)?);
        let _rd = self.host.rd_lock(v.col_idx)?;
        let vl = self.host.vlpi(v.col_idx)?;
        self.host.write(vl + GICR_VSGIR, 4, v.vpeid as u64)?;
        let r = self
            .host
            .poll(vl + GICR_VSGIPENDR, 4, "GICR_VSGIPENDR.Busy", |r| {
                r as u32 & VSGIPENDR_BUSY == 0
            })?;
        Ok(r as u16)
    }
}
