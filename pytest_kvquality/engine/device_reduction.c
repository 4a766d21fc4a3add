/* The evaluation's pass over the vocabulary, done where llama.cpp computed the logits (a backend
 * sampler of llama.cpp's experimental backend-sampling interface): per scored row, the argmax, the
 * log-normalizer and the logits at the row's ids (the reference's top and tail tokens, the next
 * token). llama.cpp then copies (ids + 2) floats per row to the host instead of the whole row.
 *
 * llama.cpp calls backend_apply once per output row, each with a view of that row. The first call of
 * a graph builds the reduction over the whole micro-batch (one op per step, on every row at once)
 * and each row gets nothing, except every g-th row (g = rows whose results fit in one row's slot of
 * llama.cpp's host buffer), which returns the results of its g rows as one contiguous tensor: one
 * copy per g rows. The ids are uploaded by the caller before each decode of one micro-batch.
 *
 * Built and loaded by device_reduction.py against the headers and libraries of the installed
 * llama-cpp-python. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "llama.h"

typedef struct kvq_reduction {
    int32_t n_vocab;    /* the model's vocabulary: the width of one row's host slot */
    int32_t width;      /* ids per row */
    int32_t max_rows;   /* rows a micro-batch can ask for */
    int32_t n_seq;      /* sequences attached */
    struct ggml_context * tctx;
    ggml_backend_buffer_t tbuf;
    struct ggml_tensor * ids; /* [width, max_rows + 1] int32, on the logits' device */
    /* the graph being built: its padded logits and the reduction over them */
    struct ggml_tensor * src;
    struct ggml_tensor * result; /* [width + 2, rows]: argmax (as float), log-normalizer, gathered */
    int32_t per_slot;
    int32_t refs;
    int32_t failed;     /* set when an allocation inside a callback failed */
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
        return true; /* the other sequences' samplers share the ids tensor */
    }
    struct ggml_init_params params = { ggml_tensor_overhead() * 2, NULL, true };
    r->tctx = ggml_init(params);
    if (!r->tctx) {
        r->failed = 1;
        return false;
    }
    r->ids = ggml_new_tensor_2d(r->tctx, GGML_TYPE_I32, r->width, (int64_t) r->max_rows + 1);
    ggml_set_name(r->ids, "kvq_ids");
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
    r->result = NULL;
}

static struct ggml_tensor * build(kvq_reduction * r, struct ggml_context * ctx, struct ggml_tensor * logits) {
    const int64_t v = logits->ne[0];
    int64_t n = logits->ne[1];
    struct ggml_tensor * by_row = ggml_reshape_3d(ctx, logits, 1, v, n);     /* each logit a "row" */
    struct ggml_tensor * top = ggml_argmax(ctx, logits);                     /* [n] int32 */
    struct ggml_tensor * top2 = ggml_reshape_2d(ctx, top, 1, n);
    struct ggml_tensor * probs = ggml_soft_max(ctx, logits);
    struct ggml_tensor * x_top = ggml_get_rows(ctx, by_row, top2);           /* [1, 1, n] */
    struct ggml_tensor * p_top = ggml_get_rows(ctx, ggml_reshape_3d(ctx, probs, 1, v, n), top2);
    /* log-normalizer = max + log(sum exp(x - max)) = x_top - log(p_top), p_top >= 1 / n_vocab */
    struct ggml_tensor * norm = ggml_sub(ctx, x_top, ggml_log(ctx, p_top));
    int64_t rows = n <= r->max_rows + 1 ? n : r->max_rows + 1;
    struct ggml_tensor * ids = ggml_view_2d(ctx, r->ids, r->width, rows, r->ids->nb[1], 0);
    if (rows < n) { /* the probe's or an oversized graph: never read (decode refuses more rows) */
        ids = ggml_view_2d(ctx, r->ids, r->width, 1, r->ids->nb[1], 0);
        by_row = ggml_view_3d(ctx, by_row, 1, v, 1, by_row->nb[1], by_row->nb[2], 0);
        top2 = ggml_view_2d(ctx, top2, 1, 1, top2->nb[1], 0);
        norm = ggml_view_3d(ctx, norm, 1, 1, 1, norm->nb[1], norm->nb[2], 0);
        n = 1;
    }
    struct ggml_tensor * gathered = ggml_get_rows(ctx, by_row, ids);         /* [1, width, n] */
    struct ggml_tensor * head = ggml_concat(ctx, ggml_reshape_2d(ctx, ggml_cast(ctx, top2, GGML_TYPE_F32), 1, n),
                                           ggml_reshape_2d(ctx, norm, 1, n), 0);
    struct ggml_tensor * out = ggml_concat(ctx, head, ggml_reshape_2d(ctx, gathered, r->width, n), 0);
    ggml_set_name(out, "kvq_reduction");
    return out;
}

static void kvq_backend_apply(struct llama_sampler * smpl, struct ggml_context * ctx, struct ggml_cgraph * gf,
                              struct llama_sampler_data * data) {
    (void) gf;
    kvq_reduction * r = (kvq_reduction *) smpl->ctx;
    struct ggml_tensor * row = data->logits;
    /* llama.cpp's view of one row of its padded logits; the probe that counts nodes passes a lone row */
    struct ggml_tensor * all = row->view_src ? row->view_src : ggml_reshape_2d(ctx, row, row->ne[0], 1);
    if (r->result == NULL || r->src != all) {
        r->src = all;
        r->result = build(r, ctx, all);
        r->per_slot = (int32_t) (r->n_vocab / (r->width + 2));
        if (r->per_slot < 1) {
            r->per_slot = 1;
        }
    }
    const int64_t i = row->view_src ? (int64_t) (row->view_offs / all->nb[1]) : 0;
    /* llama.cpp pads its logits with one row; the result may be shorter (see build) */
    const int64_t n_rows = row->view_src ? all->ne[1] - 1 : 1;
    const int64_t n = n_rows < r->result->ne[1] ? n_rows : r->result->ne[1];
    data->logits = NULL; /* the row itself is not wanted on the host */
    if (i % r->per_slot != 0 || i >= n) {
        return;
    }
    const int64_t k = (n - i < r->per_slot ? n - i : r->per_slot);
    data->probs = ggml_view_1d(ctx, r->result, k * r->result->ne[0], i * r->result->nb[1]);
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
    /* .backend_set_input = */ NULL,
    /* .backend_reset     = */ kvq_backend_reset,
    /* .copy_state        = */ NULL,
};

/* A reduction for rows of ``width`` ids, attached to every sequence of ``lctx``; NULL if llama.cpp
 * refused it (the caller then reduces on the host). */
kvq_reduction * kvq_reduction_attach(struct llama_context * lctx, int32_t n_vocab, int32_t width, int32_t max_rows,
                                     int32_t n_seq) {
    kvq_reduction * r = (kvq_reduction *) calloc(1, sizeof(kvq_reduction));
    if (!r) {
        return NULL;
    }
    r->n_vocab = n_vocab;
    r->width = width;
    r->max_rows = max_rows;
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

/* The ids of the next decode's output rows, in output order ([n_rows, width] int32). */
int32_t kvq_reduction_set_ids(kvq_reduction * r, const int32_t * ids, int32_t n_rows) {
    if (n_rows > r->max_rows || !r->ids) {
        return -1;
    }
    ggml_backend_tensor_set(r->ids, ids, 0, (size_t) n_rows * (size_t) r->width * sizeof(int32_t));
    return 0;
}

/* After a decode: output row j's results are in the slot of output j - j % per_slot, whose batch
 * index is ``batch_index[j]``. Writes [n_rows, width + 2] floats; -1 when a slot is missing. */
int32_t kvq_reduction_read(kvq_reduction * r, struct llama_context * lctx, const int32_t * batch_index, int32_t n_rows,
                           float * out) {
    const int64_t w = r->width + 2;
    for (int32_t j = 0; j < n_rows; j += r->per_slot) {
        const int32_t k = (n_rows - j < r->per_slot ? n_rows - j : r->per_slot);
        const float * slot = llama_get_sampled_probs_ith(lctx, batch_index[j]);
        if (!slot || llama_get_sampled_probs_count_ith(lctx, batch_index[j]) != (uint32_t) (k * w)) {
            return -1;
        }
        memcpy(out + (int64_t) j * w, slot, (size_t) (k * w) * sizeof(float));
    }
    return 0;
}
