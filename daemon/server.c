/* The listening socket and the connection set: see server.h. */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "conn.h"
#include "log.h"
#include "server.h"

int server_init(struct server *srv, uv_loop_t *loop, const struct config *cfg)
{
	memset(srv, 0, sizeof(*srv));
	srv->loop = loop;
	srv->cfg = cfg;
	srv->start_ms = uv_now(loop);
	return 0;
}

static void on_accept_retry(uv_timer_t *t)
{
	struct server *srv = t->data;

	if (!srv->stopping && srv->listener_open)
		conn_accept(srv);
}

void server_accept_later(struct server *srv)
{
	if (srv->stopping)
		return;
	if (!srv->accept_retry_on) {
		uv_timer_init(srv->loop, &srv->accept_retry);
		srv->accept_retry.data = srv;
		srv->accept_retry_on = true;
	}
	uv_timer_start(&srv->accept_retry, on_accept_retry, 100, 0);
}

static void on_connection(uv_stream_t *listener, int status)
{
	struct server *srv = listener->data;

	if (status < 0) {
		/* EMFILE and friends: libuv keeps a spare fd to shed the connection */
		log_warn(NET, "accept failed: %s", uv_strerror(status));
		return;
	}
	conn_accept(srv);
}

/* The socket's directory: ours (or root's), a real directory, not writable by others. */
static int check_socket_dir(const char *dir, char *err, size_t errlen)
{
	struct stat st;
	uid_t me = geteuid();

	if (lstat(dir, &st) != 0) {
		int e = errno;
		if (e != ENOENT) {
			snprintf(err, errlen, "socket directory '%s': %s", dir, strerror(e));
			return -e;
		}
		/* system: others connect, only we write; user: nobody else at all */
		if (mkdir(dir, me == 0 ? 0755 : 0700) != 0 && errno != EEXIST) {
			e = errno;
			snprintf(err, errlen, "cannot create socket directory '%s': %s", dir,
				 strerror(e));
			return -e;
		}
		if (lstat(dir, &st) != 0) {
			e = errno;
			snprintf(err, errlen, "socket directory '%s': %s", dir, strerror(e));
			return -e;
		}
	}
	if (S_ISLNK(st.st_mode)) {
		snprintf(err, errlen, "socket directory '%s' is a symbolic link: refusing it", dir);
		return -ELOOP;
	}
	if (!S_ISDIR(st.st_mode)) {
		snprintf(err, errlen, "socket directory '%s' is not a directory", dir);
		return -ENOTDIR;
	}
	if (st.st_uid != me && st.st_uid != 0) {
		snprintf(err, errlen, "socket directory '%s' belongs to uid %u, not to us (%u)",
			 dir, (unsigned)st.st_uid, (unsigned)me);
		return -EPERM;
	}
	if (st.st_mode & (S_IWGRP | S_IWOTH)) {
		snprintf(err, errlen,
			 "socket directory '%s' is writable by others (mode %04o): another user "
			 "could replace the socket; use a directory only dmcached can write",
			 dir, (unsigned)(st.st_mode & 07777));
		return -EPERM;
	}
	return 0;
}

/* An existing file at the socket path: only a stale socket of ours is removed. */
static int clear_stale_socket(const char *path, char *err, size_t errlen)
{
	struct stat st;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd, rc;

	if (lstat(path, &st) != 0) {
		if (errno == ENOENT)
			return 0;
		rc = errno;
		snprintf(err, errlen, "socket '%s': %s", path, strerror(rc));
		return -rc;
	}
	if (S_ISLNK(st.st_mode)) {
		snprintf(err, errlen, "socket path '%s' is a symbolic link: refusing to follow it",
			 path);
		return -ELOOP;
	}
	if (!S_ISSOCK(st.st_mode)) {
		snprintf(err, errlen, "'%s' exists and is not a socket: not touching it", path);
		return -EEXIST;
	}
	if (st.st_uid != geteuid()) {
		snprintf(err, errlen, "socket '%s' belongs to uid %u: not removing it", path,
			 (unsigned)st.st_uid);
		return -EPERM;
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	memcpy(sa.sun_path, path, strlen(path));
	rc = connect(fd, (struct sockaddr *)&sa, sizeof(sa));
	close(fd);
	if (rc == 0) {
		snprintf(err, errlen, "another dmcached is already listening on '%s'", path);
		return -EADDRINUSE;
	}
	if (errno != ECONNREFUSED) {
		rc = errno;
		snprintf(err, errlen, "socket '%s': %s", path, strerror(rc));
		return -rc;
	}
	log_notice(NET, "removing stale socket '%s'", path);
	if (unlink(path) != 0 && errno != ENOENT) {
		rc = errno;
		snprintf(err, errlen, "cannot remove stale socket '%s': %s", path, strerror(rc));
		return -rc;
	}
	return 0;
}

static int bind_path(struct server *srv, char *err, size_t errlen)
{
	const char *path = srv->cfg->socket_path;
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char *copy;
	struct stat st;
	mode_t old;
	int fd, rc;

	if (!path || !(copy = strdup(path)))
		return -ENOMEM;
	rc = check_socket_dir(dirname(copy), err, errlen);
	free(copy);
	if (rc < 0)
		return rc;
	rc = clear_stale_socket(path, err, errlen);
	if (rc < 0)
		return rc;
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return -errno;
	memcpy(sa.sun_path, path, strlen(path));
	/* created private, then opened up to socket_mode: never briefly wider */
	old = umask(0177);
	rc = bind(fd, (struct sockaddr *)&sa, sizeof(sa));
	umask(old);
	if (rc != 0) {
		rc = errno;
		snprintf(err, errlen, "cannot bind '%s': %s", path, strerror(rc));
		close(fd);
		return -rc;
	}
	if (chmod(path, srv->cfg->socket_mode) != 0 || lstat(path, &st) != 0) {
		rc = errno;
		snprintf(err, errlen, "cannot set the mode of '%s': %s", path, strerror(rc));
		unlink(path);
		close(fd);
		return -rc;
	}
	srv->socket_path = strdup(path);
	srv->socket_dev = st.st_dev;
	srv->socket_ino = st.st_ino;
	srv->own_socket = srv->socket_path != NULL;
	return fd;
}

int server_listen(struct server *srv, int activated_fd, char *err, size_t errlen)
{
	int fd = activated_fd, rc;

	if (!fd) {
		fd = bind_path(srv, err, errlen);
		if (fd < 0)
			return fd;
	}
	rc = uv_pipe_init(srv->loop, &srv->listener, 0);
	if (rc == 0) {
		srv->listener_open = true;
		srv->listener.data = srv;
		rc = uv_pipe_open(&srv->listener, fd);
	}
	if (rc == 0)
		rc = uv_listen((uv_stream_t *)&srv->listener, (int)srv->cfg->listen_backlog,
			       on_connection);
	if (rc != 0) {
		snprintf(err, errlen, "cannot listen on '%s': %s",
			 activated_fd ? "the activated socket" : srv->cfg->socket_path,
			 uv_strerror(rc));
		if (!srv->listener_open)
			close(fd);
		return rc;
	}
	return 0;
}

static void remove_own_socket(struct server *srv)
{
	struct stat st;

	if (!srv->own_socket)
		return;
	srv->own_socket = false;
	/* only the file we bound: a successor may already have replaced it */
	if (lstat(srv->socket_path, &st) == 0 && st.st_dev == srv->socket_dev &&
	    st.st_ino == srv->socket_ino)
		unlink(srv->socket_path);
}

void server_stop(struct server *srv)
{
	if (srv->stopping)
		return;
	srv->stopping = true;
	if (srv->accept_retry_on) {
		uv_close((uv_handle_t *)&srv->accept_retry, NULL);
		srv->accept_retry_on = false;
	}
	if (srv->listener_open) {
		uv_close((uv_handle_t *)&srv->listener, NULL);
		srv->listener_open = false;
	}
	remove_own_socket(srv);
	while (srv->conns)
		conn_close(srv->conns);
}

void server_done(struct server *srv)
{
	remove_own_socket(srv);
	free(srv->socket_path);
	free(srv->uids);
	srv->socket_path = NULL;
	srv->uids = NULL;
}

uint32_t server_uid_connections(const struct server *srv, uid_t uid)
{
	for (uint32_t i = 0; i < srv->n_uids; i++)
		if (srv->uids[i].uid == uid)
			return srv->uids[i].n;
	return 0;
}

int server_uid_add(struct server *srv, uid_t uid)
{
	for (uint32_t i = 0; i < srv->n_uids; i++) {
		if (srv->uids[i].uid == uid) {
			srv->uids[i].n++;
			return 0;
		}
	}
	if (srv->n_uids == srv->cap_uids) {
		uint32_t cap = srv->cap_uids ? srv->cap_uids * 2 : 8;
		struct uid_count *u = realloc(srv->uids, cap * sizeof(*u));
		if (!u)
			return -ENOMEM;
		srv->uids = u;
		srv->cap_uids = cap;
	}
	srv->uids[srv->n_uids].uid = uid;
	srv->uids[srv->n_uids].n = 1;
	srv->n_uids++;
	return 0;
}

void server_uid_remove(struct server *srv, uid_t uid)
{
	for (uint32_t i = 0; i < srv->n_uids; i++) {
		if (srv->uids[i].uid == uid) {
			if (--srv->uids[i].n == 0)
				srv->uids[i] = srv->uids[--srv->n_uids];
			return;
		}
	}
}

#define ENTRY(s, v) ((struct dmc_status_entry){ { s, sizeof(s) - 1 }, (int64_t)(v) })

uint32_t server_status(struct server *srv, struct conn *c, struct dmc_status_entry *e,
		       uint32_t max)
{
	struct dmc_status_entry all[] = {
		ENTRY("connections", srv->n_conns),
		ENTRY("connections_max", srv->cfg->max_connections),
		ENTRY("connections_of_caller", server_uid_connections(srv, c->uid)),
		ENTRY("connections_per_uid_max", srv->cfg->max_connections_per_uid),
		ENTRY("users_connected", srv->n_uids),
		ENTRY("caller_uid", c->uid),
		ENTRY("connections_accepted_total", srv->stats.accepted),
		ENTRY("connections_refused_total", srv->stats.refused),
		ENTRY("connections_timed_out_total", srv->stats.idle_closed),
		ENTRY("protocol_errors_total", srv->stats.protocol_errors),
		ENTRY("requests_total", srv->stats.requests),
		ENTRY("unknown_requests_total", srv->stats.unknown_opcodes),
		ENTRY("backpressure_pauses_total", srv->stats.backpressure),
	};
	struct dmc_status_entry mine[] = {
		ENTRY("connections_of_caller", server_uid_connections(srv, c->uid)),
		ENTRY("connections_per_uid_max", srv->cfg->max_connections_per_uid),
		ENTRY("caller_uid", c->uid),
	};
	uint32_t n = sizeof(all) / sizeof(all[0]);
	const struct dmc_status_entry *src = all;

	if (!c->admin) {
		/* a user sees their own figures only (docs/security.md) */
		src = mine;
		n = sizeof(mine) / sizeof(mine[0]);
	}
	if (n > max)
		n = max;
	memcpy(e, src, n * sizeof(*e));
	if (srv->app.status && n < max)
		n += srv->app.status(srv->app.ctx, c, e + n, max - n);
	return n;
}
