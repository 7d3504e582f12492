/* The arena of a connection: see arena.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "arena.h"

static int span_insert(struct span **arr, uint32_t *n, uint32_t *cap, uint32_t at,
		       struct span sp)
{
	if (*n == *cap) {
		uint32_t nc = *cap ? *cap * 2 : 64;
		struct span *na = realloc(*arr, nc * sizeof(*na));
		if (!na)
			return -ENOMEM;
		*arr = na;
		*cap = nc;
	}
	memmove(*arr + at + 1, *arr + at, (*n - at) * sizeof(**arr));
	(*arr)[at] = sp;
	(*n)++;
	return 0;
}

static void span_remove(struct span *arr, uint32_t *n, uint32_t at)
{
	memmove(arr + at, arr + at + 1, (*n - at - 1) * sizeof(*arr));
	(*n)--;
}

int arena_init(struct arena *a, uint64_t size)
{
	int e;

	memset(a, 0, sizeof(*a));
	a->fd = memfd_create("dmcache-arena", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (a->fd < 0)
		return -errno;
	/* sparse: only the pages arena_populate() faults in take memory */
	if (ftruncate(a->fd, (off_t)size) != 0)
		goto fail;
	a->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, a->fd, 0);
	if (a->base == MAP_FAILED) {
		a->base = NULL;
		goto fail;
	}
	/* the client can neither resize it nor write through a mapping of its own */
	if (fcntl(a->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_FUTURE_WRITE |
					      F_SEAL_SEAL) != 0)
		goto fail;
	a->size = size;
	return 0;
fail:
	e = errno ? -errno : -ENOMEM;
	if (a->base)
		munmap(a->base, size);
	close(a->fd);
	a->fd = -1;
	a->base = NULL;
	return e;
}

void arena_done(struct arena *a)
{
	if (a->base)
		munmap(a->base, a->size);
	if (a->fd >= 0)
		close(a->fd);
	free(a->free_);
	free(a->alloc_);
	memset(a, 0, sizeof(*a));
	a->fd = -1;
}

uint64_t arena_grow_need(const struct arena *a, uint64_t len)
{
	uint64_t tail = 0;

	if (a->n_free && a->free_[a->n_free - 1].off + a->free_[a->n_free - 1].len == a->grown)
		tail = a->free_[a->n_free - 1].len;
	return len > tail ? len - tail : 0;
}

int arena_populate(int fd, uint8_t *base, uint64_t from, uint64_t len)
{
	long page = sysconf(_SC_PAGESIZE);

#ifdef MADV_POPULATE_WRITE
	/* Linux >= 5.14: allocates the pages and fills the daemon's page tables in one call */
	if (madvise(base + from, len, MADV_POPULATE_WRITE) == 0)
		return 0;
	if (errno != EINVAL)
		return -errno;
#endif
	/* older kernels: allocate, then touch each page once (they are new: zero) */
	if (fallocate(fd, 0, (off_t)from, (off_t)len) != 0)
		return -errno;
	for (uint64_t o = 0; o < len; o += (uint64_t)(page > 0 ? page : 4096))
		((volatile uint8_t *)base)[from + o] = 0;
	return 0;
}

void arena_reset(struct arena *a)
{
	a->n_alloc = 0;
	a->used = 0;
	a->n_free = 0;
	if (a->grown)
		/* cannot fail: a span is always kept room for once the arena has grown */
		(void)span_insert(&a->free_, &a->n_free, &a->cap_free, 0,
				  (struct span){ 0, a->grown });
}

int arena_extend(struct arena *a, uint64_t to)
{
	struct span *last = a->n_free ? &a->free_[a->n_free - 1] : NULL;
	int rc = 0;

	if (to > a->size || to <= a->grown)
		return to == a->grown ? 0 : -EINVAL;
	if (last && last->off + last->len == a->grown)
		last->len += to - a->grown;
	else
		rc = span_insert(&a->free_, &a->n_free, &a->cap_free, a->n_free,
				 (struct span){ a->grown, to - a->grown });
	if (rc == 0)
		a->grown = to;
	return rc;
}

/* The space an allocation of `len` bytes takes. */
uint64_t arena_span(uint64_t len)
{
	uint64_t need = (len + ARENA_ALIGN - 1) / ARENA_ALIGN * ARENA_ALIGN;

	return need ? need : ARENA_ALIGN;
}

/* The index of the first allocation at or after `off` (binary search: they are sorted). */
static uint32_t alloc_index(const struct arena *a, uint64_t off)
{
	uint32_t lo = 0, hi = a->n_alloc;

	while (lo < hi) {
		uint32_t mid = (lo + hi) / 2;
		if (a->alloc_[mid].off < off)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* The index of the first free span at or after `off`. */
static uint32_t free_index(const struct arena *a, uint64_t off)
{
	uint32_t k = 0;

	while (k < a->n_free && a->free_[k].off < off)
		k++;
	return k;
}

/* First fit. Returns the offset, or UINT64_MAX when no free span is large enough. */
uint64_t arena_alloc(struct arena *a, uint64_t len)
{
	uint64_t need = arena_span(len);

	for (uint32_t i = 0; i < a->n_free; i++) {
		struct span *f = &a->free_[i];
		uint64_t off;
		if (f->len < need)
			continue;
		off = f->off;
		f->off += need;
		f->len -= need;
		if (f->len == 0)
			span_remove(a->free_, &a->n_free, i);
		/* record the allocation, sorted */
		if (span_insert(&a->alloc_, &a->n_alloc, &a->cap_alloc, alloc_index(a, off),
				(struct span){ off, need }) < 0) {
			/* give it back */
			span_insert(&a->free_, &a->n_free, &a->cap_free, free_index(a, off),
				    (struct span){ off, need });
			return UINT64_MAX;
		}
		a->used += need;
		return off;
	}
	return UINT64_MAX;
}

/* Frees the allocation at `off`. -ENOENT when there is none (a client's mistake). */
int arena_free(struct arena *a, uint64_t off)
{
	uint32_t lo = alloc_index(a, off), k;
	struct span sp;

	if (lo >= a->n_alloc || a->alloc_[lo].off != off)
		return -ENOENT;
	sp = a->alloc_[lo];
	span_remove(a->alloc_, &a->n_alloc, lo);
	a->used -= sp.len;
	k = free_index(a, sp.off);
	/* coalesce with the neighbours */
	if (k > 0 && a->free_[k - 1].off + a->free_[k - 1].len == sp.off) {
		a->free_[k - 1].len += sp.len;
		if (k < a->n_free && sp.off + sp.len == a->free_[k].off) {
			a->free_[k - 1].len += a->free_[k].len;
			span_remove(a->free_, &a->n_free, k);
		}
		return 0;
	}
	if (k < a->n_free && sp.off + sp.len == a->free_[k].off) {
		a->free_[k].off = sp.off;
		a->free_[k].len += sp.len;
		return 0;
	}
	return span_insert(&a->free_, &a->n_free, &a->cap_free, k, sp);
}

