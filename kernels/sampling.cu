// Token selection on the device, so only one u32 per sequence returns to the host.

// One block per logits row: each thread scans a strided slice, then a shared-memory tree picks
// the block's maximum (lowest index on ties, as the CPU sampler does). blockDim.x: a power of two
// <= 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, u32 vocab, u32* __restrict__ out) {
    __shared__ float best_value[1024];
    __shared__ u32 best_index[1024];
    const float* row = logits + (u64)blockIdx.x * vocab;
    float value = -__int_as_float(0x7f800000);
    u32 index = 0xffffffffu;
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > value || (v == value && i < index)) {
            value = v;
            index = i;
        }
    }
    best_value[threadIdx.x] = value;
    best_index[threadIdx.x] = index;
    __syncthreads();
    for (u32 stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            const float v = best_value[threadIdx.x + stride];
            const u32 i = best_index[threadIdx.x + stride];
            if (v > best_value[threadIdx.x] || (v == best_value[threadIdx.x] && i < best_index[threadIdx.x])) {
                best_value[threadIdx.x] = v;
                best_index[threadIdx.x] = i;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[blockIdx.x] = best_index[0] == 0xffffffffu ? 0u : best_index[0];
    }
}

// Temperature sampling by inverse CDF with one host-drawn uniform per row: the block computes the
// max and the softmax normaliser, each thread sums a contiguous chunk, a block scan of the chunk
// sums finds the chunk holding the target mass, and that chunk's thread walks it. Two passes over
// the row, no sort. blockDim.x must be a power of two <= 1024.
extern "C" __global__ void sample_rows(const float* __restrict__ logits, u32 vocab, float inv_temperature,
                                       const float* __restrict__ uniforms, u32* __restrict__ out) {
    __shared__ float scratch[32];
    __shared__ float chunk_sums[1024];
    const float* row = logits + (u64)blockIdx.x * vocab;
    float local_max = -__int_as_float(0x7f800000);
    for (u32 i = threadIdx.x; i < vocab; i += blockDim.x) {
        local_max = fmaxf(local_max, row[i]);
    }
    local_max = warp_max(local_max);
    __syncthreads();
    if ((threadIdx.x & 31u) == 0) {
        scratch[threadIdx.x >> 5] = local_max;
    }
    __syncthreads();
    float row_max = -__int_as_float(0x7f800000);
    for (u32 w = 0; w < (blockDim.x + 31u) / 32u; ++w) {
        row_max = fmaxf(row_max, scratch[w]);
    }
    const u32 chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const u32 begin = min(vocab, threadIdx.x * chunk);
    const u32 end = min(vocab, begin + chunk);
    float mass = 0.0f;
    for (u32 i = begin; i < end; ++i) {
        mass += expf((row[i] - row_max) * inv_temperature);
    }
    chunk_sums[threadIdx.x] = mass;
    __syncthreads();
    // Inclusive Hillis-Steele scan of the chunk sums.
    for (u32 stride = 1; stride < blockDim.x; stride <<= 1) {
        const float add = threadIdx.x >= stride ? chunk_sums[threadIdx.x - stride] : 0.0f;
        __syncthreads();
        chunk_sums[threadIdx.x] += add;
        __syncthreads();
    }
    const float total = chunk_sums[blockDim.x - 1];
    const float target = uniforms[blockIdx.x] * total;
    const float before = threadIdx.x == 0 ? 0.0f : chunk_sums[threadIdx.x - 1];
    const bool last_nonempty = end == vocab && begin < end;
    if (begin < end && ((target >= before && target < chunk_sums[threadIdx.x]) || (last_nonempty && target >= chunk_sums[threadIdx.x]))) {
        float running = before;
        u32 chosen = end - 1;
        for (u32 i = begin; i < end; ++i) {
            running += expf((row[i] - row_max) * inv_temperature);
            if (target < running) {
                chosen = i;
                break;
            }
        }
        out[blockIdx.x] = chosen;
    }
}
