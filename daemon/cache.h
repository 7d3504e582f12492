/*
 * cache: the store (blob files, store.h) and the index (SQLite, index.h) of one cache
 * directory, kept consistent with each other.
 *
 *   cache_open()      opens both and reconciles them (docs/reliability.md I3) by merging
 *                     each store directory with the index rows of its first byte (after
 *                     a clean stop, only the directories changed since: cache_clean.h): temp
 *                     files removed; files with a bad name removed; a blob whose row gives
 *                     its file size kept on one fstatat (reads check header and content);
 *                     any other blob's header checked, bad ones removed; index rows
 *                     whose blob is gone dropped; valid blobs without a row adopted (they
 *                     are complete content: a crash between a blob's publication and its
 *                     index batch must not cost a download); a damaged index.db moved
 *                     aside and rebuilt from the blob headers; then the size limits
 *                     enforced by eviction.
 *   cache_reserve()   admission of a write: evicts least recently used, unpinned blobs
 *                     until the object fits under max_size and min_free, or fails with
 *                     -DMC_E_CACHE_FULL.
 *   cache_evict()     eviction of a number of bytes: first blobs no snapshot uses (decoded
 *                     tensors, leftovers) by LRU, then whole snapshots, least recently
 *                     used first, never one that c->protect() names (a running job's, an
 *                     open one's), and never a blob such a snapshot shares; every snapshot
 *                     evicted from is told to c->evicting before its first file goes
 *                     (the daemon logs it).
 *   cache_verify()    re-hashes every blob; bad ones are quarantined and their rows dropped.
 *
 * Order of writes that keeps I2/I3 across crashes: blob synced and renamed (store), then
 * its blobs row and item link in a batch (index), then acknowledged after index_flush().
 * Eviction removes the file first, then the row: a crash in between leaves a row without
 * a blob, which reconciliation drops.
 *
 * Threads: the cache functions run on the thread that owns the index (see index.h). The
 * store inside (c->store) may be used from any thread meanwhile, per store.h.
 */
#ifndef DMC_DAEMON_CACHE_H
#define DMC_DAEMON_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "index.h"
#include "store.h"

/*
 * Space the blob files leave free beyond min_free, for the index: its WAL grows with every
 * batch, and a batch that cannot be committed for want of space would lose the record of
 * items whose blobs are safely stored. The daemon adds it to min_free.
 */
#define CACHE_INDEX_HEADROOM (8ull << 20)

struct cache;

struct cache_options {
	struct store_options store;
	unsigned index_flags; /* enum index_open_flags */
	/* The start's eviction (I3), as c->evicting for a running cache: told of each snapshot
	 * it takes files from before the first one goes, with the cache being opened (its
	 * index readable). NULL: only the report says, afterwards. */
	void (*start_evicting)(void *ctx, struct cache *c, int64_t snapshot_id, uint64_t files,
			       uint64_t bytes);
	void *start_evicting_ctx;
	/* After this many milliseconds of walking directories, cache_open() leaves the ones
	 * not walked yet to a background reconciliation (cache_settle_*, below) and returns:
	 * a start after a crash serves within this, whatever the store's size. 0: the whole
	 * walk before cache_open() returns. Not after the index was rebuilt (every blob is
	 * to adopt before an item can be found). */
	uint32_t background_after_ms;
	bool background_all; /* tests: every directory to the background, none walked first */
};

struct cache {
	struct store *store; /* owned; borrow it, never close it */
	struct index *index; /* owned; idem */
	/* Set by the daemon: snapshots whose content eviction must keep (a job is filling
	 * them, a client has them open). NULL: none is protected. */
	bool (*protect)(void *ctx, int64_t snapshot_id);
	void *protect_ctx;
	/* Told of each snapshot eviction takes files from, and how many and how many bytes it
	 * plans to take, before the first one goes (for the log: a crash in the middle leaves
	 * no loss unlogged). A file being served when its turn comes stays. May be NULL. */
	void (*evicting)(void *ctx, int64_t snapshot_id, uint64_t files, uint64_t bytes);
	void *evicting_ctx;

	/* How the start went (read only): objects/<b>/ directories it walked (256 without a
	 * clean-shutdown record), and whether it ran the index check. */
	unsigned start_dirs_walked;
	bool start_index_checked;
	/* Private to cache.c and cache_clean.c: directories cache_reconcile() takes from the
	 * clean-shutdown record instead of walking them (bit b % 8 of skip[b / 8]), and the
	 * blobs and bytes of each directory as the start counted them. */
	uint8_t skip[32];
	uint64_t dir_objects[256], dir_bytes[256];
	/* Private to cache.c: the start's listener (cache_options) and report, during
	 * cache_open(). */
	void (*start_evicting)(void *ctx, struct cache *c, int64_t snapshot_id, uint64_t files,
			       uint64_t bytes);
	void *start_evicting_ctx;
	struct cache_open_report *start_rep;
	/* Private to cache.c and cache_settle.c: the background reconciliation. Directories
	 * not walked yet (bit b % 8 of [b / 8]) and how many; where the walk of cache_open()
	 * stops (CLOCK_MONOTONIC ns; 0: never); the next directory to try; what the walks
	 * repaired so far. */
	uint8_t unsettled[32];
	unsigned n_unsettled;
	uint64_t reconcile_deadline_ns;
	unsigned settle_next;
	struct cache_settle_report {
		uint64_t files_removed, evicted_bytes, retries;
		int64_t rows_dropped, adopted;
		unsigned dirs;
	} settle_rep;
};

/* What cache_open() found and repaired. */
struct cache_open_report {
	bool index_rebuilt;      /* index.db was damaged: moved aside and rebuilt */
	uint64_t blobs;          /* valid blobs in the store */
	uint64_t files_removed;  /* temp, quarantined and invalid files removed */
	int64_t rows_dropped;    /* blob rows whose file was missing or invalid */
	int64_t adopted;         /* valid blobs that had no row */
	uint64_t evicted_bytes;  /* evicted to get back within max_size and min_free */
	uint64_t full_evicted;   /* evicted first, the file system being too full for the
				  * index to reconcile (least recently used blobs) */
	/* the snapshots whose files that eviction removed (the first CACHE_REPORT_SNAPSHOTS;
	 * evicted_more counts the rest), for the daemon to log each as it does later ones */
	struct cache_evicted_snapshot {
		int64_t id;
		uint64_t files, bytes;
	} evicted[8]; /* CACHE_REPORT_SNAPSHOTS */
	unsigned n_evicted;
	uint64_t evicted_more;
	bool clean_start;        /* a clean-shutdown record was trusted (cache_clean.h) */
	bool index_checked;      /* PRAGMA quick_check ran */
	unsigned dirs_walked;    /* objects/<b>/ directories walked and merged, of 256 */
	unsigned dirs_left;      /* left to the background reconciliation (cache_settle_*);
				  * the limits' eviction waits for its end */
	char start_why[192];     /* without clean_start: why the full reconciliation */
	char check_why[160];     /* without clean_start: why the index check ran, or not */
};
#define CACHE_REPORT_SNAPSHOTS 8

struct cache_verify_report {
	uint64_t ok, bad;
};

/*
 * Whether `dir` (absolute) may hold the cache of a daemon running as uid `self`: the
 * directory is the daemon's own (docs/reliability.md, S rows; docs/security.md). The path is
 * resolved component by component from "/", following symlinks (at most 40); every
 * directory met must belong to root or `self`, and so must every symlink. The cache
 * directory itself, and every directory owned by `self`, must not be writable by group or
 * others; a root-owned directory above it may be group-writable (root chose the group) and
 * world-writable only with the sticky bit (/tmp), where no one else can rename what is in
 * it. With `allow_missing`, a missing component ends the walk successfully: what is
 * missing will be created by the daemon inside a directory that passed. Returns 0, or
 * -EPERM / -ENOTDIR / -ELOOP / a negative errno with a message naming the path in `err`.
 * ACLs are not inspected.
 */
int cache_dir_check(const char *dir, uid_t self, bool allow_missing, char *err, size_t errlen);

/*
 * Opens the cache in `dir` (borrowed): store, index (<dir>/index.db) and reconciliation.
 * `rep` may be NULL. On failure returns a negative code with a message in `err`.
 * *ret_cache: free with cache_close().
 */
int cache_open(const char *dir, const struct cache_options *opts, char *err, size_t errlen,
	       struct cache **ret_cache, struct cache_open_report *rep);
/* Flushes the index batch and closes both. Returns the flush result. */
int cache_close(struct cache *c);
/*
 * The clean stop: cache_close(), then the clean-shutdown record (cache_clean.h) that lets
 * the next start skip the index check and the directories nothing changed. Call once no
 * store write runs. Directories whose names or rows changed while open are merged again
 * here (a listing against the rows, one fstatat per blob for its size) and recorded only
 * if they agree; the rest are recorded as the start counted them. Returns the flush
 * result; no record is written if it failed or the record could not be (the reason in
 * `why`, may be NULL): *ret_written (may be NULL) says which.
 */
int cache_close_clean(struct cache *c, bool *ret_written, char *why, size_t whylen);

/* The reconciliation of cache_open(), for tests and `dmcache verify`-like repairs. Call
 * while no writer runs. */
int cache_reconcile(struct cache *c, struct cache_open_report *rep);

/*
 * The background reconciliation (cache_settle.c): the directories cache_open() left
 * (cache_open_report.dirs_left), one at a time, while the daemon serves and writes:
 *
 *   cache_settle_begin()  (index thread) the next directory's index rows and the count of
 *                         its name changes (store_dir_gen()); *ret NULL when none is left.
 *   cache_settle_work()   (any thread; the store only) its listing merged with those rows
 *                         as cache_reconcile() merges them: a fstatat per blob, the header
 *                         check of a blob without a row or of another size (bad ones are
 *                         quarantined), the repairs the index needs.
 *   cache_settle_end()    (index thread) if the directory's names did not change since
 *                         begin: its accounting set (store_dir_settle()), the repairs
 *                         written and flushed, 1; if they did: nothing, 0 (begin it again:
 *                         a row read before a publication would be dropped otherwise).
 *                         After the last directory: the eviction cache_open() left, down
 *                         to max_size and min_free, told to c->evicting as any. Frees `w`.
 *   cache_settle_abort()  frees a walk not ended.
 *
 * Items are found meanwhile through their rows, as always (a read checks the header and
 * content: a blob gone or bad is a miss). Only the accounting is partial until the end:
 * store_stats.unsettled_dirs, and max_size is not enforced (min_free is).
 */
struct cache_settle;
int cache_settle_begin(struct cache *c, struct cache_settle **ret);
void cache_settle_work(struct cache_settle *w);
int cache_settle_end(struct cache *c, struct cache_settle *w);
void cache_settle_abort(struct cache_settle *w);
/* The start's walk of objects/<b>/ (cache_reconcile(), no writer running): merged and
 * repaired at once; the repairs counted in `rep`, the directory's blobs and file bytes in
 * *ret_objects and *ret_bytes. */
int cache_settle_now(struct cache *c, unsigned b, struct cache_open_report *rep,
		     uint64_t *ret_objects, uint64_t *ret_bytes);
/* The directory (first digest byte) a walk is about. */
unsigned cache_settle_dir(const struct cache_settle *w);
/* A cache function's negative result in words ("cache full", strerror, ...). */
const char *cache_strerror(int r);

/* Directories the background reconciliation has left. */
unsigned cache_settle_left(const struct cache *c);

/*
 * Evicts (see above) until `want` file bytes are freed or nothing evictable is left;
 * pinned blobs are skipped. Index rows are deleted in the current batch, which is
 * flushed. *ret_freed (may be NULL) gets the bytes freed.
 */
int cache_evict(struct cache *c, uint64_t want, uint64_t *ret_freed);

/*
 * New max_size and min_free (store_set_limits()), then eviction (as cache_evict(): what
 * c->protect names and pinned blobs stay) until the cache is within them or nothing
 * evictable is left. *ret_freed (may be NULL) gets the bytes freed, *ret_short (may be
 * NULL) what is still over the limits after that. Thread of the index.
 */
int cache_set_limits(struct cache *c, uint64_t max_size, uint64_t min_free, uint64_t *ret_freed,
		     uint64_t *ret_short);

/*
 * store_reserve() with eviction: 0 when `raw_size` bytes are admitted (release with
 * store_release(c->store, raw_size)), -DMC_E_CACHE_FULL when even eviction of every
 * unpinned blob cannot make room, -DMC_E_LIMIT_EXCEEDED above max_object or max_size.
 */
int cache_reserve(struct cache *c, uint64_t raw_size);

/* Records a committed blob in the index (batched): the index half of a store commit. */
int cache_record_blob(struct cache *c, const struct store_blob_info *info);

/* Verifies every blob; bad ones are quarantined and their index rows dropped (flushed). */
int cache_verify(struct cache *c, struct cache_verify_report *rep);

#endif
