/*
 * Prefetch jobs and the cache requests: see prefetch.h. This file holds the engine, the
 * life of a job (struct job: made or joined by PREFETCH, OPEN, a re-fetch; admitted against
 * the cache's room; pumped; finished, cancelled, freed), its subscribers and their progress
 * events, prefetch_dispatch() and the status. The other parts:
 *   prefetch_grant.c     grants (which uid may see which snapshot) and offline reads
 *   prefetch_list.c      remote listing: the project, its version, the snapshot's pages
 *   prefetch_download.c  downloads: tasks, their transfers and the store writes
 *   prefetch_local.c     local dataset folders, read through the client's descriptors
 *   prefetch_cache.c     LIST, EVICT and VERIFY
 * Shared declarations are in prefetch_priv.h. Loop thread only.
 */
#include <errno.h>
#include <inttypes.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "cache.h"
#include "conf.h"
#include "conn.h"
#include "datamint.h"
#include "fetch.h"
#include "index.h"
#include "log.h"
#include "prefetch.h"
#include "prefetch_priv.h"
#include "secret.h"
#include "tier.h"
#include "tier_admin.h"
#include "store.h"

#define TICK_MS 1000
#define EVENT_FRAME_MAX 8192
/* With a valid grant, a server that has not answered the first request by then is taken
 * as unreachable (one connect attempt, not the whole retry budget). */
#define FALLBACK_AFTER_MS 2000u

static bool admit(struct job *j, const struct index_snapshot_stats *st);
static bool protect_snapshot(void *ctx, int64_t id);
static void log_eviction(void *ctx, int64_t id, uint64_t files, uint64_t bytes);

uint32_t window(const struct prefetch *p)
{
	return p->d.cfg->parallel_transfers * 2;
}

/* ---- events to subscribers ---- */

struct dmc_str dstr(const char *s)
{
	size_t n = s ? strlen(s) : 0;

	return (struct dmc_str){ s ? s : "", (uint32_t)(n > DMC_STR_MAX ? DMC_STR_MAX : n) };
}

void job_progress(const struct job *j, struct dmc_progress *m)
{
	memset(m, 0, sizeof(*m));
	m->job_id = j->id;
	m->snapshot_id = j->snapshot_id > 0 ? (uint64_t)j->snapshot_id : 0;
	m->state = j->state;
	m->project_id = dstr(j->proj ? j->proj->id : "");
	m->project_name = dstr(j->proj ? j->proj->name : j->project_arg);
	m->version = dstr(j->proj ? j->proj->version : j->version_arg);
	m->items_total = j->items_total;
	m->items_done = j->items_done;
	m->items_cached = j->items_cached;
	m->items_failed = j->items_failed;
	m->bytes_total = j->bytes_total;
	/* retried bodies count once: progress never passes the total */
	m->bytes_done = j->bytes_done < j->bytes_total ? j->bytes_done : j->bytes_total;
	m->rate_bps = j->rate;
	m->eta_ms = j->eta_ms;
}

void send_progress(struct job *j, const struct dmc_progress *m, bool more)
{
	uint8_t frame[EVENT_FRAME_MAX];

	for (struct sub *s = j->subs; s; s = s->next) {
		int n;
		if (!s->c)
			continue;
		n = dmc_progress_encode(m, more, s->request_id, frame, sizeof(frame));
		if (n > 0)
			conn_send(s->c, frame, (size_t)n);
	}
}

/* Tells the callback subscribers that the snapshot is listed (err 0) or cannot be; they are
 * told once and dropped. */
static void notify_ready(struct job *j, int err)
{
	struct sub **pp = &j->subs;
	struct prefetch_ready r = { 0 };

	r.err = err;
	if (err) {
		r.code = j->first_error.code ? j->first_error.code : DMC_E_INTERNAL;
		r.http_status = j->first_error.http_status;
		r.retry_after_ms = j->first_error.retry_after_ms;
		r.message = j->first_message[0] ? j->first_message : "failed";
	} else {
		r.snapshot_id = j->snapshot_id;
		r.items = j->items_total;
		r.project_id = j->proj ? j->proj->id : "";
		r.project_name = j->proj ? j->proj->name : j->project_arg;
		r.version = j->proj ? j->proj->version : j->version_arg;
	}
	while (*pp) {
		struct sub *sb = *pp;
		if (!sb->cb) {
			pp = &sb->next;
			continue;
		}
		*pp = sb->next;
		sb->cb(sb->ctx, &r);
		free(sb);
	}
}

static void drop_subs(struct job *j)
{
	while (j->subs) {
		struct sub *s = j->subs;
		j->subs = s->next;
		free(s);
	}
}

static void update_rate(struct job *j)
{
	uint64_t oldest;

	if (j->n_samples == RATE_WINDOW + 1) {
		memmove(j->samples, j->samples + 1, RATE_WINDOW * sizeof(j->samples[0]));
		j->n_samples--;
	}
	j->samples[j->n_samples++] = j->bytes_done;
	oldest = j->samples[0];
	j->rate = j->n_samples > 1 ? (j->bytes_done - oldest) * 1000 / ((j->n_samples - 1) * TICK_MS)
				   : 0;
	if (j->rate && j->bytes_total > j->bytes_done)
		j->eta_ms = (j->bytes_total - j->bytes_done) * 1000 / j->rate;
	else
		j->eta_ms = 0;
}

/*
 * Commits the index batch: what makes stored items count (acknowledged). When it fails
 * (disk full, I/O error), the batch was rolled back: the jobs whose items were in it cannot
 * say what is stored any more, so they end FAILED with the reason; a new prefetch finds
 * the blobs again (reconciliation adopts them) and goes on.
 */
static int commit_index(struct prefetch *p)
{
	struct index *ix = p->d.cache->index;
	int rc = index_flush(ix);
	uint64_t lost = index_batches_lost(ix);
	char msg[FETCH_MESSAGE_MAX];

	if (rc == 0 && lost == p->lost_seen)
		return 0;
	p->lost_seen = lost;
	if (rc == 0)
		rc = -EIO; /* an earlier write or read failed and took the batch with it */
	snprintf(msg, sizeof(msg), "the cache index could not be written: %.200s",
		 index_errmsg(ix));
	log_err(STORE, "%s", msg);
	for (struct job *j = p->jobs, *n; j; j = n) {
		n = j->next;
		if (j->final || j->snapshot_id <= 0)
			continue;
		record_error(j, rc, 0, 0, NULL, msg);
		job_finish(j, DMC_JOB_FAILED);
	}
	return rc;
}

static void on_tick(uv_timer_t *t)
{
	struct job *j = t->data;
	struct dmc_progress m;

	if (j->final)
		return;
	if (commit_index(j->pf) < 0)
		return; /* the job ended with the reason */
	if (j->state == DMC_JOB_RESOLVING && j->fallback_id > 0 &&
	    uv_now(j->pf->d.loop) - j->started_ms >= FALLBACK_AFTER_MS &&
	    fall_back(j, "no answer"))
		return;
	update_rate(j);
	job_progress(j, &m);
	send_progress(j, &m, true);
}

/* What the index says of a snapshot without counting its items. */
struct snap_flags {
	bool sealed, complete;
	int64_t item_count, total_bytes;
};

static int snap_flags_cb(void *ctx, const struct index_snapshot *s)
{
	struct snap_flags *f = ctx;

	f->sealed = s->sealed;
	f->complete = s->complete;
	f->item_count = s->item_count;
	f->total_bytes = s->total_bytes;
	return 0;
}

/* After a job that scanned: `complete` says, from its flags `f` and the count `st`, whether
 * every item is stored. */
static void record_complete(struct index *ix, int64_t id, const struct snap_flags *f,
			    const struct index_snapshot_stats *st)
{
	index_snapshot_set_complete(ix, id,
				    f->sealed && st->items == st->items_stored &&
					    st->items == f->item_count && st->bytes == f->total_bytes);
	index_flush(ix);
}

/* The job ends for its subscribers: a final record, or ERROR when it never started. */
void job_finish(struct job *j, uint32_t state)
{
	struct dmc_progress m;
	struct index *ix = j->pf->d.cache->index;

	if (j->final)
		return;
	local_relist_end(j, state); /* before anything reads the snapshot's rows as proved */
	if (decode_ahead(j, state))
		return;
	j->final = true;
	j->state = state;
	uv_timer_stop(&j->tick);
	if (index_flush(ix) < 0 && state == DMC_JOB_DONE) {
		/* nothing of the last batch is recorded: this job cannot say it is done */
		record_error(j, -EIO, 0, 0, NULL, "the cache index could not be written");
		j->state = state = DMC_JOB_FAILED;
	}
	/* the count is a scan of the snapshot's rows (280 ms at a million on this loop): for
	 * a job that is done, or one somebody still hears the end of; not for one whose
	 * client went away (an OPEN closed before its proving walk ended) */
	if (j->snapshot_id > 0 && !j->known_complete && (state == DMC_JOB_DONE || j->subs)) {
		struct index_snapshot_stats st = { 0 };
		struct snap_flags f = { 0 };
		bool flags = state == DMC_JOB_DONE &&
			     index_snapshot_get(ix, j->snapshot_id, snap_flags_cb, &f) == 0;
		if (flags && f.sealed && f.complete) {
			/* still complete: the index's triggers clear the flag in the very
			 * transaction that drops a blob row or changes an item, so every item
			 * is stored (a local folder proved again, unchanged) */
			st.items_stored = f.item_count;
		} else if (index_snapshot_stats(ix, j->snapshot_id, &st) < 0) {
			goto counted;
		} else if (flags) {
			record_complete(ix, j->snapshot_id, &f, &st);
		}
		/* (--to-tier: items_done counts what is in the cluster tier, not here) */
		/* "stored" is what the index has committed, as `dmcache ls` counts it: a batch
		 * that could not be committed is not counted (its blobs are kept, and the next
		 * start's reconciliation adopts them) */
		if (!j->to_tier && (uint64_t)st.items_stored != j->items_done) {
			if ((uint64_t)st.items_stored < j->items_done)
				log_warn(STORE, "job %" PRIu64 ": %" PRIu64 " items counted as stored "
						"are not in the index (a failed commit)",
					 j->id, j->items_done - (uint64_t)st.items_stored);
			j->items_done = (uint64_t)st.items_stored;
		}
	}
counted:
	update_rate(j);
	j->eta_ms = 0;
	/* callbacks still waiting for the snapshot: it will not come from this job */
	notify_ready(j, state == DMC_JOB_DONE && j->snapshot_id > 0 ? 0 : -1);
	if (state == DMC_JOB_FAILED && j->snapshot_id <= 0) {
		/* nothing started: an ERROR frame carries the reason */
		for (struct sub *s = j->subs; s; s = s->next)
			conn_send_error_http(s->c, s->request_id, j->first_error.code,
					     prefetch_refusal_status(j->first_error.code,
								     j->first_error.http_status),
					     j->first_resource[0] ? j->first_resource : NULL,
					     "%s", j->first_message);
	} else {
		job_progress(j, &m);
		if (state != DMC_JOB_DONE && j->first_error.code) {
			m.error_code = j->first_error.code;
			m.http_status = j->first_error.http_status;
			m.error_resource = dstr(j->first_resource);
			m.error_message = dstr(j->first_message);
		} else if (j->notice[0]) {
			m.error_message = dstr(j->notice); /* code 0: a notice, not an error */
		}
		send_progress(j, &m, false);
	}
	drop_subs(j);
	/* items still missing will not come from this job */
	if (j->pf->item_hook && j->snapshot_id > 0)
		j->pf->item_hook(j->pf->item_hook_ctx, j->snapshot_id, PREFETCH_JOB_ENDED, j->uid,
				 state == DMC_JOB_FAILED && j->first_error.code ?
					 -(int)j->first_error.code : 0,
				 j->first_message);
	log_job(state == DMC_JOB_DONE ? LOG_LVL_NOTICE : LOG_LVL_WARNING, LOG_GRP_FETCH, j->id,
		(unsigned)j->uid, j->proj ? j->proj->name : j->project_arg,
		"job %" PRIu64 " of uid %u, '%s' version '%s': %s, %" PRIu64 " of %" PRIu64
		" items stored, %" PRIu64 " failed, %" PRIu64 " bytes downloaded in %.1f s%s%s",
		   j->id, (unsigned)j->uid, j->proj ? j->proj->name : j->project_arg,
		   j->proj ? j->proj->version : j->version_arg,
		   state == DMC_JOB_DONE ? "done" : state == DMC_JOB_CANCELLED ? "cancelled" : "failed",
		   j->items_done, j->items_total, j->items_failed, j->bytes_done,
		   (double)(uv_now(j->pf->d.loop) - j->started_ms) / 1000,
		   j->first_message[0] ? ": " : "", j->first_message);
	/* the key is not needed any more: wipe it now rather than when memory is freed */
	job_maybe_free(j);
}

void record_error(struct job *j, int err, long http_status, uint32_t retry_after,
		  const char *resource, const char *msg)
{
	if (j->first_error.code)
		return;
	j->first_error.code = err <= -DMC_E_FIRST_ && err >= -DMC_E_LAST_ ? (uint32_t)-err
			       : err == -ENOSPC ? DMC_E_CACHE_FULL
			       : err < 0 && err > -4096 ? DMC_E_IO
							: DMC_E_INTERNAL;
	j->first_error.http_status = (uint32_t)(http_status > 0 ? http_status : 0);
	j->first_error.retry_after_ms = retry_after;
	j->first_error.sys_errno = err < 0 && err > -4096 ? -err : 0;
	snprintf(j->first_resource, sizeof(j->first_resource), "%s", resource ? resource : "");
	snprintf(j->first_message, sizeof(j->first_message), "%s", msg);
}

void fail_job(struct job *j, const struct dm_error *e)
{
	withdraw_grants(j, e); /* a refusal of the key ends the grants it proved */
	record_error(j, e->err, e->http_status, e->retry_after_ms, NULL, e->message);
	job_finish(j, DMC_JOB_FAILED);
}

/* ---- the engine ---- */

static void on_flush_timer(uv_timer_t *t)
{
	commit_index(t->data);
}

int prefetch_new(const struct prefetch_deps *deps, struct prefetch **ret)
{
	struct prefetch *p = calloc(1, sizeof(*p));
	char err[320] = "";
	int rc;

	if (!p)
		return -ENOMEM;
	p->d = *deps;
	rc = tier_new(deps->loop, deps->fetch, deps->cache->store, deps->cfg, &p->tier, err,
		      sizeof(err));
	if (rc < 0) {
		log_err(FETCH, "cluster tier: %s", err);
		free(p);
		return rc;
	}
	p->next_job_id = 1;
	p->lost_seen = index_batches_lost(deps->cache->index);
	load_salt(p);
	/* eviction never takes what a job is filling or a client reads (docs/operations) */
	deps->cache->protect = protect_snapshot;
	deps->cache->protect_ctx = p;
	deps->cache->evicting = log_eviction;
	deps->cache->evicting_ctx = p;
	uv_timer_init(deps->loop, &p->flush_timer);
	p->flush_timer.data = p;
	/* batches commit at least every 200 ms, and at every progress event */
	uv_timer_start(&p->flush_timer, on_flush_timer, 200, 200);
	local_tables_gc(p); /* item tables of parses the index no longer records */
	*ret = p;
	return 0;
}

static void engine_free(struct prefetch *p)
{
	explicit_bzero(p->salt, sizeof(p->salt));
	free(p);
}

static void on_flush_timer_closed(uv_handle_t *h)
{
	struct prefetch *p = h->data;

	p->timer_closed = true;
	if (!p->jobs)
		engine_free(p);
}

void prefetch_free(struct prefetch *p)
{
	if (!p || p->closing)
		return;
	p->closing = true;
	local_seen_clear(p);
	local_proofs_clear(p);
	for (struct job *j = p->jobs, *n; j; j = n) {
		n = j->next;
		job_cancel(j);
	}
	tier_free(p->tier);
	p->tier = NULL;
	uv_timer_stop(&p->flush_timer);
	uv_close((uv_handle_t *)&p->flush_timer, on_flush_timer_closed);
}

/*
 * May content stored for another user's snapshot be revalidated for this job? Only at a
 * configured Datamint server, with this job's own key (If-None-Match: a 304 is the
 * server's word that this key may have those bytes). Elsewhere, a server of the
 * requester's choosing could answer 304 to anything: its snapshots reuse only what the
 * same uid stored from the same server, and no other user's ETag is ever sent to it.
 */
bool shares_across_users(const struct job *j)
{
	return j->source == DMC_SOURCE_DATAMINT && config_trusted_server(j->pf->d.cfg, j->server);
}

static bool protect_snapshot(void *ctx, int64_t id)
{
	struct prefetch *p = ctx;

	return prefetch_snapshot_active(p, id) || (p->is_open && p->is_open(p->is_open_ctx, id));
}

static int snap_name_cb(void *ctx, const struct index_snapshot *s)
{
	char *out = ctx;

	snprintf(out, 200, "'%.80s' version '%.60s' of uid %" PRId64, s->project_name,
		 s->version, s->owner);
	return 0;
}

void prefetch_log_eviction(struct cache *c, const struct config *cfg, int64_t id,
			   uint64_t files, uint64_t bytes, bool at_start)
{
	char what[200] = "?";

	index_snapshot_get(c->index, id, snap_name_cb, what);
	/* before the first file goes, at start as later: a crash then leaves no loss unlogged */
	log_notice(STORE, "evicting %" PRIu64 " files (%.1f MiB) of snapshot %" PRId64 " (%s), "
			  "the least recently used, %s within max_size %" PRIu64
			  " and min_free %" PRIu64 " bytes",
		   files, (double)bytes / (1 << 20), id, what,
		   at_start ? "at start to get back" : "to make room", cfg->max_size,
		   cfg->min_free);
}

static void log_eviction(void *ctx, int64_t id, uint64_t files, uint64_t bytes)
{
	struct prefetch *p = ctx;

	prefetch_log_eviction(p->d.cache, p->d.cfg, id, files, bytes, false);
}

bool prefetch_snapshot_active(struct prefetch *p, int64_t id)
{
	for (struct job *j = p->jobs; j; j = j->next)
		if (!j->final && j->snapshot_id == id)
			return true;
	return false;
}

void prefetch_set_open_check(struct prefetch *p, bool (*is_open)(void *ctx, int64_t id),
			     void *ctx)
{
	p->is_open = is_open;
	p->is_open_ctx = ctx;
}

void prefetch_set_item_hook(struct prefetch *p, prefetch_item_cb cb, void *ctx)
{
	p->item_hook = cb;
	p->item_hook_ctx = ctx;
}

void prefetch_set_hot_hooks(struct prefetch *p, const struct prefetch_hot_hooks *hooks)
{
	if (hooks && hooks->room && hooks->adopt)
		p->hot = *hooks;
	else
		memset(&p->hot, 0, sizeof(p->hot));
}

/* ---- jobs ---- */

static void on_tick_closed(uv_handle_t *h)
{
	free(h->data);
}

void job_maybe_free(struct job *j)
{
	struct prefetch *p = j->pf;

	if (!j->final || j->pending || j->tasks || j->freeing)
		return;
	j->freeing = true;
	if (j->prev)
		j->prev->next = j->next;
	else
		p->jobs = j->next;
	if (j->next)
		j->next->prev = j->prev;
	j->next = j->prev = NULL;
	secret_free(j->key);
	j->key = NULL;
	dm_project_free(j->proj);
	dm_annotations_free(j->ann);
	local_job_free(j);
	free(j->taken);
	j->taken = NULL;
	free(j->server);
	free(j->project_arg);
	free(j->version_arg);
	drop_subs(j);
	uv_close((uv_handle_t *)&j->tick, on_tick_closed);
#ifdef __GLIBC__
	/* a listing of many items (a local dataset.json of 100,000 entries: its JSON tree and
	 * items, some 300 MiB) leaves the heap's freed pages with the daemon: the last job to
	 * end gives them back */
	if (!p->jobs)
		malloc_trim(0);
#endif
	if (p->timer_closed && !p->jobs)
		engine_free(p); /* the last job of a stopping engine */
}

void job_cancel(struct job *j)
{
	if (j->cancelled)
		return;
	j->cancelled = true;
	record_error(j, -DMC_E_CANCELLED, 0, 0, NULL, "cancelled");
	job_finish(j, DMC_JOB_CANCELLED);
	/* transfers end through their on_done (deferred); waiting followers end now */
	for (struct task *t = j->tasks; t; t = t->next) {
		if (t->x)
			fetch_xfer_cancel(t->x);
		if (t->treq)
			tier_map_cancel(t->treq);
	}
	for (;;) {
		struct task *t = j->tasks;
		while (t && !t->leader && !t->starting)
			t = t->next;
		if (!t)
			break;
		t->starting = false;
		task_finish(t, -DMC_E_CANCELLED, "cancelled", 0);
	}
}

void start_downloading(struct job *j)
{
	struct index_snapshot_stats st;
	struct snap_flags f = { 0 };
	struct index *ix = j->pf->d.cache->index;

	j->state = DMC_JOB_DOWNLOADING;
	if (!j->offline)
		grant(j); /* the listing just succeeded with j's key: a new proof */
	/* sealed and complete: every item is stored (index.h), nothing to count or scan */
	if (j->source != DMC_SOURCE_LOCAL &&
	    index_snapshot_get(ix, j->snapshot_id, snap_flags_cb, &f) >= 0 && f.sealed &&
	    f.complete) {
		j->known_complete = true;
		j->items_total = j->items_done = j->items_cached = (uint64_t)f.item_count;
		j->bytes_total = 0;
		j->scan_from = 0;
		j->scan_done = true;
		notify_ready(j, 0);
		job_pump(j);
		return;
	}
	if (j->lj && j->lj->kept) {
		/* an unchanged listing: nothing is proved yet (the rows' earlier proofs do not
		 * count), what is read is reserved file by file (local_task_begin()), and the
		 * listing was admitted when it was put; counting the rows would read them all */
		j->items_total = j->lj->n_items;
		j->items_done = j->items_cached = 0;
		j->bytes_total = 0;
	} else if (index_snapshot_stats(ix, j->snapshot_id, &st) == 0) {
		j->items_total = (uint64_t)st.items;
		j->items_done = j->items_cached = (uint64_t)st.items_stored;
		j->bytes_total = (uint64_t)(st.bytes - st.bytes_stored);
		if (!j->offline && !j->allow_partial && !admit(j, &st))
			return;
	}
	j->scan_from = 0;
	j->scan_done = false;
	notify_ready(j, 0);
	job_pump(j);
}

/* ---- admission ---- */

static void say_bytes(char *out, size_t cap, uint64_t b)
{
	if (b >= (1ull << 30))
		snprintf(out, cap, "%.1f GiB", (double)b / (1ull << 30));
	else
		snprintf(out, cap, "%.1f MiB", (double)b / (1ull << 20));
}

/* Why a write did not fit, with the limit that stopped it (max_size or min_free). */
const char *cache_full_text(struct prefetch *p, char *buf, size_t cap)
{
	const struct config *cfg = p->d.cfg;
	struct store_stats ss;
	struct statvfs fs;
	char a[24], b[24];

	store_get_stats(p->d.cache->store, &ss);
	if (statvfs(cfg->cache_dir, &fs) == 0 &&
	    (uint64_t)fs.f_bavail * fs.f_frsize < cfg->min_free + CACHE_INDEX_HEADROOM + (64u << 20)) {
		say_bytes(a, sizeof(a), (uint64_t)fs.f_bavail * fs.f_frsize);
		say_bytes(b, sizeof(b), cfg->min_free);
		snprintf(buf, cap, "cache full: the file system has %s free and min_free is %s", a,
			 b);
	} else if (cfg->max_size) {
		say_bytes(a, sizeof(a), ss.used_bytes);
		say_bytes(b, sizeof(b), cfg->max_size);
		snprintf(buf, cap, "cache full: %s in use of max_size %s, nothing evictable", a, b);
	} else {
		snprintf(buf, cap, "cache full");
	}
	return buf;
}

/*
 * Before downloading: can what the snapshot still needs fit? Within max_size, everything
 * but this snapshot's own content may be evicted; on the file system, what is free beyond
 * min_free plus what eviction can free. When it cannot fit, the job fails at once with the
 * numbers (CACHE_FULL) instead of storing a part and evicting the rest; the client may ask
 * for a partial snapshot (DMC_PREFETCH_ALLOW_PARTIAL). Sizes are upstream sizes: blobs
 * stored compressed only make it fit better.
 */
static bool admit(struct job *j, const struct index_snapshot_stats *st)
{
	const struct config *cfg = j->pf->d.cfg;
	uint64_t need = (uint64_t)(st->bytes - st->bytes_stored), own = (uint64_t)st->bytes_stored;
	struct store_stats ss;
	struct statvfs fs;
	struct dm_error e = { .err = -DMC_E_CACHE_FULL };
	char a[24], b[24], c[24];
	const char *name = j->proj ? j->proj->name : j->project_arg;

	if (need == 0)
		return true;
	store_get_stats(j->pf->d.cache->store, &ss);
	if (cfg->max_size && need + own > cfg->max_size) {
		uint64_t others = ss.used_bytes > own ? ss.used_bytes - own : 0;
		say_bytes(a, sizeof(a), need);
		say_bytes(b, sizeof(b), cfg->max_size);
		say_bytes(c, sizeof(c), others);
		snprintf(e.message, sizeof(e.message),
			 "'%.40s' needs %s more; max_size is %s and %s is held by other "
			 "snapshots (--allow-partial stores what fits)",
			 name, a, b, c);
	} else if (statvfs(cfg->cache_dir, &fs) == 0) {
		uint64_t avail = (uint64_t)fs.f_bavail * fs.f_frsize;
		uint64_t keep = cfg->min_free + CACHE_INDEX_HEADROOM;
		uint64_t room = avail > keep ? avail - keep : 0;
		uint64_t evictable = ss.used_bytes > own ? ss.used_bytes - own : 0;
		if (need <= room + evictable)
			return true;
		say_bytes(a, sizeof(a), need);
		say_bytes(b, sizeof(b), avail);
		say_bytes(c, sizeof(c), cfg->min_free);
		snprintf(e.message, sizeof(e.message),
			 "'%.40s' needs %s more; the cache's file system has %s free and "
			 "min_free is %s (--allow-partial stores what fits)",
			 name, a, b, c);
	} else {
		return true;
	}
	log_job(LOG_LVL_WARNING, LOG_GRP_STORE, j->id, (unsigned)j->uid, name,
		"job %" PRIu64 " of uid %u refused: %s", j->id, (unsigned)j->uid, e.message);
	fail_job(j, &e);
	return false;
}

/* ---- requests ---- */

static struct job *find_job(struct prefetch *p, uid_t uid, uint32_t source, const char *server,
			    const char *project, const char *version)
{
	for (struct job *j = p->jobs; j; j = j->next)
		if (!j->final && j->uid == uid && j->source == source &&
		    strcmp(j->server, server) == 0 && strcmp(j->project_arg, project) == 0 &&
		    strcmp(j->version_arg, version) == 0)
			return j;
	return NULL;
}

static char *str_copy(struct dmc_str s)
{
	return strndup(s.ptr, s.len);
}

static int subscribe(struct job *j, struct conn *c, uint32_t request_id)
{
	struct sub *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->c = c;
	s->request_id = request_id;
	s->next = j->subs;
	j->subs = s;
	return 0;
}

/* The subscriber of a new or joined job: a connection's request, or a callback. */
struct who {
	struct conn *c;
	uint32_t request_id;
	prefetch_ready_cb cb;
	void *ctx;
	uid_t uid;
	/* LOCAL: the connection and request whose descriptors are read, dataset.json's */
	struct conn *feed;
	uint32_t feed_id;
	int json_fd;
};
static int who_join(struct job *j, const struct who *w);
static void who_error(const struct who *w, uint32_t code, const char *msg);
static uid_t who_uid(const struct who *w);
static bool who_is_open(const struct who *w);

/* A new job joins the engine: its progress timer runs and `w` hears of it. */
static void job_register(struct prefetch *p, struct job *j, const struct who *w)
{
	uv_timer_init(p->d.loop, &j->tick);
	j->tick.data = j;
	j->next = p->jobs;
	if (p->jobs)
		p->jobs->prev = j;
	p->jobs = j;
	p->jobs_started++;
	/* OPEN reads what fits: items that cannot be stored fail one by one */
	if (who_is_open(w))
		j->allow_partial = true;
	if (w->c || w->cb) /* else the check of an OPEN answered from a fresh grant */
		who_join(j, w);
	uv_timer_start(&j->tick, on_tick, TICK_MS, TICK_MS);
}

/* A LOCAL request: a new job (never joined: it reads through this client's descriptors). */
static void on_prefetch_local(struct prefetch *p, const struct who *w,
			      const struct dmc_prefetch *m)
{
	struct job *j;
	char *project = str_copy(m->project), *version = str_copy(m->version);

	if (w->json_fd < 0) {
		free(project);
		free(version);
		who_error(w, DMC_E_INVALID_ARGUMENT,
			  "a local folder is read through descriptors the client opens: the "
			  "request must carry dataset.json's (a newer libdmcache does)");
		return;
	}
	j = calloc(1, sizeof(*j));
	if (!project || !version || !j || !(j->server = strdup("")) ||
	    !(j->lj = calloc(1, sizeof(*j->lj)))) {
		if (j)
			free(j->server);
		free(j);
		free(project);
		free(version);
		close(w->json_fd);
		who_error(w, DMC_E_OVERLOADED, "out of memory: try again");
		return;
	}
	j->lj->json_fd = w->json_fd;
	j->lj->c = w->feed;
	j->lj->request_id = w->feed_id;
	j->pf = p;
	j->id = p->next_job_id++;
	j->uid = who_uid(w);
	j->source = DMC_SOURCE_LOCAL;
	j->allow_partial = m->flags & DMC_PREFETCH_ALLOW_PARTIAL;
	j->decode = m->flags & DMC_PREFETCH_DECODE;
	j->project_arg = project;
	j->version_arg = version;
	j->state = DMC_JOB_RESOLVING;
	job_register(p, j, w);
	log_info(FETCH, "job %" PRIu64 ": uid %u prefetches the folder '%s'", j->id,
		 (unsigned)j->uid, j->project_arg);
	local_scan_prepare(j);
	j->scan_work.data = j;
	if (uv_queue_work(p->d.loop, &j->scan_work, local_scan_work, local_scan_after) != 0) {
		struct dm_error e = { .err = -ENOMEM };
		snprintf(e.message, sizeof(e.message), "cannot start");
		fail_job(j, &e);
		return;
	}
	j->pending++;
}

static int subscribe_cb(struct job *j, prefetch_ready_cb cb, void *ctx)
{
	struct sub *s = calloc(1, sizeof(*s));

	if (!s)
		return -ENOMEM;
	s->cb = cb;
	s->ctx = ctx;
	s->next = j->subs;
	j->subs = s;
	if (j->state == DMC_JOB_DOWNLOADING || j->state == DMC_JOB_DONE)
		notify_ready(j, 0); /* joined after the listing: ready now */
	return 0;
}

static int who_join(struct job *j, const struct who *w)
{
	return w->cb ? subscribe_cb(j, w->cb, w->ctx) : subscribe(j, w->c, w->request_id);
}

/* An OPEN (a callback inside the daemon), not a client's PREFETCH. */
static bool who_is_open(const struct who *w)
{
	return !w->c;
}

static uid_t who_uid(const struct who *w)
{
	return w->uid;
}

static void who_error(const struct who *w, uint32_t code, const char *msg)
{
	if (!w->cb && !w->c)
		return; /* the check of an OPEN already answered: its job logs the failure */
	if (w->cb) {
		struct prefetch_ready r = { .err = -1, .code = code, .message = msg };
		w->cb(w->ctx, &r);
	} else {
		conn_send_error(w->c, w->request_id, code, NULL, "%s", msg);
	}
}

static void start_job(struct prefetch *p, const struct dmc_prefetch *mp, const struct who *w);

static void on_prefetch(struct prefetch *p, struct conn *c, const struct dmc_header *h,
			const uint8_t *payload)
{
	struct dmc_prefetch m;
	struct who w = { c, h->request_id, NULL, NULL, c->uid, c, h->request_id, -1 };

	if (dmc_prefetch_decode(payload, h->length, &m) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed PREFETCH");
		return;
	}
	if (m.source == DMC_SOURCE_LOCAL && h->nfds == 1)
		conn_take_fds(c, &w.json_fd, 1);
	start_job(p, &m, &w);
}

int prefetch_attach(struct prefetch *p, uid_t uid, const struct dmc_prefetch *m,
		    prefetch_ready_cb cb, void *ctx)
{
	struct who w = { NULL, 0, cb, ctx, uid, NULL, 0, -1 };

	if (p->closing)
		return -DMC_E_CANCELLED;
	start_job(p, m, &w);
	return 0;
}

int prefetch_attach_local(struct prefetch *p, struct conn *c, uint32_t request_id,
			  const struct dmc_prefetch *m, prefetch_ready_cb cb, void *ctx)
{
	struct who w = { NULL, 0, cb, ctx, c->uid, c, request_id, -1 };

	if (p->closing)
		return -DMC_E_CANCELLED;
	conn_take_fds(c, &w.json_fd, 1);
	start_job(p, m, &w);
	return 0;
}

void prefetch_detach(struct prefetch *p, void *ctx)
{
	for (struct job *j = p->jobs; j; j = j->next) {
		struct sub **pp = &j->subs;
		while (*pp) {
			if ((*pp)->cb && (*pp)->ctx == ctx) {
				struct sub *s = *pp;
				*pp = s->next;
				free(s);
			} else {
				pp = &(*pp)->next;
			}
		}
	}
}

/* ---- re-fetching an item found bad on read (serve_request.c) ---- */

int prefetch_refetch(struct prefetch *p, uid_t uid, const struct dmc_prefetch *m,
		     int64_t snapshot_id, int64_t idx, prefetch_ready_cb cb, void *ctx)
{
	struct index *ix = p->d.cache->index;
	int rc;

	if (p->closing)
		return -DMC_E_CANCELLED;
	for (struct job *j = p->jobs; j; j = j->next) {
		bool queued;
		if (j->final || j->uid != uid || j->source != DMC_SOURCE_DATAMINT || j->offline ||
		    j->state != DMC_JOB_DOWNLOADING || j->snapshot_id != snapshot_id ||
		    !secret_equals(j->key, m->api_key.ptr, m->api_key.len))
			continue;
		/* this job still brings idx (its walk, or a task): nothing to add. An item
		 * taken ahead of the walk and found bad since is not: the walk skips it. */
		queued = job_fetches(j, idx);
		/* listed: ready at once; the task starts after (it may end the job) */
		if ((rc = subscribe_cb(j, cb, ctx)) < 0 || queued)
			return rc;
		if (index_item_get(ix, snapshot_id, idx, task_from_item, j) == 0 && j->tasks &&
		    j->tasks->starting && j->tasks->idx == idx) {
			j->items_total++;
			task_start(j->tasks); /* task_from_item put it first */
		}
		return 0;
	}
	return prefetch_attach(p, uid, m, cb, ctx);
}

/* Jobs of `uid` still running: a user may not queue work without bound. */
static uint32_t jobs_of(const struct prefetch *p, uid_t uid)
{
	uint32_t n = 0;

	for (const struct job *j = p->jobs; j; j = j->next)
		if (!j->final && j->uid == uid)
			n++;
	return n;
}

static void start_job(struct prefetch *p, const struct dmc_prefetch *mp, const struct who *w)
{
	struct dmc_prefetch m = *mp;
	struct who bg;
	int64_t early_id = 0;
	struct job *j;
	char *server = NULL, *project = NULL, *version = NULL;
	uint32_t world, rank;
	size_t slen;
	int rc;

	if (jobs_of(p, w->uid) >= p->d.cfg->max_jobs_per_uid) {
		char msg[128];
		snprintf(msg, sizeof(msg), "too many prefetch jobs for this user (max_jobs_per_uid "
					   "is %u)", p->d.cfg->max_jobs_per_uid);
		if (w->json_fd >= 0)
			close(w->json_fd); /* LOCAL: dataset.json's descriptor, not kept */
		who_error(w, DMC_E_OVERLOADED, msg);
		return;
	}

	if (m.source == DMC_SOURCE_LOCAL) {
		if (!m.project.len || m.project.ptr[0] != '/' || m.api_key.len || m.server.len ||
		    memchr(m.project.ptr, '\0', m.project.len)) {
			if (w->json_fd >= 0)
				close(w->json_fd);
			who_error(w, DMC_E_INVALID_ARGUMENT,
				  "a local prefetch takes an absolute folder path, no server and no key");
			return;
		}
		on_prefetch_local(p, w, &m);
		return;
	}
	if (m.source != DMC_SOURCE_DATAMINT) {
		who_error(w, DMC_E_INVALID_ARGUMENT, "unknown source");
		return;
	}
	if (!m.project.len || (!m.api_key.len && !(m.flags & DMC_PREFETCH_OFFLINE))) {
		who_error(w, DMC_E_INVALID_ARGUMENT, "a Datamint dataset needs a project and an API key");
		return;
	}
	server = str_copy(m.server);
	project = str_copy(m.project);
	version = str_copy(m.version);
	if (!server || !project || !version)
		goto nomem;
	slen = strlen(server);
	while (slen && server[slen - 1] == '/')
		server[--slen] = '\0';

	j = (m.flags & DMC_PREFETCH_OFFLINE) ? NULL
					      : find_job(p, w->uid, m.source, server, project, version);
	if ((m.flags & DMC_PREFETCH_TO_TIER) && !p->tier) {
		free(server);
		free(project);
		free(version);
		who_error(w, DMC_E_INVALID_ARGUMENT,
			  "--to-tier: this daemon has no cluster tier (tier_url)");
		return;
	}
	/* the shard fields are read with DMC_PREFETCH_SHARD only (other callers leave them) */
	world = (m.flags & DMC_PREFETCH_SHARD) ? m.shard_world : 1;
	rank = (m.flags & DMC_PREFETCH_SHARD) ? m.shard_rank : 0;
	if (j && ((j->shard_world > 1 ? j->shard_world : 1) != world || j->shard_rank != rank ||
		  j->to_tier != !!(m.flags & DMC_PREFETCH_TO_TIER)))
		j = NULL; /* another share or destination: a job of its own */
	if (who_is_open(w) && w->cb && !(m.flags & DMC_PREFETCH_OFFLINE) &&
	    fresh_grant(p, w->uid, server, project, version, m.api_key, &early_id) == 0) {
		/* an online OPEN whose key was accepted within grant_recheck: answered now from
		 * the grant; a job of this uid and key checks with the server (the running one,
		 * or a new one without a subscriber), and a refusal withdraws the grant */
		answer_from_grant(p, early_id, w->cb, w->ctx);
		bg = *w;
		bg.cb = NULL;
		bg.ctx = NULL;
		w = &bg;
		if (j && !j->offline && secret_equals(j->key, m.api_key.ptr, m.api_key.len)) {
			free(server);
			free(project);
			free(version);
			return;
		}
		j = NULL;
	}
	if (j && !j->offline && secret_equals(j->key, m.api_key.ptr, m.api_key.len)) {
		/* the same uid asks again for the same version: join the running job */
		if (m.flags & DMC_PREFETCH_DECODE)
			j->decode = true; /* decoding ahead is asked for by either */
		free(server);
		free(project);
		free(version);
		if (who_join(j, w) < 0)
			who_error(w, DMC_E_OVERLOADED, "out of memory: try again");
		return;
	}
	j = calloc(1, sizeof(*j));
	if (!j)
		goto nomem;
	j->pf = p;
	j->id = p->next_job_id++;
	j->uid = w->uid;
	j->source = m.source;
	j->server = server;
	j->project_arg = project;
	j->version_arg = version;
	server = project = version = NULL;
	j->state = DMC_JOB_RESOLVING;
	j->key = secret_new(m.api_key.ptr, m.api_key.len);
	if (!j->key || fetch_url_origin(j->server, j->origin, sizeof(j->origin)) < 0) {
		bool bad_url = j->key != NULL;
		secret_free(j->key);
		free(j->server);
		free(j->project_arg);
		free(j->version_arg);
		free(j);
		who_error(w, bad_url ? DMC_E_INVALID_ARGUMENT : DMC_E_OVERLOADED,
			  bad_url ? "the server must be an http:// or https:// URL"
				  : "out of memory: try again");
		return;
	}
	j->dmc.fetch = p->d.fetch;
	j->dmc.loop = p->d.loop;
	j->dmc.server = j->server;
	j->dmc.origin = j->origin;
	j->dmc.key = secret_str(j->key);
	j->want_offline = m.flags & DMC_PREFETCH_OFFLINE;
	/* OPEN reads what fits (items that cannot be stored fail one by one) */
	j->allow_partial = m.flags & DMC_PREFETCH_ALLOW_PARTIAL;
	j->decode = m.flags & DMC_PREFETCH_DECODE;
	j->shard_rank = rank;
	j->shard_world = world;
	j->to_tier = m.flags & DMC_PREFETCH_TO_TIER;
	j->started_ms = uv_now(p->d.loop);
	j->dmc.uid = (uint32_t)j->uid;
	j->dmc.group = j->id;
	j->dmc.on_retry = dm_on_retry;
	j->dmc.retry_ctx = j;
	job_register(p, j, w);
	if (j->want_offline) {
		struct dm_error e = { .err = -DMC_E_NOT_FOUND_OR_DENIED };
		int64_t id;
		if (find_grant(j, &id, e.message, sizeof(e.message)) == 0) {
			serve_from_grant(j, id, "served from cache: offline mode");
			return;
		}
		log_notice(FETCH, "job %" PRIu64 ": uid %u, '%s' offline: %s", j->id,
			   (unsigned)j->uid, j->project_arg, e.message);
		fail_job(j, &e);
		return;
	}
	/* a valid grant lets the job answer from the cache if the server is unreachable */
	if (find_grant(j, &j->fallback_id, NULL, 0) < 0 || early_id > 0)
		j->fallback_id = 0; /* the check of an OPEN answered: it waits for the answer */
	log_job(LOG_LVL_NOTICE, LOG_GRP_FETCH, j->id, (unsigned)j->uid, j->project_arg,
		"job %" PRIu64 ": uid %u prefetches '%s' version '%s' from %s", j->id,
		(unsigned)j->uid, j->project_arg, j->version_arg[0] ? j->version_arg : "latest",
		j->origin);
	rc = dm_resolve(&j->dmc, j->project_arg, on_resolved, j);
	if (rc < 0) {
		struct dm_error e = { .err = rc };
		snprintf(e.message, sizeof(e.message), "cannot start: %s", strerror(-rc));
		fail_job(j, &e);
		return;
	}
	j->pending++;
	return;
nomem:
	free(server);
	free(project);
	free(version);
	who_error(w, DMC_E_OVERLOADED, "out of memory: try again");
}

static void on_cancel(struct prefetch *p, struct conn *c, const struct dmc_header *h,
		      const uint8_t *payload)
{
	struct dmc_str project, server;
	uint8_t frame[64];
	uint32_t n = 0;
	int len;

	if (dmc_cancel_decode(payload, h->length, &project, &server) != DMC_PROTO_OK) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "malformed CANCEL");
		return;
	}
	for (struct job *j = p->jobs, *nj; j; j = nj) {
		nj = j->next;
		if (j->final || (j->uid != c->uid && c->uid != 0))
			continue;
		if (server.len && (strlen(j->server) != server.len ||
				   memcmp(j->server, server.ptr, server.len) != 0))
			continue;
		if (!((strlen(j->project_arg) == project.len &&
		       memcmp(j->project_arg, project.ptr, project.len) == 0) ||
		      (j->proj && ((strlen(j->proj->name) == project.len &&
				    memcmp(j->proj->name, project.ptr, project.len) == 0) ||
				   (strlen(j->proj->id) == project.len &&
				    memcmp(j->proj->id, project.ptr, project.len) == 0)))))
			continue;
		job_cancel(j);
		n++;
	}
	len = dmc_cancel_reply_encode(n, h->request_id, frame, sizeof(frame));
	if (len > 0)
		conn_send(c, frame, (size_t)len);
}

bool prefetch_dispatch(struct prefetch *p, struct conn *c, const struct dmc_header *h,
		       const uint8_t *payload)
{
	if (p->closing) {
		switch (h->opcode) {
		case DMC_OP_PREFETCH: case DMC_OP_CANCEL: case DMC_OP_LIST: case DMC_OP_EVICT:
		case DMC_OP_VERIFY: case DMC_OP_TIER:
			conn_send_error(c, h->request_id, DMC_E_CANCELLED, NULL, "daemon stopping");
			return true;
		}
		return false;
	}
	switch (h->opcode) {
	case DMC_OP_PREFETCH:
		on_prefetch(p, c, h, payload);
		return true;
	case DMC_OP_CANCEL:
		on_cancel(p, c, h, payload);
		return true;
	case DMC_OP_LIST:
		on_list(p, c, h, payload);
		return true;
	case DMC_OP_EVICT:
		on_evict(p, c, h, payload);
		return true;
	case DMC_OP_VERIFY:
		on_verify(p, c, h, payload);
		return true;
	case DMC_OP_LOCAL_FILES:
		on_local_files(p, c, h, payload);
		return true;
	case DMC_OP_TIER:
		tier_admin_request(p->tier, p->d.cfg, c, h, payload);
		return true;
	}
	return false;
}

void prefetch_conn_closed(struct prefetch *p, struct conn *c)
{
	/* first its subscriptions: a job it alone fed (local_conn_closed()) ends unheard */
	for (struct job *j = p->jobs; j; j = j->next) {
		struct sub **pp = &j->subs;
		while (*pp) {
			if ((*pp)->c == c) {
				struct sub *s = *pp;
				*pp = s->next;
				free(s);
			} else {
				pp = &(*pp)->next;
			}
		}
	}
	local_conn_closed(p, c);
	tier_admin_conn_closed(c);
	for (struct verify_req *v = verifies; v; v = v->next)
		if (v->c == c)
			v->c = NULL;
}

#define ENTRY(s, v) ((struct dmc_status_entry){ { s, sizeof(s) - 1 }, (int64_t)(v) })

struct user_figures {
	struct prefetch *p;
	uid_t uid;
	uint64_t snapshots, items, items_stored, bytes_stored;
};

static int user_figures_add(void *ctx, const struct index_snapshot *s)
{
	struct user_figures *u = ctx;
	struct index_snapshot_stats st;

	if (!may_see_uid(u->p, u->uid, s->id) || u->uid == 0 || u->uid == geteuid())
		return 0;
	if (index_snapshot_stats(u->p->d.cache->index, s->id, &st) == 0) {
		u->snapshots++;
		u->items += (uint64_t)st.items;
		u->items_stored += (uint64_t)st.items_stored;
		u->bytes_stored += (uint64_t)st.bytes_stored;
	}
	return 0;
}

/* STATUS for a user who is not an admin: their own figures, nothing about others. */
static uint32_t user_status(struct prefetch *p, const struct conn *c, struct dmc_status_entry *e,
			    uint32_t max)
{
	struct user_figures u = { p, c->uid, 0, 0, 0, 0 };
	uint64_t jobs = 0, rate = 0;

	index_snapshot_list(p->d.cache->index, user_figures_add, &u);
	for (struct job *j = p->jobs; j; j = j->next) {
		if (!j->final && j->uid == c->uid) {
			jobs++;
			rate += j->rate;
		}
	}
	struct dmc_status_entry mine[] = {
		ENTRY("user_snapshots", u.snapshots),
		ENTRY("user_items", u.items),
		ENTRY("user_items_stored", u.items_stored),
		ENTRY("user_bytes_stored", u.bytes_stored),
		ENTRY("prefetch_jobs", jobs),
		ENTRY("download_rate_bps", rate),
	};
	uint32_t n = sizeof(mine) / sizeof(mine[0]);

	if (n > max)
		n = max;
	memcpy(e, mine, n * sizeof(*e));
	return n;
}

uint32_t prefetch_status(struct prefetch *p, const struct conn *c, struct dmc_status_entry *e,
			 uint32_t max)
{
	struct store_stats ss;
	struct fetch_stats fs;
	struct tier_stats ts = { 0 };
	uint64_t jobs = 0, rate = 0;

	if (p->tier)
		tier_get_stats(p->tier, &ts);
	if (!c->admin)
		return user_status(p, c, e, max);
	store_get_stats(p->d.cache->store, &ss);
	fetch_get_stats(p->d.fetch, &fs);
	for (struct job *j = p->jobs; j; j = j->next) {
		if (!j->final) {
			jobs++;
			rate += j->rate;
		}
	}
	struct dmc_status_entry all[] = {
		ENTRY("cache_bytes", ss.used_bytes),
		ENTRY("cache_objects", ss.objects),
		/* directories a start after a crash left to its background check: until 0 the two
		 * above count only what changed in them since the start */
		ENTRY("cache_unchecked_dirs", ss.unsettled_dirs),
		ENTRY("cache_max_bytes", p->d.cfg->max_size),
		ENTRY("cache_reads_total", ss.reads),
		ENTRY("cache_read_bytes_total", ss.bytes_read),
		ENTRY("cache_dedup_hits_total", ss.dedup_hits),
		ENTRY("cache_integrity_failures_total", ss.integrity_failures),
		ENTRY("cache_full_total", ss.cache_full),
		ENTRY("cache_evicted_total", ss.removed),
		ENTRY("store_start_dirs_walked", p->d.cache->start_dirs_walked),
		ENTRY("store_start_index_checked", p->d.cache->start_index_checked ? 1 : 0),
		ENTRY("prefetch_jobs", jobs),
		ENTRY("prefetch_jobs_total", p->jobs_started),
		ENTRY("prefetch_opens_from_grant_total", p->opens_from_grant),
		ENTRY("prefetch_grants_withdrawn_total", p->grants_withdrawn),
		ENTRY("prefetch_local_listings_kept_total", p->local_listings_kept),
		ENTRY("prefetch_local_parses_skipped_total", p->local_parses_skipped),
		ENTRY("prefetch_local_parses_loaded_total", p->local_seen_loaded),
		ENTRY("prefetch_local_items_forgotten_total", p->local_forgotten),
		ENTRY("prefetch_local_items_ahead_total", p->local_ahead),
		ENTRY("prefetch_local_tables_written_total", p->local_tables_written),
		ENTRY("prefetch_local_tables_mapped_total", p->local_tables_mapped),
		ENTRY("prefetch_local_tables_refused_total", p->local_tables_refused),
		ENTRY("prefetch_items_downloaded_total", p->items_downloaded),
		ENTRY("prefetch_items_revalidated_total", p->items_revalidated),
		ENTRY("prefetch_items_shared_total", p->items_shared),
		ENTRY("prefetch_items_failed_total", p->items_failed),
		ENTRY("download_bytes_total", fs.bytes),
		ENTRY("download_rate_bps", rate),
		ENTRY("transfers_running", fs.running),
		ENTRY("transfers_queued", fs.queued),
		ENTRY("transfer_retries_total", fs.retries),
		ENTRY("transfer_resumes_total", fs.resumed),
		ENTRY("transfers_failed_total", fs.transfers_failed),
		ENTRY("tier_hits_total", ts.hits),
		ENTRY("tier_misses_total", ts.misses),
		ENTRY("tier_errors_total", ts.errors),
		ENTRY("tier_corrupt_total", ts.corrupt),
		ENTRY("tier_bytes_total", ts.bytes),
		ENTRY("tier_uploads_total", ts.uploads),
		ENTRY("tier_uploads_skipped_total", ts.uploads_skipped),
		ENTRY("tier_uploads_failed_total", ts.uploads_failed),
		ENTRY("tier_uploads_pending", ts.uploads_pending),
		ENTRY("tier_maps_written_total", ts.maps_written),
		ENTRY("tier_full", ts.full),
	};
	uint32_t n = sizeof(all) / sizeof(all[0]);

	if (n > max)
		n = max;
	memcpy(e, all, n * sizeof(*e));
	return n;
}
