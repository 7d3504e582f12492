/*
 * Unit tests of a local folder's kept item table (daemon/local_table.c): a table written
 * from a real parse (daemon/local.c) maps back to the same ids, paths and masks; a damaged
 * header, a damaged structure or a cut file is refused and removed; another uid's or
 * another digest's table is never found; a write that fails (the file size limit) leaves
 * nothing behind; the garbage collection keeps what it is told to and young temp files.
 * Each test works in a fresh temporary directory (the cache directory).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "local.h"
#include "local_table.h"
#include "task.h"

static char dir[64];

static void fresh_dir(void)
{
	if (dir[0])
		task_rm_tree(dir);
	snprintf(dir, sizeof(dir), "/tmp/dmc-lt-XXXXXX");
	if (!mkdtemp(dir))
		abort();
}

/* A dataset.json of n items (every seventh with two masks) parsed as the daemon does. */
static struct local_dataset *parsed(uint32_t n)
{
	char path[128], err[256];
	struct local_dataset *l = NULL;
	FILE *f;
	int fd;

	snprintf(path, sizeof(path), "%s/dataset.json", dir);
	f = fopen(path, "w");
	if (!f)
		return NULL;
	fprintf(f, "{\"name\": \"t\", \"updated_at\": \"v1\", \"resources\": [");
	for (uint32_t i = 0; i < n; i++) {
		fprintf(f, "%s{\"id\": \"r%u\", \"file\": \"images/i%u.png\", \"annotations\": [",
			i ? "," : "", i, i);
		if (i % 7 == 0)
			fprintf(f, "{\"id\": \"a%u\", \"file\": \"masks/m%u.png\"},"
				   "{\"id\": \"b%u\", \"file\": \"masks/n%u.png\"}", i, i, i, i);
		fprintf(f, "]}");
	}
	fprintf(f, "]}");
	fclose(f);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return NULL;
	if (local_parse(fd, "/data/t", true, &l, err, sizeof(err)) < 0)
		l = NULL;
	close(fd);
	return l;
}

static void table_path(char *buf, size_t len, uid_t uid, const uint8_t *digest)
{
	int k = snprintf(buf, len, "%s/tables/%u-", dir, (unsigned)uid);
	for (unsigned i = 0; i < 32; i++)
		k += snprintf(buf + k, len - (size_t)k, "%02x", digest[i]);
}

static size_t entries(const char *sub)
{
	char p[128];
	size_t n = 0;
	DIR *d;
	struct dirent *e;

	snprintf(p, sizeof(p), "%s/%s", dir, sub);
	if (!(d = opendir(p)))
		return 0;
	while ((e = readdir(d)))
		n += e->d_name[0] != '.' || (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."));
	closedir(d);
	return n;
}

/* Flips one byte of the file at `off` (from the end when negative). */
static int flip(const char *path, long off)
{
	int fd = open(path, O_RDWR);
	struct stat st;
	uint8_t b;
	int rc = -1;

	if (fd < 0 || fstat(fd, &st) != 0)
		goto out;
	if (off < 0)
		off += st.st_size;
	if (pread(fd, &b, 1, off) != 1)
		goto out;
	b ^= 0x01;
	rc = pwrite(fd, &b, 1, off) == 1 ? 0 : -1;
out:
	if (fd >= 0)
		close(fd);
	return rc;
}

TEST(written_table_maps_to_the_same_items)
{
	struct local_dataset *l, *m = NULL;

	fresh_dir();
	ASSERT_NOT_NULL(l = parsed(1000));
	ASSERT_EQ(local_table_write(dir, 1234, l), 0);
	ASSERT_EQ(local_table_map(dir, 1234, l->digest, l->n, "/data/t", &m), 0);
	ASSERT_NOT_NULL(m->map);
	ASSERT_UINT_EQ(m->n, l->n);
	ASSERT_UINT_EQ(m->n_paths, l->n_paths);
	ASSERT_UINT_EQ(m->n_masks, l->n_masks);
	ASSERT_UINT_EQ(m->n_paths, 1000 + 2 * 143);
	ASSERT_MEM_EQ(m->digest, l->digest, 32);
	for (uint32_t i = 0; i < l->n; i++) {
		ASSERT_STR_EQ(local_item_id(m, i), local_item_id(l, i));
		ASSERT_STR_EQ(local_item_path(m, i), local_item_path(l, i));
		ASSERT_UINT_EQ(m->items[i].n_masks, l->items[i].n_masks);
		for (uint32_t k = 0; k < l->items[i].n_masks; k++) {
			ASSERT_STR_EQ(local_mask_id(m, i, k), local_mask_id(l, i, k));
			ASSERT_STR_EQ(local_mask_path(m, i, k), local_mask_path(l, i, k));
		}
		ASSERT(local_table_path_ok(local_item_path(m, i)));
	}
	for (uint32_t k = 0; k < l->n_paths; k++)
		ASSERT_STR_EQ(local_path(m, k), local_path(l, k));
	ASSERT_STR_EQ(local_item_path(m, 999), "images/i999.png");
	local_table_trim(m); /* the pages come back from the file */
	ASSERT_STR_EQ(local_mask_path(m, 994, 1), "masks/n994.png");
	local_dataset_free(m);
	local_dataset_free(l);
}

TEST(another_uid_digest_or_count_is_not_this_table)
{
	struct local_dataset *l, *m = NULL;
	uint8_t other[32];
	char path[256];
	struct stat st;

	fresh_dir();
	ASSERT_NOT_NULL(l = parsed(50));
	ASSERT_EQ(local_table_write(dir, 1234, l), 0);
	table_path(path, sizeof(path), 1234, l->digest);
	memcpy(other, l->digest, 32);
	other[5] ^= 0x80;
	ASSERT_EQ(local_table_map(dir, 1235, l->digest, l->n, "/data/t", &m), -ENOENT);
	ASSERT_EQ(local_table_map(dir, 1234, other, l->n, "/data/t", &m), -ENOENT);
	ASSERT_EQ(stat(path, &st), 0); /* nobody else's question removes it */
	ASSERT_EQ(st.st_mode & 0777, 0600);
	/* the right name with another count: a table that does not hold, removed */
	ASSERT_EQ(local_table_map(dir, 1234, l->digest, l->n + 1, "/data/t", &m), -EBADMSG);
	ASSERT_NULL(m);
	ASSERT_NE(stat(path, &st), 0);
	local_dataset_free(l);
}

TEST(damaged_tables_are_refused_and_removed)
{
	struct local_dataset *l, *m = NULL;
	char path[256];
	struct stat st;

	fresh_dir();
	ASSERT_NOT_NULL(l = parsed(100));
	table_path(path, sizeof(path), 77, l->digest);
	/* 0: the header's uid; 1: items[3].first_path; 2: masks[0].path past the pool (its
	 * high byte); 3: the file cut one byte short; 4: the pool's last byte not NUL */
	for (unsigned c = 0; c < 5; c++) {
		ASSERT_EQ(local_table_write(dir, 77, l), 0);
		if (c == 0)
			ASSERT_EQ(flip(path, 12), 0);
		else if (c == 1)
			ASSERT_EQ(flip(path, 96 + 3 * 20 + 16), 0);
		else if (c == 2)
			ASSERT_EQ(flip(path, (long)(96 + 100 * 20 + 4 + 3)), 0);
		else if (c == 3)
			ASSERT_EQ(truncate(path, (off_t)(96 + 100 * 20 + l->n_masks * 8 +
							l->pool_len - 1)),
				  0);
		else
			ASSERT_EQ(flip(path, -1), 0);
		ASSERT_EQ(local_table_map(dir, 77, l->digest, l->n, "/data/t", &m), -EBADMSG);
		ASSERT_NULL(m);
		ASSERT_NE(stat(path, &st), 0);
	}
	local_dataset_free(l);
}

TEST(a_path_that_leaves_the_folder_is_caught_when_asked)
{
	struct local_dataset *l, *m = NULL;
	char path[256], *buf;
	FILE *f;
	long size;
	char *at;

	fresh_dir();
	ASSERT_NOT_NULL(l = parsed(20));
	ASSERT_EQ(local_table_write(dir, 5, l), 0);
	table_path(path, sizeof(path), 5, l->digest);
	ASSERT_NOT_NULL(f = fopen(path, "r+"));
	fseek(f, 0, SEEK_END);
	size = ftell(f);
	buf = malloc((size_t)size);
	ASSERT_NOT_NULL(buf);
	fseek(f, 0, SEEK_SET);
	ASSERT_EQ(fread(buf, 1, (size_t)size, f), size);
	at = memmem(buf, (size_t)size, "images/i7.png", 14);
	ASSERT_NOT_NULL(at);
	memcpy(at, "../ges/i7.png", 13); /* the same length: the structure still holds */
	fseek(f, 0, SEEK_SET);
	ASSERT_EQ(fwrite(buf, 1, (size_t)size, f), size);
	fclose(f);
	free(buf);
	ASSERT_EQ(local_table_map(dir, 5, l->digest, l->n, "/data/t", &m), 0);
	ASSERT(!local_table_path_ok(local_item_path(m, 7)));
	ASSERT(local_table_path_ok(local_item_path(m, 8)));
	local_dataset_free(m);
	local_dataset_free(l);
}

TEST(a_failed_write_leaves_nothing)
{
	struct local_dataset *l, *m = NULL;
	struct rlimit old, small = { 4096, 4096 };

	fresh_dir();
	ASSERT_NOT_NULL(l = parsed(2000));
	signal(SIGXFSZ, SIG_IGN);
	ASSERT_EQ(getrlimit(RLIMIT_FSIZE, &old), 0);
	small.rlim_max = old.rlim_max;
	ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &small), 0);
	ASSERT_EQ(local_table_write(dir, 9, l), -EFBIG);
	ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &old), 0);
	ASSERT_UINT_EQ(entries("tables"), 0);
	ASSERT_EQ(local_table_map(dir, 9, l->digest, l->n, "/data/t", &m), -ENOENT);
	local_dataset_free(l);
}

static bool keep_uid_1(void *ctx, uid_t uid, const uint8_t *digest)
{
	(void)ctx;
	(void)digest;
	return uid == 1;
}

TEST(gc_keeps_what_is_wanted_and_young_temp_files)
{
	struct local_dataset *l;
	char p[256];
	struct timespec old[2] = { { 1000, 0 }, { 1000, 0 } };
	int fd;

	fresh_dir();
	ASSERT_NOT_NULL(l = parsed(10));
	ASSERT_EQ(local_table_write(dir, 1, l), 0);
	ASSERT_EQ(local_table_write(dir, 2, l), 0);
	snprintf(p, sizeof(p), "%s/tables/.tmp-young", dir);
	ASSERT_GE(fd = open(p, O_CREAT | O_WRONLY, 0600), 0);
	close(fd);
	snprintf(p, sizeof(p), "%s/tables/.tmp-old", dir);
	ASSERT_GE(fd = open(p, O_CREAT | O_WRONLY, 0600), 0);
	ASSERT_EQ(futimens(fd, old), 0);
	close(fd);
	snprintf(p, sizeof(p), "%s/tables/not-a-table", dir);
	ASSERT_GE(fd = open(p, O_CREAT | O_WRONLY, 0600), 0);
	close(fd);
	ASSERT_UINT_EQ(entries("tables"), 5);
	ASSERT_EQ(local_table_gc(dir, keep_uid_1, NULL), 3);
	ASSERT_UINT_EQ(entries("tables"), 2); /* uid 1's table, the young temp file */
	table_path(p, sizeof(p), 1, l->digest);
	ASSERT_EQ(access(p, F_OK), 0);
	local_dataset_free(l);
}

int main(int argc, char **argv)
{
	int rc;

	rc = 0;
	{
		static const struct task_case cases_[] = {
			T(written_table_maps_to_the_same_items),
			T(another_uid_digest_or_count_is_not_this_table),
			T(damaged_tables_are_refused_and_removed),
			T(a_path_that_leaves_the_folder_is_caught_when_asked),
			T(a_failed_write_leaves_nothing),
			T(gc_keeps_what_is_wanted_and_young_temp_files),
		};
		rc = task_run(cases_, sizeof(cases_) / sizeof(cases_[0]), argc > 1 ? argv[1] : NULL);
	}
	if (dir[0])
		task_rm_tree(dir);
	return rc;
}
