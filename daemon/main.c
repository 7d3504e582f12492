/*
 * dmcached: the dmcache daemon. One libuv loop owns all state (DESIGN.md section 2).
 *
 * Start-up: configuration (defaults, --config file, flags) is validated completely; any
 * failure before READY=1 exits non-zero with a message. Then the socket, then READY=1.
 * SIGTERM/SIGINT: STOPPING=1, stop accepting, close connections, exit 0.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "conf.h"
#include "log.h"
#include "sd.h"
#include "server.h"

struct daemon {
	uv_loop_t loop;
	struct config cfg;
	struct server srv;
	uv_signal_t sigterm, sigint;
	uv_timer_t watchdog;
	bool watchdog_on;
	bool stopping;
};

static void usage(FILE *out)
{
	fprintf(out,
		"Usage: dmcached [OPTIONS]\n"
		"The dmcache daemon: caches Datamint datasets and serves them as tensors.\n\n"
		"  -c, --config FILE     read 'key = value' settings from FILE\n"
		"      --check-config    validate the configuration and exit\n"
		"  -s, --socket PATH     listen on PATH (default: $DMCACHE_SOCKET,\n"
		"                        /run/dmcache/dmcached.sock as root,\n"
		"                        else $XDG_RUNTIME_DIR/dmcache/dmcached.sock)\n"
		"      --cache-dir DIR   cache directory\n"
		"  -o, --set KEY=VALUE   set any configuration key (see --help-config)\n"
		"  -v, --verbose         more log output (repeat for debug)\n"
		"      --debug GROUPS    debug output for groups (all, net, proto, ...)\n"
		"      --help-config     list the configuration keys\n"
		"  -V, --version         print the version and exit\n"
		"  -h, --help            print this help and exit\n");
}

static void on_watchdog(uv_timer_t *t)
{
	(void)t;
	sd_notify_msg("WATCHDOG=1");
}

static void on_stop_signal(uv_signal_t *sig, int signum)
{
	struct daemon *d = sig->data;

	if (d->stopping)
		return;
	d->stopping = true;
	log_notice(SYS, "received %s: stopping", signum == SIGTERM ? "SIGTERM" : "SIGINT");
	sd_notify_msg("STOPPING=1\nSTATUS=stopping");
	server_stop(&d->srv);
	uv_close((uv_handle_t *)&d->sigterm, NULL);
	uv_close((uv_handle_t *)&d->sigint, NULL);
	if (d->watchdog_on)
		uv_close((uv_handle_t *)&d->watchdog, NULL);
}

/*
 * Fail closed in a user namespace: peers outside it appear as the overflow uid, and the
 * daemon authorises by uid (reliability.md S2). The full identity map is the only safe one.
 */
static int check_user_namespace(void)
{
	char buf[256];
	FILE *f = fopen("/proc/self/uid_map", "r");
	unsigned long a, b, c;
	size_t n;

	if (!f)
		return 0; /* no procfs: nothing to tell */
	n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	if (sscanf(buf, "%lu %lu %lu", &a, &b, &c) == 3 && a == 0 && b == 0 &&
	    c == 4294967295ul && !strchr(strchr(buf, '\n') ? strchr(buf, '\n') + 1 : "", '\n'))
		return 0;
	return -EPERM;
}

static int parse_args(struct daemon *d, int argc, char **argv, bool *ret_check)
{
	enum { OPT_CHECK = 256, OPT_CACHE_DIR, OPT_DEBUG, OPT_HELP_CONFIG };
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "check-config", no_argument, NULL, OPT_CHECK },
		{ "socket", required_argument, NULL, 's' },
		{ "cache-dir", required_argument, NULL, OPT_CACHE_DIR },
		{ "set", required_argument, NULL, 'o' },
		{ "verbose", no_argument, NULL, 'v' },
		{ "debug", required_argument, NULL, OPT_DEBUG },
		{ "help-config", no_argument, NULL, OPT_HELP_CONFIG },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	const char *config_file = NULL;
	char err[1024];
	int verbose = 0, c;

	/* the file first, then flags over it, whatever their order on the line */
	optind = 1;
	while ((c = getopt_long(argc, argv, "c:s:o:vVh", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			config_file = optarg;
			break;
		case 'V':
			printf("dmcached %s\n", DMC_VERSION);
			exit(0);
		case 'h':
			usage(stdout);
			exit(0);
		case OPT_HELP_CONFIG:
			printf("Configuration keys (file: 'key = value'; flag: -o key=value):\n");
			config_print_keys(stdout);
			exit(0);
		case '?':
			usage(stderr);
			return -EINVAL;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "dmcached: unexpected argument '%s'\n", argv[optind]);
		return -EINVAL;
	}
	if (config_file && config_load_file(&d->cfg, config_file, err, sizeof(err)) < 0) {
		fprintf(stderr, "dmcached: %s\n", err);
		return -EINVAL;
	}
	optind = 1;
	while ((c = getopt_long(argc, argv, "c:s:o:vVh", opts, NULL)) != -1) {
		const char *key = NULL, *value = optarg;
		char kv[256];

		switch (c) {
		case OPT_CHECK:
			*ret_check = true;
			break;
		case 's':
			key = "socket";
			break;
		case OPT_CACHE_DIR:
			key = "cache_dir";
			break;
		case OPT_DEBUG:
			key = "log_debug";
			break;
		case 'v':
			verbose++;
			break;
		case 'o': {
			const char *eq = strchr(optarg, '=');
			if (!eq || eq == optarg || (size_t)(eq - optarg) >= sizeof(kv)) {
				fprintf(stderr, "dmcached: -o expects KEY=VALUE, got '%s'\n",
					optarg);
				return -EINVAL;
			}
			memcpy(kv, optarg, (size_t)(eq - optarg));
			kv[eq - optarg] = '\0';
			key = kv;
			value = eq + 1;
			break;
		}
		}
		if (key && config_set(&d->cfg, key, value, "command line", err, sizeof(err)) < 0) {
			fprintf(stderr, "dmcached: %s\n", err);
			return -EINVAL;
		}
	}
	if (verbose) {
		int lvl = (int)d->cfg.log_level + verbose;
		d->cfg.log_level = lvl > LOG_LVL_DEBUG ? LOG_LVL_DEBUG : (enum log_level)lvl;
	}
	if (config_finish(&d->cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "dmcached: %s\n", err);
		return -EINVAL;
	}
	return 0;
}

int main(int argc, char **argv)
{
	struct daemon d;
	char err[1024], status[512];
	bool check_only = false;
	uint64_t wd_usec;
	int listen_fd, rc, exit_code = 1;

	memset(&d, 0, sizeof(d));
	config_init(&d.cfg);
	if (parse_args(&d, argc, argv, &check_only) < 0)
		goto out_config;
	if (check_only) {
		printf("configuration OK: socket '%s', cache '%s'\n", d.cfg.socket_path,
		       d.cfg.cache_dir);
		exit_code = 0;
		goto out_config;
	}
	log_set_level(d.cfg.log_level);
	if (check_user_namespace() < 0 && !d.cfg.allow_user_namespace) {
		log_err(SYS, "running inside a user namespace: other users' processes would all "
			     "appear as uid 65534 and could not be told apart. Refusing to start "
			     "(set allow_user_namespace = yes only if every client shares this "
			     "namespace)");
		goto out_config;
	}
	signal(SIGPIPE, SIG_IGN);

	listen_fd = sd_take_listen_fd();
	if (listen_fd < 0) {
		log_err(SYS, "socket activation passed unusable descriptors: expected exactly "
			     "one listening Unix stream socket");
		goto out_config;
	}
	wd_usec = sd_watchdog_usec();

	rc = uv_loop_init(&d.loop);
	if (rc != 0) {
		log_err(SYS, "cannot create the event loop: %s", uv_strerror(rc));
		goto out_config;
	}
	server_init(&d.srv, &d.loop, &d.cfg);
	rc = server_listen(&d.srv, listen_fd, err, sizeof(err));
	if (rc < 0) {
		log_err(NET, "%s", err);
		goto out_loop;
	}
	uv_signal_init(&d.loop, &d.sigterm);
	uv_signal_init(&d.loop, &d.sigint);
	d.sigterm.data = d.sigint.data = &d;
	uv_signal_start(&d.sigterm, on_stop_signal, SIGTERM);
	uv_signal_start(&d.sigint, on_stop_signal, SIGINT);
	if (wd_usec) {
		uv_timer_init(&d.loop, &d.watchdog);
		d.watchdog_on = true;
		uv_timer_start(&d.watchdog, on_watchdog, wd_usec / 2000, wd_usec / 2000);
	}

	snprintf(status, sizeof(status), "READY=1\nSTATUS=listening on %s\nMAINPID=%d",
		 listen_fd ? "the activated socket" : d.cfg.socket_path, (int)getpid());
	sd_notify_msg(status);
	log_notice(SYS, "dmcached %s ready: listening on '%s', cache '%s'", DMC_VERSION,
		   listen_fd ? "(socket activation)" : d.cfg.socket_path, d.cfg.cache_dir);

	uv_run(&d.loop, UV_RUN_DEFAULT);
	exit_code = 0;
	log_notice(SYS, "stopped");

out_loop:
	server_stop(&d.srv);
	uv_run(&d.loop, UV_RUN_DEFAULT); /* let close callbacks run */
	server_done(&d.srv);
	if (uv_loop_close(&d.loop) != 0)
		log_warn(SYS, "event loop closed with handles still open");
out_config:
	config_done(&d.cfg);
	return exit_code;
}
