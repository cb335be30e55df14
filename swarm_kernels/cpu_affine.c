/* Weight-only affine quantized linear layers for the CPU, with float32 activations and float32 accumulation.

   y[m, n] = bias[n] + sum_k x[m, k] * (q[n, k] * scale[n, g] + minimum[n, g]),   g = k / GROUP

   The weight is stored as unsigned codes in groups of GROUP (32) consecutive weights of a row, each group with its
   own float32 scale and minimum: 8-bit codes (one byte each, int8 format) or 4-bit codes (two per byte, in the
   layout swarm_kernels/cpu.py's repack_int4 makes of reference.py's int4 bytes). It is reference.py's
   dequantize-then-matmul computed without materialising the float32 weight: each weight is expanded once per call
   (per 128 input rows) and used for every input row, so the cost of reading and expanding the codes is spread over
   the rows: into a float32 tile of NB weight rows that register-blocked micro-kernels multiply against the input
   rows (AVX2; AVX-512 from 16 input rows, for rows of at most 1024 weights), else in registers; into one weight
   row's buffer in the portable loops.

   Three paths, chosen at compile time by the instruction set: AVX-512, AVX2 + FMA, portable C (vectorized by the
   compiler for what it targets). Each sums a row in a fixed order that does not depend on the number of rows in the
   call (`affine_sum_lanes`: 32 partial sums on AVX-512 and in the portable loops, 8 on AVX2, added pairwise at the
   end; swarm_kernels/tolerance.py derives the parity bound from it), except on a CPU with AMX-BF16: there the
   AVX-512 build has a fourth path, for calls of five rows or more, the tile unit's (cpu_amx.h), float32-accurate in
   another order, so a row's bits depend on whether its call had five rows or more.

   Split per group as  scale * dot(x_g, q_g) + minimum * sum(x_g)  it would save an FMA per weight, but expanding
   w = q * scale + minimum first keeps the arithmetic of reference.py (dequantize, then multiply-add).

   Built at first use by swarm_kernels/cpu.py (cc -O3 -march=native -fopenmp-simd -pthread) and called through ctypes;
   the call releases the GIL. `affine_linear` computes output rows first_row .. first_row + rows - 1 on the calling
   thread; `affine_linear_parallel` splits a call's output rows over the threads of a small pool
   (`affine_set_threads`, Linux only; elsewhere one thread): each thread computes whole rows, in the same order as
   alone, so the result is the same bits whatever the thread count. */

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32

#if defined(__AVX512F__)
/* AVX-512 path: w = code * scale + minimum (one FMA), and each (weight row, input row) pair accumulates into two
   16-lane sums (the group's two halves), added at the end and reduced 16 pairs at a time (`reduce_pairs`). Few input
   rows: codes are widened to float32 in registers, a block being one weight row against 1 input row or 4 sharing
   the widened codes (blocks of several weight rows, 2x4, 4x1, measured slower on an EPYC (Zen 4): one stream of
   codes at a time reads at 11-14 GB/s, several interleaved streams at 5-8). Every pair's sequence of FMAs and adds
   is the same in every block and tile shape, so a row gives the same bits alone or batched on this path (cpu_amx.h
   takes calls of five rows or more where it is built). */
#include <immintrin.h>

#define SUM_LANES 32

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

/* One weight row r against RX input rows xs[0..RX-1] sharing its widened codes: per pair, the two halves' sums from
   zero, FMAs in increasing k, then lo + hi into v[i * stride]. */
#define DEFINE_BLOCK(RX)                                                                                             \
    static inline void block_##RX(const float *const *xs, int64_t groups, const uint8_t *codes, int bits,           \
                                  int64_t row_bytes, const float *scale, const float *minimum, int64_t r, __m512 *v, \
                                  int64_t stride) {                                                                  \
        __m512 acc[RX][2];                                                                                           \
        for (int i = 0; i < RX; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();                                    \
        const int64_t group_bytes = bits == 8 ? GROUP : GROUP / 2;                                                  \
        for (int64_t g = 0; g < groups; g++) {                                                                       \
            __m512 lo, hi;                                                                                           \
            codes_to_float(codes + r * row_bytes + g * group_bytes, bits, &lo, &hi);                                \
            const __m512 sc = _mm512_set1_ps(scale[r * groups + g]), mn = _mm512_set1_ps(minimum[r * groups + g]);  \
            const __m512 w0 = _mm512_fmadd_ps(lo, sc, mn), w1 = _mm512_fmadd_ps(hi, sc, mn);                         \
            for (int i = 0; i < RX; i++) {                                                                           \
                acc[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xs[i] + g * GROUP), w0, acc[i][0]);                     \
                acc[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(xs[i] + g * GROUP + 16), w1, acc[i][1]);                \
            }                                                                                                        \
        }                                                                                                            \
        for (int i = 0; i < RX; i++) v[i * stride] = _mm512_add_ps(acc[i][0], acc[i][1]);                            \
    }

DEFINE_BLOCK(1)
DEFINE_BLOCK(4)

/* Many input rows: a tile of NB weight rows is widened once into float32 (all K columns), each weight by the same
   FMA as in the blocks, and register-blocked micro-kernels multiply it against RM input rows x RN weight rows at a
   time (6 x 2: 24 sums in 2 x 12 registers, 16 loads per 24 FMAs), so a weight is widened once per MC input rows
   instead of once per 4. Measured on a Zen 4 EPYC, one thread, SmolLM2's shapes (benchmarks/kernels.py, time ÷
   oneDNN's float32 GEMM in the same run, int4 / int8): 16 rows 0.86-0.96 / 0.93-1.11 against 0.92-1.15 /
   0.96-1.39 for the blocks, 128 rows 0.97-1.11 / 0.97-1.14 against 1.33-1.47 / 1.38-1.76; 4 and 8 rows slower
   than the blocks; rows of 1536 weights (the MLP's down projection) no faster: its 6 input rows no longer fit L1
   beside the tile. */
#define NB 16               /* weight rows per widened tile (16 x K floats: 36 KiB for K = 576) */
#define MC 128              /* input rows per pass over the weight */
#define TILED_ROWS 16       /* fewer input rows: widened in registers */
#define TILED_COLUMNS 1024  /* longer weight rows: widened in registers */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define AFFINE_AMX 1        /* calls of five rows or more on the tile unit: cpu_amx.h */
#define SCRATCH_FLOATS(k) (NB * (k))  /* its 16 x K bfloat16 codes and 64 bytes to align them fit */
#else
#define SCRATCH_FLOATS(k) ((k) <= TILED_COLUMNS ? NB * (k) : 1)
#endif

/* Keeps v in a register: GCC would otherwise fold the loads into the FMAs, loading each operand once per use. */
#define IN_REGISTER(v) __asm__("" : "+v"(v))

/* Weight rows r0 .. r0 + nb - 1 widened into w [NB][k] (rows nb .. NB - 1: zeros, computed, never stored). */
static void widen_tile(const uint8_t *codes, int bits, int64_t row_bytes, const float *scale, const float *minimum,
                       int64_t groups, int64_t r0, int64_t nb, float *restrict w) {
    const int64_t k = groups * GROUP, group_bytes = bits == 8 ? GROUP : GROUP / 2;
    for (int64_t a = 0; a < nb; a++) {
        const int64_t r = r0 + a;
        for (int64_t g = 0; g < groups; g++) {
            __m512 lo, hi;
            codes_to_float(codes + r * row_bytes + g * group_bytes, bits, &lo, &hi);
            const __m512 sc = _mm512_set1_ps(scale[r * groups + g]), mn = _mm512_set1_ps(minimum[r * groups + g]);
            _mm512_storeu_ps(w + a * k + g * GROUP, _mm512_fmadd_ps(lo, sc, mn));
            _mm512_storeu_ps(w + a * k + g * GROUP + 16, _mm512_fmadd_ps(hi, sc, mn));
        }
    }
    for (int64_t a = nb; a < NB; a++)
        for (int64_t c = 0; c < k; c++) w[a * k + c] = 0.0f;
}

/* The sums of up to 16 pairs' accumulators v[0..15] (each already lo + hi: 16 lanes) into y[0 .. nb - 1], plus
   bias[0 .. nb - 1] (NULL: zeros). Every sum in the same tree, lane i + lane i + 8, then + 4, + 2, + 1, computed for
   16 pairs at once by shuffles (~3 operations a pair instead of ~10 for one reduction at a time); the order does not
   depend on the compiler's _mm512_reduce_add_ps. Entries of v past nb are read, never stored. */
static inline void reduce_pairs(const __m512 *v, int64_t nb, const float *bias, float *y) {
    __m512 u[8], w[4], x[2];
    for (int t = 0; t < 8; t++)  /* lanes 0-7: pair 2t's i + i + 8; lanes 8-15: pair 2t + 1's */
        u[t] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * t], v[2 * t + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * t], v[2 * t + 1], 0xEE));
    for (int t = 0; t < 4; t++)  /* quarter q: pair 4t + q's i + i + 4 */
        w[t] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * t], u[2 * t + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * t], u[2 * t + 1], 0xDD));
    for (int t = 0; t < 2; t++)  /* quarter q: pairs 8t + q, 8t + 4 + q, two lanes each (i + i + 2) */
        x[t] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * t], w[2 * t + 1], 0x44),
                             _mm512_shuffle_ps(w[2 * t], w[2 * t + 1], 0xEE));
    /* lane 4q + t: pair 4t + q's sum (lane 0 + lane 1) */
    const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __mmask16 keep = (__mmask16)((1u << nb) - 1u);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(y, keep, _mm512_add_ps(_mm512_permutexvar_ps(order, sums), b));
}

/* v[i * NB + j] = the sums of x[i] . w[j] (lo + hi) for RM input rows (x, row stride k) and RN weight rows of the
   tile (w, row stride k). */
#define DEFINE_TILE(RM, RN)                                                                                          \
    static inline void tile_##RM##x##RN(const float *restrict x, int64_t k, const float *restrict w, __m512 *v) {   \
        __m512 c[RM][RN][2];                                                                                         \
        for (int i = 0; i < RM; i++)                                                                                 \
            for (int j = 0; j < RN; j++) c[i][j][0] = c[i][j][1] = _mm512_setzero_ps();                               \
        for (int64_t p = 0; p < k; p += GROUP) {                                                                     \
            __m512 w0[RN], w1[RN];                                                                                   \
            for (int j = 0; j < RN; j++) {                                                                           \
                w0[j] = _mm512_loadu_ps(w + j * k + p);                                                              \
                w1[j] = _mm512_loadu_ps(w + j * k + p + 16);                                                         \
                IN_REGISTER(w0[j]);                                                                                  \
                IN_REGISTER(w1[j]);                                                                                  \
            }                                                                                                        \
            for (int i = 0; i < RM; i++) {                                                                           \
                __m512 x0 = _mm512_loadu_ps(x + i * k + p), x1 = _mm512_loadu_ps(x + i * k + p + 16);                \
                IN_REGISTER(x0);                                                                                     \
                IN_REGISTER(x1);                                                                                     \
                for (int j = 0; j < RN; j++) {                                                                       \
                    c[i][j][0] = _mm512_fmadd_ps(x0, w0[j], c[i][j][0]);                                            \
                    c[i][j][1] = _mm512_fmadd_ps(x1, w1[j], c[i][j][1]);                                            \
                }                                                                                                    \
            }                                                                                                        \
        }                                                                                                            \
        for (int i = 0; i < RM; i++)                                                                                 \
            for (int j = 0; j < RN; j++) v[i * NB + j] = _mm512_add_ps(c[i][j][0], c[i][j][1]);                      \
    }

DEFINE_TILE(6, 2)
DEFINE_TILE(4, 2)
DEFINE_TILE(2, 4)
DEFINE_TILE(1, 4)

#define TILES(RM, RN)                                                                                                \
    for (; i + RM <= mc; i += RM) {                                                                                  \
        for (int64_t j = 0; j < NB; j += RN) tile_##RM##x##RN(x + i * k, k, w + j * k, v + j);                      \
        for (int a = 0; a < RM; a++) reduce_pairs(v + a * NB, nb, bias, y + (i + a) * n);                           \
    }

/* mc input rows (x, row stride k) against the tile's NB rows (nb of them real) into y (row stride n). */
static void multiply_tile(const float *x, int64_t mc, int64_t k, const float *w, int64_t nb,
                          const float *bias, float *y, int64_t n) {
    __m512 v[6 * NB];
    int64_t i = 0;
    TILES(6, 2)
    TILES(4, 2)
    TILES(2, 4)
    TILES(1, 4)
}

static void affine_avx512(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                          const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row,
                          int64_t rows, float *scratch) {
    const int64_t groups = k / GROUP, row_bytes = bits == 8 ? k : k / 2, last = first_row + rows;
    if (m < TILED_ROWS || k > TILED_COLUMNS) {  /* widened in registers, for 1 or 4 input rows at a time */
        __m512 v[4 * NB];
        for (int64_t i = 0; i < m; i += 4) {
            const int rx = m - i < 4 ? (int)(m - i) : 4;
            const float *xs[4];
            for (int j = 0; j < 4; j++) xs[j] = x + (i + (j < rx ? j : rx - 1)) * k;  /* pad with the last row */
            for (int64_t r0 = first_row; r0 < last; r0 += NB) {
                const int64_t nb = last - r0 < NB ? last - r0 : NB;
                for (int64_t a = 0; a < nb; a++) {
                    if (rx == 1)  /* one stream of codes at a time: one weight row per block measured fastest */
                        block_1(xs, groups, codes, bits, row_bytes, scale, minimum, r0 + a, v + a, NB);
                    else
                        block_4(xs, groups, codes, bits, row_bytes, scale, minimum, r0 + a, v + a, NB);
                }
                for (int64_t a = nb; a < NB; a++)  /* read by reduce_pairs, never stored */
                    for (int j = 0; j < 4; j++) v[j * NB + a] = _mm512_setzero_ps();
                for (int j = 0; j < rx; j++) reduce_pairs(v + j * NB, nb, bias ? bias + r0 : NULL, y + (i + j) * n + r0);
            }
        }
        return;
    }
    for (int64_t m0 = 0; m0 < m; m0 += MC) {
        const int64_t mc = m - m0 < MC ? m - m0 : MC;
        for (int64_t r0 = first_row; r0 < last; r0 += NB) {
            const int64_t nb = last - r0 < NB ? last - r0 : NB;
            widen_tile(codes, bits, row_bytes, scale, minimum, groups, r0, nb, scratch);
            multiply_tile(x + m0 * k, mc, k, scratch, nb, bias ? bias + r0 : NULL, y + m0 * n + r0, n);
        }
    }
}
#if defined(AFFINE_AMX)
#include "cpu_amx.h"
#endif
#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 + FMA path, built for many rows (prefill chunks, decode batches). A tile of NB weight rows x up to KC columns
   is dequantized once into a float32 buffer (w = code * scale + minimum, one FMA), and register-blocked
   micro-kernels multiply it against every input row, RM input rows x RN weight rows at a time (6 x 2: 12 sums in
   registers, 8 loads per 12 FMAs), so each weight is decoded once per MC input rows and its cost is spread over
   them. Every (input row, weight row) pair sums into one 8-lane register (lane l: the products of k = l mod 8, in
   increasing k, by FMAs), kept in `acc` between column tiles, and its lanes are added pairwise at the end,
   ((0+1)+(2+3))+((4+5)+(6+7)), then the bias: the same operations in the same order whatever the tile shapes and
   sizes, so a row gives the same bits alone or in a batch of any size. swarm_kernels/tolerance.py bounds this order as 8
   lanes (`affine_sum_lanes`). One input row (a decode step) skips the tile: `one_row` dequantizes in registers.
   On a Zen 3 EPYC the 6 x 2 tile alone ran at ~90% of the FMA peak (a one-off timing on L2-resident data), and a
   whole call at 128 rows about as fast as oneDNN's float32 GEMM (benchmarks/kernels.py). */
#include <immintrin.h>

#define SUM_LANES 8
#define NB 16   /* weight rows per dequantized tile (a multiple of every RN below) */
#define KC 768  /* at most this many columns per tile: NB x KC floats = 48 KiB, in L2 next to the accumulators */
#define MC 128  /* input rows per pass: their accumulators, MC x NB x 8 floats = 64 KiB, stay in L2 */

/* Keeps v in a register: GCC would otherwise fold the loads into the FMAs, loading each operand once per use. */
#define IN_REGISTER(v) __asm__("" : "+x"(v))

typedef struct {
    const uint8_t *codes;
    const float *scale, *minimum;
    int bits;
    int64_t groups, row_bytes;
} weight_t;

/* Rows r0 .. r0 + nb - 1, columns k0 .. k0 + kc - 1 of the weight into w [NB][ldw] (rows past nb: zeros). */
static void dequantize_tile(const weight_t *wt, int64_t r0, int64_t nb, int64_t k0, int64_t kc, float *restrict w,
                            int64_t ldw) {
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    for (int64_t a = 0; a < nb; a++) {
        const int64_t r = r0 + a;
        float *restrict dst = w + a * ldw;
        for (int64_t c = 0; c < kc; c += GROUP) {
            const int64_t g = r * wt->groups + (k0 + c) / GROUP;
            const __m256 s = _mm256_set1_ps(wt->scale[g]), z = _mm256_set1_ps(wt->minimum[g]);
            if (wt->bits == 8) {
                const uint8_t *p = wt->codes + r * wt->row_bytes + k0 + c;
                for (int h = 0; h < GROUP; h += 8) {
                    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + h))));
                    _mm256_storeu_ps(dst + c + h, _mm256_fmadd_ps(q, s, z));
                }
            } else {  /* 16 bytes: codes 0..15 in the low nibbles, 16..31 in the high ones */
                const uint8_t *p = wt->codes + r * wt->row_bytes + (k0 + c) / 2;
                for (int h = 0; h < GROUP / 2; h += 8) {
                    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + h)));
                    const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, nibble));
                    const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                    _mm256_storeu_ps(dst + c + h, _mm256_fmadd_ps(lo, s, z));
                    _mm256_storeu_ps(dst + c + GROUP / 2 + h, _mm256_fmadd_ps(hi, s, z));
                }
            }
        }
    }
    for (int64_t a = nb; a < NB; a++)  /* computed by the widest tile, never stored */
        for (int64_t c = 0; c < kc; c++) w[a * ldw + c] = 0.0f;
}

/* acc[i * NB + j] (8 floats each) += x[i] . w[j] over kc columns, for RM input rows (x, row stride k) and RN weight
   rows (w, row stride ldw); `first` starts the sums at zero. */
#define DEFINE_TILE(RM, RN)                                                                                          \
    static inline void tile_##RM##x##RN(const float *restrict x, int64_t k, const float *restrict w, int64_t ldw,   \
                                        int64_t kc, float *restrict acc, int first) {                                \
        __m256 c[RM][RN];                                                                                            \
        for (int i = 0; i < RM; i++)                                                                                 \
            for (int j = 0; j < RN; j++)                                                                             \
                c[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + (i * NB + j) * SUM_LANES);             \
        for (int64_t p = 0; p < kc; p += SUM_LANES) {                                                                \
            __m256 wv[RN];                                                                                           \
            for (int j = 0; j < RN; j++) {                                                                           \
                wv[j] = _mm256_loadu_ps(w + j * ldw + p);                                                            \
                IN_REGISTER(wv[j]);                                                                                  \
            }                                                                                                        \
            for (int i = 0; i < RM; i++) {                                                                           \
                __m256 xv = _mm256_loadu_ps(x + i * k + p);                                                          \
                IN_REGISTER(xv);                                                                                     \
                for (int j = 0; j < RN; j++) c[i][j] = _mm256_fmadd_ps(xv, wv[j], c[i][j]);                          \
            }                                                                                                        \
        }                                                                                                            \
        for (int i = 0; i < RM; i++)                                                                                 \
            for (int j = 0; j < RN; j++) _mm256_storeu_ps(acc + (i * NB + j) * SUM_LANES, c[i][j]);                 \
    }

DEFINE_TILE(6, 2)
DEFINE_TILE(4, 2)
DEFINE_TILE(2, 4)
DEFINE_TILE(1, 8)

#define TILES(RM, RN)                                                                                                \
    for (; i + RM <= mc; i += RM)                                                                                    \
        for (int64_t j = 0; j < nb; j += RN)                                                                         \
            tile_##RM##x##RN(x + i * k, k, w + j * ldw, ldw, kc, acc + (i * NB + j) * SUM_LANES, first);

/* mc input rows (x, row stride k) against the nb rows of the tile w: 6 rows at a time, then 4, 2, 1. */
static void multiply_tile(const float *x, int64_t mc, int64_t k, const float *w, int64_t ldw, int64_t kc, int64_t nb,
                          float *acc, int first) {
    int64_t i = 0;
    TILES(6, 2)
    TILES(4, 2)
    TILES(2, 4)
    TILES(1, 8)
}

/* The lanes of 8 accumulators a[0..7] summed pairwise, each ((0+1)+(2+3))+((4+5)+(6+7)): sum j in lane j. */
static inline __m256 reduce8(const float *a) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(a + 8));
    const __m256 t1 = _mm256_hadd_ps(_mm256_loadu_ps(a + 16), _mm256_loadu_ps(a + 24));
    const __m256 t2 = _mm256_hadd_ps(_mm256_loadu_ps(a + 32), _mm256_loadu_ps(a + 40));
    const __m256 t3 = _mm256_hadd_ps(_mm256_loadu_ps(a + 48), _mm256_loadu_ps(a + 56));
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  /* (0+1)+(2+3) | (4+5)+(6+7) */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static void store_rows(const float *acc, int64_t mc, int64_t nb, const float *bias, float *y, int64_t n) {
    for (int64_t i = 0; i < mc; i++)
        for (int64_t j = 0; j < nb; j += 8) {
            const __m256 sums = reduce8(acc + (i * NB + j) * SUM_LANES);
            if (j + 8 <= nb) {
                _mm256_storeu_ps(y + i * n + j, bias ? _mm256_add_ps(sums, _mm256_loadu_ps(bias + j)) : sums);
                continue;
            }
            float out[8];
            _mm256_storeu_ps(out, sums);
            for (int64_t l = 0; j + l < nb; l++) y[i * n + j + l] = bias ? out[l] + bias[j + l] : out[l];
        }
}

/* Column tiles of at most KC columns, as even as whole groups allow (1536 = 2 x 768). */
static int64_t tile_columns(int64_t k) {
    const int64_t tiles = (k + KC - 1) / KC, groups = k / GROUP;
    return (groups + tiles - 1) / tiles * GROUP;
}

/* One input row (a decode step) against weight rows r0 .. r0 + rw - 1, into acc[0 .. rw - 1]: with no other rows to
   share it, each weight is dequantized in registers and used at once. The same operations as dequantize_tile and
   the tiles (w = code * scale + minimum by an FMA; per lane, FMAs in increasing k from zero), so the same bits.
   Rows past `last` repeat the last one (computed, never stored). rw: 4 for 4-bit codes, 8 for 8-bit (measured). */
static inline void one_row(const weight_t *wt, const float *x, int64_t r0, int64_t last, float *acc, const int rw) {
    const __m256i nibble = _mm256_set1_epi32(0x0F);
    const int64_t group_bytes = GROUP * wt->bits / 8;
    const uint8_t *p[8];
    const float *sc[8], *mn[8];
    __m256 c[8];
    for (int a = 0; a < rw; a++) {
        const int64_t r = r0 + a < last ? r0 + a : last - 1;
        p[a] = wt->codes + r * wt->row_bytes;
        sc[a] = wt->scale + r * wt->groups;
        mn[a] = wt->minimum + r * wt->groups;
        c[a] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < wt->groups; g++) {
        const float *xg = x + g * GROUP;
        for (int a = 0; a < rw; a++) {
            const uint8_t *q = p[a] + g * group_bytes;
            if (wt->bits == 4) __builtin_prefetch(q + 256, 0, 0);  /* 16 groups on: measured faster (not for 8-bit) */
            const __m256 s = _mm256_set1_ps(sc[a][g]), z = _mm256_set1_ps(mn[a][g]);
            if (wt->bits == 8) {
                for (int h = 0; h < GROUP; h += 8) {
                    const __m128i b = _mm_loadl_epi64((const __m128i *)(q + h));
                    const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), s, z);
                    c[a] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + h), w, c[a]);
                }
            } else {  /* columns 0-7, 8-15 from the low nibbles of bytes 0-7, 8-15; then 16-23, 24-31 from the high */
                const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
                const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
                const __m256i codes[4] = {_mm256_and_si256(b0, nibble), _mm256_and_si256(b1, nibble),
                                          _mm256_srli_epi32(b0, 4), _mm256_srli_epi32(b1, 4)};
                for (int h = 0; h < 4; h++) {
                    const __m256 w = _mm256_fmadd_ps(_mm256_cvtepi32_ps(codes[h]), s, z);
                    c[a] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + 8 * h), w, c[a]);
                }
            }
        }
    }
    for (int a = 0; a < rw; a++) _mm256_storeu_ps(acc + a * SUM_LANES, c[a]);
}

static void one_row4(const weight_t *wt, const float *x, int64_t r0, int64_t last, float *acc) {
    one_row(wt, x, r0, last, acc, 4);
}

static void one_row8(const weight_t *wt, const float *x, int64_t r0, int64_t last, float *acc) {
    one_row(wt, x, r0, last, acc, 8);
}

static void affine_avx2(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                        const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row, int64_t rows,
                        float *scratch) {
    const weight_t wt = {codes, scale, minimum, bits, k / GROUP, bits == 8 ? k : k / 2};
    const int64_t last = first_row + rows, ldw = tile_columns(k);
    float *w = scratch, *acc = scratch + NB * KC;
    if (m == 1) {
        for (int64_t r0 = first_row; r0 < last; r0 += NB) {
            const int64_t nb = last - r0 < NB ? last - r0 : NB;
            for (int64_t a = 0; a < nb; a += bits == 8 ? 8 : 4)
                (bits == 8 ? one_row8 : one_row4)(&wt, x, r0 + a, last, acc + a * SUM_LANES);
            store_rows(acc, 1, nb, bias ? bias + r0 : NULL, y + r0, n);
        }
        return;
    }
    for (int64_t m0 = 0; m0 < m; m0 += MC) {
        const int64_t mc = m - m0 < MC ? m - m0 : MC;
        for (int64_t r0 = first_row; r0 < last; r0 += NB) {
            const int64_t nb = last - r0 < NB ? last - r0 : NB;
            for (int64_t i = 0; i < mc; i++)  /* the output lines store_rows writes, one per row: fetched meanwhile */
                __builtin_prefetch(y + (m0 + i) * n + r0, 1, 2);
            for (int64_t k0 = 0; k0 < k; k0 += ldw) {
                const int64_t kc = k - k0 < ldw ? k - k0 : ldw;
                dequantize_tile(&wt, r0, nb, k0, kc, w, ldw);
                multiply_tile(x + m0 * k + k0, mc, k, w, ldw, kc, nb, acc, k0 == 0);
            }
            store_rows(acc, mc, nb, bias ? bias + r0 : NULL, y + m0 * n + r0, n);
        }
    }
}

#define SCRATCH_FLOATS(k) (NB * KC + MC * NB * SUM_LANES)
#else
/* Portable loops. */
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

/* 4-bit codes in the kernel's own layout (swarm_kernels/cpu.py repacks reference.py's): in each group of 32, byte j holds
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
#define SUM_LANES LANES
#define SCRATCH_FLOATS(k) (k)

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

/* one weight row at a time, expanded into w (K floats), against up to 4 input rows */
static void affine_portable(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                            const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row,
                            int64_t rows, float *w) {
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
}
#endif

/* The floats of scratch affine_linear needs for K input features. */
int64_t affine_scratch_floats(int64_t k) {
    (void)k;
    return SCRATCH_FLOATS(k);
}

/* ---- The pool: affine_linear_parallel's helper threads (Linux: futexes; elsewhere every call runs alone). ----

   A call makes a job (its arguments, its output rows cut into chunks of whole 16-row tiles, a counter of the next
   chunk to claim, one of the chunks done), hands it to up to threads - 1 helpers (each through its own slot and
   counter, waking it if it sleeps there) and claims chunks itself until none is left, then waits for the chunks the
   helpers claimed. Chunks are claimed, not assigned: a helper that is slow to start (asleep, or its core busy with
   another process) costs the call nothing, the caller computes its share, and only a chunk a helper is in the
   middle of is waited for. Jobs are counted references: a helper that arrives after its job ended finds no chunk
   and drops it. An idle helper polls its counter for spin_ns (2 ms; after POLITE_NS yielding the core at every
   check, so that other runnable threads go first) before it sleeps on it (a futex): a forward calls the kernel a
   few hundred times with up to a few hundred microseconds of other work in between, and a helper woken from its
   sleep (~0.1 ms here) arrives after most of a call is done. Measured on a 2-core AVX2 EPYC, a 16-row decode of
   SmolLM2's 30 int4 blocks spent 79 → 45 ms in the kernel on 2 threads; and two processes each splitting over
   2 threads on those 2 cores took 75 ms a forward against 69 ms on one thread each (assigned halves instead of
   claimed chunks, with a 0.2 ms spin, took 150 against 80: every call waited for a helper without a core). Several threads of a process may call at once (each computes its
   own job's unclaimed chunks; a helper serves the latest job handed to it). Helpers get their own scratch, grown as
   needed (a helper without memory for it claims nothing). */
#if defined(__linux__)
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 16
#define POLITE_NS 50000  /* an idle helper spins this long before it yields the core at every check */

typedef struct {
    const float *x, *scale, *minimum, *bias;
    const uint8_t *codes;
    float *y;
    int64_t m, k, n, chunk_rows, chunks;
    int bits;
    const void *packed;             /* the activations as cpu_amx.h packed them (NULL: not on that path) */
    void (*work)(void *, int64_t);  /* a job of another kernel (affine_pool_run): chunk c is work(context, c) */
    void *context;
    _Atomic int64_t next, done;  /* the next chunk to claim; chunks finished */
    _Atomic int refs;            /* the caller and each helper it was handed to */
} job_t;

static _Atomic(job_t *) slot[MAX_THREADS];  /* the job handed to helper i, until it takes it */
static _Atomic uint32_t task[MAX_THREADS];  /* bumped when slot[i] is filled: helper i waits on it */
static _Atomic int asleep[MAX_THREADS];     /* helper i sleeps on task[i] (or is about to) */
static _Atomic int64_t split_calls;         /* calls split so far (affine_split_calls) */
static _Atomic int pool_threads = 1;        /* helpers started + the caller; helpers never stop */
static int64_t min_work = 1 << 19;          /* m * n * k below which a call runs alone (swarm_kernels/cpu.py sets it) */
static _Atomic int64_t spin_ns = 2000000;   /* how long an idle helper polls before it sleeps (swarm_kernels/cpu.py sets it) */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void futex_wait(_Atomic uint32_t *address, uint32_t value) {
    syscall(SYS_futex, (uint32_t *)address, FUTEX_WAIT_PRIVATE, value, NULL, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *address) {
    syscall(SYS_futex, (uint32_t *)address, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void release(job_t *j) {
    if (atomic_fetch_sub_explicit(&j->refs, 1, memory_order_acq_rel) == 1) free(j);
}

static void work_on(job_t *j, float *scratch);

static void *helper(void *arg) {
    const int part = (int)(intptr_t)arg;
    float *scratch = NULL;
    int64_t capacity = 0;
    uint32_t seen = 0;  /* task[part] starts at 0 and only a caller bumps it, once this helper exists */
    for (;;) {
        uint32_t serial = atomic_load_explicit(&task[part], memory_order_acquire);
        if (serial == seen) {
            const int64_t start = now_ns(), until = start + atomic_load(&spin_ns);
            for (int spins = 0; serial == seen; spins++) {
                cpu_relax();
                if ((spins & 63) == 63 && now_ns() > start + POLITE_NS) sched_yield();  /* others' turn first */
                if ((spins & 63) == 63 && now_ns() > until) {
                    atomic_store(&asleep[part], 1);  /* seq_cst with the caller's bump: one of us sees the other */
                    futex_wait(&task[part], seen);
                    atomic_store(&asleep[part], 0);
                }
                serial = atomic_load_explicit(&task[part], memory_order_acquire);
            }
        }
        seen = serial;
        job_t *j = atomic_exchange(&slot[part], NULL);
        if (j == NULL) continue;  /* taken with an earlier bump */
        const int64_t need = j->work ? 0 : affine_scratch_floats(j->k);  /* another kernel's job needs none */
        if (need > capacity) {
            free(scratch);
            scratch = aligned_alloc(64, (size_t)((need * 4 + 63) / 64 * 64));
            capacity = scratch ? need : 0;
        }
        if (scratch || j->work) work_on(j, scratch);
        release(j);
    }
    return NULL;
}

/* A child forked after the helpers started has none of them: it computes alone until it starts its own. */
static void forget_helpers(void) {
    pthread_mutex_init(&pool_lock, NULL);
    atomic_store(&pool_threads, 1);
    for (int i = 0; i < MAX_THREADS; i++) {
        atomic_store(&slot[i], NULL);  /* a job left here is leaked: its caller is in the parent */
        atomic_store(&task[i], 0);
        atomic_store(&asleep[i], 0);
    }
}

/* Start helpers up to threads - 1 (at most MAX_THREADS - 1; never fewer than already run); returns the threads
   calls can now use. */
int affine_set_threads(int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    pthread_mutex_lock(&pool_lock);
    static int fork_handler;
    if (!fork_handler && threads > 1) fork_handler = pthread_atfork(NULL, NULL, forget_helpers) == 0;
    for (int part = pool_threads; part < threads; part++) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&thread, &attr, helper, (void *)(intptr_t)part);
        pthread_attr_destroy(&attr);
        if (failed) break;
        pool_threads = part + 1;
    }
    pthread_mutex_unlock(&pool_lock);
    return pool_threads;
}

int affine_threads(void) { return pool_threads; }

int64_t affine_split_calls(void) { return atomic_load(&split_calls); }
#else
int affine_set_threads(int threads) { (void)threads; return 1; }
int affine_threads(void) { return 1; }
int64_t affine_split_calls(void) { return 0; }
#endif

/* x [M, K] float32, codes [N, K] (bits 8) or [N, K/2] (bits 4) uint8, scale/minimum [N, K/GROUP] float32,
   bias [N] float32 or NULL, y [M, N] float32, scratch a buffer of at least affine_scratch_floats(K) floats. Computes
   output rows first_row .. first_row + rows - 1.
   Returns 0, or -1 when K is not a multiple of GROUP or bits is not 4 or 8. */
static void affine_rows(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                        const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row, int64_t rows,
                        float *scratch, const void *packed) {
#if defined(AFFINE_AMX)
    if (packed) {
        amx_linear(packed, m, k, codes, bits, scale, minimum, bias, y, n, first_row, rows, scratch);
        return;
    }
#else
    (void)packed;
#endif
#if defined(__AVX512F__)
    affine_avx512(x, m, k, codes, bits, scale, minimum, bias, y, n, first_row, rows, scratch);
#elif defined(__AVX2__) && defined(__FMA__)
    affine_avx2(x, m, k, codes, bits, scale, minimum, bias, y, n, first_row, rows, scratch);
#else
    affine_portable(x, m, k, codes, bits, scale, minimum, bias, y, n, first_row, rows, scratch);
#endif
}

/* The call's activations packed for the tile unit where it takes the call (cpu_amx.h), else NULL. */
static const void *affine_pack(const float *x, int64_t m, int64_t k, void *space) {
#if defined(AFFINE_AMX)
    return amx_pack(x, m, k, space) ? space : NULL;
#else
    (void)x;
    (void)m;
    (void)k;
    (void)space;
    return NULL;
#endif
}

#if defined(AFFINE_AMX)
typedef amx_x_t packed_t;
#else
typedef struct { int unused; } packed_t;
#endif

int affine_linear(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                  const float *minimum, const float *bias, float *y, int64_t n, int64_t first_row, int64_t rows,
                  float *scratch) {
    if (k % GROUP != 0 || (bits != 4 && bits != 8)) return -1;
    packed_t space;
    affine_rows(x, m, k, codes, bits, scale, minimum, bias, y, n, first_row, rows, scratch,
                affine_pack(x, m, k, &space));
    return 0;
}

/* The fewest input rows of a call that takes the tile unit's path (cpu_amx.h), or 0 where none does (not built for
   it, not allowed by Linux, or switched off). */
int affine_amx(void) {
#if defined(AFFINE_AMX)
    return amx_ready() ? AMX_MIN_ROWS : 0;
#else
    return 0;
#endif
}

/* Switches the tile unit's path on (1, the default where it is built) or off (0); returns affine_amx(). */
int affine_set_amx(int on) {
#if defined(AFFINE_AMX)
    atomic_store(&amx_enabled, on != 0);
#else
    (void)on;
#endif
    return affine_amx();
}

#if defined(__linux__)
/* Hands job j to `helpers` helpers, computes the chunks none has claimed, waits for the rest and drops j. */
static void run_job(job_t *j, int helpers, float *scratch) {
    atomic_init(&j->next, 0);
    atomic_init(&j->done, 0);
    atomic_init(&j->refs, 1 + helpers);
    atomic_fetch_add_explicit(&split_calls, 1, memory_order_relaxed);
    for (int i = 1; i <= helpers; i++) {
        job_t *old = atomic_exchange(&slot[i], j);  /* publishes the job (seq_cst) */
        if (old) release(old);  /* an earlier job helper i never took */
        atomic_fetch_add(&task[i], 1);  /* seq_cst: ordered against asleep[i] */
        if (atomic_load(&asleep[i])) futex_wake(&task[i]);
    }
    work_on(j, scratch);
    const int64_t until = now_ns() + atomic_load(&spin_ns);
    for (int spins = 0; atomic_load_explicit(&j->done, memory_order_acquire) < j->chunks; spins++) {
        cpu_relax();
        if ((spins & 63) == 63 && now_ns() > until) sched_yield();  /* a helper's chunk was preempted */
    }
    release(j);
}

static void work_on(job_t *j, float *scratch) {
    for (;;) {
        const int64_t c = atomic_fetch_add_explicit(&j->next, 1, memory_order_relaxed);
        if (c >= j->chunks) return;
        if (j->work) {
            j->work(j->context, c);
            atomic_fetch_add_explicit(&j->done, 1, memory_order_release);
            continue;
        }
        const int64_t r0 = c * j->chunk_rows, rows = j->n - r0 < j->chunk_rows ? j->n - r0 : j->chunk_rows;
        affine_rows(j->x, j->m, j->k, j->codes, j->bits, j->scale, j->minimum, j->bias, j->y, j->n, r0, rows,
                    scratch, j->packed);
        atomic_fetch_add_explicit(&j->done, 1, memory_order_release);
    }
}
#endif

/* affine_linear over all N output rows, shared with up to threads - 1 helpers of the pool (chunks of whole 16-row
   tiles, about 4 per thread; on the tile unit's path with more than 16 rows, an even number of tiles where every
   thread still gets a chunk) when the call is big enough (two input rows or more, m * n * k >= the pool's minimum
   work); otherwise on the calling thread. scratch: the caller's, as for affine_linear. One row (a lone session's
   decode step) runs alone: split, SmolLM2's MLP calls took 1/1.2-1/1.4 of the time, but a whole 30-block step only
   ~5% less, and through the gateway one chat measured no faster, the helper's spinning taking a core from the
   gateway's own work; except a weight of ONE_ROW_WORK weights or more (an LM head: SmolLM2's 49152 x 576 int8, one
   row in 1.9 ms alone, 0.95 ms on 2 threads of a 2-core Zen 5), a stream of codes from memory per thread. */
#define ONE_ROW_WORK (8LL << 20)
int affine_linear_parallel(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale,
                           const float *minimum, const float *bias, float *y, int64_t n, float *scratch, int threads) {
    if (k % GROUP != 0 || (bits != 4 && bits != 8)) return -1;
#if defined(__linux__)
    const int64_t tile = 16, tiles = (n + tile - 1) / tile;
    int helpers = (threads < atomic_load(&pool_threads) ? threads : atomic_load(&pool_threads)) - 1;
    if (helpers > tiles - 1) helpers = (int)(tiles - 1);
    packed_t space;
    const void *packed = affine_pack(x, m, k, &space);  /* once, by the caller, for every thread */
    job_t *j = helpers > 0 && (m > 1 || n * k >= ONE_ROW_WORK) && m * n * k >= min_work ? malloc(sizeof(job_t)) : NULL;
    if (j) {
        int64_t per = (tiles + 4 * (helpers + 1) - 1) / (4 * (helpers + 1));  /* tiles per chunk */
#if defined(AFFINE_AMX)  /* whole pairs of blocks (cpu_amx.h's amx_tile_pair) where every thread still gets a chunk */
        if (packed != NULL && m > 16 && per % 2 && (tiles + per) / (per + 1) > helpers) per++;
#endif
        *j = (job_t){.x = x, .scale = scale, .minimum = minimum, .bias = bias, .codes = codes, .y = y, .m = m,
                     .k = k, .n = n, .chunk_rows = per * tile, .chunks = (tiles + per - 1) / per, .bits = bits,
                     .packed = packed};
        run_job(j, helpers, scratch);
        return 0;
    }
#else
    (void)threads;
    packed_t space;
    const void *packed = affine_pack(x, m, k, &space);
#endif
    affine_rows(x, m, k, codes, bits, scale, minimum, bias, y, n, 0, n, scratch, packed);
    return 0;
}

/* Another native kernel's work on this pool (swarm_kernels/cpu_attention.c's decode rows): chunks 0 .. chunks - 1, each
   work(context, c) once, claimed by the caller and up to threads - 1 helpers as affine calls are; returns when all
   are done. Off Linux, or with one thread, the caller runs them in order. */
void affine_pool_run(void (*work)(void *, int64_t), void *context, int64_t chunks, int threads) {
#if defined(__linux__)
    int helpers = (threads < atomic_load(&pool_threads) ? threads : atomic_load(&pool_threads)) - 1;
    if (helpers > chunks - 1) helpers = (int)(chunks - 1);
    job_t *j = helpers > 0 ? malloc(sizeof(job_t)) : NULL;
    if (j) {
        *j = (job_t){.chunks = chunks, .work = work, .context = context};
        run_job(j, helpers, NULL);
        return;
    }
#else
    (void)threads;
#endif
    for (int64_t c = 0; c < chunks; c++) work(context, c);
}

/* Calls smaller than m * n * k = work run on the caller's thread alone (a part's hand-off costs microseconds). */
void affine_set_min_work(int64_t work, int64_t spin) {
#if defined(__linux__)
    min_work = work;
    atomic_store(&spin_ns, spin);
#else
    (void)work;
    (void)spin;
#endif
}

/* How many partial sums a row is split into (each of K / lanes products in increasing k, then added pairwise). */
int affine_sum_lanes(void) { return SUM_LANES; }
