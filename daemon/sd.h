/*
 * The daemon's side of the systemd service protocols: readiness notification
 * (NOTIFY_SOCKET: READY=1, STATUS=, STOPPING=1, WATCHDOG=1) and socket activation
 * (LISTEN_FDS/LISTEN_PID). Uses libsystemd when built with it, and a small equivalent
 * otherwise, so the daemon behaves the same without systemd. Loop thread only.
 */
#ifndef DMC_SD_H
#define DMC_SD_H

#include <stdint.h>

/* Sends one notification ("READY=1\nSTATUS=..."). No-op without NOTIFY_SOCKET. */
int sd_notify_msg(const char *msg);

/*
 * Takes the listening socket passed by socket activation. Returns the fd (>= 3), 0 when
 * none was passed, or -EINVAL when the passed fds are not exactly one listening Unix
 * stream socket. Unsets LISTEN_* so children do not inherit them.
 */
int sd_take_listen_fd(void);

/* WATCHDOG_USEC for this process in microseconds, or 0 when no watchdog is asked for. */
uint64_t sd_watchdog_usec(void);

#endif
