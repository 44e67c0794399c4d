// Decode matrix-vector products: y[r, o] = sum_i x[r, i] * W[o, i] for a few rows r, W [out, in]
// in bf16 or f16 (u16 bits), fp32 accumulation; bf16 weights meet activations rounded to bf16
// (`W::input`), as on the CPU. q|k|v and gate|up are single fused matrices on the
// host side, so one launch covers each; `gemv_silu_mul_*` also applies SiLU(gate) * up in the
// epilogue for the gate|up matrix.

#define GEMV_WARPS 8          // warps per block; each warp owns one output feature at a time
#define GEMV_MAX_ROWS 8       // activation rows per launch (the host splits larger batches)
#define GEMV_UNROLL 4         // 16-byte weight loads in flight per lane

// Fast because decode is bound by streaming W once: every lane issues GEMV_UNROLL independent
// 16-byte loads (8 weights each) before using them, a warp covers 256 contiguous weights per load
// step (fully coalesced), x (tiny, L1/L2 resident) is reused for all GEMV_MAX_ROWS rows, and the
// only reduction is one warp shuffle tree per output. Needs in % 8 == 0 (16-byte aligned rows).
template <typename W, int ROWS>
__device__ __forceinline__ void dot_rows_vec8(const u16* __restrict__ w_row, const float* __restrict__ x, u32 in, float* acc) {
    const uint4* w = reinterpret_cast<const uint4*>(w_row);
    const u32 groups = in / 8;
    const u32 lane = threadIdx.x & 31u;
    u32 g = lane;
    for (; g + 32u * (GEMV_UNROLL - 1) < groups; g += 32u * GEMV_UNROLL) {
        uint4 packed[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) packed[u] = w[g + 32u * u];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const u32 words[4] = {packed[u].x, packed[u].y, packed[u].z, packed[u].w};
            float wf[8];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                wf[2 * k] = W::widen((u16)(words[k] & 0xffffu));
                wf[2 * k + 1] = W::widen((u16)(words[k] >> 16));
            }
            const u32 col = (g + 32u * u) * 8u;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float4 x0 = *reinterpret_cast<const float4*>(x + (u64)r * in + col);
                const float4 x1 = *reinterpret_cast<const float4*>(x + (u64)r * in + col + 4);
                acc[r] += wf[0] * W::input(x0.x) + wf[1] * W::input(x0.y) + wf[2] * W::input(x0.z) + wf[3] * W::input(x0.w)
                        + wf[4] * W::input(x1.x) + wf[5] * W::input(x1.y) + wf[6] * W::input(x1.z) + wf[7] * W::input(x1.w);
            }
        }
    }
    for (; g < groups; g += 32u) {
        const uint4 packed = w[g];
        const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
        const u32 col = g * 8u;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float sum = 0.0f;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                sum += W::widen((u16)(words[k] & 0xffffu)) * W::input(x[(u64)r * in + col + 2 * k])
                     + W::widen((u16)(words[k] >> 16)) * W::input(x[(u64)r * in + col + 2 * k + 1]);
            }
            acc[r] += sum;
        }
    }
}

// Any `in`: 2-byte loads, coalesced across the warp (odd model sizes only).
template <typename W, int ROWS>
__device__ __forceinline__ void dot_rows_scalar(const u16* __restrict__ w_row, const float* __restrict__ x, u32 in, float* acc) {
    for (u32 i = threadIdx.x & 31u; i < in; i += 32u) {
        const float wf = W::widen(w_row[i]);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r] += wf * W::input(x[(u64)r * in + i]);
    }
}

template <typename W, bool VEC8>
__device__ __forceinline__ void dot_rows(const u16* w_row, const float* x, u32 in, u32 rows, float* acc) {
    // ROWS is a template parameter so the accumulators stay in registers.
#define DOT_CASE(R) case R: if (VEC8) dot_rows_vec8<W, R>(w_row, x, in, acc); else dot_rows_scalar<W, R>(w_row, x, in, acc); break;
    switch (rows) {
        DOT_CASE(1) DOT_CASE(2) DOT_CASE(3) DOT_CASE(4) DOT_CASE(5) DOT_CASE(6) DOT_CASE(7) DOT_CASE(8)
        default: break;
    }
#undef DOT_CASE
}

// Grid: ceil(out / GEMV_WARPS) blocks of 32 * GEMV_WARPS threads; rows <= GEMV_MAX_ROWS.
template <typename W, bool VEC8>
__device__ void gemv_impl(const u16* __restrict__ weight, const float* __restrict__ x, float* __restrict__ y, u32 in, u32 out, u32 rows) {
    const u32 o = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= out) return;
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
    dot_rows<W, VEC8>(weight + (u64)o * in, x, in, rows, acc);
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        const float sum = warp_sum(acc[r]);
        if ((threadIdx.x & 31u) == 0 && (u32)r < rows) y[(u64)r * out + o] = sum;
    }
}

// gate|up matrix [2 * ffn, in]: the warp of feature o computes gate row o and up row ffn + o and
// writes silu(gate) * up, so the [rows, 2 * ffn] intermediate never goes to memory.
template <typename W, bool VEC8>
__device__ void gemv_silu_mul_impl(const u16* __restrict__ weight, const float* __restrict__ x, float* __restrict__ y, u32 in, u32 ffn, u32 rows) {
    const u32 o = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (o >= ffn) return;
    float gate[GEMV_MAX_ROWS];
    float up[GEMV_MAX_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) { gate[r] = 0.0f; up[r] = 0.0f; }
    dot_rows<W, VEC8>(weight + (u64)o * in, x, in, rows, gate);
    dot_rows<W, VEC8>(weight + (u64)(ffn + o) * in, x, in, rows, up);
#pragma unroll
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        const float g = warp_sum(gate[r]);
        const float u = warp_sum(up[r]);
        if ((threadIdx.x & 31u) == 0 && (u32)r < rows) y[(u64)r * ffn + o] = silu(g) * u;
    }
}

extern "C" __global__ void gemv_bf16_vec8(const u16* w, const float* x, float* y, u32 in, u32 out, u32 rows) { gemv_impl<Bf16, true>(w, x, y, in, out, rows); }
extern "C" __global__ void gemv_f16_vec8(const u16* w, const float* x, float* y, u32 in, u32 out, u32 rows) { gemv_impl<F16, true>(w, x, y, in, out, rows); }
extern "C" __global__ void gemv_bf16_scalar(const u16* w, const float* x, float* y, u32 in, u32 out, u32 rows) { gemv_impl<Bf16, false>(w, x, y, in, out, rows); }
extern "C" __global__ void gemv_f16_scalar(const u16* w, const float* x, float* y, u32 in, u32 out, u32 rows) { gemv_impl<F16, false>(w, x, y, in, out, rows); }

extern "C" __global__ void gemv_silu_mul_bf16_vec8(const u16* w, const float* x, float* y, u32 in, u32 ffn, u32 rows) { gemv_silu_mul_impl<Bf16, true>(w, x, y, in, ffn, rows); }
extern "C" __global__ void gemv_silu_mul_f16_vec8(const u16* w, const float* x, float* y, u32 in, u32 ffn, u32 rows) { gemv_silu_mul_impl<F16, true>(w, x, y, in, ffn, rows); }
extern "C" __global__ void gemv_silu_mul_bf16_scalar(const u16* w, const float* x, float* y, u32 in, u32 ffn, u32 rows) { gemv_silu_mul_impl<Bf16, false>(w, x, y, in, ffn, rows); }
extern "C" __global__ void gemv_silu_mul_f16_scalar(const u16* w, const float* x, float* y, u32 in, u32 ffn, u32 rows) { gemv_silu_mul_impl<F16, false>(w, x, y, in, ffn, rows); }
