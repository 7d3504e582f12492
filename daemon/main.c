/*
 * dmcached: the dmcache daemon. One libuv loop owns all state (docs/architecture.md).
 *
 * Start-up: configuration (defaults, --config file, flags) is validated completely; any
 * failure before READY=1 exits non-zero with a message. Then the socket, then READY=1.
 * SIGTERM/SIGINT: STOPPING=1, stop accepting, close connections, exit 0.
 * SIGHUP: the configuration is read again as at start (file, drop-ins, the same flags);
 * an invalid one is refused whole and the running one stays; of a valid one, the keys
 * their owners read at each use apply at once, the others are logged as needing a restart.
 *
 * Process privileges (docs/security.md): the daemon is not dumpable and has no core
 * limit from its first instruction on (no core file, no /proc/PID/mem for its own uid);
 * the decoder workers of a root daemon run as `worker_user`, resolved here (never in a
 * worker); the cache directory must be the daemon's own (cache_dir_check()).
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>
#include <pwd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "cache.h"
#include "cache_clean.h"
#include "index.h"
#include "conf.h"
#include "decode_pool.h"
#include "tier.h"
#include "fetch.h"
#include "conn.h"
#include "log.h"
#include "metrics.h"
#include "prefetch.h"
#include "sd.h"
#include "serve.h"
#include "server.h"
#include "store.h"

struct daemon {
	uv_loop_t loop;
	struct config cfg;
	struct server srv;
	struct cache *cache;
	struct fetch *fetch;
	struct prefetch *prefetch;
	struct decode_pool *pool;
	struct serve *serve;
	bool drop_user; /* root: the workers switch to worker_uid/gid */
	uid_t worker_uid;
	gid_t worker_gid;
	uv_signal_t sigterm, sigint, sighup;
	int argc; /* the command line, read again by a reload */
	char **argv;
	uv_timer_t watchdog;
	bool watchdog_on;
	uv_timer_t health;  /* the cache file system's state (and serve_tick), every HEALTH_MS */
	bool read_only;     /* it was read-only at the last look */
	bool stopping;
	/* the background reconciliation (cache_settle_*): a directory's walk on the
	 * threadpool, and when it began (uv_hrtime()) */
	uv_work_t settle_req;
	struct cache_settle *settle;
	uint64_t settle_t0;
	bool settle_failed;
};

#define HEALTH_MS 5000

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
		"      --help-config     list the configuration keys, their defaults and units\n"
		"      --help-config=conf  print the commented dmcached.conf with every key\n"
		"  -V, --version         print the version and exit\n"
		"  -h, --help            print this help and exit\n");
}

static void on_watchdog(uv_timer_t *t)
{
	(void)t;
	sd_notify_msg("WATCHDOG=1");
}

/*
 * The cache's file system turned read-only (ext4 errors=remount-ro, a remount): stored
 * items are still served, nothing new can be stored. Said once per change, in the log and
 * in the unit's status (docs/reliability.md D5). Writes fail on their own with EROFS;
 * this is for the operator, who must repair the file system and restart the service.
 */
static void on_health(uv_timer_t *t)
{
	struct daemon *d = t->data;
	struct statvfs sv;
	bool ro;

	serve_tick(d->serve);
	if (!d->cache)
		return;
	/* statvfs sees a remount; a write that failed sees a file system in its error state */
	ro = (statvfs(d->cfg.cache_dir, &sv) == 0 && (sv.f_flag & ST_RDONLY)) ||
	     index_read_only(d->cache->index);
	if (ro == d->read_only)
		return;
	d->read_only = ro;
	if (ro) {
		log_warn(STORE, "the cache file system of '%s' is read-only: stored items are "
				"served, nothing new can be stored (repair it, then restart dmcached)",
			 d->cfg.cache_dir);
		sd_notify_msg("STATUS=degraded: the cache file system is read-only");
	} else {
		log_notice(STORE, "the cache file system of '%s' is writable again",
			   d->cfg.cache_dir);
		sd_notify_msg("STATUS=running");
	}
}

static void threadpool_noop(uv_work_t *w)
{
	(void)w;
}

static void threadpool_warmed(uv_work_t *w, int status)
{
	(void)status;
	free(w);
}

/*
 * libuv starts its threadpool at the first queued work and abort()s when a thread cannot
 * be created then: start it now, after the decoders forked (they must fork while the
 * daemon has one thread), not in the middle of serving when memory may be short
 * (docs/reliability.md O3).
 */
static void warm_threadpool(struct daemon *d)
{
	uv_work_t *w = malloc(sizeof(*w));

	if (!w || uv_queue_work(&d->loop, w, threadpool_noop, threadpool_warmed) != 0)
		free(w);
}

/*
 * Stops every component, clients first: connections close (their requests end), then
 * serving, jobs (partial downloads are dropped, never published), transfers, and the
 * decoders (jobs still in a worker end with CANCELLED). Idempotent.
 */
static void stop_all(struct daemon *d)
{
	server_stop(&d->srv);
	serve_free(d->serve);
	d->serve = NULL;
	prefetch_free(d->prefetch);
	d->prefetch = NULL;
	fetch_free(d->fetch);
	d->fetch = NULL;
	if (d->pool)
		decode_pool_stop(d->pool);
	d->pool = NULL;
}

static void on_stop_signal(uv_signal_t *sig, int signum)
{
	struct daemon *d = sig->data;

	if (d->stopping)
		return;
	d->stopping = true;
	log_notice(SYS, "received %s: stopping", signum == SIGTERM ? "SIGTERM" : "SIGINT");
	sd_notify_msg("STOPPING=1\nSTATUS=stopping");
	stop_all(d);
	uv_close((uv_handle_t *)&d->sigterm, NULL);
	uv_close((uv_handle_t *)&d->sigint, NULL);
	uv_close((uv_handle_t *)&d->sighup, NULL);
	if (d->watchdog_on)
		uv_close((uv_handle_t *)&d->watchdog, NULL);
	uv_close((uv_handle_t *)&d->health, NULL);
}

/*
 * Fail closed in a user namespace: peers outside it appear as the overflow uid, and the
 * daemon authorises by uid (docs/reliability.md S2). The full identity map is the only
 * safe one.
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

static bool app_dispatch(void *ctx, struct conn *c, const struct dmc_header *h,
			 const uint8_t *payload)
{
	struct daemon *d = ctx;

	return (d->prefetch && prefetch_dispatch(d->prefetch, c, h, payload)) ||
	       (d->serve && serve_dispatch(d->serve, c, h, payload));
}

static void app_conn_closed(void *ctx, struct conn *c)
{
	struct daemon *d = ctx;

	if (d->serve)
		serve_conn_closed(d->serve, c);
	if (d->prefetch)
		prefetch_conn_closed(d->prefetch, c);
}

/* Eviction keeps the snapshots clients have open. */
static bool snapshot_open(void *ctx, int64_t id)
{
	return serve_snapshot_open(ctx, id);
}

static uint32_t app_status(void *ctx, const struct conn *c, struct dmc_status_entry *e,
			   uint32_t max)
{
	struct daemon *d = ctx;

	uint32_t n = d->prefetch ? prefetch_status(d->prefetch, c, e, max) : 0;

	if (d->serve && n < max && c->admin) /* the serving side's figures are everyone's */
		n += serve_status(d->serve, e + n, max - n);
	if (d->serve && n < max && c->admin) /* latency histograms: everyone's too */
		n += metrics_status(d->pool, e + n, max - n);
	return n;
}

/* Creates the cache directory (and its parents) private to the daemon. */
static int make_dirs(const char *path)
{
	char buf[4096];
	size_t n = strlen(path);

	if (n >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) == 0)
			chmod(buf, 0755); /* not group-writable under umask 002 either */
		else if (errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(buf, 0700) != 0 && errno != EEXIST)
		return -errno;
	return 0;
}

/* Each snapshot the start's eviction takes files from, logged before its first file goes
 * as a running daemon's evictions are (a kill in the middle leaves no loss unlogged). */
static void start_evicting(void *ctx, struct cache *c, int64_t id, uint64_t files,
			   uint64_t bytes)
{
	struct daemon *d = ctx;

	prefetch_log_eviction(c, &d->cfg, id, files, bytes, true);
}

static int open_cache(struct daemon *d)
{
	struct cache_options co = { 0 };
	struct cache_open_report rep = { 0 };
	char err[1024];
	int rc;

	/* Nothing is created under a directory another user controls; what was created
	 * (or was there) is checked again, symlinks followed. */
	rc = cache_dir_check(d->cfg.cache_dir, geteuid(), true, err, sizeof(err));
	if (rc < 0) {
		log_err(STORE, "%s", err);
		return rc;
	}
	rc = make_dirs(d->cfg.cache_dir);
	if (rc == 0) {
		rc = cache_dir_check(d->cfg.cache_dir, geteuid(), false, err, sizeof(err));
		if (rc < 0) {
			log_err(STORE, "%s", err);
			return rc;
		}
	}
	if (rc < 0) {
		log_err(STORE, "cannot create the cache directory '%s': %s", d->cfg.cache_dir,
			strerror(-rc));
		return rc;
	}
	co.store.max_size = d->cfg.max_size;
	co.store.min_free = d->cfg.min_free + CACHE_INDEX_HEADROOM;
	co.store.max_object = d->cfg.max_object;
	co.store.zstd_level = (int)d->cfg.zstd_level;
	co.index_flags = d->cfg.sync_full ? INDEX_SYNC_FULL : 0;
	co.start_evicting = start_evicting;
	co.start_evicting_ctx = d;
	co.background_after_ms = (uint32_t)d->cfg.start_walk_ms;
	rc = cache_open(d->cfg.cache_dir, &co, err, sizeof(err), &d->cache, &rep);
	if (rc < 0) {
		log_err(STORE, "cannot open the cache in '%s': %s", d->cfg.cache_dir, err);
		return rc;
	}
	if (rep.index_rebuilt)
		log_warn(STORE, "the index was damaged: moved aside and rebuilt from %" PRIu64
				" blob(s)",
			 rep.blobs);
	if (rep.clean_start)
		log_info(STORE, "clean start: %u of 256 directories changed, index check skipped",
			 rep.dirs_walked);
	else
		log_info(STORE, "full reconciliation because %s; %s",
			 rep.start_why[0] ? rep.start_why
					  : "no clean-shutdown record was trusted",
			 rep.index_checked ? "index checked" : rep.check_why);
	if (!rep.clean_start && rep.index_checked && rep.check_why[0])
		log_info(STORE, "the index was checked: %s", rep.check_why);
	if (rep.full_evicted)
		log_warn(STORE, "the file system of '%s' was full: %" PRIu64 " byte(s) of the least "
				"recently used blobs evicted for the index to start",
			 d->cfg.cache_dir, rep.full_evicted);
	log_info(STORE, "cache '%s': %" PRIu64 " blob(s); %" PRIu64 " stray file(s) removed, "
			"%" PRId64 " row(s) dropped, %" PRId64 " blob(s) adopted, %" PRIu64
			" byte(s) evicted",
		 d->cfg.cache_dir, rep.blobs, rep.files_removed, rep.rows_dropped, rep.adopted,
		 rep.evicted_bytes);
	if (rep.dirs_left)
		log_notice(STORE, "serving while %u of 256 directories are checked in the "
				  "background (start_walk = %" PRIu64 " ms): their blobs are served "
				  "as found; the totals and max_size wait for the end",
			   rep.dirs_left, d->cfg.start_walk_ms);
	return 0;
}

/* ---- a fatal signal leaves <cache>/fault: the next start checks the index ---- */

static int fault_dirfd = -1;

static void on_fatal_signal(int sig)
{
	/* async-signal-safe only; the action is back to the default (SA_RESETHAND) */
	int fd = openat(fault_dirfd, CLEAN_FAULT_NAME, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
	if (fd >= 0)
		close(fd);
	raise(sig);
}

static void mark_faults(struct daemon *d)
{
	/* the sanitizers own SIGSEGV, SIGBUS and SIGFPE (their reports); SIGABRT, which their
	 * reports end with, and SIGILL stay ours */
	static const int sigs[] = {
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
		SIGSEGV, SIGBUS, SIGFPE,
#endif
		SIGILL, SIGABRT };
	struct sigaction sa;

	fault_dirfd = open(d->cfg.cache_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fault_dirfd < 0)
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_fatal_signal;
	sa.sa_flags = (int)(SA_RESETHAND | SA_NODEFER);
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
		sigaction(sigs[i], &sa, NULL);
}

/* ---- the background reconciliation (cache.h, cache_settle_*) ---- */

static void settle_done_log(struct daemon *d)
{
	const struct cache_settle_report *r = &d->cache->settle_rep;
	struct store_stats st;

	store_get_stats(d->cache->store, &st);
	log_notice(STORE, "background check of the cache done in %.1f s: %u director(ies) walked "
			  "(%" PRIu64 " walked again after a change), %" PRIu64 " blob(s), %" PRIu64
			  " stray file(s) removed, %" PRId64 " row(s) dropped, %" PRId64
			  " blob(s) adopted, %" PRIu64 " byte(s) evicted",
		   (double)(uv_hrtime() - d->settle_t0) / 1e9, r->dirs, r->retries, st.objects,
		   r->files_removed, r->rows_dropped, r->adopted, r->evicted_bytes);
}

static void settle_next(struct daemon *d);

static void settle_work(uv_work_t *req)
{
	struct daemon *d = req->data;
	cache_settle_work(d->settle);
}

static void settle_after(uv_work_t *req, int status)
{
	struct daemon *d = req->data;
	int r = cache_settle_end(d->cache, d->settle);

	(void)status;
	d->settle = NULL;
	if (r < 0) {
		/* left for the stop, which walks what is left before its record */
		log_warn(STORE, "the background check of the cache stopped: %s; %u director(ies) "
				"left (the totals stay partial and max_size unenforced until the "
				"next start)",
			 cache_strerror(r), cache_settle_left(d->cache));
		d->settle_failed = true;
		return;
	}
	if (!cache_settle_left(d->cache)) {
		settle_done_log(d);
		return;
	}
	if (!d->stopping)
		settle_next(d);
}

static void settle_next(struct daemon *d)
{
	int r = cache_settle_begin(d->cache, &d->settle);

	if (r < 0 || !d->settle) {
		if (r < 0) {
			log_warn(STORE, "the background check of the cache stopped: %s",
				 cache_strerror(r));
			d->settle_failed = true;
		}
		return;
	}
	d->settle_req.data = d;
	uv_queue_work(&d->loop, &d->settle_req, settle_work, settle_after);
}

/* At the stop, no writer left: what the background check had not walked is walked here,
 * so that the clean-shutdown record covers the whole cache. */
static void settle_finish(struct daemon *d)
{
	unsigned left = cache_settle_left(d->cache);
	uint64_t t0 = uv_hrtime();

	if (!left || d->settle_failed)
		return;
	log_notice(STORE, "checking the %u director(ies) the background check has left before "
			  "stopping",
		   left);
	while (cache_settle_left(d->cache)) {
		struct cache_settle *w;
		int r = cache_settle_begin(d->cache, &w);
		if (r < 0 || !w)
			break;
		cache_settle_work(w);
		if ((r = cache_settle_end(d->cache, w)) < 0) {
			log_warn(STORE, "the check of the cache stopped: %s", cache_strerror(r));
			return;
		}
		if (uv_hrtime() - t0 > 1000000000u && cache_settle_left(d->cache) % 32 == 0)
			sd_notify_msg("EXTEND_TIMEOUT_USEC=30000000");
	}
	settle_done_log(d);
}

static int start_decoders(struct daemon *d)
{
	struct decode_pool_config pc;
	char err[256];
	int rc;

	decode_pool_config_default(&pc);
	pc.workers = d->cfg.decode_workers;
	pc.timeout_ms = d->cfg.decode_timeout_ms;
	pc.limits.max_decode_bytes = d->cfg.max_decode_bytes;
	pc.out_bytes = 0; /* follows max_decode_bytes */
	pc.drop_user = d->drop_user;
	pc.worker_uid = d->worker_uid;
	pc.worker_gid = d->worker_gid;
	rc = decode_pool_start_err(&d->loop, &pc, &d->pool, err, sizeof(err));
	if (rc < 0)
		log_err(DECODE, "cannot start the decoder workers: %s", err);
	return rc;
}

/*
 * A root daemon's decoder workers run as worker_user (default nobody): resolved once,
 * here, before any worker exists. Without root the workers keep the daemon's own uid
 * (systemd's User=dmcache) and only lose their capabilities.
 */
static int resolve_worker_user(struct daemon *d)
{
	const char *name = d->cfg.worker_user ? d->cfg.worker_user : "nobody";
	struct passwd *pw;

	if (geteuid() != 0)
		return 0;
	errno = 0;
	pw = getpwnam(name);
	if (!pw) {
		/* not found is errno 0, ENOENT, ESRCH... depending on the NSS module */
		fprintf(stderr, "dmcached: worker_user = '%s': no such user%s%s (the decoder "
				"workers of a root daemon run as this user; create it or set "
				"worker_user)\n",
			name, errno && errno != ENOENT && errno != ESRCH ? ": " : "",
			errno && errno != ENOENT && errno != ESRCH ? strerror(errno) : "");
		return -ENOENT;
	}
	if (pw->pw_uid == 0 || pw->pw_gid == 0) {
		fprintf(stderr, "dmcached: worker_user = '%s': uid %u gid %u is root's; the "
				"decoder workers must run as an unprivileged user\n",
			name, (unsigned)pw->pw_uid, (unsigned)pw->pw_gid);
		return -EINVAL;
	}
	d->drop_user = true;
	d->worker_uid = pw->pw_uid;
	d->worker_gid = pw->pw_gid;
	return 0;
}

static int start_engines(struct daemon *d)
{
	struct fetch_options fo = {
		.max_parallel = d->cfg.parallel_transfers,
		.max_per_host = d->cfg.per_host_connections,
		.connect_timeout_ms = d->cfg.connect_timeout_ms,
		.low_speed_limit = d->cfg.low_speed_limit,
		.low_speed_time_ms = d->cfg.low_speed_time_ms,
		.min_speed = d->cfg.min_speed,
		.min_speed_time_ms = d->cfg.min_speed_time_ms,
		.max_object_bytes = d->cfg.max_object,
		.max_attempts = d->cfg.max_attempts,
		.backoff_base_ms = d->cfg.backoff_base_ms,
		.backoff_max_ms = d->cfg.backoff_max_ms,
		.retry_budget_ms = d->cfg.retry_budget_ms,
		.ca_file = d->cfg.ca_file,
		.user_agent = "dmcached/" DMC_VERSION,
	};
	struct prefetch_deps pd;
	int rc;

	rc = fetch_new(&d->loop, &fo, &d->fetch);
	if (rc < 0) {
		log_err(FETCH, "cannot start the transfer engine: %s", strerror(-rc));
		return rc;
	}
	pd.loop = &d->loop;
	pd.cache = d->cache;
	pd.fetch = d->fetch;
	pd.cfg = &d->cfg;
	pd.pool = d->pool;
	rc = prefetch_new(&pd, &d->prefetch);
	if (rc < 0) {
		log_err(FETCH, "cannot start the prefetcher: %s", strerror(-rc));
		return rc;
	}
	{
		struct serve_deps sd = { &d->loop, d->cache, d->prefetch, d->pool, &d->cfg };
		rc = serve_new(&sd, &d->serve);
		if (rc < 0) {
			log_err(SERVE, "cannot start serving: %s", strerror(-rc));
			return rc;
		}
		prefetch_set_open_check(d->prefetch, snapshot_open, d->serve);
	}
	d->srv.app.ctx = d;
	d->srv.app.dispatch = app_dispatch;
	d->srv.app.conn_closed = app_conn_closed;
	d->srv.app.status = app_status;
	return 0;
}

static int parse_args(struct config *cfg, int argc, char **argv, bool *ret_check,
		      char **ret_files)
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
		{ "help-config", optional_argument, NULL, OPT_HELP_CONFIG },
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
			if (optarg && strcmp(optarg, "conf") == 0)
				config_print_template(stdout);
			else if (optarg) {
				fprintf(stderr, "dmcached: --help-config takes no value or 'conf'\n");
				exit(2);
			} else
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
	if (config_file && (config_load_file(cfg, config_file, err, sizeof(err)) < 0 ||
			    config_load_dropins(cfg, config_file, ret_files, err, sizeof(err)) < 0)) {
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
		if (key && config_set(cfg, key, value, "command line", err, sizeof(err)) < 0) {
			fprintf(stderr, "dmcached: %s\n", err);
			return -EINVAL;
		}
	}
	if (verbose) {
		int lvl = (int)cfg->log_level + verbose;
		cfg->log_level = lvl > LOG_LVL_DEBUG ? LOG_LVL_DEBUG : (enum log_level)lvl;
	}
	if (config_finish(cfg, err, sizeof(err)) < 0) {
		fprintf(stderr, "dmcached: %s\n", err);
		return -EINVAL;
	}
	return 0;
}

/*
 * After a reload: the limits that their owners copied (the store's max_size and min_free,
 * the hot set's hot_max) are handed to them, and what is over a lowered limit goes now,
 * through the usual eviction (which logs each snapshot it removes and keeps the protected
 * ones).
 */
static void apply_limits(struct daemon *d, uint64_t max_size, uint64_t min_free, uint64_t hot_max)
{
	uint64_t freed = 0, left = 0, n;
	int rc;

	if (d->cache && (d->cfg.max_size != max_size || d->cfg.min_free != min_free)) {
		rc = cache_set_limits(d->cache, d->cfg.max_size,
				      d->cfg.min_free + CACHE_INDEX_HEADROOM, &freed, &left);
		if (rc < 0)
			log_err(STORE, "applying max_size %" PRIu64 " and min_free %" PRIu64
				       " bytes: eviction failed: %s",
				d->cfg.max_size, d->cfg.min_free, strerror(rc < -1000 ? EIO : -rc));
		else if (left)
			log_warn(STORE, "max_size %" PRIu64 " and min_free %" PRIu64 " bytes "
					"applied: evicted %" PRIu64 " bytes; still over by %" PRIu64
					" bytes, held by snapshots being filled or open, or by blobs "
					"being read",
				 d->cfg.max_size, d->cfg.min_free, freed, left);
		else if (freed)
			log_notice(STORE, "max_size %" PRIu64 " and min_free %" PRIu64 " bytes "
					  "applied: evicted %" PRIu64 " bytes",
				   d->cfg.max_size, d->cfg.min_free, freed);
	}
	if (d->serve && d->cfg.hot_max != hot_max) {
		n = serve_hot_max_changed(d->serve, &freed);
		if (n)
			log_notice(SERVE, "hot_max %" PRIu64 " bytes applied: dropped %" PRIu64
					  " decoded tensors (%" PRIu64 " bytes) from memory",
				   d->cfg.hot_max, n, freed);
	}
}

/* SIGHUP: read the configuration again; apply what may change while running. */
static void on_reload_signal(uv_signal_t *sig, int signum)
{
	struct daemon *d = sig->data;
	struct config next;
	char changed[2048], restart[1024];
	bool check = false;

	(void)signum;
	if (d->stopping)
		return;
	sd_notify_msg("RELOADING=1\nSTATUS=reloading the configuration");
	log_notice(SYS, "received SIGHUP: reading the configuration again");
	config_init(&next);
	/* errors are written to stderr as at start (the journal) */
	if (parse_args(&next, d->argc, d->argv, &check, NULL) < 0) {
		log_set_debug(d->cfg.log_debug ? d->cfg.log_debug : ""); /* as it was */
		log_err(SYS, "reload refused: the configuration is invalid (above); the running "
			     "configuration stays");
	} else {
		uint64_t max_size = d->cfg.max_size, min_free = d->cfg.min_free,
			 hot_max = d->cfg.hot_max;

		config_reload(&d->cfg, &next, changed, sizeof(changed), restart, sizeof(restart));
		log_set_debug(d->cfg.log_debug ? d->cfg.log_debug : "");
		/* said before a lower log level silences it */
		log_notice(SYS, "configuration reloaded: %s%s%s%s", *changed ? "changed " : "",
			   *changed ? changed : "no key that applies while running changed",
			   *restart ? "; needs a restart to apply: " : "", restart);
		log_set_level(d->cfg.log_level);
		apply_limits(d, max_size, min_free, hot_max);
	}
	config_done(&next);
	sd_notify_msg("READY=1\nSTATUS=running");
}

/* The codec libraries' own messages (decode_set_diag): debug lines of group "decode". */
static void log_codec_line(const char *lib, const char *line)
{
	log_debug(DECODE, "%s: %s", lib, line);
}

int main(int argc, char **argv)
{
	struct daemon d;
	char err[1024], status[512], *dropins = NULL;
	bool check_only = false;
	uint64_t wd_usec;
	int listen_fd, rc, exit_code = 1;

	/* No core dump and no /proc/PID/mem for anyone but root, before any secret exists. */
	{
		struct rlimit nocore = { 0, 0 };
		if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 || setrlimit(RLIMIT_CORE, &nocore) != 0) {
			fprintf(stderr, "dmcached: cannot make the process non-dumpable: %s\n",
				strerror(errno));
			return 1;
		}
	}
	memset(&d, 0, sizeof(d));
	d.argc = argc;
	d.argv = argv;
	config_init(&d.cfg);
	if (parse_args(&d.cfg, argc, argv, &check_only, &dropins) < 0 ||
	    resolve_worker_user(&d) < 0)
		goto out_config;
	if (check_only) {
		printf("configuration OK: socket '%s', cache '%s'%s%s\n", d.cfg.socket_path,
		       d.cfg.cache_dir, dropins ? "; drop-ins " : "", dropins ? dropins : "");
		exit_code = 0;
		goto out_config;
	}
	log_set_level(d.cfg.log_level);
	decode_set_diag(log_codec_line);
	if (check_user_namespace() < 0 && !d.cfg.allow_user_namespace) {
		log_err(SYS, "running inside a user namespace: other users' processes would all "
			     "appear as uid 65534 and could not be told apart. Refusing to start "
			     "(set allow_user_namespace = yes only if every client shares this "
			     "namespace)");
		goto out_config;
	}
	signal(SIGPIPE, SIG_IGN);
	/* OpenSSL's lazy set-up, now rather than under memory pressure (store.h) */
	if (store_crypto_init() < 0) {
		log_err(SYS, "cannot set up OpenSSL's SHA-256 (out of memory, or OpenSSL has no "
			     "default provider)");
		goto out_config;
	}

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
	/* the tier's credentials leave the environment before any decoder process exists */
	tier_take_environment();
	/* decoder workers fork from here: before the daemon holds any key (decode_pool.h) */
	if (start_decoders(&d) < 0 || open_cache(&d) < 0 || start_engines(&d) < 0)
		goto out_loop;
	mark_faults(&d);
	warm_threadpool(&d);
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
	uv_signal_init(&d.loop, &d.sighup);
	d.sighup.data = &d;
	uv_signal_start(&d.sighup, on_reload_signal, SIGHUP);
	uv_timer_init(&d.loop, &d.health);
	d.health.data = &d;
	uv_timer_start(&d.health, on_health, 0, HEALTH_MS);
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
	d.settle_t0 = uv_hrtime();
	if (cache_settle_left(d.cache))
		settle_next(&d);

	uv_run(&d.loop, UV_RUN_DEFAULT);
	exit_code = 0;
	log_notice(SYS, "stopped");

out_loop:
	stop_all(&d);
	uv_run(&d.loop, UV_RUN_DEFAULT); /* let close callbacks and queued work finish */
	server_done(&d.srv);
	if (d.cache) {
		/* every store write has ended (stop_all, then the loop ran dry) */
		char why[256] = "";
		bool written = false;
		settle_finish(&d);
		if (cache_close_clean(d.cache, &written, why, sizeof(why)) < 0)
			log_warn(STORE, "the index could not be flushed at exit");
		if (written)
			log_info(STORE, "clean-shutdown record written: the next start checks only "
					"what changed");
		else
			log_warn(STORE, "no clean-shutdown record (%s): the next start reconciles "
					"the whole cache",
				 why);
	}
	if (uv_loop_close(&d.loop) != 0)
		log_warn(SYS, "event loop closed with handles still open");
out_config:
	free(dropins);
	config_done(&d.cfg);
	return exit_code;
}
