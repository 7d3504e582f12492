/*
 * libdmcache's private declarations (see dmcache.h): the state of a connection (struct
 * dmc_client) and of an open dataset (struct dmc_dataset) that its parts share, and the
 * functions one part calls in another. The parts:
 *   dmcache.c          connection, frames, local folders' files (LOCAL_NEED), ping, status
 *   dmcache_cache.c    the cache: prefetch, cancel, list, evict, verify, tier, strerror
 *   dmcache_serve.c    serving: OPEN, regions, GET, RELEASE, the arena
 *   dmcache_stream.c   STREAM batches
 * A dmc_client and everything made from it are used by one thread at a time (dmcache.h).
 */
#ifndef DMC_CLIENT_PRIV_H
#define DMC_CLIENT_PRIV_H

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

struct dmc_dataset {
	dmc_client *c;
	uint64_t handle;
	bool regions;            /* opened with DMC_OPEN_REGIONS: GET replies say where */
	const uint8_t *rg_base;  /* its region, or NULL */
	uint64_t rg_size;
	int rg_fd;               /* the region's read-only descriptor (dmc_item_map()), or -1 */
	uint32_t feed_id; /* LOCAL: the OPEN whose file requests are answered; else 0 */
	struct dmc_dataset_info info;
	char *strings;
};

/* dmcache.c */
void set_local_error(struct dmc_client *c, uint32_t code, const char *msg);
bool interrupted(const struct dmc_client *c);
void close_fd(struct dmc_client *c);
char *str_dup(struct dmc_str s);
int send_frame(struct dmc_client *c, const uint8_t *frame, int n);
int send_frame_fds(struct dmc_client *c, const uint8_t *frame, size_t len,
			  const int *fds, unsigned nfds);
int recv_frame(struct dmc_client *c);
int recv_for(struct dmc_client *c, uint32_t id);
int recv_reply(struct dmc_client *c, uint32_t id, uint16_t op);
int call(struct dmc_client *c, const uint8_t *frame, int n, uint32_t id, uint16_t op);
int feed_add(struct dmc_client *c, uint32_t id, const char *dir, bool until_final,
		    int *ret_json_fd);
void feed_remove(struct dmc_client *c, uint32_t id);

/* dmcache_serve.c */
int read_items(dmc_client *c, const struct dmc_dataset *ds, struct dmc_reader *r,
		      uint32_t n, struct dmc_item *ret_items, bool stream);
void discard_private(const dmc_client *c, uint64_t off, uint64_t len);

#endif
