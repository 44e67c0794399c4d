//! Weight and KV-cache storage for the CPU kernels: page-aligned anonymous memory with
//! transparent huge pages requested, instead of the heap.
//!
//! Decode streams every weight byte once per token, so how the memory is laid out matters: a
//! heap block of this size starts 16 bytes past a page (glibc's header), which splits every
//! other 32-byte load across two cache lines, and 4 KiB pages cost a TLB walk every 64 lines
//! and stop the L2 streamer at every page. Huge pages come only in whole 2 MiB units, so most
//! of a model's matrices (SmolLM2's o_proj is 1.3 MB in f32, 0.2 MB in Q4_1) are too small to
//! get one alone: [`share_mapping`] places the matrices loaded together in one mapping, so that
//! all but its last partial page are huge (perf on F32 decode: o_proj and down_proj streamed at
//! 21 GB/s from 4 KiB pages, the other matrices at 30-32).

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::{Mmap, MmapMut};

/// An immutable array of `T` (as a slice through `Deref`): on the heap while it is being made,
/// then in a page-aligned mapping that it may share with other buffers ([`share_mapping`]).
pub struct WeightBuffer<T> {
    storage: Storage<T>,
}

enum Storage<T> {
    Heap(Vec<T>),
    /// `len` values at byte `offset` of `map`.
    Mapped { map: Arc<Mmap>, offset: usize, len: usize, _values: PhantomData<T> },
}

/// The transparent huge page size on x86-64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// From this size on a mapping's partial last huge page is asked for as well: it wastes at
/// most one page of memory, under 1/8 of the mapping. Smaller mappings get huge pages only
/// for their whole 2 MiB units.
const HUGE_TAIL_FROM: usize = 8 * HUGE_PAGE;

/// Where each buffer placed by [`share_mapping`] starts: a whole cache line, so that no
/// buffer's vectors straddle lines at its start and every `T` is aligned.
const PLACEMENT_ALIGN: usize = 64;

/// Fresh zeroed anonymous memory for `bytes` bytes and where its values start: huge-page-sized
/// buffers get a spare 2 MiB of address space (never touched, so never backed) to start on a
/// boundary, and huge pages are asked for.
fn anonymous(bytes: usize) -> std::io::Result<(MmapMut, usize)> {
    let huge = bytes >= HUGE_PAGE;
    let advised = if bytes >= HUGE_TAIL_FROM { bytes.div_ceil(HUGE_PAGE) * HUGE_PAGE } else { bytes / HUGE_PAGE * HUGE_PAGE };
    // A zero-length mapping is an error; one byte keeps empty buffers uniform.
    let mapped = advised.max(bytes).max(1).checked_add(if huge { HUGE_PAGE } else { 0 });
    let mapped = mapped.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "size overflows"))?;
    let map = MmapMut::map_anon(mapped)?;
    let offset = if huge { map.as_ptr().align_offset(HUGE_PAGE) } else { 0 };
    if huge {
        // Advice is a hint; refusal changes nothing else.
        #[cfg(target_os = "linux")]
        let _ = map.advise_range(memmap2::Advice::HugePage, offset, advised);
    }
    Ok((map, offset))
}

impl<T: Pod> WeightBuffer<T> {
    /// A buffer of `values` on the heap, until [`share_mapping`] moves it.
    pub fn from_vec(values: Vec<T>) -> Self {
        WeightBuffer { storage: Storage::Heap(values) }
    }

    /// A copy of `values` in a mapping of its own.
    pub fn copy_of(values: &[T]) -> std::io::Result<Self> {
        let mut buffer = WeightBuffer::from_vec(values.to_vec());
        share_mapping(&mut [&mut buffer])?;
        Ok(buffer)
    }

    /// Whether the values sit in a mapping (not on the heap).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

/// A buffer that [`share_mapping`] can move, seen as bytes (so that buffers of different value
/// types can share one mapping).
pub trait Placeable {
    fn bytes(&self) -> &[u8];
    /// Points the buffer at its bytes copied to `offset` of `map`.
    fn place(&mut self, map: &Arc<Mmap>, offset: usize);
}

impl<T: Pod> Placeable for WeightBuffer<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(self)
    }

    fn place(&mut self, map: &Arc<Mmap>, offset: usize) {
        let len = self.len();
        self.storage = Storage::Mapped { map: Arc::clone(map), offset, len, _values: PhantomData };
    }
}

/// Copies `buffers` one after another (each on a 64-byte boundary) into one fresh read-only
/// mapping in huge pages and points each buffer there; the memory is freed with the last buffer
/// that uses it.
pub fn share_mapping(buffers: &mut [&mut dyn Placeable]) -> std::io::Result<()> {
    let mut offsets = Vec::with_capacity(buffers.len());
    let mut total = 0usize;
    for buffer in buffers.iter() {
        offsets.push(total);
        total = total
            .checked_add(buffer.bytes().len().next_multiple_of(PLACEMENT_ALIGN))
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::OutOfMemory, "size overflows"))?;
    }
    let (mut map, start) = anonymous(total)?;
    for (buffer, &at) in buffers.iter().zip(&offsets) {
        let bytes = buffer.bytes();
        map[start + at..start + at + bytes.len()].copy_from_slice(bytes);
    }
    let map = Arc::new(map.make_read_only()?);
    for (buffer, &at) in buffers.iter_mut().zip(&offsets) {
        buffer.place(&map, start + at);
    }
    Ok(())
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
        match &self.storage {
            Storage::Heap(values) => values,
            Storage::Mapped { map, offset, len, .. } => bytemuck::cast_slice(&map[*offset..*offset + *len * size_of::<T>()]),
        }
    }
}

impl<T: Pod> Clone for WeightBuffer<T> {
    fn clone(&self) -> Self {
        let storage = match &self.storage {
            Storage::Heap(values) => Storage::Heap(values.clone()),
            Storage::Mapped { map, offset, len, .. } => Storage::Mapped { map: Arc::clone(map), offset: *offset, len: *len, _values: PhantomData },
        };
        WeightBuffer { storage }
    }
}

impl<T: Pod> std::fmt::Debug for WeightBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuffer<{}>[{}]", std::any::type_name::<T>(), self.len())
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
    fn buffers_of_different_types_share_one_mapping_and_keep_their_values() {
        let halves: Vec<u16> = (0..(HUGE_PAGE / 2) * 3 + 7).map(|i| (i * 7919 % 65521) as u16).collect();
        let bytes: Vec<u8> = (0..77).map(|i| (i * 31 % 251) as u8).collect();
        let floats: Vec<f32> = (0..1001).map(|i| i as f32 * -0.25).collect();
        let (mut a, mut b, mut c, mut empty) =
            (WeightBuffer::from_vec(halves.clone()), WeightBuffer::from_vec(bytes.clone()), WeightBuffer::from_vec(floats.clone()), WeightBuffer::<f32>::from_vec(Vec::new()));
        assert!(!a.is_mapped(), "made on the heap");
        share_mapping(&mut [&mut a, &mut b, &mut empty, &mut c]).unwrap();
        assert!(a.is_mapped() && b.is_mapped() && c.is_mapped() && empty.is_mapped());
        assert_eq!(&a[..], &halves[..]);
        assert_eq!(&b[..], &bytes[..]);
        assert_eq!(&c[..], &floats[..]);
        assert!(empty.is_empty());
        // One after another in one mapping: the first on a huge page boundary, each on a line.
        let start = a.as_ptr() as usize;
        assert_eq!(start % HUGE_PAGE, 0, "the mapping starts on a huge page");
        assert_eq!(b.as_ptr() as usize, start + (halves.len() * 2).next_multiple_of(PLACEMENT_ALIGN));
        assert_eq!(c.as_ptr() as usize, b.as_ptr() as usize + PLACEMENT_ALIGN * 2, "77 bytes take two lines; the empty buffer none");
        // A clone shares the mapping, which outlives the buffers it was made with.
        let kept = c.clone();
        drop((a, b, c));
        assert_eq!(&kept[..], &floats[..]);
        assert_eq!(format!("{kept:?}"), "WeightBuffer<f32>[1001]");
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
