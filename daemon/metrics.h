/*
 * metrics: the daemon's latency histograms (hist.h) and their STATUS entries.
 *
 * Owns the OPEN and GET latency histograms of the process (one daemon per process); the
 * decode-time histograms belong to the decoder pool (decode_pool_hist()) and are only
 * read here. Everything runs on the loop thread: nothing locks.
 *
 * STATUS entries of a histogram (names outside the [a-z0-9_] of plain counters, so that a
 * client that does not know them leaves them out):
 *   histogram/FAMILY/LABELS/count     observations
 *   histogram/FAMILY/LABELS/sum_ns    their sum, in nanoseconds
 *   histogram/FAMILY/LABELS/le_US     observations in the bucket whose upper bound is US
 *                                     microseconds and not in a smaller one (not
 *                                     cumulative); buckets holding none are left out
 * LABELS is "-" or name=value pairs joined by ','. A histogram that has seen nothing is
 * sent as its count and sum only (the decode ones not at all); one that does not fit in
 * the entries left is left out whole.
 */
#ifndef DMC_METRICS_H
#define DMC_METRICS_H

#include <stdint.h>

#include "decode_pool.h"
#include "proto.h"

/* An OPEN that arrived at `arrived_ns` (uv_hrtime()) was answered, with a handle or an
 * error (OPENs refused as they arrive, malformed or with conflicting flags, are not
 * timed). */
void metrics_open_replied(uint64_t arrived_ns);
/* A GET that arrived at `arrived_ns` was answered: its batch handed to the client (the
 * batches of a STREAM are not GETs). */
void metrics_get_replied(uint64_t arrived_ns);

/*
 * Fills at most `max` entries with the histograms (pool: its decode times; may be NULL).
 * Names are in static storage, valid until the next call. Returns the entries filled.
 */
uint32_t metrics_status(const struct decode_pool *pool, struct dmc_status_entry *e, uint32_t max);

#endif
