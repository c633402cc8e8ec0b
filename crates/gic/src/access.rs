//! Helpers shared by the frame modules for decoding MMIO accesses: width checks, 64-bit
//! registers reached through 32-bit halves, and bitmap register banks.

use crate::error::MmioError;

/// Requires a 32-bit access.
pub(crate) fn only32(offset: u64, width: u8) -> Result<(), MmioError> {
    if width == 4 {
        Ok(())
    } else {
        Err(MmioError::WidthNotPermitted { offset, width })
    }
}

/// For a 64-bit register at `reg`, an access at `offset` of `width` bytes: returns the byte
/// position of the access inside the register (0 or 4) if it is a permitted 64-bit access or
/// 32-bit access to one half.
pub(crate) fn half64(reg: u64, offset: u64, width: u8) -> Result<u32, MmioError> {
    match (offset - reg, width) {
        (0, 8) => Ok(0),
        (0, 4) => Ok(0),
        (4, 4) => Ok(4),
        _ => Err(MmioError::WidthNotPermitted { offset, width }),
    }
}

/// Extracts the accessed part of a 64-bit register value.
pub(crate) fn read_part(value: u64, pos: u32, width: u8) -> u64 {
    let v = value >> (pos * 8);
    if width == 8 {
        v
    } else {
        v & 0xFFFF_FFFF
    }
}

/// Merges a write of `width` bytes at byte position `pos` into a 64-bit register value.
pub(crate) fn merge_part(old: u64, new: u64, pos: u32, width: u8) -> u64 {
    if width == 8 {
        return new;
    }
    let shift = pos * 8;
    let mask = 0xFFFF_FFFFu64 << shift;
    (old & !mask) | ((new & 0xFFFF_FFFF) << shift)
}

/// Reads bit `n` of a bitmap held in 32-bit words; out-of-range bits read as 0.
pub(crate) fn bit(words: &[u32], n: u32) -> bool {
    words
        .get((n / 32) as usize)
        .is_some_and(|w| w & (1 << (n % 32)) != 0)
}

/// Sets or clears bit `n` of a bitmap; out-of-range bits are ignored.
pub(crate) fn set_bit(words: &mut [u32], n: u32, v: bool) {
    if let Some(w) = words.get_mut((n / 32) as usize) {
        if v {
            *w |= 1 << (n % 32);
        } else {
            *w &= !(1 << (n % 32));
        }
    }
}

/// Applies a "set" (`set == true`) or "clear" register write to a bitmap word.
pub(crate) fn set_or_clear(word: &mut u32, value: u32, set: bool) {
    if set {
        *word |= value;
    } else {
        *word &= !value;
    }
}

/// Reads `width` bytes starting at byte `start` of a byte array (little endian); bytes past
/// the end read as 0.
pub(crate) fn read_bytes(bytes: &[u8], start: usize, width: u8) -> u64 {
    let mut v = 0u64;
    for i in 0..width as usize {
        let b = bytes.get(start + i).copied().unwrap_or(0);
        v |= (b as u64) << (8 * i);
    }
    v
}

/// Writes `width` bytes of `value` at byte `start` of a byte array, masking each byte with
/// `mask`; bytes past the end are ignored.
pub(crate) fn write_bytes(bytes: &mut [u8], start: usize, width: u8, value: u64, mask: u8) {
    for i in 0..width as usize {
        if let Some(b) = bytes.get_mut(start + i) {
            *b = ((value >> (8 * i)) as u8) & mask;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half64_accepts_full_and_half_accesses_only() {
        assert_eq!(half64(0x70, 0x70, 8), Ok(0));
        assert_eq!(half64(0x70, 0x70, 4), Ok(0));
        assert_eq!(half64(0x70, 0x74, 4), Ok(4));
        assert!(half64(0x70, 0x74, 8).is_err());
        assert!(half64(0x70, 0x72, 2).is_err());
        assert!(half64(0x70, 0x70, 1).is_err());
    }

    #[test]
    fn merge_part_replaces_only_the_written_half() {
        let old = 0x1111_2222_3333_4444;
        assert_eq!(merge_part(old, 0xAAAA_BBBB, 0, 4), 0x1111_2222_AAAA_BBBB);
        assert_eq!(merge_part(old, 0xAAAA_BBBB, 4, 4), 0xAAAA_BBBB_3333_4444);
        assert_eq!(merge_part(old, 5, 0, 8), 5);
        assert_eq!(read_part(old, 4, 4), 0x1111_2222);
        assert_eq!(read_part(old, 0, 4), 0x3333_4444);
    }

    #[test]
    fn bitmap_helpers_ignore_out_of_range_bits() {
        let mut w = [0u32; 2];
        set_bit(&mut w, 33, true);
        set_bit(&mut w, 64, true);
        assert_eq!(w, [0, 2]);
        assert!(bit(&w, 33));
        assert!(!bit(&w, 64));
        set_bit(&mut w, 33, false);
        assert_eq!(w, [0, 0]);
    }

    #[test]
    fn byte_helpers_mask_and_clip() {
        let mut b = [0u8; 3];
        write_bytes(&mut b, 1, 4, 0xFFFF_FFFF, 0xF8);
        assert_eq!(b, [0, 0xF8, 0xF8]);
        assert_eq!(read_bytes(&b, 1, 4), 0xF8F8);
    }
}
