/*
 * local: dataset folders as the Datamint Python client writes them (dataset.json,
 * images/, masks/), read with the requesting user's own permissions.
 *
 * Trust design. The daemon (often root) never opens a path of a local folder and never
 * decides from metadata (owner, mode, size, mtime) whose bytes it may serve:
 *   - the client library opens dataset.json and every file beneath the folder
 *     (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, O_RDONLY | O_NOFOLLOW | O_NONBLOCK),
 *     keeps regular files only, and passes the descriptors (SCM_RIGHTS, proto.h
 *     LOCAL_NEED / LOCAL_FILES). A descriptor proves that the user could open the file,
 *     so group-readable shared trees and folders in 0700 homes work with a root daemon,
 *     and a file the user cannot open is refused because the client cannot open it;
 *   - this file parses dataset.json from its descriptor and refuses any path that leaves
 *     the folder (absolute, "..", empty, NUL) before it is asked for; a later OPEN of the
 *     same uid may be listed from that parse when its own descriptor shows the same inode,
 *     size, mtime and ctime (prefetch_local.c, struct local_seen), as for files below;
 *   - the prefetcher fstat()s each descriptor (a regular file, else the item fails: no
 *     FIFO or device can block a thread), reads it with pread from offset 0 without
 *     waiting, and links the item to stored content only by the SHA-256 of the bytes just
 *     read. The one shortcut: the same uid's own earlier read of the same inode with the
 *     same size, mtime and ctime (index.h, local reads), which only the owner of the data
 *     can hit and which a write (ctime) always breaks;
 *   - snapshots of local folders are per uid: two users of one shared folder each get
 *     their own, holding what their own descriptors proved.
 *
 * Blocking (reads a descriptor): local_parse runs on the threadpool. No global state.
 */
#ifndef DMC_LOCAL_H
#define DMC_LOCAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#define LOCAL_JSON_MAX (512ull << 20) /* the largest dataset.json read */
#define LOCAL_ITEMS_MAX (1u << 24)    /* items of one folder */
#define LOCAL_PATHS_MAX (1u << 26)    /* files (images and masks) of one folder */
/* Changes within this long before a read are too recent for an inode shortcut: a write
 * in the same clock tick as the last one would leave mtime and ctime as they were. */
#define LOCAL_RACY_NS 100000000ll

/* A file's identity as fstat() says it: what an inode shortcut compares. */
struct local_stamp {
	uint64_t dev, ino;
	int64_t size, mtime_ns, ctime_ns;
};

/*
 * The item table. What a job needs for as long as it runs is compact: per item the offsets
 * of its id and path in `pool`, and its masks (annotation id and path, offsets too) in
 * `masks`; a few large allocations for the whole folder, none per item. What only the
 * listing needs (each record's filename, mimetype and compact JSON) is held apart, in
 * `listing` and `lpool`, until local_listing_free(): once the snapshot's items are put
 * (or found unchanged), the job asks the index for them.
 */
struct local_mask {
	uint32_t annotation_id; /* the annotation's id, or its file path when it has none */
	uint32_t path;          /* relative to the folder, checked by local_path_ok() */
};

struct local_item {
	uint32_t id;         /* resource id (the relative path for the oldest layout) */
	uint32_t path;       /* relative to the folder, checked */
	uint32_t first_mask; /* its masks: masks[first_mask .. first_mask + n_masks) */
	uint32_t n_masks;
	uint32_t first_path; /* position of its image in the dataset's list of paths */
};

/* What the listing needs of an item, offsets into `lpool`. */
struct local_record {
	uint64_t filename, mimetype, meta;
	uint64_t meta_len; /* the record of the resource, compact JSON with sorted keys */
};

struct local_dataset {
	char *root;    /* the folder's path as the client named it: a label, never opened */
	char *name;    /* dataset.json "name", else the folder's last component */
	char *version; /* dataset.json "updated_at", else "mtime:<dataset.json's mtime>" */
	struct local_item *items;
	uint32_t n, items_cap;
	uint32_t n_paths; /* images and masks: what the client is asked to open, in order */
	struct local_mask *masks; /* every item's, in order */
	uint32_t n_masks, masks_cap;
	char *pool;               /* ids and paths, NUL-terminated */
	size_t pool_len, pool_cap;
	struct local_record *listing; /* per item; NULL after local_listing_free(), or
				       * when parsed for the paths only */
	bool paths_only;
	void *map;      /* non-NULL: items, masks and pool are this mapping (local_table.h) */
	size_t map_len;
	char *lpool;
	size_t lpool_len, lpool_cap;
	uint8_t digest[32]; /* SHA-256 of dataset.json's bytes as read */
	struct local_stamp stamp; /* dataset.json's, before it was read */
	bool stable; /* unchanged while read, and not changed just before (LOCAL_RACY_NS) */
};

static inline const char *local_item_id(const struct local_dataset *l, uint32_t i)
{
	return l->pool + l->items[i].id;
}

static inline const char *local_item_path(const struct local_dataset *l, uint32_t i)
{
	return l->pool + l->items[i].path;
}

/* Mask k (< items[i].n_masks) of item i: its file and its annotation id. */
static inline const char *local_mask_path(const struct local_dataset *l, uint32_t i, uint32_t k)
{
	return l->pool + l->masks[l->items[i].first_mask + k].path;
}

static inline const char *local_mask_id(const struct local_dataset *l, uint32_t i, uint32_t k)
{
	return l->pool + l->masks[l->items[i].first_mask + k].annotation_id;
}

/* The listing's view of item i: valid until local_listing_free(). */
static inline const char *local_item_filename(const struct local_dataset *l, uint32_t i)
{
	return l->lpool + l->listing[i].filename;
}

static inline const char *local_item_mimetype(const struct local_dataset *l, uint32_t i)
{
	return l->lpool + l->listing[i].mimetype;
}

static inline const char *local_item_meta(const struct local_dataset *l, uint32_t i,
					  size_t *ret_len)
{
	*ret_len = (size_t)l->listing[i].meta_len;
	return l->lpool + l->listing[i].meta;
}

/* The stamp of `st`. */
void local_stamp_of(const struct stat *st, struct local_stamp *ret);

/* Frees what only the listing needs (filenames, mimetypes, records). */
void local_listing_free(struct local_dataset *l);

void local_dataset_free(struct local_dataset *l);

/*
 * Parses dataset.json from `json_fd` (borrowed; read with pread a block at a time, never
 * waited on) in any of the client's layouts (section 4.4: "images" with "image_file", or
 * "resources" with "file" and "annotations"). The top-level object is scanned as it is
 * read and each of its values decoded on its own (the list one record at a time), so the
 * whole document is never held, as bytes or as a tree: what stays is the item table.
 * "resources" or "images" given twice is refused (which one a reader keeps is not
 * defined). `root` (borrowed) labels the dataset. On failure a message goes to `err`:
 * "dataset.json:LINE: what" for a syntax error; a path that leaves the folder fails the
 * whole dataset (-EACCES). `paths_only`: the records are checked but not kept (no
 * `listing`: the snapshot is listed already).
 * *ret: free with local_dataset_free().
 */
int local_parse(int json_fd, const char *root, bool paths_only, struct local_dataset **ret,
		char *err, size_t errlen);

/* The k-th path of the dataset's list (k < n_paths): item images and their masks. */
const char *local_path(const struct local_dataset *l, uint32_t k);

/* Whether `path` (length `len`) stays inside the folder: relative, non-empty, no NUL, no
 * ".." component, at most DMC_LOCAL_PATH_MAX bytes. */
int local_path_ok(const char *path, size_t len);

#endif
