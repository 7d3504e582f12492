/*
 * dmcache ls, evict, verify: the cache as the daemon sees it (proto.h, LIST, EVICT, VERIFY).
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pwd.h>
#include <unistd.h>

#include "cli.h"

/* Eviction and verification touch every file of the cache: no timeout (Ctrl-C stops). */
#define LONG_CALL_TIMEOUT_MS 0

static const char *source_name(uint32_t s)
{
	return s == DMC_SOURCE_DATAMINT ? "datamint" : s == DMC_SOURCE_LOCAL ? "local" : "unknown";
}

/* A local folder by its path (its name alone could be a Datamint project's), else the name. */
static const char *entry_project(const struct dmc_snapshot_entry *e)
{
	if (e->source == DMC_SOURCE_LOCAL && *e->project_id)
		return e->project_id;
	return *e->project_name ? e->project_name : e->project_id;
}

static void ls_json(const struct dmc_snapshot_list *l)
{
	json_t *a = json_array();
	char *text;

	for (uint32_t i = 0; i < l->n; i++) {
		const struct dmc_snapshot_entry *e = &l->snapshots[i];
		json_t *o = json_object();

		json_object_set_new(o, "id", json_integer((json_int_t)e->id));
		json_object_set_new(o, "source", json_string(source_name(e->source)));
		json_object_set_new(o, "server", json_string(e->server));
		json_object_set_new(o, "project_id", json_string(e->project_id));
		json_object_set_new(o, "project_name", json_string(e->project_name));
		json_object_set_new(o, "version", json_string(e->version));
		json_object_set_new(o, "items", json_integer((json_int_t)e->items));
		json_object_set_new(o, "items_stored", json_integer((json_int_t)e->items_stored));
		json_object_set_new(o, "bytes", json_integer((json_int_t)e->bytes));
		json_object_set_new(o, "bytes_stored", json_integer((json_int_t)e->bytes_stored));
		json_object_set_new(o, "owner_uid", e->owner_uid == UINT32_MAX
							    ? json_null()
							    : json_integer((json_int_t)e->owner_uid));
		json_object_set_new(o, "complete", json_boolean(e->complete));
		json_object_set_new(o, "state", json_string(e->downloading ? "downloading"
							   : e->complete ? "complete" : "partial"));
		json_object_set_new(o, "created_ms", json_integer((json_int_t)e->created_ms));
		json_array_append_new(a, o);
	}
	text = json_dumps(a, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
	if (text)
		printf("%s\n", text);
	free(text);
	json_decref(a);
}

static int max_int(int a, int b)
{
	return a > b ? a : b;
}

/* The owner's name (or uid, or "?" for snapshots of an older cache). */
static const char *owner_name(uint32_t uid, char *buf, size_t cap)
{
	struct passwd *pw;

	if (uid == UINT32_MAX)
		return "?";
	pw = getpwuid((uid_t)uid);
	if (pw && pw->pw_name)
		snprintf(buf, cap, "%s", pw->pw_name);
	else
		snprintf(buf, cap, "%u", uid);
	return buf;
}

/* SIZE is what is stored of the snapshot (upstream bytes of its stored items). An OWNER
 * column appears when the list holds other users' snapshots (admins see every one). */
static void ls_table(const struct dmc_snapshot_list *l)
{
	int wid = 2, wproj = 7, wver = 7, witems = 5, wsize = 4, wown = 5;
	bool owners = false;
	char buf[64];

	for (uint32_t i = 0; i < l->n; i++)
		if (l->snapshots[i].owner_uid != (uint32_t)getuid())
			owners = true;
	for (uint32_t i = 0; i < l->n; i++) {
		const struct dmc_snapshot_entry *e = &l->snapshots[i];

		wid = max_int(wid, snprintf(buf, sizeof(buf), "%llu", (unsigned long long)e->id));
		wproj = max_int(wproj, (int)strlen(entry_project(e)));
		wver = max_int(wver, (int)strlen(*e->version ? e->version : "-"));
		witems = max_int(witems, snprintf(buf, sizeof(buf), "%llu/%llu",
						  (unsigned long long)e->items_stored,
						  (unsigned long long)e->items));
		cli_format_bytes(buf, sizeof(buf), e->bytes_stored);
		wsize = max_int(wsize, (int)strlen(buf));
		wown = max_int(wown, (int)strlen(owner_name(e->owner_uid, buf, sizeof(buf))));
	}
	if (owners)
		printf("%-*s  ", wown, "OWNER");
	printf("%*s  %-*s  %-*s  %*s  %*s  %s\n", wid, "ID", wproj, "PROJECT", wver, "VERSION",
	       witems, "ITEMS", wsize, "SIZE", "STATE");
	for (uint32_t i = 0; i < l->n; i++) {
		const struct dmc_snapshot_entry *e = &l->snapshots[i];
		char items[64], size[32];

		snprintf(items, sizeof(items), "%llu/%llu", (unsigned long long)e->items_stored,
			 (unsigned long long)e->items);
		cli_format_bytes(size, sizeof(size), e->bytes_stored);
		if (owners)
			printf("%-*s  ", wown, owner_name(e->owner_uid, buf, sizeof(buf)));
		printf("%*llu  %-*s  %-*s  %*s  %*s  %s\n", wid, (unsigned long long)e->id, wproj,
		       entry_project(e), wver, *e->version ? e->version : "-", witems, items,
		       wsize, size, e->downloading ? "downloading" : e->complete ? "complete"
									   : "partial");
	}
}

int cmd_ls(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' },
					      { "offline", no_argument, NULL, 'O' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	struct dmc_snapshot_list *l = NULL;
	dmc_client *c;
	bool json = false;
	int opt, rc;

	optind = 0; /* 0, not 1: glibc then parses afresh (options may follow operands) */
	while ((opt = getopt_long(argc, argv, "jhO", opts, NULL)) != -1) {
		if (opt == 'j') {
			json = true;
		} else if (opt == 'O') {
			/* ls never contacts a server: accepted so that scripts may pass it */
		} else if (opt == 'h') {
			printf("Usage: dmcache ls [--json] [--offline]\n"
			       "The snapshots in the cache that you may see: your own (those your key\n"
			       "proved), or every user's with their owner for root and members of the\n"
			       "dmcache group: id, project, version, items stored/total, bytes stored,\n"
			       "complete or partial. It never contacts a server (--offline is implied).\n");
			return 0;
		} else {
			return EXIT_USAGE;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "dmcache ls: unexpected argument '%s'\n", argv[optind]);
		return EXIT_USAGE;
	}
	c = cli_connect(CLI_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_list(c, &l);
	if (rc < 0) {
		rc = cli_report(c, "ls", rc);
		dmc_close(c);
		return rc;
	}
	if (json)
		ls_json(l);
	else if (l->n == 0)
		printf("no snapshots in the cache (dmcache prefetch PROJECT adds one)\n");
	else
		ls_table(l);
	dmc_list_free(l);
	dmc_close(c);
	return 0;
}

int cmd_evict(int argc, char **argv)
{
	static const struct option opts[] = { { "all", no_argument, NULL, 'a' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	struct dmc_evict_reply r;
	const char *project = NULL;
	char freed[32];
	dmc_client *c;
	bool all = false;
	int opt, rc;

	optind = 0; /* 0, not 1: glibc then parses afresh (options may follow operands) */
	while ((opt = getopt_long(argc, argv, "ah", opts, NULL)) != -1) {
		if (opt == 'a') {
			all = true;
		} else if (opt == 'h') {
			printf("Usage: dmcache evict PROJECT | --all\n"
			       "Removes the snapshots of PROJECT (a Datamint project's name or id, or a\n"
			       "local folder's absolute path as dmcache ls shows it), or every snapshot\n"
			       "you may see, and the files no other snapshot uses.\n");
			return 0;
		} else {
			return EXIT_USAGE;
		}
	}
	if (optind < argc)
		project = argv[optind++];
	if (optind < argc || all == (project != NULL) || (project && !*project)) {
		fprintf(stderr, "dmcache evict: give either a PROJECT or --all\n");
		return EXIT_USAGE;
	}
	c = cli_connect(LONG_CALL_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_evict(c, all, project, &r);
	if (rc < 0) {
		rc = cli_report(c, "evict", rc);
		dmc_close(c);
		return rc;
	}
	dmc_close(c);
	if (r.snapshots == 0) {
		if (all)
			printf("nothing to evict: no snapshots in the cache\n");
		else
			printf("nothing to evict: no snapshot of '%s' in the cache\n", project);
		return 0;
	}
	cli_format_bytes(freed, sizeof(freed), r.bytes);
	printf("evicted %llu snapshot%s, %llu file%s, %s freed\n", (unsigned long long)r.snapshots,
	       r.snapshots == 1 ? "" : "s", (unsigned long long)r.blobs, r.blobs == 1 ? "" : "s",
	       freed);
	return 0;
}

int cmd_verify(int argc, char **argv)
{
	struct dmc_verify_reply r;
	char checked[32];
	dmc_client *c;
	int rc;

	if (argc > 1) {
		if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
			printf("Usage: dmcache verify\n"
			       "Re-checks the checksum of every file in the cache and removes bad ones\n"
			       "(they are fetched again when needed). Exit status 1 when any was bad.\n");
			return 0;
		}
		fprintf(stderr, "dmcache verify: takes no arguments\n");
		return EXIT_USAGE;
	}
	c = cli_connect(LONG_CALL_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_verify(c, &r);
	if (rc < 0) {
		rc = cli_report(c, "verify", rc);
		dmc_close(c);
		return rc;
	}
	dmc_close(c);
	cli_format_bytes(checked, sizeof(checked), r.bytes_checked);
	if (r.blobs_bad == 0) {
		printf("checked %llu file%s (%s): all good\n", (unsigned long long)r.blobs_checked,
		       r.blobs_checked == 1 ? "" : "s", checked);
		return 0;
	}
	printf("checked %llu file%s (%s): %llu bad, removed; they will be fetched again when "
	       "needed\n",
	       (unsigned long long)r.blobs_checked, r.blobs_checked == 1 ? "" : "s", checked,
	       (unsigned long long)r.blobs_bad);
	return EXIT_DAEMON_ERROR;
}
