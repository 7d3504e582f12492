/*
 * The hot set: decoded tensors kept in the daemon's memory, shared by every connection.
 *
 * An entry is keyed by the digest of the stored content and the options that decide the
 * decoded bytes (serve's opts_key_frame()); it holds the tensor, then the content-derived
 * header JSON. Entries go least recently used first once the bytes pass the budget
 * (`max`, the hot_max setting), but never one that an item still references (refs > 0):
 * the set may stay over budget until those are let go (hot_unref() catches up). Items over
 * an eighth of the budget are not taken. Owned by serve (struct serve), loop thread only.
 */
#ifndef DMC_HOT_H
#define DMC_HOT_H

#include <stddef.h>
#include <stdint.h>

#include "decode.h"
#include "store.h"

/* One decoded item: the tensor, then the DICOM header JSON (content-derived only: the
 * resource record of the snapshot item is added when the item is placed). */
struct hot_entry {
	uint8_t raw[STORE_DIGEST_SIZE];
	int64_t opts;
	uint8_t *buf;
	uint64_t nbytes, dlen;
	struct decode_desc desc;
	unsigned refs; /* items holding it: never evicted while > 0 */
	struct hot_entry *hnext;
	struct hot_entry *newer, *older;
};

struct hot {
	struct hot_entry **b;
	size_t nb, n;
	uint64_t bytes, max;
	struct hot_entry *newest, *oldest;
	uint64_t hits, misses, inserts, evictions;
};

/* The entry for (raw, opts), referenced and made the most recent (a hit), or NULL (a miss). */
struct hot_entry *hot_get(struct hot *h, const uint8_t *raw, int64_t opts);
/* hot_get() that counts nothing when the entry is not there (a guess that may miss). */
struct hot_entry *hot_get_quiet(struct hot *h, const uint8_t *raw, int64_t opts);
/* An item lets go of `e`; what the budget no longer holds is evicted. */
void hot_unref(struct hot *h, struct hot_entry *e);
/*
 * Takes `buf` (tensor + header JSON) into the hot set and returns the entry, referenced;
 * NULL when it does not fit (the caller keeps `buf`).
 */
struct hot_entry *hot_adopt(struct hot *h, const uint8_t *raw, int64_t opts,
			    uint8_t *buf, uint64_t nbytes, uint64_t dlen,
			    const struct decode_desc *desc);
/*
 * A new budget (a reload of hot_max): entries are dropped, least recently used first, until
 * the set fits, except those still referenced (they leave when let go). Returns how many
 * were dropped, and their bytes in *ret_bytes (may be NULL).
 */
uint64_t hot_set_max(struct hot *h, uint64_t max, uint64_t *ret_bytes);
/* Frees every entry (none may be referenced) and leaves `h` zeroed. */
void hot_done(struct hot *h);

#endif
