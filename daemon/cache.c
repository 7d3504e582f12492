/*
 * cache: store + index consistency. See cache.h.
 */
#include "cache.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cache_clean.h"
#include "proto.h"

/* Blob rows per eviction query: small enough to stay off the heap. */
#define EVICT_PAGE 64u
/* Blobs evicted one at a time, at most, when the file system is too full at start for the
 * index to reconcile (cache_open). */
#define RECONCILE_ROUNDS 16
/* Admission attempts before cache_reserve() gives up. */
#define RESERVE_ROUNDS 8

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

const char *cache_strerror(int r)
{
	if (r == -DMC_E_CACHE_FULL)
		return "cache full";
	if (r == -DMC_E_INTEGRITY)
		return "integrity check failed";
	if (r < 0 && r > -DMC_E_FIRST_)
		return strerror(-r);
	return "internal error";
}

/* Whether one directory or symlink met on the way to the cache directory is trusted. */
static int check_node(const char *dir, const char *node, const struct stat *st, uid_t self,
		      bool final, char *err, size_t errlen)
{
	mode_t m = st->st_mode;

	if (st->st_uid != 0 && st->st_uid != self) {
		snprintf(err, errlen, "cache directory '%s': '%s' belongs to uid %u; only root or "
				      "the daemon's own uid %u may own it or a directory on its path",
			 dir, node, (unsigned)st->st_uid, (unsigned)self);
		return -EPERM;
	}
	if (S_ISLNK(m))
		return 0;
	if (!S_ISDIR(m)) {
		snprintf(err, errlen, "cache directory '%s': '%s' is not a directory", dir, node);
		return -ENOTDIR;
	}
	if ((final || st->st_uid != 0) && (m & (S_IWGRP | S_IWOTH))) {
		snprintf(err, errlen, "cache directory '%s': '%s' is writable by %s (mode %04o); "
				      "it must be the daemon's own (chmod go-w)",
			 dir, node, (m & S_IWOTH) ? "others" : "its group", (unsigned)(m & 07777));
		return -EPERM;
	}
	if ((m & S_IWOTH) && !(m & S_ISVTX)) {
		snprintf(err, errlen, "cache directory '%s': '%s' is writable by everyone without "
				      "the sticky bit (mode %04o)",
			 dir, node, (unsigned)(m & 07777));
		return -EPERM;
	}
	return 0;
}

int cache_dir_check(const char *dir, uid_t self, bool allow_missing, char *err, size_t errlen)
{
	char cur[4096], rest[8192], next[4096], target[4096];
	unsigned links = 0;
	struct stat st;
	int r;

	if (!dir || dir[0] != '/') {
		snprintf(err, errlen, "cache directory '%s': not an absolute path", dir ? dir : "");
		return -EINVAL;
	}
	if (strlen(dir) >= sizeof(cur)) {
		snprintf(err, errlen, "cache directory path too long");
		return -ENAMETOOLONG;
	}
	snprintf(rest, sizeof(rest), "%s", dir + 1);
	strcpy(cur, "/");
	if (lstat(cur, &st) != 0) {
		r = -errno;
		snprintf(err, errlen, "cache directory '%s': cannot inspect '/': %s", dir,
			 strerror(-r));
		return r;
	}
	r = check_node(dir, "/", &st, self, rest[strspn(rest, "/")] == '\0', err, errlen);
	if (r < 0)
		return r;
	for (;;) {
		char *p = rest + strspn(rest, "/");
		size_t n = strcspn(p, "/");
		if (n == 0)
			return 0; /* every component passed */
		char comp[256];
		if (n >= sizeof(comp)) {
			snprintf(err, errlen, "cache directory '%s': a name is too long", dir);
			return -ENAMETOOLONG;
		}
		memcpy(comp, p, n);
		comp[n] = '\0';
		memmove(rest, p + n, strlen(p + n) + 1);
		bool last = rest[strspn(rest, "/")] == '\0';
		if (strcmp(comp, ".") == 0)
			continue;
		if (strcmp(comp, "..") == 0) {
			/* the parent of a directory that passed was checked on the way down */
			char *slash = strrchr(cur, '/');
			if (slash && slash != cur)
				*slash = '\0';
			else
				strcpy(cur, "/");
			continue;
		}
		if ((size_t)snprintf(next, sizeof(next), "%s%s%s", cur, strcmp(cur, "/") ? "/" : "",
				     comp) >= sizeof(next)) {
			snprintf(err, errlen, "cache directory path too long");
			return -ENAMETOOLONG;
		}
		if (lstat(next, &st) != 0) {
			r = -errno;
			if (r == -ENOENT && allow_missing)
				return 0;
			snprintf(err, errlen, "cache directory '%s': cannot inspect '%s': %s", dir,
				 next, strerror(-r));
			return r;
		}
		r = check_node(dir, next, &st, self, last, err, errlen);
		if (r < 0)
			return r;
		if (!S_ISLNK(st.st_mode)) {
			memcpy(cur, next, strlen(next) + 1);
			continue;
		}
		if (++links > 40) {
			snprintf(err, errlen, "cache directory '%s': too many symbolic links", dir);
			return -ELOOP;
		}
		ssize_t tl = readlink(next, target, sizeof(target) - 1);
		if (tl <= 0) {
			r = tl < 0 ? -errno : -EINVAL;
			snprintf(err, errlen, "cache directory '%s': cannot read the link '%s': %s",
				 dir, next, strerror(-r));
			return r;
		}
		target[tl] = '\0';
		/* the target's components come first, then what was left */
		char joined[8192];
		if ((size_t)snprintf(joined, sizeof(joined), "%s/%s", target, rest) >=
		    sizeof(joined)) {
			snprintf(err, errlen, "cache directory path too long");
			return -ENAMETOOLONG;
		}
		memcpy(rest, joined, strlen(joined) + 1);
		if (target[0] == '/')
			strcpy(cur, "/");
	}
}

int cache_open(const char *dir, const struct cache_options *opts, char *err, size_t errlen,
	       struct cache **ret_cache, struct cache_open_report *rep)
{
	struct cache_options o = { 0 };
	struct cache_open_report local;
	struct clean_record *rec;
	struct cache *c;
	char path[4096];
	bool rebuilt = false, clean, killed;
	int r, took;

	if (opts)
		o = *opts;
	if (!rep)
		rep = &local;
	memset(rep, 0, sizeof(*rep));
	if (!dir || (size_t)snprintf(path, sizeof(path), "%s/index.db", dir) >= sizeof(path)) {
		if (err && errlen)
			snprintf(err, errlen, "cache directory path too long");
		return -ENAMETOOLONG;
	}
	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	rec = malloc(sizeof(*rec));
	if (!rec) {
		free(c);
		return -ENOMEM;
	}
	/* The record is taken (read, removed, the removal synced) before anything is written:
	 * from here on a crash leaves none, and the next start reconciles fully. */
	took = clean_take(dir, rec, rep->start_why, sizeof(rep->start_why));
	clean = took == 1 && clean_index_matches(dir, rec, rep->start_why, sizeof(rep->start_why));
	/* no record at all: a crash; one killed in this boot needs no index check
	 * (cache_clean.h). A record that is not trusted (index.db changed since) does. */
	killed = took == -ENOENT &&
		 clean_killed_this_boot(dir, rep->check_why, sizeof(rep->check_why)) == 1;
	if (clean || killed)
		o.index_flags |= INDEX_SKIP_CHECK;
	else
		o.index_flags &= ~(unsigned)INDEX_SKIP_CHECK;
	c->start_evicting = o.start_evicting;
	c->start_evicting_ctx = o.start_evicting_ctx;
	r = store_open(dir, &o.store, err, errlen, &c->store);
	if (r < 0)
		goto fail;
	r = index_open(path, o.index_flags, err, errlen, &c->index, &rebuilt);
	if (r < 0)
		goto fail_store;
	clean_mark_started(dir);
	if (clean && rebuilt) {
		clean = false; /* not from the check: a schema the index could not take */
		snprintf(rep->start_why, sizeof(rep->start_why), "the index was rebuilt");
	}
	if (clean) {
		/* Rows and files agreed in these directories at the stop, and neither the index
		 * nor the directory changed since: what the stop counted in them stands. */
		clean_dirs_unchanged(dir, rec, c->skip);
		for (unsigned b = 0; b < 256; b++) {
			c->dir_objects[b] = rec->dirs[b].objects;
			c->dir_bytes[b] = rec->dirs[b].bytes;
		}
	}
	rep->clean_start = clean;
	rep->index_checked = !clean && !killed;
	if (killed)
		snprintf(rep->check_why, sizeof(rep->check_why),
			 "the last daemon was killed in this boot (no fatal signal, the same "
			 "index.db): index check skipped");
	if (o.background_all && !rebuilt)
		c->reconcile_deadline_ns = 1; /* long past */
	else if (o.background_after_ms && !rebuilt)
		c->reconcile_deadline_ns = now_ns() + (uint64_t)o.background_after_ms * 1000000u;
	r = cache_reconcile(c, rep);
	if (r == -DMC_E_CACHE_FULL) {
		/* I3 on a full file system: reconciliation writes the index (a pass mark per
		 * blob), and the write-ahead log needs a few pages that a full disk may not
		 * have. Give up the least recently used blob (what no snapshot uses first, as
		 * any eviction) for that room, one at a time, and reconcile again. */
		for (int i = 0; i < RECONCILE_ROUNDS && r == -DMC_E_CACHE_FULL; i++) {
			uint64_t freed = 0;
			if (cache_evict(c, 1, &freed) < 0 || freed == 0)
				break; /* one blob: as little as the log needs */
			rep->full_evicted += freed;
			memset(c->skip, 0, sizeof(c->skip)); /* the record's counts are past */
			r = cache_reconcile(c, rep);
		}
	}
	if (r < 0) {
		if (err && errlen)
			snprintf(err, errlen, "cache reconciliation failed: %s", cache_strerror(r));
		goto fail_index;
	}
	rep->index_rebuilt = rebuilt;
	c->reconcile_deadline_ns = 0;
	c->start_index_checked = rep->index_checked;
	c->start_evicting = NULL; /* the start is over */
	c->start_evicting_ctx = NULL;
	c->start_dirs_walked = rep->dirs_walked;
	free(rec);
	*ret_cache = c;
	return 0;

fail_index:
	index_close(c->index);
fail_store:
	store_close(c->store);
fail:
	free(rec);
	free(c);
	return r;
}

/* The index's blob rows of one first byte, in digest order (index_blobs_first_byte). */
struct row_list {
	struct index_blob *v;
	size_t n, cap;
};

static int row_push(void *ctx, const struct index_blob *b)
{
	struct row_list *l = ctx;
	if (l->n == l->cap) {
		size_t ncap = l->cap ? 2 * l->cap : 256;
		void *p = realloc(l->v, ncap * sizeof(*l->v));
		if (!p)
			return -ENOMEM;
		l->v = p;
		l->cap = ncap;
	}
	l->v[l->n++] = *b;
	return 0;
}

/*
 * At a clean stop, objects/<b>/ against the rows of first byte b, as the start's merge
 * would see it: the same names, and each file of the size its row records (one fstatat,
 * store_scan_known()). 1 and the directory's blobs and file bytes when all agree, 0 when
 * anything differs (the next start walks it and repairs it as always), or a negative
 * code.
 */
static int settle_dir(struct cache *c, unsigned b, uint8_t (**names)[STORE_DIGEST_SIZE],
		      size_t *cap, struct row_list *rows, uint64_t *ret_objects,
		      uint64_t *ret_bytes)
{
	uint64_t removed = 0, bytes = 0;
	size_t n = 0;
	int r;

	rows->n = 0;
	if ((r = store_scan_list(c->store, b, names, cap, &n, &removed)) < 0 ||
	    (r = index_blobs_first_byte(c->index, b, row_push, rows)) < 0)
		return r;
	if (n != rows->n)
		return 0;
	for (size_t i = 0; i < n; i++) {
		const struct index_blob *row = &rows->v[i];
		uint64_t size = 0;
		if (memcmp((*names)[i], row->digest, STORE_DIGEST_SIZE) != 0 ||
		    row->raw_size < 0 || row->stored_size < 0)
			return 0;
		r = store_scan_known(c->store, (*names)[i], (uint64_t)row->raw_size,
				     (uint64_t)row->stored_size, &size);
		if (r != 1)
			return r == -ENOENT ? 0 : r;
		bytes += size;
	}
	*ret_objects = n;
	*ret_bytes = bytes;
	return 1;
}

int cache_close_clean(struct cache *c, bool *ret_written, char *why, size_t whylen)
{
	uint8_t (*names)[STORE_DIGEST_SIZE] = NULL;
	uint8_t st_touched[32], ix_touched[32];
	struct row_list rows = { 0 };
	struct clean_record *rec;
	size_t cap = 0;
	char *dir;
	int r, w = -1;

	if (ret_written)
		*ret_written = false;
	if (!c)
		return 0;
	r = index_flush(c->index);
	rec = calloc(1, sizeof(*rec));
	dir = strdup(store_dir(c->store));
	if (r < 0 || !rec || !dir) {
		if (why && whylen)
			snprintf(why, whylen, "%s", r < 0 ? "the index could not be flushed"
							  : "out of memory");
		free(rec);
		free(dir);
		cache_close(c);
		return r;
	}
	store_touched(c->store, st_touched);
	index_blobs_touched(c->index, ix_touched);
	for (unsigned b = 0; b < CLEAN_DIRS; b++) {
		struct clean_dir *d = &rec->dirs[b];
		int q = 1;
		if ((st_touched[b / 8] | ix_touched[b / 8]) & (1u << (b % 8)))
			q = settle_dir(c, b, &names, &cap, &rows, &d->objects, &d->bytes);
		else {
			d->objects = c->dir_objects[b];
			d->bytes = c->dir_bytes[b];
		}
		if (c->unsettled[b / 8] & (1u << (b % 8)))
			q = 0; /* the background reconciliation had not walked it yet */
		d->state = q == 1 ? CLEAN_DIR_SETTLED : CLEAN_DIR_UNSETTLED;
	}
	free(names);
	free(rows.v);
	/* closing checkpoints the WAL into index.db and removes it: index.db is then final */
	r = cache_close(c);
	if (r == 0)
		w = clean_write(dir, rec, why, whylen);
	if (ret_written)
		*ret_written = w == 0;
	free(rec);
	free(dir);
	return r;
}

int cache_close(struct cache *c)
{
	int r;
	if (!c)
		return 0;
	r = index_flush(c->index);
	index_close(c->index);
	store_close(c->store);
	free(c);
	return r;
}

/* The start's eviction: each snapshot it takes files from, in the report and to the
 * start's listener (cache_options.start_evicting) before its first file goes. */
static void note_evicted(void *ctx, int64_t id, uint64_t files, uint64_t bytes)
{
	struct cache *c = ctx;
	struct cache_open_report *rep = c->start_rep;

	if (rep->n_evicted < CACHE_REPORT_SNAPSHOTS)
		rep->evicted[rep->n_evicted++] = (struct cache_evicted_snapshot){ id, files, bytes };
	else
		rep->evicted_more++;
	if (c->start_evicting)
		c->start_evicting(c->start_evicting_ctx, c, id, files, bytes);
}

/*
 * I3 at start: objects/ and the blobs table merged in digest order, one first byte at a
 * time (a directory listing against one ordered range of the table). A blob that both
 * name is kept when its file size is the one its row records (one fstatat; header and
 * content are checked by every read, which quarantines a bad blob and makes its item a
 * miss); any other file gets the full header check; a row without its file is dropped.
 * Only differences write to the index: a restart over an intact cache writes nothing.
 * Directories in c->skip (cache_open() after a clean stop, cache_clean.h) are not walked:
 * their blobs and bytes are the record's. Each directory is cache_settle_now(), the merge
 * the background walk uses too; past c->reconcile_deadline_ns the rest is left to it.
 */
int cache_reconcile(struct cache *c, struct cache_open_report *rep)
{
	struct store_stats st;
	uint64_t shortfall = 0;
	int r;

	/* tmp/ and quarantine/ are emptied at every start, after a clean stop too: the
	 * record does not vouch for them (empty after a clean stop, reading one costs a
	 * single getdents). */
	if ((r = index_flush(c->index)) < 0 ||
	    (r = store_scan_begin(c->store, &rep->files_removed)) < 0)
		return r;
	rep->dirs_walked = 0;
	memset(c->unsettled, 0, sizeof(c->unsettled));
	c->n_unsettled = 0;
	c->settle_next = 0;
	for (unsigned b = 0; b < 256 && r >= 0; b++) {
		if (c->skip[b / 8] & (1u << (b % 8)))
			continue; /* the clean-shutdown record vouches for it (cache_open) */
		c->dir_objects[b] = c->dir_bytes[b] = 0;
		if (c->n_unsettled ||
		    (c->reconcile_deadline_ns && now_ns() > c->reconcile_deadline_ns)) {
			/* past the deadline: the rest is walked in the background (cache_settle.c) */
			c->unsettled[b / 8] |= (uint8_t)(1u << (b % 8));
			c->n_unsettled++;
			continue;
		}
		rep->dirs_walked++;
		r = cache_settle_now(c, b, rep, &c->dir_objects[b], &c->dir_bytes[b]);
	}
	store_scan_end(c->store, c->dir_bytes, c->dir_objects, c->unsettled);
	if (r < 0) {
		(void)index_flush(c->index);
		return r;
	}
	if ((r = index_flush(c->index)) < 0)
		return r;
	store_get_stats(c->store, &st);
	rep->blobs = st.objects;
	rep->dirs_left = c->n_unsettled;
	if (c->n_unsettled)
		return 0; /* the limits are enforced when the background walk ends */

	/* I3: within max_size and min_free before anything is served. Each snapshot that
	 * loses files is reported, and told to the start's listener before its first file
	 * goes (no one listens to c->evicting yet at start). */
	if ((r = store_shortfall(c->store, 0, &shortfall)) < 0)
		return r;
	if (shortfall > 0) {
		bool listen = !c->evicting;
		if (listen) {
			c->evicting = note_evicted;
			c->evicting_ctx = c;
			c->start_rep = rep;
		}
		r = cache_evict(c, shortfall, &rep->evicted_bytes);
		if (listen) {
			c->evicting = NULL;
			c->evicting_ctx = NULL;
			c->start_rep = NULL;
		}
		if (r < 0)
			return r;
		store_get_stats(c->store, &st);
		rep->blobs = st.objects;
	}
	return 0;
}

struct lru_page {
	unsigned n;
	uint8_t digest[EVICT_PAGE][INDEX_DIGEST_SIZE];
};

static int on_lru_blob(void *ctx, const struct index_blob *b)
{
	struct lru_page *p = ctx;
	memcpy(p->digest[p->n++], b->digest, INDEX_DIGEST_SIZE);
	return 0;
}

/* Removes one blob, file first, then its row (a crash in between leaves a row without a
 * blob, which reconciliation drops). 0, or -EBUSY when it is pinned (being served). */
static int evict_blob(struct cache *c, const uint8_t digest[INDEX_DIGEST_SIZE], uint64_t *freed)
{
	uint64_t f = 0;
	int q = store_remove(c->store, digest, &f);

	if (q == -EBUSY)
		return q;
	if (q < 0 && q != -ENOENT)
		return q;
	*freed += f;
	return index_blob_delete(c->index, digest);
}

struct id_list {
	int64_t *ids;
	size_t n, cap;
};

static int id_push(void *ctx, int64_t id)
{
	struct id_list *l = ctx;

	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 64;
		int64_t *n = realloc(l->ids, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		l->ids = n;
		l->cap = cap;
	}
	l->ids[l->n++] = id;
	return 0;
}

struct digest_list {
	struct {
		uint8_t d[INDEX_DIGEST_SIZE];
		uint64_t size; /* the file's: header and payload */
	} *b;
	size_t n, cap;
};

static int digest_push(void *ctx, const struct index_blob *b)
{
	struct digest_list *l = ctx;

	if (l->n == l->cap) {
		size_t cap = l->cap ? l->cap * 2 : 256;
		void *n = realloc(l->b, cap * sizeof(*l->b));
		if (!n)
			return -ENOMEM;
		l->b = n;
		l->cap = cap;
	}
	memcpy(l->b[l->n].d, b->digest, INDEX_DIGEST_SIZE);
	l->b[l->n++].size = STORE_HEADER_SIZE + (uint64_t)(b->stored_size > 0 ? b->stored_size : 0);
	return 0;
}

static int is_protected(void *ctx, int64_t id)
{
	const struct cache *c = ctx;

	return c->protect && c->protect(c->protect_ctx, id) ? 1 : 0;
}

/*
 * Phase 2 of eviction: whole snapshots, least recently used first. A snapshot that a job is
 * filling or a client has open (c->protect) is never touched, nor is a blob that such a
 * snapshot also uses. What a snapshot is about to lose is planned first and told to
 * c->evicting before its first file goes: a crash in the middle of the removals then never
 * leaves a snapshot with fewer items than clients were told, and no line saying which.
 * The plan's blobs are moved to the front of the list; the removals follow it.
 */
static size_t plan_snapshot(struct cache *c, struct digest_list *dl, uint64_t need,
			    uint64_t *ret_bytes, int *ret_err)
{
	uint64_t bytes = 0;
	size_t n = 0;

	for (size_t k = 0; k < dl->n && bytes < need; k++) {
		int q = index_blob_snapshots(c->index, dl->b[k].d, is_protected, c);
		if (q < 0) {
			*ret_err = q;
			break;
		}
		if (q == 1)
			continue; /* a protected snapshot uses it too */
		bytes += dl->b[k].size;
		dl->b[n++] = dl->b[k];
	}
	*ret_bytes = bytes;
	return n;
}

static int evict_snapshots(struct cache *c, uint64_t want, uint64_t *freed)
{
	struct id_list ids = { 0 };
	int r;

	r = index_snapshots_lru(c->index, id_push, &ids);
	for (size_t i = 0; r >= 0 && i < ids.n && *freed < want; i++) {
		struct digest_list dl = { 0 };
		uint64_t plan_bytes = 0;
		size_t plan;

		if (is_protected(c, ids.ids[i]))
			continue;
		r = index_snapshot_blobs(c->index, ids.ids[i], digest_push, &dl);
		plan = r < 0 ? 0 : plan_snapshot(c, &dl, want - *freed, &plan_bytes, &r);
		if (r >= 0 && plan && c->evicting)
			c->evicting(c->evicting_ctx, ids.ids[i], plan, plan_bytes);
		for (size_t k = 0; r >= 0 && k < plan; k++) {
			int q = evict_blob(c, dl.b[k].d, freed);
			if (q == -EBUSY)
				continue; /* pinned: being served; it stays */
			if (q < 0)
				r = q;
		}
		free(dl.b);
	}
	free(ids.ids);
	return r < 0 ? r : 0;
}

int cache_evict(struct cache *c, uint64_t want, uint64_t *ret_freed)
{
	struct index_lru_cursor cur = { 0 };
	struct lru_page page;
	uint64_t freed = 0;
	int r = 0;

	/* Phase 1: blobs no snapshot uses (decoded tensors, leftovers), least recently used
	 * first: they cost no download to get back. */
	while (freed < want) {
		page.n = 0;
		r = index_lru_page(c->index, &cur, EVICT_PAGE, on_lru_blob, &page);
		if (r <= 0)
			break;
		for (unsigned i = 0; i < page.n && freed < want; i++) {
			uint64_t f = 0;
			int q = index_blob_snapshots(c->index, page.digest[i], NULL, NULL);
			if (q < 0) {
				r = q;
				goto out;
			}
			if (q > 0)
				continue; /* a snapshot's content: phase 2 decides */
			q = store_remove(c->store, page.digest[i], &f);
			if (q == -EBUSY)
				continue; /* pinned: being served or written */
			if (q < 0 && q != -ENOENT) {
				r = q;
				goto out;
			}
			freed += f;
			/* The row goes after the file: a crash in between leaves a row
			 * without a blob, which reconciliation drops. */
			if ((r = index_blob_delete(c->index, page.digest[i])) < 0)
				goto out;
		}
	}
	if (r >= 0 && freed < want)
		r = evict_snapshots(c, want, &freed);
out:
	if (r >= 0)
		r = index_flush(c->index);
	if (ret_freed)
		*ret_freed = freed;
	return r < 0 ? r : 0;
}

int cache_set_limits(struct cache *c, uint64_t max_size, uint64_t min_free, uint64_t *ret_freed,
		     uint64_t *ret_short)
{
	uint64_t shortfall = 0, freed = 0;
	int r;

	store_set_limits(c->store, max_size, min_free);
	/* store_shortfall() of an empty object counts its header: what is over is that less */
	r = store_shortfall(c->store, 0, &shortfall);
	shortfall = shortfall > STORE_HEADER_SIZE ? shortfall - STORE_HEADER_SIZE : 0;
	if (r == 0 && shortfall > 0)
		r = cache_evict(c, shortfall, &freed);
	if (r == 0 && shortfall > 0) {
		r = store_shortfall(c->store, 0, &shortfall);
		shortfall = shortfall > STORE_HEADER_SIZE ? shortfall - STORE_HEADER_SIZE : 0;
	}
	if (ret_freed)
		*ret_freed = freed;
	if (ret_short)
		*ret_short = shortfall;
	return r;
}

int cache_reserve(struct cache *c, uint64_t raw_size)
{
	/* Each round evicts what is missing; more rounds are needed only when other writers
	 * or other users of the file system take the freed space meanwhile. */
	for (int round = 0; round < RESERVE_ROUNDS; round++) {
		uint64_t need = 0, freed = 0;
		int r = store_reserve(c->store, raw_size);
		if (r != -DMC_E_CACHE_FULL)
			return r;
		if ((r = store_shortfall(c->store, raw_size, &need)) < 0)
			return r;
		if (need == 0)
			continue; /* space appeared meanwhile */
		if ((r = cache_evict(c, need, &freed)) < 0)
			return r;
		if (freed == 0)
			break;
	}
	return -DMC_E_CACHE_FULL;
}

int cache_record_blob(struct cache *c, const struct store_blob_info *info)
{
	struct index_blob b;
	memcpy(b.digest, info->digest, STORE_DIGEST_SIZE);
	b.kind = info->kind;
	b.raw_size = (int64_t)info->raw_size;
	b.stored_size = (int64_t)info->stored_size;
	b.last_access = 0;
	return index_blob_put(c->index, &b);
}

struct bad_list {
	size_t n, cap;
	uint8_t (*digest)[STORE_DIGEST_SIZE];
	int err;
};

static void on_bad_blob(void *ctx, const uint8_t digest[STORE_DIGEST_SIZE])
{
	struct bad_list *l = ctx;
	if (l->n == l->cap) {
		size_t cap = l->cap ? 2 * l->cap : 16;
		void *p = realloc(l->digest, cap * STORE_DIGEST_SIZE);
		if (!p) {
			l->err = -ENOMEM;
			return;
		}
		l->digest = p;
		l->cap = cap;
	}
	memcpy(l->digest[l->n++], digest, STORE_DIGEST_SIZE);
}

int cache_verify(struct cache *c, struct cache_verify_report *rep)
{
	struct bad_list l = { 0 };
	uint64_t ok = 0, bad = 0;
	int r = store_verify_all(c->store, on_bad_blob, &l, &ok, &bad);

	for (size_t i = 0; r >= 0 && i < l.n; i++)
		r = index_blob_delete(c->index, l.digest[i]);
	if (r >= 0)
		r = index_flush(c->index);
	/* Without the list (out of memory) the rows stay until the next reconciliation; reads
	 * of them miss meanwhile, since the files are gone. */
	if (r >= 0 && l.err < 0)
		r = l.err;
	free(l.digest);
	if (rep) {
		rep->ok = ok;
		rep->bad = bad;
	}
	return r;
}
