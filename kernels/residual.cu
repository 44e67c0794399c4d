// The fused residual step that ends every sub-block (DESIGN.md, "The fused residual step"):
//   h += delta; h += sum_k amount_k * d_k; readout |h|, <h, u_j>; capture h; x = rmsnorm(h) * w
// with the semantics of the CPU backend's `residual_step`: every steering amount is computed from
// h before any term is added; a zero amount adds nothing; a probe without a direction reads NaN.

// A row's steering term, laid out as the host's `CudaTerm` (16 bytes).
struct Term {
    u32 direction;
    float coefficient;
    u32 mode;      // 0: add, 1: coefficient * |h|, 2: clamp (coefficient * max(0, target - <h, d>))
    float target;
};

#define TERM_ADD 0u
#define TERM_NORM_SCALED 1u
#define TERM_CLAMP 2u
#define NO_DIRECTION 0xffffffffu

// Chunks of VEC floats each thread keeps in registers: the row lives in registers for the whole
// step, so h is read once and written once whatever the steering, readout and capture do.
#define MAX_CHUNKS 8

template <int VEC>
struct Chunk {
    float v[VEC];
};

template <int VEC>
__device__ __forceinline__ void load_chunk(const float* p, Chunk<VEC>& c) {
    if (VEC == 4) {
        const float4 f = *reinterpret_cast<const float4*>(p);
        c.v[0] = f.x; c.v[1] = f.y; c.v[2] = f.z; c.v[3] = f.w;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) c.v[i] = p[i];
    }
}

template <int VEC>
__device__ __forceinline__ void store_chunk(float* p, const Chunk<VEC>& c) {
    if (VEC == 4) {
        *reinterpret_cast<float4*>(p) = make_float4(c.v[0], c.v[1], c.v[2], c.v[3]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) p[i] = c.v[i];
    }
}

// Dot product of the register-resident row with a pool direction, reduced over the block.
template <int VEC>
__device__ __forceinline__ float row_dot(const Chunk<VEC>* h, const float* __restrict__ direction, u32 dim, float* scratch) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < MAX_CHUNKS; ++k) {
        const u32 base = (threadIdx.x + k * blockDim.x) * VEC;
        if (base < dim) {
            Chunk<VEC> d;
            load_chunk<VEC>(direction + base, d);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc += h[k].v[i] * d.v[i];
        }
    }
    return block_sum(acc, scratch);
}

template <int VEC>
__device__ __forceinline__ float row_squares(const Chunk<VEC>* h, u32 dim, float* scratch) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < MAX_CHUNKS; ++k) {
        const u32 base = (threadIdx.x + k * blockDim.x) * VEC;
        if (base < dim) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc += h[k].v[i] * h[k].v[i];
        }
    }
    return block_sum(acc, scratch);
}

// One block per row, the row in registers, 16-byte loads and stores (VEC = 4) when dim % 4 == 0.
// Requires dim <= VEC * MAX_CHUNKS * blockDim.x (the host picks blockDim accordingly).
// `row_offsets` has rows + 1 entries when `has_terms`; `capture_rows[r]` is the capture row of
// row r or NO_DIRECTION; the readout pointer already includes the point's offset.
template <int VEC>
__device__ void residual_step_impl(float* __restrict__ h, const float* __restrict__ delta, const float* __restrict__ norm_weight,
                                   float* __restrict__ x_out, u32 dim, float eps,
                                   u32 has_terms, const u32* __restrict__ row_offsets, const Term* __restrict__ terms,
                                   const float* __restrict__ directions,
                                   u32 has_readout, float* __restrict__ readout, const u32* __restrict__ probes, u32 probe_count,
                                   u32 has_capture, const u32* __restrict__ capture_rows, float* __restrict__ capture) {
    __shared__ float scratch[32];
    const u32 row = blockIdx.x;
    float* hr = h + (u64)row * dim;
    const float* dr = delta + (u64)row * dim;
    Chunk<VEC> hv[MAX_CHUNKS];
#pragma unroll
    for (int k = 0; k < MAX_CHUNKS; ++k) {
        const u32 base = (threadIdx.x + k * blockDim.x) * VEC;
        if (base < dim) {
            Chunk<VEC> d;
            load_chunk<VEC>(hr + base, hv[k]);
            load_chunk<VEC>(dr + base, d);
#pragma unroll
            for (int i = 0; i < VEC; ++i) hv[k].v[i] += d.v[i];
        }
    }

    if (has_terms) {
        const u32 first = row_offsets[row];
        const u32 last = row_offsets[row + 1];
        if (first < last) {
            // Amounts come from h before steering: keep that h while terms are added.
            Chunk<VEC> before[MAX_CHUNKS];
#pragma unroll
            for (int k = 0; k < MAX_CHUNKS; ++k) before[k] = hv[k];
            float norm = 0.0f;
            bool norm_known = false;
            for (u32 t = first; t < last; ++t) {
                const Term term = terms[t];
                const float* direction = directions + (u64)term.direction * dim;
                float amount = term.coefficient;
                if (term.mode == TERM_NORM_SCALED) {
                    if (!norm_known) {
                        norm = sqrtf(row_squares<VEC>(before, dim, scratch));
                        norm_known = true;
                    }
                    amount = term.coefficient * norm;
                } else if (term.mode == TERM_CLAMP) {
                    amount = term.coefficient * fmaxf(term.target - row_dot<VEC>(before, direction, dim, scratch), 0.0f);
                }
                if (amount != 0.0f) {
#pragma unroll
                    for (int k = 0; k < MAX_CHUNKS; ++k) {
                        const u32 base = (threadIdx.x + k * blockDim.x) * VEC;
                        if (base < dim) {
                            Chunk<VEC> d;
                            load_chunk<VEC>(direction + base, d);
#pragma unroll
                            for (int i = 0; i < VEC; ++i) hv[k].v[i] = fmaf(amount, d.v[i], hv[k].v[i]);
                        }
                    }
                }
            }
        }
    }

    const float squares = row_squares<VEC>(hv, dim, scratch);
    if (has_readout) {
        float* out = readout + (u64)row * (1 + probe_count);
        if (threadIdx.x == 0) out[0] = sqrtf(squares);
        for (u32 j = 0; j < probe_count; ++j) {
            const u32 probe = probes[j];
            // `probe` is uniform across the block, so every thread takes the same branch.
            const float value = probe == NO_DIRECTION ? __int_as_float(0x7fc00000) : row_dot<VEC>(hv, directions + (u64)probe * dim, dim, scratch);
            if (threadIdx.x == 0) out[1 + j] = value;
        }
    }

    float* capture_row = nullptr;
    if (has_capture && capture_rows[row] != NO_DIRECTION) {
        capture_row = capture + (u64)capture_rows[row] * dim;
    }
    const float scale = 1.0f / sqrtf(squares / (float)dim + eps);
    float* xr = x_out + (u64)row * dim;
#pragma unroll
    for (int k = 0; k < MAX_CHUNKS; ++k) {
        const u32 base = (threadIdx.x + k * blockDim.x) * VEC;
        if (base < dim) {
            store_chunk<VEC>(hr + base, hv[k]);
            if (capture_row) store_chunk<VEC>(capture_row + base, hv[k]);
            Chunk<VEC> w;
            Chunk<VEC> x;
            load_chunk<VEC>(norm_weight + base, w);
#pragma unroll
            for (int i = 0; i < VEC; ++i) x.v[i] = hv[k].v[i] * scale * w.v[i];
            store_chunk<VEC>(xr + base, x);
        }
    }
}

#define RESIDUAL_PARAMS float* h, const float* delta, const float* norm_weight, float* x_out, u32 dim, float eps, \
    u32 has_terms, const u32* row_offsets, const Term* terms, const float* directions, \
    u32 has_readout, float* readout, const u32* probes, u32 probe_count, \
    u32 has_capture, const u32* capture_rows, float* capture
#define RESIDUAL_ARGS h, delta, norm_weight, x_out, dim, eps, has_terms, row_offsets, terms, directions, \
    has_readout, readout, probes, probe_count, has_capture, capture_rows, capture

// dim % 4 == 0: 16-byte loads and stores.
extern "C" __global__ void residual_step_vec4(RESIDUAL_PARAMS) { residual_step_impl<4>(RESIDUAL_ARGS); }
// Any dim: 4-byte loads, still coalesced across the block.
extern "C" __global__ void residual_step_scalar(RESIDUAL_PARAMS) { residual_step_impl<1>(RESIDUAL_ARGS); }
