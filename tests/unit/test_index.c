/*
 * Unit tests of daemon/index.c against a real SQLite database in a temporary directory:
 * schema and migration guard, snapshots, items in order with paging, batching and what a
 * flush makes durable, the diff of a new version, blobs and LRU order, reconciliation
 * passes, corrupt databases rebuilt, and the exclusive lock.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "index.h"
#include "proto.h"
#include "task.h"

struct fixture {
	char dir[64];
	char path[128];
	struct index *ix;
};

static int fx_open(struct fixture *fx)
{
	char err[256] = "";
	bool rebuilt = true;
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/dmc-index-XXXXXX");
	if (!mkdtemp(fx->dir))
		return -errno;
	snprintf(fx->path, sizeof(fx->path), "%s/index.db", fx->dir);
	int r = index_open(fx->path, 0, err, sizeof(err), &fx->ix, &rebuilt);
	if (r < 0)
		printf("# index_open: %d %s\n", r, err);
	else if (rebuilt)
		r = -EINVAL; /* a fresh database is created, not rebuilt */
	return r;
}

static int fx_reopen(struct fixture *fx, bool *ret_rebuilt)
{
	char err[256] = "";
	index_close(fx->ix);
	fx->ix = NULL;
	int r = index_open(fx->path, 0, err, sizeof(err), &fx->ix, ret_rebuilt);
	if (r < 0)
		printf("# index_open: %d %s\n", r, err);
	return r;
}

static void fx_close(struct fixture *fx)
{
	index_close(fx->ix);
	fx->ix = NULL;
	task_rm_tree(fx->dir);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void digest_of_int(int64_t v, uint8_t d[32])
{
	/* Distinct, well-spread test digests. */
	uint64_t x = (uint64_t)v * 0x9e3779b97f4a7c15ull + 1;
	for (int i = 0; i < 32; i++) {
		x ^= x >> 29;
		x *= 0xbf58476d1ce4e5b9ull;
		d[i] = (uint8_t)(x >> 56);
	}
}

static int64_t new_snapshot(struct index *ix, const char *project, const char *version)
{
	struct index_snapshot k = {
		.source = INDEX_SOURCE_DATAMINT,
		.server_url = "https://api.datamint.io",
		.project_id = project,
		.project_name = "Chest CT",
		.version = version,
		.created_at = 1700000000,
	};
	int64_t id = -1;
	bool created = false;
	if (index_snapshot_get_or_create(ix, &k, &id, &created) < 0 || !created)
		return -1;
	return id;
}

/* Item i of a synthetic project: resource "r<i>", size and etag derived from i and `gen`. */
static int put_item(struct index *ix, int64_t snap, int64_t i, int gen)
{
	char rid[32], fname[48], etag[48], meta[96];
	snprintf(rid, sizeof(rid), "r%06lld", (long long)i);
	snprintf(fname, sizeof(fname), "img_%06lld.dcm", (long long)i);
	snprintf(etag, sizeof(etag), "e%lld-%d", (long long)i, gen);
	int n = snprintf(meta, sizeof(meta), "{\"id\":\"%s\",\"labels\":[\"l%lld\"]}", rid,
			 (long long)(i % 5));
	struct index_item it = {
		.snapshot_id = snap,
		.idx = i,
		.resource_id = rid,
		.filename = fname,
		.mimetype = "application/dicom",
		.size = 1000 + i,
		.etag = etag,
		.meta = meta,
		.meta_len = (size_t)n,
	};
	return index_item_put(ix, &it);
}

static int put_blob(struct index *ix, int64_t v)
{
	struct index_blob b = { .kind = 1, .raw_size = 1000 + v, .stored_size = 900 + v };
	digest_of_int(v, b.digest);
	return index_blob_put(ix, &b);
}

/* ---- tests ---- */

static int count_snap(void *ctx, const struct index_snapshot *s)
{
	(void)s;
	(*(int *)ctx)++;
	return 0;
}

struct snap_copy {
	struct index_snapshot s;
	char version[64], name[64];
};

static int copy_snap(void *ctx, const struct index_snapshot *s)
{
	struct snap_copy *c = ctx;
	c->s = *s;
	snprintf(c->version, sizeof(c->version), "%s", s->version);
	snprintf(c->name, sizeof(c->name), "%s", s->project_name);
	c->s.version = c->version;
	c->s.project_name = c->name;
	c->s.server_url = c->s.project_id = NULL;
	return 0;
}

TEST(snapshots)
{
	struct fixture fx;
	struct snap_copy c;
	int64_t a, b, id;
	bool created = true;
	int n = 0;

	ASSERT_EQ(fx_open(&fx), 0);
	a = new_snapshot(fx.ix, "p1", "2025-01-01T00:00:00.000Z");
	b = new_snapshot(fx.ix, "p1", "2025-02-01T00:00:00.000Z");
	ASSERT_GT(a, 0);
	ASSERT_GT(b, a);
	struct index_snapshot k = { .source = INDEX_SOURCE_DATAMINT,
				    .server_url = "https://api.datamint.io",
				    .project_id = "p1",
				    .project_name = "ignored",
				    .version = "2025-01-01T00:00:00.000Z" };
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &id, &created), 0);
	ASSERT_EQ(id, a);
	ASSERT(!created);
	/* Another source or server is another snapshot. */
	k.source = INDEX_SOURCE_FOLDER;
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &id, &created), 0);
	ASSERT(created);
	ASSERT_NE(id, a);
	k.source = 9;
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &id, &created), -EINVAL);
	ASSERT_EQ(index_snapshot_find(fx.ix, INDEX_SOURCE_DATAMINT, "https://api.datamint.io", "p2",
				      "v", 0, &id),
		  -ENOENT);

	for (int i = 0; i < 10; i++)
		ASSERT_EQ(put_item(fx.ix, a, i, 0), 0);
	ASSERT_EQ(index_snapshot_get(fx.ix, a, copy_snap, &c), 0);
	ASSERT(!c.s.sealed);
	ASSERT_EQ(index_snapshot_seal(fx.ix, a), 0);
	ASSERT_EQ(index_snapshot_set_complete(fx.ix, a, true), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(index_snapshot_get(fx.ix, a, copy_snap, &c), 0);
	ASSERT(c.s.sealed);
	ASSERT(c.s.complete);
	ASSERT_EQ(c.s.item_count, 10);
	ASSERT_EQ(c.s.total_bytes, 10 * 1000 + 45);
	ASSERT_STR_EQ(c.version, "2025-01-01T00:00:00.000Z");
	ASSERT_STR_EQ(c.name, "Chest CT");
	ASSERT_EQ(index_snapshot_list(fx.ix, count_snap, &n), 0);
	ASSERT_EQ(n, 3);

	struct index_snapshot_stats st;
	ASSERT_EQ(index_snapshot_stats(fx.ix, a, &st), 0);
	ASSERT_EQ(st.items, 10);
	ASSERT_EQ(st.items_stored, 0);
	ASSERT_EQ(st.bytes, 10045);
	ASSERT_EQ(st.bytes_stored, 0);

	/* Deleting one snapshot leaves the others and their items alone. */
	ASSERT_EQ(put_item(fx.ix, b, 0, 0), 0);
	ASSERT_EQ(index_snapshot_delete(fx.ix, a), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(index_snapshot_get(fx.ix, a, copy_snap, &c), -ENOENT);
	ASSERT_EQ(index_item_get(fx.ix, a, 3, NULL, NULL), -ENOENT);
	ASSERT_EQ(index_item_get(fx.ix, b, 0, NULL, NULL), 0);
	n = 0;
	ASSERT_EQ(index_snapshot_list(fx.ix, count_snap, &n), 0);
	ASSERT_EQ(n, 2);
	fx_close(&fx);
}

struct item_copy {
	struct index_item it;
	char rid[64], etag[64], meta[128];
};

static int copy_item(void *ctx, const struct index_item *it)
{
	struct item_copy *c = ctx;
	c->it = *it;
	snprintf(c->rid, sizeof(c->rid), "%s", it->resource_id);
	snprintf(c->etag, sizeof(c->etag), "%s", it->etag ? it->etag : "(null)");
	snprintf(c->meta, sizeof(c->meta), "%.*s", (int)it->meta_len, it->meta ? it->meta : "");
	return 0;
}

TEST(items_and_limits)
{
	struct fixture fx;
	struct item_copy c;
	uint8_t d[32];
	int64_t s;

	ASSERT_EQ(fx_open(&fx), 0);
	s = new_snapshot(fx.ix, "p", "v1");
	ASSERT_EQ(put_item(fx.ix, s, 7, 0), 0);
	ASSERT_EQ(index_item_get(fx.ix, s, 7, copy_item, &c), 0);
	ASSERT_EQ(c.it.snapshot_id, s);
	ASSERT_EQ(c.it.idx, 7);
	ASSERT_STR_EQ(c.rid, "r000007");
	ASSERT_STR_EQ(c.etag, "e7-0");
	ASSERT_STR_EQ(c.meta, "{\"id\":\"r000007\",\"labels\":[\"l2\"]}");
	ASSERT_EQ(c.it.size, 1007);
	ASSERT(!c.it.has_blob);
	ASSERT(!c.it.stored);

	/* A digest makes it known; a blobs row makes it stored. */
	digest_of_int(7, d);
	ASSERT_EQ(index_item_set_blob(fx.ix, s, 7, d), 0);
	ASSERT_EQ(index_item_get(fx.ix, s, 7, copy_item, &c), 0);
	ASSERT(c.it.has_blob);
	ASSERT_MEM_EQ(c.it.blob, d, 32);
	ASSERT(!c.it.stored);
	ASSERT_EQ(put_blob(fx.ix, 7), 0);
	ASSERT_EQ(index_item_get(fx.ix, s, 7, copy_item, &c), 0);
	ASSERT(c.it.stored);
	ASSERT_EQ(index_blob_delete(fx.ix, d), 0);
	ASSERT_EQ(index_item_get(fx.ix, s, 7, copy_item, &c), 0);
	ASSERT(c.it.has_blob);
	ASSERT(!c.it.stored);
	ASSERT_EQ(index_item_set_blob(fx.ix, s, 8, d), -ENOENT);

	/* Limits and bad keys. */
	struct index_item it = { .snapshot_id = s, .idx = 1, .resource_id = "r",
				 .filename = "f", .mimetype = "m", .size = 1 };
	char *big = malloc(INDEX_STR_MAX + 2);
	memset(big, 'x', INDEX_STR_MAX + 1);
	big[INDEX_STR_MAX + 1] = '\0';
	it.filename = big;
	ASSERT_EQ(index_item_put(fx.ix, &it), -DMC_E_LIMIT_EXCEEDED);
	big[INDEX_STR_MAX] = '\0';
	ASSERT_EQ(index_item_put(fx.ix, &it), 0);
	it.filename = "f";
	it.meta = big;
	it.meta_len = INDEX_META_MAX + 1;
	ASSERT_EQ(index_item_put(fx.ix, &it), -DMC_E_LIMIT_EXCEEDED);
	it.meta = NULL;
	it.idx = INDEX_ITEMS_MAX;
	ASSERT_EQ(index_item_put(fx.ix, &it), -EINVAL);
	it.idx = -1;
	ASSERT_EQ(index_item_put(fx.ix, &it), -EINVAL);
	it.idx = 2;
	it.snapshot_id = 0;
	ASSERT_EQ(index_item_put(fx.ix, &it), -EINVAL);
	it.snapshot_id = s;
	it.resource_id = NULL;
	ASSERT_EQ(index_item_put(fx.ix, &it), -EINVAL);
	it.resource_id = "r";
	it.size = -5;
	ASSERT_EQ(index_item_put(fx.ix, &it), -EINVAL);
	free(big);
	ASSERT_EQ(index_items_page(fx.ix, s, 0, 0, INDEX_ITEMS_ALL, NULL, NULL, NULL), -EINVAL);
	ASSERT_EQ(index_items_page(fx.ix, s, 0, INDEX_PAGE_MAX + 1, INDEX_ITEMS_ALL, NULL, NULL,
				   NULL),
		  -EINVAL);
	fx_close(&fx);
}

struct walk {
	int64_t expect;
	int64_t step;
	int bad;
	int64_t n;
};

static int check_order(void *ctx, const struct index_item *it)
{
	struct walk *w = ctx;
	char rid[32];
	snprintf(rid, sizeof(rid), "r%06lld", (long long)it->idx);
	if (it->idx != w->expect || strcmp(it->resource_id, rid) != 0 || it->size != 1000 + it->idx)
		w->bad++;
	w->expect += w->step;
	w->n++;
	return 0;
}

TEST(batched_100k_items_and_paging)
{
	struct fixture fx;
	const int64_t N = 100000;
	int64_t s, next = 0;
	double t0, t1, t2, t3;

	ASSERT_EQ(fx_open(&fx), 0);
	s = new_snapshot(fx.ix, "big", "v1");
	ASSERT_EQ(index_flush(fx.ix), 0);

	t0 = now_s();
	for (int64_t i = 0; i < N; i++) {
		ASSERT_EQ(put_item(fx.ix, s, i, 0), 0);
		if (index_pending(fx.ix) >= 5000)
			ASSERT_EQ(index_flush(fx.ix), 0);
	}
	ASSERT_EQ(index_snapshot_seal(fx.ix, s), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	t1 = now_s();
	printf("# %lld items inserted in batches of 5000: %.0f items/s\n", (long long)N,
	       (double)N / (t1 - t0));
	/* ASan slows this down a lot; the bound is a sanity check, not a benchmark. */
	ASSERT_LT(t1 - t0, 30.0);

	/* Paging visits every item once, in order. */
	struct walk w = { 0, 1, 0, 0 };
	int pages = 0;
	while (next >= 0) {
		int r = index_items_page(fx.ix, s, next, 4096, INDEX_ITEMS_ALL, check_order, &w,
					 &next);
		ASSERT_GE(r, 0);
		pages++;
	}
	t2 = now_s();
	ASSERT_EQ(w.bad, 0);
	ASSERT_EQ(w.n, N);
	ASSERT_EQ(pages, (N + 4095) / 4096);
	printf("# paged through %lld items: %.0f items/s\n", (long long)N, (double)N / (t2 - t1));

	/* Point lookups by position, as the serving side does. */
	uint64_t x = 12345;
	int misses = 0;
	for (int k = 0; k < 50000; k++) {
		struct item_copy c;
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		int64_t i = (int64_t)((x >> 33) % (uint64_t)N);
		if (index_item_get(fx.ix, s, i, copy_item, &c) != 0 || c.it.idx != i)
			misses++;
	}
	t3 = now_s();
	ASSERT_EQ(misses, 0);
	printf("# random point lookups: %.0f /s\n", 50000 / (t3 - t2));

	/* Paging from the middle and past the end. */
	w = (struct walk){ N - 10, 1, 0, 0 };
	ASSERT_EQ(index_items_page(fx.ix, s, N - 10, 100, INDEX_ITEMS_ALL, check_order, &w, &next),
		  10);
	ASSERT_EQ(next, -1);
	ASSERT_EQ(w.bad, 0);
	ASSERT_EQ(index_items_page(fx.ix, s, N, 100, INDEX_ITEMS_ALL, check_order, &w, &next), 0);
	ASSERT_EQ(next, -1);

	struct snap_copy c;
	ASSERT_EQ(index_snapshot_get(fx.ix, s, copy_snap, &c), 0);
	ASSERT_EQ(c.s.item_count, N);
	ASSERT_EQ(c.s.total_bytes, N * 1000 + N * (N - 1) / 2);
	fx_close(&fx);
}

TEST(flush_is_the_durability_point)
{
	struct fixture fx;
	int64_t s;
	bool rebuilt = true;

	ASSERT_EQ(fx_open(&fx), 0);
	s = new_snapshot(fx.ix, "p", "v");
	for (int i = 0; i < 100; i++)
		ASSERT_EQ(put_item(fx.ix, s, i, 0), 0);
	ASSERT_EQ(index_pending(fx.ix), 101);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(index_pending(fx.ix), 0);
	ASSERT_EQ(index_flush(fx.ix), 0); /* nothing pending: a no-op */
	for (int i = 100; i < 150; i++)
		ASSERT_EQ(put_item(fx.ix, s, i, 0), 0);
	/* Reads see the pending batch... */
	ASSERT_EQ(index_item_get(fx.ix, s, 149, NULL, NULL), 0);
	/* ...which is gone if it never reaches index_flush(). */
	ASSERT_EQ(fx_reopen(&fx, &rebuilt), 0);
	ASSERT(!rebuilt);
	ASSERT_EQ(index_item_get(fx.ix, s, 99, NULL, NULL), 0);
	ASSERT_EQ(index_item_get(fx.ix, s, 100, NULL, NULL), -ENOENT);
	ASSERT_EQ(index_check(fx.ix, true), 0);
	fx_close(&fx);
}

struct missing {
	int n;
	int64_t idx[16];
};

static int collect_missing(void *ctx, const struct index_item *it)
{
	struct missing *m = ctx;
	if (m->n < 16)
		m->idx[m->n] = it->idx;
	m->n++;
	return 0;
}

TEST(new_version_downloads_only_the_difference)
{
	struct fixture fx;
	uint8_t d[32];
	int64_t v1, v2, linked = -1, next;

	ASSERT_EQ(fx_open(&fx), 0);
	/* Version 1: 10 items, all stored. */
	v1 = new_snapshot(fx.ix, "proj", "2025-01-01");
	for (int i = 0; i < 10; i++) {
		ASSERT_EQ(put_item(fx.ix, v1, i, 0), 0);
		digest_of_int(i, d);
		ASSERT_EQ(put_blob(fx.ix, i), 0);
		ASSERT_EQ(index_item_set_blob(fx.ix, v1, i, d), 0);
	}
	ASSERT_EQ(index_flush(fx.ix), 0);

	/* Version 2: items 0-5 unchanged (at shifted positions), item 6 changed (new etag),
	 * item 7 deleted, items 8-9 unchanged, plus two new resources 10 and 11. Item 9's
	 * blob was evicted meanwhile, so it must be fetched again. */
	v2 = new_snapshot(fx.ix, "proj", "2025-02-01");
	static const int order[] = { 10, 0, 1, 2, 3, 4, 5, 6, 8, 9, 11 };
	for (int k = 0; k < 11; k++) {
		int i = order[k];
		char rid[16], etag[16];
		snprintf(rid, sizeof(rid), "r%06d", i);
		snprintf(etag, sizeof(etag), "e%d-%d", i, i == 6 ? 1 : 0);
		struct index_item it = { .snapshot_id = v2, .idx = k, .resource_id = rid,
					 .filename = "f", .mimetype = "application/dicom",
					 .size = 1000 + i, .etag = etag };
		ASSERT_EQ(index_item_put(fx.ix, &it), 0);
	}
	/* Same resource and etag but another size is not the same content. */
	struct index_item odd = { .snapshot_id = v2, .idx = 11, .resource_id = "r000003",
				  .filename = "f", .mimetype = "m", .size = 5, .etag = "e3-0" };
	ASSERT_EQ(index_item_put(fx.ix, &odd), 0);
	digest_of_int(9, d);
	ASSERT_EQ(index_blob_delete(fx.ix, d), 0);

	ASSERT_EQ(index_snapshot_link_stored(fx.ix, v2, &linked), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(linked, 7); /* 0-5 and 8 */

	struct missing m = { 0 };
	ASSERT_EQ(index_items_page(fx.ix, v2, 0, 100, INDEX_ITEMS_MISSING, collect_missing, &m,
				   &next),
		  5);
	ASSERT_EQ(m.n, 5);
	ASSERT_EQ(m.idx[0], 0);  /* r10: new */
	ASSERT_EQ(m.idx[1], 7);  /* r6: changed */
	ASSERT_EQ(m.idx[2], 9);  /* r9: evicted */
	ASSERT_EQ(m.idx[3], 10); /* r11: new */
	ASSERT_EQ(m.idx[4], 11); /* r3 with another size */
	ASSERT_EQ(next, -1);

	/* Linked items carry the content digest of version 1. */
	struct item_copy c;
	ASSERT_EQ(index_item_get(fx.ix, v2, 1, copy_item, &c), 0);
	digest_of_int(0, d);
	ASSERT(c.it.stored);
	ASSERT_MEM_EQ(c.it.blob, d, 32);

	/* The single-resource form of the same question. */
	ASSERT_EQ(index_item_find_stored(fx.ix, "r000004", 1004, "e4-0", d), 0);
	uint8_t e[32];
	digest_of_int(4, e);
	ASSERT_MEM_EQ(d, e, 32);
	ASSERT_EQ(index_item_find_stored(fx.ix, "r000004", 1004, "e4-1", d), -ENOENT);
	ASSERT_EQ(index_item_find_stored(fx.ix, "r000004", 1004, NULL, d), -ENOENT);
	ASSERT_EQ(index_item_find_stored(fx.ix, "r000009", 1009, "e9-0", d), -ENOENT);

	/* The old version stays usable, with its live counts. */
	struct index_snapshot_stats st;
	ASSERT_EQ(index_snapshot_stats(fx.ix, v1, &st), 0);
	ASSERT_EQ(st.items, 10);
	ASSERT_EQ(st.items_stored, 9);
	ASSERT_EQ(st.bytes_stored, 10 * 1000 + 45 - 1009);
	ASSERT_EQ(index_snapshot_stats(fx.ix, v2, &st), 0);
	ASSERT_EQ(st.items, 12);
	ASSERT_EQ(st.items_stored, 7);

	/* Running the diff again links nothing more. */
	ASSERT_EQ(index_snapshot_link_stored(fx.ix, v2, &linked), 0);
	ASSERT_EQ(linked, 0);
	fx_close(&fx);
}

struct lru {
	int n;
	int64_t last;
	uint8_t d[16][32];
	int unordered;
};

static int collect_lru(void *ctx, const struct index_blob *b)
{
	struct lru *l = ctx;
	if (l->n > 0 && b->last_access <= l->last)
		l->unordered++;
	l->last = b->last_access;
	if (l->n < 16)
		memcpy(l->d[l->n], b->digest, 32);
	l->n++;
	return 0;
}

TEST(blobs_and_lru_order)
{
	struct fixture fx;
	struct index_blob b;
	uint8_t d[32];
	int64_t count = 0, bytes = 0;

	ASSERT_EQ(fx_open(&fx), 0);
	for (int i = 0; i < 10; i++)
		ASSERT_EQ(put_blob(fx.ix, i), 0);
	digest_of_int(3, d);
	ASSERT_EQ(index_blob_touch(fx.ix, d), 0);
	digest_of_int(1, d);
	ASSERT_EQ(index_blob_touch(fx.ix, d), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);

	ASSERT_EQ(index_blob_get(fx.ix, d, &b), 0);
	ASSERT_EQ(b.kind, 1);
	ASSERT_EQ(b.raw_size, 1001);
	ASSERT_EQ(b.stored_size, 901);
	ASSERT_EQ(index_blob_totals(fx.ix, &count, &bytes), 0);
	ASSERT_EQ(count, 10);
	ASSERT_EQ(bytes, 10 * 900 + 45);

	/* Oldest first, pages of 3 through the cursor, strictly increasing access times. */
	static const int expect[] = { 0, 2, 4, 5, 6, 7, 8, 9, 3, 1 };
	struct index_lru_cursor cur = { 0 };
	struct lru l = { 0 };
	int r, pages = 0;
	while ((r = index_lru_page(fx.ix, &cur, 3, collect_lru, &l)) > 0)
		pages++;
	ASSERT_EQ(r, 0);
	ASSERT_EQ(pages, 4);
	ASSERT_EQ(l.n, 10);
	ASSERT_EQ(l.unordered, 0);
	for (int i = 0; i < 10; i++) {
		digest_of_int(expect[i], d);
		ASSERT_MEM_EQ(l.d[i], d, 32);
	}

	/* Access times survive a reopen and keep increasing after it. */
	bool rebuilt = true;
	ASSERT_EQ(fx_reopen(&fx, &rebuilt), 0);
	digest_of_int(0, d);
	ASSERT_EQ(index_blob_touch(fx.ix, d), 0);
	ASSERT_EQ(index_blob_get(fx.ix, d, &b), 0);
	ASSERT_GT(b.last_access, l.last);
	fx_close(&fx);
}

TEST(reconcile_pass)
{
	struct fixture fx;
	int64_t pass = 0, dropped = -1, count = 0;
	struct index_blob b;
	uint8_t d[32];

	ASSERT_EQ(fx_open(&fx), 0);
	for (int i = 0; i < 6; i++)
		ASSERT_EQ(put_blob(fx.ix, i), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	digest_of_int(2, d);
	ASSERT_EQ(index_blob_get(fx.ix, d, &b), 0);
	int64_t kept_access = b.last_access;

	/* The store reports blobs 0, 2 (with corrected sizes), 4 and a new one, 100. */
	ASSERT_EQ(index_reconcile_begin(fx.ix, &pass), 0);
	ASSERT_GT(pass, 0);
	static const int found[] = { 0, 2, 4, 100 };
	for (int k = 0; k < 4; k++) {
		struct index_blob f = { .kind = 2, .raw_size = 77, .stored_size = 55,
					.last_access = 1234 };
		digest_of_int(found[k], f.digest);
		ASSERT_EQ(index_blob_seen(fx.ix, pass, &f), 0);
	}
	ASSERT_EQ(index_reconcile_end(fx.ix, pass, &dropped), 0);
	ASSERT_EQ(dropped, 3); /* 1, 3, 5 */
	ASSERT_EQ(index_pending(fx.ix), 0);
	ASSERT_EQ(index_blob_totals(fx.ix, &count, NULL), 0);
	ASSERT_EQ(count, 4);
	ASSERT_EQ(index_blob_get(fx.ix, d, &b), 0);
	ASSERT_EQ(b.kind, 2);
	ASSERT_EQ(b.raw_size, 77);
	ASSERT_EQ(b.last_access, kept_access); /* kept for known blobs */
	digest_of_int(100, d);
	ASSERT_EQ(index_blob_get(fx.ix, d, &b), 0);
	ASSERT_EQ(b.last_access, 1234); /* adopted with the given time */
	digest_of_int(3, d);
	ASSERT_EQ(index_blob_get(fx.ix, d, &b), -ENOENT);

	/* The next pass is a new number: rows of this one would otherwise survive it. */
	int64_t pass2 = 0;
	ASSERT_EQ(index_reconcile_begin(fx.ix, &pass2), 0);
	ASSERT_GT(pass2, pass);
	fx_close(&fx);
}

struct byte_walk {
	int n;
	uint8_t seen[8][32];
};

static int on_byte_blob(void *ctx, const struct index_blob *b)
{
	struct byte_walk *w = ctx;
	if (w->n < 8)
		memcpy(w->seen[w->n], b->digest, 32);
	w->n++;
	return 0;
}

/* index_blobs_first_byte: exactly the rows of one first byte, in digest order, the last
 * byte (0xff, whose range has no next byte) included. */
TEST(blobs_by_first_byte)
{
	static const uint8_t firsts[] = { 0x00, 0x01, 0x7f, 0xff, 0xff, 0x7f };
	static const uint8_t seconds[] = { 0x00, 0xff, 0x20, 0xff, 0x00, 0x10 };
	struct fixture fx;
	struct byte_walk w;

	ASSERT_EQ(fx_open(&fx), 0);
	for (int i = 0; i < 6; i++) {
		struct index_blob b = { .kind = 1, .raw_size = 10, .stored_size = 10 };
		memset(b.digest, 0xab, sizeof(b.digest));
		b.digest[0] = firsts[i];
		b.digest[1] = seconds[i];
		ASSERT_EQ(index_blob_put(fx.ix, &b), 0);
	}
	ASSERT_EQ(index_flush(fx.ix), 0);
	static const struct {
		unsigned first;
		int n;
		uint8_t second[2];
	} want[] = { { 0x00, 1, { 0x00 } }, { 0x01, 1, { 0xff } }, { 0x02, 0, { 0 } },
		     { 0x7f, 2, { 0x10, 0x20 } }, { 0xfe, 0, { 0 } }, { 0xff, 2, { 0x00, 0xff } } };
	for (size_t k = 0; k < sizeof(want) / sizeof(want[0]); k++) {
		memset(&w, 0, sizeof(w));
		ASSERT_EQ(index_blobs_first_byte(fx.ix, want[k].first, on_byte_blob, &w),
			  want[k].n);
		ASSERT_EQ(w.n, want[k].n);
		for (int i = 0; i < want[k].n; i++) {
			ASSERT_EQ(w.seen[i][0], want[k].first);
			ASSERT_EQ(w.seen[i][1], want[k].second[i]);
		}
	}
	ASSERT_EQ(index_blobs_first_byte(fx.ix, 256, on_byte_blob, &w), -EINVAL);
	fx_close(&fx);
}

static int write_at(const char *path, off_t off, const void *buf, size_t n)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -errno;
	ssize_t w = pwrite(fd, buf, n, off);
	close(fd);
	return w == (ssize_t)n ? 0 : -EIO;
}

static int count_prefix(const char *dir, const char *prefix)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;
	while (d && (e = readdir(d)) != NULL)
		if (strncmp(e->d_name, prefix, strlen(prefix)) == 0)
			n++;
	if (d)
		closedir(d);
	return n;
}

TEST(corrupt_database_is_moved_aside)
{
	struct fixture fx;
	bool rebuilt = false;
	int64_t s, count = -1;

	/* Pages of a populated database overwritten with garbage. */
	ASSERT_EQ(fx_open(&fx), 0);
	s = new_snapshot(fx.ix, "p", "v");
	for (int i = 0; i < 3000; i++)
		ASSERT_EQ(put_item(fx.ix, s, i, 0), 0);
	for (int i = 0; i < 50; i++)
		ASSERT_EQ(put_blob(fx.ix, i), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	index_close(fx.ix);
	fx.ix = NULL;
	char junk[2048];
	memset(junk, 0x5a, sizeof(junk));
	ASSERT_EQ(write_at(fx.path, 4096 * 3 + 512, junk, sizeof(junk)), 0);
	ASSERT_EQ(write_at(fx.path, 4096 * 20 + 100, junk, sizeof(junk)), 0);
	ASSERT_EQ(fx_reopen(&fx, &rebuilt), 0);
	ASSERT(rebuilt);
	ASSERT_EQ(count_prefix(fx.dir, "index.db.corrupt-"), 1);
	ASSERT_EQ(index_blob_totals(fx.ix, &count, NULL), 0);
	ASSERT_EQ(count, 0);
	ASSERT_EQ(index_snapshot_find(fx.ix, INDEX_SOURCE_DATAMINT, "https://api.datamint.io", "p",
				      "v", 0, &s),
		  -ENOENT);
	ASSERT_EQ(index_check(fx.ix, true), 0);
	ASSERT_EQ(put_blob(fx.ix, 1), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	fx_close(&fx);

	/* Not a database at all, and an empty file. */
	ASSERT_EQ(fx_open(&fx), 0);
	index_close(fx.ix);
	fx.ix = NULL;
	ASSERT_EQ(write_at(fx.path, 0, "this is not an SQLite database, just text......", 48), 0);
	ASSERT_EQ(fx_reopen(&fx, &rebuilt), 0);
	ASSERT(rebuilt);
	ASSERT_EQ(fx_reopen(&fx, &rebuilt), 0);
	ASSERT(!rebuilt);
	fx_close(&fx);
}

TEST(newer_schema_is_refused)
{
	struct fixture fx;
	bool rebuilt = false;
	char err[256] = "";
	/* user_version lives at byte 60 of the database header, big-endian. */
	static const uint8_t v99[4] = { 0, 0, 0, 99 };

	ASSERT_EQ(fx_open(&fx), 0);
	index_close(fx.ix);
	fx.ix = NULL;
	ASSERT_EQ(write_at(fx.path, 60, v99, 4), 0);
	ASSERT_EQ(index_open(fx.path, 0, err, sizeof(err), &fx.ix, &rebuilt), -EPROTONOSUPPORT);
	ASSERT(strstr(err, "newer") != NULL);
	ASSERT_NULL(fx.ix);
	ASSERT_EQ(count_prefix(fx.dir, "index.db.corrupt-"), 0);
	fx_close(&fx);
}

TEST(second_process_is_locked_out)
{
	struct fixture fx;
	int64_t s;
	int status = 0;

	ASSERT_EQ(fx_open(&fx), 0);
	s = new_snapshot(fx.ix, "p", "v");
	ASSERT_EQ(index_flush(fx.ix), 0);
	/* No -shm file: the WAL index lives in this process's memory. */
	char shm[160];
	snprintf(shm, sizeof(shm), "%s-shm", fx.path);
	ASSERT_EQ(access(shm, F_OK), -1);

	pid_t pid = fork();
	ASSERT_GE(pid, 0);
	if (pid == 0) {
		struct index *other = NULL;
		char err[256] = "";
		int r = index_open(fx.path, 0, err, sizeof(err), &other, NULL);
		_exit(r == -EBUSY && other == NULL && strstr(err, "another process") ? 0 : 1);
	}
	ASSERT_EQ(waitpid(pid, &status, 0), pid);
	ASSERT(WIFEXITED(status));
	ASSERT_EQ(WEXITSTATUS(status), 0);
	/* The lock holder is unaffected, and nothing was moved aside. */
	ASSERT_EQ(put_item(fx.ix, s, 0, 0), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(count_prefix(fx.dir, "index.db.corrupt-"), 0);
	fx_close(&fx);
}

/* The trust boundary in the index: ids never reused, owners, grants that go with their
 * snapshot, and reuse of content that never crosses owners unless asked for (-1). */
TEST(owners_grants_and_ids)
{
	struct fixture fx;
	struct index_snapshot k = { .source = INDEX_SOURCE_DATAMINT,
				    .server_url = "http://127.0.0.1:9",
				    .project_id = "p",
				    .project_name = "P",
				    .version = "v1",
				    .owner = 61002 };
	struct index_grant g;
	uint8_t d[INDEX_DIGEST_SIZE], h[INDEX_DIGEST_SIZE], got[INDEX_DIGEST_SIZE];
	char etag[64];
	int64_t bob, alice, alice2, linked;
	bool created;

	ASSERT_EQ(fx_open(&fx), 0);
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &bob, &created), 0);
	ASSERT_EQ(index_grant_put(fx.ix, 61002, bob, NULL, 100), 0);
	ASSERT_EQ(put_item(fx.ix, bob, 0, 0), 0);
	ASSERT_EQ(put_blob(fx.ix, 7), 0);
	digest_of_int(7, d);
	ASSERT_EQ(index_item_set_content(fx.ix, bob, 0, d, "e0-0", NULL, 0), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	/* the same project and version for another owner is another snapshot */
	k.owner = 61001;
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &alice, &created), 0);
	ASSERT(created);
	ASSERT_NE(alice, bob);
	ASSERT_EQ(put_item(fx.ix, alice, 0, 0), 0);
	/* bob's content reaches alice's snapshot by no path but an explicit any-owner lookup */
	ASSERT_EQ(index_snapshot_link_stored(fx.ix, alice, &linked), 0);
	ASSERT_EQ(linked, 0);
	ASSERT_EQ(index_item_find_prior(fx.ix, "r000000", 1000, "http://127.0.0.1:9", 61001, etag,
					sizeof(etag), got),
		  -ENOENT);
	ASSERT_EQ(index_item_find_prior(fx.ix, "r000000", 1000, "http://127.0.0.2:9", -1, etag,
					sizeof(etag), got),
		  -ENOENT); /* another server: never */
	ASSERT_EQ(index_item_find_prior(fx.ix, "r000000", 1000, "http://127.0.0.1:9", -1, etag,
					sizeof(etag), got),
		  0);
	ASSERT_EQ(memcmp(got, d, INDEX_DIGEST_SIZE), 0);
	ASSERT_EQ(index_item_find_prior(fx.ix, "r000000", 1000, "http://127.0.0.1:9", 61002, etag,
					sizeof(etag), got),
		  0);
	/* grants: per uid, with the key's hash, gone with the snapshot */
	memset(h, 0xab, sizeof(h));
	ASSERT_EQ(index_grant_put(fx.ix, 61001, alice, h, 200), 0);
	ASSERT_EQ(index_grant_get(fx.ix, 61001, alice, &g), 0);
	ASSERT(g.has_key_hash);
	ASSERT_EQ(g.checked_at, 200);
	ASSERT_EQ(memcmp(g.key_hash, h, sizeof(h)), 0);
	ASSERT_EQ(index_grant_get(fx.ix, 61002, alice, &g), -ENOENT);
	ASSERT_EQ(index_grant_get(fx.ix, 61002, bob, &g), 0);
	ASSERT(!g.has_key_hash);
	/* ids are never reused: bob evicts his snapshot, alice's next one gets a new id */
	ASSERT_EQ(index_snapshot_delete(fx.ix, bob), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(index_grant_get(fx.ix, 61002, bob, &g), -ENOENT);
	k.version = "v2";
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &alice2, &created), 0);
	ASSERT_GT(alice2, alice);
	ASSERT_NE(alice2, bob);
	ASSERT_EQ(index_flush(fx.ix), 0);
	/* and across a restart */
	ASSERT_EQ(index_snapshot_delete(fx.ix, alice2), 0);
	ASSERT_EQ(index_flush(fx.ix), 0);
	ASSERT_EQ(fx_reopen(&fx, NULL), 0);
	k.version = "v3";
	ASSERT_EQ(index_snapshot_get_or_create(fx.ix, &k, &linked, &created), 0);
	ASSERT_GT(linked, alice2);
	ASSERT_EQ(index_flush(fx.ix), 0);
	fx_close(&fx);
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(snapshots), T(items_and_limits), T(batched_100k_items_and_paging),
		  T(flush_is_the_durability_point), T(new_version_downloads_only_the_difference),
		  T(blobs_and_lru_order), T(reconcile_pass),
		  T(blobs_by_first_byte), T(corrupt_database_is_moved_aside),
		  T(newer_schema_is_refused), T(second_process_is_locked_out),
		  T(owners_grants_and_ids));
}
