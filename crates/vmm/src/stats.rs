//! KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+): a header, descriptors with
//! names, and a data block of `u64`s, read with `pread` from the file the ioctl returns.

use std::os::unix::fs::FileExt;

/// Bytes of `struct kvm_stats_header`.
const HEADER: usize = 24;
/// Bytes of `struct kvm_stats_desc` before its name.
const DESC: usize = 16;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The first `u64` of statistic `name`, or `None` if the file has no such statistic.
pub(crate) fn read_stat(f: &std::fs::File, name: &str) -> std::io::Result<Option<u64>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad KVM stats header");
    let mut h = [0u8; HEADER];
    f.read_exact_at(&mut h, 0)?;
    let name_size = u32_at(&h, 4) as usize;
    let num_desc = u32_at(&h, 8) as usize;
    let desc_offset = u64::from(u32_at(&h, 16));
    let data_offset = u64::from(u32_at(&h, 20));
    let each = DESC.checked_add(name_size).ok_or_else(bad)?;
    let len = each
        .checked_mul(num_desc)
        .filter(|&l| l <= 1 << 20)
        .ok_or_else(bad)?;
    let mut d = vec![0u8; len];
    f.read_exact_at(&mut d, desc_offset)?;
    for desc in d.chunks_exact(each) {
        let n = &desc[DESC..];
        let n = &n[..n.iter().position(|&c| c == 0).unwrap_or(n.len())];
        if n == name.as_bytes() {
            let offset = u64::from(u32_at(desc, 8));
            let mut v = [0u8; 8];
            f.read_exact_at(&mut v, data_offset + offset)?;
            return Ok(Some(u64::from_le_bytes(v)));
        }
    }
    Ok(None)
}
