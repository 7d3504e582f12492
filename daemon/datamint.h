/*
 * datamint: the Datamint REST API as the prefetcher uses it ("Generation C" per-resource
 * sync: one request per resource, as the Datamint client does), over fetch.h. The only
 * file that parses Datamint's JSON (jansson).
 *
 *   dm_resolve()        project by id or name (GET /projects[/{id}]), then its dataset's
 *                       updated_at, the version (GET /datasets/{dataset_id})
 *   dm_annotations()    the project's annotations by worklist, paged (GET /annotations),
 *                       grouped by resource
 *   dm_resources_page() one page of the project's resources in a stable order
 *                       (GET /resources with the project filter and offset/limit)
 *   dm_file_url()       the URL of a resource's file or of a segmentation's file
 *
 * JSON bodies are read into memory up to a cap and parsed on the libuv threadpool, so the
 * loop never parses megabytes. Callbacks run on the loop. Errors map to protocol codes:
 * 401/403/404 -> DMC_E_NOT_FOUND_OR_DENIED, other 4xx -> DMC_E_UPSTREAM_PERMANENT (with the
 * status), exhausted retries -> DMC_E_UPSTREAM_TRANSIENT (with retry-after), a body that
 * is not the documented shape -> DMC_E_UPSTREAM_PERMANENT.
 */
#ifndef DMC_DATAMINT_H
#define DMC_DATAMINT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "fetch.h"

#define DM_PAGE_SIZE 1000u          /* resources per listing page */
#define DM_JSON_MAX (256ull << 20)  /* the largest JSON answer read */

/* Who asks: borrowed by every call for its duration (the key until the callback ran). */
struct dm_client {
	struct fetch *fetch;
	uv_loop_t *loop;
	const char *server; /* API base URL without a trailing slash */
	const char *origin; /* fetch_url_origin(server) */
	const char *key;
	uint32_t uid;       /* who the requests work for: places are shared by uid (fetch.h) */
	uint64_t group;     /* fetch_xfer_set_group() of the requests */
	/* optional: a request will be retried (the message says when and why) */
	void (*on_retry)(void *ctx, const char *message);
	void *retry_ctx;
};

struct dm_error {
	int err;            /* 0 or a negated enum dmc_error / negative errno */
	long http_status;
	uint32_t retry_after_ms;
	char message[FETCH_MESSAGE_MAX];
};

struct dm_project {
	char *id;
	char *name;
	char *dataset_id;
	char *worklist_id; /* may be NULL */
	char *version;     /* the dataset's updated_at */
};
void dm_project_free(struct dm_project *p);

typedef void (*dm_project_cb)(void *ctx, const struct dm_error *e, struct dm_project *p);
/* `project` is a name or an id. On success the callback owns `p` (dm_project_free). */
int dm_resolve(const struct dm_client *c, const char *project, dm_project_cb cb, void *ctx);

/* Annotations of a project, by resource id. */
struct dm_annotations;
void dm_annotations_free(struct dm_annotations *a);
typedef void (*dm_annotations_cb)(void *ctx, const struct dm_error *e, struct dm_annotations *a);
/* `worklist_id` NULL gives an empty set at once. The callback owns `a`. */
int dm_annotations(const struct dm_client *c, const char *worklist_id, dm_annotations_cb cb,
		   void *ctx);
/* Number of annotations held. */
uint64_t dm_annotations_count(const struct dm_annotations *a);

/* A segmentation file to fetch with a resource. */
struct dm_mask {
	char *annotation_id;
	char *url;
};

/* One listed resource. */
struct dm_resource {
	char *id;
	char *filename;
	char *mimetype;
	int64_t size;
	char *meta;     /* the resource record as JSON, with its "annotations" array */
	size_t meta_len;
};

struct dm_page {
	struct dm_resource *items;
	uint32_t n;
	uint32_t returned; /* records the server sent, deleted ones included: the next offset */
	uint64_t total;  /* totalCount */
	bool last;       /* fewer than asked for: the listing is complete */
};
void dm_page_free(struct dm_page *p);

typedef void (*dm_page_cb)(void *ctx, const struct dm_error *e, struct dm_page *page);
/*
 * Resources of `proj` from `offset`, oldest first (created_at, then id: a stable order).
 * Deleted resources are left out. Annotations from `ann` (may be NULL) are attached.
 * The callback owns `page`.
 */
int dm_resources_page(const struct dm_client *c, const struct dm_project *proj, uint64_t offset,
		      const struct dm_annotations *ann, dm_page_cb cb, void *ctx);

/*
 * The segmentation files of a resource, from its metadata JSON (as dm_resources_page
 * stored it). *ret_masks: free each field and the array with free(); NULL when none.
 */
int dm_masks_of(const struct dm_client *c, const char *resource_id, const char *meta,
		size_t meta_len, struct dm_mask **ret_masks, uint32_t *ret_n);

/*
 * The metadata JSON with "mask_blobs": {"<annotation id>": "<sha-256 hex>"} for the stored
 * segmentation files. *ret: free with free().
 */
int dm_meta_with_masks(const char *meta, size_t meta_len, const struct dm_mask *masks,
		       const uint8_t (*digests)[32], uint32_t n, char **ret, size_t *ret_len);

/* URL of a resource's file: <server>/resources/<id>/file. Free with free(). */
char *dm_file_url(const struct dm_client *c, const char *resource_id);

#endif
