//! Block-quantized weight matrices (Q8_0, Q4_0, Q4_1, Q5_0, Q4_K, Q6_K) repacked for the CPU, and
//! their dot products with activations quantized to 8 bits.
//!
//! As in llama.cpp, the activation row is quantized once per matrix product to 8-bit blocks of
//! 32 (scale `dx` in f32 and `dx·Σq`), and each weight block meets it in integer multiply-adds:
//! AVX-512 VNNI `vpdpbusd` on two blocks per 512-bit instruction, the AVX2 `vpmaddubsw` +
//! `vpmaddwd` pair, or the scalar reference every SIMD path is tested against. Per block, with `Σ`
//! over its 32 elements:
//!
//! * Q8_0 `w = q·d`:        `d·dx·Σ q·qx`
//! * Q4_0 `w = (q − 8)·d`:  `d·dx·Σ q·qx − 8·d·(dx·Σ qx)`
//! * Q4_1 `w = q·d + m`:    `d·dx·Σ q·qx + m·(dx·Σ qx)`
//! * Q5_0 `w = (q − 16)·d`: `d·dx·Σ q·qx − 16·d·(dx·Σ qx)`
//! * Q4_K `w = (d·sc)·q − dmin·m` (6-bit `sc`, `m` per block, f16 `d`, `dmin` per 256):
//!   `(d·sc)·dx·Σ q·qx − (dmin·m)·(dx·Σ qx)`
//! * Q6_K `w = (d·sc)·(q − 32)` (signed 8-bit `sc` per 16 elements, f16 `d` per 256): per half
//!   `h` of the block, `(d·sc_h)·dx·(Σ_h q·qx − 32·Σ_h qx)`, the bracket an exact integer
//!
//! The integer sums are exact; the only rounding beyond f32 accumulation is the activation's own
//! quantization (relative error about 1/254 of the block's largest value).
//!
//! ## Packed layout ([`BlockMatrix`])
//! GGUF stores a row's blocks one after another, each with its f16 scale. Dotting one row at a
//! time costs a widening, a scale product and a horizontal sum per row, all float work around
//! few integer products. At load the CPU backend instead interleaves groups of
//! [`ROW_GROUP`] = 16 rows, block by block (the same bytes, rearranged; `row_to_f32` gives back
//! the file's values exactly):
//! * for block `b` of a group, the 16 rows' scales `d` (f16) side by side, and for Q4_1 their
//!   minimums `m`: one widening gives a vector with one lane per row;
//! * their quants as 8 vectors of 64 bytes, vector `k` holding elements `4k..4k+4` of the 16
//!   rows (4 bytes per row). `vpdpbusd` against the activation's 4 bytes `4k..4k+4` broadcast
//!   then sums each row's products in its own lane: after the 8 vectors, lane `i` holds row
//!   `i`'s integer dot product for the block, and one convert and one FMA with the scales
//!   finish 16 rows at once. No horizontal sums, and the float work is per block, not per pair.
//! * Q8_0 quants are stored as `q + 128` (the unsigned operand `vpdpbusd` takes); the
//!   `128·Σ qx` this adds is removed like Q4_0's 8. Q4 blocks keep the file's nibble bytes:
//!   byte `j` has element `j` in its low nibble and `j + 16` in its high one, so vector `j`
//!   (bytes `4j..4j+4` of each row) yields elements `4j..` under a mask and `16 + 4j..` under a
//!   shift, which is vector `j + 4` of the scheme above. Q5_0 adds its fifth bits as one more
//!   vector per block: bit `k` of byte `4i + m` is that of element `4k + m` of row `i`, moved
//!   to bit 4 of weight vector `k` by a shift and a mask.
//!
//! The K types are cut into their 32-element blocks the same way. Their f16 `d` (and Q4_K's
//! `dmin`) are stored once per super-block of 256, 16 lanes side by side; the per-block 6- or
//! 8-bit scales (and Q4_K's minimums) as 16 bytes each, unpacked from the file's bit fields so
//! that one byte-to-int widening gives a lane per row. Q4_K's nibbles are rearranged into the Q4
//! byte order above (the file pairs sub-blocks `2i` and `2i+1` in one byte instead). Q6_K keeps
//! its low nibbles the same way and its high bit pairs in two more vectors per block: byte
//! `4i+m` of vector `h` holds, in bits `2s..2s+2`, the pair of element `16h + 4s + m` of row `i`,
//! so a shift and a mask put them above the nibbles of weight vector `4h + s`. Storage per 256
//! weights: 148 bytes for Q4_K (file: 144), 210 for Q6_K (as the file).
//!
//! Rows are padded to a whole group with zero scales; their outputs are never written.

use half::f16;
use rayon::prelude::*;

use crate::model::quant::{
    dequantize_blocks_into, q4_k_scale_min, q6_k_quant, GgmlType, BLOCK_Q4_0_BYTES, BLOCK_Q4_1_BYTES, BLOCK_Q4_K_BYTES, BLOCK_Q5_0_BYTES,
    BLOCK_Q6_K_BYTES, BLOCK_Q8_0_BYTES, QK, QK_K,
};

use super::simd::{SimdLevel, StreamPrefetch};
use super::buffer::{Placeable, WeightBuffer};

/// The block layouts engram computes on directly.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q4_K,
    Q6_K,
}

/// 32-element blocks per K super-block.
const BLOCKS_PER_SUPER: usize = QK_K / QK;

impl BlockFormat {
    pub fn from_ggml(ty: GgmlType) -> Option<BlockFormat> {
        match ty {
            GgmlType::Q8_0 => Some(BlockFormat::Q8_0),
            GgmlType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlType::Q5_0 => Some(BlockFormat::Q5_0),
            GgmlType::Q4_K => Some(BlockFormat::Q4_K),
            GgmlType::Q6_K => Some(BlockFormat::Q6_K),
            _ => None,
        }
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            BlockFormat::Q8_0 => GgmlType::Q8_0,
            BlockFormat::Q4_0 => GgmlType::Q4_0,
            BlockFormat::Q4_1 => GgmlType::Q4_1,
            BlockFormat::Q5_0 => GgmlType::Q5_0,
            BlockFormat::Q4_K => GgmlType::Q4_K,
            BlockFormat::Q6_K => GgmlType::Q6_K,
        }
    }

    /// Whether this is a K type (super-blocks of 256 with per-block sub-scales).
    pub fn is_k(self) -> bool {
        matches!(self, BlockFormat::Q4_K | BlockFormat::Q6_K)
    }

    /// Bytes per block (super-block for the K types) in a GGUF file.
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => BLOCK_Q8_0_BYTES,
            BlockFormat::Q4_0 => BLOCK_Q4_0_BYTES,
            BlockFormat::Q4_1 => BLOCK_Q4_1_BYTES,
            BlockFormat::Q5_0 => BLOCK_Q5_0_BYTES,
            BlockFormat::Q4_K => BLOCK_Q4_K_BYTES,
            BlockFormat::Q6_K => BLOCK_Q6_K_BYTES,
        }
    }

    /// Elements per block (super-block for the K types) in a GGUF file.
    pub fn block_elements(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            QK
        }
    }

    /// Bytes of quants of one 32-element block of a whole row group in the packed layout.
    fn group_block_bytes(self) -> usize {
        match self {
            BlockFormat::Q8_0 => ROW_GROUP * QK,
            BlockFormat::Q4_0 | BlockFormat::Q4_1 | BlockFormat::Q4_K => ROW_GROUP * QK / 2,
            // Nibbles, then the fifth bits.
            BlockFormat::Q5_0 => ROW_GROUP * QK / 2 + ROW_GROUP * QK / 8,
            // Nibbles, then the high bit pairs.
            BlockFormat::Q6_K => ROW_GROUP * QK / 2 + ROW_GROUP * QK / 4,
        }
    }

    /// What multiplies `Σ_blocks offset_scale·(dx·Σ qx)`: the Q4_1 minimums enter as they are,
    /// Q4_0's `−8·d`, Q5_0's `−16·d` and Q8_0's stored `+128` are removed with `d` as the offset scale; Q4_K's
    /// `dmin·m` are subtracted.
    fn offset_factor(self) -> f32 {
        match self {
            BlockFormat::Q8_0 => -128.0,
            BlockFormat::Q4_0 => -8.0,
            BlockFormat::Q4_1 => 1.0,
            BlockFormat::Q5_0 => -16.0,
            BlockFormat::Q4_K => -1.0,
            // Q6_K's offset is removed in the integer sums.
            BlockFormat::Q6_K => 0.0,
        }
    }
}

/// Rows interleaved in the packed layout (one 32-bit lane per row in a 512-bit vector).
pub const ROW_GROUP: usize = 16;

/// A `[rows, cols]` block-quantized matrix in the packed layout (see the module docs).
#[derive(Debug, Clone)]
pub struct BlockMatrix {
    pub format: BlockFormat,
    pub rows: usize,
    pub cols: usize,
    /// 32-element blocks per row.
    blocks: usize,
    /// f16 bits: `[group][block][16]`, or for the K types `d` as `[group][super-block][16]`.
    scales: WeightBuffer<u16>,
    /// f16 bits: Q4_1 minimums `[group][block][16]`, Q4_K `dmin` `[group][super-block][16]`;
    /// empty for the other formats.
    minimums: WeightBuffer<u16>,
    /// K types, `[group][block][32]`: Q4_K's 16 scales `sc` then 16 minimums `m` (6-bit values
    /// in bytes), Q6_K's 16 signed scales of the block's first 16 elements then its last 16.
    sub_scales: WeightBuffer<u8>,
    /// `[group][block]` units of `format.group_block_bytes()`.
    quants: WeightBuffer<u8>,
}

/// Index of byte `j` (0..16) of a row's nibble bytes within a packed unit: vector `j / 4`,
/// lane `lane`, byte `j % 4`.
fn nibble_byte(lane: usize, j: usize) -> usize {
    (j / 4) * 4 * ROW_GROUP + lane * 4 + j % 4
}

impl BlockMatrix {
    /// Repacks GGUF blocks (`rows` rows of `cols / format.block_elements()` blocks each, row
    /// after row).
    pub fn pack(format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> BlockMatrix {
        let file_blocks = cols / format.block_elements();
        let block_bytes = format.block_bytes();
        assert!(
            cols.is_multiple_of(format.block_elements()) && bytes.len() == rows * file_blocks * block_bytes,
            "packing: byte count does not match the shape"
        );
        if format.is_k() {
            return BlockMatrix::pack_k(format, rows, cols, bytes);
        }
        let blocks = cols / QK;
        let units = rows.div_ceil(ROW_GROUP) * blocks;
        let unit_bytes = format.group_block_bytes();
        let mut scales = vec![0u16; units * ROW_GROUP];
        let mut minimums = if format == BlockFormat::Q4_1 { vec![0u16; units * ROW_GROUP] } else { Vec::new() };
        // Pads: Q8_0 stores q + 128, so 0x80 is a zero weight; Q4 pads are zero nibbles (and
        // every pad row has a zero scale anyway).
        let pad = if format == BlockFormat::Q8_0 { 0x80 } else { 0 };
        let mut quants = vec![pad; units * unit_bytes];
        for (index, block) in bytes.chunks_exact(block_bytes).enumerate() {
            let (row, b) = (index / blocks, index % blocks);
            let (group, lane) = (row / ROW_GROUP, row % ROW_GROUP);
            let unit = group * blocks + b;
            scales[unit * ROW_GROUP + lane] = u16::from_le_bytes([block[0], block[1]]);
            let unit_quants = &mut quants[unit * unit_bytes..(unit + 1) * unit_bytes];
            // Vector k of the unit holds bytes 4k..4k+4 of every lane.
            let (stored, flip): (&[u8], u8) = match format {
                BlockFormat::Q8_0 => (&block[2..], 0x80),
                BlockFormat::Q4_1 => {
                    minimums[unit * ROW_GROUP + lane] = u16::from_le_bytes([block[2], block[3]]);
                    (&block[4..], 0)
                }
                BlockFormat::Q5_0 => {
                    let high = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                    for e in 0..QK {
                        unit_quants[ROW_GROUP * QK / 2 + lane * 4 + e % 4] |= (((high >> e) & 1) << (e / 4)) as u8;
                    }
                    (&block[6..], 0)
                }
                _ => (&block[2..], 0),
            };
            for (k, four) in stored.chunks_exact(4).enumerate() {
                for (m, &byte) in four.iter().enumerate() {
                    unit_quants[k * 4 * ROW_GROUP + lane * 4 + m] = byte ^ flip;
                }
            }
        }
        BlockMatrix::from_parts(format, rows, cols, blocks, [scales, minimums], [Vec::new(), quants])
    }

    /// [`BlockMatrix::pack`] for Q4_K and Q6_K super-blocks.
    fn pack_k(format: BlockFormat, rows: usize, cols: usize, bytes: &[u8]) -> BlockMatrix {
        let (blocks, supers) = (cols / QK, cols / QK_K);
        let groups = rows.div_ceil(ROW_GROUP);
        let unit_bytes = format.group_block_bytes();
        let mut scales = vec![0u16; groups * supers * ROW_GROUP];
        let mut minimums = if format == BlockFormat::Q4_K { vec![0u16; groups * supers * ROW_GROUP] } else { Vec::new() };
        let mut sub_scales = vec![0u8; groups * blocks * 2 * ROW_GROUP];
        let mut quants = vec![0u8; groups * blocks * unit_bytes];
        for (index, block) in bytes.chunks_exact(format.block_bytes()).enumerate() {
            let (row, s) = (index / supers, index % supers);
            let (group, lane) = (row / ROW_GROUP, row % ROW_GROUP);
            let at = (group * supers + s) * ROW_GROUP + lane;
            for sub in 0..BLOCKS_PER_SUPER {
                let unit = group * blocks + s * BLOCKS_PER_SUPER + sub;
                let subs = &mut sub_scales[unit * 2 * ROW_GROUP..(unit + 1) * 2 * ROW_GROUP];
                let unit_quants = &mut quants[unit * unit_bytes..(unit + 1) * unit_bytes];
                // The 32 unsigned quants of this block (Q4_K 0..16, Q6_K 0..64).
                let q: [u8; QK] = match format {
                    BlockFormat::Q4_K => {
                        let (sc, m) = q4_k_scale_min(&block[4..16], sub);
                        (subs[lane], subs[ROW_GROUP + lane]) = (sc, m);
                        let pair = &block[16 + (sub / 2) * 32..16 + (sub / 2) * 32 + 32];
                        std::array::from_fn(|e| (pair[e] >> (4 * (sub % 2))) & 0x0F)
                    }
                    _ => {
                        (subs[lane], subs[ROW_GROUP + lane]) = (block[192 + 2 * sub], block[192 + 2 * sub + 1]);
                        std::array::from_fn(|e| q6_k_quant(block, sub * QK + e))
                    }
                };
                for j in 0..QK / 2 {
                    unit_quants[nibble_byte(lane, j)] = (q[j] & 0x0F) | ((q[j + QK / 2] & 0x0F) << 4);
                }
                if format == BlockFormat::Q6_K {
                    // Element e = 16h + 4s + m: byte 4·lane + m of high vector h, bits 2s.
                    for (e, &v) in q.iter().enumerate() {
                        let (h, s, m) = (e / 16, (e % 16) / 4, e % 4);
                        unit_quants[ROW_GROUP * QK / 2 + h * 4 * ROW_GROUP + lane * 4 + m] |= (v >> 4) << (2 * s);
                    }
                }
            }
            match format {
                BlockFormat::Q4_K => {
                    scales[at] = u16::from_le_bytes([block[0], block[1]]);
                    minimums[at] = u16::from_le_bytes([block[2], block[3]]);
                }
                _ => scales[at] = u16::from_le_bytes([block[208], block[209]]),
            }
        }
        BlockMatrix::from_parts(format, rows, cols, blocks, [scales, minimums], [sub_scales, quants])
    }

    /// Row groups (the last may be partly padding).
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(ROW_GROUP)
    }

    fn unit(&self, row: usize, b: usize) -> usize {
        (row / ROW_GROUP) * self.blocks + b
    }

    /// The stored f16 scale of block `b` of `row` (for the K types, `d` of its super-block).
    fn scale(&self, row: usize, b: usize) -> f32 {
        f16::from_bits(self.scales[self.scale_index(row, b)]).to_f32()
    }

    /// Where block `b` of `row` finds its scale and minimum in `scales` and `minimums`.
    fn scale_index(&self, row: usize, b: usize) -> usize {
        if self.format.is_k() {
            let supers = self.blocks / BLOCKS_PER_SUPER;
            ((row / ROW_GROUP) * supers + b / BLOCKS_PER_SUPER) * ROW_GROUP + row % ROW_GROUP
        } else {
            self.unit(row, b) * ROW_GROUP + row % ROW_GROUP
        }
    }

    /// The Q4_1 minimum of block `b` of `row` (Q4_K: `dmin` of its super-block).
    fn minimum(&self, row: usize, b: usize) -> f32 {
        f16::from_bits(self.minimums[self.scale_index(row, b)]).to_f32()
    }

    /// Sub-scale `which` (0 or 1) of block `b` of `row`: Q4_K's `sc` and `m`, Q6_K's signed
    /// scales of the block's two halves.
    fn sub_scale(&self, row: usize, b: usize, which: usize) -> i32 {
        let byte = self.sub_scales[self.unit(row, b) * 2 * ROW_GROUP + which * ROW_GROUP + row % ROW_GROUP];
        if self.format == BlockFormat::Q6_K {
            byte as i8 as i32
        } else {
            byte as i32
        }
    }

    /// The integer of element `e` of block `b` of `row`: Q8_0's signed `q`, the unsigned quant
    /// of the other formats (Q4 nibble, Q6_K 6 bits).
    fn quant(&self, row: usize, b: usize, e: usize) -> i32 {
        let unit = &self.quants[self.unit(row, b) * self.format.group_block_bytes()..];
        let lane = row % ROW_GROUP;
        match self.format {
            BlockFormat::Q8_0 => (unit[(e / 4) * 4 * ROW_GROUP + lane * 4 + e % 4] ^ 0x80) as i8 as i32,
            format => {
                let j = e % (QK / 2);
                let byte = unit[nibble_byte(lane, j)];
                let nibble = (if e < QK / 2 { byte & 0x0F } else { byte >> 4 }) as i32;
                if format == BlockFormat::Q5_0 {
                    let bits = unit[ROW_GROUP * QK / 2 + lane * 4 + e % 4];
                    nibble | (((bits >> (e / 4)) & 1) as i32) << 4
                } else if format == BlockFormat::Q6_K {
                    let (h, s, m) = (e / 16, (e % 16) / 4, e % 4);
                    let pairs = unit[ROW_GROUP * QK / 2 + h * 4 * ROW_GROUP + lane * 4 + m];
                    nibble | (((pairs >> (2 * s)) & 3) as i32) << 4
                } else {
                    nibble
                }
            }
        }
    }

    /// Block `b` of `row` reassembled as the file stored it (the first `format.block_bytes()`
    /// bytes of the returned buffer): the inverse of [`BlockMatrix::pack`] for the 32-element
    /// formats.
    fn file_block(&self, row: usize, b: usize) -> [u8; BLOCK_Q8_0_BYTES] {
        let mut block = [0u8; BLOCK_Q8_0_BYTES];
        let at = self.unit(row, b) * ROW_GROUP + row % ROW_GROUP;
        block[..2].copy_from_slice(&self.scales[at].to_le_bytes());
        let quants = match self.format {
            BlockFormat::Q8_0 => {
                for (e, q) in block[2..].iter_mut().enumerate() {
                    *q = self.quant(row, b, e) as i8 as u8;
                }
                return block;
            }
            BlockFormat::Q4_1 => {
                block[2..4].copy_from_slice(&self.minimums[at].to_le_bytes());
                &mut block[4..BLOCK_Q4_1_BYTES]
            }
            BlockFormat::Q5_0 => {
                let high = (0..QK).fold(0u32, |h, e| h | (((self.quant(row, b, e) >> 4) as u32) << e));
                block[2..6].copy_from_slice(&high.to_le_bytes());
                &mut block[6..BLOCK_Q5_0_BYTES]
            }
            _ => &mut block[2..BLOCK_Q4_0_BYTES],
        };
        for (j, q) in quants.iter_mut().enumerate() {
            *q = ((self.quant(row, b, j) & 0x0F) | (self.quant(row, b, j + QK / 2) & 0x0F) << 4) as u8;
        }
        block
    }

    /// Row `r` decoded to f32 into `out` (`cols` values), with the file's values exactly: a
    /// 32-element block is reassembled as the file stored it and decoded by the same code as
    /// every GGUF block; a K block is decoded from its parts with the same f32 operations, in
    /// the same order, as [`dequantize_blocks_into`].
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out[..self.cols].chunks_exact_mut(QK).enumerate() {
            match self.format {
                BlockFormat::Q4_K => {
                    let (scale, offset) = (self.scale(r, b) * self.sub_scale(r, b, 0) as f32, self.minimum(r, b) * self.sub_scale(r, b, 1) as f32);
                    for (e, v) in o.iter_mut().enumerate() {
                        *v = scale * self.quant(r, b, e) as f32 - offset;
                    }
                }
                BlockFormat::Q6_K => {
                    let d = self.scale(r, b);
                    for (e, v) in o.iter_mut().enumerate() {
                        *v = d * self.sub_scale(r, b, e / 16) as f32 * (self.quant(r, b, e) - 32) as f32;
                    }
                }
                format => dequantize_blocks_into(format.ggml(), &self.file_block(r, b)[..format.block_bytes()], o),
            }
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        2 * (self.scales.len() + self.minimums.len()) + self.sub_scales.len() + self.quants.len()
    }

    fn from_parts(format: BlockFormat, rows: usize, cols: usize, blocks: usize, [scales, minimums]: [Vec<u16>; 2], [sub_scales, quants]: [Vec<u8>; 2]) -> BlockMatrix {
        BlockMatrix {
            format,
            rows,
            cols,
            blocks,
            scales: WeightBuffer::from_vec(scales),
            minimums: WeightBuffer::from_vec(minimums),
            sub_scales: WeightBuffer::from_vec(sub_scales),
            quants: WeightBuffer::from_vec(quants),
        }
    }

    /// Row group `group` of a Q8_0 matrix as stored: its quants (`[block][8 vectors][16 rows]
    /// [4 bytes]`, each `q + 128`) and its scales (`[block][16 rows]`, f16 bits), for kernels
    /// that decode whole groups (the prefill panel gemm).
    ///
    /// # Panics
    /// If the matrix is not Q8_0 or `group` is past the last row group.
    pub fn q8_0_group(&self, group: usize) -> (&[u8], &[u16]) {
        assert!(self.format == BlockFormat::Q8_0 && group < self.groups(), "q8_0_group: a Q8_0 row group is required");
        let unit_bytes = self.format.group_block_bytes();
        let units = group * self.blocks..(group + 1) * self.blocks;
        (&self.quants[units.start * unit_bytes..units.end * unit_bytes], &self.scales[units.start * ROW_GROUP..units.end * ROW_GROUP])
    }

    /// Where the first of [`BlockMatrix::buffers_mut`] starts in memory.
    #[cfg(test)]
    pub fn first_byte_address(&self) -> usize {
        self.quants.as_ptr() as usize
    }

    /// The buffers behind the matrix, for [`super::buffer::share_mapping`].
    pub fn buffers_mut(&mut self) -> [&mut dyn Placeable; 4] {
        [&mut self.quants, &mut self.scales, &mut self.minimums, &mut self.sub_scales]
    }
}

/// Which integer dot-product implementation runs (tests run every one the CPU has).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuantKernel {
    Scalar,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`, a row group as two halves of 8 lanes.
    Avx2,
    /// AVX-512 VNNI `vpdpbusd`, a row group per 512-bit vector.
    Vnni,
}

impl QuantKernel {
    /// The best kernel allowed by `level` (the backend's cap) on this CPU.
    pub fn for_level(level: SimdLevel) -> QuantKernel {
        match level {
            SimdLevel::Avx512 if has_vnni() => QuantKernel::Vnni,
            SimdLevel::Avx512 | SimdLevel::Avx2 => QuantKernel::Avx2,
            SimdLevel::Scalar => QuantKernel::Scalar,
        }
    }

    /// Every kernel this CPU can run, lowest first.
    pub fn all_supported() -> Vec<QuantKernel> {
        let best = QuantKernel::for_level(SimdLevel::detect());
        [QuantKernel::Scalar, QuantKernel::Avx2, QuantKernel::Vnni].into_iter().filter(|&k| k <= best).collect()
    }
}

impl std::fmt::Display for QuantKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QuantKernel::Scalar => "scalar",
            QuantKernel::Avx2 => "avx2",
            QuantKernel::Vnni => "avx512-vnni",
        })
    }
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activation rows quantized to 8-bit blocks, kept as separate arrays so that the SIMD loops
/// load contiguous bytes.
#[derive(Debug, Clone, Default)]
pub struct Q8Activations {
    /// Blocks per row.
    pub blocks: usize,
    /// Quantized values, row after row.
    pub qs: Vec<i8>,
    /// Per block: the scale `dx` (value = q · dx).
    pub scales: Vec<f32>,
    /// Per block: `dx · Σ q`, the block sum the offsets and minimums multiply.
    pub scaled_sums: Vec<f32>,
    /// Per block: `Σ q` over its first 16 and its last 16 elements (Q6_K's halves).
    pub half_sums: Vec<i32>,
}

impl Q8Activations {
    /// Quantizes `rows` rows of `cols` values (`d = max|x| / 127` as in ggml; values rounded to
    /// nearest, ties to even, as ggml's SIMD quantizers round).
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Q8Activations {
        assert!(cols.is_multiple_of(QK) && x.len() >= rows * cols, "activations must be whole blocks of 32");
        let blocks = cols / QK;
        let mut out = Q8Activations {
            blocks,
            qs: vec![0; rows * cols],
            scales: vec![0.0; rows * blocks],
            scaled_sums: vec![0.0; rows * blocks],
            half_sums: vec![0; 2 * rows * blocks],
        };
        // Prefill rows are split over the pool (one thread quantizing 512 rows left the other
        // waiting for 4% of a Q8_0 prefill); a decode row is too small to share.
        const ROWS_PER_TASK: usize = 16;
        let chunks = out
            .qs
            .par_chunks_mut(cols * ROWS_PER_TASK)
            .zip(out.scales.par_chunks_mut(blocks * ROWS_PER_TASK))
            .zip(out.scaled_sums.par_chunks_mut(blocks * ROWS_PER_TASK))
            .zip(out.half_sums.par_chunks_mut(2 * blocks * ROWS_PER_TASK))
            .zip(x[..rows * cols].par_chunks(cols * ROWS_PER_TASK));
        let level = SimdLevel::detect();
        chunks.for_each(|((((qs, scales), scaled_sums), half_sums), x)| quantize_blocks(level, x, qs, scales, scaled_sums, half_sums));
        out
    }

    /// Row `r` as the slices a dot product takes.
    pub fn row(&self, r: usize) -> Q8Row<'_> {
        let b = self.blocks;
        Q8Row {
            qs: &self.qs[r * b * QK..(r + 1) * b * QK],
            scales: &self.scales[r * b..(r + 1) * b],
            scaled_sums: &self.scaled_sums[r * b..(r + 1) * b],
            half_sums: &self.half_sums[2 * r * b..2 * (r + 1) * b],
        }
    }
}

/// Quantizes the 32-element blocks of `x` into `qs` and their per-block figures (see
/// [`Q8Activations`]), with the CPU's widest vectors.
fn quantize_blocks(level: SimdLevel, x: &[f32], qs: &mut [i8], scales: &mut [f32], scaled_sums: &mut [f32], half_sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 {
        // SAFETY: AVX2 and FMA are present at this level.
        return unsafe { quantize_blocks_avx2(x, qs, scales, scaled_sums, half_sums) };
    }
    let _ = level;
    quantize_blocks_portable(x, qs, scales, scaled_sums, half_sums)
}

/// [`quantize_blocks_portable`] compiled for AVX2: the same code, vectorized 8 wide (the
/// baseline build's SSE2 left activation quantization at 5-6% of a Q8_0 prefill).
///
/// Safety: AVX2 and FMA must be present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2(x: &[f32], qs: &mut [i8], scales: &mut [f32], scaled_sums: &mut [f32], half_sums: &mut [i32]) {
    quantize_blocks_portable(x, qs, scales, scaled_sums, half_sums)
}

/// The quantizer, written so that it vectorizes: no branches, no saturating casts.
#[inline(always)]
fn quantize_blocks_portable(x: &[f32], qs: &mut [i8], scales: &mut [f32], scaled_sums: &mut [f32], half_sums: &mut [i32]) {
    // Adding 1.5·2²³ rounds |v| < 2²² to the nearest integer (ties to even) and leaves it in
    // the low mantissa bits, read back with an integer subtraction (`f32::round` is a libm call
    // per element; `as i8` a saturating cast per element).
    const ROUNDER: f32 = 12_582_912.0;
    for (b, (chunk, q)) in x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK)).enumerate() {
        // Running maxima in lanes (NaNs skipped, as `f32::max` skips them).
        let mut lanes = [0.0f32; 8];
        for eight in chunk.chunks_exact(8) {
            for (m, &v) in lanes.iter_mut().zip(eight) {
                let magnitude = v.abs();
                *m = if magnitude > *m { magnitude } else { *m };
            }
        }
        let amax = lanes.iter().fold(0.0f32, |m, &v| if v > m { v } else { m });
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut halves = [0i32; 2];
        for (h, (sixteen, q)) in chunk.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
            for (q, &v) in q.iter_mut().zip(sixteen) {
                // Saturated as `as i8` saturates (a subnormal scale makes `inverse` infinite).
                let scaled = v * inverse;
                let scaled = if scaled > 127.0 { 127.0 } else { scaled };
                let scaled = if scaled < -128.0 { -128.0 } else { scaled };
                let shifted = scaled + ROUNDER;
                let value = (shifted.to_bits() as i32).wrapping_sub(ROUNDER.to_bits() as i32);
                // NaN (from a NaN or infinite input) gives 0, as `as i8` would.
                let value = if !shifted.is_nan() { value } else { 0 };
                *q = value as i8;
                halves[h] += value;
            }
        }
        scales[b] = d;
        scaled_sums[b] = d * (halves[0] + halves[1]) as f32;
        half_sums[2 * b..2 * b + 2].copy_from_slice(&halves);
    }
}

/// One quantized activation row.
#[derive(Debug, Clone, Copy)]
pub struct Q8Row<'a> {
    pub qs: &'a [i8],
    pub scales: &'a [f32],
    pub scaled_sums: &'a [f32],
    pub half_sums: &'a [i32],
}

/// Activation rows the prefill path hands the kernels at once (each unpacked weight vector then
/// meets four rows).
pub const ROWS_AT_ONCE: usize = 4;

/// How far ahead of a task's stream of block units the SIMD kernels ask for the next cache
/// lines (a hint: no plan changes a result). The hardware prefetchers alone left two-thread
/// Q4_1 and Q8_0 decode at 70-75% of the bandwidth floor; 8 KiB ahead into L1 measured 1.3-1.4x
/// faster (1 KiB 1.2x, 4 KiB between). Asking L2 for the lines 16 KiB ahead as well took
/// 0.92-0.94x the Q8_0 decode step on an Intel VM (Q4_1 alike, 0.995-1.01; in-process A/B
/// alternating per token) but, on an AMD EPYC VM at 53-94 GB/s, 1.0-1.08x the step of L1 alone
/// (runs apart disagreed), so the backend times both on the loaded model (see `tune`).
pub const UNIT_PREFETCH_NEAR_AND_FAR: StreamPrefetch = StreamPrefetch { near: 8192, far: 16384 };
/// [`UNIT_PREFETCH_NEAR_AND_FAR`] without the L2 one.
pub const UNIT_PREFETCH_NEAR: StreamPrefetch = StreamPrefetch { near: 8192, far: 0 };

/// `out[t][i] = Σ_k w[groups.start·16 + i, k] · x_t[k]` for the rows of the row groups
/// `groups` (padding rows excluded: `out[t]` holds exactly the real rows) and each of the `T`
/// activation rows, prefetching with [`UNIT_PREFETCH_NEAR_AND_FAR`].
pub fn dot_groups<const T: usize>(kernel: QuantKernel, weights: &BlockMatrix, groups: std::ops::Range<usize>, x: [Q8Row<'_>; T], out: &mut [&mut [f32]; T]) {
    dot_groups_prefetching(kernel, UNIT_PREFETCH_NEAR_AND_FAR, weights, groups, x, out)
}

/// [`dot_groups`] with the SIMD kernels prefetching by `prefetch`.
pub fn dot_groups_prefetching<const T: usize>(kernel: QuantKernel, prefetch: StreamPrefetch, weights: &BlockMatrix, groups: std::ops::Range<usize>, x: [Q8Row<'_>; T], out: &mut [&mut [f32]; T]) {
    let blocks = weights.blocks;
    let real_rows = (groups.end * ROW_GROUP).min(weights.rows).saturating_sub(groups.start * ROW_GROUP);
    assert!(
        groups.start <= groups.end
            && groups.end <= weights.groups()
            && x.iter().all(|r| r.scales.len() == blocks
                && r.qs.len() == blocks * QK
                && r.scaled_sums.len() == blocks
                && r.half_sums.len() == 2 * blocks)
            && out.iter().all(|o| o.len() == real_rows),
        "quantized dot operands disagree in length"
    );
    for g in groups.clone() {
        let lanes: [[f32; ROW_GROUP]; T] = match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: kernels other than Scalar are only chosen when their features were
            // detected (QuantKernel::for_level / all_supported); `g` is a group of `weights` and
            // every activation row holds `weights.blocks` blocks (checked above).
            QuantKernel::Vnni if weights.format.is_k() => unsafe { x86::group_vnni_k(weights, g, &x, prefetch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            QuantKernel::Vnni => unsafe { x86::group_vnni(weights, g, &x, prefetch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            QuantKernel::Avx2 if weights.format.is_k() => unsafe { x86::group_avx2_k(weights, g, &x, prefetch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            QuantKernel::Avx2 => unsafe { x86::group_avx2(weights, g, &x, prefetch) },
            _ => std::array::from_fn(|t| scalar::group(weights, g, x[t])),
        };
        let first = (g - groups.start) * ROW_GROUP;
        let count = ROW_GROUP.min(real_rows - first);
        for (o, lane) in out.iter_mut().zip(&lanes) {
            o[first..first + count].copy_from_slice(&lane[..count]);
        }
    }
}

pub mod scalar {
    //! The reference: integer sums per block of the stored values, scaled in f32.
    use super::*;

    /// The 16 rows of group `g` (padding rows give 0).
    pub fn group(w: &BlockMatrix, g: usize, x: Q8Row<'_>) -> [f32; ROW_GROUP] {
        std::array::from_fn(|lane| {
            let row = g * ROW_GROUP + lane;
            if row >= w.rows {
                return 0.0;
            }
            let mut total = 0.0f32;
            for b in 0..w.blocks {
                let xq = &x.qs[b * QK..(b + 1) * QK];
                let sum: i32 = xq.iter().enumerate().map(|(e, &v)| w.quant(row, b, e) * v as i32).sum();
                let d = w.scale(row, b);
                total += match w.format {
                    BlockFormat::Q8_0 => d * x.scales[b] * sum as f32,
                    BlockFormat::Q4_0 => d * x.scales[b] * sum as f32 - 8.0 * d * x.scaled_sums[b],
                    BlockFormat::Q4_1 => d * x.scales[b] * sum as f32 + w.minimum(row, b) * x.scaled_sums[b],
                    BlockFormat::Q5_0 => d * x.scales[b] * sum as f32 - 16.0 * d * x.scaled_sums[b],
                    BlockFormat::Q4_K => {
                        (d * w.sub_scale(row, b, 0) as f32) * x.scales[b] * sum as f32
                            - (w.minimum(row, b) * w.sub_scale(row, b, 1) as f32) * x.scaled_sums[b]
                    }
                    BlockFormat::Q6_K => (0..2)
                        .map(|h| {
                            let half: i32 = (16 * h..16 * h + 16).map(|e| w.quant(row, b, e) * xq[e] as i32).sum();
                            let exact = half - 32 * x.half_sums[2 * b + h];
                            (d * w.sub_scale(row, b, h) as f32) * x.scales[b] * exact as f32
                        })
                        .sum(),
                };
            }
            total
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The SIMD kernels on the packed layout: one row group per call, every activation row.
    use std::arch::x86_64::*;

    use super::{BlockFormat, BlockMatrix, Q8Row, StreamPrefetch, BLOCKS_PER_SUPER, QK, ROW_GROUP};

    /// Asks for the cache lines of the unit `prefetch.near` bytes past `unit` (`unit_bytes`
    /// long) into L1, and of the unit `prefetch.far` past it into L2 (0: not at all). A prefetch
    /// is a hint: it never faults, past the matrix's end included (`wrapping_add` keeps the
    /// address arithmetic defined).
    #[inline(always)]
    unsafe fn prefetch_ahead(unit: *const u8, unit_bytes: usize, prefetch: StreamPrefetch) {
        for line in (0..unit_bytes).step_by(64) {
            // Branches on the plan: the same way every time, so predicted.
            if prefetch.near > 0 {
                _mm_prefetch::<_MM_HINT_T0>(unit.wrapping_add(prefetch.near + line) as *const i8);
            }
            if prefetch.far > 0 {
                _mm_prefetch::<_MM_HINT_T1>(unit.wrapping_add(prefetch.far + line) as *const i8);
            }
        }
    }

    /// Visits a row group's block halves for the AVX2 kernels, `$add_block!(b, half)` each,
    /// prefetching each block's unit once. Decode (one activation row) takes both halves in
    /// one pass over the blocks, so that the weight stream never waits for a second pass from
    /// L1 (Q8_0 decode 7-12% faster, Q4_1 0-7%); several rows take a pass per half, which keeps
    /// their accumulators in registers.
    macro_rules! visit_block_halves {
        ($rows:expr, $blocks:expr, $quants:expr, $unit_bytes:expr, $prefetch:expr, $add_block:ident) => {
            if $rows == 1 {
                for b in 0..$blocks {
                    prefetch_ahead($quants.add(b * $unit_bytes), $unit_bytes, $prefetch);
                    $add_block!(b, 0);
                    $add_block!(b, 1);
                }
            } else {
                for half in 0..2 {
                    for b in 0..$blocks {
                        if half == 0 {
                            prefetch_ahead($quants.add(b * $unit_bytes), $unit_bytes, $prefetch);
                        }
                        $add_block!(b, half);
                    }
                }
            }
        };
    }

    /// Safety: AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C must be present; `g` is a row group of
    /// `w`, and every `x[t]` holds `w.blocks` blocks.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn group_vnni<const T: usize>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T], prefetch: StreamPrefetch) -> [[f32; ROW_GROUP]; T] {
        let format = w.format;
        let unit_bytes = format.group_block_bytes();
        let mut sums = [_mm512_setzero_ps(); T];
        let mut offsets = [_mm512_setzero_ps(); T];
        // `$load(k)` gives weight vector k (elements 4k..4k+4 of the 16 rows, unsigned bytes).
        macro_rules! blocks {
            (|$unit:ident| $vectors:expr) => {{
                for b in 0..w.blocks {
                    let unit = g * w.blocks + b;
                    let d = _mm512_cvtph_ps(_mm256_loadu_si256(w.scales.as_ptr().add(unit * ROW_GROUP) as *const __m256i));
                    let offset_scale = if format == BlockFormat::Q4_1 {
                        _mm512_cvtph_ps(_mm256_loadu_si256(w.minimums.as_ptr().add(unit * ROW_GROUP) as *const __m256i))
                    } else {
                        d
                    };
                    let $unit = w.quants.as_ptr().add(unit * unit_bytes);
                    prefetch_ahead($unit, unit_bytes, prefetch);
                    let vectors: [__m512i; 8] = $vectors;
                    for t in 0..T {
                        let xp = x[t].qs.as_ptr().add(b * QK) as *const i32;
                        let products = _mm512_cvtepi32_ps(dot_vectors_512(&vectors, xp, 0..8));
                        sums[t] = _mm512_fmadd_ps(products, _mm512_mul_ps(d, _mm512_set1_ps(*x[t].scales.get_unchecked(b))), sums[t]);
                        offsets[t] = _mm512_fmadd_ps(offset_scale, _mm512_set1_ps(*x[t].scaled_sums.get_unchecked(b)), offsets[t]);
                    }
                }
            }};
        }
        match format {
            BlockFormat::Q8_0 => blocks!(|unit| std::array::from_fn(|k| _mm512_loadu_si512(unit.add(k * 64) as *const __m512i))),
            BlockFormat::Q5_0 => blocks!(|unit| {
                let fifth = _mm512_set1_epi8(0x10);
                let nibbles = nibbles_512(unit);
                let bits = _mm512_loadu_si512(unit.add(4 * 64) as *const __m512i);
                // Bit k of each byte belongs to weight vector k: bring it to bit 4.
                let high: [__m512i; 8] = [
                    _mm512_slli_epi16::<4>(bits),
                    _mm512_slli_epi16::<3>(bits),
                    _mm512_slli_epi16::<2>(bits),
                    _mm512_slli_epi16::<1>(bits),
                    bits,
                    _mm512_srli_epi16::<1>(bits),
                    _mm512_srli_epi16::<2>(bits),
                    _mm512_srli_epi16::<3>(bits),
                ];
                std::array::from_fn(|k| _mm512_or_si512(nibbles[k], _mm512_and_si512(high[k], fifth)))
            }),
            _ => blocks!(|unit| nibbles_512(unit)),
        }
        finish_512(&sums, &offsets, format.offset_factor())
    }

    /// The 8 weight vectors of a packed block's nibble bytes at `unit`: low nibbles are elements
    /// `4j..` (vector `j`), high nibbles `16 + 4j..` (vector `j + 4`).
    ///
    /// Safety: AVX-512 F/BW must be present and `unit` must point at 256 readable bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn nibbles_512(unit: *const u8) -> [__m512i; 8] {
        let low = _mm512_set1_epi8(0x0F);
        let raw: [__m512i; 4] = std::array::from_fn(|j| _mm512_loadu_si512(unit.add(j * 64) as *const __m512i));
        std::array::from_fn(|k| if k < 4 { _mm512_and_si512(raw[k], low) } else { _mm512_and_si512(_mm512_srli_epi16::<4>(raw[k - 4]), low) })
    }

    /// Per row lane, `Σ_k` over the weight vectors `k` in `range` (an even count) of their 4
    /// bytes times the activation's 4 bytes `4k..4k+4` at `xp`, broadcast to every lane.
    ///
    /// Safety: AVX-512 F/VNNI must be present and `xp` must point at `range.end` readable i32s.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot_vectors_512(vectors: &[__m512i; 8], xp: *const i32, range: std::ops::Range<usize>) -> __m512i {
        // Two chains keep the vpdpbusd latency off the critical path.
        let mut even = _mm512_setzero_si512();
        let mut odd = _mm512_setzero_si512();
        for k in range.step_by(2) {
            even = _mm512_dpbusd_epi32(even, vectors[k], _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(k))));
            odd = _mm512_dpbusd_epi32(odd, vectors[k + 1], _mm512_set1_epi32(std::ptr::read_unaligned(xp.add(k + 1))));
        }
        _mm512_add_epi32(even, odd)
    }

    /// `sums + factor·offsets` per activation row, 16 row lanes each.
    ///
    /// Safety: AVX-512 F must be present.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn finish_512<const T: usize>(sums: &[__m512; T], offsets: &[__m512; T], factor: f32) -> [[f32; ROW_GROUP]; T] {
        let factor = _mm512_set1_ps(factor);
        let mut out = [[0.0f32; ROW_GROUP]; T];
        for t in 0..T {
            _mm512_storeu_ps(out[t].as_mut_ptr(), _mm512_fmadd_ps(offsets[t], factor, sums[t]));
        }
        out
    }

    /// [`group_vnni`] for Q4_K and Q6_K.
    ///
    /// Safety: as [`group_vnni`].
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn group_vnni_k<const T: usize>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T], prefetch: StreamPrefetch) -> [[f32; ROW_GROUP]; T] {
        let format = w.format;
        let unit_bytes = format.group_block_bytes();
        let supers = w.blocks / BLOCKS_PER_SUPER;
        let mut sums = [_mm512_setzero_ps(); T];
        let mut offsets = [_mm512_setzero_ps(); T];
        for b in 0..w.blocks {
            let unit = g * w.blocks + b;
            let lanes = (g * supers + b / BLOCKS_PER_SUPER) * ROW_GROUP;
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(w.scales.as_ptr().add(lanes) as *const __m256i));
            let subs = w.sub_scales.as_ptr().add(unit * 2 * ROW_GROUP);
            let q = w.quants.as_ptr().add(unit * unit_bytes);
            prefetch_ahead(q, unit_bytes, prefetch);
            let nibbles = nibbles_512(q);
            if format == BlockFormat::Q4_K {
                // d·sc and dmin·m per lane, shared by every activation row.
                let step = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(subs as *const __m128i))));
                let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(w.minimums.as_ptr().add(lanes) as *const __m256i));
                let offset = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(subs.add(ROW_GROUP) as *const __m128i))));
                for t in 0..T {
                    let xp = x[t].qs.as_ptr().add(b * QK) as *const i32;
                    let products = _mm512_cvtepi32_ps(dot_vectors_512(&nibbles, xp, 0..8));
                    sums[t] = _mm512_fmadd_ps(products, _mm512_mul_ps(step, _mm512_set1_ps(*x[t].scales.get_unchecked(b))), sums[t]);
                    offsets[t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(*x[t].scaled_sums.get_unchecked(b)), offsets[t]);
                }
            } else {
                // Q6_K: the high bit pairs of weight vector 4h + s sit at bits 2s of vector h.
                let pairs: [__m512i; 2] = std::array::from_fn(|h| _mm512_loadu_si512(q.add(ROW_GROUP * QK / 2 + h * 64) as *const __m512i));
                let three = _mm512_set1_epi8(3);
                let vectors: [__m512i; 8] = std::array::from_fn(|k| {
                    let p = pairs[k / 4];
                    let shifted = match k % 4 {
                        0 => p,
                        1 => _mm512_srli_epi16::<2>(p),
                        2 => _mm512_srli_epi16::<4>(p),
                        _ => _mm512_srli_epi16::<6>(p),
                    };
                    _mm512_or_si512(nibbles[k], _mm512_slli_epi16::<4>(_mm512_and_si512(shifted, three)))
                });
                let steps: [__m512; 2] =
                    std::array::from_fn(|h| _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(subs.add(h * ROW_GROUP) as *const __m128i)))));
                for t in 0..T {
                    let xp = x[t].qs.as_ptr().add(b * QK) as *const i32;
                    let dx = _mm512_set1_ps(*x[t].scales.get_unchecked(b));
                    for h in 0..2 {
                        // Σ (q − 32)·qx, exact in 32 bits.
                        let products = dot_vectors_512(&vectors, xp, 4 * h..4 * h + 4);
                        let centred = _mm512_sub_epi32(products, _mm512_set1_epi32(32 * *x[t].half_sums.get_unchecked(2 * b + h)));
                        sums[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(centred), _mm512_mul_ps(steps[h], dx), sums[t]);
                    }
                }
            }
        }
        finish_512(&sums, &offsets, format.offset_factor())
    }

    /// [`group_avx2`] for Q4_K and Q6_K.
    ///
    /// Safety: as [`group_avx2`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2_k<const T: usize>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T], prefetch: StreamPrefetch) -> [[f32; ROW_GROUP]; T] {
        match w.format {
            BlockFormat::Q4_K => group_avx2_k_of::<T, { BlockFormat::Q4_K as u8 }>(w, g, x, prefetch),
            BlockFormat::Q6_K => group_avx2_k_of::<T, { BlockFormat::Q6_K as u8 }>(w, g, x, prefetch),
            _ => unreachable!("32-element formats take group_avx2"),
        }
    }

    /// [`group_avx2_k`] for one K format, built as [`group_avx2_of`]: raw pointers taken once,
    /// weight vectors streamed through one register each, both halves in one pass in decode.
    ///
    /// Safety: as [`group_avx2`], and `w.format` is `FORMAT`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_avx2_k_of<const T: usize, const FORMAT: u8>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T], prefetch: StreamPrefetch) -> [[f32; ROW_GROUP]; T] {
        let q4k = FORMAT == BlockFormat::Q4_K as u8;
        let blocks = w.blocks;
        let supers = blocks / BLOCKS_PER_SUPER;
        let unit_bytes = w.format.group_block_bytes();
        let scales = w.scales.as_ptr().add(g * supers * ROW_GROUP);
        let minimums = if q4k { w.minimums.as_ptr().add(g * supers * ROW_GROUP) } else { scales };
        let sub_scales = w.sub_scales.as_ptr().add(g * blocks * 2 * ROW_GROUP);
        let quants = w.quants.as_ptr().add(g * blocks * unit_bytes);
        let x_quants: [*const i32; T] = std::array::from_fn(|t| x[t].qs.as_ptr() as *const i32);
        let x_scales: [*const f32; T] = std::array::from_fn(|t| x[t].scales.as_ptr());
        let x_scaled_sums: [*const f32; T] = std::array::from_fn(|t| x[t].scaled_sums.as_ptr());
        let x_half_sums: [*const i32; T] = std::array::from_fn(|t| x[t].half_sums.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let widen = |p: *const u8, signed: bool| {
            let bytes = _mm_loadl_epi64(p as *const __m128i);
            _mm256_cvtepi32_ps(if signed { _mm256_cvtepi8_epi32(bytes) } else { _mm256_cvtepu8_epi32(bytes) })
        };
        let mut sums = [[_mm256_setzero_ps(); T]; 2];
        // Q4_K's dmin·m terms (Q6_K removes its offset in the integer sums).
        let mut offsets = [[_mm256_setzero_ps(); T]; 2];
        macro_rules! add_block {
            ($b:expr, $half:expr) => {{
                let (b, half) = ($b, $half);
                let base = quants.add(b * unit_bytes + half * 32);
                let lanes = (b / BLOCKS_PER_SUPER) * ROW_GROUP + half * 8;
                let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(lanes) as *const __m128i));
                let subs = sub_scales.add(b * 2 * ROW_GROUP + half * 8);
                // Integer sums per 16-element half of the block (Q6_K scales each its own).
                let mut acc = [[_mm256_setzero_si256(); T]; 2];
                for k in 0..8 {
                    let raw = _mm256_loadu_si256(base.add((k % 4) * 64) as *const __m256i);
                    let nibbles = if k < 4 { _mm256_and_si256(raw, low) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low) };
                    let v = if q4k {
                        nibbles
                    } else {
                        // The high bit pairs of weight vector 4h + s sit at bits 2s of vector h.
                        let p = _mm256_loadu_si256(base.add(ROW_GROUP * QK / 2 + (k / 4) * 64) as *const __m256i);
                        let shifted = match k % 4 {
                            0 => p,
                            1 => _mm256_srli_epi16::<2>(p),
                            2 => _mm256_srli_epi16::<4>(p),
                            _ => _mm256_srli_epi16::<6>(p),
                        };
                        _mm256_or_si256(nibbles, _mm256_slli_epi16::<4>(_mm256_and_si256(shifted, three)))
                    };
                    let h = if q4k { 0 } else { k / 4 };
                    for t in 0..T {
                        let xv = _mm256_set1_epi32(std::ptr::read_unaligned(x_quants[t].add(b * 8 + k)));
                        acc[h][t] = _mm256_add_epi32(acc[h][t], _mm256_madd_epi16(_mm256_maddubs_epi16(v, xv), ones));
                    }
                }
                if q4k {
                    let step = _mm256_mul_ps(d, widen(subs, false));
                    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(minimums.add(lanes) as *const __m128i));
                    let offset = _mm256_mul_ps(dmin, widen(subs.add(ROW_GROUP), false));
                    for t in 0..T {
                        let scale = _mm256_mul_ps(step, _mm256_set1_ps(*x_scales[t].add(b)));
                        sums[half][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[0][t]), scale, sums[half][t]);
                        offsets[half][t] = _mm256_fmadd_ps(offset, _mm256_set1_ps(*x_scaled_sums[t].add(b)), offsets[half][t]);
                    }
                } else {
                    let steps = [_mm256_mul_ps(d, widen(subs, true)), _mm256_mul_ps(d, widen(subs.add(ROW_GROUP), true))];
                    for t in 0..T {
                        let dx = _mm256_set1_ps(*x_scales[t].add(b));
                        for (h, step) in steps.iter().enumerate() {
                            // Σ (q − 32)·qx, exact in 32 bits.
                            let centred = _mm256_sub_epi32(acc[h][t], _mm256_set1_epi32(32 * *x_half_sums[t].add(2 * b + h)));
                            sums[half][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(centred), _mm256_mul_ps(*step, dx), sums[half][t]);
                        }
                    }
                }
            }};
        }
        visit_block_halves!(T, blocks, quants, unit_bytes, prefetch, add_block);
        let factor = _mm256_set1_ps(w.format.offset_factor());
        let mut out = [[0.0f32; ROW_GROUP]; T];
        for half in 0..2 {
            for t in 0..T {
                _mm256_storeu_ps(out[t].as_mut_ptr().add(half * 8), _mm256_fmadd_ps(offsets[half][t], factor, sums[half][t]));
            }
        }
        out
    }

    /// Safety: AVX2, FMA and F16C must be present; `g` is a row group of `w`, and every `x[t]`
    /// holds `w.blocks` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2<const T: usize>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T], prefetch: StreamPrefetch) -> [[f32; ROW_GROUP]; T] {
        // One kernel per format, so that its tests fold and each inner loop holds only its own
        // work (a run-time format made one closure per block half: perf showed its storage
        // matches and its spilled sums around every 8 vectors).
        match w.format {
            BlockFormat::Q8_0 => group_avx2_of::<T, { BlockFormat::Q8_0 as u8 }>(w, g, x, prefetch),
            BlockFormat::Q4_0 => group_avx2_of::<T, { BlockFormat::Q4_0 as u8 }>(w, g, x, prefetch),
            BlockFormat::Q4_1 => group_avx2_of::<T, { BlockFormat::Q4_1 as u8 }>(w, g, x, prefetch),
            BlockFormat::Q5_0 => group_avx2_of::<T, { BlockFormat::Q5_0 as u8 }>(w, g, x, prefetch),
            BlockFormat::Q4_K | BlockFormat::Q6_K => unreachable!("K formats take group_avx2_k"),
        }
    }

    /// Weight vector `k` (0..8: elements 4k..4k+4 of each of 8 rows) of a half unit at `base`,
    /// as the unsigned bytes `vpmaddubsw` takes; for Q8_0 the signed weights (`q + 128` flipped
    /// back: unsigned, 255·127·2 would overflow its i16 sums).
    ///
    /// Safety: AVX2 must be present and `base` must point at the half unit of a block of
    /// format `FORMAT` (4, 5 or 8 vectors 64 bytes apart of 32 readable bytes each).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn weight_vector_256<const FORMAT: u8>(base: *const u8, k: usize) -> __m256i {
        let load = |j: usize| _mm256_loadu_si256(base.add(j * 64) as *const __m256i);
        if FORMAT == BlockFormat::Q8_0 as u8 {
            return _mm256_xor_si256(load(k), _mm256_set1_epi8(-128));
        }
        let low = _mm256_set1_epi8(0x0F);
        let nibbles = if k < 4 { _mm256_and_si256(load(k), low) } else { _mm256_and_si256(_mm256_srli_epi16::<4>(load(k - 4)), low) };
        if FORMAT != BlockFormat::Q5_0 as u8 {
            return nibbles;
        }
        // Bit k of each byte of the fifth-bit vector belongs to weight vector k: bring it to 4.
        let bits = load(4);
        let high = match k {
            0 => _mm256_slli_epi16::<4>(bits),
            1 => _mm256_slli_epi16::<3>(bits),
            2 => _mm256_slli_epi16::<2>(bits),
            3 => _mm256_slli_epi16::<1>(bits),
            4 => bits,
            5 => _mm256_srli_epi16::<1>(bits),
            6 => _mm256_srli_epi16::<2>(bits),
            _ => _mm256_srli_epi16::<3>(bits),
        };
        _mm256_or_si256(nibbles, _mm256_and_si256(high, _mm256_set1_epi8(0x10)))
    }

    /// [`group_avx2`] for one 32-element format (`FORMAT` is a `BlockFormat as u8`).
    ///
    /// Safety: as [`group_avx2`], and `w.format` is `FORMAT`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn group_avx2_of<const T: usize, const FORMAT: u8>(w: &BlockMatrix, g: usize, x: &[Q8Row<'_>; T], prefetch: StreamPrefetch) -> [[f32; ROW_GROUP]; T] {
        let q8 = FORMAT == BlockFormat::Q8_0 as u8;
        let blocks = w.blocks;
        let unit_bytes = w.format.group_block_bytes();
        // Raw pointers taken once: a weight buffer's deref matches on its storage.
        let scales = w.scales.as_ptr().add(g * blocks * ROW_GROUP);
        let quants = w.quants.as_ptr().add(g * blocks * unit_bytes);
        let x_quants: [*const i32; T] = std::array::from_fn(|t| x[t].qs.as_ptr() as *const i32);
        let x_scales: [*const f32; T] = std::array::from_fn(|t| x[t].scales.as_ptr());
        let ones = _mm256_set1_epi16(1);
        // Block `b`'s integer sums for half `half` (8 rows) of the group, per activation row,
        // added to that half's running sums. The weight vectors stream through one register
        // each, activation rows inside: the accumulators and the running sums are all that
        // stays live. A macro, not a closure: the compiler left the closure uninlined for some
        // formats, returning its sums through memory and testing the format at run time.
        let mut sums = [[_mm256_setzero_ps(); T]; 2];
        macro_rules! add_block {
            ($b:expr, $half:expr) => {{
                let (b, half) = ($b, $half);
                let base = quants.add(b * unit_bytes + half * 32);
                let mut acc = [_mm256_setzero_si256(); T];
                for k in 0..8 {
                    let v = weight_vector_256::<FORMAT>(base, k);
                    // Q8_0: |w| · (x with w's sign), the unsigned × signed form vpmaddubsw takes.
                    let magnitude = if q8 { _mm256_sign_epi8(v, v) } else { v };
                    for t in 0..T {
                        let xv = _mm256_set1_epi32(std::ptr::read_unaligned(x_quants[t].add(b * 8 + k)));
                        let xv = if q8 { _mm256_sign_epi8(xv, v) } else { xv };
                        acc[t] = _mm256_add_epi32(acc[t], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, xv), ones));
                    }
                }
                let d = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b * ROW_GROUP + half * 8) as *const __m128i));
                for t in 0..T {
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x_scales[t].add(b)));
                    sums[half][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[t]), scale, sums[half][t]);
                }
            }};
        }
        visit_block_halves!(T, blocks, quants, unit_bytes, prefetch, add_block);
        let mut out = [[0.0f32; ROW_GROUP]; T];
        for half in 0..2 {
            for t in 0..T {
                _mm256_storeu_ps(out[t].as_mut_ptr().add(half * 8), sums[half][t]);
            }
        }
        if !q8 {
            // The offsets (Q4_1's minimums, Q4_0's 8·d, Q5_0's 16·d) times each block's scaled
            // activation sum, after the main loop: its registers stay free for the products.
            let offset_scales = if FORMAT == BlockFormat::Q4_1 as u8 { w.minimums.as_ptr().add(g * blocks * ROW_GROUP) } else { scales };
            let factor = _mm256_set1_ps(w.format.offset_factor());
            for (t, row) in x.iter().enumerate() {
                for half in 0..2 {
                    let mut offsets = _mm256_setzero_ps();
                    for b in 0..blocks {
                        let scale = _mm256_cvtph_ps(_mm_loadu_si128(offset_scales.add(b * ROW_GROUP + half * 8) as *const __m128i));
                        offsets = _mm256_fmadd_ps(scale, _mm256_set1_ps(*row.scaled_sums.get_unchecked(b)), offsets);
                    }
                    let lanes = out[t].as_mut_ptr().add(half * 8);
                    _mm256_storeu_ps(lanes, _mm256_fmadd_ps(offsets, factor, _mm256_loadu_ps(lanes)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::{dequantize, quantize};
    use rand::{Rng, SeedableRng};

    const FORMATS: [BlockFormat; 6] = [BlockFormat::Q8_0, BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q5_0, BlockFormat::Q4_K, BlockFormat::Q6_K];

    /// Σ w_i x_i for row `r` of `weights` and one activation row of the same width.
    fn dot(kernel: QuantKernel, weights: &BlockMatrix, r: usize, x: Q8Row<'_>) -> f32 {
        let group = r / ROW_GROUP;
        let real = (weights.rows - group * ROW_GROUP).min(ROW_GROUP);
        let mut lanes = [0.0f32; ROW_GROUP];
        dot_groups(kernel, weights, group..group + 1, [x], &mut [&mut lanes[..real]]);
        lanes[r % ROW_GROUP]
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0) * if rng.random_bool(0.05) { 8.0 } else { 1.0 }).collect()
    }

    #[test]
    fn packing_keeps_the_file_values_exactly() {
        // 3 and 21 rows: a partial group; 32: two whole groups.
        for &(rows, blocks) in &[(3usize, 1usize), (21, 3), (32, 18)] {
            for format in FORMATS {
                // `blocks` file blocks: super-blocks of 256 for the K types.
                let cols = blocks * format.block_elements();
                let values = random(rows * cols, blocks as u64);
                let bytes = quantize(format.ggml(), &values).unwrap();
                let packed = BlockMatrix::pack(format, rows, cols, &bytes);
                let expected = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
                let mut row = vec![f32::NAN; cols];
                for r in 0..rows {
                    packed.row_to_f32(r, &mut row);
                    assert_eq!(row, expected[r * cols..(r + 1) * cols], "{format:?} {rows}x{blocks} blocks, row {r}");
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_scalar_reference_and_the_float_product() {
        for &(rows, blocks) in &[(1usize, 1usize), (5, 2), (16, 3), (21, 17), (37, 18)] {
            for format in FORMATS {
                // K types: the same number of 32-element blocks, rounded up to super-blocks.
                let cols = blocks.next_multiple_of(format.block_elements() / QK) * QK;
                let w = random(rows * cols, blocks as u64);
                let mut x: Vec<f32> = (0..ROWS_AT_ONCE).flat_map(|t| random(cols, 100 + (blocks * 7 + t) as u64)).collect();
                x[5] = 0.0;
                if blocks > 1 {
                    x[QK..2 * QK].fill(0.0); // an all-zero block
                }
                let activations = Q8Activations::quantize(&x, ROWS_AT_ONCE, cols);
                let groups = rows.div_ceil(ROW_GROUP);
                let bytes = quantize(format.ggml(), &w).unwrap();
                let packed = BlockMatrix::pack(format, rows, cols, &bytes);
                let dequantized = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
                let x_rows: [Q8Row; ROWS_AT_ONCE] = std::array::from_fn(|t| activations.row(t));
                for kernel in QuantKernel::all_supported() {
                    // Four rows at once, and one row at a time, over every group.
                    let mut four = vec![vec![f32::NAN; rows]; ROWS_AT_ONCE];
                    {
                        let mut outs: [&mut [f32]; ROWS_AT_ONCE] = {
                            let mut it = four.iter_mut();
                            std::array::from_fn(|_| it.next().unwrap().as_mut_slice())
                        };
                        dot_groups(kernel, &packed, 0..groups, x_rows, &mut outs);
                    }
                    for (t, four_row) in four.iter().enumerate() {
                        let xt = &x[t * cols..(t + 1) * cols];
                        let mut one = vec![f32::NAN; rows];
                        dot_groups(kernel, &packed, 0..groups, [activations.row(t)], &mut [&mut one[..]]);
                        for r in 0..rows {
                            let weights_row = &dequantized[r * cols..(r + 1) * cols];
                            let exact: f64 = weights_row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
                            let magnitude: f64 = weights_row.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                            let reference = scalar::group(&packed, r / ROW_GROUP, activations.row(t))[r % ROW_GROUP];
                            // The activation's 8-bit rounding bounds the gap to the float product.
                            assert!((reference as f64 - exact).abs() <= 0.02 * magnitude + 1e-4, "{format:?} {rows}x{blocks}: {reference} vs {exact}");
                            // Only f32 rounding differs (order of sums; Q8_0's +128 removed afterwards).
                            let tolerance = 1e-5 * magnitude as f32 + 1e-6;
                            for (name, got) in [("one row", one[r]), ("four rows", four_row[r])] {
                                assert!((got - reference).abs() <= tolerance, "{format:?} {kernel} {name} {rows}x{blocks} row {r}: {got} vs {reference}");
                            }
                            assert_eq!(dot(kernel, &packed, r, activations.row(t)), one[r], "{format:?} {kernel}: dot of one row");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_bytes_do_not_overflow_the_simd_paths() {
        // Q8_0 weights of -128 (legal in a file, never produced by the quantizer) and ±127
        // activations: the sign trick and the +128 form must still give exact products.
        let cols = 2 * QK;
        let mut bytes = Vec::new();
        for _ in 0..2 {
            bytes.extend_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
            bytes.extend((0..QK).map(|i| if i % 2 == 0 { 0x80u8 } else { 0x7F }));
        }
        let packed = BlockMatrix::pack(BlockFormat::Q8_0, 1, cols, &bytes);
        let x: Vec<f32> = (0..cols).map(|i| if i % 3 == 0 { -1.0 } else { 1.0 }).collect();
        let activations = Q8Activations::quantize(&x, 1, cols);
        let reference = scalar::group(&packed, 0, activations.row(0))[0];
        let exact: f32 = (0..cols).map(|i| 0.5 * if i % 2 == 0 { -128.0 } else { 127.0 } * x[i]).sum();
        assert!((reference - exact).abs() < 1e-3, "{reference} vs {exact}");
        for kernel in QuantKernel::all_supported() {
            assert!((dot(kernel, &packed, 0, activations.row(0)) - reference).abs() < 1e-3, "{kernel}");
        }
    }

    /// K blocks of arbitrary bytes (every 6-bit scale, minimum and quant, Q6_K scales down to
    /// −128: what other quantizers may write) against the float product of the file's values.
    #[test]
    fn k_blocks_of_any_bytes_match_the_float_product() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let (rows, cols) = (19, 2 * QK_K);
        let x: Vec<f32> = (0..cols).map(|i| if i % 5 == 0 { -1.0 } else { rng.random_range(-1.0f32..1.0) }).collect();
        let activations = Q8Activations::quantize(&x, 1, cols);
        let xq: Vec<f32> = (0..cols).map(|i| activations.qs[i] as f32 * activations.scales[i / QK]).collect();
        for format in [BlockFormat::Q4_K, BlockFormat::Q6_K] {
            let mut bytes: Vec<u8> = (0..rows * 2 * format.block_bytes()).map(|_| rng.random()).collect();
            for block in bytes.chunks_exact_mut(format.block_bytes()) {
                let d = f16::from_f32(rng.random_range(1e-3f32..1e-2)).to_bits().to_le_bytes();
                match format {
                    BlockFormat::Q4_K => {
                        block[0..2].copy_from_slice(&d);
                        block[2..4].copy_from_slice(&f16::from_f32(rng.random_range(1e-3f32..1e-2)).to_bits().to_le_bytes());
                    }
                    _ => block[208..210].copy_from_slice(&d),
                }
            }
            let packed = BlockMatrix::pack(format, rows, cols, &bytes);
            let values = dequantize(format.ggml(), &bytes, rows * cols).unwrap();
            for kernel in QuantKernel::all_supported() {
                let mut out = vec![f32::NAN; rows];
                dot_groups(kernel, &packed, 0..packed.groups(), [activations.row(0)], &mut [&mut out[..]]);
                for r in 0..rows {
                    let row = &values[r * cols..(r + 1) * cols];
                    // Against the activation as quantized: only f32 rounding remains.
                    let exact: f64 = row.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let magnitude: f64 = row.iter().zip(&xq).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
                    assert!((out[r] as f64 - exact).abs() <= 1e-5 * magnitude + 1e-6, "{format:?} {kernel} row {r}: {} vs {exact}", out[r]);
                }
            }
        }
    }

    #[test]
    fn activation_rows_are_quantized_per_block() {
        let x = random(3 * 96, 9);
        let a = Q8Activations::quantize(&x, 3, 96);
        assert_eq!(a.blocks, 3);
        for r in 0..3 {
            let row = a.row(r);
            for b in 0..3 {
                let chunk = &x[r * 96 + b * QK..r * 96 + (b + 1) * QK];
                let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                assert_eq!(row.scales[b], amax / 127.0);
                let q = &row.qs[b * QK..(b + 1) * QK];
                assert!(q.iter().any(|&v| v.unsigned_abs() == 127));
                for (&v, &xv) in q.iter().zip(chunk) {
                    assert!((v as f32 - xv / row.scales[b]).abs() <= 0.5 + 1e-4, "rounded to nearest");
                }
                let sum: i32 = q.iter().map(|&v| v as i32).sum();
                assert_eq!(row.scaled_sums[b], row.scales[b] * sum as f32);
            }
        }
    }

    /// The plain reference the vectorized quantizers must match bit for bit.
    fn quantize_reference(x: &[f32]) -> (Vec<i8>, Vec<f32>, Vec<f32>, Vec<i32>) {
        let (mut qs, mut scales, mut scaled_sums, mut half_sums) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for chunk in x.chunks_exact(QK) {
            let amax = chunk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q: Vec<i8> = chunk.iter().map(|v| (v * inverse).round_ties_even() as i8).collect();
            let halves = [0, 1].map(|h| q[16 * h..16 * h + 16].iter().map(|&v| v as i32).sum::<i32>());
            scales.push(d);
            scaled_sums.push(d * (halves[0] + halves[1]) as f32);
            half_sums.extend(halves);
            qs.extend(q);
        }
        (qs, scales, scaled_sums, half_sums)
    }

    #[test]
    fn every_level_quantizes_activations_like_the_reference() {
        let mut x = random(64 * QK, 21);
        // Ties (exact halves after scaling), zero blocks, NaN and infinities, tiny values.
        for (e, v) in x[..QK].iter_mut().enumerate() {
            *v = (e as f32 - 16.0) * 0.5;
        }
        x[QK..2 * QK].fill(0.0);
        x[2 * QK + 3] = f32::NAN;
        x[3 * QK + 7] = f32::INFINITY;
        x[4 * QK + 1] = f32::NEG_INFINITY;
        x[5 * QK..6 * QK].iter_mut().for_each(|v| *v *= 1e-38);
        let expected = quantize_reference(&x);
        for level in SimdLevel::all_supported() {
            let blocks = x.len() / QK;
            let (mut qs, mut scales, mut scaled_sums, mut half_sums) = (vec![0i8; x.len()], vec![0.0; blocks], vec![0.0; blocks], vec![0; 2 * blocks]);
            quantize_blocks(level, &x, &mut qs, &mut scales, &mut scaled_sums, &mut half_sums);
            assert_eq!(qs, expected.0, "{level}: quants");
            assert_eq!(scales.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected.1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{level}: scales");
            assert_eq!(scaled_sums.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), expected.2.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{level}: scaled sums");
            assert_eq!(half_sums, expected.3, "{level}: half sums");
        }
        // The parallel split over rows gives the same as one pass.
        let whole = Q8Activations::quantize(&x, 64, QK);
        assert_eq!(whole.qs, expected.0);
    }
}
