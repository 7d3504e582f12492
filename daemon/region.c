/* Regions of hot tensors handed in place: see region.h. Loop thread only. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "region.h"

static size_t rhash(const struct region *rg, const uint8_t *raw, int64_t opts, size_t nb)
{
	uint64_t k;

	memcpy(&k, raw, sizeof(k));
	k ^= (uint64_t)opts * 0x9e3779b97f4a7c15ull;
	k ^= rg->id * 0xbf58476d1ce4e5b9ull;
	k ^= k >> 31;
	return (size_t)(k & (nb - 1));
}

static void lru_unlink(struct regions *rs, struct rentry *e)
{
	if (e->newer)
		e->newer->older = e->older;
	else
		rs->newest = e->older;
	if (e->older)
		e->older->newer = e->newer;
	else
		rs->oldest = e->newer;
	e->newer = e->older = NULL;
}

static void lru_front(struct regions *rs, struct rentry *e)
{
	e->older = rs->newest;
	e->newer = NULL;
	if (rs->newest)
		rs->newest->newer = e;
	rs->newest = e;
	if (!rs->oldest)
		rs->oldest = e;
}

/* Gives [off, off + len) of the memfd back to the kernel. */
static void punch(struct region *rg, uint64_t off, uint64_t len)
{
	if (len)
		(void)fallocate(rg->a.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
				(off_t)len);
}

#define REGION_ROWS_MAX (1u << 16)
#define REGION_ROWS_BYTES (32ull << 20)

static void rows_clear(struct region *rg)
{
	for (size_t i = 0; i < rg->nb_rows; i++)
		for (struct rrow *r = rg->rows[i], *next; r; r = next) {
			next = r->next;
			free(r->record);
			free(r);
		}
	free(rg->rows);
	rg->rows = NULL;
	rg->nb_rows = rg->n_rows = 0;
	rg->rows_bytes = 0;
}

const struct rrow *region_row(const struct region *rg, uint64_t item)
{
	if (!rg->nb_rows)
		return NULL;
	for (const struct rrow *r = rg->rows[(item * 0x9e3779b97f4a7c15ull) >> 48 &
					      (rg->nb_rows - 1)];
	     r; r = r->next)
		if (r->item == item)
			return r;
	return NULL;
}

void region_row_put(struct region *rg, uint64_t item, const uint8_t *raw, uint64_t raw_len,
		    const char *record)
{
	size_t len = strlen(record);
	struct rrow *r;
	size_t k;

	if (region_row(rg, item))
		return;
	if (rg->n_rows >= REGION_ROWS_MAX || rg->rows_bytes + len > REGION_ROWS_BYTES)
		rows_clear(rg); /* a snapshot larger than what is kept: start again */
	if (!rg->nb_rows) {
		rg->rows = calloc(REGION_ROWS_MAX, sizeof(*rg->rows));
		if (!rg->rows)
			return;
		rg->nb_rows = REGION_ROWS_MAX;
	}
	r = malloc(sizeof(*r));
	if (!r || !(r->record = malloc(len + 1))) {
		free(r);
		return;
	}
	memcpy(r->record, record, len + 1);
	r->item = item;
	memcpy(r->raw, raw, STORE_DIGEST_SIZE);
	r->raw_len = raw_len;
	k = (item * 0x9e3779b97f4a7c15ull) >> 48 & (rg->nb_rows - 1);
	r->next = rg->rows[k];
	rg->rows[k] = r;
	rg->n_rows++;
	rg->rows_bytes += len + 1 + sizeof(*r);
}

void regions_forget_rows(struct regions *rs, int64_t snapshot_id)
{
	for (struct region *rg = rs->list; rg; rg = rg->next)
		if (rg->snapshot_id == snapshot_id)
			rows_clear(rg);
}

static void region_free(struct region *rg)
{
	struct regions *rs = rg->rs;
	struct region **pp;

	for (pp = &rs->list; *pp && *pp != rg; pp = &(*pp)->next)
		;
	if (*pp)
		*pp = rg->next;
	/* a client may keep its descriptor: it keeps no page */
	punch(rg, 0, rg->a.size);
	if (rg->ro_fd >= 0)
		close(rg->ro_fd);
	arena_done(&rg->a);
	rows_clear(rg);
	free(rg);
}

static void region_maybe_free(struct region *rg)
{
	if (!rg->refs && !rg->entries)
		region_free(rg);
}

/* Drops an unpinned entry: its pages go back to the kernel. */
static void entry_drop(struct regions *rs, struct rentry *e)
{
	struct rentry **pp = &rs->b[rhash(e->rg, e->raw, e->opts, rs->nb)];
	struct region *rg = e->rg;
	uint64_t span = arena_span(e->nbytes);

	while (*pp != e)
		pp = &(*pp)->hnext;
	*pp = e->hnext;
	lru_unlink(rs, e);
	rs->n--;
	rs->bytes -= span;
	arena_free(&rg->a, e->off);
	punch(rg, e->off, span);
	rs->reclaimed += span;
	rg->entries--;
	free(e);
	region_maybe_free(rg);
}

/* Evicts unpinned entries, oldest first, while the regions hold more than `max`. */
static void evict(struct regions *rs, uint64_t max)
{
	for (struct rentry *e = rs->oldest, *newer; e && rs->bytes > max; e = newer) {
		newer = e->newer;
		if (e->pins)
			continue;
		rs->evictions++;
		entry_drop(rs, e);
	}
}

/* Evicts the oldest unpinned entry of `rg` (room in that region's file); false: none. */
static bool evict_in(struct regions *rs, struct region *rg)
{
	for (struct rentry *e = rs->oldest; e; e = e->newer)
		if (e->rg == rg && !e->pins) {
			rs->evictions++;
			entry_drop(rs, e);
			return true;
		}
	return false;
}

static int region_init(struct region *rg, uint64_t size)
{
	char path[64];
	int e;

	rg->ro_fd = -1;
	rg->a.fd = memfd_create("dmcache-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (rg->a.fd < 0)
		return -errno;
	if (ftruncate(rg->a.fd, (off_t)size) != 0)
		goto fail;
	rg->a.base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, rg->a.fd, 0);
	if (rg->a.base == MAP_FAILED) {
		rg->a.base = NULL;
		goto fail;
	}
	rg->a.size = size;
	/* no one resizes it; only the daemon's uid may open it for writing (region.h: why no
	 * write seal) */
	if (fcntl(rg->a.fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0 ||
	    fchmod(rg->a.fd, 0400) != 0)
		goto fail;
	snprintf(path, sizeof(path), "/proc/self/fd/%d", rg->a.fd);
	rg->ro_fd = open(path, O_RDONLY | O_CLOEXEC);
	if (rg->ro_fd < 0)
		goto fail;
	/* the whole file is in the allocator: pages are allocated as tensors are copied in */
	if ((e = arena_extend(&rg->a, size)) < 0) {
		errno = -e;
		goto fail;
	}
	return 0;
fail:
	e = errno ? -errno : -ENOMEM;
	if (rg->ro_fd >= 0)
		close(rg->ro_fd);
	rg->ro_fd = -1;
	arena_done(&rg->a);
	return e;
}

struct region *region_open(struct regions *rs, int64_t snapshot_id, int *err)
{
	struct region *rg;
	uint64_t size;
	int rc;

	/* the open or lingering one (snapshot ids are never reused: an OPEN of this id passed
	 * its access check); not a closed one, which lives on only for what clients hold */
	for (rg = rs->list; rg; rg = rg->next)
		if (rg->snapshot_id == snapshot_id && !rg->closed) {
			rg->refs++;
			rg->ahead = false; /* opened: a handle's rules from now on */
			return rg;
		}
	/* as large as the budget: one region may hold all of it (sparse until then) */
	size = rs->max & ~(uint64_t)(ARENA_ALIGN - 1);
	if (size < 8 * ARENA_ALIGN) {
		*err = -ENOSPC;
		return NULL;
	}
	rg = calloc(1, sizeof(*rg));
	if (!rg) {
		*err = -ENOMEM;
		return NULL;
	}
	rc = region_init(rg, size);
	if (rc < 0) {
		free(rg);
		*err = rc;
		return NULL;
	}
	rg->rs = rs;
	rg->snapshot_id = snapshot_id;
	rg->id = ++rs->next_id;
	rg->refs = 1;
	rg->next = rs->list;
	rs->list = rg;
	rs->made++;
	return rg;
}

void region_ref(struct region *rg)
{
	if (rg)
		rg->refs++;
}

static uint64_t mono_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Lingered enough (or no lingering): nobody can ask for its tensors any more, the unpinned
 * ones go now, and the region with the last pinned one. */
static void region_close(struct region *rg)
{
	struct regions *rs = rg->rs;

	rg->closed = true;
	rg->refs++; /* not freed under the loop */
	for (struct rentry *e = rs->oldest, *newer; e; e = newer) {
		newer = e->newer;
		if (e->rg == rg && !e->pins)
			entry_drop(rs, e);
	}
	rg->refs--;
	rows_clear(rg); /* nobody looks a row up in it again */
	region_maybe_free(rg);
}

void region_unref(struct region *rg)
{
	if (!rg || --rg->refs)
		return;
	rg->idle_since = mono_ms();
	if (!rg->rs->linger_ms || !rg->entries)
		region_close(rg);
}

void regions_expire(struct regions *rs, bool all)
{
	uint64_t now = mono_ms();

	for (struct region *rg = rs->list, *next; rg; rg = next) {
		next = rg->next; /* region_close() may free rg, never another region */
		if (!rg->refs && !rg->closed &&
		    (all || (!rg->ahead && now - rg->idle_since >= rs->linger_ms)))
			region_close(rg);
	}
}

static struct rentry *find(const struct regions *rs, const struct region *rg,
			   const uint8_t *raw, int64_t opts)
{
	if (!rs->nb)
		return NULL;
	for (struct rentry *e = rs->b[rhash(rg, raw, opts, rs->nb)]; e; e = e->hnext)
		if (e->rg == rg && e->opts == opts && memcmp(e->raw, raw, STORE_DIGEST_SIZE) == 0)
			return e;
	return NULL;
}

static int grow(struct regions *rs)
{
	size_t nb = rs->nb ? rs->nb * 2 : 1024;
	struct rentry **b = calloc(nb, sizeof(*b));

	if (!b)
		return -ENOMEM;
	for (size_t i = 0; i < rs->nb; i++)
		for (struct rentry *e = rs->b[i], *next; e; e = next) {
			size_t k = rhash(e->rg, e->raw, e->opts, nb);
			next = e->hnext;
			e->hnext = b[k];
			b[k] = e;
		}
	free(rs->b);
	rs->b = b;
	rs->nb = nb;
	return 0;
}

struct rentry *region_take(struct region *rg, const uint8_t *raw, int64_t opts,
			   const uint8_t *bytes, uint64_t nbytes)
{
	struct regions *rs = rg->rs;
	struct rentry *e = find(rs, rg, raw, opts);
	uint64_t span = arena_span(nbytes), off;
	size_t k;

	if (e) {
		if (!e->pins++)
			rs->pinned++;
		lru_unlink(rs, e);
		lru_front(rs, e);
		rs->handed++;
		return e;
	}
	if (!nbytes || span > rs->max / 8 || span > rg->a.size)
		return NULL; /* as the hot set: one item never pushes out many */
	if (rs->n >= rs->nb && grow(rs) < 0)
		return NULL;
	rg->refs++; /* evictions below must not free it */
	evict(rs, rs->max - span);
	while ((off = arena_alloc(&rg->a, nbytes)) == UINT64_MAX && evict_in(rs, rg))
		;
	rg->refs--;
	if (off == UINT64_MAX || rs->bytes + span > rs->max ||
	    arena_populate(rg->a.fd, rg->a.base, off, span) < 0 || !(e = calloc(1, sizeof(*e)))) {
		if (off != UINT64_MAX) {
			arena_free(&rg->a, off);
			punch(rg, off, span);
		}
		return NULL;
	}
	memcpy(rg->a.base + off, bytes, nbytes);
	e->rg = rg;
	memcpy(e->raw, raw, STORE_DIGEST_SIZE);
	e->opts = opts;
	e->off = off;
	e->nbytes = nbytes;
	e->pins = 1;
	k = rhash(rg, raw, opts, rs->nb);
	e->hnext = rs->b[k];
	rs->b[k] = e;
	lru_front(rs, e);
	rs->n++;
	rs->bytes += span;
	rg->entries++;
	rs->copies++;
	rs->handed++;
	rs->pinned++;
	return e;
}

bool region_put_ahead(struct regions *rs, int64_t snapshot_id, const uint8_t *raw,
		      int64_t opts, const uint8_t *bytes, uint64_t nbytes)
{
	uint64_t span = arena_span(nbytes);
	struct region *rg;
	struct rentry *e;
	int err = 0;

	if (!nbytes || !rs->max || span > rs->max / 8 || rs->bytes + span > rs->max)
		return false; /* never evicts anything for it */
	for (rg = rs->list; rg; rg = rg->next)
		if (rg->snapshot_id == snapshot_id && !rg->closed)
			break;
	if (rg) {
		if (find(rs, rg, raw, opts))
			return true;
		rg->refs++; /* not freed under us; its state (open, lingering, ahead) unchanged */
	} else {
		rg = region_open(rs, snapshot_id, &err);
		if (!rg)
			return false;
		rg->ahead = true;
	}
	e = region_take(rg, raw, opts, bytes, nbytes);
	if (e)
		region_unpin(e);
	rg->refs--;
	region_maybe_free(rg); /* one made now that holds nothing */
	return e != NULL;
}

void region_unpin(struct rentry *e)
{
	struct region *rg = e->rg;
	struct regions *rs = rg->rs;

	if (--e->pins)
		return;
	rs->pinned--;
	if (rg->closed) {
		entry_drop(rs, e); /* its region is closed: nobody asks for it again */
		return;
	}
	evict(rs, rs->max); /* over budget only while everything was pinned: catch up */
}

void regions_set_max(struct regions *rs, uint64_t max)
{
	rs->max = max;
	evict(rs, max);
}

uint64_t regions_committed(const struct regions *rs)
{
	uint64_t b = 0;
	struct stat st;

	for (struct region *rg = rs->list; rg; rg = rg->next)
		if (fstat(rg->a.fd, &st) == 0)
			b += (uint64_t)st.st_blocks * 512;
	return b;
}

uint64_t regions_count(const struct regions *rs)
{
	uint64_t n = 0;

	for (struct region *rg = rs->list; rg; rg = rg->next)
		n++;
	return n;
}

void regions_done(struct regions *rs)
{
	while (rs->oldest) {
		struct rentry *e = rs->oldest;
		e->pins = 0;
		e->rg->refs++; /* freed below, once */
		entry_drop(rs, e);
	}
	while (rs->list) {
		rs->list->refs = 0;
		rs->list->entries = 0;
		region_free(rs->list);
	}
	free(rs->b);
	memset(rs, 0, sizeof(*rs));
}
