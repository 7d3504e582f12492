/*
 * serve: tensors to clients through shared memory (OPEN, GET, RELEASE, CLOSE; proto.h).
 *
 * Each connection that opens a dataset gets one arena (arena.h): a memfd the daemon maps
 * once, seals (no shrinking, no growing, no writes through new mappings) and passes to the
 * client once. It is sparse and grows on demand: pages are faulted in on the threadpool in
 * chunks ahead of the items, and stay until the connection closes.
 * A GET looks each item up in the index, reads its stored bytes on the threadpool, decodes
 * them in the sandboxed worker pool (decode_pool.h) unless a decoded tensor is cached, and
 * copies the tensor and its metadata into free arena space; the reply names offsets. RELEASE
 * frees the space. When the arena is full (or growing), items wait for releases: a slow
 * client gets backpressure. Items of a snapshot that a job is still downloading wait for it.
 *
 * Fair shares between uids: the bytes committed in one uid's arenas are capped by
 * shm_max_per_uid, in all arenas by shm_max; an OPEN or an item that would pass a cap fails
 * with DMC_E_LIMIT_EXCEEDED naming the key (it never waits on other users' memory). Items
 * of one uid being read, decoded or held are capped by decode_max_per_uid over all its
 * connections (INFLIGHT_MAX per connection).
 *
 * Decoded tensors of expensive codecs (decode_codec_store_tensor) are kept in the store
 * (kind TENSOR, with the metadata as a META blob) and read back instead of decoded again.
 *
 * DMC_OPEN_RAW handles skip the decoders: an item is its stored file as downloaded (with
 * DMC_OPEN_MASKS, its stored segmentation files back to back), read and SHA-256-checked by
 * the store, under the same OPEN access check as every other handle.
 *
 * Loop thread only.
 */
#ifndef DMC_SERVE_H
#define DMC_SERVE_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "proto.h"

struct cache;
struct conn;
struct config;
struct decode_pool;
struct prefetch;
struct serve;

struct serve_deps {
	uv_loop_t *loop;
	struct cache *cache;
	struct prefetch *prefetch;
	struct decode_pool *pool;
	const struct config *cfg;
};

int serve_new(const struct serve_deps *deps, struct serve **ret);
void serve_free(struct serve *s);

/* Handles OPEN, GET, RELEASE, CLOSE; false for other opcodes. */
bool serve_dispatch(struct serve *s, struct conn *c, const struct dmc_header *h,
		    const uint8_t *payload);
/* The connection is closing: its arena and handles go (work in flight finishes first). */
void serve_conn_closed(struct serve *s, struct conn *c);
uint32_t serve_status(struct serve *s, struct dmc_status_entry *e, uint32_t max);
/*
 * hot_max changed (SIGHUP): the live value is read from the configuration again, and
 * decoded tensors not in use are dropped, least recently used first, until the hot set is
 * within it (those in use go when their last user lets them go). Returns the number
 * dropped; *ret_bytes (may be NULL) their bytes.
 */
uint64_t serve_hot_max_changed(struct serve *s, uint64_t *ret_bytes);
/* Every few seconds: pooled arenas idle too long are unmapped, regions that lingered long
 * enough without handles close. Loop thread. */
void serve_tick(struct serve *s);
/* Whether a client has snapshot `id` open: eviction keeps its content. Loop thread. */
bool serve_snapshot_open(struct serve *s, int64_t snapshot_id);

#endif
