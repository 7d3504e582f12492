/*
 * Serving tensors through shared memory: see serve.h. This file holds the per-connection
 * state (struct sconn, created at a connection's first request, freed after its end),
 * OPEN (handles and where their dataset comes from), RELEASE, CLOSE, the items that
 * prefetch jobs deliver, the engine's lifetime and status, and serve_dispatch(), which
 * hands each request to its part:
 *   serve_request.c  GET: an item's read, decode, re-fetch and copy into the arena
 *   serve_stream.c   STREAM and STOP: an epoch in batches
 *   serve_frames.c   frame-by-frame handles: the frame counts learnt at OPEN
 *   serve_masks.c    mask handles: the label set, mask items and raw mask files
 *   serve_arena.c    arenas: their growth, their release, the bytes each uid holds
 *   hot.c            the hot set of decoded tensors
 *   serve_region.c   hot tensors handed in place (region.c: the regions themselves)
 * Shared declarations are in serve_priv.h. Loop thread only.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arena.h"
#include "conf.h"
#include "conn.h"
#include "decode.h"
#include "decode_pool.h"
#include "index.h"
#include "log.h"
#include "metrics.h"
#include "prefetch.h"
#include "secret.h"
#include "serve.h"
#include "serve_priv.h"
#include "store.h"

static void origin_unref(struct origin *o)
{
	if (!o || --o->refs)
		return;
	secret_free(o->key);
	free(o->project);
	free(o->version);
	free(o->server);
	free(o);
}

static struct origin *origin_new(const struct dmc_open *m)
{
	struct origin *o = calloc(1, sizeof(*o));

	if (!o)
		return NULL;
	o->refs = 1;
	o->project = strndup(m->project.ptr, m->project.len);
	o->version = strndup(m->version.ptr, m->version.len);
	o->server = strndup(m->server.ptr, m->server.len);
	o->key = secret_new(m->api_key.ptr, m->api_key.len);
	if (!o->project || !o->version || !o->server || !o->key) {
		origin_unref(o);
		return NULL;
	}
	return o;
}

void handle_copy_refs(struct handle *h)
{
	fmap_ref(h->frames);
	if (h->labels)
		h->labels->refs++;
	if (h->origin)
		h->origin->refs++;
	region_ref(h->rg);
}

void handle_drop_refs(struct handle *h)
{
	fmap_unref(h->frames);
	lset_unref(h->labels);
	origin_unref(h->origin);
	region_unref(h->rg);
}

static void serve_destroy(struct serve *s);

struct sconn *sconn_of(struct serve *s, struct conn *c, bool create)
{
	struct sconn *sc = c->app_data;

	if (sc || !create)
		return sc;
	sc = calloc(1, sizeof(*sc));
	if (!sc)
		return NULL;
	sc->sh = share_get(s, c->uid);
	if (!sc->sh) {
		free(sc);
		return NULL;
	}
	sc->s = s;
	sc->c = c;
	sc->arena.fd = -1;
	sc->next_handle = 1;
	sc->next = s->conns;
	if (s->conns)
		s->conns->prev = sc;
	s->conns = sc;
	c->app_data = sc;
	return sc;
}

int on_item_row(void *ctx, const struct index_item *it)
{
	struct lookup *l = ctx;

	l->found = true;
	l->stored = it->stored && it->has_blob;
	memcpy(l->blob, it->blob, STORE_DIGEST_SIZE);
	l->record = it->meta ? strndup(it->meta, it->meta_len) : strdup("{}");
	return 0;
}

/* ---- OPEN ---- */

/* The OPEN is over (answered or not): forget it. */
void open_done(struct pending_open *po)
{
	struct sconn *sc = po->sc;
	struct pending_open **pp;

	if (sc->c) /* answered, with a handle or an error */
		metrics_open_replied(po->arrived_ns);
	for (pp = &sc->opens; *pp && *pp != po; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = po->next;
	sc->busy--;
	free(po->project_id);
	free(po->project_name);
	free(po->version);
	free(po->counts);
	fmap_unref(po->fm);
	lset_unref(po->labels);
	origin_unref(po->origin);
	free(po);
	sconn_maybe_free(sc);
}

/* Answers an OPEN whose arena exists: a handle, with the arena's fd on the first reply. */
static void open_reply_now(struct pending_open *po)
{
	struct sconn *sc = po->sc;
	struct dmc_open_reply rep;
	struct handle *h;
	uint8_t frame[1024];
	uint8_t nfds = 0;
	int fds[2];
	bool send_rg = false;
	int n;

	if (!sc->c)
		return;
	h = calloc(1, sizeof(*h));
	if (!h) {
		conn_send_error(sc->c, po->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	h->id = sc->next_handle++;
	h->snapshot_id = po->snapshot_id;
	h->items = po->items;
	h->flags = po->flags;
	h->dtype = po->dtype;
	h->pol = po->pol;
	h->frames = po->fm;
	h->labels = po->labels;
	h->origin = po->origin;
	po->fm = NULL;
	po->labels = NULL;
	po->origin = NULL;
	h->next = sc->handles;
	sc->handles = h;
	rep.handle = h->id;
	rep.snapshot_id = (uint64_t)po->snapshot_id;
	rep.items = po->items;
	rep.project_id = (struct dmc_str){ po->project_id, (uint32_t)strlen(po->project_id) };
	rep.project_name = (struct dmc_str){ po->project_name,
					     (uint32_t)strlen(po->project_name) };
	rep.version = (struct dmc_str){ po->version, (uint32_t)strlen(po->version) };
	rep.arena_bytes = sc->arena.size;
	rep.regions = (po->flags & DMC_OPEN_REGIONS) != 0;
	h->rg = region_for_open(sc, po->snapshot_id, po->flags, &send_rg);
	if (h->rg && send_rg && conn_fd_busy(sc->c)) {
		/* a descriptor still waits to go out: this handle does without */
		region_unref(h->rg);
		h->rg = NULL;
	}
	rep.region_id = h->rg ? h->rg->id : 0;
	rep.region_bytes = h->rg ? h->rg->a.size : 0;
	if (!sc->arena_sent)
		fds[nfds++] = sc->arena.fd;
	if (h->rg && send_rg)
		fds[nfds++] = h->rg->ro_fd;
	n = dmc_open_reply_encode(&rep, nfds, po->request_id, frame, sizeof(frame));
	if (n < 0) {
		conn_send_error(sc->c, po->request_id, DMC_E_INTERNAL, NULL, "reply too large");
		return;
	}
	if (nfds) {
		conn_send_fds(sc->c, frame, (size_t)n, fds, nfds);
		sc->arena_sent = true;
		if (h->rg && send_rg)
			region_sent(sc, h->rg);
	} else {
		conn_send(sc->c, frame, (size_t)n);
	}
	log_debug(SERVE, "uid %u opened snapshot %" PRId64 " (%" PRIu64 " items) as handle %" PRIu64,
		  (unsigned)sc->c->uid, po->snapshot_id, po->items, h->id);
}

static char *dup_unless_own(char *own, const char *s)
{
	return own == s ? own : strdup(s);
}

/*
 * Answers an OPEN and ends it: takes `po`, `fm` and `labels`. The strings may be po's own.
 */
void open_reply(struct pending_open *po, int64_t snapshot_id, uint64_t items,
		const char *project_id, const char *project_name, const char *version,
		struct fmap *fm, struct lset *labels)
{
	struct sconn *sc = po->sc;
	struct serve *s = sc->s;
	char why[MSG_MAX];
	int rc;

	po->snapshot_id = snapshot_id;
	po->items = items;
	po->project_id = dup_unless_own(po->project_id, project_id);
	po->project_name = dup_unless_own(po->project_name, project_name);
	po->version = dup_unless_own(po->version, version);
	po->fm = fm;
	po->labels = labels;
	if (!sc->c) {
		open_done(po);
		return;
	}
	if (!po->project_id || !po->project_name || !po->version) {
		conn_send_error(sc->c, po->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		open_done(po);
		return;
	}
	if (!sc->has_arena &&
	    (rc = arena_make(sc, po->arena_bytes ? po->arena_bytes : s->d.cfg->arena_default,
			     why, sizeof(why))) < 0) {
		conn_send_error(sc->c, po->request_id, code_of(rc), NULL, "%s", why);
		open_done(po);
		return;
	}
	open_reply_now(po);
	open_done(po);
}

/* After the job: the frame counts (frame by frame) or the label set (masks). */
static void open_continue(struct pending_open *po)
{
	struct sconn *sc = po->sc;
	struct lset *l = NULL;
	uint64_t bad = 0;
	int rc;

	if (!(po->flags & DMC_OPEN_MASKS)) {
		frames_step(po);
		return;
	}
	if (sc->c) {
		rc = masks_labels(po, &l, &bad);
		if (rc == -DMC_E_NOT_FOUND_OR_DENIED)
			conn_send_error(sc->c, po->request_id, (uint32_t)-rc, NULL,
					"item %" PRIu64 " is not in the cache: masks need every item "
					"stored; prefetch the dataset again", bad);
		else if (rc == -DMC_E_LIMIT_EXCEEDED)
			conn_send_error(sc->c, po->request_id, (uint32_t)-rc, NULL,
					"more than %d segmentation labels in the dataset",
					MASK_LABELS_MAX);
		else if (rc < 0)
			conn_send_error(sc->c, po->request_id, code_of(rc), NULL, "out of memory");
		else {
			open_reply(po, po->snapshot_id, po->items, po->project_id, po->project_name,
				   po->version, NULL, l);
			return;
		}
	}
	open_done(po);
}

static void on_open_ready(void *ctx, const struct prefetch_ready *r)
{
	struct pending_open *po = ctx;
	struct sconn *sc = po->sc;
	struct serve *s = sc->s;

	if (!sc->c) {
		open_done(po);
		return;
	}
	if (r->err) {
		conn_send_error_http(sc->c, po->request_id, r->code,
				     prefetch_refusal_status(r->code, r->http_status), NULL, "%s",
				     r->message);
		open_done(po);
		return;
	}
	if (!prefetch_may_see(s->d.prefetch, sc->c->uid, r->snapshot_id)) {
		conn_send_error(sc->c, po->request_id, DMC_E_NOT_FOUND_OR_DENIED, NULL,
				"not found or not entitled");
		open_done(po);
		return;
	}
	if (!(po->flags & (DMC_OPEN_FRAMES | DMC_OPEN_MASKS)) ||
	    (po->flags & (DMC_OPEN_RAW | DMC_OPEN_MASKS)) == (DMC_OPEN_RAW | DMC_OPEN_MASKS)) {
		open_reply(po, r->snapshot_id, r->items, r->project_id, r->project_name, r->version,
			   NULL, NULL);
		return;
	}
	/* frame by frame: the item count is the sum of the frames, known once every item is
	 * stored; masks: the label set of the whole dataset. Either way the dataset is
	 * prefetched first. */
	po->listed = true;
	po->snapshot_id = r->snapshot_id;
	po->items = r->items;
	po->project_id = strdup(r->project_id);
	po->project_name = strdup(r->project_name);
	po->version = strdup(r->version);
	if (!po->project_id || !po->project_name || !po->version) {
		conn_send_error(sc->c, po->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		open_done(po);
		return;
	}
	if (prefetch_snapshot_active(s->d.prefetch, r->snapshot_id)) {
		po->waiting_job = true; /* on_item() goes on when the job ends */
		return;
	}
	open_continue(po);
}

static void on_open(struct serve *s, struct conn *c, const struct dmc_header *h,
		    const uint8_t *payload)
{
	struct dmc_open m;
	struct dmc_prefetch pf;
	struct pending_open *po;
	struct sconn *sc;
	int rc;

	if (dmc_open_decode(payload, h->length, &m) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed OPEN");
		return;
	}
	if ((m.flags & DMC_OPEN_FRAMES) && (m.flags & DMC_OPEN_MASKS)) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"masks are served for whole items, not frame by frame");
		return;
	}
	if ((m.flags & DMC_OPEN_RAW) && ((m.flags & DMC_OPEN_LUT) || m.dtype || m.policy.ops)) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"the stored files are served as they are: no LUT, dtype or "
				"uniformity policy");
		return;
	}
	if ((m.flags & DMC_OPEN_MASKS) && m.policy.ops) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"masks are uint8 label maps on the image's grid: a uniformity "
				"policy does not apply to them");
		return;
	}
	sc = sconn_of(s, c, true);
	po = calloc(1, sizeof(*po));
	if (!sc || !po) {
		free(po);
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	po->sc = sc;
	po->request_id = h->request_id;
	po->arrived_ns = uv_hrtime();
	po->flags = m.flags;
	po->dtype = m.dtype;
	po->pol = m.policy;
	po->arena_bytes = m.arena_bytes;
	if (m.source == DMC_SOURCE_DATAMINT && m.api_key.len && !(m.flags & DMC_OPEN_OFFLINE))
		po->origin = origin_new(&m); /* NULL: bad items fail instead of coming again */
	po->next = sc->opens;
	sc->opens = po;
	sc->busy++;
	pf.source = m.source;
	pf.flags = (m.flags & DMC_OPEN_OFFLINE) ? DMC_PREFETCH_OFFLINE : 0;
	pf.project = m.project;
	pf.version = m.version;
	pf.server = m.server;
	pf.api_key = m.api_key;
	/* the caller's own job checks its access with its own key; it may answer at once */
	rc = m.source == DMC_SOURCE_LOCAL /* read through this client's descriptors */
		     ? prefetch_attach_local(s->d.prefetch, c, h->request_id, &pf, on_open_ready, po)
		     : prefetch_attach(s->d.prefetch, c->uid, &pf, on_open_ready, po);
	if (rc < 0) {
		struct prefetch_ready r = { .err = rc, .code = code_of(rc), .message = "stopping" };
		on_open_ready(po, &r);
	}
}

static void on_release(struct serve *s, struct conn *c, const struct dmc_header *h,
		       const uint8_t *payload)
{
	struct sconn *sc = sconn_of(s, c, false);
	struct dmc_reader r;
	uint8_t frame[64];
	uint32_t n, released = 0;
	struct dmc_writer w;
	int len;

	dmc_reader_init(&r, payload, h->length);
	n = dmc_read_u32(&r);
	if (r.err || (uint64_t)n * 8 != r.len - r.pos || !sc || !sc->has_arena) {
		conn_send_error(c, h->request_id, r.err ? DMC_E_PROTOCOL : DMC_E_INVALID_ARGUMENT,
				NULL, "malformed RELEASE, or nothing to release");
		return;
	}
	for (uint32_t i = 0; i < n; i++) {
		uint64_t off = dmc_read_u64(&r);
		region_release(sc, off); /* a tensor handed in place: unpinned */
		if (arena_free(&sc->arena, off) == 0) {
			released++;
			streams_released(sc, off);
		}
	}
	dmc_frame_begin(&w, frame, sizeof(frame));
	dmc_write_u32(&w, released);
	len = dmc_frame_end(&w, DMC_OP_RELEASE, DMC_FLAG_REPLY, h->request_id, 0);
	if (len > 0)
		conn_send(c, frame, (size_t)len);
	retry_space(sc);
	streams_kick(sc);
}

static void on_close(struct serve *s, struct conn *c, const struct dmc_header *h,
		     const uint8_t *payload)
{
	struct sconn *sc = sconn_of(s, c, false);
	struct dmc_reader r;
	struct handle **pp;
	uint64_t id;
	uint8_t frame[32];
	struct dmc_writer w;
	int len;

	dmc_reader_init(&r, payload, h->length);
	id = dmc_read_u64(&r);
	if (dmc_reader_finish(&r)) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed CLOSE");
		return;
	}
	for (pp = sc ? &sc->handles : NULL; pp && *pp && (*pp)->id != id; pp = &(*pp)->next)
		;
	if (!pp || !*pp) {
		conn_send_error(c, h->request_id, DMC_E_INVALID_ARGUMENT, NULL,
				"no open dataset with handle %" PRIu64, id);
		return;
	}
	{
		struct handle *hd = *pp;
		*pp = hd->next;
		sc->busy++;
		for (struct stream *st = sc->streams, *nst; st; st = nst) {
			nst = st->next;
			if (st->h.id == hd->id)
				stream_stop(st, 0, NULL); /* may free st */
		}
		sc->busy--;
		handle_drop_refs(hd);
		free(hd);
	}
	dmc_frame_begin(&w, frame, sizeof(frame));
	len = dmc_frame_end(&w, DMC_OP_CLOSE, DMC_FLAG_REPLY, h->request_id, 0);
	if (len > 0)
		conn_send(c, frame, (size_t)len);
}

/* ---- items arriving from prefetch jobs ---- */

struct greq *first_with_new(struct sconn *sc)
{
	for (struct greq *rq = sc->reqs; rq; rq = rq->next)
		for (uint32_t i = 0; i < rq->n; i++)
			if (rq->items[i].state == GI_NEW)
				return rq;
	return NULL;
}

/* Decoding ahead (prefetch_decode.c) leaves its tensors in the hot set while there is room
 * (prefetch_hot_hooks): never evicting anything for them, so a prefetch only fills memory
 * the set is allowed and does not use. Keyed by content, as a GET's: a client reads them
 * through an OPEN of a snapshot it is entitled to, as any other hot tensor. Each is also
 * copied into the snapshot's region (region_put_ahead(), within the regions' budget, never
 * evicting): a first epoch of handles with regions then finds its tensors in place, as a
 * warm one does, instead of copying each into fresh pages. Its descriptor goes only to
 * OPENs of that snapshot, which check entitlement first. */
static bool hot_room(void *ctx, uint64_t need)
{
	struct serve *s = ctx;

	return !s->closing && s->hot.max && need <= s->hot.max / 8 &&
	       s->hot.bytes + need <= s->hot.max;
}

static bool hot_ahead(void *ctx, int64_t snapshot_id, const uint8_t *raw, int64_t opts,
		      uint8_t *buf, uint64_t nbytes, uint64_t dlen,
		      const struct decode_desc *desc)
{
	struct serve *s = ctx;
	struct hot_entry *e;

	if (!hot_room(s, nbytes + dlen))
		return false;
	e = hot_adopt(&s->hot, raw, opts, buf, nbytes, dlen, desc);
	if (!e)
		return false;
	region_put_ahead(&s->regions, snapshot_id, raw, opts, e->buf, nbytes);
	hot_unref(&s->hot, e);
	s->hot_ahead++;
	return true;
}

/* Forgets the failed downloads recorded for snapshot `snapshot_id`. */
static void drop_failed(struct serve *s, int64_t snapshot_id)
{
	for (uint32_t i = 0; i < s->n_failed;)
		if (s->failed[i].snapshot_id == snapshot_id)
			s->failed[i] = s->failed[--s->n_failed];
		else
			i++;
}

/* A job of snapshot `snapshot_id` ended: remembered when it failed (err), else forgotten. */
static void note_job_ended(struct serve *s, int64_t snapshot_id, uid_t uid, int err,
			   const char *message)
{
	struct job_failed *f;

	for (uint32_t i = 0; i < s->n_job_failed;)
		if (s->job_failed[i].snapshot_id == snapshot_id)
			memmove(&s->job_failed[i], &s->job_failed[i + 1],
				(--s->n_job_failed - i) * sizeof(s->job_failed[0]));
		else
			i++;
	if (!err)
		return;
	if (s->n_job_failed == JOB_FAILED_MAX) /* the oldest goes */
		memmove(&s->job_failed[0], &s->job_failed[1],
			(--s->n_job_failed) * sizeof(s->job_failed[0]));
	f = &s->job_failed[s->n_job_failed++];
	f->snapshot_id = snapshot_id;
	f->uid = uid;
	f->err = err;
	snprintf(f->message, sizeof(f->message), "%s", message ? message : "");
}

const struct job_failed *serve_job_failed(const struct serve *s, int64_t snapshot_id,
					  uid_t uid)
{
	for (uint32_t i = s->n_job_failed; i-- > 0;)
		if (s->job_failed[i].snapshot_id == snapshot_id && s->job_failed[i].uid == uid)
			return &s->job_failed[i];
	return NULL;
}

static void on_item(void *ctx, int64_t snapshot_id, int64_t idx, uid_t uid, int err,
		    const char *message)
{
	struct serve *s = ctx;

	if (idx == PREFETCH_RELISTED) {
		/* a local folder listed again: what its rows said is proved again, item by
		 * item, by the job's descriptors; the GETs that find an item unproved wait */
		regions_forget_rows(&s->regions, snapshot_id);
		drop_failed(s, snapshot_id);
		return;
	}
	if (idx >= 0 && err) {
		if (s->n_failed == s->cap_failed) {
			uint32_t nc = s->cap_failed ? s->cap_failed * 2 : 16;
			struct failed_item *nf = realloc(s->failed, nc * sizeof(*nf));
			if (nf) {
				s->failed = nf;
				s->cap_failed = nc;
			}
		}
		if (s->n_failed < s->cap_failed) {
			struct failed_item *f = &s->failed[s->n_failed++];
			f->snapshot_id = snapshot_id;
			f->idx = idx;
			f->uid = uid;
			f->err = err;
			snprintf(f->message, sizeof(f->message), "%s", message ? message : "");
		}
	}
	if (idx == PREFETCH_JOB_ENDED) {
		/* what it failed is "not in the cache" from now on, or the job's own failure */
		drop_failed(s, snapshot_id);
		note_job_ended(s, snapshot_id, uid, err, message);
		/* a job ended: frame-by-frame opens of its snapshot go on */
		for (struct sconn *sc = s->conns; sc; sc = sc->next) {
		again:
			for (struct pending_open *po = sc->opens; po; po = po->next)
				if (po->waiting_job && po->snapshot_id == snapshot_id &&
				    !prefetch_snapshot_active(s->d.prefetch, snapshot_id)) {
					po->waiting_job = false;
					sc->busy++;
					open_continue(po); /* may end po */
					sc->busy--;
					goto again;
				}
		}
	}

	for (struct sconn *sc = s->conns, *nsc; sc; sc = nsc) {
		struct greq *rq;

		/* first mark what this news concerns, then step it: stepping changes the list */
		for (rq = sc->reqs; rq; rq = rq->next) {
			if (rq->h.snapshot_id != snapshot_id)
				continue;
			for (uint32_t i = 0; i < rq->n; i++) {
				struct gitem *gi = &rq->items[i];
				if (gi->state != GI_WAIT_ITEM || gi->rf ||
				    (idx >= 0 && (int64_t)gi->item != idx))
					continue;
				if (idx >= 0 && err && sc->sh->uid != uid)
					continue; /* another uid's job: fetched with this one's key
						     at the job's end (refetch_possible()) */
				if (idx >= 0 && err) {
					/* its download failed for good: say so now */
					gi->status = code_of(err);
					snprintf(gi->msg, sizeof(gi->msg),
						 "the download of this item failed: %.200s%s%.160s",
						 dmc_err_text(err),
						 message && message[0] ? ": " : "",
						 message ? message : "");
					gi->state = GI_DONE;
					s->items_failed++;
					rq->pins++;
					req_maybe_reply(rq);
					/* rq may have left the list: look again from the start */
					req_unpin(rq);
					rq = NULL;
					break;
				}
				gi->state = GI_NEW;
			}
			if (!rq)
				break;
		}
		nsc = sc->next;
		pump_items(sc);
	}
}

/* ---- lifetime ---- */

void sconn_maybe_free(struct sconn *sc)
{
	struct serve *s = sc->s;

	if (sc->c || sc->busy || sc->reqs || sc->opens || sc->streams)
		return;
	if (sc->prev)
		sc->prev->next = sc->next;
	else
		s->conns = sc->next;
	if (sc->next)
		sc->next->prev = sc->prev;
	region_pins_drop(sc);
	while (sc->handles) {
		struct handle *h = sc->handles;
		sc->handles = h->next;
		handle_drop_refs(h);
		free(h);
	}
	arena_retire(sc); /* takes the reference to sc->sh */
	free(sc->frame);
	free(sc);
	serve_maybe_destroy(s);
}

void serve_conn_closed(struct serve *s, struct conn *c)
{
	struct sconn *sc = c->app_data;

	(void)s;
	if (!sc)
		return;
	c->app_data = NULL;
	sc->c = NULL;
	sc->busy++;
	while (sc->refetches) {
		struct refetch *rf = sc->refetches;
		struct gitem *gi;
		prefetch_detach(s->d.prefetch, rf);
		while ((gi = refetch_waiter(sc, rf)))
			gi->rf = NULL; /* still GI_WAIT_ITEM: ended below */
		refetch_free(rf);
	}
	for (struct stream *st = sc->streams, *nst; st; st = nst) {
		nst = st->next;
		stream_stop(st, 0, NULL); /* may free st */
	}
	sc->busy--;
	/* requests waiting on something that will not come end now; work in flight ends on
	 * its own and frees what it holds */
	for (struct greq *rq = sc->reqs, *next; rq; rq = next) {
		next = rq->next;
		for (uint32_t i = 0; i < rq->n; i++) {
			struct gitem *gi = &rq->items[i];
			if (gi->state == GI_WAIT_ITEM || gi->state == GI_WAIT_SPACE ||
			    gi->state == GI_NEW)
				gi->state = GI_DONE;
		}
	}
	sc->busy++;
	for (struct greq *rq = sc->reqs, *next; rq; rq = next) {
		next = rq->next;
		req_maybe_reply(rq); /* no reply goes out: the connection is gone */
	}
	share_wake(s, sc->sh, sc); /* the places its items held, for its uid's others */
	sc->busy--;
	sc->busy++;
	for (struct pending_open *po = sc->opens, *n; po; po = n) {
		n = po->next;
		prefetch_detach(s->d.prefetch, po);
		if (!po->probing)
			open_done(po); /* the others end when their probes come back */
	}
	sc->busy--;
	sconn_maybe_free(sc);
}

/* After serve_free(): the engine goes with its last connection, store and unmap. */
void serve_maybe_destroy(struct serve *s)
{
	if (s->closing && !s->conns && !s->stores && !s->drops)
		serve_destroy(s);
}

static void serve_destroy(struct serve *s)
{
	hot_done(&s->hot);
	regions_done(&s->regions);
	free(s->failed);
	free(s);
}

int serve_new(const struct serve_deps *deps, struct serve **ret)
{
	struct serve *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->d = *deps;
	s->hot.max = deps->cfg->hot_max;
	s->regions.max = deps->cfg->hot_max;
	s->regions.linger_ms = deps->cfg->region_linger_ms;
	prefetch_set_item_hook(deps->prefetch, on_item, s);
	prefetch_set_hot_hooks(deps->prefetch, &(struct prefetch_hot_hooks){
		.room = hot_room, .adopt = hot_ahead, .ctx = s });
	*ret = s;
	return 0;
}

void serve_tick(struct serve *s)
{
	if (!s)
		return;
	arena_pool_expire(s, false);
	s->regions.linger_ms = s->d.cfg->region_linger_ms; /* a reload's, from here on */
	regions_expire(&s->regions, false);
}

void serve_free(struct serve *s)
{
	if (!s)
		return;
	prefetch_set_item_hook(s->d.prefetch, NULL, NULL);
	prefetch_set_hot_hooks(s->d.prefetch, NULL);
	s->closing = true;
	arena_pool_expire(s, true);
	/* connection states and stores go as their work ends; the last one frees the engine */
	serve_maybe_destroy(s);
}

bool serve_dispatch(struct serve *s, struct conn *c, const struct dmc_header *h,
		    const uint8_t *payload)
{
	switch (h->opcode) {
	case DMC_OP_OPEN:
		on_open(s, c, h, payload);
		return true;
	case DMC_OP_GET:
		on_get(s, c, h, payload);
		return true;
	case DMC_OP_RELEASE:
		on_release(s, c, h, payload);
		return true;
	case DMC_OP_CLOSE:
		on_close(s, c, h, payload);
		return true;
	case DMC_OP_STREAM:
		on_stream(s, c, h, payload);
		return true;
	case DMC_OP_STOP:
		on_stop(s, c, h, payload);
		return true;
	}
	return false;
}

#define ENTRY(name, v) ((struct dmc_status_entry){ { name, sizeof(name) - 1 }, (int64_t)(v) })

uint32_t serve_status(struct serve *s, struct dmc_status_entry *e, uint32_t max)
{
	uint64_t arenas = 0, arena_used = 0;
	struct decode_pool_stats ps = { 0 };

	for (struct sconn *sc = s->conns; sc; sc = sc->next) {
		arenas += sc->arena.size;
		arena_used += sc->arena.used;
	}
	arenas += s->arena_dropping;
	if (s->d.pool)
		decode_pool_stats(s->d.pool, &ps);
	struct dmc_status_entry all[] = {
		ENTRY("serve_get_requests_total", s->gets),
		ENTRY("serve_items_total", s->items_served),
		ENTRY("serve_items_failed_total", s->items_failed),
		ENTRY("serve_bytes_total", s->bytes_served),
		ENTRY("serve_items_decoded_total", s->items_decoded),
		ENTRY("serve_items_from_tensor_cache_total", s->items_from_tensor_cache),
		ENTRY("serve_tensors_stored_total", s->tensors_stored),
		ENTRY("serve_waits_for_space_total", s->waits_for_space),
		ENTRY("serve_streams_total", s->streams),
		ENTRY("serve_batches_total", s->batches_sent),
		ENTRY("serve_bad_reads_total", s->bad_reads),
		ENTRY("serve_refetches_total", s->refetches),
		ENTRY("serve_refetches_failed_total", s->refetches_failed),
		ENTRY("serve_open_frame_probes_total", s->frame_probes),
		ENTRY("serve_open_label_reads_total", s->label_reads),
		ENTRY("serve_open_stored_hits_total", s->open_stored_hits),
		ENTRY("serve_hot_bytes", s->hot.bytes),
		ENTRY("serve_hot_items", s->hot.n),
		ENTRY("serve_hot_hits_total", s->hot.hits),
		ENTRY("serve_hot_misses_total", s->hot.misses),
		ENTRY("serve_hot_evictions_total", s->hot.evictions),
		ENTRY("serve_hot_ahead_total", s->hot_ahead),
		ENTRY("serve_regions", regions_count(&s->regions)),
		ENTRY("serve_region_bytes", s->regions.bytes),
		ENTRY("serve_region_committed_bytes", regions_committed(&s->regions)),
		ENTRY("serve_region_tensors", s->regions.n),
		ENTRY("serve_region_tensors_pinned", s->regions.pinned),
		ENTRY("serve_region_copies_total", s->regions.copies),
		ENTRY("serve_region_items_total", s->regions.handed),
		ENTRY("serve_stream_region_items_total", s->stream_items_in_place),
		ENTRY("serve_region_evictions_total", s->regions.evictions),
		ENTRY("serve_region_reclaimed_bytes_total", s->regions.reclaimed),
		ENTRY("serve_arena_bytes", arenas),
		ENTRY("serve_arena_used_bytes", arena_used),
		ENTRY("serve_shm_committed_bytes", s->shm_total),
		ENTRY("serve_arena_pool", s->n_pool),
		ENTRY("serve_arena_pool_bytes", arena_pool_bytes(s)),
		ENTRY("serve_arena_pool_hits_total", s->pool_hits),
		ENTRY("serve_shm_refusals_total", s->shm_refusals),
		ENTRY("decode_workers", ps.workers),
		ENTRY("decode_busy", ps.busy),
		ENTRY("decode_done_total", ps.done),
		ENTRY("decode_failed_total", ps.failed),
		ENTRY("decode_crashes_total", ps.crashes),
		ENTRY("decode_timeouts_total", ps.timeouts),
	};
	uint32_t n = sizeof(all) / sizeof(all[0]);

	if (n > max)
		n = max;
	memcpy(e, all, n * sizeof(*e));
	return n;
}

bool serve_snapshot_open(struct serve *s, int64_t snapshot_id)
{
	for (struct sconn *sc = s->conns; sc; sc = sc->next)
		for (struct handle *h = sc->handles; h; h = h->next)
			if (h->snapshot_id == snapshot_id)
				return true;
	return false;
}

uint64_t serve_hot_max_changed(struct serve *s, uint64_t *ret_bytes)
{
	regions_set_max(&s->regions, s->d.cfg->hot_max);
	return hot_set_max(&s->hot, s->d.cfg->hot_max, ret_bytes);
}
