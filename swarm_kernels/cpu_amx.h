/* cpu_affine.c's path for calls of five input rows or more on CPUs with AMX (Intel Sapphire Rapids and later): the
   tile unit's bfloat16 dot products, float32-accurate. Included by cpu_affine.c where the build targets AMX-BF16
   (-march=native on such a CPU); the kernel library's cache key covers this file too (swarm_kernels/cpu.py).

   The arithmetic. Per group g of 32 inputs, with codes q (exact in bfloat16: at most 8 bits), scale s, minimum m,

       y = bias + sum over g, in increasing g, of   acc = fma(S_g, s_g, acc);  acc = fma(X_g, m_g, acc)
       S_g = sum_k q_k x_k   (the tile unit's float32 sums of exact products)      X_g = sum_k x_k   (float32)

   which is sum_k x_k (q_k s + m): reference.py's dequantized weight times x, split per group (cpu_affine.c's header
   says why its own paths do not split). Each activation is cut into three bfloat16 parts, x = hi + mid + lo (each the
   rest of the one before rounded to bfloat16; 3 x 8 significant bits: exact for every float32 above ~1e-33, where the
   tile unit's denormals-are-zero would drop lo), and the unit multiplies each part by the codes (bfloat16 products
   are exact in float32) and adds the products in float32: lo first, then mid, then hi. The error is that of float32
   sums of 3 x 32 terms per group and two steps per group after (swarm_kernels/tolerance.py's `Rounding.split`);
   measured ~1e-7 of sum |x| |w| (the AVX-512 path: ~5e-8). Non-finite or huge activations differ: an inf makes the
   rows' outputs NaN (its parts are inf - inf), and a group sum of q x overflows from |x| ~ 1e35, where the AVX-512
   path multiplies by small weights first.

   What it gives up: a row's bits depend on whether it came in a call of fewer than five rows (the AVX-512 path) or
   of five or more (this path, whatever the others: each output element is one tile element, computed the same way
   whichever rows share the tile). Both are float32-accurate; `affine_set_amx(0)` (SWARM_AMX=0) keeps every call on
   the AVX-512 path.

   Why. A decode batch of 16 sessions or a prefill chunk is bound by multiply-adds. On a 2-core Xeon with AMX, one
   thread, weights streaming from memory (benchmarks/kernels.py; results/kernels_amx.json): SmolLM2's int4 block
   shapes at 5 rows take 0.78-1.00x the AVX-512 path's time, at 16 rows 0.50-0.80x, at 128 rows 0.31-0.62x; the int8
   LM head 0.70x at 16 rows. An earlier run taking this path from 2 rows (not kept) measured 1.02-1.15x at 2-4 rows
   (int4; int8 1.18-1.39x), and a one-off timing one row ~2x: a tile costs about the same for 1 row as for 16, and
   the AVX-512 path's 4-row blocks about what 1 row does, so fewer than five rows stay there.

   Layout. Tile A (weights): 16 weight rows x 32 codes as bfloat16, one group (64 bytes a row). For calls of more
   than 16 input rows, widened for a block of 16 weight rows and all groups into the caller's scratch (16 x K
   bfloat16) and read again for each 16 input rows; for calls of 16 rows or fewer, each group's tile is widened just
   before the tile unit reads it, into one of two tiles of scratch, so the widening of one group runs beside the
   products of the one before instead of ahead of them all. Tiles B (activations): per 16 input
   rows and group, one per part, 16 rows of pairs: row p, 32-bit column i = the part of (x[i, 2p], x[i, 2p + 1]);
   packed once per call by the calling thread (amx_pack, into a buffer of its own) and read by every thread of the
   pool. Tile C: 16 weight rows x 16 input rows of float32; two C tiles alternate so that one group's products are
   computed while the other's sums are added to the accumulators. Calls of more than 16 rows take full blocks two
   at a time instead (the second widened into a buffer of the thread's own), the two C tiles one per block, each
   group's activation tiles loaded once for both (amx_tile_pair). */

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define AMX_MIN_ROWS 5          /* fewer input rows: the AVX-512 path (4 rows cost it about what 1 does) */
#define AMX_PART_WORDS 512      /* one B tile: 16 rows x 32 bfloat16 */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    const uint16_t *b;  /* [tiles][groups][3][AMX_PART_WORDS]: the parts hi, mid, lo */
    const float *sums;  /* [tiles][groups][16]: X_g of each input row */
} amx_x_t;

static _Atomic int amx_enabled = 1;  /* affine_set_amx */
static int amx_permitted;            /* the kernel let this process use the tile data (once) */
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;

static void amx_request(void) {
    amx_permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* Whether calls of AMX_MIN_ROWS rows or more take this path (built for it, allowed by Linux, not switched off). */
static int amx_ready(void) {
    if (!atomic_load_explicit(&amx_enabled, memory_order_relaxed)) return 0;
    pthread_once(&amx_once, amx_request);
    return amx_permitted;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config_t;

/* Every tile 16 rows x 64 bytes: 0, 1 sums (C), 2 codes (A), 3..5 the parts (B), 6 a second block's codes (A,
   amx_tile_pair). A constant: built on the stack, GCC 12 once dropped some of its stores where amx_configure was
   inlined (ldtilecfg then faults on the mismatch). */
static const _Alignas(64) amx_config_t amx_config = {
    .palette = 1, .colsb = {64, 64, 64, 64, 64, 64, 64}, .rows = {16, 16, 16, 16, 16, 16, 16}};

/* Loaded at every call: another library (oneDNN) may have configured this thread's tiles since. */
static void amx_configure(void) { _tile_loadconfig(&amx_config); }

static inline __m512 amx_widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 x 16 32-bit elements transposed in registers. */
static void amx_transpose(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
    }
}

/* Input rows x [rows <= 16][k] (row stride k) → the B tiles and sums of one 16-row tile (rows past `rows`: zeros). */
static void amx_pack_tile(const float *x, int64_t rows, int64_t k, uint16_t *b, float *sums) {
    const int64_t groups = k / GROUP;
    for (int64_t g = 0; g < groups; g++) {
        __m512i parts[3][16];
        for (int r = 0; r < 16; r++) {
            __m512 lo = r < rows ? _mm512_loadu_ps(x + r * k + g * GROUP) : _mm512_setzero_ps();
            __m512 hi = r < rows ? _mm512_loadu_ps(x + r * k + g * GROUP + 16) : _mm512_setzero_ps();
            sums[g * 16 + r] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
            for (int p = 0; p < 3; p++) {  /* 32-bit element j of the part: the pair (x[2j], x[2j + 1]) */
                const __m512i part = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
                lo = _mm512_sub_ps(lo, amx_widen_bf16(_mm512_castsi512_si256(part)));  /* exact */
                hi = _mm512_sub_ps(hi, amx_widen_bf16(_mm512_extracti64x4_epi64(part, 1)));
                parts[p][r] = part;
            }
        }
        for (int p = 0; p < 3; p++) {
            amx_transpose(parts[p]);  /* row j: the pairs j of the 16 input rows */
            for (int j = 0; j < 16; j++)
                _mm512_store_si512((void *)(b + (g * 3 + p) * AMX_PART_WORDS + j * 32), parts[p][j]);
        }
    }
}

/* GCC's tile intrinsics are asm statements that do not say they read or write memory: this orders the stores a tile
   load reads before it, and a tile store before the loads that read what it wrote. */
#define AMX_MEMORY_BARRIER() __asm__ volatile("" ::: "memory")

/* The calling thread's buffer for packed activations, grown as needed (kept: a forward makes hundreds of calls;
   freed when the thread exits). */
static __thread void *amx_buffer;
static __thread size_t amx_capacity;
static pthread_key_t amx_buffer_key;
static pthread_once_t amx_key_once = PTHREAD_ONCE_INIT;

static void amx_make_key(void) { pthread_key_create(&amx_buffer_key, free); }

/* The calling thread's buffer for a second block's widened codes (amx_linear), grown as needed; freed when the
   thread exits. NULL where there is no memory for `bytes` (the blocks then go one at a time). */
static __thread void *amx_second;
static __thread size_t amx_second_capacity;
static pthread_key_t amx_second_key;
static pthread_once_t amx_second_once = PTHREAD_ONCE_INIT;

static void amx_make_second_key(void) { pthread_key_create(&amx_second_key, free); }

static uint16_t *amx_second_block(size_t bytes) {
    if (bytes > amx_second_capacity) {
        pthread_once(&amx_second_once, amx_make_second_key);
        free(amx_second);
        amx_second = aligned_alloc(64, (bytes + 63) / 64 * 64);
        amx_second_capacity = amx_second ? bytes : 0;
        pthread_setspecific(amx_second_key, amx_second);
    }
    return amx_second;
}

/* Packs x [m, k] for a call on this path into the thread's buffer; 0 where the call does not take it (too few rows,
   AMX unavailable or switched off, no memory). */
static int amx_pack(const float *x, int64_t m, int64_t k, amx_x_t *packed) {
    if (m < AMX_MIN_ROWS || k < GROUP || !amx_ready()) return 0;
    const int64_t groups = k / GROUP, tiles = (m + 15) / 16;
    const size_t b_bytes = (size_t)(tiles * groups * 3 * AMX_PART_WORDS) * 2;
    const size_t need = b_bytes + (size_t)(tiles * groups * 16) * sizeof(float);
    if (need > amx_capacity) {
        pthread_once(&amx_key_once, amx_make_key);
        free(amx_buffer);
        amx_buffer = aligned_alloc(64, (need + 63) / 64 * 64);
        amx_capacity = amx_buffer ? need : 0;
        pthread_setspecific(amx_buffer_key, amx_buffer);  /* its destructor frees it at the thread's exit */
        if (amx_buffer == NULL) return 0;
    }
    uint16_t *b = amx_buffer;
    float *sums = (float *)((uint8_t *)amx_buffer + b_bytes);
    for (int64_t t = 0; t < tiles; t++)
        amx_pack_tile(x + t * 16 * k, m - 16 * t < 16 ? m - 16 * t : 16, k, b + t * groups * 3 * AMX_PART_WORDS,
                      sums + t * groups * 16);
    AMX_MEMORY_BARRIER();
    packed->b = b;
    packed->sums = sums;
    return 1;
}

/* Group g of weight rows r0 .. r0 + nb - 1 (nb <= 16; rows past nb: zeros) as bfloat16 codes into one A tile:
   row l, element j = code (r0 + l, 32 g + j). */
static inline void amx_widen_group(const uint8_t *codes, int bits, int64_t row_bytes, int64_t g, int64_t r0,
                                   int64_t nb, uint16_t *tile) {
    if (bits == 8) {
        for (int64_t l = 0; l < 16; l++) {
            if (l >= nb) {
                _mm512_store_si512((void *)(tile + l * 32), _mm512_setzero_si512());
                continue;
            }
            const uint8_t *p = codes + (r0 + l) * row_bytes + g * GROUP;
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
            _mm512_store_si512((void *)(tile + l * 32), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));  /* exact */
        }
        return;
    }
    const __m512i nibble = _mm512_set1_epi16(0x0F);
    const __m512i table = _mm512_set_epi16(  /* bfloat16 of 0 .. 15, indexed by the code */
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110,
        0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0);
    for (int64_t l = 0; l < 16; l += 2) {  /* 16 bytes a row: codes 0..15 in the low nibbles, 16..31 high */
        const __m128i zero = _mm_setzero_si128();
        const __m128i first = l < nb ? _mm_loadu_si128((const __m128i *)(codes + (r0 + l) * row_bytes + g * 16))
                                     : zero;
        const __m128i second = l + 1 < nb
                                   ? _mm_loadu_si128((const __m128i *)(codes + (r0 + l + 1) * row_bytes + g * 16))
                                   : zero;
        const __m512i w = _mm512_cvtepu8_epi16(_mm256_set_m128i(second, first));
        const __m512i lo = _mm512_and_si512(w, nibble), hi = _mm512_srli_epi16(w, 4);
        _mm512_store_si512((void *)(tile + l * 32),
                           _mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0x44), table));
        _mm512_store_si512((void *)(tile + (l + 1) * 32),
                           _mm512_permutexvar_epi16(_mm512_shuffle_i64x2(lo, hi, 0xEE), table));
    }
}

/* Every group of those rows: tile A of group g at a + g * 512 (read again for each 16 input rows). */
static void amx_widen(const uint8_t *codes, int bits, int64_t row_bytes, int64_t groups, int64_t r0, int64_t nb,
                      uint16_t *a) {
    for (int64_t g = 0; g < groups; g++) amx_widen_group(codes, bits, row_bytes, g, r0, nb, a + g * 512);
}

/* The codes of a call of at most 16 input rows: each group's A tile is widened just before the tile unit needs it,
   into one of two tiles of scratch (the widening of one group beside the products of the one before). */
typedef struct {
    const uint8_t *codes;
    int bits;
    int64_t row_bytes;
} amx_w_t;

/* Tile A of group g: of the widened groups in a, or (w given) widened now into a's tile g % 2. */
static inline const uint16_t *amx_a(const amx_w_t *w, uint16_t *a, int64_t g, int64_t r0, int64_t nb) {
    if (w == NULL) return a + g * 512;
    uint16_t *tile = a + (g & 1) * 512;
    amx_widen_group(w->codes, w->bits, w->row_bytes, g, r0, nb, tile);
    AMX_MEMORY_BARRIER();
    return tile;
}

/* acc[l] (lanes: input rows) += S (tile C as stored: row l, 16 input rows) * s[l] + X * m[l], in that order, for
   a partial block's first `last` weight rows (the last block of a weight whose rows are not a multiple of 16). */
static inline void amx_accumulate(const float *c, const float *sums, const float *scale, const float *minimum,
                                  int64_t groups, int64_t last, __m512 *acc) {
    const __m512 x = _mm512_loadu_ps(sums);
    for (int64_t l = 0; l < last; l++) {
        acc[l] = _mm512_fmadd_ps(_mm512_load_ps(c + 16 * l), _mm512_set1_ps(scale[l * groups]), acc[l]);
        acc[l] = _mm512_fmadd_ps(x, _mm512_set1_ps(minimum[l * groups]), acc[l]);
    }
}

/* The same for row l of a full block, written out for l = 0 .. 15 (AMX_ROWS): every index of acc is then a constant
   from the start and GCC keeps the 16 accumulators in registers. Through amx_accumulate, inlined and unrolled, it
   kept the array in memory (the partial blocks' runtime bound indexes the same array), so every group loaded and
   stored all 16 of them: the same bits, 3-5% longer calls of 64 rows and ~11% of 16 (SmolLM2's shapes, one thread;
   measured before amx_tile_pair took the calls of more than 16 rows). */
#define AMX_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
#define AMX_ACCUMULATE_ROW(l)                                                                                        \
    acc[l] = _mm512_fmadd_ps(_mm512_load_ps(c_ + 16 * (l)), _mm512_set1_ps(s_[(l) * groups]), acc[l]);              \
    acc[l] = _mm512_fmadd_ps(x_, _mm512_set1_ps(m_[(l) * groups]), acc[l]);
#define AMX_ZERO_ROW(l) acc[l] = _mm512_setzero_ps();
#define AMX_CAST_ROW(l) t[l] = _mm512_castps_si512(acc[l]);

/* A block's accumulators t (as 32-bit words; lanes: input rows) → y's columns r0 .. r0 + last - 1 (last <= 16) of
   the tile's `rows` rows, plus bias. */
static inline void amx_store_block(__m512i *t, const float *bias, int64_t r0, int64_t last, int64_t rows, float *y,
                                   int64_t n) {
    amx_transpose(t);  /* t[r]: input row r's outputs r0 .. r0 + 15 */
    const __mmask16 keep = (__mmask16)((1u << last) - 1u);
    const __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias + r0) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; r++)
        _mm512_mask_storeu_ps(y + r * n + r0, keep, _mm512_add_ps(_mm512_castsi512_ps(t[r]), add));
}

/* One group's products into C tile T: zero, then the parts lo, mid, hi against the codes. */
#define AMX_ISSUE(T, a, b)                                                                                           \
    do {                                                                                                             \
        _tile_zero(T);                                                                                               \
        _tile_loadd(2, (a), 64);                                                                                     \
        _tile_loadd(3, (b), 64);                                                                                     \
        _tile_loadd(4, (b) + AMX_PART_WORDS, 64);                                                                    \
        _tile_loadd(5, (b) + 2 * AMX_PART_WORDS, 64);                                                                \
        _tile_dpbf16ps(T, 2, 5);                                                                                     \
        _tile_dpbf16ps(T, 2, 4);                                                                                     \
        _tile_dpbf16ps(T, 2, 3);                                                                                     \
    } while (0)

/* Up to 16 input rows (one packed tile) against weight rows r0 .. r0 + nb - 1 (their codes widened in a) into y;
   `full` (a constant: amx_tile_full, amx_tile_part): nb is 16. */
static inline __attribute__((always_inline)) void amx_tile(const int full, const amx_w_t *w, uint16_t *a,
                                                           const uint16_t *b, const float *sums, const float *scale,
                                                           const float *minimum, const float *bias, int64_t groups,
                                                           int64_t r0, int64_t nb, int64_t rows, float *y, int64_t n) {
    __m512 acc[16];
    AMX_ROWS(AMX_ZERO_ROW)
    _Alignas(64) float c[2][256];
    const int64_t last = nb < 16 ? nb : 16;
    const float *s = scale + r0 * groups, *mn = minimum + r0 * groups;
    /* Group g's sums (stored from C tile g % 2 into c[g % 2]) are added one store later: after the next group's
       tile is stored and the one after issued, so its loads do not wait on the tile store just made. In increasing
       g, as before. */
#define AMX_ADD(C, G)                                                                                                \
    do {                                                                                                             \
        if (full) {                                                                                                  \
            const __m512 x_ = _mm512_loadu_ps(sums + (G) * 16);                                                      \
            const float *c_ = (C), *s_ = s + (G), *m_ = mn + (G);                                                    \
            AMX_ROWS(AMX_ACCUMULATE_ROW)                                                                             \
        } else /* a partial block: its rows past nb are never read */                                                \
            amx_accumulate(C, sums + (G) * 16, s + (G), mn + (G), groups, last, acc);                                \
    } while (0)
    AMX_ISSUE(0, amx_a(w, a, 0, r0, nb), b);
    if (groups > 1) AMX_ISSUE(1, amx_a(w, a, 1, r0, nb), b + 3 * AMX_PART_WORDS);
    for (int64_t g = 0; g < groups; g += 2) {
        AMX_MEMORY_BARRIER();  /* c[0] read by the last iteration before the tile store below writes it */
        _tile_stored(0, c[0], 64);
        AMX_MEMORY_BARRIER();
        if (g + 2 < groups) AMX_ISSUE(0, amx_a(w, a, g + 2, r0, nb), b + (g + 2) * 3 * AMX_PART_WORDS);
        if (g > 0) AMX_ADD(c[1], g - 1);
        if (g + 1 < groups) {
            AMX_MEMORY_BARRIER();  /* c[1] read above before the tile store below writes it */
            _tile_stored(1, c[1], 64);
            AMX_MEMORY_BARRIER();
            if (g + 3 < groups) AMX_ISSUE(1, amx_a(w, a, g + 3, r0, nb), b + (g + 3) * 3 * AMX_PART_WORDS);
            AMX_ADD(c[0], g);
        }
    }
    AMX_ADD(c[(groups - 1) & 1], groups - 1);
#undef AMX_ADD
    __m512i t[16];
    AMX_ROWS(AMX_CAST_ROW)
    amx_store_block(t, bias, r0, last, rows, y, n);
}

#define AMX_TILE_ARGS                                                                                                \
    const amx_w_t *w, uint16_t *a, const uint16_t *b, const float *sums, const float *scale, const float *minimum,  \
        const float *bias, int64_t groups, int64_t r0, int64_t nb, int64_t rows, float *y, int64_t n
static __attribute__((noinline)) void amx_tile_full(AMX_TILE_ARGS) {
    amx_tile(1, w, a, b, sums, scale, minimum, bias, groups, r0, nb, rows, y, n);
}
static __attribute__((noinline)) void amx_tile_part(AMX_TILE_ARGS) {
    amx_tile(0, w, a, b, sums, scale, minimum, bias, groups, r0, nb, rows, y, n);
}
#undef AMX_TILE_ARGS

/* Two full blocks of weight rows, r0 .. r0 + 15 and r0 + 16 .. r0 + 31 (their codes widened in a0 and a1), against
   one packed tile of input rows (calls of more than 16 rows): each group's three activation tiles are loaded once
   for both blocks, not once for each. Those loads (from L2: the packed tiles of 64 rows are 216 KB for K = 576) were
   ~30% of such a call; the same bits as amx_tile_full on each block (each output element the same tile element,
   added in the same order), one thread: 64-row calls of SmolLM2's shapes 0.84-0.87x the time, 128-row 0.82-0.83x,
   its LM head at 64 rows 0.87x. Its 32 accumulators do not all fit in registers beside the rest; GCC spills some. */
#define AMX_ZERO_PAIR(l) acc[l] = _mm512_setzero_ps(); acd[l] = _mm512_setzero_ps();
#define AMX_ACCUMULATE_PAIR(l)                                                                                       \
    AMX_ACCUMULATE_ROW(l)                                                                                            \
    acd[l] = _mm512_fmadd_ps(_mm512_load_ps(d_ + 16 * (l)), _mm512_set1_ps(s1_[(l) * groups]), acd[l]);             \
    acd[l] = _mm512_fmadd_ps(x_, _mm512_set1_ps(m1_[(l) * groups]), acd[l]);
#define AMX_CAST_SECOND(l) t[l] = _mm512_castps_si512(acd[l]);

static __attribute__((noinline)) void amx_tile_pair(const uint16_t *a0, const uint16_t *a1, const uint16_t *b,
                                                    const float *sums, const float *scale, const float *minimum,
                                                    const float *bias, int64_t groups, int64_t r0, int64_t rows,
                                                    float *y, int64_t n) {
    __m512 acc[16], acd[16];
    AMX_ROWS(AMX_ZERO_PAIR)
    _Alignas(64) float c[2][2][256];  /* [g % 2][block]: group g's sums, added while group g + 1's are computed */
    const float *s0 = scale + r0 * groups, *m0 = minimum + r0 * groups;
    const float *s1 = s0 + 16 * groups, *m1 = m0 + 16 * groups;
    /* group p's sums (stored in c[p % 2]) added in increasing p, while group p + 1's are computed */
#define AMX_ADD_PAIR(p)                                                                                              \
    do {                                                                                                             \
        const __m512 x_ = _mm512_loadu_ps(sums + (p) * 16);                                                          \
        const float *c_ = c[(p) & 1][0], *d_ = c[(p) & 1][1], *s_ = s0 + (p), *m_ = m0 + (p), *s1_ = s1 + (p);     \
        const float *m1_ = m1 + (p);                                                                                 \
        AMX_ROWS(AMX_ACCUMULATE_PAIR)                                                                                \
    } while (0)
    for (int64_t g = 0; g < groups; g++) {
        const uint16_t *parts = b + g * 3 * AMX_PART_WORDS;
        _tile_zero(0);
        _tile_zero(1);
        _tile_loadd(2, a0 + g * 512, 64);
        _tile_loadd(3, parts, 64);
        _tile_loadd(4, parts + AMX_PART_WORDS, 64);
        _tile_loadd(5, parts + 2 * AMX_PART_WORDS, 64);
        _tile_loadd(6, a1 + g * 512, 64);
        _tile_dpbf16ps(0, 2, 5);  /* lo, mid, hi, as amx_tile */
        _tile_dpbf16ps(1, 6, 5);
        _tile_dpbf16ps(0, 2, 4);
        _tile_dpbf16ps(1, 6, 4);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 6, 3);
        if (g > 0) AMX_ADD_PAIR(g - 1);
        AMX_MEMORY_BARRIER();  /* c[g % 2] read in the iteration before (group g - 2's) before the stores below */
        _tile_stored(0, c[g & 1][0], 64);
        _tile_stored(1, c[g & 1][1], 64);
        AMX_MEMORY_BARRIER();
    }
    AMX_ADD_PAIR(groups - 1);
#undef AMX_ADD_PAIR
    __m512i t[16];
    AMX_ROWS(AMX_CAST_ROW)
    amx_store_block(t, bias, r0, 16, rows, y, n);
    AMX_ROWS(AMX_CAST_SECOND)
    amx_store_block(t, bias, r0 + 16, 16, rows, y, n);
}

/* Output rows first_row .. first_row + count - 1 of y [m, n] from the packed activations; scratch: 16 x K bfloat16
   and 64 bytes (it is aligned here: the caller's need not be). */
static void amx_linear(const amx_x_t *packed, int64_t m, int64_t k, const uint8_t *codes, int bits,
                       const float *scale, const float *minimum, const float *bias, float *y, int64_t n,
                       int64_t first_row, int64_t count, float *scratch) {
    const int64_t groups = k / GROUP, row_bytes = bits == 8 ? k : k / 2, tiles = (m + 15) / 16;
    const int64_t last = first_row + count;
    uint16_t *a = (uint16_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    amx_configure();
    const amx_w_t codes_now = {codes, bits, row_bytes};
    const amx_w_t *w = tiles == 1 ? &codes_now : NULL;  /* one input tile: each group widened as it is needed */
    int64_t r0 = first_row;
    uint16_t *a1 = w == NULL && last - r0 >= 32 ? amx_second_block((size_t)k * 32) : NULL;
    if (a1 != NULL)  /* full blocks two at a time, each group's activations loaded once for both */
        for (; r0 + 32 <= last; r0 += 32) {
            amx_widen(codes, bits, row_bytes, groups, r0, 16, a);
            amx_widen(codes, bits, row_bytes, groups, r0 + 16, 16, a1);
            AMX_MEMORY_BARRIER();
            for (int64_t t = 0; t < tiles; t++)
                amx_tile_pair(a, a1, packed->b + t * groups * 3 * AMX_PART_WORDS, packed->sums + t * groups * 16,
                              scale, minimum, bias, groups, r0, m - 16 * t < 16 ? m - 16 * t : 16, y + t * 16 * n, n);
        }
    for (; r0 < last; r0 += 16) {
        const int64_t nb = last - r0 < 16 ? last - r0 : 16;
        if (w == NULL) {
            amx_widen(codes, bits, row_bytes, groups, r0, nb, a);
            AMX_MEMORY_BARRIER();
        }
        for (int64_t t = 0; t < tiles; t++)
            (nb == 16 ? amx_tile_full : amx_tile_part)(w, a, packed->b + t * groups * 3 * AMX_PART_WORDS,
                                                       packed->sums + t * groups * 16, scale, minimum, bias, groups,
                                                       r0, nb, m - 16 * t < 16 ? m - 16 * t : 16, y + t * 16 * n, n);
    }
    _tile_release();
}

#undef AMX_ROWS
#undef AMX_ACCUMULATE_ROW
#undef AMX_ZERO_ROW
#undef AMX_CAST_ROW
#undef AMX_ZERO_PAIR
#undef AMX_ACCUMULATE_PAIR
#undef AMX_CAST_SECOND
