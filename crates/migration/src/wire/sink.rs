//! Where decoded pages go: straight into guest memory, with no per-page allocation.

use super::{check_slices, MemoryLayout, MemoryShapeError};
use crate::digest::IncrementalDigest;
use crate::PAGE_SIZE;

/// Destination of decoded pages.
///
/// The [`Decoder`](super::Decoder) only calls these with `gpa` page aligned and inside a
/// region of the announced layout, and `data` exactly [`PAGE_SIZE`] bytes, so a sink backed
/// by memory that matches the layout cannot be asked to write out of bounds.
pub trait PageSink {
    /// Stores `data` (one page) at guest physical address `gpa`.
    fn write_page(&mut self, gpa: u64, data: &[u8]);
    /// Makes the page at `gpa` all zero.
    fn zero_page(&mut self, gpa: u64);
}

/// A sink that drops pages (useful to measure the receive path alone).
impl PageSink for () {
    fn write_page(&mut self, _gpa: u64, _data: &[u8]) {}
    fn zero_page(&mut self, _gpa: u64) {}
}

/// A [`PageSink`] over one mutable byte slice per region of a layout (e.g. the VMM's mmaped
/// guest RAM).
#[derive(Debug)]
pub struct GuestSlices<'a> {
    layout: MemoryLayout,
    mem: Vec<&'a mut [u8]>,
}

impl<'a> GuestSlices<'a> {
    /// Pairs `mem` (one slice per region, in layout order, each exactly the region's size)
    /// with `layout`.
    pub fn new(layout: &MemoryLayout, mem: Vec<&'a mut [u8]>) -> Result<Self, MemoryShapeError> {
        check_slices(layout, mem.iter().map(|m| m.len()))?;
        Ok(GuestSlices {
            layout: layout.clone(),
            mem,
        })
    }

    fn page_mut(&mut self, gpa: u64) -> Option<&mut [u8]> {
        let (idx, off) = self.layout.locate(gpa)?;
        let off = (off - off % PAGE_SIZE) as usize;
        self.mem
            .get_mut(idx)?
            .get_mut(off..off + PAGE_SIZE as usize)
    }
}

impl PageSink for GuestSlices<'_> {
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        if let Some(p) = self.page_mut(gpa) {
            if p.len() == data.len() {
                p.copy_from_slice(data);
            }
        }
    }

    fn zero_page(&mut self, gpa: u64) {
        if let Some(p) = self.page_mut(gpa) {
            p.fill(0);
        }
    }
}

/// Forwards pages to an inner sink and keeps an [`IncrementalDigest`] of what was written,
/// so the destination's digest is ready the moment the stream completes.
#[derive(Debug)]
pub struct DigestingSink<'d, S> {
    inner: S,
    digest: &'d mut IncrementalDigest,
}

impl<'d, S: PageSink> DigestingSink<'d, S> {
    /// Wraps `inner`, recording into `digest`.
    pub fn new(inner: S, digest: &'d mut IncrementalDigest) -> Self {
        DigestingSink { inner, digest }
    }

    /// Gives back the inner sink.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: PageSink> PageSink for DigestingSink<'_, S> {
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        self.digest.record_page(gpa, data);
        self.inner.write_page(gpa, data);
    }

    fn zero_page(&mut self, gpa: u64) {
        self.digest.record_zero(gpa);
        self.inner.zero_page(gpa);
    }
}
