// Small row-wise operations between the matrix products: bias, SiLU·mul, row gathers, dtype
// conversion of prefill activations for cuBLAS.

// Fast enough for its size: a grid-stride loop, one coalesced read and write per element.
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ bias, u32 dim, u32 total) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        x[i] += bias[i % dim];
    }
}

// out[r] = silu(gate) * up: reads the two halves of each gate|up row once, coalesced.
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, float* __restrict__ out, u32 ffn, u32 total) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const u32 row = i / ffn;
        const u32 col = i - row * ffn;
        const float g = gate_up[(u64)row * 2 * ffn + col];
        const float u = gate_up[(u64)row * 2 * ffn + ffn + col];
        out[i] = silu(g) * u;
    }
}

// dst[i] = src[rows[i]]: one block per gathered row, coalesced copy.
extern "C" __global__ void gather_rows(const float* __restrict__ src, const u32* __restrict__ rows, float* __restrict__ dst, u32 dim) {
    const u32 i = blockIdx.x;
    const float* from = src + (u64)rows[i] * dim;
    float* to = dst + (u64)i * dim;
    for (u32 c = threadIdx.x; c < dim; c += blockDim.x) {
        to[c] = from[c];
    }
}

// f32 activations -> bf16 / f16 bits, the input format cuBLAS takes next to bf16/f16 weights.
extern "C" __global__ void f32_to_bf16_bits(const float* __restrict__ src, u16* __restrict__ dst, u32 total) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        dst[i] = f32_to_bf16(src[i]);
    }
}

extern "C" __global__ void f32_to_f16_bits(const float* __restrict__ src, u16* __restrict__ dst, u32 total) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        dst[i] = f32_to_f16(src[i]);
    }
}
