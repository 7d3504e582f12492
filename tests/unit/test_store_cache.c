/*
 * Unit tests of daemon/cache.c: the store and the index together, on real files and a real
 * SQLite database. Startup reconciliation (docs/reliability.md I3: temp files, rows without
 * blobs, blobs without rows, a damaged index.db rebuilt from blob headers), LRU eviction
 * with pins, the max_size bound under sustained writes, verify, a corrupt blob
 * refetched, and the clean-shutdown record's settled directories.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "cache.h"
#include "proto.h"
#include "task.h"

struct fixture {
	char dir[64];
	struct cache_options opt;
	struct cache *c;
	struct cache_open_report rep;
};

static int fx_reopen(struct fixture *fx)
{
	char err[256] = "";
	if (fx->c)
		cache_close(fx->c);
	fx->c = NULL;
	int r = cache_open(fx->dir, &fx->opt, err, sizeof(err), &fx->c, &fx->rep);
	if (r < 0)
		printf("# cache_open: %d %s\n", r, err);
	return r;
}

static int fx_open(struct fixture *fx, uint64_t max_size)
{
	memset(fx, 0, sizeof(*fx));
	fx->opt.store.max_size = max_size;
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/dmc-cache-XXXXXX");
	if (!mkdtemp(fx->dir))
		return -errno;
	return fx_reopen(fx);
}

static void fx_close(struct fixture *fx)
{
	cache_close(fx->c);
	fx->c = NULL;
	task_rm_tree(fx->dir);
}

static void content(int k, uint8_t *buf, size_t n)
{
	uint64_t x = (uint64_t)k * 0x9e3779b97f4a7c15ull + 7;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (uint8_t)x;
	}
}

/* What the prefetcher does per item: admit, store, record, link, unpin, release. */
static int put_item(struct cache *c, int64_t snap, int64_t idx, int k, size_t n,
		    struct store_blob_info *ret)
{
	uint8_t *buf = malloc(n);
	struct store_blob_info info;
	int r;

	content(k, buf, n);
	r = cache_reserve(c, n);
	if (r < 0)
		goto out;
	r = store_put(c->store, STORE_KIND_RAW, buf, n, NULL, &info);
	if (r == 0) {
		r = cache_record_blob(c, &info);
		if (r == 0 && snap > 0)
			r = index_item_set_blob(c->index, snap, idx, info.digest);
		store_unpin(c->store, info.digest);
		if (ret)
			*ret = info;
	}
	store_release(c->store, n);
out:
	free(buf);
	return r;
}

static int64_t make_snapshot(struct cache *c, int items, size_t n)
{
	struct index_snapshot k = { .source = INDEX_SOURCE_DATAMINT,
				    .server_url = "https://api.datamint.io",
				    .project_id = "p",
				    .project_name = "P",
				    .version = "v1" };
	int64_t id;
	if (index_snapshot_get_or_create(c->index, &k, &id, NULL) < 0)
		return -1;
	for (int i = 0; i < items; i++) {
		char rid[16];
		snprintf(rid, sizeof(rid), "r%d", i);
		struct index_item it = { .snapshot_id = id, .idx = i, .resource_id = rid,
					 .filename = rid, .mimetype = "application/dicom",
					 .size = (int64_t)n, .etag = "e" };
		if (index_item_put(c->index, &it) < 0)
			return -1;
	}
	return id;
}

static int count_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;
	while (d && (e = readdir(d)) != NULL)
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			n++;
	if (d)
		closedir(d);
	return d ? n : -1;
}

static int count_files(const struct fixture *fx)
{
	int n = 0;
	for (unsigned b = 0; b < 256; b++) {
		char p[128];
		snprintf(p, sizeof(p), "%s/objects/%02x", fx->dir, b);
		int k = count_dir(p); /* -1: never created */
		n += k > 0 ? k : 0;
	}
	return n;
}

static void blob_path(const struct fixture *fx, const uint8_t d[32], char *out, size_t len)
{
	char hex[STORE_HEX_SIZE + 1];
	store_digest_hex(d, hex);
	snprintf(out, len, "%s/objects/%.2s/%s", fx->dir, hex, hex);
}

/* ---- I3 ---- */

struct i3 {
	struct store *s;
	int rows, bad;
};

static int check_row(void *ctx, const struct index_blob *b)
{
	struct i3 *x = ctx;
	struct store_blob_info info;
	x->rows++;
	if (store_verify(x->s, b->digest, &info) != 0 || (int64_t)info.raw_size != b->raw_size ||
	    (int64_t)info.stored_size != b->stored_size || info.kind != b->kind)
		x->bad++;
	return 0;
}

/* docs/reliability.md I3, checked from outside: integrity_check ok; every row has exactly one
 * blob that verifies with matching header; every blob has a row; tmp/ empty; within
 * max_size. */
static int check_i3(struct fixture *fx)
{
	struct i3 x = { fx->c->store, 0, 0 };
	struct index_lru_cursor cur = { 0 };
	struct store_stats st;
	char tmp[128];
	int r;

	if (index_check(fx->c->index, true) != 0)
		return -1;
	while ((r = index_lru_page(fx->c->index, &cur, 100, check_row, &x)) > 0)
		;
	if (r < 0 || x.bad)
		return -2;
	if (x.rows != count_files(fx))
		return -3;
	store_get_stats(fx->c->store, &st);
	if (st.objects != (uint64_t)x.rows)
		return -4;
	snprintf(tmp, sizeof(tmp), "%s/tmp", fx->dir);
	if (count_dir(tmp) != 0)
		return -5;
	if (fx->opt.store.max_size && st.used_bytes > fx->opt.store.max_size)
		return -6;
	return 0;
}

/* ---- tests ---- */

TEST(reconciliation)
{
	struct fixture fx;
	struct store_blob_info info[10], orphan;
	int64_t snap, count = 0;
	char p[256];
	uint8_t buf[100];

	ASSERT_EQ(fx_open(&fx, 0), 0);
	ASSERT_EQ(fx.rep.blobs, 0);
	snap = make_snapshot(fx.c, 10, 5000);
	ASSERT_GT(snap, 0);
	for (int i = 0; i < 10; i++)
		ASSERT_EQ(put_item(fx.c, snap, i, i, 5000, &info[i]), 0);
	ASSERT_EQ(index_flush(fx.c->index), 0);
	/* A blob whose row never reached the index (crash before the batch commit). */
	uint8_t *ob = malloc(7000);
	content(99, ob, 7000);
	ASSERT_EQ(store_put(fx.c->store, STORE_KIND_TENSOR, ob, 7000, NULL, &orphan), 0);
	store_unpin(fx.c->store, orphan.digest);
	free(ob);
	ASSERT_EQ(check_i3(&fx), -3); /* the orphan has no row yet */
	/* A row that misstates its blob's sizes: the start checks that blob's header and
	 * corrects the row from it, keeping the blob. */
	struct index_blob wrong = { .kind = STORE_KIND_RAW, .raw_size = 1,
				    .stored_size = (int64_t)info[2].stored_size + 3,
				    .last_access = 1 };
	memcpy(wrong.digest, info[2].digest, STORE_DIGEST_SIZE);
	ASSERT_EQ(index_blob_seen(fx.c->index, 0, &wrong), 0);
	ASSERT_EQ(index_flush(fx.c->index), 0);
	cache_close(fx.c);
	fx.c = NULL;

	/* Damage while stopped: a leftover temp file, a vanished blob, a truncated one. */
	snprintf(p, sizeof(p), "%s/tmp/w.1.1.1", fx.dir);
	FILE *f = fopen(p, "w");
	ASSERT_NOT_NULL(f);
	fwrite(buf, 1, sizeof(buf), f);
	fclose(f);
	blob_path(&fx, info[0].digest, p, sizeof(p));
	ASSERT_EQ(unlink(p), 0);
	blob_path(&fx, info[1].digest, p, sizeof(p));
	ASSERT_EQ(truncate(p, 10), 0);

	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(!fx.rep.index_rebuilt);
	ASSERT_EQ(fx.rep.blobs, 9);         /* 8 of the 10, and the orphan */
	ASSERT_EQ(fx.rep.files_removed, 2); /* the temp file, the truncated blob */
	ASSERT_EQ(fx.rep.rows_dropped, 2);  /* vanished and truncated */
	ASSERT_EQ(fx.rep.adopted, 1);       /* the orphan */
	ASSERT_EQ(check_i3(&fx), 0);
	struct index_blob row;
	ASSERT_EQ(index_blob_get(fx.c->index, orphan.digest, &row), 0);
	ASSERT_EQ(row.kind, STORE_KIND_TENSOR);
	ASSERT_EQ(row.raw_size, 7000);
	ASSERT_EQ(index_blob_get(fx.c->index, info[2].digest, &row), 0);
	ASSERT_EQ(row.raw_size, 5000);
	ASSERT_EQ(row.stored_size, (int64_t)info[2].stored_size);
	ASSERT_EQ(row.kind, (int)info[2].kind);

	/* The items whose blobs went are no longer stored: exactly what must be refetched. */
	struct index_snapshot_stats st;
	ASSERT_EQ(index_snapshot_stats(fx.c->index, snap, &st), 0);
	ASSERT_EQ(st.items, 10);
	ASSERT_EQ(st.items_stored, 8);

	/* A damaged index.db: moved aside, rebuilt from the blob headers alone. */
	cache_close(fx.c);
	fx.c = NULL;
	snprintf(p, sizeof(p), "%s/index.db", fx.dir);
	f = fopen(p, "r+");
	ASSERT_NOT_NULL(f);
	fwrite("garbage garbage garbage garbage", 1, 32, f);
	fclose(f);
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.index_rebuilt);
	ASSERT_EQ(fx.rep.adopted, 9);
	ASSERT_EQ(fx.rep.rows_dropped, 0);
	ASSERT_EQ(index_blob_totals(fx.c->index, &count, NULL), 0);
	ASSERT_EQ(count, 9);
	ASSERT_EQ(index_blob_get(fx.c->index, info[5].digest, &row), 0);
	ASSERT_EQ(row.raw_size, 5000);
	ASSERT_EQ(row.stored_size, (int64_t)info[5].stored_size);
	ASSERT_EQ(index_snapshot_stats(fx.c->index, snap, &st), 0);
	ASSERT_EQ(st.items, 0); /* snapshots re-resolve */
	ASSERT_EQ(check_i3(&fx), 0);

	/* A clean restart changes nothing. */
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT_EQ(fx.rep.adopted, 0);
	ASSERT_EQ(fx.rep.rows_dropped, 0);
	ASSERT_EQ(fx.rep.files_removed, 0);
	ASSERT_EQ(fx.rep.blobs, 9);
	fx_close(&fx);
}

TEST(eviction_lru_and_pins)
{
	struct fixture fx;
	const size_t n = 1000;
	const uint64_t per = n + STORE_HEADER_SIZE;
	struct store_blob_info info[26];
	struct store_stats st;

	ASSERT_EQ(fx_open(&fx, 20 * per), 0);
	for (int i = 0; i < 20; i++) {
		ASSERT_EQ(put_item(fx.c, 0, 0, i, n, &info[i]), 0);
		ASSERT_EQ(index_flush(fx.c->index), 0);
	}
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.used_bytes, 20 * per);
	/* 0-4 used again; 5 is being served. LRU order is now 5, 6, ..., 19, 0, ..., 4. */
	for (int i = 0; i < 5; i++)
		ASSERT_EQ(index_blob_touch(fx.c->index, info[i].digest), 0);
	ASSERT_EQ(index_flush(fx.c->index), 0);
	ASSERT_EQ(store_pin(fx.c->store, info[5].digest), 0);

	for (int i = 20; i < 26; i++)
		ASSERT_EQ(put_item(fx.c, 0, 0, i, n, &info[i]), 0);
	ASSERT_EQ(index_flush(fx.c->index), 0);
	for (int i = 0; i < 26; i++) {
		bool evicted = i >= 6 && i <= 11;
		struct store_blob_info si;
		ASSERT_EQ(store_stat(fx.c->store, info[i].digest, &si), evicted ? -ENOENT : 0);
		ASSERT_EQ(index_blob_get(fx.c->index, info[i].digest, NULL), evicted ? -ENOENT : 0);
	}
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.used_bytes, 20 * per);
	ASSERT_UINT_EQ(st.removed, 6);

	/* Everything pinned: nothing can make room. */
	for (int i = 0; i < 26; i++)
		if (i < 6 || i > 11)
			ASSERT_EQ(store_pin(fx.c->store, info[i].digest), 0);
	ASSERT_EQ(cache_reserve(fx.c, n), -DMC_E_CACHE_FULL);
	for (int i = 0; i < 26; i++)
		if (i < 6 || i > 11)
			store_unpin(fx.c->store, info[i].digest);
	store_unpin(fx.c->store, info[5].digest);
	/* Larger than the whole cache: refused without evicting anything. */
	ASSERT_EQ(cache_reserve(fx.c, 21 * per), -DMC_E_LIMIT_EXCEEDED);
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.removed, 6);
	ASSERT_EQ(check_i3(&fx), 0);
	fx_close(&fx);
}

/* A lowered max_size while running (SIGHUP): evicted at once, LRU first, pins kept. */
TEST(limits_changed_while_running)
{
	struct fixture fx;
	const size_t n = 1000;
	const uint64_t per = n + STORE_HEADER_SIZE;
	struct store_blob_info info[20];
	struct store_stats st;
	uint64_t freed = 1, left = 1;

	ASSERT_EQ(fx_open(&fx, 20 * per), 0);
	for (int i = 0; i < 20; i++) {
		ASSERT_EQ(put_item(fx.c, 0, 0, i, n, &info[i]), 0);
		ASSERT_EQ(index_flush(fx.c->index), 0);
	}
	/* LRU order 5, 6, ..., 19, 0, ..., 4 */
	for (int i = 0; i < 5; i++)
		ASSERT_EQ(index_blob_touch(fx.c->index, info[i].digest), 0);
	ASSERT_EQ(index_flush(fx.c->index), 0);
	ASSERT_EQ(store_pin(fx.c->store, info[6].digest), 0);
	ASSERT_EQ(cache_set_limits(fx.c, 10 * per, 0, &freed, &left), 0);
	ASSERT_UINT_EQ(freed, 10 * per);
	ASSERT_UINT_EQ(left, 0);
	for (int i = 0; i < 20; i++) {
		bool evicted = i == 5 || (i >= 7 && i <= 15);
		struct store_blob_info si;
		ASSERT_EQ(store_stat(fx.c->store, info[i].digest, &si), evicted ? -ENOENT : 0);
	}
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.used_bytes, 10 * per);
	/* The new bound holds for the next writes too. */
	ASSERT_EQ(cache_reserve(fx.c, 10 * per), -DMC_E_LIMIT_EXCEEDED);
	/* Everything left pinned: nothing goes, and what is still over is said. */
	for (int i = 0; i < 20; i++)
		if (i != 6 && store_stat(fx.c->store, info[i].digest, &(struct store_blob_info){ 0 }) == 0)
			ASSERT_EQ(store_pin(fx.c->store, info[i].digest), 0);
	ASSERT_EQ(cache_set_limits(fx.c, 4 * per, 0, &freed, &left), 0);
	ASSERT_UINT_EQ(freed, 0);
	ASSERT_UINT_EQ(left, 6 * per);
	for (int i = 0; i < 20; i++)
		if (store_stat(fx.c->store, info[i].digest, &(struct store_blob_info){ 0 }) == 0)
			store_unpin(fx.c->store, info[i].digest);
	/* Raised to no limit: nothing evicted, a large write is admitted. */
	ASSERT_EQ(cache_set_limits(fx.c, 0, 0, &freed, &left), 0);
	ASSERT_UINT_EQ(freed, 0);
	ASSERT_UINT_EQ(left, 0);
	ASSERT_EQ(cache_reserve(fx.c, 30 * per), 0);
	store_release(fx.c->store, 30 * per);
	ASSERT_EQ(check_i3(&fx), 0);
	fx_close(&fx);
}

TEST(max_size_bound_under_sustained_writes)
{
	struct fixture fx;
	const uint64_t max = 2u << 20;
	uint64_t written = 0, peak = 0;
	struct store_stats st;
	int k = 0;

	ASSERT_EQ(fx_open(&fx, max), 0);
	/* Write 3x max_size in objects of varied sizes, checking the bound after each one. */
	while (written < 3 * max) {
		size_t n = 20000 + (size_t)(k * 7919) % 90000;
		ASSERT_EQ(put_item(fx.c, 0, 0, k, n, NULL), 0);
		if (k % 8 == 0)
			ASSERT_EQ(index_flush(fx.c->index), 0);
		store_get_stats(fx.c->store, &st);
		ASSERT_LE(st.used_bytes, max);
		if (st.used_bytes > peak)
			peak = st.used_bytes;
		written += n;
		k++;
	}
	ASSERT_EQ(index_flush(fx.c->index), 0);
	/* The cache ran full (within one object of the bound), never over it. */
	ASSERT_GT(peak + 110000 + STORE_HEADER_SIZE, max);
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.reserved_bytes, 0);
	ASSERT_EQ(check_i3(&fx), 0);
	/* The accounting agrees with the files after a restart's recount. */
	uint64_t before = st.used_bytes;
	ASSERT_EQ(fx_reopen(&fx), 0);
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.used_bytes, before);
	ASSERT_EQ(fx.rep.evicted_bytes, 0);

	/* A smaller max_size at the next start is enforced before anything is served. */
	fx.opt.store.max_size = max / 2;
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT_GT(fx.rep.evicted_bytes, 0);
	store_get_stats(fx.c->store, &st);
	ASSERT_LE(st.used_bytes, max / 2);
	ASSERT_EQ(check_i3(&fx), 0);
	fx_close(&fx);
}

TEST(corrupt_blob_is_detected_and_refetched)
{
	struct fixture fx;
	struct store_blob_info info[4];
	struct cache_verify_report vr;
	int64_t snap;
	const size_t n = 40000;
	uint8_t *buf = malloc(n), *want = malloc(n);
	uint64_t got;
	char p[256];

	ASSERT_EQ(fx_open(&fx, 0), 0);
	snap = make_snapshot(fx.c, 4, n);
	for (int i = 0; i < 4; i++)
		ASSERT_EQ(put_item(fx.c, snap, i, 100 + i, n, &info[i]), 0);
	ASSERT_EQ(index_flush(fx.c->index), 0);

	/* Bit flip in blob 2, detected by a read: a miss, never wrong bytes. */
	blob_path(&fx, info[2].digest, p, sizeof(p));
	int fd = open(p, O_RDWR);
	ASSERT_GE(fd, 0);
	uint8_t byte;
	ASSERT_EQ(pread(fd, &byte, 1, STORE_HEADER_SIZE + 777), 1);
	byte ^= 4;
	ASSERT_EQ(pwrite(fd, &byte, 1, STORE_HEADER_SIZE + 777), 1);
	close(fd);
	ASSERT_EQ(store_read(fx.c->store, info[2].digest, buf, n, &got), -DMC_E_INTEGRITY);
	/* The caller forgets the row; the item now shows as missing, and is fetched again. */
	ASSERT_EQ(index_blob_delete(fx.c->index, info[2].digest), 0);
	struct index_snapshot_stats st;
	ASSERT_EQ(index_snapshot_stats(fx.c->index, snap, &st), 0);
	ASSERT_EQ(st.items_stored, 3);
	ASSERT_EQ(put_item(fx.c, snap, 2, 102, n, NULL), 0);
	ASSERT_EQ(store_read(fx.c->store, info[2].digest, buf, n, &got), 0);
	content(102, want, n);
	ASSERT_MEM_EQ(buf, want, n);

	/* Truncation of blob 3, detected by verify, which drops its row. */
	blob_path(&fx, info[3].digest, p, sizeof(p));
	ASSERT_EQ(truncate(p, STORE_HEADER_SIZE + 5), 0);
	ASSERT_EQ(cache_verify(fx.c, &vr), 0);
	ASSERT_UINT_EQ(vr.ok, 3);
	ASSERT_UINT_EQ(vr.bad, 1);
	ASSERT_EQ(index_blob_get(fx.c->index, info[3].digest, NULL), -ENOENT);
	ASSERT_EQ(check_i3(&fx), 0);
	ASSERT_EQ(index_snapshot_stats(fx.c->index, snap, &st), 0);
	ASSERT_EQ(st.items_stored, 3);
	free(buf);
	free(want);
	fx_close(&fx);
}

/* ---- kill -9 during a prefetch (docs/reliability.md C1 at the store level) ---- */

#define CRASH_ITEMS 4000
#define CRASH_MAX_PER_ROUND 150 /* fetches started before a kill, at most */
#define CRASH_ROUNDS 20
#define CRASH_BATCH 8

/* Item i's upstream content: sizes 1-61 KB, a third of them incompressible. */
static size_t crash_size(int i)
{
	return 1000 + (size_t)(i * 7919) % 60000;
}

static void crash_content(int i, uint8_t *buf, size_t n)
{
	if (i % 3 == 0) {
		content(i, buf, n);
		return;
	}
	for (size_t k = 0; k < n; k++)
		buf[k] = (uint8_t)((k / 64) * (unsigned)i + (k % 7));
}

static int64_t crash_snapshot(struct cache *c)
{
	struct index_snapshot k = { .source = INDEX_SOURCE_DATAMINT,
				    .server_url = "https://api.datamint.io",
				    .project_id = "crash",
				    .project_name = "crash",
				    .version = "v1" };
	int64_t id = -1;
	bool created = false;
	if (index_snapshot_get_or_create(c->index, &k, &id, &created) < 0)
		return -1;
	return id;
}

static int on_is_sealed(void *ctx, const struct index_snapshot *s)
{
	*(bool *)ctx = s->sealed;
	return 0;
}

struct missing_page {
	int n;
	int64_t idx[CRASH_BATCH];
};

static int on_missing(void *ctx, const struct index_item *it)
{
	struct missing_page *m = ctx;
	m->idx[m->n++] = it->idx;
	return 0;
}

/* One protocol line to the parent: "<tag> <n>". */
static void say(int fd, char tag, int v)
{
	char line[32];
	int n = snprintf(line, sizeof(line), "%c %d\n", tag, v);
	if (write(fd, line, (size_t)n) != n)
		_exit(3);
}

/*
 * The prefetcher in the child: lists the snapshot (once: sealed survives), then fetches
 * missing items in batches, announcing "F i" before fetching and "A i" after the batch's
 * index_flush() returned (the acknowledgement), and "D 0" when everything is stored.
 */
static void crash_child(const char *dir, int out)
{
	struct cache_options o = { 0 };
	struct cache *c;
	char err[256];
	bool sealed = false;
	uint8_t *buf = malloc(61000);

	if (cache_open(dir, &o, err, sizeof(err), &c, NULL) < 0)
		_exit(10);
	int64_t snap = crash_snapshot(c);
	if (snap < 0 || index_snapshot_get(c->index, snap, on_is_sealed, &sealed) < 0)
		_exit(11);
	if (!sealed) {
		for (int i = 0; i < CRASH_ITEMS; i++) {
			char rid[16];
			snprintf(rid, sizeof(rid), "r%d", i);
			struct index_item it = { .snapshot_id = snap, .idx = i, .resource_id = rid,
						 .filename = rid, .mimetype = "application/dicom",
						 .size = (int64_t)crash_size(i), .etag = "e" };
			if (index_item_put(c->index, &it) < 0)
				_exit(12);
		}
		if (index_snapshot_seal(c->index, snap) < 0 || index_flush(c->index) < 0)
			_exit(13);
	}
	for (;;) {
		struct missing_page m = { 0 };
		int r = index_items_page(c->index, snap, 0, CRASH_BATCH, INDEX_ITEMS_MISSING,
					 on_missing, &m, NULL);
		if (r < 0)
			_exit(14);
		if (m.n == 0)
			break;
		for (int k = 0; k < m.n; k++) {
			int i = (int)m.idx[k];
			size_t n = crash_size(i);
			struct store_writer *w;
			struct store_blob_info info;
			say(out, 'F', i);
			crash_content(i, buf, n);
			if (cache_reserve(c, n) < 0 ||
			    store_writer_open(c->store, STORE_KIND_RAW, n, &w) < 0)
				_exit(15);
			for (size_t off = 0; off < n; off += 16384)
				if (store_writer_write(w, buf + off, n - off < 16384 ? n - off : 16384) < 0)
					_exit(16);
			if (store_writer_commit(w, NULL, &info) < 0 || cache_record_blob(c, &info) < 0 ||
			    index_item_set_blob(c->index, snap, i, info.digest) < 0)
				_exit(17);
			store_unpin(c->store, info.digest);
			store_release(c->store, n);
		}
		if (index_flush(c->index) < 0)
			_exit(18);
		for (int k = 0; k < m.n; k++)
			say(out, 'A', (int)m.idx[k]);
	}
	say(out, 'D', 0);
	cache_close(c);
	_exit(0);
}

struct crash_state {
	bool acked[CRASH_ITEMS];
	int fetches[CRASH_ITEMS];
	int refetched_acked;
	int started; /* fetches started in this round */
	bool done;
	char partial[64];
	size_t plen;
};

static void crash_parse(struct crash_state *st, const char *data, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		if (data[i] != '\n') {
			if (st->plen < sizeof(st->partial) - 1)
				st->partial[st->plen++] = data[i];
			continue;
		}
		st->partial[st->plen] = '\0';
		st->plen = 0;
		int v = (int)strtol(st->partial + 2, NULL, 10);
		if (st->partial[0] == 'D') {
			st->done = true;
		} else if (v >= 0 && v < CRASH_ITEMS && st->partial[0] == 'F') {
			if (st->acked[v])
				st->refetched_acked++;
			st->fetches[v]++;
			st->started++;
		} else if (v >= 0 && v < CRASH_ITEMS && st->partial[0] == 'A') {
			st->acked[v] = true;
		}
	}
}

struct acked_check {
	const bool *acked;
	const uint8_t (*want)[32]; /* SHA-256 of each item's content */
	int checked, lost;
};

/* An acknowledged item must be stored with the digest of its content; check_i3() has
 * hashed every stored blob against its digest, so this makes it byte-identical. */
static int on_crash_item(void *ctx, const struct index_item *it)
{
	struct acked_check *a = ctx;
	if (!a->acked[it->idx])
		return 0;
	a->checked++;
	if (!it->stored || memcmp(it->blob, a->want[it->idx], 32) != 0)
		a->lost++;
	return 0;
}

TEST(kill9_loop)
{
	struct fixture fx;
	struct crash_state *st = calloc(1, sizeof(*st));
	uint64_t seed = (uint64_t)getpid() * 2654435761u;
	int kills = 0;

	uint8_t(*want)[32] = malloc(CRASH_ITEMS * 32);
	uint8_t *buf = malloc(61000);
	for (int i = 0; i < CRASH_ITEMS; i++) {
		crash_content(i, buf, crash_size(i));
		ASSERT_EQ(store_digest_of(buf, crash_size(i), want[i]), 0);
	}
	free(buf);

	ASSERT_EQ(fx_open(&fx, 0), 0);
	cache_close(fx.c);
	fx.c = NULL;
	for (int round = 0; round <= CRASH_ROUNDS; round++) {
		int p[2];
		ASSERT_EQ(pipe(p), 0);
		pid_t pid = fork();
		ASSERT_GE(pid, 0);
		if (pid == 0) {
			close(p[0]);
			crash_child(fx.dir, p[1]);
		}
		close(p[1]);
		/* Rounds 0..19 are killed; the last one runs to the end. One round in eight is
		 * killed 0-30 ms after start (opening, reconciling, listing); the others once
		 * 1-150 fetches have started, 0-3 ms later, which lands anywhere in a blob's
		 * write, sync, rename or the batch commit. Progress-based, so that every round
		 * is cut mid-prefetch however fast the machine is. */
		seed = seed * 6364136223846793005ull + 1442695040888963407ull;
		bool last = round == CRASH_ROUNDS, early = (seed >> 40) % 8 == 0;
		int after = 1 + (int)((seed >> 33) % CRASH_MAX_PER_ROUND);
		long delay_us = early ? (long)((seed >> 20) % 30000) : (long)((seed >> 20) % 3000);
		bool killed = false;
		st->started = 0;
		if (!last && early) {
			usleep((useconds_t)delay_us);
			kill(pid, SIGKILL);
			killed = true;
		}
		for (;;) {
			char data[4096];
			ssize_t n = read(p[0], data, sizeof(data));
			if (n <= 0)
				break;
			crash_parse(st, data, (size_t)n);
			if (!last && !killed && st->started >= after) {
				usleep((useconds_t)delay_us);
				kill(pid, SIGKILL);
				killed = true;
			}
		}
		close(p[0]);
		int status = 0;
		ASSERT_EQ(waitpid(pid, &status, 0), pid);
		if (WIFSIGNALED(status))
			kills++;
		else
			ASSERT_EQ(WEXITSTATUS(status), 0);

		/* Restart: I3 holds, every acknowledged item is there, byte-identical. */
		ASSERT_EQ(fx_reopen(&fx), 0);
		ASSERT(!fx.rep.index_rebuilt);
		ASSERT_EQ(check_i3(&fx), 0);
		struct acked_check a = { st->acked, (const uint8_t(*)[32])want, 0, 0 };
		int64_t snap = crash_snapshot(fx.c), next = 0;
		while (next >= 0)
			ASSERT_GE(index_items_page(fx.c->index, snap, next, 1000, INDEX_ITEMS_ALL,
						   on_crash_item, &a, &next),
				  0);
		ASSERT_EQ(a.lost, 0);
		int acked = 0;
		for (int i = 0; i < CRASH_ITEMS; i++)
			acked += st->acked[i];
		ASSERT_EQ(a.checked, acked);
		ASSERT_EQ(st->refetched_acked, 0);
		cache_close(fx.c);
		fx.c = NULL;
	}
	/* The last round finished the prefetch: every item is stored with its content (some
	 * were committed but killed before their acknowledgement: present, never half). Only
	 * items cut by a kill were fetched twice. */
	ASSERT(st->done);
	int extra = 0;
	for (int i = 0; i < CRASH_ITEMS; i++) {
		ASSERT_GE(st->fetches[i], 1);
		extra += st->fetches[i] - 1;
		st->acked[i] = true;
	}
	ASSERT_EQ(fx_reopen(&fx), 0);
	struct acked_check all = { st->acked, (const uint8_t(*)[32])want, 0, 0 };
	int64_t snap = crash_snapshot(fx.c), next = 0;
	while (next >= 0)
		ASSERT_GE(index_items_page(fx.c->index, snap, next, 1000, INDEX_ITEMS_ALL,
					   on_crash_item, &all, &next),
			  0);
	ASSERT_EQ(all.checked, CRASH_ITEMS);
	ASSERT_EQ(all.lost, 0);
	ASSERT_EQ(check_i3(&fx), 0);
	ASSERT_LE(extra, kills * CRASH_BATCH);
	printf("# %d kills, %d items fetched again after a kill (at most %d per kill)\n", kills,
	       extra, CRASH_BATCH);
	/* Every round but the last was cut short mid-prefetch. */
	ASSERT_EQ(kills, CRASH_ROUNDS);
	free(st);
	free(want);
	fx_close(&fx);
}

/* The clean-shutdown record (cache_clean.h): a clean stop records a changed directory as
 * settled only if its files and rows agree, names and sizes; the next start walks the
 * others (and no more), repairs them as always, and counts what it skipped from the
 * record. */
TEST(clean_stop_settles_only_agreeing_directories)
{
	struct fixture fx;
	struct store_blob_info info[10], orphan;
	struct store_stats st;
	struct index_blob row;
	uint64_t bytes = 0;
	bool written = false;
	char why[256] = "";

	ASSERT_EQ(fx_open(&fx, 0), 0);
	for (int i = 0; i < 10; i++) {
		ASSERT_EQ(put_item(fx.c, 0, i, 200 + i, 3000, &info[i]), 0);
		bytes += STORE_HEADER_SIZE + info[i].stored_size;
	}
	/* a blob without a row, and a row whose sizes are not its file's */
	uint8_t *ob = malloc(4000);
	content(299, ob, 4000);
	ASSERT_EQ(store_put(fx.c->store, STORE_KIND_TENSOR, ob, 4000, NULL, &orphan), 0);
	store_unpin(fx.c->store, orphan.digest);
	free(ob);
	bytes += STORE_HEADER_SIZE + orphan.stored_size;
	struct index_blob wrong = { .kind = STORE_KIND_RAW, .raw_size = 1,
				    .stored_size = (int64_t)info[2].stored_size + 3,
				    .last_access = 1 };
	memcpy(wrong.digest, info[2].digest, STORE_DIGEST_SIZE);
	ASSERT_EQ(index_blob_put(fx.c->index, &wrong), 0);
	ASSERT_EQ(cache_close_clean(fx.c, &written, why, sizeof(why)), 0);
	fx.c = NULL;
	if (!written)
		printf("# %s\n", why);
	ASSERT(written);

	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.clean_start);
	ASSERT(!fx.rep.index_checked);
	ASSERT_EQ(fx.rep.dirs_walked, orphan.digest[0] == info[2].digest[0] ? 1u : 2u);
	ASSERT_EQ(fx.rep.adopted, 1);
	ASSERT_EQ(fx.rep.blobs, 11);
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.objects, 11);
	ASSERT_UINT_EQ(st.used_bytes, bytes);
	ASSERT_EQ(index_blob_get(fx.c->index, info[2].digest, &row), 0);
	ASSERT_EQ(row.stored_size, (int64_t)info[2].stored_size);
	ASSERT_EQ(row.raw_size, (int64_t)info[2].raw_size);

	/* repaired at that start, settled at the next stop: nothing to walk after it */
	ASSERT_EQ(cache_close_clean(fx.c, &written, why, sizeof(why)), 0);
	fx.c = NULL;
	ASSERT(written);
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.clean_start);
	ASSERT_EQ(fx.rep.dirs_walked, 0u);
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.objects, 11);
	ASSERT_UINT_EQ(st.used_bytes, bytes);

	/* no record: the full reconciliation; as after kill -9 in this boot, on the same
	 * index.db and without a fault, without the index check */
	cache_close(fx.c);
	fx.c = NULL;
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(!fx.rep.clean_start);
	ASSERT(!fx.rep.index_checked);
	ASSERT_EQ(fx.rep.dirs_walked, 256u);
	ASSERT_EQ(fx.rep.blobs, 11);

	/* a fatal signal's marker: the check runs, and the marker goes */
	char p[256];
	snprintf(p, sizeof(p), "%s/fault", fx.dir);
	FILE *f = fopen(p, "w");
	ASSERT_NOT_NULL(f);
	fclose(f);
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.index_checked);
	ASSERT_EQ(access(p, F_OK), -1);
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(!fx.rep.index_checked);

	/* another boot's start (a power loss): the check runs */
	snprintf(p, sizeof(p), "%s/started", fx.dir);
	f = fopen(p, "w");
	ASSERT_NOT_NULL(f);
	fputs("00000000-0000-0000-0000-000000000000 1 1\n", f);
	fclose(f);
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.index_checked);

	/* another index.db (a copy put in its place): the check runs */
	cache_close(fx.c);
	fx.c = NULL;
	char q[256];
	snprintf(p, sizeof(p), "%s/index.db", fx.dir);
	snprintf(q, sizeof(q), "%s/index.db.copy", fx.dir);
	ASSERT_EQ(link(p, q), 0);
	ASSERT_EQ(unlink(p), 0);
	{
		int in = open(q, O_RDONLY), out = open(p, O_WRONLY | O_CREAT, 0600);
		char buf[65536];
		ssize_t n;
		ASSERT(in >= 0 && out >= 0);
		while ((n = read(in, buf, sizeof(buf))) > 0)
			ASSERT_EQ(write(out, buf, (size_t)n), n);
		close(in);
		close(out);
	}
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.index_checked);
	ASSERT_EQ(fx.rep.blobs, 11);
	fx_close(&fx);
}

/* Bytes of the blob files on disk. */
static uint64_t file_bytes(const struct fixture *fx)
{
	uint64_t n = 0;
	for (unsigned b = 0; b < 256; b++) {
		char p[128];
		DIR *d;
		struct dirent *e;
		snprintf(p, sizeof(p), "%s/objects/%02x", fx->dir, b);
		if (!(d = opendir(p)))
			continue;
		while ((e = readdir(d)) != NULL) {
			struct stat st;
			if (e->d_name[0] != '.' && fstatat(dirfd(d), e->d_name, &st, 0) == 0)
				n += (uint64_t)st.st_size;
		}
		closedir(d);
	}
	return n;
}

/* Content k (from `from` on) whose blob lands in objects/<b>/. */
static int content_in_dir(unsigned b, int from, size_t n)
{
	uint8_t *buf = malloc(n), md[32];
	unsigned len = 0;
	int k = from;
	for (;; k++) {
		content(k, buf, n);
		EVP_Digest(buf, n, md, &len, EVP_sha256(), NULL);
		if (md[0] == b)
			break;
	}
	free(buf);
	return k;
}

/*
 * A cache as a crash leaves it: n items (contents from k0), a blob without a row, the
 * third item's row misstating its sizes; closed without a record; then the first item's
 * blob deleted and the second's truncated. 0, or the first failure.
 */
static int crashed_cache(struct fixture *fx, int n, int k0, struct store_blob_info *info,
			 struct store_blob_info *orphan)
{
	uint8_t *ob = malloc(3000);
	char p[256];
	int r = fx_open(fx, 0);

	for (int i = 0; i < n && r == 0; i++)
		r = put_item(fx->c, 0, i, k0 + i, 2000, &info[i]);
	content(k0 - 1, ob, 3000);
	if (r == 0 && (r = store_put(fx->c->store, STORE_KIND_TENSOR, ob, 3000, NULL, orphan)) == 0)
		store_unpin(fx->c->store, orphan->digest);
	free(ob);
	if (r == 0) {
		struct index_blob wrong = { .kind = STORE_KIND_RAW, .raw_size = 1,
					    .stored_size = (int64_t)info[2].stored_size + 3,
					    .last_access = 1 };
		memcpy(wrong.digest, info[2].digest, STORE_DIGEST_SIZE);
		r = index_blob_seen(fx->c->index, 0, &wrong);
	}
	if (r == 0)
		r = index_flush(fx->c->index);
	cache_close(fx->c); /* no record: as after kill -9 */
	fx->c = NULL;
	blob_path(fx, info[0].digest, p, sizeof(p));
	if (r == 0 && unlink(p) < 0)
		r = -errno;
	blob_path(fx, info[1].digest, p, sizeof(p));
	if (r == 0 && truncate(p, 10) < 0)
		r = -errno;
	return r;
}

/*
 * A start after a crash that leaves every directory to the background reconciliation
 * (cache_settle_*): nothing counted at first, max_size waiting; a write that lands in the
 * directory being walked makes that walk start again; writes elsewhere go on between walks;
 * at the end the same repairs as the full reconciliation, the accounting equal to the files
 * on disk and the eviction down to max_size. A clean stop in the middle records only the
 * walked directories.
 */
TEST(background_reconciliation_while_writing)
{
	struct fixture fx;
	struct store_blob_info info[300], orphan, x;
	struct cache_settle *w;
	struct store_stats st;
	bool written = false;
	char why[256] = "";
	int k = 1000, rounds = 0;

	ASSERT_EQ(crashed_cache(&fx, 300, 1, info, &orphan), 0);
	fx.opt.background_all = true;
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(!fx.rep.clean_start);
	ASSERT_EQ(fx.rep.dirs_walked, 0u);
	ASSERT_EQ(fx.rep.dirs_left, 256u);
	ASSERT_EQ(cache_settle_left(fx.c), 256u);
	store_get_stats(fx.c->store, &st);
	ASSERT_EQ(st.unsettled_dirs, 256u);
	ASSERT_UINT_EQ(st.objects, 0);
	/* max_size waits for the end: a write past it is admitted meanwhile */
	store_set_limits(fx.c->store, 100000, 0);
	ASSERT_EQ(cache_reserve(fx.c, 50000), 0);
	store_release(fx.c->store, 50000);
	/* items are found through their rows meanwhile */
	struct index_blob row;
	ASSERT_EQ(index_blob_get(fx.c->index, info[5].digest, &row), 0);
	ASSERT_EQ(store_verify(fx.c->store, info[5].digest, NULL), 0);

	/* a blob published into the directory being walked: that walk starts again */
	ASSERT_EQ(cache_settle_begin(fx.c, &w), 0);
	ASSERT_NOT_NULL(w);
	unsigned b = cache_settle_dir(w);
	k = content_in_dir(b, k, 2000);
	ASSERT_EQ(put_item(fx.c, 0, 0, k++, 2000, &x), 0);
	ASSERT_EQ(x.digest[0], b);
	cache_settle_work(w);
	ASSERT_EQ(cache_settle_end(fx.c, w), 0);
	ASSERT_EQ(cache_settle_left(fx.c), 256u);

	/* the rest, with writes between the walks (every fifth one) */
	while (cache_settle_left(fx.c) > 200) {
		ASSERT_EQ(cache_settle_begin(fx.c, &w), 0);
		ASSERT_NOT_NULL(w);
		cache_settle_work(w);
		if (++rounds % 5 == 0)
			ASSERT_EQ(put_item(fx.c, 0, 0, k++, 2000, NULL), 0);
		ASSERT(cache_settle_end(fx.c, w) >= 0);
	}
	/* a clean stop now: the walked directories are recorded, the others walked next time */
	unsigned left = cache_settle_left(fx.c);
	ASSERT_EQ(cache_close_clean(fx.c, &written, why, sizeof(why)), 0);
	fx.c = NULL;
	ASSERT(written);
	fx.opt.background_all = false;
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT(fx.rep.clean_start);
	ASSERT(fx.rep.dirs_walked >= left && fx.rep.dirs_walked < 256u);
	ASSERT_EQ(check_i3(&fx), 0);
	cache_close(fx.c);
	fx.c = NULL;

	/* again after a crash, to the end this time, max_size below what is stored */
	fx.opt.background_all = true;
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT_EQ(fx.rep.dirs_left, 256u);
	store_set_limits(fx.c->store, 400000, 0);
	fx.opt.store.max_size = 400000;
	rounds = 0;
	while (cache_settle_left(fx.c)) {
		ASSERT_EQ(cache_settle_begin(fx.c, &w), 0);
		ASSERT_NOT_NULL(w);
		cache_settle_work(w);
		if (++rounds % 7 == 0)
			ASSERT_EQ(put_item(fx.c, 0, 0, k++, 2000, NULL), 0);
		ASSERT(cache_settle_end(fx.c, w) >= 0);
	}
	ASSERT(fx.c->settle_rep.evicted_bytes > 0);
	store_get_stats(fx.c->store, &st);
	ASSERT_EQ(st.unsettled_dirs, 0u);
	ASSERT_UINT_EQ(st.used_bytes, file_bytes(&fx));
	ASSERT(st.used_bytes <= 400000);
	ASSERT_EQ(check_i3(&fx), 0);
	fx_close(&fx);
}

/* The first start after the damage of background_reconciliation_while_writing repairs what
 * the full reconciliation repairs. */
TEST(background_reconciliation_repairs)
{
	struct fixture fx;
	struct store_blob_info info[40], orphan;
	struct cache_settle *w;

	ASSERT_EQ(crashed_cache(&fx, 40, 500, info, &orphan), 0);
	fx.opt.background_all = true;
	ASSERT_EQ(fx_reopen(&fx), 0);
	ASSERT_EQ(fx.rep.dirs_left, 256u);
	while (cache_settle_left(fx.c)) {
		ASSERT_EQ(cache_settle_begin(fx.c, &w), 0);
		cache_settle_work(w);
		ASSERT(cache_settle_end(fx.c, w) >= 0);
	}
	ASSERT_EQ(fx.c->settle_rep.dirs, 256u);
	/* the walk's own quarantine of the truncated blob is a change: that directory twice */
	ASSERT_EQ(fx.c->settle_rep.retries, 1u);
	ASSERT_EQ(fx.c->settle_rep.adopted, 1);       /* the orphan */
	ASSERT_EQ(fx.c->settle_rep.rows_dropped, 2);  /* vanished and truncated */
	ASSERT_EQ(fx.c->settle_rep.files_removed, 1); /* the truncated blob */
	struct index_blob row;
	ASSERT_EQ(index_blob_get(fx.c->index, info[2].digest, &row), 0);
	ASSERT_EQ(row.stored_size, (int64_t)info[2].stored_size);
	ASSERT_EQ(index_blob_get(fx.c->index, orphan.digest, &row), 0);
	ASSERT_EQ(check_i3(&fx), 0);
	struct store_stats st;
	store_get_stats(fx.c->store, &st);
	ASSERT_UINT_EQ(st.objects, 39);
	ASSERT_UINT_EQ(st.used_bytes, file_bytes(&fx));
	fx_close(&fx);
}

int main(int argc, char **argv)
{
	/* The kill -9 loop takes seconds: it runs only when asked for by name (suite slow). */
	if (argc > 1 && strcmp(argv[1], "kill9_loop") == 0)
		RUN_TESTS(T(kill9_loop));
	RUN_TESTS(T(reconciliation), T(eviction_lru_and_pins), T(limits_changed_while_running),
		  T(max_size_bound_under_sustained_writes),
		  T(corrupt_blob_is_detected_and_refetched),
		  T(clean_stop_settles_only_agreeing_directories),
		  T(background_reconciliation_while_writing), T(background_reconciliation_repairs));
}
