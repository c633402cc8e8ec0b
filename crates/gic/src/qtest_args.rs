//! `gic-qtest` command-line options: every configuration the model supports, parsed into a
//! [`QtestConfig`] so a front end (the `ringvisor gic-qtest` subcommand) needs one call:
//! `QtestConfig::from_args(&args)`. Bad values are typed errors, never panics.
//!
//! | option | meaning | default |
//! |---|---|---|
//! | `--gic-version 3\|4\|4.1` | GICv3 + ITS; GICv4.0 (`4` or `4.0`: QEMU's `virt,gic-version=4` layout, 256 KiB redistributor stride, two-frame ITSs, v4.0 VPROPBASER/VPENDBASER and commands); or GICv4.1 (three-frame ITSs, vPE tables, vSGIs) | `3` |
//! | `--pes N` | PEs (1..=512) | 1 |
//! | `--its N` | ITSs (1..=16), 64 KiB frames, two per ITS (three with 4.1), packed from `--its-base` | 1 |
//! | `--affinities A,B,...` | PE affinities (Aff3.Aff2.Aff1.Aff0, `0x` hex or decimal); sets the PE count | QEMU `virt`'s |
//! | `--gicd-base ADDR`, `--gicr-base ADDR`, `--its-base ADDR` | frame bases (one redistributor region) | `virt`'s (`0x0800_0000`, `0x080A_0000` or `0x0A00_0000` for 4.1, `0x0808_0000`) |
//! | `--spis N` | SPIs (multiple of 32, ≤ 988) | 224 (`virt`'s) |
//! | `--lpi-bits N` | LPI INTID bits (14..=16) | 16 |
//! | `--devbits N`, `--eventbits N` | ITS DeviceID / EventID bits | 16 / 16 |
//! | `--pta` | GITS_TYPER.PTA = 1 (RDbase is a physical address) | off |
//! | `--ram-base ADDR`, `--ram-size SIZE` | guest RAM (`SIZE` takes QEMU's `K`/`M`/`G` binary suffixes) | `0x4000_0000`, `128M` |
//! | `--vpeid-bits N` | GICv4.x: vPEID bits the model accepts (GICv4.1: GICD_TYPER2.VID + 1), 1..=16 | 16 |
//! | `--common-lpi-aff N` | GICv4.1: GICR_TYPER.CommonLPIAff (0..=3): redistributors sharing a vPE table | 0 |
//! | `--svpet N` | GICv4.1: GITS_TYPER.SVPET (0..=3; 0 = ITS tables not shared) | 1 |
//! | `--no-vmovp` | GICv4.x: GITS_TYPER.VMOVP = 0 (ITSList + sequence numbers) | VMOVP = 1 |
//! | `--no-dirty` | GICv4.1: GICR_TYPER.Dirty = 0 | Dirty = 1 |
//! | `--no-vsgi` | GICv4.1: no nASSGIcap / VSGI | vSGIs |
//! | `--nid` | GICv4.1: GITS_TYPER.nID = 1 (no individual doorbells) | off |
//! | `--busy-reads N` | GICv4.1: reads SYNCR.Busy / VSGIPENDR.Busy / VPENDBASER.Dirty stay set | 1 |
//!
//! GICv4.x options given with `--gic-version 3`, and GICv4.1-only ones with `--gic-version 4`,
//! are refused (they would be ignored).

use thiserror::Error;

use crate::config::{GicConfig, ItsConfig, RedistRegion, V41Config};
use crate::error::ConfigError;
use crate::qtest::QtestConfig;
use crate::regs::FRAME_SIZE;

/// Why `gic-qtest` options were refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QtestArgError {
    /// The option is not one `gic-qtest` knows.
    #[error("unknown option '{0}'")]
    Unknown(String),
    /// The option needs a value and none followed.
    #[error("option {0} needs a value")]
    MissingValue(String),
    /// The value does not parse or is out of range.
    #[error("bad value '{value}' for {option}: {reason}")]
    BadValue {
        /// The option.
        option: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The configuration asks for something the model does not implement.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The resulting configuration is inconsistent.
    #[error("invalid GIC configuration: {0}")]
    Config(#[from] ConfigError),
}

/// A number: `0x` hex or decimal.
fn num(option: &str, v: &str) -> Result<u64, QtestArgError> {
    let r = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(&h.replace('_', ""), 16),
        None => v.replace('_', "").parse::<u64>(),
    };
    r.map_err(|_| QtestArgError::BadValue {
        option: option.to_string(),
        value: v.to_string(),
        reason: "not a number",
    })
}

fn ranged(option: &str, v: &str, lo: u64, hi: u64) -> Result<u64, QtestArgError> {
    let n = num(option, v)?;
    if !(lo..=hi).contains(&n) {
        return Err(QtestArgError::BadValue {
            option: option.to_string(),
            value: v.to_string(),
            reason: "out of range",
        });
    }
    Ok(n)
}

/// A size with QEMU's binary suffixes (`K`, `M`, `G`, `T`; none = bytes).
fn size(option: &str, v: &str) -> Result<u64, QtestArgError> {
    let (digits, shift) = match v.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&v[..v.len() - 1], 10),
        Some('M') => (&v[..v.len() - 1], 20),
        Some('G') => (&v[..v.len() - 1], 30),
        Some('T') => (&v[..v.len() - 1], 40),
        _ => (v, 0),
    };
    let n = num(option, digits)?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| QtestArgError::BadValue {
            option: option.to_string(),
            value: v.to_string(),
            reason: "too large",
        })
}

/// Options as parsed, before building the configuration.
#[derive(Default)]
struct Opts {
    v41: bool,
    v40: bool,
    pes: Option<usize>,
    its: usize,
    affinities: Option<Vec<u32>>,
    gicd_base: Option<u64>,
    gicr_base: Option<u64>,
    its_base: Option<u64>,
    spis: Option<u32>,
    lpi_bits: Option<u8>,
    devbits: Option<u8>,
    eventbits: Option<u8>,
    pta: bool,
    ram_base: Option<u64>,
    ram_size: Option<u64>,
    v41cfg: V41Config,
    /// A GICv4.1-only option was given.
    v41_only: Option<String>,
    /// An option for either GICv4 version was given.
    v4_only: Option<String>,
}

impl Opts {
    fn set(&mut self, opt: &str, v: Option<&str>) -> Result<bool, QtestArgError> {
        let flag = |o: &mut Opts| o.v41_only = Some(opt.to_string());
        match opt {
            "--pta" => self.pta = true,
            "--no-vmovp" => {
                self.v41cfg.vmovp = false;
                self.v4_only = Some(opt.to_string());
            }
            "--no-dirty" => {
                self.v41cfg.dirty = false;
                flag(self);
            }
            "--no-vsgi" => {
                self.v41cfg.nassgi_cap = false;
                flag(self);
            }
            "--nid" => {
                self.v41cfg.no_individual_doorbells = true;
                flag(self);
            }
            _ => {
                let v = v.ok_or_else(|| QtestArgError::MissingValue(opt.to_string()))?;
                self.set_valued(opt, v)?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn set_valued(&mut self, opt: &str, v: &str) -> Result<(), QtestArgError> {
        match opt {
            "--gic-version" => match v {
                "3" => (self.v41, self.v40) = (false, false),
                "4.1" => (self.v41, self.v40) = (true, false),
                "4" | "4.0" => (self.v41, self.v40) = (false, true),
                _ => {
                    return Err(QtestArgError::BadValue {
                        option: opt.to_string(),
                        value: v.to_string(),
                        reason: "expected 3, 4 (4.0) or 4.1",
                    })
                }
            },
            "--pes" => self.pes = Some(ranged(opt, v, 1, 512)? as usize),
            "--its" => self.its = ranged(opt, v, 1, 16)? as usize,
            "--affinities" => {
                let a = v
                    .split(',')
                    .map(|s| ranged(opt, s, 0, u32::MAX as u64).map(|n| n as u32))
                    .collect::<Result<Vec<u32>, _>>()?;
                self.affinities = Some(a);
            }
            "--gicd-base" => self.gicd_base = Some(num(opt, v)?),
            "--gicr-base" => self.gicr_base = Some(num(opt, v)?),
            "--its-base" => self.its_base = Some(num(opt, v)?),
            "--spis" => self.spis = Some(ranged(opt, v, 0, 988)? as u32),
            "--lpi-bits" => self.lpi_bits = Some(ranged(opt, v, 14, 16)? as u8),
            "--devbits" => self.devbits = Some(ranged(opt, v, 1, 20)? as u8),
            "--eventbits" => self.eventbits = Some(ranged(opt, v, 1, 16)? as u8),
            "--ram-base" => self.ram_base = Some(num(opt, v)?),
            "--ram-size" => self.ram_size = Some(size(opt, v)?),
            "--vpeid-bits" | "--common-lpi-aff" | "--svpet" | "--busy-reads" => {
                if opt == "--vpeid-bits" {
                    self.v4_only = Some(opt.to_string());
                } else {
                    self.v41_only = Some(opt.to_string());
                }
                let c = &mut self.v41cfg;
                match opt {
                    "--vpeid-bits" => c.vpeid_bits = ranged(opt, v, 1, 16)? as u8,
                    "--common-lpi-aff" => c.common_lpi_aff = ranged(opt, v, 0, 3)? as u8,
                    "--svpet" => c.svpet = ranged(opt, v, 0, 3)? as u8,
                    _ => c.busy_reads = ranged(opt, v, 0, 1_000_000)? as u32,
                }
            }
            _ => return Err(QtestArgError::Unknown(opt.to_string())),
        }
        Ok(())
    }

    fn build(self) -> Result<QtestConfig, QtestArgError> {
        if let (false, Some(o)) = (self.v41, &self.v41_only) {
            return Err(QtestArgError::BadValue {
                option: o.clone(),
                value: String::new(),
                reason: "only meaningful with --gic-version 4.1",
            });
        }
        if let (false, false, Some(o)) = (self.v41, self.v40, &self.v4_only) {
            return Err(QtestArgError::BadValue {
                option: o.clone(),
                value: String::new(),
                reason: "only meaningful with --gic-version 4 or 4.1",
            });
        }
        let pes = match (&self.affinities, self.pes) {
            (Some(a), Some(p)) if a.len() != p => {
                return Err(QtestArgError::BadValue {
                    option: "--affinities".to_string(),
                    value: format!("{} entries", a.len()),
                    reason: "must list one affinity per PE (--pes)",
                })
            }
            (Some(a), _) => a.len(),
            (None, p) => p.unwrap_or(1),
        };
        let mut gic = if self.v41 {
            GicConfig::virt_v41(pes, self.its.max(1))
        } else if self.v40 {
            GicConfig::virt_v40(pes)
        } else {
            GicConfig::virt(pes)
        };
        if let Some(a) = self.affinities {
            gic.pe_affinities = a;
        }
        if let Some(b) = self.gicd_base {
            gic.gicd_base = b;
        }
        if let Some(b) = self.gicr_base {
            gic.gicr_regions = vec![RedistRegion {
                base: b,
                count: pes,
            }];
        }
        let its_n = self.its.max(1);
        let frames = if self.v41 { 4 } else { 2 };
        // GICv4.0 ITSs have the two GICv3 frames.
        let first = self.its_base.unwrap_or(gic.its[0].base);
        gic.its = (0..its_n)
            .map(|i| ItsConfig {
                base: first + frames * FRAME_SIZE * i as u64,
                device_bits: self.devbits.unwrap_or(ItsConfig::default().device_bits),
                event_bits: self.eventbits.unwrap_or(ItsConfig::default().event_bits),
                pta: self.pta,
            })
            .collect();
        if let Some(s) = self.spis {
            gic.num_spis = s;
        }
        if let Some(b) = self.lpi_bits {
            gic.lpi_id_bits = b;
        }
        if self.v41 {
            gic.v41 = Some(self.v41cfg);
        } else if self.v40 {
            gic.v41 = Some(V41Config {
                vmovp: self.v41cfg.vmovp,
                vpeid_bits: self.v41cfg.vpeid_bits,
                ..V41Config::v4_0()
            });
        }
        gic.validate()?;
        let d = QtestConfig::default();
        Ok(QtestConfig {
            gic,
            ram_base: self.ram_base.unwrap_or(d.ram_base),
            ram_size: self.ram_size.unwrap_or(d.ram_size),
        })
    }
}

impl QtestConfig {
    /// Builds a configuration from `gic-qtest` options (see the module table), e.g.
    /// `["--gic-version", "4.1", "--pes", "4", "--its", "2", "--common-lpi-aff", "1"]`.
    /// `--opt=value` and `--opt value` are both accepted.
    pub fn from_args(args: &[String]) -> Result<QtestConfig, QtestArgError> {
        let mut o = Opts {
            its: 1,
            ..Opts::default()
        };
        o.v41cfg = V41Config::default();
        let mut i = 0;
        while i < args.len() {
            let a = args[i].as_str();
            if !a.starts_with("--") {
                return Err(QtestArgError::Unknown(a.to_string()));
            }
            if let Some((opt, v)) = a.split_once('=') {
                if !o.set(opt, Some(v))? {
                    return Err(QtestArgError::BadValue {
                        option: opt.to_string(),
                        value: v.to_string(),
                        reason: "this option takes no value",
                    });
                }
                i += 1;
                continue;
            }
            let used = o.set(a, args.get(i + 1).map(|s| s.as_str()))?;
            i += if used { 2 } else { 1 };
        }
        o.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn default_is_one_pe_gicv3_like_the_old_cli() {
        assert_eq!(QtestConfig::from_args(&[]).unwrap(), QtestConfig::default());
        let c = QtestConfig::from_args(&args("--pes 4")).unwrap();
        assert_eq!(c.gic, GicConfig::virt(4));
    }

    #[test]
    fn v41_with_shared_vpe_tables_and_two_its() {
        let c = QtestConfig::from_args(&args(
            "--gic-version=4.1 --affinities 0x0,0x1,0x100,0x101 --its 2 --common-lpi-aff 3 \
             --svpet 3 --vpeid-bits 12 --no-vmovp --ram-size 64M",
        ))
        .unwrap();
        let v = c.gic.v41.as_ref().unwrap();
        assert_eq!((v.common_lpi_aff, v.svpet, v.vpeid_bits), (3, 3, 12));
        assert!(!v.vmovp);
        assert_eq!(c.gic.num_pes(), 4);
        assert_eq!(c.gic.its.len(), 2);
        assert_eq!(c.gic.its[1].base - c.gic.its[0].base, 4 * FRAME_SIZE);
        assert_eq!(c.ram_size, 64 << 20);
    }

    #[test]
    fn v40_is_qemus_gic_version_4_layout() {
        let c = QtestConfig::from_args(&args("--gic-version 4 --pes 2")).unwrap();
        assert_eq!(c.gic, GicConfig::virt_v40(2));
        assert_eq!(c.gic.version(), crate::GicVersion::V4_0);
        assert_eq!(
            c.gic.rd_base(1),
            0x080E_0000,
            "256 KiB stride from 0x080A_0000"
        );
        assert_eq!(c.gic.its_size(), 2 * FRAME_SIZE);
        let c = QtestConfig::from_args(&args("--gic-version=4.0 --no-vmovp")).unwrap();
        let v = c.gic.v41.as_ref().unwrap();
        assert!(v.v4_0 && !v.vmovp && !v.nassgi_cap && v.svpet == 0);
    }

    #[test]
    fn bad_options_are_typed_errors() {
        let e = |s: &str| QtestConfig::from_args(&args(s)).unwrap_err();
        assert!(matches!(
            e("--gic-version 5"),
            QtestArgError::BadValue { .. }
        ));
        assert!(matches!(
            e("--gic-version 4 --svpet 1"),
            QtestArgError::BadValue { .. }
        ));
        assert!(matches!(e("--no-vmovp"), QtestArgError::BadValue { .. }));
        assert!(matches!(e("--pes 0"), QtestArgError::BadValue { .. }));
        assert!(matches!(e("--pes"), QtestArgError::MissingValue(_)));
        assert!(matches!(e("--bogus 1"), QtestArgError::Unknown(_)));
        assert!(matches!(e("--svpet 2"), QtestArgError::BadValue { .. }));
        assert!(matches!(
            e("--pes 2 --affinities 1"),
            QtestArgError::BadValue { .. }
        ));
        assert!(matches!(
            e("--affinities 1,1"),
            QtestArgError::Config(ConfigError::DuplicateAffinity { .. })
        ));
        assert!(matches!(
            e("--ram-size 99999999999T"),
            QtestArgError::BadValue { .. }
        ));
        assert!(matches!(e("--pta=1"), QtestArgError::BadValue { .. }));
    }
}
