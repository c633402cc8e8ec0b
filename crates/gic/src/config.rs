//! The configuration a [`crate::Gic`] is built from: PEs and their affinities, frame base
//! addresses, interrupt counts and ITS parameters. Defaults follow QEMU's `virt` board.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::regs::{
    FRAME_SIZE, GICD_SIZE, GICR_STRIDE_V3, GICR_STRIDE_V4, GITS_SIZE, GITS_SIZE_V41,
};

/// Distributor base of QEMU's `virt` board.
pub const VIRT_GICD_BASE: u64 = 0x0800_0000;
/// ITS base of QEMU's `virt` board.
pub const VIRT_GITS_BASE: u64 = 0x0808_0000;
/// Redistributor region base of QEMU's `virt` board.
pub const VIRT_GICR_BASE: u64 = 0x080A_0000;
/// SPIs on QEMU's `virt` board (GICD_TYPER.ITLinesNumber = 7: 256 INTIDs).
pub const VIRT_NUM_SPIS: u32 = 224;
/// Redistributors that fit in `virt`'s first region (0x080A_0000..0x0900_0000).
pub const VIRT_GICR_REGION1_PES: usize = 123;
/// Base of `virt`'s second redistributor region (256 GiB), used beyond 123 PEs.
pub const VIRT_GICR2_BASE: u64 = 0x40_0000_0000;

/// A contiguous redistributor region: `count` redistributors from `base`, 128 KiB apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedistRegion {
    /// RD_base of the region's first redistributor.
    pub base: u64,
    /// Number of redistributors (PEs) in the region.
    pub count: usize,
}

/// One ITS: where it is and how wide its identifiers are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItsConfig {
    /// Base of the ITS control frame (the translation frame follows at +64 KiB).
    pub base: u64,
    /// DeviceID bits (GITS_TYPER.Devbits + 1), 1..=20.
    pub device_bits: u8,
    /// EventID bits (GITS_TYPER.IDbits + 1), 1..=20.
    pub event_bits: u8,
    /// GITS_TYPER.PTA: RDbase in commands is a physical address (true) or a processor number.
    pub pta: bool,
}

impl Default for ItsConfig {
    fn default() -> Self {
        ItsConfig {
            base: VIRT_GITS_BASE,
            device_bits: 16,
            event_bits: 16,
            pta: false,
        }
    }
}

/// Complete model configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GicConfig {
    /// Affinity of each PE as Aff3.Aff2.Aff1.Aff0 (the GICR_TYPER.Affinity_Value encoding);
    /// the index in this vector is the PE's Processor_Number.
    pub pe_affinities: Vec<u32>,
    /// Distributor base.
    pub gicd_base: u64,
    /// Redistributor regions, filled with PEs in index order; their counts must add up to
    /// the number of PEs. GICR_TYPER.Last marks the last redistributor of each region.
    pub gicr_regions: Vec<RedistRegion>,
    /// Number of SPIs (multiple of 32, at most 988).
    pub num_spis: u32,
    /// LPI INTID bits supported (GICD_TYPER.IDbits + 1), 14..=16.
    pub lpi_id_bits: u8,
    /// The ITSs.
    pub its: Vec<ItsConfig>,
    /// GICv4.1 (vPEs, direct vLPI and vSGI injection). `None` builds a GICv3 exactly as
    /// before: 128 KiB redistributor stride, two-frame ITSs, no virtual features.
    #[serde(default)]
    pub v41: Option<V41Config>,
}

/// Redistributors of QEMU's `virt` board with `gic-version=4` in its first region
/// (0x080A_0000..0x0900_0000 at the 256 KiB GICv4 stride); further ones go to the second.
pub const VIRT_GICR_REGION1_PES_V4: usize = 61;

/// Redistributor region base of [`GicConfig::virt_v41`] (room for 128 GICv4 redistributors).
pub const V41_GICR_BASE: u64 = 0x0A00_0000;
/// Base of the first ITS of [`GicConfig::virt_v41`]; further ITSs follow 256 KiB apart.
pub const V41_GITS_BASE: u64 = 0x0808_0000;

/// GICv4.1 parameters of the whole GIC (all ITSs are GICv4.1 ITSs when this is set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct V41Config {
    /// vPEID bits (GICD_TYPER2.VID + 1, with VIL = 1), 1..=16.
    pub vpeid_bits: u8,
    /// GICR_TYPER.CommonLPIAff of every redistributor (0..=3): redistributors whose
    /// affinities agree on the levels above it share one vPE configuration table.
    pub common_lpi_aff: u8,
    /// GITS_TYPER.SVPET of every ITS (0..=3; 0 = the ITS's vPE table is its own).
    pub svpet: u8,
    /// GITS_TYPER.VMOVP: a single VMOVP suffices. When false, VMOVP must be sent to every
    /// ITS with the same sequence number and an ITSList naming them.
    pub vmovp: bool,
    /// GICR_TYPER.Dirty: VPENDBASER.Dirty also reports VPT parsing after a load.
    pub dirty: bool,
    /// GICD_TYPER2.nASSGIcap (and GICR_TYPER.VSGI / GITS_TYPER.VSGI).
    pub nassgi_cap: bool,
    /// Reads for which GICR_SYNCR.Busy, GICR_VSGIPENDR.Busy and GICR_VPENDBASER.Dirty stay
    /// set after the operation that starts them (models the latency a driver must poll out).
    pub busy_reads: u32,
    /// GITS_TYPER.nID: individual (per-vLPI) doorbells are not supported.
    pub no_individual_doorbells: bool,
    /// A GICv4.0 instead of a GICv4.1: GICR_VPROPBASER holds the vLPI configuration table
    /// address and IDbits, GICR_VPENDBASER the VPT address (residency is by VPT address, no
    /// vPEID), VMAPP/VMOVP use their v4.0 forms, doorbells are per vLPI only, there are no
    /// vSGIs, no GICD_TYPER2 and no vPE tables at the redistributors. Build it with
    /// [`V41Config::v4_0`] / [`GicConfig::virt_v40`].
    #[serde(default)]
    pub v4_0: bool,
}

impl V41Config {
    /// The GICv4.0 parameters: like QEMU's `virt,gic-version=4` (GITS_TYPER.VMOVP = 1) and
    /// no GICv4.1 feature (no vSGIs, shared vPE tables, Dirty on load or default doorbells).
    pub fn v4_0() -> Self {
        V41Config {
            vpeid_bits: 16,
            common_lpi_aff: 0,
            svpet: 0,
            vmovp: true,
            dirty: false,
            nassgi_cap: false,
            busy_reads: 0,
            no_individual_doorbells: false,
            v4_0: true,
        }
    }
}

/// Which architecture version a [`GicConfig`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GicVersion {
    /// GICv3 with ITS (no virtual features).
    V3,
    /// GICv4.0: direct vLPI injection, residency through VPT addresses, per-vLPI doorbells.
    V4_0,
    /// GICv4.1: vPE tables, vSGIs, default doorbells.
    V4_1,
}

impl Default for V41Config {
    fn default() -> Self {
        V41Config {
            vpeid_bits: 16,
            common_lpi_aff: 0,
            svpet: 1,
            vmovp: true,
            dirty: true,
            nassgi_cap: true,
            busy_reads: 1,
            no_individual_doorbells: false,
            v4_0: false,
        }
    }
}

impl Default for GicConfig {
    fn default() -> Self {
        GicConfig::virt(1)
    }
}

impl GicConfig {
    /// A configuration laid out like QEMU's `virt` board with `pes` PEs whose affinities
    /// follow QEMU's (Aff0 = index % 16, Aff1 = index / 16).
    pub fn virt(pes: usize) -> Self {
        let pe_affinities = (0..pes)
            .map(|i| {
                let i = i as u32;
                ((i / 16) << 8) | (i % 16)
            })
            .collect();
        let first = pes.min(VIRT_GICR_REGION1_PES);
        let mut gicr_regions = vec![RedistRegion {
            base: VIRT_GICR_BASE,
            count: first,
        }];
        if pes > first {
            gicr_regions.push(RedistRegion {
                base: VIRT_GICR2_BASE,
                count: pes - first,
            });
        }
        GicConfig {
            pe_affinities,
            gicd_base: VIRT_GICD_BASE,
            gicr_regions,
            num_spis: VIRT_NUM_SPIS,
            lpi_id_bits: 16,
            its: vec![ItsConfig::default()],
            v41: None,
        }
    }

    /// A GICv4.1 configuration with `pes` PEs (affinities as in [`GicConfig::virt`]) and
    /// `its` ITSs: distributor at `virt`'s address, ITSs from [`V41_GITS_BASE`] 256 KiB
    /// apart (three frames each), one redistributor region at [`V41_GICR_BASE`] with the
    /// 256 KiB GICv4 stride.
    pub fn virt_v41(pes: usize, its: usize) -> Self {
        let mut c = GicConfig::virt(pes);
        c.gicr_regions = vec![RedistRegion {
            base: V41_GICR_BASE,
            count: pes,
        }];
        c.its = (0..its)
            .map(|i| ItsConfig {
                base: V41_GITS_BASE + 4 * FRAME_SIZE * i as u64,
                ..ItsConfig::default()
            })
            .collect();
        c.v41 = Some(V41Config::default());
        c
    }

    /// A GICv4.0 laid out like QEMU's `virt,gic-version=4,its=on`: distributor at
    /// 0x0800_0000, one two-frame ITS at 0x0808_0000, redistributors from 0x080A_0000 with
    /// the 256 KiB GICv4 stride (61 in the first region, the rest at 256 GiB).
    pub fn virt_v40(pes: usize) -> Self {
        let mut c = GicConfig::virt(pes);
        let first = pes.min(VIRT_GICR_REGION1_PES_V4);
        c.gicr_regions = vec![RedistRegion {
            base: VIRT_GICR_BASE,
            count: first,
        }];
        if pes > first {
            c.gicr_regions.push(RedistRegion {
                base: VIRT_GICR2_BASE,
                count: pes - first,
            });
        }
        c.v41 = Some(V41Config::v4_0());
        c
    }

    /// The architecture version this configuration builds.
    pub fn version(&self) -> GicVersion {
        match &self.v41 {
            None => GicVersion::V3,
            Some(v) if v.v4_0 => GicVersion::V4_0,
            Some(_) => GicVersion::V4_1,
        }
    }

    /// Distance between consecutive redistributors: 128 KiB (GICv3) or 256 KiB (GICv4).
    pub fn rd_stride(&self) -> u64 {
        if self.v41.is_some() {
            GICR_STRIDE_V4
        } else {
            GICR_STRIDE_V3
        }
    }

    /// Size of each ITS's register space: two frames, three with GICv4.1 (SGI frame).
    pub fn its_size(&self) -> u64 {
        if self.version() == GicVersion::V4_1 {
            GITS_SIZE_V41
        } else {
            GITS_SIZE
        }
    }

    /// Number of PEs.
    pub fn num_pes(&self) -> usize {
        self.pe_affinities.len()
    }

    /// Number of INTIDs covered by the distributor (SGIs + PPIs + SPIs).
    pub fn num_irqs(&self) -> u32 {
        32 + self.num_spis
    }

    /// RD_base of PE `pe` (0 for a PE no region holds).
    pub fn rd_base(&self, pe: usize) -> u64 {
        let mut first = 0;
        for r in &self.gicr_regions {
            if pe < first + r.count {
                return r.base + ((pe - first) as u64) * self.rd_stride();
            }
            first += r.count;
        }
        0
    }

    /// The PE whose redistributor frames contain `addr`, with the offset from its RD_base.
    pub fn rd_at(&self, addr: u64) -> Option<(usize, u64)> {
        let mut first = 0;
        for r in &self.gicr_regions {
            if let Some(off) = addr.checked_sub(r.base) {
                let idx = off / self.rd_stride();
                if idx < r.count as u64 {
                    return Some((first + idx as usize, off % self.rd_stride()));
                }
            }
            first += r.count;
        }
        None
    }

    /// Whether PE `pe`'s redistributor is the last of its region (GICR_TYPER.Last).
    pub fn rd_is_last(&self, pe: usize) -> bool {
        let mut end = 0;
        for r in &self.gicr_regions {
            end += r.count;
            if pe + 1 == end {
                return true;
            }
            if pe < end {
                return false;
            }
        }
        false
    }

    /// Checks the configuration describes a GICv3 this model can build.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let n = self.pe_affinities.len();
        if n == 0 {
            return Err(ConfigError::NoPes);
        }
        if n > 0x1_0000 {
            return Err(ConfigError::TooManyPes(n));
        }
        for (i, a) in self.pe_affinities.iter().enumerate() {
            if let Some(j) = self.pe_affinities[..i].iter().position(|b| b == a) {
                return Err(ConfigError::DuplicateAffinity {
                    first: j,
                    second: i,
                    affinity: *a,
                });
            }
        }
        if self.num_spis & 31 != 0 || self.num_spis > 988 {
            return Err(ConfigError::BadSpiCount(self.num_spis));
        }
        if !(14..=16).contains(&self.lpi_id_bits) {
            return Err(ConfigError::BadLpiIdBits(self.lpi_id_bits));
        }
        let covered: usize = self.gicr_regions.iter().map(|r| r.count).sum();
        if covered != n {
            return Err(ConfigError::RedistCount { covered, pes: n });
        }
        if let Some(v) = &self.v41 {
            if !(1..=16).contains(&v.vpeid_bits) {
                return Err(ConfigError::BadV41 {
                    what: "vpeid_bits",
                    value: v.vpeid_bits as u32,
                });
            }
            if v.common_lpi_aff > 3 {
                return Err(ConfigError::BadV41 {
                    what: "common_lpi_aff",
                    value: v.common_lpi_aff as u32,
                });
            }
            if v.svpet > 3 {
                return Err(ConfigError::BadV41 {
                    what: "svpet",
                    value: v.svpet as u32,
                });
            }
            if v.v4_0 {
                for (what, bad) in [
                    ("svpet (GICv4.1 only)", v.svpet as u32),
                    (
                        "common_lpi_aff (GICv4.1 vPE table sharing)",
                        v.common_lpi_aff as u32,
                    ),
                    ("nassgi_cap (GICv4.1 only)", v.nassgi_cap as u32),
                    (
                        "no_individual_doorbells (GICv4.1 only)",
                        v.no_individual_doorbells as u32,
                    ),
                    ("dirty (GICv4.1 only)", v.dirty as u32),
                ] {
                    if bad != 0 {
                        return Err(ConfigError::BadV41 { what, value: bad });
                    }
                }
            }
            if self.its.len() > 16 {
                return Err(ConfigError::BadV41 {
                    what: "ITS count (ITS_Number is 4 bits)",
                    value: self.its.len() as u32,
                });
            }
        }
        let mut frames: Vec<(String, u64, u64)> =
            vec![("GICD".to_string(), self.gicd_base, GICD_SIZE)];
        for (i, r) in self.gicr_regions.iter().enumerate() {
            let size = self
                .rd_stride()
                .checked_mul(r.count as u64)
                .ok_or(ConfigError::TooManyPes(r.count))?;
            frames.push((format!("GICR region {i}"), r.base, size));
        }
        for (i, its) in self.its.iter().enumerate() {
            for (what, bits) in [("device", its.device_bits), ("event", its.event_bits)] {
                if !(1..=20).contains(&bits) {
                    return Err(ConfigError::BadItsBits { its: i, what, bits });
                }
            }
            frames.push((format!("ITS{i}"), its.base, self.its_size()));
        }
        for (i, (name, base, size)) in frames.iter().enumerate() {
            if base & (FRAME_SIZE - 1) != 0 {
                return Err(ConfigError::Misaligned {
                    name: name.clone(),
                    base: *base,
                });
            }
            if base.checked_add(*size).is_none() {
                return Err(ConfigError::Misaligned {
                    name: name.clone(),
                    base: *base,
                });
            }
            for (other, obase, osize) in &frames[..i] {
                if *base < obase + osize && *obase < base + size {
                    return Err(ConfigError::Overlap {
                        a: other.clone(),
                        b: name.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virt_layout_is_valid_and_follows_qemu() {
        let c = GicConfig::virt(20);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.rd_base(1), 0x080C_0000);
        assert_eq!(c.rd_at(0x080C_0010), Some((1, 0x10)));
        assert!(c.rd_is_last(19) && !c.rd_is_last(18));
        let big = GicConfig::virt(130);
        assert_eq!(big.validate(), Ok(()));
        assert_eq!(big.gicr_regions.len(), 2);
        assert_eq!(big.rd_base(122), 0x080A_0000 + 122 * 0x2_0000);
        assert_eq!(big.rd_base(123), VIRT_GICR2_BASE);
        assert_eq!(big.rd_at(VIRT_GICR2_BASE + 0x2_0000 + 8), Some((124, 8)));
        assert!(big.rd_is_last(122) && big.rd_is_last(129) && !big.rd_is_last(123));
        assert_eq!(big.rd_base(130), 0);
        assert_eq!(c.pe_affinities[17], 0x0101);
        assert_eq!(c.num_irqs(), 256);
    }

    #[test]
    fn invalid_configurations_are_rejected() {
        let mut c = GicConfig::virt(2);
        c.pe_affinities[1] = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::DuplicateAffinity { .. })
        ));
        let c = GicConfig {
            num_spis: 1000,
            ..GicConfig::virt(1)
        };
        assert_eq!(c.validate(), Err(ConfigError::BadSpiCount(1000)));
        let c = GicConfig {
            lpi_id_bits: 20,
            ..GicConfig::virt(1)
        };
        assert_eq!(c.validate(), Err(ConfigError::BadLpiIdBits(20)));
        let c = GicConfig {
            gicd_base: 0x0808_0000,
            ..GicConfig::virt(1)
        };
        assert!(matches!(c.validate(), Err(ConfigError::Overlap { .. })));
        let c = GicConfig {
            gicd_base: 0x100,
            ..GicConfig::virt(1)
        };
        assert!(matches!(c.validate(), Err(ConfigError::Misaligned { .. })));
        let c = GicConfig {
            gicd_base: u64::MAX - 0xFFFF,
            ..GicConfig::virt(1)
        };
        assert!(c.validate().is_err());
        let mut c = GicConfig::virt(1);
        c.its[0].device_bits = 0;
        assert!(matches!(c.validate(), Err(ConfigError::BadItsBits { .. })));
        assert_eq!(GicConfig::virt(0).validate(), Err(ConfigError::NoPes));
        let mut c = GicConfig::virt(2);
        c.gicr_regions[0].count = 1;
        assert_eq!(
            c.validate(),
            Err(ConfigError::RedistCount { covered: 1, pes: 2 })
        );
    }
}
