/* The reference compaction's two passes over the vocabulary, in C (see compaction.py).
 *
 * The same float32 / float64 / int64 arithmetic as the numpy path in metrics.py, in the same
 * order, built without fast-math or FP contraction: the results are the same bits, and a test
 * holds them to it. The one transcendental, exp of the tail's log-probabilities, stays in numpy.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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
