/*
 * The listening socket and the set of connections.
 *
 * The server owns every struct conn (conn.h) through an intrusive list and the per-uid
 * connection counts. Everything here runs on the loop thread. Lifecycle: server_init()
 * -> server_listen() -> ... -> server_stop() (stops accepting, closes connections) ->
 * the loop runs until every handle is closed -> server_done().
 *
 * Glossary: "peer" is the process at the other end of a connection, identified by the
 * uid/gid/pid that SO_PEERCRED reported at accept; nothing in a payload can change it.
 */
#ifndef DMC_SERVER_H
#define DMC_SERVER_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "conf.h"
#include "proto.h"

struct conn;

struct uid_count {
	uid_t uid;
	uint32_t n;
};

struct server_stats {
	uint64_t accepted;         /* connections accepted since start */
	uint64_t refused;          /* refused: limits, overflow uid, stopping */
	uint64_t protocol_errors;  /* connections closed for a malformed frame */
	uint64_t requests;         /* frames dispatched */
	uint64_t unknown_opcodes;  /* requests answered DMC_E_UNSUPPORTED */
	uint64_t idle_closed;      /* connections closed by a timeout */
	uint64_t backpressure;     /* times a connection's reads were paused */
};

/* What the rest of the daemon adds to connections: more requests, more STATUS. */
struct server_app {
	void *ctx;
	/* true when the request was handled (answered now or later) */
	bool (*dispatch)(void *ctx, struct conn *c, const struct dmc_header *h,
			 const uint8_t *payload);
	void (*conn_closed)(void *ctx, struct conn *c);
	uint32_t (*status)(void *ctx, const struct conn *c, struct dmc_status_entry *e,
			   uint32_t max);
};

struct server {
	uv_loop_t *loop;
	struct server_app app;
	const struct config *cfg;
	uv_pipe_t listener;
	bool listener_open;
	/* a connection that could not be accepted for want of memory is accepted again later:
	 * libuv stops reading the listener until its pending one is taken (server_accept_later) */
	uv_timer_t accept_retry;
	bool accept_retry_on;
	bool stopping;
	/* the socket file we created (not one passed by systemd), removed at stop if still ours */
	char *socket_path;
	dev_t socket_dev;
	ino_t socket_ino;
	bool own_socket;

	struct conn *conns; /* intrusive doubly linked list */
	uint32_t n_conns;
	struct uid_count *uids; /* uids with at least one connection; a short array */
	uint32_t n_uids, cap_uids;

	uint64_t start_ms; /* uv_now() at init */
	struct server_stats stats;
};

int server_init(struct server *srv, uv_loop_t *loop, const struct config *cfg);

/*
 * conn_accept() could not take the pending connection (no memory): try again in 100 ms.
 * Until it is taken, libuv reads no further connections from the listener.
 */
void server_accept_later(struct server *srv);

/*
 * Listens on `activated_fd` (>= 3, from socket activation) or, when it is 0, on the
 * configured path, created safely: the directory must be ours and not writable by others,
 * symlinks are refused, only a stale socket of our own uid is removed. On failure returns
 * negative errno with a message in `err`.
 */
int server_listen(struct server *srv, int activated_fd, char *err, size_t errlen);

/* Stops accepting and closes every connection. Idempotent. */
void server_stop(struct server *srv);

/* Frees what server_init allocated; after the loop has closed every handle. */
void server_done(struct server *srv);

/* Connections of `uid` right now. */
uint32_t server_uid_connections(const struct server *srv, uid_t uid);

/* Bookkeeping called by conn.c. */
int server_uid_add(struct server *srv, uid_t uid);
void server_uid_remove(struct server *srv, uid_t uid);

/*
 * Fills STATUS entries for a reply to connection `c` (borrowed names, static storage).
 * Returns the number written, at most `max`.
 */
uint32_t server_status(struct server *srv, struct conn *c, struct dmc_status_entry *entries,
		       uint32_t max);

#endif
