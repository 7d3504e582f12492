/*
 * dmcache get: one decoded item as a .npy file (and its metadata as JSON beside it), so
 * that anyone can check what the daemon serves with numpy.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "npy.h"

static void get_usage(FILE *out)
{
	fprintf(out,
		"Usage: dmcache get PROJECT INDEX -o OUT.npy [--meta OUT.json] [--version V]\n"
		"                   [--server URL] [--api-key KEY] [--lut] [--dtype TYPE] [--json]\n"
		"                   [--size HxW [--resize MODE] | --crop HxW | --pad HxW]\n"
		"                   [--pad-value V] [--channels 1|3] [--window C,W]\n"
		"       dmcache get --source DIR INDEX -o OUT.npy [...]\n"
		"Writes item INDEX of a dataset, decoded by dmcached, as a NumPy .npy file of shape\n"
		"(frames, channels, height, width), and its metadata (the resource record and the\n"
		"DICOM header) as JSON beside it (OUT.json unless --meta says otherwise).\n\n"
		"  --lut            apply the modality LUT (DICOM rescale, NIfTI scaling): float32\n"
		"  --dtype TYPE     output dtype: uint8, int16, uint16, float32, float64, float16, ...\n"
		"  The daemon's uniformity policy (as dmcache.Loader's; proto.h has the rules):\n"
		"  --size HxW       resize to H rows, W columns; --resize bilinear (default), area\n"
		"                   or nearest\n"
		"  --crop HxW       the centered HxW window (padded with --pad-value if smaller)\n"
		"  --pad HxW        the image at the top-left of an HxW canvas of --pad-value (0)\n"
		"  --channels N     1 (luma of RGB) or 3 (gray repeated)\n"
		"  --window C,W     CT window: modality LUT, then clip((x - C + W/2) / W, 0, 1)\n"
		"  --source DIR     a local dataset folder instead of Datamint\n"
		"  --offline        do not contact the server: read the newest complete snapshot\n"
		"                   you were entitled to within grant_ttl (also DMCACHE_OFFLINE=1)\n"
		"  --json           print what was written (files, dtype, shape) as JSON\n");
}

static int write_file(const char *path, const void *data, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	const char *p = data;

	if (fd < 0)
		return -errno;
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			int e = n < 0 ? -errno : -EIO;
			close(fd);
			return e;
		}
		p += n;
		len -= (size_t)n;
	}
	return close(fd) == 0 ? 0 : -errno;
}

/* "HxW" with both 1 .. DMC_POLICY_DIM_MAX. */
static bool parse_hw(const char *s, uint32_t *h, uint32_t *w)
{
	char *end;
	unsigned long a, b;

	errno = 0;
	a = strtoul(s, &end, 10);
	if (errno || end == s || (*end != 'x' && *end != 'X') || s[0] == '-')
		return false;
	s = end + 1;
	b = strtoul(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-' || a < 1 || b < 1 ||
	    a > DMC_POLICY_DIM_MAX || b > DMC_POLICY_DIM_MAX)
		return false;
	*h = (uint32_t)a;
	*w = (uint32_t)b;
	return true;
}

static bool parse_double(const char *s, char stop, double *v, const char **rest)
{
	char *end;

	errno = 0;
	*v = strtod(s, &end);
	if (errno || end == s || *end != stop || !isfinite(*v))
		return false;
	if (rest)
		*rest = end + (stop ? 1 : 0);
	return true;
}

/* The policy options; 0, or EXIT_USAGE after a message. */
static int policy_option(struct dmc_policy *p, int opt, const char *arg)
{
	static const char *const resizes[] = { NULL, "bilinear", "nearest", "area" };
	const char *rest;
	uint32_t geo = 0;

	switch (opt) {
	case 's': geo = DMC_POLICY_SIZE; break;
	case 'c': geo = DMC_POLICY_CROP; break;
	case 'p': geo = DMC_POLICY_PAD; break;
	case 'r':
		for (uint32_t i = 1; i < sizeof(resizes) / sizeof(resizes[0]); i++)
			if (strcmp(arg, resizes[i]) == 0)
				p->resize = i;
		if (!p->resize)
			goto bad;
		return 0;
	case 'v':
		if (!parse_double(arg, '\0', &p->pad_value, NULL))
			goto bad;
		return 0;
	case 'n':
		if (strcmp(arg, "1") != 0 && strcmp(arg, "3") != 0)
			goto bad;
		p->ops |= DMC_POLICY_CHANNELS;
		p->channels = (uint32_t)(arg[0] - '0');
		return 0;
	case 'w':
		if (!parse_double(arg, ',', &p->window_center, &rest) ||
		    !parse_double(rest, '\0', &p->window_width, NULL) || !(p->window_width > 0))
			goto bad;
		p->ops |= DMC_POLICY_WINDOW;
		return 0;
	}
	if ((p->ops & DMC_POLICY_GEOMETRY) && !(p->ops & geo)) {
		fprintf(stderr, "dmcache get: --size, --crop and --pad exclude each other\n");
		return EXIT_USAGE;
	}
	if (!parse_hw(arg, &p->height, &p->width))
		goto bad;
	p->ops |= geo;
	return 0;
bad:
	fprintf(stderr, "dmcache get: bad value '%s' (see dmcache get --help)\n", arg);
	return EXIT_USAGE;
}

static uint32_t dtype_from_name(const char *name)
{
	for (uint32_t t = 1; t <= DMC_DTYPE_LAST_; t++)
		if (strcmp(dmc_dtype_name(t), name) == 0)
			return t;
	return 0;
}

int cmd_get(int argc, char **argv)
{
	enum { OPT_META = 256, OPT_VERSION, OPT_SERVER, OPT_KEY, OPT_LUT, OPT_DTYPE, OPT_SOURCE,
	       OPT_OFFLINE, OPT_JSON, OPT_SIZE, OPT_RESIZE, OPT_CROP, OPT_PAD, OPT_PAD_VALUE,
	       OPT_CHANNELS, OPT_WINDOW };
	static const struct option opts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "meta", required_argument, NULL, OPT_META },
		{ "version", required_argument, NULL, OPT_VERSION },
		{ "server", required_argument, NULL, OPT_SERVER },
		{ "api-key", required_argument, NULL, OPT_KEY },
		{ "lut", no_argument, NULL, OPT_LUT },
		{ "dtype", required_argument, NULL, OPT_DTYPE },
		{ "source", required_argument, NULL, OPT_SOURCE },
		{ "offline", no_argument, NULL, OPT_OFFLINE },
		{ "json", no_argument, NULL, OPT_JSON },
		{ "size", required_argument, NULL, OPT_SIZE },
		{ "resize", required_argument, NULL, OPT_RESIZE },
		{ "crop", required_argument, NULL, OPT_CROP },
		{ "pad", required_argument, NULL, OPT_PAD },
		{ "pad-value", required_argument, NULL, OPT_PAD_VALUE },
		{ "channels", required_argument, NULL, OPT_CHANNELS },
		{ "window", required_argument, NULL, OPT_WINDOW },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct dmc_open_args oa = { 0 };
	struct dmc_policy pol = { 0 };
	struct dmc_credentials cr = { 0 };
	const char *out = NULL, *meta_out = NULL, *source = NULL, *server = NULL, *key = NULL;
	char *meta_path = NULL, *abs_source = NULL, *end, err[512];
	struct dmc_item item;
	dmc_dataset *ds = NULL;
	dmc_client *c;
	uint64_t index;
	int opt, rc, status = 0;
	bool json = false;
	const char *descr;

	optind = 0; /* 0, not 1: glibc then parses afresh (options may follow operands) */
	while ((opt = cli_getopt(argc, argv, "get", "o:h", opts)) != -1) {
		switch (opt) {
		case 'o': out = optarg; break;
		case OPT_META: meta_out = optarg; break;
		case OPT_VERSION: oa.version = optarg; break;
		case OPT_SERVER: server = optarg; break;
		case OPT_KEY: key = optarg; break;
		case OPT_LUT: oa.flags |= DMC_OPEN_LUT; break;
		case OPT_SOURCE: source = optarg; break;
		case OPT_OFFLINE: oa.flags |= DMC_OPEN_OFFLINE; break;
		case OPT_JSON: json = true; break;
		case OPT_DTYPE:
			oa.dtype = dtype_from_name(optarg);
			if (!oa.dtype) {
				fprintf(stderr, "dmcache get: unknown dtype '%s'\n", optarg);
				return EXIT_USAGE;
			}
			if (oa.dtype == DMC_DTYPE_BF16) {
				fprintf(stderr, "dmcache get: bfloat16 has no .npy dtype: use float16 "
						"or float32\n");
				return EXIT_USAGE;
			}
			break;
		case OPT_SIZE: case OPT_RESIZE: case OPT_CROP: case OPT_PAD: case OPT_PAD_VALUE:
		case OPT_CHANNELS: case OPT_WINDOW:
			rc = policy_option(&pol, "srcpvnw"[opt - OPT_SIZE], optarg);
			if (rc)
				return rc;
			break;
		case 'h':
			get_usage(stdout);
			return 0;
		default:
			return EXIT_USAGE;
		}
	}
	if (cli_offline_env())
		oa.flags |= DMC_OPEN_OFFLINE;
	if (argc - optind > (source ? 1 : 2))
		return cli_unexpected("get", argv[optind + (source ? 1 : 2)]);
	/* --resize and --pad-value only with what they qualify; bilinear by default */
	if (pol.ops & DMC_POLICY_SIZE) {
		if (!pol.resize)
			pol.resize = DMC_RESIZE_BILINEAR;
	} else if (pol.resize) {
		fprintf(stderr, "dmcache get: --resize goes with --size\n");
		return EXIT_USAGE;
	}
	if (!(pol.ops & (DMC_POLICY_CROP | DMC_POLICY_PAD)) && pol.pad_value != 0.0) {
		fprintf(stderr, "dmcache get: --pad-value goes with --crop or --pad\n");
		return EXIT_USAGE;
	}
	pol.pad_value += 0.0; /* -0.0 is 0 */
	if (argc - optind != (source ? 1 : 2) || !out) {
		get_usage(stderr);
		return EXIT_USAGE;
	}
	errno = 0;
	index = strtoull(argv[argc - 1], &end, 10);
	if (errno || *end || argv[argc - 1][0] == '-') {
		fprintf(stderr, "dmcache get: '%s' is not an item index\n", argv[argc - 1]);
		return EXIT_USAGE;
	}
	if (source) {
		abs_source = realpath(source, NULL);
		if (!abs_source) {
			fprintf(stderr, "dmcache get: --source '%s': %s\n", source, strerror(errno));
			return EXIT_USAGE;
		}
		oa.source = DMC_SOURCE_LOCAL;
		oa.project = abs_source;
	} else {
		if (dmc_credentials_load(key, server, &cr, err, sizeof(err)) < 0) {
			fprintf(stderr, "dmcache get: %s\n", err);
			return EXIT_USAGE;
		}
		if (!cr.api_key && !(oa.flags & DMC_OPEN_OFFLINE)) {
			rc = cli_no_key("get", cr.file);
			dmc_credentials_done(&cr);
			return rc;
		}
		oa.source = DMC_SOURCE_DATAMINT;
		oa.project = argv[optind];
		oa.server = cr.server;
		oa.api_key = cr.api_key;
	}
	if (!meta_out) {
		size_t n = strlen(out);
		meta_path = malloc(n + 6);
		if (!meta_path) {
			status = cli_no_memory("get");
			goto out;
		}
		memcpy(meta_path, out, n + 1);
		if (n > 4 && strcmp(out + n - 4, ".npy") == 0)
			n -= 4;
		memcpy(meta_path + n, ".json", 6); /* sized above */
		meta_out = meta_path;
	}
	c = cli_connect(0);
	if (!c) {
		status = EXIT_UNREACHABLE;
		goto out;
	}
	/* the arena only needs to hold this one item */
	rc = dmc_open_policy(c, &oa, &pol, &ds);
	if (rc < 0) {
		status = cli_report(c, "open", rc);
		goto out_client;
	}
	if (index >= dmc_dataset_info(ds)->items) {
		fprintf(stderr, "dmcache get: index %llu is out of range: the dataset has %llu items\n",
			(unsigned long long)index, (unsigned long long)dmc_dataset_info(ds)->items);
		status = EXIT_USAGE;
		goto out_ds;
	}
	rc = dmc_get(ds, &index, 1, &item);
	if (rc < 0) {
		status = cli_report(c, "get", rc);
		goto out_ds;
	}
	if (item.status) {
		fprintf(stderr, "dmcache get: item %llu: %s (%s)\n", (unsigned long long)index,
			item.message, dmc_error_name((uint32_t)-item.status));
		status = EXIT_DAEMON_ERROR;
		goto out_ds;
	}
	descr = npy_descr(dmc_dtype_name(item.dtype));
	{
		int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		rc = fd < 0 ? -errno : npy_write_fd(fd, descr, item.shape, 4, item.data, item.nbytes);
		if (fd >= 0 && close(fd) != 0 && rc == 0)
			rc = -errno;
	}
	if (rc < 0) {
		status = cli_write_failed("get", out, -rc);
	} else if ((rc = write_file(meta_out, item.meta, item.meta_len)) < 0) {
		status = cli_write_failed("get", meta_out, -rc);
	} else if (json) {
		json_t *o = json_object(), *shape = json_array();

		for (int i = 0; i < 4; i++)
			json_array_append_new(shape, json_integer((json_int_t)item.shape[i]));
		json_object_set_new(o, "output", json_string(out));
		json_object_set_new(o, "metadata", json_string(meta_out));
		json_object_set_new(o, "project", json_string(dmc_dataset_info(ds)->project_name));
		json_object_set_new(o, "index", json_integer((json_int_t)index));
		json_object_set_new(o, "dtype", json_string(dmc_dtype_name(item.dtype)));
		json_object_set_new(o, "shape", shape);
		json_object_set_new(o, "nbytes", json_integer((json_int_t)item.nbytes));
		status = cli_print_json(o);
	} else {
		printf("%s: %s (%llu, %llu, %llu, %llu), %s; metadata %s\n", out,
		       dmc_dtype_name(item.dtype), (unsigned long long)item.shape[0],
		       (unsigned long long)item.shape[1], (unsigned long long)item.shape[2],
		       (unsigned long long)item.shape[3], dmc_dataset_info(ds)->project_name,
		       meta_out);
	}
	dmc_release(c, &item, 1);
out_ds:
	dmc_dataset_close(ds);
out_client:
	dmc_close(c);
out:
	dmc_credentials_done(&cr);
	free(meta_path);
	free(abs_source);
	return status;
}
