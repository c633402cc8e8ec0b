//! The bitmap interfaces: `KVM_GET_DIRTY_LOG`, and `KVM_CLEAR_DIRTY_LOG` under
//! `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET`.
//!
//! Both fill caller-provided buffers. Clearing goes in runs of 64-page-aligned chunks that
//! have bits set (one ioctl per run: each costs ~1 us on PVM), and a run that reaches the end
//! of a slot whose size is not a multiple of 64 pages passes the exact tail length, as the
//! kernel requires.

use kvm_bindings::{KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
use kvm_ioctls::VmFd;

use crate::error::{DirtyError, Result};
use crate::pageset::SlotSpec;
use crate::sys;

/// Proof that manual dirty-log protection with `INITIALLY_SET` is enabled on a VM.
#[derive(Debug, Clone, Copy)]
pub struct ManualProtect(());

/// Enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `INITIALLY_SET`. Must happen before the
/// logged memslots are created so they start all-set and unprotected.
pub fn enable_manual_protect(vm: &VmFd) -> Result<ManualProtect> {
    let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
    let offered =
        vm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 as libc::c_ulong);
    if offered < 0 || (offered as u32) & want != want {
        return Err(DirtyError::ManualProtectUnsupported);
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [want as u64, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).map_err(|e| DirtyError::Ioctl {
        op: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    Ok(ManualProtect(()))
}

/// Reads the slot's dirty bitmap into `buf[..slot.bitmap_words()]`.
pub fn get_dirty_log(vm: &VmFd, slot: &SlotSpec, buf: &mut [u64]) -> Result<()> {
    if !slot.log_dirty {
        return Err(DirtyError::SlotNotLogged { slot: slot.id.0 });
    }
    let words = slot.bitmap_words();
    if buf.len() < words {
        return Err(DirtyError::BufferTooSmall {
            needed: words,
            got: buf.len(),
        });
    }
    sys::get_dirty_log(vm, slot.id.0, &mut buf[..words]).map_err(|source| DirtyError::Ioctl {
        op: "KVM_GET_DIRTY_LOG",
        source,
    })
}

/// Re-protects and clears the log of every page in the words `[first_word, first_word +
/// ones.len())` of `slot` (`ones` all ones: the whole words), in runs whose page count fits the
/// ioctl; returns the number of `KVM_CLEAR_DIRTY_LOG` calls made.
pub fn clear_words(vm: &VmFd, slot: &SlotSpec, first_word: usize, ones: &[u64]) -> Result<u64> {
    let words = slot.bitmap_words();
    let end_word = first_word.saturating_add(ones.len());
    if end_word > words {
        return Err(DirtyError::BufferTooSmall {
            needed: end_word,
            got: words,
        });
    }
    const MAX_RUN_WORDS: usize = (u32::MAX as usize / 64) & !63;
    let mut calls = 0;
    let mut w = first_word;
    while w < end_word {
        let end = end_word.min(w + MAX_RUN_WORDS);
        let first_page = w as u64 * 64;
        let num_pages = ((end as u64 * 64).min(slot.pages) - first_page) as u32;
        let mask = &ones[w - first_word..end - first_word];
        sys::clear_dirty_log(vm, slot.id.0, first_page, num_pages, mask).map_err(|source| {
            DirtyError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source,
            }
        })?;
        calls += 1;
        w = end;
    }
    Ok(calls)
}

/// Re-protects every page whose bit is set in `bitmap` (bit 0 = page 0 of the slot), in
/// 64-page-aligned runs; returns the number of `KVM_CLEAR_DIRTY_LOG` calls made.
pub fn clear_dirty_log(vm: &VmFd, slot: &SlotSpec, bitmap: &[u64]) -> Result<u64> {
    let words = slot.bitmap_words();
    if bitmap.len() < words {
        return Err(DirtyError::BufferTooSmall {
            needed: words,
            got: bitmap.len(),
        });
    }
    let mut calls = 0;
    let mut w = 0;
    // Runs are capped so num_pages fits the ioctl's u32.
    const MAX_RUN_WORDS: usize = (u32::MAX as usize / 64) & !63;
    // A run bridges gaps of up to this many clean words: the kernel skips a zero word in about
    // a nanosecond, while each ioctl costs about a microsecond (measured on PVM), so sparse
    // dirty pages are cleared with few ioctls instead of one per dirty word.
    const GAP_WORDS: usize = 256;
    while w < words {
        if bitmap[w] == 0 {
            w += 1;
            continue;
        }
        let start = w;
        let mut last = w; // last dirty word of the run
        w += 1;
        while w < words && w - start < MAX_RUN_WORDS && w - last <= GAP_WORDS {
            if bitmap[w] != 0 {
                last = w;
            }
            w += 1;
        }
        let end = last + 1;
        let first_page = start as u64 * 64;
        let end_page = (end as u64 * 64).min(slot.pages);
        let num_pages = (end_page - first_page) as u32;
        sys::clear_dirty_log(vm, slot.id.0, first_page, num_pages, &bitmap[start..end]).map_err(
            |source| DirtyError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source,
            },
        )?;
        calls += 1;
        w = end;
    }
    Ok(calls)
}
