/*
 * prefetch: jobs that bring a dataset version into the cache, and the cache requests of
 * the protocol (PREFETCH, CANCEL, LIST, EVICT, VERIFY; proto.h).
 *
 * A job belongs to the uid that asked for it and runs with that uid's key, which it keeps
 * in memory only (secret.h). It resolves the project and its version, pins a snapshot (the
 * ordered resource list in the index), then downloads what the cache lacks: each body
 * streams into a store writer through the libuv threadpool (the loop only copies bytes
 * into a buffer), is verified against the server's stated SHA-256 when there is one, and
 * is committed (fsync, rename) before the item counts as done. Downloads are stored raw
 * unless zstd shrinks them by a third or more (DOWNLOAD_ZSTD_KEEP_PCT in
 * prefetch_download.c). Items already stored are not downloaded again; items of an earlier
 * version of the same resource are revalidated with If-None-Match and reused on 304. A
 * resource wanted by two jobs at once downloads once.
 *
 * Entitlement (docs/security.md): a uid may see a snapshot after its own key listed that
 * project in this daemon's lifetime. Nothing of it survives a restart.
 *
 * Loop thread only.
 */
#ifndef DMC_PREFETCH_H
#define DMC_PREFETCH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "proto.h"

struct cache;
struct conn;
struct fetch;
struct config;
struct decode_pool;
struct decode_desc;

struct prefetch;

struct prefetch_deps {
	uv_loop_t *loop;
	struct cache *cache;
	struct fetch *fetch;
	const struct config *cfg;
	struct decode_pool *pool; /* decodes ahead (DMC_PREFETCH_DECODE); NULL: none */
};

int prefetch_new(const struct prefetch_deps *deps, struct prefetch **ret);
/* Cancels every job; frees the engine once their transfers are over. */
void prefetch_free(struct prefetch *p);

/* Handles a cache request from `c`. Returns false when `h->opcode` is not one of its own. */
bool prefetch_dispatch(struct prefetch *p, struct conn *c, const struct dmc_header *h,
		       const uint8_t *payload);
/* What prefetch_attach() reports once: the snapshot is listed (err 0), or why not. */
struct prefetch_ready {
	int err;
	/* err == 0: strings borrowed for the call */
	int64_t snapshot_id;
	uint64_t items;
	const char *project_id, *project_name, *version;
	/* err != 0 */
	uint32_t code; /* enum dmc_error */
	uint32_t http_status, retry_after_ms;
	const char *message;
};
/*
 * The HTTP status an ERROR frame of a failed OPEN or PREFETCH carries: 401 or 403 when the
 * server refused the caller's own key (its own request: nothing about another user's
 * data), else 0, so that an absent dataset and one the caller may not see answer alike.
 */
static inline uint32_t prefetch_refusal_status(uint32_t code, uint32_t http_status)
{
	return code == DMC_E_NOT_FOUND_OR_DENIED && (http_status == 401 || http_status == 403)
		       ? http_status
		       : 0;
}
typedef void (*prefetch_ready_cb)(void *ctx, const struct prefetch_ready *r);

/*
 * Starts or joins `uid`'s job for the dataset in `m` (as a PREFETCH would, with the same
 * checks and the caller's key) and calls `cb` once: when the snapshot is listed and the
 * uid is entitled to it (the job goes on downloading), or when it cannot be. `cb` may run
 * before this returns. prefetch_detach() forgets every pending callback with `ctx`.
 */
int prefetch_attach(struct prefetch *p, uid_t uid, const struct dmc_prefetch *m,
		    prefetch_ready_cb cb, void *ctx);
void prefetch_detach(struct prefetch *p, void *ctx);
/*
 * A client waits for item `idx` of snapshot `snapshot_id`, which a running job is filling
 * and has not reached yet in its walk (index order): the job takes it next, when one of
 * its downloads ends, before the rest of the walk. At most WANT_MAX such items wait per
 * job; beyond that, or when no job of Datamint is downloading that snapshot, the item
 * comes in walk order. Nothing is fetched that the job would not fetch anyway, so which
 * client asks does not matter. Never calls back: the item hook says when the item is
 * stored or failed. Loop thread.
 */
void prefetch_want(struct prefetch *p, int64_t snapshot_id, int64_t idx);

/*
 * Item `idx` of snapshot `snapshot_id` went bad in the cache (its blob row is dropped: the
 * item is missing): fetch it again for `uid` with the dataset and key in `m`, under the
 * rules of prefetch_attach() (the server checks the caller's own key again). A running job
 * of that uid, key and snapshot gets one more task; otherwise a job starts (or is joined)
 * as for an OPEN, and downloads what the snapshot lacks. `cb` is told once, as for
 * prefetch_attach(); the item hook says when the item is stored or failed.
 */
int prefetch_refetch(struct prefetch *p, uid_t uid, const struct dmc_prefetch *m,
		     int64_t snapshot_id, int64_t idx, prefetch_ready_cb cb, void *ctx);
/*
 * prefetch_attach() for a LOCAL source: the job reads through the descriptors that `c`
 * passes for request `request_id` (proto.h, LOCAL_NEED), starting with dataset.json's, taken
 * from the frame being handled (conn_take_fds). Call from that frame's handler.
 */
int prefetch_attach_local(struct prefetch *p, struct conn *c, uint32_t request_id,
			  const struct dmc_prefetch *m, prefetch_ready_cb cb, void *ctx);

/* Whether `uid` may read snapshot `id` (listed with its key since the daemon started). */
bool prefetch_may_see(struct prefetch *p, uid_t uid, int64_t id);
/*
 * What else keeps a snapshot from eviction besides the jobs filling it (the serving side's
 * open handles): asked by the cache's eviction. Loop thread.
 */
/*
 * Logs that eviction takes `files` files (`bytes`) of snapshot `id`, named by project,
 * version and owner, with the limits that made it, before the first file goes: at a start
 * (cache_open()'s I3, which runs before any prefetch exists: `at_start`, through
 * cache_options.start_evicting), or later (the cache's `evicting` callback).
 * Loop thread.
 */
void prefetch_log_eviction(struct cache *c, const struct config *cfg, int64_t id,
			   uint64_t files, uint64_t bytes, bool at_start);

void prefetch_set_open_check(struct prefetch *p, bool (*is_open)(void *ctx, int64_t id),
			     void *ctx);
/* Whether a job is filling snapshot `id` now: a missing item may still come. */
bool prefetch_snapshot_active(struct prefetch *p, int64_t id);
/*
 * Whether item `idx` of snapshot `id` is a local folder's item that the job listing it
 * again has not proved yet: its index row still says what an earlier proof found, which
 * must not be served (wait for the job, as for an item not stored). Loop thread.
 */
bool prefetch_item_unproved(struct prefetch *p, int64_t id, int64_t idx);
/* Called when an item of a snapshot is stored (err 0) or failed for good; with idx
 * PREFETCH_JOB_ENDED when a job filling the snapshot ended (items still missing will not
 * come from it), and with PREFETCH_RELISTED when a local folder's snapshot was listed
 * again: every item's content is forgotten until this job's descriptors prove it again, so
 * whatever the caller kept of an item's row (its content digest) no longer holds. */
/* `message` (may be NULL): why the item failed, for the GETs waiting for it. With
 * PREFETCH_JOB_ENDED, `err` is the job's first error when the job failed (0 when it was
 * done or cancelled) and `message` its words. `uid`: the job's (whose words `message` are:
 * told to that uid's GETs only), (uid_t)-1 with PREFETCH_RELISTED. */
#define PREFETCH_JOB_ENDED (-1)
#define PREFETCH_RELISTED (-2)
typedef void (*prefetch_item_cb)(void *ctx, int64_t snapshot_id, int64_t idx, uid_t uid,
				 int err, const char *message);
void prefetch_set_item_hook(struct prefetch *p, prefetch_item_cb cb, void *ctx);
/*
 * Where decoding ahead (prefetch_decode.c) leaves what it decoded: the serving side's hot
 * set, keyed by content (`raw`, the stored file's digest) and `opts` (the tensor cache's
 * key), as a GET of the item would have left it (and snapshot `snapshot_id`'s region, as
 * a GET of a handle with regions would have). room(): whether `need` bytes fit as the set
 * is now, without evicting anything. adopt(): takes `buf` (the tensor, nbytes, then the
 * header JSON, dlen) and returns true, or false when it does not fit or is there already
 * (the caller keeps `buf`). Loop thread.
 */
struct prefetch_hot_hooks {
	bool (*room)(void *ctx, uint64_t need);
	bool (*adopt)(void *ctx, int64_t snapshot_id, const uint8_t *raw, int64_t opts,
		      uint8_t *buf, uint64_t nbytes, uint64_t dlen,
		      const struct decode_desc *desc);
	void *ctx;
};
/* NULL: nothing decoded ahead is kept in memory. */
void prefetch_set_hot_hooks(struct prefetch *p, const struct prefetch_hot_hooks *hooks);

/* `c` is closing: it gets no more events (its jobs go on). */
void prefetch_conn_closed(struct prefetch *p, struct conn *c);
/*
 * STATUS entries for `c`: for admins the cache's size, hits, transfers and jobs; for
 * anyone else only their own snapshots and jobs (docs/security.md). Names are static.
 */
uint32_t prefetch_status(struct prefetch *p, const struct conn *c, struct dmc_status_entry *e,
			 uint32_t max);

#endif
