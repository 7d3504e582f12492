/* libdmcache: see dmcache.h. */
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <poll.h>
#include <pwd.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "dmcache.h"

#define DMC_EXPORT __attribute__((visibility("default")))

/* The daemon's system user (systemd/dmcached.service, sysusers.d). */
#define DMC_DAEMON_USER "dmcache"

/* A LOCAL request whose LOCAL_NEED events this client answers (see "local folders"). */
struct dmc_feed {
	uint32_t id;
	int dirfd;        /* the dataset folder (O_PATH) */
	bool until_final; /* PREFETCH: forgotten at its final frame; OPEN: at dataset close */
};
#define DMC_FEEDS_MAX 16u

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

	volatile sig_atomic_t *interrupt; /* borrowed: dmc_set_interrupt_flag() */

	/* the C strings of the last progress record: dmc_progress_info points here */
	char *sbuf;
	size_t scap;

	/* serving: descriptors received with the current frame (at most two: an OPEN reply's
	 * arena and region), and the mapped arena */
	int passed_fd, passed_fd2;
	const uint8_t *arena;
	uint64_t arena_size;
	int arena_fd;
	struct dmc_item_desc *items; /* the last GET reply's items, decoded */
	uint8_t *in_region;          /* and where each tensor is (DMC_OPEN_REGIONS) */
	uint32_t items_cap;
	char *item_msgs;
	size_t item_msgs_cap;
	/* regions passed with OPEN replies (proto.h "Regions"), mapped read-only, shared */
	struct dmc_region {
		uint64_t id, size;
		const uint8_t *base;
		int fd;
	} *regions;
	uint32_t n_regions;

	struct dmc_feed feeds[DMC_FEEDS_MAX];
	uint32_t n_feeds;
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

static bool interrupted(const struct dmc_client *c)
{
	return c->interrupt && *c->interrupt;
}

/*
 * Waits for `events` on the socket within the deadline (-1: none). When `interruptible`,
 * returns -EINTR once the interrupt flag is set.
 */
static int wait_fd(struct dmc_client *c, short events, int64_t deadline, bool interruptible)
{
	struct pollfd p = { .fd = c->fd, .events = events };
	int rc, t;

	for (;;) {
		if (interruptible && interrupted(c))
			return -EINTR;
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
			int rc = wait_fd(c, POLLOUT, deadline, false);
			if (rc < 0)
				return rc;
			continue;
		}
		return n < 0 ? -errno : -EPIPE;
	}
	return 0;
}

/*
 * Reads exactly `len` bytes. With `interruptible`, the interrupt flag ends the wait with
 * -EINTR, but only while no byte has been read: a frame once begun is read to its end.
 */
static int recv_exact(struct dmc_client *c, uint8_t *buf, size_t len, int64_t deadline,
		      bool interruptible)
{
	size_t want = len;

	while (len) {
		char cbuf[CMSG_SPACE(sizeof(int) * DMC_FDS_MAX)];
		struct iovec iov = { buf, len };
		struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
				      .msg_controllen = sizeof(cbuf) };
		ssize_t n = recvmsg(c->fd, &msg, MSG_CMSG_CLOEXEC);
		if (n > 0) {
			/* descriptors travel with the first byte of their frame (proto.h) */
			for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm;
			     cm = CMSG_NXTHDR(&msg, cm)) {
				if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
					continue;
				size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
				for (size_t i = 0; i < k; i++) {
					int fd;
					memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
					if (c->passed_fd < 0)
						c->passed_fd = fd;
					else if (c->passed_fd2 < 0)
						c->passed_fd2 = fd;
					else
						close(fd); /* more than announced: not ours to keep */
				}
			}
			buf += n;
			len -= (size_t)n;
			continue;
		}
		if (n == 0)
			return -ECONNRESET; /* the daemon closed the connection */
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK) {
			int rc = wait_fd(c, POLLIN, deadline, interruptible && len == want);
			if (rc < 0)
				return rc;
			continue;
		}
		return -errno;
	}
	return 0;
}

/* Receives one frame into c->rbuf / c->rhdr. */
static int recv_frame_raw(struct dmc_client *c)
{
	int64_t deadline = deadline_of(c);
	int rc;

	rc = recv_exact(c, c->rbuf, DMC_HEADER_SIZE, deadline, true);
	if (rc < 0)
		return rc;
	if (dmc_header_decode(c->rbuf, DMC_HEADER_SIZE, &c->rhdr) != DMC_PROTO_OK)
		return -EPROTO;
	if (c->rhdr.nfds > 2 || (c->rhdr.nfds >= 1) != (c->passed_fd >= 0) ||
	    (c->rhdr.nfds == 2) != (c->passed_fd2 >= 0)) {
		/* a descriptor where none was announced, or the other way round */
		if (c->passed_fd >= 0)
			close(c->passed_fd);
		if (c->passed_fd2 >= 0)
			close(c->passed_fd2);
		c->passed_fd = c->passed_fd2 = -1;
		return -EPROTO;
	}
	if (DMC_HEADER_SIZE + (size_t)c->rhdr.length > c->rcap) {
		uint8_t *nb = realloc(c->rbuf, DMC_HEADER_SIZE + DMC_FRAME_MAX);
		if (!nb)
			return -ENOMEM;
		c->rbuf = nb;
		c->rcap = DMC_HEADER_SIZE + DMC_FRAME_MAX;
	}
	return recv_exact(c, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, deadline, false);
}

static void copy_str(char *dst, size_t cap, struct dmc_str s)
{
	size_t n = s.len < cap - 1 ? s.len : cap - 1;
	memcpy(dst, s.ptr, n);
	dst[n] = '\0';
}

static void close_fd(struct dmc_client *c)
{
	if (c->fd >= 0) {
		close(c->fd);
		c->fd = -1;
	}
}

/* ---- local folders: the client opens the files (proto.h, LOCAL_NEED) ----
 *
 * The daemon never opens a path of a local folder: this library opens dataset.json and
 * every file the daemon asks for beneath the folder, with the caller's own permissions
 * (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, O_RDONLY | O_NOFOLLOW | O_NONBLOCK: no
 * path leaves the folder, no symbolic link is followed, no FIFO blocks the open), keeps
 * regular files only (fstat), and passes the descriptors with SCM_RIGHTS. A feed is a
 * request (PREFETCH or OPEN of a LOCAL source) whose LOCAL_NEED events are answered from
 * any call that reads frames, for as long as the feed is registered: a PREFETCH's until
 * its final frame, an OPEN's until dmc_dataset_close().
 */

/* Opens `path` beneath `dirfd` for reading: the descriptor, or a negative errno. Without
 * openat2 (Linux < 5.6) each component is opened with O_NOFOLLOW and ".." is refused. */
static int open_beneath(int dirfd, const char *path)
{
	struct open_how how = {
		.flags = O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOCTTY,
		.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
	};
	struct stat st;
	int fd = (int)syscall(SYS_openat2, dirfd, path, &how, sizeof(how));

	if (fd < 0 && errno == ENOSYS) {
		char buf[DMC_LOCAL_PATH_MAX + 1], *p, *slash;
		int d = dirfd;
		if (strlen(path) > DMC_LOCAL_PATH_MAX || path[0] == '/')
			return -EXDEV;
		snprintf(buf, sizeof(buf), "%s", path);
		for (p = buf;; p = slash + 1) {
			slash = strchr(p, '/');
			if (slash)
				*slash = '\0';
			if (strcmp(p, "..") == 0) {
				fd = -1;
				errno = EXDEV;
			} else {
				fd = openat(d, *p ? p : ".",
					    slash ? O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
						  : (int)how.flags);
			}
			if (d != dirfd)
				close(d);
			if (fd < 0 || !slash)
				break;
			d = fd;
		}
	}
	if (fd < 0)
		return errno == EAGAIN ? -EXDEV : -errno; /* EAGAIN: a race with a rename */
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return -EINVAL; /* a FIFO, device, socket or directory: not read */
	}
	return fd;
}

static struct dmc_feed *feed_find(struct dmc_client *c, uint32_t id)
{
	for (uint32_t i = 0; i < c->n_feeds; i++)
		if (c->feeds[i].id == id)
			return &c->feeds[i];
	return NULL;
}

static void feed_remove(struct dmc_client *c, uint32_t id)
{
	struct dmc_feed *f = feed_find(c, id);

	if (!f)
		return;
	close(f->dirfd);
	*f = c->feeds[--c->n_feeds];
}

/*
 * Registers request `id` as the feed of the folder `dir` and opens its dataset.json:
 * *ret_json_fd is to be sent with the request, then closed.
 */
static int feed_add(struct dmc_client *c, uint32_t id, const char *dir, bool until_final,
		    int *ret_json_fd)
{
	char msg[256];
	int dirfd, fd;

	if (c->n_feeds == DMC_FEEDS_MAX) {
		set_local_error(c, 0, "too many local datasets open on one connection");
		return -EMFILE;
	}
	dirfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0) {
		int e = errno;
		snprintf(msg, sizeof(msg), "cannot open the dataset folder: %s", strerror(e));
		set_local_error(c, 0, msg);
		return -e;
	}
	fd = open_beneath(dirfd, "dataset.json");
	if (fd < 0) {
		snprintf(msg, sizeof(msg), "dataset.json: %s",
			 fd == -EINVAL ? "not a regular file" : strerror(-fd));
		set_local_error(c, 0, msg);
		close(dirfd);
		return fd;
	}
	c->feeds[c->n_feeds].id = id;
	c->feeds[c->n_feeds].dirfd = dirfd;
	c->feeds[c->n_feeds].until_final = until_final;
	c->n_feeds++;
	*ret_json_fd = fd;
	return 0;
}

/* Sends a frame with descriptors attached to its first byte, then the rest of it. */
static int send_frame_fds(struct dmc_client *c, const uint8_t *frame, size_t len,
			  const int *fds, unsigned nfds)
{
	union {
		char buf[CMSG_SPACE(sizeof(int) * DMC_FDS_MAX)];
		struct cmsghdr align;
	} cbuf;
	struct iovec iov = { (void *)frame, len };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	int64_t deadline = deadline_of(c);
	ssize_t n;

	if (c->fd < 0)
		return -ENOTCONN;
	if (nfds) {
		struct cmsghdr *cm;
		memset(&cbuf, 0, sizeof(cbuf));
		msg.msg_control = cbuf.buf;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		cm = CMSG_FIRSTHDR(&msg);
		cm->cmsg_level = SOL_SOCKET;
		cm->cmsg_type = SCM_RIGHTS;
		cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
	}
	for (;;) {
		n = sendmsg(c->fd, &msg, MSG_NOSIGNAL);
		if (n > 0)
			break;
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			int rc = wait_fd(c, POLLOUT, deadline, false);
			if (rc < 0) {
				close_fd(c);
				return rc;
			}
			continue;
		}
		n = n < 0 ? -errno : -EPIPE;
		close_fd(c);
		return (int)n;
	}
	if ((size_t)n < len) {
		int rc = send_all(c, frame + n, len - (size_t)n);
		if (rc < 0)
			close_fd(c);
		return rc;
	}
	return 0;
}

/* Answers the LOCAL_NEED in c->rbuf: opens each path, sends LOCAL_FILES. */
static int answer_need(struct dmc_client *c)
{
	struct dmc_feed *f = feed_find(c, c->rhdr.request_id);
	struct dmc_reader r;
	int32_t errs[DMC_FDS_MAX];
	int fds[DMC_FDS_MAX];
	uint32_t first, n, nfds = 0;
	uint8_t frame[DMC_HEADER_SIZE + 8 + 4 * DMC_FDS_MAX];
	int len, rc;

	if (dmc_local_need_begin(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &first, &n))
		return -EPROTO;
	for (uint32_t i = 0; i < n; i++) {
		struct dmc_str s = dmc_read_str(&r);
		char path[DMC_LOCAL_PATH_MAX + 1];
		int fd;

		if (r.err || s.len == 0 || s.len > DMC_LOCAL_PATH_MAX)
			break;
		memcpy(path, s.ptr, s.len);
		path[s.len] = '\0';
		/* a feed no longer registered (its dataset was closed): nothing is opened */
		fd = f ? open_beneath(f->dirfd, path) : -ECANCELED;
		errs[i] = fd < 0 ? -fd : 0;
		if (fd >= 0)
			fds[nfds++] = fd;
	}
	if (dmc_reader_finish(&r) != DMC_PROTO_OK) {
		for (uint32_t i = 0; i < nfds; i++)
			close(fds[i]);
		return -EPROTO;
	}
	len = dmc_local_files_encode(first, errs, n, c->rhdr.request_id, frame, sizeof(frame));
	rc = len > 0 ? send_frame_fds(c, frame, (size_t)len, fds, nfds) : -EINVAL;
	for (uint32_t i = 0; i < nfds; i++)
		close(fds[i]); /* the daemon has its own now */
	return rc;
}

/*
 * Receives one frame into c->rbuf / c->rhdr, answering the daemon's LOCAL_NEED events for
 * registered feeds on the way (they are no one's reply); a feed of a PREFETCH is forgotten
 * at its final frame.
 */
static int recv_frame(struct dmc_client *c)
{
	for (;;) {
		int rc = recv_frame_raw(c);
		struct dmc_feed *f;

		if (rc < 0)
			return rc;
		if (c->rhdr.opcode == DMC_OP_LOCAL_NEED) {
			if (c->rhdr.flags != (DMC_FLAG_REPLY | DMC_FLAG_MORE))
				return -EPROTO;
			rc = answer_need(c);
			if (rc < 0)
				return rc;
			continue;
		}
		if (!(c->rhdr.flags & DMC_FLAG_MORE) && (f = feed_find(c, c->rhdr.request_id)) &&
		    f->until_final)
			feed_remove(c, f->id);
		return 0;
	}
}

/*
 * Receives the next frame for request `id`, skipping frames of earlier, abandoned
 * requests (such as the rest of a detached PREFETCH). An ERROR frame becomes -code with
 * c->err filled. -EINTR (the interrupt flag, between frames) leaves the connection
 * usable; other transport and protocol failures close it.
 */
static int recv_for(struct dmc_client *c, uint32_t id)
{
	struct dmc_error_msg em;
	int rc;

	for (;;) {
		rc = recv_frame(c);
		if (rc == -EINTR)
			return rc;
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
		return 0;
	}
broken:
	close_fd(c);
	return rc;
}

/* Receives the final frame for request `id` with opcode `op` (see recv_for). */
static int recv_reply(struct dmc_client *c, uint32_t id, uint16_t op)
{
	int rc = recv_for(c, id);

	if (rc < 0)
		return rc;
	if (c->rhdr.opcode != op || (c->rhdr.flags & DMC_FLAG_MORE)) {
		close_fd(c);
		return -EPROTO;
	}
	return 0;
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
	c->passed_fd = c->passed_fd2 = -1;
	c->arena_fd = -1;
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
	if (c->passed_fd >= 0)
		close(c->passed_fd);
	if (c->passed_fd2 >= 0)
		close(c->passed_fd2);
	for (uint32_t i = 0; i < c->n_regions; i++) {
		munmap((void *)c->regions[i].base, c->regions[i].size);
		close(c->regions[i].fd);
	}
	free(c->regions);
	for (uint32_t i = 0; i < c->n_feeds; i++)
		close(c->feeds[i].dirfd);
	if (c->arena)
		munmap((void *)c->arena, c->arena_size);
	if (c->arena_fd >= 0)
		close(c->arena_fd);
	free(c->items);
	free(c->in_region);
	free(c->item_msgs);
	free(c->rbuf);
	free(c->sbuf);
	free(c);
}

DMC_EXPORT void dmc_set_timeout(dmc_client *c, uint32_t ms)
{
	c->timeout_ms = ms;
}

DMC_EXPORT void dmc_set_interrupt_flag(dmc_client *c, volatile sig_atomic_t *flag)
{
	c->interrupt = flag;
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

/* Sends a frame of `n` bytes built in `frame` (n < 0: the encoder failed). */
static int send_frame(struct dmc_client *c, const uint8_t *frame, int n)
{
	int rc;

	if (c->fd < 0)
		return -ENOTCONN;
	if (n < 0)
		return -EINVAL;
	rc = send_all(c, frame, (size_t)n);
	if (rc < 0)
		close_fd(c);
	return rc;
}

/* Sends a frame built in `frame` and waits for its reply. */
static int call(struct dmc_client *c, const uint8_t *frame, int n, uint32_t id, uint16_t op)
{
	int rc = send_frame(c, frame, n);

	if (rc < 0)
		return rc;
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

/* ---- the cache ---- */

/* A length-checked C string for the wire: "" for NULL. */
static int wire_str(struct dmc_client *c, const char *what, const char *s, struct dmc_str *ret)
{
	size_t n = s ? strlen(s) : 0;
	char msg[128];

	if ((uint64_t)n > DMC_STR_MAX) {
		snprintf(msg, sizeof(msg), "%s is longer than %u bytes", what, DMC_STR_MAX);
		set_local_error(c, 0, msg);
		return -EINVAL;
	}
	ret->ptr = s ? s : "";
	ret->len = (uint32_t)n;
	return 0;
}

/* Sends a frame built in a heap buffer of `cap` bytes, then wipes and frees it. */
static int call_heap(struct dmc_client *c, uint8_t *frame, size_t cap, int n, uint32_t id,
		     uint16_t op)
{
	int rc = call(c, frame, n, id, op);

	explicit_bzero(frame, cap);
	free(frame);
	return rc;
}

static const char *put_str(char **p, struct dmc_str s)
{
	char *d = *p;

	if (s.len)
		memcpy(d, s.ptr, s.len);
	d[s.len] = '\0';
	*p += (size_t)s.len + 1;
	return d;
}

/* Decodes the PREFETCH frame in c->rbuf into *ret, with its strings in c->sbuf. */
static int progress_from_frame(struct dmc_client *c, struct dmc_progress_info *ret)
{
	struct dmc_progress m;
	size_t need;
	char *p;

	if (dmc_progress_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &m))
		return -EPROTO;
	/* the six strings lie inside the payload: their bytes and NULs fit in length + 6 */
	need = (size_t)c->rhdr.length + 6;
	if (need > c->scap) {
		char *nb = realloc(c->sbuf, need);
		if (!nb)
			return -ENOMEM;
		c->sbuf = nb;
		c->scap = need;
	}
	p = c->sbuf;
	ret->job_id = m.job_id;
	ret->snapshot_id = m.snapshot_id;
	ret->state = m.state;
	ret->project_id = put_str(&p, m.project_id);
	ret->project_name = put_str(&p, m.project_name);
	ret->version = put_str(&p, m.version);
	ret->items_total = m.items_total;
	ret->items_done = m.items_done;
	ret->items_cached = m.items_cached;
	ret->items_failed = m.items_failed;
	ret->bytes_total = m.bytes_total;
	ret->bytes_done = m.bytes_done;
	ret->rate_bps = m.rate_bps;
	ret->eta_ms = m.eta_ms;
	ret->error_code = m.error_code;
	ret->http_status = m.http_status;
	ret->error_resource = put_str(&p, m.error_resource);
	ret->error_message = put_str(&p, m.error_message);
	return 0;
}

static int check_prefetch_args(struct dmc_client *c, const struct dmc_prefetch_args *a,
			       struct dmc_prefetch *m)
{
	int rc;

	if (!a || !a->project || !*a->project) {
		set_local_error(c, 0, "no project given");
		return -EINVAL;
	}
	*m = (struct dmc_prefetch){ .source = a->source, .flags = a->flags };
	if (a->flags & DMC_PREFETCH_SHARD) {
		if (a->shard_world < 1 || a->shard_world > DMC_SHARD_WORLD_MAX ||
		    a->shard_rank >= a->shard_world) {
			set_local_error(c, 0, "a shard is RANK/WORLD with RANK < WORLD");
			return -EINVAL;
		}
		m->shard_rank = a->shard_rank;
		m->shard_world = a->shard_world;
	}
	if ((rc = wire_str(c, "the project", a->project, &m->project)) < 0 ||
	    (rc = wire_str(c, "the version", a->version, &m->version)) < 0 ||
	    (rc = wire_str(c, "the server URL", a->server, &m->server)) < 0 ||
	    (rc = wire_str(c, "the API key", a->api_key, &m->api_key)) < 0)
		return rc;
	switch (a->source) {
	case DMC_SOURCE_DATAMINT:
		if (!m->server.len || (!m->api_key.len && !(a->flags & DMC_PREFETCH_OFFLINE))) {
			set_local_error(c, 0, m->server.len ? "a Datamint prefetch needs an API key"
							    : "a Datamint prefetch needs a server URL");
			return -EINVAL;
		}
		return 0;
	case DMC_SOURCE_LOCAL:
		if (a->project[0] != '/' || m->server.len || m->api_key.len) {
			set_local_error(c, 0, "a local source is an absolute directory path, "
					      "with no server and no key");
			return -EINVAL;
		}
		return 0;
	}
	set_local_error(c, 0, "unknown source");
	return -EINVAL;
}

DMC_EXPORT int dmc_prefetch(dmc_client *c, const struct dmc_prefetch_args *args,
			    dmc_progress_cb cb, void *userdata, struct dmc_progress_info *ret_final)
{
	struct dmc_progress_info info;
	struct dmc_prefetch m;
	uint32_t id = c->next_id++;
	uint8_t *frame;
	uint64_t cap;
	int rc, n, json_fd;

	rc = check_prefetch_args(c, args, &m);
	if (rc < 0)
		return rc;
	cap = (uint64_t)DMC_HEADER_SIZE + 8 + 8 + 4 * 4 + (uint64_t)m.project.len + m.version.len +
	      m.server.len + m.api_key.len;
	if (cap > DMC_HEADER_SIZE + (uint64_t)DMC_FRAME_MAX) {
		set_local_error(c, 0, "the request is larger than a frame");
		return -EINVAL;
	}
	frame = malloc((size_t)cap);
	if (!frame)
		return -ENOMEM;
	n = dmc_prefetch_encode(&m, id, frame, (size_t)cap);
	if (m.source == DMC_SOURCE_LOCAL && n > 0) {
		/* the daemon reads dataset.json, then every file, through our descriptors */
		rc = feed_add(c, id, args->project, true, &json_fd);
		if (rc == 0) {
			dmc_frame_set_nfds(frame, (size_t)n, 1);
			rc = send_frame_fds(c, frame, (size_t)n, &json_fd, 1);
			close(json_fd);
			if (rc < 0)
				feed_remove(c, id);
		}
	} else {
		rc = send_frame(c, frame, n);
	}
	explicit_bzero(frame, (size_t)cap); /* it holds the key */
	free(frame);
	if (rc < 0)
		return rc;
	for (;;) {
		rc = recv_for(c, id);
		if (rc < 0)
			return rc;
		if (c->rhdr.opcode != DMC_OP_PREFETCH)
			goto protocol;
		rc = progress_from_frame(c, &info);
		if (rc == -EPROTO)
			goto protocol;
		if (rc < 0)
			return rc;
		if (!(c->rhdr.flags & DMC_FLAG_MORE)) {
			if (info.state != DMC_JOB_DONE && info.state != DMC_JOB_FAILED &&
			    info.state != DMC_JOB_CANCELLED)
				goto protocol;
			*ret_final = info;
			return 0;
		}
		if (cb && cb(&info, userdata))
			return -ECANCELED;
		if (interrupted(c))
			return -EINTR;
	}
protocol:
	close_fd(c);
	return -EPROTO;
}

DMC_EXPORT int dmc_cancel(dmc_client *c, const char *project, const char *server,
			  uint32_t *ret_count)
{
	struct dmc_str p, sv;
	uint32_t id = c->next_id++, n;
	uint8_t *frame;
	size_t cap;
	int rc;

	if (!project || !*project) {
		set_local_error(c, 0, "no project given");
		return -EINVAL;
	}
	if ((rc = wire_str(c, "the project", project, &p)) < 0 ||
	    (rc = wire_str(c, "the server URL", server, &sv)) < 0)
		return rc;
	cap = DMC_HEADER_SIZE + 8 + (size_t)p.len + sv.len;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	rc = call_heap(c, frame, cap, dmc_cancel_encode(p.ptr, sv.ptr, id, frame, cap), id,
		       DMC_OP_CANCEL);
	if (rc < 0)
		return rc;
	if (dmc_cancel_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &n))
		return -EPROTO;
	if (ret_count)
		*ret_count = n;
	return 0;
}

DMC_EXPORT void dmc_list_free(struct dmc_snapshot_list *l)
{
	if (!l)
		return;
	for (uint32_t i = 0; i < l->n; i++) {
		free(l->snapshots[i].server);
		free(l->snapshots[i].project_id);
		free(l->snapshots[i].project_name);
		free(l->snapshots[i].version);
	}
	free(l->snapshots);
	free(l);
}

/* The smallest snapshot record: u64 u32 u32, 4 empty str, 4 u64. */
#define SNAPSHOT_RECORD_MIN (8u + 4 + 4 + 4 * 4 + 4 * 8)

DMC_EXPORT int dmc_list(dmc_client *c, struct dmc_snapshot_list **ret_list)
{
	uint8_t frame[64];
	struct dmc_snapshot_list *l;
	struct dmc_reader r;
	uint32_t id = c->next_id++, n;
	int rc;

	rc = call(c, frame, dmc_list_encode(id, frame, sizeof(frame)), id, DMC_OP_LIST);
	if (rc < 0)
		return rc;
	dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
	n = dmc_read_u32(&r);
	if (r.err || n > DMC_LIST_MAX || (uint64_t)n * SNAPSHOT_RECORD_MIN > c->rhdr.length)
		return -EPROTO;
	l = calloc(1, sizeof(*l));
	if (!l)
		return -ENOMEM;
	l->snapshots = calloc(n ? n : 1, sizeof(*l->snapshots));
	if (!l->snapshots) {
		free(l);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		struct dmc_snapshot_info si;
		struct dmc_snapshot_entry *e = &l->snapshots[i];

		dmc_snapshot_info_read(&r, &si);
		if (r.err) {
			rc = -EPROTO;
			goto fail;
		}
		l->n = i + 1; /* so that dmc_list_free frees this entry's strings */
		e->id = si.id;
		e->source = si.source;
		e->complete = si.complete == 1;
		e->downloading = si.complete == 2;
		e->server = str_dup(si.server);
		e->project_id = str_dup(si.project_id);
		e->project_name = str_dup(si.project_name);
		e->version = str_dup(si.version);
		e->items = si.items;
		e->items_stored = si.items_stored;
		e->bytes = si.bytes;
		e->created_ms = si.created_ms;
		e->owner_uid = si.owner_uid;
		e->bytes_stored = si.bytes_stored;
		if (!e->server || !e->project_id || !e->project_name || !e->version) {
			rc = -ENOMEM;
			goto fail;
		}
	}
	if (dmc_reader_finish(&r)) {
		rc = -EPROTO;
		goto fail;
	}
	*ret_list = l;
	return 0;
fail:
	dmc_list_free(l);
	return rc;
}

DMC_EXPORT int dmc_evict(dmc_client *c, bool all, const char *project,
			 struct dmc_evict_reply *ret_reply)
{
	struct dmc_evict_reply r;
	struct dmc_str p;
	uint32_t id = c->next_id++;
	uint8_t *frame;
	size_t cap;
	int rc;

	if (all ? project && *project : !project || !*project) {
		set_local_error(c, 0, all ? "evicting all snapshots takes no project"
					  : "no project given");
		return -EINVAL;
	}
	rc = wire_str(c, "the project", all ? NULL : project, &p);
	if (rc < 0)
		return rc;
	cap = DMC_HEADER_SIZE + 8 + (size_t)p.len;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	rc = call_heap(c, frame, cap,
		       dmc_evict_encode(all ? DMC_EVICT_ALL : 0, p.ptr, id, frame, cap), id,
		       DMC_OP_EVICT);
	if (rc < 0)
		return rc;
	if (dmc_evict_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r))
		return -EPROTO;
	if (ret_reply)
		*ret_reply = r;
	return 0;
}

DMC_EXPORT int dmc_verify(dmc_client *c, struct dmc_verify_reply *ret_reply)
{
	uint8_t frame[64];
	struct dmc_verify_reply r;
	uint32_t id = c->next_id++;
	int rc;

	rc = call(c, frame, dmc_verify_encode(id, frame, sizeof(frame)), id, DMC_OP_VERIFY);
	if (rc < 0)
		return rc;
	if (dmc_verify_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r))
		return -EPROTO;
	if (ret_reply)
		*ret_reply = r;
	return 0;
}

DMC_EXPORT int dmc_tier(dmc_client *c, uint32_t action, uint32_t flags,
			struct dmc_tier_reply *ret_reply)
{
	uint8_t frame[64];
	struct dmc_tier_reply r;
	uint32_t id = c->next_id++;
	int rc;

	rc = call(c, frame, dmc_tier_encode(action, flags, id, frame, sizeof(frame)), id,
		  DMC_OP_TIER);
	if (rc < 0)
		return rc;
	if (dmc_tier_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r))
		return -EPROTO;
	if (ret_reply)
		*ret_reply = r;
	return 0;
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
	case EINTR: return "interrupted";
	case ECANCELED: return "stopped waiting; the job goes on in the daemon";
	case ENOTCONN: return "the connection to the daemon is closed";
	}
	return strerror(-err);
}

/* ---- serving ---- */

struct dmc_dataset {
	dmc_client *c;
	uint64_t handle;
	bool regions;            /* opened with DMC_OPEN_REGIONS: GET replies say where */
	const uint8_t *rg_base;  /* its region, or NULL */
	uint64_t rg_size;
	uint32_t feed_id; /* LOCAL: the OPEN whose file requests are answered; else 0 */
	struct dmc_dataset_info info;
	char *strings;
};

static char *strs_dup3(struct dmc_str a, struct dmc_str b, struct dmc_str d, const char **pa,
		       const char **pb, const char **pd)
{
	char *buf = malloc((size_t)a.len + b.len + d.len + 3), *p;

	if (!buf)
		return NULL;
	p = buf;
	*pa = p;
	memcpy(p, a.ptr, a.len);
	p += a.len;
	*p++ = '\0';
	*pb = p;
	memcpy(p, b.ptr, b.len);
	p += b.len;
	*p++ = '\0';
	*pd = p;
	memcpy(p, d.ptr, d.len);
	p[d.len] = '\0';
	return buf;
}

/*
 * The region an OPEN reply names (proto.h "Regions"): one the client has, or the one passed
 * with it as `fd` (taken: kept or closed), mapped read-only and shared. *ret_rg NULL when
 * the reply names none.
 */
static int take_region(dmc_client *c, const struct dmc_open_reply *r, int fd,
		       const struct dmc_region **ret_rg)
{
	struct dmc_region *nr;
	void *p;

	*ret_rg = NULL;
	if (!r->region_id) {
		if (fd >= 0)
			close(fd);
		return fd >= 0 ? -EPROTO : 0;
	}
	for (uint32_t i = 0; i < c->n_regions; i++)
		if (c->regions[i].id == r->region_id) {
			if (fd >= 0) {
				close(fd);
				return -EPROTO; /* passed twice */
			}
			*ret_rg = &c->regions[i];
			return 0;
		}
	if (fd < 0 || r->region_bytes == 0 || r->region_bytes > (1ull << 44)) {
		if (fd >= 0)
			close(fd);
		return -EPROTO;
	}
	nr = realloc(c->regions, (c->n_regions + 1) * sizeof(*nr));
	if (!nr) {
		close(fd);
		return -ENOMEM;
	}
	c->regions = nr;
	/* read-only: the daemon's tensors, shared by every client of the snapshot; the
	 * descriptor allows nothing else */
	p = mmap(NULL, r->region_bytes, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) {
		int e = -errno;
		close(fd);
		return e;
	}
	nr[c->n_regions] = (struct dmc_region){ r->region_id, r->region_bytes, p, fd };
	*ret_rg = &nr[c->n_regions++];
	return 0;
}

DMC_EXPORT int dmc_open(dmc_client *c, const struct dmc_open_args *args,
			struct dmc_dataset **ret_dataset)
{
	return dmc_open_policy(c, args, NULL, ret_dataset);
}

static int open_once(dmc_client *c, const struct dmc_open_args *args,
		     const struct dmc_policy *policy, struct dmc_dataset **ret_dataset);

DMC_EXPORT int dmc_open_policy(dmc_client *c, const struct dmc_open_args *args,
			       const struct dmc_policy *policy, struct dmc_dataset **ret_dataset)
{
	int rc = open_once(c, args, policy, ret_dataset);

	if (rc == -DMC_E_PROTOCOL && (args->flags & DMC_OPEN_REGIONS) && c->fd >= 0) {
		/* a daemon older than regions refuses the flag (undefined bits): without it,
		 * every item comes in the arena */
		struct dmc_open_args plain = *args;
		plain.flags &= ~DMC_OPEN_REGIONS;
		rc = open_once(c, &plain, policy, ret_dataset);
	}
	return rc;
}

static int open_once(dmc_client *c, const struct dmc_open_args *args,
		     const struct dmc_policy *policy, struct dmc_dataset **ret_dataset)
{
	struct dmc_open m = { 0 };
	struct dmc_open_reply r;
	struct dmc_dataset *ds;
	const struct dmc_region *rg = NULL;
	uint8_t *frame;
	size_t cap;
	uint32_t id = c->next_id++;
	int n, rc, fd, fd2, json_fd;

#define STR(x) ((struct dmc_str){ (x) ? (x) : "", (x) ? (uint32_t)strlen(x) : 0 })
	m.source = args->source;
	m.flags = args->flags;
	m.dtype = args->dtype;
	m.project = STR(args->project);
	m.version = STR(args->version);
	m.server = STR(args->server);
	m.api_key = STR(args->api_key);
	m.arena_bytes = args->arena_bytes;
	if (policy && policy->ops) {
		if (dmc_policy_check(policy) != DMC_PROTO_OK) {
			set_local_error(c, 0, "invalid uniformity policy");
			return -EINVAL;
		}
		m.flags |= DMC_OPEN_POLICY;
		m.policy = *policy;
	}
#undef STR
	cap = 128 + sizeof(struct dmc_policy) * 2 + m.project.len + m.version.len + m.server.len + m.api_key.len;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	n = dmc_open_encode(&m, id, frame, cap);
	if (m.source == DMC_SOURCE_LOCAL && n > 0) {
		/* the daemon reads the folder through our descriptors, until dmc_dataset_close */
		if (!args->project || args->project[0] != '/') {
			set_local_error(c, 0, "a local source is an absolute directory path");
			rc = -EINVAL;
		} else {
			rc = feed_add(c, id, args->project, false, &json_fd);
		}
		if (rc == 0) {
			dmc_frame_set_nfds(frame, (size_t)n, 1);
			rc = send_frame_fds(c, frame, (size_t)n, &json_fd, 1);
			close(json_fd);
			if (rc == 0)
				rc = recv_reply(c, id, DMC_OP_OPEN);
			if (rc < 0)
				feed_remove(c, id);
		}
	} else {
		rc = call(c, frame, n, id, DMC_OP_OPEN);
	}
	explicit_bzero(frame, cap); /* it held the key */
	free(frame);
	fd = c->passed_fd;
	fd2 = c->passed_fd2;
	c->passed_fd = c->passed_fd2 = -1;
	if (rc == 0 && (dmc_open_reply_decode(c->rbuf + DMC_HEADER_SIZE, c->rhdr.length, &r) ||
			r.regions != ((m.flags & DMC_OPEN_REGIONS) != 0)))
		rc = -EPROTO;
	if (rc == 0 && c->arena) {
		/* no arena passed again: a descriptor is the region's */
		if (fd2 >= 0)
			rc = -EPROTO;
		else
			rc = take_region(c, &r, fd, &rg);
		fd = -1;
	} else if (rc == 0) {
		rc = take_region(c, &r, fd2, &rg);
		fd2 = -1;
	}
	if (rc < 0) {
		if (fd >= 0)
			close(fd);
		if (fd2 >= 0)
			close(fd2);
		return rc;
	}
	if (fd >= 0) {
		/* the arena, once per connection, copy-on-write: the seals forbid a writable
		 * shared mapping, a private one is allowed. Pages read are the daemon's; a page
		 * the caller writes becomes the caller's own copy (in-place ops on a batch touch
		 * nobody else) until the release of its range discards it (discard_private). */
		void *p;
		if (c->arena || r.arena_bytes == 0 || r.arena_bytes > (1ull << 44)) {
			close(fd);
			return -EPROTO;
		}
		/* The daemon faults in every page before it places an item there (the arena
		 * grows on demand): faults here only map them, with fault-around, about 0.3 us a
		 * page, so no populate (which would commit the whole, mostly unused, arena). */
		p = mmap(NULL, r.arena_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
		if (p == MAP_FAILED) {
			rc = -errno;
			close(fd);
			return rc;
		}
		c->arena = p;
		c->arena_size = r.arena_bytes;
		c->arena_fd = fd;
	} else if (!c->arena) {
		return -EPROTO;
	}
	ds = calloc(1, sizeof(*ds));
	if (!ds)
		return -ENOMEM;
	ds->strings = strs_dup3(r.project_id, r.project_name, r.version, &ds->info.project_id,
				&ds->info.project_name, &ds->info.version);
	if (!ds->strings) {
		free(ds);
		return -ENOMEM;
	}
	ds->c = c;
	ds->handle = r.handle;
	ds->regions = r.regions;
	ds->rg_base = rg ? rg->base : NULL;
	ds->rg_size = rg ? rg->size : 0;
	ds->feed_id = m.source == DMC_SOURCE_LOCAL ? id : 0;
	ds->info.snapshot_id = r.snapshot_id;
	ds->info.items = r.items;
	ds->info.arena_bytes = c->arena_size;
	*ret_dataset = ds;
	return 0;
}

DMC_EXPORT const struct dmc_dataset_info *dmc_dataset_info(const struct dmc_dataset *ds)
{
	return &ds->info;
}

DMC_EXPORT int dmc_dataset_close(struct dmc_dataset *ds)
{
	uint8_t frame[64];
	uint32_t id;
	int rc = 0;

	if (!ds)
		return 0;
	if (ds->c->fd >= 0) {
		id = ds->c->next_id++;
		rc = call(ds->c, frame, dmc_close_encode(ds->handle, id, frame, sizeof(frame)), id,
			  DMC_OP_CLOSE);
	}
	if (ds->feed_id)
		feed_remove(ds->c, ds->feed_id);
	free(ds->strings);
	free(ds);
	return rc;
}

/*
 * Reads n item records from `r` (which must then be consumed) into ret_items, checking every
 * descriptor against the arena (or the region of `ds`, for a tensor handed there) before it
 * becomes a pointer. With regions on `ds`, n in_region flags follow the records; in a
 * STREAM batch (`stream`) they may be absent (a daemon older than batches handed in place:
 * every item is in the arena). Messages live in c->item_msgs.
 */
static int read_items(dmc_client *c, const struct dmc_dataset *ds, struct dmc_reader *r,
		      uint32_t n, struct dmc_item *ret_items, bool stream)
{
	size_t msgs = 0;
	bool flags = ds && ds->regions;

	if (c->items_cap < n) {
		struct dmc_item_desc *ni = realloc(c->items, n * sizeof(*ni));
		if (!ni)
			return -ENOMEM;
		c->items = ni;
		uint8_t *nf = realloc(c->in_region, n);
		if (!nf)
			return -ENOMEM;
		c->in_region = nf;
		c->items_cap = n;
	}
	for (uint32_t i = 0; i < n; i++) {
		dmc_item_desc_read(r, &c->items[i]);
		msgs += c->items[i].message.len + 1;
	}
	if (flags && stream && !r->err && r->pos == r->len)
		flags = false;
	for (uint32_t i = 0; i < n; i++)
		c->in_region[i] = flags ? dmc_read_u8(r) : 0;
	if (dmc_reader_finish(r))
		return -EPROTO;
	if (msgs > c->item_msgs_cap) {
		char *nm = realloc(c->item_msgs, msgs);
		if (!nm)
			return -ENOMEM;
		c->item_msgs = nm;
		c->item_msgs_cap = msgs;
	}
	msgs = 0;
	for (uint32_t i = 0; i < n; i++) {
		const struct dmc_item_desc *d = &c->items[i];
		struct dmc_item *it = &ret_items[i];
		memset(it, 0, sizeof(*it));
		it->index = d->index;
		it->status = d->status ? -(int)d->status : 0;
		memcpy(c->item_msgs + msgs, d->message.ptr, d->message.len);
		c->item_msgs[msgs + d->message.len] = '\0';
		it->message = c->item_msgs + msgs;
		msgs += d->message.len + 1;
		if (d->status)
			continue;
		const uint8_t *base = c->in_region[i] ? ds->rg_base : c->arena;
		uint64_t size = c->in_region[i] ? ds->rg_size : c->arena_size;
		if (c->in_region[i] > 1 || !base)
			return -EPROTO;
		if (d->ndim != 4 || !dmc_dtype_size(d->dtype) || d->offset > size ||
		    d->nbytes > size - d->offset || d->meta_offset > c->arena_size ||
		    d->meta_len > c->arena_size - d->meta_offset ||
		    d->shape[0] * d->shape[1] * d->shape[2] * d->shape[3] * dmc_dtype_size(d->dtype) !=
			    d->nbytes)
			return -EPROTO;
		it->dtype = d->dtype;
		it->ndim = d->ndim;
		memcpy(it->shape, d->shape, sizeof(it->shape));
		it->data = base + d->offset;
		it->region = c->in_region[i];
		it->nbytes = d->nbytes;
		it->offset = d->offset;
		it->meta = (const char *)c->arena + d->meta_offset;
		it->meta_len = d->meta_len;
		it->meta_offset = d->meta_offset;
	}
	return 0;
}

DMC_EXPORT int dmc_get(struct dmc_dataset *ds, const uint64_t *indices, uint32_t n,
		       struct dmc_item *ret_items)
{
	dmc_client *c = ds->c;
	struct dmc_reader r;
	uint8_t *frame;
	size_t cap = 64 + (size_t)n * 8;
	uint32_t id = c->next_id++, count;
	int len, rc;

	if (n == 0 || n > DMC_GET_MAX)
		return -EINVAL;
	frame = malloc(cap);
	if (!frame)
		return -ENOMEM;
	len = dmc_get_encode(ds->handle, indices, n, id, frame, cap);
	rc = call(c, frame, len, id, DMC_OP_GET);
	free(frame);
	if (rc < 0)
		return rc;
	dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
	count = dmc_read_u32(&r);
	if (r.err || count != n)
		return -EPROTO;
	return read_items(c, ds, &r, n, ret_items, false);
}

/* Drops the caller's private copies of the pages of [off, off + len) in the arena, before
 * the daemon may reuse that range: on a private file mapping MADV_DONTNEED brings back the
 * memfd's own pages (whatever the daemon writes there next), where a page kept would show
 * the caller's stale copy. The daemon aligns every allocation to whole pages (arena.c), so
 * the range rounded out to pages holds no other allocation.
 *
 * Only the pages written are dropped: /proc/self/pagemap tells them (present and not
 * file-backed: bit 63 set, bit 61 clear; readable without privilege), so pages only read
 * stay mapped and the next batch in the same range costs no faults (re-mapping 16 MiB
 * costs about 10 ms on a virtual machine, a pagemap read of it about 0.1 ms). Opened per
 * call: a descriptor kept across fork() would describe the parent. Without pagemap, the
 * whole range is dropped. */
static void discard_private(const dmc_client *c, uint64_t off, uint64_t len)
{
	uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE), lo, hi, ent[512];
	uint8_t *base = (uint8_t *)c->arena;
	int fd;

	if (!c->arena || len == 0 || off >= c->arena_size)
		return;
	if (page == 0 || (page & (page - 1)))
		page = 4096;
	lo = off & ~(page - 1);
	hi = len > c->arena_size - off ? c->arena_size : off + len;
	hi = (hi + page - 1) & ~(page - 1);
	if (hi > c->arena_size)
		hi = c->arena_size;
	if (hi <= lo)
		return;
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		madvise(base + lo, hi - lo, MADV_DONTNEED);
		return;
	}
	for (uint64_t p = lo; p < hi;) {
		uint64_t n = (hi - p) / page, run = UINT64_MAX;
		ssize_t got;

		if (n > sizeof(ent) / sizeof(ent[0]))
			n = sizeof(ent) / sizeof(ent[0]);
		got = pread(fd, ent, n * sizeof(ent[0]),
			    (off_t)((uintptr_t)(base + p) / page * sizeof(ent[0])));
		if (got != (ssize_t)(n * sizeof(ent[0]))) {
			madvise(base + p, hi - p, MADV_DONTNEED);
			break;
		}
		for (uint64_t i = 0; i <= n; i++) {
			bool priv = i < n && (ent[i] >> 63 & 1) && !(ent[i] >> 61 & 1);
			if (priv && run == UINT64_MAX)
				run = i;
			else if (!priv && run != UINT64_MAX) {
				madvise(base + p + run * page, (i - run) * page, MADV_DONTNEED);
				run = UINT64_MAX;
			}
		}
		p += n * page;
	}
	close(fd);
}

DMC_EXPORT int dmc_release(dmc_client *c, const struct dmc_item *items, uint32_t n)
{
	uint64_t *offs;
	uint8_t *frame;
	uint32_t k = 0, id;
	size_t cap;
	int len, rc;

	if (n == 0)
		return 0;
	offs = malloc((size_t)n * 2 * sizeof(*offs));
	cap = 64 + (size_t)n * 16;
	frame = malloc(cap);
	if (!offs || !frame) {
		free(offs);
		free(frame);
		return -ENOMEM;
	}
	for (uint32_t i = 0; i < n; i++) {
		if (items[i].status || !items[i].data)
			continue;
		if (items[i].region) {
			/* read-only and shared: nothing private to drop; the metadata's offset
			 * gives both back */
			offs[k++] = items[i].meta_offset;
			continue;
		}
		discard_private(c, items[i].offset, items[i].nbytes);
		offs[k++] = items[i].offset;
		offs[k++] = items[i].meta_offset;
	}
	if (k == 0) {
		free(offs);
		free(frame);
		return 0;
	}
	id = c->next_id++;
	len = dmc_release_encode(offs, k, id, frame, cap);
	rc = call(c, frame, len, id, DMC_OP_RELEASE);
	free(offs);
	free(frame);
	return rc;
}

DMC_EXPORT const void *dmc_arena(const dmc_client *c, uint64_t *ret_size)
{
	if (ret_size)
		*ret_size = c->arena_size;
	return c->arena;
}

/* ---- streams ---- */

struct dmc_stream {
	dmc_dataset *ds;
	uint32_t id;
	struct dmc_stream_req m;
	uint64_t batches;
	struct dmc_item *items; /* batch_size entries */
	bool ended;
	bool stopped;
	uint64_t sent;
};

DMC_EXPORT int dmc_stream_start(dmc_dataset *ds, const struct dmc_stream_args *a,
				dmc_stream **ret_stream)
{
	dmc_client *c = ds->c;
	struct dmc_stream *st;
	uint8_t frame[128];
	uint64_t per_rank;
	int n, rc;

	if (!a || a->world_size == 0 || a->rank >= a->world_size || a->batch_size == 0 ||
	    a->batch_size > DMC_GET_MAX || a->ahead > DMC_STREAM_AHEAD_MAX)
		return -EINVAL;
	st = calloc(1, sizeof(*st));
	if (!st)
		return -ENOMEM;
	st->items = calloc(a->batch_size, sizeof(*st->items));
	if (!st->items) {
		free(st);
		return -ENOMEM;
	}
	st->ds = ds;
	st->id = c->next_id++;
	st->m.handle = ds->handle;
	st->m.seed = a->seed;
	st->m.epoch = a->epoch;
	st->m.flags = (a->shuffle ? DMC_STREAM_SHUFFLE : 0) | (a->drop_last ? DMC_STREAM_DROP_LAST : 0);
	st->m.rank = a->rank;
	st->m.world_size = a->world_size;
	st->m.batch_size = a->batch_size;
	st->m.ahead = a->ahead;
	dmc_stream_plan(ds->info.items, &st->m, &per_rank, &st->batches);
	n = dmc_stream_encode(&st->m, st->id, frame, sizeof(frame));
	rc = send_frame(c, frame, n);
	if (rc < 0) {
		free(st->items);
		free(st);
		return rc;
	}
	*ret_stream = st;
	return 0;
}

DMC_EXPORT uint64_t dmc_stream_batches(const dmc_stream *st)
{
	return st->batches;
}

DMC_EXPORT uint64_t dmc_stream_item(const dmc_stream *st, uint64_t q)
{
	return dmc_stream_index(st->ds->info.items, &st->m, q);
}

DMC_EXPORT int dmc_stream_next(dmc_stream *st, struct dmc_batch *ret)
{
	dmc_client *c = st->ds->c;
	struct dmc_batch_head bh;
	struct dmc_reader r;
	int rc;

	if (st->ended)
		return 0;
	rc = recv_for(c, st->id);
	if (rc < 0) {
		if (rc != -EINTR)
			st->ended = true; /* an ERROR frame is the stream's last; a broken link too */
		return rc;
	}
	if (c->rhdr.opcode != DMC_OP_STREAM)
		goto proto;
	dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
	if (!(c->rhdr.flags & DMC_FLAG_MORE)) {
		st->sent = dmc_read_u64(&r);
		st->stopped = dmc_read_u32(&r) != 0;
		if (dmc_reader_finish(&r))
			goto proto;
		st->ended = true;
		return 0;
	}
	dmc_batch_head_read(&r, &bh);
	if (r.err || bh.n == 0 || bh.n > st->m.batch_size || bh.data_offset > c->arena_size ||
	    bh.data_len > c->arena_size - bh.data_offset || bh.meta_offset > c->arena_size ||
	    bh.meta_len > c->arena_size - bh.meta_offset)
		goto proto;
	rc = read_items(c, st->ds, &r, bh.n, st->items, true);
	if (rc < 0)
		return rc == -EPROTO ? (close_fd(c), rc) : rc;
	memset(ret, 0, sizeof(*ret));
	for (uint32_t i = 0; i < bh.n; i++) {
		const struct dmc_item *it = &st->items[i];
		if (it->status)
			continue;
		if (it->region) /* checked against the region by read_items() */
			ret->in_region++;
		else if (it->offset < bh.data_offset ||
			 it->offset + it->nbytes > bh.data_offset + bh.data_len)
			goto proto;
		if (it->meta_offset < bh.meta_offset ||
		    it->meta_offset + it->meta_len > bh.meta_offset + bh.meta_len)
			goto proto;
	}
	ret->number = bh.batch;
	ret->n = bh.n;
	ret->uniform = bh.uniform != 0;
	/* one block of the arena holds every tensor only when none is in the region */
	ret->data = ret->in_region ? NULL : c->arena + bh.data_offset;
	ret->data_len = bh.data_len;
	ret->data_offset = bh.data_offset;
	ret->meta_offset = bh.meta_offset;
	ret->items = st->items;
	return 1;
proto:
	close_fd(c);
	st->ended = true;
	return -EPROTO;
}

/* RELEASE of a batch's two regions, not waited for: its reply is skipped among the
 * stream's frames. */
static int release_batch(dmc_client *c, uint64_t data_offset, uint64_t meta_offset)
{
	uint64_t offs[2] = { data_offset, meta_offset };
	uint8_t frame[64];

	return send_frame(c, frame, dmc_release_encode(offs, 2, c->next_id++, frame, sizeof(frame)));
}

DMC_EXPORT int dmc_batch_release(dmc_stream *st, const struct dmc_batch *b)
{
	discard_private(st->ds->c, b->data_offset, b->data_len);
	return release_batch(st->ds->c, b->data_offset, b->meta_offset);
}

DMC_EXPORT int dmc_stream_close(dmc_stream *st)
{
	dmc_client *c;
	uint8_t frame[64];
	uint32_t id;
	bool stop_done = false;
	int rc = 0;

	if (!st)
		return 0;
	c = st->ds->c;
	if (!st->ended && c->fd >= 0) {
		id = c->next_id++;
		rc = send_frame(c, frame, dmc_stop_encode(st->id, id, frame, sizeof(frame)));
		/* the STOP reply and the stream's last frames come in either order; batches
		 * still arriving are given back */
		while (rc >= 0 && (!st->ended || !stop_done)) {
			struct dmc_batch_head bh;
			struct dmc_reader r;

			rc = recv_frame(c);
			if (rc < 0 || !(c->rhdr.flags & DMC_FLAG_REPLY)) {
				rc = rc < 0 ? rc : -EPROTO;
				close_fd(c);
				break;
			}
			if (c->rhdr.request_id == id) {
				stop_done = true;
				if (c->rhdr.opcode != DMC_OP_STOP && c->rhdr.opcode != DMC_OP_ERROR) {
					rc = -EPROTO;
					close_fd(c);
				}
			} else if (c->rhdr.request_id == st->id) {
				if (c->rhdr.opcode == DMC_OP_ERROR ||
				    !(c->rhdr.flags & DMC_FLAG_MORE)) {
					st->ended = true;
					continue;
				}
				dmc_reader_init(&r, c->rbuf + DMC_HEADER_SIZE, c->rhdr.length);
				dmc_batch_head_read(&r, &bh);
				if (r.err) {
					rc = -EPROTO;
					close_fd(c);
					break;
				}
				rc = release_batch(c, bh.data_offset, bh.meta_offset);
			}
		}
	}
	if (rc >= 0 && c->fd >= 0) {
		/* a round trip: every RELEASE sent before it is done when this returns */
		id = c->next_id++;
		rc = call(c, frame, dmc_release_encode(NULL, 0, id, frame, sizeof(frame)), id,
			  DMC_OP_RELEASE);
	}
	free(st->items);
	free(st);
	return rc < 0 ? rc : 0;
}
