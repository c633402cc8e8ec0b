//! The machine a VM is: the project's workload machine (long mode at CPL3, no interrupt
//! controller) or the PVH platform (in-kernel LAPIC/IOAPIC/PIC and PIT, COM1, the power-off
//! port), and the VM-wide state the PVH platform migrates besides vCPUs and memory: both PICs,
//! the IOAPIC, the PIT, the KVM clock and the UART.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

use crate::check::StateError;
use crate::devices::{Devices, UartState};
use crate::error::{Result, VmmError};
use crate::state::exact;

/// Which machine a VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Platform {
    /// The workload machine: system region in slot 0, vCPUs in long mode at CPL3, the guest
    /// program assembled by [`crate::guest`], no interrupt controller.
    #[default]
    Workload,
    /// A PVH machine: RAM from GPA 0 (below the 3 GiB hole, then above 4 GiB), in-kernel
    /// irqchip and PIT, COM1 and the power-off port; vCPUs at reset until a loader sets them.
    Pvh,
}

impl Platform {
    /// Its number on the migration wire (the Hello's machine field).
    pub fn wire(self) -> u32 {
        match self {
            Platform::Workload => 0,
            Platform::Pvh => 1,
        }
    }

    /// The platform with wire number `v`.
    pub fn from_wire(v: u32) -> Option<Self> {
        match v {
            0 => Some(Platform::Workload),
            1 => Some(Platform::Pvh),
            _ => None,
        }
    }

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Workload => "workload",
            Platform::Pvh => "pvh",
        }
    }

    /// Whether the VM has KVM's in-kernel irqchip (so vCPUs have LAPIC and MP state).
    pub fn has_irqchip(self) -> bool {
        self == Platform::Pvh
    }
}

/// Start of the 32-bit MMIO hole of the PVH platform (IOAPIC at 0xfec00000, LAPIC at
/// 0xfee00000, KVM's TSS pages just below 4 GiB): no RAM region may overlap it.
pub const MMIO_HOLE_START: u64 = 3 << 30;
/// End of the hole.
pub const MMIO_HOLE_END: u64 = 4 << 30;

/// Format version of [`MachineState`].
pub const MACHINE_STATE_VERSION: u32 = 1;

/// VM-wide device state of a PVH machine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MachineState {
    /// Format version.
    pub version: u32,
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC (redirection table, IRR).
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT's channels.
    pub pit: kvm_pit_state2,
    /// kvmclock's base (`KVM_GET_CLOCK`).
    pub clock: kvm_clock_data,
    /// COM1.
    pub uart: UartState,
    /// The guest's TSC frequency (kHz) on the source; the destination runs its vCPUs' TSC at
    /// the same rate (`KVM_SET_TSC_KHZ`) when its own default differs, so guest time keeps
    /// its pace across hosts.
    pub tsc_khz: Option<u32>,
}

/// [`MachineState`] as it arrives: KVM structures as raw bytes, lengths checked before use.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachineState {
    version: u32,
    pic_master: Vec<u8>,
    pic_slave: Vec<u8>,
    ioapic: Vec<u8>,
    pit: Vec<u8>,
    clock: Vec<u8>,
    uart: UartState,
    tsc_khz: Option<u32>,
}

/// Highest 8254 counter mode (0-5).
const PIT_MAX_MODE: u8 = 5;
/// The mode KVM gives a channel at reset, before the guest programs it.
const PIT_MODE_RESET: u8 = 0xff;
/// Highest value of KVM's PIT access-state fields (`RW_STATE_WORD1`).
const PIT_MAX_RW_STATE: u8 = 4;
/// A PIT count is 16 bits, 0 standing for 0x10000 (KVM keeps it as such).
const PIT_MAX_COUNT: u32 = 0x1_0000;
/// The UART's receive FIFO (vm-superio's).
const UART_FIFO: usize = 64;

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { op, source }
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl MachineState {
    /// Reads the state (vCPUs paused); `tsc_khz` is the guest's TSC frequency.
    pub fn save(vm: &VmFd, devices: &Devices, tsc_khz: Option<u32>) -> Result<Self> {
        Ok(MachineState {
            version: MACHINE_STATE_VERSION,
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
            uart: devices.save_uart(),
            tsc_khz,
        })
    }

    /// Writes the interrupt controllers, the PIT and the UART (before the vCPUs run).
    pub fn restore_devices(&self, vm: &VmFd, devices: &Devices) -> Result<()> {
        if self.version != MACHINE_STATE_VERSION {
            return Err(VmmError::State(format!(
                "machine state version {} (this build reads {MACHINE_STATE_VERSION})",
                self.version
            )));
        }
        for (c, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if c.chip_id != id {
                return Err(VmmError::State(format!(
                    "irqchip state for chip {} where chip {id} belongs",
                    c.chip_id
                )));
            }
            vm.set_irqchip(c).map_err(kvm("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        devices.restore_uart(&self.uart)
    }

    /// Writes the KVM clock (last, just before the vCPUs run). Only the clock value is
    /// carried: the flags and host timestamps describe the source host.
    pub fn restore_clock(&self, vm: &VmFd) -> Result<()> {
        let c = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&c).map_err(kvm("KVM_SET_CLOCK"))
    }

    /// Encodes to bytes (JSON: self-describing and versioned).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data always serialises")
    }

    /// Decodes bytes from [`MachineState::encode`] strictly (every field present and no
    /// other, each KVM structure exactly its size) and checks its values
    /// ([`MachineState::check`]); anything else is a typed error
    /// ([`VmmError::InvalidState`]).
    pub fn decode(b: &[u8]) -> Result<Self> {
        let raw: RawMachineState = serde_json::from_slice(b).map_err(|e| StateError::Decode {
            what: "machine state",
            reason: e.to_string(),
        })?;
        let st = MachineState {
            version: raw.version,
            pic_master: exact("PIC master (kvm_irqchip)", &raw.pic_master)?,
            pic_slave: exact("PIC slave (kvm_irqchip)", &raw.pic_slave)?,
            ioapic: exact("IOAPIC (kvm_irqchip)", &raw.ioapic)?,
            pit: exact("PIT (kvm_pit_state2)", &raw.pit)?,
            clock: exact("kvm_clock_data", &raw.clock)?,
            uart: raw.uart,
            tsc_khz: raw.tsc_khz,
        };
        st.check()?;
        Ok(st)
    }

    /// Checks the values KVM or the devices would take without complaint but that no real
    /// machine holds: the version, each irqchip's chip id, the PIT channels' modes, access
    /// states and counts, the UART's FIFO, a TSC frequency of 0.
    pub fn check(&self) -> std::result::Result<(), StateError> {
        if self.version != MACHINE_STATE_VERSION {
            return Err(StateError::Version {
                what: "machine state",
                found: self.version,
                supported: MACHINE_STATE_VERSION,
            });
        }
        let dev = |what, reason: String| Err(StateError::Device { what, reason });
        for (c, id, what) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
        ] {
            if c.chip_id != id {
                return dev(what, format!("chip id {} where {id} belongs", c.chip_id));
            }
        }
        for (i, ch) in self.pit.channels.iter().enumerate() {
            if ch.mode > PIT_MAX_MODE && ch.mode != PIT_MODE_RESET {
                return dev("PIT", format!("channel {i} in mode {}", ch.mode));
            }
            if ch.count > PIT_MAX_COUNT {
                return dev("PIT", format!("channel {i} count {:#x}", ch.count));
            }
            if [ch.read_state, ch.write_state, ch.rw_mode]
                .iter()
                .any(|&s| s > PIT_MAX_RW_STATE)
            {
                return dev("PIT", format!("channel {i} access state out of range"));
            }
        }
        if self.uart.rx_fifo.len() > UART_FIFO {
            return dev(
                "UART",
                format!(
                    "{} received bytes; the FIFO holds {UART_FIFO}",
                    self.uart.rx_fifo.len()
                ),
            );
        }
        if self.tsc_khz == Some(0) {
            return dev("TSC", "a frequency of 0 kHz".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_wire_numbers_round_trip_and_unknown_ones_are_refused() {
        for p in [Platform::Workload, Platform::Pvh] {
            assert_eq!(Platform::from_wire(p.wire()), Some(p));
        }
        assert_eq!(Platform::from_wire(2), None);
        assert!(Platform::Pvh.has_irqchip() && !Platform::Workload.has_irqchip());
    }

    #[test]
    fn corrupt_machine_state_is_a_typed_error() {
        assert!(matches!(
            MachineState::decode(b"{\"version\":1"),
            Err(VmmError::InvalidState(StateError::Decode { .. }))
        ));
        assert!(matches!(
            MachineState::decode(b"not json"),
            Err(VmmError::InvalidState(StateError::Decode { .. }))
        ));
    }
}
