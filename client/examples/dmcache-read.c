/*
 * dmcache-read: an example of libdmcache's reading API (dmc_open, dmc_get, dmc_release).
 *
 * Opens a dataset version, reads every item in batches for a number of epochs, touches
 * every byte of every tensor (as a training loop copying it to a GPU would), gives the
 * space back, and prints items/s and MB/s per epoch. Two ways: GET of the batches the
 * program chooses (dmc_get, dmc_release), or with --stream the daemon's own order and
 * batches laid out contiguously, prepared ahead (dmc_stream_*); with --regions, hot items
 * come in place from the daemon's read-only region (DMC_OPEN_REGIONS: no copy into the
 * arena; such a batch has `data` NULL and is read item by item). Uses only <dmcache.h>:
 *
 *     cc dmcache-read.c $(pkg-config --cflags --libs libdmcache) -o dmcache-read
 *     dmcache-read --source ~/datasets/ct --epochs 3 --batch 32 [--stream --shuffle]
 *     DATAMINT_API_KEY=... dmcache-read ct
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <dmcache.h>

#define BATCH_DEFAULT 32u
#define BATCH_MAX 1024u     /* items per GET here; the protocol allows DMC_GET_MAX */
#define EPOCHS_MAX 1000000u
#define ARENA_MAX (1ull << 40)

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: dmcache-read [options] PROJECT\n"
		"       dmcache-read [options] --source DIR\n"
		"Reads every item of a dataset version through dmcached's shared memory and\n"
		"prints items/s and MB/s per epoch.\n\n"
		"  --epochs N       passes over the dataset (default 1)\n"
		"  --batch N        items per GET (default %u, at most %u)\n"
		"  --limit N        read only the first N items of each epoch\n"
		"  --stream         let the daemon order and prepare the batches (STREAM)\n"
		"  --shuffle        with --stream: shuffled order, seeded with the epoch\n"
		"  --regions        hot items handed in place (DMC_OPEN_REGIONS)\n"
		"  --arena BYTES    shared memory to ask for (default: the daemon's)\n"
		"  --socket PATH    the daemon's socket (default: $DMCACHE_SOCKET, ...)\n"
		"  --version V      dataset version (default: the newest)\n"
		"  --server URL     Datamint API URL (default: DATAMINT_API_URL, ...)\n"
		"  --api-key KEY    Datamint API key (default: DATAMINT_API_KEY, ...)\n"
		"  --source DIR     a local dataset folder instead of a Datamint project\n",
		BATCH_DEFAULT, BATCH_MAX);
}

static int parse_u64(const char *s, uint64_t min, uint64_t max, uint64_t *ret)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || v < min || v > max)
		return -EINVAL;
	*ret = v;
	return 0;
}

/* Reads every byte: a sum that the compiler cannot drop. */
static uint64_t touch(const void *data, uint64_t nbytes)
{
	const unsigned char *p = data;
	uint64_t sum = 0, w, i;

	for (i = 0; i + 8 <= nbytes; i += 8) {
		memcpy(&w, p + i, 8);
		sum += w;
	}
	for (; i < nbytes; i++)
		sum += p[i];
	return sum;
}

static int report(dmc_client *c, const char *what, int rc)
{
	const struct dmc_error_info *e = dmc_last_error(c);

	if (e->code && e->message[0])
		fprintf(stderr, "dmcache-read: %s: %s (%s)\n", what, e->message,
			dmc_strerror(rc));
	else
		fprintf(stderr, "dmcache-read: %s: %s\n", what, dmc_strerror(rc));
	return 1;
}

/* What one run reads with, and what it has seen so far. */
struct reader {
	dmc_client *c;
	dmc_dataset *ds;
	uint64_t n, batch;
	bool shuffle;
	uint64_t *indices;     /* batch entries, for GET */
	struct dmc_item *items;
	uint64_t sum;          /* of every byte read */
	double t_open, t_first;
};

static int check_items(const struct dmc_item *items, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		if (items[i].status) {
			fprintf(stderr, "dmcache-read: item %" PRIu64 ": %s (%s)\n", items[i].index,
				items[i].message, dmc_error_name((uint32_t)-items[i].status));
			return -1;
		}
	}
	return 0;
}

/* One epoch in index order, one GET per batch: 0 with the items and bytes read, or -1. */
static int epoch_get(struct reader *r, uint64_t *ret_items, uint64_t *ret_bytes)
{
	uint64_t nbytes = 0;
	int rc;

	for (uint64_t first = 0; first < r->n; first += r->batch) {
		uint32_t k = (uint32_t)(r->n - first < r->batch ? r->n - first : r->batch);

		for (uint32_t i = 0; i < k; i++)
			r->indices[i] = first + i;
		rc = dmc_get(r->ds, r->indices, k, r->items);
		if (rc < 0)
			return report(r->c, "get", rc), -1;
		if (r->t_first == 0)
			r->t_first = now_s() - r->t_open;
		if (check_items(r->items, k) < 0) {
			dmc_release(r->c, r->items, k);
			return -1;
		}
		for (uint32_t i = 0; i < k; i++) {
			r->sum += touch(r->items[i].data, r->items[i].nbytes);
			nbytes += r->items[i].nbytes;
		}
		rc = dmc_release(r->c, r->items, k);
		if (rc < 0)
			return report(r->c, "release", rc), -1;
	}
	*ret_items = r->n;
	*ret_bytes = nbytes;
	return 0;
}

/* One epoch as the daemon streams it (its order, batches prepared ahead and laid out
 * back to back), stopped after the batch that reaches r->n items: 0 with the items and
 * bytes read, or -1. */
static int epoch_stream(struct reader *r, uint64_t epoch, uint64_t *ret_items,
			uint64_t *ret_bytes)
{
	struct dmc_stream_args sa = {
		.seed = 0, .epoch = epoch, .shuffle = r->shuffle, .rank = 0, .world_size = 1,
		.batch_size = (uint32_t)r->batch,
	};
	struct dmc_batch b;
	dmc_stream *st;
	uint64_t seen = 0, nbytes = 0;
	int rc;

	rc = dmc_stream_start(r->ds, &sa, &st);
	if (rc < 0)
		return report(r->c, "stream", rc), -1;
	while (seen < r->n && (rc = dmc_stream_next(st, &b)) > 0) {
		if (r->t_first == 0)
			r->t_first = now_s() - r->t_open;
		if (check_items(b.items, b.n) < 0) {
			dmc_batch_release(st, &b);
			dmc_stream_close(st);
			return -1;
		}
		if (b.uniform && b.data) { /* one block of the arena */
			r->sum += touch(b.data, b.data_len);
			nbytes += b.data_len;
		} else {
			for (uint32_t i = 0; i < b.n; i++) {
				r->sum += touch(b.items[i].data, b.items[i].nbytes);
				nbytes += b.items[i].nbytes;
			}
		}
		seen += b.n;
		rc = dmc_batch_release(st, &b);
		if (rc < 0)
			break;
	}
	if (rc < 0) {
		report(r->c, "stream", rc);
		dmc_stream_close(st);
		return -1;
	}
	rc = dmc_stream_close(st);
	if (rc < 0)
		return report(r->c, "stream close", rc), -1;
	*ret_items = seen;
	*ret_bytes = nbytes;
	return 0;
}

int main(int argc, char **argv)
{
	enum { OPT_EPOCHS = 256, OPT_BATCH, OPT_LIMIT, OPT_ARENA, OPT_SOCKET, OPT_VERSION,
	       OPT_SERVER, OPT_KEY, OPT_SOURCE, OPT_STREAM, OPT_SHUFFLE, OPT_REGIONS };
	static const struct option opts[] = {
		{ "epochs", required_argument, NULL, OPT_EPOCHS },
		{ "batch", required_argument, NULL, OPT_BATCH },
		{ "limit", required_argument, NULL, OPT_LIMIT },
		{ "arena", required_argument, NULL, OPT_ARENA },
		{ "socket", required_argument, NULL, OPT_SOCKET },
		{ "version", required_argument, NULL, OPT_VERSION },
		{ "server", required_argument, NULL, OPT_SERVER },
		{ "api-key", required_argument, NULL, OPT_KEY },
		{ "source", required_argument, NULL, OPT_SOURCE },
		{ "stream", no_argument, NULL, OPT_STREAM },
		{ "shuffle", no_argument, NULL, OPT_SHUFFLE },
		{ "regions", no_argument, NULL, OPT_REGIONS },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	uint64_t epochs = 1, batch = BATCH_DEFAULT, limit = UINT64_MAX, arena = 0;
	const char *socket_path = NULL, *server = NULL, *key = NULL, *source = NULL;
	struct dmc_open_args oa = { 0 };
	struct dmc_credentials cr = { 0 };
	const struct dmc_dataset_info *info;
	struct reader r = { 0 };
	uint64_t total_items = 0, total_bytes = 0;
	double total_s = 0;
	char *abs_source = NULL, err[512];
	int opt, rc, status = 1;
	bool stream = false;
	uint64_t *target;

	while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (opt) {
		case OPT_EPOCHS:
		case OPT_BATCH:
		case OPT_LIMIT:
		case OPT_ARENA:
			target = opt == OPT_EPOCHS ? &epochs : opt == OPT_BATCH ? &batch :
				 opt == OPT_LIMIT ? &limit : &arena;
			if (parse_u64(optarg, opt == OPT_ARENA ? 0 : 1,
				      opt == OPT_EPOCHS ? EPOCHS_MAX : opt == OPT_BATCH ? BATCH_MAX :
				      opt == OPT_ARENA ? ARENA_MAX : UINT64_MAX, target) < 0) {
				fprintf(stderr, "dmcache-read: bad value '%s' for --%s\n", optarg,
					opts[opt - OPT_EPOCHS].name);
				return 2;
			}
			break;
		case OPT_SOCKET: socket_path = optarg; break;
		case OPT_VERSION: oa.version = optarg; break;
		case OPT_SERVER: server = optarg; break;
		case OPT_KEY: key = optarg; break;
		case OPT_SOURCE: source = optarg; break;
		case OPT_STREAM: stream = true; break;
		case OPT_SHUFFLE: r.shuffle = true; break;
		case OPT_REGIONS: oa.flags |= DMC_OPEN_REGIONS; break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (argc - optind != (source ? 0 : 1)) {
		usage(stderr);
		return 2;
	}
	if (r.shuffle && !stream) {
		fprintf(stderr, "dmcache-read: --shuffle needs --stream\n");
		return 2;
	}
	oa.arena_bytes = arena;
	if (source) {
		abs_source = realpath(source, NULL); /* the daemon wants an absolute path */
		if (!abs_source) {
			fprintf(stderr, "dmcache-read: --source '%s': %s\n", source, strerror(errno));
			return 2;
		}
		oa.source = DMC_SOURCE_LOCAL;
		oa.project = abs_source;
	} else {
		if (dmc_credentials_load(key, server, &cr, err, sizeof(err)) < 0) {
			fprintf(stderr, "dmcache-read: %s\n", err);
			return 2;
		}
		if (!cr.api_key) {
			fprintf(stderr, "dmcache-read: no API key: set DATAMINT_API_KEY or run "
					"datamint-config\n");
			dmc_credentials_done(&cr);
			return 2;
		}
		oa.source = DMC_SOURCE_DATAMINT;
		oa.project = argv[optind];
		oa.server = cr.server;
		oa.api_key = cr.api_key;
	}

	r.batch = batch;
	r.indices = calloc(batch, sizeof(*r.indices));
	r.items = calloc(batch, sizeof(*r.items));
	if (!r.indices || !r.items) {
		fprintf(stderr, "dmcache-read: out of memory\n");
		goto out;
	}
	r.t_open = now_s();
	rc = dmc_connect(socket_path, &r.c);
	if (rc < 0) {
		fprintf(stderr, "dmcache-read: cannot connect to dmcached: %s\n", dmc_strerror(rc));
		goto out;
	}
	rc = dmc_open(r.c, &oa, &r.ds);
	if (rc < 0) {
		report(r.c, "open", rc);
		goto out;
	}
	info = dmc_dataset_info(r.ds);
	r.n = info->items < limit ? info->items : limit;
	printf("%s, version %s: %" PRIu64 " items (reading %" PRIu64 "), batch %" PRIu64
	       ", arena %" PRIu64 " MiB, %s\n", info->project_name, info->version, info->items,
	       r.n, batch, info->arena_bytes >> 20,
	       stream ? (r.shuffle ? "STREAM, shuffled" : "STREAM") : "GET");

	for (uint64_t e = 0; e < epochs; e++) {
		uint64_t ep_items, ep_bytes;
		double t0 = now_s(), dt;

		rc = stream ? epoch_stream(&r, e, &ep_items, &ep_bytes) :
			      epoch_get(&r, &ep_items, &ep_bytes);
		if (rc < 0)
			goto out;
		dt = now_s() - t0;
		total_s += dt;
		total_items += ep_items;
		total_bytes += ep_bytes;
		printf("epoch %" PRIu64 ": %" PRIu64 " items in %.3f s: %.0f items/s, %.1f MB/s\n",
		       e, ep_items, dt, dt > 0 ? (double)ep_items / dt : 0.0,
		       dt > 0 ? (double)ep_bytes / dt / 1e6 : 0.0);
	}
	printf("total: %" PRIu64 " items, %.1f MB in %.3f s: %.0f items/s, %.1f MB/s; "
	       "connect + open + first batch %.1f ms (checksum %016" PRIx64 ")\n",
	       total_items, (double)total_bytes / 1e6, total_s,
	       total_s > 0 ? (double)total_items / total_s : 0.0,
	       total_s > 0 ? (double)total_bytes / total_s / 1e6 : 0.0, r.t_first * 1e3, r.sum);
	status = 0;
out:
	if (r.ds)
		dmc_dataset_close(r.ds);
	dmc_close(r.c);
	dmc_credentials_done(&cr);
	free(abs_source);
	free(r.items);
	free(r.indices);
	return status;
}
