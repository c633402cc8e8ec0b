//! Strict decoding and sanity checks of migrated state, on real `/dev/kvm`: states saved from
//! real VMs pass, and each mutation a hostile or broken stream could carry is a typed error
//! before anything is restored (a `SKIP(kvm)` line without `/dev/kvm`).

use serde_json::Value;
use vmm::check::{RipFault, StateError};
use vmm::state::VcpuState;
use vmm::{MachineState, RegionSpec, SerialOutput, Tracking, Vm, VmConfig, VmmError};

fn have_kvm() -> bool {
    if !vmm::kvm_available() {
        eprintln!("SKIP(kvm): /dev/kvm is absent; state check test not run");
        return false;
    }
    true
}

fn workload_vm() -> Vm {
    Vm::create(&VmConfig {
        vcpus: 1,
        memory: vec![RegionSpec {
            slot: 1,
            gpa: 1 << 32,
            bytes: 1 << 20,
            log_dirty: true,
        }],
        tracking: Tracking::Bitmap,
    })
    .unwrap()
}

fn pvh_vm() -> Vm {
    Vm::create_pvh(
        &VmConfig {
            vcpus: 2,
            memory: vec![RegionSpec {
                slot: 0,
                gpa: 0,
                bytes: 16 << 20,
                log_dirty: true,
            }],
            tracking: Tracking::Bitmap,
        },
        &SerialOutput::Capture,
    )
    .unwrap()
}

/// The saved vCPU 0 state of a fresh workload VM as JSON.
fn vcpu_json(vm: &Vm) -> Value {
    let blob = vm.save_vcpus().unwrap()[0].encode();
    serde_json::from_slice(&blob).unwrap()
}

fn decode(v: &Value) -> vmm::Result<VcpuState> {
    VcpuState::decode(&serde_json::to_vec(v).unwrap())
}

fn state_err(r: vmm::Result<()>) -> StateError {
    match r {
        Err(VmmError::InvalidState(e)) => e,
        other => panic!("expected a typed state error, got {other:?}"),
    }
}

#[test]
fn a_saved_workload_state_passes_every_check_and_restores() {
    if !have_kvm() {
        return;
    }
    let a = workload_vm();
    let b = workload_vm();
    let st = decode(&vcpu_json(&a)).unwrap();
    b.check_vcpu_states(std::slice::from_ref(&st)).unwrap();
    b.restore_vcpus(&[st]).unwrap();
}

#[test]
fn a_rip_of_0xdeadbeef000_is_refused_before_restore() {
    if !have_kvm() {
        return;
    }
    let a = workload_vm();
    let mut st = decode(&vcpu_json(&a)).unwrap();
    st.regs.rip = 0xdeadbeef000;
    let e = state_err(a.restore_vcpus(&[st]));
    assert!(
        matches!(
            e,
            StateError::Rip {
                rip: 0xdeadbeef000,
                fault: RipFault::NotMapped { .. },
                ..
            }
        ),
        "{e}"
    );
    // A non-canonical RIP is named as such.
    let mut st = decode(&vcpu_json(&a)).unwrap();
    st.regs.rip = 0x8000_0000_0000;
    assert!(matches!(
        state_err(a.check_vcpu_states(&[st])),
        StateError::Rip {
            fault: RipFault::NotCanonical,
            ..
        }
    ));
}

#[test]
fn a_truncated_msr_list_is_refused() {
    if !have_kvm() {
        return;
    }
    let a = workload_vm();
    let mut v = vcpu_json(&a);
    let msrs = v["msrs"].as_array_mut().unwrap();
    assert!(msrs.len() > 1, "the workload VM saves several MSRs");
    let last = msrs.pop().unwrap();
    let index = last[0].as_u64().unwrap() as u32;
    let st = decode(&v).unwrap();
    assert_eq!(
        state_err(a.check_vcpu_states(&[st])),
        StateError::MissingMsr { vcpu: 0, index }
    );
    // An MSR this VMM does not restore (IA32_APIC_BASE) is refused too.
    let mut v = vcpu_json(&a);
    v["msrs"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!([0x1b, 0]));
    let st = decode(&v).unwrap();
    assert_eq!(
        state_err(a.check_vcpu_states(&[st])),
        StateError::UnexpectedMsr {
            vcpu: 0,
            index: 0x1b
        }
    );
}

#[test]
fn short_or_long_kvm_structures_and_unknown_fields_are_refused() {
    if !have_kvm() {
        return;
    }
    let a = workload_vm();
    for field in ["regs", "sregs", "xsave", "xcrs", "events"] {
        let mut v = vcpu_json(&a);
        let bytes = v[field].as_array_mut().unwrap();
        let expected = bytes.len();
        bytes.pop();
        assert!(
            matches!(
                decode(&v),
                Err(VmmError::InvalidState(StateError::Length { expected: e, got, .. }))
                    if e == expected && got == expected - 1
            ),
            "{field} cut by one byte"
        );
        let mut v = vcpu_json(&a);
        v[field].as_array_mut().unwrap().push(Value::from(0));
        assert!(
            matches!(
                decode(&v),
                Err(VmmError::InvalidState(StateError::Length { .. }))
            ),
            "{field} one byte long"
        );
    }
    let mut v = vcpu_json(&a);
    v["extra"] = Value::from(1);
    assert!(matches!(
        decode(&v),
        Err(VmmError::InvalidState(StateError::Decode { .. }))
    ));
    let mut v = vcpu_json(&a);
    v["version"] = Value::from(2);
    assert!(matches!(
        decode(&v),
        Err(VmmError::InvalidState(StateError::Version { found: 2, .. }))
    ));
}

#[test]
fn reserved_cr4_bits_and_bad_control_register_combinations_are_refused() {
    if !have_kvm() {
        return;
    }
    let a = workload_vm();
    let mut st = decode(&vcpu_json(&a)).unwrap();
    st.sregs.cr4 |= 1 << 15;
    assert!(matches!(
        state_err(a.check_vcpu_states(&[st])),
        StateError::ReservedBits {
            register: "CR4",
            bits: 0x8000,
            ..
        }
    ));
    let mut st = decode(&vcpu_json(&a)).unwrap();
    st.sregs.efer &= !(1 << 10); // LMA off in long mode
    assert!(matches!(
        state_err(a.check_vcpu_states(&[st])),
        StateError::ControlRegisters { .. }
    ));
    // A workload vCPU has no LAPIC state; one that carries it is refused.
    let p = pvh_vm();
    let lapic = p.save_vcpus().unwrap()[0].lapic;
    let mut st = decode(&vcpu_json(&a)).unwrap();
    st.lapic = lapic;
    assert!(matches!(
        state_err(a.check_vcpu_states(&[st])),
        StateError::Irqchip { .. }
    ));
}

#[test]
fn pvh_machine_state_decodes_strictly_a_truncated_pit_is_refused() {
    if !have_kvm() {
        return;
    }
    let p = pvh_vm();
    let blob = p.save_machine().unwrap().unwrap().encode();
    MachineState::decode(&blob).unwrap();
    let json = |f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(&blob).unwrap();
        f(&mut v);
        MachineState::decode(&serde_json::to_vec(&v).unwrap())
    };
    let e = json(&|v| {
        v["pit"].as_array_mut().unwrap().pop();
    });
    assert!(
        matches!(
            e,
            Err(VmmError::InvalidState(StateError::Length { what, .. })) if what.starts_with("PIT")
        ),
        "{e:?}"
    );
    // Channel 0's mode byte (offset 13 of kvm_pit_channel_state) set to 7 (KVM's reset mode
    // 0xff and 0-5 are the valid ones).
    let e = json(&|v| v["pit"][13] = Value::from(7));
    assert!(
        matches!(
            e,
            Err(VmmError::InvalidState(StateError::Device {
                what: "PIT",
                ..
            }))
        ),
        "{e:?}"
    );
    let e = json(&|v| {
        v["ioapic"].as_array_mut().unwrap().truncate(8);
    });
    assert!(matches!(
        e,
        Err(VmmError::InvalidState(StateError::Length { .. }))
    ));
    let e = json(&|v| v["uart"]["rx_fifo"] = Value::from(vec![0u8; 65]));
    assert!(matches!(
        e,
        Err(VmmError::InvalidState(StateError::Device {
            what: "UART",
            ..
        }))
    ));
    let e = json(&|v| {
        v.as_object_mut().unwrap().remove("clock");
    });
    assert!(matches!(
        e,
        Err(VmmError::InvalidState(StateError::Decode { .. }))
    ));
    // The APs of a fresh PVH VM wait for INIT/SIPI (no RIP check); their states pass.
    let states = p.save_vcpus().unwrap();
    let decoded: Vec<VcpuState> = states
        .iter()
        .map(|s| VcpuState::decode(&s.encode()).unwrap())
        .collect();
    assert!(
        p.check_vcpu_states(&decoded[1..]).is_err(),
        "count mismatch"
    );
    let ap = decoded[1].mp_state.unwrap().mp_state;
    assert_eq!(ap, kvm_bindings::KVM_MP_STATE_UNINITIALIZED);
}
