/*
 * dmcached configuration: defaults, then a `key = value` file (--config), then its drop-ins
 * (the .conf files in FILE.d), then command-line flags. (The generated build configuration is
 * "config.h".) Every value is validated when it is read; an unknown key or a bad value is
 * an error naming the file and line. Owned by main() on the loop thread; changed only by
 * a SIGHUP reload (config_reload()), on the loop thread, for the keys whose owners read
 * them at each use.
 *
 * Keys are listed in one table in conf.c (name, type, bounds, help); `dmcached
 * --help-config` prints it, `--help-config=conf` the commented dmcached.conf. Sizes take K/M/G/T suffixes (powers of 1024), durations take
 * ms/s/m/h (a bare number is seconds).
 */
#ifndef DMC_CONF_H
#define DMC_CONF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "log.h"

struct config {
	char *socket_path;         /* resolved by config_finish() */
	uint32_t socket_mode;      /* permission bits of the socket file */
	char *cache_dir;           /* resolved by config_finish() */
	enum log_level log_level;
	char *log_debug;           /* groups with debug output */
	uint32_t max_connections;
	uint32_t max_connections_per_uid;
	uint64_t idle_timeout_ms;  /* 0: never */
	uint64_t hello_timeout_ms; /* from accept to a complete HELLO */
	uint64_t write_queue_max;  /* bytes of unsent replies before a connection's reads pause */
	uint32_t listen_backlog;
	bool allow_user_namespace; /* run although peers may appear as the overflow uid */

	/* the cache (store.h, index.h) */
	uint64_t max_size;         /* bytes of blob files; 0: no limit */
	uint64_t min_free;         /* bytes to keep free on the cache's file system */
	uint64_t max_object;       /* largest object stored or downloaded */
	uint32_t zstd_level;
	bool sync_full;            /* sync the index at every batch (survives power loss) */
	uint64_t start_walk_ms;    /* the start's walk before READY; the rest in the background */

	/* upstream transfers (fetch.h) */
	uint32_t parallel_transfers;
	uint32_t per_host_connections;
	uint64_t connect_timeout_ms;
	uint32_t low_speed_limit;  /* bytes/s */
	uint64_t low_speed_time_ms;
	uint64_t min_speed;        /* bytes/s a file download keeps up on average; 0: none */
	uint64_t min_speed_time_ms;
	uint32_t max_attempts;
	uint64_t backoff_base_ms;
	uint64_t backoff_max_ms;
	uint64_t retry_budget_ms;
	char *ca_file;

	/* serving (serve.h) and decoding (decode_pool.h) */
	uint64_t arena_default;    /* shared memory per connection when the client names none */
	uint64_t arena_max;        /* the most a client may ask for */
	uint64_t hot_max;          /* decoded tensors kept in memory, shared by all clients */
	uint64_t region_linger_ms; /* a region without handles is kept this long; 0: goes at once */
	uint32_t decode_workers;   /* 0: one per core */
	uint64_t max_decode_bytes; /* largest decoded item */
	uint64_t decode_timeout_ms;

	/* the trust boundary (docs/security.md) */
	char *servers;             /* configured Datamint servers, space-separated */
	char *admin_group;
	gid_t admin_gid;           /* resolved by config_finish(); (gid_t)-1 if none */
	uint64_t grant_ttl_ms;     /* 0: always ask the server */
	uint64_t grant_recheck_ms; /* online OPEN from a grant this fresh, checked after; 0: never */
	uint32_t max_jobs_per_uid; /* prefetch jobs one uid may have running */
	/* process privileges (decode_pool.h) */
	char *worker_user;         /* NULL: "nobody"; used only when the daemon runs as root */

	/* fair shares between local users (serve.h) */
	uint64_t shm_max_per_uid;  /* shared memory committed in one uid's arenas */
	uint64_t shm_max;          /* shared memory committed in all arenas */
	uint32_t decode_max_per_uid; /* items of one uid in flight (read, decoded, held) */
	/* the cluster tier (tier.h); NULL tier_url: none */
	char *tier_url;
	char *tier_region;
	char *tier_prefix;
	char *tier_credentials_file;
	uint64_t tier_retention_ms; /* dmcache tier gc: mappings older than this go */
};

/* Fills in the defaults. */
void config_init(struct config *cfg);
void config_done(struct config *cfg);

/*
 * Sets one key from text. `where` names the origin for messages ("FILE:LINE" or
 * "command line"). On error returns -EINVAL and writes a message to `err`.
 */
int config_set(struct config *cfg, const char *key, const char *value, const char *where,
	       char *err, size_t errlen);

/* Reads a config file. On error returns negative errno and writes a message to `err`. */
int config_load_file(struct config *cfg, const char *path, char *err, size_t errlen);

/*
 * Resolves the defaults that depend on the environment (socket and cache paths, as
 * `dmcached --help-config` describes them) and checks the values against each other.
 */
int config_finish(struct config *cfg, char *err, size_t errlen);

/*
 * Is `url` one of the configured Datamint servers (`servers`)? Compared as text, without
 * trailing slashes; scheme and host case-insensitively.
 */
bool config_trusted_server(const struct config *cfg, const char *url);

/* Prints every key with its type, default, unit, help and whether SIGHUP applies it. */
void config_print_keys(FILE *out);

/* Prints the commented dmcached.conf installed in /etc/dmcache: every key, its default. */
void config_print_template(FILE *out);

/*
 * Reads the .conf files in PATH.d, in lexical order (a missing directory is no error). `ret_files`, if
 * not NULL, receives the files read, comma-separated (NULL if none; free()).
 */
int config_load_dropins(struct config *cfg, const char *path, char **ret_files, char *err,
			size_t errlen);

/* Does SIGHUP apply this key (its owners read struct config at each use)? */
bool config_key_live(const char *key);

/*
 * Reload: `next` is a complete, finished configuration. The keys SIGHUP applies move from
 * `next` into `running` (their old values into `next`, freed with it); `changed` receives
 * "key = 'new' (was 'old')" for each, `restart` the names of the other keys that differ.
 */
void config_reload(struct config *running, struct config *next, char *changed, size_t clen,
		   char *restart, size_t rlen);

/* Parsers shared with the command line; -EINVAL on malformed or out-of-range text. */
int config_parse_size(const char *s, uint64_t *ret);
int config_parse_duration_ms(const char *s, uint64_t *ret);

#endif
