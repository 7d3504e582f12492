/*
 * arena: the shared memory of one connection, a sealed memfd mapped by the daemon and
 * passed to the client once, and a first-fit allocator over it (offsets and lengths in
 * ARENA_ALIGN units: whole pages).
 *
 * The memfd has its full size from the start (the client maps it once, and the seals keep
 * that mapping valid) but is sparse: it grows on demand. Only [0, grown) is in the
 * allocator, and only those pages were faulted in, by arena_populate() on the threadpool
 * in large chunks, never one page at a time on the loop (a first fault costs 12-16 us a
 * page here). Pages freed by arena_free() stay: the arena is reused until it goes whole.
 *
 * The allocator (arena_alloc, arena_free, arena_extend, arena_grow_need) is the loop's.
 * arena_init and arena_done may run anywhere for an arena no other thread sees;
 * arena_populate on any thread, for a range not yet in the allocator.
 */
#ifndef DMC_ARENA_H
#define DMC_ARENA_H

#include <stdint.h>

/* Whole pages: no two allocations share a page, so a client that wrote into its
 * copy-on-write mapping of one range (its private copies) and discards them at release
 * never discards or keeps a page of another allocation. 4096: pages of another size are
 * handled by the client (the Python package copies batches there). */
#define ARENA_ALIGN 4096u

struct span {
	uint64_t off, len;
};

struct arena {
	int fd;
	uint8_t *base;
	uint64_t size;   /* reserved: the memfd's size and the mapping's */
	uint64_t grown;  /* [0, grown) is faulted in and in the allocator */
	uint64_t used;
	struct span *free_;  /* free spans, sorted by offset, coalesced */
	uint32_t n_free, cap_free;
	struct span *alloc_; /* allocations, sorted by offset */
	uint32_t n_alloc, cap_alloc;
};

/* A sealed, sparse memfd of `size` bytes, mapped; nothing faulted in, nothing to allocate
 * until arena_extend(). Cheap (tens of microseconds): no page is touched. */
int arena_init(struct arena *a, uint64_t size);
void arena_done(struct arena *a);
/* Faults in [from, from + len) of the memfd mapped at `base` (page-aligned, beyond the
 * arena's `grown`): MADV_POPULATE_WRITE, or fallocate and a touch per page before 5.14.
 * Slow (the page faults): on the threadpool. */
int arena_populate(int fd, uint8_t *base, uint64_t from, uint64_t len);
/* Frees every allocation: [0, grown) is one free span again (the pages stay in). */
void arena_reset(struct arena *a);
/* Adds the populated [grown, to) to the allocator. */
int arena_extend(struct arena *a, uint64_t to);
/* How much the arena must grow for `len` more contiguous bytes at its end (0: it need not;
 * the free space at its end counts). */
uint64_t arena_grow_need(const struct arena *a, uint64_t len);
/* The space an allocation of `len` bytes takes. */
uint64_t arena_span(uint64_t len);
/* First fit. Returns the offset, or UINT64_MAX when no free span is large enough. */
uint64_t arena_alloc(struct arena *a, uint64_t len);
/* Frees the allocation at `off`. -ENOENT when there is none (a client's mistake). */
int arena_free(struct arena *a, uint64_t off);

#endif
