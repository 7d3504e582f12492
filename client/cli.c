/*
 * dmcache: the command-line tool of dmcached, over libdmcache.
 *
 * This file: main(), the shared helpers of cli.h, and the status and ping commands.
 * Exit status: see cli.h.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"

const char *cli_socket;

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: dmcache [--socket PATH] COMMAND [ARGS]\n"
		"Talks to dmcached, the dmcache daemon.\n\n"
		"Commands:\n"
		"  status [--json]     the daemon's version, uptime and counters\n"
		"  ping [--json]       check that the daemon answers\n"
		"  prefetch PROJECT [--version V] [--server URL] [--api-key KEY] [--json]\n"
		"  prefetch --source DIR [--json]\n"
		"                      bring a Datamint project (or a local dataset directory)\n"
		"                      into the cache, with progress; Ctrl-C detaches\n"
		"  prefetch --cancel PROJECT | --cancel --source DIR [--json]\n"
		"                      stop a running prefetch\n"
		"  ls [--json]         the snapshots in the cache\n"
		"  evict PROJECT | --all [--json]\n"
		"                      remove snapshots and the files only they use\n"
		"  verify [--json]     re-check every cached file's checksum, remove bad ones\n"
		"  tier ls [--json]    the cluster tier's blobs and mappings (admins)\n"
		"  tier verify [--repair] [--json]\n"
		"                      check every blob of the tier, delete bad ones (admins)\n"
		"  tier gc [--dry-run] [--json]\n"
		"                      delete expired mappings and unreferenced blobs (admins)\n"
		"  get PROJECT INDEX -o OUT.npy [--lut] [--dtype T] [--json]\n"
		"  get --source DIR INDEX -o OUT.npy [...]\n"
		"                      one decoded item as .npy, its metadata as JSON beside it\n"
		"  metrics [-o FILE]   the daemon's figures in the Prometheus text format\n"
		"  COMMAND --help      that command's options\n\n"
		"Options:\n"
		"  -s, --socket PATH   the daemon's socket (default: $DMCACHE_SOCKET, else\n"
		"                      " DMC_SOCKET_SYSTEM ", else\n"
		"                      $XDG_RUNTIME_DIR/dmcache/dmcached.sock)\n"
		"  -V, --version       print the version and exit\n"
		"  -h, --help          print this help and exit\n\n"
		"The Datamint API key and server URL come from --api-key/--server, else\n"
		"DATAMINT_API_KEY/DATAMINT_API_URL, else ~/.config/datamintapi/datamintapi.yaml\n"
		"(as datamint-config writes it; mode 0600), else the URL " DMC_DATAMINT_DEFAULT_URL "\n\n"
		"Every command that prints data takes --json (metrics: the Prometheus format).\n\n"
		"Exit status: 0 success, 1 the daemon reported an error, items failed, or there\n"
		"was nothing of that name, 2 usage or configuration error, 3 the daemon could\n"
		"not be reached, 4 a local error (an output could not be written),\n"
		"130 prefetch detached with Ctrl-C (the daemon goes on).\n");
}

/* Optimal string alignment distance (edits, and swaps of two neighbours), capped at 9. */
static size_t typo_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b), d[3][65];

	if (la > 63 || lb > 63)
		return 9;
	for (size_t j = 0; j <= lb; j++)
		d[0][j] = j;
	for (size_t i = 1; i <= la; i++) {
		size_t *cur = d[i % 3], *prev = d[(i + 2) % 3], *prev2 = d[(i + 1) % 3];

		cur[0] = i;
		for (size_t j = 1; j <= lb; j++) {
			size_t cost = a[i - 1] != b[j - 1], v = prev[j] + 1;

			if (cur[j - 1] + 1 < v)
				v = cur[j - 1] + 1;
			if (prev[j - 1] + cost < v)
				v = prev[j - 1] + cost;
			if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
			    prev2[j - 2] + 1 < v)
				v = prev2[j - 2] + 1;
			cur[j] = v;
		}
	}
	return d[la % 3][lb] > 9 ? 9 : d[la % 3][lb];
}

const char *cli_suggest(const char *word, const char *const *names, size_t n)
{
	const char *best = NULL;
	size_t best_d = 9;

	for (size_t i = 0; i < n; i++) {
		size_t d = typo_distance(word, names[i]);
		size_t len = strlen(names[i]);

		/* one typo for short names, two for longer ones; never most of the word */
		if (d <= (len <= 4 ? 1u : 2u) && d < len && d < best_d) {
			best = names[i];
			best_d = d;
		}
	}
	return best;
}

/* "dmcache prefetch" or "dmcache" */
static void print_prog(const char *cmd)
{
	fprintf(stderr, "dmcache%s%s: ", cmd ? " " : "", cmd ? cmd : "");
}

static void unknown_option(const char *cmd, const char *arg, const struct option *opts)
{
	const char *names[64];
	char word[64];
	size_t n = 0, len;
	const char *hint;

	if (arg[0] == '-' && arg[1] == '-') {
		len = strcspn(arg + 2, "=");
		snprintf(word, sizeof(word), "%.*s", (int)(len < 63 ? len : 63), arg + 2);
		for (const struct option *o = opts; o->name && n < 64; o++)
			names[n++] = o->name;
		hint = cli_suggest(word, names, n);
		print_prog(cmd);
		fprintf(stderr, "unknown option '--%s'", word);
		if (hint)
			fprintf(stderr, "; did you mean '--%s'?", hint);
		else if (cmd && strcmp(word, "socket") == 0)
			fprintf(stderr, "; --socket goes before the command: dmcache --socket PATH %s",
				cmd);
	} else {
		print_prog(cmd);
		fprintf(stderr, "unknown option '-%c'", optopt ? optopt : '?');
	}
	if (cmd)
		fprintf(stderr, " (dmcache %s --help lists the options)\n", cmd);
	else
		fprintf(stderr, " (dmcache --help lists the options)\n");
}

int cli_getopt(int argc, char **argv, const char *cmd, const char *shortopts,
	       const struct option *opts)
{
	char spec[64];
	int opt;

	/* ':' first (after a '+'): a missing value returns ':' instead of a message */
	if (shortopts[0] == '+')
		snprintf(spec, sizeof(spec), "+:%s", shortopts + 1);
	else
		snprintf(spec, sizeof(spec), ":%s", shortopts);
	opterr = 0;
	optopt = 0;
	opt = getopt_long(argc, argv, spec, opts, NULL);
	if (opt == ':') {
		const char *arg = optind > 0 && optind <= argc ? argv[optind - 1] : "?";

		print_prog(cmd);
		if (arg[0] == '-' && arg[1] == '-')
			fprintf(stderr, "option '%.*s' needs a value\n", (int)strcspn(arg, "="), arg);
		else
			fprintf(stderr, "option '-%c' needs a value\n", optopt);
		return '?';
	}
	if (opt == '?') {
		/* a long option: glibc has stepped over it; a short one may sit in a cluster */
		const char *arg = optopt == 0 && optind > 0 && optind <= argc ? argv[optind - 1]
									  : "-";
		unknown_option(cmd, optopt == 0 ? arg : "-", opts);
		return '?';
	}
	return opt;
}

int cli_unexpected(const char *cmd, const char *arg)
{
	fprintf(stderr, "dmcache %s: unexpected argument '%s' (dmcache %s --help)\n", cmd, arg,
		cmd);
	return EXIT_USAGE;
}

int cli_no_key(const char *cmd, const char *file)
{
	fprintf(stderr, "dmcache %s: no Datamint API key: set DATAMINT_API_KEY, or save it with "
			"datamint-config (%s), or pass --api-key\n",
		cmd, file ? file : "~/.config/datamintapi/datamintapi.yaml");
	return EXIT_USAGE;
}

int cli_write_failed(const char *cmd, const char *path, int err)
{
	fprintf(stderr, "dmcache %s: cannot write '%s': %s\n", cmd, path, strerror(err));
	return EXIT_LOCAL;
}

int cli_no_memory(const char *cmd)
{
	fprintf(stderr, "dmcache %s: out of memory\n", cmd);
	return EXIT_LOCAL;
}

int cli_print_json(json_t *o)
{
	char *text = o ? json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER) : NULL;

	json_decref(o);
	if (!text)
		return cli_no_memory("--json");
	printf("%s\n", text);
	free(text);
	return 0;
}

dmc_client *cli_connect(uint32_t timeout_ms)
{
	char cands[DMC_SOCKET_CANDIDATES_MAX][DMC_SOCKET_PATH_MAX];
	dmc_client *c = NULL;
	int rc = dmc_connect(cli_socket, &c);

	if (rc == 0) {
		dmc_set_timeout(c, timeout_ms);
		return c;
	}
	if (rc == -ENOENT || rc == -ECONNREFUSED) {
		char tried[3 * DMC_SOCKET_PATH_MAX + 8] = "";
		int n;

		if (cli_socket) {
			snprintf(tried, sizeof(tried), "%s", cli_socket);
		} else {
			n = dmc_socket_candidates(cands);
			for (int i = 0; i < n; i++) {
				size_t l = strlen(tried);
				snprintf(tried + l, sizeof(tried) - l, "%s%s", i ? ", " : "",
					 cands[i]);
			}
		}
		fprintf(stderr, "dmcache: cannot reach the daemon (%s): is dmcached running? "
				"tried %s\n",
			dmc_strerror(rc), tried);
	} else if (rc == -EPERM) {
		fprintf(stderr, "dmcache: %s: the daemon's uid is neither root, yours, nor the "
				"dmcache user's; not talking to it\n",
			dmc_strerror(rc));
	} else {
		fprintf(stderr, "dmcache: cannot connect to the daemon: %s\n", dmc_strerror(rc));
	}
	return NULL;
}

bool cli_offline_env(void)
{
	const char *v = getenv("DMCACHE_OFFLINE");

	return v && (strcmp(v, "1") == 0 || strcasecmp(v, "yes") == 0 ||
		     strcasecmp(v, "true") == 0);
}

int cli_report(dmc_client *c, const char *what, int rc)
{
	const struct dmc_error_info *e = dmc_last_error(c);

	if (rc <= -DMC_E_FIRST_ && e->code) {
		fprintf(stderr, "dmcache: %s: %s (%s", what, e->message, dmc_error_name(e->code));
		if (e->http_status)
			fprintf(stderr, ", HTTP %u", e->http_status);
		if (e->retry_after_ms)
			fprintf(stderr, ", retry after %u.%03u s", e->retry_after_ms / 1000,
				e->retry_after_ms % 1000);
		if (e->sys_errno)
			fprintf(stderr, ", %s", strerror(e->sys_errno));
		fprintf(stderr, ")%s%s\n", *e->resource ? ", resource " : "", e->resource);
		return EXIT_DAEMON_ERROR;
	}
	if (rc == -EINVAL && *e->message) { /* the library refused the arguments */
		fprintf(stderr, "dmcache: %s: %s\n", what, e->message);
		return EXIT_USAGE;
	}
	if (rc == -ENOMEM) { /* the library's own allocation: a local error */
		fprintf(stderr, "dmcache: %s: %s\n", what, dmc_strerror(rc));
		return EXIT_LOCAL;
	}
	fprintf(stderr, "dmcache: %s: %s\n", what, dmc_strerror(rc));
	return EXIT_UNREACHABLE;
}

int64_t cli_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void cli_format_bytes(char *buf, size_t len, uint64_t bytes)
{
	static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
	double v = (double)bytes;
	size_t u = 0;

	if (bytes < 1024) {
		snprintf(buf, len, "%llu B", (unsigned long long)bytes);
		return;
	}
	v /= 1024;
	while (v >= 1023.95 && u + 1 < sizeof(units) / sizeof(units[0])) {
		v /= 1024;
		u++;
	}
	snprintf(buf, len, "%.1f %s", v, units[u]);
}

void cli_format_seconds(char *buf, size_t len, uint64_t ms)
{
	unsigned long long s = (ms + 500) / 1000;

	if (s >= 86400)
		snprintf(buf, len, "%llud %lluh", s / 86400, s % 86400 / 3600);
	else if (s >= 3600)
		snprintf(buf, len, "%lluh %02llum", s / 3600, s % 3600 / 60);
	else if (s >= 60)
		snprintf(buf, len, "%llum %02llus", s / 60, s % 60);
	else
		snprintf(buf, len, "%llus", s);
}

static void print_duration(uint64_t ms)
{
	uint64_t s = ms / 1000;

	if (s >= 86400)
		printf("%llud %lluh", (unsigned long long)(s / 86400),
		       (unsigned long long)(s % 86400 / 3600));
	else if (s >= 3600)
		printf("%lluh %llum", (unsigned long long)(s / 3600),
		       (unsigned long long)(s % 3600 / 60));
	else if (s >= 60)
		printf("%llum %llus", (unsigned long long)(s / 60), (unsigned long long)(s % 60));
	else
		printf("%llu.%03llus", (unsigned long long)s, (unsigned long long)(ms % 1000));
}

static int cmd_status(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	struct dmc_status_info *s = NULL;
	dmc_client *c;
	int json = 0, opt, rc;

	optind = 0; /* 0, not 1: glibc then parses afresh (options may follow operands) */
	while ((opt = cli_getopt(argc, argv, "status", "jh", opts)) != -1) {
		if (opt == 'j')
			json = 1;
		else if (opt == 'h') {
			printf("Usage: dmcache status [--json]\n"
			       "The daemon's version, uptime and counters (yours; every user's for\n"
			       "admins). --json: one JSON object.\n");
			return 0;
		} else
			return EXIT_USAGE;
	}
	if (optind < argc)
		return cli_unexpected("status", argv[optind]);
	c = cli_connect(CLI_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_status(c, &s);
	if (rc < 0) {
		rc = cli_report(c, "status", rc);
		dmc_close(c);
		return rc;
	}
	if (json) {
		json_t *o = json_object(), *counters = json_object();

		json_object_set_new(o, "socket", json_string(dmc_socket_path(c)));
		json_object_set_new(o, "daemon", json_string(dmc_daemon_version(c)));
		json_object_set_new(o, "version", json_string(s->version));
		json_object_set_new(o, "protocol", json_integer(dmc_protocol_version(c)));
		json_object_set_new(o, "pid", json_integer(s->pid));
		json_object_set_new(o, "uptime_ms", json_integer((json_int_t)s->uptime_ms));
		for (uint32_t i = 0; i < s->n_counters; i++)
			json_object_set_new(counters, s->counters[i].name,
					    json_integer(s->counters[i].value));
		json_object_set_new(o, "counters", counters);
		rc = cli_print_json(o);
	} else {
		printf("%s (pid %u), protocol %u, up ", dmc_daemon_version(c), s->pid,
		       dmc_protocol_version(c));
		print_duration(s->uptime_ms);
		printf("\nsocket: %s\n", dmc_socket_path(c));
		for (uint32_t i = 0; i < s->n_counters; i++)
			if (strncmp(s->counters[i].name, "histogram/", 10) != 0) /* see metrics */
				printf("  %-32s %lld\n", s->counters[i].name,
				       (long long)s->counters[i].value);
	}
	dmc_status_free(s);
	dmc_close(c);
	return rc;
}

static int cmd_ping(int argc, char **argv)
{
	static const struct option opts[] = { { "json", no_argument, NULL, 'j' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	dmc_client *c;
	int json = 0, opt, rc;

	optind = 0;
	while ((opt = cli_getopt(argc, argv, "ping", "jh", opts)) != -1) {
		if (opt == 'j')
			json = 1;
		else if (opt == 'h') {
			printf("Usage: dmcache ping [--json]\n"
			       "Checks that the daemon answers; prints its version and socket.\n");
			return 0;
		} else
			return EXIT_USAGE;
	}
	if (optind < argc)
		return cli_unexpected("ping", argv[optind]);
	c = cli_connect(CLI_TIMEOUT_MS);
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_ping(c);
	if (rc < 0) {
		rc = cli_report(c, "ping", rc);
		dmc_close(c);
		return rc;
	}
	if (json) {
		json_t *o = json_object();

		json_object_set_new(o, "daemon", json_string(dmc_daemon_version(c)));
		json_object_set_new(o, "socket", json_string(dmc_socket_path(c)));
		json_object_set_new(o, "protocol", json_integer(dmc_protocol_version(c)));
		rc = cli_print_json(o);
	} else {
		printf("%s answers on %s\n", dmc_daemon_version(c), dmc_socket_path(c));
	}
	dmc_close(c);
	return rc;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = { { "socket", required_argument, NULL, 's' },
					      { "version", no_argument, NULL, 'V' },
					      { "help", no_argument, NULL, 'h' },
					      { 0 } };
	static const struct {
		const char *name;
		int (*fn)(int argc, char **argv);
	} cmds[] = { { "status", cmd_status }, { "ping", cmd_ping },
		     { "prefetch", cmd_prefetch }, { "ls", cmd_ls },
		     { "evict", cmd_evict }, { "verify", cmd_verify }, { "get", cmd_get },
		     { "metrics", cmd_metrics }, { "tier", cmd_tier } };
	const char *names[sizeof(cmds) / sizeof(cmds[0])];
	const char *hint;
	int opt, rc;

	/* options before the command only; the command parses the rest */
	optind = 0;
	while ((opt = cli_getopt(argc, argv, NULL, "+s:Vh", opts)) != -1) {
		switch (opt) {
		case 's':
			cli_socket = optarg;
			break;
		case 'V':
			printf("dmcache %s\n", dmc_version());
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			return EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
		names[i] = cmds[i].name;
		if (strcmp(argv[optind], cmds[i].name) != 0)
			continue;
		rc = cmds[i].fn(argc - optind, argv + optind);
		/* a full disk or a closed pipe on stdout: what was printed is not whole */
		if ((fflush(stdout) != 0 || ferror(stdout)) && rc == 0) {
			fprintf(stderr, "dmcache %s: cannot write the output: %s\n", cmds[i].name,
				strerror(errno ? errno : EIO));
			rc = EXIT_LOCAL;
		}
		return rc;
	}
	hint = cli_suggest(argv[optind], names, sizeof(cmds) / sizeof(cmds[0]));
	if (hint)
		fprintf(stderr, "dmcache: unknown command '%s'; did you mean '%s'? (dmcache --help "
				"lists them)\n",
			argv[optind], hint);
	else
		fprintf(stderr, "dmcache: unknown command '%s' (dmcache --help lists them)\n",
			argv[optind]);
	return EXIT_USAGE;
}
