/* Client connections: see conn.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "config.h"
#include "conf.h"
#include "conn.h"
#include "log.h"
#include "server.h"

#define RBUF_INITIAL (64u << 10)
#define RBUF_MAX (DMC_HEADER_SIZE + DMC_FRAME_MAX)
#define OVERFLOW_UID 65534 /* what a peer in another user namespace appears as */

struct wreq {
	uv_write_t req;
	struct conn *c;
	size_t len;
	uint8_t data[];
};

static void dispatch(struct conn *c, const struct dmc_header *h, const uint8_t *payload);
static void on_poll(uv_poll_t *handle, int status, int events);
static void process(struct conn *c);

static int reads_start(struct conn *c)
{
	return uv_poll_start(&c->rpoll, UV_READABLE | UV_DISCONNECT, on_poll);
}

static int reads_stop(struct conn *c)
{
	return uv_poll_stop(&c->rpoll);
}

/* ---- lifetime ---- */

static void on_handle_closed(uv_handle_t *handle)
{
	struct conn *c = handle->data;

	if (handle == (uv_handle_t *)&c->rpoll && c->rfd >= 0) {
		close(c->rfd); /* only once libuv polls it no more */
		c->rfd = -1;
	}
	if (--c->open_handles)
		return;
	for (unsigned i = 0; i < c->fdq_n; i++)
		close(c->fdq[i]);
	free(c->fdq);
	for (unsigned i = 0; c->fd_frame && i < c->n_fd_to_pass; i++)
		close(c->fd_to_pass[i]);
	free(c->fd_frame);
	explicit_bzero(c->rbuf, c->rlen); /* frames carry API keys */
	free(c->rbuf);
	free(c);
}

/* A send failed: close on the next loop turn, not under the sender (conn.h, conn_send). */
static void on_failed(uv_timer_t *t)
{
	conn_close(t->data);
}

static void conn_fail(struct conn *c)
{
	if (c->closing || c->failed)
		return;
	c->failed = true;
	uv_timer_start(&c->timer, on_failed, 0, 0);
}

/* Writes a frame with descriptors now: the socket's queue in libuv is empty. */
static int send_fd_now(struct conn *c, const uint8_t *frame, size_t len, const int *fds,
		       unsigned nfds)
{
	char cbuf[CMSG_SPACE(sizeof(int) * 2)];
	struct iovec iov = { (void *)frame, len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			      .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *cm;
	uv_os_fd_t sock;
	ssize_t n;

	memset(cbuf, 0, sizeof(cbuf));
	cm = CMSG_FIRSTHDR(&msg);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
	memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
	msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
	if (uv_fileno((uv_handle_t *)&c->pipe, &sock) != 0)
		return -EBADF;
	do
		n = sendmsg(sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		/* a client that does not read even this first small frame is not served */
		log_debug(NET, "cannot pass a descriptor to uid %u: %s", (unsigned)c->uid,
			  strerror(errno));
		n = -errno;
		conn_fail(c);
		return (int)n;
	}
	if ((size_t)n < len)
		return conn_send(c, frame + n, len - (size_t)n); /* the descriptor went with byte 0 */
	return 0;
}

int conn_send_fd(struct conn *c, const void *frame, size_t len, int fd)
{
	return conn_send_fds(c, frame, len, &fd, 1);
}

bool conn_fd_busy(const struct conn *c)
{
	return c->fd_frame != NULL;
}

int conn_send_fds(struct conn *c, const void *frame, size_t len, const int *fds, unsigned n)
{
	if (c->closing || c->failed)
		return -EPIPE;
	if (n < 1 || n > 2)
		return -EINVAL;
	if (c->fd_frame)
		return -EBUSY; /* one at a time: a connection passes few descriptors */
	if (c->wq_bytes == 0)
		return send_fd_now(c, frame, len, fds, n);
	c->n_fd_to_pass = 0;
	for (unsigned i = 0; i < n; i++) {
		/* duplicates: the owner may close its own before the queue drains */
		int d = fcntl(fds[i], F_DUPFD_CLOEXEC, 0);
		if (d < 0) {
			int e = -errno;
			for (unsigned k = 0; k < c->n_fd_to_pass; k++)
				close(c->fd_to_pass[k]);
			c->n_fd_to_pass = 0;
			conn_fail(c);
			return e;
		}
		c->fd_to_pass[c->n_fd_to_pass++] = d;
	}
	c->fd_frame = malloc(len);
	if (!c->fd_frame) {
		for (unsigned k = 0; k < c->n_fd_to_pass; k++)
			close(c->fd_to_pass[k]);
		c->n_fd_to_pass = 0;
		conn_fail(c);
		return -ENOMEM;
	}
	memcpy(c->fd_frame, frame, len);
	c->fd_frame_len = len;
	return 0;
}

void conn_close(struct conn *c)
{
	struct server *srv = c->srv;

	if (c->closing)
		return;
	c->closing = true;
	if (c->prev)
		c->prev->next = c->next;
	else
		srv->conns = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
	srv->n_conns--;
	if (c->counted)
		server_uid_remove(srv, c->uid);
	if (srv->app.conn_closed)
		srv->app.conn_closed(srv->app.ctx, c);
	uv_close((uv_handle_t *)&c->timer, on_handle_closed);
	if (c->rfd >= 0)
		uv_close((uv_handle_t *)&c->rpoll, on_handle_closed);
	uv_close((uv_handle_t *)&c->pipe, on_handle_closed);
}

/* ---- timers ---- */

static void on_timeout(uv_timer_t *t)
{
	struct conn *c = t->data;

	if (c->closing)
		return;
	log_debug(NET, "closing connection of uid %u: %s timeout", (unsigned)c->uid,
		  c->version ? "idle" : "hello");
	c->srv->stats.idle_closed++;
	conn_close(c);
}

static void arm_timer(struct conn *c)
{
	if (c->failed)
		return; /* the timer closes it on the next turn */
	uint64_t ms = c->version ? c->srv->cfg->idle_timeout_ms : c->srv->cfg->hello_timeout_ms;

	if (ms)
		uv_timer_start(&c->timer, on_timeout, ms, 0);
	else
		uv_timer_stop(&c->timer);
}

/* ---- writing ---- */

static void resume_reading(struct conn *c)
{
	if (!c->paused || c->closing || c->failed || c->close_after_write)
		return;
	if (reads_start(c) == 0) {
		c->paused = false;
		process(c); /* frames that arrived while paused */
	}
}

static void on_written(uv_write_t *req, int status)
{
	struct wreq *w = (struct wreq *)req;
	struct conn *c = w->c;

	c->wq_bytes -= w->len;
	free(w);
	if (c->closing || c->failed)
		return;
	if (status < 0) {
		log_debug(NET, "write to uid %u failed: %s", (unsigned)c->uid, uv_strerror(status));
		conn_close(c);
		return;
	}
	if (c->close_after_write && c->wq_bytes == 0) {
		conn_close(c);
		return;
	}
	if (c->fd_frame && c->wq_bytes == 0) {
		uint8_t *f = c->fd_frame;
		c->fd_frame = NULL;
		send_fd_now(c, f, c->fd_frame_len, c->fd_to_pass, c->n_fd_to_pass);
		free(f);
		for (unsigned i = 0; i < c->n_fd_to_pass; i++)
			close(c->fd_to_pass[i]);
		c->n_fd_to_pass = 0;
		if (c->closing || c->failed)
			return;
	}
	if (c->paused && c->wq_bytes <= c->srv->cfg->write_queue_max / 2)
		resume_reading(c);
}

int conn_send(struct conn *c, const void *frame, size_t len)
{
	struct wreq *w;
	uv_buf_t buf;
	int rc;

	if (c->closing || c->failed)
		return -EPIPE;
	if (c->wq_bytes == 0) {
		/* nothing queued: write now, and queue (a copy of) only what the socket did not
		 * take, so that a reply costs no allocation while the client keeps up */
		buf = uv_buf_init((char *)frame, (unsigned)len);
		rc = uv_try_write((uv_stream_t *)&c->pipe, &buf, 1);
		if (rc == (int)len)
			return 0;
		if (rc > 0) {
			frame = (const uint8_t *)frame + rc;
			len -= (size_t)rc;
		} else if (rc != UV_EAGAIN) {
			conn_fail(c);
			return rc;
		}
	}
	w = malloc(sizeof(*w) + len);
	if (!w) {
		conn_fail(c);
		return -ENOMEM;
	}
	w->c = c;
	w->len = len;
	memcpy(w->data, frame, len);
	buf = uv_buf_init((char *)w->data, (unsigned)len);
	rc = uv_write(&w->req, (uv_stream_t *)&c->pipe, &buf, 1, on_written);
	if (rc < 0) {
		free(w);
		conn_fail(c);
		return rc;
	}
	c->wq_bytes += len;
	return 0;
}

static int send_error_v(struct conn *c, uint32_t request_id, uint32_t code,
			uint32_t http_status, const char *resource, const char *fmt, va_list ap)
	__attribute__((format(printf, 6, 0)));

static int send_error_v(struct conn *c, uint32_t request_id, uint32_t code,
			uint32_t http_status, const char *resource, const char *fmt, va_list ap)
{
	char msg[1024];
	uint8_t frame[DMC_HEADER_SIZE + 64 + sizeof(msg) + 512];
	struct dmc_error_msg m = { .code = code, .http_status = http_status };
	int n;

	n = vsnprintf(msg, sizeof(msg), fmt, ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof(msg))
		n = sizeof(msg) - 1;
	m.message.ptr = msg;
	m.message.len = (uint32_t)n;
	m.resource.ptr = resource ? resource : "";
	m.resource.len = resource ? (uint32_t)strnlen(resource, 511) : 0;
	n = dmc_error_encode(&m, request_id, frame, sizeof(frame));
	if (n < 0)
		return -EINVAL;
	return conn_send(c, frame, (size_t)n);
}

int conn_send_error(struct conn *c, uint32_t request_id, uint32_t code, const char *resource,
		    const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = send_error_v(c, request_id, code, 0, resource, fmt, ap);
	va_end(ap);
	return rc;
}

int conn_send_error_http(struct conn *c, uint32_t request_id, uint32_t code,
			 uint32_t http_status, const char *resource, const char *fmt, ...)
{
	va_list ap;
	int rc;

	va_start(ap, fmt);
	rc = send_error_v(c, request_id, code, http_status, resource, fmt, ap);
	va_end(ap);
	return rc;
}

/* ---- reading ---- */

unsigned conn_take_fds(struct conn *c, int *out, unsigned max)
{
	unsigned n = 0;

	for (unsigned i = 0; i < c->rx_nfds && n < max; i++) {
		if (c->rx_fds[i] < 0)
			continue;
		out[n++] = c->rx_fds[i];
		c->rx_fds[i] = -1;
	}
	return n;
}

static void protocol_error(struct conn *c, const char *why)
{
	log_debug(PROTO, "closing connection of uid %u pid %d: %s", (unsigned)c->uid,
		  (int)c->pid, why);
	c->srv->stats.protocol_errors++;
	conn_close(c);
}

/* Handles every complete frame in the buffer, then keeps the incomplete rest. */
static void process(struct conn *c)
{
	size_t off = 0;

	while (!c->closing && !c->failed && !c->paused) {
		struct dmc_header h;
		int rc = dmc_header_decode(c->rbuf + off, c->rlen - off, &h);

		if (rc == DMC_PROTO_AGAIN)
			break;
		if (rc != DMC_PROTO_OK) {
			protocol_error(c, "malformed frame header");
			return;
		}
		if (c->rlen - off < DMC_HEADER_SIZE + (size_t)h.length) {
			if (DMC_HEADER_SIZE + (size_t)h.length > c->rcap) {
				/* grow once, to the largest frame there can be */
				uint8_t *nb = malloc(RBUF_MAX);
				if (!nb) {
					conn_close(c);
					return;
				}
				memcpy(nb, c->rbuf + off, c->rlen - off);
				explicit_bzero(c->rbuf, c->rlen); /* frames carry API keys */
				free(c->rbuf);
				c->rbuf = nb;
				c->rcap = RBUF_MAX;
				c->rlen -= off;
				off = 0;
			}
			break;
		}
		if (h.nfds > c->fdq_n) {
			/* they come with the frame's first byte: they should be here */
			protocol_error(c, "file descriptors announced but not passed");
			return;
		}
		/* the frame's descriptors: offered to its handler, closed if not taken */
		c->rx_fds = c->fdq;
		c->rx_nfds = h.nfds;
		dispatch(c, &h, c->rbuf + off + DMC_HEADER_SIZE);
		for (unsigned i = 0; i < h.nfds; i++)
			if (c->fdq[i] >= 0)
				close(c->fdq[i]);
		if (h.nfds) {
			memmove(c->fdq, c->fdq + h.nfds, (c->fdq_n - h.nfds) * sizeof(int));
			c->fdq_n -= h.nfds;
		}
		c->rx_fds = NULL;
		c->rx_nfds = 0;
		off += DMC_HEADER_SIZE + h.length;
		if (!c->closing && c->wq_bytes > c->srv->cfg->write_queue_max) {
			/* the peer is not reading its replies: stop reading its requests */
			if (reads_stop(c) == 0) {
				c->paused = true;
				c->srv->stats.backpressure++;
			}
		}
	}
	if (c->closing)
		return;
	if (off) {
		memmove(c->rbuf, c->rbuf + off, c->rlen - off);
		c->rlen -= off;
		/* the dispatched frames (API keys among them) leave no copy behind */
		explicit_bzero(c->rbuf + c->rlen, off);
	}
}

/* Queues the descriptors of one recvmsg; false when they cannot be kept. */
static bool queue_fds(struct conn *c, struct msghdr *msg)
{
	bool ok = !(msg->msg_flags & MSG_CTRUNC);

	for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
		size_t k;
		if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
			continue;
		k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < k; i++) {
			int fd;
			memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
			if (!ok || c->fdq_n >= CONN_FDS_QUEUED) {
				close(fd);
				ok = false;
				continue;
			}
			if (!c->fdq) {
				c->fdq = malloc(CONN_FDS_QUEUED * sizeof(int));
				if (!c->fdq) {
					close(fd);
					ok = false;
					continue;
				}
			}
			c->fdq[c->fdq_n++] = fd;
		}
	}
	return ok;
}

static void on_poll(uv_poll_t *handle, int status, int events)
{
	struct conn *c = handle->data;
	char cbuf[CMSG_SPACE(sizeof(int) * DMC_FDS_MAX)];
	struct iovec iov;
	struct msghdr msg;
	ssize_t n;

	(void)events;
	if (c->closing || c->failed)
		return;
	if (status < 0) {
		log_debug(NET, "poll on uid %u's connection: %s", (unsigned)c->uid,
			  uv_strerror(status));
		conn_close(c);
		return;
	}
	iov.iov_base = c->rbuf + c->rlen;
	iov.iov_len = c->rcap - c->rlen;
	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = cbuf;
	msg.msg_controllen = sizeof(cbuf);
	do
		n = recvmsg(c->rfd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
	while (n < 0 && errno == EINTR);
	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return;
	if (n > 0 && !queue_fds(c, &msg)) {
		protocol_error(c, "more file descriptors than a frame may carry");
		return;
	}
	if (n <= 0) {
		if (n < 0)
			log_debug(NET, "read from uid %u: %s", (unsigned)c->uid, strerror(errno));
		else if (c->rlen)
			log_debug(PROTO, "uid %u closed the connection mid-frame (%zu bytes)",
				  (unsigned)c->uid, c->rlen);
		conn_close(c);
		return;
	}
	c->rlen += (size_t)n;
	arm_timer(c);
	process(c);
}

/* ---- accept ---- */

static void refuse(struct conn *c, uint32_t code, const char *why)
{
	uint8_t frame[512];
	struct dmc_error_msg m = { .code = code };
	uv_buf_t buf;
	int n;

	m.message.ptr = why;
	m.message.len = (uint32_t)strlen(why);
	m.resource.ptr = "";
	n = dmc_error_encode(&m, 0, frame, sizeof(frame));
	if (n > 0) {
		/* a fresh socket's buffer takes this small frame at once; if not, never mind */
		buf = uv_buf_init((char *)frame, (unsigned)n);
		(void)uv_try_write((uv_stream_t *)&c->pipe, &buf, 1);
	}
	c->srv->stats.refused++;
	log_info(NET, "refused connection of uid %u pid %d: %s", (unsigned)c->uid, (int)c->pid,
		 why);
	conn_close(c);
}

/*
 * Admins see every user's snapshots and totals: root, the daemon's own uid, and members of
 * admin_group, by the peer's primary gid or its supplementary groups as the kernel reports
 * them at connect (SO_PEERGROUPS), never from a payload.
 */
static bool peer_is_admin(int fd, const struct ucred *cred, const struct config *cfg)
{
	gid_t groups[256];
	socklen_t len = sizeof(groups);

	if (cred->uid == 0 || cred->uid == geteuid())
		return true;
	if (cfg->admin_gid == (gid_t)-1)
		return false;
	if (cred->gid == cfg->admin_gid)
		return true;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) != 0)
		return false;
	for (size_t i = 0; i < len / sizeof(gid_t); i++)
		if (groups[i] == cfg->admin_gid)
			return true;
	return false;
}

void conn_accept(struct server *srv)
{
	struct conn *c = calloc(1, sizeof(*c));
	struct ucred cred;
	socklen_t len = sizeof(cred);
	uv_os_fd_t fd;

	if (!c) {
		log_err(NET, "out of memory accepting a connection: trying again in 100 ms");
		server_accept_later(srv);
		return;
	}
	c->srv = srv;
	c->rfd = -1;
	c->rcap = RBUF_INITIAL;
	c->rbuf = malloc(c->rcap);
	if (!c->rbuf || uv_pipe_init(srv->loop, &c->pipe, 0) != 0) {
		free(c->rbuf);
		free(c);
		log_err(NET, "out of memory accepting a connection: trying again in 100 ms");
		server_accept_later(srv);
		return;
	}
	c->pipe.data = c;
	c->open_handles = 1;
	uv_timer_init(srv->loop, &c->timer);
	c->timer.data = c;
	c->open_handles++;

	/* linked first, so that conn_close() has one path whatever happens next */
	c->next = srv->conns;
	if (srv->conns)
		srv->conns->prev = c;
	srv->conns = c;
	srv->n_conns++;

	if (uv_accept((uv_stream_t *)&srv->listener, (uv_stream_t *)&c->pipe) != 0) {
		conn_close(c);
		return;
	}
	srv->stats.accepted++;
	if (uv_fileno((uv_handle_t *)&c->pipe, &fd) != 0 ||
	    getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
		log_warn(NET, "no peer credentials for a connection: closing it");
		conn_close(c);
		return;
	}
	c->uid = cred.uid;
	c->gid = cred.gid;
	c->pid = cred.pid;
	c->admin = peer_is_admin(fd, &cred, srv->cfg);

	/* Fail closed: a peer in another user namespace shows as the overflow uid, and
	 * several real users would then share one identity (reliability.md S2). */
	if (c->uid == OVERFLOW_UID) {
		refuse(c, DMC_E_NOT_FOUND_OR_DENIED,
		       "peers from another user namespace are not served");
		return;
	}
	if (srv->stopping) {
		refuse(c, DMC_E_CANCELLED, "daemon is stopping");
		return;
	}
	if (srv->n_conns > srv->cfg->max_connections) {
		refuse(c, DMC_E_OVERLOADED, "too many connections");
		return;
	}
	if (server_uid_connections(srv, c->uid) >= srv->cfg->max_connections_per_uid) {
		refuse(c, DMC_E_OVERLOADED, "too many connections for this user");
		return;
	}
	if (server_uid_add(srv, c->uid) != 0) {
		conn_close(c);
		return;
	}
	c->counted = true;
	/* reads go through recvmsg on a duplicate (descriptors); writes through the pipe */
	c->rfd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (c->rfd < 0 || uv_poll_init(srv->loop, &c->rpoll, c->rfd) != 0) {
		if (c->rfd >= 0)
			close(c->rfd);
		c->rfd = -1;
		conn_close(c);
		return;
	}
	c->rpoll.data = c;
	c->open_handles++;
	if (reads_start(c) != 0) {
		conn_close(c);
		return;
	}
	arm_timer(c);
	log_debug(NET, "connection from uid %u gid %u pid %d (%u open)", (unsigned)c->uid,
		  (unsigned)c->gid, (int)c->pid, srv->n_conns);
}

/* ---- requests ---- */

static void on_hello(struct conn *c, const struct dmc_header *h, const uint8_t *payload)
{
	struct dmc_hello m;
	struct dmc_hello_reply r;
	uint8_t frame[256];
	char daemon[64];
	int n;

	if (c->version) {
		conn_send_error(c, h->request_id, DMC_E_PROTOCOL, NULL, "HELLO was already said");
		return;
	}
	if (dmc_hello_decode(payload, h->length, &m) != DMC_PROTO_OK) {
		protocol_error(c, "malformed HELLO");
		return;
	}
	if (m.version_max < DMC_PROTO_VERSION_MIN || m.version_min > DMC_PROTO_VERSION) {
		conn_send_error(c, h->request_id, DMC_E_UNSUPPORTED, NULL,
				"no common protocol version: client speaks %u..%u, daemon %u..%u",
				m.version_min, m.version_max, DMC_PROTO_VERSION_MIN,
				DMC_PROTO_VERSION);
		return;
	}
	c->version = m.version_max < DMC_PROTO_VERSION ? m.version_max : DMC_PROTO_VERSION;
	snprintf(daemon, sizeof(daemon), "dmcached %s", DMC_VERSION);
	r.version = c->version;
	r.daemon_uid = (uint32_t)geteuid();
	r.frame_max = DMC_FRAME_MAX;
	r.daemon.ptr = daemon;
	r.daemon.len = (uint32_t)strlen(daemon);
	n = dmc_hello_reply_encode(&r, h->request_id, frame, sizeof(frame));
	if (n > 0)
		conn_send(c, frame, (size_t)n);
	arm_timer(c);
	log_debug(PROTO, "HELLO from uid %u: '%.*s', version %u", (unsigned)c->uid,
		  (int)(m.client.len > 128 ? 128 : m.client.len), m.client.ptr, c->version);
}

static void on_ping(struct conn *c, const struct dmc_header *h, const uint8_t *payload)
{
	struct dmc_ping m;
	uint8_t frame[64];
	int n;

	if (dmc_ping_decode(payload, h->length, &m) != DMC_PROTO_OK) {
		protocol_error(c, "malformed PING");
		return;
	}
	n = dmc_ping_encode(&m, DMC_FLAG_REPLY, h->request_id, frame, sizeof(frame));
	if (n > 0)
		conn_send(c, frame, (size_t)n);
}

static void on_status(struct conn *c, const struct dmc_header *h, const uint8_t *payload)
{
	static struct dmc_status_entry entries[DMC_STATUS_ENTRIES_MAX];
	static uint8_t frame[32768]; /* loop thread only: one reply is built at a time */
	uint32_t count;
	int n;

	if (dmc_status_decode(payload, h->length) != DMC_PROTO_OK) {
		protocol_error(c, "malformed STATUS");
		return;
	}
	count = server_status(c->srv, c, entries, sizeof(entries) / sizeof(entries[0]));
	n = dmc_status_reply_encode(DMC_VERSION, uv_now(c->srv->loop) - c->srv->start_ms,
				    (uint32_t)getpid(), entries, count, h->request_id, frame,
				    sizeof(frame));
	if (n < 0) {
		conn_send_error(c, h->request_id, DMC_E_INTERNAL, NULL, "status reply too large");
		return;
	}
	conn_send(c, frame, (size_t)n);
}

typedef void (*request_fn)(struct conn *c, const struct dmc_header *h, const uint8_t *payload);

static const struct {
	uint16_t opcode;
	request_fn fn;
} handlers[] = {
	{ DMC_OP_HELLO, on_hello },
	{ DMC_OP_PING, on_ping },
	{ DMC_OP_STATUS, on_status },
};

static void dispatch(struct conn *c, const struct dmc_header *h, const uint8_t *payload)
{
	c->srv->stats.requests++;
	if (h->flags) {
		protocol_error(c, "a request with reply flags");
		return;
	}
	if (!c->version && h->opcode != DMC_OP_HELLO) {
		protocol_error(c, "first frame is not HELLO");
		return;
	}
	for (size_t i = 0; i < sizeof(handlers) / sizeof(handlers[0]); i++) {
		if (handlers[i].opcode == h->opcode) {
			handlers[i].fn(c, h, payload);
			if (!c->closing && !c->version) {
				/* HELLO failed: close once its error is written, read nothing more */
				reads_stop(c);
				c->paused = true;
				c->close_after_write = true;
				c->srv->stats.protocol_errors++;
				if (c->wq_bytes == 0)
					conn_close(c); /* the error went out at once */
			}
			return;
		}
	}
	if (c->srv->app.dispatch && c->srv->app.dispatch(c->srv->app.ctx, c, h, payload))
		return;
	c->srv->stats.unknown_opcodes++;
	conn_send_error(c, h->request_id, DMC_E_UNSUPPORTED, NULL, "unknown opcode %u",
			h->opcode);
}
