//! The Interrupt Translation Service: GITS_* registers, the command queue in guest memory,
//! the device / collection tables and ITTs in guest memory, command decoding
//! ([`ItsCommand::decode`]) and execution, and MSI translation (GITS_TRANSLATER).
//!
//! The ITS keeps no table cache: every command and translation reads the tables from guest
//! memory, so the only ITS state outside memory is its registers, the stall flag and the error
//! records. Commands run synchronously when GITS_CWRITER is written, so SYNC has nothing to
//! wait for. See `docs/gic.md` for the entry layouts.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::access::{half64, merge_part, only32, read_part};
use crate::config::{GicConfig, ItsConfig, V41Config};
use crate::error::{MemError, MmioError, StateError};
use crate::mem::{GuestMem, LoggedMem};
use crate::redist::Redistributor;
use crate::regs::*;
use crate::v41::{vpe_entry, write_entry, VpeState, V41};

/// Number of error records each ITS keeps (oldest dropped first).
pub const ITS_ERROR_RECORDS: usize = 64;

/// A decoded ITS command. Decoding never fails: unknown opcodes become [`ItsCommand::Unknown`];
/// RES0 fields are ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItsCommand {
    /// MOVI: retarget an event to collection `icid`.
    Movi {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
        /// New collection.
        icid: u16,
    },
    /// INT: make the event's LPI pending.
    Int {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// CLEAR: clear the event's LPI pending state.
    Clear {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// SYNC: complete all effects on a redistributor.
    Sync {
        /// RDbase field.
        rdbase: u64,
    },
    /// MAPD: map (valid) or unmap a device.
    Mapd {
        /// DeviceID.
        device: u32,
        /// EventID bits - 1.
        size: u8,
        /// ITT physical address (256-byte aligned).
        itt: u64,
        /// V.
        valid: bool,
    },
    /// MAPC: map (valid) or unmap a collection.
    Mapc {
        /// Collection ID.
        icid: u16,
        /// RDbase field.
        rdbase: u64,
        /// V.
        valid: bool,
    },
    /// MAPTI: map an event to an LPI and collection.
    Mapti {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
        /// Physical LPI INTID.
        intid: u32,
        /// Collection.
        icid: u16,
    },
    /// MAPI: MAPTI with INTID = EventID.
    Mapi {
        /// DeviceID.
        device: u32,
        /// EventID (and INTID).
        event: u32,
        /// Collection.
        icid: u16,
    },
    /// INV: reload the event's LPI configuration.
    Inv {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// INVALL: reload the LPI configuration of a collection's redistributor.
    Invall {
        /// Collection.
        icid: u16,
    },
    /// MOVALL: move every pending LPI from one redistributor to another.
    Movall {
        /// Source RDbase field.
        rdbase1: u64,
        /// Destination RDbase field.
        rdbase2: u64,
    },
    /// DISCARD: clear the event's pending state and unmap it.
    Discard {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// VMAPP (GICv4.1 layout): map (valid) or unmap a vPE.
    Vmapp {
        /// vPEID.
        vpeid: u32,
        /// RDbase field (target redistributor).
        rdbase: u64,
        /// V.
        valid: bool,
        /// Alloc: first map (V = 1) or last unmap (V = 0) of this vPE across all ITSs.
        alloc: bool,
        /// PTZ: the VPT is known to be zero.
        ptz: bool,
        /// VConf_Addr: the vLPI property table (64 KiB aligned).
        vconf: u64,
        /// Default_Doorbell pINTID (1023: none).
        default_db: u32,
        /// VPT_addr (64 KiB aligned).
        vpt: u64,
        /// VPT_size: vINTID bits - 1.
        vpt_size: u8,
    },
    /// VMAPTI: map an event to vINTID `vintid` of vPE `vpeid`.
    Vmapti {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
        /// vPEID.
        vpeid: u32,
        /// vINTID.
        vintid: u32,
        /// Individual doorbell pINTID (1023: none).
        db: u32,
    },
    /// VMAPI: VMAPTI with vINTID = EventID.
    Vmapi {
        /// DeviceID.
        device: u32,
        /// EventID (and vINTID).
        event: u32,
        /// vPEID.
        vpeid: u32,
        /// Individual doorbell pINTID (1023: none).
        db: u32,
    },
    /// VMOVI: move a vLPI to another vPE (and optionally change its doorbell).
    Vmovi {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
        /// New vPEID.
        vpeid: u32,
        /// D: the doorbell field is valid.
        db_valid: bool,
        /// Individual doorbell pINTID.
        db: u32,
    },
    /// VMOVP: move a vPE to another redistributor.
    Vmovp {
        /// vPEID.
        vpeid: u32,
        /// RDbase field (new redistributor).
        rdbase: u64,
        /// SequenceNumber (GITS_TYPER.VMOVP = 0 only).
        seq: u16,
        /// ITSList (GITS_TYPER.VMOVP = 0 only).
        its_list: u16,
        /// DB (v4.1): Default_Doorbell is valid.
        db_valid: bool,
        /// Default_Doorbell pINTID.
        default_db: u32,
    },
    /// VSYNC: complete all effects on a vPE.
    Vsync {
        /// vPEID.
        vpeid: u32,
    },
    /// VINVALL: reload the vLPI configuration of a vPE.
    Vinvall {
        /// vPEID.
        vpeid: u32,
    },
    /// INVDB: reload the configuration of a vPE's default doorbell at every redistributor.
    Invdb {
        /// vPEID.
        vpeid: u32,
    },
    /// VSGI: configure (Clear = 0) or clear the pending state of (Clear = 1) a vSGI.
    Vsgi {
        /// vPEID.
        vpeid: u32,
        /// vINTID 0..15.
        sgi: u8,
        /// Enable.
        enable: bool,
        /// Clear.
        clear: bool,
        /// Group (1 = Group 1).
        group1: bool,
        /// Priority (bits \[7:4\] are kept).
        priority: u8,
    },
    /// Any other opcode (GICv4 virtual opcodes too when decoded by [`ItsCommand::decode`]).
    Unknown {
        /// DW0\[7:0\].
        opcode: u8,
    },
}

const RDBASE_SHIFT: u32 = 16;
const RDBASE_FIELD: u64 = 0xF_FFFF_FFFF;

impl ItsCommand {
    /// Decodes the four little-endian doublewords of one command.
    pub fn decode(dw: [u64; 4]) -> ItsCommand {
        let opcode = dw[0] as u8;
        let device = (dw[0] >> 32) as u32;
        let event = dw[1] as u32;
        let icid = dw[2] as u16;
        let rdbase = (dw[2] >> RDBASE_SHIFT) & RDBASE_FIELD;
        let valid = dw[2] >> 63 != 0;
        match opcode {
            CMD_MOVI => ItsCommand::Movi {
                device,
                event,
                icid,
            },
            CMD_INT => ItsCommand::Int { device, event },
            CMD_CLEAR => ItsCommand::Clear { device, event },
            CMD_SYNC => ItsCommand::Sync { rdbase },
            CMD_MAPD => ItsCommand::Mapd {
                device,
                size: (dw[1] & 0x1F) as u8,
                itt: dw[2] & DTE_ITT_MASK,
                valid,
            },
            CMD_MAPC => ItsCommand::Mapc {
                icid,
                rdbase,
                valid,
            },
            CMD_MAPTI => ItsCommand::Mapti {
                device,
                event,
                intid: (dw[1] >> 32) as u32,
                icid,
            },
            CMD_MAPI => ItsCommand::Mapi {
                device,
                event,
                icid,
            },
            CMD_INV => ItsCommand::Inv { device, event },
            CMD_INVALL => ItsCommand::Invall { icid },
            CMD_MOVALL => ItsCommand::Movall {
                rdbase1: rdbase,
                rdbase2: (dw[3] >> RDBASE_SHIFT) & RDBASE_FIELD,
            },
            CMD_DISCARD => ItsCommand::Discard { device, event },
            opcode => ItsCommand::Unknown { opcode },
        }
    }

    /// Decodes a command for a GICv4.1 ITS: the physical commands as [`ItsCommand::decode`],
    /// plus the virtual ones.
    pub fn decode_v41(dw: [u64; 4]) -> ItsCommand {
        let opcode = dw[0] as u8;
        let device = (dw[0] >> 32) as u32;
        let event = dw[1] as u32;
        let vpeid = ((dw[1] >> 32) & 0xFFFF) as u32;
        let rdbase = (dw[2] >> RDBASE_SHIFT) & RDBASE_FIELD;
        let addr64k = |w: u64| w & 0x000F_FFFF_FFFF_0000;
        match opcode {
            CMD_VMAPP => ItsCommand::Vmapp {
                vpeid,
                rdbase,
                valid: dw[2] >> 63 != 0,
                alloc: dw[0] & (1 << 8) != 0,
                ptz: dw[0] & (1 << 9) != 0,
                vconf: addr64k(dw[0]),
                default_db: dw[1] as u32,
                vpt: addr64k(dw[3]),
                // VPT_size is DW3[4:0]; DW3[15:5] are RES0.
                vpt_size: (dw[3] & VMAPP_VPT_SIZE_MASK) as u8,
            },
            CMD_VMAPTI => ItsCommand::Vmapti {
                device,
                event,
                vpeid,
                vintid: dw[2] as u32,
                db: (dw[2] >> 32) as u32,
            },
            CMD_VMAPI => ItsCommand::Vmapi {
                device,
                event,
                vpeid,
                db: (dw[2] >> 32) as u32,
            },
            CMD_VMOVI => ItsCommand::Vmovi {
                device,
                event,
                vpeid,
                db_valid: dw[2] & 1 != 0,
                db: (dw[2] >> 32) as u32,
            },
            CMD_VMOVP => ItsCommand::Vmovp {
                vpeid,
                rdbase,
                seq: (dw[0] >> 32) as u16,
                its_list: dw[1] as u16,
                db_valid: dw[2] >> 63 != 0,
                default_db: dw[3] as u32,
            },
            CMD_VSYNC => ItsCommand::Vsync { vpeid },
            CMD_VINVALL => ItsCommand::Vinvall { vpeid },
            CMD_INVDB => ItsCommand::Invdb { vpeid },
            CMD_VSGI => ItsCommand::Vsgi {
                vpeid,
                sgi: ((dw[0] >> 32) & 0xF) as u8,
                enable: dw[0] & (1 << 8) != 0,
                clear: dw[0] & (1 << 9) != 0,
                group1: dw[0] & (1 << 10) != 0,
                priority: (((dw[0] >> 20) & 0xF) << 4) as u8,
            },
            _ => ItsCommand::decode(dw),
        }
    }

    /// Decodes a command for a GICv4.0 ITS: the physical commands, VMAPTI, VMAPI, VMOVI,
    /// VSYNC, VINVALL as for GICv4.1, and the GICv4.0 forms of VMAPP (vPEID, RDbase, V,
    /// VPT_addr, VPT_size; DW0\[15:8\] and the VConf / default doorbell fields are RES0 and
    /// ignored) and VMOVP (SequenceNumber, ITSList, vPEID, RDbase; no DB / default doorbell).
    /// VSGI and INVDB are GICv4.1 opcodes: [`ItsCommand::Unknown`] here.
    pub fn decode_v40(dw: [u64; 4]) -> ItsCommand {
        match ItsCommand::decode_v41(dw) {
            ItsCommand::Vmapp {
                vpeid,
                rdbase,
                valid,
                vpt,
                vpt_size,
                ..
            } => ItsCommand::Vmapp {
                vpeid,
                rdbase,
                valid,
                alloc: false,
                ptz: false,
                vconf: 0,
                default_db: INTID_NO_DOORBELL,
                vpt,
                vpt_size,
            },
            ItsCommand::Vmovp {
                vpeid,
                rdbase,
                seq,
                its_list,
                ..
            } => ItsCommand::Vmovp {
                vpeid,
                rdbase,
                seq,
                its_list,
                db_valid: false,
                default_db: INTID_NO_DOORBELL,
            },
            ItsCommand::Vsgi { .. } | ItsCommand::Invdb { .. } => ItsCommand::Unknown {
                opcode: dw[0] as u8,
            },
            c => c,
        }
    }

    /// Encodes the command (inverse of [`ItsCommand::decode`] for the fields it keeps).
    pub fn encode(&self) -> [u64; 4] {
        let dev = |op: u8, d: u32| op as u64 | ((d as u64) << 32);
        let rd = |r: u64| (r & RDBASE_FIELD) << RDBASE_SHIFT;
        match *self {
            ItsCommand::Movi {
                device,
                event,
                icid,
            } => [dev(CMD_MOVI, device), event as u64, icid as u64, 0],
            ItsCommand::Int { device, event } => [dev(CMD_INT, device), event as u64, 0, 0],
            ItsCommand::Clear { device, event } => [dev(CMD_CLEAR, device), event as u64, 0, 0],
            ItsCommand::Sync { rdbase } => [CMD_SYNC as u64, 0, rd(rdbase), 0],
            ItsCommand::Mapd {
                device,
                size,
                itt,
                valid,
            } => [
                dev(CMD_MAPD, device),
                (size & 0x1F) as u64,
                (itt & DTE_ITT_MASK) | ((valid as u64) << 63),
                0,
            ],
            ItsCommand::Mapc {
                icid,
                rdbase,
                valid,
            } => [
                CMD_MAPC as u64,
                0,
                icid as u64 | rd(rdbase) | ((valid as u64) << 63),
                0,
            ],
            ItsCommand::Mapti {
                device,
                event,
                intid,
                icid,
            } => [
                dev(CMD_MAPTI, device),
                event as u64 | ((intid as u64) << 32),
                icid as u64,
                0,
            ],
            ItsCommand::Mapi {
                device,
                event,
                icid,
            } => [dev(CMD_MAPI, device), event as u64, icid as u64, 0],
            ItsCommand::Inv { device, event } => [dev(CMD_INV, device), event as u64, 0, 0],
            ItsCommand::Invall { icid } => [CMD_INVALL as u64, 0, icid as u64, 0],
            ItsCommand::Movall { rdbase1, rdbase2 } => {
                [CMD_MOVALL as u64, 0, rd(rdbase1), rd(rdbase2)]
            }
            ItsCommand::Discard { device, event } => [dev(CMD_DISCARD, device), event as u64, 0, 0],
            ItsCommand::Vmapp {
                vpeid,
                rdbase,
                valid,
                alloc,
                ptz,
                vconf,
                default_db,
                vpt,
                vpt_size,
            } => [
                CMD_VMAPP as u64
                    | ((alloc as u64) << 8)
                    | ((ptz as u64) << 9)
                    | (vconf & 0x000F_FFFF_FFFF_0000),
                default_db as u64 | (((vpeid & 0xFFFF) as u64) << 32),
                rd(rdbase) | ((valid as u64) << 63),
                (vpt & 0x000F_FFFF_FFFF_0000) | (vpt_size as u64 & VMAPP_VPT_SIZE_MASK),
            ],
            ItsCommand::Vmapti {
                device,
                event,
                vpeid,
                vintid,
                db,
            } => [
                dev(CMD_VMAPTI, device),
                event as u64 | (((vpeid & 0xFFFF) as u64) << 32),
                vintid as u64 | ((db as u64) << 32),
                0,
            ],
            ItsCommand::Vmapi {
                device,
                event,
                vpeid,
                db,
            } => [
                dev(CMD_VMAPI, device),
                event as u64 | (((vpeid & 0xFFFF) as u64) << 32),
                (db as u64) << 32,
                0,
            ],
            ItsCommand::Vmovi {
                device,
                event,
                vpeid,
                db_valid,
                db,
            } => [
                dev(CMD_VMOVI, device),
                event as u64 | (((vpeid & 0xFFFF) as u64) << 32),
                db_valid as u64 | ((db as u64) << 32),
                0,
            ],
            ItsCommand::Vmovp {
                vpeid,
                rdbase,
                seq,
                its_list,
                db_valid,
                default_db,
            } => [
                CMD_VMOVP as u64 | ((seq as u64) << 32),
                its_list as u64 | (((vpeid & 0xFFFF) as u64) << 32),
                rd(rdbase) | ((db_valid as u64) << 63),
                default_db as u64,
            ],
            ItsCommand::Vsync { vpeid } => {
                [CMD_VSYNC as u64, ((vpeid & 0xFFFF) as u64) << 32, 0, 0]
            }
            ItsCommand::Vinvall { vpeid } => {
                [CMD_VINVALL as u64, ((vpeid & 0xFFFF) as u64) << 32, 0, 0]
            }
            ItsCommand::Invdb { vpeid } => {
                [CMD_INVDB as u64, ((vpeid & 0xFFFF) as u64) << 32, 0, 0]
            }
            ItsCommand::Vsgi {
                vpeid,
                sgi,
                enable,
                clear,
                group1,
                priority,
            } => [
                CMD_VSGI as u64
                    | ((enable as u64) << 8)
                    | ((clear as u64) << 9)
                    | ((group1 as u64) << 10)
                    | (((priority >> 4) as u64) << 20)
                    | (((sgi & 0xF) as u64) << 32),
                ((vpeid & 0xFFFF) as u64) << 32,
                0,
                0,
            ],
            ItsCommand::Unknown { opcode } => [opcode as u64, 0, 0, 0],
        }
    }

    /// Encodes the command as the 32 bytes software writes to the command queue.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, d) in self.encode().iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
        }
        out
    }
}

/// Why the ITS ignored a command or a translation request. The names follow the
/// architecture's command error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum ItsCommandError {
    /// The DeviceID exceeds GITS_TYPER.Devbits or the device table.
    #[error("DeviceID {0:#x} is out of range of the device table")]
    DeviceOutOfRange(u32),
    /// The device has no valid device table entry (or its level-2 page is missing).
    #[error("DeviceID {0:#x} is not mapped")]
    UnmappedDevice(u32),
    /// MAPD asked for more EventID bits than GITS_TYPER.IDbits allows.
    #[error("MAPD Size {0} exceeds the supported EventID bits")]
    IttSizeOutOfRange(u8),
    /// The EventID exceeds the size the device was mapped with.
    #[error("EventID {event:#x} is out of range for DeviceID {device:#x}")]
    EventOutOfRange {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// The event has no valid interrupt translation entry.
    #[error("EventID {event:#x} of DeviceID {device:#x} is not mapped")]
    UnmappedEvent {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// The INTID is not a valid LPI INTID.
    #[error("INTID {0:#x} is not a valid LPI")]
    IntIdOutOfRange(u32),
    /// The collection ID exceeds the collection table.
    #[error("collection {0} is out of range of the collection table")]
    CollectionOutOfRange(u16),
    /// The collection has no valid collection table entry.
    #[error("collection {0} is not mapped")]
    UnmappedCollection(u16),
    /// The RDbase field names no redistributor.
    #[error("RDbase {0:#x} names no redistributor")]
    RdbaseOutOfRange(u64),
    /// The vPEID exceeds the vPEID bits or the vPE table (or its level-2 page is missing).
    #[error("vPEID {0} is out of range of the vPE table")]
    VpeOutOfRange(u32),
    /// The vPE is not mapped on this ITS.
    #[error("vPEID {0} is not mapped on this ITS")]
    UnmappedVpe(u32),
    /// VMOVP (GITS_TYPER.VMOVP = 0) with an ITSList that does not name this ITS.
    #[error("VMOVP ITSList {0:#06x} does not include this ITS")]
    NotInItsList(u16),
    /// An individual doorbell was requested on an ITS with GITS_TYPER.nID = 1.
    #[error("individual doorbell {0} requested but GITS_TYPER.nID = 1")]
    IndividualDoorbell(u32),
    /// The opcode is not a GICv3 physical command.
    #[error("unknown or unsupported command opcode {0:#x}")]
    UnknownCommand(u8),
    /// GITS_CWRITER points outside the command queue.
    #[error("GITS_CWRITER offset {0:#x} is outside the command queue")]
    CwriterOutOfRange(u64),
    /// A translation arrived while GITS_CTLR.Enabled = 0.
    #[error("translation request while the ITS is disabled")]
    Disabled,
    /// A table or the command queue is not backed by guest memory: the ITS stalls.
    #[error("guest memory at {0:#x} is not accessible")]
    Memory(u64),
}

impl From<MemError> for ItsCommandError {
    fn from(e: MemError) -> Self {
        match e {
            MemError::Unbacked { addr, .. } => ItsCommandError::Memory(addr),
        }
    }
}

/// Where an error record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItsErrorSource {
    /// A command at this command queue byte offset, with this opcode.
    Command {
        /// Offset of the command in the queue.
        offset: u64,
        /// DW0\[7:0\].
        opcode: u8,
    },
    /// A GITS_SGIR write (GICv4.1).
    Sgir {
        /// vPEID.
        vpeid: u32,
        /// vINTID.
        sgi: u8,
    },
    /// A GITS_TRANSLATER write or [`crate::Gic::send_msi`] call.
    Translation {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
}

/// One ITS error record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItsErrorRecord {
    /// Where it came from.
    pub source: ItsErrorSource,
    /// What went wrong.
    pub error: ItsCommandError,
}

/// Saved state of one ITS (everything it keeps outside guest memory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItsState {
    /// GITS_CTLR.Enabled.
    pub enabled: bool,
    /// GITS_CBASER.
    pub cbaser: u64,
    /// GITS_CWRITER.
    pub cwriter: u64,
    /// GITS_CREADR offset.
    pub creadr: u64,
    /// GITS_CREADR.Stalled.
    pub stalled: bool,
    /// GITS_BASER`<n>`.
    pub baser: Vec<u64>,
    /// Error records, oldest first.
    pub errors: Vec<ItsErrorRecord>,
    /// Errors ever recorded.
    pub error_count: u64,
    /// Commands ever executed (including ignored ones).
    pub commands_processed: u64,
    /// GITS_CTLR.ITS_Number (GICv4 ITSs with GITS_TYPER.VMOVP = 0).
    #[serde(default)]
    pub its_number: u8,
}

/// Result of locating a table entry.
enum Slot {
    At(u64),
    OutOfRange,
    NoL2,
}

/// Where an event translates to.
struct Translation {
    ite_addr: u64,
    intid: u32,
    icid: u16,
}

/// The table a GITS_BASER<n> register describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TableGeom {
    valid: bool,
    indirect: bool,
    /// Physical address of the table (the level-1 table when indirect).
    base: u64,
    /// Entry size in bytes.
    esz: u64,
    /// Size of the (level-1) table in bytes.
    bytes: u64,
    /// Page size in bytes.
    page: u64,
}

impl TableGeom {
    fn of(baser: u64) -> TableGeom {
        let page = baser_page_size(baser);
        TableGeom {
            valid: baser & GITS_BASER_VALID != 0,
            indirect: baser & GITS_BASER_INDIRECT != 0,
            base: baser_address(baser),
            esz: ((baser >> GITS_BASER_ENTRY_SIZE_SHIFT) & 0x1F) + 1,
            bytes: ((baser & GITS_BASER_SIZE_MASK) + 1) * page,
            page,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Its {
    cfg: ItsConfig,
    enabled: bool,
    cbaser: u64,
    cwriter: u64,
    creadr: u64,
    stalled: bool,
    baser: [u64; GITS_BASER_COUNT],
    /// `baser`, decoded whenever one is written (every translation looks tables up).
    geom: [TableGeom; GITS_BASER_COUNT],
    errors: VecDeque<ItsErrorRecord>,
    error_count: u64,
    commands_processed: u64,
    index: usize,
    v41: Option<V41Config>,
    its_number: u8,
}

/// Everything a command may touch besides the ITS itself.
pub(crate) struct ItsEnv<'a, M> {
    pub(crate) rds: &'a mut [Redistributor],
    pub(crate) mem: &'a mut LoggedMem<M>,
    pub(crate) gic: &'a GicConfig,
    pub(crate) v41: Option<&'a mut V41>,
}

/// A virtual LPI mapping read from an ITE.
struct VTranslation {
    ite_addr: u64,
    vpeid: u32,
    vintid: u32,
    db: u32,
}

fn virtual_ite(vpeid: u32, vintid: u32, db: u32) -> [u8; ITE_SIZE as usize] {
    let w0 =
        ITE_VALID | (ITE_TYPE_VIRTUAL << ITE_TYPE_SHIFT) | ((vintid as u64) << ITE_INTID_SHIFT);
    let w1 = db as u64 | (((vpeid & 0xFFFF) as u64) << ITE_VPEID_SHIFT);
    let mut b = [0u8; ITE_SIZE as usize];
    b[..8].copy_from_slice(&w0.to_le_bytes());
    b[8..].copy_from_slice(&w1.to_le_bytes());
    b
}

/// Moves LPI `intid` from redistributor `from` to `to` (MOVI, MOVALL).
///
/// The destination reloads the LPI's configuration from the property table: it may never have
/// seen the INV that made the source's copy current, and Linux sends no INV after MOVI
/// (IHI 0069, MOVI/MOVALL; INV makes cached configuration consistent with memory). Pending
/// state moves only if the destination can hold it (GICR_CTLR.EnableLPIs = 1 and the INTID in
/// its range): otherwise it stays pending at the source, so nothing is lost (QEMU does the
/// same; forwarding to a redistributor with LPIs disabled is not architected).
fn move_lpi<M: GuestMem>(
    env: &mut ItsEnv<'_, M>,
    from: usize,
    to: usize,
    intid: u32,
) -> Result<(), ItsCommandError> {
    env.rds[to].invalidate_one(env.mem, intid);
    if !env.rds[from].lpi_pending.contains(intid) || !env.rds[to].accepts_lpi(intid) {
        return Ok(());
    }
    if env.rds[to].set_lpi_pending(env.mem, intid, true)? {
        env.rds[from].set_lpi_pending(env.mem, intid, false)?;
    }
    Ok(())
}

fn baser_page_size(baser: u64) -> u64 {
    match (baser >> GITS_BASER_PAGE_SIZE_SHIFT) & GITS_BASER_PAGE_SIZE_FIELD {
        0 => 0x1000,
        1 => 0x4000,
        _ => 0x1_0000,
    }
}

fn baser_address(baser: u64) -> u64 {
    let page = baser_page_size(baser);
    if page == 0x1_0000 {
        // 64 KiB pages: PA[51:48] lives in bits [15:12].
        (baser & GITS_BASER_PA_MASK & !0xFFFF) | (((baser >> 12) & 0xF) << 48)
    } else {
        baser & GITS_BASER_PA_MASK & !(page - 1)
    }
}

impl Its {
    pub(crate) fn new(cfg: ItsConfig, index: usize, v41: Option<V41Config>) -> Self {
        let mut its = Its {
            index,
            v41,
            its_number: index as u8 & 0xF,
            cfg,
            enabled: false,
            cbaser: 0,
            cwriter: 0,
            creadr: 0,
            stalled: false,
            baser: [0; GITS_BASER_COUNT],
            geom: [TableGeom::default(); GITS_BASER_COUNT],
            errors: VecDeque::new(),
            error_count: 0,
            commands_processed: 0,
        };
        for n in 0..GITS_BASER_COUNT {
            // Reset Page_Size is 64 KiB for the implemented tables.
            let page = if its.baser_type(n) != GITS_BASER_TYPE_NONE {
                2 << GITS_BASER_PAGE_SIZE_SHIFT
            } else {
                0
            };
            its.set_baser(n, its.baser_ro_bits(n) | page);
        }
        its
    }

    pub(crate) fn config(&self) -> &ItsConfig {
        &self.cfg
    }

    /// Sets GITS_BASER<n> (the only way it changes) and its decoded table.
    fn set_baser(&mut self, n: usize, v: u64) {
        self.baser[n] = v;
        self.geom[n] = TableGeom::of(v);
    }

    /// A GICv4.0 ITS (v4.0 command forms, per-vLPI doorbells only).
    fn is_v40(&self) -> bool {
        self.v41.as_ref().is_some_and(|v| v.v4_0)
    }

    fn baser_type(&self, n: usize) -> u64 {
        match n {
            0 => GITS_BASER_TYPE_DEVICE,
            1 => GITS_BASER_TYPE_COLLECTION,
            2 if self.v41.is_some() => GITS_BASER_TYPE_VPE,
            _ => GITS_BASER_TYPE_NONE,
        }
    }

    fn baser_ro_bits(&self, n: usize) -> u64 {
        let ty = self.baser_type(n);
        let esz = match ty {
            GITS_BASER_TYPE_DEVICE => DTE_SIZE,
            GITS_BASER_TYPE_COLLECTION => CTE_SIZE,
            GITS_BASER_TYPE_VPE => VPE_ENTRY_SIZE,
            _ => return 0,
        };
        (ty << GITS_BASER_TYPE_SHIFT) | ((esz - 1) << GITS_BASER_ENTRY_SIZE_SHIFT)
    }

    pub(crate) fn typer(&self) -> u64 {
        GITS_TYPER_PHYSICAL
            | ((ITE_SIZE - 1) << GITS_TYPER_ITT_ENTRY_SIZE_SHIFT)
            | (((self.cfg.event_bits - 1) as u64) << GITS_TYPER_IDBITS_SHIFT)
            | (((self.cfg.device_bits - 1) as u64) << GITS_TYPER_DEVBITS_SHIFT)
            | if self.cfg.pta { GITS_TYPER_PTA } else { 0 }
            | (15 << GITS_TYPER_CIDBITS_SHIFT)
            | GITS_TYPER_CIL
            | self.v41.as_ref().filter(|v| v.v4_0).map_or(0, |v| {
                // GICv4.0: Virtual and the VMOVP form; VMAPP/SVPET/VSGI/nID are GICv4.1.
                GITS_TYPER_VIRTUAL | if v.vmovp { GITS_TYPER_VMOVP } else { 0 }
            })
            | self.v41.as_ref().filter(|v| !v.v4_0).map_or(0, |v| {
                GITS_TYPER_VIRTUAL
                    | GITS_TYPER_VMAPP
                    | if v.vmovp { GITS_TYPER_VMOVP } else { 0 }
                    | if v.nassgi_cap { GITS_TYPER_VSGI } else { 0 }
                    | ((v.svpet as u64 & 3) << GITS_TYPER_SVPET_SHIFT)
                    | if v.no_individual_doorbells {
                        1 << 43
                    } else {
                        0
                    }
            })
    }

    pub(crate) fn errors(&self) -> impl Iterator<Item = &ItsErrorRecord> {
        self.errors.iter()
    }

    pub(crate) fn error_count(&self) -> u64 {
        self.error_count
    }

    pub(crate) fn commands_processed(&self) -> u64 {
        self.commands_processed
    }

    fn record(&mut self, source: ItsErrorSource, error: ItsCommandError) {
        if self.errors.len() == ITS_ERROR_RECORDS {
            self.errors.pop_front();
        }
        self.errors.push_back(ItsErrorRecord { source, error });
        self.error_count += 1;
    }

    fn queue_size(&self) -> u64 {
        ((self.cbaser & GITS_CBASER_SIZE_MASK) + 1) * 0x1000
    }

    pub(crate) fn read(&self, offset: u64, width: u8) -> Result<u64, MmioError> {
        match offset {
            GITS_CTLR => {
                only32(offset, width)?;
                let en = if self.enabled { GITS_CTLR_ENABLED } else { 0 };
                let v4 = match &self.v41 {
                    // GICv4.0: ITS_Number only matters (and is only shown) for ITSList VMOVPs.
                    Some(v) if v.v4_0 && !v.vmovp => {
                        (self.its_number as u32) << GITS_CTLR_ITS_NUMBER_SHIFT
                    }
                    Some(v) if v.v4_0 => 0,
                    Some(_) => {
                        GITS_CTLR_IMDE | ((self.its_number as u32) << GITS_CTLR_ITS_NUMBER_SHIFT)
                    }
                    None => 0,
                };
                Ok((en | v4 | GITS_CTLR_QUIESCENT) as u64)
            }
            GITS_MPIDR if self.v41.is_some() && !self.is_v40() => {
                // The ITS claims affinity 0.0.0: with SVPET it shares the vPE table with
                // the redistributors of that group.
                only32(offset, width).map(|_| 0)
            }
            GITS_IIDR => only32(offset, width).map(|_| IIDR_VALUE as u64),
            o if (GITS_TYPER..GITS_TYPER + 8).contains(&o) => {
                let pos = half64(GITS_TYPER, o, width)?;
                Ok(read_part(self.typer(), pos, width))
            }
            o if (GITS_CBASER..GITS_CBASER + 8).contains(&o) => {
                let pos = half64(GITS_CBASER, o, width)?;
                Ok(read_part(self.cbaser, pos, width))
            }
            o if (GITS_CWRITER..GITS_CWRITER + 8).contains(&o) => {
                let pos = half64(GITS_CWRITER, o, width)?;
                Ok(read_part(self.cwriter, pos, width))
            }
            o if (GITS_CREADR..GITS_CREADR + 8).contains(&o) => {
                let pos = half64(GITS_CREADR, o, width)?;
                let v = self.creadr | if self.stalled { GITS_CREADR_STALLED } else { 0 };
                Ok(read_part(v, pos, width))
            }
            o if (GITS_BASER..GITS_BASER + 8 * GITS_BASER_COUNT as u64).contains(&o) => {
                let n = ((o - GITS_BASER) / 8) as usize;
                let pos = half64(GITS_BASER + 8 * n as u64, o, width)?;
                Ok(read_part(self.baser[n], pos, width))
            }
            o if id_register(o).is_some() => {
                only32(offset, width).map(|_| id_register(o).unwrap_or(0) as u64)
            }
            GITS_TRANSLATER => {
                if width == 2 || width == 4 {
                    Ok(0)
                } else {
                    Err(MmioError::WidthNotPermitted { offset, width })
                }
            }
            _ => Ok(0),
        }
    }

    /// Handles a register write. Returns true when the command queue should be processed.
    pub(crate) fn write_reg(
        &mut self,
        offset: u64,
        width: u8,
        value: u64,
    ) -> Result<bool, MmioError> {
        match offset {
            GITS_CTLR => {
                only32(offset, width)?;
                let was = self.enabled;
                self.enabled = value as u32 & GITS_CTLR_ENABLED != 0;
                // ITS_Number is writable (while disabled) only where VMOVP needs ITSLists.
                if self.v41.as_ref().is_some_and(|v| !v.vmovp) && !was {
                    self.its_number = ((value >> GITS_CTLR_ITS_NUMBER_SHIFT) & 0xF) as u8;
                }
                Ok(self.enabled && !was)
            }
            o if o == GITS_IIDR || id_register(o).is_some() => only32(offset, width).map(|_| false),
            o if (GITS_TYPER..GITS_TYPER + 8).contains(&o) => {
                half64(GITS_TYPER, o, width).map(|_| false)
            }
            o if (GITS_CBASER..GITS_CBASER + 8).contains(&o) => {
                let pos = half64(GITS_CBASER, o, width)?;
                // UNPREDICTABLE while enabled: ignored.
                if !self.enabled {
                    self.cbaser = merge_part(self.cbaser, value, pos, width) & GITS_CBASER_MASK;
                    self.creadr = 0;
                    self.stalled = false;
                }
                Ok(false)
            }
            o if (GITS_CWRITER..GITS_CWRITER + 8).contains(&o) => {
                let pos = half64(GITS_CWRITER, o, width)?;
                let v = merge_part(self.cwriter, value, pos, width);
                self.cwriter = v & GITS_CMDQ_OFFSET_MASK;
                if v & GITS_CWRITER_RETRY != 0 && pos == 0 {
                    self.stalled = false;
                }
                Ok(true)
            }
            o if (GITS_CREADR..GITS_CREADR + 8).contains(&o) => {
                half64(GITS_CREADR, o, width).map(|_| false)
            }
            o if (GITS_BASER..GITS_BASER + 8 * GITS_BASER_COUNT as u64).contains(&o) => {
                let n = ((o - GITS_BASER) / 8) as usize;
                let pos = half64(GITS_BASER + 8 * n as u64, o, width)?;
                if self.baser_type(n) != GITS_BASER_TYPE_NONE && !self.enabled {
                    let mut v = merge_part(self.baser[n], value, pos, width) & GITS_BASER_RW_MASK;
                    // Page_Size 0b11 is reserved: the model treats it as 64 KiB.
                    if (v >> GITS_BASER_PAGE_SIZE_SHIFT) & GITS_BASER_PAGE_SIZE_FIELD == 3 {
                        v &= !(1 << GITS_BASER_PAGE_SIZE_SHIFT);
                    }
                    self.set_baser(n, v | self.baser_ro_bits(n));
                }
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    /// Runs commands from GITS_CREADR up to GITS_CWRITER. Stops on a stall.
    pub(crate) fn process<M: GuestMem>(&mut self, env: &mut ItsEnv<'_, M>) {
        if !self.enabled || self.stalled || self.cbaser & GITS_CBASER_VALID == 0 {
            return;
        }
        let size = self.queue_size();
        if self.cwriter >= size {
            self.stalled = true;
            self.record(
                ItsErrorSource::Command {
                    offset: self.creadr,
                    opcode: 0,
                },
                ItsCommandError::CwriterOutOfRange(self.cwriter),
            );
            return;
        }
        let base = self.cbaser & GITS_CBASER_PA_MASK;
        // Bounded by the queue size even if state were inconsistent.
        let mut budget = size / ITS_CMD_SIZE;
        while self.creadr != self.cwriter && budget > 0 {
            budget -= 1;
            if self.creadr >= size {
                self.creadr = 0;
            }
            let offset = self.creadr;
            let mut raw = [0u8; 32];
            if let Err(e) = env.mem.read(base + offset, &mut raw) {
                self.stalled = true;
                self.record(
                    ItsErrorSource::Command { offset, opcode: 0 },
                    ItsCommandError::from(e),
                );
                return;
            }
            let mut dw = [0u64; 4];
            for (i, d) in dw.iter_mut().enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
                *d = u64::from_le_bytes(b);
            }
            let cmd = if self.is_v40() {
                ItsCommand::decode_v40(dw)
            } else if self.v41.is_some() {
                ItsCommand::decode_v41(dw)
            } else {
                ItsCommand::decode(dw)
            };
            self.commands_processed += 1;
            match self.execute(env, cmd) {
                Ok(()) => {}
                Err(ItsCommandError::Memory(a)) => {
                    self.stalled = true;
                    self.record(
                        ItsErrorSource::Command {
                            offset,
                            opcode: dw[0] as u8,
                        },
                        ItsCommandError::Memory(a),
                    );
                    return;
                }
                Err(e) => self.record(
                    ItsErrorSource::Command {
                        offset,
                        opcode: dw[0] as u8,
                    },
                    e,
                ),
            }
            self.creadr = (offset + ITS_CMD_SIZE) % size;
        }
    }

    /// Locates entry `index` of the table described by BASER`<n>`.
    fn slot<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        n: usize,
        index: u64,
    ) -> Result<Slot, MemError> {
        let TableGeom {
            valid,
            indirect,
            base,
            esz,
            bytes,
            page,
        } = self.geom[n];
        if !valid {
            return Ok(Slot::OutOfRange);
        }
        if !indirect {
            return Ok(if (index + 1) * esz <= bytes {
                Slot::At(base + index * esz)
            } else {
                Slot::OutOfRange
            });
        }
        let per_page = page / esz;
        let l1 = index / per_page;
        if (l1 + 1) * 8 > bytes {
            return Ok(Slot::OutOfRange);
        }
        let l1e = mem.read_u64(base + l1 * 8)?;
        if l1e & GITS_L1E_VALID == 0 {
            return Ok(Slot::NoL2);
        }
        let l2 = l1e & GITS_L1E_PA_MASK & !(page - 1);
        Ok(Slot::At(l2 + (index % per_page) * esz))
    }

    fn device_slot<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        device: u32,
    ) -> Result<u64, ItsCommandError> {
        if (device as u64) >> self.cfg.device_bits != 0 {
            return Err(ItsCommandError::DeviceOutOfRange(device));
        }
        match self.slot(mem, 0, device as u64)? {
            Slot::At(a) => Ok(a),
            Slot::OutOfRange => Err(ItsCommandError::DeviceOutOfRange(device)),
            Slot::NoL2 => Err(ItsCommandError::UnmappedDevice(device)),
        }
    }

    fn collection_slot<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        icid: u16,
    ) -> Result<u64, ItsCommandError> {
        match self.slot(mem, 1, icid as u64)? {
            Slot::At(a) => Ok(a),
            Slot::OutOfRange | Slot::NoL2 => Err(ItsCommandError::CollectionOutOfRange(icid)),
        }
    }

    /// Reads a DTE: returns (ITT address, EventID bits).
    fn device<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        device: u32,
    ) -> Result<(u64, u8), ItsCommandError> {
        let dte = mem.read_u64(self.device_slot(mem, device)?)?;
        if dte & DTE_VALID == 0 {
            return Err(ItsCommandError::UnmappedDevice(device));
        }
        let bits = ((dte >> DTE_SIZE_SHIFT) & DTE_SIZE_FIELD) as u8 + 1;
        Ok((dte & DTE_ITT_MASK, bits))
    }

    fn ite_addr<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        device: u32,
        event: u32,
    ) -> Result<u64, ItsCommandError> {
        let (itt, bits) = self.device(mem, device)?;
        if (event as u64) >> bits != 0 {
            return Err(ItsCommandError::EventOutOfRange { device, event });
        }
        Ok(itt + event as u64 * ITE_SIZE)
    }

    fn translation<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        device: u32,
        event: u32,
    ) -> Result<Translation, ItsCommandError> {
        let ite_addr = self.ite_addr(mem, device, event)?;
        let ite = mem.read_u64(ite_addr)?;
        if ite & ITE_VALID == 0 || (ite >> ITE_TYPE_SHIFT) & ITE_TYPE_FIELD != ITE_TYPE_PHYSICAL {
            return Err(ItsCommandError::UnmappedEvent { device, event });
        }
        Ok(Translation {
            ite_addr,
            intid: (ite >> ITE_INTID_SHIFT) as u32,
            icid: (ite >> ITE_ICID_SHIFT) as u16,
        })
    }

    /// Maps an RDbase field to a PE index.
    fn rd_index(&self, gic: &GicConfig, rdbase: u64) -> Result<usize, ItsCommandError> {
        let pe = if self.cfg.pta {
            match gic.rd_at(rdbase << 16) {
                Some((pe, 0)) => pe as u64,
                _ => return Err(ItsCommandError::RdbaseOutOfRange(rdbase)),
            }
        } else {
            rdbase
        };
        if pe < gic.num_pes() as u64 {
            Ok(pe as usize)
        } else {
            Err(ItsCommandError::RdbaseOutOfRange(rdbase))
        }
    }

    /// Reads a CTE and returns the PE it targets.
    fn collection_target<M: GuestMem>(
        &self,
        mem: &LoggedMem<M>,
        gic: &GicConfig,
        icid: u16,
    ) -> Result<usize, ItsCommandError> {
        let cte = mem.read_u64(self.collection_slot(mem, icid)?)?;
        if cte & CTE_VALID == 0 {
            return Err(ItsCommandError::UnmappedCollection(icid));
        }
        self.rd_index(gic, (cte >> CTE_RDBASE_SHIFT) & CTE_RDBASE_FIELD)
    }

    fn lpi_valid(gic: &GicConfig, intid: u32) -> bool {
        intid >= LPI_BASE && (intid as u64) < (1u64 << gic.lpi_id_bits)
    }

    fn execute<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        cmd: ItsCommand,
    ) -> Result<(), ItsCommandError> {
        match cmd {
            ItsCommand::Mapd {
                device,
                size,
                itt,
                valid,
            } => {
                let slot = self.device_slot(env.mem, device)?;
                if size + 1 > self.cfg.event_bits {
                    return Err(ItsCommandError::IttSizeOutOfRange(size));
                }
                let dte = if valid {
                    DTE_VALID | ((size as u64) << DTE_SIZE_SHIFT) | (itt & DTE_ITT_MASK)
                } else {
                    0
                };
                env.mem.write_u64(slot, dte)?;
                Ok(())
            }
            ItsCommand::Mapc {
                icid,
                rdbase,
                valid,
            } => {
                let slot = self.collection_slot(env.mem, icid)?;
                let cte = if valid {
                    self.rd_index(env.gic, rdbase)?;
                    CTE_VALID | ((rdbase & CTE_RDBASE_FIELD) << CTE_RDBASE_SHIFT)
                } else {
                    0
                };
                env.mem.write_u64(slot, cte)?;
                Ok(())
            }
            ItsCommand::Mapti {
                device,
                event,
                intid,
                icid,
            } => self.map_event(env, device, event, intid, icid),
            ItsCommand::Mapi {
                device,
                event,
                icid,
            } => self.map_event(env, device, event, event, icid),
            ItsCommand::Int { device, event } => self.deliver(env, device, event, true).map(drop),
            ItsCommand::Clear { device, event } => {
                self.deliver(env, device, event, false).map(drop)
            }
            ItsCommand::Inv { device, event } => {
                if let Some(vt) = self.vtranslation(env, device, event)? {
                    if let Some(v4) = env.v41.as_deref_mut() {
                        v4.reload_one(env.mem, vt.vpeid, vt.vintid);
                        v4.check_doorbell(env.rds, env.mem, vt.vpeid)?;
                    }
                    return Ok(());
                }
                let t = self.translation(env.mem, device, event)?;
                let pe = self.collection_target(env.mem, env.gic, t.icid)?;
                env.rds[pe].invalidate_one(env.mem, t.intid);
                Ok(())
            }
            ItsCommand::Invall { icid } => {
                let pe = self.collection_target(env.mem, env.gic, icid)?;
                env.rds[pe].invalidate_all(env.mem);
                Ok(())
            }
            ItsCommand::Discard { device, event } => {
                if let Some(vt) = self.vtranslation(env, device, event)? {
                    if let Some(v4) = env.v41.as_deref_mut() {
                        v4.set_vlpi_pending(
                            env.rds,
                            env.mem,
                            vt.vpeid,
                            vt.vintid,
                            false,
                            INTID_NO_DOORBELL,
                        )?;
                    }
                    env.mem.write(vt.ite_addr, &[0u8; ITE_SIZE as usize])?;
                    return Ok(());
                }
                let t = self.translation(env.mem, device, event)?;
                let pe = self.collection_target(env.mem, env.gic, t.icid)?;
                env.rds[pe].set_lpi_pending(env.mem, t.intid, false)?;
                env.mem.write(t.ite_addr, &[0u8; ITE_SIZE as usize])?;
                Ok(())
            }
            ItsCommand::Movi {
                device,
                event,
                icid,
            } => {
                let t = self.translation(env.mem, device, event)?;
                let old = self.collection_target(env.mem, env.gic, t.icid)?;
                let new = self.collection_target(env.mem, env.gic, icid)?;
                if old != new {
                    move_lpi(env, old, new, t.intid)?;
                }
                let ite = ITE_VALID
                    | (ITE_TYPE_PHYSICAL << ITE_TYPE_SHIFT)
                    | ((icid as u64) << ITE_ICID_SHIFT)
                    | ((t.intid as u64) << ITE_INTID_SHIFT);
                env.mem.write_u64(t.ite_addr, ite)?;
                Ok(())
            }
            ItsCommand::Movall { rdbase1, rdbase2 } => {
                let from = self.rd_index(env.gic, rdbase1)?;
                let to = self.rd_index(env.gic, rdbase2)?;
                if from != to {
                    let moving: Vec<u32> = env.rds[from].lpi_pending.iter().collect();
                    for intid in moving {
                        move_lpi(env, from, to, intid)?;
                    }
                }
                Ok(())
            }
            ItsCommand::Sync { rdbase } => self.rd_index(env.gic, rdbase).map(|_| ()),
            ItsCommand::Unknown { opcode } => Err(ItsCommandError::UnknownCommand(opcode)),
            virt => self.execute_virtual(env, virt),
        }
    }

    fn map_event<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        device: u32,
        event: u32,
        intid: u32,
        icid: u16,
    ) -> Result<(), ItsCommandError> {
        let addr = self.ite_addr(env.mem, device, event)?;
        if !Self::lpi_valid(env.gic, intid) {
            return Err(ItsCommandError::IntIdOutOfRange(intid));
        }
        self.collection_slot(env.mem, icid)?;
        let ite = ITE_VALID
            | (ITE_TYPE_PHYSICAL << ITE_TYPE_SHIFT)
            | ((icid as u64) << ITE_ICID_SHIFT)
            | ((intid as u64) << ITE_INTID_SHIFT);
        let mut bytes = [0u8; ITE_SIZE as usize];
        bytes[..8].copy_from_slice(&ite.to_le_bytes());
        env.mem.write(addr, &bytes)?;
        Ok(())
    }

    /// Sets or clears an event's pending state. Returns the PE whose redistributor holds
    /// the physical LPI (the only state changed), or `None` for a virtual LPI (which may
    /// also ring a doorbell elsewhere).
    fn deliver<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        device: u32,
        event: u32,
        pending: bool,
    ) -> Result<Option<usize>, ItsCommandError> {
        if let Some(vt) = self.vtranslation(env, device, event)? {
            if let Some(v4) = env.v41.as_deref_mut() {
                if self.is_v40() {
                    // GICv4.0 checks the vPE and the vINTID when the event is translated
                    // (VMAPTI does not need the vPE mapped).
                    self.mapped_here(v4, vt.vpeid)?;
                }
                v4.set_vlpi_pending(env.rds, env.mem, vt.vpeid, vt.vintid, pending, vt.db)?;
            }
            return Ok(None);
        }
        let t = self.translation(env.mem, device, event)?;
        let pe = self.collection_target(env.mem, env.gic, t.icid)?;
        env.rds[pe].set_lpi_pending(env.mem, t.intid, pending)?;
        Ok(Some(pe))
    }

    /// An MSI write to GITS_TRANSLATER from `device` with `event`. Errors are recorded.
    /// Returns what [`Its::deliver`] does: the PE whose redistributor alone changed, if
    /// that is known.
    pub(crate) fn translate<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        device: u32,
        event: u32,
    ) -> Result<Option<usize>, ItsCommandError> {
        let r = if self.enabled {
            self.deliver(env, device, event, true)
        } else {
            Err(ItsCommandError::Disabled)
        };
        if let Err(e) = r {
            self.record(ItsErrorSource::Translation { device, event }, e);
        }
        r
    }

    /// Reads an event's ITE when it maps a virtual LPI (`None` for a physical one; errors as
    /// for any translation when the device or event is not mapped).
    fn vtranslation<M: GuestMem>(
        &self,
        env: &ItsEnv<'_, M>,
        device: u32,
        event: u32,
    ) -> Result<Option<VTranslation>, ItsCommandError> {
        if env.v41.is_none() {
            return Ok(None);
        }
        let ite_addr = self.ite_addr(env.mem, device, event)?;
        let w0 = env.mem.read_u64(ite_addr)?;
        if w0 & ITE_VALID == 0 || (w0 >> ITE_TYPE_SHIFT) & ITE_TYPE_FIELD != ITE_TYPE_VIRTUAL {
            return Ok(None);
        }
        let w1 = env.mem.read_u64(ite_addr + 8)?;
        Ok(Some(VTranslation {
            ite_addr,
            vpeid: ((w1 >> ITE_VPEID_SHIFT) & 0xFFFF) as u32,
            vintid: (w0 >> ITE_INTID_SHIFT) as u32,
            db: w1 as u32,
        }))
    }

    /// Locates vPE `vpeid`'s entry in this ITS's vPE table (GITS_BASER2).
    fn vpe_slot<M: GuestMem>(
        &self,
        v4: &V41,
        mem: &LoggedMem<M>,
        vpeid: u32,
    ) -> Result<u64, ItsCommandError> {
        if !v4.vpeid_valid(vpeid) {
            return Err(ItsCommandError::VpeOutOfRange(vpeid));
        }
        match self.slot(mem, 2, vpeid as u64)? {
            Slot::At(a) => Ok(a),
            Slot::OutOfRange | Slot::NoL2 => Err(ItsCommandError::VpeOutOfRange(vpeid)),
        }
    }

    fn mapped_here<'v>(&self, v4: &'v V41, vpeid: u32) -> Result<&'v VpeState, ItsCommandError> {
        v4.vpes
            .get(&vpeid)
            .filter(|v| v.its_mapped & (1 << self.index) != 0)
            .ok_or(ItsCommandError::UnmappedVpe(vpeid))
    }

    fn check_doorbell_intid(&self, gic: &GicConfig, db: u32) -> Result<(), ItsCommandError> {
        if db == INTID_NO_DOORBELL {
            return Ok(());
        }
        if self.v41.as_ref().is_some_and(|v| v.no_individual_doorbells) {
            return Err(ItsCommandError::IndividualDoorbell(db));
        }
        if !Self::lpi_valid(gic, db) {
            return Err(ItsCommandError::IntIdOutOfRange(db));
        }
        Ok(())
    }

    /// VMAPTI / VMAPI: `[device, event, vpeid, vintid, doorbell]`.
    fn vmap_event<M: GuestMem>(
        &self,
        v4: &V41,
        mem: &mut LoggedMem<M>,
        gic: &GicConfig,
        [device, event, vpeid, vintid, db]: [u32; 5],
    ) -> Result<(), ItsCommandError> {
        let addr = self.ite_addr(mem, device, event)?;
        if self.is_v40() {
            // GICv4.0: the vPEID must fit the vPE table and the vINTID be an LPI the GIC
            // supports; whether the vPE is mapped, and its VPT size, matter at translation.
            self.vpe_slot(v4, mem, vpeid)?;
            if !Self::lpi_valid(gic, vintid) {
                return Err(ItsCommandError::IntIdOutOfRange(vintid));
            }
        } else {
            let v = self.mapped_here(v4, vpeid)?;
            if !(LPI_BASE..(1u32 << v.vpt_bits)).contains(&vintid) {
                return Err(ItsCommandError::IntIdOutOfRange(vintid));
            }
        }
        self.check_doorbell_intid(gic, db)?;
        mem.write(addr, &virtual_ite(vpeid, vintid, db))?;
        Ok(())
    }

    /// VMAPP (GICv4.1 layout): create, add this ITS's mapping of, or unmap a vPE.
    fn vmapp<M: GuestMem>(
        &self,
        v4: &mut V41,
        mem: &mut LoggedMem<M>,
        gic: &GicConfig,
        bit: u16,
        cmd: ItsCommand,
    ) -> Result<(), ItsCommandError> {
        let ItsCommand::Vmapp {
            vpeid,
            rdbase,
            valid,
            alloc,
            ptz,
            vconf,
            default_db,
            vpt,
            vpt_size,
        } = cmd
        else {
            return Err(ItsCommandError::UnknownCommand(CMD_VMAPP));
        };
        let slot = self.vpe_slot(v4, mem, vpeid)?;
        if self.is_v40() {
            return self.vmapp_v40(v4, mem, gic, bit, slot, cmd);
        }
        if !valid {
            if let Some(v) = v4.vpes.get_mut(&vpeid) {
                v.its_mapped &= !bit;
            }
            if alloc {
                if let Some(v) = v4.vpes.remove(&vpeid) {
                    if let Some(pe) = v.resident_on {
                        v4.record(crate::UnpredictableEvent::ChangedWhileResident { vpeid });
                        v4.force_nonresident(pe);
                    }
                }
                write_entry(mem, slot, [0; 4])?;
                v4.propagate_entry(mem, vpeid, [0; 4])?;
            }
            return Ok(());
        }
        let pe = self.rd_index(gic, rdbase)?;
        let bits = vpt_size.saturating_add(1);
        if !(14..=gic.lpi_id_bits).contains(&bits) {
            return Err(ItsCommandError::IntIdOutOfRange(1u32 << bits.min(31)));
        }
        if default_db != INTID_NO_DOORBELL && !Self::lpi_valid(gic, default_db) {
            return Err(ItsCommandError::IntIdOutOfRange(default_db));
        }
        let exists = v4.vpes.contains_key(&vpeid);
        if !alloc && !exists {
            v4.record(crate::UnpredictableEvent::MapWithoutAlloc { vpeid });
        }
        if alloc || !exists {
            let old = v4.vpes.remove(&vpeid);
            let v = VpeState {
                vpeid,
                rd: pe,
                vpt,
                vpt_bits: bits,
                vconf,
                default_db,
                its_mapped: bit | old.as_ref().map_or(0, |o| o.its_mapped),
                sgi_enable: 0,
                sgi_group: 0,
                sgi_priority: [0; 16],
                sgi_pending: 0,
                vlpi_pending: Default::default(),
                vlpi_cfg: Vec::new(),
                resident_on: old.as_ref().and_then(|o| o.resident_on),
                last_resident: None,
                // Never resident: no PendingLast phase can have suppressed the
                // default doorbell (Arm's vLPI/vSGI examples wait for it).
                db_armed: true,
                vgrp_en: [true, true],
                doorbells: 0,
                individual_doorbells: 0,
                icv: Default::default(),
            };
            v4.vpes.insert(vpeid, v);
            if !ptz {
                v4.load_vpt(mem, vpeid);
            }
            v4.reload_config(mem, vpeid);
        } else if let Some(v) = v4.vpes.get_mut(&vpeid) {
            v.its_mapped |= bit;
            v.rd = pe;
            v.default_db = default_db;
        }
        let entry = match v4.vpes.get(&vpeid) {
            Some(v) => vpe_entry(v),
            None => [0; 4],
        };
        write_entry(mem, slot, entry)?;
        v4.propagate_entry(mem, vpeid, entry)?;
        Ok(())
    }

    /// VMAPP (GICv4.0 form): map (V = 1: vPEID, RDbase, VPT address and size) or unmap
    /// (V = 0) a vPE on this ITS. The vPE exists while some ITS maps it; its VConf is only
    /// known while it is resident (GICR_VPROPBASER), and it has no default doorbell.
    fn vmapp_v40<M: GuestMem>(
        &self,
        v4: &mut V41,
        mem: &mut LoggedMem<M>,
        gic: &GicConfig,
        bit: u16,
        slot: u64,
        cmd: ItsCommand,
    ) -> Result<(), ItsCommandError> {
        let ItsCommand::Vmapp {
            vpeid,
            rdbase,
            valid,
            vpt,
            vpt_size,
            ..
        } = cmd
        else {
            return Err(ItsCommandError::UnknownCommand(CMD_VMAPP));
        };
        if !valid {
            if let Some(v) = v4.vpes.get_mut(&vpeid) {
                v.its_mapped &= !bit;
                if v.its_mapped == 0 {
                    v4.vpes.remove(&vpeid);
                    v4.v40_detach(vpeid);
                }
            }
            write_entry(mem, slot, [0; 4])?;
            return Ok(());
        }
        let pe = self.rd_index(gic, rdbase)?;
        let bits = vpt_size.saturating_add(1);
        if !(14..=gic.lpi_id_bits).contains(&bits) {
            return Err(ItsCommandError::IntIdOutOfRange(1u32 << bits.min(31)));
        }
        let reload = match v4.vpes.get_mut(&vpeid) {
            Some(v) => {
                v.its_mapped |= bit;
                v.rd = pe;
                let moved = v.vpt != vpt || v.vpt_bits != bits;
                v.vpt = vpt;
                v.vpt_bits = bits;
                moved
            }
            None => {
                v4.vpes.insert(
                    vpeid,
                    VpeState {
                        vpeid,
                        rd: pe,
                        vpt,
                        vpt_bits: bits,
                        vconf: 0,
                        default_db: INTID_NO_DOORBELL,
                        its_mapped: bit,
                        sgi_enable: 0,
                        sgi_group: 0,
                        sgi_priority: [0; 16],
                        sgi_pending: 0,
                        vlpi_pending: Default::default(),
                        vlpi_cfg: Vec::new(),
                        resident_on: None,
                        last_resident: None,
                        db_armed: false,
                        vgrp_en: [true, true],
                        doorbells: 0,
                        individual_doorbells: 0,
                        icv: Default::default(),
                    },
                );
                true
            }
        };
        if reload {
            v4.load_vpt(mem, vpeid);
            v4.v40_attach(mem, vpeid);
        }
        let entry = v4.vpes.get(&vpeid).map_or([0; 4], vpe_entry);
        write_entry(mem, slot, entry)?;
        Ok(())
    }

    /// VMOVI on a GICv4.0 ITS: both vPEs mapped here, the vINTID inside both VPTs; a pending
    /// vLPI moves from the old VPT (read from memory) to the new one, raising the new
    /// doorbell if that vPE is not resident.
    fn vmovi_v40<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        [device, event, vpeid]: [u32; 3],
        db_valid: bool,
        db: u32,
    ) -> Result<(), ItsCommandError> {
        let Some(vt) = self.vtranslation(env, device, event)? else {
            return Err(ItsCommandError::UnmappedEvent { device, event });
        };
        let Some(v4) = env.v41.as_deref_mut() else {
            return Err(ItsCommandError::UnknownCommand(CMD_VMOVI));
        };
        let new_db = if db_valid { db } else { vt.db };
        self.check_doorbell_intid(env.gic, new_db)?;
        let old = self.mapped_here(v4, vt.vpeid)?;
        let (old_vpt, old_bits) = (old.vpt, old.vpt_bits);
        let new = self.mapped_here(v4, vpeid)?;
        let (new_vpt, new_bits) = (new.vpt, new.vpt_bits);
        let end = 1u32 << old_bits.min(new_bits);
        if !(LPI_BASE..end).contains(&vt.vintid) {
            return Err(ItsCommandError::IntIdOutOfRange(vt.vintid));
        }
        if old_vpt != new_vpt {
            let b = env.mem.read_u8(old_vpt + (vt.vintid / 8) as u64)?;
            if b & (1 << (vt.vintid % 8)) != 0 {
                let (rds, mem) = (&mut *env.rds, &mut *env.mem);
                v4.set_vlpi_pending(rds, mem, vt.vpeid, vt.vintid, false, INTID_NO_DOORBELL)?;
                v4.set_vlpi_pending(rds, mem, vpeid, vt.vintid, true, new_db)?;
            }
        }
        env.mem
            .write(vt.ite_addr, &virtual_ite(vpeid, vt.vintid, new_db))?;
        Ok(())
    }

    /// VMOVI on a GICv4.1 ITS: the new vPE mapped here, the vINTID inside its VPT; a
    /// pending vLPI (the GIC's copy) moves to the new vPE.
    fn vmovi_v41<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        [device, event, vpeid]: [u32; 3],
        db_valid: bool,
        db: u32,
    ) -> Result<(), ItsCommandError> {
        let Some(vt) = self.vtranslation(env, device, event)? else {
            return Err(ItsCommandError::UnmappedEvent { device, event });
        };
        let Some(v4) = env.v41.as_deref_mut() else {
            return Err(ItsCommandError::UnknownCommand(CMD_VMOVI));
        };
        let v = self.mapped_here(v4, vpeid)?;
        if !(LPI_BASE..(1u32 << v.vpt_bits)).contains(&vt.vintid) {
            return Err(ItsCommandError::IntIdOutOfRange(vt.vintid));
        }
        let new_db = if db_valid { db } else { vt.db };
        self.check_doorbell_intid(env.gic, new_db)?;
        let was_pending = v4
            .vpes
            .get(&vt.vpeid)
            .is_some_and(|o| o.vlpi_pending.contains(&vt.vintid));
        if was_pending && vt.vpeid != vpeid {
            v4.set_vlpi_pending(
                env.rds,
                env.mem,
                vt.vpeid,
                vt.vintid,
                false,
                INTID_NO_DOORBELL,
            )?;
            v4.set_vlpi_pending(env.rds, env.mem, vpeid, vt.vintid, true, new_db)?;
        }
        env.mem
            .write(vt.ite_addr, &virtual_ite(vpeid, vt.vintid, new_db))?;
        Ok(())
    }

    /// Executes a GICv4.1 virtual command.
    fn execute_virtual<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        cmd: ItsCommand,
    ) -> Result<(), ItsCommandError> {
        let opcode = cmd.encode()[0] as u8;
        let Some(v4) = env.v41.as_deref_mut() else {
            return Err(ItsCommandError::UnknownCommand(opcode));
        };
        let bit = 1u16 << self.index;
        match cmd {
            c @ ItsCommand::Vmapp { .. } => self.vmapp(v4, env.mem, env.gic, bit, c),
            ItsCommand::Vmapti {
                device,
                event,
                vpeid,
                vintid,
                db,
            } => self.vmap_event(v4, env.mem, env.gic, [device, event, vpeid, vintid, db]),
            ItsCommand::Vmapi {
                device,
                event,
                vpeid,
                db,
            } => self.vmap_event(v4, env.mem, env.gic, [device, event, vpeid, event, db]),
            ItsCommand::Vmovi {
                device,
                event,
                vpeid,
                db_valid,
                db,
            } => {
                let target = [device, event, vpeid];
                if self.is_v40() {
                    self.vmovi_v40(env, target, db_valid, db)
                } else {
                    self.vmovi_v41(env, target, db_valid, db)
                }
            }
            ItsCommand::Vmovp {
                vpeid,
                rdbase,
                its_list,
                db_valid,
                default_db,
                ..
            } => {
                let slot = self.vpe_slot(v4, env.mem, vpeid)?;
                self.mapped_here(v4, vpeid)?;
                if self.v41.as_ref().is_some_and(|c| !c.vmovp)
                    && its_list & (1 << self.its_number) == 0
                {
                    return Err(ItsCommandError::NotInItsList(its_list));
                }
                let pe = self.rd_index(env.gic, rdbase)?;
                if db_valid
                    && default_db != INTID_NO_DOORBELL
                    && !Self::lpi_valid(env.gic, default_db)
                {
                    return Err(ItsCommandError::IntIdOutOfRange(default_db));
                }
                v4.vmovps += 1;
                let entry = match v4.vpes.get_mut(&vpeid) {
                    Some(v) => {
                        if v.resident_on.is_some() {
                            v4.record(crate::UnpredictableEvent::ChangedWhileResident { vpeid });
                        }
                        let v = v4
                            .vpes
                            .get_mut(&vpeid)
                            .ok_or(ItsCommandError::UnmappedVpe(vpeid))?;
                        v.rd = pe;
                        v.last_resident = None;
                        if db_valid {
                            v.default_db = default_db;
                        }
                        vpe_entry(v)
                    }
                    None => return Err(ItsCommandError::UnmappedVpe(vpeid)),
                };
                write_entry(env.mem, slot, entry)?;
                v4.propagate_entry(env.mem, vpeid, entry)?;
                Ok(())
            }
            ItsCommand::Vsync { vpeid } => self.mapped_here(v4, vpeid).map(|_| ()),
            ItsCommand::Vinvall { vpeid } => {
                self.mapped_here(v4, vpeid)?;
                v4.reload_config(env.mem, vpeid);
                v4.check_doorbell(env.rds, env.mem, vpeid)?;
                Ok(())
            }
            ItsCommand::Invdb { vpeid } => {
                let db = self.mapped_here(v4, vpeid)?.default_db;
                if db != INTID_NO_DOORBELL {
                    for rd in env.rds.iter_mut() {
                        rd.invalidate_one(env.mem, db);
                    }
                }
                Ok(())
            }
            ItsCommand::Vsgi {
                vpeid,
                sgi,
                enable,
                clear,
                group1,
                priority,
            } => {
                self.mapped_here(v4, vpeid)?;
                if let Some(v) = v4.vpes.get_mut(&vpeid) {
                    let m = 1u16 << (sgi & 0xF);
                    if clear {
                        v.sgi_pending &= !m;
                    } else {
                        v.sgi_enable = if enable {
                            v.sgi_enable | m
                        } else {
                            v.sgi_enable & !m
                        };
                        v.sgi_group = if group1 {
                            v.sgi_group | m
                        } else {
                            v.sgi_group & !m
                        };
                        v.sgi_priority[(sgi & 0xF) as usize] = priority & 0xF0;
                    }
                }
                v4.check_doorbell(env.rds, env.mem, vpeid)?;
                Ok(())
            }
            other => Err(ItsCommandError::UnknownCommand(other.encode()[0] as u8)),
        }
    }

    /// A GITS_SGIR write: makes vSGI `value[3:0]` pending on vPE `value[47:32]`. Errors are
    /// recorded.
    pub(crate) fn sgir<M: GuestMem>(
        &mut self,
        env: &mut ItsEnv<'_, M>,
        value: u64,
    ) -> Result<(), ItsCommandError> {
        let vpeid = ((value >> 32) & 0xFFFF) as u32;
        let sgi = (value & 0xF) as u8;
        let r = match env.v41.as_deref_mut() {
            None => Err(ItsCommandError::UnknownCommand(0)),
            Some(_) if !self.enabled => Err(ItsCommandError::Disabled),
            Some(v4) => match self.mapped_here(v4, vpeid) {
                Ok(_) => v4.set_vsgi_pending(env.rds, env.mem, vpeid, sgi as u32),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            self.record(ItsErrorSource::Sgir { vpeid, sgi }, e);
        }
        r
    }

    pub(crate) fn state(&self) -> ItsState {
        ItsState {
            enabled: self.enabled,
            cbaser: self.cbaser,
            cwriter: self.cwriter,
            creadr: self.creadr,
            stalled: self.stalled,
            baser: self.baser.to_vec(),
            errors: self.errors.iter().copied().collect(),
            error_count: self.error_count,
            commands_processed: self.commands_processed,
            its_number: self.its_number,
        }
    }

    pub(crate) fn restore(&mut self, s: &ItsState) -> Result<(), StateError> {
        if s.baser.len() != GITS_BASER_COUNT {
            return Err(StateError::Length {
                what: "GITS_BASER registers",
                got: s.baser.len(),
                want: GITS_BASER_COUNT,
            });
        }
        self.enabled = s.enabled;
        self.cbaser = s.cbaser & GITS_CBASER_MASK;
        self.cwriter = s.cwriter & GITS_CMDQ_OFFSET_MASK;
        self.creadr = s.creadr & GITS_CMDQ_OFFSET_MASK;
        self.stalled = s.stalled;
        for n in 0..GITS_BASER_COUNT {
            let v = if self.baser_type(n) == GITS_BASER_TYPE_NONE {
                0
            } else {
                (s.baser[n] & GITS_BASER_RW_MASK) | self.baser_ro_bits(n)
            };
            self.set_baser(n, v);
        }
        self.errors = s
            .errors
            .iter()
            .rev()
            .take(ITS_ERROR_RECORDS)
            .rev()
            .copied()
            .collect();
        self.error_count = s.error_count;
        self.commands_processed = s.commands_processed;
        if self.v41.is_some() {
            self.its_number = s.its_number & 0xF;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_reads_the_architected_field_positions() {
        // MAPTI DeviceID 0x12, EventID 0x34, pINTID 0x2005, ICID 7.
        let c = ItsCommand::decode([0x12_0000_000A, 0x2005_0000_0034, 7, 0]);
        assert_eq!(
            c,
            ItsCommand::Mapti {
                device: 0x12,
                event: 0x34,
                intid: 0x2005,
                icid: 7
            }
        );
        // MAPD with V, Size 9, ITT 0x4413_0100.
        let c = ItsCommand::decode([0x8, 9, (1 << 63) | 0x4413_0100, 0]);
        assert_eq!(
            c,
            ItsCommand::Mapd {
                device: 0,
                size: 9,
                itt: 0x4413_0100,
                valid: true
            }
        );
        // MOVALL RDbase1 3, RDbase2 5.
        let c = ItsCommand::decode([0xE, 0, 3 << 16, 5 << 16]);
        assert_eq!(
            c,
            ItsCommand::Movall {
                rdbase1: 3,
                rdbase2: 5
            }
        );
        assert_eq!(
            ItsCommand::decode([0x2A, 0, 0, 0]),
            ItsCommand::Unknown { opcode: 0x2A }
        );
    }

    #[test]
    fn baser_address_handles_64k_page_high_bits() {
        // 64 KiB pages: PA[51:48] in bits [15:12].
        let b = (2 << GITS_BASER_PAGE_SIZE_SHIFT) | 0x0000_1234_5678_0000 | (0x3 << 12);
        assert_eq!(baser_address(b), 0x0003_1234_5678_0000);
        let b = (1 << GITS_BASER_PAGE_SIZE_SHIFT) | 0x4410_5000;
        assert_eq!(baser_address(b), 0x4410_4000, "16 KiB alignment");
        assert_eq!(baser_page_size(3 << GITS_BASER_PAGE_SIZE_SHIFT), 0x1_0000);
    }
}
