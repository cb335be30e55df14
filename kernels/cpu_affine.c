/* Weight-only affine quantized linear layers for the CPU, with float32 activations and float32 accumulation.

   y[m, n] = bias[n] + sum_k x[m, k] * (q[n, k] * scale[n, g] + minimum[n, g]),   g = k / GROUP

   The weight is stored as unsigned codes in groups of GROUP (32) consecutive weights of a row, each group with its
   own float32 scale and minimum: 8-bit codes (one byte each, int8 format) or 4-bit codes (two per byte, in the
   layout kernels/cpu.py's repack_int4 makes of reference.py's int4 bytes). It is reference.py's
   dequantize-then-matmul computed without materialising the float32 weight: each weight row is expanded (in
   registers on AVX-512, into an L1-sized buffer in the portable loops) and dotted with every input row, so the
   weight bytes are read once per call whatever the number of rows.

   Split per group as  scale * dot(x_g, q_g) + minimum * sum(x_g)  it would save an FMA per weight, but expanding
   w = q * scale + minimum first keeps the arithmetic of reference.py (dequantize, then multiply-add).

   Built at first use by kernels/cpu.py (cc -O3 -march=native -fopenmp-simd) and called through ctypes; the call
   releases the GIL. Single-threaded: one core already reads the codes at the rate float32 weights stream at on the
   machines we measured; `first_row`/`rows` let a caller split the output rows across threads. */

#include <stddef.h>
#include <stdint.h>

#define GROUP 32

static void expand_row8(const uint8_t *restrict q, const float *restrict scale, const float *restrict minimum,
                        int64_t groups, float *restrict w) {
    for (int64_t g = 0; g < groups; g++) {
        const float s = scale[g], z = minimum[g];
        const uint8_t *restrict src = q + g * GROUP;
        float *restrict dst = w + g * GROUP;
#pragma omp simd
        for (int j = 0; j < GROUP; j++) dst[j] = (float)src[j] * s + z;
    }
}

/* 4-bit codes in the kernel's own layout (kernels/cpu.py repacks reference.py's): in each group of 32, byte j holds
   code j in its low nibble and code j + 16 in its high nibble, so both halves expand with contiguous stores. */
static void expand_row4(const uint8_t *restrict packed, const float *restrict scale, const float *restrict minimum,
                        int64_t groups, float *restrict w) {
    for (int64_t g = 0; g < groups; g++) {
        const float s = scale[g], z = minimum[g];
        const uint8_t *restrict src = packed + g * (GROUP / 2);
        float *restrict dst = w + g * GROUP;
#pragma omp simd
        for (int j = 0; j < GROUP / 2; j++) dst[j] = (float)(src[j] & 0x0F) * s + z;
#pragma omp simd
        for (int j = 0; j < GROUP / 2; j++) dst[j + GROUP / 2] = (float)(src[j] >> 4) * s + z;
    }
}

/* LANES partial sums per input row (several vector registers: FMA latency is hidden), summed pairwise at the end.
   dot_rows computes R input rows against one expanded weight row, sharing its loads; the arithmetic of each row is
   the same whatever R, so a row gives the same bits alone or in a batch. K is a multiple of GROUP == LANES. */
#define LANES 32

static inline float reduce(float *acc) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int j = 0; j < width; j++) acc[j] += acc[j + width];
    return acc[0];
}

static void dot_rows(const float *restrict x, int64_t k, int r, const float *restrict w, float *restrict out) {
    float acc[4][LANES];
    for (int i = 0; i < r; i++)
        for (int j = 0; j < LANES; j++) acc[i][j] = 0.0f;
    for (int64_t p = 0; p < k; p += LANES) {
        for (int i = 0; i < r; i++) {
            const float *restrict xi = x + i * k + p;
#pragma omp simd
            for (int j = 0; j < LANES; j++) acc[i][j] += xi[j] * w[p + j];
        }
    }
    for (int i = 0; i < r; i++) out[i] = reduce(acc[i]);
}

static void expand(const uint8_t *codes, int bits, int64_t row_bytes, const float *scale, const float *minimum,
                   int64_t groups, int64_t r, float *w) {
    if (bits == 8)
        expand_row8(codes + r * row_bytes, scale + r * groups, minimum + r * groups, groups, w);
    else
        expand_row4(codes + r * row_bytes, scale + r * groups, minimum + r * groups, groups, w);
}

#ifdef __AVX512F__
/* AVX-512 path: codes are widened to float32 in registers, w = code * scale + minimum, and each (weight row, input
   row) pair accumulates into two 16-lane sums (the group's two halves). A block is one weight row against RX input
   rows (1, or 4 sharing the widened codes); every pair's sequence of FMAs is the same in every block shape, so a row
   gives the same bits alone or batched. Blocks of several weight rows (2x4, 4x1) measured slower on an EPYC (Zen 4):
   one stream of codes at a time reads at 11-14 GB/s, several interleaved streams at 5-8. */
#include <immintrin.h>

static inline void codes_to_float(const uint8_t *restrict p, int bits, __m512 *lo, __m512 *hi) {
    if (bits == 8) {
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    } else {  /* 16 bytes: codes 0..15 in the low nibbles, 16..31 in the high ones */
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
        *lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0x0F)));
        *hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    }
}

#define DEFINE_BLOCK(RW, RX)                                                                                         \
    static void block_##RW##x##RX(const float *const *xs, int64_t groups, const uint8_t *codes, int bits,            \
                                  int64_t row_bytes, const float *scale, const float *minimum, int64_t r0,          \
                                  float out[4][4]) {                                                                 \
        __m512 acc[RW][RX][2];                                                                                       \
        for (int a = 0; a < RW; a++)                                                                                 \
            for (int i = 0; i < RX; i++) acc[a][i][0] = acc[a][i][1] = _mm512_setzero_ps();                          \
        const int64_t group_bytes = bits == 8 ? GROUP : GROUP / 2;                                                  \
        for (int64_t g = 0; g < groups; g++) {                                                                       \
            __m512 w[RW][2];                                                                                         \
            for (int a = 0; a < RW; a++) {                                                                           \
                const int64_t r = r0 + a;                                                                            \
                __m512 lo, hi;                                                                                       \
                codes_to_float(codes + r * row_bytes + g * group_bytes, bits, &lo, &hi);                            \
                const __m512 sc = _mm512_set1_ps(scale[r * groups + g]), mn = _mm512_set1_ps(minimum[r * groups + g]); \
                w[a][0] = _mm512_fmadd_ps(lo, sc, mn);                                                               \
                w[a][1] = _mm512_fmadd_ps(hi, sc, mn);                                                               \
            }                                                                                                        \
            for (int i = 0; i < RX; i++) {                                                                           \
                const __m512 x0 = _mm512_loadu_ps(xs[i] + g * GROUP), x1 = _mm512_loadu_ps(xs[i] + g * GROUP + 16);  \
                for (int a = 0; a < RW; a++) {                                                                       \
                    acc[a][i][0] = _mm512_fmadd_ps(x0, w[a][0], acc[a][i][0]);                                      \
                    acc[a][i][1] = _mm512_fmadd_ps(x1, w[a][1], acc[a][i][1]);                                      \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (int a = 0; a < RW; a++)                                                                                 \
            for (int i = 0; i < RX; i++) out[a][i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[a][i][0], acc[a][i][1])); \
    }

DEFINE_BLOCK(1, 1)
DEFINE_BLOCK(1, 4)

static void affine_avx512(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                          const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row,
                          int64_t rows) {
    const int64_t groups = k / GROUP, row_bytes = bits == 8 ? k : k / 2, last = first_row + rows;
    float out[4][4];
    for (int64_t i = 0; i < m; i += 4) {
        const int rx = m - i < 4 ? (int)(m - i) : 4;
        const float *xs[4];
        for (int j = 0; j < 4; j++) xs[j] = x + (i + (j < rx ? j : rx - 1)) * k;  /* pad with the last row */
        int64_t r = first_row;
        if (m == 1) {  /* one weight row at a time: one stream of codes, and it measured fastest (11-14 GB/s) */
            for (; r < last; r++) {
                block_1x1(xs, groups, codes, bits, row_bytes, scale, minimum, r, out);
                y[r] = out[0][0] + (bias ? bias[r] : 0.0f);
            }
            continue;
        }
        for (; r < last; r++) {
            block_1x4(xs, groups, codes, bits, row_bytes, scale, minimum, r, out);
            for (int j = 0; j < rx; j++) y[(i + j) * n + r] = out[0][j] + (bias ? bias[r] : 0.0f);
        }
    }
}
#endif

/* x [M, K] float32, codes [N, K] (bits 8) or [N, K/2] (bits 4) uint8, scale/minimum [N, K/GROUP] float32,
   bias [N] float32 or NULL, y [M, N] float32, w a scratch buffer of at least K floats. Computes output rows
   first_row .. first_row + rows - 1.
   Returns 0, or -1 when K is not a multiple of GROUP or bits is not 4 or 8. */
int affine_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                  const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row, int64_t rows,
                  float *w) {
    if (k % GROUP != 0 || (bits != 4 && bits != 8)) return -1;
#ifdef __AVX512F__
    (void)w;
    affine_avx512(x, m, k, codes, bits, scale, minimum, bias, y, n, first_row, rows);
    return 0;
#endif
    /* portable loops: one weight row at a time, expanded into w, against up to 4 input rows */
    const int64_t groups = k / GROUP;
    const int64_t row_bytes = bits == 8 ? k : k / 2;
    float out[4];
    for (int64_t r = first_row; r < first_row + rows; r++) {
        expand(codes, bits, row_bytes, scale, minimum, groups, r, w);
        const float b = bias ? bias[r] : 0.0f;
        for (int64_t t = 0; t < m; t += 4) {
            const int count = m - t < 4 ? (int)(m - t) : 4;
            dot_rows(x + t * k, k, count, w, out);
            for (int j = 0; j < count; j++) y[(t + j) * n + r] = out[j] + b;
        }
    }
    return 0;
}
