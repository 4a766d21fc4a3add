/* The passes over the vocabulary, in C (see kernels.py): the log-normalizer of every scored row
 * with its gathers (kvq_rows, normalizer.py), and the reference compaction's two (compaction.py).
 *
 * The same float32 / float64 / int64 arithmetic as the numpy paths, in the same order, built
 * without fast-math or FP contraction: the results are the same bits, and tests hold them to it.
 * The exponential of the log-normalizer is defined here and in normalizer.py with the same
 * IEEE operations (no libm), and its terms are summed as integers, exact in any order: so the
 * loop can use the widest vectors the CPU has and still give numpy's bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(d) for d in [-64, 0], Cephes' expf: 2^k * (1 + r + r^2 P(r)), r = d - k ln 2 in two parts,
 * k = d / ln 2 rounded half to even by adding and taking away 1.5 * 2^23 (what rintf does, in two
 * plain additions that vectorize). Mirrored operation by operation by normalizer.exp_defined. */
static inline float kvq_exp(float d) {
    const float k = (d * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = d - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r;
    p = p + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;  /* 2^k: k >= -93, a normal float */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* round-half-even of 0 <= t < 2^52 as an integer: the add rounds, the bits are the integer */
static inline int64_t kvq_rint_small(double t) {
    const double u = t + 4503599627370496.0;
    int64_t bits;
    memcpy(&bits, &u, sizeof bits);
    return bits - 0x4330000000000000LL;
}

/* Per row r of x (n x v): imax[r] = numpy's argmax (first NaN, else first maximum);
 * sum[r] = sum over the row of rint(exp(x - x[imax]) * 2^shift), or -1 when x[imax] is not finite;
 * gathered[r, :] = x[r, ids[r, :]] (w ids per row), read while the row is in cache. */
__attribute__((target_clones("avx512f", "avx2", "default")))
void kvq_rows(const float *x, int64_t n, int64_t v, int64_t shift, const int32_t *ids, int64_t w,
              int32_t *imax, int64_t *sum, float *gathered) {
    const double scale = ldexp(1.0, (int)shift);
    for (int64_t r = 0; r < n; r++) {
        const float *row = x + r * v;
        /* the maximum and a NaN count: order-free reductions, vectorized (which of two equal
         * values is kept does not matter: the index is the row's first) */
        float m = row[0];
        int64_t nans = 0;
#pragma omp simd reduction(max:m) reduction(+:nans)
        for (int64_t j = 0; j < v; j++) {
            const float y = row[j];
            m = y > m ? y : m;
            nans += y != y;
        }
        int64_t at = 0;
        if (nans) { while (row[at] == row[at]) at++; }
        else { while (!(row[at] == m)) at++; }
        imax[r] = (int32_t)at;
        const float top = row[at];
        if (isfinite(top)) {
            int64_t acc = 0;
#pragma omp simd reduction(+:acc)
            for (int64_t j = 0; j < v; j++) {
                float d = row[j] - top;
                d = d > -64.0f ? d : -64.0f;
                acc += kvq_rint_small((double)kvq_exp(d) * scale);
            }
            sum[r] = acc;
        } else {
            sum[r] = -1;
        }
        for (int64_t i = 0; i < w; i++) gathered[r * w + i] = row[ids[r * w + i]];
    }
}

#define SCAN_WIDTH 64

/* Every token with logit > thr[r], in (row, token) order, from row r0 and entry e0 on:
 * starts[r] = first entry of row r, ids = token ids, lp = logit - norm[r].
 * Writes one slot past its last hit (branch-free), so a row needs v free slots.
 * Stops before a row that might not fit in cap entries and returns that row (the caller grows
 * the buffers and calls again from it); returns n when every row is done (starts[n] set). */
int64_t kvq_select(const float *x, int64_t n, int64_t v, const float *thr, const float *norm,
                   int64_t r0, int64_t e0, int64_t cap, int32_t *ids, float *lp, int64_t *starts) {
    int64_t e = e0;
    for (int64_t r = r0; r < n; r++) {
        starts[r] = e;
        if (cap - e < v) return r;
        const float *row = x + r * v;
        const float t = thr[r], nr = norm[r];
        int64_t j = 0;
        for (; j + SCAN_WIDTH <= v; j += SCAN_WIDTH) {
            int any = 0;  /* a vectorized look first: many blocks hold no token above the cutoff */
            for (int q = 0; q < SCAN_WIDTH; q++) any |= row[j + q] > t;
            if (!any) continue;
            for (int q = 0; q < SCAN_WIDTH; q++) {  /* branch-free: always write, advance on a hit */
                const float y = row[j + q];
                ids[e] = (int32_t)(j + q);
                lp[e] = y - nr;
                e += y > t;
            }
        }
        for (; j < v; j++) {
            const float y = row[j];
            if (y > t) { ids[e] = (int32_t)j; lp[e] = y - nr; e++; }
        }
    }
    starts[n] = e;
    return n;
}

typedef struct { float lp; int32_t pos; } candidate;

static int by_logp_then_token(const void *a, const void *b) {
    const candidate *x = a, *y = b;
    if (x->lp > y->lp) return -1;  /* log p descending */
    if (x->lp < y->lp) return 1;
    return (x->pos > y->pos) - (x->pos < y->pos);  /* ties: token order, as numpy's stable sort */
}

/* Per row: the top k by log p (a histogram of log p finds the bin holding the k-th largest, so
 * only entries down to it are sorted), then m systematic samples of the rest (the tail) on its
 * cumulative fixed-point mass p_fixed. Output arrays come padded; returns -1 if out of memory. */
int kvq_finish(const int64_t *starts, int64_t n, const int32_t *ids, const float *lp,
               const int64_t *p_fixed, int64_t k, int64_t m, const double *u0, int64_t top_bins,
               float level_scale, double mass_unit, int32_t *top_ids, float *top_logp,
               int32_t *tail_ids, float *tail_logp, double *tail_mass) {
    int64_t widest = 0;
    for (int64_t r = 0; r < n; r++)
        if (starts[r + 1] - starts[r] > widest) widest = starts[r + 1] - starts[r];
    int64_t *hist = malloc(sizeof(int64_t) * (size_t)top_bins);
    int64_t *level = malloc(sizeof(int64_t) * (size_t)(widest + 1));
    char *in_top = malloc((size_t)(widest + 1));
    candidate *cand = malloc(sizeof(candidate) * (size_t)(widest + 1));
    if (!hist || !level || !in_top || !cand) {
        free(hist); free(level); free(in_top); free(cand);
        return -1;
    }
    for (int64_t r = 0; r < n; r++) {
        const int64_t a = starts[r], c = starts[r + 1] - a;
        for (int64_t b = 0; b < top_bins; b++) hist[b] = 0;
        for (int64_t i = 0; i < c; i++) {
            int64_t lev = (int64_t)(lp[a + i] * level_scale);
            if (lev > top_bins - 1) lev = top_bins - 1;
            level[i] = lev;
            hist[lev]++;
        }
        int64_t kth = 0, below = 0;
        while (kth < top_bins && below + hist[kth] < k) below += hist[kth++];
        int64_t nc = 0;
        for (int64_t i = 0; i < c; i++) {
            in_top[i] = 0;
            if (level[i] <= kth) { cand[nc].lp = lp[a + i]; cand[nc].pos = (int32_t)i; nc++; }
        }
        qsort(cand, (size_t)nc, sizeof(candidate), by_logp_then_token);
        const int64_t kk = k < c ? k : c;
        for (int64_t i = 0; i < kk; i++) {
            const int64_t at = a + cand[i].pos;
            top_ids[r * k + i] = ids[at];
            top_logp[r * k + i] = lp[at];
            in_top[cand[i].pos] = 1;
        }
        int64_t mass = 0;
        for (int64_t i = 0; i < c; i++)
            if (!in_top[i]) mass += p_fixed[a + i];
        if (m == 0 || mass == 0) continue;
        tail_mass[r] = (double)mass / mass_unit;
        const double step = (double)mass / (double)m;
        int64_t last = c - 1, i = 0;
        while (in_top[last]) last--;
        while (in_top[i]) i++;
        int64_t cum = p_fixed[a + i];
        for (int64_t j = 0; j < m; j++) {
            const int64_t offset = (int64_t)floor(((double)j + u0[r]) * step);
            while (cum <= offset && i < last) {  /* the first tail entry whose cumulative mass passes it */
                i++;
                while (in_top[i]) i++;
                cum += p_fixed[a + i];
            }
            tail_ids[r * m + j] = ids[a + i];
            tail_logp[r * m + j] = lp[a + i];
        }
    }
    free(hist); free(level); free(in_top); free(cand);
    return 0;
}
