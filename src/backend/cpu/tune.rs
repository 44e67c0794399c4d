//! Choosing the weight kernels' machine-dependent prefetch plan by timing the candidates on the
//! loaded model, and keeping the fastest for each float weight type.
//!
//! How far ahead the decode GEMV should ask for its weight rows (or whether it should at all)
//! differs between machines by more than any one plan loses elsewhere: 0.84x to 1.10x of the
//! decode step on the machines measured (see [`StreamPrefetch`]). A plan is only a hint, so the
//! choice changes speed, never a result. Timing the plans once at load on the model's own
//! matrices, in decode order and each product cold as in decode, costs a few passes over them.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use super::matmul::{self, CpuMatrix, WeightData};
use super::simd::{SimdLevel, StreamPrefetch};

/// Weight types whose rows stream through the float GEMV, one plan each (bf16 and f16 rows
/// stream alike: same bytes, same kernel but for the widening).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamClass {
    F32,
    Half,
}

impl StreamClass {
    pub const ALL: [StreamClass; 2] = [StreamClass::F32, StreamClass::Half];

    /// The class of `matrix`, `None` for block-quantized weights (their own kernels).
    pub fn of(matrix: &CpuMatrix) -> Option<StreamClass> {
        match matrix.data {
            WeightData::F32(_) => Some(StreamClass::F32),
            WeightData::F16(_) | WeightData::BF16(_) => Some(StreamClass::Half),
            WeightData::Quantized(_) => None,
        }
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

/// What one class's timing measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    pub class: StreamClass,
    /// Bytes of the matrices timed.
    pub bytes: usize,
    /// Median seconds of a pass over them, per plan of [`StreamPrefetch::CANDIDATES`].
    pub seconds: [f64; StreamPrefetch::CANDIDATES.len()],
    pub chosen: StreamPrefetch,
}

impl std::fmt::Display for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let best = self.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let times: Vec<String> = StreamPrefetch::CANDIDATES.iter().zip(self.seconds).map(|(plan, s)| format!("{plan} {:.2}", s / best)).collect();
        write!(f, "{} {} (pass time against the fastest: {}; {} MB timed)", self.class, self.chosen, times.join(", "), self.bytes / 1_000_000)
    }
}

/// The plan of each class, read by every product and set by [`PrefetchPlans::tune`].
#[derive(Debug)]
pub struct PrefetchPlans {
    /// Index into [`StreamPrefetch::CANDIDATES`], per [`StreamClass`].
    chosen: [AtomicU8; 2],
    tunings: Mutex<Vec<Tuning>>,
}

impl Default for PrefetchPlans {
    fn default() -> Self {
        let default = StreamPrefetch::CANDIDATES.iter().position(|&p| p == StreamPrefetch::DEFAULT).expect("the default is a candidate") as u8;
        PrefetchPlans { chosen: [AtomicU8::new(default), AtomicU8::new(default)], tunings: Mutex::new(Vec::new()) }
    }
}

impl PrefetchPlans {
    /// The plan `matrix`'s rows stream with (the default for quantized ones, which ignore it).
    pub fn for_matrix(&self, matrix: &CpuMatrix) -> StreamPrefetch {
        StreamClass::of(matrix).map_or(StreamPrefetch::DEFAULT, |class| self.get(class))
    }

    pub fn get(&self, class: StreamClass) -> StreamPrefetch {
        StreamPrefetch::CANDIDATES[self.chosen[class.index()].load(Ordering::Relaxed) as usize]
    }

    /// What the timings measured, one entry per class timed, latest last.
    pub fn tunings(&self) -> Vec<Tuning> {
        self.tunings.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Times every plan on each class's matrices of `decode_order` (the matrices as a decode step
    /// reads them) and keeps the fastest; a class with fewer than `min_bytes` keeps its plan.
    /// Call inside the pool the products run on, its threads awake.
    pub fn tune(&self, level: SimdLevel, threads: usize, decode_order: &[&CpuMatrix], min_bytes: usize, max_bytes: usize) {
        for class in StreamClass::ALL {
            let mut timed = Vec::new();
            let mut bytes = 0;
            for &m in decode_order.iter().filter(|m| StreamClass::of(m) == Some(class)) {
                if bytes >= max_bytes {
                    break;
                }
                bytes += m.size_in_bytes();
                timed.push(m);
            }
            if bytes < min_bytes.max(1) {
                continue;
            }
            let seconds = time_plans(level, threads, &timed);
            let fastest = (0..seconds.len()).min_by(|&a, &b| seconds[a].total_cmp(&seconds[b])).expect("candidates");
            self.chosen[class.index()].store(fastest as u8, Ordering::Relaxed);
            let tuning = Tuning { class, bytes, seconds, chosen: StreamPrefetch::CANDIDATES[fastest] };
            if let Ok(mut tunings) = self.tunings.lock() {
                tunings.push(tuning);
            }
        }
    }
}

/// Median seconds of a one-row product over every matrix of `matrices`, per candidate plan:
/// [`ROUNDS`] rounds after one untimed pass, the plans' order rotated each round so that a
/// drift in the machine's speed spreads over all of them.
fn time_plans(level: SimdLevel, threads: usize, matrices: &[&CpuMatrix]) -> [f64; StreamPrefetch::CANDIDATES.len()] {
    let cols = matrices.iter().map(|m| m.cols).max().unwrap_or(0);
    let rows = matrices.iter().map(|m| m.rows).max().unwrap_or(0);
    // Any finite input: the products are timed, not used.
    let x: Vec<f32> = (0..cols).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
    let mut out = vec![0.0f32; rows];
    let mut scratch = Vec::new();
    let mut pass = |plan: StreamPrefetch| {
        let start = Instant::now();
        for m in matrices {
            matmul::matmul_with_scratch(level, plan, threads, &x[..m.cols], 1, m, &mut out[..m.rows], &mut scratch);
        }
        std::hint::black_box(&out);
        start.elapsed().as_secs_f64()
    };
    pass(StreamPrefetch::DEFAULT);
    let plans = StreamPrefetch::CANDIDATES;
    let mut samples = vec![Vec::with_capacity(ROUNDS); plans.len()];
    for round in 0..ROUNDS {
        for k in 0..plans.len() {
            let p = (round + k) % plans.len();
            samples[p].push(pass(plans[p]));
        }
    }
    std::array::from_fn(|p| {
        let s = &mut samples[p];
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{HostTensor, TensorData};

    fn matrix(rows: usize, cols: usize, half: bool, seed: u32) -> CpuMatrix {
        let values: Vec<f32> = (0..rows * cols).map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 20) as f32 / 4096.0 - 0.5).collect();
        let data = if half { TensorData::F16(values.iter().map(|&v| half::f16::from_f32(v)).collect()) } else { TensorData::F32(values) };
        CpuMatrix::on_heap(HostTensor { shape: vec![rows, cols], data }).unwrap()
    }

    #[test]
    fn untimed_classes_keep_the_default_plan() {
        let plans = PrefetchPlans::default();
        let (small_f32, small_half) = (matrix(64, 96, false, 1), matrix(64, 96, true, 2));
        plans.tune(SimdLevel::detect(), 1, &[&small_f32, &small_half], MIN_TUNING_BYTES, MAX_TUNING_BYTES);
        assert!(plans.tunings().is_empty(), "matrices of a few KB are not timed");
        for class in StreamClass::ALL {
            assert_eq!(plans.get(class), StreamPrefetch::DEFAULT);
        }
    }

    #[test]
    fn each_class_with_enough_bytes_is_timed_on_its_own_matrices() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let plans = PrefetchPlans::default();
        let f32s: Vec<CpuMatrix> = (0..3).map(|s| matrix(256, 200, false, s)).collect();
        let halves: Vec<CpuMatrix> = (0..2).map(|s| matrix(128, 200, true, 10 + s)).collect();
        let order: Vec<&CpuMatrix> = f32s.iter().chain(&halves).collect();
        let f32_bytes = 3 * 256 * 200 * 4;
        // The f32 class has enough bytes, the 16-bit one not; the cap takes two of three f32s.
        pool.install(|| plans.tune(SimdLevel::detect(), 2, &order, 2 * 128 * 200 * 2 + 1, f32_bytes / 2));
        let tunings = plans.tunings();
        assert_eq!(tunings.len(), 1, "{tunings:?}");
        let t = &tunings[0];
        assert_eq!((t.class, t.bytes), (StreamClass::F32, 2 * 256 * 200 * 4));
        assert!(t.seconds.iter().all(|&s| s > 0.0 && s.is_finite()), "{t:?}");
        let fastest = t.seconds.iter().copied().fold(f64::INFINITY, f64::min);
        let chosen = StreamPrefetch::CANDIDATES.iter().position(|&p| p == t.chosen).unwrap();
        assert_eq!(t.seconds[chosen], fastest, "the fastest plan is kept");
        assert_eq!(plans.get(StreamClass::F32), t.chosen);
        assert_eq!(plans.get(StreamClass::Half), StreamPrefetch::DEFAULT);
        assert_eq!(plans.for_matrix(&halves[0]), StreamPrefetch::DEFAULT);
    }

    #[test]
    fn every_plan_gives_the_same_product_bits() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for half in [false, true] {
            // Rows not a multiple of the four streams, columns not of the vector width.
            let m = matrix(203, 577, half, 5);
            let x: Vec<f32> = (0..577).map(|i| (i as f32 * 0.37).sin()).collect();
            let product = |plan| {
                let mut out = vec![0.0f32; 203];
                pool.install(|| matmul::matmul_with_scratch(SimdLevel::detect(), plan, 2, &x, 1, &m, &mut out, &mut Vec::new()));
                out.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let want = product(StreamPrefetch::DEFAULT);
            for plan in StreamPrefetch::CANDIDATES {
                assert_eq!(product(plan), want, "half={half} {plan}");
            }
        }
    }
}
