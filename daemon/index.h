/*
 * index: the SQLite index of the cache (<cache>/index.db). index.c (the database) and
 * index_rows.c (the rows), with index_priv.h, are the only files that include sqlite3.h.
 *
 * What it holds:
 *   snapshots  one per (source, server url, project id, version): a project version pinned
 *              as an ordered resource list. `sealed` once the whole list is in (a snapshot
 *              cut short by a crash is re-listed, never served); `complete` while every item
 *              is stored: set by the prefetcher after counting, cleared by triggers in the
 *              same transaction when a blob row goes or an item is added, dropped or changes
 *              content or size, so a sealed complete snapshot is complete without counting
 *              (live numbers come from index_snapshot_stats()).
 *   items      the resources of a snapshot in order. Key = snapshot id << 32 | position, so
 *              a snapshot is one contiguous range of the table's primary key: point lookups
 *              by position and paging need no secondary index and nothing is loaded whole.
 *              `blob` is the SHA-256 of the item's raw content once known; the item is
 *              *stored* while a blobs row with that digest exists (eviction deletes the blob
 *              row only, so the item keeps its content identity).
 *   blobs      one row per blob file in the store (store.h), with its last access.
 *   grants     (uid, snapshot): when that uid's own key last proved entitlement to the
 *              snapshot, and a salted SHA-256 of the key (never the key). A grant goes with
 *              its snapshot. Offline reads are decided on them (docs/security.md).
 *   meta       small settings of this cache (the salt of the key hashes).
 *   snapshot_probes  (snapshot, kind) -> what an OPEN learnt by reading every item of the
 *              snapshot (the frame counts of DMC_OPEN_FRAMES, the label set of
 *              DMC_OPEN_MASKS), so that the next OPEN reads one row instead of probing
 *              again. Triggers drop a snapshot's rows in the same transaction as anything
 *              that adds, drops or changes one of its items (content, size, record), and
 *              with the snapshot: a row that exists describes the items as they are. A
 *              local folder's listing digest lives there too (INDEX_PROBE_LOCAL_LISTING).
 *
 * Ownership. A snapshot belongs to the uid whose own listing made it (`owner`; -1 for
 * snapshots made by a schema before 4, seen by admins only), and its id is never reused.
 * Reuse of stored content between snapshots never crosses owners except through
 * index_item_find_prior() with owner -1, which the caller allows only for a configured
 * Datamint origin, where the requester's own key revalidates the content.
 *   local_reads  (uid, device, inode) -> the size, mtime and ctime (ns) the file had and
 *              the SHA-256 of its bytes when that uid's descriptor of it was last read
 *              (local.h): the only way a local item is linked without being read again.
 *
 * Durability. WAL mode with synchronous=NORMAL: a committed batch survives a crash of the
 * process (kill -9): its pages are in the WAL file through write(), and the OS has them.
 * On power loss, NORMAL may lose the batches committed since the last WAL sync (at each
 * checkpoint), but never corrupts the database: they roll back as a whole. Blobs are synced
 * before their rows are written, and startup reconciliation adopts blobs whose rows were
 * lost, so a lost batch costs re-linking, never integrity. INDEX_SYNC_FULL syncs the WAL at
 * every batch commit (one fsync per batch, not per item), which makes an acknowledged item
 * survive power loss too (docs/reliability.md I2 with C3).
 *
 * Locking. Exactly one connection, opened with locking_mode=EXCLUSIVE: Debian 12's
 * SQLite 3.40.1 predates the fix of a WAL-reset corruption that needs two writing
 * connections, and the exclusive lock makes a second daemon (or `sqlite3 index.db`) get
 * -EBUSY instead of writing. With an exclusive lock the WAL index lives in heap memory:
 * there is no -shm file. Never open index.db with another fd in this process (POSIX locks
 * go away when any fd of the file is closed).
 *
 * Batching. Writes (index_item_put, index_blob_put, ...) go into one open transaction that
 * index_flush() commits: one transaction per batch, never one per item. The caller flushes
 * on a timer or when index_pending() is large, and acknowledges items only after
 * index_flush() returned 0. A failing write rolls the whole pending batch back (nothing in
 * it was acknowledged) and returns the error. SQLite may also roll the batch back by itself
 * after a failed read (out of memory, I/O): index_batches_lost() counts both, so that
 * whoever acknowledges writes can tell its batch is gone. Reads see the pending writes.
 *
 * Threads: a struct index is used by one thread at a time (the connection is opened
 * without SQLite's mutex). Callbacks receive strings and structs borrowed for the duration
 * of the call, and must not call into the same index.
 *
 * Errors: negative errno, or -DMC_E_CACHE_FULL (SQLITE_FULL), -DMC_E_LIMIT_EXCEEDED (a
 * field over its limit), -DMC_E_INTEGRITY (a corrupt database found after open), -EBUSY
 * (another process holds the index). index_errmsg() has SQLite's message for the log.
 */
#ifndef DMC_DAEMON_INDEX_H
#define DMC_DAEMON_INDEX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define INDEX_SCHEMA_VERSION 6
#define INDEX_DIGEST_SIZE 32u
#define INDEX_STR_MAX (64u << 10)       /* ids, names, urls, versions, etags */
#define INDEX_META_MAX (16u << 20)      /* metadata JSON of one item */
#define INDEX_ITEMS_MAX (1ll << 32)     /* items per snapshot: the key layout */
#define INDEX_SNAPSHOTS_MAX (1ll << 31) /* snapshot ids: the key layout */
#define INDEX_PAGE_MAX 100000u          /* rows per page call */

/* Where a snapshot comes from. Reaches the disk: never renumber. */
enum index_source {
	INDEX_SOURCE_DATAMINT = 1,
	INDEX_SOURCE_FOLDER = 2,
};

enum index_open_flags {
	INDEX_SYNC_FULL = 1u << 0, /* sync the WAL at every commit (see Durability) */
	/* skip PRAGMA quick_check: the caller knows the file is byte for byte the one a clean
	 * close left (the clean-shutdown record, cache_clean.c) */
	INDEX_SKIP_CHECK = 1u << 1,
};

struct index;

struct index_snapshot {
	int64_t id;
	int source; /* enum index_source */
	const char *server_url;
	const char *project_id;
	const char *project_name;
	const char *version;
	int64_t created_at; /* unix seconds */
	bool sealed;
	bool complete;
	int64_t item_count;  /* set by index_snapshot_seal() */
	int64_t total_bytes; /* idem */
	int64_t owner;       /* uid whose listing made it; -1: made before schema 4 */
};

struct index_grant {
	bool has_key_hash;
	uint8_t key_hash[INDEX_DIGEST_SIZE];
	int64_t checked_at; /* unix seconds of the last proof with the key */
};

struct index_snapshot_stats {
	int64_t items, items_stored;
	int64_t bytes, bytes_stored;
};

struct index_item {
	int64_t snapshot_id;
	int64_t idx; /* position in the snapshot, 0 .. INDEX_ITEMS_MAX-1 */
	const char *resource_id;
	const char *filename;
	const char *mimetype;
	int64_t size;     /* upstream size in bytes */
	const char *etag; /* upstream version token of the content, or NULL */
	const char *meta; /* metadata JSON, or NULL; meta_len bytes */
	size_t meta_len;
	bool has_blob;
	uint8_t blob[INDEX_DIGEST_SIZE];
	bool stored; /* output only: a blobs row exists for `blob` */
};

struct index_blob {
	uint8_t digest[INDEX_DIGEST_SIZE];
	int kind; /* enum store_kind */
	int64_t raw_size;
	int64_t stored_size; /* payload bytes after the store's header */
	int64_t last_access; /* milliseconds, monotonic across restarts (see index_blob_put) */
};

/* Where index_lru_page() resumes; zero-initialise to start at the least recently used. */
struct index_lru_cursor {
	int64_t last_access;
	uint8_t digest[INDEX_DIGEST_SIZE];
	bool started;
};

typedef int (*index_snapshot_cb)(void *ctx, const struct index_snapshot *snap);
typedef int (*index_item_cb)(void *ctx, const struct index_item *item);
typedef int (*index_blob_cb)(void *ctx, const struct index_blob *blob);
/* Returns 0 to go on, > 0 to stop (success), < 0 to stop with that error. */
typedef int (*index_snapshot_id_cb)(void *ctx, int64_t snapshot_id);

/*
 * Opens or creates the index at `path` (borrowed), migrating the schema to
 * INDEX_SCHEMA_VERSION, and runs PRAGMA quick_check. A database that fails the check or is
 * not a database is moved aside to `<path>.corrupt-<unix time>` (with its -wal) and a new
 * empty one created: *ret_rebuilt (may be NULL) is then true and the caller must
 * repopulate the blobs table from the store (cache_open() does); snapshots are lost and
 * re-resolve. A database from a newer schema gives -EPROTONOSUPPORT and is left alone.
 * `flags`: enum index_open_flags. On failure a message goes to `err` (may be NULL).
 * *ret_ix: free with index_close().
 */
int index_open(const char *path, unsigned flags, char *err, size_t errlen, struct index **ret_ix,
	       bool *ret_rebuilt);
/* Closes the index. Writes not yet flushed are rolled back: flush first to keep them. */
void index_close(struct index *ix);

/* Which first bytes had a blob row written or deleted since index_open() (bit b % 8 of
 * ret[b / 8]), a batch rolled back included. */
void index_blobs_touched(const struct index *ix, uint8_t ret[32]);

/* SQLite's message for the last failure; borrowed, valid until the next call. */
const char *index_errmsg(struct index *ix);

/*
 * True after a write failed because the cache's file system refuses writes (read-only, or
 * in an error state), until a fresh probe finds it writable again. Loop thread.
 */
bool index_read_only(struct index *ix);

/* ---- batching ---- */

/* Commits the pending batch. 0 with nothing pending. */
int index_flush(struct index *ix);

/* Batches rolled back after an error since the index was opened (see Batching above). */
uint64_t index_batches_lost(const struct index *ix);
/* Writes queued since the last flush. */
unsigned index_pending(const struct index *ix);

/* ---- snapshots ---- */

/*
 * Finds the snapshot of (source, server_url, project_id, version, owner) or creates it
 * from `key` (project_name and created_at are taken from it on creation). Batched. Ids are
 * never reused, even after a delete.
 */
int index_snapshot_get_or_create(struct index *ix, const struct index_snapshot *key,
				 int64_t *ret_id, bool *ret_created);
/* -ENOENT if there is none. */
int index_snapshot_find(struct index *ix, int source, const char *server_url,
			const char *project_id, const char *version, int64_t owner, int64_t *ret_id);
/* Calls `cb` with snapshot `id`; -ENOENT if there is none. */
int index_snapshot_get(struct index *ix, int64_t id, index_snapshot_cb cb, void *ctx);
/* Every snapshot, by id. A callback returning < 0 stops the walk with that code. */
int index_snapshot_list(struct index *ix, index_snapshot_cb cb, void *ctx);
/* Marks the item list as whole and records item_count and total_bytes. Batched. */
int index_snapshot_seal(struct index *ix, int64_t id);
int index_snapshot_set_complete(struct index *ix, int64_t id, bool complete);
/* Live counts: items, items with a stored blob, and their upstream bytes. */
int index_snapshot_stats(struct index *ix, int64_t id, struct index_snapshot_stats *ret);
/* Deletes the snapshot, its items and its grants (not the blobs). Batched. */
int index_snapshot_delete(struct index *ix, int64_t id);

/* ---- items ---- */

/*
 * Inserts or replaces item (snapshot_id, idx). Batched. Replacing an item of the same
 * resource id and size, and the same etag unless the new one has none, with one that has
 * no blob keeps the stored blob, etag and metadata (a snapshot listed again after a crash,
 * or by a second job, keeps what is stored; a changed local file does not).
 */
int index_item_put(struct index *ix, const struct index_item *item);
/* Records the content digest of an item once its blob is stored. Batched. -ENOENT if none. */
int index_item_set_blob(struct index *ix, int64_t snapshot_id, int64_t idx,
			const uint8_t digest[INDEX_DIGEST_SIZE]);
/* Point lookup; -ENOENT if there is no such item. */
int index_item_get(struct index *ix, int64_t snapshot_id, int64_t idx, index_item_cb cb,
		   void *ctx);

enum index_items_filter {
	INDEX_ITEMS_ALL = 0,
	INDEX_ITEMS_MISSING = 1, /* items without a stored blob: what a prefetch must fetch */
};

/*
 * Up to `limit` (<= INDEX_PAGE_MAX) items of a snapshot in order, from position `from`.
 * Returns how many were passed to `cb`; *ret_next (may be NULL) is the position to continue
 * from, or -1 when the snapshot has no more. A callback returning < 0 stops with that code.
 */
int index_items_page(struct index *ix, int64_t snapshot_id, int64_t from, unsigned limit,
		     enum index_items_filter filter, index_item_cb cb, void *ctx,
		     int64_t *ret_next);

/*
 * Is this upstream content already stored? Matches an item of any snapshot with the same
 * resource id, size and etag (a NULL etag never matches: without a version token a resource
 * id is not a content identity) whose blob is present. 0 and *ret_digest, or -ENOENT.
 */
int index_item_find_stored(struct index *ix, const char *resource_id, int64_t size,
			   const char *etag, uint8_t ret_digest[INDEX_DIGEST_SIZE]);

/*
 * The diff of a new version: for every item of snapshot `id` without a stored blob, takes
 * the blob of a stored item of another snapshot OF THE SAME OWNER with the same resource
 * id, size and etag. One statement. *ret_linked (may be NULL) gets how many
 * items were linked; index_items_page(..., INDEX_ITEMS_MISSING, ...) then lists what is
 * left to download. Batched.
 */
int index_snapshot_link_stored(struct index *ix, int64_t id, int64_t *ret_linked);

/* ---- blobs ---- */

/*
 * Records a blob now in the store (insert or update), with last access = now. Batched.
 * Access times are milliseconds of the wall clock, forced to increase: after the clock
 * steps back, new accesses still sort after old ones, so LRU order survives clock jumps.
 */
int index_blob_put(struct index *ix, const struct index_blob *blob);
/* -ENOENT if the blob is not recorded. */
int index_blob_get(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE],
		   struct index_blob *ret_blob);
/* Forgets a blob (evicted, or found bad). Batched. 0 even if it was not recorded. */
int index_blob_delete(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE]);
/* Marks a blob used now. Batched: one small UPDATE in the open transaction. */
int index_blob_touch(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE]);
/* Number of blob rows and the sum of their stored sizes. */
int index_blob_totals(struct index *ix, int64_t *ret_count, int64_t *ret_stored_bytes);
/*
 * Eviction candidates: up to `limit` blobs in least-recently-used order after `cursor`,
 * which is advanced. Returns how many were passed to `cb` (0 at the end).
 */
int index_lru_page(struct index *ix, struct index_lru_cursor *cursor, unsigned limit,
		   index_blob_cb cb, void *ctx);

/* ---- reconciliation (cache_open) ---- */

/* Starts a pass: every blob found in the store is then reported with index_blob_seen(). */
int index_reconcile_begin(struct index *ix, int64_t *ret_pass);
/*
 * Records a blob found in the store: corrects kind and sizes of an existing row (keeping
 * its access time) or adopts it with last_access = blob->last_access. Batched.
 */
int index_blob_seen(struct index *ix, int64_t pass, const struct index_blob *blob);
/* Drops the blob rows not seen in this pass (their files are gone or bad) and flushes. */
int index_reconcile_end(struct index *ix, int64_t pass, int64_t *ret_dropped);

/*
 * The blob rows whose digest starts with byte `first` (0..255), in digest order, to `cb`
 * (a negative return stops the walk with that code). Reconciliation merges them with the
 * store's ordered listing of objects/<first>/. Returns the rows visited.
 */
int index_blobs_first_byte(struct index *ix, unsigned first, index_blob_cb cb, void *ctx);

/* ---- for the prefetcher ---- */

/*
 * Records an item's content once it is stored: its blob, the upstream ETag it was
 * downloaded with (NULL: none), and, when `meta` is not NULL, new metadata JSON. Batched.
 * -ENOENT if there is no such item.
 */
int index_item_set_content(struct index *ix, int64_t snapshot_id, int64_t idx,
			   const uint8_t digest[INDEX_DIGEST_SIZE], const char *etag,
			   const char *meta, size_t meta_len);
/* Another blob the item needs (a segmentation mask): kept while the item exists. Batched. */
int index_item_add_blob(struct index *ix, int64_t snapshot_id, int64_t idx,
			const uint8_t digest[INDEX_DIGEST_SIZE]);
/*
 * The newest stored item with this resource id and size and a known ETag, in a Datamint
 * snapshot of exactly `server_url`, owned by `owner` (-1: any owner): an earlier version to
 * revalidate (If-None-Match) with the requester's own key instead of downloading. 0 with
 * the ETag (NUL-terminated, at most etag_cap bytes) and the digest, or -ENOENT.
 */
int index_item_find_prior(struct index *ix, const char *resource_id, int64_t size,
			  const char *server_url, int64_t owner, char *ret_etag, size_t etag_cap,
			  uint8_t ret_digest[INDEX_DIGEST_SIZE]);
/*
 * Downloaded blobs (kind raw or mask) that no item refers to any more, after snapshots
 * were deleted: what eviction of a project frees. A callback returning < 0 stops.
 */
int index_blobs_unreferenced(struct index *ix, index_blob_cb cb, void *ctx);

/* ---- decoded tensors (for the serving side) ---- */

/*
 * Records the decoded tensor of raw blob `raw` under decoding options `opts` (an encoding
 * the caller chooses), with its metadata blob (may be NULL) and a descriptor text. Batched.
 */
int index_tensor_put(struct index *ix, const uint8_t raw[INDEX_DIGEST_SIZE], int64_t opts,
		     const uint8_t tensor[INDEX_DIGEST_SIZE], const uint8_t *meta,
		     const char *desc);
/* The tensor of (raw, opts) whose blob is recorded; -ENOENT otherwise. */
int index_tensor_get(struct index *ix, const uint8_t raw[INDEX_DIGEST_SIZE], int64_t opts,
		     uint8_t ret_tensor[INDEX_DIGEST_SIZE], bool *ret_has_meta,
		     uint8_t ret_meta[INDEX_DIGEST_SIZE], char *ret_desc, size_t desc_cap);
/* Forgets it (its blob went bad or away). Batched. */
int index_tensor_delete(struct index *ix, const uint8_t raw[INDEX_DIGEST_SIZE], int64_t opts);

/* ---- grants (see Ownership) ---- */

/* Records that `uid`'s key (hash may be NULL) proved entitlement at `checked_at`. Batched. */
int index_grant_put(struct index *ix, int64_t uid, int64_t snapshot_id,
		    const uint8_t key_hash[INDEX_DIGEST_SIZE], int64_t checked_at);
/* -ENOENT if `uid` holds no grant for the snapshot. */
int index_grant_get(struct index *ix, int64_t uid, int64_t snapshot_id,
		    struct index_grant *ret);
/* Drops one grant. Batched. */
int index_grant_delete(struct index *ix, int64_t uid, int64_t snapshot_id);
/*
 * The sealed snapshots of (source, server_url, project id or name) that `uid` holds a grant
 * for, newest first, passed to `cb` until it returns non-zero.
 */
int index_grant_newest(struct index *ix, int64_t uid, int source, const char *server_url,
		       const char *project, index_snapshot_id_cb cb, void *ctx);

/* ---- eviction by snapshot (cache.c) ---- */

/* The snapshots whose items (or their masks) use blob `digest`, to `cb` until it returns
 * non-zero: then 1 if `cb` stopped the walk, else 0. With `cb` NULL: how many there are. */
int index_blob_snapshots(struct index *ix, const uint8_t digest[INDEX_DIGEST_SIZE],
			 index_snapshot_id_cb cb, void *ctx);
/* Snapshots with stored content, least recently used first (their newest blob access). */
int index_snapshots_lru(struct index *ix, index_snapshot_id_cb cb, void *ctx);
/* The stored blobs of snapshot `id` (items and their masks). A callback < 0 stops. */
int index_snapshot_blobs(struct index *ix, int64_t id, index_blob_cb cb, void *ctx);

/* ---- settings ---- */

/* A small value by key: 0 and *ret_len, -ENOENT, or -DMC_E_LIMIT_EXCEEDED over `cap`. */
int index_meta_get(struct index *ix, const char *key, void *buf, size_t cap, size_t *ret_len);
/* Sets it. Batched. */
int index_meta_put(struct index *ix, const char *key, const void *value, size_t len);
/* ---- local folders (schema 4 -> 5; see local.h) ---- */

/* A file as one uid's descriptor showed it (fstat), and what its bytes hashed to. */
struct index_local_read {
	uint32_t uid;
	uint64_t dev, ino;
	int64_t size;
	int64_t mtime_ns, ctime_ns;
	uint8_t digest[INDEX_DIGEST_SIZE]; /* _put: in; _find: out */
};
/*
 * The digest recorded for the same uid, device, inode, size, mtime and ctime, when its
 * blob is stored; -ENOENT otherwise.
 */
int index_local_read_find(struct index *ix, struct index_local_read *r);
/* Records (replaces) the uid's read of that inode. Batched. */
int index_local_read_put(struct index *ix, const struct index_local_read *r);
/*
 * A local snapshot listed again from a changed dataset.json: every item forgets its
 * content (it is proved again with this job's descriptors), items from position `n` on
 * are deleted, and so are the item_blobs rows of the snapshot. (An unchanged listing keeps
 * the rows and forgets, at its job's end, what the job did not prove: index_local_forget(),
 * prefetch_local.c.) Batched.
 */
int index_local_relist(struct index *ix, int64_t snapshot_id, int64_t n);
/*
 * Items `from` .. `to - 1` of a local snapshot forget their content and their item_blobs
 * rows (what a relisting job did not prove again: index_local_relist() for the items of
 * a window). Batched.
 */
int index_local_forget(struct index *ix, int64_t snapshot_id, int64_t from, int64_t to);
/* The item's item_blobs rows (its masks' contents) go: they are put again. Batched. */
int index_item_drop_blobs(struct index *ix, int64_t snapshot_id, int64_t idx);
/* The size of an item, known once its descriptor is fstat()ed. Batched. */
int index_local_item_size(struct index *ix, int64_t snapshot_id, int64_t idx, int64_t size);

/* ---- what OPEN learnt of a snapshot (schema 5 -> 6; see snapshot_probes above) ---- */

enum index_probe_kind {
	INDEX_PROBE_FRAMES = 1, /* uint32 little-endian frame count per item, in order */
	INDEX_PROBE_LABELS = 2, /* the sorted segmentation label names, a JSON array */
	/*
	 * A local folder's listing: the SHA-256 of the dataset.json bytes its items' resource
	 * ids, files, types and records were last put from, and their count (uint32 LE). Not
	 * dropped by the item triggers (proofs change contents and sizes, not the listing):
	 * only the local listing writes these fields and this row, and the row goes with the
	 * snapshot.
	 */
	INDEX_PROBE_LOCAL_LISTING = 3,
	/*
	 * What the owner's last stable parse of the folder's dataset.json saw (prefetch_local.c
	 * "dataset.json's identity"): its identity through the owner's descriptor (device,
	 * inode, size, mtime and ctime in ns, five 64-bit LE), the SHA-256 of its bytes and the
	 * item count (uint32 LE); empty when the last parse was not stable. Kept like
	 * INDEX_PROBE_LOCAL_LISTING, so that a restarted daemon answers an OPEN of an
	 * unchanged folder before reading dataset.json, as the running one does.
	 */
	INDEX_PROBE_LOCAL_SEEN = 4,
};
#define INDEX_PROBE_MAX (64u << 20) /* bytes of one row: 16M items' frame counts */

/* The row of (snapshot, kind): 0 with *ret_data (free() it) and *ret_len, or -ENOENT. */
int index_probe_get(struct index *ix, int64_t snapshot_id, int kind, void **ret_data,
		    size_t *ret_len);
/* Records it (replaces). Batched. The caller writes it only for items it read as they are
 * now (the triggers drop it when they change later). */
int index_probe_put(struct index *ix, int64_t snapshot_id, int kind, const void *data,
		    size_t len);

/* PRAGMA quick_check (or integrity_check with `full`): 0 if "ok", else -DMC_E_INTEGRITY. */
int index_check(struct index *ix, bool full);

#endif
