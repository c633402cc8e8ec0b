//! Sanity checks on migrated state before any of it reaches KVM: a state blob from a stream is
//! input from outside, so what it asks the destination to run is checked where that is cheap.
//!
//! - Control registers: CR0, CR4 and EFER carry only bits the architecture defines and the
//!   vCPU's CPUID (this host's KVM) supports, in a combination KVM accepts.
//! - RIP: the instruction pointer of every vCPU that will run is canonical, mapped by the
//!   guest's own page tables (walked in the received memory) with execute and user/supervisor
//!   rights, and lands in guest RAM.
//! - MSRs: exactly the list this destination saves and restores (none missing, none foreign,
//!   none twice), so nothing is left at its reset value and nothing else is written.
//!
//! The page walk and the register checks are pure functions over a [`GuestPhys`] view of
//! guest memory, unit-tested without KVM.

use kvm_bindings::{kvm_cpuid_entry2, kvm_sregs};

/// Why a vCPU's instruction pointer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RipFault {
    /// A 64-bit RIP whose upper bits are not a sign extension of the top address bit.
    #[error("not canonical")]
    NotCanonical,
    /// A RIP with bits above 31 outside 64-bit mode.
    #[error("wider than 32 bits outside 64-bit mode")]
    TooWide,
    /// A paging-structure entry on the way is not present (level 4 = PML4, 1 = PTE; 5 = PML5).
    #[error("not mapped (no present entry at paging level {level})")]
    NotMapped {
        /// Paging level of the missing entry.
        level: u8,
    },
    /// A paging-structure entry has reserved bits set (e.g. NX without EFER.NXE).
    #[error("paging entry at level {level} has reserved bits set")]
    ReservedEntry {
        /// Paging level.
        level: u8,
    },
    /// The page is mapped no-execute.
    #[error("mapped no-execute")]
    NoExecute,
    /// The vCPU runs at CPL3 and the page is a supervisor page.
    #[error("a supervisor page, and the vCPU runs at CPL3")]
    SupervisorPage,
    /// The vCPU runs at CPL0-2 on a user page with CR4.SMEP set.
    #[error("a user page, and CR4.SMEP forbids supervisor execution there")]
    Smep,
    /// A paging structure lies outside guest RAM.
    #[error("a paging structure at {gpa:#x} is outside guest RAM")]
    TableOutsideRam {
        /// Its guest physical address.
        gpa: u64,
    },
    /// The translated address is not guest RAM.
    #[error("translates to {gpa:#x}, outside guest RAM")]
    OutsideRam {
        /// The guest physical address.
        gpa: u64,
    },
}

/// A migrated state blob this VMM refuses; raised before anything is restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The blob is not the JSON document of the expected shape (syntax, missing or unknown
    /// fields, wrong types).
    #[error("{what}: {reason}")]
    Decode {
        /// Which blob or field.
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// A KVM structure carried as bytes has the wrong length (a short array is never
    /// zero-padded, a long one never cut).
    #[error("{what} is {got} bytes, expected exactly {expected}")]
    Length {
        /// Which structure.
        what: &'static str,
        /// Its size in this build's KVM ABI.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// A format version this build does not read.
    #[error("{what} version {found}, this build reads {supported}")]
    Version {
        /// Which blob.
        what: &'static str,
        /// Version found.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// An MSR this destination restores is absent from the blob.
    #[error("vCPU {vcpu}: MSR {index:#x} is missing from the state")]
    MissingMsr {
        /// vCPU index.
        vcpu: usize,
        /// MSR index.
        index: u32,
    },
    /// An MSR this destination does not restore is in the blob.
    #[error("vCPU {vcpu}: MSR {index:#x} is not one this VMM restores")]
    UnexpectedMsr {
        /// vCPU index.
        vcpu: usize,
        /// MSR index.
        index: u32,
    },
    /// An MSR appears twice.
    #[error("vCPU {vcpu}: MSR {index:#x} appears twice")]
    DuplicateMsr {
        /// vCPU index.
        vcpu: usize,
        /// MSR index.
        index: u32,
    },
    /// The blob's interrupt-controller parts (LAPIC, MP state) do not match the machine.
    #[error("vCPU {vcpu}: {what}")]
    Irqchip {
        /// vCPU index.
        vcpu: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// A control register or EFER has bits set that are reserved or not supported here.
    #[error("vCPU {vcpu}: {register} = {value:#x} sets unsupported or reserved bits {bits:#x}")]
    ReservedBits {
        /// vCPU index.
        vcpu: usize,
        /// `CR0`, `CR4` or `EFER`.
        register: &'static str,
        /// The register's value.
        value: u64,
        /// The offending bits.
        bits: u64,
    },
    /// A combination of control-register bits KVM refuses (e.g. paging without protection).
    #[error("vCPU {vcpu}: inconsistent control registers: {what}")]
    ControlRegisters {
        /// vCPU index.
        vcpu: usize,
        /// Which rule.
        what: &'static str,
    },
    /// The instruction pointer does not point at executable guest RAM.
    #[error("vCPU {vcpu}: RIP {rip:#x} is {fault}")]
    Rip {
        /// vCPU index.
        vcpu: usize,
        /// The RIP.
        rip: u64,
        /// Why it is refused.
        fault: RipFault,
    },
    /// A device or machine-wide value out of its range.
    #[error("{what}: {reason}")]
    Device {
        /// Which device field.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Guest physical memory as the checks see it.
pub trait GuestPhys {
    /// Reads `buf.len()` bytes at `gpa`; false if any byte is outside guest RAM.
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool;
    /// Whether `gpa` is guest RAM.
    fn is_ram(&self, gpa: u64) -> bool;
}

impl GuestPhys for crate::GuestRam {
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.read(gpa, buf).is_ok()
    }
    fn is_ram(&self, gpa: u64) -> bool {
        self.regions()
            .iter()
            .any(|r| gpa >= r.gpa && gpa - r.gpa < r.bytes)
    }
}

// CR0 bits (SDM vol. 3, 2.5).
const CR0_PE: u64 = 1 << 0;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR0_PG: u64 = 1 << 31;
/// Every CR0 bit the architecture defines: PE MP EM TS ET NE WP AM NW CD PG.
const CR0_DEFINED: u64 = 0x3f | 1 << 16 | 1 << 18 | CR0_NW | CR0_CD | CR0_PG;

// CR4 bits (SDM vol. 3, 2.5).
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const CR4_SMEP: u64 = 1 << 20;

// EFER bits.
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// Where a CPUID feature bit lives: leaf, subleaf, register (0 EAX .. 3 EDX), bit.
type Feature = (u32, u32, u8, u8);

/// CR4 bits and the CPUID feature each needs (`None`: always allowed). Bits absent here
/// (SMXE, 15, 19, 24-27, 29-63) are reserved for a KVM guest.
const CR4_BITS: &[(u8, Option<Feature>)] = &[
    (0, Some((1, 0, 3, 1))),   // VME
    (1, Some((1, 0, 3, 1))),   // PVI
    (2, None),                 // TSD
    (3, Some((1, 0, 3, 2))),   // DE
    (4, Some((1, 0, 3, 3))),   // PSE
    (5, Some((1, 0, 3, 6))),   // PAE
    (6, Some((1, 0, 3, 7))),   // MCE
    (7, Some((1, 0, 3, 13))),  // PGE
    (8, None),                 // PCE
    (9, Some((1, 0, 3, 24))),  // OSFXSR
    (10, None),                // OSXMMEXCPT
    (11, Some((7, 0, 2, 2))),  // UMIP
    (12, Some((7, 0, 2, 16))), // LA57
    (13, Some((1, 0, 2, 5))),  // VMXE
    (16, Some((7, 0, 1, 0))),  // FSGSBASE
    (17, Some((1, 0, 2, 17))), // PCIDE
    (18, Some((1, 0, 2, 26))), // OSXSAVE
    (20, Some((7, 0, 1, 7))),  // SMEP
    (21, Some((7, 0, 1, 20))), // SMAP
    (22, Some((7, 0, 2, 3))),  // PKE
    (23, Some((7, 0, 2, 7))),  // CET (shadow stacks)
    (28, Some((7, 1, 0, 26))), // LAM_SUP
];

/// EFER bits and the CPUID feature each needs; the others are reserved.
const EFER_BITS: &[(u8, Option<Feature>)] = &[
    (0, Some((0x8000_0001, 0, 3, 11))),  // SCE
    (8, Some((0x8000_0001, 0, 3, 29))),  // LME
    (10, Some((0x8000_0001, 0, 3, 29))), // LMA
    (11, Some((0x8000_0001, 0, 3, 20))), // NXE
    (12, Some((0x8000_0001, 0, 2, 2))),  // SVME
    (14, Some((0x8000_0001, 0, 3, 25))), // FFXSR
    (15, Some((0x8000_0001, 0, 2, 17))), // TCE
];

fn has_feature(cpuid: &[kvm_cpuid_entry2], (leaf, sub, reg, bit): Feature) -> bool {
    cpuid
        .iter()
        .find(|e| e.function == leaf && (e.index == sub || (sub == 0 && e.flags & 1 == 0)))
        .is_some_and(|e| {
            let r = match reg {
                0 => e.eax,
                1 => e.ebx,
                2 => e.ecx,
                _ => e.edx,
            };
            r >> bit & 1 == 1
        })
}

fn allowed_bits(cpuid: &[kvm_cpuid_entry2], table: &[(u8, Option<Feature>)]) -> u64 {
    table
        .iter()
        .filter(|(_, f)| match f {
            Some(f) => has_feature(cpuid, *f),
            None => true,
        })
        .fold(0, |m, (bit, _)| m | 1 << bit)
}

/// Checks CR0, CR4 and EFER of vCPU `vcpu` against the architecture, the vCPU's `cpuid` and
/// the combinations KVM refuses in `KVM_SET_SREGS`.
pub fn check_control_registers(
    vcpu: usize,
    sregs: &kvm_sregs,
    cpuid: &[kvm_cpuid_entry2],
) -> Result<(), StateError> {
    let reserved = |register, value: u64, allowed: u64| {
        let bits = value & !allowed;
        if bits != 0 {
            Err(StateError::ReservedBits {
                vcpu,
                register,
                value,
                bits,
            })
        } else {
            Ok(())
        }
    };
    reserved("CR0", sregs.cr0, CR0_DEFINED)?;
    reserved("CR4", sregs.cr4, allowed_bits(cpuid, CR4_BITS))?;
    reserved("EFER", sregs.efer, allowed_bits(cpuid, EFER_BITS))?;
    let bad = |what| Err(StateError::ControlRegisters { vcpu, what });
    if sregs.cr0 & CR0_PG != 0 && sregs.cr0 & CR0_PE == 0 {
        return bad("CR0.PG without CR0.PE");
    }
    if sregs.cr0 & CR0_NW != 0 && sregs.cr0 & CR0_CD == 0 {
        return bad("CR0.NW without CR0.CD");
    }
    if sregs.efer & EFER_LME != 0 && sregs.cr0 & CR0_PG != 0 {
        if sregs.cr4 & CR4_PAE == 0 {
            return bad("long mode without CR4.PAE");
        }
        if sregs.efer & EFER_LMA == 0 {
            return bad("EFER.LME and CR0.PG without EFER.LMA");
        }
    } else if sregs.efer & EFER_LMA != 0 {
        return bad("EFER.LMA without EFER.LME and CR0.PG");
    }
    if sregs.cs.l != 0 && sregs.efer & EFER_LMA == 0 {
        return bad("a 64-bit code segment outside long mode");
    }
    Ok(())
}

/// Address bits of a 64-bit paging entry (MAXPHYADDR 52).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PTE_P: u64 = 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;

/// What a walk accumulated: user access on every level, no-execute on any.
struct Rights {
    user: bool,
    nx: bool,
}

fn read_entry(mem: &dyn GuestPhys, gpa: u64, wide: bool) -> Result<u64, RipFault> {
    let mut b = [0u8; 8];
    let n = if wide { 8 } else { 4 };
    if !mem.read_phys(gpa, &mut b[..n]) {
        return Err(RipFault::TableOutsideRam { gpa });
    }
    Ok(u64::from_le_bytes(b))
}

/// Walks 64-bit-entry tables (4/5-level, or PAE below its PDPT) from `table` at `level` down.
fn walk64(
    mem: &dyn GuestPhys,
    mut table: u64,
    top: u8,
    linear: u64,
    nxe: bool,
    r: &mut Rights,
) -> Result<u64, RipFault> {
    for level in (1..=top).rev() {
        let idx = linear >> (12 + 9 * (u32::from(level) - 1)) & 0x1ff;
        let e = read_entry(mem, table + idx * 8, true)?;
        if e & PTE_P == 0 {
            return Err(RipFault::NotMapped { level });
        }
        if e & PTE_NX != 0 && !nxe {
            return Err(RipFault::ReservedEntry { level });
        }
        r.user &= e & PTE_US != 0;
        r.nx |= e & PTE_NX != 0;
        if (level == 2 || level == 3) && e & PTE_PS != 0 {
            let span = 1u64 << (12 + 9 * (u32::from(level) - 1));
            return Ok((e & ADDR_MASK & !(span - 1)) | (linear & (span - 1)));
        }
        table = e & ADDR_MASK;
    }
    Ok(table | (linear & 0xfff))
}

/// Translates `linear` through the page tables `sregs` describe; returns the guest physical
/// address and the accumulated rights (`None` rights: paging is off).
fn translate(
    mem: &dyn GuestPhys,
    sregs: &kvm_sregs,
    linear: u64,
) -> Result<(u64, Option<Rights>), RipFault> {
    if sregs.cr0 & CR0_PG == 0 {
        return Ok((linear, None));
    }
    let nxe = sregs.efer & EFER_NXE != 0;
    let mut r = Rights {
        user: true,
        nx: false,
    };
    let gpa = if sregs.efer & EFER_LMA != 0 {
        let top = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        walk64(mem, sregs.cr3 & ADDR_MASK, top, linear, nxe, &mut r)?
    } else if sregs.cr4 & CR4_PAE != 0 {
        // PAE: four PDPTEs at CR3 (32-byte aligned); they carry no rights bits.
        let pdpte = read_entry(
            mem,
            (sregs.cr3 & 0xffff_ffe0) + (linear >> 30 & 3) * 8,
            true,
        )?;
        if pdpte & PTE_P == 0 {
            return Err(RipFault::NotMapped { level: 3 });
        }
        walk64(mem, pdpte & ADDR_MASK, 2, linear, nxe, &mut r)?
    } else {
        let pde = read_entry(mem, (sregs.cr3 & 0xffff_f000) + (linear >> 22) * 4, false)?;
        if pde & PTE_P == 0 {
            return Err(RipFault::NotMapped { level: 2 });
        }
        r.user &= pde & PTE_US != 0;
        if pde & PTE_PS != 0 && sregs.cr4 & CR4_PSE != 0 {
            (pde & 0xffc0_0000) | (linear & 0x3f_ffff)
        } else {
            let pte = read_entry(mem, (pde & 0xffff_f000) + (linear >> 12 & 0x3ff) * 4, false)?;
            if pte & PTE_P == 0 {
                return Err(RipFault::NotMapped { level: 1 });
            }
            r.user &= pte & PTE_US != 0;
            (pte & 0xffff_f000) | (linear & 0xfff)
        }
    };
    Ok((gpa, Some(r)))
}

/// Checks that a vCPU about to run fetches its next instruction from executable guest RAM:
/// the linear address of CS:RIP is canonical (64-bit mode), the guest's page tables map it
/// present, executable and accessible at the vCPU's privilege level, and it lands in RAM.
pub fn check_rip(
    vcpu: usize,
    rip: u64,
    sregs: &kvm_sregs,
    mem: &dyn GuestPhys,
) -> Result<(), StateError> {
    let fault = |fault| StateError::Rip { vcpu, rip, fault };
    let long64 = sregs.efer & EFER_LMA != 0 && sregs.cs.l != 0;
    let linear = if long64 {
        let bits = if sregs.cr4 & CR4_LA57 != 0 { 57 } else { 48 };
        let shift = 64 - bits;
        if ((rip << shift) as i64 >> shift) as u64 != rip {
            return Err(fault(RipFault::NotCanonical));
        }
        rip
    } else {
        if rip > u64::from(u32::MAX) {
            return Err(fault(RipFault::TooWide));
        }
        sregs.cs.base.wrapping_add(rip) & 0xffff_ffff
    };
    let (gpa, rights) = translate(mem, sregs, linear).map_err(fault)?;
    if let Some(r) = rights {
        if r.nx {
            return Err(fault(RipFault::NoExecute));
        }
        let cpl3 = sregs.cs.dpl == 3;
        if cpl3 && !r.user {
            return Err(fault(RipFault::SupervisorPage));
        }
        if !cpl3 && r.user && sregs.cr4 & CR4_SMEP != 0 {
            return Err(fault(RipFault::Smep));
        }
    }
    if !mem.is_ram(gpa) {
        return Err(fault(RipFault::OutsideRam { gpa }));
    }
    Ok(())
}

/// Checks that `msrs` holds exactly the MSRs of `expected`, each once.
pub fn check_msrs(vcpu: usize, msrs: &[(u32, u64)], expected: &[u32]) -> Result<(), StateError> {
    let mut seen: Vec<u32> = Vec::with_capacity(msrs.len());
    for &(index, _) in msrs {
        if !expected.contains(&index) {
            return Err(StateError::UnexpectedMsr { vcpu, index });
        }
        if seen.contains(&index) {
            return Err(StateError::DuplicateMsr { vcpu, index });
        }
        seen.push(index);
    }
    match expected.iter().find(|i| !seen.contains(i)) {
        Some(&index) => Err(StateError::MissingMsr { vcpu, index }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_segment;
    use std::collections::HashMap;

    /// Sparse guest memory of 4 KiB pages below `ram_end`.
    struct Mem {
        pages: HashMap<u64, Vec<u8>>,
        ram_end: u64,
    }

    impl Mem {
        fn new(ram_end: u64) -> Self {
            Mem {
                pages: HashMap::new(),
                ram_end,
            }
        }
        fn put(&mut self, gpa: u64, v: u64, wide: bool) {
            let p = self
                .pages
                .entry(gpa & !0xfff)
                .or_insert_with(|| vec![0; 4096]);
            let o = (gpa & 0xfff) as usize;
            let n = if wide { 8 } else { 4 };
            p[o..o + n].copy_from_slice(&v.to_le_bytes()[..n]);
        }
    }

    impl GuestPhys for Mem {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> bool {
            if gpa + buf.len() as u64 > self.ram_end {
                return false;
            }
            let o = (gpa & 0xfff) as usize;
            match self.pages.get(&(gpa & !0xfff)) {
                Some(p) => buf.copy_from_slice(&p[o..o + buf.len()]),
                None => buf.fill(0),
            }
            true
        }
        fn is_ram(&self, gpa: u64) -> bool {
            gpa < self.ram_end
        }
    }

    fn cpuid_all() -> Vec<kvm_cpuid_entry2> {
        [1u32, 7, 0x8000_0001]
            .iter()
            .map(|&function| kvm_cpuid_entry2 {
                function,
                eax: !0,
                ebx: !0,
                ecx: !0,
                edx: !0,
                ..Default::default()
            })
            .collect()
    }

    /// Long mode at CPL3 with 4-level tables at 0x1000 mapping 0x40_0000 (4 KiB, user) and
    /// 0x20_0000 (2 MiB page, user, NX).
    fn long_mode() -> (Mem, kvm_sregs) {
        let mut m = Mem::new(64 << 20);
        let u = PTE_P | 2 | PTE_US;
        m.put(0x1000, 0x2000 | u, true); // PML4[0]
        m.put(0x2000, 0x3000 | u, true); // PDPT[0]
        m.put(0x3000 + 8, 0x20_0000 | u | PTE_PS | PTE_NX, true); // PD[1]: 2 MiB at 2 MiB, NX
        m.put(0x3000 + 2 * 8, 0x4000 | u, true); // PD[2] -> PT
        m.put(0x4000, 0x40_0000 | u, true); // PT[0]: 4 MiB
        let s = kvm_sregs {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA | EFER_NXE,
            cs: kvm_segment {
                l: 1,
                dpl: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        (m, s)
    }

    #[test]
    fn a_mapped_user_page_in_ram_is_accepted() {
        let (m, s) = long_mode();
        assert_eq!(check_rip(0, 0x40_0123, &s, &m), Ok(()));
    }

    #[test]
    fn rip_faults_are_named() {
        let (mut m, mut s) = long_mode();
        let f = |rip, s: &kvm_sregs, m: &Mem| match check_rip(0, rip, s, m) {
            Err(StateError::Rip { fault, .. }) => Some(fault),
            _ => None,
        };
        assert_eq!(
            f(0xdeadbeef000, &s, &m),
            Some(RipFault::NotMapped { level: 4 })
        );
        assert_eq!(f(0x8000_0000_0000, &s, &m), Some(RipFault::NotCanonical));
        assert_eq!(f(0x20_0000, &s, &m), Some(RipFault::NoExecute));
        assert_eq!(f(0x40_1000, &s, &m), Some(RipFault::NotMapped { level: 1 }));
        m.put(0x4000 + 8, 0x10_0000_0000 | PTE_P | PTE_US, true); // PT[1] beyond RAM
        assert_eq!(
            f(0x40_1000, &s, &m),
            Some(RipFault::OutsideRam {
                gpa: 0x10_0000_0000
            })
        );
        m.put(0x4000 + 16, 0x5000 | PTE_P, true); // PT[2]: supervisor page
        assert_eq!(f(0x40_2000, &s, &m), Some(RipFault::SupervisorPage));
        s.cs.dpl = 0;
        s.cr4 |= CR4_SMEP;
        assert_eq!(f(0x40_0000, &s, &m), Some(RipFault::Smep));
        s.efer &= !EFER_NXE;
        assert_eq!(
            f(0x20_0000, &s, &m),
            Some(RipFault::ReservedEntry { level: 2 })
        );
        s.cr3 = 1 << 40;
        assert_eq!(
            f(0x40_0000, &s, &m),
            Some(RipFault::TableOutsideRam { gpa: 1 << 40 })
        );
    }

    #[test]
    fn paging_off_and_32_bit_paging_translate() {
        let mut m = Mem::new(16 << 20);
        let mut s = kvm_sregs {
            cr0: CR0_PE,
            ..Default::default()
        };
        s.cs.base = 0x10_0000;
        assert_eq!(check_rip(0, 0x20, &s, &m), Ok(()));
        assert!(matches!(
            check_rip(0, 0xdeadbeef000, &s, &m),
            Err(StateError::Rip {
                fault: RipFault::TooWide,
                ..
            })
        ));
        assert!(check_rip(0, 0x200_0000, &s, &m).is_err());
        // 32-bit paging: PDE 1 is a 4 MiB page at 8 MiB; PDE 0 points at a PT.
        s.cs.base = 0;
        s.cr0 |= CR0_PG;
        s.cr3 = 0x1000;
        s.cr4 = CR4_PSE;
        m.put(0x1004, 0x80_0000 | PTE_P | PTE_PS, false);
        m.put(0x1000, 0x2000 | PTE_P, false);
        m.put(0x2000 + 3 * 4, 0x9000 | PTE_P, false);
        assert_eq!(check_rip(0, 0x40_0010, &s, &m), Ok(()));
        assert_eq!(check_rip(0, 0x3010, &s, &m), Ok(()));
        assert!(matches!(
            check_rip(0, 0x4000, &s, &m),
            Err(StateError::Rip {
                fault: RipFault::NotMapped { level: 1 },
                ..
            })
        ));
        // PAE: PDPTE 0 -> PD at 0x5000, PDE 0 a 2 MiB page at 2 MiB.
        s.cr4 = CR4_PAE;
        s.cr3 = 0x4000;
        m.put(0x4000, 0x5000 | PTE_P, true);
        m.put(0x5000, 0x20_0000 | PTE_P | PTE_PS, true);
        assert_eq!(check_rip(0, 0x1234, &s, &m), Ok(()));
        assert!(check_rip(0, 0x4000_0000, &s, &m).is_err());
    }

    #[test]
    fn reserved_and_unsupported_control_register_bits_are_refused() {
        let (_, s) = long_mode();
        let all = cpuid_all();
        assert_eq!(check_control_registers(0, &s, &all), Ok(()));
        let mut t = s;
        t.cr4 |= 1 << 15; // reserved
        assert!(matches!(
            check_control_registers(0, &t, &all),
            Err(StateError::ReservedBits {
                register: "CR4",
                bits: 0x8000,
                ..
            })
        ));
        let mut t = s;
        t.cr4 |= CR4_LA57; // supported only if CPUID.7.0:ECX[16]
        let mut no_la57 = all.clone();
        no_la57
            .iter_mut()
            .filter(|e| e.function == 7)
            .for_each(|e| e.ecx = 0);
        assert!(check_control_registers(0, &t, &all).is_ok());
        assert!(matches!(
            check_control_registers(0, &t, &no_la57),
            Err(StateError::ReservedBits {
                register: "CR4",
                ..
            })
        ));
        let mut t = s;
        t.cr0 |= 1 << 40;
        assert!(matches!(
            check_control_registers(0, &t, &all),
            Err(StateError::ReservedBits {
                register: "CR0",
                ..
            })
        ));
        let mut t = s;
        t.efer |= 1 << 13; // LMSLE: not offered to KVM guests
        assert!(matches!(
            check_control_registers(0, &t, &all),
            Err(StateError::ReservedBits {
                register: "EFER",
                ..
            })
        ));
        let mut t = s;
        t.efer &= !EFER_LMA;
        assert!(matches!(
            check_control_registers(0, &t, &all),
            Err(StateError::ControlRegisters { .. })
        ));
        let mut t = s;
        t.cr0 &= !CR0_PE;
        assert!(matches!(
            check_control_registers(0, &t, &all),
            Err(StateError::ControlRegisters { .. })
        ));
    }

    #[test]
    fn msr_lists_must_match_exactly() {
        let want = [0x10, 0x174, 0xc000_0080];
        let full = [(0x10, 1), (0x174, 2), (0xc000_0080, 3)];
        assert_eq!(check_msrs(1, &full, &want), Ok(()));
        assert_eq!(
            check_msrs(1, &full[..2], &want),
            Err(StateError::MissingMsr {
                vcpu: 1,
                index: 0xc000_0080
            })
        );
        assert_eq!(
            check_msrs(1, &[(0x10, 1), (0x10, 1), (0x174, 2)], &want),
            Err(StateError::DuplicateMsr {
                vcpu: 1,
                index: 0x10
            })
        );
        assert_eq!(
            check_msrs(1, &[(0x1b, 1)], &want),
            Err(StateError::UnexpectedMsr {
                vcpu: 1,
                index: 0x1b
            })
        );
    }
}
