// Issue rate of the x86 dot-product instructions engram could build its float and integer
// products on, one core: 12 independent accumulator chains each, so latency is hidden and the
// loop measures throughput. Used to decide whether AVX-512 BF16 (vdpbf16ps) would beat widening
// 16-bit weights to f32 and using FMA (it does not on the Sapphire Rapids VM of BENCHMARKS.md).
//
//   gcc -O3 -mavx512f -mavx512vnni -mavx512bf16 tools/isa_throughput.c -o /tmp/isa && /tmp/isa
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define CHAINS 12
#define STEPS 20000000L

int main(void) {
    __m512 f[CHAINS], b[CHAINS];
    __m512i q[CHAINS];
    for (int i = 0; i < CHAINS; i++) {
        f[i] = _mm512_set1_ps(i * 1e-3f);
        b[i] = _mm512_setzero_ps();
        q[i] = _mm512_set1_epi32(i);
    }
    const __m512 scale = _mm512_set1_ps(0.9999f), add = _mm512_set1_ps(1e-4f);
    const __m512i bytes = _mm512_set1_epi32(0x01010101);
    const __m512bh halves = (__m512bh)_mm512_set1_epi32(0x3f803f80);

    double t = now();
    for (long s = 0; s < STEPS; s++)
        for (int i = 0; i < CHAINS; i++) f[i] = _mm512_fmadd_ps(f[i], scale, add);
    double fma = STEPS * CHAINS / (now() - t);

    t = now();
    for (long s = 0; s < STEPS; s++)
        for (int i = 0; i < CHAINS; i++) b[i] = _mm512_dpbf16_ps(b[i], halves, halves);
    double bf16 = STEPS * CHAINS / (now() - t);

    t = now();
    for (long s = 0; s < STEPS; s++)
        for (int i = 0; i < CHAINS; i++) q[i] = _mm512_dpbusd_epi32(q[i], bytes, bytes);
    double vnni = STEPS * CHAINS / (now() - t);

    float sink = 0;
    int isink = 0;
    for (int i = 0; i < CHAINS; i++) {
        sink += _mm512_reduce_add_ps(f[i]) + _mm512_reduce_add_ps(b[i]);
        isink += _mm512_reduce_add_epi32(q[i]);
    }
    printf("vfmadd231ps (f32):   %.2f G instr/s = %6.1f GFLOP/s\n", fma / 1e9, fma * 32 / 1e9);
    printf("vdpbf16ps (bf16):    %.2f G instr/s = %6.1f GFLOP/s\n", bf16 / 1e9, bf16 * 64 / 1e9);
    printf("vpdpbusd (u8 x s8):  %.2f G instr/s = %6.1f GOP/s\n", vnni / 1e9, vnni * 128 / 1e9);
    printf("(checksums %g %d)\n", sink, isink);
    return 0;
}
