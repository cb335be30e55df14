/* 4- and 8-bit affine weights (groups of 32, a float32 scale and minimum each) against int8 activations, for the CPU.

   Each input row's activations are quantized per group of 32: amax = max |x|, sx = amax / 127,
   xq = round-half-even(x * (127 / amax)) clamped to [-127, 127] (all zeros and sx = 0 where amax is 0), and with
   t = sx * sum(xq) the output is

       y[m, n] = bias[n] + sum over groups g, in increasing g, of
                 acc = fma(float(d), scale[n, g] * sx[m, g], acc);  acc = fma(minimum[n, g], t[m, g], acc)
       where d = sum_j code[n, 32g + j] * xq[m, 32g + j]   (an exact integer: |d| < 2^24 for 8-bit codes too)

   i.e. reference.py's dequantized weight (code * scale + minimum) times the quantized activations. The integer dot
   products are exact, so every instruction set computes the same bits (the float steps are the same FMAs in the same
   order), and a row gives the same bits alone or batched, on any thread count. swarm_kernels/cpu_a8.py holds the
   torch reference of this arithmetic and the layout.

   Why: a decode batch of 16 sessions or a prefill chunk is bound by multiply-adds, and on the float32 path the
   native kernel already runs near the FMA peak; integer dot products do 4 (VNNI: 64 byte products per instruction
   against 16 float multiply-adds) or ~2 (AVX2: vpmaddubsw) times the work per instruction.

   Weight layout (a8_repack): rows in blocks of 16 (the last padded with zero codes), per block and group 4 vectors
   of 64 bytes; in vector p, byte 4l + j holds code (row 16b + l, k = 32g + 4p + j) in its low nibble and code
   (row 16b + l, k = 32g + 16 + 4p + j) in its high nibble, so one load gives two operands in which lane l (a 32-bit
   lane) holds 4 consecutive codes of weight row l: a multiply-add of bytes against 4 activations broadcast to every
   lane leaves the 16 rows' dot products in 16 lanes, with no horizontal sums. 8-bit codes are two such 4-bit planes
   (the low nibbles, then the high ones: d = d_low + 16 d_high; AVX2's vpmaddubsw would saturate on whole bytes).
   Scales and minimums are transposed to [block][group][16].

   Built at first use by swarm_kernels/cpu_a8.py (the flags of swarm_kernels/cpu.py) and called through ctypes; a
   call's blocks of output rows are shared among the threads of cpu_affine.c's pool (a8_set_pool). */

#define _GNU_SOURCE
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define GROUP 32
#define BLOCK 16  /* weight rows per block */

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define RAW8 1  /* 8-bit codes as whole bytes: vpdpbusd sums 4 products of at most 255 x 127 into int32, exactly */
#else
#define RAW8 0  /* 8-bit codes as two 4-bit planes: vpmaddubsw's int16 pair sums would saturate on whole bytes */
#endif

/* One group's scales from its amax (the largest |x|, NaN if any x is NaN): sx and the factor inv = 127 / amax, and
   whether to quantize (else codes 0). inf or NaN in: sx NaN (NaN out, as float32 gives); amax 0, or so small that
   127 / amax overflows (below ~3.7e-37): sx 0, the group counts as zeros. */
static inline int group_scale(float amax, float *sx, float *inv) {
    if (!isfinite(amax)) {
        *sx = NAN;
        return 0;
    }
    *inv = 127.0f / amax;
    if (amax == 0.0f || !isfinite(*inv)) {
        *sx = 0.0f;
        return 0;
    }
    *sx = amax / 127.0f;
    return 1;
}

/* x [m, k] float32 → xq [m, k] int8, sx and t [m, k / GROUP] float32. */
void a8_quantize(const float *x, int64_t m, int64_t k, int8_t *xq, float *sx, float *t) {
    const int64_t groups = k / GROUP;
    for (int64_t i = 0; i < m; i++)
        for (int64_t g = 0; g < groups; g++) {
            const float *src = x + i * k + g * GROUP;
            int8_t *dst = xq + i * k + g * GROUP;
            float *s = sx + i * groups + g;
            int sum = 0;
#if defined(__AVX512F__)
            const __m512 a = _mm512_loadu_ps(src), b = _mm512_loadu_ps(src + 16);
            const __mmask16 nan = _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            if (nan) amax = NAN;
            float factor;
            if (group_scale(amax, s, &factor)) {
                const __m512 inv = _mm512_set1_ps(factor);
                const __m512i lo = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));  /* rounds half to even */
                const __m512i hi = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
                const __m512i top = _mm512_set1_epi32(127), bottom = _mm512_set1_epi32(-127);
                const __m512i cl = _mm512_max_epi32(_mm512_min_epi32(lo, top), bottom);
                const __m512i ch = _mm512_max_epi32(_mm512_min_epi32(hi, top), bottom);
                _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(cl));
                _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(ch));
                sum = _mm512_reduce_add_epi32(_mm512_add_epi32(cl, ch));
            } else {
                memset(dst, 0, GROUP);
            }
#else
            float amax = 0.0f;
            int nan = 0;
            for (int j = 0; j < GROUP; j++) {
                amax = fmaxf(amax, fabsf(src[j]));
                nan |= src[j] != src[j];
            }
            if (nan) amax = NAN;
            float inv;
            if (group_scale(amax, s, &inv)) {
                for (int j = 0; j < GROUP; j++) {
                    float q = nearbyintf(src[j] * inv);
                    q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
                    dst[j] = (int8_t)q;
                    sum += dst[j];
                }
            } else {
                memset(dst, 0, GROUP);
            }
#endif
            t[i * groups + g] = *s * (float)sum;
        }
}

/* codes: an [n, k] weight's codes, one a byte (0..15 for bits 4, 0..255 for bits 8); out: (n rounded up to 16) *
   k * bits / 8 bytes in the layout above (8-bit codes as two 4-bit planes, the low nibbles then the high ones, per
   block and group). scale/minimum [n, groups] → [blocks][groups][16]. */
void a8_repack(const uint8_t *codes, const float *scale, const float *minimum, int64_t n, int64_t k, int bits,
               uint8_t *out, float *scale_t, float *minimum_t) {
    const int64_t groups = k / GROUP, blocks = (n + BLOCK - 1) / BLOCK;
    const int planes = bits / 4;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t g = 0; g < groups; g++) {
            if (RAW8 && bits == 8) {  /* 8 vectors: byte 4l + j of vector q = code (row 16b + l, k = 32g + 4q + j) */
                uint8_t *v = out + (b * groups + g) * 512;
                for (int l = 0; l < BLOCK; l++)
                    for (int q = 0; q < 8; q++)
                        for (int j = 0; j < 4; j++)
                            v[q * 64 + 4 * l + j] = b * BLOCK + l < n ? codes[(b * BLOCK + l) * k + g * GROUP + 4 * q + j] : 0;
            }
            for (int plane = 0; plane < (RAW8 && bits == 8 ? 0 : planes); plane++) {
                uint8_t *v = out + ((b * groups + g) * planes + plane) * 256;
                for (int l = 0; l < BLOCK; l++) {
                    const int64_t r = b * BLOCK + l;
                    for (int p = 0; p < 4; p++)
                        for (int j = 0; j < 4; j++) {
                            uint8_t lo = 0, hi = 0;
                            if (r < n) {
                                const int64_t a = g * GROUP + 4 * p + j, c = a + 16;
                                lo = (codes[r * k + a] >> (4 * plane)) & 0x0F;
                                hi = (codes[r * k + c] >> (4 * plane)) & 0x0F;
                            }
                            v[p * 64 + 4 * l + j] = (uint8_t)(lo | hi << 4);
                        }
                }
            }
            for (int l = 0; l < BLOCK; l++) {
                const int64_t r = b * BLOCK + l;
                scale_t[(b * groups + g) * BLOCK + l] = r < n ? scale[r * groups + g] : 0.0f;
                minimum_t[(b * groups + g) * BLOCK + l] = r < n ? minimum[r * groups + g] : 0.0f;
            }
        }
}

/* 4 activations as one 32-bit lane (broadcast to every lane: each lane's weight row gets the same 4) */
static inline int32_t quad(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

typedef struct {
    const int8_t *xq;
    const float *sx, *t, *scale, *minimum, *bias;
    const uint8_t *codes;
    float *y;
    int64_t m, k, n, blocks_per_chunk;
    int planes;  /* 4-bit planes of a code: 1 (bits 4) or 2 (bits 8: code = low + 16 x high) */
} call_t;

/* The 16 lanes' float steps of one group, for input row i: acc = fma(d, scale * sx, acc); fma(minimum, t, acc). */
static inline void group_step(const int32_t *d, const float *scale, const float *minimum, float sx, float t,
                              float *acc) {
    for (int l = 0; l < BLOCK; l++) acc[l] = fmaf(minimum[l], t, fmaf((float)d[l], scale[l] * sx, acc[l]));
}

static void store(const float *acc, int64_t nb, const float *bias, float *y) {
    for (int64_t l = 0; l < nb; l++) y[l] = bias ? acc[l] + bias[l] : acc[l];
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define A8_PATH "avx512vnni"
#define RM 8  /* input rows sharing a block's widened codes (8 code registers + 8 sums of 32) */
/* rx (1..RM) input rows from row i against block b. */
static void block_rows(const call_t *c, int64_t b, int64_t i, int rx) {
    const int64_t groups = c->k / GROUP, nb = c->n - b * BLOCK < BLOCK ? c->n - b * BLOCK : BLOCK;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[RM];
    for (int r = 0; r < RM; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i d[RM], w[8];
        if (c->planes == 2) {  /* whole bytes (RAW8) */
            const uint8_t *wp = c->codes + (b * groups + g) * 512;
            for (int q = 0; q < 8; q++) w[q] = _mm512_loadu_si512((const void *)(wp + 64 * q));
        } else {
            const uint8_t *wp = c->codes + (b * groups + g) * 256;
            for (int p = 0; p < 4; p++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wp + 64 * p));
                w[p] = _mm512_and_si512(v, nibble);
                w[p + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
            }
        }
        for (int r = 0; r < rx; r++) {
            const int8_t *xg = c->xq + (i + r) * c->k + g * GROUP;
            d[r] = _mm512_setzero_si512();
            for (int q = 0; q < 8; q++) d[r] = _mm512_dpbusd_epi32(d[r], w[q], _mm512_set1_epi32(quad(xg + 4 * q)));
        }
        const __m512 sc = _mm512_loadu_ps(c->scale + (b * groups + g) * BLOCK);
        const __m512 mn = _mm512_loadu_ps(c->minimum + (b * groups + g) * BLOCK);
        for (int r = 0; r < rx; r++) {
            const float sx = c->sx[(i + r) * groups + g], t = c->t[(i + r) * groups + g];
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_mul_ps(sc, _mm512_set1_ps(sx)), acc[r]);
            acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(t), acc[r]);
        }
    }
    for (int r = 0; r < rx; r++) {
        float out[BLOCK];
        _mm512_storeu_ps(out, acc[r]);
        store(out, nb, c->bias ? c->bias + b * BLOCK : NULL, c->y + (i + r) * c->n + b * BLOCK);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
#define A8_PATH "avx2"
#define RM 4  /* 8 code registers + 4 sums of AVX2's 16 */
/* The same, 8 lanes at a time: vpmaddubsw (code x activation, pairs summed into int16: at most 2 x 15 x 127 = 3810,
   and the 8 quads of a group summed in int16: at most 30480, no saturation), then vpmaddwd by ones into int32. */
static void block_rows(const call_t *c, int64_t b, int64_t i, int rx) {
    const int64_t groups = c->k / GROUP, nb = c->n - b * BLOCK < BLOCK ? c->n - b * BLOCK : BLOCK;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    float out[RM][BLOCK];
    for (int h = 0; h < 2; h++) {  /* rows 8h .. 8h + 7 of the block */
        __m256 acc[RM];
        for (int r = 0; r < RM; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            __m256i d[RM];
            for (int plane = 0; plane < c->planes; plane++) {
                const uint8_t *wp = c->codes + ((b * groups + g) * c->planes + plane) * 256 + 32 * h;
                const __m256i weight = plane ? sixteen : ones;  /* the high nibbles count 16 times */
                __m256i w[8];
                for (int p = 0; p < 4; p++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wp + 64 * p));
                    w[p] = _mm256_and_si256(v, nibble);
                    w[p + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                }
                for (int r = 0; r < rx; r++) {
                    const int8_t *xg = c->xq + (i + r) * c->k + g * GROUP;
                    __m256i s = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(quad(xg)));
                    for (int q = 1; q < 8; q++)
                        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(w[q], _mm256_set1_epi32(quad(xg + 4 * q))));
                    const __m256i e = _mm256_madd_epi16(s, weight);
                    d[r] = plane ? _mm256_add_epi32(d[r], e) : e;
                }
            }
            const __m256 sc = _mm256_loadu_ps(c->scale + (b * groups + g) * BLOCK + 8 * h);
            const __m256 mn = _mm256_loadu_ps(c->minimum + (b * groups + g) * BLOCK + 8 * h);
            for (int r = 0; r < rx; r++) {
                const float sx = c->sx[(i + r) * groups + g], t = c->t[(i + r) * groups + g];
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[r]), _mm256_mul_ps(sc, _mm256_set1_ps(sx)), acc[r]);
                acc[r] = _mm256_fmadd_ps(mn, _mm256_set1_ps(t), acc[r]);
            }
        }
        for (int r = 0; r < rx; r++) _mm256_storeu_ps(out[r] + 8 * h, acc[r]);
    }
    for (int r = 0; r < rx; r++) store(out[r], nb, c->bias ? c->bias + b * BLOCK : NULL, c->y + (i + r) * c->n + b * BLOCK);
}
#else
#define A8_PATH "portable"
#define RM 4
static void block_rows(const call_t *c, int64_t b, int64_t i, int rx) {
    const int64_t groups = c->k / GROUP, nb = c->n - b * BLOCK < BLOCK ? c->n - b * BLOCK : BLOCK;
    for (int r = 0; r < rx; r++) {
        float acc[BLOCK] = {0};
        for (int64_t g = 0; g < groups; g++) {
            const int8_t *xg = c->xq + (i + r) * c->k + g * GROUP;
            int32_t d[BLOCK] = {0};
            for (int plane = 0; plane < c->planes; plane++) {
                const uint8_t *wp = c->codes + ((b * groups + g) * c->planes + plane) * 256;
                for (int l = 0; l < BLOCK; l++) {
                    int32_t s = 0;
                    for (int p = 0; p < 4; p++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t byte = wp[64 * p + 4 * l + j];
                            s += (byte & 0x0F) * xg[4 * p + j] + (byte >> 4) * xg[16 + 4 * p + j];
                        }
                    d[l] += plane ? 16 * s : s;
                }
            }
            group_step(d, c->scale + (b * groups + g) * BLOCK, c->minimum + (b * groups + g) * BLOCK,
                       c->sx[(i + r) * groups + g], c->t[(i + r) * groups + g], acc);
        }
        store(acc, nb, c->bias ? c->bias + b * BLOCK : NULL, c->y + (i + r) * c->n + b * BLOCK);
    }
}
#endif

static void chunk(void *context, int64_t index) {
    const call_t *c = context;
    const int64_t blocks = (c->n + BLOCK - 1) / BLOCK, b0 = index * c->blocks_per_chunk;
    const int64_t b1 = b0 + c->blocks_per_chunk < blocks ? b0 + c->blocks_per_chunk : blocks;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t i = 0; i < c->m; i += RM) block_rows(c, b, i, c->m - i < RM ? (int)(c->m - i) : RM);
}

/* cpu_affine.c's affine_pool_run (set by a8_set_pool): a call's chunks shared with its pool */
typedef void (*pool_run_t)(void (*)(void *, int64_t), void *, int64_t, int);
static pool_run_t pool_run;

void a8_set_pool(void *run) { pool_run = (pool_run_t)run; }

/* y [m, n] = the quantized activations (a8_quantize's) against a repacked weight; threads: up to this many threads of
   the pool share the blocks (calls of two rows or more with m * n * k >= min_work). Returns 0, -1 for a k that is
   not a multiple of GROUP. */
int a8_linear(const int8_t *xq, const float *sx, const float *t, int64_t m, int64_t k, const uint8_t *codes,
              int bits, const float *scale_t, const float *minimum_t, const float *bias, float *y, int64_t n,
              int threads, int64_t min_work) {
    if (k % GROUP != 0 || k <= 0 || n <= 0 || (bits != 4 && bits != 8)) return -1;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    call_t c = {.xq = xq, .sx = sx, .t = t, .scale = scale_t, .minimum = minimum_t, .bias = bias, .codes = codes,
                .y = y, .m = m, .k = k, .n = n, .blocks_per_chunk = blocks, .planes = bits / 4};
    if (pool_run != NULL && threads > 1 && m > 1 && m * n * k >= min_work && blocks > 1) {
        c.blocks_per_chunk = (blocks + 4 * threads - 1) / (4 * threads);
        pool_run(chunk, &c, (blocks + c.blocks_per_chunk - 1) / c.blocks_per_chunk, threads);
    } else {
        chunk(&c, 0);
    }
    return 0;
}

/* a8_quantize into scratch (at least a8_scratch_bytes(m, k)), then a8_linear: one call from Python. */
int64_t a8_scratch_bytes(int64_t m, int64_t k) { return m * k + 2 * m * (k / GROUP) * (int64_t)sizeof(float) + 64; }

int a8_linear_float(const float *x, int64_t m, int64_t k, const uint8_t *codes, int bits, const float *scale_t,
                    const float *minimum_t, const float *bias, float *y, int64_t n, int threads, int64_t min_work,
                    uint8_t *scratch) {
    if (k % GROUP != 0 || k <= 0 || n <= 0 || (bits != 4 && bits != 8)) return -1;
    const int64_t groups = k / GROUP;
    float *sx = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63), *t = sx + m * groups;
    int8_t *xq = (int8_t *)(t + m * groups);
    a8_quantize(x, m, k, xq, sx, t);
    return a8_linear(xq, sx, t, m, k, codes, bits, scale_t, minimum_t, bias, y, n, threads, min_work);
}

const char *a8_path(void) { return A8_PATH; }

/* Whether 8-bit codes are repacked as whole bytes (1: this build's VNNI) or as two 4-bit planes (0). */
int a8_raw8(void) { return RAW8; }
