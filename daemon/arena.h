/*
 * arena: the shared memory of one connection, a sealed memfd mapped by the daemon and
 * passed to the client once, and a first-fit allocator over it (offsets, ARENA_ALIGN
 * aligned). The allocator's state is the loop's; nothing here blocks on other threads.
 *
 * Loop thread only (arena_init and arena_done may run on the threadpool for an arena no
 * other thread sees).
 */
#ifndef DMC_ARENA_H
#define DMC_ARENA_H

#include <stdint.h>

#define ARENA_ALIGN 64u

struct span {
	uint64_t off, len;
};

struct arena {
	int fd;
	uint8_t *base;
	uint64_t size;
	uint64_t used;
	struct span *free_;  /* free spans, sorted by offset, coalesced */
	uint32_t n_free, cap_free;
	struct span *alloc_; /* allocations, sorted by offset */
	uint32_t n_alloc, cap_alloc;
};

/* A sealed memfd of `size` bytes, mapped and allocated up front. */
int arena_init(struct arena *a, uint64_t size);
void arena_done(struct arena *a);
/* The space an allocation of `len` bytes takes. */
uint64_t arena_span(uint64_t len);
/* First fit. Returns the offset, or UINT64_MAX when no free span is large enough. */
uint64_t arena_alloc(struct arena *a, uint64_t len);
/* Frees the allocation at `off`. -ENOENT when there is none (a client's mistake). */
int arena_free(struct arena *a, uint64_t off);

#endif
