/* Exact average precision per query row, the compiled half of grafit_core/ap.py (whose torch
 * path is the reference): gather each row's relevant scores, count the items at or above each of
 * them in one fused pass over the scores, and AP from those counts. Built and loaded by
 * grafit_core/ap_kernel.py (plain C, no Python or torch headers). Every function takes a range of
 * rows [row0, row1): Python runs a few ranges per thread.
 *
 * Counting: per row i, thr[i, :] holds the row's relevant scores sorted ascending, +inf/NaN pads
 * last. An item's score s (plus, for eq. 5's conditioned ranking, logits[i, coarse[item]], the
 * same float32 add as torch) gets slot = #thresholds <= s; n_ge[i, j] = #items with slot > j.
 * Thresholds in [t_first, t_last] are cut into BIN_RATIO bins per threshold with the same float
 * ops for items and thresholds, so the bin order never contradicts the score order: an item starts
 * from the number of thresholds in lower bins and compares those of its bin, SCAN at once without
 * a branch (thresholds of higher bins past them are above the item, so comparing them is harmless);
 * only a bin holding more (ties, a dense spot) is searched. NaN items count nowhere, nor do items
 * below every threshold: one vectorised test per block of BLOCK items finds the others. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define BLOCK 16
#define SCAN 4          /* one SSE compare; a bin holds more than 4 for ~0.5% of the items */
#define BIN_RATIO 4     /* fewer bins crowd them, more cost a table build that rivals the items */

/* the bin of x in [lo, hi] (NaN -> lo's): the same float ops for items and thresholds */
static inline int32_t bin_of(float x, float lo, float hi, float inv, int32_t bins) {
    float c = x > lo ? x : lo;                  /* not fmaxf: a libm call */
    c = c < hi ? c : hi;
    const float f = (c - lo) * inv;           /* NaN when hi - lo overflowed (inv = 0): the top */
    return f < (float)bins ? (int32_t)f : bins - 1;      /* never casts NaN, inf or >= bins */
}

/* #thresholds of tt[e .. e + SCAN) <= x (NaN pads past the last threshold never are): tt is sorted,
   so the lanes <= x are a prefix, mask 2^c - 1, and c = ctz(mask + 1) (no popcount in plain SSE2) */
static inline int32_t scan_le(const float *tt, int32_t e, float x) {
#if defined(__SSE2__)
    return __builtin_ctz((unsigned)_mm_movemask_ps(_mm_cmple_ps(_mm_loadu_ps(tt + e), _mm_set1_ps(x))) + 1u);
#else
    int32_t c = 0;
    for (int u = 0; u < SCAN; u++) c += tt[e + u] <= x;
    return c;
#endif
}

/* any of x[0 .. BLOCK) > t, or NaN with nan_counts (GCC does not vectorise this test itself) */
static inline int any_above(const float *x, float t, int nan_counts) {
#if defined(__SSE2__)
    const __m128 tv = _mm_set1_ps(t), nan = nan_counts ? _mm_castsi128_ps(_mm_set1_epi32(-1)) : _mm_setzero_ps();
    __m128 acc = _mm_setzero_ps();
    for (int j = 0; j < BLOCK; j += 4) {
        const __m128 v = _mm_loadu_ps(x + j);
        acc = _mm_or_ps(acc, _mm_or_ps(_mm_cmpgt_ps(v, tv), _mm_and_ps(_mm_cmpunord_ps(v, v), nan)));
    }
    return _mm_movemask_ps(acc);
#else
    int hit = 0;
    for (int j = 0; j < BLOCK; j++) hit |= x[j] > t || (nan_counts && x[j] != x[j]);
    return hit;
#endif
}

/* per bin b: #thresholds in lower bins (below[b], a the -inf ones first), and the item's start
   table[b] = below[b], or ~below[b] where the bin holds more than SCAN thresholds (searched) */
static void bin_tables(const float *t, int64_t a, int64_t m, float lo, float hi, float inv, int32_t bins,
                       int32_t *below, int32_t *table) {
    memset(below, 0, (size_t)(bins + 1) * sizeof(int32_t));
    for (int64_t j = a; j < m; j++) below[bin_of(t[j], lo, hi, inv, bins) + 1]++;
    below[0] = (int32_t)a;
    for (int32_t b = 1; b <= bins; b++) below[b] += below[b - 1];
    for (int32_t b = 0; b < bins; b++) table[b] = below[b + 1] - below[b] > SCAN ? ~below[b] : below[b];
}

/* bit j of the result: x[j] > t, or with ordered x[j] is not NaN (a NaN is never counted) */
static inline uint32_t block_mask(const float *x, float t, int ordered) {
#if defined(__SSE2__)
    const __m128 tv = _mm_set1_ps(t);
    uint32_t m = 0;
    for (int j = 0; j < BLOCK; j += 4) {
        const __m128 v = _mm_loadu_ps(x + j);
        m |= (uint32_t)_mm_movemask_ps(ordered ? _mm_cmpord_ps(v, v) : _mm_cmpgt_ps(v, tv)) << j;
    }
    return m;
#else
    uint32_t m = 0;
    for (int j = 0; j < BLOCK; j++) m |= (uint32_t)(ordered ? x[j] == x[j] : x[j] > t) << j;
    return m;
#endif
}

/* a crowded bin's slot: binary search in tt[e, end); out of line, so that the common path of
   slot_of falls through without a taken branch (7% of the count at R ~ 5,000) */
static __attribute__((noinline, cold)) int32_t search_bin(float x, int32_t e, int32_t end, const float *tt) {
    while (e < end) {
        const int32_t mid = e + (end - e) / 2;
        if (tt[mid] <= x) e = mid + 1; else end = mid;
    }
    return e;
}

/* the slot of x (#thresholds <= x) in bin b */
static inline int32_t slot_of(float x, int32_t b, const int32_t *below, const int32_t *table, const float *tt) {
    const int32_t e = table[b];
    if (__builtin_expect(e >= 0, 1)) return e + scan_le(tt, e, x);
    return search_bin(x, ~e, below[b + 1], tt);
}

/* hist[slot] += 1 for each non-NaN item of row s (+ lg[coarse]); without -inf thresholds (a = 0)
   only the items at or above lo, the others are in slot 0 and count nowhere: at a fine level most
   items of a row, at a conditioned ranking most items of the other coarse classes. */
static void count_row(const float *s, int64_t n, const float *lg, const int64_t *coarse, int64_t a,
                      float lo, float hi, float inv, int32_t bins, const int32_t *below, const int32_t *table,
                      const float *tt, int32_t *hist) {
    const float under = nextafterf(lo, -INFINITY);         /* x > under: x >= lo (lo is finite) */
    for (int64_t k0 = 0; k0 < n; k0 += BLOCK) {
        const int64_t len = n - k0 < BLOCK ? n - k0 : BLOCK;
        float buf[BLOCK];
        int32_t bin[BLOCK];
        const float *v = s + k0;
        if (lg || len < BLOCK) {                /* the last block: pad, never read past */
            for (int64_t j = 0; j < len; j++) buf[j] = lg ? s[k0 + j] + lg[coarse[k0 + j]] : s[k0 + j];
            for (int64_t j = len; j < BLOCK; j++) buf[j] = NAN;
            v = buf;
        }
        uint32_t mask = block_mask(v, under, a > 0);
        if (!mask)
            continue;
        for (int j = 0; j < BLOCK; j++) bin[j] = bin_of(v[j], lo, hi, inv, bins);     /* SIMD */
        if (mask == (1u << BLOCK) - 1) {        /* a dense block: a loop of known length, unrolled */
#pragma GCC unroll 16
            for (int j = 0; j < BLOCK; j++) hist[slot_of(v[j], bin[j], below, table, tt)]++;
            continue;
        }
        while (mask) {
            const int j = __builtin_ctz(mask);
            mask &= mask - 1;
            hist[slot_of(v[j], bin[j], below, table, tt)]++;
        }
    }
}

int grafit_count_ge(int64_t row0, int64_t row1, const float *scores, int64_t n, int64_t stride,
                    const float *thr, int64_t r_max, const float *logits, int64_t n_coarse,
                    const int64_t *coarse, int64_t *n_ge) {
    if (n >= INT32_MAX || r_max >= INT32_MAX / BIN_RATIO) return 3;
    int32_t *hist = malloc((size_t)(r_max + 1) * sizeof(int32_t));
    float *tt = malloc((size_t)(r_max + SCAN) * sizeof(float));
    int32_t *below = NULL, *table = NULL;
    int64_t cap = 0;
    int code = !hist || !tt;
    for (int64_t i = row0; i < row1 && !code; i++) {
        const float *t = thr + i * r_max, *s = scores + i * stride;
        const float *lg = logits ? logits + i * n_coarse : NULL;
        int64_t *out = n_ge + i * r_max;
        int64_t a = 0, m = 0;
        while (a < r_max && t[a] == -INFINITY) a++;                  /* <= every non-NaN item */
        m = a;
        while (m < r_max && t[m] < INFINITY) m++;                    /* then the finite ones */
        memset(hist, 0, (size_t)(r_max + 1) * sizeof(int32_t));
        if (m > a) {
            const float lo = t[a], hi = t[m - 1];
            /* at most 2 bins per item: a shard's row shorter than the (global) thresholds */
            int64_t bins = BIN_RATIO * (m - a);
            bins = bins < 2 * n ? bins : 2 * n;
            bins = bins > 16 ? bins : 16;
            float inv = hi > lo ? (float)bins / (hi - lo) : 0.0f;
            if (!(inv < FLT_MAX)) inv = 0.0f;  /* a subnormal range: one bin, searched */
            if (bins + 1 > cap) {
                free(below);
                free(table);
                cap = bins + 1;
                below = malloc((size_t)cap * sizeof(int32_t));
                table = malloc((size_t)cap * sizeof(int32_t));
                if (!below || !table) { code = 1; break; }
            }
            bin_tables(t, a, m, lo, hi, inv, (int32_t)bins, below, table);
            memcpy(tt, t, (size_t)m * sizeof(float));
            for (int u = 0; u < SCAN; u++) tt[m + u] = NAN;          /* past the last: never <= */
            count_row(s, n, lg, coarse, a, lo, hi, inv, (int32_t)bins, below, table, tt, hist);
        } else if (a) {
            for (int64_t k = 0; k < n; k++) {
                const float v = lg ? s[k] + lg[coarse[k]] : s[k];
                hist[a] += v == v;              /* every non-NaN item is >= -inf */
            }
        }
        int64_t acc = 0;                            /* n_ge[j] = #items with slot > j */
        for (int64_t j = r_max - 1; j >= 0; j--) {
            acc += hist[j + 1];
            out[j] = acc;
        }
    }
    free(below);
    free(table);
    free(hist);
    free(tt);
    return code;
}

/* thr[i] = pad, then row i's relevant scores s[order[start[i] + j]] (+ lg[coarse[.]], the counting
   loop's float add) for j < size[i] from column pos0[i] (its shard's place among all shards' ones),
   then pad: the thresholds before the sort (and, sharded, before the sum over shards) */
int grafit_gather(int64_t row0, int64_t row1, const float *scores, int64_t stride, const int64_t *order,
                  const int64_t *start, const int64_t *size, const int64_t *pos0, const float *logits,
                  int64_t n_coarse, const int64_t *coarse, float pad, float *thr, int64_t r_max) {
    for (int64_t i = row0; i < row1; i++) {
        const float *s = scores + i * stride, *lg = logits ? logits + i * n_coarse : NULL;
        const int64_t *cols = order + start[i];
        float *t = thr + i * r_max;
        for (int64_t j = 0; j < pos0[i]; j++) t[j] = pad;
        t += pos0[i];
        if (lg)
            for (int64_t j = 0; j < size[i]; j++) t[j] = s[cols[j]] + lg[coarse[cols[j]]];
        else
            for (int64_t j = 0; j < size[i]; j++) t[j] = s[cols[j]];
        for (int64_t j = pos0[i] + size[i]; j < r_max; j++) thr[i * r_max + j] = pad;
    }
    return 0;
}

/* ap[i, 0] = 1/R sum_{j < R} #relevant >= thr[i, j] / #items >= thr[i, j] (n_ge, at least 1), summed
   in float64 in threshold order (the torch path's sequential cumsum: the same bits); NaN if R = 0.
   #relevant >= thr[j] = R - (first position of thr[j]'s value): the sorted row's ties, as
   torch.searchsorted(left), which puts a NaN value past the row (r_max). ap[i, 1] = MAP@R
   (Musgrave et al. 2020): the same sum over the relevant items ranked within the first R (ties: the
   rank is #items at or above), divided by R. */
int grafit_ap(int64_t row0, int64_t row1, const float *thr, int64_t r_max, const int64_t *n_rel,
              const int64_t *n_ge, double *ap) {
    for (int64_t i = row0; i < row1; i++) {
        const float *t = thr + i * r_max;
        const int64_t *c = n_ge + i * r_max, r = n_rel[i];
        double sum = 0.0, sum_r = 0.0;
        int64_t first = 0;
        for (int64_t j = 0; j < r; j++) {
            if (j == 0 || !(t[j] == t[j - 1])) first = j;
            const int64_t at = t[j] == t[j] ? first : r_max, rank = c[j] > 1 ? c[j] : 1;
            const double p = (double)(r - at) / (double)rank;
            sum += p;
            if (rank <= r) sum_r += p;
        }
        ap[2 * i] = r > 0 ? sum / (double)r : NAN;
        ap[2 * i + 1] = r > 0 ? sum_r / (double)r : NAN;
    }
    return 0;
}

/* a ranks above b as in torch.topk: NaN above everything, then by value */
static inline int above(float a, float b) {
    return a > b || (a != a && b == b);
}

/* torch.topk(s[:n], k) (sorted, largest first) in one pass: an item enters the k-list only if
 * it beats the current k-th (rare after the first few hundred items), so a block of BLOCK items
 * none of which is above the k-th nor NaN is skipped after one vectorised test. Among equal values
 * the lower index comes first and stays in a full list (a later equal item never displaces it):
 * the order of a stable sort by -value. */
static void topk_row(const float *s, int64_t n, int64_t k, float *v, int64_t *ix) {
    int64_t filled = 0;
    for (int64_t j0 = 0; j0 < n; j0 += BLOCK) {
        const int64_t end = n - j0 < BLOCK ? n : j0 + BLOCK;
        if (filled == k && end - j0 == BLOCK && !any_above(s + j0, v[k - 1], v[k - 1] == v[k - 1]))
            continue;
        for (int64_t j = j0; j < end; j++) {
            const float x = s[j];
            if (filled == k && !(x > v[k - 1]) && (x == x || v[k - 1] != v[k - 1])) continue;  /* !above */
            int64_t p = filled < k ? filled++ : k - 1;       /* drop the k-th, insert x in order */
            while (p > 0 && above(x, v[p - 1])) {
                v[p] = v[p - 1];
                ix[p] = ix[p - 1];
                p--;
            }
            v[p] = x;
            ix[p] = j;
        }
    }
}

/* torch.topk(scores[row0:row1], k, dim=1), ties by lower index (see topk_row) */
int grafit_topk(int64_t row0, int64_t row1, const float *scores, int64_t n, int64_t stride, int64_t k,
                float *vals, int64_t *idx) {
    if (k < 1 || k > n) return 2;
    for (int64_t i = row0; i < row1; i++)
        topk_row(scores + i * stride, n, k, vals + i * k, idx + i * k);
    return 0;
}

/* Each function above over [0, q) in `parts` row ranges, run by torch's own OpenMP threads (built
 * with -fopenmp, this library shares the libgomp that torch loaded: same soname). Not a pool of
 * our own beside torch's: after each product torch's idle OpenMP threads spin for milliseconds,
 * sharing the cores with that pool's threads (the AP of a group right after a product took 20%
 * longer, 2 threads). Threads take the ranges from a counter as they free up. Only GOMP_parallel
 * is needed from libgomp. */
int grafit_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

#define ROWS_PARALLEL(call)                                                                         \
    int64_t next = 0;                                                                               \
    int code = 0;                                                                                   \
    _Pragma("omp parallel num_threads(threads)")                                                    \
    for (;;) {                                                                                      \
        const int64_t t = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);                           \
        if (t >= parts) break;                                                                      \
        const int64_t row0 = q * t / parts, row1 = q * (t + 1) / parts;                             \
        const int c = call;                                                                         \
        if (c) __atomic_store_n(&code, c, __ATOMIC_RELAXED);                                        \
    }                                                                                               \
    return code;

int grafit_count_ge_par(int threads, int64_t parts, int64_t q, const float *scores, int64_t n, int64_t stride,
                        const float *thr, int64_t r_max, const float *logits, int64_t n_coarse,
                        const int64_t *coarse, int64_t *n_ge) {
    ROWS_PARALLEL(grafit_count_ge(row0, row1, scores, n, stride, thr, r_max, logits, n_coarse, coarse, n_ge))
}

int grafit_gather_par(int threads, int64_t parts, int64_t q, const float *scores, int64_t stride,
                      const int64_t *order, const int64_t *start, const int64_t *size, const int64_t *pos0,
                      const float *logits, int64_t n_coarse, const int64_t *coarse, float pad, float *thr,
                      int64_t r_max) {
    ROWS_PARALLEL(grafit_gather(row0, row1, scores, stride, order, start, size, pos0, logits, n_coarse, coarse, pad,
                                thr, r_max))
}

int grafit_ap_par(int threads, int64_t parts, int64_t q, const float *thr, int64_t r_max, const int64_t *n_rel,
                  const int64_t *n_ge, double *ap) {
    ROWS_PARALLEL(grafit_ap(row0, row1, thr, r_max, n_rel, n_ge, ap))
}

int grafit_topk_par(int threads, int64_t parts, int64_t q, const float *scores, int64_t n, int64_t stride,
                    int64_t k, float *vals, int64_t *idx) {
    ROWS_PARALLEL(grafit_topk(row0, row1, scores, n, stride, k, vals, idx))
}
