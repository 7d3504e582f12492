/*
 * prefetch: jobs that bring a dataset version into the cache, and the cache requests of
 * the protocol (PREFETCH, CANCEL, LIST, EVICT, VERIFY; proto.h).
 *
 * A job belongs to the uid that asked for it and runs with that uid's key, which it keeps
 * in memory only (secret.h). It resolves the project and its version, pins a snapshot (the
 * ordered resource list in the index), then downloads what the cache lacks: each body
 * streams into a store writer through the libuv threadpool (the loop only copies bytes
 * into a buffer), is verified against the server's stated SHA-256 when there is one, and
 * is committed (fsync, rename) before the item counts as done. Items already stored are not
 * downloaded again; items of an earlier version of the same resource are revalidated with
 * If-None-Match and reused on 304. A resource wanted by two jobs at once downloads once.
 *
 * Entitlement (DESIGN.md section 7): a uid may see a snapshot after its own key listed that
 * project in this daemon's lifetime. Nothing of it survives a restart.
 *
 * Loop thread only.
 */
#ifndef DMC_PREFETCH_H
#define DMC_PREFETCH_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "proto.h"

struct cache;
struct conn;
struct fetch;
struct config;

struct prefetch;

struct prefetch_deps {
	uv_loop_t *loop;
	struct cache *cache;
	struct fetch *fetch;
	const struct config *cfg;
};

int prefetch_new(const struct prefetch_deps *deps, struct prefetch **ret);
/* Cancels every job; frees the engine once their transfers are over. */
void prefetch_free(struct prefetch *p);

/* Handles a cache request from `c`. Returns false when `h->opcode` is not one of its own. */
bool prefetch_dispatch(struct prefetch *p, struct conn *c, const struct dmc_header *h,
		       const uint8_t *payload);
/* `c` is closing: it gets no more events (its jobs go on). */
void prefetch_conn_closed(struct prefetch *p, struct conn *c);
/* STATUS entries: cache size, hits, transfers, jobs. Names are static. */
uint32_t prefetch_status(struct prefetch *p, struct dmc_status_entry *e, uint32_t max);

#endif
