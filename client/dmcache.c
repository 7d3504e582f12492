/* libdmcache: see dmcache.h. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "dmcache.h"

#define DMC_EXPORT __attribute__((visibility("default")))

/* The daemon's system user (systemd/dmcached.service, sysusers.d). */
#define DMC_DAEMON_USER "dmcache"

struct dmc_client {
	int fd;
	uint32_t next_id;
	uint32_t version;
	uint32_t timeout_ms;
	char path[DMC_SOCKET_PATH_MAX];
	char daemon[128];

	/* the last frame received: header + payload; grown up to a maximum frame */
	uint8_t *rbuf;
	size_t rcap;
	struct dmc_header rhdr;

	struct dmc_error_info err;
	char err_resource[512];
	char err_message[1024];
};

DMC_EXPORT const char *dmc_version(void)
{
	return DMC_VERSION;
}

DMC_EXPORT int dmc_socket_candidates(char paths[DMC_SOCKET_CANDIDATES_MAX][DMC_SOCKET_PATH_MAX])
{
	const char *env = getenv("DMCACHE_SOCKET");
	int n = 0;

	if (env && *env) {
		snprintf(paths[n++], DMC_SOCKET_PATH_MAX, "%s", env);
		return n;
	}
	snprintf(paths[n++], DMC_SOCKET_PATH_MAX, "%s", DMC_SOCKET_SYSTEM);
	env = getenv("XDG_RUNTIME_DIR");
	if (env && *env && strlen(env) + sizeof("/dmcache/dmcached.sock") <= DMC_SOCKET_PATH_MAX)
		snprintf(paths[n++], DMC_SOCKET_PATH_MAX, "%s/dmcache/dmcached.sock", env);
	return n;
}

static void set_local_error(struct dmc_client *c, uint32_t code, const char *msg)
{
	c->err.code = code;
	c->err.http_status = c->err.retry_after_ms = 0;
	c->err.sys_errno = 0;
	c->err_resource[0] = '\0';
	snprintf(c->err_message, sizeof(c->err_message), "%s", msg);
	c->err.resource = c->err_resource;
	c->err.message = c->err_message;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waits for `events` on the socket within the deadline (-1: none). */
static int wait_fd(struct dmc_client *c, short events, int64_t deadline)
{
	struct pollfd p = { .fd = c->fd, .events = events };
	int rc, t;

	for (;;) {
		t = -1;
		if (deadline >= 0) {
			int64_t left = deadline - now_ms();
			if (left <= 0)
				return -ETIMEDOUT;
			t = left > 1000000 ? 1000000 : (int)left;
		}
		rc = poll(&p, 1, t);
		if (rc > 0)
			return 0;
		if (rc == 0)
			continue;
		if (errno != EINTR)
			return -errno;
	}
}

static int64_t deadline_of(const struct dmc_client *c)
{
	return c->timeout_ms ? now_ms() + c->timeout_ms : -1;
}

static int send_all(struct dmc_client *c, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	int64_t deadline = deadline_of(c);

	while (len) {
		ssize_t n = send(c->fd, p, len, MSG_NOSIGNAL);
		if (n > 0) {
			p += n;
			len -= (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int rc = wait_fd(c, POLLOUT, deadline);
			if (rc < 0)
				return rc;
			continue;
		}
		return n < 0 ? -errno : -EPIPE;
	}
	return 0;
}

static int recv_exact(struct dmc_client *c, uint8_t *buf, size_t len, int64_t deadline)
{
	while (len) {
		ssize_t n = recv(c->fd, buf, len, 0);
		if (n > 0) {
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n == 0)
			return -ECONNRESET; /* the daemon closed the connection */
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			int rc = wait_fd(c, POLLIN, deadline);
			if (rc < 0)
				return rc;
			continue;
		}
		return -errno;
	}
	return 0;
}

/* Receives one frame into c->rbuf / c->rhdr. */
static int recv_frame(struct dmc_client *c)
{
	int64_t deadline = deadline_of(c);
	int rc;

	rc = recv_exact(c, c->rbuf, DMC_HEADER_SIZE, deadline);
	if (rc < 0)
		return rc;
	if (dmc_header_decode(c->rbuf, DMC_HEADER_SIZE, &c->rhdr) != DMC_PROTO_OK)
		return -EPROTO;
	if (c->rhdr.nfds)
		return -EPROTO; /* version 1 passes no descriptors to clients yet */
	if (DMC_HEADER_SIZE + (size_t)c->rhdr.length > c->rcap) {
		uint8_t *nb = realloc(c->rbuf, DMC_HEADER_SIZE + DMC_FRAME_MAX);
		if (!nb)
			return -ENOMEM;
		c->rbuf = nb;
		c->rcap = DMC_HEADER_SIZE + DMC_FRAME_MAX;
	}
	return recv_exact(c, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, deadline);
}

static void copy_str(char *dst, size_t cap, struct dmc_str s)
{
	size_t n = s.len < cap - 1 ? s.len : cap - 1;
	memcpy(dst, s.ptr, n);
	dst[n] = '\0';
}

/*
 * Receives the final frame for request `id` with opcode `op`. An ERROR frame becomes
 * -code with c->err filled. Transport and protocol failures close the connection.
 */
static int recv_reply(struct dmc_client *c, uint32_t id, uint16_t op)
{
	struct dmc_error_msg em;
	int rc;

	for (;;) {
		rc = recv_frame(c);
		if (rc < 0)
			goto broken;
		if (!(c->rhdr.flags & DMC_FLAG_REPLY)) {
			rc = -EPROTO;
			goto broken;
		}
		if (c->rhdr.opcode == DMC_OP_ERROR) {
			if (dmc_error_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &em)) {
				rc = -EPROTO;
				goto broken;
			}
			if (c->rhdr.request_id != id && c->rhdr.request_id != 0)
				continue;
			c->err.code = em.code;
			c->err.http_status = em.http_status;
			c->err.retry_after_ms = em.retry_after_ms;
			c->err.sys_errno = em.sys_errno;
			copy_str(c->err_resource, sizeof(c->err_resource), em.resource);
			copy_str(c->err_message, sizeof(c->err_message), em.message);
			c->err.resource = c->err_resource;
			c->err.message = c->err_message;
			return em.code >= DMC_E_FIRST_ && em.code <= DMC_E_LAST_ ? -(int)em.code
										 : -DMC_E_INTERNAL;
		}
		if (c->rhdr.request_id != id)
			continue; /* a reply to an earlier, abandoned request */
		if (c->rhdr.opcode != op || (c->rhdr.flags & DMC_FLAG_MORE)) {
			rc = -EPROTO;
			goto broken;
		}
		return 0;
	}
broken:
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
	return rc;
}

static bool trusted_daemon_uid(uid_t uid)
{
	struct passwd pw, *res = NULL;
	char buf[1024];

	if (uid == 0 || uid == geteuid())
		return true;
	if (getpwnam_r(DMC_DAEMON_USER, &pw, buf, sizeof(buf), &res) == 0 && res &&
	    res->pw_uid == uid)
		return true;
	return false;
}

static int connect_path(struct dmc_client *c, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct ucred cred;
	socklen_t len = sizeof(cred);
	size_t plen = strlen(path);
	int fd;

	if (plen >= sizeof(sa.sun_path))
		return -ENAMETOOLONG;
	memcpy(sa.sun_path, path, plen);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0 && errno != EINPROGRESS &&
	    errno != EAGAIN) {
		int e = errno;
		close(fd);
		return -e;
	}
	c->fd = fd;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
		int e = errno;
		close(fd);
		c->fd = -1;
		return -e;
	}
	if (!trusted_daemon_uid(cred.uid)) {
		char msg[200];
		snprintf(msg, sizeof(msg),
			 "the daemon on this socket runs as uid %u, which is neither root, you, "
			 "nor the '" DMC_DAEMON_USER "' user: not talking to it",
			 (unsigned)cred.uid);
		set_local_error(c, 0, msg);
		close(fd);
		c->fd = -1;
		return -EPERM;
	}
	snprintf(c->path, sizeof(c->path), "%s", path);
	return 0;
}

static int hello(struct dmc_client *c)
{
	char who[64];
	uint8_t frame[256];
	struct dmc_hello m = { DMC_PROTO_VERSION_MIN, DMC_PROTO_VERSION, { who, 0 } };
	struct dmc_hello_reply r;
	uint32_t id = c->next_id++;
	int n, rc;

	snprintf(who, sizeof(who), "libdmcache %s", DMC_VERSION);
	m.client.len = (uint32_t)strlen(who);
	n = dmc_hello_encode(&m, id, frame, sizeof(frame));
	if (n < 0)
		return -EINVAL;
	rc = send_all(c, frame, (size_t)n);
	if (rc < 0)
		return rc;
	rc = recv_reply(c, id, DMC_OP_HELLO);
	if (rc < 0)
		return rc;
	if (dmc_hello_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r) ||
	    r.version < DMC_PROTO_VERSION_MIN || r.version > DMC_PROTO_VERSION)
		return -EPROTO;
	c->version = r.version;
	copy_str(c->daemon, sizeof(c->daemon), r.daemon);
	return 0;
}

DMC_EXPORT int dmc_connect(const char *socket_path, dmc_client **ret_client)
{
	char cands[DMC_SOCKET_CANDIDATES_MAX][DMC_SOCKET_PATH_MAX];
	struct dmc_client *c;
	int n, rc = -ENOENT;

	c = calloc(1, sizeof(*c));
	if (!c)
		return -ENOMEM;
	c->fd = -1;
	c->next_id = 1;
	c->rcap = 4096;
	c->rbuf = malloc(c->rcap);
	c->err.resource = c->err.message = "";
	if (!c->rbuf) {
		free(c);
		return -ENOMEM;
	}
	if (socket_path) {
		rc = connect_path(c, socket_path);
	} else {
		n = dmc_socket_candidates(cands);
		for (int i = 0; i < n; i++) {
			struct stat st;
			if (stat(cands[i], &st) != 0)
				continue;
			rc = connect_path(c, cands[i]);
			break;
		}
	}
	if (rc == 0)
		rc = hello(c);
	if (rc < 0) {
		dmc_close(c);
		return rc;
	}
	*ret_client = c;
	return 0;
}

DMC_EXPORT void dmc_close(dmc_client *c)
{
	if (!c)
		return;
	if (c->fd >= 0)
		close(c->fd);
	free(c->rbuf);
	free(c);
}

DMC_EXPORT void dmc_set_timeout(dmc_client *c, uint32_t ms)
{
	c->timeout_ms = ms;
}

DMC_EXPORT const char *dmc_socket_path(const dmc_client *c)
{
	return c->path;
}

DMC_EXPORT const char *dmc_daemon_version(const dmc_client *c)
{
	return c->daemon;
}

DMC_EXPORT uint32_t dmc_protocol_version(const dmc_client *c)
{
	return c->version;
}

DMC_EXPORT const struct dmc_error_info *dmc_last_error(const dmc_client *c)
{
	return &c->err;
}

/* Sends a frame built in `frame` and waits for its reply. */
static int call(struct dmc_client *c, const uint8_t *frame, int n, uint32_t id, uint16_t op)
{
	int rc;

	if (c->fd < 0)
		return -ENOTCONN;
	if (n < 0)
		return -EINVAL;
	rc = send_all(c, frame, (size_t)n);
	if (rc < 0) {
		close(c->fd);
		c->fd = -1;
		return rc;
	}
	return recv_reply(c, id, op);
}

DMC_EXPORT int dmc_ping(dmc_client *c)
{
	uint8_t frame[64];
	struct dmc_ping m = { (uint64_t)now_ms() }, r;
	uint32_t id = c->next_id++;
	int rc;

	rc = call(c, frame, dmc_ping_encode(&m, 0, id, frame, sizeof(frame)), id, DMC_OP_PING);
	if (rc < 0)
		return rc;
	if (dmc_ping_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r) || r.token != m.token)
		return -EPROTO;
	return 0;
}

DMC_EXPORT void dmc_status_free(struct dmc_status_info *s)
{
	if (!s)
		return;
	for (uint32_t i = 0; i < s->n_counters; i++)
		free(s->counters[i].name);
	free(s->counters);
	free(s->version);
	free(s);
}

static char *str_dup(struct dmc_str s)
{
	char *p = malloc((size_t)s.len + 1);
	if (p) {
		memcpy(p, s.ptr, s.len);
		p[s.len] = '\0';
	}
	return p;
}

DMC_EXPORT int dmc_status(dmc_client *c, struct dmc_status_info **ret_status)
{
	uint8_t frame[64];
	struct dmc_status_entry *entries;
	struct dmc_status_info *s;
	struct dmc_str version;
	uint32_t id = c->next_id++, n;
	int rc;

	rc = call(c, frame, dmc_status_encode(id, frame, sizeof(frame)), id, DMC_OP_STATUS);
	if (rc < 0)
		return rc;
	entries = calloc(DMC_STATUS_ENTRIES_MAX, sizeof(*entries));
	s = calloc(1, sizeof(*s));
	if (!entries || !s) {
		free(entries);
		free(s);
		return -ENOMEM;
	}
	if (dmc_status_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &version,
				    &s->uptime_ms, &s->pid, entries, DMC_STATUS_ENTRIES_MAX, &n)) {
		free(entries);
		free(s);
		return -EPROTO;
	}
	s->version = str_dup(version);
	s->counters = calloc(n ? n : 1, sizeof(*s->counters));
	if (!s->version || !s->counters) {
		free(entries);
		dmc_status_free(s);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		s->counters[i].name = str_dup(entries[i].name);
		s->counters[i].value = entries[i].value;
		if (!s->counters[i].name) {
			s->n_counters = i;
			free(entries);
			dmc_status_free(s);
			return -ENOMEM;
		}
	}
	s->n_counters = n;
	free(entries);
	*ret_status = s;
	return 0;
}

DMC_EXPORT int64_t dmc_status_get(const struct dmc_status_info *s, const char *name,
				  int64_t fallback)
{
	for (uint32_t i = 0; i < s->n_counters; i++)
		if (strcmp(s->counters[i].name, name) == 0)
			return s->counters[i].value;
	return fallback;
}

DMC_EXPORT const char *dmc_strerror(int err)
{
	const char *t;

	if (err >= 0)
		return "success";
	if (-err >= DMC_E_FIRST_ && -err <= DMC_E_LAST_ && (t = dmc_error_text((uint32_t)-err)))
		return t;
	switch (-err) {
	case ENOENT: return "no daemon socket found";
	case ECONNREFUSED: return "no daemon is listening on the socket";
	case ECONNRESET: return "the daemon closed the connection";
	case EPROTO: return "the daemon sent something this library does not understand";
	case ETIMEDOUT: return "the daemon did not answer in time";
	case EPERM: return "the socket belongs to an untrusted daemon";
	}
	return strerror(-err);
}
