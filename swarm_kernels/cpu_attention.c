/* Attention of decode rows, each over its own session's cached keys and values, for the CPU in float32.

   A batched decode step of N sessions has one query row per session, and each row attends to a different number of
   keys held in a different buffer (swarm.model.span.SpanKVCache: [1, kv_heads, capacity, D] per layer). torch's
   SDPA called once per row costs ~10-25 us of dispatch for a few microseconds of arithmetic, and a right-padded
   batch copies every row's keys first. Here one call computes every row of a layer, reading each row's keys where
   they lie:

     out[t, h] = sum_j softmax_j(scale * q[t, h] . k[g, j]) v[g, j],   g = h / (heads / kv_heads),
     j over the row's keys first .. first + count - 1  (a sliding layer's window: a later first)

   which is what SDPA computes for one unmasked query (grouped-query heads share their key head): per row and head,
   the scores over its keys, their softmax (the maximum subtracted, exp, sum), then one pass over the values. The
   sums run in float32 in an order that depends only on the row's own keys: a row's result is the same bits
   whatever else is in the call. NaN or infinite scores give NaN, as in SDPA.

   Two paths, chosen at compile time: AVX2 + FMA intrinsics when the head size is a multiple of 8 (four keys' dot
   products reduced together, a vectorized exp, 64 output columns in registers; with AVX-512's registers, up to
   three heads of a key head at once), portable loops otherwise. The
   AVX2 path's first head of each key head prefetches its keys 16 ahead and its values (read right after the
   scores): a 64-row step's keys and values come from memory (64 sessions x 30 layers x ~92 KB at 60 tokens), and a
   core's own misses alone drew ~7 GB/s. SmolLM2's 30 layers, 64 rows of 60 tokens, on 2 threads: 17.8-20.0 ms ->
   15.4-16.1 ms a forward's attention, the same bits (a 2-core Xeon; a forward of 64 rows 66-68 -> 63-65 ms).
   Built at first use by swarm_kernels/cpu.py like cpu_affine.c and called through ctypes (the call releases the GIL).
   The C code trusts its caller (swarm_kernels/attention.py checks every shape, stride, index and length first).

   At the end, a decode layer's calls in two (layer_first, linear_residual; swarm_kernels/fused.py checks their
   arguments): the affine kernel, the rotary embedding, the cache appends and this attention called from C in the
   order swarm/model/lean.py calls them, and the RMS norms summed in torch's order (torch_row_sum), so the same bits
   as the layers' own path. */

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Cephes' expf: e^x = 2^n e^r, n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts), e^r by a polynomial */
#define EXP_LOW (-87.0f)
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#define P0 1.9875691500e-4f
#define P1 1.3981999507e-3f
#define P2 8.3334519073e-3f
#define P3 4.1665795894e-2f
#define P4 1.6666665459e-1f
#define P5 5.0000001201e-1f

/* e^x for x <= 0 (a score minus its row's maximum): Cephes' expf polynomial on the reduced argument, scaled by
   2^n built in the exponent bits; within 2 ulp of expf, and a loop of it vectorizes (no call, no branch). Below -87
   it returns e^-87 (~1.6e-38) instead of a denormal: a weight that small adds nothing to a sum that holds a 1.
   NaN stays NaN. */
static inline float exp_nonpositive(float x) {
    x = x < EXP_LOW ? EXP_LOW : x;
    const float n = __builtin_floorf(x * LOG2E + 0.5f);
    const float r = x - n * LN2_HI - n * LN2_LO;
    float p = P0;
    p = p * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    p = p * r * r + r + 1.0f;
    union {
        int32_t i;
        float f;
    } two_n = {.i = ((n == n ? (int32_t)n : 0) + 127) << 23};  /* a NaN x: p is NaN already */
    return p * two_n.f;
}

/* Each head's softmax over its n scores, in place; returns the sum of the weights (not yet divided). */
static float softmax_weights(float *s, int64_t n) {
    float top = s[0], sum = 0.0f;
#pragma omp simd reduction(max : top)
    for (int64_t j = 1; j < n; j++) top = s[j] > top ? s[j] : top;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; j++) {
        s[j] = exp_nonpositive(s[j] - top);
        sum += s[j];
    }
    return sum;
}

/* Heads that share a key head are computed HEADS_AT_ONCE at a time, each key and value loaded once for all of them:
   three with AVX-512's 32 vector registers (a 64-row step of SmolLM2 at 40 / 80 / 200 tokens: 0.95 / 0.95 / 0.90x
   the time of one head at a time, the same bits), one with AVX2's 16 (or the portable loops). Each head's sums are
   the same FMAs in the same order whatever G is: its bits do not depend on the heads beside it. */
#if defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__)
#define HEADS_AT_ONCE 3
#else
#define HEADS_AT_ONCE 1
#endif

/* Caches of 16-bit floats (IEEE half, `kv16`): read and written with the F16C conversions, which every AVX2 CPU has,
   for head sizes that are a multiple of 8; elsewhere such calls are refused (-1) and swarm_kernels/attention.py takes
   no such cache (attention_kv16). A half converts to a float exactly, so a row's result is the same bits as over a
   float32 cache holding the same values; writes round to nearest even, as torch's conversion does. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KV16 1
#else
#define KV16 0
#endif

#define ROPE_MAX_DIM 512  /* rope_append's rotated row before it is rounded to halves */

/* Whether 16-bit caches of this head size can be read and written here: F16C, a multiple of 8, at most 512. */
static int kv16_fits(int64_t dim) { return KV16 && dim > 0 && dim % 8 == 0 && dim <= ROPE_MAX_DIM; }

int attention_kv16(int64_t dim) { return kv16_fits(dim); }  /* whether caches of halves of this head size are read here */

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define PREFETCH_KEYS 16  /* keys ahead of the scores' loop (4 KB at 64 floats a key) */

static inline float sum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* 8 floats of a cache buffer from element i: float32, or (half) 16-bit floats converted */
static inline __attribute__((always_inline)) __m256 load8(const void *p, int64_t i, const int half) {
#if KV16
    if (half) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
#else
    (void)half;
#endif
    return _mm256_loadu_ps((const float *)p + i);
}

/* exp_nonpositive on 8 lanes */
static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(EXP_LOW), x);  /* a NaN x stays NaN: max returns its second operand then */
    const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_set1_ps(P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(P5));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* softmax_weights over s[0 .. n) where s holds room for n rounded up to 8: the padding is set to -inf (its weight
   e^-87 is below half an ulp of the sum, which holds the maximum's 1: the sum is the same bits without it) */
static float softmax_weights8(float *s, int64_t n) {
    const int64_t padded = (n + 7) & ~(int64_t)7;
    for (int64_t j = n; j < padded; j++) s[j] = -INFINITY;
    __m256 top = _mm256_loadu_ps(s);
    for (int64_t j = 8; j < padded; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(s + j));
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    t = _mm_max_ss(t, _mm_movehdup_ps(t));
    const __m256 m = _mm256_set1_ps(_mm_cvtss_f32(t));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j = 0; j < padded; j += 8) {
        const __m256 w = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), m));
        _mm256_storeu_ps(s + j, w);
        sum = _mm256_add_ps(sum, w);
    }
    return sum8(sum);
}

/* s[h][j] = scale * q[h] . k_j for n keys and G heads (dim a multiple of 8): four keys at a time, each head's four
   sums reduced together. With v (the key head's first heads), its keys ahead and its values (read next) are
   prefetched from memory. */
static inline __attribute__((always_inline)) void scores(const int G, const float *const *q, const void *k,
                                                         const void *v, int64_t n, int64_t dim, float scale,
                                                         float *const *s, const int half) {
    const int64_t size = half ? 2 : 4;  /* bytes an element */
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const int64_t k0 = j * dim, k1 = k0 + dim, k2 = k1 + dim, k3 = k2 + dim;
        if (v != NULL) {
            const char *values = (const char *)v + j * dim * size;
            for (int64_t b = 0; b < 4 * dim * size; b += 64) _mm_prefetch(values + b, _MM_HINT_T1);
            if (j + PREFETCH_KEYS + 4 <= n) {
                const char *ahead = (const char *)k + (j + PREFETCH_KEYS) * dim * size;
                for (int64_t b = 0; b < 4 * dim * size; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
            }
        }
        __m256 a[HEADS_AT_ONCE][4];
#pragma GCC unroll 4
        for (int h = 0; h < G; h++)
#pragma GCC unroll 4
            for (int t = 0; t < 4; t++) a[h][t] = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
            const __m256 y0 = load8(k, k0 + i, half), y1 = load8(k, k1 + i, half), y2 = load8(k, k2 + i, half),
                         y3 = load8(k, k3 + i, half);
#pragma GCC unroll 4
            for (int h = 0; h < G; h++) {
                const __m256 x = _mm256_loadu_ps(q[h] + i);
                a[h][0] = _mm256_fmadd_ps(x, y0, a[h][0]);
                a[h][1] = _mm256_fmadd_ps(x, y1, a[h][1]);
                a[h][2] = _mm256_fmadd_ps(x, y2, a[h][2]);
                a[h][3] = _mm256_fmadd_ps(x, y3, a[h][3]);
            }
        }
#pragma GCC unroll 4
        for (int h = 0; h < G; h++) {
            const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[h][0], a[h][1]), _mm256_hadd_ps(a[h][2], a[h][3]));
            const __m128 four = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
            _mm_storeu_ps(s[h] + j, _mm_mul_ps(four, _mm_set1_ps(scale)));
        }
    }
    for (; j < n; j++)
        for (int h = 0; h < G; h++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t i = 0; i < dim; i += 8)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q[h] + i), load8(k, j * dim + i, half), a);
            s[h][j] = scale * sum8(a);
        }
}

/* o[h] = (sum_j w[h][j] v_j) / total[h] over n values for G heads (dim a multiple of 8): 64 columns at a time in
   registers */
static inline __attribute__((always_inline)) void weighted_values(const int G, float *const *w, const void *v,
                                                                  int64_t n, int64_t dim, const float *total,
                                                                  float *const *o, const int half) {
    int64_t c = 0;
    for (; c + 64 <= dim; c += 64) {
        __m256 a[HEADS_AT_ONCE][8];
#pragma GCC unroll 4
        for (int h = 0; h < G; h++)
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) a[h][t] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            __m256 p[HEADS_AT_ONCE];
#pragma GCC unroll 4
            for (int h = 0; h < G; h++) p[h] = _mm256_set1_ps(w[h][j]);
            const int64_t row = j * dim + c;
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) {
                const __m256 y = load8(v, row + 8 * t, half);
#pragma GCC unroll 4
                for (int h = 0; h < G; h++) a[h][t] = _mm256_fmadd_ps(p[h], y, a[h][t]);
            }
        }
#pragma GCC unroll 4
        for (int h = 0; h < G; h++) {
            const __m256 inverse = _mm256_set1_ps(1.0f / total[h]);
#pragma GCC unroll 8
            for (int t = 0; t < 8; t++) _mm256_storeu_ps(o[h] + c + 8 * t, _mm256_mul_ps(a[h][t], inverse));
        }
    }
    for (int h = 0; h < G; h++) {
        const __m256 inverse = _mm256_set1_ps(1.0f / total[h]);
        for (int64_t d = c; d < dim; d += 8) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t j = 0; j < n; j++)
                a = _mm256_fmadd_ps(_mm256_set1_ps(w[h][j]), load8(v, j * dim + d, half), a);
            _mm256_storeu_ps(o[h] + d, _mm256_mul_ps(a, inverse));
        }
    }
}

/* G heads of one key head (keys k, values v) of one row: their scores into s[h], the softmax, the outputs o[h];
   `first`: the key head's first heads (they prefetch) */
static inline __attribute__((always_inline)) void attend_heads(const int G, const float *const *q, const void *k,
                                                               const void *v, int64_t n, int64_t dim, float scale,
                                                               float *const *s, float *const *o, int first,
                                                               const int half) {
    float total[HEADS_AT_ONCE];
    scores(G, q, k, first ? v : NULL, n, dim, scale, s, half);
    for (int h = 0; h < G; h++) total[h] = softmax_weights8(s[h], n);
    weighted_values(G, s, v, n, dim, total, o, half);
}

/* attend_heads for G of 1 .. HEADS_AT_ONCE heads (each G its own code, the loops over heads unrolled) */
static inline __attribute__((always_inline)) void attend_g(int G, const float *const *q, const void *k, const void *v,
                                                           int64_t n, int64_t dim, float scale, float *const *s,
                                                           float *const *o, int first, const int half) {
    (void)G;  /* 1 without AVX-512 */
#if HEADS_AT_ONCE == 3
    if (G == 3) attend_heads(3, q, k, v, n, dim, scale, s, o, first, half);
    else if (G == 2) attend_heads(2, q, k, v, n, dim, scale, s, o, first, half);
    else
#endif
        attend_heads(1, q, k, v, n, dim, scale, s, o, first, half);
}

/* attend_g on a float32 or a 16-bit cache (each its own code) */
static void attend_some(int G, const float *const *q, const void *k, const void *v, int64_t n, int64_t dim,
                        float scale, float *const *s, float *const *o, int first, int half) {
#if KV16
    if (half) {
        attend_g(G, q, k, v, n, dim, scale, s, o, first, 1);
        return;
    }
#else
    (void)half;
#endif
    attend_g(G, q, k, v, n, dim, scale, s, o, first, 0);
}
#endif

/* The portable loops (any dim, any instruction set) */
static void scores_portable(const float *q, const float *k, int64_t n, int64_t dim, float scale, float *s) {
    for (int64_t j = 0; j < n; j++) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < dim; i++) sum += q[i] * k[j * dim + i];
        s[j] = scale * sum;
    }
}

static void weighted_values_portable(const float *w, const float *v, int64_t n, int64_t dim, float total,
                                     float *o) {
    for (int64_t i = 0; i < dim; i++) o[i] = 0.0f;
    for (int64_t j = 0; j < n; j++)
#pragma omp simd
        for (int64_t i = 0; i < dim; i++) o[i] += w[j] * v[j * dim + i];
    const float inverse = 1.0f / total;
#pragma omp simd
    for (int64_t i = 0; i < dim; i++) o[i] *= inverse;
}

/* One call's arguments, as decode_attention takes them. */
typedef struct {
    int64_t heads, kv_heads, dim, q_token_stride, q_head_stride, o_token_stride;
    float scale;
    const float *query;
    const int64_t *tokens, *keys, *values, *k_head_stride, *v_head_stride, *first, *count;
    float *out;
    int kv16;            /* the caches hold 16-bit floats */
    _Atomic int failed;  /* a row found no memory for its scores */
} call_t;

/* Every head of row r. */
static void attend_row(void *context, int64_t r) {
    call_t *c = context;
    const int64_t n = c->count[r], dim = c->dim, group = c->heads / c->kv_heads;
    /* heads at once: HEADS_AT_ONCE, or the most that divides the group (a group of 4: two by two), or 1 */
    int at_once = 1;
#if defined(__AVX2__) && defined(__FMA__)
    if (dim % 8 == 0)
        for (int a = HEADS_AT_ONCE; a > 1; a--)
            if (group % a == 0) {
                at_once = a;
                break;
            }
#endif
    float *s = malloc(sizeof(float) * (size_t)(n + 8) * (size_t)at_once);
    if (s == NULL) {
        atomic_store_explicit(&c->failed, 1, memory_order_relaxed);  /* read once every row is done */
        return;
    }
    for (int64_t h = 0; h < c->heads; h += at_once) {  /* at_once divides group, or is 1 */
        const int64_t g = h / group;
        const int64_t size = c->kv16 ? 2 : 4;  /* bytes an element */
        const char *k = (const char *)(intptr_t)c->keys[r] + (g * c->k_head_stride[r] + c->first[r] * dim) * size;
        const char *v = (const char *)(intptr_t)c->values[r] + (g * c->v_head_stride[r] + c->first[r] * dim) * size;
#if defined(__AVX2__) && defined(__FMA__)
        if (dim % 8 == 0) {
            const float *q[HEADS_AT_ONCE];
            float *o[HEADS_AT_ONCE], *w[HEADS_AT_ONCE];
            for (int i = 0; i < at_once; i++) {
                q[i] = c->query + c->tokens[r] * c->q_token_stride + (h + i) * c->q_head_stride;
                o[i] = c->out + c->tokens[r] * c->o_token_stride + (h + i) * dim;
                w[i] = s + (size_t)i * (size_t)(n + 8);
            }
            attend_some(at_once, q, k, v, n, dim, c->scale, w, o, h % group == 0, c->kv16);
            continue;
        }
#endif
        const float *q = c->query + c->tokens[r] * c->q_token_stride + h * c->q_head_stride;
        float *o = c->out + c->tokens[r] * c->o_token_stride + h * dim;
        scores_portable(q, (const float *)k, n, dim, c->scale, s);
        weighted_values_portable(s, (const float *)v, n, dim, softmax_weights(s, n), o);
    }
    free(s);
}

/* swarm_kernels/cpu_affine.c's affine_pool_run (set by attention_set_pool): the rows of a call shared with its pool */
typedef void (*pool_run_t)(void (*)(void *, int64_t), void *, int64_t, int);
static pool_run_t pool_run;

void attention_set_pool(void *run) { pool_run = (pool_run_t)run; }

/* rows: decode rows; heads, kv_heads, dim: the layer's geometry (heads a multiple of kv_heads).
   tokens[r]: row r's place in the step's sequence: head h of its query at query + tokens[r] * q_token_stride +
   h * q_head_stride (dim contiguous floats), of its output at out + tokens[r] * o_token_stride + h * dim.
   keys[r], values[r]: addresses of row r's buffers; key head g, token j at keys[r] + g * k_head_stride[r] + j * dim
   (likewise values with v_head_stride[r]). first[r], count[r]: the keys the row attends to (count >= 1).
   threads: rows are shared among up to this many threads of the affine kernel's pool (attention_set_pool; each
   row computed whole by one thread, so the same bits whatever the count): the keys of a 16-row step come from
   memory, and a second core doubles what can be in flight.
   kv16: the buffers hold 16-bit floats (attention_kv16; head sizes a multiple of 8), element strides as above.
   Returns 0, or -1 for arguments it refuses, -2 when out of memory. */
int decode_attention(int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, float scale, const float *query,
                     int64_t q_token_stride, int64_t q_head_stride, const int64_t *tokens, const int64_t *keys,
                     const int64_t *values, const int64_t *k_head_stride, const int64_t *v_head_stride,
                     const int64_t *first, const int64_t *count, float *out, int64_t o_token_stride, int threads,
                     int kv16) {
    if (rows < 0 || heads <= 0 || kv_heads <= 0 || dim <= 0 || heads % kv_heads != 0) return -1;
    if (kv16 && !kv16_fits(dim)) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (count[r] < 1 || first[r] < 0 || tokens[r] < 0) return -1;
    call_t call = {.heads = heads, .kv_heads = kv_heads, .dim = dim, .q_token_stride = q_token_stride,
                   .q_head_stride = q_head_stride, .o_token_stride = o_token_stride, .scale = scale, .query = query,
                   .tokens = tokens, .keys = keys, .values = values, .k_head_stride = k_head_stride,
                   .v_head_stride = v_head_stride, .first = first, .count = count, .out = out, .kv16 = kv16};
    if (pool_run != NULL && threads > 1 && rows > 1) {
        pool_run(attend_row, &call, rows, threads);
    } else {
        for (int64_t r = 0; r < rows; r++) attend_row(&call, r);
    }
    return atomic_load(&call.failed) ? -2 : 0;
}

/* Decode rows' new keys (or values) into their sessions' cache buffers: row r's dim floats of head g, at
   states + s_rows[r] * s_token_stride + g * s_head_stride, go to buffers[r] + g * b_head_stride[r] + position[r] * dim.
   The caller guarantees every buffer holds position[r] + 1 tokens (swarm.model.span.SpanKVCache.reserve).
   kv16: 16-bit buffers (as decode_attention's), each value rounded to the nearest half. */
static void store_row(char *buffer, int64_t element, const float *x, int64_t dim, int kv16) {
#if KV16
    if (kv16) {
        uint16_t *to = (uint16_t *)buffer + element;
        for (int64_t d = 0; d < dim; d += 8)
            _mm_storeu_si128((__m128i *)(to + d), _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
        return;
    }
#else
    (void)kv16;
#endif
    memcpy((float *)buffer + element, x, sizeof(float) * (size_t)dim);
}

void append_rows(int64_t rows, int64_t kv_heads, int64_t dim, const float *states, const int64_t *s_rows,
                 int64_t s_token_stride, int64_t s_head_stride, const int64_t *buffers, const int64_t *b_head_stride,
                 const int64_t *position, int kv16) {
    if (kv16 && !kv16_fits(dim)) return;  /* never asked (swarm_kernels/attention.py), never written */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < kv_heads; g++)
            store_row((char *)(intptr_t)buffers[r], g * b_head_stride[r] + position[r] * dim,
                      states + s_rows[r] * s_token_stride + g * s_head_stride, dim, kv16);
}

/* Rotary position embedding of decode rows as transformers computes it, x * cos + rotate_half(x) * sin with
   rotate_half(x) = (-x[dim/2:], x[:dim/2]): each product and the sum rounded on their own (this file is built with
   -std=c11, where GCC contracts nothing into FMAs; the pragma says so to compilers that read it), so the same bits
   as torch's separate multiplies and add.
   Head h of row t: x + t * x_token_stride + h * x_head_stride (dim contiguous floats), its cos and sin at
   cos + t * dim, sin + t * dim. rope_rows writes it to out + t * o_token_stride + h * o_head_stride; rope_append
   writes row t = s_rows[r]'s head g to buffers[r] + g * b_head_stride[r] + position[r] * dim, as append_rows does. */
#pragma STDC FP_CONTRACT OFF
static inline void rotate(const float *restrict x, const float *restrict c, const float *restrict s, float *restrict o,
                          int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = x[d] * c[d], b = -x[d + half] * s[d];
        o[d] = a + b;
    }
    for (int64_t d = half; d < dim; d++) {
        const float a = x[d] * c[d], b = x[d - half] * s[d];
        o[d] = a + b;
    }
}

void rope_rows(int64_t tokens, int64_t heads, int64_t dim, const float *x, int64_t x_token_stride,
               int64_t x_head_stride, const float *cos, const float *sin, float *out, int64_t o_token_stride,
               int64_t o_head_stride) {
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++)
            rotate(x + t * x_token_stride + h * x_head_stride, cos + t * dim, sin + t * dim,
                   out + t * o_token_stride + h * o_head_stride, dim);
}

void rope_append(int64_t rows, int64_t kv_heads, int64_t dim, const float *x, const int64_t *s_rows,
                 int64_t x_token_stride, int64_t x_head_stride, const float *cos, const float *sin,
                 const int64_t *buffers, const int64_t *b_head_stride, const int64_t *position, int kv16) {
    float rotated[ROPE_MAX_DIM];
    if (kv16 && !kv16_fits(dim)) return;  /* never asked (swarm_kernels/attention.py), never written */
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t element = g * b_head_stride[r] + position[r] * dim;
            if (!kv16) {
                rotate(x + s_rows[r] * x_token_stride + g * x_head_stride, cos + s_rows[r] * dim,
                       sin + s_rows[r] * dim, (float *)(intptr_t)buffers[r] + element, dim);
                continue;
            }
            rotate(x + s_rows[r] * x_token_stride + g * x_head_stride, cos + s_rows[r] * dim, sin + s_rows[r] * dim,
                   rotated, dim);
            store_row((char *)(intptr_t)buffers[r], element, rotated, dim, kv16);
        }
}

/* A decode layer's two halves in one call each, for the lean decode path (swarm.model.lean): the calls it would make
   one by one from Python, in the same order on the same buffers, so the same bits, without ~20 Python calls a layer.
   The affine kernel is swarm_kernels/cpu_affine.c's affine_linear_parallel, set by attention_set_affine. */
typedef int (*affine_t)(const float *, int64_t, int64_t, const uint8_t *, int, const float *, const float *,
                        const float *, float *, int64_t, float *, int);
static affine_t affine;

void attention_set_affine(void *f) { affine = (affine_t)f; }

/* swarm_kernels/cpu_a8.c's a8_linear_float (int8 activations; set by attention_set_a8 with its min_work) */
typedef int (*a8_t)(const float *, int64_t, int64_t, const uint8_t *, int, const float *, const float *,
                    const float *, float *, int64_t, int, int64_t, uint8_t *);
static a8_t a8;
static int64_t a8_min_work;

void attention_set_a8(void *f, int64_t min_work) {
    a8 = (a8_t)f;
    a8_min_work = min_work;
}

/* A weight as its kernel reads it: n output rows of k inputs; kind 0: affine_linear_parallel's layout (float32
   activations), 1: a8_linear_float's (int8 activations; scratch: a8_scratch_bytes of the call). */
typedef struct {
    const uint8_t *codes;
    const float *scale, *minimum, *bias;
    int64_t n, k;
    int bits, kind;
} weight_t;

static int linear(const weight_t *w, const float *x, int64_t rows, float *y, float *scratch, int threads) {
    if (w->kind == 1)
        return a8 == NULL ? -1 : a8(x, rows, w->k, w->codes, w->bits, w->scale, w->minimum, w->bias, y, w->n,
                                    threads, a8_min_work, (uint8_t *)scratch);
    if (w->kind != 0 || affine == NULL) return -1;
    return affine(x, rows, w->k, w->codes, w->bits, w->scale, w->minimum, w->bias, y, w->n, scratch, threads);
}

/* A layer's attention: hidden = residual + o(attention(rope(q), rope(k) and v into the caches)), q | k | v = x W
   (one weight: heads * dim query columns, then kv_heads * dim key and value columns). */
typedef struct {
    weight_t qkv, o;
    int64_t heads, kv_heads, dim;
    float scaling;
} attention_t;

/* rows decode rows x [rows, hidden] (row t of the step is row t of x), residual and out [rows, hidden];
   cos, sin [rows, dim]; tokens, keys .. count: as decode_attention and rope_append take them (tokens[r] = r), the
   caches already holding position[r] + 1 tokens' room; work: rows * (qkv.n + 2 * heads * dim + o.n) floats;
   scratch: the most any of its linear calls needs (affine_scratch_floats of its input size, or a8_scratch_bytes of
   the rows and input size: swarm_kernels/fused.py's scratch_floats); kv16: 16-bit caches (decode_attention's).
   Returns 0, or what a call refused (-1, -2). */
int attention_block(const attention_t *a, int64_t rows, const float *x, const float *residual, float *out,
                    const float *cos, const float *sin, const int64_t *tokens, const int64_t *keys,
                    const int64_t *values, const int64_t *k_head_stride, const int64_t *v_head_stride,
                    const int64_t *position, const int64_t *first, const int64_t *count, float *work, float *scratch,
                    int threads, int kv16) {
    const int64_t dim = a->dim, nq = a->heads * dim, nkv = a->kv_heads * dim, width = a->qkv.n;
    if (width != nq + 2 * nkv || a->o.k != nq || (kv16 && !kv16_fits(dim))) return -1;
    float *qkv = work, *query = qkv + rows * width, *attended = query + rows * nq, *projected = attended + rows * nq;
    int status = linear(&a->qkv, x, rows, qkv, scratch, threads);
    if (status != 0) return status;
    rope_rows(rows, a->heads, dim, qkv, width, dim, cos, sin, query, nq, dim);
    append_rows(rows, a->kv_heads, dim, qkv + nq + nkv, tokens, width, dim, values, v_head_stride, position, kv16);
    rope_append(rows, a->kv_heads, dim, qkv + nq, tokens, width, dim, cos, sin, keys, k_head_stride, position, kv16);
    status = decode_attention(rows, a->heads, a->kv_heads, dim, a->scaling, query, nq, dim, tokens, keys, values,
                              k_head_stride, v_head_stride, first, count, attended, nq, threads, kv16);
    if (status != 0) return status;
    status = linear(&a->o, attended, rows, projected, scratch, threads);
    if (status != 0) return status;
    const int64_t n = rows * a->o.n;
    for (int64_t i = 0; i < n; i++) out[i] = residual[i] + projected[i];
    return 0;
}

/* out = residual + x W for rows rows (the MLP's down projection and the residual add after it); work: rows * w.n
   floats. */
int linear_residual(const weight_t *w, int64_t rows, const float *x, const float *residual, float *out, float *work,
                    float *scratch, int threads) {
    const int status = linear(w, x, rows, work, scratch, threads);
    if (status != 0) return status;
    const int64_t n = rows * w->n;
    for (int64_t i = 0; i < n; i++) out[i] = residual[i] + work[i];
    return 0;
}

/* The sum of a contiguous float32 row as torch sums it on the CPU (ATen's SumKernel.cpp: vectorized_inner_sum, then
   row_sum with 4 accumulators, then multi_row_sum's cascade of 4 levels), for its vector width `lanes` (16 where
   torch runs its AVX-512 code, 8 for AVX2): every addition in the same order, so the same bits. Lanes are emulated
   one by one (a norm's row of a few thousand values: the order matters here, not the speed). */
#define SUM_LEVELS 4
#define SUM_ILP 4
#define MAX_LANES 16

static int64_t ceil_log2(int64_t x) {
    if (x <= 2) return 1;
    int64_t bits = 0;
    for (uint64_t v = (uint64_t)(x - 1); v != 0; v >>= 1) bits++;
    return bits;
}

static float torch_row_sum(const float *v, int64_t size0, int64_t lanes) {
    const int64_t vectors = size0 / lanes, size = vectors / SUM_ILP;
    const int64_t power = ceil_log2(size) / SUM_LEVELS > 4 ? ceil_log2(size) / SUM_LEVELS : 4;
    const int64_t step = (int64_t)1 << power, mask = step - 1;
    float acc[SUM_LEVELS][SUM_ILP][MAX_LANES] = {{{0.0f}}};
    int64_t i = 0;
    while (i + step <= size) {
        for (int64_t j = 0; j < step; j++, i++)
            for (int64_t k = 0; k < SUM_ILP; k++)
                for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += v[(i * SUM_ILP + k) * lanes + l];
        for (int64_t j = 1; j < SUM_LEVELS; j++) {
            for (int64_t k = 0; k < SUM_ILP; k++)
                for (int64_t l = 0; l < lanes; l++) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.0f;
                }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < size; i++)
        for (int64_t k = 0; k < SUM_ILP; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += v[(i * SUM_ILP + k) * lanes + l];
    for (int64_t j = 1; j < SUM_LEVELS; j++)
        for (int64_t k = 0; k < SUM_ILP; k++)
            for (int64_t l = 0; l < lanes; l++) acc[0][k][l] += acc[j][k][l];
    for (int64_t r = size * SUM_ILP; r < vectors; r++)  /* row_sum: vectors past the last group of 4 */
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += v[r * lanes + l];
    for (int64_t k = 1; k < SUM_ILP; k++)
        for (int64_t l = 0; l < lanes; l++) acc[0][0][l] += acc[0][k][l];
    float total = 0.0f;
    for (int64_t c = vectors * lanes; c < size0; c++) total += v[c];  /* values past the last whole vector first */
    for (int64_t l = 0; l < lanes; l++) total += acc[0][0][l];
    return total;
}

/* RMS norm of rows of n values as transformers computes it in float32 with torch's operations: each row's squares
   (x * x), their sum (torch_row_sum) divided by n (the mean), + eps, 1 / sqrt, x times that, times the factor (the
   norm's weight, or 1 + weight in Gemma's form: either product is the same bits). squares: n floats of room. */
static void rms_norm_rows(const float *x, int64_t rows, int64_t n, const float *factor, float eps, int64_t lanes,
                          float *squares, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * n;
        for (int64_t c = 0; c < n; c++) squares[c] = row[c] * row[c];
        const float mean = torch_row_sum(squares, n, lanes) / (float)n;
        const float inverse = 1.0f / sqrtf(mean + eps);
        for (int64_t c = 0; c < n; c++) {
            const float normalized = row[c] * inverse;
            out[r * n + c] = normalized * factor[c];
        }
    }
}

/* rms_norm_rows for tests and the lean path's check of a norm's bits (swarm_kernels.fused.rms_norm). */
int rms_norm(const float *x, int64_t rows, int64_t n, const float *factor, float eps, int64_t lanes, float *out) {
    if (lanes < 1 || lanes > MAX_LANES || n < 1) return -1;
    float *squares = malloc(sizeof(float) * (size_t)n);
    if (squares == NULL) return -2;
    rms_norm_rows(x, rows, n, factor, eps, lanes, squares, out);
    free(squares);
    return 0;
}

/* A Llama-shaped layer's first part: its input norm, attention (attention_block) with the residual add, the norm
   before the MLP and the MLP's joined gate | up projection. What stays for the caller: the activation of the gate
   times up (torch's arithmetic), then linear_residual with the down projection. */
typedef struct {
    attention_t attention;
    weight_t gate_up;
    const float *input_norm, *mlp_norm;  /* the norms' factors, hidden values each */
    float input_eps, mlp_eps;
    int64_t lanes;                       /* torch's vector width, for the norms' sums */
} layer_t;

/* x, mid [rows, hidden]; gate_up [rows, gate_up.n]; the rest as attention_block's (work: also 2 * rows * hidden
   floats more, for the norms). mid = x + attention(norm(x)); gate_up = norm(mid) W. */
int layer_first(const layer_t *layer, int64_t rows, const float *x, float *mid, float *gate_up, const float *cos,
                const float *sin, const int64_t *tokens, const int64_t *keys, const int64_t *values,
                const int64_t *k_head_stride, const int64_t *v_head_stride, const int64_t *position,
                const int64_t *first, const int64_t *count, float *work, float *scratch, int threads, int kv16) {
    const attention_t *a = &layer->attention;
    const int64_t hidden = a->qkv.k;
    if (layer->lanes < 1 || layer->lanes > MAX_LANES || layer->gate_up.k != hidden || a->o.n != hidden) return -1;
    float *normed = work, *squares = normed + rows * hidden, *rest = squares + hidden;
    rms_norm_rows(x, rows, hidden, layer->input_norm, layer->input_eps, layer->lanes, squares, normed);
    int status = attention_block(a, rows, normed, x, mid, cos, sin, tokens, keys, values, k_head_stride,
                                 v_head_stride, position, first, count, rest, scratch, threads, kv16);
    if (status != 0) return status;
    rms_norm_rows(mid, rows, hidden, layer->mlp_norm, layer->mlp_eps, layer->lanes, squares, normed);
    return linear(&layer->gate_up, normed, rows, gate_up, scratch, threads);
}
