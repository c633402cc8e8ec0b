//! Zero-page detection: the bulk pass sends a marker instead of 4 KiB of zeros.

/// Returns true when every byte of `data` is zero.
///
/// Compares 16-byte words and checks the accumulator once per 256 bytes, so a page that is
/// non-zero early exits early and an all-zero page costs 256 word loads. Works for any
/// length (a trailing partial word is checked byte by byte); the empty slice is zero.
///
/// ```
/// use migration::is_zero_page;
/// let mut page = [0u8; 4096];
/// assert!(is_zero_page(&page));
/// page[4095] = 1;
/// assert!(!is_zero_page(&page));
/// ```
pub fn is_zero_page(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(256);
    for block in &mut blocks {
        let mut acc = 0u128;
        for w in block.chunks_exact(16) {
            let mut word = [0u8; 16];
            word.copy_from_slice(w);
            acc |= u128::from_ne_bytes(word);
        }
        if acc != 0 {
            return false;
        }
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(16);
    for w in &mut words {
        let mut word = [0u8; 16];
        word.copy_from_slice(w);
        if u128::from_ne_bytes(word) != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_zero_page_is_zero() {
        assert!(is_zero_page(&[0u8; 4096]));
        assert!(is_zero_page(&[]));
    }

    #[test]
    fn a_single_set_bit_anywhere_makes_a_page_non_zero() {
        let mut page = vec![0u8; 4096];
        for i in 0..page.len() {
            for bit in [0x01u8, 0x80] {
                page[i] = bit;
                assert!(!is_zero_page(&page), "byte {i} bit {bit:#x} missed");
                page[i] = 0;
            }
        }
        assert!(is_zero_page(&page));
    }

    #[test]
    fn odd_lengths_check_the_tail_bytes() {
        for len in [1usize, 15, 17, 255, 257, 4095, 4097] {
            let mut v = vec![0u8; len];
            assert!(is_zero_page(&v), "len {len}");
            v[len - 1] = 7;
            assert!(!is_zero_page(&v), "len {len} tail missed");
        }
    }

    #[test]
    fn unaligned_slices_are_handled() {
        let mut buf = vec![0u8; 4096 + 3];
        buf[4096 + 2] = 1;
        assert!(is_zero_page(&buf[1..4097]));
        assert!(!is_zero_page(&buf[3..4099]));
    }
}
