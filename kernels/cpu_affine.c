/* Weight-only affine quantized linear layers for the CPU, with float32 activations and float32 accumulation.

   y[m, n] = bias[n] + sum_k x[m, k] * (q[n, k] * scale[n, g] + minimum[n, g]),   g = k / GROUP

   The weight is stored as unsigned codes in groups of GROUP (32) consecutive weights of a row, each group with its
   own float32 scale and minimum: 8-bit codes (one byte each, int8 format) or 4-bit codes (two per byte, the first
   in the high nibble: kernels/reference.py's int4 layout). It is exactly reference.py's dequantize-then-matmul,
   computed without materialising the float32 weight: each output row is expanded into a small buffer (it stays in
   L1) and dotted with every input row, so the weight bytes are read once per call whatever the number of rows.

   Split per group as  scale * dot(x_g, q_g) + minimum * sum(x_g)  it would be cheaper, but the dot of the integer
   codes is a different rounding order from the reference; expanding the row keeps the result within float32
   rounding of the reference for any input.

   Built at first use by kernels/cpu.py (gcc -O3 -march=native -fopenmp-simd) and called through ctypes; the call
   releases the GIL. Single-threaded: a peer's decode is bound by memory bandwidth, which one core already saturates
   on the machines we measured; `first_row`/`rows` let a caller split the output rows across threads. */

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

/* Two weight rows against four input rows: each loaded input vector feeds two FMAs. Same per-row arithmetic as
   dot_rows, so the result does not depend on which path a row took. */
static void dot_2x4(const float *restrict x, int64_t k, const float *restrict w0, const float *restrict w1,
                    float *restrict out0, float *restrict out1) {
    float a0[4][LANES], a1[4][LANES];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < LANES; j++) a0[i][j] = a1[i][j] = 0.0f;
    for (int64_t p = 0; p < k; p += LANES) {
        for (int i = 0; i < 4; i++) {
            const float *restrict xi = x + i * k + p;
#pragma omp simd
            for (int j = 0; j < LANES; j++) {
                a0[i][j] += xi[j] * w0[p + j];
                a1[i][j] += xi[j] * w1[p + j];
            }
        }
    }
    for (int i = 0; i < 4; i++) {
        out0[i] = reduce(a0[i]);
        out1[i] = reduce(a1[i]);
    }
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
   bias [N] float32 or NULL, y [M, N] float32, w a scratch buffer of 2 K floats. Output rows first_row..first_row+rows.
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
    const int64_t groups = k / GROUP;
    const int64_t row_bytes = bits == 8 ? k : k / 2;
    const int64_t last = first_row + rows;
    float out[2][4];
    for (int64_t r = first_row; r < last; r += 2) {
        const int pair = r + 1 < last && m >= 4;  /* two weight rows at once pays off with several input rows */
        expand(codes, bits, row_bytes, scale, minimum, groups, r, w);
        if (pair) expand(codes, bits, row_bytes, scale, minimum, groups, r + 1, w + k);
        int64_t i = 0;
        if (pair) {
            for (; i + 4 <= m; i += 4) {
                dot_2x4(x + i * k, k, w, w + k, out[0], out[1]);
                for (int j = 0; j < 4; j++) {
                    y[(i + j) * n + r] = out[0][j] + (bias ? bias[r] : 0.0f);
                    y[(i + j) * n + r + 1] = out[1][j] + (bias ? bias[r + 1] : 0.0f);
                }
            }
        }
        for (int64_t q = 0; q < (pair ? 2 : 1); q++) {
            const float b = bias ? bias[r + q] : 0.0f;
            for (int64_t t = i; t < m; t += 4) {
                const int count = m - t < 4 ? (int)(m - t) : 4;
                dot_rows(x + t * k, k, count, w + q * k, out[0]);
                for (int j = 0; j < count; j++) y[(t + j) * n + r + q] = out[0][j] + b;
            }
        }
        if (!pair) r -= 1;  /* one row done */
    }
    return 0;
}
