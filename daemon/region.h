/*
 * Regions: hot tensors handed to clients in place (DMC_OPEN_REGIONS, proto.h "Regions").
 *
 * One region per snapshot opened with the flag: a memfd of fixed size (reserved sparse,
 * sealed against shrinking and growing) that the daemon maps writable, and a read-only
 * descriptor of it (reopened O_RDONLY through /proc/self/fd after the file's mode is set to
 * 0400) that serve passes to the connections that OPENed that snapshot. It holds tensors of
 * that snapshot's items only: an entry is keyed by (region, content digest, decode options)
 * and is made by copying a hot-set entry once; content shared by two snapshots is copied
 * into each one's region, so that a descriptor never shows bytes of a snapshot its holder
 * did not open.
 *
 * Why no F_SEAL_FUTURE_WRITE (as the arenas have): with it the kernel refuses
 * FALLOC_FL_PUNCH_HOLE, and an evicted tensor's pages could then only be reused, never
 * given back; instead the descriptor passed is read-only and the file's mode keeps other
 * uids from reopening it for writing.
 *
 * Pins: an entry handed to a client is pinned until released (or the connection ends);
 * pinned entries are never evicted or moved. Unpinned entries go least recently used
 * first, over every region, once the regions' bytes pass `max` (hot_max: regions are the
 * hot set's memory as the clients see it, shared by every uid of the snapshot, so they are
 * bounded like the hot set and not charged to one uid's shm share); their pages are
 * punched out of the memfd at once. A tensor in a region is a copy of a hot-set entry, so
 * decoded tensors take at most twice hot_max (the hot set's and the regions'); making the
 * regions the hot set's own storage would halve that, at the price of one region per
 * snapshot for every client, regions or not. A region lingers `linger_ms` (region_linger)
 * after its last handle went, so that the snapshot's next OPEN finds its tensors in place
 * (a new region would copy every one again: 16 MiB of hot items cost a new connection
 * 150-275 ms that way on the 2-vCPU machine under load); then it closes and goes (its whole
 * file punched, so that a client still holding the descriptor keeps no memory) once no
 * entry of it is pinned. While it lingers, a descriptor kept by a former holder shows
 * what the snapshot's next OPENs put there: tensors of the same snapshot, as while it was
 * open (docs/security.md, "Regions"). Owned by serve (struct serve), loop thread only.
 */
#ifndef DMC_REGION_H
#define DMC_REGION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "arena.h"
#include "store.h"

struct regions;

struct region {
	struct regions *rs;
	int64_t snapshot_id;
	uint64_t id;         /* on the wire: unique in the daemon's life, never 0 */
	struct arena a;      /* the daemon's writable mapping and the allocator over it */
	int ro_fd;           /* what clients get */
	unsigned refs;       /* handles (and their copies) referring to it */
	uint64_t idle_since; /* CLOCK_MONOTONIC ms its last handle went (refs 0, lingering) */
	bool closed;         /* no longer lingering: never handed again, goes when unpinned */
	bool ahead;          /* made by region_put_ahead(), not opened since: kept without
				handles (no lingering) until an OPEN, an eviction or a reload */
	uint64_t entries;    /* entries living in it */
	/* the snapshot's index rows already read (item -> content digest, size, resource
	 * record): a hot item handed in place costs no index query. A Datamint snapshot's rows
	 * never change; a local folder's do at every listing (regions_forget_rows()). Bounded
	 * (REGION_ROWS_MAX, REGION_ROWS_BYTES), forgotten whole when full. */
	struct rrow {
		uint64_t item;
		uint8_t raw[STORE_DIGEST_SIZE];
		uint64_t raw_len;
		char *record;
		struct rrow *next;
	} **rows;
	size_t nb_rows, n_rows;
	uint64_t rows_bytes;
	struct region *next;
};

struct rentry {
	struct region *rg;
	uint8_t raw[STORE_DIGEST_SIZE];
	int64_t opts;
	uint64_t off, nbytes;
	unsigned pins; /* items handed and not released */
	struct rentry *hnext;
	struct rentry *newer, *older;
};

struct regions {
	struct region *list;
	struct rentry **b;
	size_t nb, n;
	struct rentry *newest, *oldest;
	uint64_t bytes, max; /* bytes of the entries (whole pages), and the budget */
	uint64_t linger_ms;  /* region_linger: kept this long without handles */
	uint64_t next_id;
	uint64_t made, copies, handed, evictions, reclaimed, pinned;
};

/* The region of `snapshot_id`, referenced (made when there is none, or when the one there
 * is referred to by no handle and lives on only for pinned tensors); NULL with *err. */
struct region *region_open(struct regions *rs, int64_t snapshot_id, int *err);
void region_ref(struct region *rg);
/* A handle lets go. With the last, the region lingers `linger_ms` (its tensors stay for
 * the snapshot's next OPEN: a DataLoader's next epoch), then closes: its unpinned tensors
 * go, and it goes once nothing is pinned. */
void region_unref(struct region *rg);
/* Closes the regions that lingered `linger_ms` (all of them: `all`). */
void regions_expire(struct regions *rs, bool all);
/*
 * The tensor `bytes` (nbytes) of content `raw` decoded with `opts`, in `rg`: found, or
 * copied there now; returned pinned. NULL when it does not fit (the budget, or the region's
 * size, with everything else pinned): the caller hands a copy in the arena instead.
 */
struct rentry *region_take(struct region *rg, const uint8_t *raw, int64_t opts,
			   const uint8_t *bytes, uint64_t nbytes);
void region_unpin(struct rentry *e);
/*
 * Decoding ahead (prefetch --decode): the tensor `bytes` (nbytes) of content `raw` decoded
 * with `opts`, copied into the region of `snapshot_id` (made when there is none) when the
 * regions have room for it without evicting anything; unpinned. A region made so has no
 * handle: it does not linger and close as a handle's does, it waits for the snapshot's
 * next OPEN (its tensors still evicted first-come as any, and the region with the last).
 * Only the serving side calls it, for a snapshot a job of its owner filled: an OPEN checks
 * entitlement before it passes a region's descriptor. True: copied (or there already).
 */
bool region_put_ahead(struct regions *rs, int64_t snapshot_id, const uint8_t *raw,
		      int64_t opts, const uint8_t *bytes, uint64_t nbytes);
/* The row of `item` kept for `rg`, or NULL; and keeping one (a copy of `record`). */
const struct rrow *region_row(const struct region *rg, uint64_t item);
void region_row_put(struct region *rg, uint64_t item, const uint8_t *raw, uint64_t raw_len,
		    const char *record);
/* Snapshot `snapshot_id`'s rows changed (a local folder listed again: every item's content
 * is proved again): the rows kept for its regions are forgotten, so that no item is handed
 * in place by what an earlier proof found. Its tensors stay, keyed by content. */
void regions_forget_rows(struct regions *rs, int64_t snapshot_id);
/* A new budget (a reload of hot_max): unpinned entries go until the regions fit. */
void regions_set_max(struct regions *rs, uint64_t max);
/* Bytes of the regions' memfds the kernel holds (their allocated pages). */
uint64_t regions_committed(const struct regions *rs);
uint64_t regions_count(const struct regions *rs);
/* Frees everything (no region may be referenced). */
void regions_done(struct regions *rs);

#endif
