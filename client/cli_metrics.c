/*
 * dmcache metrics: the daemon's figures in the Prometheus text exposition format (0.0.4),
 * for node_exporter's textfile collector (systemd/dmcache-metrics.{service,timer}) or any
 * scraper that reads a file.
 *
 * Every STATUS counter becomes dmcache_NAME: a counter when its name ends in _total, a
 * gauge otherwise, with HELP from the table below (a counter the daemon adds later gets a
 * generic HELP, never dropped). The daemon filters STATUS by caller: an admin (root or the
 * admin group) gets everyone's figures, anyone else only their own (user_* gauges, no
 * cache-wide totals). Series with per-snapshot and per-uid labels come from LIST and are
 * written for admins only: a non-admin's STATUS has user_snapshots, an admin's does not
 * (daemon/prefetch.c, user_status()).
 *
 * Histograms (OPEN and GET latency, decode time by format and codec) come in STATUS as
 * entries named histogram/FAMILY/LABELS/FIELD (daemon/metrics.h): their count, their sum
 * in nanoseconds and the bucket counts that are not zero. They become dmcache_FAMILY
 * histograms: _bucket{le} series, cumulative, for every bound of the daemon's fixed set
 * (and any other bound received) and +Inf, then _sum in seconds and _count.
 *
 * With --output FILE the text is written to FILE.tmp and renamed over FILE, so a scraper
 * never reads half a file; when the daemon cannot be reached the file says dmcache_up 0
 * (and the exit status is 3).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"

static const struct {
	const char *name, *help;
} helps[] = {
	{ "connections", "Client connections open." },
	{ "connections_max", "Most client connections in total (max_connections)." },
	{ "connections_of_caller", "Connections open by the uid that asked." },
	{ "connections_per_uid_max", "Most connections of one uid (max_connections_per_uid)." },
	{ "users_connected", "Distinct uids with a connection open." },
	{ "connections_accepted_total", "Client connections accepted." },
	{ "connections_refused_total", "Client connections refused (limits, overflow uid, stopping)." },
	{ "connections_timed_out_total", "Connections closed by hello_timeout or idle_timeout." },
	{ "protocol_errors_total", "Connections closed for a malformed frame." },
	{ "requests_total", "Requests received." },
	{ "unknown_requests_total", "Requests with an unknown opcode." },
	{ "backpressure_pauses_total", "Times a connection's reads paused for unsent replies (write_queue_max)." },
	{ "cache_bytes", "Bytes of blob files in the cache." },
	{ "cache_objects", "Blobs in the cache." },
	{ "cache_unchecked_dirs", "Blob directories a start after a crash has still to check in the background, of 256 (until 0, cache_bytes and cache_objects count only what changed in them)." },
	{ "cache_max_bytes", "Largest size of the cache's files (max_size; 0: no limit)." },
	{ "cache_reads_total", "Blobs read from the cache." },
	{ "cache_read_bytes_total", "Bytes read from the cache's blobs." },
	{ "cache_dedup_hits_total", "Stores that found the content already cached." },
	{ "cache_integrity_failures_total", "Blobs whose checksum did not match when read." },
	{ "cache_full_total", "Stores refused for want of space." },
	{ "cache_evicted_total", "Blobs removed by eviction." },
	{ "store_start_dirs_walked", "Blob directories the last start walked, of 256 (0 after a clean stop with nothing changed)." },
	{ "store_start_index_checked", "Whether the last start ran the index check (1) or trusted the clean-shutdown record (0)." },
	{ "prefetch_jobs", "Prefetch jobs running." },
	{ "prefetch_jobs_total", "Prefetch jobs started." },
	{ "prefetch_items_downloaded_total", "Items downloaded by prefetch jobs." },
	{ "prefetch_items_revalidated_total", "Cached items confirmed unchanged with the server." },
	{ "prefetch_items_shared_total", "Items served from content another user stored." },
	{ "prefetch_items_failed_total", "Items a prefetch job could not bring in." },
	{ "prefetch_local_parses_loaded_total", "Identities of earlier dataset.json parses read back from the index (after a start)." },
	{ "prefetch_local_tables_written_total", "Item tables of stable dataset.json parses written to the cache directory (tables/)." },
	{ "prefetch_local_tables_mapped_total", "Local jobs that mapped a kept item table instead of parsing dataset.json." },
	{ "prefetch_local_tables_refused_total", "Kept item tables that failed a check and were removed (dataset.json parsed instead)." },
	{ "prefetch_local_items_ahead_total", "Local folder items whose files were asked for ahead of the job's walk (a GET waited)." },
	{ "prefetch_local_items_forgotten_total", "Local folder items whose proof failed: their stored content is no longer served." },
	{ "download_bytes_total", "Bytes downloaded from upstream servers." },
	{ "download_rate_bps", "Current download rate of the running jobs, bytes per second." },
	{ "transfers_running", "Upstream transfers running." },
	{ "transfers_queued", "Upstream transfers waiting for a slot." },
	{ "transfer_retries_total", "Upstream transfers retried." },
	{ "transfer_resumes_total", "Upstream transfers resumed with a range request." },
	{ "transfers_failed_total", "Upstream transfers that failed for good." },
	{ "tier_hits_total", "Items whose file came from the cluster tier, verified." },
	{ "tier_misses_total", "Items the cluster tier had no mapping of the listed version for." },
	{ "tier_errors_total", "Cluster tier requests that failed (unreachable, 5xx, denied, full, corrupt)." },
	{ "tier_corrupt_total", "Cluster tier blobs that did not match their digest (not used)." },
	{ "tier_bytes_total", "Blob bytes read from the cluster tier." },
	{ "tier_uploads_total", "Blobs uploaded to the cluster tier." },
	{ "tier_uploads_skipped_total", "Uploads skipped: the cluster tier had the blob already." },
	{ "tier_uploads_failed_total", "Uploads to the cluster tier that failed or were dropped." },
	{ "tier_uploads_pending", "Uploads to the cluster tier queued or running." },
	{ "tier_maps_written_total", "Mappings written to the cluster tier." },
	{ "tier_full", "1 once the cluster tier said it is full (uploads stop until a restart)." },
	{ "serve_get_requests_total", "Item requests (GET and batches)." },
	{ "serve_items_total", "Items served to clients." },
	{ "serve_items_failed_total", "Items that could not be served." },
	{ "serve_bytes_total", "Bytes of tensors served." },
	{ "serve_items_decoded_total", "Items decoded by the workers for serving." },
	{ "serve_items_from_tensor_cache_total", "Items served from stored decoded tensors." },
	{ "serve_tensors_stored_total", "Decoded tensors stored in the cache." },
	{ "serve_waits_for_space_total", "Times serving waited for room in a client's arena." },
	{ "serve_streams_total", "Item streams opened." },
	{ "serve_batches_total", "Batches handed to clients." },
	{ "serve_hot_bytes", "Bytes of decoded tensors kept in memory (hot_max)." },
	{ "serve_hot_items", "Decoded tensors kept in memory." },
	{ "serve_hot_hits_total", "Items served from the in-memory tensors." },
	{ "serve_hot_misses_total", "Items not found among the in-memory tensors." },
	{ "serve_hot_evictions_total", "In-memory tensors dropped for room." },
	{ "serve_hot_ahead_total", "Tensors decoded ahead (prefetch --decode) kept in memory." },
	{ "serve_regions", "Snapshot regions of hot tensors handed in place." },
	{ "serve_region_bytes", "Bytes of tensors in the regions (bounded by hot_max)." },
	{ "serve_region_committed_bytes", "Bytes of memory the regions' files hold." },
	{ "serve_region_tensors", "Tensors in the regions." },
	{ "serve_region_tensors_pinned", "Tensors in the regions that a client holds." },
	{ "serve_region_copies_total", "Tensors copied into a region." },
	{ "serve_region_items_total", "Items handed in place from a region." },
	{ "serve_stream_region_items_total", "STREAM batch items handed in place from a region." },
	{ "serve_region_evictions_total", "Tensors dropped from the regions for room." },
	{ "serve_region_reclaimed_bytes_total", "Bytes of region pages given back to the kernel." },
	{ "serve_arena_bytes", "Bytes of shared memory given to clients." },
	{ "serve_arena_used_bytes", "Bytes of client shared memory holding items." },
	{ "serve_shm_committed_bytes", "Bytes of shared memory committed in all arenas (shm_max)." },
	{ "serve_shm_refusals_total", "Arena growths refused by shm_max_per_uid or shm_max." },
	{ "decode_workers", "Decoder worker processes." },
	{ "decode_busy", "Decoder workers busy." },
	{ "decode_done_total", "Decodes completed." },
	{ "decode_failed_total", "Decodes that failed (bad or unsupported input)." },
	{ "decode_crashes_total", "Decoder workers that crashed (and were replaced)." },
	{ "decode_timeouts_total", "Decodes killed by decode_timeout." },
	{ "user_snapshots", "Snapshots the caller holds a grant for." },
	{ "user_items", "Items of the caller's snapshots." },
	{ "user_items_stored", "Items of the caller's snapshots stored in the cache." },
	{ "user_bytes_stored", "Upstream bytes of the caller's stored items." },
};

/* The daemon's bucket bounds in microseconds (daemon/hist.h): every histogram shows all of
 * them, so that its series stay the same from one scrape to the next. */
static const uint32_t std_bounds_us[] = {
	50,     100,    250,    500,     1000,    2500,    5000,    10000,    25000,
	50000,  100000, 250000, 500000, 1000000, 2500000, 5000000, 10000000,
};
#define STD_BOUNDS (sizeof(std_bounds_us) / sizeof(std_bounds_us[0]))
#define BOUNDS_MAX 64

static const struct {
	const char *name, *help;
} hist_helps[] = {
	{ "serve_open_seconds", "Time from an OPEN's arrival to its reply (a handle or an error)." },
	{ "serve_get_seconds", "Time from a GET's arrival to its reply (the batch handed over)." },
	{ "decode_seconds", "Time a decode spent in a decoder worker, by the format and codec it found." },
};

/* One histogram of the STATUS reply. */
struct hist_in {
	const char *family, *labels; /* NUL-terminated copies (owned) */
	int64_t count, sum_ns;
	uint32_t n;
	struct {
		uint32_t bound_us;
		int64_t value;
	} b[BOUNDS_MAX];
};

/* STATUS entries that are not measurements. */
static bool skipped(const char *name)
{
	return strcmp(name, "caller_uid") == 0;
}

static const char *help_of(const char *name)
{
	for (size_t i = 0; i < sizeof(helps) / sizeof(helps[0]); i++)
		if (strcmp(helps[i].name, name) == 0)
			return helps[i].help;
	return NULL;
}

static bool valid_name(const char *s)
{
	if (!*s)
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
			return false;
	return true;
}

/* A label value: backslash, double quote and newline escaped. */
static void put_label(FILE *out, const char *key, const char *v, bool comma)
{
	fprintf(out, "%s%s=\"", comma ? "," : "", key);
	for (; v && *v; v++) {
		if (*v == '\\' || *v == '"')
			fprintf(out, "\\%c", *v);
		else if (*v == '\n')
			fputs("\\n", out);
		else
			fputc(*v, out);
	}
	fputc('"', out);
}

static void header(FILE *out, const char *name, const char *type, const char *help)
{
	fprintf(out, "# HELP dmcache_%s %s\n# TYPE dmcache_%s %s\n", name, help, name, type);
}

/* Splits "histogram/FAMILY/LABELS/FIELD" into its parts (in `buf`); false if it is not
 * one. */
static bool hist_name(const char *name, char *buf, size_t len, char **family, char **labels,
		      char **field)
{
	char *p;

	if (strncmp(name, "histogram/", 10) != 0 || strlen(name + 10) >= len)
		return false;
	strcpy(buf, name + 10);
	*family = buf;
	if (!(p = strchr(buf, '/')))
		return false;
	*p++ = '\0';
	*labels = p;
	if (!(p = strchr(p, '/')))
		return false;
	*p++ = '\0';
	*field = p;
	return valid_name(*family) && !strchr(p, '/');
}

/* The histograms of a STATUS reply, in the order of their first entry. */
static struct hist_in *hist_collect(const struct dmc_status_info *s, size_t *ret_n)
{
	struct hist_in *h = calloc(s->n_counters ? s->n_counters : 1, sizeof(*h));
	size_t n = 0;
	char buf[256], *family, *labels, *field, *end;

	*ret_n = 0;
	if (!h)
		return NULL;
	for (uint32_t i = 0; i < s->n_counters; i++) {
		struct hist_in *x = NULL;
		int64_t v = s->counters[i].value;

		if (!hist_name(s->counters[i].name, buf, sizeof(buf), &family, &labels, &field))
			continue;
		for (size_t k = 0; k < n && !x; k++)
			if (strcmp(h[k].family, family) == 0 && strcmp(h[k].labels, labels) == 0)
				x = &h[k];
		if (!x) {
			x = &h[n];
			x->family = strdup(family);
			x->labels = strdup(labels);
			if (!x->family || !x->labels) {
				free((char *)x->family);
				free((char *)x->labels);
				break;
			}
			n++;
		}
		if (strcmp(field, "count") == 0) {
			x->count = v;
		} else if (strcmp(field, "sum_ns") == 0) {
			x->sum_ns = v;
		} else if (strncmp(field, "le_", 3) == 0 && x->n < BOUNDS_MAX && v >= 0) {
			unsigned long us = strtoul(field + 3, &end, 10);
			if (end != field + 3 && !*end && us > 0 && us <= UINT32_MAX) {
				x->b[x->n].bound_us = (uint32_t)us;
				x->b[x->n].value = v;
				x->n++;
			}
		}
	}
	*ret_n = n;
	return h;
}

/* A bound in seconds, as a decimal without trailing zeros ("0.00005", "2.5", "10"). */
static void le_text(uint32_t us, char *buf, size_t len)
{
	size_t n = (size_t)snprintf(buf, len, "%u.%06u", us / 1000000, us % 1000000);

	while (n > 0 && buf[n - 1] == '0')
		buf[--n] = '\0';
	if (n > 0 && buf[n - 1] == '.')
		buf[--n] = '\0';
}

/* Writes the labels "k=v,k=v" (or "-") of a histogram, each escaped, to `out` (NULL:
 * only checks them); false if malformed. */
static bool put_hist_labels(FILE *out, const char *labels)
{
	char buf[256], *save = NULL, *kv;
	bool first = true;

	if (strcmp(labels, "-") == 0)
		return true;
	if (strlen(labels) >= sizeof(buf))
		return false;
	strcpy(buf, labels);
	for (kv = strtok_r(buf, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(kv, '=');
		if (!eq)
			return false;
		*eq = '\0';
		if (!valid_name(kv) || strcmp(kv, "le") == 0)
			return false;
		if (out)
			put_label(out, kv, eq + 1, !first);
		first = false;
	}
	return true;
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

static void hist_series(FILE *out, const struct dmc_status_info *s)
{
	size_t n;
	struct hist_in *h = hist_collect(s, &n);
	bool *done = calloc(n ? n : 1, sizeof(*done));
	uint32_t bounds[STD_BOUNDS + BOUNDS_MAX * 4];
	char le[32];

	if (!h || !done)
		goto out;
	for (size_t i = 0; i < n; i++) {
		const char *help = NULL;
		char generic[160];
		size_t nb = 0;

		if (done[i])
			continue;
		/* the family's bounds: the fixed set and any other one received */
		memcpy(bounds, std_bounds_us, sizeof(std_bounds_us));
		nb = STD_BOUNDS;
		for (size_t j = i; j < n; j++) {
			if (strcmp(h[j].family, h[i].family) != 0)
				continue;
			for (uint32_t k = 0; k < h[j].n; k++) {
				bool known = false;
				for (size_t m = 0; m < nb && !known; m++)
					known = bounds[m] == h[j].b[k].bound_us;
				if (!known && nb < sizeof(bounds) / sizeof(bounds[0]))
					bounds[nb++] = h[j].b[k].bound_us;
			}
		}
		qsort(bounds, nb, sizeof(bounds[0]), cmp_u32);
		for (size_t k = 0; k < sizeof(hist_helps) / sizeof(hist_helps[0]); k++)
			if (strcmp(hist_helps[k].name, h[i].family) == 0)
				help = hist_helps[k].help;
		if (!help) {
			snprintf(generic, sizeof(generic), "dmcached STATUS histogram %s.",
				 h[i].family);
			help = generic;
		}
		header(out, h[i].family, "histogram", help);
		for (size_t j = i; j < n; j++) {
			const struct hist_in *x = &h[j];
			bool plain = strcmp(x->labels, "-") == 0;
			int64_t cum = 0;

			if (strcmp(x->family, h[i].family) != 0)
				continue;
			done[j] = true;
			if (!put_hist_labels(NULL, x->labels))
				continue;
			for (size_t m = 0; m < nb; m++) {
				for (uint32_t k = 0; k < x->n; k++)
					if (x->b[k].bound_us == bounds[m])
						cum += x->b[k].value;
				le_text(bounds[m], le, sizeof(le));
				fprintf(out, "dmcache_%s_bucket{", x->family);
				put_hist_labels(out, x->labels);
				fprintf(out, "%sle=\"%s\"} %lld\n", plain ? "" : ",", le, (long long)cum);
			}
			fprintf(out, "dmcache_%s_bucket{", x->family);
			put_hist_labels(out, x->labels);
			fprintf(out, "%sle=\"+Inf\"} %lld\n", plain ? "" : ",",
				(long long)(x->count > cum ? x->count : cum));
			fprintf(out, "dmcache_%s_sum", x->family);
			if (!plain) {
				fputc('{', out);
				put_hist_labels(out, x->labels);
				fputc('}', out);
			}
			fprintf(out, " %.9f\n", (double)x->sum_ns / 1e9);
			fprintf(out, "dmcache_%s_count", x->family);
			if (!plain) {
				fputc('{', out);
				put_hist_labels(out, x->labels);
				fputc('}', out);
			}
			fprintf(out, " %lld\n", (long long)(x->count > cum ? x->count : cum));
		}
	}
out:
	for (size_t i = 0; h && i < n; i++) {
		free((char *)h[i].family);
		free((char *)h[i].labels);
	}
	free(h);
	free(done);
}

static void snapshot_series(FILE *out, const struct dmc_snapshot_list *l)
{
	static const struct {
		const char *name, *help;
		size_t off;
	} cols[] = {
		{ "snapshot_items", "Items of a snapshot.", offsetof(struct dmc_snapshot_entry, items) },
		{ "snapshot_items_stored", "Items of a snapshot stored in the cache.",
		  offsetof(struct dmc_snapshot_entry, items_stored) },
		{ "snapshot_bytes", "Upstream bytes of a snapshot.",
		  offsetof(struct dmc_snapshot_entry, bytes) },
		{ "snapshot_bytes_stored", "Upstream bytes of a snapshot's stored items.",
		  offsetof(struct dmc_snapshot_entry, bytes_stored) },
	};
	static const char *const sources[] = { [DMC_SOURCE_DATAMINT] = "datamint",
						[DMC_SOURCE_LOCAL] = "local" };
	char num[32];

	for (size_t k = 0; k < sizeof(cols) / sizeof(cols[0]); k++) {
		header(out, cols[k].name, "gauge", cols[k].help);
		for (uint32_t i = 0; i < l->n; i++) {
			const struct dmc_snapshot_entry *s = &l->snapshots[i];
			fprintf(out, "dmcache_%s{", cols[k].name);
			snprintf(num, sizeof(num), "%llu", (unsigned long long)s->id);
			put_label(out, "snapshot", num, false);
			put_label(out, "project", s->project_name, true);
			put_label(out, "version", s->version, true);
			put_label(out, "source",
				  s->source == DMC_SOURCE_DATAMINT || s->source == DMC_SOURCE_LOCAL
					  ? sources[s->source]
					  : "other",
				  true);
			put_label(out, "server", s->server, true);
			if (s->owner_uid == UINT32_MAX)
				snprintf(num, sizeof(num), "unknown");
			else
				snprintf(num, sizeof(num), "%u", s->owner_uid);
			put_label(out, "uid", num, true);
			put_label(out, "complete", s->complete ? "1" : "0", true);
			fprintf(out, "} %llu\n",
				(unsigned long long)*(const uint64_t *)((const char *)s + cols[k].off));
		}
	}
}

/* Per-uid sums of the snapshot list (owner_uid), sorted by uid. */
static void uid_series(FILE *out, const struct dmc_snapshot_list *l)
{
	struct {
		uint32_t uid;
		uint64_t snaps, bytes;
	} *u = calloc(l->n ? l->n : 1, sizeof(*u));
	size_t n = 0;

	if (!u)
		return;
	for (uint32_t i = 0; i < l->n; i++) {
		const struct dmc_snapshot_entry *s = &l->snapshots[i];
		size_t j = 0;
		if (s->owner_uid == UINT32_MAX)
			continue;
		while (j < n && u[j].uid < s->owner_uid)
			j++;
		if (j == n || u[j].uid != s->owner_uid) {
			memmove(&u[j + 1], &u[j], (n - j) * sizeof(*u));
			u[j].uid = s->owner_uid;
			u[j].snaps = u[j].bytes = 0;
			n++;
		}
		u[j].snaps++;
		u[j].bytes += s->bytes_stored;
	}
	for (int k = 0; k < 2; k++) {
		header(out, k ? "uid_bytes_stored" : "uid_snapshots", "gauge",
		       k ? "Upstream bytes stored of the snapshots a uid's listings made."
			 : "Snapshots a uid's listings made.");
		for (size_t j = 0; j < n; j++)
			fprintf(out, "dmcache_%s{uid=\"%u\"} %llu\n",
				k ? "uid_bytes_stored" : "uid_snapshots", u[j].uid,
				(unsigned long long)(k ? u[j].bytes : u[j].snaps));
	}
	free(u);
}

/* Writes the exposition of a reachable daemon; returns an exit status. */
static int write_metrics(FILE *out, dmc_client *c)
{
	struct dmc_status_info *s = NULL;
	struct dmc_snapshot_list *l = NULL;
	bool admin;
	int rc = dmc_status(c, &s);

	if (rc < 0)
		return cli_report(c, "metrics", rc);
	admin = dmc_status_get(s, "user_snapshots", -1) < 0;
	header(out, "up", "gauge", "1 when dmcached answered.");
	fprintf(out, "dmcache_up 1\n");
	header(out, "info", "gauge", "The daemon's version and protocol.");
	fprintf(out, "dmcache_info{");
	put_label(out, "version", s->version, false);
	fprintf(out, ",protocol=\"%u\"} 1\n", dmc_protocol_version(c));
	header(out, "uptime_seconds", "gauge", "Seconds since dmcached started.");
	fprintf(out, "dmcache_uptime_seconds %.3f\n", (double)s->uptime_ms / 1000);
	header(out, "caller_is_admin", "gauge",
	       "1 when these figures are everyone's (root or the admin group), 0 the caller's own.");
	fprintf(out, "dmcache_caller_is_admin %d\n", admin ? 1 : 0);
	for (uint32_t i = 0; i < s->n_counters; i++) {
		const char *name = s->counters[i].name, *help = help_of(name);
		size_t len = strlen(name);
		bool counter = len > 6 && strcmp(name + len - 6, "_total") == 0;
		char generic[160];

		if (skipped(name) || !valid_name(name))
			continue;
		if (!help) {
			snprintf(generic, sizeof(generic), "dmcached STATUS figure %s.", name);
			help = generic;
		}
		header(out, name, counter ? "counter" : "gauge", help);
		fprintf(out, "dmcache_%s %lld\n", name, (long long)s->counters[i].value);
	}
	hist_series(out, s);
	dmc_status_free(s);
	if (!admin)
		return 0;
	rc = dmc_list(c, &l);
	if (rc < 0)
		return cli_report(c, "metrics", rc);
	snapshot_series(out, l);
	uid_series(out, l);
	dmc_list_free(l);
	return 0;
}

/* Replaces `path` with `text` at once: a temporary file beside it, fsync, rename. */
static int write_atomically(const char *path, const char *text, size_t len)
{
	char tmp[4096];
	int fd;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof(tmp)) {
		fprintf(stderr, "dmcache metrics: path too long: '%s'\n", path);
		return EXIT_USAGE;
	}
	fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0)
		goto fail;
	if (fchmod(fd, 0644) != 0) /* readable by the exporter whatever the umask */
		goto fail_fd;
	for (size_t off = 0; off < len;) {
		ssize_t n = write(fd, text + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			goto fail_fd;
		off += (size_t)n;
	}
	if (fsync(fd) != 0)
		goto fail_fd;
	if (close(fd) != 0) {
		fd = -1;
		goto fail_unlink;
	}
	if (rename(tmp, path) != 0)
		goto fail_unlink;
	return 0;
fail_fd:
	close(fd);
fail_unlink:
	{
		int e = errno;
		unlink(tmp);
		errno = e;
	}
fail:
	return cli_write_failed("metrics", path, errno);
}

int cmd_metrics(int argc, char **argv)
{
	static const struct option opts[] = { { "output", required_argument, NULL, 'o' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	const char *output = NULL;
	char *text = NULL;
	size_t len = 0;
	FILE *out;
	dmc_client *c;
	int opt, status, wrc;

	optind = 0;
	while ((opt = cli_getopt(argc, argv, "metrics", "o:h", opts)) != -1) {
		if (opt == 'o')
			output = optarg;
		else if (opt == 'h') {
			printf("Usage: dmcache metrics [-o FILE]\n"
			       "The daemon's figures in the Prometheus text format; with -o, FILE is\n"
			       "replaced at once (for node_exporter's textfile collector).\n"
			       "Admins (root, the admin group) get every figure and per-snapshot and\n"
			       "per-uid series; other users their own figures.\n");
			return 0;
		} else
			return EXIT_USAGE;
	}
	if (optind < argc)
		return cli_unexpected("metrics", argv[optind]);
	out = open_memstream(&text, &len);
	if (!out)
		return cli_no_memory("metrics");
	c = cli_connect(CLI_TIMEOUT_MS);
	if (c) {
		status = write_metrics(out, c);
		dmc_close(c);
	} else {
		status = EXIT_UNREACHABLE;
	}
	if (status == EXIT_UNREACHABLE) { /* what was written is dropped: only "down" */
		fclose(out);
		free(text);
		text = NULL;
		out = open_memstream(&text, &len);
		if (!out)
			return status;
		header(out, "up", "gauge", "1 when dmcached answered.");
		fprintf(out, "dmcache_up 0\n");
	} else if (status != 0) {
		fclose(out);
		free(text);
		return status;
	}
	if (fclose(out) != 0) {
		free(text);
		return cli_no_memory("metrics");
	}
	if (output) {
		wrc = write_atomically(output, text, len);
	} else {
		wrc = fwrite(text, 1, len, stdout) == len && fflush(stdout) == 0
			      ? 0
			      : cli_write_failed("metrics", "stdout", errno ? errno : EIO);
	}
	free(text);
	return status ? status : wrc;
}
