// Streaming-read bandwidth on 2 threads as a function of how many sequential streams each
// thread reads at once, with or without a software prefetch into L1: the question behind the
// decode kernels' "four streams per core" (one stream a core left this AVX2 VM at ~20 GB/s,
// four read 26-29; BENCHMARKS.md). Each thread reads its half of a 1 GiB buffer in huge pages,
// chunk by chunk, each chunk split into `streams` equal parts read in step.
//
//   gcc -O2 -mavx2 -mfma tools/stream_read.c -o /tmp/stream_read -lpthread && /tmp/stream_read
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>

#define FLOATS (1UL << 28)
#define THREADS 2

struct config {
    int streams;        // 1..8 sequential streams per thread
    int prefetch_bytes; // 0: hardware prefetchers only
    size_t chunk;       // floats per chunk
};

struct task {
    const float *base;
    size_t len;
    struct config cfg;
    float sum;
};

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float read_chunk(const float *p, struct config cfg) {
    size_t part = cfg.chunk / cfg.streams;
    __m256 acc[8];
    for (int s = 0; s < 8; s++) acc[s] = _mm256_setzero_ps();
    for (size_t i = 0; i < part; i += 16) {
        for (int s = 0; s < cfg.streams; s++) {
            const float *r = p + s * part + i;
            if (cfg.prefetch_bytes) _mm_prefetch((const char *)r + cfg.prefetch_bytes, _MM_HINT_T0);
            acc[s] = _mm256_fmadd_ps(_mm256_loadu_ps(r), _mm256_loadu_ps(r), acc[s]);
            acc[s] = _mm256_fmadd_ps(_mm256_loadu_ps(r + 8), _mm256_loadu_ps(r + 8), acc[s]);
        }
    }
    __m256 total = acc[0];
    for (int s = 1; s < 8; s++) total = _mm256_add_ps(total, acc[s]);
    float lanes[8];
    _mm256_storeu_ps(lanes, total);
    return lanes[0] + lanes[7];
}

static void *run_task(void *arg) {
    struct task *t = arg;
    float sum = 0;
    for (size_t c = 0; c + t->cfg.chunk <= t->len; c += t->cfg.chunk) sum += read_chunk(t->base + c, t->cfg);
    t->sum = sum;
    return NULL;
}

int main(void) {
    float *data = mmap(NULL, FLOATS * 4, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
        perror("mmap of 1 GiB");
        return 1;
    }
    madvise(data, FLOATS * 4, MADV_HUGEPAGE);
    // Written, not left zero: untouched anonymous memory reads as the shared zero page.
    for (size_t i = 0; i < FLOATS; i++) data[i] = 1.0f;
    const struct config configs[] = {
        {1, 0, 1 << 18},    {2, 0, 1 << 18},    {4, 0, 1 << 18},    {8, 0, 1 << 18},
        {1, 2048, 1 << 18}, {4, 2048, 1 << 18}, {1, 0, 1 << 12},    {4, 0, 1 << 12},
    };
    const int count = sizeof configs / sizeof configs[0];
    for (int round = 0; round < 3; round++) {
        for (int c = 0; c < count; c++) {
            double best = 0;
            for (int pass = 0; pass < 3; pass++) {
                pthread_t threads[THREADS];
                struct task tasks[THREADS];
                double start = now();
                for (int i = 0; i < THREADS; i++) {
                    tasks[i] = (struct task){data + i * (FLOATS / THREADS), FLOATS / THREADS, configs[c], 0};
                    pthread_create(&threads[i], NULL, run_task, &tasks[i]);
                }
                for (int i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
                double rate = FLOATS * 4.0 / (now() - start) / 1e9;
                if (rate > best) best = rate;
            }
            printf("round %d: %d stream(s) a thread, prefetch %4d B, chunk %4zu KiB: %.1f GB/s\n", round + 1,
                   configs[c].streams, configs[c].prefetch_bytes, configs[c].chunk * 4 / 1024, best);
        }
    }
    return 0;
}
