/*
 * Unit tests of daemon/region.c: regions of hot tensors handed in place. Entries are found
 * again, not copied twice; two snapshots never share an entry; pinned entries are never
 * evicted and unpinned ones go least recently used first within the budget, their pages
 * punched out of the file; the descriptor for clients is read-only; a region that nothing
 * refers to goes, its file emptied even for a descriptor still open.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "region.h"
#include "task.h"

#define ITEM (16u << 10) /* 16 KiB tensors: four pages each */

static uint8_t buf[ITEM];

static void key(uint8_t raw[STORE_DIGEST_SIZE], unsigned k)
{
	memset(raw, 0, STORE_DIGEST_SIZE);
	memcpy(raw, &k, sizeof(k));
	raw[31] = 0x5a;
}

static const uint8_t *bytes_of(unsigned k)
{
	for (unsigned i = 0; i < ITEM; i++)
		buf[i] = (uint8_t)(k * 31 + i * 7 + (i >> 8));
	return buf;
}

static uint64_t blocks(int fd)
{
	struct stat st;

	return fstat(fd, &st) == 0 ? (uint64_t)st.st_blocks * 512 : UINT64_MAX;
}

TEST(found_again_and_two_snapshots_apart)
{
	struct regions rs = { .max = 1u << 20 };
	uint8_t raw[STORE_DIGEST_SIZE];
	struct region *a, *b;
	struct rentry *e1, *e2, *e3;
	int err = 0;

	a = region_open(&rs, 1, &err);
	b = region_open(&rs, 2, &err);
	ASSERT(a && b && a != b);
	ASSERT(a->id != b->id);
	ASSERT(region_open(&rs, 1, &err) == a); /* one per snapshot */
	region_unref(a);
	key(raw, 7);
	e1 = region_take(a, raw, 3, bytes_of(7), ITEM);
	e2 = region_take(a, raw, 3, bytes_of(7), ITEM);
	ASSERT(e1 && e1 == e2);
	ASSERT_EQ(e1->pins, 2);
	ASSERT_UINT_EQ(rs.copies, 1);
	ASSERT_UINT_EQ(rs.handed, 2);
	/* the same content for another snapshot: a copy in its own file */
	e3 = region_take(b, raw, 3, bytes_of(7), ITEM);
	ASSERT(e3 && e3 != e1 && e3->rg == b);
	ASSERT_UINT_EQ(rs.copies, 2);
	ASSERT(memcmp(b->a.base + e3->off, bytes_of(7), ITEM) == 0);
	ASSERT(memcmp(a->a.base + e1->off, bytes_of(7), ITEM) == 0);
	/* other options: another entry */
	ASSERT(region_take(a, raw, 4, bytes_of(8), ITEM) != e1);
	ASSERT_UINT_EQ(rs.n, 3);
	ASSERT_UINT_EQ(blocks(a->a.fd) + blocks(b->a.fd), 3 * ITEM);
	regions_done(&rs);
}

TEST(the_descriptor_is_read_only)
{
	struct regions rs = { .max = 1u << 20 };
	struct region *a;
	struct stat st;
	int err = 0;
	char c = 'x';
	void *p;

	a = region_open(&rs, 1, &err);
	ASSERT(a);
	ASSERT_EQ(fcntl(a->ro_fd, F_GETFL) & O_ACCMODE, O_RDONLY);
	ASSERT_EQ(fstat(a->ro_fd, &st), 0);
	ASSERT_EQ(st.st_mode & 07777, 0400);
	ASSERT_EQ(fcntl(a->ro_fd, F_GET_SEALS) & (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL),
		  F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
	ASSERT_EQ(write(a->ro_fd, &c, 1), -1);
	ASSERT_EQ(errno, EBADF);
	p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, a->ro_fd, 0);
	ASSERT(p == MAP_FAILED);
	ASSERT_EQ(errno, EACCES);
	ASSERT(ftruncate(a->ro_fd, 0) != 0);
	ASSERT(ftruncate(a->a.fd, 0) != 0); /* sealed: not even the daemon's descriptor */
	p = mmap(NULL, 4096, PROT_READ, MAP_SHARED, a->ro_fd, 0);
	ASSERT(p != MAP_FAILED);
	munmap(p, 4096);
	regions_done(&rs);
}

TEST(pinned_stay_unpinned_go_oldest_first_pages_punched)
{
	/* 16 entries fill the budget */
	struct regions rs = { .max = 16 * ITEM };
	uint8_t raw[STORE_DIGEST_SIZE];
	struct rentry *e[20];
	struct region *a;
	int err = 0;

	a = region_open(&rs, 1, &err);
	ASSERT(a);
	for (unsigned k = 0; k < 16; k++) {
		key(raw, k);
		e[k] = region_take(a, raw, 0, bytes_of(k), ITEM);
		ASSERT(e[k]);
	}
	ASSERT_UINT_EQ(rs.bytes, 16 * ITEM);
	for (unsigned k = 1; k < 16; k++)
		region_unpin(e[k]); /* entry 0 stays held */
	ASSERT_UINT_EQ(rs.pinned, 1);
	ASSERT_UINT_EQ(rs.evictions, 0); /* within the budget: kept for later GETs */
	/* two more: the two oldest unpinned (1 and 2) go, not the held 0 */
	for (unsigned k = 16; k < 18; k++) {
		key(raw, k);
		e[k] = region_take(a, raw, 0, bytes_of(k), ITEM);
		ASSERT(e[k]);
	}
	ASSERT_UINT_EQ(rs.evictions, 2);
	ASSERT_UINT_EQ(rs.bytes, 16 * ITEM);
	ASSERT_UINT_EQ(blocks(a->a.fd), 16 * ITEM);
	ASSERT(memcmp(a->a.base + e[0]->off, bytes_of(0), ITEM) == 0);
	key(raw, 1);
	ASSERT_UINT_EQ(rs.copies, 18);
	ASSERT(region_take(a, raw, 0, bytes_of(1), ITEM)); /* gone: copied again */
	ASSERT_UINT_EQ(rs.copies, 19);
	/* a lower budget: everything unpinned beyond it goes now */
	regions_set_max(&rs, 4 * ITEM);
	ASSERT_LE(rs.bytes, 4 * ITEM);
	ASSERT_UINT_EQ(blocks(a->a.fd), rs.bytes);
	ASSERT(memcmp(a->a.base + e[0]->off, bytes_of(0), ITEM) == 0);
	/* everything pinned and no room: not taken, the caller copies into the arena */
	regions_set_max(&rs, 2 * ITEM);
	key(raw, 99);
	ASSERT(region_take(a, raw, 0, bytes_of(99), ITEM) == NULL);
	/* over an eighth of the budget: never taken */
	regions_set_max(&rs, 4 * ITEM);
	ASSERT(region_take(a, raw, 0, bytes_of(99), ITEM) == NULL);
	regions_done(&rs);
}

TEST(a_region_nothing_refers_to_goes_and_its_file_is_emptied)
{
	struct regions rs = { .max = 1u << 20 };
	uint8_t raw[STORE_DIGEST_SIZE];
	struct rentry *held, *other;
	struct region *a, *b;
	int err = 0, kept;

	a = region_open(&rs, 1, &err);
	ASSERT(a);
	kept = dup(a->ro_fd); /* as a client keeps it */
	key(raw, 1);
	held = region_take(a, raw, 0, bytes_of(1), ITEM);
	key(raw, 2);
	other = region_take(a, raw, 0, bytes_of(2), ITEM);
	ASSERT(held && other);
	region_unpin(other);
	ASSERT_UINT_EQ(blocks(kept), 2 * ITEM);
	region_row_put(a, 1, raw, 10, "{}");
	region_unref(a); /* the last handle: the unpinned entry goes, the held one stays */
	ASSERT_UINT_EQ(regions_count(&rs), 1);
	ASSERT_UINT_EQ(rs.n, 1);
	ASSERT_UINT_EQ(blocks(kept), ITEM);
	ASSERT(memcmp(a->a.base + held->off, bytes_of(1), ITEM) == 0);
	ASSERT(region_row(a, 1) == NULL); /* its rows are forgotten */
	/* the snapshot opened again meanwhile (or another snapshot under its id, once it was
	 * evicted): a new region, never the one that lives on for the held tensor */
	b = region_open(&rs, 1, &err);
	ASSERT(b && b != a);
	key(raw, 1);
	other = region_take(b, raw, 0, bytes_of(1), ITEM);
	ASSERT(other && other != held);
	ASSERT_UINT_EQ(regions_count(&rs), 2);
	region_unpin(other);
	region_unref(b);
	ASSERT_UINT_EQ(regions_count(&rs), 1);
	region_unpin(held); /* released: the region goes */
	ASSERT_UINT_EQ(regions_count(&rs), 0);
	ASSERT_UINT_EQ(rs.n, 0);
	ASSERT_UINT_EQ(rs.bytes, 0);
	ASSERT_UINT_EQ(blocks(kept), 0);
	close(kept);
	/* a snapshot opened again gets a new region */
	a = region_open(&rs, 1, &err);
	ASSERT(a);
	ASSERT_UINT_EQ(a->id, 3);
	region_unref(a);
	ASSERT_UINT_EQ(regions_count(&rs), 0);
	regions_done(&rs);
}

TEST(rows_are_kept_and_bounded)
{
	struct regions rs = { .max = 1u << 20 };
	uint8_t raw[STORE_DIGEST_SIZE];
	struct region *a;
	const struct rrow *r;
	int err = 0;

	a = region_open(&rs, 1, &err);
	ASSERT(a);
	ASSERT(region_row(a, 5) == NULL);
	key(raw, 5);
	region_row_put(a, 5, raw, 1234, "{\"id\":\"r5\"}");
	r = region_row(a, 5);
	ASSERT(r);
	ASSERT_UINT_EQ(r->raw_len, 1234);
	ASSERT(memcmp(r->raw, raw, STORE_DIGEST_SIZE) == 0);
	ASSERT_STR_EQ(r->record, "{\"id\":\"r5\"}");
	ASSERT(region_row(a, 6) == NULL);
	for (uint64_t i = 0; i < 70000; i++)
		region_row_put(a, 1000 + i, raw, i, "{}");
	ASSERT_LE(a->n_rows, 1u << 16);
	ASSERT(region_row(a, 1000 + 69999) != NULL); /* the newest are there */
	region_unref(a);
	regions_done(&rs);
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(found_again_and_two_snapshots_apart), T(the_descriptor_is_read_only),
		  T(pinned_stay_unpinned_go_oldest_first_pages_punched),
		  T(a_region_nothing_refers_to_goes_and_its_file_is_emptied),
		  T(rows_are_kept_and_bounded));
}
