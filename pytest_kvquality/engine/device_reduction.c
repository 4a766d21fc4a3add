/* The evaluation's pass over the vocabulary, done where llama.cpp computed the logits (a backend
 * sampler of llama.cpp's experimental backend-sampling interface): per scored row, the argmax, the
 * log-normalizer and the logits at the row's ids (the reference's top and tail tokens, the next
 * token), (ids + 2) floats per row instead of the whole row.
 *
 * llama.cpp calls backend_apply once per output row, each with a view of that row. The first call of
 * a graph builds the reduction over the whole micro-batch (one op per step, on every row at once) and
 * scatters its rows into a buffer of this reduction on the same device, at the rows of the group
 * being decoded; no row returns anything to llama.cpp, which then copies nothing to the host. The
 * caller reads the group's rows once, after its last decode: no decode is waited for on its own, so
 * llama.cpp builds each graph while the device computes the one before (waiting for each cost 20-30 %
 * of the forward pass on an H200, benchmarks/README §6).
 *
 * Which rows a graph reads and writes is graph input, set by backend_set_input from what the caller
 * said before the decode (kvq_reduction_next), so a graph llama.cpp reuses still writes the right rows.
 *
 * Built and loaded by device_reduction.py against the headers and libraries of the installed
 * llama-cpp-python. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "llama.h"

typedef struct kvq_reduction {
    int32_t width;      /* ids per row */
    int32_t cap;        /* rows of one group: the results buffer holds cap + 1 (the last: a trash row) */
    int32_t n_seq;      /* sequences attached */
    struct ggml_context * tctx;
    ggml_backend_buffer_t tbuf;
    struct ggml_tensor * out; /* [width + 2, cap + 1] f32 on the logits' device: argmax (as float),
                                 log-normalizer, logits at the ids */
    /* the graph last built: its padded logits, output rows and inputs (NULL: it has no output row) */
    struct ggml_tensor * src;
    int64_t n_graph;
    struct ggml_tensor * rows_in; /* [n_graph] i64: the group rows of the graph's output rows */
    struct ggml_tensor * ids_in;  /* [width, n_graph] i32: their ids */
    /* the group being decoded (kvq_reduction_begin) and the next decode (kvq_reduction_next) */
    const int32_t * ids;          /* [n_group, width], the caller's, alive until kvq_reduction_collect */
    int64_t n_group;
    int64_t first;
    int64_t n_next;
    int64_t * rows;               /* host scratch for rows_in */
    int64_t rows_size;
    int32_t * zeros;              /* ids for rows that are not read: [rows_size, width] zeros */
    int32_t refs;
    int32_t failed;     /* a callback failed or rows did not match: the group's results are not read */
    struct llama_sampler ** chains;
} kvq_reduction;

static void release(kvq_reduction * r) {
    if (--r->refs > 0) {
        return;
    }
    if (r->tbuf) {
        ggml_backend_buffer_free(r->tbuf);
    }
    if (r->tctx) {
        ggml_free(r->tctx);
    }
    free(r->rows);
    free(r->zeros);
    free(r->chains);
    free(r);
}

static const char * kvq_name(const struct llama_sampler * smpl) {
    (void) smpl;
    return "kvq-reduction";
}

/* no host path: this sampler only runs where the logits are */
static void kvq_apply_host(struct llama_sampler * smpl, llama_token_data_array * cur_p) {
    (void) smpl;
    (void) cur_p;
}

static void kvq_free(struct llama_sampler * smpl) {
    release((kvq_reduction *) smpl->ctx);
}

static bool kvq_backend_init(struct llama_sampler * smpl, ggml_backend_buffer_type_t buft, uint32_t n_out_max) {
    (void) n_out_max;
    kvq_reduction * r = (kvq_reduction *) smpl->ctx;
    if (r->tbuf) {
        return true; /* the other sequences' samplers share the results buffer */
    }
    struct ggml_init_params params = { ggml_tensor_overhead() * 2, NULL, true };
    r->tctx = ggml_init(params);
    if (!r->tctx) {
        r->failed = 1;
        return false;
    }
    r->out = ggml_new_tensor_2d(r->tctx, GGML_TYPE_F32, (int64_t) r->width + 2, (int64_t) r->cap + 1);
    ggml_set_name(r->out, "kvq_results");
    r->tbuf = ggml_backend_alloc_ctx_tensors_from_buft(r->tctx, buft);
    if (!r->tbuf) {
        r->failed = 1;
        return false;
    }
    ggml_backend_buffer_clear(r->tbuf, 0);
    return true;
}

static void kvq_backend_reset(struct llama_sampler * smpl) {
    kvq_reduction * r = (kvq_reduction *) smpl->ctx;
    r->src = NULL;
    r->n_graph = 0;
    r->rows_in = NULL;
    r->ids_in = NULL;
}

/* The reduction of the n rows of ``logits`` into the group rows ``rows_in``, added to ``gf``. */
static void build(kvq_reduction * r, struct ggml_context * ctx, struct ggml_cgraph * gf, struct ggml_tensor * logits,
                  int64_t n, struct ggml_tensor ** rows_in, struct ggml_tensor ** ids_in) {
    const int64_t v = logits->ne[0];
    if (logits->ne[1] != n) {
        logits = ggml_view_2d(ctx, logits, v, n, logits->nb[1], 0); /* without the padding row; contiguous */
    }
    struct ggml_tensor * by_row = ggml_reshape_3d(ctx, logits, 1, v, n);     /* each logit a "row" */
    struct ggml_tensor * top = ggml_argmax(ctx, logits);                     /* [n] int32 */
    struct ggml_tensor * top2 = ggml_reshape_2d(ctx, top, 1, n);
    struct ggml_tensor * probs = ggml_soft_max(ctx, logits);
    struct ggml_tensor * x_top = ggml_get_rows(ctx, by_row, top2);           /* [1, 1, n] */
    struct ggml_tensor * p_top = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, v, n), top2);
    /* log-normalizer = max + log(sum exp(x - max)) = x_top - log(p_top), p_top >= 1 / n_vocab */
    struct ggml_tensor * norm = ggml_sub(ctx, x_top, ggml_log(ctx, p_top));
    *ids_in = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, r->width, n);
    ggml_set_name(*ids_in, "kvq_ids");
    ggml_set_input(*ids_in);
    *rows_in = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
    ggml_set_name(*rows_in, "kvq_rows");
    ggml_set_input(*rows_in);
    struct ggml_tensor * gathered = ggml_get_rows(ctx, by_row, *ids_in);     /* [1, width, n] */
    struct ggml_tensor * head = ggml_concat(ctx, ggml_reshape_2d(ctx, ggml_cast(ctx, top2, GGML_TYPE_F32), 1, n),
                                           ggml_reshape_2d(ctx, norm, 1, n), 0);
    struct ggml_tensor * result = ggml_concat(ctx, head, ggml_reshape_2d(ctx, gathered, r->width, n), 0);
    struct ggml_tensor * stored = ggml_set_rows(ctx, r->out, result, *rows_in);
    ggml_set_name(stored, "kvq_reduction");
    ggml_build_forward_expand(gf, stored);
}

static void kvq_backend_apply(struct llama_sampler * smpl, struct ggml_context * ctx, struct ggml_cgraph * gf,
                              struct llama_sampler_data * data) {
    kvq_reduction * r = (kvq_reduction *) smpl->ctx;
    struct ggml_tensor * row = data->logits;
    data->logits = NULL; /* the row itself is not wanted on the host */
    if (!row->view_src) {
        /* llama.cpp's probe (node count, ops the device supports) passes a lone row, never computed */
        struct ggml_tensor * rows_in = NULL;
        struct ggml_tensor * ids_in = NULL;
        build(r, ctx, gf, ggml_reshape_2d(ctx, row, row->ne[0], 1), 1, &rows_in, &ids_in);
        return;
    }
    struct ggml_tensor * all = row->view_src; /* llama.cpp's logits, padded with one row */
    if (r->src == all) {
        return; /* built at this graph's first row */
    }
    r->src = all;
    r->n_graph = all->ne[1] - 1;
    r->rows_in = NULL;
    r->ids_in = NULL;
    if (r->n_graph > 0) { /* a micro-batch without output rows applies the samplers to the padding row */
        build(r, ctx, gf, all, r->n_graph, &r->rows_in, &r->ids_in);
    }
}

/* Before the graph runs: which group rows its output rows are, from kvq_reduction_next. Called once per
 * sequence with output rows in the micro-batch; every call writes the same. */
static void kvq_backend_set_input(struct llama_sampler * smpl) {
    kvq_reduction * r = (kvq_reduction *) smpl->ctx;
    if (!r->rows_in) {
        return;
    }
    const int64_t n = r->n_graph;
    if (n > r->rows_size) {
        free(r->rows);
        free(r->zeros);
        r->rows = (int64_t *) malloc((size_t) n * sizeof(int64_t));
        r->zeros = (int32_t *) calloc((size_t) (n * r->width), sizeof(int32_t));
        r->rows_size = r->rows && r->zeros ? n : 0;
        if (!r->rows_size) {
            /* the graph would run on whatever its inputs hold, and a GPU does not check rows
             * and ids against their tensors: stop rather than write past the results */
            fprintf(stderr, "pytest-kvquality: no memory for the device reduction's %lld input rows\n", (long long) n);
            abort();
        }
    }
    const int trash = r->first < 0; /* rows announced as not the group's (kvq_reduction_next) */
    const int ok = !trash && r->ids != NULL && n == r->n_next && r->first + n <= r->n_group &&
                   r->first + n <= r->cap;
    if (!ok && !(trash && n == r->n_next)) {
        r->failed = 1; /* every row to the trash row, nothing read */
    }
    for (int64_t j = 0; j < n; j++) {
        r->rows[j] = ok ? r->first + j : r->cap;
    }
    ggml_backend_tensor_set(r->rows_in, r->rows, 0, (size_t) n * sizeof(int64_t));
    ggml_backend_tensor_set(r->ids_in, ok ? r->ids + r->first * r->width : r->zeros, 0,
                            (size_t) (n * r->width) * sizeof(int32_t));
}

static struct llama_sampler_i kvq_iface = {
    /* .name              = */ kvq_name,
    /* .accept            = */ NULL,
    /* .apply             = */ kvq_apply_host,
    /* .reset             = */ NULL,
    /* .clone             = */ NULL,
    /* .free              = */ kvq_free,
    /* .backend_init      = */ kvq_backend_init,
    /* .backend_accept    = */ NULL,
    /* .backend_apply     = */ kvq_backend_apply,
    /* .backend_set_input = */ kvq_backend_set_input,
    /* .backend_reset     = */ kvq_backend_reset,
    /* .copy_state        = */ NULL,
};

/* A reduction for rows of ``width`` ids, groups of at most ``cap`` rows, attached to every sequence
 * of ``lctx``; NULL if llama.cpp refused it (the caller then reduces on the host). */
kvq_reduction * kvq_reduction_attach(struct llama_context * lctx, int32_t width, int32_t cap, int32_t n_seq) {
    kvq_reduction * r = (kvq_reduction *) calloc(1, sizeof(kvq_reduction));
    if (!r) {
        return NULL;
    }
    r->width = width;
    r->cap = cap;
    r->n_seq = n_seq;
    r->refs = 1; /* the caller's */
    r->chains = (struct llama_sampler **) calloc((size_t) n_seq, sizeof(struct llama_sampler *));
    if (!r->chains) {
        release(r);
        return NULL;
    }
    for (int32_t s = 0; s < n_seq; s++) {
        struct llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
        r->refs++;
        llama_sampler_chain_add(chain, llama_sampler_init(&kvq_iface, r));
        r->chains[s] = chain;
        if (!llama_set_sampler(lctx, s, chain) || r->failed) {
            for (int32_t t = 0; t <= s; t++) {
                llama_set_sampler(lctx, t, NULL);
            }
            for (int32_t t = 0; t <= s; t++) {
                llama_sampler_free(r->chains[t]);
                r->chains[t] = NULL;
            }
            release(r);
            return NULL;
        }
    }
    return r;
}

/* Detach from ``lctx`` (raw logits again) and free the samplers. */
void kvq_reduction_detach(kvq_reduction * r, struct llama_context * lctx) {
    for (int32_t s = 0; s < r->n_seq; s++) {
        if (lctx) {
            llama_set_sampler(lctx, s, NULL);
        }
        if (r->chains[s]) {
            llama_sampler_free(r->chains[s]);
            r->chains[s] = NULL;
        }
    }
    release(r);
}

/* A group of ``n_rows`` output rows starts: their ids in output order ([n_rows, width] int32, the
 * caller's until kvq_reduction_collect). */
int32_t kvq_reduction_begin(kvq_reduction * r, const int32_t * ids, int32_t n_rows) {
    if (n_rows < 0 || n_rows > r->cap) {
        return -1;
    }
    r->ids = ids;
    r->n_group = n_rows;
    r->first = 0;
    r->n_next = 0;
    r->failed = 0;
    return 0;
}

/* The next decode's output rows are the group's rows first .. first + n_rows - 1; first -1: they are not
 * the group's and go to the trash row (a micro-batch without rows of its own is given one, so that every
 * graph holds the reduction: benchmarks/README §10). */
void kvq_reduction_next(kvq_reduction * r, int32_t first, int32_t n_rows) {
    r->first = first;
    r->n_next = n_rows;
}

/* After the group's last decode: wait for the device, then its rows ([n_rows, width + 2] floats);
 * -1 (nothing read) when a decode's rows were not the ones announced. */
int32_t kvq_reduction_collect(kvq_reduction * r, struct llama_context * lctx, int32_t n_rows, float * out) {
    llama_synchronize(lctx);
    const int32_t failed = r->failed || n_rows != r->n_group;
    r->ids = NULL;
    r->n_group = 0;
    if (failed) {
        return -1;
    }
    if (n_rows > 0) {
        ggml_backend_tensor_get(r->out, out, 0, (size_t) n_rows * (size_t) (r->width + 2) * sizeof(float));
    }
    return 0;
}
