//! Choosing the weight kernels' machine-dependent prefetch plans by timing the candidates on
//! the loaded model, and keeping for each weight class the fastest where it clearly beats the
//! default.
//!
//! How far ahead the decode GEMV should ask for its weight rows (or whether it should at all)
//! differs between machines by more than any one plan loses elsewhere: 0.84x to 1.10x of the
//! decode step on the machines measured (see [`StreamPrefetch`]). A plan is only a hint, so the
//! choice changes speed, never a result. Timing the plans once at load on the model's own
//! matrices, in decode order and each product cold as in decode, costs a few passes over them
//! (ten passes; for SmolLM2-135M's F32 file, 406 MB each, some 50 ms at 80 GB/s).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::matmul::{self, CpuMatrix, WeightData};
use super::quant::{UNIT_PREFETCH_NEAR, UNIT_PREFETCH_NEAR_AND_FAR};
use super::simd::{SimdLevel, StreamPrefetch};

/// Weights whose decode streams have a plan each: f32 rows, 16-bit rows (bf16 and f16 stream
/// alike: same bytes, same kernel but for the widening), and block-quantized row groups (their
/// own kernels, prefetching whole block units).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamClass {
    F32,
    Half,
    Quantized,
}

const QUANTIZED_CANDIDATES: [StreamPrefetch; 2] = [UNIT_PREFETCH_NEAR, UNIT_PREFETCH_NEAR_AND_FAR];

impl StreamClass {
    pub const ALL: [StreamClass; 3] = [StreamClass::F32, StreamClass::Half, StreamClass::Quantized];

    pub fn of(matrix: &CpuMatrix) -> StreamClass {
        match matrix.data {
            WeightData::F32(_) => StreamClass::F32,
            WeightData::F16(_) | WeightData::BF16(_) => StreamClass::Half,
            WeightData::Quantized(_) => StreamClass::Quantized,
        }
    }

    /// The plans timed for this class, in the order they are reported.
    pub fn candidates(self) -> &'static [StreamPrefetch] {
        match self {
            StreamClass::F32 | StreamClass::Half => &StreamPrefetch::CANDIDATES,
            StreamClass::Quantized => &QUANTIZED_CANDIDATES,
        }
    }

    /// The plan before (or without) tuning.
    pub fn default_plan(self) -> StreamPrefetch {
        match self {
            StreamClass::F32 | StreamClass::Half => StreamPrefetch::DEFAULT,
            StreamClass::Quantized => UNIT_PREFETCH_NEAR_AND_FAR,
        }
    }

    /// Where [`StreamClass::default_plan`] sits among the candidates.
    fn default_index(self) -> usize {
        self.candidates().iter().position(|&p| p == self.default_plan()).expect("the default is a candidate")
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for StreamClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StreamClass::F32 => "f32",
            StreamClass::Half => "f16/bf16",
            StreamClass::Quantized => "block-quantized",
        })
    }
}

/// Matrices of a class below this many bytes are not timed: they may sit in a last-level cache
/// between passes, where no plan matters (tiny test models), and the default stays.
pub const MIN_TUNING_BYTES: usize = 64 << 20;
/// The matrices timed are the class's first in decode order up to this many bytes: enough to
/// outrun large last-level caches, few enough that tuning a large model takes well under a
/// second.
pub const MAX_TUNING_BYTES: usize = 384 << 20;
/// Timed passes per plan, in rotated order; the median counts.
const ROUNDS: usize = 3;
/// Another plan replaces the class's default only if its pass takes less than this share of the
/// default's. In a slow spell of a shared machine the plans time alike (all within 1%), and the
/// fastest of a tie was up to 1.15x slower in the decode that followed than the default.
const SWITCH_BELOW: f64 = 0.97;

/// What one class's timing measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    pub class: StreamClass,
    /// Bytes of the matrices timed.
    pub bytes: usize,
    /// Median seconds of a pass over them, per plan of the class's [`StreamClass::candidates`].
    pub seconds: Vec<f64>,
    pub chosen: StreamPrefetch,
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let best = self.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let times: Vec<String> = self.class.candidates().iter().zip(&self.seconds).map(|(plan, s)| format!("{plan} {:.2}", s / best)).collect();
        // The products alone, one row, as fast as they stream: next to the streaming-read
        // bandwidth this shows what a decode step loses outside them.
        let rate = self.bytes as f64 / best / 1e9;
        write!(f, "{} {} (pass time against the fastest: {}; {} MB timed, fastest {rate:.1} GB/s)", self.class, self.chosen, times.join(", "), self.bytes / 1_000_000)
    }
}

/// The plan of each class, read by every product and set by [`PrefetchPlans::tune`].
#[derive(Debug)]
pub struct PrefetchPlans {
    /// Index into the class's [`StreamClass::candidates`], per class.
    chosen: [AtomicU8; 3],
    tunings: Mutex<Vec<Tuning>>,
}

impl Default for PrefetchPlans {
    fn default() -> Self {
        PrefetchPlans { chosen: StreamClass::ALL.map(|class| AtomicU8::new(class.default_index() as u8)), tunings: Mutex::new(Vec::new()) }
    }
}

impl PrefetchPlans {
    /// The plan `matrix`'s rows stream with.
    pub fn for_matrix(&self, matrix: &CpuMatrix) -> StreamPrefetch {
        self.get(StreamClass::of(matrix))
    }

    pub fn get(&self, class: StreamClass) -> StreamPrefetch {
        class.candidates()[self.chosen[class.index()].load(Ordering::Relaxed) as usize]
    }

    /// What the timings measured, one entry per class timed, latest last.
    pub fn tunings(&self) -> Vec<Tuning> {
        self.tunings.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Times every plan on each class's matrices of `decode_order` (the matrices as a decode step
    /// reads them) and keeps the one [`choose`] picks; a class with fewer than `min_bytes` keeps
    /// its plan.
    /// Call inside the pool the products run on, its threads awake.
    pub fn tune(&self, level: SimdLevel, threads: usize, decode_order: &[&CpuMatrix], min_bytes: usize, max_bytes: usize) {
        for class in StreamClass::ALL {
            let mut timed = Vec::new();
            let mut bytes = 0;
            for &m in decode_order.iter().filter(|m| StreamClass::of(m) == class) {
                if bytes >= max_bytes {
                    break;
                }
                bytes += m.size_in_bytes();
                timed.push(m);
            }
            if bytes < min_bytes.max(1) {
                continue;
            }
            let seconds = time_plans(level, threads, &timed, class);
            let chosen = choose(class, &seconds);
            self.chosen[class.index()].store(chosen as u8, Ordering::Relaxed);
            let tuning = Tuning { class, bytes, seconds, chosen: class.candidates()[chosen] };
            if let Ok(mut tunings) = self.tunings.lock() {
                tunings.push(tuning);
            }
        }
    }
}

/// The index of the plan to keep among `class`'s candidates, given their pass times: the
/// fastest where it beats the default by [`SWITCH_BELOW`], else the default.
fn choose(class: StreamClass, seconds: &[f64]) -> usize {
    let default = class.default_index();
    let fastest = (0..seconds.len()).min_by(|&a, &b| seconds[a].total_cmp(&seconds[b])).expect("candidates");
    if seconds[fastest] < SWITCH_BELOW * seconds[default] {
        fastest
    } else {
        default
    }
}

/// Median seconds of a one-row product over every matrix of `matrices`, per candidate plan:
/// [`ROUNDS`] rounds after one untimed pass, the plans' order rotated each round so that a
/// drift in the machine's speed spreads over all of them.
fn time_plans(level: SimdLevel, threads: usize, matrices: &[&CpuMatrix], class: StreamClass) -> Vec<f64> {
    let cols = matrices.iter().map(|m| m.cols).max().unwrap_or(0);
    let rows = matrices.iter().map(|m| m.rows).max().unwrap_or(0);
    // Any finite input: the products are timed, not used.
    let x: Vec<f32> = (0..cols).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    let mut out = vec![0.0f32; rows];
    let mut scratch = Vec::new();
    let mut pass = |plan: StreamPrefetch| {
        let start = Instant::now();
        for m in matrices {
            matmul::matmul_with_scratch(level, plan, false, threads, &x[..m.cols], 1, m, &mut out[..m.rows], &mut scratch);
        }
        std::hint::black_box(&out);
        start.elapsed().as_secs_f64()
    };
    pass(class.default_plan());
    let plans = class.candidates();
    let mut samples = vec![Vec::with_capacity(ROUNDS); plans.len()];
    for round in 0..ROUNDS {
        for k in 0..plans.len() {
            let p = (round + k) % plans.len();
            samples[p].push(pass(plans[p]));
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[s.len() / 2]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::quant::GgmlType;
    use crate::tensor::{HostTensor, TensorData};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5).collect()
    }

    /// A `rows × cols` matrix of class `class` (Q4_1 for the quantized one).
    fn matrix(rows: usize, cols: usize, class: StreamClass, seed: u32) -> CpuMatrix {
        let v = values(rows * cols, seed);
        let tensor = match class {
            StreamClass::F32 => HostTensor { shape: vec![rows, cols], data: TensorData::F32(v) },
            StreamClass::Half => HostTensor { shape: vec![rows, cols], data: TensorData::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()) },
            StreamClass::Quantized => HostTensor::quantized(vec![rows, cols], GgmlType::Q4_1, crate::model::quant::quantize(GgmlType::Q4_1, &v).unwrap()).unwrap(),
        };
        CpuMatrix::on_heap(tensor).unwrap()
    }

    #[test]
    fn untimed_classes_keep_their_default_plan() {
        let plans = PrefetchPlans::default();
        let small: Vec<CpuMatrix> = StreamClass::ALL.iter().map(|&c| matrix(64, 96, c, 1)).collect();
        plans.tune(SimdLevel::detect(), 1, &small.iter().collect::<Vec<_>>(), MIN_TUNING_BYTES, MAX_TUNING_BYTES);
        assert!(plans.tunings().is_empty(), "matrices of a few KB are not timed");
        for (class, m) in StreamClass::ALL.into_iter().zip(&small) {
            assert_eq!(plans.get(class), class.default_plan());
            assert_eq!(plans.for_matrix(m), class.default_plan());
            assert!(class.candidates().contains(&class.default_plan()));
        }
    }

    #[test]
    fn each_class_with_enough_bytes_is_timed_on_its_own_matrices() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let plans = PrefetchPlans::default();
        let f32s: Vec<CpuMatrix> = (0..3).map(|s| matrix(256, 192, StreamClass::F32, s)).collect();
        let halves: Vec<CpuMatrix> = (0..2).map(|s| matrix(128, 192, StreamClass::Half, 10 + s)).collect();
        let quantized: Vec<CpuMatrix> = (0..2).map(|s| matrix(512, 192, StreamClass::Quantized, 20 + s)).collect();
        let order: Vec<&CpuMatrix> = f32s.iter().zip(&quantized).flat_map(|(f, q)| [f, q]).chain(&halves).chain([&f32s[2]]).collect();
        let (f32_bytes, half_bytes, quantized_bytes) = (256 * 192 * 4, 2 * 128 * 192 * 2, 2 * quantized[0].size_in_bytes());
        assert!(quantized_bytes > half_bytes && quantized_bytes < 2 * f32_bytes);
        // The 16-bit class is short of the minimum; the cap takes two of the three f32 matrices.
        pool.install(|| plans.tune(SimdLevel::detect(), 2, &order, half_bytes + 1, 3 * f32_bytes / 2));
        let tunings = plans.tunings();
        assert_eq!(tunings.iter().map(|t| (t.class, t.bytes)).collect::<Vec<_>>(), [(StreamClass::F32, 2 * f32_bytes), (StreamClass::Quantized, quantized_bytes)], "{tunings:?}");
        for t in &tunings {
            assert_eq!(t.seconds.len(), t.class.candidates().len());
            assert!(t.seconds.iter().all(|&s| s > 0.0 && s.is_finite()), "{t:?}");
            let chosen = t.class.candidates().iter().position(|&p| p == t.chosen).unwrap();
            assert_eq!(chosen, choose(t.class, &t.seconds));
            assert_eq!(plans.get(t.class), t.chosen);
        }
        assert_eq!(plans.get(StreamClass::Half), StreamClass::Half.default_plan());
    }

    #[test]
    fn the_default_stays_unless_another_plan_is_clearly_faster() {
        for class in StreamClass::ALL {
            let plans = class.candidates();
            let default = plans.iter().position(|&p| p == class.default_plan()).unwrap();
            let other = (default + 1) % plans.len();
            let mut seconds = vec![1.0; plans.len()];
            seconds[other] = 0.99;
            assert_eq!(choose(class, &seconds), default, "{class}: a 1% lead is a tie");
            seconds[other] = 0.9;
            assert_eq!(choose(class, &seconds), other, "{class}: a 10% lead switches");
            seconds[default] = 0.8;
            assert_eq!(choose(class, &seconds), default, "{class}: the default fastest");
        }
    }

    #[test]
    fn every_plan_gives_the_same_product_bits() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for class in StreamClass::ALL {
            // Rows not a multiple of the four streams (nor of a row group), columns not of the
            // vector width (whole blocks of 32 for the quantized class).
            let cols = if class == StreamClass::Quantized { 608 } else { 577 };
            let m = matrix(203, cols, class, 5);
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let product = |plan| {
                let mut out = vec![0.0f32; 203];
                pool.install(|| matmul::matmul_with_scratch(SimdLevel::detect(), plan, false, 2, &x, 1, &m, &mut out, &mut Vec::new()));
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let want = product(class.default_plan());
            for &plan in class.candidates() {
                assert_eq!(product(plan), want, "{class} {plan}");
            }
        }
    }
}
