// Causal attention over the preallocated f32 KV cache `[layer][slot][position][kv_dim]` (the CPU
// backend's layout), GQA aware: q head h reads kv head h / (heads / kv_heads).

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ u64 cache_offset(u32 layer, u32 slot, u32 position, u32 slots, u32 max_positions, u32 kv_dim) {
    return (((u64)layer * slots + slot) * max_positions + position) * kv_dim;
}

// Stores each row's k and v at (layer, slot, position): one block per row, coalesced copies.
extern "C" __global__ void kv_write(const float* __restrict__ qkv, float* __restrict__ keys, float* __restrict__ values,
                                    const u32* __restrict__ slots_of_rows, const u32* __restrict__ positions,
                                    u32 width, u32 q_dim, u32 kv_dim, u32 layer, u32 slots, u32 max_positions) {
    const u32 row = blockIdx.x;
    const u64 dst = cache_offset(layer, slots_of_rows[row], positions[row], slots, max_positions, kv_dim);
    const float* src = qkv + (u64)row * width + q_dim;
    for (u32 i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        keys[dst + i] = src[i];
        values[dst + i] = src[kv_dim + i];
    }
}

// Copies the first `count` positions of every layer from slot `from` to slot `to` (a shared
// prompt's KV reused by several candidates). Grid: (blocks, layers); each layer's range is
// contiguous, so this is a plain coalesced copy.
extern "C" __global__ void kv_copy_prefix(float* __restrict__ keys, float* __restrict__ values, u32 from, u32 to, u32 count,
                                          u32 slots, u32 max_positions, u32 kv_dim) {
    const u32 layer = blockIdx.y;
    const u64 src = cache_offset(layer, from, 0, slots, max_positions, kv_dim);
    const u64 dst = cache_offset(layer, to, 0, slots, max_positions, kv_dim);
    const u64 total = (u64)count * kv_dim;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        keys[dst + i] = keys[src + i];
        values[dst + i] = values[src + i];
    }
}

#define DECODE_MAX_LANE_ELEMS 8   // head_dim <= 256
#define DECODE_UNROLL 4           // cached positions whose dot products are in flight together

// Decode, split over the sequence (flash-decoding): block (row, kv_head, split) streams its chunk
// of the kv head once from memory while each warp handles q heads of the GQA group (the other
// warps hit the same K/V lines in L1); DECODE_UNROLL positions per step keep several loads and
// shuffle reductions in flight; online softmax keeps one pass. Writes (max, sum, acc[head_dim])
// per (row, head, split) for `attention_decode_combine`.
extern "C" __global__ void attention_decode_partial(const float* __restrict__ qkv, const float* __restrict__ keys, const float* __restrict__ values,
                                                    const u32* __restrict__ slots_of_rows, const u32* __restrict__ positions,
                                                    float* __restrict__ partials, u32 width, u32 heads, u32 kv_heads, u32 head_dim,
                                                    u32 layer, u32 slots, u32 max_positions, u32 split_len, float scale) {
    const u32 row = blockIdx.x;
    const u32 kv_head = blockIdx.y;
    const u32 split = blockIdx.z;
    const u32 splits = gridDim.z;
    const u32 lane = threadIdx.x & 31u;
    const u32 warp = threadIdx.x >> 5;
    const u32 warps = blockDim.x >> 5;
    const u32 group = heads / kv_heads;
    const u32 kv_dim = kv_heads * head_dim;
    const u32 context = positions[row] + 1;
    const u32 begin = split * split_len;
    const u32 end = min(context, begin + split_len);
    const u64 base = cache_offset(layer, slots_of_rows[row], 0, slots, max_positions, kv_dim) + (u64)kv_head * head_dim;
    for (u32 g = warp; g < group; g += warps) {
        const u32 head = kv_head * group + g;
        const float* q = qkv + (u64)row * width + (u64)head * head_dim;
        float q_reg[DECODE_MAX_LANE_ELEMS];
        float acc[DECODE_MAX_LANE_ELEMS];
#pragma unroll
        for (int j = 0; j < DECODE_MAX_LANE_ELEMS; ++j) {
            const u32 e = lane + 32u * j;
            q_reg[j] = e < head_dim ? q[e] * scale : 0.0f;
            acc[j] = 0.0f;
        }
        float m = NEG_INF;
        float l = 0.0f;
        for (u32 t0 = begin; t0 < end; t0 += DECODE_UNROLL) {
            float s[DECODE_UNROLL];
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u) {
                const u32 t = t0 + u;
                float dot = 0.0f;
                if (t < end) {
                    const float* k = keys + base + (u64)t * kv_dim;
#pragma unroll
                    for (int j = 0; j < DECODE_MAX_LANE_ELEMS; ++j) {
                        const u32 e = lane + 32u * j;
                        if (e < head_dim) dot += q_reg[j] * k[e];
                    }
                }
                s[u] = dot;
            }
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u) s[u] = t0 + u < end ? warp_sum(s[u]) : NEG_INF;
            float block_max = s[0];
#pragma unroll
            for (int u = 1; u < DECODE_UNROLL; ++u) block_max = fmaxf(block_max, s[u]);
            const float m_new = fmaxf(m, block_max);
            const float correction = expf(m - m_new);
            l *= correction;
#pragma unroll
            for (int j = 0; j < DECODE_MAX_LANE_ELEMS; ++j) acc[j] *= correction;
#pragma unroll
            for (int u = 0; u < DECODE_UNROLL; ++u) {
                const u32 t = t0 + u;
                if (t < end) {
                    const float p = expf(s[u] - m_new);
                    l += p;
                    const float* v = values + base + (u64)t * kv_dim;
#pragma unroll
                    for (int j = 0; j < DECODE_MAX_LANE_ELEMS; ++j) {
                        const u32 e = lane + 32u * j;
                        if (e < head_dim) acc[j] += p * v[e];
                    }
                }
            }
            m = m_new;
        }
        float* part = partials + (((u64)row * heads + head) * splits + split) * (head_dim + 2);
        if (lane == 0) {
            part[0] = m;
            part[1] = l;
        }
#pragma unroll
        for (int j = 0; j < DECODE_MAX_LANE_ELEMS; ++j) {
            const u32 e = lane + 32u * j;
            if (e < head_dim) part[2 + e] = acc[j];
        }
    }
}

// Merges the splits of each (row, head): block (row, head), one thread per head element. Splits
// past the row's context hold (-inf, 0) and weigh nothing; split 0 always holds position 0.
extern "C" __global__ void attention_decode_combine(const float* __restrict__ partials, float* __restrict__ out, u32 heads, u32 head_dim, u32 splits) {
    const u32 row = blockIdx.x;
    const u32 head = blockIdx.y;
    const float* part = partials + ((u64)row * heads + head) * splits * (head_dim + 2);
    float m = NEG_INF;
    for (u32 s = 0; s < splits; ++s) m = fmaxf(m, part[(u64)s * (head_dim + 2)]);
    for (u32 e = threadIdx.x; e < head_dim; e += blockDim.x) {
        float numerator = 0.0f;
        float denominator = 0.0f;
        for (u32 s = 0; s < splits; ++s) {
            const float* p = part + (u64)s * (head_dim + 2);
            if (p[1] > 0.0f) {
                const float w = expf(p[0] - m);
                numerator += w * p[2 + e];
                denominator += w * p[1];
            }
        }
        out[(u64)row * heads * head_dim + (u64)head * head_dim + e] = numerator / denominator;
    }
}

// A tile of consecutive positions of one slot (host-built from the batch's runs).
struct PrefillTile {
    u32 first_row;
    u32 rows;
    u32 slot;
    u32 first_position;
};

#define PREFILL_KEYS 16       // cached positions per shared-memory block
#define PREFILL_MAX_ACC 16    // output elements per thread: tile_rows * head_dim <= 16 * blockDim

// Prefill: block (tile, head) keeps its tile of queries in shared memory and streams the slot's
// keys/values through shared memory PREFILL_KEYS positions at a time, so each K/V element is read
// once per tile rather than once per query; online softmax makes it one pass with no score matrix
// in global memory. Key rows are padded to head_dim + 1 floats so that the threads of a warp,
// which read different keys at the same d, hit different shared-memory banks. Dynamic shared
// memory: tile_rows * head_dim + PREFILL_KEYS * (2 * head_dim + 1) + tile_rows * (PREFILL_KEYS + 3)
// floats.
extern "C" __global__ void attention_prefill(const float* __restrict__ qkv, const float* __restrict__ keys, const float* __restrict__ values,
                                             const PrefillTile* __restrict__ tiles, float* __restrict__ out,
                                             u32 width, u32 heads, u32 kv_heads, u32 head_dim, u32 tile_rows,
                                             u32 layer, u32 slots, u32 max_positions, float scale) {
    extern __shared__ float shared[];
    const PrefillTile tile = tiles[blockIdx.x];
    const u32 head = blockIdx.y;
    const u32 kv_head = head / (heads / kv_heads);
    const u32 kv_dim = kv_heads * head_dim;
    const u32 k_stride = head_dim + 1;
    float* q_s = shared;
    float* k_s = q_s + tile_rows * head_dim;
    float* v_s = k_s + PREFILL_KEYS * k_stride;
    float* p_s = v_s + PREFILL_KEYS * head_dim;
    float* m_s = p_s + tile_rows * PREFILL_KEYS;
    float* l_s = m_s + tile_rows;
    float* c_s = l_s + tile_rows;

    for (u32 e = threadIdx.x; e < tile_rows * head_dim; e += blockDim.x) {
        const u32 qi = e / head_dim;
        const u32 d = e - qi * head_dim;
        q_s[e] = qi < tile.rows ? qkv[(u64)(tile.first_row + qi) * width + (u64)head * head_dim + d] * scale : 0.0f;
    }
    if (threadIdx.x < tile_rows) {
        m_s[threadIdx.x] = NEG_INF;
        l_s[threadIdx.x] = 0.0f;
    }
    float acc[PREFILL_MAX_ACC];
#pragma unroll
    for (int i = 0; i < PREFILL_MAX_ACC; ++i) acc[i] = 0.0f;

    const u64 base = cache_offset(layer, tile.slot, 0, slots, max_positions, kv_dim) + (u64)kv_head * head_dim;
    const u32 context = tile.first_position + tile.rows;
    for (u32 key0 = 0; key0 < context; key0 += PREFILL_KEYS) {
        __syncthreads();
        for (u32 e = threadIdx.x; e < PREFILL_KEYS * head_dim; e += blockDim.x) {
            const u32 kj = e / head_dim;
            const u32 d = e - kj * head_dim;
            const u32 t = key0 + kj;
            k_s[kj * k_stride + d] = t < context ? keys[base + (u64)t * kv_dim + d] : 0.0f;
            v_s[e] = t < context ? values[base + (u64)t * kv_dim + d] : 0.0f;
        }
        __syncthreads();
        for (u32 idx = threadIdx.x; idx < tile_rows * PREFILL_KEYS; idx += blockDim.x) {
            const u32 qi = idx / PREFILL_KEYS;
            const u32 kj = idx - qi * PREFILL_KEYS;
            const u32 t = key0 + kj;
            float s = NEG_INF;
            if (qi < tile.rows && t <= tile.first_position + qi) {
                s = 0.0f;
                for (u32 d = 0; d < head_dim; ++d) s += q_s[qi * head_dim + d] * k_s[kj * k_stride + d];
            }
            p_s[idx] = s;
        }
        __syncthreads();
        if (threadIdx.x < tile_rows) {
            const u32 qi = threadIdx.x;
            float* p = p_s + qi * PREFILL_KEYS;
            float block_max = NEG_INF;
            for (u32 kj = 0; kj < PREFILL_KEYS; ++kj) block_max = fmaxf(block_max, p[kj]);
            const float m_old = m_s[qi];
            const float m_new = fmaxf(m_old, block_max);
            if (m_new == NEG_INF) {
                // Nothing visible yet (a padding row of the tile): keep the state empty.
                for (u32 kj = 0; kj < PREFILL_KEYS; ++kj) p[kj] = 0.0f;
                c_s[qi] = 1.0f;
            } else {
                const float correction = expf(m_old - m_new);
                float sum = 0.0f;
                for (u32 kj = 0; kj < PREFILL_KEYS; ++kj) {
                    const float e = expf(p[kj] - m_new);
                    p[kj] = e;
                    sum += e;
                }
                l_s[qi] = l_s[qi] * correction + sum;
                m_s[qi] = m_new;
                c_s[qi] = correction;
            }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < PREFILL_MAX_ACC; ++i) {
            const u32 e = threadIdx.x + i * blockDim.x;
            if (e < tile_rows * head_dim) {
                const u32 qi = e / head_dim;
                const u32 d = e - qi * head_dim;
                float sum = acc[i] * c_s[qi];
                for (u32 kj = 0; kj < PREFILL_KEYS; ++kj) sum += p_s[qi * PREFILL_KEYS + kj] * v_s[kj * head_dim + d];
                acc[i] = sum;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < PREFILL_MAX_ACC; ++i) {
        const u32 e = threadIdx.x + i * blockDim.x;
        if (e < tile_rows * head_dim) {
            const u32 qi = e / head_dim;
            const u32 d = e - qi * head_dim;
            if (qi < tile.rows) out[(u64)(tile.first_row + qi) * heads * head_dim + (u64)head * head_dim + d] = acc[i] / l_s[qi];
        }
    }
}
