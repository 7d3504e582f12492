/*
 * libdmcache: the C client library of dmcached.
 *
 * Blocking calls over the daemon's Unix socket, speaking the protocol of proto.h (which
 * this header includes and the library exports). One dmc_client is one connection; it is
 * not thread-safe: use one per thread, or lock around it. After fork(), the child must
 * not use the parent's client: dmc_close() it and connect again.
 *
 * Errors: every call returns an int, >= 0 on success. A negative value is either a
 * negated errno (-ECONNREFUSED, ...) or a negated enum dmc_error code (-DMC_E_..., all
 * >= 1001) sent by the daemon. dmc_strerror() describes both; for daemon errors,
 * dmc_last_error() has the daemon's message and details.
 *
 * Lifetimes: strings returned by accessor functions are owned by the client and valid
 * until the next call on it or dmc_close(). Objects returned through ret_ pointers are
 * owned by the caller and freed with the matching _free function.
 *
 * The library never logs and never writes to stdout or stderr.
 */
#ifndef DMCACHE_H
#define DMCACHE_H

#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dmc_client dmc_client;

/* Socket paths a client tries, in order (DESIGN.md section 1):
 * $DMCACHE_SOCKET alone when set; otherwise /run/dmcache/dmcached.sock (system daemon),
 * then $XDG_RUNTIME_DIR/dmcache/dmcached.sock (a user's own daemon). */
#define DMC_SOCKET_SYSTEM "/run/dmcache/dmcached.sock"
#define DMC_SOCKET_PATH_MAX 108
#define DMC_SOCKET_CANDIDATES_MAX 2

/* Fills `paths` with the candidate socket paths; returns how many (0..2). */
int dmc_socket_candidates(char paths[DMC_SOCKET_CANDIDATES_MAX][DMC_SOCKET_PATH_MAX]);

/*
 * Connects to the daemon and says HELLO. `socket_path` NULL means the candidates above:
 * the first that exists is used. Before anything is sent, the daemon's uid (SO_PEERCRED)
 * must be root, the caller's own, or the system user "dmcache"; otherwise -EPERM: a socket
 * squatted by another user never receives a request.
 *
 * On success *ret_client is set; free it with dmc_close(). Errors: -ENOENT (no socket),
 * -ECONNREFUSED (no daemon listening), -EPERM (untrusted daemon uid), -EPROTO,
 * -DMC_E_UNSUPPORTED (no common protocol version), -DMC_E_OVERLOADED, ...
 */
int dmc_connect(const char *socket_path, dmc_client **ret_client);

/* Closes the connection and frees the client. NULL is allowed. */
void dmc_close(dmc_client *c);

/* Milliseconds a blocking call may wait for the daemon; 0 (the default) waits forever.
 * A call that times out returns -ETIMEDOUT and the connection is closed. */
void dmc_set_timeout(dmc_client *c, uint32_t ms);

/* The path connected to; owned by the client. */
const char *dmc_socket_path(const dmc_client *c);
/* The daemon's version string from HELLO ("dmcached 0.1.0"); owned by the client. */
const char *dmc_daemon_version(const dmc_client *c);
/* The negotiated protocol version. */
uint32_t dmc_protocol_version(const dmc_client *c);

/* Round trip with the daemon. */
int dmc_ping(dmc_client *c);

/* The daemon's status: its version, uptime and named counters (proto.h, STATUS). */
struct dmc_status_counter {
	char *name;
	int64_t value;
};
struct dmc_status_info {
	char *version;
	uint64_t uptime_ms;
	uint32_t pid;
	uint32_t n_counters;
	struct dmc_status_counter *counters;
};

/* On success *ret_status is set; free it with dmc_status_free(). */
int dmc_status(dmc_client *c, struct dmc_status_info **ret_status);
void dmc_status_free(struct dmc_status_info *s);
/* A counter's value by name, or `fallback` when the daemon did not send it. */
int64_t dmc_status_get(const struct dmc_status_info *s, const char *name, int64_t fallback);

/* Details of the last error the daemon sent on this client; code 0 when none. */
struct dmc_error_info {
	uint32_t code;           /* enum dmc_error */
	uint32_t http_status;    /* upstream HTTP status, or 0 */
	uint32_t retry_after_ms; /* or 0 */
	int32_t sys_errno;       /* for DMC_E_IO, or 0 */
	const char *resource;    /* "" when none */
	const char *message;     /* the daemon's message, or a local one */
};
const struct dmc_error_info *dmc_last_error(const dmc_client *c);

/* A static description of an error returned by this library (negative) or a code. */
const char *dmc_strerror(int err);

/* The library's version, "0.1.0". */
const char *dmc_version(void);

#ifdef __cplusplus
}
#endif

#endif /* DMCACHE_H */
