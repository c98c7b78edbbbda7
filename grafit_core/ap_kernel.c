/* Exact "#items at or above each threshold" per query row, in one fused pass over the scores.
 *
 * The torch path of grafit_core/ap.py (_count_at_or_above) is the reference; this loop computes
 * the same counts without the 6-8 full passes over the q x N scores that torch operations need.
 * Built and loaded by grafit_core/ap_kernel.py (plain C, no Python or torch headers).
 *
 * Per row i, thr[i, :] holds the row's relevant scores sorted ascending, +inf/NaN pads last.
 * An item's score s (plus, for eq. 5's conditioned ranking, logits[i, coarse[item]], the same
 * float32 add as torch) gets slot = #thresholds <= s; n_ge[i, j] = #items with slot > j.
 * Thresholds in [t_first, t_last] are cut into uniform bins with the same float ops for items
 * and thresholds, so the bin order never contradicts the score order: an item starts from the
 * number of thresholds in lower bins and compares only those sharing its bin. NaN items count
 * nowhere; an item below every finite threshold needs one comparison. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

#define BLOCK 16
#define PROBE 32

static int64_t next_pow2(int64_t x) {
    int64_t p = 1;
    while (p < x) p <<= 1;
    return p;
}

/* the bin of x in [lo, hi] (NaN -> lo's): the same float ops for items and thresholds */
static inline int32_t bin_of(float x, float lo, float hi, float inv, int32_t bins) {
    float c = x > lo ? x : lo;                  /* not fmaxf: a libm call */
    c = c < hi ? c : hi;
    const float f = (c - lo) * inv;           /* NaN when hi - lo overflowed (inv = 0): the top */
    return f < (float)bins ? (int32_t)f : bins - 1;      /* never casts NaN, inf or >= bins */
}

/* #thresholds <= x (a NaN x is counted nowhere by the caller), from the bin table; no
   unpredictable branch for the common item (0 or 1 threshold in its bin) */
static inline int64_t slot_of(float x, int32_t b, const int32_t *below, const float *tt) {
    const float w = x < FLT_MAX ? x : FLT_MAX;  /* +inf: above every finite threshold */
    int64_t slot = below[b], end = below[b + 1];                  /* the thresholds of bin b */
    if (end - slot <= 1)
        return slot + (tt[slot] <= w);          /* tt[slot] of an empty bin is in a higher one: > w */
    while (slot < end) {                        /* ties or a crowded bin: binary search in it */
        const int64_t mid = (slot + end) / 2;
        if (tt[mid] <= w) slot = mid + 1; else end = mid;
    }
    return slot;
}

int grafit_count_ge(const float *scores, int64_t n, int64_t stride, int64_t row0, int64_t row1,
                    const float *thr, int64_t r_max, const float *logits, int64_t n_coarse,
                    const int64_t *coarse, int64_t *n_ge) {
    int64_t *hist = malloc((size_t)(r_max + 1) * sizeof(int64_t));
    int64_t *hist4 = malloc((size_t)(r_max + 1) * 4 * sizeof(int64_t));
    float *tt = malloc((size_t)(r_max + 1) * sizeof(float));
    int64_t cap = 0;
    int32_t *below = NULL;
    if (!hist || !hist4 || !tt) { free(hist); free(hist4); free(tt); return 1; }
    for (int64_t i = row0; i < row1; i++) {
        const float *t = thr + i * r_max, *s = scores + i * stride;
        const float *lg = logits ? logits + i * n_coarse : NULL;
        int64_t *out = n_ge + i * r_max;
        int64_t a = 0, m = 0;
        while (a < r_max && t[a] == -INFINITY) a++;                  /* <= every non-NaN item */
        m = a;
        while (m < r_max && t[m] < INFINITY) m++;                    /* then the finite ones */
        memset(hist, 0, (size_t)(r_max + 1) * sizeof(int64_t));
        memset(hist4, 0, (size_t)(r_max + 1) * 4 * sizeof(int64_t));
        if (m > a) {
            const float lo = t[a], hi = t[m - 1];
            int64_t bins = next_pow2(16 * (m - a));
            if (bins > n / 8) bins = next_pow2(n / 8 > 16 ? n / 8 : 16);
            float inv = hi > lo ? (float)bins / (hi - lo) : 0.0f;
            if (!(inv < FLT_MAX)) inv = 0.0f;  /* a subnormal range: one bin, searched */
            if (bins + 1 > cap) {
                free(below);
                cap = bins + 1;
                below = malloc((size_t)cap * sizeof(int32_t));
                if (!below) { free(hist); free(hist4); free(tt); return 1; }
            }
            memset(below, 0, (size_t)(bins + 1) * sizeof(int32_t));
            for (int64_t j = a; j < m; j++)                          /* per bin: #thresholds */
                below[bin_of(t[j], lo, hi, inv, bins) + 1]++;
            below[0] = (int32_t)a;
            for (int64_t b = 1; b <= bins; b++) below[b] += below[b - 1];   /* #in lower bins */
            memcpy(tt, t, (size_t)m * sizeof(float));
            tt[m] = INFINITY;                       /* sentinel: every scan stops at m */
            /* 4 histograms break the chain of dependent increments of one count */
            /* a block of items wholly below the smallest threshold counts nowhere (with no -inf
               threshold): conditioned ranking pushes most items of other coarse classes there.
               After PROBE blocks, a row where fewer than 1 in 4 were skipped drops the test.
               Bins are computed for a whole block first: that loop vectorises. */
            int64_t skipped = 0;
            for (int64_t k0 = 0; k0 < n; k0 += BLOCK) {
                const int64_t len = n - k0 < BLOCK ? n - k0 : BLOCK;
                const int probe = k0 < PROBE * BLOCK || 4 * skipped >= PROBE;
                float buf[BLOCK], top = -INFINITY;
                int32_t bin[BLOCK];
                const float *v = s + k0;
                if (lg || len < BLOCK) {                /* the last block: pad, never read past */
                    for (int64_t j = 0; j < len; j++) buf[j] = lg ? s[k0 + j] + lg[coarse[k0 + j]] : s[k0 + j];
                    for (int64_t j = len; j < BLOCK; j++) buf[j] = -INFINITY;
                    v = buf;
                }
                if (probe) {
                    for (int64_t j = 0; j < len; j++) top = v[j] > top ? v[j] : top;
                    if (!(top >= lo) && a == 0) { skipped++; continue; }
                }
                for (int j = 0; j < BLOCK; j++) bin[j] = bin_of(v[j], lo, hi, inv, (int32_t)bins);  /* SIMD */
                for (int64_t j = 0; j < len; j++)
                    hist4[4 * slot_of(v[j], bin[j], below, tt) + (j & 3)] += v[j] == v[j];
            }
        } else if (a) {
            for (int64_t k = 0; k < n; k++) {
                const float v = lg ? s[k] + lg[coarse[k]] : s[k];
                if (v == v) hist[a]++;
            }
        }
        for (int64_t j = 0; j <= m; j++)
            hist[j] += hist4[4 * j] + hist4[4 * j + 1] + hist4[4 * j + 2] + hist4[4 * j + 3];
        int64_t acc = 0;                            /* n_ge[j] = #items with slot > j */
        for (int64_t j = r_max - 1; j >= 0; j--) {
            acc += hist[j + 1];
            out[j] = acc;
        }
    }
    free(below);
    free(hist);
    free(hist4);
    free(tt);
    return 0;
}

/* a ranks above b as in torch.topk: NaN above everything, then by value */
static inline int above(float a, float b) {
    return a > b || (a != a && b == b);
}

/* torch.topk(s[:n], k) (sorted, largest first) in one pass: an item enters the k-list only if
 * it beats the current k-th (rare after the first few hundred items, so the test is a
 * well-predicted branch). Among equal values the lower index comes first and stays in a full
 * list (a later equal item never displaces it): the order of a stable sort by -value. */
static void topk_row(const float *s, int64_t n, int64_t k, float *v, int64_t *ix) {
    int64_t filled = 0;
    for (int64_t j = 0; j < n; j++) {
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

/* torch.topk(scores[row0:row1], k, dim=1), ties by lower index (see topk_row) */
int grafit_topk(const float *scores, int64_t n, int64_t stride, int64_t row0, int64_t row1,
                int64_t k, float *vals, int64_t *idx) {
    if (k < 1 || k > n) return 2;
    for (int64_t i = row0; i < row1; i++)
        topk_row(scores + i * stride, n, k, vals + i * k, idx + i * k);
    return 0;
}
