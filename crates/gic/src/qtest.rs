//! A front end that speaks QEMU's qtest line protocol, so one script can drive both QEMU's
//! GICv3/ITS (`qemu-system-aarch64 ... -qtest stdio`) and this model.
//!
//! Supported QEMU commands (numbers are `0x` hex or decimal):
//! - `readb|readw|readl|readq ADDR` -> `OK 0x%016x`
//! - `writeb|writew|writel|writeq ADDR VALUE` -> `OK`
//! - `read ADDR LEN` -> `OK 0x<2*LEN hex digits>`; `write ADDR LEN 0x<hex>` -> `OK`
//! - `memset ADDR LEN BYTE` -> `OK`
//!
//! Model-only commands for the CPU interface and the ITS (QEMU cannot reach system registers
//! through qtest):
//! - `gic_icc_read PE REG` -> `OK 0x%016x` (REG: `iar1`, `iar0`, `hppir1`, `hppir0`, `rpr`,
//!   `pmr`, `bpr1`, `bpr0`, `ctlr`, `igrpen1`, `igrpen0`, `ap1r0`, `ap0r0`; reading `iar1` or
//!   `iar0` acknowledges)
//! - `gic_icc_write PE REG VALUE` -> `OK` (REG: `eoir1`, `eoir0`, `dir`, `pmr`, `bpr1`, `bpr0`,
//!   `ctlr`, `igrpen1`, `igrpen0`, `ap1r0`, `ap0r0`, `sgi1r`, `sgi0r`)
//! - `gic_fiq PE` -> `OK 0|1`: the PE's FIQ line (Group 0)
//! - `gic_ack PE` (= `gic_icc_read PE iar1`), `gic_eoi PE INTID` (= `gic_icc_write PE eoir1`)
//! - `gic_irq PE` -> `OK 0|1`: the PE's IRQ line
//! - `gic_msi ITS DEVICEID EVENTID` -> `OK` or `ERR <reason>`
//! - `gic_msi_devid DEVICEID` -> `OK`: DeviceID carried by GITS_TRANSLATER MMIO writes
//! - `gic_spi INTID 0|1` / `gic_ppi PE INTID 0|1` -> `OK`: drive an SPI / PPI input line
//! - `gic_reset` -> `OK`: system reset of the model (guest RAM is kept)
//! - `gic_its_errors ITS` -> `OK <total> <last error or ->`
//! - `gic_dirty` -> `OK <n> <page>...`: drains the model's guest-memory write log
//! - The virtual CPU interface: `gic_icv_read PE REG` / `gic_icv_write PE REG VALUE` (REG:
//!   `iar1`, `eoir1`, `hppir1`, `iar0`, `eoir0`, `hppir0`, `pmr`, `rpr`, `ctlr`, `igrpen0`,
//!   `igrpen1`, `dir`, `bpr0`, `bpr1`, `ap0r0`, `ap1r0`) of the guest on PE (a resident vPE
//!   or ICH_HCR_EL2.En = 1), `gic_virq PE` -> `OK 0|1`, and the hypervisor's
//!   `gic_ich_read PE REG` / `gic_ich_write PE REG VALUE` (REG: `lr0`..`lr3`, `hcr`, `vmcr`,
//!   `vtr`, `misr`, `eisr`, `elrsr`, `ap0r0`, `ap1r0`)
//!
//! The configuration comes from [`QtestConfig::from_args`] (`gic-qtest` options: GIC
//! version, PEs, ITSs, layout, GICv4.1 features; see `docs/gic.md`).
//!
//! Accesses outside the GIC frames and guest RAM read as zero and ignore writes, as on QEMU's
//! bus; GIC accesses the model rejects (wrong width, ...) do the same. An unknown command
//! answers `FAIL Unknown command '<word>'`, exactly as QEMU does; a known command with bad
//! arguments, or a model command that cannot be carried out (no such PE, MSI dropped),
//! answers `ERR <reason>`, as QEMU does for its argument errors (QEMU aborts on some malformed
//! numbers; the model never does).

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::GicConfig;
use crate::cpuif::IccReg;
use crate::error::ConfigError;
use crate::mem::{GuestMem, VecMem};
use crate::Gic;

/// Guest RAM base of QEMU's `virt` board.
pub const VIRT_RAM_BASE: u64 = 0x4000_0000;
/// Default guest RAM size (QEMU's default for `virt`: 128 MiB).
pub const DEFAULT_RAM_SIZE: u64 = 128 << 20;
/// Largest `read`/`write`/`memset` length accepted (guards against absurd allocations).
pub const MAX_BULK_LEN: u64 = 16 << 20;

/// What `serve` builds (serde-serializable, so a front end can read it from a file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QtestConfig {
    /// The GIC.
    pub gic: GicConfig,
    /// Guest RAM base.
    pub ram_base: u64,
    /// Guest RAM size in bytes.
    pub ram_size: u64,
}

impl Default for QtestConfig {
    fn default() -> Self {
        QtestConfig {
            gic: GicConfig::virt(1),
            ram_base: VIRT_RAM_BASE,
            ram_size: DEFAULT_RAM_SIZE,
        }
    }
}

/// Failure of the qtest server itself (protocol errors are answered with `FAIL`/`ERR`, not
/// this).
#[derive(Debug, Error)]
pub enum QtestError {
    /// The GIC configuration is invalid.
    #[error("invalid GIC configuration: {0}")]
    Config(#[from] ConfigError),
    /// The RAM size does not fit in memory on this host.
    #[error("RAM size {0:#x} is too large")]
    RamSize(u64),
    /// Reading commands or writing answers failed.
    #[error("qtest I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts of what a `serve` run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QtestSummary {
    /// Commands answered `OK`.
    pub ok: u64,
    /// Commands answered `FAIL` or `ERR`.
    pub failed: u64,
}

/// One qtest session: a model plus its RAM, answering one line at a time.
#[derive(Debug)]
pub struct QtestSession {
    gic: Gic<VecMem>,
}

fn parse_num(s: &str) -> Result<u64, String> {
    let r = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        s.parse::<u64>()
    };
    r.map_err(|_| format!("bad number '{s}'"))
}

fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 0,
    }
}

impl QtestSession {
    /// A fresh model with zeroed RAM.
    pub fn new(cfg: &QtestConfig) -> Result<Self, QtestError> {
        let size = usize::try_from(cfg.ram_size).map_err(|_| QtestError::RamSize(cfg.ram_size))?;
        if cfg.ram_size > (1 << 34) {
            return Err(QtestError::RamSize(cfg.ram_size));
        }
        let mem = VecMem::new(cfg.ram_base, size);
        Ok(QtestSession {
            gic: Gic::new(cfg.gic.clone(), mem)?,
        })
    }

    /// The model.
    pub fn gic(&mut self) -> &mut Gic<VecMem> {
        &mut self.gic
    }

    fn load(&mut self, addr: u64, width: u8) -> u64 {
        if self.gic.claims(addr) {
            return self.gic.read(addr, width).unwrap_or(0);
        }
        let mut b = [0u8; 8];
        if self.gic.mem().read(addr, &mut b[..width as usize]).is_err() {
            return 0;
        }
        u64::from_le_bytes(b)
    }

    fn store(&mut self, addr: u64, width: u8, value: u64) {
        if self.gic.claims(addr) {
            let _ = self.gic.write(addr, width, value);
            return;
        }
        let b = value.to_le_bytes();
        let _ = self.gic.mem_mut().write(addr, &b[..width as usize]);
    }

    fn bulk_read(&mut self, addr: u64, len: u64) -> Vec<u8> {
        let mut out = vec![0u8; len as usize];
        if self.gic.mem().read(addr, &mut out).is_err() {
            // Partially backed ranges: byte by byte, unbacked bytes read as zero.
            for (i, b) in out.iter_mut().enumerate() {
                let mut one = [0u8; 1];
                if self.gic.mem().read(addr + i as u64, &mut one).is_ok() {
                    *b = one[0];
                }
            }
        }
        out
    }

    fn bulk_write(&mut self, addr: u64, data: &[u8]) {
        if self.gic.mem_mut().write(addr, data).is_err() {
            for (i, b) in data.iter().enumerate() {
                let _ = self.gic.mem_mut().write(addr + i as u64, &[*b]);
            }
        }
    }

    /// Answers one command line (without the trailing newline). Blank lines get `None`.
    pub fn handle_line(&mut self, line: &str) -> Option<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let cmd = *words.first()?;
        Some(match self.dispatch(cmd, &words[1..]) {
            Ok(s) => s,
            Err(e) if e.starts_with("Unknown command") => format!("FAIL {e}"),
            Err(e) => format!("ERR {e}"),
        })
    }

    fn arg(args: &[&str], i: usize) -> Result<u64, String> {
        args.get(i)
            .ok_or_else(|| "missing argument".to_string())
            .and_then(|s| parse_num(s))
    }

    fn pe(args: &[&str]) -> Result<usize, String> {
        usize::try_from(Self::arg(args, 0)?).map_err(|_| "bad PE".to_string())
    }

    fn dispatch(&mut self, cmd: &str, args: &[&str]) -> Result<String, String> {
        let width = match cmd {
            "readb" | "writeb" => 1,
            "readw" | "writew" => 2,
            "readl" | "writel" => 4,
            "readq" | "writeq" => 8,
            _ => 0,
        };
        match cmd {
            "readb" | "readw" | "readl" | "readq" => {
                let addr = Self::arg(args, 0)?;
                Ok(format!("OK 0x{:016x}", self.load(addr, width)))
            }
            "writeb" | "writew" | "writel" | "writeq" => {
                let addr = Self::arg(args, 0)?;
                let v = Self::arg(args, 1)?;
                self.store(addr, width, v);
                Ok("OK".to_string())
            }
            "read" | "write" | "memset" => self.dispatch_bulk(cmd, args),
            "gic_icc_read" | "gic_ack" => {
                let pe = Self::pe(args)?;
                let reg = if cmd == "gic_ack" {
                    IccReg::Iar1
                } else {
                    let name = args.get(1).ok_or("missing register")?;
                    IccReg::from_name(name).ok_or_else(|| format!("unknown register {name}"))?
                };
                let v = self.gic.icc_read(pe, reg).map_err(|e| e.to_string())?;
                Ok(format!("OK 0x{v:016x}"))
            }
            "gic_icc_write" | "gic_eoi" => {
                let pe = Self::pe(args)?;
                let (reg, v) = if cmd == "gic_eoi" {
                    (IccReg::Eoir1, Self::arg(args, 1)?)
                } else {
                    let name = args.get(1).ok_or("missing register")?;
                    let reg = IccReg::from_name(name)
                        .ok_or_else(|| format!("unknown register {name}"))?;
                    (reg, Self::arg(args, 2)?)
                };
                self.gic.icc_write(pe, reg, v).map_err(|e| e.to_string())?;
                Ok("OK".to_string())
            }
            "gic_icv_read" | "gic_icv_write" | "gic_ich_read" | "gic_ich_write" | "gic_virq" => {
                self.dispatch_virtual(cmd, args)
            }
            "gic_irq" | "gic_fiq" => {
                let pe = Self::pe(args)?;
                if pe >= self.gic.config().num_pes() {
                    return Err(format!("PE {pe} does not exist"));
                }
                let level = if cmd == "gic_irq" {
                    self.gic.irq_line(pe)
                } else {
                    self.gic.fiq_line(pe)
                };
                Ok(format!("OK {}", level as u8))
            }
            "gic_msi" => {
                let its = Self::arg(args, 0)? as usize;
                let dev = Self::arg(args, 1)? as u32;
                let ev = Self::arg(args, 2)? as u32;
                self.gic.send_msi(its, dev, ev).map_err(|e| e.to_string())?;
                Ok("OK".to_string())
            }
            "gic_spi" => {
                let intid = u32::try_from(Self::arg(args, 0)?).map_err(|_| "bad INTID")?;
                let level = Self::arg(args, 1)? != 0;
                if !self.gic.set_spi_level(intid, level) {
                    return Err(format!("INTID {intid} is not an implemented SPI"));
                }
                Ok("OK".to_string())
            }
            "gic_ppi" => {
                let pe = Self::pe(args)?;
                let intid = u32::try_from(Self::arg(args, 1)?).map_err(|_| "bad INTID")?;
                let level = Self::arg(args, 2)? != 0;
                if !self.gic.set_ppi_level(pe, intid, level) {
                    return Err(format!("no PPI {intid} on PE {pe}"));
                }
                Ok("OK".to_string())
            }
            "gic_reset" => {
                self.gic.reset();
                Ok("OK".to_string())
            }
            "gic_msi_devid" => {
                let dev = Self::arg(args, 0)? as u32;
                self.gic.set_msi_device_id(dev);
                Ok("OK".to_string())
            }
            "gic_its_errors" => {
                let its = Self::arg(args, 0)? as usize;
                let (errs, total) = self
                    .gic
                    .its_errors(its)
                    .ok_or_else(|| format!("ITS {its} does not exist"))?;
                let last = errs.last().map_or("-".to_string(), |e| {
                    format!("{:?}", e.error).replace(' ', "")
                });
                Ok(format!("OK {total} {last}"))
            }
            "gic_dirty" => {
                let mut pages = Vec::new();
                self.gic.write_log().drain_pages_into(&mut pages);
                let mut s = format!("OK {}", pages.len());
                for p in pages {
                    s.push_str(&format!(" 0x{p:x}"));
                }
                Ok(s)
            }
            other => Err(format!("Unknown command '{other}'")),
        }
    }

    /// The bulk memory commands: `read`, `write`, `memset`.
    fn dispatch_bulk(&mut self, cmd: &str, args: &[&str]) -> Result<String, String> {
        match cmd {
            "read" => {
                let addr = Self::arg(args, 0)?;
                let len = Self::arg(args, 1)?;
                if len == 0 || len > MAX_BULK_LEN {
                    return Err(format!("bad length {len}"));
                }
                let data = self.bulk_read(addr, len);
                let mut s = String::with_capacity(3 + data.len() * 2);
                s.push_str("OK 0x");
                for b in data {
                    s.push_str(&format!("{b:02x}"));
                }
                Ok(s)
            }
            "write" => {
                let addr = Self::arg(args, 0)?;
                let len = Self::arg(args, 1)?;
                if len == 0 || len > MAX_BULK_LEN {
                    return Err(format!("bad length {len}"));
                }
                let hex = args.get(2).ok_or("missing data")?;
                let hex = hex.strip_prefix("0x").ok_or("data must start with 0x")?;
                if hex.is_empty() {
                    return Err("invalid argument size".to_string());
                }
                let hb = hex.as_bytes();
                let data: Vec<u8> = (0..len as usize)
                    .map(|i| {
                        let hi = hb.get(2 * i).copied().map_or(0, hex_digit);
                        let lo = hb.get(2 * i + 1).copied().map_or(0, hex_digit);
                        (hi << 4) | lo
                    })
                    .collect();
                self.bulk_write(addr, &data);
                Ok("OK".to_string())
            }
            "memset" => {
                let addr = Self::arg(args, 0)?;
                let len = Self::arg(args, 1)?;
                let v = Self::arg(args, 2)? as u8;
                if len > MAX_BULK_LEN {
                    return Err(format!("bad length {len}"));
                }
                self.bulk_write(addr, &vec![v; len as usize]);
                Ok("OK".to_string())
            }
            other => Err(format!("Unknown command '{other}'")),
        }
    }

    /// The virtual CPU interface commands: the guest's ICV registers and vIRQ line, the
    /// hypervisor's ICH registers.
    fn dispatch_virtual(&mut self, cmd: &str, args: &[&str]) -> Result<String, String> {
        match cmd {
            "gic_icv_read" | "gic_icv_write" => {
                let pe = Self::pe(args)?;
                let name = args.get(1).ok_or("missing register")?;
                let reg = crate::IcvReg::from_name(name)
                    .ok_or_else(|| format!("unknown register {name}"))?;
                if cmd == "gic_icv_read" {
                    let v = self.gic.icv_read(pe, reg).map_err(|e| e.to_string())?;
                    Ok(format!("OK 0x{v:016x}"))
                } else {
                    let v = Self::arg(args, 2)?;
                    self.gic.icv_write(pe, reg, v).map_err(|e| e.to_string())?;
                    Ok("OK".to_string())
                }
            }
            "gic_ich_read" | "gic_ich_write" => {
                let pe = Self::pe(args)?;
                let name = args.get(1).ok_or("missing register")?;
                let reg = crate::IchReg::from_name(name)
                    .ok_or_else(|| format!("unknown register {name}"))?;
                if cmd == "gic_ich_read" {
                    let v = self.gic.ich_read(pe, reg).map_err(|e| e.to_string())?;
                    Ok(format!("OK 0x{v:016x}"))
                } else {
                    let v = Self::arg(args, 2)?;
                    self.gic.ich_write(pe, reg, v).map_err(|e| e.to_string())?;
                    Ok("OK".to_string())
                }
            }
            "gic_virq" => {
                let pe = Self::pe(args)?;
                if pe >= self.gic.config().num_pes() {
                    return Err(format!("PE {pe} does not exist"));
                }
                Ok(format!("OK {}", self.gic.virq_line(pe) as u8))
            }
            other => Err(format!("Unknown command '{other}'")),
        }
    }
}

/// Serves the qtest protocol: reads command lines from `input` until end of file, writes one
/// answer line per command to `output`.
///
/// ```
/// let script = "readl 0x08000000\nwritel 0x08000000 0x2\nreadl 0x08000000\nbogus\n";
/// let mut out = Vec::new();
/// let s = gic::qtest::serve(script.as_bytes(), &mut out, &Default::default()).unwrap();
/// let out = String::from_utf8(out).unwrap();
/// assert_eq!(
///     out,
///     "OK 0x0000000000000050\nOK\nOK 0x0000000000000052\nFAIL Unknown command 'bogus'\n"
/// );
/// assert_eq!((s.ok, s.failed), (3, 1));
/// ```
pub fn serve<R: BufRead, W: Write>(
    input: R,
    mut output: W,
    cfg: &QtestConfig,
) -> Result<QtestSummary, QtestError> {
    let mut input = input;
    let mut session = QtestSession::new(cfg)?;
    let mut summary = QtestSummary::default();
    let mut raw = Vec::new();
    loop {
        raw.clear();
        if input.read_until(b'\n', &mut raw)? == 0 {
            break;
        }
        // Bytes that are not UTF-8 cannot form a valid command; they get an error answer
        // rather than ending the session.
        let line = String::from_utf8_lossy(&raw);
        if let Some(answer) = session.handle_line(&line) {
            if answer.starts_with("OK") {
                summary.ok += 1;
            } else {
                summary.failed += 1;
            }
            writeln!(output, "{answer}")?;
            output.flush()?;
        }
    }
    Ok(summary)
}
