/*
 * dmcache-read: an example of libdmcache's reading API (dmc_open, dmc_get, dmc_release).
 *
 * Opens a dataset version, reads every item in batches for a number of epochs, touches
 * every byte of every tensor (as a training loop copying it to a GPU would), gives the
 * space back, and prints items/s and MB/s per epoch. Uses only <dmcache.h>:
 *
 *     cc dmcache-read.c $(pkg-config --cflags --libs libdmcache) -o dmcache-read
 *     dmcache-read --source ~/datasets/ct --epochs 3 --batch 32
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

int main(int argc, char **argv)
{
	enum { OPT_EPOCHS = 256, OPT_BATCH, OPT_LIMIT, OPT_ARENA, OPT_SOCKET, OPT_VERSION,
	       OPT_SERVER, OPT_KEY, OPT_SOURCE };
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
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	uint64_t epochs = 1, batch = BATCH_DEFAULT, limit = UINT64_MAX, arena = 0;
	const char *socket_path = NULL, *server = NULL, *key = NULL, *source = NULL;
	struct dmc_open_args oa = { 0 };
	struct dmc_credentials cr = { 0 };
	const struct dmc_dataset_info *info;
	struct dmc_item *items = NULL;
	uint64_t *indices = NULL, n, sum = 0, total_items = 0, total_bytes = 0;
	double t_open, t_first = 0, total_s = 0;
	dmc_dataset *ds = NULL;
	dmc_client *c = NULL;
	char *abs_source = NULL, err[512];
	int opt, rc, status = 1;
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

	indices = calloc(batch, sizeof(*indices));
	items = calloc(batch, sizeof(*items));
	if (!indices || !items) {
		fprintf(stderr, "dmcache-read: out of memory\n");
		goto out;
	}
	t_open = now_s();
	rc = dmc_connect(socket_path, &c);
	if (rc < 0) {
		fprintf(stderr, "dmcache-read: cannot connect to dmcached: %s\n", dmc_strerror(rc));
		goto out;
	}
	rc = dmc_open(c, &oa, &ds);
	if (rc < 0) {
		report(c, "open", rc);
		goto out;
	}
	info = dmc_dataset_info(ds);
	n = info->items < limit ? info->items : limit;
	printf("%s, version %s: %" PRIu64 " items (reading %" PRIu64 "), batch %" PRIu64
	       ", arena %" PRIu64 " MiB\n", info->project_name, info->version, info->items, n,
	       batch, info->arena_bytes >> 20);

	for (uint64_t e = 0; e < epochs; e++) {
		uint64_t ep_bytes = 0;
		double t0 = now_s(), dt;

		for (uint64_t first = 0; first < n; first += batch) {
			uint32_t k = (uint32_t)(n - first < batch ? n - first : batch);

			for (uint32_t i = 0; i < k; i++)
				indices[i] = first + i;
			rc = dmc_get(ds, indices, k, items);
			if (rc < 0) {
				report(c, "get", rc);
				goto out;
			}
			if (e == 0 && first == 0)
				t_first = now_s() - t_open;
			for (uint32_t i = 0; i < k; i++) {
				if (items[i].status) {
					fprintf(stderr, "dmcache-read: item %" PRIu64 ": %s (%s)\n",
						items[i].index, items[i].message,
						dmc_error_name((uint32_t)-items[i].status));
					dmc_release(c, items, k);
					goto out;
				}
				sum += touch(items[i].data, items[i].nbytes);
				ep_bytes += items[i].nbytes;
			}
			rc = dmc_release(c, items, k);
			if (rc < 0) {
				report(c, "release", rc);
				goto out;
			}
		}
		dt = now_s() - t0;
		total_s += dt;
		total_items += n;
		total_bytes += ep_bytes;
		printf("epoch %" PRIu64 ": %" PRIu64 " items in %.3f s: %.0f items/s, %.1f MB/s\n",
		       e, n, dt, dt > 0 ? (double)n / dt : 0.0,
		       dt > 0 ? (double)ep_bytes / dt / 1e6 : 0.0);
	}
	printf("total: %" PRIu64 " items, %.1f MB in %.3f s: %.0f items/s, %.1f MB/s; "
	       "connect + open + first batch %.1f ms (checksum %016" PRIx64 ")\n",
	       total_items, (double)total_bytes / 1e6, total_s,
	       total_s > 0 ? (double)total_items / total_s : 0.0,
	       total_s > 0 ? (double)total_bytes / total_s / 1e6 : 0.0, t_first * 1e3, sum);
	status = 0;
out:
	if (ds)
		dmc_dataset_close(ds);
	dmc_close(c);
	dmc_credentials_done(&cr);
	free(abs_source);
	free(items);
	free(indices);
	return status;
}
