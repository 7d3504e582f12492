/*
 * cache_settle: the background reconciliation (cache.h, cache_settle_*). The directories
 * of objects/ that cache_open() left past its deadline are merged with their index rows
 * one at a time while the daemon serves and writes, as cache_reconcile() merges them at
 * start, in three steps: the rows and the directory's change count read on the index's
 * thread, the listing and the checks on any thread (store only), the repairs written on
 * the index's thread again if the directory's names did not change meanwhile.
 *
 * Why the change count suffices: a publication renames the blob into objects/<b>/ before
 * its row is written, and a removal unlinks before its row goes; both count a change of
 * <b> under the store's lock (store_dir_gen()). If the count taken before the rows were
 * read is unchanged when the repairs are written, the listing and the rows describe the
 * same directory: a row without its file is a blob gone (its row is due to go or was
 * lost), a file without a row a blob whose row was lost or is still to come (adopting it
 * writes the same row). Otherwise the walk is thrown away and begun again.
 *
 * cache_settle_now() is the same walk of one directory at once, for cache_reconcile() (the
 * start's walk, no writer running): one merge for both.
 *
 * Threads: cache_settle_begin(), cache_settle_end() and cache_settle_now() on the index's
 * thread; cache_settle_work() on any one thread, touching only the store and `w`.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "proto.h"

struct cache_settle {
	struct store *s;
	unsigned b;
	uint64_t gen;
	int err;
	/* the rows, read by begin */
	struct index_blob *rows;
	size_t nrows, rows_cap;
	/* the listing */
	uint8_t (*names)[STORE_DIGEST_SIZE];
	size_t names_cap;
	/* what work found: the directory's bytes and blobs, rows to drop, rows to write */
	uint64_t bytes, objects, files_removed;
	uint8_t (*drop)[STORE_DIGEST_SIZE];
	size_t ndrop, drop_cap;
	struct index_blob *put;
	size_t nput, put_cap;
	int64_t adopted; /* of `put`, those that had no row */
};

static int grow(void **v, size_t *cap, size_t n, size_t size)
{
	if (n < *cap)
		return 0;
	size_t ncap = *cap ? 2 * *cap : 64;
	void *p = realloc(*v, ncap * size);
	if (!p)
		return -ENOMEM;
	*v = p;
	*cap = ncap;
	return 0;
}

static int row_push(void *ctx, const struct index_blob *b)
{
	struct cache_settle *w = ctx;
	if (grow((void **)&w->rows, &w->rows_cap, w->nrows, sizeof(*w->rows)) < 0)
		return -ENOMEM;
	w->rows[w->nrows++] = *b;
	return 0;
}

unsigned cache_settle_left(const struct cache *c)
{
	return c ? c->n_unsettled : 0;
}

unsigned cache_settle_dir(const struct cache_settle *w)
{
	return w->b;
}

void cache_settle_abort(struct cache_settle *w)
{
	if (!w)
		return;
	free(w->rows);
	free(w->names);
	free(w->drop);
	free(w->put);
	free(w);
}

/* A walk of objects/<b>/: its change count, then its rows. */
static int settle_new(struct cache *c, unsigned b, struct cache_settle **ret)
{
	struct cache_settle *w = calloc(1, sizeof(*w));
	int r;

	*ret = NULL;
	if (!w)
		return -ENOMEM;
	w->s = c->store;
	w->b = b;
	w->gen = store_dir_gen(c->store, b);
	r = index_blobs_first_byte(c->index, b, row_push, w);
	if (r < 0) {
		cache_settle_abort(w);
		return r;
	}
	*ret = w;
	return 0;
}

int cache_settle_begin(struct cache *c, struct cache_settle **ret)
{
	unsigned b;

	*ret = NULL;
	if (!c->n_unsettled)
		return 0;
	/* round robin from the last one tried: a directory begun again goes behind the rest */
	for (unsigned i = 0;; i++) {
		b = (c->settle_next + i) % 256;
		if (c->unsettled[b / 8] & (1u << (b % 8)))
			break;
	}
	c->settle_next = (b + 1) % 256;
	return settle_new(c, b, ret);
}

static int drop_push(struct cache_settle *w, const uint8_t *digest)
{
	if (grow((void **)&w->drop, &w->drop_cap, w->ndrop, sizeof(*w->drop)) < 0)
		return -ENOMEM;
	memcpy(w->drop[w->ndrop++], digest, STORE_DIGEST_SIZE);
	return 0;
}

/* A blob without a row, or whose row disagrees with its file: the full header check; a
 * good one's row is to be written from its header, a bad one is quarantined and its row
 * (if any) to be dropped. The index is not touched here (write_repairs()). */
static int check(struct cache_settle *w, const uint8_t *digest, bool had_row)
{
	struct store_blob_info info;
	struct index_blob *p;
	int r = store_scan_adopt(w->s, digest, &info);

	if (r == -DMC_E_INTEGRITY) {
		w->files_removed++;
		return had_row ? drop_push(w, digest) : 0;
	}
	if (r == -ENOENT) /* gone since the listing: its change is counted, begun again */
		return had_row ? drop_push(w, digest) : 0;
	if (r < 0)
		return r;
	if (grow((void **)&w->put, &w->put_cap, w->nput, sizeof(*w->put)) < 0)
		return -ENOMEM;
	p = &w->put[w->nput++];
	memcpy(p->digest, info.digest, STORE_DIGEST_SIZE);
	p->kind = info.kind;
	p->raw_size = (int64_t)info.raw_size;
	p->stored_size = (int64_t)info.stored_size;
	p->last_access = info.mtime_ms; /* used only when the row is new */
	if (!had_row)
		w->adopted++;
	w->bytes += info.file_size;
	w->objects++;
	return 0;
}

void cache_settle_work(struct cache_settle *w)
{
	struct store *s = w->s;
	size_t n = 0, i = 0, k = 0;
	uint64_t removed = 0;
	int r;

	r = store_scan_list(s, w->b, &w->names, &w->names_cap, &n, &removed);
	w->files_removed += removed;
	while (r >= 0 && (i < n || k < w->nrows)) {
		int cmp = i == n ? 1 : k == w->nrows ? -1 :
			  memcmp(w->names[i], w->rows[k].digest, STORE_DIGEST_SIZE);
		if (cmp < 0) { /* a file without a row */
			r = check(w, w->names[i++], false);
		} else if (cmp > 0) { /* a row without its file */
			r = drop_push(w, w->rows[k++].digest);
		} else {
			const struct index_blob *row = &w->rows[k++];
			uint64_t size = 0;
			int q = 0;
			if (row->raw_size >= 0 && row->stored_size >= 0)
				q = store_scan_known(s, w->names[i], (uint64_t)row->raw_size,
						     (uint64_t)row->stored_size, &size);
			if (q == -ENOENT) {
				r = drop_push(w, w->names[i]);
			} else if (q < 0) {
				r = q;
			} else if (q == 1) {
				w->bytes += size;
				w->objects++;
			} else {
				r = check(w, w->names[i], true);
			}
			i++;
		}
	}
	w->err = r < 0 ? r : 0;
}

/* The repairs of a walk written and flushed: rows of blobs gone or bad dropped, rows of
 * blobs without one (or of another size) written from their headers. */
static int write_repairs(struct cache *c, const struct cache_settle *w)
{
	int r = 0;
	for (size_t i = 0; i < w->ndrop && r >= 0; i++)
		r = index_blob_delete(c->index, w->drop[i]);
	for (size_t i = 0; i < w->nput && r >= 0; i++)
		r = index_blob_seen(c->index, 0, &w->put[i]);
	return r < 0 ? r : index_flush(c->index);
}

int cache_settle_now(struct cache *c, unsigned b, struct cache_open_report *rep,
		     uint64_t *ret_objects, uint64_t *ret_bytes)
{
	struct cache_settle *w;
	int r = settle_new(c, b, &w);

	if (r < 0)
		return r;
	cache_settle_work(w);
	/* what was removed is gone even if the repairs cannot be written */
	rep->files_removed += w->files_removed;
	if ((r = w->err) >= 0 && (r = write_repairs(c, w)) >= 0) {
		rep->rows_dropped += (int64_t)w->ndrop;
		rep->adopted += w->adopted;
		*ret_objects = w->objects;
		*ret_bytes = w->bytes;
	}
	cache_settle_abort(w);
	return r < 0 ? r : 0;
}

int cache_settle_end(struct cache *c, struct cache_settle *w)
{
	struct cache_settle_report *rep = &c->settle_rep;
	unsigned b = w->b;
	int r = w->err;

	if (r < 0)
		goto out;
	if (!store_dir_settle(c->store, b, w->gen, w->bytes, w->objects)) {
		rep->retries++;
		rep->files_removed += w->files_removed; /* quarantined all the same */
		r = 0;
		goto out;
	}
	if ((r = write_repairs(c, w)) < 0) {
		/* the accounting stands (it is the directory's), the rows are walked again */
		goto out;
	}
	rep->rows_dropped += (int64_t)w->ndrop;
	rep->adopted += w->adopted;
	rep->files_removed += w->files_removed;
	rep->dirs++;
	c->dir_objects[b] = w->objects;
	c->dir_bytes[b] = w->bytes;
	c->unsettled[b / 8] &= (uint8_t)~(1u << (b % 8));
	c->n_unsettled--;
	store_dir_settled(c->store);
	r = 1;
	if (!c->n_unsettled) {
		/* the eviction cache_open() left: within max_size and min_free again */
		uint64_t shortfall = 0, freed = 0;
		int q = store_shortfall(c->store, 0, &shortfall);
		if (q == 0 && shortfall > 0)
			q = cache_evict(c, shortfall, &freed);
		rep->evicted_bytes += freed;
		if (q < 0)
			r = q;
	}
out:
	cache_settle_abort(w);
	return r;
}
