/*
 * prefetch's downloads: a task per item a job lacks, its transfer (fetch.h) streaming into
 * a store writer through a sink that gathers SINK_BUF bytes and writes them on the
 * threadpool; verified, committed, then counted. A resource two jobs want downloads once
 * (the other follows), an earlier version's item is revalidated with If-None-Match.
 * job_pump() keeps a job's window of tasks full.
 * Loop thread; sink_work() runs on the threadpool and touches only its task's writer.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "conf.h"
#include "conn.h"
#include "datamint.h"
#include "fetch.h"
#include "index.h"
#include "log.h"
#include "prefetch_priv.h"
#include "secret.h"
#include "store.h"
#include "tier.h"

#define SCAN_PAGE 64u
/*
 * Downloads are stored with zstd only when it shrinks them to 2/3 or less (sparse masks,
 * CT slices with air around the body), not for a few percent: on noisy 16-bit data zstd-1
 * gains ~1.3x for ~1.8 CPU s/GiB, as much CPU as receiving the bytes, and every later read
 * would pay the decompression too (tests/bench/README.md, prefetch).
 */
#define DOWNLOAD_ZSTD_KEEP_PCT 67u

static void follow_other_user(struct task *f, const uint8_t digest[STORE_DIGEST_SIZE],
			      const char *etag);

/* ---- downloads: a sink that writes through the threadpool ---- */

static int sink_on_start(struct fetch_xfer *x, const struct fetch_response *r);
static int sink_on_data(struct fetch_xfer *x, const void *buf, size_t len);
static void sink_on_done(struct fetch_xfer *x, const struct fetch_result *res);

/* A request will be retried: an event with code 0 and the message (proto.h) says so. */
static void job_on_retry(struct job *j, const char *resource, const char *message)
{
	struct dmc_progress m;

	if (j->final)
		return;
	job_progress(j, &m);
	m.error_resource = dstr(resource);
	m.error_message = dstr(message);
	send_progress(j, &m, true);
}

void dm_on_retry(void *ctx, const char *message)
{
	job_on_retry(ctx, NULL, message);
}

static void sink_on_retry(struct fetch_xfer *x, const struct fetch_retry *r)
{
	struct task *t = fetch_xfer_data(x);

	job_on_retry(t->job, t->resource_id, r->message);
}

static const struct fetch_ops sink_ops = {
	.on_start = sink_on_start,
	.on_data = sink_on_data,
	.on_done = sink_on_done,
	.on_retry = sink_on_retry,
};

static void sink_work(uv_work_t *w)
{
	struct task *t = w->data;
	struct store *store = t->job->pf->d.cache->store;
	int rc = 0;

	/* t->wr, t->wbuf and the w_* fields belong to this thread while t->work_busy */
	if (t->w_restart || t->w_abort) {
		store_writer_abort(t->wr);
		t->wr = NULL;
	}
	if (t->w_abort) {
		t->work_err = 0;
		return;
	}
	if (!t->wr && t->import) {
		/* a blob file from the cluster tier: copied as it is, checked at commit */
		rc = store_import_open(store, &t->wr);
	} else if (!t->wr) {
		rc = store_writer_open(store, t->kind, STORE_SIZE_UNKNOWN, &t->wr);
		if (rc == 0)
			rc = store_writer_set_zstd_keep(t->wr, DOWNLOAD_ZSTD_KEEP_PCT);
	}
	if (rc == 0 && t->wlen)
		rc = store_writer_write(t->wr, t->wbuf, t->wlen);
	t->wlen = 0;
	if (t->w_commit) {
		if (rc == 0)
			rc = store_writer_commit(t->wr, t->w_has_expected ? t->w_expected : NULL,
						 &t->info);
		else
			store_writer_abort(t->wr);
		t->wr = NULL;
	}
	t->work_err = rc;
}

static void sink_after(uv_work_t *w, int status);
static void start_upstream(struct task *t);

static int queue_sink_work(struct task *t)
{
	int rc;

	t->work.data = t;
	t->work_busy = true;
	rc = uv_queue_work(t->job->pf->d.loop, &t->work, sink_work, sink_after);
	if (rc < 0)
		t->work_busy = false;
	return rc;
}

/* Hands the filled buffer to the threadpool and takes the other one. */
static int flush_start(struct task *t, bool commit)
{
	uint8_t *b = t->wbuf;

	t->wbuf = t->buf;
	t->wlen = t->len;
	t->buf = b;
	t->len = 0;
	t->w_restart = t->restart;
	t->restart = false;
	t->w_commit = commit;
	t->w_abort = false;
	t->w_has_expected = t->has_expected;
	memcpy(t->w_expected, t->expected, STORE_DIGEST_SIZE);
	t->work_err = 0;
	t->writer_open = true;
	return queue_sink_work(t);
}

/* Drops the blob being written, on the threadpool; sink_after continues the task. */
static int abort_start(struct task *t)
{
	t->w_abort = true;
	t->w_commit = false;
	t->w_restart = false;
	t->restart = false;
	t->wlen = 0;
	t->writer_open = false;
	return queue_sink_work(t);
}

static int sink_on_start(struct fetch_xfer *x, const struct fetch_response *r)
{
	struct task *t = fetch_xfer_data(x);
	struct cache *cache = t->job->pf->d.cache;
	uint64_t size;
	int rc;

	if (t->job->cancelled)
		return -DMC_E_CANCELLED;
	if (r->offset == 0) {
		/* a whole body: whatever an earlier attempt delivered is dropped */
		t->len = 0;
		t->restart = t->writer_open;
	}
	if (!t->reserved) {
		size = r->total_size != FETCH_SIZE_UNKNOWN ? r->total_size
			: t->size > 0 ? (uint64_t)t->size : 0;
		rc = cache_reserve(cache, size);
		if (rc < 0)
			return rc;
		t->reserved = size ? size : 1;
		if (!size)
			store_release(cache->store, 0);
	}
	if (t->import)
		return 0; /* expected: the blob's name; etag: the mapping's */
	t->has_expected = r->has_sha256;
	if (r->has_sha256)
		memcpy(t->expected, r->sha256, STORE_DIGEST_SIZE);
	snprintf(t->etag, sizeof(t->etag), "%s", r->etag);
	return 0;
}

static int sink_on_data(struct fetch_xfer *x, const void *buf, size_t len)
{
	struct task *t = fetch_xfer_data(x);
	struct job *j = t->job;

	if (j->cancelled)
		return -DMC_E_CANCELLED;
	if (t->work_err < 0)
		return t->work_err;
	if (t->len + len > SINK_BUF) {
		if (t->work_busy) {
			t->paused = true;
			return FETCH_PAUSE;
		}
		if (flush_start(t, false) < 0)
			return -ENOMEM;
	}
	if (len > SINK_BUF - t->len) {
		/* a chunk larger than the buffer: never from curl with our buffer size */
		return -DMC_E_INTERNAL;
	}
	memcpy(t->buf + t->len, buf, len);
	t->len += len;
	if (!t->import) {
		/* a tier blob counts its item's size once it is stored (commit_done) */
		j->bytes_done += len;
		j->pf->bytes_downloaded += len;
	}
	return 0;
}

static void download_done(struct task *t);

static void sink_on_done(struct fetch_xfer *x, const struct fetch_result *res)
{
	struct task *t = fetch_xfer_data(x);

	t->res = *res;
	if (t->work_busy) {
		t->done_pending = true;
		return;
	}
	download_done(t);
}

void release_reservation(struct task *t)
{
	if (t->reserved) {
		store_release(t->job->pf->d.cache->store, t->reserved == 1 ? 0 : t->reserved);
		t->reserved = 0;
	}
}

static void commit_done(struct task *t);
static void upload_to_tier(struct task *t);
static void to_tier_done(struct task *t);

static void sink_after(uv_work_t *w, int status)
{
	struct task *t = w->data;

	(void)status;
	t->work_busy = false;
	if (t->w_commit) {
		t->w_commit = false;
		t->writer_open = false;
		commit_done(t);
		return;
	}
	if (t->w_abort) {
		/* the failed transfer's blob is gone: the task can end */
		t->w_abort = false;
		if (t->tier_fallback) {
			t->tier_fallback = false;
			start_upstream(t);
			return;
		}
		task_next_step(t);
		return;
	}
	if (t->done_pending) {
		t->done_pending = false;
		download_done(t);
		return;
	}
	if (t->paused) {
		t->paused = false;
		fetch_xfer_resume(t->x); /* may call sink_on_data right away */
	}
}

static void downloads_remove(struct task *t)
{
	struct prefetch *p = t->job->pf;

	if (!t->dprev && p->downloads != t)
		return;
	if (t->dprev)
		t->dprev->dnext = t->dnext;
	else
		p->downloads = t->dnext;
	if (t->dnext)
		t->dnext->dprev = t->dprev;
	t->dnext = t->dprev = NULL;
}

static void followers_take(struct task *t, int err);

static void download_done(struct task *t)
{
	struct fetch_result *res = &t->res;

	fetch_xfer_free(t->x);
	t->x = NULL;
	if (res->err == 0 && res->http_status == 304 && t->has_prior && t->phase == TP_FILE) {
		/* the earlier version is this one: revalidated with this user's key */
		memcpy(t->info.digest, t->prior, STORE_DIGEST_SIZE);
		t->job->pf->items_revalidated++;
		release_reservation(t);
		t->work_err = 0;
		t->res.err = 0;
		t->has_prior = false;
		/* as if committed */
		memcpy(t->file_digest, t->prior, STORE_DIGEST_SIZE);
		t->phase = TP_MASKS;
		followers_take(t, 0);
		task_next_step(t);
		return;
	}
	if (res->err == 0) {
		if (flush_start(t, true) < 0)
			task_finish(t, -ENOMEM, "out of memory", 0);
		return;
	}
	/* failed: drop the partial blob first */
	release_reservation(t);
	if (t->import) {
		/* the tier could not give the blob: Datamint instead */
		if (tier_result(t->job->pf->tier, res, "reading a blob") == -ENOENT)
			tier_count_miss(t->job->pf->tier);
		t->import = false;
		if (t->job->cancelled) {
			/* ends as any cancelled transfer does */
		} else if (t->writer_open) {
			t->tier_fallback = true;
			if (abort_start(t) == 0)
				return;
			t->tier_fallback = false;
		} else {
			start_upstream(t);
			return;
		}
	}
	if (t->writer_open && abort_start(t) == 0)
		return; /* sink_after -> task_next_step -> task_finish */
	task_next_step(t);
}

static void start_transfer(struct task *t, const char *url, const char *if_none_match);

static void commit_done(struct task *t)
{
	struct prefetch *p = t->job->pf;
	struct cache *cache = p->d.cache;
	int err = t->work_err;

	release_reservation(t);
	if (t->import) {
		t->import = false;
		if (err < 0) {
			/* not trusted: the item comes from Datamint */
			if (err == -DMC_E_INTEGRITY)
				tier_count_corrupt(p->tier, t->expected);
			else
				log_info(FETCH, "'%s': the tier's blob was not stored (%s); Datamint "
					 "instead", t->resource_id,
					 dmc_err_text(err));
			start_upstream(t);
			return;
		}
		tier_count_hit(p->tier, t->info.file_size);
		t->job->bytes_done += t->size > 0 ? (uint64_t)t->size : t->info.raw_size;
		t->from_upstream = false;
	} else if (t->phase == TP_FILE) {
		t->from_upstream = err == 0;
	}
	if (err == -DMC_E_INTEGRITY && ++t->integrity_tries < p->d.cfg->max_attempts) {
		/* the body does not match the server's digest: fetch it again */
		char *url = t->phase == TP_FILE ? dm_file_url(&t->job->dmc, t->resource_id)
						: strdup(t->masks[t->mask_i].url);
		log_warn(FETCH, "'%s': body does not match its SHA-256; fetching it again",
			 t->resource_id);
		if (url) {
			start_transfer(t, url, NULL);
			free(url);
			return;
		}
	}
	if (err < 0) {
		char full[160];
		t->res.err = err;
		snprintf(t->res.message, sizeof(t->res.message), "%s",
			 err == -DMC_E_INTEGRITY ? "the body does not match the server's SHA-256"
			 : err == -DMC_E_CACHE_FULL ? cache_full_text(p, full, sizeof(full))
			 : dmc_err_text(err));
		task_next_step(t);
		return;
	}
	if (t->job->to_tier && t->phase == TP_FILE && t->from_upstream) {
		/* a blob this cache did not hold goes once it is uploaded; one it held stays */
		struct index_blob ib;
		t->drop_after = index_blob_get(cache->index, t->info.digest, &ib) == -ENOENT;
		if (!t->drop_after)
			cache_record_blob(cache, &t->info);
		store_unpin(cache->store, t->info.digest);
		p->items_downloaded++;
		upload_to_tier(t);
		to_tier_done(t);
		return;
	}
	cache_record_blob(cache, &t->info);
	store_unpin(cache->store, t->info.digest);
	t->res.err = 0;
	if (t->phase == TP_FILE) {
		memcpy(t->file_digest, t->info.digest, STORE_DIGEST_SIZE);
		snprintf(t->file_etag, sizeof(t->file_etag), "%s", t->etag);
		if (t->from_upstream) {
			p->items_downloaded++;
			upload_to_tier(t);
		}
		t->phase = TP_MASKS;
		followers_take(t, 0);
	} else {
		memcpy(t->mask_digests[t->mask_i], t->info.digest, STORE_DIGEST_SIZE);
		t->mask_i++;
	}
	task_next_step(t);
}

/* After a verified download from Datamint: the blob and its mapping go to the tier. */
static void upload_to_tier(struct task *t)
{
	struct job *j = t->job;
	struct tier_map m = { .size = t->size };

	if (!j->pf->tier || !j->proj || !j->proj->version ||
	    strlen(j->proj->version) >= sizeof(m.version))
		return;
	snprintf(m.version, sizeof(m.version), "%s", j->proj->version);
	snprintf(m.etag, sizeof(m.etag), "%s", t->etag);
	tier_upload(j->pf->tier, t->info.digest, j->origin, t->resource_id, &m, t->drop_after);
}

/* --to-tier: the item is in the tier now (or is going up); it is not recorded here. */
static void to_tier_done(struct task *t)
{
	t->job->items_done++;
	t->phase = TP_MASKS;
	followers_take(t, -DMC_E_NOT_FOUND_OR_DENIED); /* followers fetch on their own */
	task_finish(t, 0, NULL, 0);
}

static void start_transfer(struct task *t, const char *url, const char *if_none_match)
{
	struct job *j = t->job;
	int rc;

	t->import = false;
	t->len = t->wlen = 0;
	t->res.err = 0;
	t->work_err = 0;
	t->restart = false;
	t->has_expected = false;
	t->x = fetch_xfer_new(j->pf->d.fetch, url, j->origin, secret_str(j->key), &sink_ops, t);
	if (!t->x) {
		task_finish(t, -ENOMEM, "out of memory", 0);
		return;
	}
	if (if_none_match)
		fetch_xfer_if_none_match(t->x, if_none_match);
	fetch_xfer_set_group(t->x, j->id);
	fetch_xfer_set_owner(t->x, (uint32_t)j->uid);
	rc = fetch_xfer_start(t->x);
	if (rc < 0) {
		fetch_xfer_free(t->x);
		t->x = NULL;
		task_finish(t, rc, "cannot start the download", 0);
	}
}

/* What comes after a step of the task: the next mask, the item's record, or the end. */
void task_next_step(struct task *t)
{
	struct job *j = t->job;
	struct index *ix = j->pf->d.cache->index;
	char *meta = NULL;
	size_t meta_len = 0;
	int rc;

	if (t->res.err) {
		/* an HTTP status belongs to upstream errors only, not to a local failure after a
		 * 200 (cache full, I/O) */
		int e = t->res.err;
		bool up = !(e == -DMC_E_CACHE_FULL || e == -DMC_E_IO || e == -DMC_E_INTEGRITY ||
			    (e < 0 && e > -DMC_E_FIRST_));
		char full[160];
		if (t->res.err == -DMC_E_CACHE_FULL)
			cache_full_text(j->pf, full, sizeof(full));
		task_finish(t, t->res.err,
			    t->res.err == -DMC_E_CACHE_FULL ? full : t->res.message,
			    up ? t->res.http_status : 0);
		return;
	}
	if (j->cancelled) {
		task_finish(t, -DMC_E_CANCELLED, "cancelled", 0);
		return;
	}
	if (t->phase == TP_MASKS && t->mask_i < t->n_masks) {
		t->kind = STORE_KIND_RAW;
		start_transfer(t, t->masks[t->mask_i].url, NULL);
		return;
	}
	if (t->n_masks) {
		rc = dm_meta_with_masks(t->meta, t->meta_len, t->masks, t->mask_digests, t->n_masks,
					&meta, &meta_len);
		if (rc < 0) {
			task_finish(t, rc, "cannot record the masks", 0);
			return;
		}
		/* a local item proved again: its masks' rows are put again, not added to */
		if (j->lj)
			rc = index_item_drop_blobs(ix, j->snapshot_id, t->idx);
		for (uint32_t i = 0; i < t->n_masks && rc == 0; i++)
			rc = index_item_add_blob(ix, j->snapshot_id, t->idx, t->mask_digests[i]);
	}
	rc = index_item_set_content(ix, j->snapshot_id, t->idx, t->file_digest,
				    t->file_etag[0] ? t->file_etag : NULL, meta, meta_len);
	free(meta);
	if (rc < 0) {
		task_finish(t, rc, "cannot record the item", 0);
		return;
	}
	j->items_done++;
	if (j->lj)
		local_proved(j, t->idx);
	if (j->pf->item_hook)
		j->pf->item_hook(j->pf->item_hook_ctx, j->snapshot_id, t->idx, j->uid, 0, NULL);
	task_finish(t, 0, NULL, 0);
}

/* The task's file from Datamint, unconditionally, with its job's key. */
static void start_file(struct task *t)
{
	char *url = dm_file_url(&t->job->dmc, t->resource_id);

	if (!url) {
		task_finish(t, -ENOMEM, "out of memory", 0);
		return;
	}
	t->kind = STORE_KIND_RAW;
	start_transfer(t, url, NULL);
	free(url);
}

/* The leader's file is in the store (err 0) or could not be had: its followers go on. */
static void followers_take(struct task *t, int err)
{
	while (t->followers) {
		struct task *f = t->followers;
		t->followers = f->fnext;
		f->fnext = NULL;
		f->leader = NULL;
		if (err) {
			start_file(f); /* try on its own, with its own key */
			continue;
		}
		if (f->job->uid != t->job->uid) {
			follow_other_user(f, t->file_digest, t->file_etag);
			continue;
		}
		memcpy(f->file_digest, t->file_digest, STORE_DIGEST_SIZE);
		snprintf(f->file_etag, sizeof(f->file_etag), "%s", t->file_etag);
		f->phase = TP_MASKS;
		f->job->pf->items_shared++;
		task_next_step(f);
	}
}

static void task_free(struct task *t)
{
	free(t->resource_id);
	free(t->meta);
	for (uint32_t i = 0; i < t->n_masks; i++) {
		free(t->masks[i].annotation_id);
		free(t->masks[i].url);
	}
	free(t->masks);
	free(t->mask_digests);
	free(t->minfo);
	free(t->buf);
	free(t->wbuf);
	free(t);
}

void task_finish(struct task *t, int err, const char *msg, long http_status)
{
	struct job *j = t->job;
	struct prefetch *p = j->pf;

	downloads_remove(t);
	if (t->leader) {
		/* a follower whose job ends first: leave the leader */
		struct task **pp = &t->leader->followers;
		while (*pp && *pp != t)
			pp = &(*pp)->fnext;
		if (*pp)
			*pp = t->fnext;
		t->leader = NULL;
	}
	if (t->phase == TP_FILE)
		followers_take(t, err ? err : -DMC_E_INTERNAL);
	release_reservation(t);
	if (t->prev)
		t->prev->next = t->next;
	else
		j->tasks = t->next;
	if (t->next)
		t->next->prev = t->prev;
	j->running--;
	/* a cancelled task is no failure of its item: the job's end was told already, and
	 * another job may be bringing the item (a failure told now would stick) */
	if (j->lj && err != -DMC_E_CANCELLED) {
		/* a local item tried: proved (task_next_step()), or its row forgets its content */
		j->lj->tried++;
		if (err)
			local_failed(j, t->idx);
	}
	if (err && err != -DMC_E_CANCELLED && p->item_hook && j->snapshot_id > 0)
		p->item_hook(p->item_hook_ctx, j->snapshot_id, t->idx, j->uid, err, msg);
	if (err && err != -DMC_E_CANCELLED) {
		struct dmc_progress m;
		j->items_failed++;
		p->items_failed++;
		record_error(j, err, http_status, t->res.retry_after_ms, t->resource_id,
			     msg ? msg : "failed");
		if (!j->final) {
			job_progress(j, &m);
			m.error_code = err <= -DMC_E_FIRST_ && err >= -DMC_E_LAST_ ? (uint32_t)-err
				       : DMC_E_IO;
			m.http_status = (uint32_t)(http_status > 0 ? http_status : 0);
			m.error_resource = dstr(t->resource_id);
			m.error_message = dstr(msg ? msg : "failed");
			send_progress(j, &m, true);
		}
		log_info(FETCH, "job %" PRIu64 ": resource '%s' failed: %s", j->id, t->resource_id,
			 msg ? msg : "failed");
		if (err == -DMC_E_CACHE_FULL && !j->warned_full) {
			j->warned_full = true;
			log_job(LOG_LVL_WARNING, LOG_GRP_STORE, j->id, (unsigned)j->uid,
				j->proj ? j->proj->name : j->project_arg,
				"job %" PRIu64 ": %s (items that do not fit fail)", j->id,
				msg ? msg : "cache full");
		}
	}
	task_free(t);
	if (!j->final)
		job_pump(j);
	job_maybe_free(j);
}

/*
 * A download of the same resource in flight for another job of the same server: of the
 * same uid, or of any uid at a configured server (the follower then revalidates what the
 * leader stored with its own key, see follow_other_user()).
 */
static struct task *find_download(struct prefetch *p, const struct job *j, const char *rid,
				  int64_t size)
{
	for (struct task *t = p->downloads; t; t = t->dnext)
		if (t->size == size && strcmp(t->resource_id, rid) == 0 &&
		    strcmp(t->job->server, j->server) == 0 &&
		    (t->job->uid == j->uid || (shares_across_users(j) &&
					       shares_across_users(t->job))))
			return t;
	return NULL;
}

/*
 * `f` may have what another user's task stored (`digest`, downloaded with `etag`) only on
 * its own proof: a conditional request with f's own key, answered 304 by the server.
 */
static void follow_other_user(struct task *f, const uint8_t digest[STORE_DIGEST_SIZE],
			      const char *etag)
{
	char *url = dm_file_url(&f->job->dmc, f->resource_id);

	if (!url) {
		task_finish(f, -ENOMEM, "out of memory", 0);
		return;
	}
	f->kind = STORE_KIND_RAW;
	f->phase = TP_FILE;
	f->has_prior = etag && etag[0];
	if (f->has_prior)
		memcpy(f->prior, digest, STORE_DIGEST_SIZE);
	start_transfer(f, url, f->has_prior ? etag : NULL);
	free(url);
}

/* Copies an item of the snapshot into a new task; started after the page is read. */
int task_from_item(void *ctx, const struct index_item *it)
{
	struct job *j = ctx;
	struct task *t;

	if (j->shard_world > 1 && (uint64_t)it->idx % j->shard_world != j->shard_rank)
		return 0; /* another node's share (--shard) */
	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->job = j;
	t->idx = it->idx;
	t->size = it->size;
	t->kind = STORE_KIND_RAW;
	t->resource_id = strdup(it->resource_id);
	t->meta = it->meta ? strndup(it->meta, it->meta_len) : strdup("{}");
	t->meta_len = it->meta ? it->meta_len : 2;
	if (!t->resource_id || !t->meta) {
		task_free(t);
		return -ENOMEM;
	}
	t->next = j->tasks;
	if (j->tasks)
		j->tasks->prev = t;
	j->tasks = t;
	j->running++;
	t->starting = true;
	return 0;
}

/* The file from Datamint (after the tier could not give it). */
static void start_upstream(struct task *t)
{
	if (t->job->cancelled) {
		task_finish(t, -DMC_E_CANCELLED, "cancelled", 0);
		return;
	}
	start_file(t);
}

/* The tier's mapping of the task's resource: its blob when it is of this version. */
static void on_tier_map(void *ctx, int err, const struct tier_map *m)
{
	struct task *t = ctx;
	struct job *j = t->job;
	int rc;

	t->treq = NULL;
	if (j->cancelled || err == -DMC_E_CANCELLED) {
		task_finish(t, -DMC_E_CANCELLED, "cancelled", 0);
		return;
	}
	if (err < 0 || strcmp(m->version, j->proj->version) != 0 || m->size != t->size) {
		if (err == 0)
			tier_count_miss(j->pf->tier); /* a mapping of another version */
		start_upstream(t);
		return;
	}
	if (j->to_tier) {
		/* the tier has it: nothing to fetch */
		to_tier_done(t);
		return;
	}
	t->len = t->wlen = 0;
	t->res.err = 0;
	t->work_err = 0;
	t->restart = false;
	t->import = true;
	t->has_expected = true;
	memcpy(t->expected, m->digest, STORE_DIGEST_SIZE);
	snprintf(t->etag, sizeof(t->etag), "%s", m->etag);
	t->x = tier_blob_xfer(j->pf->tier, m->digest, &sink_ops, t);
	if (!t->x) {
		t->import = false;
		start_upstream(t);
		return;
	}
	fetch_xfer_set_group(t->x, j->id);
	fetch_xfer_set_owner(t->x, (uint32_t)j->uid);
	rc = fetch_xfer_start(t->x);
	if (rc < 0) {
		fetch_xfer_free(t->x);
		t->x = NULL;
		t->import = false;
		start_upstream(t);
	}
}

void task_start(struct task *t)
{
	struct job *j = t->job;
	struct prefetch *p = j->pf;
	struct task *leader;
	char prior_etag[FETCH_ETAG_MAX];
	char *url;

	t->starting = false;
	if (j->offline) {
		task_finish(t, -DMC_E_NOT_FOUND_OR_DENIED,
			    "not in the cache (read offline: nothing is downloaded)", 0);
		return;
	}
	t->buf = malloc(SINK_BUF);
	t->wbuf = malloc(SINK_BUF);
	if (!t->buf || !t->wbuf ||
	    dm_masks_of(&j->dmc, t->resource_id, t->meta, t->meta_len, &t->masks, &t->n_masks) < 0 ||
	    (t->n_masks && !(t->mask_digests = calloc(t->n_masks, STORE_DIGEST_SIZE)))) {
		task_finish(t, -ENOMEM, "out of memory", 0);
		return;
	}
	leader = find_download(p, j, t->resource_id, t->size);
	if (leader && leader->phase != TP_FILE && leader->job->uid != j->uid) {
		t->dnext = p->downloads;
		if (p->downloads)
			p->downloads->dprev = t;
		p->downloads = t;
		follow_other_user(t, leader->file_digest, leader->file_etag);
		return;
	}
	if (leader && leader->phase != TP_FILE) {
		/* another job of this uid has this file already and is busy with its masks */
		memcpy(t->file_digest, leader->file_digest, STORE_DIGEST_SIZE);
		snprintf(t->file_etag, sizeof(t->file_etag), "%s", leader->file_etag);
		t->phase = TP_MASKS;
		p->items_shared++;
		task_next_step(t);
		return;
	}
	if (leader) {
		/* another job downloads this very resource now: wait for it */
		t->leader = leader;
		t->fnext = leader->followers;
		leader->followers = t;
		return;
	}
	t->dnext = p->downloads;
	if (p->downloads)
		p->downloads->dprev = t;
	p->downloads = t;
	t->has_prior = index_item_find_prior(p->d.cache->index, t->resource_id, t->size,
					     j->server,
					     shares_across_users(j) ? -1 : (int64_t)j->uid,
					     prior_etag, sizeof(prior_etag), t->prior) == 0;
	if ((!t->has_prior || j->to_tier) && p->tier && j->proj && j->proj->version) {
		/* node store -> cluster tier -> Datamint: the listing above proved j's
		 * entitlement to this resource with j's own key */
		t->treq = tier_map_get(p->tier, j->origin, t->resource_id, (uint32_t)j->uid, j->id,
				       on_tier_map, t);
		if (t->treq)
			return;
	}
	url = dm_file_url(&j->dmc, t->resource_id);
	if (!url) {
		task_finish(t, -ENOMEM, "out of memory", 0);
		return;
	}
	start_transfer(t, url, t->has_prior ? prior_etag : NULL);
	free(url);
}

/* ---- items wanted ahead of the walk ---- */

bool taken_test(const struct job *j, int64_t idx)
{
	size_t byte = (size_t)idx / 8;

	return byte < j->taken_len && (j->taken[byte] & (1u << (idx % 8)));
}

int taken_set(struct job *j, int64_t idx)
{
	size_t byte = (size_t)idx / 8;

	if (byte >= j->taken_len) {
		/* grown in steps of 1/8 more, to the item count at most */
		size_t max = (size_t)((j->items_total + 7) / 8), len = byte + 1 + j->taken_len / 8;
		uint8_t *n;
		if (len > max)
			len = max > byte ? max : byte + 1;
		if (!(n = realloc(j->taken, len)))
			return -ENOMEM;
		memset(n + j->taken_len, 0, len - j->taken_len);
		j->taken = n;
		j->taken_len = len;
	}
	j->taken[byte] |= (uint8_t)(1u << (idx % 8));
	return 0;
}

static bool task_for(const struct job *j, int64_t idx)
{
	for (const struct task *t = j->tasks; t; t = t->next)
		if (t->idx == idx)
			return true;
	return false;
}

/* Whether the job brings item `idx` anyway: its walk has not passed it and did not take
 * it ahead, or a task has it now. */
bool job_fetches(const struct job *j, int64_t idx)
{
	return (!j->scan_done && idx >= j->scan_from && !taken_test(j, idx)) || task_for(j, idx);
}

/* Whether a wanted item needs nothing more: the walk passed it (in flight, stored or
 * failed), it was taken ahead already, or a task has it. */
static bool want_done(const struct job *j, int64_t idx)
{
	return j->scan_done || idx < j->scan_from || taken_test(j, idx) || task_for(j, idx);
}

/* The walk's items: those taken ahead of it were fetched (or failed) already. */
static int task_from_walk(void *ctx, const struct index_item *it)
{
	struct job *j = ctx;

	return taken_test(j, it->idx) ? 0 : task_from_item(ctx, it);
}

/* A wanted item, unless something stored it meanwhile. */
static int task_from_wanted(void *ctx, const struct index_item *it)
{
	return it->stored ? 0 : task_from_item(ctx, it);
}

/* Records `idx` in the job's wanted ring (once). */
static void want_add(struct job *j, int64_t idx)
{
	for (unsigned k = 0; k < j->want_n; k++)
		if (j->want[(j->want_head + k) % WANT_MAX] == idx)
			return;
	if (j->want_n < WANT_MAX)
		j->want[(j->want_head + j->want_n++) % WANT_MAX] = idx;
}

void prefetch_want(struct prefetch *p, int64_t snapshot_id, int64_t idx)
{
	for (struct job *j = p->jobs; j; j = j->next) {
		if (j->lj && !j->final && j->snapshot_id == snapshot_id && j->lj->gen) {
			/* a local folder proved again: its next LOCAL_NEED asks for the wanted
			 * items' files first (local_need_ahead()) */
			if (!local_want_done(j, idx))
				want_add(j, idx);
			return;
		}
		if (j->final || j->source != DMC_SOURCE_DATAMINT || j->offline || j->to_tier ||
		    j->state != DMC_JOB_DOWNLOADING || j->snapshot_id != snapshot_id ||
		    (j->shard_world > 1 && (uint64_t)idx % j->shard_world != j->shard_rank))
			continue;
		if (want_done(j, idx))
			return;
		want_add(j, idx);
		/* no pump here: a job downloading has its window full (the walk fills it),
		 * and the next download to end takes the wanted items first */
		return;
	}
}

/* Wanted items as new tasks (not started), while the window has room. What cannot be
 * taken (out of memory, an index error) is left to the walk, which meets it again. */
static void take_wanted(struct job *j)
{
	struct index *ix = j->pf->d.cache->index;

	while (!j->final && j->want_n && j->running < window(j->pf)) {
		int64_t idx = j->want[j->want_head];
		int r;

		j->want_head = (j->want_head + 1) % WANT_MAX;
		j->want_n--;
		if (want_done(j, idx))
			continue;
		if (taken_set(j, idx) < 0)
			continue; /* out of memory: the walk brings it */
		r = index_item_get(ix, j->snapshot_id, idx, task_from_wanted, j);
		if (r < 0)
			j->taken[(size_t)idx / 8] &= (uint8_t)~(1u << (idx % 8));
	}
}

void job_pump(struct job *j)
{
	struct prefetch *p = j->pf;
	struct index *ix = p->d.cache->index;

	if (j->source == DMC_SOURCE_LOCAL) {
		local_pump(j);
		return;
	}
	if (j->pumping) {
		j->pump_again = true;
		return;
	}
	j->pumping = true;
again:
	j->pump_again = false;
	while (!j->final && !j->scan_done && j->running < window(p)) {
		int64_t next = -1;
		unsigned want;
		int n = 0;

		take_wanted(j);
		want = window(p) - j->running;
		if (want)
			n = index_items_page(ix, j->snapshot_id, j->scan_from,
					     want < SCAN_PAGE ? want : SCAN_PAGE, INDEX_ITEMS_MISSING,
					     task_from_walk, j, &next);
		else
			next = j->scan_from;
		if (n < 0) {
			struct dm_error e = { .err = n };
			snprintf(e.message, sizeof(e.message), "cannot read the snapshot: %s",
				 index_errmsg(ix));
			j->pumping = false;
			fail_job(j, &e);
			return;
		}
		if (next < 0)
			j->scan_done = true;
		else
			j->scan_from = next;
		/* start them outside the index callback: starting may use the index, and may
		 * end tasks at once, so look for the next one from the start each time */
		for (;;) {
			struct task *t = j->tasks;
			while (t && !t->starting)
				t = t->next;
			if (!t || j->final)
				break;
			task_start(t);
		}
	}
	if (j->pump_again && !j->final)
		goto again;
	j->pumping = false;
	if (!j->final && j->scan_done && j->running == 0)
		job_finish(j, j->items_failed ? DMC_JOB_FAILED : DMC_JOB_DONE);
}
