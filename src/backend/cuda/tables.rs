//! Host tables mirrored on the device (row tokens, slots, positions, attention tiles, each
//! residual point's steering/readout/capture tables), uploaded only when their contents change:
//! a decode step re-sends nothing that the previous step already sent.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};

use crate::error::{Error, Result};
use crate::steer::tables::{FusedPoint, RowTerm, TermMode, NO_DIRECTION};

/// Marks a row that is not captured (`NO_DIRECTION` in kernels/residual.cu).
pub const NO_ROW: u32 = u32::MAX;

/// A device copy of a small host array, plus the host copy it was made from.
pub struct DeviceTable<T> {
    host: Vec<T>,
    device: CudaSlice<T>,
    valid: bool,
}

impl<T: DeviceRepr + ValidAsZeroBits + Copy + PartialEq> DeviceTable<T> {
    /// `device` is the initial allocation (at least one element, so it can always be passed).
    pub fn new(device: CudaSlice<T>) -> Self {
        DeviceTable { host: Vec::new(), device, valid: false }
    }

    /// Makes the device copy equal `data` (a no-op when it already is).
    pub fn sync(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<()> {
        if self.valid && self.host == data {
            return Ok(());
        }
        if self.device.len() < data.len() {
            self.device = stream.alloc_zeros::<T>(data.len().next_power_of_two()).map_err(|e| Error::Device(format!("allocating a table: {e}")))?;
        }
        if !data.is_empty() {
            let mut view = self.device.slice_mut(0..data.len());
            stream.memcpy_htod(data, &mut view).map_err(|e| Error::Device(format!("uploading a table: {e}")))?;
        }
        self.host.clear();
        self.host.extend_from_slice(data);
        self.valid = true;
        Ok(())
    }

    pub fn device(&self) -> &CudaSlice<T> {
        &self.device
    }
}

/// One term as kernels/residual.cu's `struct Term` lays it out: direction, coefficient, mode,
/// target — four 32-bit words.
pub fn term_words(term: &RowTerm) -> [u32; 4] {
    let (mode, target) = match term.mode {
        TermMode::Add => (0, 0.0f32),
        TermMode::NormScaled => (1, 0.0),
        TermMode::Clamp { target } => (2, target),
    };
    [term.direction, term.coefficient.to_bits(), mode, target.to_bits()]
}

/// The device tables of one residual point.
pub struct PointTables {
    /// What the tables were built from, to detect a changed point cheaply.
    row_offsets_host: Vec<u32>,
    terms_host: Vec<RowTerm>,
    capture_host: Vec<(u32, u32)>,
    rows: usize,
    built: bool,
    pub row_offsets: DeviceTable<u32>,
    pub terms: DeviceTable<u32>,
    pub probes: DeviceTable<u32>,
    /// Per row: its capture row or [`NO_ROW`].
    pub capture_rows: DeviceTable<u32>,
    /// Largest direction index any term or probe reads (to check the pool covers it).
    pub max_direction: Option<u32>,
    /// Largest capture row written.
    pub capture_rows_used: Option<u32>,
}

impl PointTables {
    pub fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        let alloc = || stream.alloc_zeros::<u32>(1).map_err(|e| Error::Device(format!("allocating a table: {e}")));
        Ok(PointTables {
            row_offsets_host: Vec::new(),
            terms_host: Vec::new(),
            capture_host: Vec::new(),
            rows: 0,
            built: false,
            row_offsets: DeviceTable::new(alloc()?),
            terms: DeviceTable::new(alloc()?),
            probes: DeviceTable::new(alloc()?),
            capture_rows: DeviceTable::new(alloc()?),
            max_direction: None,
            capture_rows_used: None,
        })
    }

    /// Brings the device tables up to date with `point` for a batch of `rows` rows, checking the
    /// host tables are consistent first (the kernel trusts them).
    pub fn sync(&mut self, stream: &Arc<CudaStream>, point: &FusedPoint, rows: usize) -> Result<()> {
        let unchanged = self.built
            && self.rows == rows
            && self.row_offsets_host == point.row_offsets
            && self.terms_host == point.terms
            && self.capture_host == point.capture;
        if !unchanged {
            if point.has_steering() {
                let offsets = &point.row_offsets;
                let consistent = offsets.len() == rows + 1
                    && offsets.windows(2).all(|w| w[0] <= w[1])
                    && offsets.last().is_some_and(|&last| last as usize <= point.terms.len());
                if !consistent {
                    return Err(Error::Shape(format!("steering table of {} offsets for {rows} rows", offsets.len())));
                }
            }
            let words: Vec<u32> = point.terms.iter().flat_map(term_words).collect();
            let mut capture_rows = Vec::new();
            if !point.capture.is_empty() {
                capture_rows = vec![NO_ROW; rows];
                for &(row, dest) in &point.capture {
                    let slot = capture_rows.get_mut(row as usize).ok_or_else(|| Error::Shape(format!("capture of row {row} in a batch of {rows}")))?;
                    *slot = dest;
                }
            }
            self.row_offsets.sync(stream, &point.row_offsets)?;
            self.terms.sync(stream, &words)?;
            self.capture_rows.sync(stream, &capture_rows)?;
            self.capture_rows_used = point.capture.iter().map(|&(_, dest)| dest).max();
            self.row_offsets_host.clone_from(&point.row_offsets);
            self.terms_host.clone_from(&point.terms);
            self.capture_host.clone_from(&point.capture);
            self.rows = rows;
            self.built = true;
        }
        // Probes are few; compared (and uploaded when changed) by the table itself.
        self.probes.sync(stream, &point.probes)?;
        self.max_direction = point.terms.iter().map(|t| t.direction).chain(point.probes.iter().copied().filter(|&p| p != NO_DIRECTION)).max();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_laid_out_as_the_kernel_reads_them() {
        let term = RowTerm { direction: 3, coefficient: 0.5, mode: TermMode::Clamp { target: 2.0 } };
        assert_eq!(term_words(&term), [3, 0.5f32.to_bits(), 2, 2.0f32.to_bits()]);
        let add = RowTerm { direction: 1, coefficient: -1.0, mode: TermMode::Add };
        assert_eq!(term_words(&add), [1, (-1.0f32).to_bits(), 0, 0]);
    }
}
