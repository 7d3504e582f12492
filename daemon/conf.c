/* dmcached configuration: see conf.h. */
#include <errno.h>
#include <glob.h>
#include <grp.h>
#include <ini.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "conf.h"

#define DEFAULT_SERVERS "https://api.datamint.io"
#define DEFAULT_ADMIN_GROUP "dmcache"

enum key_type {
	KT_STRING,
	KT_UINT32,
	KT_SIZE,
	KT_DURATION,
	KT_MODE,
	KT_BOOL,
	KT_LEVEL,
};

struct key {
	const char *name;
	enum key_type type;
	size_t offset;
	uint64_t min, max; /* for numbers, sizes and durations (ms) */
	const char *help;
};

#define K(name, type, field, min, max, help)                                                       \
	{ name, type, offsetof(struct config, field), min, max, help }

static const struct key keys[] = {
	K("socket", KT_STRING, socket_path, 0, 0, "path of the listening socket"),
	K("socket_mode", KT_MODE, socket_mode, 0, 0777, "permission bits of the socket, octal"),
	K("cache_dir", KT_STRING, cache_dir, 0, 0, "cache directory"),
	K("log_level", KT_LEVEL, log_level, 0, 0, "err, warning, notice, info or debug"),
	K("log_debug", KT_STRING, log_debug, 0, 0,
	  "groups with debug output: all, or a list of sys,net,proto,fetch,store,decode,serve"),
	K("max_connections", KT_UINT32, max_connections, 1, 1000000,
	  "connections in total"),
	K("max_connections_per_uid", KT_UINT32, max_connections_per_uid, 1, 1000000,
	  "connections per peer uid (the smaller of this and max_connections applies)"),
	K("idle_timeout", KT_DURATION, idle_timeout_ms, 0, 7 * 24 * 3600 * 1000ull,
	  "close a connection idle this long (0: never)"),
	K("hello_timeout", KT_DURATION, hello_timeout_ms, 100, 3600 * 1000ull,
	  "close a connection that has not said HELLO within this time"),
	K("write_queue_max", KT_SIZE, write_queue_max, 64 << 10, 1ull << 30,
	  "unsent reply bytes per connection before its requests are no longer read"),
	K("listen_backlog", KT_UINT32, listen_backlog, 1, 65535, "listen(2) backlog"),
	K("allow_user_namespace", KT_BOOL, allow_user_namespace, 0, 0,
	  "run inside a user namespace although peers may then appear as the overflow uid"),
	K("max_size", KT_SIZE, max_size, 0, 1ull << 60,
	  "largest size of the cache's files (0: no limit); least recently used go first"),
	K("min_free", KT_SIZE, min_free, 0, 1ull << 60,
	  "free space to leave on the cache's file system"),
	K("max_object", KT_SIZE, max_object, 1, 1ull << 40,
	  "largest object downloaded or stored"),
	K("zstd_level", KT_UINT32, zstd_level, 1, 3,
	  "zstd level for payloads that compress (1 to 3)"),
	K("sync_full", KT_BOOL, sync_full, 0, 0,
	  "sync the index at every batch, so acknowledged items survive power loss (default yes)"),
	K("start_walk", KT_DURATION, start_walk_ms, 0, 3600000,
	  "how long a start that must check the cache (no clean-shutdown record) walks it before "
	  "serving; what is left is checked in the background (0: all of it before serving)"),
	K("parallel_transfers", KT_UINT32, parallel_transfers, 1, 1024,
	  "downloads running at once"),
	K("per_host_connections", KT_UINT32, per_host_connections, 1, 1024,
	  "connections to one upstream host"),
	K("connect_timeout", KT_DURATION, connect_timeout_ms, 100, 600000,
	  "give up connecting after this long (then retry)"),
	K("low_speed_limit", KT_UINT32, low_speed_limit, 1, 1u << 30,
	  "bytes/s: a transfer slower than this for low_speed_time is aborted and retried"),
	K("low_speed_time", KT_DURATION, low_speed_time_ms, 1000, 3600000,
	  "see low_speed_limit"),
	K("min_speed", KT_SIZE, min_speed, 0, 1ull << 40,
	  "per second: a file download slower than this on average over min_speed_time ends "
	  "and is retried, giving its place to others (0: no floor; low_speed_limit still "
	  "catches stalled connections, metadata requests included)"),
	K("min_speed_time", KT_DURATION, min_speed_time_ms, 1000, 3600000,
	  "see min_speed"),
	K("max_attempts", KT_UINT32, max_attempts, 1, 100,
	  "attempts per download, the first included"),
	K("backoff_base", KT_DURATION, backoff_base_ms, 1, 3600000,
	  "first wait before a retry (doubles each time, with jitter)"),
	K("backoff_max", KT_DURATION, backoff_max_ms, 1, 3600000, "longest wait between retries"),
	K("retry_budget", KT_DURATION, retry_budget_ms, 1000, 7 * 24 * 3600000ull,
	  "no retry starts after this much time on one download"),
	K("ca_file", KT_STRING, ca_file, 0, 0,
	  "CA certificates for TLS verification (default: the system's)"),
	K("arena_default", KT_SIZE, arena_default, 1 << 20, 1ull << 40,
	  "shared memory per connection when the client names no size"),
	K("arena_max", KT_SIZE, arena_max, 1 << 20, 1ull << 40,
	  "the most shared memory one connection may ask for"),
	K("region_linger", KT_DURATION, region_linger_ms, 0, 3600000,
	  "how long a snapshot's region of hot tensors (handed in place) is kept after its last "
	  "handle closed, for the next OPEN of that snapshot (0: it goes with its last handle)"),
	K("hot_max", KT_SIZE, hot_max, 0, 1ull << 40,
	  "decoded tensors kept in memory for all clients (0: none)"),
	K("decode_workers", KT_UINT32, decode_workers, 0, 256,
	  "decoder processes (0: one per core)"),
	K("max_decode_bytes", KT_SIZE, max_decode_bytes, 1 << 20, 1ull << 40,
	  "largest decoded item; larger ones fail with limit_exceeded before any allocation"),
	K("decode_timeout", KT_DURATION, decode_timeout_ms, 100, 3600000,
	  "a decode running longer is killed (the worker is replaced)"),
	/* the trust boundary (docs/security.md) */
	K("servers", KT_STRING, servers, 0, 0,
	  "Datamint servers whose answers may reuse content another user stored, each "
	  "revalidated with the requester's own key (space-separated URLs; default "
	  "https://api.datamint.io). Any other server's snapshots are isolated per user"),
	K("admin_group", KT_STRING, admin_group, 0, 0,
	  "members of this group (and root) see every user's snapshots and totals, may evict "
	  "anything and run verify (default dmcache)"),
	K("grant_ttl", KT_DURATION, grant_ttl_ms, 0, 3650ull * 24 * 3600000,
	  "how long a user's proof of entitlement lets a complete snapshot be read with the "
	  "server unreachable or in offline mode (0: always ask the server)"),
	K("grant_recheck", KT_DURATION, grant_recheck_ms, 0, 24ull * 3600000,
	  "an online OPEN whose key the server accepted this recently for a complete snapshot "
	  "is answered at once and checked with the server after it; a refusal withdraws the "
	  "grant (0: every online OPEN waits for the server)"),
	K("max_jobs_per_uid", KT_UINT32, max_jobs_per_uid, 1, 100000,
	  "prefetch jobs (and OPENs being listed) one uid may have running at once"),
	K("worker_user", KT_STRING, worker_user, 0, 0,
	  "user the decoder workers of a root daemon run as (default: nobody; not root)"),
	/* fair shares of memory between local users (serve.h) */
	K("shm_max_per_uid", KT_SIZE, shm_max_per_uid, 1 << 20, 1ull << 50,
	  "shared memory committed in one uid's arenas (default: a quarter of RAM)"),
	K("shm_max", KT_SIZE, shm_max, 1 << 20, 1ull << 50,
	  "shared memory committed in all arenas (default: half of RAM)"),
	K("decode_max_per_uid", KT_UINT32, decode_max_per_uid, 1, 65536,
	  "items of one uid read, decoded or held in memory at once, over all its connections"),
	/* the cluster tier (tier.h) */
	K("tier_url", KT_STRING, tier_url, 0, 0,
	  "S3 endpoint and bucket of the cluster tier shared by the node caches, path-style "
	  "(https://s3.example.org/bucket) or virtual-host-style (https://bucket.s3.example.org); "
	  "none by default"),
	K("tier_region", KT_STRING, tier_region, 0, 0, "the tier's region for request signing "
	  "(default us-east-1)"),
	K("tier_prefix", KT_STRING, tier_prefix, 0, 0,
	  "key prefix of the tier's objects in the bucket (default dmcache)"),
	K("tier_credentials_file", KT_STRING, tier_credentials_file, 0, 0,
	  "the tier's aws_access_key_id and aws_secret_access_key, a file of root's with mode "
	  "0600 (default: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of the service)"),
	K("tier_retention", KT_DURATION, tier_retention_ms, 1000, 36500ull * 24 * 3600000,
	  "dmcache tier gc deletes the tier's mappings older than this, then the blobs no "
	  "mapping names (older than an hour, or than tier_retention when shorter)"),
};

static void config_init_tier(struct config *cfg)
{
	cfg->tier_prefix = strdup("dmcache");
	cfg->tier_retention_ms = 30ull * 24 * 3600000; /* 30 days */
}

void config_init(struct config *cfg)
{
	memset(cfg, 0, sizeof(*cfg));
	cfg->socket_mode = 0666; /* everyone may connect; access is per uid and per key */
	cfg->log_level = LOG_LVL_NOTICE;
	cfg->max_connections = 4096;
	cfg->max_connections_per_uid = 1024;
	cfg->idle_timeout_ms = 0;
	cfg->hello_timeout_ms = 10000;
	cfg->write_queue_max = 4u << 20;
	cfg->listen_backlog = 512;
	cfg->max_size = 0;
	cfg->min_free = 1ull << 30;
	cfg->max_object = 16ull << 30;
	cfg->zstd_level = 1;
	cfg->sync_full = true;
	cfg->start_walk_ms = 250;
	cfg->parallel_transfers = 16;
	cfg->per_host_connections = 16;
	cfg->connect_timeout_ms = 10000;
	cfg->low_speed_limit = 1024;
	cfg->low_speed_time_ms = 30000;
	cfg->min_speed = 64u << 10;
	cfg->min_speed_time_ms = 30000;
	cfg->max_attempts = 5;
	cfg->backoff_base_ms = 1000;
	cfg->backoff_max_ms = 30000;
	cfg->retry_budget_ms = 600000;
	cfg->arena_default = 256ull << 20;
	cfg->arena_max = 4ull << 30;
	cfg->hot_max = 1ull << 30;
	cfg->region_linger_ms = 15000;
	cfg->decode_workers = 0;
	cfg->max_decode_bytes = 1ull << 30;
	cfg->decode_timeout_ms = 10000;
	cfg->grant_ttl_ms = 7ull * 24 * 3600000;
	cfg->grant_recheck_ms = 60000;
	cfg->max_jobs_per_uid = 64;
	{
		long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
		uint64_t ram = pages > 0 && psize > 0 ? (uint64_t)pages * (uint64_t)psize
						      : 8ull << 30;
		cfg->shm_max_per_uid = ram / 4;
		cfg->shm_max = ram / 2;
		cfg->decode_max_per_uid = 16;
	}
	config_init_tier(cfg);
}

void config_done(struct config *cfg)
{
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (keys[i].type == KT_STRING) {
			char **p = (char **)((char *)cfg + keys[i].offset);
			free(*p);
			*p = NULL;
		}
	}
}

static int parse_u64_suffix(const char *s, uint64_t *ret_num, const char **ret_end)
{
	char *end;
	unsigned long long v;

	if (*s < '0' || *s > '9')
		return -EINVAL;
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno)
		return -EINVAL;
	*ret_num = v;
	*ret_end = end;
	return 0;
}

int config_parse_size(const char *s, uint64_t *ret)
{
	uint64_t v, mul = 1;
	const char *end;

	if (parse_u64_suffix(s, &v, &end))
		return -EINVAL;
	if (*end) {
		switch (*end) {
		case 'K': case 'k': mul = 1ull << 10; break;
		case 'M': case 'm': mul = 1ull << 20; break;
		case 'G': case 'g': mul = 1ull << 30; break;
		case 'T': case 't': mul = 1ull << 40; break;
		default: return -EINVAL;
		}
		end++;
		if (*end == 'i')
			end++;
		if (*end == 'B' || *end == 'b')
			end++;
		if (*end)
			return -EINVAL;
	}
	if (v > UINT64_MAX / mul)
		return -EINVAL;
	*ret = v * mul;
	return 0;
}

int config_parse_duration_ms(const char *s, uint64_t *ret)
{
	uint64_t v, mul = 1000;
	const char *end;

	if (parse_u64_suffix(s, &v, &end))
		return -EINVAL;
	if (strcmp(end, "ms") == 0)
		mul = 1;
	else if (strcmp(end, "") == 0 || strcmp(end, "s") == 0)
		mul = 1000;
	else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0)
		mul = 60000;
	else if (strcmp(end, "h") == 0)
		mul = 3600000;
	else if (strcmp(end, "d") == 0)
		mul = 24 * 3600000ull;
	else
		return -EINVAL;
	if (v > UINT64_MAX / mul)
		return -EINVAL;
	*ret = v * mul;
	return 0;
}

static int parse_bool(const char *s, bool *ret)
{
	static const char *const yes[] = { "1", "yes", "true", "on" };
	static const char *const no[] = { "0", "no", "false", "off" };

	for (size_t i = 0; i < 4; i++) {
		if (strcasecmp(s, yes[i]) == 0) {
			*ret = true;
			return 0;
		}
		if (strcasecmp(s, no[i]) == 0) {
			*ret = false;
			return 0;
		}
	}
	return -EINVAL;
}

int config_set(struct config *cfg, const char *key, const char *value, const char *where,
	       char *err, size_t errlen)
{
	const struct key *k = NULL;
	char *field;
	uint64_t v = 0;
	const char *want = "";

	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (strcmp(keys[i].name, key) == 0) {
			k = &keys[i];
			break;
		}
	}
	if (!k) {
		snprintf(err, errlen, "%s: unknown key '%s' (dmcached --help-config lists them)",
			 where, key);
		return -EINVAL;
	}
	field = (char *)cfg + k->offset;
	switch (k->type) {
	case KT_STRING: {
		char *copy;
		if (!*value) {
			want = "a non-empty value";
			goto bad;
		}
		copy = strdup(value);
		if (!copy) {
			snprintf(err, errlen, "%s: out of memory", where);
			return -ENOMEM;
		}
		free(*(char **)field);
		*(char **)field = copy;
		return 0;
	}
	case KT_BOOL:
		if (parse_bool(value, (bool *)field)) {
			want = "yes or no";
			goto bad;
		}
		return 0;
	case KT_LEVEL:
		if (log_parse_level(value, (enum log_level *)field)) {
			want = "err, warning, notice, info or debug";
			goto bad;
		}
		return 0;
	case KT_MODE: {
		char *end;
		unsigned long m;
		errno = 0;
		m = strtoul(value, &end, 8);
		if (errno || end == value || *end || m > k->max) {
			want = "octal permission bits such as 0660";
			goto bad;
		}
		*(uint32_t *)field = (uint32_t)m;
		return 0;
	}
	case KT_UINT32:
	case KT_SIZE: {
		const char *end;
		if (k->type == KT_SIZE ? config_parse_size(value, &v)
				       : (parse_u64_suffix(value, &v, &end) || *end)) {
			want = k->type == KT_SIZE ? "a size such as 512K, 64M or 10G"
						  : "a whole number";
			goto bad;
		}
		break;
	}
	case KT_DURATION:
		if (config_parse_duration_ms(value, &v)) {
			want = "a duration such as 500ms, 30s, 5m or 1h";
			goto bad;
		}
		break;
	}
	if (v < k->min || v > k->max) {
		snprintf(err, errlen, "%s: %s = '%s' is out of range [%llu, %llu]%s", where, key,
			 value, (unsigned long long)k->min, (unsigned long long)k->max,
			 k->type == KT_DURATION ? " milliseconds" : "");
		return -EINVAL;
	}
	if (k->type == KT_UINT32)
		*(uint32_t *)field = (uint32_t)v;
	else
		*(uint64_t *)field = v;
	return 0;
bad:
	snprintf(err, errlen, "%s: %s = '%s' is not valid: expected %s", where, key, value, want);
	return -EINVAL;
}

struct load_ctx {
	struct config *cfg;
	const char *path;
	char *err;
	size_t errlen;
	int rc;
};

static int on_ini_line(void *user, const char *section, const char *name, const char *value)
{
	struct load_ctx *ctx = user;
	char where[512];

	/* inih gives the handler no line number; ini_parse returns the first failing line,
	 * and the first message is kept. */
	if (ctx->rc)
		return 1;
	snprintf(where, sizeof(where), "%s", ctx->path);
	if (section && *section) {
		snprintf(ctx->err, ctx->errlen, "%s: sections are not used ('[%s]')", where,
			 section);
		ctx->rc = -EINVAL;
		return 0;
	}
	if (!value) {
		snprintf(ctx->err, ctx->errlen, "%s: '%s' needs '= value'", where, name);
		ctx->rc = -EINVAL;
		return 0;
	}
	ctx->rc = config_set(ctx->cfg, name, value, where, ctx->err, ctx->errlen);
	return ctx->rc == 0;
}

int config_load_file(struct config *cfg, const char *path, char *err, size_t errlen)
{
	struct load_ctx ctx = { cfg, path, err, errlen, 0 };
	FILE *f = fopen(path, "r");
	int line;

	if (!f) {
		int e = errno;
		snprintf(err, errlen, "cannot open config file '%s': %s", path, strerror(e));
		return -e;
	}
	line = ini_parse_file(f, on_ini_line, &ctx);
	fclose(f);
	if (line == 0)
		return 0;
	if (line < 0) {
		snprintf(err, errlen, "cannot read config file '%s'", path);
		return -EIO;
	}
	/* Prefix the message with the line: "FILE:LINE: ..." */
	if (ctx.rc == 0) {
		snprintf(err, errlen, "%s:%d: syntax error (expected 'key = value')", path, line);
	} else {
		char msg[1024];
		size_t plen = strlen(path);
		const char *rest = strncmp(err, path, plen) == 0 ? err + plen : err;
		snprintf(msg, sizeof(msg), "%s:%d%s", path, line, rest);
		snprintf(err, errlen, "%s", msg);
	}
	return ctx.rc ? ctx.rc : -EINVAL;
}

static char *path_join(const char *a, const char *b)
{
	size_t n = strlen(a) + 1 + strlen(b) + 1;
	char *p = malloc(n);

	if (p)
		snprintf(p, n, "%s/%s", a, b);
	return p;
}

int config_finish(struct config *cfg, char *err, size_t errlen)
{
	const char *env;

	if (log_set_debug(cfg->log_debug ? cfg->log_debug : "")) {
		snprintf(err, errlen, "log_debug = '%s': unknown group", cfg->log_debug);
		return -EINVAL;
	}
	if (!cfg->socket_path) {
		if ((env = getenv("DMCACHE_SOCKET")) && *env)
			cfg->socket_path = strdup(env);
		else if (geteuid() == 0)
			cfg->socket_path = strdup("/run/dmcache/dmcached.sock");
		else if ((env = getenv("XDG_RUNTIME_DIR")) && *env)
			cfg->socket_path = path_join(env, "dmcache/dmcached.sock");
		else {
			snprintf(err, errlen, "no socket path: pass --socket, or set DMCACHE_SOCKET "
					      "or XDG_RUNTIME_DIR");
			return -EINVAL;
		}
		if (!cfg->socket_path)
			return -ENOMEM;
	}
	if (cfg->socket_path[0] != '/') {
		snprintf(err, errlen, "socket = '%s': must be an absolute path", cfg->socket_path);
		return -EINVAL;
	}
	if (strlen(cfg->socket_path) >= 108) {
		snprintf(err, errlen, "socket = '%s': longer than a Unix socket path may be (107)",
			 cfg->socket_path);
		return -EINVAL;
	}
	if (!cfg->cache_dir) {
		/* systemd's CacheDirectory= sets CACHE_DIRECTORY */
		if ((env = getenv("CACHE_DIRECTORY")) && *env && !strchr(env, ':'))
			cfg->cache_dir = strdup(env);
		else if (geteuid() == 0)
			cfg->cache_dir = strdup("/var/cache/dmcache");
		else if ((env = getenv("XDG_CACHE_HOME")) && *env)
			cfg->cache_dir = path_join(env, "dmcache");
		else if ((env = getenv("HOME")) && *env)
			cfg->cache_dir = path_join(env, ".cache/dmcache");
		else {
			snprintf(err, errlen, "no cache directory: pass --cache-dir");
			return -EINVAL;
		}
		if (!cfg->cache_dir)
			return -ENOMEM;
	}
	if (cfg->cache_dir[0] != '/') {
		snprintf(err, errlen, "cache_dir = '%s': must be an absolute path", cfg->cache_dir);
		return -EINVAL;
	}
	if (!cfg->servers && !(cfg->servers = strdup(DEFAULT_SERVERS)))
		return -ENOMEM;
	if (!cfg->admin_group && !(cfg->admin_group = strdup(DEFAULT_ADMIN_GROUP)))
		return -ENOMEM;
	{
		struct group *gr = getgrnam(cfg->admin_group);
		cfg->admin_gid = gr ? gr->gr_gid : (gid_t)-1;
	}
	return 0;
}

bool config_trusted_server(const struct config *cfg, const char *url)
{
	const char *p = cfg->servers;
	size_t ulen = strlen(url);

	while (ulen && url[ulen - 1] == '/')
		ulen--;
	while (p && *p) {
		size_t n;
		while (*p == ' ' || *p == ',' || *p == '\t')
			p++;
		n = strcspn(p, " ,\t");
		if (n) {
			size_t m = n;
			while (m && p[m - 1] == '/')
				m--;
			if (m == ulen && strncasecmp(p, url, m) == 0)
				return true;
		}
		p += n;
	}
	return false;
}

/*
 * ---- reload, defaults and the printed key list (outside the table) ----
 *
 * A key is applied by SIGHUP only when every owner reads it from struct config at each
 * use (not a copy taken at start); the others are reported as needing a restart. Checked
 * against the owners: conn.c and server.c (connections, timeouts, write queue, admin_gid
 * at each HELLO), prefetch.c and prefetch_grant.c (max_jobs_per_uid, grant_ttl,
 * grant_recheck), serve.c
 * and serve_arena.c (arena sizes at each arena, shm_max_per_uid, shm_max and
 * decode_max_per_uid at each growth and item; region_linger at each tick, serve_tick()), log.c (levels). max_size and min_free
 * (copied by store.c) and hot_max (copied by the hot set, hot.c) are handed to their owners
 * by the reload (main.c, apply_limits()), which evicts at once what is over a lowered
 * limit. parallel_transfers, max_attempts, min_speed and min_speed_time are copied at
 * start by fetch.c: restart.
 */
static const char *const live_keys[] = {
	"log_level", "log_debug", "max_connections", "max_connections_per_uid",
	"idle_timeout", "hello_timeout", "write_queue_max", "max_jobs_per_uid", "grant_ttl",
	"grant_recheck", "arena_default", "arena_max", "admin_group", "shm_max_per_uid",
	"shm_max", "decode_max_per_uid", "max_size", "min_free", "hot_max", "region_linger",
};

/* Defaults that config_finish() or another component resolves, in words. */
static const struct {
	const char *key, *text;
	bool literal; /* the text is the value itself */
} computed_defaults[] = {
	{ "socket", "$DMCACHE_SOCKET, else /run/dmcache/dmcached.sock as root, else "
		    "$XDG_RUNTIME_DIR/dmcache/dmcached.sock (the systemd socket unit passes its "
		    "own)" },
	{ "cache_dir", "$CACHE_DIRECTORY (systemd's CacheDirectory=), else /var/cache/dmcache "
		       "as root, else $XDG_CACHE_HOME/dmcache or ~/.cache/dmcache" },
	{ "log_debug", "none" },
	{ "ca_file", "the system's CA certificates" },
	{ "tier_url", "none (no cluster tier)" },
	{ "tier_region", "us-east-1", true },
	{ "tier_credentials_file", "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY of the service" },
	{ "servers", DEFAULT_SERVERS, true },
	{ "admin_group", DEFAULT_ADMIN_GROUP, true },
	{ "worker_user", "nobody", true },
	{ "shm_max_per_uid", "a quarter of the machine's memory" },
	{ "shm_max", "half of the machine's memory" },
};

static const char *const type_names[] = {
	[KT_STRING] = "text",	    [KT_UINT32] = "number", [KT_SIZE] = "size",
	[KT_DURATION] = "duration", [KT_MODE] = "octal",    [KT_BOOL] = "yes/no",
	[KT_LEVEL] = "level",
};

static const char *const type_units[] = {
	[KT_STRING] = "",
	[KT_UINT32] = "",
	[KT_SIZE] = "bytes, K/M/G/T suffixes (powers of 1024)",
	[KT_DURATION] = "ms, s, m, h or d; a bare number is seconds",
	[KT_MODE] = "",
	[KT_BOOL] = "yes or no",
	[KT_LEVEL] = "",
};

bool config_key_live(const char *key)
{
	for (size_t i = 0; i < sizeof(live_keys) / sizeof(live_keys[0]); i++)
		if (strcmp(live_keys[i], key) == 0)
			return true;
	return false;
}

static const char *level_name(enum log_level l)
{
	switch (l) {
	case LOG_LVL_ERR: return "err";
	case LOG_LVL_WARNING: return "warning";
	case LOG_LVL_NOTICE: return "notice";
	case LOG_LVL_INFO: return "info";
	case LOG_LVL_DEBUG: return "debug";
	}
	return "?";
}

/* The value of a key as the file would spell it; "" for an unset text. */
static void format_value(const struct key *k, const struct config *cfg, char *buf, size_t cap)
{
	static const struct {
		char c;
		uint64_t mul;
	} sizes[] = { { 'T', 1ull << 40 }, { 'G', 1ull << 30 }, { 'M', 1ull << 20 },
		      { 'K', 1ull << 10 } },
	  durs[] = { { 'h', 3600000 }, { 'm', 60000 }, { 's', 1000 } };
	const char *field = (const char *)cfg + k->offset;
	uint64_t v;

	switch (k->type) {
	case KT_STRING:
		snprintf(buf, cap, "%s", *(char *const *)field ? *(char *const *)field : "");
		return;
	case KT_BOOL:
		snprintf(buf, cap, "%s", *(const bool *)field ? "yes" : "no");
		return;
	case KT_LEVEL:
		snprintf(buf, cap, "%s", level_name(*(const enum log_level *)field));
		return;
	case KT_MODE:
		snprintf(buf, cap, "%04o", (unsigned)*(const uint32_t *)field);
		return;
	case KT_UINT32:
		snprintf(buf, cap, "%u", (unsigned)*(const uint32_t *)field);
		return;
	case KT_SIZE:
		v = *(const uint64_t *)field;
		for (size_t i = 0; v && i < sizeof(sizes) / sizeof(sizes[0]); i++) {
			if (v % sizes[i].mul == 0) {
				snprintf(buf, cap, "%llu%c", (unsigned long long)(v / sizes[i].mul),
					 sizes[i].c);
				return;
			}
		}
		snprintf(buf, cap, "%llu", (unsigned long long)v);
		return;
	case KT_DURATION:
		v = *(const uint64_t *)field;
		for (size_t i = 0; v && i < sizeof(durs) / sizeof(durs[0]); i++) {
			if (v % durs[i].mul == 0) {
				snprintf(buf, cap, "%llu%c", (unsigned long long)(v / durs[i].mul),
					 durs[i].c);
				return;
			}
		}
		snprintf(buf, cap, v ? "%llums" : "%llu", (unsigned long long)v);
		return;
	}
	buf[0] = '\0';
}

/* The default of a key in words: a computed default's description, else its value. */
static void default_text(const struct key *k, const struct config *defaults, char *buf,
			 size_t cap)
{
	for (size_t i = 0; i < sizeof(computed_defaults) / sizeof(computed_defaults[0]); i++) {
		if (strcmp(computed_defaults[i].key, k->name) == 0) {
			snprintf(buf, cap, "%s", computed_defaults[i].text);
			return;
		}
	}
	format_value(k, defaults, buf, cap);
}

/* Prints `text` wrapped at 88 columns, each line starting with `prefix`. */
static void print_wrapped(FILE *out, const char *prefix, const char *text)
{
	const size_t width = 88 - strlen(prefix);

	while (*text) {
		size_t n = strlen(text), cut = n;
		if (n > width) {
			cut = width;
			while (cut > 0 && text[cut] != ' ')
				cut--;
			if (cut == 0)
				cut = strcspn(text, " ");
		}
		fprintf(out, "%s%.*s\n", prefix, (int)cut, text);
		text += cut;
		while (*text == ' ')
			text++;
	}
}

/* "help. Unit: .... Default: .... On change: reload." */
static void key_text(const struct key *k, const char *def, char *buf, size_t cap)
{
	const char *unit = type_units[k->type];

	snprintf(buf, cap, "%s.%s%s%s%s%s%s On change: %s.", k->help, *unit ? " Unit: " : "",
		 unit, *unit ? "." : "", def ? " Default: " : "", def ? def : "", def ? "." : "",
		 config_key_live(k->name) ? "reload" : "restart");
}

void config_print_keys(FILE *out)
{
	struct config defaults;
	char def[512], line[1024];

	config_init(&defaults);
	fprintf(out, "Configuration keys: 'key = value' in the file given with --config (then "
		     "FILE.d/*.conf),\nor -o key=value on the command line. 'reload': applied "
		     "by SIGHUP (systemctl reload\ndmcached); 'restart': read at start only.\n\n");
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		const struct key *k = &keys[i];
		default_text(k, &defaults, def, sizeof(def));
		fprintf(out, "  %-26s %s\n", k->name, type_names[k->type]);
		key_text(k, def, line, sizeof(line));
		print_wrapped(out, "      ", line);
	}
	config_done(&defaults);
}

void config_print_template(FILE *out)
{
	struct config defaults;
	char def[512], line[1024];

	config_init(&defaults);
	fprintf(out,
		"# dmcached.conf: configuration of dmcached, the dmcache daemon (dmcached.conf(5)).\n"
		"#\n"
		"# One 'key = value' per line; '#' starts a comment. Every key is listed below,\n"
		"# commented out, with its default: uncomment a line to change it. Then the files\n"
		"# dmcached.conf.d/*.conf beside this one are read, in lexical order; a key set\n"
		"# again takes the later value. Flags (-o key=value) come last.\n"
		"#\n"
		"# Check an edit with:   dmcached --check-config --config /etc/dmcache/dmcached.conf\n"
		"# Apply it with:        systemctl reload dmcached\n"
		"# Keys marked 'reload' change at once; the log names the others, which need\n"
		"# 'systemctl restart dmcached'. A file with an error is refused as a whole and\n"
		"# the running configuration stays.\n"
		"#\n"
		"# Sizes take K, M, G, T (powers of 1024); durations ms, s, m, h (a bare number\n"
		"# is seconds). This file is generated from the daemon's key table\n"
		"# (dmcached --help-config).\n");
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		const struct key *k = &keys[i];
		bool computed = false;
		for (size_t j = 0; j < sizeof(computed_defaults) / sizeof(computed_defaults[0]); j++)
			computed |= strcmp(computed_defaults[j].key, k->name) == 0 &&
				    !computed_defaults[j].literal;
		default_text(k, &defaults, def, sizeof(def));
		fprintf(out, "\n");
		key_text(k, computed ? def : NULL, line, sizeof(line));
		print_wrapped(out, "# ", line);
		fprintf(out, "#%s =%s%s\n", k->name, computed ? "" : " ", computed ? "" : def);
	}
	config_done(&defaults);
}

int config_load_dropins(struct config *cfg, const char *path, char **ret_files, char *err,
			size_t errlen)
{
	char pattern[4096];
	glob_t g;
	size_t len = 0;
	int rc;

	if (ret_files)
		*ret_files = NULL;
	if (snprintf(pattern, sizeof(pattern), "%s.d/*.conf", path) >= (int)sizeof(pattern)) {
		snprintf(err, errlen, "config file path too long: '%s'", path);
		return -ENAMETOOLONG;
	}
	rc = glob(pattern, GLOB_ERR, NULL, &g); /* sorted: lexical order */
	if (rc == GLOB_NOMATCH)
		return 0;
	if (rc != 0) {
		globfree(&g);
		if (rc == GLOB_ABORTED && errno == ENOENT)
			return 0;
		snprintf(err, errlen, "cannot list '%s.d': %s", path,
			 rc == GLOB_NOSPACE ? "out of memory" : strerror(errno));
		return -EIO;
	}
	for (size_t i = 0; i < g.gl_pathc; i++) {
		rc = config_load_file(cfg, g.gl_pathv[i], err, errlen);
		if (rc < 0) {
			globfree(&g);
			free(ret_files ? *ret_files : NULL);
			if (ret_files)
				*ret_files = NULL;
			return rc;
		}
		if (ret_files) {
			size_t n = strlen(g.gl_pathv[i]);
			char *p = realloc(*ret_files, len + n + 3);
			if (!p) {
				globfree(&g);
				return -ENOMEM;
			}
			snprintf(p + len, n + 3, "%s%s", len ? ", " : "", g.gl_pathv[i]);
			len = strlen(p);
			*ret_files = p;
		}
	}
	globfree(&g);
	return 0;
}

/* Appends ", text" (or "text" to an empty buffer); a full buffer keeps what fits. */
static void append(char *buf, size_t cap, const char *text)
{
	size_t n = strlen(buf);

	if (n < cap)
		snprintf(buf + n, cap - n, "%s%s", n ? ", " : "", text);
}

void config_reload(struct config *running, struct config *next, char *changed, size_t clen,
		   char *restart, size_t rlen)
{
	char a[256], b[256], what[600];

	changed[0] = restart[0] = '\0';
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		const struct key *k = &keys[i];
		char *fr = (char *)running + k->offset, *fn = (char *)next + k->offset;
		size_t size = k->type == KT_STRING ? sizeof(char *)
			    : k->type == KT_BOOL  ? sizeof(bool)
			    : k->type == KT_LEVEL ? sizeof(enum log_level)
			    : k->type == KT_UINT32 || k->type == KT_MODE ? sizeof(uint32_t)
									  : sizeof(uint64_t);
		bool same;

		format_value(k, running, a, sizeof(a));
		format_value(k, next, b, sizeof(b));
		same = k->type == KT_STRING ? strcmp(a, b) == 0 : memcmp(fr, fn, size) == 0;
		if (same)
			continue;
		if (!config_key_live(k->name)) {
			append(restart, rlen, k->name);
			continue;
		}
		snprintf(what, sizeof(what), "%s = '%s' (was '%s')", k->name, b, a);
		append(changed, clen, what);
		/* swap: `next` frees the old value (a text) with config_done() */
		{
			char tmp[sizeof(uint64_t) > sizeof(char *) ? sizeof(uint64_t) : sizeof(char *)];
			memcpy(tmp, fr, size);
			memcpy(fr, fn, size);
			memcpy(fn, tmp, size);
		}
		if (strcmp(k->name, "admin_group") == 0)
			running->admin_gid = next->admin_gid;
	}
}
