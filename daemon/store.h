/*
 * store: content-addressed blob files under the cache directory.
 *
 *   <dir>/objects/ab/<64 hex digits>   one blob per content, ab = first digest byte
 *   <dir>/tmp/                         temp files of writes in progress (same file system)
 *   <dir>/quarantine/                  blobs that failed verification, kept for inspection
 *                                      until the next start (cache reconciliation empties it)
 *
 * Content address. A blob's name is the SHA-256 of its *raw* payload (the bytes as
 * downloaded, or the decoded tensor), not of the stored (maybe zstd-compressed) bytes.
 * Naming a blob by the SHA-256 of its stored bytes was the alternative; we chose the raw
 * payload because:
 *   - I1 is stated on the raw SHA-256: every read hashes the bytes it hands out, so the
 *     check that protects the client is the address check itself;
 *   - the fetcher hashes the download as it streams and may know the expected digest up
 *     front: it can verify without knowing how the store will encode the bytes;
 *   - dedup does not depend on the compression decision or the zstd version and level.
 * The stored bytes are protected by the same check (a flipped bit in a zstd frame either
 * breaks the frame or changes the decoded bytes) and the header by its own checksum.
 *
 * File format (explicit little-endian, STORE_HEADER_SIZE bytes, then the payload):
 *
 *   off size field
 *     0    8 magic        "DMCBLOB\n"
 *     8    2 version      STORE_FORMAT_VERSION
 *    10    2 header size  STORE_HEADER_SIZE
 *    12    1 kind         enum store_kind
 *    13    1 compression  enum store_comp
 *    14    2 reserved     zero
 *    16    8 raw size     bytes of the raw payload
 *    24    8 stored size  bytes after the header; the file is exactly header + stored
 *    32   32 digest       SHA-256 of the raw payload; equals the file name
 *    64   24 reserved     zero
 *    88    8 check        first 8 bytes of SHA-256 over bytes 0..87
 *
 * The header is self-describing so that the index can be rebuilt from the files alone.
 * STORE_COMP_ZSTD payloads are one zstd frame; STORE_COMP_NONE payloads are the raw bytes.
 *
 * Writes: temp file in tmp/ -> write -> fsync -> rename into objects/ab/ -> fsync that
 * directory. A blob that is visible under its name is complete and durable. Identical
 * content written twice is stored once.
 *
 * Reads verify the header, the key (header digest = requested digest), the sizes and the
 * SHA-256 of the raw bytes handed out. A blob failing any check is a miss: it is moved to
 * quarantine/, counted, and the read returns -DMC_E_INTEGRITY, never wrong bytes.
 *
 * Threads: after store_open() returns, every function here may be called from any thread,
 * concurrently (they are blocking: call them from the libuv threadpool, not the loop),
 * except store_close(), which needs every other call to have returned, and store_scan(),
 * which is meant for startup reconciliation while no writer runs. A struct store_writer
 * belongs to one thread at a time.
 *
 * Errors: >= 0 success; negative errno; -DMC_E_CACHE_FULL (ENOSPC, EDQUOT, or a limit),
 * -DMC_E_INTEGRITY (a digest or blob check failed), -DMC_E_LIMIT_EXCEEDED (an object larger
 * than max_object). EROFS and EACCES pass through as negative errno.
 */
#ifndef DMC_DAEMON_STORE_H
#define DMC_DAEMON_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STORE_DIGEST_SIZE 32u
#define STORE_HEX_SIZE (2u * STORE_DIGEST_SIZE)
#define STORE_HEADER_SIZE 96u
#define STORE_FORMAT_VERSION 1u

/* Largest raw payload accepted when the options give none (a 4k x 4k x 2000-frame
 * int16 series is 64 GiB; nothing we cache comes close to this default). */
#define STORE_OBJECT_MAX_DEFAULT (16ull << 30)
/* Hard ceiling for any size read from a blob header or asked for by a caller. */
#define STORE_OBJECT_MAX_HARD (1ull << 40)

/* What a blob holds. The values reach the disk: never renumber, never reuse. */
enum store_kind {
	STORE_KIND_RAW = 1,    /* a resource as downloaded (DICOM, JPEG, PNG, NIfTI, ...) */
	STORE_KIND_TENSOR = 2, /* a decoded tensor (pixels) */
	STORE_KIND_META = 3,   /* metadata JSON (resource record, annotations, DICOM header) */
	STORE_KIND_MASK = 4,   /* a decoded segmentation mask */
};
#define STORE_KIND_FIRST_ 1
#define STORE_KIND_LAST_ 4

/* How the payload is encoded. The values reach the disk. */
enum store_comp {
	STORE_COMP_NONE = 0,
	STORE_COMP_ZSTD = 1,
};

struct store_options {
	uint64_t max_size;   /* bytes of blob files (headers included); 0: no limit */
	uint64_t min_free;   /* bytes to keep free on the cache file system; 0: none */
	uint64_t max_object; /* largest raw payload; 0: STORE_OBJECT_MAX_DEFAULT */
	int zstd_level;      /* 1..3; 0: 1 */
};

/* A blob as its header describes it. */
struct store_blob_info {
	uint8_t digest[STORE_DIGEST_SIZE];
	uint8_t kind;        /* enum store_kind */
	uint8_t comp;        /* enum store_comp */
	uint64_t raw_size;
	uint64_t stored_size;
	uint64_t file_size;  /* header + stored: what the blob costs against max_size */
	int64_t mtime_ms;    /* file modification time (rebuilds use it as an access time) */
};

/* Counters since store_open(); a consistent copy is taken under the store's lock. */
struct store_stats {
	uint64_t used_bytes;       /* file bytes of the blobs in objects/ */
	uint64_t objects;          /* number of blobs in objects/ */
	uint64_t reserved_bytes;   /* admitted by store_reserve() and not yet released */
	uint64_t writes;           /* commits that published a new blob */
	uint64_t dedup_hits;       /* commits whose content was already stored */
	uint64_t compressed;       /* new blobs stored with zstd */
	uint64_t bytes_written;    /* raw bytes committed (new or dedup) */
	uint64_t reads;            /* successful verified reads */
	uint64_t bytes_read;       /* raw bytes handed out by reads */
	uint64_t integrity_failures; /* blobs that failed a check on read, verify or commit */
	uint64_t quarantined;      /* blobs moved to quarantine/ */
	uint64_t fsync_failures;   /* fsync errors (never retried on the same fd) */
	uint64_t removed;          /* blobs removed by store_remove() (eviction) */
	uint64_t cache_full;       /* writes or reservations refused for space */
	/* objects/<b>/ directories a background reconciliation has still to walk: while
	 * non-zero, used_bytes and objects count only what those hold that changed since the
	 * start, and max_size is not enforced (store_dir_settle()) */
	unsigned unsettled_dirs;
};

struct store;
struct store_writer;

/*
 * Opens (creating if needed) the store under `dir` (borrowed; copied). Creates objects/,
 * tmp/ and quarantine/, mode 0700 (objects/ab/ appear with their first blob). Accounting starts at zero: run store_scan() (cache_open()
 * does) to learn what is on disk. On failure returns a negative code and writes a message to
 * `err` (may be NULL). *ret_store: free with store_close().
 */
int store_open(const char *dir, const struct store_options *opts, char *err, size_t errlen,
	       struct store **ret_store);
void store_close(struct store *s);

/* The cache directory given to store_open(); borrowed from `s`. */
const char *store_dir(const struct store *s);

void store_get_stats(struct store *s, struct store_stats *ret_stats);

/* ---- writing ---- */

/*
 * Starts a blob of `kind`. `expected_size` is the raw size if known (checked at commit), or
 * UINT64_MAX. The writer hashes, decides the encoding and writes to a temp file as bytes
 * come in. *ret_w is freed by store_writer_commit() or store_writer_abort(), whatever they
 * return.
 */
#define STORE_SIZE_UNKNOWN UINT64_MAX
int store_writer_open(struct store *s, enum store_kind kind, uint64_t expected_size,
		      struct store_writer **ret_w);

/*
 * How much zstd must shrink the payload's first 128 KiB for the blob to be stored
 * compressed: to at most `pct` percent (default 95; 0: never try zstd). Call before the
 * first write (-EINVAL after, or above 100). Downloads ask for more than the default: zstd-1
 * costs ~1.8 CPU s/GiB on noisy 16-bit data, as much as receiving the bytes (docs/benchmarks.md
 * T4), and a raw blob is served without decompressing it.
 */
int store_writer_set_zstd_keep(struct store_writer *w, unsigned pct);

/*
 * Appends `len` bytes (borrowed). After an error every later call returns the same error
 * and the commit fails with it; the temp file is removed at the latest by commit or abort.
 * -DMC_E_LIMIT_EXCEEDED once the payload passes max_object or expected_size.
 */
int store_writer_write(struct store_writer *w, const void *buf, size_t len);

/*
 * Finishes the blob: verifies the size and, if `expected` is not NULL, the digest
 * (-DMC_E_INTEGRITY on mismatch, nothing published), makes it durable and publishes it.
 * If the content is already stored and verifies, the temp file is dropped (dedup).
 * On success *ret_info describes the blob now on disk (may be NULL) and the blob is pinned
 * once (so that eviction cannot remove it before the caller has recorded it): call
 * store_unpin() when done. Frees `w` in every case.
 */
int store_writer_commit(struct store_writer *w, const uint8_t expected[STORE_DIGEST_SIZE],
			struct store_blob_info *ret_info);

/* Drops the write and its temp file. Frees `w`. NULL is a no-op. */
void store_writer_abort(struct store_writer *w);

/* One-shot convenience: open, write, commit. Same results and pin as store_writer_commit(). */
int store_put(struct store *s, enum store_kind kind, const void *buf, size_t len,
	      const uint8_t expected[STORE_DIGEST_SIZE], struct store_blob_info *ret_info);

/*
 * Importing a blob file as it is, header and stored payload, without re-encoding (the
 * cluster tier keeps the store's blob files, tier.h). store_import_open() returns a writer
 * whose store_writer_write() takes the file's bytes; store_writer_commit() then needs
 * `expected`: it checks the header (-DMC_E_INTEGRITY unless it decodes, names `expected`
 * and matches the file's size) and hashes the decoded payload against it before
 * publishing. The blob is pinned once on success, as with any commit.
 */
int store_import_open(struct store *s, struct store_writer **ret_w);

/* ---- reading ---- */

/*
 * Opens blob `digest`'s file read-only with its header checked (not its payload), for a
 * copy of the file as it is (tier uploads). *ret_fd: close() it. Codes as store_stat().
 */
int store_open_blob(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int *ret_fd,
		    struct store_blob_info *ret_info);


/*
 * Reads and checks the header of blob `digest`. -ENOENT if there is none; a blob whose
 * header fails a check is quarantined and gives -DMC_E_INTEGRITY. The payload is not
 * hashed: use store_read() before trusting bytes.
 */
int store_stat(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE],
	       struct store_blob_info *ret_info);

/*
 * Reads the raw payload of blob `digest` into `buf` (capacity `cap`, borrowed) and verifies
 * its SHA-256. Returns 0 and sets *ret_size, or -ENOENT (no blob), -DMC_E_INTEGRITY (the
 * blob was corrupt: quarantined and counted; treat as a miss), -ENOBUFS (cap is smaller
 * than the raw size, which is then in *ret_size; nothing else happens), -EIO (read error:
 * the blob is quarantined too), other negative errno. On failure `buf` may have been
 * written but must not be used.
 */
int store_read(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], void *buf, size_t cap,
	       uint64_t *ret_size);

/* Full verification of one blob without handing bytes out. Same codes as store_read(). */
int store_verify(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE],
		 struct store_blob_info *ret_info);

/*
 * Verifies every blob (header and SHA-256). Bad ones are quarantined and reported to
 * `on_bad` (may be NULL; digest borrowed for the call) so the caller can drop their index
 * rows. Counts go to *ret_ok and *ret_bad (may be NULL). Safe alongside other calls.
 */
typedef void (*store_bad_cb)(void *ctx, const uint8_t digest[STORE_DIGEST_SIZE]);
int store_verify_all(struct store *s, store_bad_cb on_bad, void *ctx, uint64_t *ret_ok,
		     uint64_t *ret_bad);

/* ---- startup ---- */

/*
 * Startup scan for reconciliation: removes everything in tmp/ and quarantine/, then walks
 * objects/ in digest order. Files with a valid name, a valid header whose digest matches
 * the name, and a file size equal to header + stored size are reported to `on_blob` (info
 * borrowed for the call); anything else is removed. *ret_removed (may be NULL) counts the
 * files removed, temp files included. Payloads are not hashed here (reads and store_verify_all() do that). Resets the
 * used-bytes and object counters to what was found. A callback returning < 0 stops the scan
 * with that code. Call while no writer runs.
 */
typedef int (*store_blob_cb)(void *ctx, const struct store_blob_info *info);

/*
 * Checks a blob file that is not in the store (dmcache tier verify: the tier's copy) as a
 * read would: its bytes in order through store_check_feed() (a negative code once they
 * cannot be right), then store_check_finish(): 0 when the header decodes, names `expected`,
 * the stored size is what came and the decoded payload's SHA-256 is `expected`;
 * -DMC_E_INTEGRITY otherwise. The caller's thread; no store involved.
 */
struct store_check;
int store_check_new(struct store_check **ret);
int store_check_feed(struct store_check *c, const void *buf, size_t len);
int store_check_finish(struct store_check *c, const uint8_t expected[STORE_DIGEST_SIZE],
		       struct store_blob_info *ret_info);
void store_check_free(struct store_check *c);
int store_scan(struct store *s, store_blob_cb on_blob, void *ctx, uint64_t *ret_removed);

/*
 * The same startup work in parts, for a caller that merges objects/ with its own list of
 * the blobs it knows (cache_reconcile() with the index's rows: one directory walk against
 * one ordered scan, no open and no query per known blob). Call while no writer runs.
 *   store_scan_begin()  empties tmp/ and quarantine/ (counted into *ret_removed).
 *   store_scan_list()   the blob names of objects/<first>/ in digest order, into the
 *                       caller's growing array (*digests, *cap; free() it); names that are
 *                       not blob names are removed (counted).
 *   store_scan_known()  whether a blob the caller knows (raw and stored size) is as known,
 *                       by its name alone (one fstatat, no open): 1 and its file size when
 *                       it is a regular file of header + stored_size bytes and raw_size is
 *                       within max_object; 0 when it needs store_scan_adopt(); -ENOENT
 *                       when it is gone.
 *   store_scan_adopt()  the full header check of store_scan() for one blob (name, header,
 *                       size, max_object): 0 and its info, or -DMC_E_INTEGRITY when it was
 *                       bad and moved aside (removed by store_scan_end()).
 *   store_scan_end()    empties quarantine/ and sets the accounting of each directory to
 *                       what the caller counted (file bytes and blobs kept); directories
 *                       in `unsettled` (bit b % 8 of [b / 8]; may be NULL) are left to a
 *                       background reconciliation: they count only changes from now on,
 *                       until store_dir_settle().
 *
 * A background reconciliation (cache_settle.c) walks a directory while writers run:
 *   store_dir_gen()     how many times objects/<first>/'s names changed (publish, remove,
 *                       quarantine), taken before the directory's rows are read.
 *   store_dir_settle()  sets the directory's bytes and blobs to what a walk found, if its
 *                       names did not change since `gen` (1); 0: they did, walk it again.
 *   store_dir_settled() one directory fewer to walk (after its rows were repaired); at
 *                       zero, max_size applies again.
 */
int store_scan_begin(struct store *s, uint64_t *ret_removed);
int store_scan_list(struct store *s, unsigned first, uint8_t (**digests)[STORE_DIGEST_SIZE],
		    size_t *cap, size_t *ret_n, uint64_t *ret_removed);
int store_scan_known(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], uint64_t raw_size,
		     uint64_t stored_size, uint64_t *ret_file_size);
int store_scan_adopt(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE],
		     struct store_blob_info *ret_info);
void store_scan_end(struct store *s, const uint64_t dir_bytes[256],
		    const uint64_t dir_objects[256], const uint8_t unsettled[32]);
uint64_t store_dir_gen(struct store *s, unsigned first);
int store_dir_settle(struct store *s, unsigned first, uint64_t gen, uint64_t bytes,
		     uint64_t objects);
void store_dir_settled(struct store *s);

/* Which objects/<b>/ had a name published, removed or quarantined since store_open():
 * bit b % 8 of ret[b / 8]. The clean-shutdown record (cache_clean.c) checks only those. */
void store_touched(struct store *s, uint8_t ret[32]);

/* ---- space ---- */

/*
 * Admits a write of `raw_size` bytes: succeeds if the used and reserved bytes plus this
 * object's worst-case file size stay within max_size and the file system keeps min_free
 * free; otherwise -DMC_E_CACHE_FULL and nothing is reserved (the caller may evict and try
 * again: cache_reserve() does). -DMC_E_LIMIT_EXCEEDED for an object above max_object or
 * larger than max_size itself. Release with store_release(s, raw_size) once the write is
 * committed or aborted. Since a commit counts its blob before the caller releases, the
 * cache never exceeds max_size by more than the objects still in flight, each of which was
 * admitted against it.
 */
int store_reserve(struct store *s, uint64_t raw_size);
void store_release(struct store *s, uint64_t raw_size);

/* Bytes missing before `raw_size` more would be admitted (0 if it would be now). */
int store_shortfall(struct store *s, uint64_t raw_size, uint64_t *ret_bytes);

/*
 * New max_size and min_free (0: none), as store_options has them; from any thread. Writes
 * admitted before keep their reservation; what is already stored beyond the new limits
 * stays until someone evicts it (cache_set_limits() does at once).
 */
void store_set_limits(struct store *s, uint64_t max_size, uint64_t min_free);

/*
 * Pins: a pinned blob is never removed by store_remove(). Counted; every pin needs its
 * unpin. Pins live in memory only and cost O(number of pins) to look up: pin what is being
 * served or written right now, not whole snapshots.
 */
int store_pin(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE]);
void store_unpin(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE]);
bool store_is_pinned(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE]);

/*
 * Removes blob `digest` (eviction). -EBUSY if pinned, -ENOENT if absent. *ret_freed (may be
 * NULL) gets the file bytes freed.
 */
int store_remove(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], uint64_t *ret_freed);

/* ---- helpers ---- */

/* Lower-case hex of a digest: `out` gets STORE_HEX_SIZE chars and a NUL. */
void store_digest_hex(const uint8_t digest[STORE_DIGEST_SIZE], char out[STORE_HEX_SIZE + 1]);
/* Parses 64 hex digits (either case); -EINVAL otherwise. */
int store_digest_parse(const char *hex, size_t len, uint8_t ret_digest[STORE_DIGEST_SIZE]);
/* SHA-256 of a buffer (the content address of `buf` as a raw payload). */
int store_digest_of(const void *buf, size_t len, uint8_t ret_digest[STORE_DIGEST_SIZE]);

/*
 * SHA-256 as OpenSSL's EVP_MD, fetched once by store_crypto_init(). OpenSSL sets its
 * providers up lazily, and a set-up that fails for want of memory is never tried again
 * (every later digest fails; OpenSSL 3.0 may even crash on a NULL lock): it must not first
 * happen under memory pressure. The daemon calls store_crypto_init() first thing, on the
 * main thread; store_open() calls it too (a no-op once done). Before it, EVP_sha256().
 */
struct evp_md_st;
int store_crypto_init(void);
const struct evp_md_st *store_sha256(void);

/*
 * The header codec, exposed for tests and tools. store_header_encode() writes exactly
 * STORE_HEADER_SIZE bytes; store_header_decode() checks magic, version, size, reserved
 * bytes, kind, compression, sizes and the check field, and returns 0 or -DMC_E_INTEGRITY.
 */
void store_header_encode(const struct store_blob_info *info, uint8_t out[STORE_HEADER_SIZE]);
int store_header_decode(const uint8_t in[STORE_HEADER_SIZE], struct store_blob_info *ret_info);

#endif
