/* The daemon's latency histograms and their STATUS entries: see metrics.h. Loop thread. */
#include "metrics.h"

#include <stdio.h>
#include <string.h>

#include <uv.h>

#include "hist.h"

static struct hist open_time, get_time;

void metrics_open_replied(uint64_t arrived_ns)
{
	uint64_t now = uv_hrtime();

	hist_observe(&open_time, now > arrived_ns ? now - arrived_ns : 0);
}

void metrics_get_replied(uint64_t arrived_ns)
{
	uint64_t now = uv_hrtime();

	hist_observe(&get_time, now > arrived_ns ? now - arrived_ns : 0);
}

/* Names of the last STATUS reply's entries: at most DMC_STATUS_ENTRIES_MAX of them. */
#define NAME_MAX_LEN 96
static char names[DMC_STATUS_ENTRIES_MAX][NAME_MAX_LEN];

struct out {
	struct dmc_status_entry *e;
	uint32_t n, max;
};

static void put(struct out *o, const char *family, const char *labels, const char *field,
		uint64_t value)
{
	char *name = names[o->n];
	int len = snprintf(name, NAME_MAX_LEN, "histogram/%s/%s/%s", family, labels, field);

	o->e[o->n].name = (struct dmc_str){ name, (uint32_t)len };
	o->e[o->n].value = (int64_t)value;
	o->n++;
}

static void put_hist(struct out *o, const char *family, const char *labels,
		     const struct hist *h)
{
	uint32_t need = 2;
	char field[24];

	for (unsigned i = 0; i < HIST_BUCKETS; i++)
		need += h->bucket[i] != 0;
	if (o->n + need > o->max || o->n + need > DMC_STATUS_ENTRIES_MAX)
		return;
	put(o, family, labels, "count", h->count);
	put(o, family, labels, "sum_ns", h->sum_ns);
	for (unsigned i = 0; i < HIST_BUCKETS; i++) {
		if (!h->bucket[i])
			continue;
		snprintf(field, sizeof(field), "le_%u", (unsigned)hist_bounds_us[i]);
		put(o, family, labels, field, h->bucket[i]);
	}
}

uint32_t metrics_status(const struct decode_pool *pool, struct dmc_status_entry *e, uint32_t max)
{
	struct out o = { e, 0, max };
	char labels[64];

	put_hist(&o, "serve_open_seconds", "-", &open_time);
	put_hist(&o, "serve_get_seconds", "-", &get_time);
	for (unsigned f = 0; pool && f <= DECODE_FORMAT_NIFTI; f++) {
		for (unsigned c = 0; c <= DECODE_CODEC_NIFTI_GZ; c++) {
			const struct hist *h = decode_pool_hist(pool, (enum decode_format)f,
								(enum decode_codec)c);
			const char *fn = decode_format_name((enum decode_format)f);
			const char *cn = decode_codec_name((enum decode_codec)c);

			if (!h || !h->count || !fn || !cn)
				continue;
			snprintf(labels, sizeof(labels), "format=%s,codec=%s", fn, cn);
			put_hist(&o, "decode_seconds", labels, h);
		}
	}
	return o.n;
}
