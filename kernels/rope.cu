// Rotary position embedding (rotate-half convention) of q and k inside the fused q|k|v rows.

// One block per row; each thread rotates (x_i, x_{i+half}) pairs in place from the precomputed
// cos/sin table, so the kernel is one read and one write of q and k with no transcendental math.
extern "C" __global__ void rope(float* __restrict__ qkv, const u32* __restrict__ positions, const float* __restrict__ cos_table,
                                const float* __restrict__ sin_table, u32 width, u32 rotated_heads, u32 head_dim) {
    const u32 half = head_dim / 2;
    const u32 pos = positions[blockIdx.x];
    const float* c = cos_table + (u64)pos * half;
    const float* s = sin_table + (u64)pos * half;
    float* row = qkv + (u64)blockIdx.x * width;
    for (u32 pair = threadIdx.x; pair < rotated_heads * half; pair += blockDim.x) {
        const u32 head = pair / half;
        const u32 i = pair - head * half;
        float* x = row + (u64)head * head_dim;
        const float a = x[i];
        const float b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i] + a * s[i];
    }
}
