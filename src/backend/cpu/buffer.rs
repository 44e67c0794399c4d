//! Weight storage for the CPU kernels: page-aligned anonymous memory with transparent huge pages
//! requested, instead of the heap.
//!
//! Decode streams every weight byte once per token, so how the memory is laid out matters: a
//! heap block of this size starts 16 bytes past a page (glibc's header), which splits every
//! other 32-byte load across two cache lines, and 4 KiB pages cost a TLB walk every 64 lines.

use std::marker::PhantomData;
use std::ops::Deref;

use bytemuck::Pod;
use memmap2::MmapMut;

/// An immutable, page-aligned array of `T` (as a slice through `Deref`).
pub struct WeightBuffer<T> {
    map: MmapMut,
    /// Where the values start in `map`: the first 2 MiB boundary for huge-page-sized buffers.
    offset: usize,
    len: usize,
    _values: PhantomData<T>,
}

/// The transparent huge page size on x86-64 Linux.
const HUGE_PAGE: usize = 2 << 20;

impl<T: Pod> WeightBuffer<T> {
    /// A copy of `values` in fresh anonymous memory.
    pub fn copy_of(values: &[T]) -> std::io::Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let huge = bytes.len() >= HUGE_PAGE;
        // A zero-length mapping is an error; one byte keeps empty buffers uniform. Huge-page
        // buffers get a spare 2 MiB of address space (never touched, so never backed) to start
        // on a boundary.
        let mut map = MmapMut::map_anon(bytes.len().max(1) + if huge { HUGE_PAGE } else { 0 })?;
        let offset = if huge { map.as_ptr().align_offset(HUGE_PAGE) } else { 0 };
        if huge {
            // Only whole huge pages are advised: the tail keeps 4 KiB pages, so no buffer
            // holds more memory than it uses. Advice is a hint; refusal changes nothing else.
            #[cfg(target_os = "linux")]
            let _ = map.advise_range(memmap2::Advice::HugePage, offset, bytes.len() / HUGE_PAGE * HUGE_PAGE);
        }
        map[offset..offset + bytes.len()].copy_from_slice(bytes);
        Ok(WeightBuffer { map, offset, len: values.len(), _values: PhantomData })
    }
}

impl<T: Pod> Deref for WeightBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[self.offset..self.offset + self.len * size_of::<T>()])
    }
}

impl<T: Pod> std::fmt::Debug for WeightBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuffer<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_hold_their_values_aligned() {
        for len in [0usize, 1, 17, 4099, (HUGE_PAGE / 2) * 3 + 5] {
            let values: Vec<u16> = (0..len).map(|i| (i * 7919 % 65521) as u16).collect();
            let buffer = WeightBuffer::copy_of(&values).unwrap();
            assert_eq!(&buffer[..], &values[..], "len {len}");
            let align = if len * 2 >= HUGE_PAGE { HUGE_PAGE } else { 4096 };
            assert_eq!(buffer.as_ptr() as usize % align, 0, "len {len} not {align}-aligned");
        }
        let floats = WeightBuffer::copy_of(&[1.5f32, -2.0, f32::MIN_POSITIVE]).unwrap();
        assert_eq!(&floats[..], &[1.5f32, -2.0, f32::MIN_POSITIVE]);
    }
}
