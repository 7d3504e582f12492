/* systemd notify and socket activation: see sd.h. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "sd.h"

#if HAVE_LIBSYSTEMD
#include <systemd/sd-daemon.h>
#endif

#define LISTEN_FDS_START 3

int sd_notify_msg(const char *msg)
{
#if HAVE_LIBSYSTEMD
	int rc = sd_notify(0, msg);
	return rc < 0 ? rc : 0;
#else
	/* The protocol: one datagram to the AF_UNIX path in NOTIFY_SOCKET ('@' = abstract). */
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t plen;
	socklen_t salen;
	int fd, rc = 0;

	if (!path || !*path)
		return 0;
	plen = strlen(path);
	if ((path[0] != '/' && path[0] != '@') || plen >= sizeof(sa.sun_path))
		return -EINVAL;
	memcpy(sa.sun_path, path, plen);
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = '\0';
	salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen +
			    (path[0] == '/' ? 1 : 0));
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen) < 0)
		rc = -errno;
	close(fd);
	return rc;
#endif
}

static int is_listening_unix_stream(int fd)
{
	struct sockaddr_un sa;
	socklen_t len = sizeof(sa);
	int type = 0, listening = 0;
	socklen_t l = sizeof(type);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &l) < 0 || type != SOCK_STREAM)
		return 0;
	l = sizeof(listening);
	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &l) < 0 || !listening)
		return 0;
	if (getsockname(fd, (struct sockaddr *)&sa, &len) < 0 || sa.sun_family != AF_UNIX)
		return 0;
	return 1;
}

int sd_take_listen_fd(void)
{
	int n, fd;
#if HAVE_LIBSYSTEMD
	n = sd_listen_fds(1);
	if (n < 0)
		return n;
#else
	const char *pid_s = getenv("LISTEN_PID"), *fds_s = getenv("LISTEN_FDS");
	char *end;
	long pid, fds;

	if (!pid_s || !fds_s)
		return 0;
	errno = 0;
	pid = strtol(pid_s, &end, 10);
	if (errno || *end || pid != (long)getpid())
		n = 0;
	else {
		fds = strtol(fds_s, &end, 10);
		if (errno || *end || fds < 0 || fds > 64)
			return -EINVAL;
		n = (int)fds;
	}
	unsetenv("LISTEN_PID");
	unsetenv("LISTEN_FDS");
	unsetenv("LISTEN_FDNAMES");
#endif
	if (n == 0)
		return 0;
	if (n != 1)
		return -EINVAL;
	fd = LISTEN_FDS_START;
	if (!is_listening_unix_stream(fd))
		return -EINVAL;
	if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
		return -errno;
	return fd;
}

uint64_t sd_watchdog_usec(void)
{
#if HAVE_LIBSYSTEMD
	uint64_t usec = 0;
	if (sd_watchdog_enabled(1, &usec) <= 0)
		return 0;
	return usec;
#else
	const char *s = getenv("WATCHDOG_USEC"), *p = getenv("WATCHDOG_PID");
	char *end;
	unsigned long long v;

	if (!s)
		return 0;
	if (p && strtol(p, NULL, 10) != (long)getpid())
		return 0;
	errno = 0;
	v = strtoull(s, &end, 10);
	unsetenv("WATCHDOG_USEC");
	unsetenv("WATCHDOG_PID");
	if (errno || *end || v == 0)
		return 0;
	return v;
#endif
}
