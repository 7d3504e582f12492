/*
 * libdmcache: the C client library of dmcached.
 *
 * Blocking calls over the daemon's Unix socket, speaking the protocol of proto.h (which
 * this header includes and the library exports). One dmc_client is one connection; it is
 * not thread-safe: use one per thread, or lock around it. After fork(), the child must
 * not use the parent's client: dmc_close() it and connect again.
 *
 * Errors: every call returns an int, >= 0 on success. A negative value is either a
 * negated errno (-ECONNREFUSED, ...) or a negated enum dmc_error code (-DMC_E_..., all
 * >= 1001) sent by the daemon. dmc_strerror() describes both; for daemon errors,
 * dmc_last_error() has the daemon's message and details.
 *
 * Lifetimes: strings returned by accessor functions are owned by the client and valid
 * until the next call on it or dmc_close(). Objects returned through ret_ pointers are
 * owned by the caller and freed with the matching _free function.
 *
 * The library never logs and never writes to stdout or stderr.
 */
#ifndef DMCACHE_H
#define DMCACHE_H

#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dmc_client dmc_client;

/* Socket paths a client tries, in order (docs/operations.md, "Where things are"):
 * $DMCACHE_SOCKET alone when set; otherwise /run/dmcache/dmcached.sock (system daemon),
 * then $XDG_RUNTIME_DIR/dmcache/dmcached.sock (a user's own daemon). */
#define DMC_SOCKET_SYSTEM "/run/dmcache/dmcached.sock"
#define DMC_SOCKET_PATH_MAX 108
#define DMC_SOCKET_CANDIDATES_MAX 2

/* Fills `paths` with the candidate socket paths; returns how many (0..2). */
int dmc_socket_candidates(char paths[DMC_SOCKET_CANDIDATES_MAX][DMC_SOCKET_PATH_MAX]);

/*
 * Connects to the daemon and says HELLO. `socket_path` NULL means the candidates above:
 * the first that exists is used. Before anything is sent, the daemon's uid (SO_PEERCRED)
 * must be root, the caller's own, or the system user "dmcache"; otherwise -EPERM: a socket
 * squatted by another user never receives a request.
 *
 * On success *ret_client is set; free it with dmc_close(). Errors: -ENOENT (no socket),
 * -ECONNREFUSED (no daemon listening), -EPERM (untrusted daemon uid), -EPROTO,
 * -DMC_E_UNSUPPORTED (no common protocol version), -DMC_E_OVERLOADED, ...
 */
int dmc_connect(const char *socket_path, dmc_client **ret_client);

/* Closes the connection and frees the client. NULL is allowed. */
void dmc_close(dmc_client *c);

/* Milliseconds a blocking call may wait for the daemon; 0 (the default) waits forever.
 * A call that times out returns -ETIMEDOUT and the connection is closed. */
void dmc_set_timeout(dmc_client *c, uint32_t ms);

/* The path connected to; owned by the client. */
const char *dmc_socket_path(const dmc_client *c);
/* The daemon's version string from HELLO ("dmcached 0.1.0"); owned by the client. */
const char *dmc_daemon_version(const dmc_client *c);
/* The negotiated protocol version. */
uint32_t dmc_protocol_version(const dmc_client *c);

/* Round trip with the daemon. */
int dmc_ping(dmc_client *c);

/* The daemon's status: its version, uptime and named counters (proto.h, STATUS). */
struct dmc_status_counter {
	char *name;
	int64_t value;
};
struct dmc_status_info {
	char *version;
	uint64_t uptime_ms;
	uint32_t pid;
	uint32_t n_counters;
	struct dmc_status_counter *counters;
};

/* On success *ret_status is set; free it with dmc_status_free(). */
int dmc_status(dmc_client *c, struct dmc_status_info **ret_status);
void dmc_status_free(struct dmc_status_info *s);
/* A counter's value by name, or `fallback` when the daemon did not send it. */
int64_t dmc_status_get(const struct dmc_status_info *s, const char *name, int64_t fallback);

/*
 * Interrupting a blocking call. `flag` (borrowed; NULL removes it) is typically set by a
 * signal handler installed without SA_RESTART. While it is nonzero, a call waiting for
 * the start of the daemon's next frame returns -EINTR and the connection stays usable;
 * a frame already begun is read to its end first, so the stream never loses its place.
 * The flag is checked before each wait and when a wait is interrupted by a signal.
 */
void dmc_set_interrupt_flag(dmc_client *c, volatile sig_atomic_t *flag);

/* ---- the cache: prefetching, listing, eviction, verification (proto.h) ---- */

/* What to prefetch. Every string is borrowed for the call. */
struct dmc_prefetch_args {
	uint32_t source;     /* enum dmc_source */
	const char *project; /* DATAMINT: a project name or id; LOCAL: an absolute path */
	const char *version; /* NULL, "" or "latest": the newest; else a version string */
	const char *server;  /* DATAMINT: the API base URL; LOCAL: NULL or "" */
	const char *api_key; /* DATAMINT: the caller's key; LOCAL: NULL or "" */
	uint32_t flags;      /* DMC_PREFETCH_OFFLINE: from the caller's grants, no server;
			      * DMC_PREFETCH_ALLOW_PARTIAL; DMC_PREFETCH_DECODE: then decode
			      * the compressed items into the tensor cache (proto.h);
			      * DMC_PREFETCH_SHARD: only the items at rank modulo world;
			      * DMC_PREFETCH_TO_TIER: fill the cluster tier, not the cache */
	uint32_t shard_rank, shard_world; /* read with DMC_PREFETCH_SHARD only */
};

/*
 * A progress record (proto.h, PREFETCH). The strings are owned by the client: in a
 * callback, valid until the callback returns; in *ret_final, until the next call on the
 * client or dmc_close(). They are "" when the daemon sent nothing.
 */
struct dmc_progress_info {
	uint64_t job_id;
	uint64_t snapshot_id; /* 0 until the snapshot exists */
	uint32_t state;       /* enum dmc_job_state */
	const char *project_id;
	const char *project_name;
	const char *version;
	uint64_t items_total, items_done, items_cached, items_failed;
	uint64_t bytes_total, bytes_done;
	uint64_t rate_bps;    /* bytes per second over the last seconds */
	uint64_t eta_ms;      /* 0 when unknown or done */
	uint32_t error_code;  /* enum dmc_error of the item this event reports, or 0 */
	uint32_t http_status; /* its upstream HTTP status, or 0 */
	const char *error_resource;
	const char *error_message;
};

/* Called for each progress event; nonzero stops waiting (the job goes on). */
typedef int (*dmc_progress_cb)(const struct dmc_progress_info *p, void *userdata);

/*
 * Starts, or joins, a prefetch job in the daemon and follows it: `cb` (may be NULL) is
 * called for each event; the call returns when the final record arrives: 0 with
 * *ret_final filled (state DONE, FAILED or CANCELLED; FAILED means some items failed).
 * A job that cannot start returns the daemon's error (-DMC_E_..., details in
 * dmc_last_error()). When `cb` returns nonzero the call returns -ECANCELED at once, and
 * -EINTR when the interrupt flag is set: in both cases the job goes on in the daemon,
 * and later calls on this client skip the rest of its events. Bad arguments: -EINVAL
 * with the reason in dmc_last_error()->message. The key is wiped from the library's
 * buffers once sent.
 *
 * LOCAL: the daemon reads the folder only through descriptors this library opens with the
 * caller's permissions (dataset.json, then each file the daemon asks for: beneath the
 * folder, no symbolic link followed, regular files only; proto.h, LOCAL_NEED). The job
 * needs this connection: it is not joined, and it ends (CANCELLED) when the connection
 * closes. Its requests are answered by whichever call reads from the connection, so a
 * detached local job goes on only while the client keeps calling.
 */
int dmc_prefetch(dmc_client *c, const struct dmc_prefetch_args *args, dmc_progress_cb cb,
		 void *userdata, struct dmc_progress_info *ret_final);

/*
 * Cancels the caller's prefetch jobs of `project` (a name, id or LOCAL path) at `server`
 * (NULL or "" matches any). *ret_count (may be NULL) is the number of jobs cancelled.
 */
int dmc_cancel(dmc_client *c, const char *project, const char *server, uint32_t *ret_count);

/* A snapshot in the cache (proto.h, LIST), with strings owned by the list. */
struct dmc_snapshot_entry {
	uint64_t id;
	uint32_t source;   /* enum dmc_source */
	bool complete;     /* every item of the snapshot is stored */
	bool downloading;  /* a job is filling it now */
	char *server;      /* "" for LOCAL */
	char *project_id;  /* LOCAL: the dataset directory */
	char *project_name;
	char *version;
	uint64_t items, items_stored, bytes;
	uint64_t created_ms; /* Unix time in milliseconds */
	uint32_t owner_uid;  /* whose listing made it; UINT32_MAX: unknown (older cache) */
	uint64_t bytes_stored; /* upstream bytes of the items stored */
};
struct dmc_snapshot_list {
	uint32_t n;
	struct dmc_snapshot_entry *snapshots;
};

/* The snapshots the caller may see. On success *ret_list is set; free with dmc_list_free(). */
int dmc_list(dmc_client *c, struct dmc_snapshot_list **ret_list);
void dmc_list_free(struct dmc_snapshot_list *l);

/*
 * Removes snapshots from the cache, with the blobs no other snapshot uses: every snapshot
 * the caller may see when `all`, else those whose project name or id is `project`.
 * *ret_reply (may be NULL) says what was freed.
 */
int dmc_evict(dmc_client *c, bool all, const char *project, struct dmc_evict_reply *ret_reply);

/* Re-checks every blob's checksum; bad blobs are removed (and fetched again when needed). */
int dmc_verify(dmc_client *c, struct dmc_verify_reply *ret_reply);

/*
 * Administers the cluster tier (admins only; the daemon uses its own tier credentials):
 * `action` DMC_TIER_LS or DMC_TIER_GC, `flags` DMC_TIER_DRY_RUN (proto.h, TIER). The
 * reply's entries point into the client's buffer, valid until its next call.
 */
int dmc_tier(dmc_client *c, uint32_t action, uint32_t flags, struct dmc_tier_reply *ret_reply);

/*
 * Datamint credentials, found where the Datamint tools keep them.
 * Each of the key and the server URL is taken from the first of:
 *   1. the option passed here (api_key_opt, server_opt; NULL or "" for none),
 *   2. the environment: DATAMINT_API_KEY, DATAMINT_API_URL (empty counts as unset),
 *   3. the file $XDG_CONFIG_HOME/datamintapi/datamintapi.yaml, or
 *      ~/.config/datamintapi/datamintapi.yaml: a YAML mapping with `api_key` and
 *      `default_api_url` (what `datamint-config` writes),
 *   4. for the URL only, DMC_DATAMINT_DEFAULT_URL.
 * A key is read from the file only if the file belongs to the caller and no one else may
 * read or write it (mode 0600 or 0400); otherwise -EACCES, and `err` says which `chmod`
 * fixes it. The URL must be http:// or https://; trailing slashes are removed.
 *
 * Returns 0 with *ret filled (api_key NULL when no place has one: the caller decides
 * whether that is an error), or a negative errno with a message in `err` (-EACCES,
 * -EINVAL for a malformed file or value, -EFBIG, -ENOMEM, I/O errors). Free *ret with
 * dmc_credentials_done(), which wipes the key. The key is never part of a message.
 */
#define DMC_DATAMINT_DEFAULT_URL "https://api.datamint.io"
#define DMC_CREDENTIALS_FILE_MAX (64u << 10) /* bytes of datamintapi.yaml */

struct dmc_credentials {
	char *api_key;        /* NULL when none was found */
	char *server;         /* never NULL */
	const char *key_from; /* "--api-key", "DATAMINT_API_KEY", "file", or NULL */
	const char *server_from; /* "--server", "DATAMINT_API_URL", "file", or "default" */
	char *file;           /* the YAML file's path (whether or not it exists), or NULL */
};

int dmc_credentials_load(const char *api_key_opt, const char *server_opt,
			 struct dmc_credentials *ret, char *err, size_t errlen);
void dmc_credentials_done(struct dmc_credentials *cr);

/* Details of the last error the daemon sent on this client; code 0 when none. */
struct dmc_error_info {
	uint32_t code;           /* enum dmc_error */
	uint32_t http_status;    /* upstream HTTP status, or 0 */
	uint32_t retry_after_ms; /* or 0 */
	int32_t sys_errno;       /* for DMC_E_IO, or 0 */
	const char *resource;    /* "" when none */
	const char *message;     /* the daemon's message, or a local one */
};
const struct dmc_error_info *dmc_last_error(const dmc_client *c);

/* ---- reading tensors (proto.h: OPEN, GET, RELEASE, CLOSE) ---- */

struct dmc_open_args {
	uint32_t source;      /* DMC_SOURCE_DATAMINT or DMC_SOURCE_LOCAL */
	const char *project;  /* project name or id; for LOCAL the absolute folder path */
	const char *version;  /* NULL or "latest" for the newest */
	const char *server;   /* DATAMINT: API URL; LOCAL: NULL */
	const char *api_key;  /* DATAMINT: the caller's key (borrowed; wiped from the frame) */
	uint32_t flags;       /* DMC_OPEN_LUT, _FRAMES, _MASKS, _OFFLINE, _RAW, _REGIONS (hot
			       * items of dmc_get() handed in place: read-only, see dmc_item;
			       * a daemon older than regions gets the OPEN again without it) */
	uint32_t dtype;       /* enum dmc_dtype, or 0 for the source dtype */
	uint64_t arena_bytes; /* shared memory wished for; 0: the daemon's default */
};

struct dmc_dataset_info {
	uint64_t snapshot_id;
	uint64_t items;
	const char *project_id, *project_name, *version; /* owned by the dataset */
	uint64_t arena_bytes;
};

/* An opened dataset version. */
typedef struct dmc_dataset dmc_dataset;

/*
 * Opens a dataset version with the caller's own credentials: the daemon checks access with
 * the key (starting or joining a prefetch of the caller's), and items not cached yet are
 * fetched while that job runs. The first open on a client maps its shared-memory arena
 * (copy-on-write: see dmc_arena). Free with dmc_dataset_close() before dmc_close().
 * LOCAL: as dmc_prefetch(); the daemon's requests for files are answered, by any call
 * that reads from this client, until dmc_dataset_close() (at most 16 local datasets open
 * on one client: -EMFILE).
 */
int dmc_open(dmc_client *c, const struct dmc_open_args *args, dmc_dataset **ret_dataset);
/*
 * dmc_open() with a uniformity policy (proto.h: DMC_OPEN_POLICY, struct dmc_policy) that the
 * daemon applies to every item: resize, center crop or pad, channels, CT window. `policy`
 * NULL or with ops 0: none (the request is dmc_open()'s). A policy the protocol refuses
 * fails with -EINVAL before anything is sent.
 */
int dmc_open_policy(dmc_client *c, const struct dmc_open_args *args,
		    const struct dmc_policy *policy, dmc_dataset **ret_dataset);
const struct dmc_dataset_info *dmc_dataset_info(const dmc_dataset *ds);
int dmc_dataset_close(dmc_dataset *ds);

/* One item of a GET. Pointers are into the arena until dmc_release(). */
struct dmc_item {
	uint64_t index;
	int status;          /* 0, or -DMC_E_... for this item alone */
	const char *message; /* why it failed; valid until the next dmc_get() on the client */
	uint32_t dtype;      /* enum dmc_dtype */
	uint32_t ndim;       /* 4: (frames, channels, height, width) */
	uint64_t shape[4];
	const void *data;    /* nbytes, C order */
	uint64_t nbytes;
	const char *meta;    /* JSON {"resource": ..., "dicom": ...}, meta_len bytes, no NUL */
	uint64_t meta_len;
	uint64_t offset, meta_offset; /* where in the arena, for RELEASE */
	uint32_t region;     /* 1: `data` is in the dataset's region (DMC_OPEN_REGIONS), read-only
			      * and shared with other clients: never write through it; 0: in
			      * the arena */
};

/*
 * Gets items `indices[0..n)` (n <= DMC_GET_MAX) into `ret_items` (n entries). Returns 0
 * when the request was answered (each item has its own status), or a negative error.
 * Items wait in the daemon while its arena is full: release what you no longer need.
 */
int dmc_get(dmc_dataset *ds, const uint64_t *indices, uint32_t n, struct dmc_item *ret_items);
/* Gives the arena space of `items` back to the daemon (failed items are skipped). */
int dmc_release(dmc_client *c, const struct dmc_item *items, uint32_t n);
/* The mapped arena and its size; NULL before the first dmc_open(). It is mapped
 * copy-on-write: writes through it make private copies of the pages written, never seen
 * by the daemon or other clients, and discarded when their range is released. */
const void *dmc_arena(const dmc_client *c, uint64_t *ret_size);

/*
 * Views: an item handed in place (`region` 1) mapped on its own, private and copy-on-write,
 * so that a caller can keep it as its tensor instead of copying it out: *ret_view holds the
 * item's `nbytes` (writes make the caller's own pages; another view of the same item never
 * sees them). The daemon keeps the item's pages only while the item is pinned: release the
 * item (dmc_release()) only after dmc_view_unmap(), or after dmc_view_detach(), which turns
 * the view into anonymous memory at the same address (a copy, for a view that must outlive
 * its pin: the client's close, a fork). -EINVAL for an item not in a region (or empty): copy
 * it out instead. Views need no client once made: they stay valid after dmc_close().
 */
int dmc_item_map(const dmc_dataset *ds, const struct dmc_item *it, void **ret_view);
int dmc_view_detach(void *view, uint64_t nbytes);
int dmc_view_unmap(void *view, uint64_t nbytes);

/*
 * Streams (proto.h STREAM): the daemon computes an epoch's order for a rank, prepares
 * `ahead` batches beyond the one being read, and lays each batch out contiguously: when
 * `uniform`, `data` is one C-order tensor (n, frames, channels, height, width) of
 * items[0]'s dtype. While a stream runs on a client, use only the stream calls on it
 * (open another client for dmc_get).
 */
struct dmc_stream_args {
	uint64_t seed, epoch;
	bool shuffle, drop_last; /* as torch's DistributedSampler and DataLoader */
	uint32_t rank, world_size;
	uint32_t batch_size;     /* 1 .. DMC_GET_MAX */
	uint32_t ahead;          /* batches ready beyond the current one; 0: the default (2) */
};

/*
 * A STREAM batch. Without regions on the dataset (or when no item of the batch was hot)
 * its tensors lie back to back in the arena at `data`, one C-order tensor (n, frames,
 * channels, height, width) when `uniform`. With DMC_OPEN_REGIONS, hot items are handed in
 * place: such an item has `region` 1 and its `data` in the dataset's read-only region
 * (valid until dmc_batch_release(), never to be written); `in_region` counts them and the
 * batch's `data` is then NULL: read the items one by one (the other items are in the arena
 * at data_offset). `uniform` still says that every item succeeded with one dtype and shape.
 */
struct dmc_batch {
	uint64_t number;
	uint32_t n;
	bool uniform;
	const void *data;       /* the batch's tensors, back to back; NULL when in_region > 0 */
	uint64_t data_len;      /* bytes of the items in the arena */
	uint64_t data_offset, meta_offset; /* for RELEASE */
	struct dmc_item *items; /* n; valid until the next dmc_stream_next() */
	uint32_t in_region;     /* items whose tensor is in the region (item.region == 1) */
};

typedef struct dmc_stream dmc_stream;

int dmc_stream_start(dmc_dataset *ds, const struct dmc_stream_args *args,
		     dmc_stream **ret_stream);
/* Batches this stream will give: computed as the daemon does. */
uint64_t dmc_stream_batches(const dmc_stream *st);
/* The dataset index at the rank's position q of this epoch. */
uint64_t dmc_stream_item(const dmc_stream *st, uint64_t q);
/* The next batch: 1 with *ret filled, 0 at the end of the epoch, or a negative error. Each
 * item has its own status. Release each batch when done with it: the daemon prepares more
 * only as batches come back. */
int dmc_stream_next(dmc_stream *st, struct dmc_batch *ret);
/* Gives a batch's arena space back (asynchronous: no reply is waited for). */
int dmc_batch_release(dmc_stream *st, const struct dmc_batch *b);
/* Stops the stream if it runs (batches still arriving are released) and frees it. Close
 * every stream before dmc_dataset_close() of its dataset and dmc_close() of its client. */
int dmc_stream_close(dmc_stream *st);

/* A static description of an error returned by this library (negative) or a code. */
const char *dmc_strerror(int err);

/* The library's version, "0.1.0". */
const char *dmc_version(void);

#ifdef __cplusplus
}
#endif

#endif /* DMCACHE_H */
