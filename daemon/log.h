/*
 * Logging for dmcached: to stderr (journald picks it up), with syslog levels and groups.
 *
 * Only the daemon logs; libraries and codecs return codes. Debug output is enabled per
 * group (log_set_debug("net,fetch") or "all"). Quote user input in single quotes; secrets
 * never reach a log line. Thread-safe: one write(2) per line.
 */
#ifndef DMC_LOG_H
#define DMC_LOG_H

#include <stdbool.h>

enum log_level {
	LOG_LVL_ERR = 3,
	LOG_LVL_WARNING = 4,
	LOG_LVL_NOTICE = 5,
	LOG_LVL_INFO = 6,
	LOG_LVL_DEBUG = 7,
};

enum log_group {
	LOG_GRP_SYS = 0,
	LOG_GRP_NET,
	LOG_GRP_PROTO,
	LOG_GRP_FETCH,
	LOG_GRP_STORE,
	LOG_GRP_DECODE,
	LOG_GRP_SERVE,
	LOG_GRP_COUNT_,
};

/* Messages above `level` are dropped, except debug messages of groups enabled below. */
void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* "all", "" or a comma-separated list of group names. Returns -EINVAL on an unknown name. */
int log_set_debug(const char *groups);
/* Parses "err", "warning", "notice", "info", "debug". Returns -EINVAL when unknown. */
int log_parse_level(const char *s, enum log_level *ret);
/* Whether a message of this level and group would be written. */
bool log_enabled(enum log_level level, enum log_group group);

void log_msg(enum log_level level, enum log_group group, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/*
 * A line about a prefetch job, with structured fields for journald: under systemd (stderr
 * is the journal's stream) it goes through sd_journal_send with DMCACHE_JOB=,
 * DMCACHE_UID= and DMCACHE_PROJECT=; otherwise to stderr with "job=N uid=U project='P'"
 * after the message.
 */
void log_job(enum log_level level, enum log_group group, unsigned long long job, unsigned uid,
	     const char *project, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

#define log_err(grp, ...) log_msg(LOG_LVL_ERR, LOG_GRP_##grp, __VA_ARGS__)
#define log_warn(grp, ...) log_msg(LOG_LVL_WARNING, LOG_GRP_##grp, __VA_ARGS__)
#define log_notice(grp, ...) log_msg(LOG_LVL_NOTICE, LOG_GRP_##grp, __VA_ARGS__)
#define log_info(grp, ...) log_msg(LOG_LVL_INFO, LOG_GRP_##grp, __VA_ARGS__)
#define log_debug(grp, ...)                                                                        \
	do {                                                                                       \
		if (log_enabled(LOG_LVL_DEBUG, LOG_GRP_##grp))                                     \
			log_msg(LOG_LVL_DEBUG, LOG_GRP_##grp, __VA_ARGS__);                        \
	} while (0)

#endif
