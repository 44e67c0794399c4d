//! Weight and KV-cache storage for the CPU kernels: page-aligned anonymous memory with
//! transparent huge pages requested, instead of the heap.
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

/// Fresh zeroed anonymous memory for `bytes` bytes and where its values start: huge-page-sized
/// buffers get a spare 2 MiB of address space (never touched, so never backed) to start on a
/// boundary, and huge pages are asked for.
fn anonymous(bytes: usize) -> std::io::Result<(MmapMut, usize)> {
    let huge = bytes >= HUGE_PAGE;
    // A zero-length mapping is an error; one byte keeps empty buffers uniform.
    let mapped = bytes.max(1).checked_add(if huge { HUGE_PAGE } else { 0 });
    let mapped = mapped.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "size overflows"))?;
    let map = MmapMut::map_anon(mapped)?;
    let offset = if huge { map.as_ptr().align_offset(HUGE_PAGE) } else { 0 };
    if huge {
        // Only whole huge pages are advised: the tail keeps 4 KiB pages, so no buffer holds
        // more memory than it uses. Advice is a hint; refusal changes nothing else.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::HugePage, offset, bytes / HUGE_PAGE * HUGE_PAGE);
    }
    Ok((map, offset))
}

impl<T: Pod> WeightBuffer<T> {
    /// A copy of `values` in fresh anonymous memory.
    pub fn copy_of(values: &[T]) -> std::io::Result<Self> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let (mut map, offset) = anonymous(bytes.len())?;
        map[offset..offset + bytes.len()].copy_from_slice(bytes);
        Ok(WeightBuffer { map, offset, len: values.len(), _values: PhantomData })
    }
}

/// A mutable, page-aligned array of `T`, zeroed, in huge pages where it is large enough: the
/// KV cache, which decode attention streams like the weights (in 4 KiB pages the prefetchers
/// stop at every page, 32 cached f16 rows of 64 values).
pub struct ZeroedBuffer<T> {
    map: MmapMut,
    offset: usize,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Pod> ZeroedBuffer<T> {
    /// `len` zero values (all-zero bits); the pages are backed as they are first written.
    pub fn new(len: usize) -> std::io::Result<Self> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "size overflows"))?;
        let (map, offset) = anonymous(bytes)?;
        Ok(ZeroedBuffer { map, offset, len, _values: PhantomData })
    }
}

impl<T: Pod> Deref for ZeroedBuffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[self.offset..self.offset + self.len * size_of::<T>()])
    }
}

impl<T: Pod> std::ops::DerefMut for ZeroedBuffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[self.offset..self.offset + self.len * size_of::<T>()])
    }
}

impl<T: Pod> std::fmt::Debug for ZeroedBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ZeroedBuffer<{}>[{}]", std::any::type_name::<T>(), self.len)
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

    #[test]
    fn zeroed_buffers_start_at_zero_and_keep_what_is_written() {
        for len in [0usize, 1, 4099, HUGE_PAGE + 3] {
            let mut buffer = ZeroedBuffer::<u16>::new(len).unwrap();
            assert_eq!(buffer.len(), len);
            assert!(buffer.iter().all(|&v| v == 0), "len {len}");
            for (i, v) in buffer.iter_mut().enumerate() {
                *v = (i % 65521) as u16;
            }
            assert!(buffer.iter().enumerate().all(|(i, &v)| v == (i % 65521) as u16), "len {len}");
            let align = if len * 2 >= HUGE_PAGE { HUGE_PAGE } else { 4096 };
            assert_eq!(buffer.as_ptr() as usize % align, 0, "len {len} not {align}-aligned");
        }
        assert!(ZeroedBuffer::<f32>::new(usize::MAX / 2).is_err(), "an impossible size is an error, not an abort");
    }
}
