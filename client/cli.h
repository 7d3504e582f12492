/*
 * dmcache CLI: what the command files share (cli.c has main() and the small commands,
 * cli_prefetch.c the prefetch command, cli_cache.c ls, evict and verify).
 *
 * Exit status of every command: 0 success, 1 the daemon answered with an error (or the
 * job it ran had failures, verify found bad files, evict found nothing of that name), 2
 * usage or configuration error, 3 the daemon could not be reached or the connection was
 * lost, 4 a local error (an output file or stdout could not be written, out of memory),
 * 130 prefetch detached by Ctrl-C. Documented in dmcache(1) and the README: keep them equal.
 *
 * One wording per problem, from the helpers below: unknown options (with a suggestion),
 * missing option values, unexpected operands, a missing API key, a failed local write.
 */
#ifndef DMC_CLI_H
#define DMC_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <getopt.h>
#include <jansson.h>

#include "dmcache.h"

#define EXIT_DAEMON_ERROR 1
#define EXIT_USAGE 2
#define EXIT_UNREACHABLE 3
#define EXIT_LOCAL 4
#define EXIT_DETACHED 130 /* 128 + SIGINT, as shells report it */

#define CLI_TIMEOUT_MS 30000

/* --socket, or NULL for the default candidates. */
extern const char *cli_socket;

/* Connects with the given timeout (0: none), or explains why not and returns NULL. */
dmc_client *cli_connect(uint32_t timeout_ms);

/*
 * getopt_long with the CLI's messages: an unknown option is reported with the closest
 * option of `opts` when it looks like a typo ("did you mean '--version'?"), an option
 * without its value is named. `cmd` is the command ("prefetch"), or NULL for the options
 * before it. Returns what getopt_long returns; every error is reported on stderr and
 * returned as '?'. The caller resets optind first, as for getopt_long.
 */
int cli_getopt(int argc, char **argv, const char *cmd, const char *shortopts,
	       const struct option *opts);
/* The closest of names[0..n) to `word` when `word` is one or two typos away, else NULL. */
const char *cli_suggest(const char *word, const char *const *names, size_t n);
/* "dmcache CMD: unexpected argument 'ARG' (dmcache CMD --help)"; returns EXIT_USAGE. */
int cli_unexpected(const char *cmd, const char *arg);
/* The one message for a missing Datamint API key (`file`: the YAML file looked at, or
 * NULL); returns EXIT_USAGE. */
int cli_no_key(const char *cmd, const char *file);
/* "dmcache CMD: cannot write 'PATH': REASON" (err: a positive errno); returns EXIT_LOCAL. */
int cli_write_failed(const char *cmd, const char *path, int err);
/* "dmcache CMD: out of memory"; returns EXIT_LOCAL. */
int cli_no_memory(const char *cmd);
/* Prints `o` as indented JSON on stdout and releases it; 0, or EXIT_LOCAL. */
int cli_print_json(json_t *o);

/* Prints a failed call's error and returns the exit status it deserves. */
int cli_report(dmc_client *c, const char *what, int rc);

/* "1.2 GiB", "512 B": IEC units, one decimal. */
void cli_format_bytes(char *buf, size_t len, uint64_t bytes);
/* "45s", "1m 52s", "2h 03m", "3d 4h": for ETAs and elapsed times. */
void cli_format_seconds(char *buf, size_t len, uint64_t ms);
/* DMCACHE_OFFLINE is set to 1 (or yes/true): as if --offline were given. */
bool cli_offline_env(void);
/* Milliseconds of CLOCK_MONOTONIC. */
int64_t cli_now_ms(void);

int cmd_prefetch(int argc, char **argv);
int cmd_ls(int argc, char **argv);
int cmd_evict(int argc, char **argv);
int cmd_verify(int argc, char **argv);
int cmd_tier(int argc, char **argv);
int cmd_get(int argc, char **argv);
int cmd_metrics(int argc, char **argv);

#endif
