/*
 * Allocation failure, countdown style (docs/reliability.md O3 a; the SQLite OOM-loop model):
 * for each API call below, allocation number N fails, for N = 1, 2, ... until the call
 * succeeds without meeting a failure. Every call must return an error or succeed, leave
 * the state as it was when it fails, and leak nothing (LeakSanitizer in the ASan build
 * checks the whole run). Two modes: transient (only allocation N fails) and persistent
 * (every allocation from N on fails).
 *
 * Which allocations are counted:
 *   - our own code's malloc/calloc/realloc/strdup (store.c, index.c, cache.c, proto.c),
 *     through -Wl,--wrap (tests/unit/meson.build);
 *   - SQLite's, through sqlite3_config(SQLITE_CONFIG_MALLOC);
 *   - libcrypto's (the SHA-256 contexts of the store), through CRYPTO_set_mem_functions.
 * libzstd's internal allocations are not hooked (it has no global allocator hook; the
 * store's zstd contexts are only made when a payload compresses): they are not counted.
 */
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache.h"
#include "index.h"
#include "proto.h"
#include "store.h"
#include "task.h"

/* ---- the allocator hook ---- */

static long alloc_count;  /* hooked allocations since arm() */
static long fail_at;      /* 0: none fails */
static bool persistent;   /* fail every allocation from fail_at on */
static long failed_count; /* failures handed out since arm() */

static bool should_fail(void)
{
	if (!fail_at)
		return false;
	alloc_count++;
	if (alloc_count == fail_at || (persistent && alloc_count > fail_at)) {
		failed_count++;
		return true;
	}
	return false;
}

static void arm(long n, bool pers)
{
	alloc_count = 0;
	failed_count = 0;
	persistent = pers;
	fail_at = n;
}

static void disarm(void)
{
	fail_at = 0;
}

void *__real_malloc(size_t n);
void *__real_calloc(size_t a, size_t b);
void *__real_realloc(void *p, size_t n);
char *__real_strdup(const char *s);

void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t a, size_t b);
void *__wrap_realloc(void *p, size_t n);
char *__wrap_strdup(const char *s);

void *__wrap_malloc(size_t n)
{
	return should_fail() ? NULL : __real_malloc(n);
}

void *__wrap_calloc(size_t a, size_t b)
{
	return should_fail() ? NULL : __real_calloc(a, b);
}

void *__wrap_realloc(void *p, size_t n)
{
	return should_fail() ? NULL : __real_realloc(p, n);
}

char *__wrap_strdup(const char *s)
{
	return should_fail() ? NULL : __real_strdup(s);
}

/* SQLite's allocator: a size prefix, as SQLITE_CONFIG_MALLOC requires xSize. */
static void *sq_malloc(int n)
{
	if (n <= 0 || should_fail())
		return NULL;
	int64_t *p = __real_malloc((size_t)n + 8);
	if (!p)
		return NULL;
	p[0] = n;
	return p + 1;
}

static void sq_free(void *p)
{
	if (p)
		free((int64_t *)p - 1);
}

static void *sq_realloc(void *p, int n)
{
	if (n <= 0 || should_fail())
		return NULL;
	int64_t *q = __real_realloc(p ? (int64_t *)p - 1 : NULL, (size_t)n + 8);
	if (!q)
		return NULL;
	q[0] = n;
	return q + 1;
}

static int sq_size(void *p)
{
	return p ? (int)((int64_t *)p)[-1] : 0;
}

static int sq_roundup(int n)
{
	return (n + 7) & ~7;
}

static int sq_init(void *ctx)
{
	(void)ctx;
	return SQLITE_OK;
}

static void sq_shutdown(void *ctx)
{
	(void)ctx;
}

static void *ossl_malloc(size_t n, const char *file, int line)
{
	(void)file;
	(void)line;
	return should_fail() ? NULL : __real_malloc(n);
}

static void *ossl_realloc(void *p, size_t n, const char *file, int line)
{
	(void)file;
	(void)line;
	return should_fail() ? NULL : __real_realloc(p, n);
}

static void ossl_free(void *p, const char *file, int line)
{
	(void)file;
	(void)line;
	free(p);
}

static int install_hooks(void)
{
	static const sqlite3_mem_methods mm = { sq_malloc, sq_free, sq_realloc, sq_size,
						sq_roundup, sq_init, sq_shutdown, NULL };
	if (sqlite3_config(SQLITE_CONFIG_MALLOC, &mm) != SQLITE_OK)
		return -1;
	/* no lookaside: its slots would hide allocations from the countdown */
	if (sqlite3_config(SQLITE_CONFIG_LOOKASIDE, 0, 0) != SQLITE_OK)
		return -1;
	if (!CRYPTO_set_mem_functions(ossl_malloc, ossl_realloc, ossl_free))
		return -1;
	return 0;
}

/* Countdown bound: no call here needs anywhere near this many allocations. */
#define MAX_N 20000

/* ---- fixtures ---- */

static int count_entries(const char *dir)
{
	char cmd[256];
	int n = 0;
	FILE *f;

	snprintf(cmd, sizeof(cmd), "find '%s' -mindepth 1 | wc -l", dir);
	f = popen(cmd, "r");
	if (!f)
		return -1;
	if (fscanf(f, "%d", &n) != 1)
		n = -1;
	pclose(f);
	return n;
}

static void payload(uint8_t *buf, size_t len, unsigned seed)
{
	uint32_t x = seed * 2654435761u + 1;
	for (size_t i = 0; i < len; i++) {
		x = x * 1103515245u + 12345u;
		buf[i] = (uint8_t)(x >> 16);
	}
}

/* On tmpfs when there is one: the index countdown opens thousands of databases, and
 * their fsyncs are not what is tested here. */
static void tmp_dir(char *out, size_t len)
{
	struct stat st;
	snprintf(out, len, "%s/dmc-allocfail-XXXXXX",
		 stat("/dev/shm", &st) == 0 && S_ISDIR(st.st_mode) ? "/dev/shm" : "/tmp");
}

static bool is_error(int r)
{
	return r == -ENOMEM || r == -DMC_E_INTERNAL || r == -EIO || r == -DMC_E_CACHE_FULL ||
	       r == -DMC_E_INTEGRITY;
}

/* Out of memory in the index must never pass for a damaged database (which would move
 * index.db aside) nor for a full disk. */
static bool is_oom_error(int r)
{
	return r == -ENOMEM || r == -EIO || r == -DMC_E_INTERNAL;
}

/* ---- store ---- */

static void store_countdown(int *task_failed_, bool pers)
{
	char dir[64];
	tmp_dir(dir, sizeof(dir));
	char tmpdir[128];
	struct store *s = NULL;
	struct store_options so = { 0 };
	uint8_t buf[8192], out[8192], d0[32], d1[32];
	struct store_blob_info info;
	struct store_stats st0, st1;
	uint64_t got = 0;
	long n;
	int r;

	ASSERT_NOT_NULL(mkdtemp(dir));
	snprintf(tmpdir, sizeof(tmpdir), "%s/tmp", dir);

	/* store_open */
	for (n = 1; n < MAX_N; n++) {
		arm(n, pers);
		r = store_open(dir, &so, NULL, 0, &s);
		disarm();
		if (r == 0 && failed_count == 0)
			break;
		if (r == 0) {
			store_close(s); /* a failure it could absorb */
			s = NULL;
			continue;
		}
		ASSERT(is_error(r));
	}
	ASSERT_LT(n, MAX_N);
	printf("# store_open%s: %ld allocations\n", pers ? " (persistent)" : "", n - 1);

	/* store_put of a new blob: on failure nothing is published, tmp/ is empty */
	payload(buf, sizeof(buf), 1);
	ASSERT_EQ(store_digest_of(buf, sizeof(buf), d0), 0);
	for (n = 1; n < MAX_N; n++) {
		store_get_stats(s, &st0);
		arm(n, pers);
		r = store_put(s, STORE_KIND_RAW, buf, sizeof(buf), d0, &info);
		disarm();
		if (r == 0) {
			store_unpin(s, d0);
			if (failed_count == 0)
				break;
			/* absorbed: the blob is there; remove it to try the next N */
			ASSERT_EQ(store_remove(s, d0, NULL), 0);
			continue;
		}
		ASSERT(is_error(r));
		store_get_stats(s, &st1);
		ASSERT_UINT_EQ(st1.objects, st0.objects);
		ASSERT_UINT_EQ(st1.used_bytes, st0.used_bytes);
		ASSERT_EQ(store_stat(s, d0, &info), -ENOENT);
		ASSERT_EQ(count_entries(tmpdir), 0);
		ASSERT(!store_is_pinned(s, d0));
	}
	ASSERT_LT(n, MAX_N);
	printf("# store_put%s: %ld allocations\n", pers ? " (persistent)" : "", n - 1);

	/* a compressible blob goes through zstd (its allocations are not counted) */
	memset(buf, 'a', sizeof(buf));
	ASSERT_EQ(store_digest_of(buf, sizeof(buf), d1), 0);
	for (n = 1; n < MAX_N; n++) {
		arm(n, pers);
		r = store_put(s, STORE_KIND_META, buf, sizeof(buf), d1, &info);
		disarm();
		if (r == 0) {
			store_unpin(s, d1);
			if (failed_count == 0)
				break;
			ASSERT_EQ(store_remove(s, d1, NULL), 0);
			continue;
		}
		ASSERT(is_error(r));
		ASSERT_EQ(store_stat(s, d1, &info), -ENOENT);
		ASSERT_EQ(count_entries(tmpdir), 0);
	}
	ASSERT_LT(n, MAX_N);

	/* store_read: a failure is an error, never wrong bytes, and never quarantines a
	 * good blob */
	payload(buf, sizeof(buf), 1);
	for (n = 1; n < MAX_N; n++) {
		memset(out, 0, sizeof(out));
		arm(n, pers);
		r = store_read(s, d0, out, sizeof(out), &got);
		disarm();
		if (r == 0) {
			ASSERT_UINT_EQ(got, sizeof(buf));
			ASSERT_MEM_EQ(out, buf, sizeof(buf));
			if (failed_count == 0)
				break;
			continue;
		}
		ASSERT(r == -ENOMEM || r == -DMC_E_INTERNAL);
		ASSERT_EQ(store_stat(s, d0, &info), 0); /* still there */
	}
	ASSERT_LT(n, MAX_N);
	printf("# store_read%s: %ld allocations\n", pers ? " (persistent)" : "", n - 1);

	/* store_verify_all and store_scan */
	for (n = 1; n < MAX_N; n++) {
		uint64_t ok = 0, bad = 0;
		arm(n, pers);
		r = store_verify_all(s, NULL, NULL, &ok, &bad);
		disarm();
		ASSERT_EQ(store_stat(s, d0, &info), 0);
		ASSERT_EQ(store_stat(s, d1, &info), 0);
		if (r == 0) {
			ASSERT_UINT_EQ(bad, 0);
			if (failed_count == 0)
				break;
			continue;
		}
		ASSERT(is_error(r));
	}
	ASSERT_LT(n, MAX_N);
	for (n = 1; n < MAX_N; n++) {
		uint64_t removed = 0;
		arm(n, pers);
		r = store_scan(s, NULL, NULL, &removed);
		disarm();
		ASSERT_EQ(store_stat(s, d0, &info), 0);
		ASSERT_EQ(store_stat(s, d1, &info), 0);
		if (r == 0 && failed_count == 0)
			break;
		ASSERT(r == 0 || is_error(r));
	}
	ASSERT_LT(n, MAX_N);

	/* pins */
	for (n = 1; n < MAX_N; n++) {
		arm(n, pers);
		r = store_pin(s, d0);
		disarm();
		if (r == 0) {
			ASSERT(store_is_pinned(s, d0));
			store_unpin(s, d0);
			if (failed_count == 0)
				break;
			continue;
		}
		ASSERT(is_error(r));
		ASSERT(!store_is_pinned(s, d0));
	}
	ASSERT_LT(n, MAX_N);

	store_close(s);
	task_rm_tree(dir);
}

TEST(store_transient)
{
	store_countdown(task_failed_, false);
}

TEST(store_persistent)
{
	store_countdown(task_failed_, true);
}

/* ---- index ---- */

static int count_items_cb(void *ctx, const struct index_item *item)
{
	(void)item;
	(*(int64_t *)ctx)++;
	return 0;
}

static int put_snapshot(struct index *ix, int64_t *ret_id)
{
	struct index_snapshot key = { 0 };
	bool created = false;
	int r;

	key.source = INDEX_SOURCE_DATAMINT;
	key.server_url = "http://127.0.0.1:1";
	key.project_id = "proj";
	key.project_name = "name";
	key.version = "v1";
	key.created_at = 1;
	key.owner = 0;
	r = index_snapshot_get_or_create(ix, &key, ret_id, &created);
	for (int64_t i = 0; r == 0 && i < 20; i++) {
		struct index_item it = { 0 };
		char rid[32];
		snprintf(rid, sizeof(rid), "res-%lld", (long long)i);
		it.snapshot_id = *ret_id;
		it.idx = i;
		it.resource_id = rid;
		it.filename = "f.dcm";
		it.mimetype = "application/dicom";
		it.size = 100 + i;
		it.etag = "\"e\"";
		it.meta = "{\"a\":1}";
		it.meta_len = 7;
		r = index_item_put(ix, &it);
	}
	if (r == 0)
		r = index_snapshot_seal(ix, *ret_id);
	if (r == 0)
		r = index_flush(ix);
	return r;
}

static void index_countdown(int *task_failed_, bool pers)
{
	char dir[64];
	tmp_dir(dir, sizeof(dir));
	char path[128], err[256];
	struct index *ix = NULL;
	bool rebuilt = false;
	int64_t id = 0, n_items;
	long n;
	int r;

	ASSERT_NOT_NULL(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/index.db", dir);

	/* index_open of a new database (transient mode only: each costs a few thousand
	 * opens), then of an existing one */
	for (int pass = pers ? 1 : 0; pass < 2; pass++) {
		if (pass == 1 && !ix)
			ASSERT_EQ(index_open(path, 0, err, sizeof(err), &ix, &rebuilt), 0);
		if (pass == 1) {
			index_close(ix);
			ix = NULL;
		}
		for (n = 1; n < MAX_N; n++) {
			arm(n, pers);
			r = index_open(path, 0, err, sizeof(err), &ix, &rebuilt);
			disarm();
			if (r == 0) {
				/* an out-of-memory open must never pass for a corrupt database */
				ASSERT(!rebuilt);
				if (failed_count == 0)
					break;
				index_close(ix);
				ix = NULL;
				continue;
			}
			ASSERT(is_oom_error(r));
		}
		ASSERT_LT(n, MAX_N);
		printf("# index_open%s (%s): %ld allocations\n", pers ? " (persistent)" : "",
		       pass ? "existing" : "new", n - 1);
	}

	/* a batch: snapshot, 20 items, seal, flush. On failure nothing of it is there. */
	for (n = 1; n < MAX_N; n++) {
		arm(n, pers);
		r = put_snapshot(ix, &id);
		disarm();
		if (r == 0 && failed_count == 0)
			break;
		if (r == 0) {
			ASSERT_EQ(index_snapshot_delete(ix, id), 0);
			ASSERT_EQ(index_flush(ix), 0);
			continue;
		}
		ASSERT(is_oom_error(r));
		/* the batch rolled back as a whole, and the index works again */
		ASSERT_EQ(index_flush(ix), 0);
		ASSERT_EQ(index_snapshot_find(ix, INDEX_SOURCE_DATAMINT, "http://127.0.0.1:1",
					      "proj", "v1", 0, &id), -ENOENT);
		ASSERT_EQ(index_check(ix, true), 0);
	}
	ASSERT_LT(n, MAX_N);
	printf("# index batch%s: %ld allocations\n", pers ? " (persistent)" : "", n - 1);

	/* reads: a page of items */
	for (n = 1; n < MAX_N; n++) {
		n_items = 0;
		arm(n, pers);
		r = index_items_page(ix, id, 0, 100, INDEX_ITEMS_ALL, count_items_cb, &n_items, NULL);
		disarm();
		if (r >= 0 && failed_count == 0) {
			ASSERT_EQ(n_items, 20);
			break;
		}
		ASSERT(r >= 0 || is_oom_error(r));
	}
	ASSERT_LT(n, MAX_N);

	index_close(ix);
	task_rm_tree(dir);
}

TEST(index_transient)
{
	index_countdown(task_failed_, false);
}

TEST(index_persistent)
{
	index_countdown(task_failed_, true);
}

/* ---- cache: open with reconciliation (store scan + index adoption) ---- */

static void cache_countdown(int *task_failed_, bool pers)
{
	char dir[64];
	tmp_dir(dir, sizeof(dir));
	struct cache_options co = { 0 };
	struct cache *c = NULL;
	struct cache_open_report rep;
	uint8_t buf[4096], d[32];
	struct store_blob_info info;
	char err[256];
	long n;
	int r;

	ASSERT_NOT_NULL(mkdtemp(dir));
	/* a blob on disk without a row: reconciliation adopts it */
	ASSERT_EQ(cache_open(dir, &co, err, sizeof(err), &c, NULL), 0);
	payload(buf, sizeof(buf), 7);
	ASSERT_EQ(store_put(c->store, STORE_KIND_RAW, buf, sizeof(buf), NULL, &info), 0);
	memcpy(d, info.digest, sizeof(d));
	store_unpin(c->store, d);
	cache_close(c);

	for (n = 1; n < MAX_N; n++) {
		arm(n, pers);
		r = cache_open(dir, &co, err, sizeof(err), &c, &rep);
		disarm();
		if (r == 0) {
			struct index_blob b;
			ASSERT(!rep.index_rebuilt);
			ASSERT_EQ(index_blob_get(c->index, d, &b), 0);
			cache_close(c);
			if (failed_count == 0)
				break;
			continue;
		}
		ASSERT(is_oom_error(r));
	}
	ASSERT_LT(n, MAX_N);
	printf("# cache_open%s: %ld allocations\n", pers ? " (persistent)" : "", n - 1);
	task_rm_tree(dir);
}

TEST(cache_persistent)
{
	cache_countdown(task_failed_, true);
}

/* ---- proto: the codec allocates nothing ---- */

TEST(proto_allocates_nothing)
{
	struct dmc_hello h = { 0 }, h2;
	struct dmc_prefetch pf = { 0 }, pf2;
	uint8_t out[4096];
	int len;

	h.version_min = 1;
	h.version_max = 1;
	pf.project.ptr = "sample";
	pf.project.len = 6;
	arm(1, true); /* every allocation fails */
	len = dmc_hello_encode(&h, 7, out, sizeof(out));
	ASSERT_GT(len, 0);
	ASSERT_EQ(dmc_hello_decode(out + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE, &h2), 0);
	len = dmc_prefetch_encode(&pf, 8, out, sizeof(out));
	ASSERT_GT(len, 0);
	ASSERT_EQ(dmc_prefetch_decode(out + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE, &pf2),
		  0);
	disarm();
	ASSERT_EQ(alloc_count, 0);
}

int main(int argc, char **argv)
{
	if (install_hooks() < 0) {
		printf("Bail out! cannot install the allocator hooks\n");
		return 1;
	}
	/* as the daemon does first thing: OpenSSL's own lazy set-up cannot survive a failed
	 * allocation (store.h) */
	if (store_crypto_init() < 0) {
		printf("Bail out! no SHA-256 from OpenSSL\n");
		return 1;
	}
	RUN_TESTS(T(store_transient), T(store_persistent), T(index_transient),
		  T(index_persistent), T(cache_persistent),
		  T(proto_allocates_nothing));
}
