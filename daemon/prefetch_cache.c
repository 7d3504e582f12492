/*
 * prefetch's cache requests (proto.h): LIST (snapshots and their figures), EVICT (a
 * snapshot, then the blobs no snapshot links) and VERIFY (every blob hashed on the
 * threadpool, the index corrected on the loop).
 * Loop thread; verify_work() runs on the threadpool and touches only its request.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "conf.h"
#include "conn.h"
#include "index.h"
#include "log.h"
#include "prefetch.h"
#include "prefetch_priv.h"
#include "store.h"

struct list_ctx {
	struct prefetch *p;
	struct conn *c;
	struct dmc_writer *w;
	uint32_t n;
	int64_t ids[DMC_LIST_MAX];
};

static int list_collect(void *ctx, const struct index_snapshot *s)
{
	struct list_ctx *l = ctx;

	if (l->n < DMC_LIST_MAX && may_see(l->p, l->c, s->id))
		l->ids[l->n++] = s->id;
	return 0;
}

static int list_write(void *ctx, const struct index_snapshot *s)
{
	struct list_ctx *l = ctx;
	struct index_snapshot_stats st = { 0 };
	struct dmc_snapshot_info m = {
		.id = (uint64_t)s->id,
		.source = s->source == INDEX_SOURCE_FOLDER ? DMC_SOURCE_LOCAL : DMC_SOURCE_DATAMINT,
		.server = dstr(s->server_url),
		.project_id = dstr(s->project_id),
		.project_name = dstr(s->project_name),
		.version = dstr(s->version),
		.created_ms = (uint64_t)s->created_at * 1000,
		.owner_uid = s->owner >= 0 ? (uint32_t)s->owner : UINT32_MAX,
	};

	index_snapshot_stats(l->p->d.cache->index, s->id, &st);
	m.items = (uint64_t)st.items;
	m.items_stored = (uint64_t)st.items_stored;
	m.bytes = (uint64_t)st.bytes;
	m.bytes_stored = (uint64_t)st.bytes_stored;
	m.complete = prefetch_snapshot_active(l->p, s->id) ? 2
		     : s->sealed && st.items == st.items_stored;
	dmc_snapshot_info_write(l->w, &m);
	return 0;
}

void on_list(struct prefetch *p, struct conn *c, const struct dmc_header *h,
	     const uint8_t *payload)
{
	struct list_ctx *l = calloc(1, sizeof(*l));
	struct dmc_writer w;
	uint8_t *frame = malloc(DMC_HEADER_SIZE + DMC_FRAME_MAX);
	int n;

	if (!l || !frame) {
		free(l);
		free(frame);
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	if (dmc_empty_decode(payload, h->length) != DMC_PROTO_OK) {
		free(l);
		free(frame);
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed LIST");
		return;
	}
	index_flush(p->d.cache->index);
	l->p = p;
	l->c = c;
	l->w = &w;
	index_snapshot_list(p->d.cache->index, list_collect, l);
	dmc_frame_begin(&w, frame, DMC_HEADER_SIZE + DMC_FRAME_MAX);
	dmc_write_u32(&w, l->n);
	for (uint32_t i = 0; i < l->n; i++)
		index_snapshot_get(p->d.cache->index, l->ids[i], list_write, l);
	n = dmc_frame_end(&w, DMC_OP_LIST, DMC_FLAG_REPLY, h->request_id, 0);
	if (n > 0)
		conn_send(c, frame, (size_t)n);
	else
		conn_send_error(c, h->request_id, DMC_E_LIMIT_EXCEEDED, NULL,
				"too many snapshots for one reply");
	free(frame);
	free(l);
}

struct evict_ctx {
	struct prefetch *p;
	struct conn *c;
	bool all;
	struct dmc_str project;
	int64_t ids[DMC_LIST_MAX];
	bool whole[DMC_LIST_MAX]; /* delete the snapshot, not only the caller's grant */
	uint32_t n;
};

/*
 * What EVICT may take: an admin any snapshot; anyone else the snapshots they hold a grant
 * for. A snapshot goes as a whole when an admin evicts it or when its owner does (a
 * snapshot has one owner: the uid whose listing made it); otherwise only the caller's
 * grant goes.
 */
static int evict_collect(void *ctx, const struct index_snapshot *s)
{
	struct evict_ctx *e = ctx;

	if (e->n >= DMC_LIST_MAX || !may_see(e->p, e->c, s->id))
		return 0;
	if (!e->all && !((strlen(s->project_name) == e->project.len &&
			  memcmp(s->project_name, e->project.ptr, e->project.len) == 0) ||
			 (strlen(s->project_id) == e->project.len &&
			  memcmp(s->project_id, e->project.ptr, e->project.len) == 0)))
		return 0;
	e->whole[e->n] = e->c->admin || s->owner == (int64_t)e->c->uid;
	e->ids[e->n++] = s->id;
	return 0;
}

struct gc_ctx {
	struct prefetch *p;
	uint8_t (*digests)[STORE_DIGEST_SIZE];
	uint32_t n, cap;
};

static int gc_collect(void *ctx, const struct index_blob *b)
{
	struct gc_ctx *g = ctx;

	if (g->n == g->cap) {
		uint32_t cap = g->cap ? g->cap * 2 : 256;
		void *nd = realloc(g->digests, (size_t)cap * STORE_DIGEST_SIZE);
		if (!nd)
			return -ENOMEM;
		g->digests = nd;
		g->cap = cap;
	}
	memcpy(g->digests[g->n++], b->digest, STORE_DIGEST_SIZE);
	return 0;
}

void on_evict(struct prefetch *p, struct conn *c, const struct dmc_header *h,
	      const uint8_t *payload)
{
	struct index *ix = p->d.cache->index;
	struct evict_ctx *e = calloc(1, sizeof(*e));
	struct gc_ctx g = { p, NULL, 0, 0 };
	struct dmc_evict_reply r = { 0 };
	uint8_t frame[64];
	uint32_t flags;
	int n, rc = 0;

	if (!e) {
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	if (dmc_evict_decode(payload, h->length, &flags, &e->project) != DMC_PROTO_OK) {
		free(e);
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed EVICT");
		return;
	}
	e->p = p;
	e->c = c;
	e->all = flags & DMC_EVICT_ALL;
	index_flush(ix);
	index_snapshot_list(ix, evict_collect, e);
	for (uint32_t i = 0; i < e->n && rc == 0; i++) {
		if (prefetch_snapshot_active(p, e->ids[i]))
			continue; /* a job fills it right now: cancel it first */
		if (!e->whole[i]) {
			rc = index_grant_delete(ix, c->uid, e->ids[i]);
			if (rc == 0)
				r.snapshots++;
			continue;
		}
		rc = index_snapshot_delete(ix, e->ids[i]);
		if (rc == 0) {
			r.snapshots++;
			log_notice(STORE, "uid %u evicted snapshot %" PRId64, (unsigned)c->uid,
				   e->ids[i]);
		}
	}
	if (rc == 0)
		rc = index_flush(ix);
	if (rc == 0 && r.snapshots)
		local_tables_gc(p); /* a folder's item table goes with its last snapshot */
	/* blobs no snapshot refers to any more go; pinned ones (being served) stay */
	if (rc == 0)
		rc = index_blobs_unreferenced(ix, gc_collect, &g);
	for (uint32_t i = 0; i < g.n && rc >= 0; i++) {
		uint64_t freed = 0;
		if (store_remove(p->d.cache->store, g.digests[i], &freed) == 0 ||
		    !store_is_pinned(p->d.cache->store, g.digests[i])) {
			index_blob_delete(ix, g.digests[i]);
			if (freed) {
				r.blobs++;
				r.bytes += freed;
			}
		}
	}
	free(g.digests);
	if (rc >= 0)
		rc = index_flush(ix);
	free(e);
	if (rc < 0) {
		conn_send_error(c, h->request_id, DMC_E_IO, NULL, "eviction failed: %s",
				index_errmsg(ix));
		return;
	}
	n = dmc_evict_reply_encode(&r, h->request_id, frame, sizeof(frame));
	if (n > 0)
		conn_send(c, frame, (size_t)n);
}

struct verify_req *verifies; /* in flight, so that a closing conn can be forgotten */

static void verify_on_bad(void *ctx, const uint8_t digest[STORE_DIGEST_SIZE])
{
	struct verify_req *v = ctx;

	uv_mutex_lock(&v->lock);
	if (v->n_bad == v->cap_bad) {
		uint32_t cap = v->cap_bad ? v->cap_bad * 2 : 64;
		void *nb = realloc(v->bad, (size_t)cap * STORE_DIGEST_SIZE);
		if (nb) {
			v->bad = nb;
			v->cap_bad = cap;
		}
	}
	if (v->n_bad < v->cap_bad)
		memcpy(v->bad[v->n_bad++], digest, STORE_DIGEST_SIZE);
	uv_mutex_unlock(&v->lock);
}

static void verify_work(uv_work_t *w)
{
	struct verify_req *v = w->data;
	struct store_stats st;

	store_get_stats(v->p->d.cache->store, &st);
	v->bytes = st.used_bytes;
	v->rc = store_verify_all(v->p->d.cache->store, verify_on_bad, v, &v->ok, &v->bad_count);
}

static void verify_after(uv_work_t *w, int status)
{
	struct verify_req *v = w->data, **pp;
	struct index *ix = v->p->d.cache->index;
	struct dmc_verify_reply r;
	uint8_t frame[64];
	int n;

	(void)status;
	for (uint32_t i = 0; i < v->n_bad; i++)
		index_blob_delete(ix, v->bad[i]);
	index_flush(ix);
	for (pp = &verifies; *pp && *pp != v; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = v->next;
	if (v->c) {
		if (v->rc < 0) {
			conn_send_error(v->c, v->request_id, DMC_E_IO, NULL, "verification failed: %s",
					strerror(-v->rc));
		} else {
			r.blobs_checked = v->ok + v->bad_count;
			r.blobs_bad = v->bad_count;
			r.bytes_checked = v->bytes;
			n = dmc_verify_reply_encode(&r, v->request_id, frame, sizeof(frame));
			if (n > 0)
				conn_send(v->c, frame, (size_t)n);
		}
	}
	if (v->bad_count)
		log_warn(STORE, "verify: %" PRIu64 " bad blob(s) quarantined and forgotten",
			 v->bad_count);
	uv_mutex_destroy(&v->lock);
	free(v->bad);
	free(v);
}

void on_verify(struct prefetch *p, struct conn *c, const struct dmc_header *h,
	       const uint8_t *payload)
{
	struct verify_req *v;

	if (dmc_empty_decode(payload, h->length) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed VERIFY");
		return;
	}
	if (!c->admin) {
		/* it reads every user's blobs: work and figures for admins only */
		conn_send_error(c, h->request_id, DMC_E_NOT_FOUND_OR_DENIED, NULL,
				"verify re-hashes the whole cache: it is for root and members of "
				"the '%s' group", p->d.cfg->admin_group);
		return;
	}
	v = calloc(1, sizeof(*v));
	if (!v || uv_mutex_init(&v->lock) != 0) {
		free(v);
		conn_send_error(c, h->request_id, DMC_E_OVERLOADED, NULL, "out of memory: try again");
		return;
	}
	v->p = p;
	v->c = c;
	v->request_id = h->request_id;
	v->work.data = v;
	v->next = verifies;
	verifies = v;
	if (uv_queue_work(p->d.loop, &v->work, verify_work, verify_after) != 0) {
		verifies = v->next;
		uv_mutex_destroy(&v->lock);
		free(v);
		conn_send_error(c, h->request_id, DMC_E_INTERNAL, NULL, "cannot start");
	}
}
