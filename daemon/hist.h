/*
 * hist: a latency histogram with fixed log-scale buckets (50 us .. 10 s, 1-2.5-5 steps),
 * for the Prometheus histograms of `dmcache metrics`.
 *
 * Header only, no allocation: hist_observe() is a few comparisons and three additions.
 * A struct hist belongs to one thread (every user records on the daemon's loop thread);
 * nothing here locks.
 *
 * On the wire a histogram travels as STATUS entries (metrics.c, metrics.h): its count, its
 * sum in nanoseconds and the bucket counts that are not zero; the client makes the
 * Prometheus _bucket series (cumulative), _sum and _count of them (client/cli_metrics.c).
 */
#ifndef DMC_HIST_H
#define DMC_HIST_H

#include <stdint.h>

#define HIST_BUCKETS 17

/* Upper bounds in microseconds; observations above the last go to the +Inf bucket. */
static const uint32_t hist_bounds_us[HIST_BUCKETS] = {
	50,     100,    250,    500,     1000,    2500,    5000,    10000,    25000,
	50000,  100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
};

struct hist {
	uint64_t bucket[HIST_BUCKETS + 1]; /* not cumulative; [HIST_BUCKETS]: above the last */
	uint64_t count;
	uint64_t sum_ns;
};

static inline void hist_observe(struct hist *h, uint64_t ns)
{
	unsigned i = 0;

	while (i < HIST_BUCKETS && ns > (uint64_t)hist_bounds_us[i] * 1000u)
		i++;
	h->bucket[i]++;
	h->count++;
	h->sum_ns += ns;
}

#endif
