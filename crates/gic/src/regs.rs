//! Register offsets, bit fields and architectural constants of the GICv3 distributor,
//! redistributor, ITS and CPU interface. Every number the model uses lives here, named after
//! the Arm GIC architecture specification (IHI 0069) field it encodes.
//!
//! The model owns none of these values' meanings beyond what the comments say; behaviour is in
//! the frame modules.

// ---------------------------------------------------------------------------------------------
// Frame sizes and INTID ranges
// ---------------------------------------------------------------------------------------------

/// Size of one 64 KiB register frame.
pub const FRAME_SIZE: u64 = 0x1_0000;
/// Size of the distributor frame.
pub const GICD_SIZE: u64 = FRAME_SIZE;
/// GICv3 redistributor stride: RD_base frame followed by SGI_base frame.
pub const GICR_STRIDE_V3: u64 = 2 * FRAME_SIZE;
/// Offset of SGI_base inside one redistributor.
pub const GICR_SGI_OFFSET: u64 = FRAME_SIZE;
/// Size of the ITS: control frame plus translation frame (GICv4.1 adds a third, SGI frame).
pub const GITS_SIZE: u64 = 2 * FRAME_SIZE;
/// Offset of the translation frame inside the ITS.
pub const GITS_TRANSLATION_OFFSET: u64 = FRAME_SIZE;

/// Number of SGIs (INTIDs 0..16).
pub const NUM_SGIS: u32 = 16;
/// Number of private interrupts per PE (SGIs + PPIs, INTIDs 0..32).
pub const NUM_PRIVATE: u32 = 32;
/// Largest SPI INTID + 1 (INTIDs 1020..1023 are special).
pub const MAX_SPI_END: u32 = 1020;
/// First LPI INTID.
pub const LPI_BASE: u32 = 8192;
/// Special INTID: no pending interrupt (spurious).
pub const INTID_SPURIOUS: u32 = 1023;
/// First special INTID (1020..=1023 are reserved for special purposes).
pub const INTID_SPECIAL_FIRST: u32 = 1020;

// ---------------------------------------------------------------------------------------------
// Identification registers shared by all frames
// ---------------------------------------------------------------------------------------------

/// Offset of the Peripheral ID2 register in every frame (GICD/GICR/GITS_PIDR2).
pub const PIDR2: u64 = 0xFFE8;
/// PIDR2 value: ArchRev\[7:4\] = 3 (GICv3), JEDEC bits = 0xB.
pub const PIDR2_VALUE_V3: u32 = 0x3B;
/// PIDR2 value of the GICv4.0 configuration: ArchRev\[7:4\] = 4 (GICv4), JEDEC bits = 0xB
/// (what QEMU's `gic-version=4` reports; the GICv4.1 configuration keeps ArchRev 3).
pub const PIDR2_VALUE_V4: u32 = 0x4B;
/// First identification register (PIDR4) of the block at the top of GICD, GICR RD_base and
/// GITS frames; the block runs to CIDR3 at 0xFFFC.
pub const ID_REGS_START: u64 = 0xFFD0;
/// Component ID registers CIDR0..CIDR3 (0xFFF0..0xFFFC): the architected preamble.
pub const CIDR_VALUES: [u32; 4] = [0x0D, 0xF0, 0x05, 0xB1];

/// Value of the 32-bit identification register at `offset` (0xFFD0..=0xFFFC) of a frame that
/// has one: PIDR2 and the component IDs; PIDR0/1/3/4..7, which would name a JEP106
/// implementer and part, read as zero.
pub fn id_register(offset: u64) -> Option<u32> {
    match offset {
        PIDR2 => Some(PIDR2_VALUE_V3),
        0xFFF0..=0xFFFC if offset % 4 == 0 => Some(CIDR_VALUES[((offset - 0xFFF0) / 4) as usize]),
        ID_REGS_START..=0xFFEC if offset % 4 == 0 => Some(0),
        _ => None,
    }
}

/// Implementer/product identification used in GICD_IIDR, GICR_IIDR and GITS_IIDR:
/// ProductID\[31:24\] = 0x52 ('R'), Variant/Revision 0, Implementer\[11:0\] = 0 (none claimed).
pub const IIDR_VALUE: u32 = 0x5200_0000;

// ---------------------------------------------------------------------------------------------
// Distributor (GICD_*)
// ---------------------------------------------------------------------------------------------

/// Distributor Control Register.
pub const GICD_CTLR: u64 = 0x0000;
/// Interrupt Controller Type Register.
pub const GICD_TYPER: u64 = 0x0004;
/// Implementer Identification Register.
pub const GICD_IIDR: u64 = 0x0008;
/// Interrupt Controller Type Register 2.
pub const GICD_TYPER2: u64 = 0x000C;
/// Error Reporting Status Register (RAZ/WI here).
pub const GICD_STATUSR: u64 = 0x0010;
/// Interrupt Group Registers.
pub const GICD_IGROUPR: u64 = 0x0080;
/// Interrupt Set-Enable Registers.
pub const GICD_ISENABLER: u64 = 0x0100;
/// Interrupt Clear-Enable Registers.
pub const GICD_ICENABLER: u64 = 0x0180;
/// Interrupt Set-Pending Registers.
pub const GICD_ISPENDR: u64 = 0x0200;
/// Interrupt Clear-Pending Registers.
pub const GICD_ICPENDR: u64 = 0x0280;
/// Interrupt Set-Active Registers.
pub const GICD_ISACTIVER: u64 = 0x0300;
/// Interrupt Clear-Active Registers.
pub const GICD_ICACTIVER: u64 = 0x0380;
/// Interrupt Priority Registers (byte accessible).
pub const GICD_IPRIORITYR: u64 = 0x0400;
/// Interrupt Processor Targets Registers (RAZ/WI with affinity routing).
pub const GICD_ITARGETSR: u64 = 0x0800;
/// Interrupt Configuration Registers (2 bits per INTID).
pub const GICD_ICFGR: u64 = 0x0C00;
/// Interrupt Group Modifier Registers (RAZ/WI with a single security state).
pub const GICD_IGRPMODR: u64 = 0x0D00;
/// Non-secure Access Control Registers (RAZ/WI with a single security state).
pub const GICD_NSACR: u64 = 0x0E00;
/// Software Generated Interrupt Register (legacy, WI with affinity routing).
pub const GICD_SGIR: u64 = 0x0F00;
/// Interrupt Routing Registers: 64 bits per INTID at 0x6000 + 8 * INTID (SPIs only).
pub const GICD_IROUTER: u64 = 0x6000;

/// GICD_CTLR.EnableGrp0 (single security state view).
pub const GICD_CTLR_ENABLE_G0: u32 = 1 << 0;
/// GICD_CTLR.EnableGrp1 (single security state view).
pub const GICD_CTLR_ENABLE_G1: u32 = 1 << 1;
/// GICD_CTLR.ARE: affinity routing enable (RAO/WI in this model).
pub const GICD_CTLR_ARE: u32 = 1 << 4;
/// GICD_CTLR.DS: disable security, i.e. single security state (RAO/WI in this model).
pub const GICD_CTLR_DS: u32 = 1 << 6;
/// GICD_CTLR.RWP: register write pending (always 0: writes take effect immediately).
pub const GICD_CTLR_RWP: u32 = 1 << 31;

/// GICD_TYPER.ITLinesNumber shift: (number of INTIDs / 32) - 1.
pub const GICD_TYPER_ITLINES_SHIFT: u32 = 0;
/// GICD_TYPER.LPIS: LPIs are supported.
pub const GICD_TYPER_LPIS: u32 = 1 << 17;
/// GICD_TYPER.IDbits shift (bits \[23:19\]): INTID bits - 1.
pub const GICD_TYPER_IDBITS_SHIFT: u32 = 19;
/// GICD_TYPER.A3V: affinity level 3 values other than 0 are supported.
pub const GICD_TYPER_A3V: u32 = 1 << 24;
/// GICD_TYPER.No1N: 1-of-N SPI routing is not supported.
pub const GICD_TYPER_NO1N: u32 = 1 << 25;

/// GICD_IROUTER.IRM: 1-of-N routing mode (RAZ/WI because GICD_TYPER.No1N = 1).
pub const GICD_IROUTER_IRM: u64 = 1 << 31;
/// GICD_IROUTER writable bits: Aff3\[39:32\], Aff2\[23:16\], Aff1\[15:8\], Aff0\[7:0\].
pub const GICD_IROUTER_MASK: u64 = 0xFF_00FF_FFFF;

// ---------------------------------------------------------------------------------------------
// Redistributor RD_base frame (GICR_*)
// ---------------------------------------------------------------------------------------------

/// Redistributor Control Register.
pub const GICR_CTLR: u64 = 0x0000;
/// Redistributor Implementer Identification Register.
pub const GICR_IIDR: u64 = 0x0004;
/// Redistributor Type Register (64-bit).
pub const GICR_TYPER: u64 = 0x0008;
/// Error Reporting Status Register (RAZ/WI here).
pub const GICR_STATUSR: u64 = 0x0010;
/// Redistributor Wake Register.
pub const GICR_WAKER: u64 = 0x0014;
/// Set LPI Pending Register (64-bit, WO).
pub const GICR_SETLPIR: u64 = 0x0040;
/// Clear LPI Pending Register (64-bit, WO).
pub const GICR_CLRLPIR: u64 = 0x0048;
/// LPI configuration table base (64-bit).
pub const GICR_PROPBASER: u64 = 0x0070;
/// LPI pending table base (64-bit).
pub const GICR_PENDBASER: u64 = 0x0078;
/// Invalidate LPI Register (64-bit, WO).
pub const GICR_INVLPIR: u64 = 0x00A0;
/// Invalidate All Register (64-bit, WO).
pub const GICR_INVALLR: u64 = 0x00B0;
/// Redistributor Synchronize Register (RO).
pub const GICR_SYNCR: u64 = 0x00C0;

/// GICR_CTLR.EnableLPIs.
pub const GICR_CTLR_ENABLE_LPIS: u32 = 1 << 0;
/// GICR_CTLR.CES: clear enable supported (RO 1: EnableLPIs can be cleared after being set).
pub const GICR_CTLR_CES: u32 = 1 << 1;
/// GICR_CTLR.RWP (always 0).
pub const GICR_CTLR_RWP: u32 = 1 << 3;

/// GICR_TYPER.PLPIS: physical LPIs supported.
pub const GICR_TYPER_PLPIS: u64 = 1 << 0;
/// GICR_TYPER.VLPIS: virtual LPIs supported (0: GICv4 not implemented yet).
pub const GICR_TYPER_VLPIS: u64 = 1 << 1;
/// GICR_TYPER.DirectLPI: SETLPIR/CLRLPIR/INVLPIR/INVALLR/SYNCR implemented.
pub const GICR_TYPER_DIRECTLPI: u64 = 1 << 3;
/// GICR_TYPER.Last: last redistributor of the region.
pub const GICR_TYPER_LAST: u64 = 1 << 4;
/// GICR_TYPER.Processor_Number shift (bits \[23:8\]).
pub const GICR_TYPER_PROCNUM_SHIFT: u32 = 8;
/// GICR_TYPER.CommonLPIAff shift (bits \[25:24\]); 0 = all RDs share LPI configuration.
pub const GICR_TYPER_COMMONLPIAFF_SHIFT: u32 = 24;
/// GICR_TYPER.Affinity_Value shift (bits \[63:32\]: Aff3.Aff2.Aff1.Aff0).
pub const GICR_TYPER_AFF_SHIFT: u32 = 32;

/// GICR_WAKER.ProcessorSleep.
pub const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
/// GICR_WAKER.ChildrenAsleep (RO, follows ProcessorSleep immediately).
pub const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;

/// GICR_PROPBASER.IDbits mask (bits \[4:0\]: ID bits - 1).
pub const GICR_PROPBASER_IDBITS_MASK: u64 = 0x1F;
/// GICR_PROPBASER.Physical_Address mask (bits \[51:12\]).
pub const GICR_PROPBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// GICR_PROPBASER writable bits: IDbits, InnerCache, Shareability, PA, OuterCache.
pub const GICR_PROPBASER_MASK: u64 = 0x070F_FFFF_FFFF_FF9F;
/// GICR_PENDBASER.Physical_Address mask (bits \[51:16\]).
pub const GICR_PENDBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_0000;
/// GICR_PENDBASER.PTZ: pending table is known to be zero (write-only, reads as 0).
pub const GICR_PENDBASER_PTZ: u64 = 1 << 62;
/// GICR_PENDBASER stored bits: InnerCache, Shareability, PA, OuterCache.
pub const GICR_PENDBASER_MASK: u64 = 0x070F_FFFF_FFFF_0F80;

/// GICR_INVLPIR.INTID mask (bits \[31:0\]; V and vPEID are for GICv4.1).
pub const GICR_INVLPIR_INTID_MASK: u64 = 0xFFFF_FFFF;
/// GICR_INVLPIR.V / GICR_INVALLR.V: the request names a vPE (GICv4.1, ignored here).
pub const GICR_INV_V: u64 = 1 << 63;
/// GICR_SYNCR.Busy (always 0: invalidations complete synchronously).
pub const GICR_SYNCR_BUSY: u32 = 1 << 0;

// ---------------------------------------------------------------------------------------------
// Redistributor SGI_base frame
// ---------------------------------------------------------------------------------------------

/// Interrupt Group Register 0 (SGIs and PPIs).
pub const GICR_IGROUPR0: u64 = 0x0080;
/// Interrupt Set-Enable Register 0.
pub const GICR_ISENABLER0: u64 = 0x0100;
/// Interrupt Clear-Enable Register 0.
pub const GICR_ICENABLER0: u64 = 0x0180;
/// Interrupt Set-Pending Register 0.
pub const GICR_ISPENDR0: u64 = 0x0200;
/// Interrupt Clear-Pending Register 0.
pub const GICR_ICPENDR0: u64 = 0x0280;
/// Interrupt Set-Active Register 0.
pub const GICR_ISACTIVER0: u64 = 0x0300;
/// Interrupt Clear-Active Register 0.
pub const GICR_ICACTIVER0: u64 = 0x0380;
/// Interrupt Priority Registers 0..7 (byte accessible).
pub const GICR_IPRIORITYR: u64 = 0x0400;
/// Interrupt Configuration Register 0 (SGIs: RO, edge).
pub const GICR_ICFGR0: u64 = 0x0C00;
/// Interrupt Configuration Register 1 (PPIs).
pub const GICR_ICFGR1: u64 = 0x0C04;
/// Interrupt Group Modifier Register 0 (RAZ/WI with a single security state).
pub const GICR_IGRPMODR0: u64 = 0x0D00;
/// Non-secure Access Control Register (RAZ/WI with a single security state).
pub const GICR_NSACR: u64 = 0x0E00;
/// GICR_ICFGR0 read value: every SGI is edge-triggered.
pub const GICR_ICFGR0_VALUE: u32 = 0xAAAA_AAAA;

// ---------------------------------------------------------------------------------------------
// Priority handling
// ---------------------------------------------------------------------------------------------

/// Implemented priority bits: 5 (32 levels), as on Arm's GIC-600 and in KVM's vGIC.
pub const PRIORITY_BITS: u32 = 5;
/// Mask of implemented priority bits in an 8-bit priority field.
pub const PRIORITY_MASK: u8 = 0xF8;
/// Idle priority: no active interrupt / lowest possible.
pub const PRIORITY_IDLE: u8 = 0xFF;
/// Minimum ICC_BPR0 value with 5 priority bits (group priority bits \[7:3\]).
pub const BPR0_MIN: u8 = 2;
/// Minimum ICC_BPR1 value with 5 priority bits and a single security state (BPR0_MIN + 1).
pub const BPR1_MIN: u8 = 3;
/// Largest binary point value.
pub const BPR_MAX: u8 = 7;

// ---------------------------------------------------------------------------------------------
// CPU interface (ICC_*_EL1)
// ---------------------------------------------------------------------------------------------

/// ICC_CTLR_EL1.CBPR (RAZ/WI: BPR1 is always separate here).
pub const ICC_CTLR_CBPR: u64 = 1 << 0;
/// ICC_CTLR_EL1.EOImode: 1 = EOIR only drops priority, DIR deactivates.
pub const ICC_CTLR_EOIMODE: u64 = 1 << 1;
/// ICC_CTLR_EL1.PRIbits shift (bits \[10:8\]: priority bits - 1).
pub const ICC_CTLR_PRIBITS_SHIFT: u32 = 8;
/// ICC_CTLR_EL1.IDbits shift (bits \[13:11\]: 0 = 16-bit INTIDs).
pub const ICC_CTLR_IDBITS_SHIFT: u32 = 11;
/// ICC_CTLR_EL1.A3V: SGI1R Aff3 supported.
pub const ICC_CTLR_A3V: u64 = 1 << 15;

/// ICC_SGI1R_EL1.TargetList (bits \[15:0\]).
pub const ICC_SGI1R_TARGETLIST_MASK: u64 = 0xFFFF;
/// ICC_SGI1R_EL1.Aff1 shift (bits \[23:16\]).
pub const ICC_SGI1R_AFF1_SHIFT: u32 = 16;
/// ICC_SGI1R_EL1.INTID shift (bits \[27:24\]).
pub const ICC_SGI1R_INTID_SHIFT: u32 = 24;
/// ICC_SGI1R_EL1.Aff2 shift (bits \[39:32\]).
pub const ICC_SGI1R_AFF2_SHIFT: u32 = 32;
/// ICC_SGI1R_EL1.IRM: 1 = every PE except the sender.
pub const ICC_SGI1R_IRM: u64 = 1 << 40;
/// ICC_SGI1R_EL1.RS shift (bits \[47:44\]): range selector, Aff0 = RS * 16 + bit.
pub const ICC_SGI1R_RS_SHIFT: u32 = 44;
/// ICC_SGI1R_EL1.Aff3 shift (bits \[55:48\]).
pub const ICC_SGI1R_AFF3_SHIFT: u32 = 48;

// ---------------------------------------------------------------------------------------------
// ITS control frame (GITS_*)
// ---------------------------------------------------------------------------------------------

/// ITS Control Register.
pub const GITS_CTLR: u64 = 0x0000;
/// ITS Implementer Identification Register.
pub const GITS_IIDR: u64 = 0x0004;
/// ITS Type Register (64-bit).
pub const GITS_TYPER: u64 = 0x0008;
/// Command queue base (64-bit).
pub const GITS_CBASER: u64 = 0x0080;
/// Command queue write offset (64-bit).
pub const GITS_CWRITER: u64 = 0x0088;
/// Command queue read offset (64-bit, RO).
pub const GITS_CREADR: u64 = 0x0090;
/// First table base register; BASER`<n>` is at 0x100 + 8 * n.
pub const GITS_BASER: u64 = 0x0100;
/// Number of GITS_BASER`<n>` registers.
pub const GITS_BASER_COUNT: usize = 8;
/// Translation register, in the translation frame (offset from ITS_base).
pub const GITS_TRANSLATER: u64 = GITS_TRANSLATION_OFFSET + 0x40;

/// GITS_CTLR.Enabled.
pub const GITS_CTLR_ENABLED: u32 = 1 << 0;
/// GITS_CTLR.Quiescent (RO): always 1, because the model finishes all work synchronously.
pub const GITS_CTLR_QUIESCENT: u32 = 1 << 31;

/// GITS_TYPER.Physical: physical LPIs supported.
pub const GITS_TYPER_PHYSICAL: u64 = 1 << 0;
/// GITS_TYPER.ITT_entry_size shift (bits \[7:4\]: bytes - 1).
pub const GITS_TYPER_ITT_ENTRY_SIZE_SHIFT: u32 = 4;
/// GITS_TYPER.IDbits shift (bits \[12:8\]: EventID bits - 1).
pub const GITS_TYPER_IDBITS_SHIFT: u32 = 8;
/// GITS_TYPER.Devbits shift (bits \[17:13\]: DeviceID bits - 1).
pub const GITS_TYPER_DEVBITS_SHIFT: u32 = 13;
/// GITS_TYPER.PTA: RDbase fields are physical addresses (else processor numbers).
pub const GITS_TYPER_PTA: u64 = 1 << 19;
/// GITS_TYPER.HCC shift (bits \[31:24\]): collections held in the ITS (0 here).
pub const GITS_TYPER_HCC_SHIFT: u32 = 24;
/// GITS_TYPER.CIDbits shift (bits \[35:32\]): collection ID bits - 1 when CIL = 1.
pub const GITS_TYPER_CIDBITS_SHIFT: u32 = 32;
/// GITS_TYPER.CIL: CIDbits is valid.
pub const GITS_TYPER_CIL: u64 = 1 << 36;

/// GITS_CBASER.Size mask (bits \[7:0\]: 4 KiB pages - 1).
pub const GITS_CBASER_SIZE_MASK: u64 = 0xFF;
/// GITS_CBASER.Physical_Address mask (bits \[51:12\]).
pub const GITS_CBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// GITS_CBASER.Valid.
pub const GITS_CBASER_VALID: u64 = 1 << 63;
/// GITS_CBASER stored bits: Size, Shareability, PA, OuterCache, InnerCache, Valid.
pub const GITS_CBASER_MASK: u64 = 0xB8EF_FFFF_FFFF_FCFF;

/// GITS_CWRITER.Retry: restart a stalled command queue.
pub const GITS_CWRITER_RETRY: u64 = 1 << 0;
/// GITS_CWRITER / GITS_CREADR Offset mask (bits \[19:5\]).
pub const GITS_CMDQ_OFFSET_MASK: u64 = 0x000F_FFE0;
/// GITS_CREADR.Stalled: command processing stopped on an error.
pub const GITS_CREADR_STALLED: u64 = 1 << 0;

/// GITS_BASER.Size mask (bits \[7:0\]: pages - 1).
pub const GITS_BASER_SIZE_MASK: u64 = 0xFF;
/// GITS_BASER.Page_Size shift (bits \[9:8\]: 0 = 4 KiB, 1 = 16 KiB, 2 = 64 KiB).
pub const GITS_BASER_PAGE_SIZE_SHIFT: u32 = 8;
/// GITS_BASER.Page_Size field mask (after shift).
pub const GITS_BASER_PAGE_SIZE_FIELD: u64 = 0x3;
/// GITS_BASER.Physical_Address mask for 4 KiB and 16 KiB pages (bits \[47:12\]).
pub const GITS_BASER_PA_MASK: u64 = 0x0000_FFFF_FFFF_F000;
/// GITS_BASER.Entry_Size shift (bits \[52:48\]: bytes - 1, RO).
pub const GITS_BASER_ENTRY_SIZE_SHIFT: u32 = 48;
/// GITS_BASER.Type shift (bits \[58:56\], RO).
pub const GITS_BASER_TYPE_SHIFT: u32 = 56;
/// GITS_BASER.Indirect: two-level table.
pub const GITS_BASER_INDIRECT: u64 = 1 << 62;
/// GITS_BASER.Valid.
pub const GITS_BASER_VALID: u64 = 1 << 63;
/// GITS_BASER writable bits: Size, Page_Size, Shareability, PA, OuterCache, InnerCache,
/// Indirect, Valid (Entry_Size and Type are read-only).
pub const GITS_BASER_RW_MASK: u64 = 0xF8E0_FFFF_FFFF_FFFF;
/// GITS_BASER.Type value: no table.
pub const GITS_BASER_TYPE_NONE: u64 = 0;
/// GITS_BASER.Type value: Device table.
pub const GITS_BASER_TYPE_DEVICE: u64 = 1;
/// GITS_BASER.Type value: vPE table (GICv4, not implemented yet).
pub const GITS_BASER_TYPE_VPE: u64 = 2;
/// GITS_BASER.Type value: Collection table.
pub const GITS_BASER_TYPE_COLLECTION: u64 = 4;
/// Level-1 entry of an indirect table: Valid bit.
pub const GITS_L1E_VALID: u64 = 1 << 63;
/// Level-1 entry of an indirect table: level-2 page address (bits \[51:12\]).
pub const GITS_L1E_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Size in bytes of one ITS command.
pub const ITS_CMD_SIZE: u64 = 32;

// ---------------------------------------------------------------------------------------------
// In-memory table formats owned by this model (IMPDEF in the architecture; see docs/gic.md)
// ---------------------------------------------------------------------------------------------

/// Device table entry size in bytes.
pub const DTE_SIZE: u64 = 8;
/// DTE.Valid.
pub const DTE_VALID: u64 = 1 << 0;
/// DTE.Size shift (bits \[5:1\]: EventID bits - 1).
pub const DTE_SIZE_SHIFT: u32 = 1;
/// DTE.Size field mask (after shift).
pub const DTE_SIZE_FIELD: u64 = 0x1F;
/// DTE.ITT_addr mask: the ITT physical address itself, 256-byte aligned (bits \[51:8\]).
pub const DTE_ITT_MASK: u64 = 0x000F_FFFF_FFFF_FF00;

/// Collection table entry size in bytes.
pub const CTE_SIZE: u64 = 8;
/// CTE.Valid.
pub const CTE_VALID: u64 = 1 << 0;
/// CTE.RDbase shift (bits \[51:16\]: the RDbase field of MAPC as written).
pub const CTE_RDBASE_SHIFT: u32 = 16;
/// CTE.RDbase field mask (after shift, 36 bits).
pub const CTE_RDBASE_FIELD: u64 = 0xF_FFFF_FFFF;

/// Interrupt translation table entry size in bytes (GITS_TYPER.ITT_entry_size + 1).
pub const ITE_SIZE: u64 = 16;
/// ITE word 0: Valid.
pub const ITE_VALID: u64 = 1 << 0;
/// ITE word 0: interrupt type shift (bits \[3:1\]); 1 = physical LPI (others reserved for GICv4).
pub const ITE_TYPE_SHIFT: u32 = 1;
/// ITE word 0: interrupt type field mask (after shift).
pub const ITE_TYPE_FIELD: u64 = 0x7;
/// ITE interrupt type: physical LPI.
pub const ITE_TYPE_PHYSICAL: u64 = 1;
/// ITE word 0: ICID shift (bits \[31:16\]).
pub const ITE_ICID_SHIFT: u32 = 16;
/// ITE word 0: INTID shift (bits \[63:32\]).
pub const ITE_INTID_SHIFT: u32 = 32;

/// LPI configuration byte: Enable.
pub const LPI_PROP_ENABLE: u8 = 1 << 0;
/// LPI configuration byte: Group1 (RES1 in software's view; ignored by the model).
pub const LPI_PROP_GROUP1: u8 = 1 << 1;
/// LPI configuration byte: priority bits \[7:2\].
pub const LPI_PROP_PRIORITY_MASK: u8 = 0xFC;

// ---------------------------------------------------------------------------------------------
// ITS command opcodes (DW0[7:0]) and fields
// ---------------------------------------------------------------------------------------------

/// MOVI: move an event to another collection.
pub const CMD_MOVI: u8 = 0x01;
/// INT: make an event's LPI pending.
pub const CMD_INT: u8 = 0x03;
/// CLEAR: clear an event's LPI pending state.
pub const CMD_CLEAR: u8 = 0x04;
/// SYNC: wait for effects on a redistributor.
pub const CMD_SYNC: u8 = 0x05;
/// MAPD: map a device to an ITT.
pub const CMD_MAPD: u8 = 0x08;
/// MAPC: map a collection to a redistributor.
pub const CMD_MAPC: u8 = 0x09;
/// MAPTI: map an event to an LPI INTID and collection.
pub const CMD_MAPTI: u8 = 0x0A;
/// MAPI: MAPTI with INTID = EventID.
pub const CMD_MAPI: u8 = 0x0B;
/// INV: reload an LPI's configuration.
pub const CMD_INV: u8 = 0x0C;
/// INVALL: reload the LPI configuration of a collection.
pub const CMD_INVALL: u8 = 0x0D;
/// MOVALL: move all pending LPIs from one redistributor to another.
pub const CMD_MOVALL: u8 = 0x0E;
/// DISCARD: remove an event's mapping and pending state.
pub const CMD_DISCARD: u8 = 0x0F;

// ---------------------------------------------------------------------------------------------
// GICv4.1 (enabled by `GicConfig::v41`)
// ---------------------------------------------------------------------------------------------

/// GICv4 redistributor stride: RD_base, SGI_base, VLPI_base and a reserved frame.
pub const GICR_STRIDE_V4: u64 = 4 * FRAME_SIZE;
/// Offset of VLPI_base inside one GICv4 redistributor.
pub const GICR_VLPI_OFFSET: u64 = 2 * FRAME_SIZE;
/// Size of a GICv4.1 ITS: control, translation and SGI frames.
pub const GITS_SIZE_V41: u64 = 3 * FRAME_SIZE;
/// Offset of the GICv4.1 SGI frame inside the ITS.
pub const GITS_SGI_OFFSET: u64 = 2 * FRAME_SIZE;
/// GITS_SGIR (64-bit, WO), offset from ITS_base: vINTID\[3:0\], vPEID\[47:32\].
pub const GITS_SGIR: u64 = GITS_SGI_OFFSET + 0x20;
/// GITS_MPIDR (v4.1): affinity of the ITS, Aff3.Aff2.Aff1 in bits \[31:8\].
pub const GITS_MPIDR: u64 = 0x0018;

/// GICD_CTLR.nASSGIreq: SGIs without an active state are requested.
pub const GICD_CTLR_NASSGIREQ: u32 = 1 << 8;
/// GICD_TYPER2.VID mask (bits \[4:0\]: vPEID bits - 1).
pub const GICD_TYPER2_VID_MASK: u32 = 0x1F;
/// GICD_TYPER2.VIL: VID is valid.
pub const GICD_TYPER2_VIL: u32 = 1 << 7;
/// GICD_TYPER2.nASSGIcap: SGIs without an active state can be provided.
pub const GICD_TYPER2_NASSGICAP: u32 = 1 << 8;

/// GICR_TYPER.Dirty: VPENDBASER.Dirty also reports VPT parsing on load.
pub const GICR_TYPER_DIRTY: u64 = 1 << 2;
/// GICR_TYPER.RVPEID: GICR_VPENDBASER records a vPEID (GICv4.1).
pub const GICR_TYPER_RVPEID: u64 = 1 << 7;
/// GICR_TYPER.VSGI: direct vSGI injection supported.
pub const GICR_TYPER_VSGI: u64 = 1 << 26;

/// VLPI_base: vPE configuration table base (GICv4.1 layout, 64-bit).
pub const GICR_VPROPBASER: u64 = 0x0070;
/// VLPI_base: vPE residency (GICv4.1 layout, 64-bit).
pub const GICR_VPENDBASER: u64 = 0x0078;
/// VLPI_base: vSGI pending query, vPEID\[15:0\] (32-bit).
pub const GICR_VSGIR: u64 = 0x0080;
/// VLPI_base: vSGI pending state, Busy bit 31, Pending\[15:0\] (32-bit, RO).
pub const GICR_VSGIPENDR: u64 = 0x0088;

/// GICR_VPROPBASER.Size mask (bits \[6:0\]: pages - 1).
pub const VPROPBASER_SIZE_MASK: u64 = 0x7F;
/// GICR_VPROPBASER.Physical_Address mask (bits \[51:12\]).
pub const VPROPBASER_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// GICR_VPROPBASER.Z: the table is known to be zeroed.
pub const VPROPBASER_Z: u64 = 1 << 52;
/// GICR_VPROPBASER.Page_Size shift (bits \[54:53\]: 0 = 4 KiB, 1 = 16 KiB, 2 = 64 KiB).
pub const VPROPBASER_PAGE_SIZE_SHIFT: u32 = 53;
/// GICR_VPROPBASER.Indirect: two-level table.
pub const VPROPBASER_INDIRECT: u64 = 1 << 55;
/// GICR_VPROPBASER.Entry_Size shift (bits \[61:59\], RO: entry bytes / 8 - 1).
pub const VPROPBASER_ENTRY_SIZE_SHIFT: u32 = 59;
/// GICR_VPROPBASER.Valid.
pub const VPROPBASER_VALID: u64 = 1 << 63;
/// GICR_VPROPBASER writable bits (Size, caches, shareability, PA, Z, Page_Size, Indirect,
/// Valid; Entry_Size is read-only).
pub const VPROPBASER_RW_MASK: u64 = 0x87FF_FFFF_FFFF_FFFF;

/// GICR_VPENDBASER.vPEID mask (bits \[15:0\]).
pub const VPENDBASER_VPEID_MASK: u64 = 0xFFFF;
/// GICR_VPENDBASER.vGrp1En.
pub const VPENDBASER_VGRP1EN: u64 = 1 << 58;
/// GICR_VPENDBASER.vGrp0En.
pub const VPENDBASER_VGRP0EN: u64 = 1 << 59;
/// GICR_VPENDBASER.Dirty (RO): the redistributor is still loading or saving vPE state.
pub const VPENDBASER_DIRTY: u64 = 1 << 60;
/// GICR_VPENDBASER.PendingLast.
pub const VPENDBASER_PENDING_LAST: u64 = 1 << 61;
/// GICR_VPENDBASER.Doorbell (DB): request the default doorbell when made non-resident.
pub const VPENDBASER_DB: u64 = 1 << 62;
/// GICR_VPENDBASER.Valid: the vPE is resident.
pub const VPENDBASER_VALID: u64 = 1 << 63;

/// GICv4.0 GICR_VPROPBASER.IDbits (bits \[4:0\]: vINTID bits - 1 of the vLPI configuration
/// table).
pub const VPROPBASER_V40_IDBITS_MASK: u64 = 0x1F;
/// GICv4.0 GICR_VPROPBASER.Physical_Address (bits \[51:12\]): the vLPI configuration table.
pub const VPROPBASER_V40_PA_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// GICv4.0 GICR_VPROPBASER writable bits: IDbits, InnerCache \[9:7\], Shareability
/// \[11:10\], Physical_Address, OuterCache \[58:56\]; the rest is RES0.
pub const VPROPBASER_V40_RW_MASK: u64 = 0x070F_FFFF_FFFF_FF9F;
/// GICv4.0 GICR_VPENDBASER.Physical_Address (bits \[51:16\]): the VPT of the resident vPE.
pub const VPENDBASER_V40_PA_MASK: u64 = 0x000F_FFFF_FFFF_0000;
/// GICv4.0 GICR_VPENDBASER.IDAI: the IMPLEMENTATION DEFINED area of the VPT is invalid.
pub const VPENDBASER_V40_IDAI: u64 = 1 << 62;
/// GICv4.0 GICR_VPENDBASER writable bits: InnerCache \[9:7\], Shareability \[11:10\],
/// Physical_Address, OuterCache \[58:56\], PendingLast, IDAI, Valid (Dirty is read-only).
pub const VPENDBASER_V40_RW_MASK: u64 = 0xE70F_FFFF_FFFF_0F80;

/// GICR_INVLPIR / GICR_INVALLR vPEID shift (bits \[47:32\]).
pub const GICR_INV_VPEID_SHIFT: u32 = 32;
/// GICR_VSGIPENDR.Busy.
pub const VSGIPENDR_BUSY: u32 = 1 << 31;

/// GITS_CTLR.ImDe (RO 1 on a GICv4 ITS here).
pub const GITS_CTLR_IMDE: u32 = 1 << 1;
/// GITS_CTLR.ITS_Number shift (bits \[7:4\]).
pub const GITS_CTLR_ITS_NUMBER_SHIFT: u32 = 4;
/// GITS_TYPER.Virtual: virtual LPIs supported.
pub const GITS_TYPER_VIRTUAL: u64 = 1 << 1;
/// GITS_TYPER.VMOVP: one VMOVP suffices (no ITSList / sequence numbers).
pub const GITS_TYPER_VMOVP: u64 = 1 << 37;
/// GITS_TYPER.VSGI: VSGI command and GITS_SGIR supported.
pub const GITS_TYPER_VSGI: u64 = 1 << 39;
/// GITS_TYPER.VMAPP: GICv4.1 VMAPP layout (a GICv4.1 ITS).
pub const GITS_TYPER_VMAPP: u64 = 1 << 40;
/// GITS_TYPER.SVPET shift (bits \[42:41\]): vPE table shared with redistributors.
pub const GITS_TYPER_SVPET_SHIFT: u32 = 41;

/// Size of one vPE table entry in bytes (GICR_VPROPBASER.Entry_Size = 3, GITS_BASER2
/// Entry_Size = 31: the largest entry GITS_BASER's 5-bit field can describe).
pub const VPE_ENTRY_SIZE: u64 = 32;
/// vPE entry word 1: VConf address mask (bits \[51:16\], in place); bits \[15:0\] hold the
/// Processor_Number of the redistributor the vPE is mapped to.
pub const VPTE_VCONF_MASK: u64 = 0x000F_FFFF_FFFF_0000;
/// vPE entry word 0: Valid.
pub const VPTE_VALID: u64 = 1 << 0;
/// vPE entry word 0: VPT_size shift (bits \[5:1\]: vLPI ID bits - 1).
pub const VPTE_VPT_SIZE_SHIFT: u32 = 1;
/// vPE entry word 0: VPT address mask (bits \[51:16\], in place).
pub const VPTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_0000;
/// ITE interrupt type: virtual LPI.
pub const ITE_TYPE_VIRTUAL: u64 = 2;
/// ITE word 1 of a virtual LPI: vPEID shift (bits \[47:32\]; bits \[31:0\] hold the doorbell).
pub const ITE_VPEID_SHIFT: u32 = 32;
/// Doorbell value meaning "no doorbell" (VMAPTI/VMAPI/VMOVI, VMAPP Default_Doorbell).
pub const INTID_NO_DOORBELL: u32 = 1023;

/// VMAPP DW3: VPT_size mask (bits \[4:0\]: vINTID bits - 1; bits \[15:5\] are RES0).
pub const VMAPP_VPT_SIZE_MASK: u64 = 0x1F;

/// VMOVI: move a virtual LPI to another vPE.
pub const CMD_VMOVI: u8 = 0x21;
/// VMOVP: move a vPE to another redistributor.
pub const CMD_VMOVP: u8 = 0x22;
/// VSGI: configure or clear a vSGI.
pub const CMD_VSGI: u8 = 0x23;
/// VSYNC: wait for effects on a vPE.
pub const CMD_VSYNC: u8 = 0x25;
/// VMAPP: map or unmap a vPE.
pub const CMD_VMAPP: u8 = 0x29;
/// VMAPTI: map an event to a vINTID of a vPE.
pub const CMD_VMAPTI: u8 = 0x2A;
/// VMAPI: VMAPTI with vINTID = EventID.
pub const CMD_VMAPI: u8 = 0x2B;
/// VINVALL: reload the vLPI configuration of a vPE.
pub const CMD_VINVALL: u8 = 0x2D;
/// INVDB: reload the configuration of a vPE's default doorbell.
pub const CMD_INVDB: u8 = 0x2E;

// ---------------------------------------------------------------------------------------
// Hypervisor control of the virtual CPU interface (ICH_*_EL2)
// ---------------------------------------------------------------------------------------

/// Number of list registers the model implements (ICH_VTR_EL2.ListRegs + 1).
pub const ICH_NUM_LRS: usize = 4;
/// The virtual CPU interface maintenance interrupt (a PPI; the `virt` board's choice).
pub const ICH_MAINTENANCE_PPI: u32 = 25;
/// ICH_LR<n>_EL2.vINTID mask (bits \[31:0\]).
pub const ICH_LR_VINTID_MASK: u64 = 0xFFFF_FFFF;
/// ICH_LR<n>_EL2.pINTID shift (bits \[44:32\], with HW = 1).
pub const ICH_LR_PINTID_SHIFT: u32 = 32;
/// ICH_LR<n>_EL2.pINTID mask after shifting (13 bits).
pub const ICH_LR_PINTID_MASK: u64 = 0x1FFF;
/// ICH_LR<n>_EL2.EOI (bit 41, with HW = 0): maintenance when the interrupt is deactivated.
pub const ICH_LR_EOI: u64 = 1 << 41;
/// ICH_LR<n>_EL2.Priority shift (bits \[55:48\]).
pub const ICH_LR_PRIORITY_SHIFT: u32 = 48;
/// ICH_LR<n>_EL2.Group (bit 60): 1 = Group 1.
pub const ICH_LR_GROUP: u64 = 1 << 60;
/// ICH_LR<n>_EL2.HW (bit 61): the virtual interrupt is backed by a physical one.
pub const ICH_LR_HW: u64 = 1 << 61;
/// ICH_LR<n>_EL2.State shift (bits \[63:62\]: 0 invalid, 1 pending, 2 active, 3 both).
pub const ICH_LR_STATE_SHIFT: u32 = 62;
/// LR state: pending.
pub const ICH_LR_STATE_PENDING: u64 = 1;
/// LR state: active.
pub const ICH_LR_STATE_ACTIVE: u64 = 2;
/// Bits of ICH_LR<n>_EL2 the model stores (everything else is RES0).
pub const ICH_LR_RW_MASK: u64 = 0xF0FF_1FFF_FFFF_FFFF;
/// ICH_HCR_EL2.En: the virtual CPU interface is enabled.
pub const ICH_HCR_EN: u64 = 1 << 0;
/// ICH_HCR_EL2.UIE: maintenance when at most one LR is valid (underflow).
pub const ICH_HCR_UIE: u64 = 1 << 1;
/// ICH_HCR_EL2.LRENPIE: maintenance while EOIcount is non-zero.
pub const ICH_HCR_LRENPIE: u64 = 1 << 2;
/// ICH_HCR_EL2.NPIE: maintenance when no LR is pending.
pub const ICH_HCR_NPIE: u64 = 1 << 3;
/// ICH_HCR_EL2.VGrp0EIE / VGrp0DIE / VGrp1EIE / VGrp1DIE (bits 4..7).
pub const ICH_HCR_VGRP_IE_MASK: u64 = 0xF0;
/// ICH_HCR_EL2.EOIcount shift (bits \[31:27\]).
pub const ICH_HCR_EOICOUNT_SHIFT: u32 = 27;
/// Bits of ICH_HCR_EL2 the model stores.
pub const ICH_HCR_RW_MASK: u64 = 0xF800_00FF;
/// ICH_VMCR_EL2.VENG0 (ICV_IGRPEN0).
pub const ICH_VMCR_VENG0: u64 = 1 << 0;
/// ICH_VMCR_EL2.VENG1 (ICV_IGRPEN1).
pub const ICH_VMCR_VENG1: u64 = 1 << 1;
/// ICH_VMCR_EL2.VFIQEn (RES1: Group 0 is signalled as vFIQ).
pub const ICH_VMCR_VFIQEN: u64 = 1 << 3;
/// ICH_VMCR_EL2.VEOIM (ICV_CTLR.EOImode).
pub const ICH_VMCR_VEOIM: u64 = 1 << 9;
/// ICH_VMCR_EL2.VBPR1 shift (bits \[20:18\]).
pub const ICH_VMCR_VBPR1_SHIFT: u32 = 18;
/// ICH_VMCR_EL2.VBPR0 shift (bits \[23:21\]).
pub const ICH_VMCR_VBPR0_SHIFT: u32 = 21;
/// ICH_VMCR_EL2.VPMR shift (bits \[31:24\]).
pub const ICH_VMCR_VPMR_SHIFT: u32 = 24;
/// ICH_MISR_EL2 bits: EOI, U, LRENP, NP, VGrp0E, VGrp0D, VGrp1E, VGrp1D (bits 0..7).
pub const ICH_MISR_EOI: u64 = 1 << 0;
/// ICH_MISR_EL2.U.
pub const ICH_MISR_U: u64 = 1 << 1;
/// ICH_MISR_EL2.LRENP.
pub const ICH_MISR_LRENP: u64 = 1 << 2;
/// ICH_MISR_EL2.NP.
pub const ICH_MISR_NP: u64 = 1 << 3;
/// ICH_VTR_EL2 value: ListRegs = 3, PRIbits = PREbits = 4 (5 bits), IDbits = 0 (16 bits),
/// A3V = 1, nV4 = 0 (direct injection), SEIS = 0, TDS = 0.
pub const ICH_VTR_VALUE: u64 = (ICH_NUM_LRS as u64 - 1)
    | (1 << 21)
    | ((PRIORITY_BITS as u64 - 1) << 26)
    | ((PRIORITY_BITS as u64 - 1) << 29);
