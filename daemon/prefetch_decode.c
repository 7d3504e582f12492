/*
 * prefetch_decode: decoding ahead (PREFETCH with DMC_PREFETCH_DECODE, `dmcache prefetch
 * --decode`). Once a job has stored its items, job_finish() hands the job here: each
 * stored item is read from the store (threadpool), decoded with the default options (no
 * LUT, the source dtype: what a plain GET reads) in the sandboxed decode workers, and the
 * tensor of every compressed item is written to the store and recorded in the tensor cache
 * (index_tensor_put) under the key a plain GET looks up, so that the first epoch reads
 * stored tensors instead of decoding. Uncompressed items (raw DICOM, .nii) are not stored
 * as tensors (the disk would hold them twice for a decode that costs about a read). Every
 * decoded tensor, of either kind, is also left in the serving side's hot set while it has
 * room (prefetch_hot_hooks: never evicting anything for it), under the key a plain GET
 * looks up, so that a first epoch right after the prefetch reads it from memory as a warm
 * one does. A decode failure is an event naming the item and does not fail the job. When
 * every item is through, job_finish() is called again with the state the download ended
 * in, and the final record's notice gives the counts.
 *
 * Concurrency: at most min(decode_max_per_uid, decode workers + 1) items of a job are in
 * flight (read, decoded or being stored), so a prefetch's decoding never holds more of the
 * pool than one uid's reads may. Tensors are admitted with store_reserve() as they are
 * (never evicting anything: a tensor can be made again); one that does not fit is counted
 * as failed ("no room").
 *
 * Loop thread; the reads and the writes of tensors run on the threadpool and touch only
 * their own struct pitem. Each item in flight holds the job (j->pending): a cancelled job
 * starts nothing more, and is freed with its struct pdec when its last item comes back.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "conf.h"
#include "decode.h"
#include "decode_pool.h"
#include "log.h"
#include "prefetch_priv.h"

#define PAGE 256u            /* items read from the index at a time */
#define EVENT_MS 1000u       /* between "decoding: ..." events */

struct pdec;

struct pitem {
	struct pdec *d;
	uint8_t raw[STORE_DIGEST_SIZE];
	char resource[128];
	char key[STORE_HEX_SIZE + 1];
	uint8_t *in;
	uint64_t len;
	uv_work_t work;
	int err;
	struct decode_job job;
	/* storing the tensor */
	uint8_t *buf;
	uint64_t nbytes, mlen, reserved;
	char desc[128];
	struct decode_desc ddesc;
	struct store_blob_info tinfo, minfo;
};

struct pdec {
	struct job *j;
	bool cancelled;      /* the job ended: nothing more is started or kept */
	struct prefetch *p;
	uint32_t state;      /* what job_finish() is called with at the end */
	int64_t next;        /* the index position of the next page; -1: no more */
	struct index_item_copy {
		uint8_t raw[STORE_DIGEST_SIZE];
		char resource[128];
	} *page;
	unsigned n, i;       /* items in `page`, and the next one to start */
	unsigned inflight, window;
	uint64_t total, decoded, already, skipped, failed;
	uint64_t held;       /* tensors left in the hot set */
	uint64_t last_event_ms;
};

/* The key of the tensor cache for the default options: serve_request.c's opts_key_frame()
 * of a handle without DMC_OPEN_LUT, dtype 0 (the source's), no policy, the whole item. */
#define DEFAULT_OPTS_KEY ((int64_t)(1ull << 32))

/* serve_request.c's desc_text(): the descriptor text it parses back (desc_parse). */
static void desc_text(const struct decode_desc *d, char *out, size_t cap)
{
	snprintf(out, cap, "%d %u %u %u %u %" PRIu64 " %d %d", (int)d->dtype, d->frames,
		 d->channels, d->height, d->width, d->nbytes, (int)d->format, (int)d->codec);
}

/* Worth keeping: a codec whose decode costs more than reading its tensor back. */
static bool expensive(enum decode_codec c)
{
	return c != DECODE_CODEC_NONE && c != DECODE_CODEC_RAW && c != DECODE_CODEC_NIFTI;
}

static void pump(struct pdec *d);

static void send_counts(struct pdec *d, bool force)
{
	struct job *j = d->j;
	struct dmc_progress m;
	char msg[160];
	uint64_t now;

	if (d->cancelled)
		return;
	now = uv_now(d->p->d.loop);
	if (!force && now - d->last_event_ms < EVENT_MS)
		return;
	d->last_event_ms = now;
	snprintf(msg, sizeof(msg), "decoding: %" PRIu64 " of %" PRIu64 " items",
		 d->decoded + d->already + d->skipped + d->failed, d->total);
	job_progress(j, &m);
	m.error_message = dstr(msg);
	send_progress(j, &m, true);
}

static void item_failed(struct pitem *it, int err, const char *why)
{
	struct pdec *d = it->d;
	struct dmc_progress m;

	d->failed++;
	if (d->cancelled)
		return;
	log_warn(DECODE, "job %" PRIu64 ": cannot decode '%s' ahead: %s", d->j->id,
		 it->resource, why);
	job_progress(d->j, &m);
	m.error_code = (uint32_t)(err == -ENOMEM ? DMC_E_INTERNAL
				  : err < 0 && -err < 1000 ? DMC_E_DECODE_FAILED : -err);
	m.error_resource = dstr(it->resource);
	m.error_message = dstr(why);
	send_progress(d->j, &m, true);
}

/* Ends the decoding once nothing is in flight: the job ends, or, cancelled, is freed. */
static void maybe_end(struct pdec *d)
{
	struct job *j = d->j;

	if (d->inflight || (!d->cancelled && (d->i < d->n || d->next >= 0)))
		return;
	free(d->page);
	j->dec = NULL;
	if (d->cancelled) {
		free(d);
		job_maybe_free(j);
		return;
	}
	snprintf(j->notice, sizeof(j->notice),
		 "decoded ahead: %" PRIu64 " decoded, %" PRIu64 " already decoded, %" PRIu64
		 " skipped (uncompressed), %" PRIu64 " failed, %" PRIu64 " held in memory",
		 d->decoded, d->already, d->skipped, d->failed, d->held);
	log_job(LOG_LVL_NOTICE, LOG_GRP_FETCH, j->id, (unsigned)j->uid,
		j->proj ? j->proj->name : j->project_arg, "job %" PRIu64 ": %s", j->id, j->notice);
	uint32_t state = d->state;
	free(d);
	job_finish(j, state);
}

static void item_free(struct pitem *it)
{
	struct pdec *d = it->d;

	free(it->in);
	free(it->buf);
	free(it);
	d->inflight--;
	d->j->pending--;
	send_counts(d, false);
	pump(d);
	maybe_end(d);
}

/* Leaves `buf` (the tensor, then its header) in the hot set; true: taken. */
static bool hold_hot(struct pitem *it, uint8_t *buf)
{
	struct pdec *d = it->d;
	const struct prefetch_hot_hooks *h = &d->p->hot;

	if (d->cancelled || !h->adopt ||
	    !h->adopt(h->ctx, d->j->snapshot_id, it->raw, DEFAULT_OPTS_KEY, buf, it->nbytes,
		      it->mlen, &it->ddesc))
		return false;
	d->held++;
	return true;
}

/* hold_hot() of a copy of the decoded bytes, made only when they would fit. */
static void hold_hot_copy(struct pitem *it, const struct decode_job *job, const char *meta)
{
	const struct prefetch_hot_hooks *h = &it->d->p->hot;
	uint8_t *buf;

	it->nbytes = job->desc.nbytes;
	it->ddesc = job->desc;
	if (it->d->cancelled || !h->room || !h->room(h->ctx, it->nbytes + it->mlen) ||
	    !(buf = malloc(it->nbytes + it->mlen + 1)))
		return;
	memcpy(buf, job->out, it->nbytes);
	memcpy(buf + it->nbytes, meta, it->mlen);
	if (!hold_hot(it, buf))
		free(buf);
}

static void store_work(uv_work_t *w)
{
	struct pitem *it = w->data;
	struct store *store = it->d->p->d.cache->store;

	it->err = store_put(store, STORE_KIND_TENSOR, it->buf, it->nbytes, NULL, &it->tinfo);
	if (it->err == 0) {
		it->err = store_put(store, STORE_KIND_META, it->buf + it->nbytes, it->mlen, NULL,
				    &it->minfo);
		if (it->err < 0)
			store_unpin(store, it->tinfo.digest);
	}
}

static void store_after(uv_work_t *w, int status)
{
	struct pitem *it = w->data;
	struct cache *cache = it->d->p->d.cache;

	(void)status;
	store_release(cache->store, it->reserved);
	if (it->err == 0) {
		cache_record_blob(cache, &it->tinfo);
		cache_record_blob(cache, &it->minfo);
		index_tensor_put(cache->index, it->raw, DEFAULT_OPTS_KEY, it->tinfo.digest,
				 it->minfo.digest, it->desc);
		store_unpin(cache->store, it->tinfo.digest);
		store_unpin(cache->store, it->minfo.digest);
		it->d->decoded++;
		if (hold_hot(it, it->buf))
			it->buf = NULL; /* the hot set's now */
	} else {
		item_failed(it, it->err, "cannot store the decoded tensor");
	}
	item_free(it);
}

static void on_decoded(struct decode_job *job)
{
	struct pitem *it = job->data;
	struct pdec *d = it->d;
	const char *meta = job->meta && job->meta_len ? job->meta : "null";
	uint64_t mlen = job->meta && job->meta_len ? job->meta_len : 4;

	free(it->in);
	it->in = NULL;
	if (job->status < 0) {
		item_failed(it, job->status, job->err[0] ? job->err : "decoding failed");
		item_free(it);
		return;
	}
	it->mlen = mlen;
	if (!expensive(job->desc.codec)) {
		d->skipped++;
		hold_hot_copy(it, job, meta);
		item_free(it);
		return;
	}
	if (d->cancelled) { /* nothing more is kept */
		item_free(it);
		return;
	}
	it->nbytes = job->desc.nbytes;
	it->ddesc = job->desc;
	if (store_reserve(d->p->d.cache->store, it->nbytes + it->mlen) < 0) {
		item_failed(it, -DMC_E_CACHE_FULL, "no room for the decoded tensor within "
						   "max_size and min_free");
		item_free(it);
		return;
	}
	it->reserved = it->nbytes + it->mlen;
	it->buf = malloc(it->nbytes + it->mlen + 1);
	if (!it->buf) {
		store_release(d->p->d.cache->store, it->reserved);
		item_failed(it, -ENOMEM, "out of memory");
		item_free(it);
		return;
	}
	memcpy(it->buf, job->out, it->nbytes);
	memcpy(it->buf + it->nbytes, meta, it->mlen);
	desc_text(&job->desc, it->desc, sizeof(it->desc));
	it->work.data = it;
	if (uv_queue_work(d->p->d.loop, &it->work, store_work, store_after)) {
		store_release(d->p->d.cache->store, it->reserved);
		item_failed(it, -ENOMEM, "cannot queue the write");
		item_free(it);
	}
}

static void read_work(uv_work_t *w)
{
	struct pitem *it = w->data;
	uint64_t got = 0;

	it->err = store_read(it->d->p->d.cache->store, it->raw, it->in, it->len, &got);
	if (it->err == 0 && got != it->len)
		it->err = -DMC_E_INTEGRITY;
}

static void read_after(uv_work_t *w, int status)
{
	struct pitem *it = w->data;
	struct pdec *d = it->d;
	int rc;

	(void)status;
	if (it->err < 0 || d->cancelled) {
		if (!d->cancelled)
			item_failed(it, it->err, "cannot read the stored file");
		item_free(it);
		return;
	}
	memset(&it->job, 0, sizeof(it->job));
	it->job.in = it->in;
	it->job.in_len = it->len;
	it->job.opts.flags = 0;                    /* no LUT, the whole item */
	it->job.opts.dtype = DECODE_DTYPE_NONE;    /* the source dtype */
	it->job.want_meta = true;
	it->job.data = it;
	store_digest_hex(it->raw, it->key);        /* the quarantine key, as GET's */
	it->job.resource = it->key;
	rc = decode_pool_submit(d->p->d.pool, &it->job, on_decoded);
	if (rc < 0) {
		item_failed(it, rc, it->job.err[0] ? it->job.err : "cannot decode");
		item_free(it);
	}
}

static int page_cb(void *ctx, const struct index_item *item)
{
	struct pdec *d = ctx;

	if (!item->has_blob || !item->stored)
		return 0;
	memcpy(d->page[d->n].raw, item->blob, STORE_DIGEST_SIZE);
	snprintf(d->page[d->n].resource, sizeof(d->page[d->n].resource), "%s",
		 item->resource_id ? item->resource_id : "");
	d->n++;
	return 0;
}

/* Starts items until the window is full or none is left. */
static void pump(struct pdec *d)
{
	struct index *ix = d->p->d.cache->index;

	while (!d->cancelled && d->inflight < d->window) {
		struct index_blob b;
		struct pitem *it;
		uint8_t tensor[STORE_DIGEST_SIZE], meta[STORE_DIGEST_SIZE];
		bool has_meta = false;
		char desc[128];

		if (d->i == d->n) {
			if (d->next < 0)
				break;
			d->n = d->i = 0;
			if (index_items_page(ix, d->j->snapshot_id, d->next, PAGE, INDEX_ITEMS_ALL,
					     page_cb, d, &d->next) < 0)
				d->next = -1;
			continue;
		}
		it = calloc(1, sizeof(*it));
		if (!it)
			break; /* tried again when an item in flight comes back */
		it->d = d;
		memcpy(it->raw, d->page[d->i].raw, STORE_DIGEST_SIZE);
		memcpy(it->resource, d->page[d->i].resource, sizeof(it->resource));
		d->i++;
		d->inflight++;
		d->j->pending++;
		if (index_tensor_get(ix, it->raw, DEFAULT_OPTS_KEY, tensor, &has_meta, meta, desc,
				     sizeof(desc)) == 0 && has_meta) {
			d->already++; /* an earlier decode (GET, or another job) kept it */
			free(it);
			d->inflight--;
			d->j->pending--;
			continue;
		}
		if (!d->p->d.pool) {
			item_failed(it, -DMC_E_DECODE_FAILED, "the daemon has no decode workers");
			free(it);
			d->inflight--;
			d->j->pending--;
			continue;
		}
		if (index_blob_get(ix, it->raw, &b) < 0 || b.raw_size < 0 ||
		    !(it->in = malloc((size_t)b.raw_size + 1))) {
			item_failed(it, -ENOMEM, "cannot read the stored file");
			free(it);
			d->inflight--;
			d->j->pending--;
			continue;
		}
		it->len = (uint64_t)b.raw_size;
		it->work.data = it;
		if (uv_queue_work(d->p->d.loop, &it->work, read_work, read_after)) {
			item_failed(it, -ENOMEM, "cannot queue the read");
			free(it->in);
			free(it);
			d->inflight--;
			d->j->pending--;
		}
	}
}

bool decode_ahead(struct job *j, uint32_t state)
{
	struct pdec *d = j->dec;
	const struct config *cfg = j->pf->d.cfg;
	unsigned cores;

	if (d) {
		if (state != DMC_JOB_CANCELLED)
			return true; /* decoding: it ends the job */
		/* cancelled: the job ends now; the items in flight are dropped as they come
		 * back, the last one frees the job (job_maybe_free) */
		d->cancelled = true;
		if (!d->inflight) {
			free(d->page);
			free(d);
			j->dec = NULL;
		}
		return false;
	}
	if (!j->decode || j->decode_over || j->snapshot_id <= 0 ||
	    (state != DMC_JOB_DONE && state != DMC_JOB_FAILED))
		return false;
	j->decode_over = true;
	d = calloc(1, sizeof(*d));
	if (d)
		d->page = calloc(PAGE, sizeof(*d->page));
	if (!d || !d->page) {
		free(d);
		snprintf(j->notice, sizeof(j->notice), "decoding ahead: out of memory");
		return false;
	}
	/* what is stored must be committed before the items are read back */
	index_flush(j->pf->d.cache->index);
	d->j = j;
	d->p = j->pf;
	d->state = state;
	{
		struct index_snapshot_stats st;
		if (index_snapshot_stats(j->pf->d.cache->index, j->snapshot_id, &st) == 0)
			d->total = (uint64_t)st.items_stored;
	}
	cores = cfg->decode_workers ? cfg->decode_workers : (unsigned)uv_available_parallelism();
	d->window = cores + 1;
	if (cfg->decode_max_per_uid && d->window > cfg->decode_max_per_uid)
		d->window = cfg->decode_max_per_uid;
	j->dec = d;
	log_info(FETCH, "job %" PRIu64 ": decoding the stored items ahead", j->id);
	send_counts(d, true);
	pump(d);
	maybe_end(d);
	return true;
}
