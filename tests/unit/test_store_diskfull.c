/*
 * Disk full (docs/reliability.md D1, D2, D3's min_free) on a real 4 MiB tmpfs: a blob write
 * that hits ENOSPC gives -DMC_E_CACHE_FULL with its temp file gone and the free space back,
 * earlier blobs still read, an SQLite commit on a full disk rolls back cleanly, and writes
 * succeed again once space is freed. min_free admission evicts before the disk fills.
 *
 * Needs root to mount the tmpfs; otherwise (or if mount fails) the whole program reports a
 * TAP skip with the reason.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "cache.h"
#include "proto.h"
#include "task.h"

#define FS_SIZE "4m"
#define OBJ (256u << 10)

static char mnt[64];

static uint64_t fs_free(void)
{
	struct statvfs v;
	if (statvfs(mnt, &v) < 0)
		return 0;
	return (uint64_t)v.f_bavail * v.f_frsize;
}

static int count_dir(const char *sub)
{
	char p[128];
	snprintf(p, sizeof(p), "%s/%s", mnt, sub);
	DIR *d = opendir(p);
	struct dirent *e;
	int n = 0;
	while (d && (e = readdir(d)) != NULL)
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			n++;
	if (d)
		closedir(d);
	return d ? n : -1;
}

static void content(int k, uint8_t *buf, size_t n)
{
	/* Incompressible, so that every blob costs its full size. */
	uint64_t x = (uint64_t)k * 0x9e3779b97f4a7c15ull + 3;
	for (size_t i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		buf[i] = (uint8_t)(x >> 24);
	}
}

TEST(blob_write_hits_enospc)
{
	struct cache *c;
	struct cache_options o = { 0 };
	char err[256];
	struct store_blob_info info[32];
	uint8_t *buf = malloc(OBJ), *back = malloc(OBJ);
	int stored = 0, r = 0;
	uint64_t got;

	ASSERT_EQ(cache_open(mnt, &o, err, sizeof(err), &c, NULL), 0);
	/* Fill the file system with blobs until one does not fit. */
	uint64_t before = 0;
	for (int k = 0; k < 32; k++) {
		content(k, buf, OBJ);
		before = fs_free();
		r = store_put(c->store, STORE_KIND_RAW, buf, OBJ, NULL, &info[k]);
		if (r < 0)
			break;
		store_unpin(c->store, info[k].digest);
		ASSERT_EQ(cache_record_blob(c, &info[k]), 0);
		stored++;
	}
	printf("# %d blobs of %u KiB stored before the file system filled\n", stored, OBJ >> 10);
	ASSERT_EQ(r, -DMC_E_CACHE_FULL);
	ASSERT_GT(stored, 4);
	/* No half-written blob: the temp file is gone and its space is back. */
	ASSERT_EQ(count_dir("tmp"), 0);
	ASSERT_UINT_EQ(fs_free(), before);
	struct store_stats st;
	store_get_stats(c->store, &st);
	ASSERT_UINT_EQ(st.objects, (uint64_t)stored);
	ASSERT_GE(st.cache_full, 1);

	/* The streaming writer too: the error comes from a write, and sticks. */
	struct store_writer *w;
	ASSERT_EQ(store_writer_open(c->store, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &w), 0);
	int wr = 0;
	for (int i = 0; i < 64 && wr == 0; i++) {
		content(1000 + i, buf, OBJ);
		wr = store_writer_write(w, buf, OBJ);
	}
	if (wr == 0)
		wr = store_writer_commit(w, NULL, NULL);
	else
		ASSERT_EQ(store_writer_commit(w, NULL, NULL), -DMC_E_CACHE_FULL);
	ASSERT_EQ(wr, -DMC_E_CACHE_FULL);
	ASSERT_EQ(count_dir("tmp"), 0);

	/* Reads keep working. */
	for (int k = 0; k < stored; k++) {
		content(k, buf, OBJ);
		ASSERT_EQ(store_read(c->store, info[k].digest, back, OBJ, &got), 0);
		ASSERT_MEM_EQ(back, buf, OBJ);
	}

	/* Space freed (evicting one blob): the same write succeeds. */
	uint64_t freed = 0;
	ASSERT_EQ(cache_evict(c, 1, &freed), 0);
	ASSERT_UINT_EQ(freed, OBJ + STORE_HEADER_SIZE);
	content(stored, buf, OBJ);
	ASSERT_EQ(store_put(c->store, STORE_KIND_RAW, buf, OBJ, NULL, &info[0]), 0);
	store_unpin(c->store, info[0].digest);
	ASSERT_EQ(cache_record_blob(c, &info[0]), 0);
	ASSERT_EQ(index_flush(c->index), 0);
	ASSERT_EQ(cache_close(c), 0);

	/* I3 after a restart on the full file system. */
	struct cache_open_report rep;
	ASSERT_EQ(cache_open(mnt, &o, err, sizeof(err), &c, &rep), 0);
	ASSERT_EQ(rep.files_removed, 0);
	ASSERT_EQ(rep.rows_dropped, 0); /* the eviction flushed its row deletion */
	/* The index needs a few pages of log to reconcile: when the file system has not even
	 * those, the least recently used blobs go first, one at a time, and are reported. */
	ASSERT_EQ(rep.full_evicted % (OBJ + STORE_HEADER_SIZE), 0);
	ASSERT(rep.full_evicted <= 2 * (OBJ + STORE_HEADER_SIZE));
	ASSERT_EQ(rep.blobs + rep.full_evicted / (OBJ + STORE_HEADER_SIZE), (uint64_t)stored);
	printf("# restart on the full file system: %" PRIu64 " blob(s) evicted for the index\n",
	       rep.full_evicted / (OBJ + STORE_HEADER_SIZE));
	ASSERT_EQ(index_check(c->index, true), 0);
	cache_close(c);
	free(buf);
	free(back);
}

TEST(index_commit_on_full_disk_rolls_back)
{
	struct cache *c;
	struct cache_options o = { 0 };
	char err[256];
	char filler[128];
	int fd;

	ASSERT_EQ(cache_open(mnt, &o, err, sizeof(err), &c, NULL), 0);
	/* The previous case left the disk full of blobs: make room to fill it differently. */
	ASSERT_EQ(cache_evict(c, 1u << 20, NULL), 0);
	int64_t snap;
	struct index_snapshot k = { .source = INDEX_SOURCE_DATAMINT, .server_url = "u",
				    .project_id = "p", .project_name = "p", .version = "v" };
	ASSERT_EQ(index_snapshot_get_or_create(c->index, &k, &snap, NULL), 0);
	ASSERT_EQ(index_flush(c->index), 0);

	/* Fill what is left of the file system but 512 KiB. */
	snprintf(filler, sizeof(filler), "%s/filler", mnt);
	fd = open(filler, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	ASSERT_GE(fd, 0);
	uint8_t *block = calloc(1, 65536);
	while (write(fd, block, 65536) > 0)
		;
	while (write(fd, block, 512) > 0)
		;
	free(block);
	struct stat fst;
	ASSERT_EQ(fstat(fd, &fst), 0);
	ASSERT_GT(fst.st_size, 512 << 10);
	ASSERT_EQ(ftruncate(fd, fst.st_size - (512 << 10)), 0);
	close(fd);

	/* Batches of items with metadata until a write or the commit fails. */
	char meta[4000];
	memset(meta, 'm', sizeof(meta));
	int r = 0, committed = 0, i = 0;
	for (int batch = 0; batch < 200 && r == 0; batch++) {
		for (int j = 0; j < 50 && r == 0; j++, i++) {
			char rid[16];
			snprintf(rid, sizeof(rid), "r%d", i);
			struct index_item it = { .snapshot_id = snap, .idx = i, .resource_id = rid,
						 .filename = rid, .mimetype = "m", .size = 1,
						 .meta = meta, .meta_len = sizeof(meta) };
			r = index_item_put(c->index, &it);
		}
		if (r == 0)
			r = index_flush(c->index);
		if (r == 0)
			committed = i;
	}
	printf("# %d items committed before SQLite reported the disk full\n", committed);
	ASSERT_EQ(r, -DMC_E_CACHE_FULL);
	ASSERT_GT(committed, 0);
	ASSERT_EQ(index_pending(c->index), 0);
	/* The database is sound and keeps answering; what was committed is there. */
	ASSERT_EQ(index_check(c->index, false), 0);
	ASSERT_EQ(index_item_get(c->index, snap, committed - 1, NULL, NULL), 0);
	ASSERT_EQ(index_item_get(c->index, snap, committed, NULL, NULL), -ENOENT);

	/* Space back: the next batch commits. */
	ASSERT_EQ(unlink(filler), 0);
	struct index_item it = { .snapshot_id = snap, .idx = committed, .resource_id = "x",
				 .filename = "x", .mimetype = "m", .size = 1 };
	ASSERT_EQ(index_item_put(c->index, &it), 0);
	ASSERT_EQ(index_flush(c->index), 0);
	ASSERT_EQ(index_item_get(c->index, snap, committed, NULL, NULL), 0);
	ASSERT_EQ(cache_close(c), 0);
}

TEST(min_free_admission_evicts_first)
{
	struct cache *c;
	struct cache_options o = { .store.min_free = 1u << 20 };
	char err[256];
	uint8_t *buf = malloc(OBJ);
	struct store_stats st;

	ASSERT_EQ(cache_open(mnt, &o, err, sizeof(err), &c, NULL), 0);
	/* Three times the file system's size through cache_reserve(): never ENOSPC, and the
	 * free space never below min_free minus one object. */
	for (int k = 0; k < 48; k++) {
		struct store_blob_info info;
		content(500 + k, buf, OBJ);
		ASSERT_EQ(cache_reserve(c, OBJ), 0);
		ASSERT_EQ(store_put(c->store, STORE_KIND_RAW, buf, OBJ, NULL, &info), 0);
		store_unpin(c->store, info.digest);
		ASSERT_EQ(cache_record_blob(c, &info), 0);
		store_release(c->store, OBJ);
		ASSERT_EQ(index_flush(c->index), 0);
		ASSERT_GE(fs_free() + OBJ + STORE_HEADER_SIZE, o.store.min_free);
	}
	store_get_stats(c->store, &st);
	ASSERT_GT(st.removed, 20);
	ASSERT_EQ(cache_close(c), 0);
	free(buf);
}

int main(int argc, char **argv)
{
	int r;

	if (geteuid() != 0) {
		/* CI runs as root: there a lost privilege must fail, not hide the tests */
		const char *ci = getenv("CI");
		if (ci && strcmp(ci, "true") == 0) {
			printf("Bail out! CI runs as root, but these tests run as uid %u\n",
			       (unsigned)geteuid());
			return 1;
		}
		printf("1..0 # SKIP needs root to mount a tmpfs for the disk-full tests\n");
		return 0;
	}
	snprintf(mnt, sizeof(mnt), "/tmp/dmc-full-XXXXXX");
	if (!mkdtemp(mnt)) {
		printf("1..0 # SKIP cannot create a mount point: %s\n", strerror(errno));
		return 0;
	}
	if (mount("tmpfs", mnt, "tmpfs", MS_NOSUID | MS_NODEV, "size=" FS_SIZE ",mode=0700") < 0) {
		printf("1..0 # SKIP cannot mount a tmpfs: %s\n", strerror(errno));
		rmdir(mnt);
		return 0;
	}
	/* The cases share the file system, in this order: each starts from what the previous
	 * one left (a full disk), which is the situation each of them is about. */
	static const struct task_case cases[] = { T(blob_write_hits_enospc),
						  T(index_commit_on_full_disk_rolls_back),
						  T(min_free_admission_evicts_first) };
	r = task_run(cases, sizeof(cases) / sizeof(cases[0]), argc > 1 ? argv[1] : NULL);
	umount2(mnt, MNT_DETACH);
	rmdir(mnt);
	return r;
}
