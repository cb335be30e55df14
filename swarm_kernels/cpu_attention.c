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
   products reduced together, a vectorized exp, 64 output columns in registers), portable loops otherwise.
   Built at first use by swarm_kernels/cpu.py like cpu_affine.c and called through ctypes (the call releases the GIL).
   The C code trusts its caller (swarm_kernels/attention.py checks every shape, stride, index and length first). */

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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline float sum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
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

/* s[j] = scale * q . k_j for n keys (dim a multiple of 8): four keys at a time, their four sums reduced together */
static void scores(const float *q, const float *k, int64_t n, int64_t dim, float scale, float *s) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + j * dim, *k1 = k0 + dim, *k2 = k1 + dim, *k3 = k2 + dim;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) {
            const __m256 x = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + i), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + i), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + i), a3);
        }
        const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        const __m128 four = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        _mm_storeu_ps(s + j, _mm_mul_ps(four, _mm_set1_ps(scale)));
    }
    for (; j < n; j++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < dim; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(k + j * dim + i), a);
        s[j] = scale * sum8(a);
    }
}

/* o = (sum_j w[j] v_j) / total over n values (dim a multiple of 8): 64 columns at a time in registers */
static void weighted_values(const float *w, const float *v, int64_t n, int64_t dim, float total, float *o) {
    const __m256 inverse = _mm256_set1_ps(1.0f / total);
    int64_t c = 0;
    for (; c + 64 <= dim; c += 64) {
        __m256 a[8];
        for (int t = 0; t < 8; t++) a[t] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) {
            const __m256 p = _mm256_set1_ps(w[j]);
            const float *row = v + j * dim + c;
            for (int t = 0; t < 8; t++) a[t] = _mm256_fmadd_ps(p, _mm256_loadu_ps(row + 8 * t), a[t]);
        }
        for (int t = 0; t < 8; t++) _mm256_storeu_ps(o + c + 8 * t, _mm256_mul_ps(a[t], inverse));
    }
    for (; c < dim; c += 8) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j++) a = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(v + j * dim + c), a);
        _mm256_storeu_ps(o + c, _mm256_mul_ps(a, inverse));
    }
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
    _Atomic int failed;  /* a row found no memory for its scores */
} call_t;

/* Every head of row r. */
static void attend_row(void *context, int64_t r) {
    call_t *c = context;
    const int64_t n = c->count[r], dim = c->dim, group = c->heads / c->kv_heads;
    float *s = malloc(sizeof(float) * (size_t)(n + 8));
    if (s == NULL) {
        atomic_store_explicit(&c->failed, 1, memory_order_relaxed);  /* read once every row is done */
        return;
    }
    for (int64_t h = 0; h < c->heads; h++) {
        const int64_t g = h / group;
        const float *q = c->query + c->tokens[r] * c->q_token_stride + h * c->q_head_stride;
        const float *k = (const float *)(intptr_t)c->keys[r] + g * c->k_head_stride[r] + c->first[r] * dim;
        const float *v = (const float *)(intptr_t)c->values[r] + g * c->v_head_stride[r] + c->first[r] * dim;
        float *o = c->out + c->tokens[r] * c->o_token_stride + h * dim;
#if defined(__AVX2__) && defined(__FMA__)
        if (dim % 8 == 0) {
            scores(q, k, n, dim, c->scale, s);
            weighted_values(s, v, n, dim, softmax_weights8(s, n), o);
            continue;
        }
#endif
        scores_portable(q, k, n, dim, c->scale, s);
        weighted_values_portable(s, v, n, dim, softmax_weights(s, n), o);
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
   Returns 0, or -1 for arguments it refuses, -2 when out of memory. */
int decode_attention(int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, float scale, const float *query,
                     int64_t q_token_stride, int64_t q_head_stride, const int64_t *tokens, const int64_t *keys,
                     const int64_t *values, const int64_t *k_head_stride, const int64_t *v_head_stride,
                     const int64_t *first, const int64_t *count, float *out, int64_t o_token_stride, int threads) {
    if (rows < 0 || heads <= 0 || kv_heads <= 0 || dim <= 0 || heads % kv_heads != 0) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (count[r] < 1 || first[r] < 0 || tokens[r] < 0) return -1;
    call_t call = {.heads = heads, .kv_heads = kv_heads, .dim = dim, .q_token_stride = q_token_stride,
                   .q_head_stride = q_head_stride, .o_token_stride = o_token_stride, .scale = scale, .query = query,
                   .tokens = tokens, .keys = keys, .values = values, .k_head_stride = k_head_stride,
                   .v_head_stride = v_head_stride, .first = first, .count = count, .out = out};
    if (pool_run != NULL && threads > 1 && rows > 1) {
        pool_run(attend_row, &call, rows, threads);
    } else {
        for (int64_t r = 0; r < rows; r++) attend_row(&call, r);
    }
    return atomic_load(&call.failed) ? -2 : 0;
}

/* Decode rows' new keys (or values) into their sessions' cache buffers: row r's dim floats of head g, at
   states + s_rows[r] * s_token_stride + g * s_head_stride, go to buffers[r] + g * b_head_stride[r] + position[r] * dim.
   The caller guarantees every buffer holds position[r] + 1 tokens (swarm.model.span.SpanKVCache.reserve). */
void append_rows(int64_t rows, int64_t kv_heads, int64_t dim, const float *states, const int64_t *s_rows,
                 int64_t s_token_stride, int64_t s_head_stride, const int64_t *buffers, const int64_t *b_head_stride,
                 const int64_t *position) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < kv_heads; g++)
            memcpy((float *)(intptr_t)buffers[r] + g * b_head_stride[r] + position[r] * dim,
                   states + s_rows[r] * s_token_stride + g * s_head_stride, sizeof(float) * (size_t)dim);
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
                 const int64_t *buffers, const int64_t *b_head_stride, const int64_t *position) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t g = 0; g < kv_heads; g++)
            rotate(x + s_rows[r] * x_token_stride + g * x_head_stride, cos + s_rows[r] * dim, sin + s_rows[r] * dim,
                   (float *)(intptr_t)buffers[r] + g * b_head_stride[r] + position[r] * dim, dim);
}
