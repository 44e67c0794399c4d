// Embedding gather: one block per token row, widening the table row (bf16 or f16) to f32.

// Fast because each thread moves 16 bytes per load (8 weights) and writes two float4s: the row
// is read and written exactly once with fully coalesced transactions. Needs dim % 8 == 0.
template <typename W>
__device__ void embed_vec8(const u16* __restrict__ table, const u32* __restrict__ tokens, float* __restrict__ out, u32 dim) {
    const u32 row = blockIdx.x;
    const uint4* src = reinterpret_cast<const uint4*>(table + (u64)tokens[row] * dim);
    float4* dst = reinterpret_cast<float4*>(out + (u64)row * dim);
    for (u32 i = threadIdx.x; i < dim / 8; i += blockDim.x) {
        const uint4 packed = src[i];
        const u32 words[4] = {packed.x, packed.y, packed.z, packed.w};
        float v[8];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[2 * k] = W::widen((u16)(words[k] & 0xffffu));
            v[2 * k + 1] = W::widen((u16)(words[k] >> 16));
        }
        dst[2 * i] = make_float4(v[0], v[1], v[2], v[3]);
        dst[2 * i + 1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

// Any width: one element per thread step, still coalesced across the block.
template <typename W>
__device__ void embed_scalar(const u16* __restrict__ table, const u32* __restrict__ tokens, float* __restrict__ out, u32 dim) {
    const u32 row = blockIdx.x;
    const u16* src = table + (u64)tokens[row] * dim;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        out[(u64)row * dim + i] = W::widen(src[i]);
    }
}

extern "C" __global__ void embed_bf16_vec8(const u16* table, const u32* tokens, float* out, u32 dim) { embed_vec8<Bf16>(table, tokens, out, dim); }
extern "C" __global__ void embed_f16_vec8(const u16* table, const u32* tokens, float* out, u32 dim) { embed_vec8<F16>(table, tokens, out, dim); }
extern "C" __global__ void embed_bf16_scalar(const u16* table, const u32* tokens, float* out, u32 dim) { embed_scalar<Bf16>(table, tokens, out, dim); }
extern "C" __global__ void embed_f16_scalar(const u16* table, const u32* tokens, float* out, u32 dim) { embed_scalar<F16>(table, tokens, out, dim); }
