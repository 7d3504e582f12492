/* libdmcache (see dmcache.h, dmcache_priv.h): the connection to the daemon (connect, HELLO,
 * frames with their deadlines and descriptors), the files of local folders the daemon asks
 * for (LOCAL_NEED), PING and STATUS. Used by one thread at a time per client. */
#include "dmcache_priv.h"

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

void set_local_error(struct dmc_client *c, uint32_t code, const char *msg)
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

bool interrupted(const struct dmc_client *c)
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

void close_fd(struct dmc_client *c)
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

void feed_remove(struct dmc_client *c, uint32_t id)
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
int feed_add(struct dmc_client *c, uint32_t id, const char *dir, bool until_final,
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
int send_frame_fds(struct dmc_client *c, const uint8_t *frame, size_t len,
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
int recv_frame(struct dmc_client *c)
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
int recv_for(struct dmc_client *c, uint32_t id)
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
int recv_reply(struct dmc_client *c, uint32_t id, uint16_t op)
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
int send_frame(struct dmc_client *c, const uint8_t *frame, int n)
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
int call(struct dmc_client *c, const uint8_t *frame, int n, uint32_t id, uint16_t op)
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

char *str_dup(struct dmc_str s)
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
