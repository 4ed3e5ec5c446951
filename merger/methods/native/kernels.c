/* The CPU kernels of linear, the task-arithmetic family and the sums of products behind dot products and
 * norms (merger/methods/native/__init__.py builds and loads them).
 *
 * Each computes, entry by entry, exactly the float32 operations of the torch code it replaces
 * (merger/methods/task_arithmetic.py, sparsify.py, topk.py), in the same order, so the bytes are the
 * same: IEEE-754 float32 arithmetic, no fused multiply-add (-ffp-contract=off) except the explicit
 * fmaf where torch's own kernel fuses one on this CPU (linear), no reassociation (no -ffast-math). Conditions become 1.0f / +0.0f factors without branches (ONE_IF), as torch's
 * masks do, so signed zeros come out as torch's do; the loops run on blocks of BLOCK entries that stay
 * in the core's first-level cache. The sums of products (merger_product_sums) follow the order that
 * merger/methods/reductions.py defines, which its torch path follows too.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { BLOCK = 256, MAX_MODELS = 32, HIGH_DIGITS = 1 << 15, LOW_DIGITS = 1 << 16, LANES = 4 };
enum { F32 = 0, BF16 = 1, F16 = 2 };  /* storage types (native/__init__.py's STORAGE_TYPES) */

static inline float as_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t as_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* IEEE half <-> float32 by bit operations (the FP16 library's algorithm, as c10::Half converts; no
 * compiler's _Float16, which GCC has on x86 only from version 12): exact widening, and narrowing
 * rounded to nearest, ties to even, subnormals included, as torch's casts round */
static inline float half_to_float(uint16_t half) {
    const uint32_t w = (uint32_t)half << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normalized = as_float((two_w >> 4) + (0xE0u << 23)) * 0x1p-112f;
    const float denormalized = as_float((two_w >> 17) | (126u << 23)) - 0.5f;
    return as_float(sign | (two_w < (1u << 27) ? as_bits(denormalized) : as_bits(normalized)));
}

static inline uint16_t float_to_half(float value) {
    float base = (fabsf(value) * 0x1p+112f) * 0x1p-110f;
    const uint32_t w = as_bits(value), shl1_w = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u)
        bias = 0x71000000u;
    base = as_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = as_bits(base), nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* dst[j] = src[offset + j] as float32, j < m: exact for every storage type */
static void load(const void *src, int type, int64_t offset, int64_t m, float *restrict dst) {
    if (type == BF16) {
        const uint16_t *restrict from = (const uint16_t *)src + offset;
        for (int64_t j = 0; j < m; j++)
            dst[j] = as_float((uint32_t)from[j] << 16);
    } else if (type == F16) {
        const uint16_t *restrict from = (const uint16_t *)src + offset;
        for (int64_t j = 0; j < m; j++)
            dst[j] = half_to_float(from[j]);
    } else {
        memcpy(dst, (const float *)src + offset, (size_t)m * sizeof(float));
    }
}

/* dst[offset + j] = src[j] in the storage type, rounded to nearest, ties to even, as torch casts
 * (a NaN becomes bfloat16's quiet NaN 0x7fc0, as c10::BFloat16 makes it; the engine writes none) */
static void store(void *dst, int type, int64_t offset, int64_t m, const float *restrict src) {
    if (type == BF16) {
        uint16_t *restrict to = (uint16_t *)dst + offset;
        for (int64_t j = 0; j < m; j++) {
            uint32_t bits = as_bits(src[j]);
            uint16_t rounded = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
            to[j] = src[j] != src[j] ? (uint16_t)0x7fc0u : rounded;
        }
    } else if (type == F16) {
        uint16_t *restrict to = (uint16_t *)dst + offset;
        for (int64_t j = 0; j < m; j++)
            to[j] = float_to_half(src[j]);
    } else {
        memcpy((float *)dst + offset, src, (size_t)m * sizeof(float));
    }
}

/* 1.0f where `condition`, else +0.0f: a bit mask, which compilers vectorise where a branch they do not */
#define ONE_IF(condition) as_float((uint32_t)(-(int32_t)(condition)) & 0x3f800000u)

/* TopK pass 1 on the magnitudes |x - b|: histogram[key >> 16] += 1 per entry, key = the float's bits.
 * x and b are stored as x_type and b_type (read as float32). A magnitude's sign bit is 0, so its high
 * digit is below 2^15. LANES interleaved histograms: entries in a row with the same digit do not wait
 * on each other's store. Returns 0, or -1 out of memory. */
int merger_count_high(const void *x, int x_type, const void *b, int b_type, int64_t n, int64_t *histogram) {
    float xs[BLOCK], bs[BLOCK];
    uint16_t digits[BLOCK];
    uint32_t *lanes = calloc((size_t)LANES * HIGH_DIGITS, sizeof(uint32_t));
    if (lanes == NULL)
        return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        load(x, x_type, start, m, xs);
        load(b, b_type, start, m, bs);
        for (int64_t j = 0; j < m; j++)
            digits[j] = (uint16_t)(as_bits(fabsf(xs[j] - bs[j])) >> 16);
        int64_t j = 0;
        for (; j + LANES <= m; j += LANES)
            for (int lane = 0; lane < LANES; lane++)
                lanes[lane * HIGH_DIGITS + digits[j + lane]]++;
        for (; j < m; j++)
            lanes[digits[j]]++;
    }
    for (int digit = 0; digit < HIGH_DIGITS; digit++)
        for (int lane = 0; lane < LANES; lane++)
            histogram[digit] += lanes[lane * HIGH_DIGITS + digit];
    free(lanes);
    return 0;
}

/* TopK pass 2: histogram[key - start] += 1 for the keys of |x - b| in [start, start + 2^16) (types as
 * merger_count_high). Few keys fall in the window, so each run of RUN entries is first checked for
 * any, without a branch. */
void merger_count_window(const void *x, int x_type, const void *b, int b_type, int64_t n, uint32_t start,
                         int64_t *histogram) {
    enum { RUN = 32 };
    float xs[BLOCK], bs[BLOCK];
    uint32_t offsets[RUN];
    for (int64_t block = 0; block < n; block += BLOCK) {
        int64_t size = n - block < BLOCK ? n - block : BLOCK;
        load(x, x_type, block, size, xs);
        load(b, b_type, block, size, bs);
        for (int64_t begin = 0; begin < size; begin += RUN) {
            int64_t m = size - begin < RUN ? size - begin : RUN;
            uint32_t inside = 0;  /* bit j: entry j is in the window */
            for (int64_t j = 0; j < m; j++) {
                offsets[j] = as_bits(fabsf(xs[begin + j] - bs[begin + j])) - start;
                inside |= (uint32_t)(offsets[j] < LOW_DIGITS) << j;
            }
            for (; inside; inside &= inside - 1)
                histogram[offsets[__builtin_ctz(inside)]]++;
        }
    }
}

/* Model i's weighted, sparsified task vector on one block: t = ((δ·keep)·factor)·w, δ = x − b. */
static void task_vector(const float *restrict x, const float *restrict b, int64_t m, int kind, float threshold,
                        int64_t *ties_left, const uint8_t *restrict mask, int has_factor, float factor, float weight,
                        float *restrict t) {
    if (kind == 1) {  /* magnitude: keep |δ| > threshold, and the first ties_left entries equal to it */
        int ties = 0;
        for (int64_t j = 0; j < m; j++) {
            float delta = x[j] - b[j];
            t[j] = delta * ONE_IF(fabsf(delta) > threshold);
            ties += fabsf(delta) == threshold;
        }
        for (int64_t j = 0; ties && *ties_left > 0 && j < m; j++) {
            float delta = x[j] - b[j];
            if (fabsf(delta) == threshold) {
                t[j] = delta * 1.0f;
                --*ties_left;
            }
        }
    } else if (kind == 2) {  /* a drop mask */
        for (int64_t j = 0; j < m; j++)
            t[j] = (x[j] - b[j]) * (float)mask[j];
    } else {
        for (int64_t j = 0; j < m; j++)
            t[j] = x[j] - b[j];
    }
    if (has_factor)
        for (int64_t j = 0; j < m; j++)
            t[j] *= factor;
    for (int64_t j = 0; j < m; j++)
        t[j] *= weight;
}

/* generalized_task_arithmetic on n entries (see task_arithmetic.py for the steps). Model i's entries
 * are xs[i], stored as types[i], the base's `base` as base_type; the result goes to `out` as out_type.
 * Per model i: kind[i] 0 (no sparsifier), 1 (magnitude: threshold[i], ties_left[i], updated) or 2
 * (masks[i]); factor[i] applied where has_factor[i]. `divisor` is used without consensus; `lambda`
 * where scale. `out` may be xs[0]: a block's inputs are all read before its results are written.
 * Returns 0, or -1 for other than 1..MAX_MODELS models (merger_max_models()). */
int merger_max_models(void) { return MAX_MODELS; }

int merger_gta(int models, const void *const *xs, const int *types, const void *base, int base_type, int64_t n,
               const int *kind, const float *threshold, int64_t *ties_left, const uint8_t *const *masks,
               const int *has_factor, const float *factor, const float *weight, int consensus, int normalize,
               float divisor, int scale, float lambda, void *out, int out_type) {
    float t[MAX_MODELS][BLOCK];  /* 32 KiB of stack */
    if (models < 1 || models > MAX_MODELS)
        return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        float b[BLOCK], x[BLOCK], merged[BLOCK], divisors[BLOCK];
        load(base, base_type, start, m, b);
        for (int i = 0; i < models; i++) {
            load(xs[i], types[i], start, m, x);
            task_vector(x, b, m, kind[i], threshold[i], &ties_left[i], masks[i] ? masks[i] + start : NULL,
                        has_factor[i], factor[i], weight[i], t[i]);
        }
        if (consensus) {  /* s = sign(Σ t) (+1 at 0); keep t where t·s > 0; divisor = Σ w over kept */
            float sign[BLOCK];
            for (int64_t j = 0; j < m; j++)
                sign[j] = t[0][j];
            for (int i = 1; i < models; i++)
                for (int64_t j = 0; j < m; j++)
                    sign[j] += t[i][j];
            for (int64_t j = 0; j < m; j++) {
                sign[j] = 1.0f - 2.0f * ONE_IF(sign[j] < 0.0f);
                divisors[j] = 0.0f;
            }
            for (int i = 0; i < models; i++)
                for (int64_t j = 0; j < m; j++) {
                    float agree = ONE_IF(t[i][j] * sign[j] > 0.0f);
                    t[i][j] *= agree;
                    divisors[j] += agree * weight[i];
                }
            for (int64_t j = 0; j < m; j++)
                divisors[j] += ONE_IF(divisors[j] == 0.0f);
        }
        for (int64_t j = 0; j < m; j++)
            merged[j] = t[0][j];
        for (int i = 1; i < models; i++)
            for (int64_t j = 0; j < m; j++)
                merged[j] += t[i][j];
        if (normalize) {
            if (consensus)
                for (int64_t j = 0; j < m; j++)
                    merged[j] /= divisors[j];
            else
                for (int64_t j = 0; j < m; j++)
                    merged[j] /= divisor;
        }
        if (scale)
            for (int64_t j = 0; j < m; j++)
                merged[j] *= lambda;
        for (int64_t j = 0; j < m; j++)
            merged[j] += b[j];
        store(out, out_type, start, m, merged);
    }
    return 0;
}

/* linear (merger/methods/linear.py) on n entries: (x0·w0 + x1·w1 + ...) / divisor where normalize. Each
 * `+ xi·wi` is one fused multiply-add where `fused_add`, else a multiply then an add: torch's
 * `add_(x, alpha=w)` fuses on CPUs its vector kernels use (AVX2, AVX-512, NEON), not on others, and
 * native/__init__.py asks torch which. Types as merger_gta's. */
int merger_linear(int models, const void *const *xs, const int *types, int64_t n, const float *weight,
                  int normalize, float divisor, int fused_add, void *out, int out_type) {
    if (models < 1 || models > MAX_MODELS)
        return -1;
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        float x[BLOCK], merged[BLOCK];
        load(xs[0], types[0], start, m, merged);
        for (int64_t j = 0; j < m; j++)
            merged[j] *= weight[0];
        for (int i = 1; i < models; i++) {
            load(xs[i], types[i], start, m, x);
            if (fused_add)
                for (int64_t j = 0; j < m; j++)
                    merged[j] = fmaf(x[j], weight[i], merged[j]);
            else
                for (int64_t j = 0; j < m; j++)
                    merged[j] = merged[j] + x[j] * weight[i];
        }
        if (normalize)
            for (int64_t j = 0; j < m; j++)
                merged[j] /= divisor;
        store(out, out_type, start, m, merged);
    }
    return 0;
}

/* DARE's L1 rescale sums over one slice: before += Σ|δ|, after += Σ|δ·keep|, δ = x − b, in float64
 * (exact products of float32 magnitudes), over LANES_64 interleaved accumulators added in a fixed order
 * at the end: the same sums on every machine, whatever its vector width. x and b stored as x_type and
 * b_type; `kind` etc. as merger_gta. */
enum { LANES_64 = 8 };
void merger_l1_sums(const void *x, int x_type, const void *b, int b_type, int64_t n, int kind, float threshold,
                    int64_t *ties_left, const uint8_t *mask, double *before, double *after) {
    double lanes_before[LANES_64] = {0}, lanes_after[LANES_64] = {0};
    float xs[BLOCK], bs[BLOCK], t[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
        load(x, x_type, start, m, xs);
        load(b, b_type, start, m, bs);
        task_vector(xs, bs, m, kind, threshold, ties_left, mask ? mask + start : NULL, 0, 1.0f, 1.0f, t);
        int64_t j = 0;
        for (; j + LANES_64 <= m; j += LANES_64)
            for (int lane = 0; lane < LANES_64; lane++) {
                lanes_before[lane] += fabsf(xs[j + lane] - bs[j + lane]);
                lanes_after[lane] += fabsf(t[j + lane]);
            }
        for (int lane = 0; j < m; j++, lane++) {
            lanes_before[lane] += fabsf(xs[j] - bs[j]);
            lanes_after[lane] += fabsf(t[j]);
        }
    }
    double sum_before = 0.0, sum_after = 0.0;
    for (int lane = 0; lane < LANES_64; lane++) {
        sum_before += lanes_before[lane];
        sum_after += lanes_after[lane];
    }
    *before = sum_before;
    *after = sum_after;
}

/* The sums of products behind merger/methods/reductions.py, continued over the next n entries of two
 * vectors: sums[0][l] += x_j², sums[1][l] += y_j², sums[2][l] += x_j·y_j for each j ≡ l (mod SUM_LANES),
 * j in index order. The products of float32 (or narrower) values are exact in float64, so each lane's
 * additions are its only roundings: the same on every machine, and as reductions.py's torch path adds. */
enum { SUM_LANES = 16, SUM_GROUPS = SUM_LANES / 4 };
typedef double f64x4 __attribute__((vector_size(32)));  /* four lanes; GCC and Clang lower it to the CPU's vectors */
typedef float f32x4 __attribute__((vector_size(16)));

static inline f64x4 widen4(const float *from) {
    f32x4 v;
    memcpy(&v, from, sizeof v);
    return __builtin_convertvector(v, f64x4);
}

void merger_product_sums(const void *x, int x_type, const void *y, int y_type, int64_t n, double *sums) {
    f64x4 xx[SUM_GROUPS], yy[SUM_GROUPS], xy[SUM_GROUPS];  /* held in registers: lanes 4g .. 4g + 3 */
    memcpy(xx, sums, sizeof xx);
    memcpy(yy, sums + SUM_LANES, sizeof yy);
    memcpy(xy, sums + 2 * SUM_LANES, sizeof xy);
    float xs[BLOCK], ys[BLOCK];
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK, padded = (m + SUM_LANES - 1) / SUM_LANES * SUM_LANES;
        load(x, x_type, start, m, xs);
        load(y, y_type, start, m, ys);
        for (int64_t j = m; j < padded; j++)  /* the last block's tail: +0.0 leaves a lane's sum as it is */
            xs[j] = ys[j] = 0.0f;
        for (int64_t j = 0; j < padded; j += SUM_LANES)
#pragma GCC unroll 4
            for (int g = 0; g < SUM_GROUPS; g++) {
                f64x4 a = widen4(xs + j + 4 * g), b = widen4(ys + j + 4 * g);
                xx[g] += a * a;
                yy[g] += b * b;
                xy[g] += a * b;
            }
    }
    memcpy(sums, xx, sizeof xx);
    memcpy(sums + SUM_LANES, yy, sizeof yy);
    memcpy(sums + 2 * SUM_LANES, xy, sizeof xy);
}

int merger_sum_lanes(void) { return SUM_LANES; }

/* torch's CPU random stream (ATen's mt19937 and uniform_real for float32), to draw DARE's masks:
 * out[j] = u_j < density for the generator's next n uniforms u_j = (y & (2^24 − 1)) · 2^-24.
 * `state` is the 624 words, `position` {left, next}, both updated as torch's engine updates its own. */
enum { MT_N = 624, MT_M = 397 };

static inline uint32_t twist(uint32_t u, uint32_t v) {
    return ((((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u));
}

static void next_state(uint32_t *state) {
    uint32_t *p = state;
    for (int j = MT_N - MT_M + 1; --j; p++)
        *p = p[MT_M] ^ twist(p[0], p[1]);
    for (int j = MT_M; --j; p++)
        *p = p[MT_M - MT_N] ^ twist(p[0], p[1]);
    *p = p[MT_M - MT_N] ^ twist(p[0], state[0]);
}

void merger_uniform_below(uint32_t *state, int64_t *position, int64_t n, float density, uint8_t *out) {
    int64_t left = position[0], next = position[1];
    for (int64_t j = 0; j < n;) {
        if (left == 1) {  /* torch refills when a draw takes `left` to 0 */
            next_state(state);
            left = MT_N + 1;
            next = 0;
        }
        int64_t take = n - j < left - 1 ? n - j : left - 1;  /* draws before the next refill */
        for (int64_t k = 0; k < take; k++) {
            uint32_t y = state[next + k];
            y ^= y >> 11;
            y ^= (y << 7) & 0x9d2c5680u;
            y ^= (y << 15) & 0xefc60000u;
            y ^= y >> 18;
            out[j + k] = (float)(y & 0xffffffu) * 0x1p-24f < density;
        }
        left -= take;
        next += take;
        j += take;
    }
    position[0] = left;
    position[1] = next;
}
