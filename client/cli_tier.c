/*
 * dmcache tier ls | verify | gc: the cluster tier's administration, done by the daemon with its own
 * tier credentials (proto.h, TIER); the CLI never reads them. Admins only.
 */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"

#define TIER_CALL_TIMEOUT_MS 0 /* a gc of a large tier takes as long as it takes */

static void usage(void)
{
	printf("Usage: dmcache tier ls [--json]\n"
	       "       dmcache tier verify [--repair] [--json]\n"
	       "       dmcache tier gc [--dry-run] [--json]\n"
	       "The cluster tier shared by the node caches (tier_url), administered by the\n"
	       "daemon with its own tier credentials. Admins only (root and the admin group).\n"
	       "  ls   the tier's blobs (digest, size, last modified) and its mapping count\n"
	       "  verify  reads every blob and checks it as a node would (header, SHA-256);\n"
	       "       --repair deletes the bad ones. Exit status 1 when any was bad\n"
	       "  gc   deletes the mappings older than tier_retention, then the blobs no\n"
	       "       remaining mapping names that are older than an hour (or than\n"
	       "       tier_retention when shorter); --dry-run only says what it would delete\n");
}

/* One entry line "hex size mtime state" into its fields; false if malformed. */
static bool parse_entry(const char *line, size_t len, char *hex, uint64_t *size, int64_t *mtime,
			char state[16])
{
	char buf[200];

	if (len >= sizeof(buf))
		return false;
	memcpy(buf, line, len);
	buf[len] = '\0';
	return sscanf(buf, "%64s %" SCNu64 " %" SCNd64 " %15s", hex, size, mtime, state) == 4 &&
	       strlen(hex) == 64;
}

static void format_time(int64_t t, char *buf, size_t cap)
{
	time_t tt = (time_t)t;
	struct tm tm;

	if (gmtime_r(&tt, &tm))
		strftime(buf, cap, "%Y-%m-%d %H:%M:%SZ", &tm);
	else
		snprintf(buf, cap, "%" PRId64, t);
}

static int print_reply(const struct dmc_tier_reply *r, bool gc, bool ver, bool dry, bool json)
{
	const char *p = r->entries.ptr, *end = r->entries.ptr + r->entries.len;
	char a[32], b[32];
	json_t *o = NULL, *arr = NULL;

	if (json) {
		o = json_object();
		arr = json_array();
	} else if (!gc && !ver && r->blobs) {
		printf("%-64s %10s  %s\n", "BLOB (SHA-256)", "SIZE", "LAST MODIFIED");
	}
	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t len = nl ? (size_t)(nl - p) : (size_t)(end - p);
		char hex[65], state[16], when[40];
		uint64_t size;
		int64_t mtime;

		if (parse_entry(p, len, hex, &size, &mtime, state)) {
			if (json) {
				json_t *e = json_object();
				json_object_set_new(e, "digest", json_string(hex));
				json_object_set_new(e, "size", json_integer((json_int_t)size));
				json_object_set_new(e, "last_modified", json_integer(mtime));
				if (gc || ver)
					json_object_set_new(e, "state", json_string(state));
				json_array_append_new(arr, e);
			} else if (ver) {
				if (strcmp(state, "bad") == 0)
					printf("bad %s\n", hex);
			} else if (!gc || strcmp(state, "deleted") == 0) {
				format_time(mtime, when, sizeof(when));
				cli_format_bytes(a, sizeof(a), size);
				printf("%s%s %10s  %s\n", gc ? (dry ? "would delete " : "deleted ") : "",
				       hex, a, when);
			}
		}
		p += len + 1;
	}
	if (json) {
		json_object_set_new(o, "blobs", arr);
		json_object_set_new(o, "blob_count", json_integer((json_int_t)r->blobs));
		json_object_set_new(o, "blob_bytes", json_integer((json_int_t)r->blob_bytes));
		json_object_set_new(o, "mappings", json_integer((json_int_t)r->maps));
		if (gc) {
			json_object_set_new(o, "dry_run", json_boolean(dry));
			json_object_set_new(o, "mappings_deleted",
					    json_integer((json_int_t)r->maps_deleted));
			json_object_set_new(o, "blobs_deleted",
					    json_integer((json_int_t)r->blobs_deleted));
			json_object_set_new(o, "bytes_deleted",
					    json_integer((json_int_t)r->bytes_deleted));
		}
		if (ver) {
			json_object_set_new(o, "blobs_bad", json_integer((json_int_t)r->blobs_bad));
			json_object_set_new(o, "blobs_deleted",
					    json_integer((json_int_t)r->blobs_deleted));
		}
		json_object_set_new(o, "truncated", json_boolean(r->truncated != 0));
		int rc = cli_print_json(o);
		return rc ? rc : ver && r->blobs_bad ? EXIT_DAEMON_ERROR : 0;
	}
	if (r->truncated)
		printf("(the list is truncated; the totals cover every object)\n");
	cli_format_bytes(a, sizeof(a), r->blob_bytes);
	if (ver) {
		printf("checked %llu blob%s (%s): ", (unsigned long long)r->blobs,
		       r->blobs == 1 ? "" : "s", a);
		if (!r->blobs_bad) {
			printf("all good\n");
			return 0;
		}
		printf("%llu bad%s\n", (unsigned long long)r->blobs_bad,
		       r->blobs_deleted ? ", deleted (nodes fetch those items from Datamint)" : "");
		return EXIT_DAEMON_ERROR;
	}
	if (!gc) {
		printf("%llu blob%s (%s), %llu mapping%s\n", (unsigned long long)r->blobs,
		       r->blobs == 1 ? "" : "s", a, (unsigned long long)r->maps,
		       r->maps == 1 ? "" : "s");
		return 0;
	}
	cli_format_bytes(b, sizeof(b), r->bytes_deleted);
	printf("%s %llu mapping%s and %llu blob%s (%s); %llu blob%s (%s) and %llu mapping%s "
	       "remain\n",
	       dry ? "would delete" : "deleted", (unsigned long long)r->maps_deleted,
	       r->maps_deleted == 1 ? "" : "s", (unsigned long long)r->blobs_deleted,
	       r->blobs_deleted == 1 ? "" : "s", b, (unsigned long long)r->blobs,
	       r->blobs == 1 ? "" : "s", a, (unsigned long long)r->maps, r->maps == 1 ? "" : "s");
	return 0;
}

int cmd_tier(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' },
					      { "dry-run", no_argument, NULL, 'n' },
					      { "repair", no_argument, NULL, 'r' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	struct dmc_tier_reply r;
	dmc_client *c;
	bool json = false, dry = false, repair = false, gc, ver;
	const char *sub;
	int opt, rc;

	optind = 0;
	while ((opt = cli_getopt(argc, argv, "tier", "jnrh", opts)) != -1) {
		if (opt == 'j') {
			json = true;
		} else if (opt == 'r') {
			repair = true;
		} else if (opt == 'n') {
			dry = true;
		} else if (opt == 'h') {
			usage();
			return 0;
		} else {
			return EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		fprintf(stderr, "dmcache tier: which? ls, verify or gc (dmcache tier --help)\n");
		return EXIT_USAGE;
	}
	sub = argv[optind++];
	if (strcmp(sub, "ls") != 0 && strcmp(sub, "gc") != 0 && strcmp(sub, "verify") != 0) {
		fprintf(stderr, "dmcache tier: unknown '%s': ls, verify or gc (dmcache tier --help)\n",
			sub);
		return EXIT_USAGE;
	}
	gc = strcmp(sub, "gc") == 0;
	ver = strcmp(sub, "verify") == 0;
	if (optind < argc)
		return cli_unexpected("tier", argv[optind]);
	if ((dry && !gc) || (repair && !ver)) {
		fprintf(stderr, "dmcache tier %s: %s is for %s\n", sub, dry ? "--dry-run" : "--repair",
			dry ? "gc" : "verify");
		return EXIT_USAGE;
	}
	c = cli_connect(TIER_CALL_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_tier(c, gc ? DMC_TIER_GC : ver ? DMC_TIER_VERIFY : DMC_TIER_LS,
		      (dry ? DMC_TIER_DRY_RUN : 0) | (repair ? DMC_TIER_REPAIR : 0), &r);
	if (rc < 0) {
		rc = cli_report(c, gc ? "tier gc" : ver ? "tier verify" : "tier ls", rc);
		dmc_close(c);
		return rc;
	}
	rc = print_reply(&r, gc, ver, dry, json);
	dmc_close(c);
	return rc;
}
