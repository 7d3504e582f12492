/*
 * dmcache ls, evict, verify: the cache as the daemon sees it (proto.h, LIST, EVICT, VERIFY).
 * Each prints a table or a line, or with --json one JSON document on stdout.
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

static int ls_json(const struct dmc_snapshot_list *l)
{
	json_t *a = json_array();

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
	return cli_print_json(a);
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
	while ((opt = cli_getopt(argc, argv, "ls", "jhO", opts)) != -1) {
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
	if (optind < argc)
		return cli_unexpected("ls", argv[optind]);
	c = cli_connect(CLI_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_list(c, &l);
	if (rc < 0) {
		rc = cli_report(c, "ls", rc);
		dmc_close(c);
		return rc;
	}
	rc = 0;
	if (json)
		rc = ls_json(l);
	else if (l->n == 0)
		printf("no snapshots in the cache (dmcache prefetch PROJECT adds one)\n");
	else
		ls_table(l);
	dmc_list_free(l);
	dmc_close(c);
	return rc;
}

static int compare_names(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/*
 * EVICT of a name that matched nothing: the names the caller may evict, so that a typo is
 * seen at once (and an exit status that says nothing was done); or, when a job is filling
 * that snapshot (the daemon never evicts it then), how to stop the job. `o` (--json) gets them as
 * "known". Returns EXIT_DAEMON_ERROR, or what listing them returned.
 */
static int evict_nothing(dmc_client *c, const char *project, json_t *o)
{
	struct dmc_snapshot_list *l = NULL;
	const char **names = NULL, *hint;
	bool filling = false;
	size_t n = 0;
	int rc = dmc_list(c, &l);

	if (rc < 0) {
		json_decref(o);
		return cli_report(c, "evict", rc);
	}
	names = calloc(l->n ? l->n : 1, sizeof(*names));
	if (!names) {
		dmc_list_free(l);
		json_decref(o);
		return cli_no_memory("evict");
	}
	for (uint32_t i = 0; i < l->n; i++) {
		const char *name = entry_project(&l->snapshots[i]);
		bool seen = false;

		for (size_t j = 0; j < n && !seen; j++)
			seen = strcmp(names[j], name) == 0;
		if (!seen)
			names[n++] = name;
		/* the daemon leaves a snapshot a job is filling: say so, not "no snapshot" */
		if (l->snapshots[i].downloading &&
		    (strcmp(name, project) == 0 || strcmp(l->snapshots[i].project_id, project) == 0 ||
		     strcmp(l->snapshots[i].project_name, project) == 0))
			filling = true;
	}
	qsort(names, n, sizeof(*names), compare_names);
	if (o) {
		json_t *known = json_array();

		for (size_t i = 0; i < n; i++)
			json_array_append_new(known, json_string(names[i]));
		json_object_set_new(o, "known", known);
		if (cli_print_json(o) != 0) {
			free(names);
			dmc_list_free(l);
			return EXIT_LOCAL;
		}
	}
	if (filling) {
		fprintf(stderr, "dmcache evict: a prefetch is filling '%s' now; stop it first with "
				"dmcache prefetch --cancel %s\n",
			project, project);
		free(names);
		dmc_list_free(l);
		return EXIT_DAEMON_ERROR;
	}
	fprintf(stderr, "dmcache evict: no snapshot of '%s' in the cache", project);
	hint = cli_suggest(project, names, n);
	if (n == 0) {
		fprintf(stderr, "; you have no snapshots in it\n");
	} else {
		if (hint)
			fprintf(stderr, "; did you mean '%s'? The snapshots you may evict: ", hint);
		else
			fprintf(stderr, "; the snapshots you may evict: ");
		for (size_t i = 0; i < n; i++)
			fprintf(stderr, "%s%s", i ? ", " : "", names[i]);
		fprintf(stderr, "\n");
	}
	free(names);
	dmc_list_free(l);
	return EXIT_DAEMON_ERROR;
}

int cmd_evict(int argc, char **argv)
{
	static const struct option opts[] = { { "all", no_argument, NULL, 'a' },
					      { "json", no_argument, NULL, 'j' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	struct dmc_evict_reply r;
	const char *project = NULL;
	char freed[32];
	dmc_client *c;
	bool all = false, json = false;
	int opt, rc;

	optind = 0; /* 0, not 1: glibc then parses afresh (options may follow operands) */
	while ((opt = cli_getopt(argc, argv, "evict", "ajh", opts)) != -1) {
		if (opt == 'a') {
			all = true;
		} else if (opt == 'j') {
			json = true;
		} else if (opt == 'h') {
			printf("Usage: dmcache evict PROJECT | --all [--json]\n"
			       "Removes the snapshots of PROJECT (a Datamint project's name or id, or a\n"
			       "local folder's absolute path as dmcache ls shows it), or every snapshot\n"
			       "you may see, and the files no other snapshot uses. A PROJECT with no\n"
			       "snapshot is an error (exit status 1) that lists the ones you have.\n");
			return 0;
		} else {
			return EXIT_USAGE;
		}
	}
	if (optind < argc)
		project = argv[optind++];
	if (optind < argc)
		return cli_unexpected("evict", argv[optind]);
	if (all == (project != NULL) || (project && !*project)) {
		fprintf(stderr, "dmcache evict: give either a PROJECT or --all (dmcache evict "
				"--help)\n");
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
	if (json) {
		json_t *o = json_object();

		json_object_set_new(o, "snapshots", json_integer((json_int_t)r.snapshots));
		json_object_set_new(o, "files", json_integer((json_int_t)r.blobs));
		json_object_set_new(o, "bytes", json_integer((json_int_t)r.bytes));
		if (r.snapshots == 0 && !all) {
			rc = evict_nothing(c, project, o);
		} else {
			rc = cli_print_json(o);
		}
		dmc_close(c);
		return rc;
	}
	if (r.snapshots == 0) {
		if (all) {
			printf("nothing to evict: no snapshots in the cache\n");
			rc = 0;
		} else {
			rc = evict_nothing(c, project, NULL);
		}
		dmc_close(c);
		return rc;
	}
	dmc_close(c);
	cli_format_bytes(freed, sizeof(freed), r.bytes);
	printf("evicted %llu snapshot%s, %llu file%s, %s freed\n", (unsigned long long)r.snapshots,
	       r.snapshots == 1 ? "" : "s", (unsigned long long)r.blobs, r.blobs == 1 ? "" : "s",
	       freed);
	return 0;
}

int cmd_verify(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	struct dmc_verify_reply r;
	char checked[32];
	dmc_client *c;
	bool json = false;
	int opt, rc;

	optind = 0;
	while ((opt = cli_getopt(argc, argv, "verify", "jh", opts)) != -1) {
		if (opt == 'j') {
			json = true;
		} else if (opt == 'h') {
			printf("Usage: dmcache verify [--json]\n"
			       "Re-checks the checksum of every file in the cache and removes bad ones\n"
			       "(they are fetched again when needed). Exit status 1 when any was bad.\n"
			       "Admins only (root and the admin group).\n");
			return 0;
		} else {
			return EXIT_USAGE;
		}
	}
	if (optind < argc)
		return cli_unexpected("verify", argv[optind]);
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
	if (json) {
		json_t *o = json_object();

		json_object_set_new(o, "files_checked", json_integer((json_int_t)r.blobs_checked));
		json_object_set_new(o, "files_bad", json_integer((json_int_t)r.blobs_bad));
		json_object_set_new(o, "bytes_checked", json_integer((json_int_t)r.bytes_checked));
		rc = cli_print_json(o);
		return rc ? rc : r.blobs_bad ? EXIT_DAEMON_ERROR : 0;
	}
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
