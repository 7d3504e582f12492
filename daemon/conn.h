/*
 * One client connection: framing, backpressure, timeouts and request dispatch.
 *
 * A connection is created by the server at accept and freed only from the close callback
 * of its last libuv handle (libuv design.rst). conn_close() marks it closing and closes
 * the handles; every callback starts with `if (c->closing)`. Loop thread only.
 *
 * Receive buffer: fixed per connection (64 KiB, grown once to hold a maximum-size frame
 * when a header announces one); a frame is processed in place. No allocation per read.
 * Backpressure: while more than cfg->write_queue_max bytes of replies are unsent, the
 * connection's requests are not read; a client that never reads costs bounded memory.
 *
 * Descriptors from the client (SCM_RIGHTS; proto.h: LOCAL folders): the socket is read with
 * recvmsg() through a uv_poll on a duplicate of it (libuv's stream reads drop them), and
 * received descriptors wait in a queue of at most CONN_FDS_QUEUED. A frame whose header
 * says nfds = k takes the k oldest; fewer queued than announced is a protocol error. While
 * its handler runs they are offered by conn_take_fds(); those not taken are closed after.
 */
#ifndef DMC_CONN_H
#define DMC_CONN_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

#include "proto.h"

struct server;

struct conn {
	uv_pipe_t pipe;
	uv_timer_t timer; /* hello timeout, then idle timeout */
	struct server *srv;
	struct conn *prev, *next;

	uid_t uid; /* from SO_PEERCRED at accept; never from a payload */
	gid_t gid;
	pid_t pid;
	bool admin; /* root, the daemon's own uid, or a member of admin_group (at accept) */

	uint8_t *rbuf;
	size_t rlen, rcap;
	size_t wq_bytes; /* reply bytes handed to libuv and not yet written */
	uint32_t version; /* negotiated protocol version; 0 before HELLO */

	bool closing;
	bool paused;   /* reads stopped for backpressure */
	bool counted;  /* included in the server's per-uid counts */
	bool close_after_write; /* close once the queued replies are written */
	bool failed;   /* a send failed: closed on the next loop turn (conn_send) */
	void *app_data;        /* the serving side's state for this connection */
	/* a frame that carries a descriptor, waiting for the write queue to drain */
	uint8_t *fd_frame;
	size_t fd_frame_len;
	int fd_to_pass[2]; /* duplicates, closed once sent */
	unsigned n_fd_to_pass;
	uint8_t open_handles;
	/* reading with recvmsg (descriptors): see the header comment */
	uv_poll_t rpoll;
	int rfd;           /* a duplicate of the socket, polled for reading */
	int *fdq;          /* received descriptors, oldest first */
	unsigned fdq_n;
	int *rx_fds;       /* the frame being handled: its descriptors (-1 once taken) */
	unsigned rx_nfds;
};

#define CONN_FDS_QUEUED (2u * DMC_FDS_MAX)

/*
 * Moves up to `max` descriptors of the frame being handled into `out` (the caller owns
 * them). Returns how many; 0 outside a handler or when the frame had none.
 */
unsigned conn_take_fds(struct conn *c, int *out, unsigned max);

/*
 * Accepts one pending connection from the server's listener. Refusals (limits, overflow
 * uid, stopping) are answered with an ERROR frame and closed; they are not errors here.
 */
void conn_accept(struct server *srv);

/* Starts closing `c`; it is freed when its handles are closed. Idempotent. */
void conn_close(struct conn *c);

/*
 * Queues one complete frame (header included) for writing; the bytes are copied.
 * Returns 0 or negative errno. On failure the connection is closed on the next loop turn,
 * never under the caller: the caller (a job pumping, a notifier walking its subscribers)
 * may hold what the app's conn_closed callback frees. Until then every send fails with
 * -EPIPE and no more of the client's frames are handled.
 */
int conn_send(struct conn *c, const void *frame, size_t len);

/*
 * Sends one frame with descriptor `fd` attached (SCM_RIGHTS, with the frame's first byte;
 * the header must say nfds = 1). `fd` is borrowed: the peer gets a duplicate. Frames queued
 * before go out first. Returns 0 or negative errno (the connection is then closed as after conn_send).
 */
int conn_send_fd(struct conn *c, const void *frame, size_t len, int fd);
/* The same with `n` descriptors (1 or 2: an arena's and a region's), in the order given. */
int conn_send_fds(struct conn *c, const void *frame, size_t len, const int *fds, unsigned n);
/* Whether a frame with descriptors waits to go out (conn_send_fds would say -EBUSY). */
bool conn_fd_busy(const struct conn *c);

/* Sends an ERROR frame for request `request_id`. `resource` may be NULL. */
int conn_send_error(struct conn *c, uint32_t request_id, uint32_t code, const char *resource,
		    const char *fmt, ...) __attribute__((format(printf, 5, 6)));

/* conn_send_error with the upstream HTTP status in the frame (0: none). Only for a status
 * that concerns the caller's own request (e.g. the server refused the caller's key). */
int conn_send_error_http(struct conn *c, uint32_t request_id, uint32_t code,
			 uint32_t http_status, const char *resource, const char *fmt, ...)
	__attribute__((format(printf, 6, 7)));

#endif
