//! The qtest front end, the benchmark and the vm-memory backend.

use gic::bench::{self, BenchParams};
use gic::qtest::{self, QtestConfig, QtestSession};
use gic::regs::*;
use gic::{Gic, GicConfig, IccReg, ItsCommand, VmMemory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn answers(script: &str, cfg: &QtestConfig) -> Vec<String> {
    let mut out = Vec::new();
    qtest::serve(script.as_bytes(), &mut out, cfg).expect("serve");
    String::from_utf8(out)
        .expect("utf8")
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn qtest_memory_commands_round_trip_guest_ram() {
    let a = answers(
        "write 0x40001000 4 0x01020304\n\
         read 0x40001000 4\n\
         readl 0x40001000\n\
         writeq 0x40002000 0x1122334455667788\n\
         readw 0x40002002\n\
         memset 0x40003000 3 0xab\n\
         read 0x40003000 4\n\
         readl 0x10000000\n\
         writel 0x10000000 5\n\
         read 0x40001000 0\n\
         readl zzz\n\
         \n\
         writel 0x08000001 1\n",
        &QtestConfig::default(),
    );
    assert_eq!(
        a,
        vec![
            "OK",
            "OK 0x01020304",
            "OK 0x0000000004030201",
            "OK",
            "OK 0x0000000000005566",
            "OK",
            "OK 0xababab00",
            "OK 0x0000000000000000",
            "OK",
            "ERR bad length 0",
            "ERR bad number 'zzz'",
            "OK",
        ]
    );
}

#[test]
fn qtest_drives_the_its_and_the_cpu_interface_end_to_end() {
    // Build the command queue contents with the crate's encoder, as a script generator would.
    let hex =
        |c: ItsCommand| -> String { c.to_bytes().iter().map(|b| format!("{b:02x}")).collect() };
    let prop = "a1".repeat(16);
    let mut s = vec![
        "writel 0x08000000 0x2".to_string(),
        format!("write 0x44000000 16 0x{prop}"),
        "writeq 0x080a0070 0x4400000f".into(),
        "writeq 0x080a0078 0x44010000".into(),
        "writel 0x080a0000 0x1".into(),
        "writeq 0x08080100 0x8000000044100200".into(),
        "writeq 0x08080108 0x8000000044110200".into(),
        "writeq 0x08080080 0x8000000044120000".into(),
        "writel 0x08080000 0x1".into(),
        "gic_icc_write 0 pmr 0xff".into(),
        "gic_icc_write 0 igrpen1 1".into(),
    ];
    let cmds = [
        ItsCommand::Mapc {
            icid: 0,
            rdbase: 0,
            valid: true,
        },
        ItsCommand::Mapd {
            device: 0,
            size: 3,
            itt: 0x4413_0000,
            valid: true,
        },
        ItsCommand::Mapti {
            device: 0,
            event: 2,
            intid: 8195,
            icid: 0,
        },
        ItsCommand::Invall { icid: 0 },
    ];
    for (i, c) in cmds.iter().enumerate() {
        s.push(format!(
            "write 0x{:x} 32 0x{}",
            0x4412_0000 + 32 * i,
            hex(*c)
        ));
    }
    s.push(format!("writeq 0x08080088 0x{:x}", 32 * cmds.len()));
    s.extend(
        [
            "gic_irq 0",
            "writel 0x08090040 2",
            "gic_irq 0",
            "gic_icc_read 0 hppir1",
            "gic_ack 0",
            "gic_icc_read 0 rpr",
            "gic_eoi 0 8195",
            "gic_irq 0",
            "gic_msi 0 0 2",
            "gic_ack 0",
            "gic_icc_write 0 eoir1 8195",
            "gic_msi 0 9 9",
            "gic_its_errors 0",
            "gic_icc_read 5 pmr",
            "gic_icc_read 0 bogus",
            "gic_irq 7",
            "gic_dirty",
            "gic_dirty",
        ]
        .map(String::from),
    );
    let cfg = QtestConfig::default();
    let a = answers(&(s.join("\n") + "\n"), &cfg);
    let n = s.len();
    let tail: Vec<&str> = a[n - 18..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        vec![
            "OK 0",
            "OK",
            "OK 1",
            "OK 0x0000000000002003",
            "OK 0x0000000000002003",
            "OK 0x00000000000000a0",
            "OK",
            "OK 0",
            "OK",
            "OK 0x0000000000002003",
            "OK",
            "ERR ITS dropped the request: DeviceID 0x9 is not mapped",
            "OK 1 UnmappedDevice(9)",
            "ERR PE 5 does not exist",
            "ERR unknown register bogus",
            "ERR PE 7 does not exist",
            // CTE, DTE, ITT and pending-table pages, in address order.
            "OK 4 0x44010000 0x44100000 0x44110000 0x44130000",
            "OK 0",
        ]
    );
    assert!(a[..n - 18].iter().all(|l| l == "OK"), "setup all OK: {a:?}");
}

#[test]
fn qtest_session_rejects_impossible_ram() {
    let cfg = QtestConfig {
        ram_size: 1 << 40,
        ..QtestConfig::default()
    };
    assert!(QtestSession::new(&cfg).is_err());
    let cfg = QtestConfig {
        gic: GicConfig {
            num_spis: 33,
            ..GicConfig::virt(1)
        },
        ..QtestConfig::default()
    };
    assert!(QtestSession::new(&cfg).is_err());
}

#[test]
fn bench_delivers_every_lpi_and_reports_rates() {
    let p = BenchParams {
        pes: 2,
        its_commands: 2_000,
        lpis: 2_000,
        events: 64,
    };
    let r = bench::run(&p).expect("bench");
    assert_eq!(r.its_commands, 2_000);
    assert_eq!(r.lpis_delivered, 2_000);
    assert_eq!(r.lpis_lost, 0);
    assert_eq!(r.its_command_errors, 0);
    assert!(r.its_commands_per_sec > 0.0 && r.lpis_per_sec > 0.0);
    assert!(r.dirty_pages > 0);
    let md = r.to_markdown();
    assert!(md.starts_with("| metric | value |"));
    assert!(md.contains("| LPIs lost | 0 |"));
    assert!(bench::run(&BenchParams { pes: 0, ..p }).is_err());
}

#[test]
fn vm_memory_backend_carries_tables_and_pending_bits() {
    let ram =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x4000_0000), 4 << 20)]).expect("mmap");
    let mut gic = Gic::new(GicConfig::virt(1), VmMemory(ram.clone())).expect("gic");
    let prop = 0x4001_0000u64;
    let pend = 0x4002_0000u64;
    ram.write_slice(&[0xa1; 64], GuestAddress(prop)).unwrap();
    gic.write(0x0800_0000, 4, 2).unwrap();
    gic.write(0x080a_0070, 8, prop | 15).unwrap();
    gic.write(0x080a_0078, 8, pend).unwrap();
    gic.write(0x080a_0000, 4, 1).unwrap();
    gic.icc_write(0, IccReg::Pmr, 0xff).unwrap();
    gic.icc_write(0, IccReg::Igrpen1, 1).unwrap();
    gic.write(0x080a_0000 + GICR_SETLPIR, 8, 8200).unwrap();
    // The pending bit landed in the VMM's own mapping.
    let b: u8 = ram.read_obj(GuestAddress(pend + 8200 / 8)).unwrap();
    assert_eq!(b, 1 << (8200 % 8));
    assert_eq!(gic.icc_read(0, IccReg::Iar1).unwrap(), 8200);
    let mut pages = Vec::new();
    gic.write_log().drain_pages_into(&mut pages);
    assert_eq!(pages, vec![pend]);
    // Unbacked tables: the LPI is dropped, nothing panics.
    gic.write(0x080a_0000, 4, 0).unwrap();
    gic.write(0x080a_0078, 8, 0x1_0000_0000).unwrap();
    gic.write(0x080a_0000, 4, 1).unwrap();
    gic.write(0x080a_0000 + GICR_SETLPIR, 8, 8200).unwrap();
    assert!(gic.pending_lpis(0).is_empty());
}

#[test]
fn model_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Gic<gic::VecMem>>();
    assert_send::<Gic<VmMemory<GuestMemoryMmap<()>>>>();
    fn assert_sync<T: Send + Sync>() {}
    assert_sync::<gic::IrqLines>();
}

#[test]
fn qtest_drives_input_lines_and_reset() {
    let a = answers(
        "writel 0x08000000 0x2\n\
         writel 0x08000084 0x2\n\
         writel 0x08000104 0x2\n\
         gic_icc_write 0 pmr 0xff\n\
         gic_icc_write 0 igrpen1 1\n\
         gic_spi 33 1\n\
         gic_irq 0\n\
         gic_ack 0\n\
         gic_spi 33 0\n\
         gic_eoi 0 33\n\
         gic_irq 0\n\
         gic_spi 20 1\n\
         gic_ppi 0 27 1\n\
         gic_ppi 0 3 1\n\
         gic_reset\n\
         readl 0x08000000\n\
         gic_icc_read 0 pmr\n",
        &QtestConfig::default(),
    );
    let tail: Vec<&str> = a[5..].iter().map(String::as_str).collect();
    assert_eq!(
        tail,
        vec![
            "OK",
            "OK 1",
            "OK 0x0000000000000021",
            "OK",
            "OK",
            "OK 0",
            "ERR INTID 20 is not an implemented SPI",
            "OK",
            "ERR no PPI 3 on PE 0",
            "OK",
            "OK 0x0000000000000050",
            "OK 0x0000000000000000",
        ]
    );
}

#[test]
fn qtest_config_round_trips_through_json() {
    let cfg = QtestConfig {
        gic: GicConfig::virt(4),
        ram_base: 0x4000_0000,
        ram_size: 1 << 24,
    };
    let json = serde_json::to_string(&cfg).unwrap();
    let back: QtestConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    assert!(QtestSession::new(&back).is_ok());
}

/// Issue 16: an external script drives a GICv4.1 configuration chosen by `gic-qtest`
/// options through MMIO and guest memory only: host LPIs, the shared vPE table, VMAPP and
/// VSGI in the command queue, GITS_SGIR, the default doorbell of the never-resident vPE,
/// residency, and the guest's ICV interface.
#[test]
fn qtest_options_build_a_v41_gic_that_a_script_drives_end_to_end() {
    let args: Vec<String> = "--gic-version 4.1 --pes 2 --its 1 --common-lpi-aff 0 --svpet 1"
        .split_whitespace()
        .map(str::to_string)
        .collect();
    let cfg = QtestConfig::from_args(&args).unwrap();
    let rd0 = cfg.gic.rd_base(0);
    let vlpi1 = cfg.gic.rd_base(1) + GICR_VLPI_OFFSET;
    let its = cfg.gic.its[0].base;
    let (prop, pend, vpet, cmdq, vpt, vconf) = (
        0x4000_0000u64,
        0x4010_0000u64,
        0x4020_0000u64,
        0x4030_0000u64,
        0x4040_0000u64,
        0x4050_0000u64,
    );
    let hex = |c: &ItsCommand| {
        c.to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let vmapp = ItsCommand::Vmapp {
        vpeid: 3,
        rdbase: 0,
        valid: true,
        alloc: true,
        ptz: true,
        vconf,
        default_db: 8192,
        vpt,
        vpt_size: 13,
    };
    let vsgi = ItsCommand::Vsgi {
        vpeid: 3,
        sgi: 5,
        enable: true,
        clear: false,
        group1: true,
        priority: 0x80,
    };
    let mut script = String::new();
    script += "writel 0x08000000 0x2\n"; // GICD_CTLR.EnableGrp1
    script += &format!("memset {prop:#x} 16 0xa3\n"); // LPIs 8192.. enabled, Group 1
    script += &format!("writeq {:#x} {:#x}\n", rd0 + GICR_PROPBASER, prop | 15);
    script += &format!("writeq {:#x} {pend:#x}\n", rd0 + GICR_PENDBASER);
    script += &format!("writel {:#x} 1\n", rd0 + GICR_CTLR);
    script += "gic_icc_write 0 pmr 0xff\ngic_icc_write 0 igrpen1 1\n";
    for pe in 0..2 {
        let vl = cfg.gic.rd_base(pe) + GICR_VLPI_OFFSET;
        script += &format!(
            "writeq {:#x} {:#x}\n",
            vl + GICR_VPROPBASER,
            VPROPBASER_VALID | (2 << VPROPBASER_PAGE_SIZE_SHIFT) | vpet
        );
    }
    script += &format!(
        "writeq {:#x} {:#x}\n",
        its + GITS_BASER + 16,
        GITS_BASER_VALID | (2 << 8) | vpet
    );
    script += &format!(
        "writeq {:#x} {:#x}\n",
        its + GITS_CBASER,
        GITS_CBASER_VALID | cmdq
    );
    script += &format!("writel {:#x} 1\n", its + GITS_CTLR);
    script += &format!("write {cmdq:#x} 32 0x{}\n", hex(&vmapp));
    script += &format!("write {:#x} 32 0x{}\n", cmdq + 32, hex(&vsgi));
    script += &format!("writeq {:#x} 64\n", its + GITS_CWRITER);
    script += &format!("writeq {:#x} {:#x}\n", its + GITS_SGIR, (3u64 << 32) | 5);
    script += "gic_irq 0\ngic_ack 0\n"; // the doorbell of the never-resident vPE
    script += &format!(
        "writeq {:#x} {:#x}\n",
        vlpi1 + GICR_VPENDBASER,
        VPENDBASER_VALID | VPENDBASER_VGRP1EN | 3
    );
    script += "gic_icv_write 1 pmr 0xff\ngic_icv_write 1 igrpen1 1\n";
    script += "gic_virq 1\ngic_icv_read 1 iar1\ngic_its_errors 0\n";
    let a = answers(&script, &cfg);
    let n = a.len();
    assert!(a.iter().all(|l| l.starts_with("OK")), "{a:?}");
    assert_eq!(a[n - 8], "OK 1", "doorbell IRQ on PE 0");
    assert_eq!(a[n - 7], "OK 0x0000000000002000", "doorbell pINTID 8192");
    assert_eq!(a[n - 3], "OK 1", "vIRQ on PE 1");
    assert_eq!(a[n - 2], "OK 0x0000000000000005", "vSGI 5");
    assert_eq!(a[n - 1], "OK 0 -", "no ITS errors");
}
