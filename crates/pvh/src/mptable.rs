//! The Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI (a Linux kernel
//! with `CONFIG_X86_MPPARSE`) finds every vCPU, the IOAPIC and the routing of the ISA
//! interrupts (the PIT and COM1) through it.
//!
//! Layout: the 16-byte floating pointer structure at [`MPTABLE_GPA`] (in the BIOS area
//! 0xf0000-0xfffff, which Linux scans, and which is not RAM in the e820 map), followed by the
//! configuration table: the header, one processor entry per vCPU (LAPIC ID = vCPU index,
//! vCPU 0 the boot processor), bus 0 = ISA, the IOAPIC, one I/O interrupt entry per ISA IRQ
//! except the cascade (IRQ 0, the PIT, on IOAPIC pin 2, where KVM's default routing delivers
//! GSI 0; IRQ n on pin n otherwise; edge/high as the bus conforms) and the two local interrupt
//! entries (ExtINT on LINT0, NMI on LINT1).

/// Where the floating pointer structure goes (the configuration table follows it).
pub const MPTABLE_GPA: u64 = 0xf_0000;
/// The in-kernel IOAPIC's MMIO base.
pub const IOAPIC_BASE: u32 = 0xfec0_0000;
/// The LAPIC's MMIO base.
pub const LAPIC_BASE: u32 = 0xfee0_0000;
/// The highest vCPU count the table describes (LAPIC IDs below the IOAPIC's ID).
pub const MAX_CPUS: usize = 254;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INT: u8 = 3;
const ENTRY_LOCAL_INT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS: u8 = 0;
/// Number of ISA interrupts routed.
const ISA_IRQS: u8 = 16;
/// LAPIC version (integrated APIC, as KVM's LAPIC reports).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version (KVM's IOAPIC: 0x11, 24 pins).
const IOAPIC_VERSION: u8 = 0x11;
/// CPU signature (family 6) and feature flags (FPU, APIC) of the processor entries.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, &x| a.wrapping_add(x)))
}

/// The tables for `cpus` vCPUs, to be written at [`MPTABLE_GPA`]; `None` when `cpus` is 0 or
/// more than [`MAX_CPUS`].
pub fn build(cpus: usize) -> Option<Vec<u8>> {
    if cpus == 0 || cpus > MAX_CPUS {
        return None;
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for i in 0..cpus {
        let flags = 1 | if i == 0 { 2 } else { 0 }; // enabled, boot processor
        entries.extend_from_slice(&[ENTRY_PROCESSOR, i as u8, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_BASE.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        if irq == 2 {
            continue; // the cascade; its pin carries IRQ 0
        }
        let pin = if irq == 0 { 2 } else { irq };
        entries.extend_from_slice(&[
            ENTRY_IO_INT,
            INT_TYPE_INT,
            0,
            0,
            ISA_BUS,
            irq,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI, on every LAPIC (destination 0xff).
    entries.extend_from_slice(&[ENTRY_LOCAL_INT, INT_TYPE_EXTINT, 0, 0, ISA_BUS, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INT, INT_TYPE_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);
    count += 2;

    let config_gpa = MPTABLE_GPA as u32 + 16;
    let mut cfg = Vec::with_capacity(44 + entries.len());
    cfg.extend_from_slice(b"PCMP");
    cfg.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    cfg.push(4); // spec revision 1.4
    cfg.push(0); // checksum, below
    cfg.extend_from_slice(b"RINGVISR");
    cfg.extend_from_slice(b"PVH         ");
    cfg.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    cfg.extend_from_slice(&0u16.to_le_bytes());
    cfg.extend_from_slice(&count.to_le_bytes());
    cfg.extend_from_slice(&LAPIC_BASE.to_le_bytes());
    cfg.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    cfg.push(0); // extended table checksum
    cfg.push(0);
    cfg.extend_from_slice(&entries);
    cfg[7] = checksum(&cfg);

    let mut out = Vec::with_capacity(16 + cfg.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&config_gpa.to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision 1.4
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: a configuration table is present
    out[10] = checksum(&out[..16]);
    out.extend_from_slice(&cfg);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn floating_pointer_and_config_table_are_valid() {
        let t = build(2).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let cfg_at = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64 - MPTABLE_GPA;
        let cfg = &t[cfg_at as usize..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes(cfg[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0);
        assert_eq!(cfg[6], 4);
        let count = u16::from_le_bytes(cfg[34..36].try_into().unwrap());
        // 2 CPUs, bus, IOAPIC, 15 ISA IRQs, 2 local.
        assert_eq!(count, 2 + 1 + 1 + 15 + 2);
    }

    #[test]
    fn every_cpu_is_listed_and_only_the_first_is_the_boot_processor() {
        let t = build(3).unwrap();
        let e = &t[16 + 44..];
        for i in 0..3 {
            let p = &e[i * 20..i * 20 + 20];
            assert_eq!(p[0], ENTRY_PROCESSOR);
            assert_eq!(p[1], i as u8);
            assert_eq!(p[3], if i == 0 { 3 } else { 1 });
        }
        // The IOAPIC follows the bus, with an ID no CPU uses.
        let io = &e[3 * 20 + 8..3 * 20 + 16];
        assert_eq!(io[0], ENTRY_IOAPIC);
        assert_eq!(io[1], 3);
        assert_eq!(
            u32::from_le_bytes(io[4..8].try_into().unwrap()),
            IOAPIC_BASE
        );
    }

    #[test]
    fn the_pit_is_on_pin_2_and_com1_on_pin_4() {
        let t = build(1).unwrap();
        let e = &t[16 + 44 + 20 + 8 + 8..];
        let ints: Vec<(u8, u8, u8)> = e
            .chunks(8)
            .filter(|c| c[0] == ENTRY_IO_INT)
            .map(|c| (c[1], c[5], c[7]))
            .collect();
        assert!(ints.contains(&(INT_TYPE_INT, 0, 2)));
        assert!(ints.contains(&(INT_TYPE_INT, 4, 4)));
        assert!(!ints.iter().any(|&(_, irq, _)| irq == 2));
    }

    #[test]
    fn zero_or_too_many_cpus_build_nothing() {
        assert!(build(0).is_none());
        assert!(build(MAX_CPUS + 1).is_none());
    }
}
