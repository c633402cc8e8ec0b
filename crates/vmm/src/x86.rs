//! Long-mode CPL3 machine setup: GDT, TSS, identity page tables and the vCPU registers.
//!
//! Layout of the system region (slot 0, `SYSTEM_BYTES` at GPA 0):
//! - `GDT_GPA`: null, 64-bit code DPL3 (0x08), data DPL3 (0x10), 64-bit TSS (0x18, 16 bytes)
//! - `TSS_GPA`: the TSS (all zero; no ring transitions ever happen)
//! - `PT_GPA..PT_END`: PML4, PDPT and the page directories/tables, built by [`build_page_tables`]
//! - `CTRL_GPA`: the shared control page; per-vCPU control blocks follow it
//! - `CODE_GPA`: the guest program
//! - `STACK_GPA..`: one 16 KiB stack per vCPU
//!
//! Guest code runs at CPL3 only (see `../shared/reference/pvm-host.md`): on PVM, CPL0 code is
//! emulated ~1000x slower. RFLAGS.IOPL = 3 lets the guest `out` to a port, which exits to the
//! VMM. There is no IDT: any guest exception becomes a triple fault (`KVM_EXIT_SHUTDOWN`).

use kvm_bindings::{kvm_segment, kvm_sregs, CpuId};

use crate::error::{Result, VmmError};
use crate::memory::{GuestRam, RegionSpec};

/// Size of the system region at GPA 0.
pub const SYSTEM_BYTES: u64 = 4 << 20;
/// GDT address.
pub const GDT_GPA: u64 = 0x1000;
/// TSS address.
pub const TSS_GPA: u64 = 0x2000;
/// First page-table page (the PML4).
pub const PT_GPA: u64 = 0x1_0000;
/// End of the page-table area.
pub const PT_END: u64 = 0x10_0000;
/// Shared control page.
pub const CTRL_GPA: u64 = 0x10_0000;
/// Guest program.
pub const CODE_GPA: u64 = 0x20_0000;
/// Stacks.
pub const STACK_GPA: u64 = 0x30_0000;
/// Bytes of stack per vCPU.
pub const STACK_BYTES: u64 = 0x4000;
/// Most vCPUs the layout has room for.
pub const MAX_VCPUS: usize = 64;

const SEL_CODE: u16 = 0x08 | 3;
const SEL_DATA: u16 = 0x10 | 3;
const SEL_TSS: u16 = 0x18;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 2;
const PTE_US: u64 = 4;
const PTE_PS: u64 = 0x80;
const TABLE: u64 = PTE_P | PTE_RW | PTE_US;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 2;
const CR0_ET: u64 = 0x10;
const CR0_NE: u64 = 0x20;
const CR0_WP: u64 = 0x1_0000;
const CR0_PG: u64 = 0x8000_0000;
const CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// RFLAGS with IOPL = 3 and the reserved bit 1.
pub const RFLAGS_IOPL3: u64 = 0x3002;

/// The system region's spec (slot 0, dirty-logged so migration sees control-page writes).
pub fn system_region() -> RegionSpec {
    RegionSpec {
        slot: 0,
        gpa: 0,
        bytes: SYSTEM_BYTES,
        log_dirty: true,
    }
}

/// Writes the GDT and TSS.
pub fn write_gdt(ram: &GuestRam) -> Result<()> {
    let code64: u64 = 0x00af_fa00_0000_ffff; // P, DPL3, S, exec/read, L, G
    let data: u64 = 0x00cf_f200_0000_ffff; // P, DPL3, S, read/write, D/B, G
    let limit = 0x67u64;
    let base = TSS_GPA;
    let tss_lo = limit
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // P, 64-bit TSS (busy)
        | (((base >> 24) & 0xff) << 56);
    let tss_hi = base >> 32;
    for (i, d) in [0, code64, data, tss_lo, tss_hi].iter().enumerate() {
        ram.write_u64(GDT_GPA + 8 * i as u64, *d)?;
    }
    ram.write(TSS_GPA, &[0u8; 0x68])?;
    Ok(())
}

/// Identity-maps every region with user-accessible pages: 2 MiB pages where a whole aligned
/// 2 MiB block lies inside a region, 4 KiB pages elsewhere. Returns the page-table pages used.
pub fn build_page_tables(ram: &GuestRam) -> Result<u64> {
    let avail = (PT_END - PT_GPA) / 4096;
    let mut next = PT_GPA + 0x1000; // the PML4 is at PT_GPA
    let mut alloc = |ram: &GuestRam| -> Result<u64> {
        if next >= PT_END {
            return Err(VmmError::PageTables {
                needed: avail + 1,
                available: avail,
            });
        }
        let p = next;
        next += 0x1000;
        ram.write(p, &[0u8; 4096])?;
        Ok(p)
    };
    ram.write(PT_GPA, &[0u8; 4096])?;
    // Entry lookup that allocates missing tables: returns the physical address of the table.
    let mut table_for = |ram: &GuestRam, parent: u64, idx: u64| -> Result<u64> {
        let e = ram.read_u64(parent + idx * 8)?;
        if e & PTE_P != 0 {
            return Ok(e & 0x000f_ffff_ffff_f000);
        }
        let t = alloc(ram)?;
        ram.write_u64(parent + idx * 8, t | TABLE)?;
        Ok(t)
    };
    for r in ram.regions() {
        let mut a = r.gpa;
        while a < r.end() {
            let l4 = (a >> 39) & 511;
            let l3 = (a >> 30) & 511;
            let l2 = (a >> 21) & 511;
            let pdpt = table_for(ram, PT_GPA, l4)?;
            let pd = table_for(ram, pdpt, l3)?;
            if a % (2 << 20) == 0 && a + (2 << 20) <= r.end() {
                ram.write_u64(pd + l2 * 8, a | TABLE | PTE_PS)?;
                a += 2 << 20;
            } else {
                let pt = table_for(ram, pd, l2)?;
                let l1 = (a >> 12) & 511;
                ram.write_u64(pt + l1 * 8, a | TABLE)?;
                a += 4096;
            }
        }
    }
    Ok((next - PT_GPA) / 4096)
}

/// A flat segment (base 0, 4 GiB limit, page granular, present) with the given selector,
/// type, privilege level, descriptor class (`s`: 1 code/data) and size bits (`l`, `db`).
pub fn flat_segment(selector: u16, type_: u8, dpl: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db,
        s,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn seg(selector: u16, type_: u8, s: u8, l: u8, db: u8) -> kvm_segment {
    flat_segment(selector, type_, 3, s, l, db)
}

/// Special registers for 64-bit long mode at CPL3.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = seg(SEL_CODE, 0xb, 1, 1, 0);
    let d = seg(SEL_DATA, 0x3, 1, 0, 1);
    sregs.ds = d;
    sregs.es = d;
    sregs.fs = d;
    sregs.gs = d;
    sregs.ss = d;
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PT_GPA;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// The host's supported CPUID with this vCPU's APIC IDs filled in.
pub fn vcpu_cpuid(mut cpuid: CpuId, index: u32) -> CpuId {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (index << 24),
            0xb | 0x1f => e.edx = index,
            _ => {}
        }
    }
    cpuid
}

/// Top of vCPU `i`'s stack.
pub fn stack_top(i: usize) -> u64 {
    STACK_GPA + (i as u64 + 1) * STACK_BYTES - 16
}
