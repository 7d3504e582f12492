/* Logging to stderr: see log.h. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "log.h"

#if HAVE_LIBSYSTEMD
#include <systemd/sd-journal.h>
#endif

static enum log_level max_level = LOG_LVL_NOTICE;
static unsigned debug_groups; /* bit per enum log_group */
static int journal = -1;       /* stderr is journald's stream; -1: not known yet */

static const char *const group_names[LOG_GRP_COUNT_] = {
	[LOG_GRP_SYS] = "sys",     [LOG_GRP_NET] = "net",       [LOG_GRP_PROTO] = "proto",
	[LOG_GRP_FETCH] = "fetch", [LOG_GRP_STORE] = "store",   [LOG_GRP_DECODE] = "decode",
	[LOG_GRP_SERVE] = "serve",
};

static const char *const level_names[] = {
	[LOG_LVL_ERR] = "err",   [LOG_LVL_WARNING] = "warning", [LOG_LVL_NOTICE] = "notice",
	[LOG_LVL_INFO] = "info", [LOG_LVL_DEBUG] = "debug",
};

void log_set_level(enum log_level level)
{
	max_level = level;
}

enum log_level log_get_level(void)
{
	return max_level;
}

int log_parse_level(const char *s, enum log_level *ret)
{
	for (int l = LOG_LVL_ERR; l <= LOG_LVL_DEBUG; l++) {
		if (strcmp(s, level_names[l]) == 0) {
			*ret = (enum log_level)l;
			return 0;
		}
	}
	return -EINVAL;
}

int log_set_debug(const char *groups)
{
	unsigned mask = 0;
	const char *p = groups;

	while (*p) {
		size_t n = strcspn(p, ", ");
		int found = 0;

		if (n == 3 && strncmp(p, "all", 3) == 0) {
			mask = ~0u;
			found = 1;
		}
		for (int g = 0; g < LOG_GRP_COUNT_ && !found; g++) {
			if (strlen(group_names[g]) == n && strncmp(p, group_names[g], n) == 0) {
				mask |= 1u << g;
				found = 1;
			}
		}
		if (n && !found)
			return -EINVAL;
		p += n;
		p += strspn(p, ", ");
	}
	debug_groups = mask;
	return 0;
}

bool log_enabled(enum log_level level, enum log_group group)
{
	if (level <= max_level)
		return true;
	return level == LOG_LVL_DEBUG && (debug_groups & (1u << group));
}

void log_job(enum log_level level, enum log_group group, unsigned long long job, unsigned uid,
	     const char *project, const char *fmt, ...)
{
	char msg[1536];
	va_list ap;
	int saved = errno;

	if (!log_enabled(level, group))
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (journal < 0)
		journal = getenv("JOURNAL_STREAM") != NULL;
#if HAVE_LIBSYSTEMD
	if (journal &&
	    sd_journal_send("MESSAGE=%s[%s]: %s", level_names[level], group_names[group], msg,
			    "PRIORITY=%d", (int)level, "SYSLOG_IDENTIFIER=dmcached",
			    "DMCACHE_JOB=%llu", job, "DMCACHE_UID=%u", uid, "DMCACHE_PROJECT=%s",
			    project ? project : "", NULL) == 0) {
		errno = saved;
		return;
	}
#endif
	log_msg(level, group, "%s (job=%llu uid=%u project='%s')", msg, job, uid,
		project ? project : "");
	errno = saved;
}

void log_msg(enum log_level level, enum log_group group, const char *fmt, ...)
{
	char line[2048];
	va_list ap;
	int n, m;
	int saved = errno;

	if (!log_enabled(level, group))
		return;
	/* "<N>" lets journald keep the level when stderr is the journal stream */
	if (journal < 0)
		journal = getenv("JOURNAL_STREAM") != NULL;
	if (journal)
		n = snprintf(line, sizeof(line), "<%d>%s[%s]: ", level, level_names[level],
			     group_names[group]);
	else
		n = snprintf(line, sizeof(line), "dmcached: %s[%s]: ", level_names[level],
			     group_names[group]);
	va_start(ap, fmt);
	m = vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += m;
	if ((size_t)n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	(void)!write(STDERR_FILENO, line, (size_t)n);
	errno = saved;
}
