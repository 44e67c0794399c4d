//! The CUDA backend: bf16/f16 weights and f32 activations on one device, the NVRTC-compiled
//! kernels of kernels/*.cu, cuBLAS for prefill products. Operations return `()` (the trait's
//! contract), so the first failure is recorded and returned by the next fallible call
//! (`upload`, `download`, `buffer`, ...): nothing panics and nothing continues silently.

pub mod compile;
pub mod device;
pub mod kernels;
mod tables;

use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use self::compile::KernelCache;
use self::device::{CudaUnavailable, DeviceInfo};
use self::kernels::Kernels;
use self::tables::{DeviceTable, PointTables};
use super::{AttentionLayout, Backend, FusedArgs, KvPrecision, RowTable};
use crate::error::{Error, Result};
use crate::tensor::{HostTensor, TensorData};

/// Activation rows one GEMV launch serves (`GEMV_MAX_ROWS` in kernels/gemv.cu).
const GEMV_MAX_ROWS: usize = 8;
/// Output features per GEMV block (`GEMV_WARPS` in kernels/gemv.cu).
const GEMV_WARPS: usize = 8;
/// Chunks of the row each residual-step thread keeps in registers (`MAX_CHUNKS` in residual.cu).
const RESIDUAL_MAX_CHUNKS: usize = 8;
/// Largest head the attention kernels hold (`DECODE_MAX_LANE_ELEMS` · 32).
const MAX_HEAD_DIM: usize = 256;
/// Keys per shared-memory block of the prefill kernel (`PREFILL_KEYS`).
const PREFILL_KEYS: usize = 16;
/// Threads of a prefill attention block; `PREFILL_MAX_ACC` outputs each.
const PREFILL_THREADS: usize = 128;
const PREFILL_MAX_ACC: usize = 16;
/// Shortest sequence chunk a decode attention block handles.
const DECODE_MIN_SPLIT: usize = 64;

/// Weight storage on the device: 16-bit patterns of one float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Bf16,
    F16,
}

/// A weight matrix `[rows = out_features, cols = in_features]` on the device.
pub struct CudaMatrix {
    pub rows: usize,
    pub cols: usize,
    pub format: WeightFormat,
    data: CudaSlice<u16>,
}

/// K and V of every layer, slot and position, `[layer][slot][position][kv_dim]` in f32 (the CPU
/// layout, so both backends agree exactly on what is cached).
pub struct CudaKvStore {
    pub layers: usize,
    pub slots: usize,
    pub max_positions: usize,
    pub kv_dim: usize,
    keys: CudaSlice<f32>,
    values: CudaSlice<f32>,
}

/// Which device a user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA device 0 when usable, else the CPU.
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| Error::InvalidInput(format!("unknown device '{other}' (expected auto, cpu, cuda or cuda:N)"))),
        }
    }
}

/// Launch-time state: the first error, host→device tables uploaded only when their contents
/// change, and scratch buffers grown on demand.
struct State {
    first_error: Option<String>,
    tokens: DeviceTable<u32>,
    row_slots: DeviceTable<u32>,
    row_positions: DeviceTable<u32>,
    gather: DeviceTable<u32>,
    tiles: DeviceTable<u32>,
    points: std::collections::HashMap<usize, PointTables>,
    /// Decode attention partials `[rows, heads, splits, head_dim + 2]`.
    partials: CudaSlice<f32>,
    /// Prefill activations narrowed to 16 bits for cuBLAS.
    narrowed: CudaSlice<u16>,
    /// Token ids chosen on the device, one per logits row.
    chosen: CudaSlice<u32>,
    uniforms: DeviceTable<f32>,
}

pub struct CudaBackend {
    info: DeviceInfo,
    // Field order is drop order: kernels, cuBLAS and buffers before the stream and context.
    kernels: Kernels,
    blas: Option<CudaBlas>,
    /// Why cuBLAS is not used, when it is not (prefill then runs on the GEMV kernels).
    blas_missing: Option<String>,
    state: Mutex<State>,
    /// Stands in for absent optional kernel arguments (the kernel never reads it).
    placeholder: CudaSlice<f32>,
    stream: Arc<CudaStream>,
    _ctx: Arc<CudaContext>,
}

fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Device(format!("{what}: {e}"))
}

fn ceil_div(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

fn round_up_warp(n: usize) -> u32 {
    (ceil_div(n.max(1), 32) * 32) as u32
}

fn grid_1d(total: usize, threads: usize) -> LaunchConfig {
    let blocks = ceil_div(total.max(1), threads).min(65_535 * 8);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

/// Launches `$func` with `$args` on the backend's stream; evaluates to `Result<(), DriverError>`.
macro_rules! launch {
    ($self:expr, $func:expr, $cfg:expr, $($arg:expr),* $(,)?) => {{
        let mut builder = $self.stream.launch_builder($func);
        $( builder.arg($arg); )*
        // SAFETY: the arguments follow the kernel's parameter list in kernels/*.cu one for one
        // (types and order), and the calling method has checked that every buffer covers the
        // elements the grid touches.
        unsafe { builder.launch($cfg) }.map(|_| ())
    }};
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`, compiles (or loads from `cache_dir`) every kernel for its
    /// architecture and creates the cuBLAS handle. `None` uses [`compile::default_cache_dir`].
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_cache(ordinal, compile::default_cache_dir())
    }

    pub fn with_cache(ordinal: usize, cache_dir: Option<std::path::PathBuf>) -> Result<Self> {
        let (ctx, info) = device::open(ordinal).map_err(|reason| Error::Device(reason.to_string()))?;
        // SAFETY: the backend uses a single stream, so cudarc's cross-stream event tracking has
        // nothing to order; turning it off removes two event records per launch.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let cache = KernelCache::new(cache_dir);
        let kernels = Kernels::load(&ctx, &cache, &info.arch())?;
        // SAFETY: only tries to dlopen libcublas.
        let (blas, blas_missing) = if unsafe { cudarc::cublas::sys::is_culib_present() } {
            match CudaBlas::new(stream.clone()) {
                Ok(blas) => (Some(blas), None),
                Err(e) => (None, Some(format!("cuBLAS handle: {e}"))),
            }
        } else {
            (None, Some("libcublas cannot be loaded".to_string()))
        };
        let alloc_u32 = || stream.alloc_zeros::<u32>(1).map_err(|e| device_error("allocating a table", e));
        let state = State {
            first_error: None,
            tokens: DeviceTable::new(alloc_u32()?),
            row_slots: DeviceTable::new(alloc_u32()?),
            row_positions: DeviceTable::new(alloc_u32()?),
            gather: DeviceTable::new(alloc_u32()?),
            tiles: DeviceTable::new(alloc_u32()?),
            points: Default::default(),
            partials: stream.alloc_zeros::<f32>(1).map_err(|e| device_error("allocating scratch", e))?,
            narrowed: stream.alloc_zeros::<u16>(1).map_err(|e| device_error("allocating scratch", e))?,
            chosen: alloc_u32()?,
            uniforms: DeviceTable::new(stream.alloc_zeros::<f32>(1).map_err(|e| device_error("allocating a table", e))?),
        };
        let placeholder = stream.alloc_zeros::<f32>(1).map_err(|e| device_error("allocating scratch", e))?;
        Ok(CudaBackend { info, kernels, blas, blas_missing, state: Mutex::new(state), placeholder, stream, _ctx: ctx })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Device memory bandwidth in bytes/s, the roofline decode is measured against: the median of
    /// five device-to-device copies of 1 GiB (each byte read once and written once).
    pub fn copy_bandwidth(&self) -> Result<f64> {
        self.check()?;
        let len = 1usize << 28;
        let source = self.stream.alloc_zeros::<f32>(len).map_err(|e| device_error("allocating the bandwidth buffer", e))?;
        let mut destination = self.stream.alloc_zeros::<f32>(len).map_err(|e| device_error("allocating the bandwidth buffer", e))?;
        let mut rates = Vec::new();
        for pass in 0..6 {
            self.stream.synchronize().map_err(|e| device_error("synchronizing", e))?;
            let start = std::time::Instant::now();
            self.stream.memcpy_dtod(&source, &mut destination).map_err(|e| device_error("device copy", e))?;
            self.stream.synchronize().map_err(|e| device_error("synchronizing", e))?;
            // The first pass warms the copy engine and is not counted.
            if pass > 0 {
                rates.push((2 * len * 4) as f64 / start.elapsed().as_secs_f64());
            }
        }
        rates.sort_by(f64::total_cmp);
        Ok(rates[rates.len() / 2])
    }

    /// The greedy token of each of `rows` logits rows, chosen on the device so that only the ids
    /// come back (lowest index on ties, as [`crate::generate::argmax`]).
    pub fn argmax_rows(&self, logits: &CudaSlice<f32>, rows: usize, vocab: usize) -> Result<Vec<u32>> {
        self.choose_rows(logits, rows, vocab, None)
    }

    /// One token per row sampled from `softmax(logits / temperature)` by inverse CDF, using
    /// `uniforms[r]` in [0, 1) (drawn by the caller's seeded generator, so runs reproduce).
    pub fn sample_rows(&self, logits: &CudaSlice<f32>, rows: usize, vocab: usize, temperature: f32, uniforms: &[f32]) -> Result<Vec<u32>> {
        if !(temperature.is_finite() && temperature > 0.0) || uniforms.len() != rows {
            return Err(Error::InvalidInput(format!("sampling needs a positive temperature and one uniform per row (got {temperature}, {} for {rows} rows)", uniforms.len())));
        }
        self.choose_rows(logits, rows, vocab, Some((temperature, uniforms)))
    }

    fn choose_rows(&self, logits: &CudaSlice<f32>, rows: usize, vocab: usize, sampling: Option<(f32, &[f32])>) -> Result<Vec<u32>> {
        self.check()?;
        Self::ensure_len("logits", logits.len(), rows * vocab)?;
        if rows == 0 || vocab == 0 {
            return Ok(vec![0; rows]);
        }
        let mut guard = self.lock();
        let state = &mut *guard;
        if state.chosen.len() < rows {
            state.chosen = self.stream.alloc_zeros::<u32>(rows).map_err(|e| device_error("allocating token ids", e))?;
        }
        // Power-of-two blocks: the kernels reduce and scan with halving strides.
        let threads = vocab.next_power_of_two().clamp(32, 1024) as u32;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        let vocab_u = vocab as u32;
        match sampling {
            None => Self::launched("argmax_rows", launch!(self, &self.kernels.argmax_rows, cfg, logits, &vocab_u, &mut state.chosen))?,
            Some((temperature, uniforms)) => {
                state.uniforms.sync(&self.stream, uniforms)?;
                let inverse = 1.0 / temperature;
                Self::launched("sample_rows", launch!(self, &self.kernels.sample_rows, cfg, logits, &vocab_u, &inverse, state.uniforms.device(), &mut state.chosen))?
            }
        }
        let mut ids = vec![0u32; rows];
        let view = state.chosen.slice(0..rows);
        self.stream.memcpy_dtoh(&view, &mut ids).map_err(|e| device_error("downloading token ids", e))?;
        self.stream.synchronize().map_err(|e| device_error("a kernel failed", e))?;
        Ok(ids)
    }

    /// Why prefill products do not use cuBLAS on this machine, if they do not.
    pub fn cublas_missing(&self) -> Option<&str> {
        self.blas_missing.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The recorded failure, if an earlier operation failed.
    fn check(&self) -> Result<()> {
        match &self.lock().first_error {
            Some(message) => Err(Error::Device(format!("an earlier CUDA operation failed: {message}"))),
            None => Ok(()),
        }
    }

    /// Runs one operation; an error is kept (the first one only) for the next fallible call.
    fn op(&self, name: &str, body: impl FnOnce(&mut State) -> Result<()>) {
        let mut state = self.lock();
        if state.first_error.is_some() {
            return;
        }
        if let Err(e) = body(&mut state) {
            state.first_error = Some(format!("{name}: {e}"));
        }
    }

    fn launched(what: &str, result: std::result::Result<(), cudarc::driver::DriverError>) -> Result<()> {
        result.map_err(|e| device_error(&format!("launching {what}"), e))
    }

    fn ensure_len(what: &str, have: usize, need: usize) -> Result<()> {
        if have < need {
            return Err(Error::Shape(format!("{what} holds {have} values, the operation needs {need}")));
        }
        Ok(())
    }

    /// `y[rows, out] = x[rows, in] · wᵀ` with the GEMV kernels, up to GEMV_MAX_ROWS rows a launch.
    fn gemv(&self, x: &CudaSlice<f32>, rows: usize, w: &CudaMatrix, out: &mut CudaSlice<f32>) -> Result<()> {
        let vec8 = w.cols.is_multiple_of(8);
        let func = match (w.format, vec8) {
            (WeightFormat::Bf16, true) => &self.kernels.gemv_bf16_vec8,
            (WeightFormat::Bf16, false) => &self.kernels.gemv_bf16_scalar,
            (WeightFormat::F16, true) => &self.kernels.gemv_f16_vec8,
            (WeightFormat::F16, false) => &self.kernels.gemv_f16_scalar,
        };
        let cfg = LaunchConfig { grid_dim: (ceil_div(w.rows, GEMV_WARPS) as u32, 1, 1), block_dim: (32 * GEMV_WARPS as u32, 1, 1), shared_mem_bytes: 0 };
        let (cols, out_features) = (w.cols as u32, w.rows as u32);
        for first in (0..rows).step_by(GEMV_MAX_ROWS) {
            let count = (rows - first).min(GEMV_MAX_ROWS);
            let x_view = x.slice(first * w.cols..(first + count) * w.cols);
            let mut y_view = out.slice_mut(first * w.rows..(first + count) * w.rows);
            let count = count as u32;
            Self::launched("gemv", launch!(self, func, cfg, &w.data, &x_view, &mut y_view, &cols, &out_features, &count))?;
        }
        Ok(())
    }

    /// Prefill product on cuBLAS: x narrowed to the weight format, bf16/f16 × bf16/f16 with f32
    /// accumulation and f32 output.
    fn gemm_cublas(&self, blas: &CudaBlas, state: &mut State, x: &CudaSlice<f32>, rows: usize, w: &CudaMatrix, out: &mut CudaSlice<f32>) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        let total = rows * w.cols;
        if state.narrowed.len() < total {
            state.narrowed = self.stream.alloc_zeros::<u16>(total).map_err(|e| device_error("allocating prefill scratch", e))?;
        }
        let (narrow, data_type) = match w.format {
            WeightFormat::Bf16 => (&self.kernels.f32_to_bf16_bits, cudaDataType::CUDA_R_16BF),
            WeightFormat::F16 => (&self.kernels.f32_to_f16_bits, cudaDataType::CUDA_R_16F),
        };
        let total_u32 = total as u32;
        Self::launched("narrowing activations", launch!(self, narrow, grid_1d(total, 256), x, &mut state.narrowed, &total_u32))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (m, n, k) = (w.rows as i32, rows as i32, w.cols as i32);
        let (a, _a_sync) = w.data.device_ptr(&self.stream);
        let (b, _b_sync) = state.narrowed.device_ptr(&self.stream);
        let (c, _c_sync) = out.device_ptr_mut(&self.stream);
        // Row-major y[rows, out] is column-major [out, rows] = Wᵀ(col-major [in, out])ᵀ · x(col-major [in, rows]).
        // SAFETY: A holds out·in weights, B at least rows·in values (grown above), C at least
        // rows·out floats (checked by the caller); all live on this handle's stream.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                &alpha as *const f32 as *const _,
                a as *const _,
                data_type,
                k,
                b as *const _,
                data_type,
                k,
                &beta as *const f32 as *const _,
                c as *mut _,
                cudaDataType::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| device_error("cuBLAS gemm", e))
    }
}

/// Splits the rows into runs of consecutive positions of one slot, then each run into tiles of at
/// most `tile_rows` rows: `[first_row, rows, slot, first_position]` per tile.
fn prefill_tiles(table: RowTable<'_>, rows: usize, tile_rows: usize) -> Vec<u32> {
    let mut tiles = Vec::new();
    let mut begin = 0;
    while begin < rows {
        let mut end = begin + 1;
        while end < rows && end - begin < tile_rows && table.slots[end] == table.slots[begin] && table.positions[end] == table.positions[end - 1] + 1 {
            end += 1;
        }
        tiles.extend_from_slice(&[begin as u32, (end - begin) as u32, table.slots[begin], table.positions[begin]]);
        begin = end;
    }
    tiles
}

/// True when no two rows continue one sequence: every row is a decode step.
fn all_single_rows(table: RowTable<'_>, rows: usize) -> bool {
    (1..rows).all(|r| !(table.slots[r] == table.slots[r - 1] && table.positions[r] == table.positions[r - 1] + 1))
}

impl Backend for CudaBackend {
    type Buffer = CudaSlice<f32>;
    type Matrix = CudaMatrix;
    type KvStore = CudaKvStore;

    fn name(&self) -> String {
        format!("{}{}", self.info, if self.blas.is_some() { "" } else { " (no cuBLAS)" })
    }

    fn run<R: Send>(&self, work: impl FnOnce() -> R + Send) -> R {
        work()
    }

    fn matrix(&self, tensor: &HostTensor) -> Result<CudaMatrix> {
        self.check()?;
        let [rows, cols] = tensor.shape[..] else {
            return Err(Error::Shape(format!("a weight matrix must be 2-D, got shape {:?}", tensor.shape)));
        };
        // f32 weights are narrowed to bf16 (round to nearest even): the device computes in 16 bits.
        let (format, bits): (WeightFormat, Vec<u16>) = match &tensor.data {
            TensorData::F32(v) => (WeightFormat::Bf16, v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect()),
            TensorData::BF16(v) => (WeightFormat::Bf16, bytemuck::cast_slice(v).to_vec()),
            TensorData::F16(v) => (WeightFormat::F16, bytemuck::cast_slice(v).to_vec()),
            // No quantized kernels on the GPU yet: blocks are decoded exactly and rounded to bf16.
            TensorData::Quantized { .. } => {
                (WeightFormat::Bf16, tensor.to_f32_vec().iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect())
            }
        };
        let data = self.stream.clone_htod(&bits).map_err(|e| device_error("uploading weights", e))?;
        Ok(CudaMatrix { rows, cols, format, data })
    }

    fn matrix_shape(&self, matrix: &CudaMatrix) -> (usize, usize) {
        (matrix.rows, matrix.cols)
    }

    fn buffer(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.check()?;
        // cuMemAlloc rejects 0 bytes; an empty buffer is never read, so one element stands in.
        self.stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| device_error(&format!("allocating {len} floats"), e))
    }

    fn upload(&self, data: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        self.check()?;
        if dst.len() < data.len() {
            return Err(Error::Shape(format!("upload of {} values into a buffer of {}", data.len(), dst.len())));
        }
        if data.is_empty() {
            return Ok(());
        }
        let mut view = dst.slice_mut(0..data.len());
        self.stream.memcpy_htod(data, &mut view).map_err(|e| device_error("upload", e))
    }

    fn download(&self, src: &CudaSlice<f32>, out: &mut [f32]) -> Result<()> {
        self.check()?;
        if src.len() < out.len() {
            return Err(Error::Shape(format!("download of {} values from a buffer of {}", out.len(), src.len())));
        }
        if !out.is_empty() {
            let view = src.slice(0..out.len());
            self.stream.memcpy_dtoh(&view, out).map_err(|e| device_error("download", e))?;
        }
        // Kernel faults surface at the synchronisation after the launches that caused them.
        self.stream.synchronize().map_err(|e| device_error("a kernel failed", e))?;
        self.check()
    }

    fn kv_store(&self, layers: usize, slots: usize, max_positions: usize, layout: AttentionLayout, precision: KvPrecision) -> Result<CudaKvStore> {
        self.check()?;
        if precision != KvPrecision::F32 {
            return Err(Error::Unsupported(format!("a {precision} KV cache on CUDA (its attention kernel reads f32 entries; use an f32 cache)")));
        }
        let kv_dim = layout.kv_dim();
        let len = layers * slots * max_positions * kv_dim;
        let alloc = || self.stream.alloc_zeros::<f32>(len.max(1)).map_err(|e| device_error(&format!("allocating a KV cache of {len} floats"), e));
        Ok(CudaKvStore { layers, slots, max_positions, kv_dim, keys: alloc()?, values: alloc()? })
    }

    fn default_kv_precision(&self) -> KvPrecision {
        KvPrecision::F32
    }

    fn embed(&self, table: &CudaMatrix, tokens: &[u32], out: &mut CudaSlice<f32>) {
        self.op("embed", |state| {
            let dim = table.cols;
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
                return Err(Error::InvalidInput(format!("token {t} outside the embedding table of {}", table.rows)));
            }
            Self::ensure_len("embedding output", out.len(), tokens.len() * dim)?;
            if tokens.is_empty() {
                return Ok(());
            }
            state.tokens.sync(&self.stream, tokens)?;
            let vec8 = dim.is_multiple_of(8);
            let func = match (table.format, vec8) {
                (WeightFormat::Bf16, true) => &self.kernels.embed_bf16_vec8,
                (WeightFormat::Bf16, false) => &self.kernels.embed_bf16_scalar,
                (WeightFormat::F16, true) => &self.kernels.embed_f16_vec8,
                (WeightFormat::F16, false) => &self.kernels.embed_f16_scalar,
            };
            let per_thread = if vec8 { 8 } else { 1 };
            let cfg = LaunchConfig { grid_dim: (tokens.len() as u32, 1, 1), block_dim: (round_up_warp(ceil_div(dim, per_thread)).min(256), 1, 1), shared_mem_bytes: 0 };
            let dim = dim as u32;
            Self::launched("embed", launch!(self, func, cfg, &table.data, state.tokens.device(), out, &dim))
        });
    }

    fn rms_norm(&self, x: &CudaSlice<f32>, weight: &CudaSlice<f32>, eps: f32, rows: usize, dim: usize, out: &mut CudaSlice<f32>) {
        self.op("rms_norm", |_| {
            Self::ensure_len("rms_norm input", x.len(), rows * dim)?;
            Self::ensure_len("rms_norm output", out.len(), rows * dim)?;
            Self::ensure_len("rms_norm weight", weight.len(), dim)?;
            if rows == 0 {
                return Ok(());
            }
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (round_up_warp(dim).min(256), 1, 1), shared_mem_bytes: 0 };
            let dim = dim as u32;
            Self::launched("rms_norm", launch!(self, &self.kernels.rms_norm, cfg, x, weight, out, &dim, &eps))
        });
    }

    fn matmul(&self, x: &CudaSlice<f32>, rows: usize, w: &CudaMatrix, out: &mut CudaSlice<f32>) {
        self.op("matmul", |state| {
            Self::ensure_len("matmul input", x.len(), rows * w.cols)?;
            Self::ensure_len("matmul output", out.len(), rows * w.rows)?;
            if rows == 0 {
                return Ok(());
            }
            match &self.blas {
                Some(blas) if rows > GEMV_MAX_ROWS => self.gemm_cublas(blas, state, x, rows, w, out),
                _ => self.gemv(x, rows, w, out),
            }
        });
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>, rows: usize, dim: usize) {
        self.op("add_bias", |_| {
            Self::ensure_len("add_bias rows", x.len(), rows * dim)?;
            Self::ensure_len("bias", bias.len(), dim)?;
            let total = rows * dim;
            if total == 0 {
                return Ok(());
            }
            let (dim, total_u32) = (dim as u32, total as u32);
            Self::launched("add_bias", launch!(self, &self.kernels.add_bias, grid_1d(total, 256), x, bias, &dim, &total_u32))
        });
    }

    fn head_rms_norm(&self, qkv: &mut CudaSlice<f32>, rows: usize, layout: AttentionLayout, q_weight: &CudaSlice<f32>, k_weight: &CudaSlice<f32>, eps: f32) {
        self.op("head_rms_norm", |_| {
            Self::ensure_len("q|k|v rows", qkv.len(), rows * layout.qkv_dim())?;
            Self::ensure_len("q norm weight", q_weight.len(), layout.head_dim)?;
            Self::ensure_len("k norm weight", k_weight.len(), layout.head_dim)?;
            if rows == 0 {
                return Ok(());
            }
            let cfg = LaunchConfig { grid_dim: (rows as u32, (layout.heads + layout.kv_heads) as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
            let (width, heads, head_dim) = (layout.qkv_dim() as u32, layout.heads as u32, layout.head_dim as u32);
            Self::launched("head_rms_norm", launch!(self, &self.kernels.head_rms_norm, cfg, qkv, q_weight, k_weight, &width, &heads, &head_dim, &eps))
        });
    }

    fn rope(&self, qkv: &mut CudaSlice<f32>, rows: usize, layout: AttentionLayout, positions: &[u32], cos: &CudaSlice<f32>, sin: &CudaSlice<f32>) {
        self.op("rope", |state| {
            let half = layout.head_dim / 2;
            Self::ensure_len("q|k|v rows", qkv.len(), rows * layout.qkv_dim())?;
            Self::ensure_len("row positions", positions.len(), rows)?;
            let table_positions = cos.len().min(sin.len()) / half.max(1);
            if let Some(&p) = positions[..rows].iter().find(|&&p| p as usize >= table_positions) {
                return Err(Error::InvalidInput(format!("position {p} beyond the RoPE table of {table_positions}")));
            }
            if rows == 0 {
                return Ok(());
            }
            state.row_positions.sync(&self.stream, &positions[..rows])?;
            let rotated = layout.heads + layout.kv_heads;
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (round_up_warp(rotated * half).min(256), 1, 1), shared_mem_bytes: 0 };
            let (width, rotated, head_dim) = (layout.qkv_dim() as u32, rotated as u32, layout.head_dim as u32);
            Self::launched("rope", launch!(self, &self.kernels.rope, cfg, qkv, state.row_positions.device(), cos, sin, &width, &rotated, &head_dim))
        });
    }

    fn attention(&self, qkv: &CudaSlice<f32>, rows: usize, layout: AttentionLayout, kv: &mut CudaKvStore, layer: usize, table: RowTable<'_>, out: &mut CudaSlice<f32>) {
        self.op("attention", |state| {
            let (q_dim, kv_dim, hd) = (layout.q_dim(), layout.kv_dim(), layout.head_dim);
            if kv.kv_dim != kv_dim || layer >= kv.layers {
                return Err(Error::Shape(format!("layer {layer} / kv width {kv_dim} outside a KV cache of {} layers × {}", kv.layers, kv.kv_dim)));
            }
            if hd > MAX_HEAD_DIM || hd == 0 || layout.kv_heads == 0 || !layout.heads.is_multiple_of(layout.kv_heads) {
                return Err(Error::Unsupported(format!("attention with head_dim {hd}, {} heads over {} kv heads", layout.heads, layout.kv_heads)));
            }
            Self::ensure_len("q|k|v rows", qkv.len(), rows * layout.qkv_dim())?;
            Self::ensure_len("attention output", out.len(), rows * q_dim)?;
            Self::ensure_len("row slots", table.slots.len(), rows)?;
            Self::ensure_len("row positions", table.positions.len(), rows)?;
            for r in 0..rows {
                if table.slots[r] as usize >= kv.slots || table.positions[r] as usize >= kv.max_positions {
                    return Err(Error::InvalidInput(format!("row {r} at slot {} position {} is outside the KV cache", table.slots[r], table.positions[r])));
                }
            }
            if rows == 0 {
                return Ok(());
            }
            state.row_slots.sync(&self.stream, &table.slots[..rows])?;
            state.row_positions.sync(&self.stream, &table.positions[..rows])?;
            let (width, q_dim_u, kv_dim_u, layer_u) = (layout.qkv_dim() as u32, q_dim as u32, kv_dim as u32, layer as u32);
            let (slots_u, max_pos_u) = (kv.slots as u32, kv.max_positions as u32);
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (round_up_warp(kv_dim).min(256), 1, 1), shared_mem_bytes: 0 };
            Self::launched(
                "kv_write",
                launch!(self, &self.kernels.kv_write, cfg, qkv, &mut kv.keys, &mut kv.values, state.row_slots.device(), state.row_positions.device(), &width, &q_dim_u, &kv_dim_u, &layer_u, &slots_u, &max_pos_u),
            )?;
            let (heads_u, kv_heads_u, hd_u) = (layout.heads as u32, layout.kv_heads as u32, hd as u32);
            let scale = 1.0 / (hd as f32).sqrt();
            if all_single_rows(table, rows) {
                // Enough (row, kv head, split) blocks to fill the SMs twice, splits no shorter than DECODE_MIN_SPLIT.
                let context = table.positions[..rows].iter().map(|&p| p as usize + 1).max().unwrap_or(1);
                let wanted = ceil_div(2 * self.info.multiprocessors as usize, rows * layout.kv_heads).max(1);
                let splits = wanted.min(ceil_div(context, DECODE_MIN_SPLIT)).max(1);
                let split_len = ceil_div(context, splits);
                let needed = rows * layout.heads * splits * (hd + 2);
                if state.partials.len() < needed {
                    state.partials = self.stream.alloc_zeros::<f32>(needed).map_err(|e| device_error("allocating attention partials", e))?;
                }
                let group = layout.heads / layout.kv_heads;
                let cfg = LaunchConfig { grid_dim: (rows as u32, layout.kv_heads as u32, splits as u32), block_dim: (32 * group.min(8) as u32, 1, 1), shared_mem_bytes: 0 };
                let split_len_u = split_len as u32;
                Self::launched(
                    "attention_decode_partial",
                    launch!(self, &self.kernels.attention_decode_partial, cfg, qkv, &kv.keys, &kv.values, state.row_slots.device(), state.row_positions.device(),
                        &mut state.partials, &width, &heads_u, &kv_heads_u, &hd_u, &layer_u, &slots_u, &max_pos_u, &split_len_u, &scale),
                )?;
                let splits_u = splits as u32;
                let cfg = LaunchConfig { grid_dim: (rows as u32, layout.heads as u32, 1), block_dim: (round_up_warp(hd), 1, 1), shared_mem_bytes: 0 };
                Self::launched("attention_decode_combine", launch!(self, &self.kernels.attention_decode_combine, cfg, &state.partials, out, &heads_u, &hd_u, &splits_u))
            } else {
                let tile_rows = (PREFILL_THREADS * PREFILL_MAX_ACC / hd).min(16);
                let tiles = prefill_tiles(table, rows, tile_rows);
                state.tiles.sync(&self.stream, &tiles)?;
                // As kernels/attention.cu lays it out: queries, padded keys, values, scores, row stats.
                let shared = (tile_rows * hd + PREFILL_KEYS * (2 * hd + 1) + tile_rows * (PREFILL_KEYS + 3)) * 4;
                let cfg = LaunchConfig { grid_dim: ((tiles.len() / 4) as u32, layout.heads as u32, 1), block_dim: (PREFILL_THREADS as u32, 1, 1), shared_mem_bytes: shared as u32 };
                let tile_rows_u = tile_rows as u32;
                Self::launched(
                    "attention_prefill",
                    launch!(self, &self.kernels.attention_prefill, cfg, qkv, &kv.keys, &kv.values, state.tiles.device(), out,
                        &width, &heads_u, &kv_heads_u, &hd_u, &tile_rows_u, &layer_u, &slots_u, &max_pos_u, &scale),
                )
            }
        });
    }

    fn silu_mul(&self, gate_up: &CudaSlice<f32>, rows: usize, ffn: usize, out: &mut CudaSlice<f32>) {
        self.op("silu_mul", |_| {
            Self::ensure_len("gate|up rows", gate_up.len(), rows * 2 * ffn)?;
            Self::ensure_len("silu_mul output", out.len(), rows * ffn)?;
            let total = rows * ffn;
            if total == 0 {
                return Ok(());
            }
            let (ffn, total_u32) = (ffn as u32, total as u32);
            Self::launched("silu_mul", launch!(self, &self.kernels.silu_mul, grid_1d(total, 256), gate_up, out, &ffn, &total_u32))
        });
    }

    fn residual_step(&self, h: &mut CudaSlice<f32>, delta: &CudaSlice<f32>, rows: usize, dim: usize, norm_weight: &CudaSlice<f32>, eps: f32, x_out: &mut CudaSlice<f32>, fused: FusedArgs<'_, Self>) {
        self.op("residual_step", |state| {
            Self::ensure_len("residual h", h.len(), rows * dim)?;
            Self::ensure_len("residual delta", delta.len(), rows * dim)?;
            Self::ensure_len("residual output", x_out.len(), rows * dim)?;
            Self::ensure_len("norm weight", norm_weight.len(), dim)?;
            if rows == 0 {
                return Ok(());
            }
            let vec = if dim.is_multiple_of(4) { 4 } else { 1 };
            let mut threads = (round_up_warp(ceil_div(dim, vec)) as usize).min(256);
            while threads * vec * RESIDUAL_MAX_CHUNKS < dim && threads < 1024 {
                threads *= 2;
            }
            if threads * vec * RESIDUAL_MAX_CHUNKS < dim {
                return Err(Error::Unsupported(format!("hidden size {dim} is larger than the residual kernel holds")));
            }
            let point = fused.point;
            let key = point as *const _ as usize;
            if state.points.len() > 4096 && !state.points.contains_key(&key) {
                state.points.clear();
            }
            let tables = match state.points.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(PointTables::new(&self.stream)?),
            };
            tables.sync(&self.stream, point, rows)?;
            if tables.max_direction.is_some_and(|d| (d as usize + 1) * dim > fused.directions.len()) {
                return Err(Error::Shape("a steering or probe direction lies outside the direction pool".into()));
            }
            let probes = point.probes.len();
            let readout_offset = point.readout_offset.unwrap_or(0);
            if point.readout_offset.is_some() {
                Self::ensure_len("readout buffer", fused.readout.len(), readout_offset + rows * (1 + probes))?;
            }
            if let Some(last) = tables.capture_rows_used {
                Self::ensure_len("capture buffer", fused.capture.len(), (last as usize + 1) * dim)?;
            }
            let func = if vec == 4 { &self.kernels.residual_step_vec4 } else { &self.kernels.residual_step_scalar };
            let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
            let has_terms = u32::from(point.has_steering());
            let has_readout = u32::from(point.readout_offset.is_some());
            let has_capture = u32::from(!point.capture.is_empty());
            let (dim_u, probes_u) = (dim as u32, probes as u32);
            let mut readout_view = fused.readout.slice_mut(readout_offset.min(fused.readout.len() - 1)..);
            let directions = if fused.directions.is_empty() { &self.placeholder } else { fused.directions };
            Self::launched(
                "residual_step",
                launch!(self, func, cfg, h, delta, norm_weight, x_out, &dim_u, &eps,
                    &has_terms, tables.row_offsets.device(), tables.terms.device(), directions,
                    &has_readout, &mut readout_view, tables.probes.device(), &probes_u,
                    &has_capture, tables.capture_rows.device(), fused.capture),
            )
        });
    }

    fn gather_rows(&self, src: &CudaSlice<f32>, rows: &[u32], dim: usize, dst: &mut CudaSlice<f32>) {
        self.op("gather_rows", |state| {
            let available = src.len() / dim.max(1);
            if let Some(&r) = rows.iter().find(|&&r| r as usize >= available) {
                return Err(Error::InvalidInput(format!("row {r} outside a buffer of {available} rows")));
            }
            Self::ensure_len("gather output", dst.len(), rows.len() * dim)?;
            if rows.is_empty() {
                return Ok(());
            }
            state.gather.sync(&self.stream, rows)?;
            let cfg = LaunchConfig { grid_dim: (rows.len() as u32, 1, 1), block_dim: (round_up_warp(dim).min(256), 1, 1), shared_mem_bytes: 0 };
            let dim = dim as u32;
            Self::launched("gather_rows", launch!(self, &self.kernels.gather_rows, cfg, src, state.gather.device(), dst, &dim))
        });
    }

    fn copy_kv_prefix(&self, kv: &mut CudaKvStore, from_slot: usize, to_slot: usize, positions: usize) {
        self.op("copy_kv_prefix", |_| {
            if from_slot >= kv.slots || to_slot >= kv.slots || positions > kv.max_positions {
                return Err(Error::InvalidInput(format!(
                    "copying {positions} positions from slot {from_slot} to slot {to_slot} of a KV cache of {} slots × {} positions",
                    kv.slots, kv.max_positions
                )));
            }
            if from_slot == to_slot || positions == 0 {
                return Ok(());
            }
            let total = positions * kv.kv_dim;
            let blocks = ceil_div(total, 256).min(1024) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, kv.layers as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let (from, to, count, slots, max_pos, kv_dim) = (from_slot as u32, to_slot as u32, positions as u32, kv.slots as u32, kv.max_positions as u32, kv.kv_dim as u32);
            Self::launched("kv_copy_prefix", launch!(self, &self.kernels.kv_copy_prefix, cfg, &mut kv.keys, &mut kv.values, &from, &to, &count, &slots, &max_pos, &kv_dim))
        });
    }
}

/// Opens the CUDA backend for `choice`, or says why not. `Auto` and `Cpu` are the caller's to
/// resolve; this handles `Cuda(n)` (and `Auto` as device 0).
pub fn open(choice: DeviceChoice) -> std::result::Result<CudaBackend, String> {
    let ordinal = match choice {
        DeviceChoice::Cuda(n) => n,
        DeviceChoice::Auto => 0,
        DeviceChoice::Cpu => return Err("the CPU was asked for".into()),
    };
    CudaBackend::new(ordinal).map_err(|e| e.to_string())
}

/// Whether a CUDA device is present and usable, without compiling kernels.
pub fn usable(ordinal: usize) -> std::result::Result<DeviceInfo, CudaUnavailable> {
    device::probe(ordinal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(3));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("gpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn prefill_tiles_follow_runs() {
        let slots = [0, 0, 0, 1, 1, 2];
        let positions = [0, 1, 2, 5, 6, 9];
        let tiles = prefill_tiles(RowTable { slots: &slots, positions: &positions }, 6, 2);
        assert_eq!(tiles, vec![0, 2, 0, 0, 2, 1, 0, 2, 3, 2, 1, 5, 5, 1, 2, 9]);
        assert!(!all_single_rows(RowTable { slots: &slots, positions: &positions }, 6));
        let decode_slots = [0, 1, 1];
        let decode_positions = [4, 7, 3];
        assert!(all_single_rows(RowTable { slots: &decode_slots, positions: &decode_positions }, 3));
    }

    #[test]
    fn opening_without_a_device_is_an_error_not_a_panic() {
        if let Err(reason) = open(DeviceChoice::Cuda(usize::MAX)) {
            assert!(!reason.is_empty());
        }
    }
}
