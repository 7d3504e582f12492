/*
 * dmcache CLI: what the command files share (cli.c has main() and the small commands,
 * cli_prefetch.c the prefetch command, cli_cache.c ls, evict and verify).
 *
 * Exit status of every command: 0 success, 1 the daemon answered with an error (or the
 * job it ran had failures), 2 usage or configuration error, 3 the daemon could not be
 * reached or the connection was lost, 130 prefetch detached by Ctrl-C.
 */
#ifndef DMC_CLI_H
#define DMC_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dmcache.h"

#define EXIT_DAEMON_ERROR 1
#define EXIT_USAGE 2
#define EXIT_UNREACHABLE 3
#define EXIT_DETACHED 130 /* 128 + SIGINT, as shells report it */

#define CLI_TIMEOUT_MS 30000

/* --socket, or NULL for the default candidates. */
extern const char *cli_socket;

/* Connects with the given timeout (0: none), or explains why not and returns NULL. */
dmc_client *cli_connect(uint32_t timeout_ms);

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
int cmd_get(int argc, char **argv);

#endif
