/*
 * Scale of the index (docs/benchmarks.md T6): a 1,000,000-item snapshot inserted in batches,
 * then the cost of what a restarted daemon does before serving it: index_open() (with its
 * quick_check), finding the snapshot, the first item, random point lookups by position,
 * and paging from the middle. Checks the answers; prints the timings (suite slow: a
 * measurement, the only bounds asserted are generous sanity limits).
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "index.h"
#include "proto.h"
#include "task.h"

#define ITEMS 1000000

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static long rss_kib(void)
{
	FILE *f = fopen("/proc/self/statm", "r");
	long pages = 0, res = 0;
	if (f) {
		if (fscanf(f, "%ld %ld", &pages, &res) != 2)
			res = 0;
		fclose(f);
	}
	return res * (sysconf(_SC_PAGESIZE) / 1024);
}

struct seen {
	int64_t idx;
	char rid[32];
};

static int on_item(void *ctx, const struct index_item *it)
{
	struct seen *s = ctx;
	s->idx = it->idx;
	snprintf(s->rid, sizeof(s->rid), "%s", it->resource_id);
	return 0;
}

TEST(one_million_items)
{
	char dir[64] = "/tmp/dmc-scale-XXXXXX", path[128], err[256] = "";
	struct index *ix;
	int64_t snap, id;
	double t0, t1;
	char meta[300];

	ASSERT_NOT_NULL(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/index.db", dir);
	ASSERT_EQ(index_open(path, 0, err, sizeof(err), &ix, NULL), 0);
	struct index_snapshot k = { .source = INDEX_SOURCE_DATAMINT,
				    .server_url = "https://api.datamint.io",
				    .project_id = "big",
				    .project_name = "big",
				    .version = "2025-01-01T00:00:00.000Z" };
	ASSERT_EQ(index_snapshot_get_or_create(ix, &k, &snap, NULL), 0);
	memset(meta, 'a', sizeof(meta));

	t0 = now_s();
	for (int64_t i = 0; i < ITEMS; i++) {
		char rid[32], fname[48], etag[24];
		snprintf(rid, sizeof(rid), "res-%08lld", (long long)i);
		snprintf(fname, sizeof(fname), "series/%08lld.dcm", (long long)i);
		snprintf(etag, sizeof(etag), "%016llx", (unsigned long long)(i * 2654435761u));
		struct index_item it = { .snapshot_id = snap, .idx = i, .resource_id = rid,
					 .filename = fname, .mimetype = "application/dicom",
					 .size = 500000 + i, .etag = etag, .meta = meta,
					 .meta_len = sizeof(meta) };
		ASSERT_EQ(index_item_put(ix, &it), 0);
		if (index_pending(ix) >= 10000)
			ASSERT_EQ(index_flush(ix), 0);
	}
	ASSERT_EQ(index_snapshot_seal(ix, snap), 0);
	ASSERT_EQ(index_flush(ix), 0);
	t1 = now_s();
	printf("# insert: %d items in %.2f s = %.0f items/s (batches of 10000)\n", ITEMS, t1 - t0,
	       ITEMS / (t1 - t0));
	index_close(ix);

	struct stat st;
	ASSERT_EQ(stat(path, &st), 0);
	printf("# index.db: %.0f MiB\n", (double)st.st_size / (1 << 20));

	/* A restart: open (quick_check included), find the snapshot, its first item. */
	long rss0 = rss_kib();
	t0 = now_s();
	ASSERT_EQ(index_open(path, 0, err, sizeof(err), &ix, NULL), 0);
	double t_open = now_s();
	ASSERT_EQ(index_snapshot_find(ix, k.source, k.server_url, k.project_id, k.version, k.owner, &id), 0);
	ASSERT_EQ(id, snap);
	struct seen s = { -1, "" };
	ASSERT_EQ(index_item_get(ix, snap, 0, on_item, &s), 0);
	t1 = now_s();
	ASSERT_EQ(s.idx, 0);
	ASSERT_STR_EQ(s.rid, "res-00000000");
	printf("# reopen: index_open (with quick_check) %.3f s, snapshot + first item %.6f s\n",
	       t_open - t0, t1 - t_open);
	ASSERT_LT(t1 - t0, 60.0);

	/* Random point lookups by position. */
	uint64_t x = 1;
	int bad = 0;
	t0 = now_s();
	for (int n = 0; n < 200000; n++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		int64_t i = (int64_t)((x >> 33) % ITEMS);
		char want[32];
		snprintf(want, sizeof(want), "res-%08lld", (long long)i);
		if (index_item_get(ix, snap, i, on_item, &s) != 0 || s.idx != i ||
		    strcmp(s.rid, want) != 0)
			bad++;
	}
	t1 = now_s();
	ASSERT_EQ(bad, 0);
	printf("# random point lookups: %.0f /s\n", 200000 / (t1 - t0));

	/* A page from the middle, and the live counts. */
	int64_t next = 0;
	t0 = now_s();
	ASSERT_EQ(index_items_page(ix, snap, 777777, 1000, INDEX_ITEMS_ALL, on_item, &s, &next),
		  1000);
	ASSERT_EQ(next, 778777);
	ASSERT_EQ(s.idx, 778776);
	struct index_snapshot_stats ss;
	ASSERT_EQ(index_snapshot_stats(ix, snap, &ss), 0);
	t1 = now_s();
	ASSERT_EQ(ss.items, ITEMS);
	ASSERT_EQ(ss.items_stored, 0);
	printf("# page of 1000 from the middle + live stats of 1M items: %.3f s\n", t1 - t0);
	printf("# RSS growth over open and 200k lookups: %ld KiB\n", rss_kib() - rss0);
	index_close(ix);
	task_rm_tree(dir);
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(one_million_items));
}
