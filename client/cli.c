/*
 * dmcache: the command-line tool of dmcached, over libdmcache.
 *
 * Exit status: 0 success, 1 the daemon answered with an error, 2 usage error,
 * 3 the daemon could not be reached.
 */
#include <errno.h>
#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "dmcache.h"

#define EXIT_DAEMON_ERROR 1
#define EXIT_USAGE 2
#define EXIT_UNREACHABLE 3
#define CLI_TIMEOUT_MS 30000

static const char *socket_opt;

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: dmcache [--socket PATH] COMMAND [ARGS]\n"
		"Talks to dmcached, the dmcache daemon.\n\n"
		"Commands:\n"
		"  status [--json]     the daemon's version, uptime and counters\n"
		"  ping                check that the daemon answers\n\n"
		"Options:\n"
		"  -s, --socket PATH   the daemon's socket (default: $DMCACHE_SOCKET, else\n"
		"                      " DMC_SOCKET_SYSTEM ", else\n"
		"                      $XDG_RUNTIME_DIR/dmcache/dmcached.sock)\n"
		"  -V, --version       print the version and exit\n"
		"  -h, --help          print this help and exit\n");
}

/* Connects, or explains why not and returns NULL. */
static dmc_client *connect_or_explain(void)
{
	char cands[DMC_SOCKET_CANDIDATES_MAX][DMC_SOCKET_PATH_MAX];
	dmc_client *c = NULL;
	int rc = dmc_connect(socket_opt, &c);

	if (rc == 0) {
		dmc_set_timeout(c, CLI_TIMEOUT_MS);
		return c;
	}
	if (rc == -ENOENT || rc == -ECONNREFUSED) {
		char tried[3 * DMC_SOCKET_PATH_MAX + 8] = "";
		int n;

		if (socket_opt) {
			snprintf(tried, sizeof(tried), "%s", socket_opt);
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

static int report(dmc_client *c, const char *what, int rc)
{
	const struct dmc_error_info *e = dmc_last_error(c);

	if (rc <= -DMC_E_FIRST_ && e->code) {
		fprintf(stderr, "dmcache: %s: %s (%s)%s%s\n", what, e->message,
			dmc_error_name(e->code), *e->resource ? ", resource " : "", e->resource);
		return EXIT_DAEMON_ERROR;
	}
	fprintf(stderr, "dmcache: %s: %s\n", what, dmc_strerror(rc));
	return EXIT_UNREACHABLE;
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

	optind = 1;
	while ((opt = getopt_long(argc, argv, "jh", opts, NULL)) != -1) {
		if (opt == 'j')
			json = 1;
		else if (opt == 'h') {
			printf("Usage: dmcache status [--json]\n");
			return 0;
		} else
			return EXIT_USAGE;
	}
	if (optind < argc) {
		fprintf(stderr, "dmcache status: unexpected argument '%s'\n", argv[optind]);
		return EXIT_USAGE;
	}
	c = connect_or_explain();
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_status(c, &s);
	if (rc < 0) {
		rc = report(c, "status", rc);
		dmc_close(c);
		return rc;
	}
	if (json) {
		json_t *o = json_object(), *counters = json_object();
		char *text;

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
		text = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
		if (text)
			printf("%s\n", text);
		free(text);
		json_decref(o);
	} else {
		printf("%s (pid %u), protocol %u, up ", dmc_daemon_version(c), s->pid,
		       dmc_protocol_version(c));
		print_duration(s->uptime_ms);
		printf("\nsocket: %s\n", dmc_socket_path(c));
		for (uint32_t i = 0; i < s->n_counters; i++)
			printf("  %-32s %lld\n", s->counters[i].name,
			       (long long)s->counters[i].value);
	}
	dmc_status_free(s);
	dmc_close(c);
	return 0;
}

static int cmd_ping(int argc, char **argv)
{
	dmc_client *c;
	int rc;

	(void)argv;
	if (argc > 1) {
		fprintf(stderr, "dmcache ping: takes no arguments\n");
		return EXIT_USAGE;
	}
	c = connect_or_explain();
	if (!c)
		return EXIT_UNREACHABLE;
	rc = dmc_ping(c);
	if (rc < 0) {
		rc = report(c, "ping", rc);
		dmc_close(c);
		return rc;
	}
	printf("%s answers on %s\n", dmc_daemon_version(c), dmc_socket_path(c));
	dmc_close(c);
	return 0;
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
	} cmds[] = { { "status", cmd_status }, { "ping", cmd_ping } };
	int opt;

	/* options before the command only; the command parses the rest */
	while ((opt = getopt_long(argc, argv, "+s:Vh", opts, NULL)) != -1) {
		switch (opt) {
		case 's':
			socket_opt = optarg;
			break;
		case 'V':
			printf("dmcache %s\n", dmc_version());
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EXIT_USAGE;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return EXIT_USAGE;
	}
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(argv[optind], cmds[i].name) == 0)
			return cmds[i].fn(argc - optind, argv + optind);
	fprintf(stderr, "dmcache: unknown command '%s' (dmcache --help lists them)\n",
		argv[optind]);
	return EXIT_USAGE;
}
