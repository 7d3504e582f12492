/*
 * tier: the cluster tier, an S3-compatible bucket shared by the node caches of a cluster
 * as a second level between each node's store and Datamint (docs/operations.md, "A
 * cluster tier"). One concern: S3 requests over fetch.h's transfers, signed by libcurl's
 * own AWS Signature V4, and the two kinds of objects the tier holds.
 *
 *   PREFIX/blobs/ab/<sha256>  a blob file exactly as the node store keeps it (store.h: the
 *                             96-byte self-describing header, then the stored payload),
 *                             named by the SHA-256 of the raw payload; a node copies it
 *                             into its store without re-encoding and verifies it there
 *   PREFIX/maps/<sha256(origin "\n" resource id)>
 *                             a mapping: which blob an upstream resource was at which
 *                             version (text, one "key value" per line, see tier_map)
 *
 * A mapping is written by a node after a verified download from Datamint, after its blob
 * (a HEAD first: a blob another node uploaded is not sent again). A blob file larger than
 * TIER_MULTIPART_MIN goes up in parts of TIER_PART_SIZE (multipart upload). Reads are the
 * caller's (prefetch_download.c): tier_map_get() for the mapping, tier_xfer_new() for a
 * GET of a blob into the caller's own sink.
 *
 * The credentials (tier_credentials_file, mode 0600 and owned by root or the daemon's
 * user, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY of the service) live in a struct
 * secret (secret.h) and are never logged; the environment's copies are wiped once read.
 *
 * Faults: an unreachable tier, a 5xx or any answer that is not the object makes the
 * caller go to Datamint, with a warning (at most one a minute) and tier_errors counted; a
 * full tier (403 QuotaExceeded, 507) stops uploads until the daemon restarts, with one
 * warning, and reads go on.
 *
 * Threads: the loop thread, except the upload's file reads and hashing, which run on the
 * threadpool and touch only their own upload.
 */
#ifndef DMC_TIER_H
#define DMC_TIER_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "fetch.h"
#include "store.h"

#define TIER_MULTIPART_MIN (64ull << 20) /* blob files above this go up in parts */
#define TIER_PART_SIZE (16ull << 20)
#define TIER_UPLOADS_PARALLEL 2u
#define TIER_UPLOADS_QUEUED_MAX 100000u
#define TIER_MAP_MAX 4096u               /* bytes of a mapping object */
#define TIER_VERSION_MAX 128u

struct config;
struct tier;

/* Counters for STATUS (dmcache metrics: dmcache_tier_*). */
struct tier_stats {
	uint64_t hits;        /* items whose blob came from the tier, verified */
	uint64_t misses;      /* items the tier had no (current) mapping for */
	uint64_t errors;      /* requests that failed (unreachable, 5xx, denied) */
	uint64_t corrupt;     /* blobs that did not match their digest */
	uint64_t bytes;       /* blob bytes read from the tier */
	uint64_t uploads;     /* blobs uploaded */
	uint64_t upload_bytes;
	uint64_t maps_written;
	uint64_t uploads_skipped; /* blobs another node had uploaded already */
	uint64_t uploads_failed;
	uint64_t uploads_pending; /* queued or running */
	bool full;            /* the tier said it is full: no more uploads */
};

/*
 * Creates the tier from the configuration (tier_url, tier_region, tier_prefix,
 * tier_credentials_file or the environment). *ret is NULL, with 0, when no tier_url is
 * configured. An error (credentials missing or unsafe, a bad URL) returns a negative code
 * with a message in `err`, which never contains a credential.
 */
int tier_new(uv_loop_t *loop, struct fetch *f, struct store *store, const struct config *cfg,
	     struct tier **ret, char *err, size_t errlen);
/*
 * Takes AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY out of the environment (wiped there)
 * into a secret for tier_new(). main() calls it before the decoder zygote forks, so that no
 * decoder process ever has them; tier_new() calls it too.
 */
void tier_take_environment(void);
/* Cancels the uploads; frees once their transfers ended. NULL is a no-op. */
void tier_free(struct tier *t);
void tier_get_stats(const struct tier *t, struct tier_stats *ret);

/* A mapping: (origin, resource) at an upstream version -> the blob of its content. */
struct tier_map {
	char version[TIER_VERSION_MAX]; /* the dataset version it was downloaded at */
	char etag[FETCH_ETAG_MAX];      /* the upstream ETag, "" if none */
	int64_t size;                   /* upstream size */
	uint8_t digest[STORE_DIGEST_SIZE];
};

/*
 * Reads the mapping of (`origin`, `resource`). `cb` runs later on the loop with err 0 and
 * the mapping, -ENOENT (none: a miss, counted), or another negative code (the tier failed:
 * counted and warned). `owner`/`group` as fetch_xfer_set_owner/_group. Returns a handle for
 * tier_map_cancel() (after which cb still runs, with -DMC_E_CANCELLED), or NULL (no memory:
 * cb does not run).
 */
typedef void (*tier_map_cb)(void *ctx, int err, const struct tier_map *m);
struct tier_req;
struct tier_req *tier_map_get(struct tier *t, const char *origin, const char *resource,
			      uint32_t owner, uint64_t group, tier_map_cb cb, void *ctx);
void tier_map_cancel(struct tier_req *r);

/*
 * A signed GET of blob `digest` whose body goes to the caller's sink (`ops`, `data`), as
 * fetch_xfer_new() would: start it with fetch_xfer_start(), free it with fetch_xfer_free().
 * NULL: no memory.
 */
struct fetch_xfer *tier_blob_xfer(struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE],
				  const struct fetch_ops *ops, void *data);
/* The result of a tier request: 0, -ENOENT (404), or the failure, which it counts and warns
 * about (`what` names the object for the log). For callers of tier_blob_xfer(). */
int tier_result(struct tier *t, const struct fetch_result *res, const char *what);
/* A hit of `bytes`, or a blob that failed its digest (counted, warned). */
void tier_count_hit(struct tier *t, uint64_t bytes);
void tier_count_miss(struct tier *t);
void tier_count_corrupt(struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE]);

/*
 * After a verified download: uploads blob `digest` (from the store, unless the tier has it)
 * and then the mapping of (`origin`, `resource`). Runs on its own; the caller may go on.
 * Queued uploads past TIER_UPLOADS_QUEUED_MAX, and every upload once the tier is full, are
 * dropped (counted in uploads_failed). With `drop_after` the blob is removed from the store
 * once the upload is over, whatever its outcome (prefetch --to-tier).
 */
void tier_upload(struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE], const char *origin,
		 const char *resource, const struct tier_map *m, bool drop_after);

/* Object key of a blob / a mapping (for tests and tools): `out` gets "PREFIX/blobs/..." */
void tier_blob_key(const struct tier *t, const uint8_t digest[STORE_DIGEST_SIZE], char *out,
		   size_t cap);
void tier_map_key(const struct tier *t, const char *origin, const char *resource, char *out,
		  size_t cap);

/*
 * For tier_admin.c (dmcache tier ls / gc): a signed request `method` on object `key` (or on
 * the bucket, key "", with `query`), body none; NULL: no memory or the tier is closing. The
 * tier is not freed while held (tier_hold/tier_unhold, one per request in flight).
 */
struct fetch_xfer *tier_object_xfer(struct tier *t, const char *key, const char *query,
				    const char *method, const struct fetch_ops *ops, void *data);
const char *tier_key_prefix(const struct tier *t); /* "" or "PREFIX/" */
bool tier_is_closing(const struct tier *t);
void tier_hold(struct tier *t);
void tier_unhold(struct tier *t);

/* Mapping text codec (exposed for tests): 0, or -EINVAL for malformed text. */
int tier_map_encode(const char *origin, const char *resource, const struct tier_map *m,
		    char *out, size_t cap);
int tier_map_decode(const char *text, size_t len, struct tier_map *ret);

#endif
