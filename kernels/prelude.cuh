// Shared by every kernel family: NVRTC compiles `prelude.cuh + <family>.cu` as one program, so the
// families stay header-free (no #include, no CUDA toolkit headers needed at run time).
// bf16 and f16 are carried as their 16-bit patterns (u16) and widened here.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// bf16 is the top half of an f32: widening is a shift.
__device__ __forceinline__ float bf16_to_f32(u16 bits) {
    return __uint_as_float(((u32)bits) << 16);
}

// f32 -> bf16 bits, round to nearest even (NaN kept quiet, subnormals to a zero of their sign),
// as the CPU backend and `vcvtneps2bf16` round activations for bf16 products.
__device__ __forceinline__ u16 f32_to_bf16(float value) {
    u32 bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((bits >> 16) | 0x40u);
    }
    if ((bits & 0x7f800000u) == 0u) {
        return (u16)((bits >> 16) & 0x8000u);
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (u16)(bits >> 16);
}

// f16 -> f32 with the hardware conversion instruction (exact for every f16 value).
__device__ __forceinline__ float f16_to_f32(u16 bits) {
    float value;
    asm("{ cvt.f32.f16 %0, %1; }" : "=f"(value) : "h"(bits));
    return value;
}

// f32 -> f16 bits, round to nearest even.
__device__ __forceinline__ u16 f32_to_f16(float value) {
    u16 bits;
    asm("{ cvt.rn.f16.f32 %0, %1; }" : "=h"(bits) : "f"(value));
    return bits;
}

// The weight element types, selected at compile time by the templated kernels. `input` is what
// an f32 activation becomes before it meets such a weight: bf16 weights meet activations rounded
// to bf16 (so every product is exact in f32 and the GEMV, cuBLAS and the CPU backend compute the
// same products); f16 weights meet f32 activations.
struct Bf16 {
    static __device__ __forceinline__ float widen(u16 bits) { return bf16_to_f32(bits); }
    static __device__ __forceinline__ float input(float x) { return bf16_to_f32(f32_to_bf16(x)); }
};
struct F16 {
    static __device__ __forceinline__ float widen(u16 bits) { return f16_to_f32(bits); }
    static __device__ __forceinline__ float input(float x) { return x; }
};

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    }
    return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    }
    return value;
}

// Sum over the whole block, returned to every thread. `scratch` holds 32 floats of shared
// memory; the leading barrier makes back-to-back calls with the same scratch safe.
__device__ __forceinline__ float block_sum(float value, float* scratch) {
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 warps = (blockDim.x + 31u) >> 5;
    value = warp_sum(value);
    __syncthreads();
    if (lane == 0) {
        scratch[warp] = value;
    }
    __syncthreads();
    value = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(value);
}

__device__ __forceinline__ float silu(float g) {
    return g / (1.0f + expf(-g));
}
