//! The virtual CPU interface of each PE: what the guest sees through `ICV_*_EL1` and what the
//! hypervisor controls through `ICH_*_EL2`. Two sources feed it: list registers (emulated
//! interrupts the hypervisor injects, [`crate::ich`]) and, with GICv4.1, the vLPIs and vSGIs
//! of the vPE resident on the PE ([`crate::v41`]). The higher priority of the two is
//! presented (ties: the lower INTID).

use crate::ich::{IchReg, LrCandidate};
use crate::regs::*;
use crate::v41::{IcvState, VCandidate};
use crate::{Gic, GuestMem, IcvReg, VcpuError};

/// Where the virtual interrupt the interface presents comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A list register.
    Lr(usize),
    /// A direct vLPI / vSGI of the resident vPE.
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VirtCand {
    intid: u32,
    prio: u8,
    group1: bool,
    src: Source,
}

impl<M: GuestMem> Gic<M> {
    /// The guest's ICV state on `pe`: the resident vPE's, else the PE's own.
    fn icv(&self, pe: usize) -> IcvState {
        self.v41
            .as_ref()
            .and_then(|v| v.resident_vpeid(pe).and_then(|id| v.vpes.get(&id)))
            .filter(|v| v.resident_on == Some(pe))
            .map(|v| v.icv)
            .or_else(|| self.ich.get(pe).map(|i| i.icv))
            .unwrap_or_default()
    }

    fn set_icv(&mut self, pe: usize, icv: IcvState) {
        if let Some(v) = self.v41.as_mut().and_then(|v| v.vpe_mut_resident(pe)) {
            v.icv = icv;
        } else if let Some(i) = self.ich.get_mut(pe) {
            i.icv = icv;
        }
    }

    /// Highest priority virtual interrupt on `pe` among the enabled groups.
    fn vbest(&self, pe: usize) -> Option<VirtCand> {
        let icv = self.icv(pe);
        let lr = self.ich.get(pe).and_then(|i| i.best_lr(&icv)).map(
            |LrCandidate {
                 lr,
                 intid,
                 prio,
                 group1,
             }| VirtCand {
                intid,
                prio,
                group1,
                src: Source::Lr(lr),
            },
        );
        let direct = self.v41.as_ref().and_then(|v| v.vhppi(pe)).map(
            |VCandidate {
                 intid,
                 prio,
                 group1,
             }| VirtCand {
                intid,
                prio,
                group1,
                src: Source::Direct,
            },
        );
        match (lr, direct) {
            (Some(a), Some(b)) => Some(if (b.prio, b.intid) < (a.prio, a.intid) {
                b
            } else {
                a
            }),
            (a, b) => a.or(b),
        }
    }

    fn vsignalled(&self, pe: usize, group1: bool) -> bool {
        if self.icv_check(pe).is_err() {
            return false;
        }
        let icv = self.icv(pe);
        self.vbest(pe)
            .is_some_and(|c| c.group1 == group1 && icv.can_signal(group1, c.prio))
    }

    /// Level of the virtual IRQ line of PE `pe`: the guest running there (a resident vPE, or
    /// a vCPU whose hypervisor enabled ICH_HCR_EL2.En) has a Group 1 virtual interrupt it may
    /// take now.
    pub fn virq_line(&self, pe: usize) -> bool {
        self.vsignalled(pe, true)
    }

    /// Level of the virtual FIQ line of PE `pe` (Group 0 virtual interrupts).
    pub fn vfiq_line(&self, pe: usize) -> bool {
        self.vsignalled(pe, false)
    }

    /// A guest runs on `pe`: a vPE is resident or the hypervisor enabled the interface.
    fn icv_check(&self, pe: usize) -> Result<(), VcpuError> {
        if pe >= self.cpus.len() {
            return Err(VcpuError::NoSuchPe(pe));
        }
        if self.ich[pe].enabled() {
            return Ok(());
        }
        let v = self.v41.as_ref().ok_or(VcpuError::NotV41)?;
        if v.resident_vpeid(pe).is_none() {
            return Err(VcpuError::NotResident(pe));
        }
        Ok(())
    }

    /// Reads a virtual CPU interface register of the guest running on PE `pe` (a resident
    /// vPE, or a vCPU the hypervisor runs with ICH_HCR_EL2.En = 1). Reading ICV_IAR0/1
    /// acknowledges.
    pub fn icv_read(&mut self, pe: usize, reg: IcvReg) -> Result<u64, VcpuError> {
        self.icv_check(pe)?;
        let icv = self.icv(pe);
        let hppir = |gic: &Self, g1: bool| match gic.vbest(pe) {
            Some(c) if c.group1 == g1 => c.intid as u64,
            _ => INTID_SPURIOUS as u64,
        };
        let c = icv.cpuif();
        Ok(match reg {
            IcvReg::Iar1 => self.vacknowledge(pe, true) as u64,
            IcvReg::Iar0 => self.vacknowledge(pe, false) as u64,
            IcvReg::Hppir1 => hppir(self, true),
            IcvReg::Hppir0 => hppir(self, false),
            IcvReg::Pmr => icv.pmr as u64,
            IcvReg::Rpr => c.running_priority() as u64,
            IcvReg::Ctlr => c.ctlr(),
            IcvReg::Igrpen0 => icv.igrpen0 as u64,
            IcvReg::Igrpen1 => icv.igrpen1 as u64,
            IcvReg::Bpr0 => c.bpr0 as u64,
            IcvReg::Bpr1 => c.bpr1 as u64,
            IcvReg::Ap0r0 => icv.ap0 as u64,
            IcvReg::Ap1r0 => icv.ap1 as u64,
            IcvReg::Eoir1 | IcvReg::Eoir0 | IcvReg::Dir => {
                return Err(VcpuError::Direction { reg, op: "read" })
            }
        })
    }

    /// Writes a virtual CPU interface register of the guest running on PE `pe`.
    pub fn icv_write(&mut self, pe: usize, reg: IcvReg, value: u64) -> Result<(), VcpuError> {
        self.icv_check(pe)?;
        let mut icv = self.icv(pe);
        let mut c = icv.cpuif();
        let intid = value as u32 & 0xFF_FFFF;
        let mut deactivate = false;
        match reg {
            IcvReg::Eoir1 | IcvReg::Eoir0 => {
                let g = if reg == IcvReg::Eoir1 {
                    crate::cpuif::Group::G1
                } else {
                    crate::cpuif::Group::G0
                };
                // EOI of a special INTID, with nothing active, or when the other group holds
                // the highest active priority is UNPREDICTABLE: ignored.
                if !(INTID_SPECIAL_FIRST..=INTID_SPURIOUS).contains(&intid) && c.drop_priority(g) {
                    deactivate = !c.eoimode;
                }
            }
            IcvReg::Dir => deactivate = c.eoimode,
            IcvReg::Pmr => c.pmr = value as u8 & PRIORITY_MASK,
            IcvReg::Igrpen0 => c.igrpen0 = value & 1 != 0,
            IcvReg::Igrpen1 => c.igrpen1 = value & 1 != 0,
            IcvReg::Ctlr => c.set_ctlr(value),
            IcvReg::Bpr0 => c.set_bpr0(value),
            IcvReg::Bpr1 => c.set_bpr1(value),
            IcvReg::Ap0r0 => c.ap0r0 = value as u32,
            IcvReg::Ap1r0 => c.ap1r0 = value as u32,
            IcvReg::Iar1 | IcvReg::Iar0 | IcvReg::Hppir1 | IcvReg::Hppir0 | IcvReg::Rpr => {
                return Err(VcpuError::Direction { reg, op: "written" })
            }
        }
        icv.set_from(&c);
        self.set_icv(pe, icv);
        if deactivate {
            self.vdeactivate(pe, intid);
        }
        self.update_maintenance(pe);
        Ok(())
    }

    /// ICV_IAR0/1: acknowledges the presented virtual interrupt if it is of `group1`'s group
    /// and may be signalled; 1023 otherwise.
    fn vacknowledge(&mut self, pe: usize, group1: bool) -> u32 {
        let Some(c) = self.vbest(pe) else {
            return INTID_SPURIOUS;
        };
        let mut icv = self.icv(pe);
        if c.group1 != group1 || !icv.can_signal(group1, c.prio) {
            return INTID_SPURIOUS;
        }
        match c.src {
            Source::Lr(n) => self.ich[pe].acknowledge(n),
            Source::Direct => {
                let taken = self.v41.as_mut().is_some_and(|v| {
                    v.take_direct(
                        &mut self.mem,
                        pe,
                        VCandidate {
                            intid: c.intid,
                            prio: c.prio,
                            group1: c.group1,
                        },
                    )
                });
                if !taken {
                    return INTID_SPURIOUS;
                }
            }
        }
        let mut cpu = icv.cpuif();
        let g = if group1 {
            crate::cpuif::Group::G1
        } else {
            crate::cpuif::Group::G0
        };
        cpu.activate_priority(g, c.prio);
        icv.set_from(&cpu);
        self.set_icv(pe, icv);
        self.update_maintenance(pe);
        c.intid
    }

    /// Deactivates virtual INTID `intid` on `pe` (guest EOI with EOImode = 0, or ICV_DIR):
    /// the LR holding it active leaves the active state, and with HW = 1 the physical INTID
    /// is deactivated too. An EOI that matches no LR increments ICH_HCR_EL2.EOIcount (IHI
    /// 0069, ICH_HCR_EL2.EOIcount), except for LPIs and for the direct vSGIs of a resident
    /// vPE, which have no active state.
    fn vdeactivate(&mut self, pe: usize, intid: u32) {
        if intid >= LPI_BASE || (INTID_SPECIAL_FIRST..=INTID_SPURIOUS).contains(&intid) {
            return;
        }
        match self.ich[pe].deactivate(intid) {
            Some(Some(pintid)) => {
                self.deactivate(pe, pintid);
                self.stale[pe] = crate::STALE_HPPI;
                self.update();
            }
            Some(None) => {}
            None => {
                let direct_sgi = intid < NUM_SGIS
                    && self
                        .v41
                        .as_ref()
                        .is_some_and(|v| v.resident_vpeid(pe).is_some());
                if !direct_sgi {
                    self.ich[pe].count_eoi();
                }
            }
        }
    }

    /// Drives the maintenance interrupt (PPI [`ICH_MAINTENANCE_PPI`], level-sensitive) of
    /// `pe` from ICH_HCR_EL2.En and ICH_MISR_EL2.
    fn update_maintenance(&mut self, pe: usize) {
        let icv = self.icv(pe);
        let level = self.ich[pe].maintenance(&icv);
        let m = 1u32 << ICH_MAINTENANCE_PPI;
        if (self.rds[pe].line & m != 0) != level {
            self.rds[pe].set_ppi_line(ICH_MAINTENANCE_PPI, level);
            self.update();
        }
    }

    /// Reads a hypervisor register of PE `pe`'s virtual CPU interface (`ICH_*_EL2`).
    pub fn ich_read(&self, pe: usize, reg: IchReg) -> Result<u64, VcpuError> {
        let ich = self.ich.get(pe).ok_or(VcpuError::NoSuchPe(pe))?;
        let icv = self.icv(pe);
        Ok(match reg {
            IchReg::Lr(n) => *ich.lrs.get(n as usize).ok_or(VcpuError::NoSuchLr(n))?,
            IchReg::Hcr => ich.hcr,
            IchReg::Vmcr => icv.vmcr(),
            IchReg::Vtr => ICH_VTR_VALUE,
            IchReg::Misr => ich.misr(&icv),
            IchReg::Eisr => ich.eisr(),
            IchReg::Elrsr => ich.elrsr(),
            IchReg::Ap0r0 => icv.ap0 as u64,
            IchReg::Ap1r0 => icv.ap1 as u64,
        })
    }

    /// Writes a hypervisor register of PE `pe`'s virtual CPU interface. ICH_VMCR_EL2 and
    /// ICH_AP*R_EL2 write the guest state of whatever runs there (the resident vPE's, else
    /// the PE's own); the maintenance interrupt follows.
    pub fn ich_write(&mut self, pe: usize, reg: IchReg, value: u64) -> Result<(), VcpuError> {
        if pe >= self.ich.len() {
            return Err(VcpuError::NoSuchPe(pe));
        }
        let mut icv = self.icv(pe);
        match reg {
            IchReg::Lr(n) => {
                let lr = self.ich[pe]
                    .lrs
                    .get_mut(n as usize)
                    .ok_or(VcpuError::NoSuchLr(n))?;
                *lr = value & ICH_LR_RW_MASK;
            }
            IchReg::Hcr => self.ich[pe].hcr = value & ICH_HCR_RW_MASK,
            IchReg::Vmcr => icv.set_vmcr(value),
            IchReg::Ap0r0 => icv.ap0 = value as u32,
            IchReg::Ap1r0 => icv.ap1 = value as u32,
            IchReg::Vtr | IchReg::Misr | IchReg::Eisr | IchReg::Elrsr => {
                return Err(VcpuError::IchReadOnly(reg))
            }
        }
        self.set_icv(pe, icv);
        self.update_maintenance(pe);
        Ok(())
    }
}
