/*
 * local_table: a local folder's item table (local.h: ids, paths, masks) kept on disk after
 * a stable parse of dataset.json, and mapped back instead of parsing those bytes again.
 *
 *   <cache>/tables/<uid>-<64 hex digits>   the table of uid's parse of the dataset.json
 *                                           whose SHA-256 the name gives; mode 0600
 *
 * A warm OPEN of a folder is listed from the identity of the uid's own last stable parse
 * (prefetch_local.c, struct local_seen); the job then needs the paths to ask the client
 * for. At a million entries a parse takes about two seconds and holds the whole table in
 * memory; the table maps in milliseconds, and its pages are the page cache's, touched a
 * window at a time.
 *
 * Trust. The file is the daemon's own, in its cache directory, written atomically (temp
 * file, fsync, rename) from a parse that checked every path. It is named and headed by the
 * uid and dataset.json's digest, and only that uid's job whose listing came from those
 * very bytes maps it. Mapping checks the header, the sizes and the table's structure
 * (every offset inside the pool, the pool NUL-terminated, the masks and paths counted as
 * the parser counts them); the job checks each path again with local_path_ok() before it
 * asks the client for it (local_table_path_ok()). A table failing any check is removed
 * and the job parses dataset.json as before. The table is metadata, like the index: it is
 * not counted against max_size.
 *
 * Format (host byte order: the cache is not carried between machines; another byte order
 * fails the magic check): a LOCAL_TABLE_HEADER-byte header (magic "DMCLTAB\n", version,
 * uid, digest, n, n_paths, n_masks, pool_len, the file's size, then the first 8 bytes of
 * the SHA-256 of what precedes them), then items[n], masks[n_masks], pool[pool_len].
 *
 * Blocking (file I/O): local_table_write() and local_table_map() run on the threadpool;
 * local_table_gc() on the loop (a directory of a few entries). No global state.
 */
#ifndef DMC_LOCAL_TABLE_H
#define DMC_LOCAL_TABLE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "local.h"

#define LOCAL_TABLE_DIR "tables"

/* Writes `l`'s table for `uid` under `cache_dir`. 0, or a negative errno (nothing left
 * behind but a table that was there before). */
int local_table_write(const char *cache_dir, uid_t uid, const struct local_dataset *l);

/*
 * Maps the table of (uid, digest) and checks it against `n` items. 0: *ret is a dataset
 * (paths only, `mapped`) whose items, masks and pool are the mapping, its digest `digest`;
 * free with local_dataset_free(). -ENOENT: no table; -EBADMSG: a table that failed a check
 * (removed). `root` (borrowed) labels the dataset.
 */
int local_table_map(const char *cache_dir, uid_t uid, const uint8_t digest[32], uint32_t n,
		    const char *root, struct local_dataset **ret);

/* Removes the table of (uid, digest), if any. */
void local_table_remove(const char *cache_dir, uid_t uid, const uint8_t digest[32]);

/* Whether path `p` of a mapped table may be asked for (local_path_ok()). */
bool local_table_path_ok(const char *p);

/* Tells the kernel that the mapping's pages walked so far may go (the page cache keeps
 * them); a no-op for a parsed table. */
void local_table_trim(const struct local_dataset *l);

/*
 * Removes every table under `cache_dir` that `keep` does not want (and every temp file
 * older than an hour: a write that did not finish). `keep(ctx, uid, digest)` is asked for each table.
 * Returns the number removed.
 */
int local_table_gc(const char *cache_dir, bool (*keep)(void *ctx, uid_t uid, const uint8_t *digest),
		   void *ctx);

#endif
