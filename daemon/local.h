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
 *     the folder (absolute, "..", empty, NUL) before it is asked for;
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

#include <stdint.h>
#include <stddef.h>

#define LOCAL_JSON_MAX (512ull << 20) /* the largest dataset.json read */
#define LOCAL_ITEMS_MAX (1u << 24)    /* items of one folder */
#define LOCAL_PATHS_MAX (1u << 26)    /* files (images and masks) of one folder */

/* One segmentation file of an item. */
struct local_mask {
	char *annotation_id; /* the annotation's id, or its file path when it has none */
	char *path;          /* relative to the folder, checked by local_path_ok() */
};

/* One resource of the folder. */
struct local_item {
	char *id;       /* resource id (the relative path for the oldest layout) */
	char *path;     /* relative to the folder, checked */
	char *filename;
	char *mimetype;
	char *meta;     /* the dataset.json record of the resource, compact JSON */
	size_t meta_len;
	struct local_mask *masks;
	uint32_t n_masks;
	uint32_t first_path; /* position of its image in the dataset's list of paths */
};

struct local_dataset {
	char *root;    /* the folder's path as the client named it: a label, never opened */
	char *name;    /* dataset.json "name", else the folder's last component */
	char *version; /* dataset.json "updated_at", else "mtime:<dataset.json's mtime>" */
	struct local_item *items;
	uint32_t n;
	uint32_t n_paths; /* images and masks: what the client is asked to open, in order */
	uint8_t digest[32]; /* SHA-256 of dataset.json's bytes as read */
};
void local_dataset_free(struct local_dataset *l);

/*
 * Parses dataset.json from `json_fd` (borrowed; read with pread, never waited on) in any
 * of the client's layouts (section 4.4: "images" with "image_file", or "resources" with
 * "file" and "annotations"). `root` (borrowed) labels the dataset. On failure a message
 * goes to `err`: a path that leaves the folder fails the whole dataset (-EACCES).
 * *ret: free with local_dataset_free().
 */
int local_parse(int json_fd, const char *root, struct local_dataset **ret, char *err,
		size_t errlen);

/* The k-th path of the dataset's list (k < n_paths): item images and their masks. */
const char *local_path(const struct local_dataset *l, uint32_t k);

/* Whether `path` (length `len`) stays inside the folder: relative, non-empty, no NUL, no
 * ".." component, at most DMC_LOCAL_PATH_MAX bytes. */
int local_path_ok(const char *path, size_t len);

#endif
