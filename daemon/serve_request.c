/*
 * serve's GET requests (see serve.h): the life of a request (struct greq) and of each of
 * its items (struct gitem): looked up in the index, read from the store on the threadpool,
 * decoded in the worker pool or taken from the hot set or the tensor cache, re-fetched once
 * when its blob is found bad, placed in the connection's arena (or waiting for room), and
 * the reply once all are done. pump_items() starts items within the per-connection and
 * per-uid bounds. STREAM batches (serve_stream.c) are requests too.
 * Loop thread; the reads, tensor stores and yields run on the threadpool and touch only
 * their item or work structure.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "cache.h"
#include "conn.h"
#include "decode.h"
#include "decode_pool.h"
#include "index.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "prefetch.h"
#include "secret.h"
#include "serve_priv.h"
#include "store.h"

/* Bytes one pump_items() call copies into arenas before it lets the loop serve others: a
 * GET of many items already decoded is placed in slices, not in one long turn. */
#define PUMP_BYTES_MAX (8u << 20)

static void item_step(struct gitem *gi);

/* The item holds nothing any more (done, or waiting for a download): a place is free. */
void settle(struct gitem *gi, enum gi_state state)
{
	struct sconn *sc = gi->rq->sc;

	gi->state = state;
	if (gi->counted) {
		gi->counted = false;
		sc->inflight--;
		sc->sh->inflight--; /* its other connections go on at the next pump_items() */
	}
}

uint32_t code_of(int err)
{
	if (err <= -DMC_E_FIRST_ && err >= -DMC_E_LAST_)
		return (uint32_t)-err;
	if (err == -ENOSPC)
		return DMC_E_CACHE_FULL;
	if (err == -ENOMEM) /* try again later, as when too busy */
		return DMC_E_OVERLOADED;
	return err < 0 && err > -4096 ? DMC_E_IO : DMC_E_INTERNAL;
}

/* The decoded bytes of an item: tensor (nbytes), then the header JSON (dlen). */
const uint8_t *gi_bytes(const struct gitem *gi)
{
	return gi->he ? gi->he->buf : gi->hold;
}

static uint64_t gi_dlen(const struct gitem *gi)
{
	return gi->he ? gi->he->dlen : gi->dlen;
}

void gi_drop(struct gitem *gi)
{
	free(gi->hold);
	gi->hold = NULL;
	if (gi->he) {
		hot_unref(&gi->rq->sc->s->hot, gi->he);
		gi->he = NULL;
	}
}

/* The item's metadata document: {"resource": <record>, "dicom": <header JSON or null>}. */
uint64_t meta_len(const struct gitem *gi)
{
	uint64_t dlen = gi_dlen(gi), extra = 0;

	if (gi->frame >= 0) {
		char num[32];
		extra = 9 + (uint64_t)snprintf(num, sizeof(num), "%" PRId64, gi->frame);
	}
	if (gi->rq->h.labels)
		extra += strlen(gi->rq->h.labels->json);
	return 12 + strlen(gi->record) + 9 + (dlen ? dlen : 4) + extra + 1;
}

void meta_write(const struct gitem *gi, uint8_t *p)
{
	size_t rlen = strlen(gi->record);
	uint64_t dlen = gi_dlen(gi);

	memcpy(p, "{\"resource\":", 12);
	p += 12;
	memcpy(p, gi->record, rlen);
	p += rlen;
	memcpy(p, ",\"dicom\":", 9);
	p += 9;
	if (dlen)
		memcpy(p, gi_bytes(gi) + gi->nbytes, dlen);
	else
		memcpy(p, "null", 4);
	p += dlen ? dlen : 4;
	if (gi->frame >= 0) {
		char num[32];
		int n = snprintf(num, sizeof(num), "%" PRId64, gi->frame);
		memcpy(p, ",\"frame\":", 9);
		memcpy(p + 9, num, (size_t)n);
		p += 9 + n;
	}
	if (gi->rq->h.labels) {
		size_t n = strlen(gi->rq->h.labels->json);
		memcpy(p, gi->rq->h.labels->json, n);
		p += n;
	}
	*p = '}';
}

/* The connection went while the item was in work: drop its buffers, end it unanswered. */
void abandon(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;

	free(gi->in);
	gi->in = NULL;
	gi_drop(gi);
	settle(gi, GI_DONE);
	share_wake(sc->s, sc->sh, sc);
	req_maybe_reply(gi->rq);
}

void item_fail(struct gitem *gi, int err, const char *msg)
{
	struct sconn *sc = gi->rq->sc;

	gi->status = code_of(err);
	snprintf(gi->msg, sizeof(gi->msg), "%s", msg);
	settle(gi, GI_DONE);
	sc->s->items_failed++;
	req_maybe_reply(gi->rq); /* may free the request, and gi with it */
	pump_items(sc);
}

/* Options that decide the decoded bytes, as a key of the tensor cache. Bit 32 marks rows
 * whose metadata blob is the header JSON alone (older rows held the whole document, with a
 * resource record that another item with the same bytes does not share). With a
 * uniformity policy: bit 62 set (never in the keys above, whose frame bits end at 53) and
 * bits 0-61 a mix of those options and policy_key(), the policy's 64-bit fingerprint. */
static int64_t opts_key_frame(const struct handle *h, int64_t frame)
{
	uint64_t k = (h->flags & DMC_OPEN_LUT) | ((uint64_t)h->dtype << 8) | (1ull << 32);
	uint64_t pk = policy_key(&h->pol);

	if (frame >= 0)
		k |= ((uint64_t)frame + 1) << 33; /* one frame of the item */
	if (pk) {
		/* splitmix64's finaliser over both: every bit of each moves the result */
		k ^= pk * 0x9e3779b97f4a7c15ull;
		k = (k ^ (k >> 30)) * 0xbf58476d1ce4e5b9ull;
		k = (k ^ (k >> 27)) * 0x94d049bb133111ebull;
		k ^= k >> 31;
		k = (k & ((1ull << 62) - 1)) | (1ull << 62);
	}
	return (int64_t)k;
}

/* ---- GET ---- */

struct handle *handle_find(struct sconn *sc, uint64_t id)
{
	for (struct handle *h = sc->handles; h; h = h->next)
		if (h->id == id)
			return h;
	return NULL;
}

static void read_work(uv_work_t *w)
{
	struct gitem *gi = w->data;
	struct store *store = gi->rq->sc->s->d.cache->store;
	uint64_t got = 0;

	gi->work_err = store_read(store, gi->rd_digest, gi->in, gi->rd_len, &got);
	if (gi->work_err == 0 && got != gi->rd_len)
		gi->work_err = -DMC_E_INTEGRITY;
}

/*
 * Reads `len` bytes of blob `digest` into a new gi->in on the threadpool, then `after`.
 * Negative when it cannot start (gi->in is freed again).
 */
int start_read(struct gitem *gi, const uint8_t *digest, uint64_t len,
	       uv_after_work_cb after)
{
	struct sconn *sc = gi->rq->sc;

	gi->in = malloc(len ? len : 1);
	if (!gi->in)
		return -ENOMEM;
	gi->rd_digest = digest;
	gi->rd_len = len;
	gi->work.data = gi;
	sc->busy++;
	if (uv_queue_work(sc->s->d.loop, &gi->work, read_work, after) != 0) {
		sc->busy--;
		free(gi->in);
		gi->in = NULL;
		return -ENOMEM;
	}
	return 0;
}

static void on_decoded(struct decode_job *job);

/* ---- re-fetching an item whose blob was found bad on read (reliability.md C5, D4) ----
 *
 * The store moved the blob to quarantine/ and counted it; here its row is dropped, so that
 * the item is missing for every snapshot that links the content, and the GET's item waits
 * while the prefetcher fetches it again for this connection's uid with the key of the OPEN
 * (prefetch_refetch: the server checks that key, as for the OPEN). Once per item and GET:
 * a fresh copy found bad again fails the item with integrity. The item waits in
 * GI_WAIT_ITEM with `rf` set until the job is listed (the snapshot is not "active" before
 * that), then as any item a job downloads. */

struct refetch {
	struct sconn *sc;
	int64_t snapshot_id;
	struct refetch *next;
};

void refetch_free(struct refetch *rf)
{
	struct sconn *sc = rf->sc;
	struct refetch **pp;

	for (pp = &sc->refetches; *pp && *pp != rf; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = rf->next;
	free(rf);
	sc->busy--;
}

/* The first item of `sc` waiting for `rf`, or NULL. */
struct gitem *refetch_waiter(struct sconn *sc, const struct refetch *rf)
{
	for (struct greq *rq = sc->reqs; rq; rq = rq->next)
		for (uint32_t i = 0; i < rq->n; i++)
			if (rq->items[i].rf == rf)
				return &rq->items[i];
	return NULL;
}

static void on_refetch_ready(void *ctx, const struct prefetch_ready *r)
{
	struct refetch *rf = ctx;
	struct sconn *sc = rf->sc;
	struct serve *s = sc->s;
	bool ok = r->err == 0 && r->snapshot_id == rf->snapshot_id && sc->c &&
		  prefetch_may_see(s->d.prefetch, sc->c->uid, rf->snapshot_id);
	uint32_t code = r->err ? r->code : DMC_E_INTEGRITY;
	char why[MSG_MAX];
	struct gitem *gi;

	if (r->err)
		snprintf(why, sizeof(why), "the cached copy was damaged, and fetching it again "
					   "failed: %s", r->message ? r->message : "");
	else
		snprintf(why, sizeof(why), "the cached copy was damaged, and the dataset changed "
					   "on the server since the OPEN: open it again");
	if (!ok)
		s->refetches_failed++;
	sc->busy++;
	while ((gi = refetch_waiter(sc, rf))) {
		struct greq *rq = gi->rq;
		gi->rf = NULL;
		if (gi->state != GI_WAIT_ITEM)
			continue;
		if (ok) {
			gi->state = GI_NEW; /* stored meanwhile, or the job brings it */
			continue;
		}
		gi->status = code;
		snprintf(gi->msg, sizeof(gi->msg), "%s", why);
		gi->state = GI_DONE;
		s->items_failed++;
		rq->pins++;
		req_maybe_reply(rq);
		req_unpin(rq);
	}
	refetch_free(rf);
	if (sc->c)
		pump_items(sc);
	sc->busy--;
	sconn_maybe_free(sc);
}

/* Whether gi may be fetched again: a remote OPEN's item, not yet fetched in this GET. */
static bool refetch_possible(const struct gitem *gi)
{
	return gi->rq->h.origin && !gi->refetched && gi->rq->sc->c && !gi->rq->h.labels;
}

/* gi waits while its item is fetched again for the connection's uid (refetch_possible()). */
static void refetch_start(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	struct serve *s = sc->s;
	struct origin *o = gi->rq->h.origin;
	struct refetch *rf;
	struct dmc_prefetch m;
	int rc;

	rf = calloc(1, sizeof(*rf));
	if (!rf) {
		item_fail(gi, -ENOMEM, "out of memory");
		return;
	}
	rf->sc = sc;
	rf->snapshot_id = gi->rq->h.snapshot_id;
	rf->next = sc->refetches;
	sc->refetches = rf;
	sc->busy++;
	gi->refetched = true;
	gi->rf = rf;
	settle(gi, GI_WAIT_ITEM);
	s->refetches++;
	m.source = DMC_SOURCE_DATAMINT;
	m.flags = 0;
	m.project = (struct dmc_str){ o->project, (uint32_t)strlen(o->project) };
	m.version = (struct dmc_str){ o->version, (uint32_t)strlen(o->version) };
	m.server = (struct dmc_str){ o->server, (uint32_t)strlen(o->server) };
	m.api_key = (struct dmc_str){ secret_str(o->key), (uint32_t)strlen(secret_str(o->key)) };
	rc = prefetch_refetch(s->d.prefetch, sc->c->uid, &m, rf->snapshot_id, (int64_t)gi->item,
			      on_refetch_ready, rf);
	if (rc < 0) {
		struct prefetch_ready r = { .err = rc, .code = code_of(rc),
					    .message = "the daemon is stopping" };
		on_refetch_ready(rf, &r); /* gi may be gone */
	}
}

/* gi's blob failed its read with `err`: true when the item now waits for a fresh copy. */
static bool refetch_item(struct gitem *gi, int err)
{
	struct serve *s = gi->rq->sc->s;
	char hex[STORE_HEX_SIZE + 1];
	bool again = refetch_possible(gi);

	s->bad_reads++;
	store_digest_hex(gi->raw, hex);
	/* the item is missing from now on, in every snapshot that links this content */
	index_blob_delete(s->d.cache->index, gi->raw);
	log_warn(SERVE, "blob %.16s: %s on read (quarantined)%s", hex,
		 err == -ENOENT ? "gone" : err == -EIO ? "I/O error" : "damaged",
		 again ? ": the item is fetched again" : "");
	if (!again)
		return false;
	refetch_start(gi); /* gi may be gone: the callback may have answered it */
	return true;
}

/*
 * DMC_OPEN_RAW: the stored file just read (and checked against its SHA-256 by the store)
 * is the item, uint8 (1, 1, 1, bytes), without a header of its own; never kept in the hot
 * set or the tensor cache (the blob is the cache).
 */
static void raw_got(struct gitem *gi)
{
	uint8_t *p;

	if (gi->raw_len > UINT32_MAX) {
		free(gi->in);
		gi->in = NULL;
		item_fail(gi, -DMC_E_LIMIT_EXCEEDED, "the file is larger than 4 GiB");
		return;
	}
	p = realloc(gi->in, gi->raw_len + 5);
	if (!p) {
		free(gi->in);
		gi->in = NULL;
		item_fail(gi, -ENOMEM, "out of memory");
		return;
	}
	gi->in = NULL;
	memcpy(p + gi->raw_len, "null", 4);
	gi->hold = p;
	gi->dlen = 4;
	gi->nbytes = gi->raw_len;
	gi->desc = (struct decode_desc){ .codec = DECODE_CODEC_NONE,
					 .src_dtype = DECODE_DTYPE_U8, .dtype = DECODE_DTYPE_U8,
					 .frames = 1, .channels = 1, .height = 1,
					 .width = (uint32_t)gi->raw_len, .src_frames = 1,
					 .nbytes = gi->raw_len };
	item_got_bytes(gi);
}

static void read_after(uv_work_t *w, int status)
{
	struct gitem *gi = w->data;
	struct sconn *sc = gi->rq->sc;
	struct serve *s = sc->s;
	int rc;

	(void)status;
	sc->busy--;
	if (!sc->c) {
		abandon(gi);
		return;
	}
	if (gi->work_err < 0) {
		int err = gi->work_err;
		bool bad = err == -DMC_E_INTEGRITY || err == -ENOENT || err == -EIO;
		free(gi->in);
		gi->in = NULL;
		char why[160];
		if (bad && refetch_item(gi, err))
			return;
		snprintf(why, sizeof(why), "cannot read the cached copy: %s",
			 err == -ENOMEM	       ? "out of memory, try again"
			 : dmc_err_text(err));
		item_fail(gi, err,
			  gi->refetched ? "the cached copy was damaged again after a fresh download: "
					  "try again"
			  : bad ? "the cached copy is damaged or gone: prefetch the dataset again"
				: why);
		return;
	}
	if (gi->rq->h.flags & DMC_OPEN_RAW) {
		raw_got(gi);
		return;
	}
	memset(&gi->job, 0, sizeof(gi->job));
	gi->job.in = gi->in;
	gi->job.in_len = gi->raw_len;
	gi->job.opts.flags = (gi->rq->h.flags & DMC_OPEN_LUT) ? DECODE_F_LUT : 0;
	if (gi->frame >= 0) {
		gi->job.opts.flags |= DECODE_F_FRAME;
		gi->job.opts.frame = (uint32_t)gi->frame;
	}
	gi->job.opts.dtype = (enum decode_dtype)gi->rq->h.dtype;
	gi->job.pol = gi->rq->h.pol;
	gi->job.want_meta = true;
	gi->job.data = gi;
	/* the quarantine key: the content, so that a bad file is bad for everybody */
	store_digest_hex(gi->raw, gi->key);
	gi->job.resource = gi->key;
	sc->busy++;
	sc->decoding++;
	rc = decode_pool_submit(s->d.pool, &gi->job, on_decoded);
	if (rc < 0) {
		char why[MSG_MAX];
		sc->busy--;
		sc->decoding--;
		snprintf(why, sizeof(why), "%s", gi->job.err[0] ? gi->job.err : "cannot decode");
		free(gi->in);
		gi->in = NULL;
		item_fail(gi, rc, why);
	}
}

/* Places `hold` (tensor, then metadata) into the arena; false when there is no room yet. */
static bool place(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	uint64_t off, moff;

	gi->mlen = meta_len(gi);
	off = arena_alloc(&sc->arena, gi->nbytes);
	if (off == UINT64_MAX)
		return false;
	moff = arena_alloc(&sc->arena, gi->mlen);
	if (moff == UINT64_MAX) {
		arena_free(&sc->arena, off);
		return false;
	}
	memcpy(sc->arena.base + off, gi_bytes(gi), gi->nbytes);
	meta_write(gi, sc->arena.base + moff);
	gi->off = off;
	gi->moff = moff;
	gi->rq->placed += arena_span(gi->nbytes) + arena_span(gi->mlen);
	sc->pump_bytes += gi->nbytes;
	grow_ahead(sc);
	return true;
}

/*
 * No room for the item now: whether it waits (the arena grows, or the client holds space
 * it can release), or fails (a cap, or nothing the client could release) with `why`.
 */
static bool wait_for_room(struct gitem *gi, char *why, size_t whylen)
{
	struct sconn *sc = gi->rq->sc;

	switch (make_room(sc, arena_span(gi->nbytes) + arena_span(meta_len(gi)), why, whylen)) {
	case ROOM_WAIT:
		return true;
	case ROOM_CAPPED:
		/* a RELEASE of this connection's items makes room without growing */
		return client_holds_space(sc);
	case ROOM_FULL:
		break;
	}
	snprintf(why, whylen, "the batch does not fit in the shared memory: ask for fewer "
			      "items at once, or open with a larger arena");
	return client_holds_space(sc);
}

static void finish_placed(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	struct serve *s = sc->s;

	gi_drop(gi);
	settle(gi, GI_DONE);
	gi->status = 0;
	gi->msg[0] = '\0';
	s->items_served++;
	s->bytes_served += gi->nbytes;
	req_maybe_reply(gi->rq); /* may free the request, and gi with it */
	pump_items(sc);
}

/* Retries items waiting for arena space, oldest request first. */
void retry_space(struct sconn *sc)
{
	char why[MSG_MAX];

again:
	for (struct greq *rq = sc->reqs; rq; rq = rq->next) {
		for (uint32_t i = 0; i < rq->n; i++) {
			struct gitem *gi = &rq->items[i];
			if (gi->state != GI_WAIT_SPACE)
				continue;
			rq->pins++;
			if (place(gi)) {
				finish_placed(gi);
			} else if (!wait_for_room(gi, why, sizeof(why))) {
				gi_drop(gi);
				item_fail(gi, -DMC_E_LIMIT_EXCEEDED, why);
			} else {
				req_unpin(rq);
				return; /* keep the order: later items wait behind this one */
			}
			req_unpin(rq); /* rq may be gone now: look again from the start */
			goto again;
		}
	}
}

/* Whether the client holds arena space it could release (from replies it has). */
bool client_holds_space(struct sconn *sc)
{
	uint64_t pending = 0;

	for (struct greq *rq = sc->reqs; rq; rq = rq->next)
		pending += rq->placed;
	return sc->arena.used > pending;
}

void item_got_bytes(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	char why[MSG_MAX];

	if (gi->rq->st) {
		/* a STREAM batch: placed with the whole batch, in order */
		gi->status = 0;
		gi->msg[0] = '\0';
		settle(gi, GI_DONE);
		sc->s->items_served++;
		sc->s->bytes_served += gi->nbytes;
		req_maybe_reply(gi->rq);
		pump_items(sc);
		return;
	}
	if (gi->he && gi->rq->h.rg && region_place(gi)) {
		/* hot, and the client takes it in place: no copy of the tensor */
		finish_placed(gi);
		return;
	}
	if (gi->nbytes + meta_len(gi) + 2 * ARENA_ALIGN > sc->arena.size) {
		gi_drop(gi);
		item_fail(gi, -DMC_E_LIMIT_EXCEEDED,
			  "the item is larger than the shared memory: open with a larger arena");
		return;
	}
	if (place(gi)) {
		finish_placed(gi);
		return;
	}
	if (!wait_for_room(gi, why, sizeof(why))) {
		/* a cap, or everything in the arena belongs to replies not sent yet: no RELEASE
		 * can come */
		gi_drop(gi);
		item_fail(gi, -DMC_E_LIMIT_EXCEEDED, why);
		return;
	}
	gi->state = GI_WAIT_SPACE; /* backpressure: wait for the growth, or a RELEASE */
	sc->s->waits_for_space++;
}

struct store_tensor_work {
	uv_work_t work;
	struct serve *s;
	uint8_t raw[STORE_DIGEST_SIZE];
	int64_t opts;
	char desc[128];
	uint8_t *buf;
	uint64_t nbytes, mlen;
	uint64_t reserved; /* admitted against max_size and min_free (store_reserve) */
	struct store_blob_info tinfo, minfo;
	int err;
};

static void store_tensor_work(uv_work_t *w)
{
	struct store_tensor_work *t = w->data;
	struct store *store = t->s->d.cache->store;

	t->err = store_put(store, STORE_KIND_TENSOR, t->buf, t->nbytes, NULL, &t->tinfo);
	if (t->err == 0) {
		t->err = store_put(store, STORE_KIND_META, t->buf + t->nbytes, t->mlen, NULL,
				   &t->minfo);
		if (t->err < 0)
			store_unpin(store, t->tinfo.digest);
	}
}

static void store_tensor_after(uv_work_t *w, int status)
{
	struct store_tensor_work *t = w->data;
	struct cache *cache = t->s->d.cache;

	(void)status;
	t->s->stores--;
	store_release(cache->store, t->reserved);
	if (t->err == 0) {
		cache_record_blob(cache, &t->tinfo);
		cache_record_blob(cache, &t->minfo);
		index_tensor_put(cache->index, t->raw, t->opts, t->tinfo.digest, t->minfo.digest,
				 t->desc);
		store_unpin(cache->store, t->tinfo.digest);
		store_unpin(cache->store, t->minfo.digest);
		t->s->tensors_stored++;
	}
	serve_maybe_destroy(t->s);
	free(t->buf);
	free(t);
}

static void desc_text(const struct decode_desc *d, char *out, size_t cap)
{
	snprintf(out, cap, "%d %u %u %u %u %" PRIu64 " %d %d", (int)d->dtype, d->frames,
		 d->channels, d->height, d->width, d->nbytes, (int)d->format, (int)d->codec);
}

static bool desc_parse(const char *t, struct decode_desc *d)
{
	int dtype, format, codec;

	memset(d, 0, sizeof(*d));
	if (sscanf(t, "%d %u %u %u %u %" SCNu64 " %d %d", &dtype, &d->frames, &d->channels,
		   &d->height, &d->width, &d->nbytes, &format, &codec) != 8 || dtype < 1 ||
	    dtype > DMC_DTYPE_LAST_)
		return false;
	d->dtype = (enum decode_dtype)dtype;
	d->format = (enum decode_format)format;
	d->codec = (enum decode_codec)codec;
	return (uint64_t)d->frames * d->channels * d->height * d->width *
		       decode_dtype_size(d->dtype) ==
	       d->nbytes;
}

/* The decoded bytes go into the hot set when they fit there (shared by every client). */
static void hot_take(struct gitem *gi)
{
	struct serve *s = gi->rq->sc->s;

	gi->he = hot_adopt(&s->hot, gi->raw, opts_key_frame(&gi->rq->h, gi->frame), gi->hold, gi->nbytes, gi->dlen,
			   &gi->desc);
	if (gi->he)
		gi->hold = NULL;
}

static void on_decoded(struct decode_job *job)
{
	struct gitem *gi = job->data;
	struct sconn *sc = gi->rq->sc;
	struct serve *s = sc->s;

	sc->busy--;
	sc->decoding--;
	free(gi->in);
	gi->in = NULL;
	if (!sc->c) {
		abandon(gi);
		return;
	}
	if (job->status < 0) {
		item_fail(gi, job->status, job->err[0] ? job->err : "decoding failed");
		return;
	}
	s->items_decoded++;
	gi->desc = job->desc;
	gi->nbytes = job->desc.nbytes;
	gi->dlen = job->meta && job->meta_len ? job->meta_len : 4;
	gi->hold = malloc(gi->nbytes + gi->dlen + 1);
	if (!gi->hold) {
		item_fail(gi, -ENOMEM, "out of memory");
		return;
	}
	memcpy(gi->hold, job->out, gi->nbytes);
	memcpy(gi->hold + gi->nbytes, job->meta && job->meta_len ? job->meta : "null", gi->dlen);
	if (decode_codec_store_tensor(job->desc.codec)) {
		/* expensive to decode again: keep the tensor (zstd-1) and its header */
		struct store_tensor_work *t = calloc(1, sizeof(*t));
		/* Kept only when it fits within max_size and min_free as they are: a decoded
		 * tensor can be made again, so it never makes anything else be evicted. */
		if (t && store_reserve(s->d.cache->store, gi->nbytes + gi->dlen) < 0) {
			free(t);
			t = NULL;
		} else if (t) {
			t->reserved = gi->nbytes + gi->dlen;
		}
		if (t && (t->buf = malloc(gi->nbytes + gi->dlen + 1))) {
			t->s = s;
			memcpy(t->raw, gi->raw, STORE_DIGEST_SIZE);
			t->opts = opts_key_frame(&gi->rq->h, gi->frame);
			desc_text(&job->desc, t->desc, sizeof(t->desc));
			memcpy(t->buf, gi->hold, gi->nbytes + gi->dlen);
			t->nbytes = gi->nbytes;
			t->mlen = gi->dlen;
			t->work.data = t;
			s->stores++;
			if (uv_queue_work(s->d.loop, &t->work, store_tensor_work, store_tensor_after)) {
				s->stores--;
				store_release(s->d.cache->store, t->reserved);
				free(t->buf);
				free(t);
			}
		} else if (t) {
			store_release(s->d.cache->store, t->reserved);
			free(t);
		}
	}
	hot_take(gi);
	item_got_bytes(gi);
}

/* A cached tensor: read it and its metadata from the store into `hold`. */
static void cached_work(uv_work_t *w)
{
	struct gitem *gi = w->data;
	struct store *store = gi->rq->sc->s->d.cache->store;
	uint64_t got = 0;

	gi->work_err = store_read(store, gi->tensor_digest, gi->hold, gi->nbytes, &got);
	if (gi->work_err == 0 && got != gi->nbytes)
		gi->work_err = -DMC_E_INTEGRITY;
	if (gi->work_err == 0 && gi->dlen)
		gi->work_err = store_read(store, gi->meta_digest, gi->hold + gi->nbytes, gi->dlen,
					  &got);
	if (gi->work_err == 0 && gi->dlen && got != gi->dlen)
		gi->work_err = -DMC_E_INTEGRITY;
}

static void start_decode_path(struct gitem *gi);

static void cached_after(uv_work_t *w, int status)
{
	struct gitem *gi = w->data;
	struct sconn *sc = gi->rq->sc;
	struct serve *s = sc->s;

	(void)status;
	sc->busy--;
	if (!sc->c) {
		abandon(gi);
		return;
	}
	if (gi->work_err < 0) {
		/* a damaged or evicted tensor is a miss: decode again */
		if (gi->work_err == -DMC_E_INTEGRITY || gi->work_err == -EIO)
			s->bad_reads++;
		gi_drop(gi);
		index_tensor_delete(s->d.cache->index, gi->raw, opts_key_frame(&gi->rq->h, gi->frame));
		start_decode_path(gi);
		return;
	}
	s->items_from_tensor_cache++;
	gi->from_cache = true;
	hot_take(gi);
	item_got_bytes(gi);
}

static void start_decode_path(struct gitem *gi)
{
	if (start_read(gi, gi->raw, gi->raw_len, read_after) < 0)
		item_fail(gi, -ENOMEM, "cannot start the read");
}

/*
 * A GET or STREAM item of a handle with a region whose index row was read before and whose tensor is
 * hot: handed at once, without an index query (the rows of a snapshot never change). False:
 * the usual path. The handle's region exists only for items that are neither raw files
 * nor masks.
 */
static bool region_fast(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	const struct rrow *row = region_row(gi->rq->h.rg, gi->item);
	char *rec;

	if (!row)
		return false;
	gi->he = hot_get_quiet(&sc->s->hot, row->raw, opts_key_frame(&gi->rq->h, gi->frame));
	if (!gi->he)
		return false;
	rec = strdup(row->record);
	if (!rec) {
		hot_unref(&sc->s->hot, gi->he);
		gi->he = NULL;
		return false;
	}
	free(gi->record);
	gi->record = rec;
	memcpy(gi->raw, row->raw, STORE_DIGEST_SIZE);
	gi->raw_len = row->raw_len;
	gi->state = GI_BUSY;
	if (!gi->counted) {
		gi->counted = true;
		sc->inflight++;
		sc->sh->inflight++;
	}
	gi->desc = gi->he->desc;
	gi->nbytes = gi->he->nbytes;
	item_got_bytes(gi);
	return true;
}

/* Looks the item up and starts whatever comes next. */
static void item_step(struct gitem *gi)
{
	struct sconn *sc = gi->rq->sc;
	struct serve *s = sc->s;
	struct index *ix = s->d.cache->index;
	struct lookup l = { 0 };
	struct index_blob b;
	char desc[128];
	int rc;

	if (gi->index >= gi->rq->h.items) {
		item_fail(gi, -DMC_E_INVALID_ARGUMENT, "index out of range");
		return;
	}
	if (gi->rq->h.frames) {
		uint32_t f;
		gi->item = fmap_find(gi->rq->h.frames, gi->index, &f);
		gi->frame = f;
	} else {
		gi->item = gi->index;
		gi->frame = -1;
	}
	if (gi->rq->h.rg && region_fast(gi))
		return;
	rc = index_item_get(ix, gi->rq->h.snapshot_id, (int64_t)gi->item, on_item_row, &l);
	if ((rc == -ENOMEM || (rc == 0 && l.found && !l.record))) {
		free(l.record);
		item_fail(gi, -DMC_E_OVERLOADED, "out of memory: try again");
		return;
	}
	if (rc < 0 || !l.found) {
		free(l.record);
		item_fail(gi, -DMC_E_NOT_FOUND_OR_DENIED, "no such item");
		return;
	}
	/* a local folder's row from an earlier proof: this listing's job proves it first */
	if (l.stored && prefetch_item_unproved(s->d.prefetch, gi->rq->h.snapshot_id,
					       (int64_t)gi->item))
		l.stored = false;
	if (!l.stored) {
		free(l.record);
		if (prefetch_snapshot_active(s->d.prefetch, gi->rq->h.snapshot_id)) {
			/* failed in a job of this uid: its words (another uid's job failed
			 * with its key; this GET waits, then fetches with its own OPEN's) */
			for (uint32_t i = 0; i < s->n_failed; i++)
				if (s->failed[i].snapshot_id == gi->rq->h.snapshot_id &&
				    s->failed[i].idx == (int64_t)gi->item &&
				    s->failed[i].uid == sc->sh->uid) {
					char why[MSG_MAX];
					int err = s->failed[i].err;
					snprintf(why, sizeof(why),
						 "the download of this item failed: %.200s%s%s",
						 dmc_err_text(err),
						 s->failed[i].message[0] ? ": " : "",
						 s->failed[i].message);
					item_fail(gi, err, why);
					return;
				}
			/* the job brings it, ahead of its walk; item_hook wakes us */
			prefetch_want(s->d.prefetch, gi->rq->h.snapshot_id, (int64_t)gi->item);
			settle(gi, GI_WAIT_ITEM);
			return;
		}
		if (refetch_possible(gi)) {
			/* found bad or gone since the OPEN (a verify, a failed re-fetch): the
			 * OPEN's job would fetch it; one does now, with the OPEN's key */
			refetch_start(gi);
			return;
		}
		const struct job_failed *jf = serve_job_failed(s, gi->rq->h.snapshot_id,
							       sc->sh->uid);
		if (jf) {
			char why[MSG_MAX];
			snprintf(why, sizeof(why), "not in the cache: the job filling it failed: %s%s%.200s",
				 dmc_err_text(jf->err), jf->message[0] ? ": " : "", jf->message);
			item_fail(gi, jf->err, why);
			return;
		}
		item_fail(gi, -DMC_E_NOT_FOUND_OR_DENIED,
			  "not in the cache (failed or evicted): prefetch the dataset again");
		return;
	}
	free(gi->record);
	gi->record = l.record;
	memcpy(gi->raw, l.blob, STORE_DIGEST_SIZE);
	if (index_blob_get(ix, gi->raw, &b) != 0) {
		item_fail(gi, -DMC_E_NOT_FOUND_OR_DENIED, "not in the cache");
		return;
	}
	gi->raw_len = (uint64_t)b.raw_size;
	gi->state = GI_BUSY;
	if (!gi->counted) {
		gi->counted = true;
		sc->inflight++;
		sc->sh->inflight++;
	}
	if ((gi->rq->h.flags & (DMC_OPEN_RAW | DMC_OPEN_MASKS)) == (DMC_OPEN_RAW | DMC_OPEN_MASKS)) {
		rawm_start(gi);
		return;
	}
	if (gi->rq->h.labels) {
		mask_start(gi); /* masks depend on the record too: never shared or kept */
		return;
	}
	if (gi->rq->h.flags & DMC_OPEN_RAW) {
		index_blob_touch(ix, gi->raw);
		if (start_read(gi, gi->raw, gi->raw_len, read_after) < 0)
			item_fail(gi, -ENOMEM, "cannot start the read");
		return;
	}
	/* decoded already, in memory? */
	if ((gi->he = hot_get(&s->hot, gi->raw, opts_key_frame(&gi->rq->h, gi->frame)))) {
		gi->desc = gi->he->desc;
		gi->nbytes = gi->he->nbytes;
		if (gi->rq->h.rg) /* the next GET of it needs no index query (region_fast) */
			region_row_put(gi->rq->h.rg, gi->item, gi->raw, gi->raw_len, gi->record);
		item_got_bytes(gi);
		return;
	}
	index_blob_touch(ix, gi->raw);
	/* a decoded tensor in the store? */
	if (index_tensor_get(ix, gi->raw, opts_key_frame(&gi->rq->h, gi->frame), gi->tensor_digest,
			     &gi->has_meta_blob, gi->meta_digest, desc, sizeof(desc)) == 0 &&
	    gi->has_meta_blob && desc_parse(desc, &gi->desc) &&
	    index_blob_get(ix, gi->meta_digest, &b) == 0) {
		gi->nbytes = gi->desc.nbytes;
		gi->dlen = (uint64_t)b.raw_size;
		gi->hold = malloc(gi->nbytes + gi->dlen + 1);
		if (gi->hold) {
			index_blob_touch(ix, gi->tensor_digest);
			gi->work.data = gi;
			sc->busy++;
			if (uv_queue_work(s->d.loop, &gi->work, cached_work, cached_after) == 0)
				return;
			sc->busy--;
			free(gi->hold);
			gi->hold = NULL;
		}
	}
	start_decode_path(gi);
}

void req_free(struct greq *rq)
{
	handle_drop_refs(&rq->h);
	for (uint32_t i = 0; i < rq->n; i++) {
		if (rq->items[i].counted) /* held bytes when its connection closed */
			settle(&rq->items[i], GI_DONE);
		mask_work_free(&rq->items[i]);
		rawm_free(&rq->items[i]);
		gi_drop(&rq->items[i]);
		free(rq->items[i].record);
		free(rq->items[i].in);
	}
	free(rq);
}

static void req_unlink(struct greq *rq)
{
	struct greq **pp;

	for (pp = &rq->sc->reqs; *pp && *pp != rq; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = rq->next;
}

void req_unpin(struct greq *rq)
{
	struct sconn *sc = rq->sc;

	if (--rq->pins || !rq->replied)
		return;
	req_free(rq);
	sconn_maybe_free(sc);
}

/* The reply record of an item: its status, or where its tensor and metadata are placed. */
void item_desc_write(struct dmc_writer *w, const struct gitem *gi)
{
	struct dmc_item_desc d = { .index = gi->index, .status = gi->status };

	d.message.ptr = gi->msg;
	d.message.len = gi->status ? (uint32_t)strlen(gi->msg) : 0;
	if (!gi->status) {
		d.dtype = (uint32_t)gi->desc.dtype;
		d.ndim = 4;
		d.shape[0] = gi->desc.frames;
		d.shape[1] = gi->desc.channels;
		d.shape[2] = gi->desc.height;
		d.shape[3] = gi->desc.width;
		d.offset = gi->off;
		d.nbytes = gi->nbytes;
		d.meta_offset = gi->moff;
		d.meta_len = gi->mlen;
	}
	dmc_item_desc_write(w, &d);
}

static uint8_t *reply_frame(struct sconn *sc)
{
	if (!sc->frame)
		sc->frame = malloc(REPLY_MAX);
	return sc->frame;
}

void req_maybe_reply(struct greq *rq)
{
	struct sconn *sc = rq->sc;
	struct dmc_writer w;
	uint8_t *frame;
	int n;

	if (rq->replied || rq->ready)
		return;
	rq->done = 0;
	for (uint32_t i = 0; i < rq->n; i++)
		if (rq->items[i].state == GI_DONE)
			rq->done++;
	if (rq->done < rq->n)
		return;
	req_unlink(rq);
	if (rq->st) {
		stream_batch_done(rq);
		return;
	}
	if (sc->c && (frame = reply_frame(sc))) {
		dmc_frame_begin(&w, frame, REPLY_MAX);
		dmc_write_u32(&w, rq->n);
		for (uint32_t i = 0; i < rq->n; i++)
			item_desc_write(&w, &rq->items[i]);
		if (rq->h.flags & DMC_OPEN_REGIONS)
			for (uint32_t i = 0; i < rq->n; i++)
				dmc_write_u8(&w, rq->items[i].in_region ? 1 : 0);
		n = dmc_frame_end(&w, DMC_OP_GET, DMC_FLAG_REPLY, rq->request_id, 0);
		if (n > 0)
			conn_send(sc->c, frame, (size_t)n);
		else
			conn_send_error(sc->c, rq->request_id, DMC_E_LIMIT_EXCEEDED, NULL,
					"too many items for one reply");
		metrics_get_replied(rq->arrived_ns);
	}
	rq->replied = true;
	if (rq->pins)
		return; /* a loop over its items frees it */
	req_free(rq);
	sconn_maybe_free(sc);
}

void on_get(struct serve *s, struct conn *c, const struct dmc_header *h,
	    const uint8_t *payload)
{
	struct sconn *sc = sconn_of(s, c, false);
	struct dmc_reader r;
	struct handle *hd;
	struct greq *rq, **tail;
	uint64_t handle;
	uint32_t n;

	if (dmc_get_begin(&r, payload, h->length, &handle, &n) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed GET");
		return;
	}
	hd = sc ? handle_find(sc, handle) : NULL;
	if (!hd) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"no open dataset with handle %" PRIu64, handle);
		return;
	}
	rq = calloc(1, sizeof(*rq) + (size_t)n * sizeof(rq->items[0]));
	if (!rq) {
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	rq->sc = sc;
	rq->request_id = h->request_id;
	rq->arrived_ns = uv_hrtime();
	rq->h = *hd;
	handle_copy_refs(&rq->h);
	rq->n = n;
	for (uint32_t i = 0; i < n; i++) {
		rq->items[i].rq = rq;
		rq->items[i].index = dmc_read_u64(&r);
		rq->items[i].state = GI_NEW;
	}
	for (tail = &sc->reqs; *tail; tail = &(*tail)->next)
		;
	*tail = rq;
	s->gets++;
	pump_items(sc);
}

/*
 * Starts waiting items, oldest request first, while fewer than INFLIGHT_MAX hold memory
 * (and fewer than decode_max_per_uid of its uid, over all its connections).
 * Items that fail or wait for a download at once take no place. Not reentrant: a nested
 * call (from an item finishing inside) only asks the running one to look again.
 */
/* A pump_items() that stopped at PUMP_BYTES_MAX goes on from the threadpool's queue: after
 * the events already waiting, and behind the work others queued. */
struct yield_work {
	uv_work_t work;
	struct sconn *sc;
};

static void yield_run(uv_work_t *w)
{
	(void)w;
}

static void yield_after(uv_work_t *w, int status)
{
	struct yield_work *yw = w->data;
	struct sconn *sc = yw->sc;

	(void)status;
	free(yw);
	sc->yielding = false;
	if (sc->c)
		pump_items(sc);
	sc->busy--;
	sconn_maybe_free(sc);
}

static void pump_yield(struct sconn *sc)
{
	struct yield_work *yw;

	if (sc->yielding || !sc->c || !(yw = calloc(1, sizeof(*yw))))
		return;
	yw->sc = sc;
	yw->work.data = yw;
	if (uv_queue_work(sc->s->d.loop, &yw->work, yield_run, yield_after) != 0) {
		free(yw);
		return;
	}
	sc->yielding = true;
	sc->busy++;
}

void pump_items(struct sconn *sc)
{
	const struct config *cfg = sc->s->d.cfg;
	struct greq *rq;
	bool again;

	if (sc->pumping)
		return;
	if (sc->yielding)
		return; /* its turn comes */
	sc->pumping = true;
	sc->pump_bytes = 0;
	sc->busy++;
	do {
		again = false;
		while (sc->inflight < INFLIGHT_MAX && sc->pump_bytes < PUMP_BYTES_MAX &&
		       (rq = first_with_new(sc)) && share_may_start(sc->sh, cfg)) {
			rq->pins++;
			for (uint32_t i = 0; i < rq->n && !rq->replied && sc->inflight < INFLIGHT_MAX &&
					     sc->pump_bytes < PUMP_BYTES_MAX &&
					     share_may_start(sc->sh, cfg);
			     i++)
				if (rq->items[i].state == GI_NEW)
					item_step(&rq->items[i]);
			if (rq->replied)
				again = true;
			req_unpin(rq);
		}
	} while (again && sc->inflight < INFLIGHT_MAX && sc->pump_bytes < PUMP_BYTES_MAX &&
		 first_with_new(sc));
	if (sc->pump_bytes >= PUMP_BYTES_MAX && sc->inflight < INFLIGHT_MAX && first_with_new(sc))
		pump_yield(sc);
	sc->pumping = false;
	share_wake(sc->s, sc->sh, sc);
	sc->busy--;
	sconn_maybe_free(sc);
}
