// RMSNorm of whole rows and of each attention head inside the fused q|k|v rows.

// One block per row, the row read once into registers-sized strides and reduced with warp
// shuffles; a second pass over the (L1/L2-resident) row writes x * scale * w.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight, float* __restrict__ out, u32 dim, float eps) {
    __shared__ float scratch[32];
    const float* row = x + (u64)blockIdx.x * dim;
    float* dst = out + (u64)blockIdx.x * dim;
    float squares = 0.0f;
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        squares += row[i] * row[i];
    }
    const float total = block_sum(squares, scratch);
    const float scale = 1.0f / sqrtf(total / (float)dim + eps);
    for (u32 i = threadIdx.x; i < dim; i += blockDim.x) {
        dst[i] = row[i] * scale * weight[i];
    }
}

// One warp per (row, head): a head is at most a few hundred floats, so a warp reduction with no
// shared memory or barriers is the cheapest complete reduction. Grid: (rows, heads + kv_heads).
extern "C" __global__ void head_rms_norm(float* __restrict__ qkv, const float* __restrict__ q_weight, const float* __restrict__ k_weight,
                                         u32 width, u32 heads, u32 head_dim, float eps) {
    const u32 head = blockIdx.y;
    float* x = qkv + (u64)blockIdx.x * width + (u64)head * head_dim;
    const float* weight = head < heads ? q_weight : k_weight;
    float squares = 0.0f;
    for (u32 i = threadIdx.x; i < head_dim; i += 32) {
        squares += x[i] * x[i];
    }
    const float scale = 1.0f / sqrtf(warp_sum(squares) / (float)head_dim + eps);
    for (u32 i = threadIdx.x; i < head_dim; i += 32) {
        x[i] = x[i] * scale * weight[i];
    }
}
