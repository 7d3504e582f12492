/*
 * index: the SQLite index. See index.h for the tables, durability, locking and batching.
 * This file: the database (statements and schema, opening and checking, errors, batching
 * into transactions); index_rows.c: the rows. SQLite result codes are converted to our
 * codes here (map_rc(), ix_fail()) and nowhere else. Loop thread (index.h).
 */
#include "index.h"
#include "index_priv.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "proto.h"



#define ITEM_COLS                                                                                  \
	"i.key, i.resource_id, i.filename, i.mimetype, i.size, i.etag, i.blob, i.meta, "          \
	"b.digest IS NOT NULL"
#define SNAP_COLS                                                                                  \
	"id, source, server_url, project_id, project_name, version, created_at, sealed, complete, " \
	"item_count, total_bytes, owner"
#define BLOB_COLS "digest, kind, raw_size, stored_size, last_access"

/* An item put again without content, for the same resource, size and (if given) etag. */
#define SAME_CONTENT                                                                              \
	"(excluded.blob IS NULL AND items.resource_id = excluded.resource_id AND "                 \
	"items.size = excluded.size AND (excluded.etag IS NULL OR excluded.etag IS items.etag))"

static const char *const stmt_sql[S_COUNT_] = {
	[S_BEGIN] = "BEGIN",
	[S_COMMIT] = "COMMIT",
	[S_ROLLBACK] = "ROLLBACK",
	[S_SNAP_FIND] = "SELECT id FROM snapshots WHERE source = ?1 AND server_url = ?2 AND "
			"project_id = ?3 AND version = ?4 AND owner = ?5",
	[S_SNAP_INSERT] = "INSERT INTO snapshots (source, server_url, project_id, project_name, "
			  "version, created_at, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
	[S_SNAP_GET] = "SELECT " SNAP_COLS " FROM snapshots WHERE id = ?1",
	[S_SNAP_LIST] = "SELECT " SNAP_COLS " FROM snapshots ORDER BY id",
	[S_SNAP_SEAL] = "UPDATE snapshots SET sealed = 1, "
			"item_count = (SELECT count(*) FROM items WHERE key BETWEEN ?2 AND ?3), "
			"total_bytes = (SELECT coalesce(sum(size), 0) FROM items "
			"WHERE key BETWEEN ?2 AND ?3) WHERE id = ?1",
	[S_SNAP_COMPLETE] = "UPDATE snapshots SET complete = ?2 WHERE id = ?1",
	[S_SNAP_STATS] = "SELECT count(*), count(b.digest), coalesce(sum(i.size), 0), "
			 "coalesce(sum(CASE WHEN b.digest IS NOT NULL THEN i.size END), 0) "
			 "FROM items AS i LEFT JOIN blobs AS b ON b.digest = i.blob "
			 "WHERE i.key BETWEEN ?1 AND ?2",
	[S_SNAP_DEL_ITEMS] = "DELETE FROM items WHERE key BETWEEN ?1 AND ?2",
	[S_SNAP_DEL] = "DELETE FROM snapshots WHERE id = ?1",
	[S_SNAP_LINK] =
		"UPDATE items SET blob = m.blob FROM ("
		" SELECT n.key AS nkey, min(o.blob) AS blob"
		" FROM items AS n"
		" JOIN items AS o ON o.resource_id = n.resource_id AND o.size = n.size"
		"  AND o.etag = n.etag AND o.key NOT BETWEEN ?1 AND ?2"
		"  AND (o.key >> 32) IN (SELECT id FROM snapshots WHERE owner = ?3)"
		" JOIN blobs AS ob ON ob.digest = o.blob"
		" WHERE n.key BETWEEN ?1 AND ?2 AND n.etag IS NOT NULL"
		"  AND NOT EXISTS (SELECT 1 FROM blobs AS nb WHERE nb.digest = n.blob)"
		" GROUP BY n.key) AS m "
		"WHERE items.key = m.nkey",
	/* Listing a snapshot again (after a crash, or by a second job) must not forget
	 * content already stored for the same resource at the same position. */
	[S_ITEM_PUT] = "INSERT INTO items (key, resource_id, filename, mimetype, size, "
		       "etag, blob, meta) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) "
		       "ON CONFLICT (key) DO UPDATE SET "
		       "blob = CASE WHEN " SAME_CONTENT " THEN items.blob ELSE excluded.blob END, "
		       "etag = CASE WHEN " SAME_CONTENT " THEN items.etag ELSE excluded.etag END, "
		       "meta = CASE WHEN " SAME_CONTENT " AND items.blob IS NOT NULL "
		       "THEN items.meta ELSE excluded.meta END, "
		       "resource_id = excluded.resource_id, filename = excluded.filename, "
		       "mimetype = excluded.mimetype, size = excluded.size",
	[S_ITEM_SET_BLOB] = "UPDATE items SET blob = ?2 WHERE key = ?1",
	[S_ITEM_GET] = "SELECT " ITEM_COLS " FROM items AS i LEFT JOIN blobs AS b "
		       "ON b.digest = i.blob WHERE i.key = ?1",
	[S_ITEM_PAGE_ALL] = "SELECT " ITEM_COLS " FROM items AS i LEFT JOIN blobs AS b "
			    "ON b.digest = i.blob WHERE i.key BETWEEN ?1 AND ?2 "
			    "ORDER BY i.key LIMIT ?3",
	[S_ITEM_PAGE_MISSING] = "SELECT " ITEM_COLS " FROM items AS i LEFT JOIN blobs AS b "
				"ON b.digest = i.blob WHERE i.key BETWEEN ?1 AND ?2 "
				"AND b.digest IS NULL ORDER BY i.key LIMIT ?3",
	[S_ITEM_FIND_STORED] = "SELECT i.blob FROM items AS i JOIN blobs AS b ON b.digest = i.blob "
			       "WHERE i.resource_id = ?1 AND i.size = ?2 AND i.etag = ?3 LIMIT 1",
	[S_BLOB_PUT] = "INSERT INTO blobs (digest, kind, raw_size, stored_size, last_access) "
		       "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (digest) DO UPDATE SET "
		       "kind = excluded.kind, raw_size = excluded.raw_size, "
		       "stored_size = excluded.stored_size, last_access = excluded.last_access",
	[S_BLOB_GET] = "SELECT " BLOB_COLS " FROM blobs WHERE digest = ?1",
	[S_BLOB_DEL] = "DELETE FROM blobs WHERE digest = ?1",
	[S_BLOB_TOUCH] = "UPDATE blobs SET last_access = ?2 WHERE digest = ?1",
	[S_BLOB_TOTALS] = "SELECT count(*), coalesce(sum(stored_size), 0) FROM blobs",
	[S_LRU_FIRST] = "SELECT " BLOB_COLS " FROM blobs ORDER BY last_access, digest LIMIT ?1",
	[S_LRU_NEXT] = "SELECT " BLOB_COLS " FROM blobs WHERE (last_access, digest) > (?1, ?2) "
		       "ORDER BY last_access, digest LIMIT ?3",
	[S_BLOB_SEEN] = "INSERT INTO blobs (digest, kind, raw_size, stored_size, last_access, seen) "
			"VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (digest) DO UPDATE SET "
			"kind = excluded.kind, raw_size = excluded.raw_size, "
			"stored_size = excluded.stored_size, seen = excluded.seen",
	[S_PASS_MAX] = "SELECT coalesce(max(seen), 0) FROM blobs",
	[S_PASS_DROP] = "DELETE FROM blobs WHERE seen <> ?1",
	[S_BLOBS_BYTE] = "SELECT " BLOB_COLS " FROM blobs WHERE digest >= ?1 AND digest < ?2 "
			 "ORDER BY digest",
	[S_CLOCK] = "SELECT coalesce(max(last_access), 0) FROM blobs",
	/* a row already so is not written again (a local folder's unchanged file proved again) */
	[S_ITEM_SET_CONTENT] = "UPDATE items SET blob = ?2, etag = ?3 WHERE key = ?1 "
			       "AND (blob IS NOT ?2 OR etag IS NOT ?3)",
	[S_ITEM_SET_CONTENT_META] = "UPDATE items SET blob = ?2, etag = ?3, meta = ?4 WHERE key = ?1 "
				    "AND (blob IS NOT ?2 OR etag IS NOT ?3 OR meta IS NOT ?4)",
	[S_ITEM_HAS] = "SELECT 1 FROM items WHERE key = ?1",
	[S_ITEM_ADD_BLOB] = "INSERT OR IGNORE INTO item_blobs (key, digest) VALUES (?1, ?2)",
	[S_ITEM_FIND_PRIOR] = "SELECT i.etag, i.blob FROM items AS i JOIN blobs AS b "
			      "ON b.digest = i.blob JOIN snapshots AS s ON s.id = (i.key >> 32) "
			      "WHERE i.resource_id = ?1 AND i.size = ?2 AND i.etag IS NOT NULL "
			      "AND s.source = 1 AND s.server_url = ?3 AND (?4 < 0 OR s.owner = ?4) "
			      "ORDER BY i.key DESC LIMIT 1",
	[S_SNAP_DEL_ITEM_BLOBS] = "DELETE FROM item_blobs WHERE key BETWEEN ?1 AND ?2",
	[S_BLOBS_UNREFERENCED] = "SELECT " BLOB_COLS " FROM blobs WHERE kind IN (1, 4) "
				 "AND digest NOT IN (SELECT blob FROM items WHERE blob IS NOT NULL) "
				 "AND digest NOT IN (SELECT digest FROM item_blobs)",
	[S_TENSOR_PUT] = "INSERT OR REPLACE INTO tensors (raw, opts, tensor, meta, desc) "
			 "VALUES (?1, ?2, ?3, ?4, ?5)",
	[S_TENSOR_GET] = "SELECT t.tensor, t.meta, t.desc FROM tensors AS t JOIN blobs AS b "
			 "ON b.digest = t.tensor WHERE t.raw = ?1 AND t.opts = ?2",
	[S_TENSOR_DEL] = "DELETE FROM tensors WHERE raw = ?1 AND opts = ?2",
	[S_GRANT_PUT] = "INSERT INTO grants (uid, snapshot_id, key_hash, checked_at) "
			"VALUES (?1, ?2, ?3, ?4) ON CONFLICT (uid, snapshot_id) DO UPDATE SET "
			"key_hash = excluded.key_hash, checked_at = excluded.checked_at",
	[S_GRANT_GET] = "SELECT key_hash, checked_at FROM grants WHERE uid = ?1 AND snapshot_id = ?2",
	[S_GRANT_DEL] = "DELETE FROM grants WHERE uid = ?1 AND snapshot_id = ?2",
	[S_GRANT_DEL_SNAP] = "DELETE FROM grants WHERE snapshot_id = ?1",
	[S_GRANT_NEWEST] = "SELECT s.id FROM snapshots AS s JOIN grants AS g ON g.snapshot_id = s.id "
			   "WHERE g.uid = ?1 AND s.source = ?2 AND s.server_url = ?3 AND "
			   "(s.project_id = ?4 OR s.project_name = ?4) AND s.sealed = 1 "
			   "ORDER BY s.created_at DESC, s.id DESC",
	[S_META_GET] = "SELECT value FROM meta WHERE key = ?1",
	[S_META_PUT] = "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
	[S_BLOB_SNAPSHOTS] = "SELECT key >> 32 FROM items WHERE blob = ?1 UNION "
			     "SELECT key >> 32 FROM item_blobs WHERE digest = ?1",
	[S_SNAP_LRU] = "SELECT s.id, max(b.last_access) AS t FROM snapshots AS s "
		       "JOIN items AS i ON i.key BETWEEN (s.id << 32) AND ((s.id << 32) | 4294967295) "
		       "JOIN blobs AS b ON b.digest = i.blob GROUP BY s.id ORDER BY t, s.id",
	[S_SNAP_BLOBS] = "SELECT " BLOB_COLS " FROM blobs WHERE digest IN ("
			 "SELECT blob FROM items WHERE key BETWEEN ?1 AND ?2 AND blob IS NOT NULL "
			 "UNION SELECT digest FROM item_blobs WHERE key BETWEEN ?1 AND ?2)",
	/* local folders (schema 4 -> 5) */
	[S_LOCAL_READ_FIND] = "SELECT r.digest FROM local_reads AS r JOIN blobs AS b "
			      "ON b.digest = r.digest WHERE r.uid = ?1 AND r.dev = ?2 "
			      "AND r.ino = ?3 AND r.size = ?4 AND r.mtime_ns = ?5 AND r.ctime_ns = ?6",
	[S_LOCAL_READ_PUT] = "INSERT OR REPLACE INTO local_reads (uid, dev, ino, size, mtime_ns, "
			     "ctime_ns, digest) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
	/* rows cleared already are not written again (an OPEN right after another) */
	[S_LOCAL_CLEAR] = "UPDATE items SET blob = NULL, etag = NULL WHERE key BETWEEN ?1 AND ?2 "
			  "AND (blob IS NOT NULL OR etag IS NOT NULL)",
	[S_LOCAL_TRIM] = "DELETE FROM items WHERE key BETWEEN ?1 AND ?2",
	[S_LOCAL_SIZE] = "UPDATE items SET size = ?2 WHERE key = ?1 AND size IS NOT ?2",
	/* what OPEN learnt of a snapshot (schema 5 -> 6) */
	[S_PROBE_GET] = "SELECT data FROM snapshot_probes WHERE snapshot_id = ?1 AND kind = ?2",
	[S_PROBE_PUT] = "INSERT OR REPLACE INTO snapshot_probes (snapshot_id, kind, data) "
			"VALUES (?1, ?2, ?3)",
};

/* Schema migrations: migrations[v] takes a database from user_version v to v + 1. */
static const char *const migrations[INDEX_SCHEMA_VERSION] = {
	/* 0 -> 1: the first schema. */
	"CREATE TABLE snapshots ("
	" id INTEGER PRIMARY KEY,"
	" source INTEGER NOT NULL,"
	" server_url TEXT NOT NULL,"
	" project_id TEXT NOT NULL,"
	" project_name TEXT NOT NULL,"
	" version TEXT NOT NULL,"
	" created_at INTEGER NOT NULL,"
	" sealed INTEGER NOT NULL DEFAULT 0,"
	" complete INTEGER NOT NULL DEFAULT 0,"
	" item_count INTEGER NOT NULL DEFAULT 0,"
	" total_bytes INTEGER NOT NULL DEFAULT 0,"
	" UNIQUE (source, server_url, project_id, version));"
	"CREATE TABLE items ("
	" key INTEGER PRIMARY KEY," /* snapshot id << 32 | position */
	" resource_id TEXT NOT NULL,"
	" filename TEXT NOT NULL,"
	" mimetype TEXT NOT NULL,"
	" size INTEGER NOT NULL,"
	" etag TEXT,"
	" blob BLOB CHECK (blob IS NULL OR length(blob) = 32),"
	" meta TEXT);"
	"CREATE INDEX items_resource ON items (resource_id);"
	"CREATE TABLE blobs ("
	" digest BLOB PRIMARY KEY CHECK (length(digest) = 32),"
	" kind INTEGER NOT NULL,"
	" raw_size INTEGER NOT NULL,"
	" stored_size INTEGER NOT NULL,"
	" last_access INTEGER NOT NULL,"
	" seen INTEGER NOT NULL DEFAULT 0"
	") WITHOUT ROWID;"
	"CREATE INDEX blobs_lru ON blobs (last_access);",
	/* 1 -> 2: blobs an item needs besides its own (segmentation masks), so that
	 * garbage collection after an eviction keeps them. */
	"CREATE TABLE item_blobs ("
	" key INTEGER NOT NULL,"
	" digest BLOB NOT NULL CHECK (length(digest) = 32),"
	" PRIMARY KEY (key, digest)) WITHOUT ROWID;"
	"CREATE INDEX item_blobs_digest ON item_blobs (digest);",
	/* 2 -> 3: decoded tensors kept for codecs that cost more to decode than to read */
	"CREATE TABLE tensors ("
	" raw BLOB NOT NULL CHECK (length(raw) = 32),"
	" opts INTEGER NOT NULL,"
	" tensor BLOB NOT NULL CHECK (length(tensor) = 32),"
	" meta BLOB CHECK (meta IS NULL OR length(meta) = 32),"
	" desc TEXT NOT NULL,"
	" PRIMARY KEY (raw, opts)) WITHOUT ROWID;",
	/* 3 -> 4: the trust boundary. Snapshot ids are never reused (AUTOINCREMENT: an id that
	 * named one user's snapshot never names another's); a snapshot belongs to the uid whose
	 * own listing made it (`owner`; -1 for snapshots made before, which only admins see);
	 * grants (uid, snapshot) record when that uid's key last proved entitlement and a
	 * salted hash of the key (never the key), for offline reads; `meta` holds the salt. */
	"CREATE TABLE snapshots4 ("
	" id INTEGER PRIMARY KEY AUTOINCREMENT,"
	" source INTEGER NOT NULL,"
	" server_url TEXT NOT NULL,"
	" project_id TEXT NOT NULL,"
	" project_name TEXT NOT NULL,"
	" version TEXT NOT NULL,"
	" created_at INTEGER NOT NULL,"
	" sealed INTEGER NOT NULL DEFAULT 0,"
	" complete INTEGER NOT NULL DEFAULT 0,"
	" item_count INTEGER NOT NULL DEFAULT 0,"
	" total_bytes INTEGER NOT NULL DEFAULT 0,"
	" owner INTEGER NOT NULL DEFAULT -1,"
	" UNIQUE (source, server_url, project_id, version, owner));"
	"INSERT INTO snapshots4 (id, source, server_url, project_id, project_name, version,"
	" created_at, sealed, complete, item_count, total_bytes, owner)"
	" SELECT id, source, server_url, project_id, project_name, version, created_at, sealed,"
	" complete, item_count, total_bytes, -1 FROM snapshots;"
	"DROP TABLE snapshots;"
	"ALTER TABLE snapshots4 RENAME TO snapshots;"
	"CREATE TABLE grants ("
	" uid INTEGER NOT NULL,"
	" snapshot_id INTEGER NOT NULL,"
	" key_hash BLOB CHECK (key_hash IS NULL OR length(key_hash) = 32),"
	" checked_at INTEGER NOT NULL,"
	" PRIMARY KEY (uid, snapshot_id)) WITHOUT ROWID;"
	"CREATE INDEX grants_snapshot ON grants (snapshot_id);"
	"CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID;"
	/* eviction asks which snapshots use a blob */
	"CREATE INDEX items_blob ON items (blob);",
	/* 4 -> 5: local folders: what each uid's own descriptors of a file hashed to
	 * (local.h). A local item links to stored content by this or by reading it. */
	"CREATE TABLE local_reads ("
	" uid INTEGER NOT NULL,"
	" dev INTEGER NOT NULL,"
	" ino INTEGER NOT NULL,"
	" size INTEGER NOT NULL,"
	" mtime_ns INTEGER NOT NULL,"
	" ctime_ns INTEGER NOT NULL,"
	" digest BLOB NOT NULL CHECK (length(digest) = 32),"
	" PRIMARY KEY (uid, dev, ino)) WITHOUT ROWID;"
	/* local items' metadata validators ('local:<size>:<mtime>') go: nothing may link by
	 * them any more, not even a Datamint item revalidated against them */
	"UPDATE items SET etag = NULL WHERE etag LIKE 'local:%';",
	/* 5 -> 6: what an OPEN learnt of a snapshot by reading every item (its frame counts,
	 * its label set), kept so that the next OPEN reads one row. A row is a function of the
	 * snapshot's items: anything that adds, drops or changes an item (its content, size or
	 * record) drops the snapshot's rows in the same transaction, and so does deleting the
	 * snapshot. Blobs evicted and fetched again keep their digest, so rows stay valid.
	 * Kind 3 (a local folder's listing) is written by the listing itself and goes only
	 * with the snapshot (index.h). */
	"CREATE TABLE snapshot_probes ("
	" snapshot_id INTEGER NOT NULL,"
	" kind INTEGER NOT NULL,"
	" data BLOB NOT NULL,"
	" PRIMARY KEY (snapshot_id, kind)) WITHOUT ROWID;"
	"CREATE TRIGGER probes_item_new AFTER INSERT ON items BEGIN "
	"DELETE FROM snapshot_probes WHERE snapshot_id = (new.key >> 32) AND kind < 3; END;"
	"CREATE TRIGGER probes_item_gone AFTER DELETE ON items BEGIN "
	"DELETE FROM snapshot_probes WHERE snapshot_id = (old.key >> 32) AND kind < 3; END;"
	"CREATE TRIGGER probes_item_changed AFTER UPDATE OF key, blob, size, meta ON items "
	"WHEN old.key IS NOT new.key OR old.blob IS NOT new.blob OR old.size IS NOT new.size "
	"OR old.meta IS NOT new.meta BEGIN "
	"DELETE FROM snapshot_probes WHERE snapshot_id IN (old.key >> 32, new.key >> 32) "
	"AND kind < 3; END;"
	"CREATE TRIGGER probes_snapshot_gone AFTER DELETE ON snapshots BEGIN "
	"DELETE FROM snapshot_probes WHERE snapshot_id = old.id; END;",
};

/*
 * `complete` of a snapshot is kept true only while every item's blob row exists, so that an
 * OPEN of a complete sealed snapshot need not look at its items one by one: a blob row that
 * goes (eviction, a damaged blob, reconciliation), an item added, dropped or given other
 * content or size clears it in the same transaction. The prefetcher sets it again after
 * counting (index_snapshot_stats()). Created at every open (IF NOT EXISTS); the first
 * open of a cache without them recomputes every flag once with the counting join (the
 * meta row COMPLETE_TRACKED records that it was done).
 */
#define COMPLETE_TRACKED "complete_tracked_v1"
#define CLEAR_COMPLETE(KEY)                                                                        \
	"UPDATE snapshots SET complete = 0 WHERE id = (" KEY " >> 32) AND complete = 1;"
static const char track_complete_sql[] =
	"CREATE TRIGGER IF NOT EXISTS complete_blob_gone AFTER DELETE ON blobs BEGIN "
	"UPDATE snapshots SET complete = 0 WHERE complete = 1 AND id IN "
	"(SELECT key >> 32 FROM items WHERE blob = old.digest); END;"
	"CREATE TRIGGER IF NOT EXISTS complete_item_new AFTER INSERT ON items BEGIN "
	CLEAR_COMPLETE("new.key") " END;"
	"CREATE TRIGGER IF NOT EXISTS complete_item_gone AFTER DELETE ON items BEGIN "
	CLEAR_COMPLETE("old.key") " END;"
	"CREATE TRIGGER IF NOT EXISTS complete_item_changed AFTER UPDATE OF key, blob, size "
	"ON items WHEN old.key IS NOT new.key OR old.blob IS NOT new.blob "
	"OR old.size IS NOT new.size BEGIN "
	CLEAR_COMPLETE("old.key") CLEAR_COMPLETE("new.key") " END;"
	"UPDATE snapshots SET complete = (sealed = 1 AND NOT EXISTS ("
	" SELECT 1 FROM items AS i LEFT JOIN blobs AS b ON b.digest = i.blob"
	" WHERE i.key BETWEEN (snapshots.id << 32) AND ((snapshots.id << 32) | 4294967295)"
	" AND b.digest IS NULL)) "
	"WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = '" COMPLETE_TRACKED "');"
	"INSERT OR IGNORE INTO meta (key, value) VALUES ('" COMPLETE_TRACKED "', 1);";



/* ---- errors ---- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* SQLite result code -> our code. */
static int map_rc(sqlite3 *db, int rc)
{
	int sys;
	switch (rc & 0xff) {
	case SQLITE_OK:
	case SQLITE_ROW:
	case SQLITE_DONE:
		return 0;
	case SQLITE_NOMEM:
		return -ENOMEM;
	case SQLITE_FULL:
		return -DMC_E_CACHE_FULL;
	case SQLITE_BUSY:
	case SQLITE_LOCKED:
		return -EBUSY;
	case SQLITE_READONLY:
		return -EROFS;
	case SQLITE_CORRUPT:
	case SQLITE_NOTADB:
		return -DMC_E_INTEGRITY;
	case SQLITE_TOOBIG:
		return -DMC_E_LIMIT_EXCEEDED;
	case SQLITE_CONSTRAINT:
	case SQLITE_MISMATCH:
	case SQLITE_RANGE:
		return -EINVAL;
	case SQLITE_PERM:
	case SQLITE_AUTH:
		return -EACCES;
	case SQLITE_IOERR:
	case SQLITE_CANTOPEN:
		sys = db ? sqlite3_system_errno(db) : 0;
		if (sys == ENOSPC || sys == EDQUOT)
			return -DMC_E_CACHE_FULL;
		if (sys > 0)
			return -sys;
		return (rc & 0xff) == SQLITE_IOERR ? -EIO : -EACCES;
	default:
		return -DMC_E_INTERNAL;
	}
}

/*
 * Whether the file system of index.db refuses writes now: statvfs's ST_RDONLY, or a file
 * system in its error state (ext4 errors=remount-ro answers EROFS to a create while statvfs
 * and access() still say writable). Creates an unnamed file (O_TMPFILE), gone at close.
 */
static bool probe_read_only(const char *dir)
{
	struct statvfs sv;
	int fd;

	if (statvfs(dir, &sv) == 0 && (sv.f_flag & ST_RDONLY))
		return true;
	fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600);
	if (fd >= 0) {
		close(fd);
		return false;
	}
	return errno == EROFS;
}

bool index_read_only(struct index *ix)
{
	if (ix->read_only && !probe_read_only(ix->dir))
		ix->read_only = false;
	return ix->read_only;
}

int ix_fail(struct index *ix, int rc)
{
	int r = map_rc(ix->db, rc);

	snprintf(ix->msg, sizeof(ix->msg), "%s", sqlite3_errmsg(ix->db));
	/* after some errors (out of memory, I/O, a full disk) SQLite rolls the whole
	 * transaction back itself, even after a failed read: the batch is gone */
	if (ix->in_tx && sqlite3_get_autocommit(ix->db)) {
		ix->in_tx = false;
		ix->pending = 0;
		ix->lost++;
	}
	/* SQLite says "disk I/O error" (EIO) for a file system in its error state: say what
	 * an operator can act on (docs/reliability.md D5) */
	if ((r == -EIO || r == -EROFS || r == -EACCES || r == -EPERM) && ix->dir[0] &&
	    probe_read_only(ix->dir)) {
		char cause[sizeof(ix->msg)];
		snprintf(cause, sizeof(cause), "%s", ix->msg);
		snprintf(ix->msg, sizeof(ix->msg),
			 "the cache file system is read-only: nothing new can be stored (%.150s)",
			 cause);
		ix->read_only = true;
		r = -EROFS;
	}
	return r;
}

/* A write failed: the batch is gone as a whole. */
int ix_fail_batch(struct index *ix, int rc)
{
	bool had = ix->in_tx;
	int r = ix_fail(ix, rc);
	if (!sqlite3_get_autocommit(ix->db)) {
		sqlite3_stmt *st = ix->stmt[S_ROLLBACK];
		(void)sqlite3_step(st);
		sqlite3_reset(st);
		if (had)
			ix->lost++;
	}
	ix->in_tx = false;
	ix->pending = 0;
	return r;
}

const char *index_errmsg(struct index *ix)
{
	return ix->msg;
}

/* ---- statement helpers ---- */

sqlite3_stmt *ix_stmt(struct index *ix, enum stmt_id id)
{
	sqlite3_stmt *st = ix->stmt[id];
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	return st;
}

int ix_check_str(const char *s, bool nullable)
{
	if (!s)
		return nullable ? 0 : -EINVAL;
	if (strnlen(s, INDEX_STR_MAX + 1) > INDEX_STR_MAX)
		return -DMC_E_LIMIT_EXCEEDED;
	return 0;
}

int ix_bind_text(sqlite3_stmt *st, int col, const char *s)
{
	if (!s)
		return sqlite3_bind_null(st, col);
	return sqlite3_bind_text(st, col, s, -1, SQLITE_STATIC);
}

int ix_bind_digest(sqlite3_stmt *st, int col, const uint8_t *d)
{
	return sqlite3_bind_blob(st, col, d, INDEX_DIGEST_SIZE, SQLITE_STATIC);
}

int ix_check_snap_id(int64_t id)
{
	return id >= 1 && id < INDEX_SNAPSHOTS_MAX ? 0 : -EINVAL;
}

int64_t ix_key_lo(int64_t snap)
{
	return snap << 32;
}

int64_t ix_key_hi(int64_t snap)
{
	return (snap << 32) | (INDEX_ITEMS_MAX - 1);
}

/* Opens the batch transaction if needed. */
int ix_batch(struct index *ix)
{
	int rc;
	if (ix->in_tx)
		return 0;
	rc = sqlite3_step(ix_stmt(ix, S_BEGIN));
	sqlite3_reset(ix->stmt[S_BEGIN]);
	if (rc != SQLITE_DONE)
		return ix_fail(ix, rc);
	ix->in_tx = true;
	return 0;
}

/* Runs a bound write statement inside the batch. */
int ix_run_write(struct index *ix, sqlite3_stmt *st)
{
	int rc = sqlite3_step(st);
	sqlite3_reset(st);
	if (rc != SQLITE_DONE)
		return ix_fail_batch(ix, rc);
	ix->pending++;
	return 0;
}

static int exec_sql(sqlite3 *db, const char *sql, char *err, size_t errlen)
{
	char *msg = NULL;
	int rc = sqlite3_exec(db, sql, NULL, NULL, &msg);
	if (rc != SQLITE_OK) {
		set_err(err, errlen, "%s", msg ? msg : sqlite3_errstr(rc));
		sqlite3_free(msg);
		return map_rc(db, rc);
	}
	return 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t ix_tick(struct index *ix)
{
	int64_t t = now_ms();
	ix->clock = t > ix->clock ? t : ix->clock + 1;
	return ix->clock;
}

/* ---- open ---- */

/* One integer from a single-row pragma or query. */
static int query_int(sqlite3 *db, const char *sql, int64_t *ret)
{
	sqlite3_stmt *st;
	int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
	if (rc != SQLITE_OK)
		return rc;
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*ret = sqlite3_column_int64(st, 0);
		rc = SQLITE_OK;
	}
	sqlite3_finalize(st);
	return rc;
}

static int run_check(sqlite3 *db, bool full, char *err, size_t errlen)
{
	sqlite3_stmt *st;
	int rc, rows = 0, r = 0;

	rc = sqlite3_prepare_v2(db, full ? "PRAGMA integrity_check" : "PRAGMA quick_check", -1,
				&st, NULL);
	if (rc != SQLITE_OK) {
		set_err(err, errlen, "%s", sqlite3_errmsg(db));
		return map_rc(db, rc);
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		const char *t = (const char *)sqlite3_column_text(st, 0);
		if (rows++ == 0 && t && strcmp(t, "ok") == 0)
			continue;
		if (r == 0)
			set_err(err, errlen, "%s", t ? t : "?");
		r = -DMC_E_INTEGRITY;
	}
	if (rc != SQLITE_DONE && r == 0) {
		set_err(err, errlen, "%s", sqlite3_errmsg(db));
		r = map_rc(db, rc);
	}
	sqlite3_finalize(st);
	return r;
}

static int migrate(sqlite3 *db, char *err, size_t errlen)
{
	int64_t v = 0;
	int rc = query_int(db, "PRAGMA user_version", &v);
	int r;

	if (rc != SQLITE_OK) {
		set_err(err, errlen, "%s", sqlite3_errmsg(db));
		return map_rc(db, rc);
	}
	if (v > INDEX_SCHEMA_VERSION) {
		set_err(err, errlen, "index schema %" PRId64 " is newer than this daemon's %d", v,
			INDEX_SCHEMA_VERSION);
		return -EPROTONOSUPPORT;
	}
	if (v < 0) {
		set_err(err, errlen, "index schema version %" PRId64 " is invalid", v);
		return -DMC_E_INTEGRITY;
	}
	for (; v < INDEX_SCHEMA_VERSION; v++) {
		char sql[64];
		if ((r = exec_sql(db, "BEGIN", err, errlen)) < 0)
			return r;
		snprintf(sql, sizeof(sql), "PRAGMA user_version = %" PRId64, v + 1);
		if ((r = exec_sql(db, migrations[v], err, errlen)) < 0 ||
		    (r = exec_sql(db, sql, err, errlen)) < 0 ||
		    (r = exec_sql(db, "COMMIT", err, errlen)) < 0) {
			(void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
			return r;
		}
	}
	return 0;
}

/* Opens `path`, configures it and checks it. -DMC_E_INTEGRITY: not a sound database. */
static int open_db(const char *path, unsigned flags, char *err, size_t errlen, sqlite3 **ret_db)
{
	sqlite3 *db = NULL;
	char *msg = NULL;
	int rc, r;

	rc = sqlite3_open_v2(path, &db,
			     SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
	if (rc != SQLITE_OK) {
		set_err(err, errlen, "cannot open the index: %s",
			db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
		r = map_rc(db, rc);
		goto fail;
	}
	sqlite3_extended_result_codes(db, 1);
	/* locking_mode first: with it, WAL keeps its index in heap memory (no -shm) and the
	 * first access takes the exclusive lock that keeps every other process out. */
	rc = sqlite3_exec(db,
			  "PRAGMA locking_mode = EXCLUSIVE;"
			  "PRAGMA journal_mode = WAL;",
			  NULL, NULL, &msg);
	if (rc == SQLITE_OK) {
		int64_t dummy;
		/* journal_mode answers with the mode it got; make sure the lock is taken. */
		rc = query_int(db, "SELECT count(*) FROM sqlite_schema", &dummy);
	}
	if (rc != SQLITE_OK) {
		r = map_rc(db, rc);
		if (r == -EBUSY)
			set_err(err, errlen, "the index is in use by another process");
		else
			set_err(err, errlen, "%s", msg ? msg : sqlite3_errmsg(db));
		sqlite3_free(msg);
		goto fail;
	}
	{
		int64_t wal = 0;
		sqlite3_stmt *st;
		rc = sqlite3_prepare_v2(db, "PRAGMA journal_mode", -1, &st, NULL);
		if (rc == SQLITE_OK) {
			if (sqlite3_step(st) == SQLITE_ROW)
				wal = sqlite3_column_text(st, 0) &&
				      strcmp((const char *)sqlite3_column_text(st, 0), "wal") == 0;
			sqlite3_finalize(st);
		}
		if (!wal) {
			set_err(err, errlen, "the index cannot use WAL mode");
			r = -EIO;
			goto fail;
		}
	}
	/* temp_store: statement journals (an UPDATE or DELETE that fires triggers keeps the
	 * pages it changes, to undo itself) stay in memory instead of a temporary file under
	 * /var/tmp: one write per page changed, three system calls each (docs/benchmarks.md,
	 * "Opening a snapshot") */
	r = exec_sql(db,
		     (flags & INDEX_SYNC_FULL) ? "PRAGMA synchronous = FULL;"
						 "PRAGMA foreign_keys = OFF;"
						 "PRAGMA temp_store = MEMORY;"
					       : "PRAGMA synchronous = NORMAL;"
						 "PRAGMA foreign_keys = OFF;"
						 "PRAGMA temp_store = MEMORY;",
		     err, errlen);
	if (r < 0)
		goto fail;
	r = (flags & INDEX_SKIP_CHECK) ? 0 : run_check(db, false, err, errlen);
	if (r < 0)
		goto fail;
	r = migrate(db, err, errlen);
	if (r < 0)
		goto fail;
	*ret_db = db;
	return 0;
fail:
	sqlite3_close_v2(db);
	return r;
}

/* Moves a damaged index and its WAL aside, so that nothing is lost for a post-mortem. */
static int move_aside(const char *path, char *err, size_t errlen)
{
	static const char *const sfx[] = { "", "-wal", "-shm", "-journal" };
	char from[4096], to[4096];
	long long t = (long long)time(NULL);

	for (size_t i = 0; i < sizeof(sfx) / sizeof(sfx[0]); i++) {
		if ((size_t)snprintf(from, sizeof(from), "%s%s", path, sfx[i]) >= sizeof(from) ||
		    (size_t)snprintf(to, sizeof(to), "%s.corrupt-%lld%s", path, t, sfx[i]) >=
			    sizeof(to)) {
			set_err(err, errlen, "index path too long");
			return -ENAMETOOLONG;
		}
		if (rename(from, to) < 0 && errno != ENOENT) {
			int e = errno;
			set_err(err, errlen, "cannot move the damaged index aside: %s", strerror(e));
			return -e;
		}
	}
	return 0;
}

int index_open(const char *path, unsigned flags, char *err, size_t errlen, struct index **ret_ix,
	       bool *ret_rebuilt)
{
	struct index *ix;
	sqlite3 *db = NULL;
	bool rebuilt = false;
	int r, rc;

	if (!path || !*path || !ret_ix)
		return -EINVAL;
	r = open_db(path, flags, err, errlen, &db);
	if (r == -DMC_E_INTEGRITY) {
		r = move_aside(path, err, errlen);
		if (r < 0)
			return r;
		rebuilt = true;
		r = open_db(path, flags, err, errlen, &db);
	}
	if (r < 0)
		return r;

	ix = calloc(1, sizeof(*ix));
	if (!ix) {
		sqlite3_close_v2(db);
		return -ENOMEM;
	}
	ix->db = db;
	{
		const char *slash = strrchr(path, '/');
		if (!slash)
			snprintf(ix->dir, sizeof(ix->dir), ".");
		else if ((size_t)(slash - path) < sizeof(ix->dir))
			snprintf(ix->dir, sizeof(ix->dir), "%.*s", slash == path ? 1 : (int)(slash - path),
				 path);
	}
	for (int i = 0; i < S_COUNT_; i++) {
		rc = sqlite3_prepare_v3(db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT,
					&ix->stmt[i], NULL);
		if (rc != SQLITE_OK) {
			set_err(err, errlen, "preparing statement %d: %s", i, sqlite3_errmsg(db));
			r = map_rc(db, rc);
			index_close(ix);
			return r;
		}
	}
	{
		/* a cache whose flags cannot be kept (a read-only file system) is read as if no
		 * snapshot were known complete: every OPEN counts */
		char terr[256];
		if (exec_sql(db, "BEGIN", terr, sizeof(terr)) == 0) {
			if (exec_sql(db, track_complete_sql, terr, sizeof(terr)) == 0 &&
			    exec_sql(db, "COMMIT", terr, sizeof(terr)) == 0)
				ix->complete_tracked = true;
			else
				(void)sqlite3_exec(db, "ROLLBACK", NULL, NULL, NULL);
		}
	}
	rc = query_int(db, stmt_sql[S_CLOCK], &ix->clock);
	if (rc != SQLITE_OK) {
		set_err(err, errlen, "%s", sqlite3_errmsg(db));
		r = map_rc(db, rc);
		index_close(ix);
		return r;
	}
	if (ret_rebuilt)
		*ret_rebuilt = rebuilt;
	*ret_ix = ix;
	return 0;
}

void index_close(struct index *ix)
{
	if (!ix)
		return;
	if (ix->in_tx)
		(void)sqlite3_exec(ix->db, "ROLLBACK", NULL, NULL, NULL);
	for (int i = 0; i < S_COUNT_; i++)
		sqlite3_finalize(ix->stmt[i]);
	sqlite3_close_v2(ix->db);
	free(ix);
}

void index_blobs_touched(const struct index *ix, uint8_t ret[32])
{
	memcpy(ret, ix->touched, sizeof(ix->touched));
}

int index_check(struct index *ix, bool full)
{
	return run_check(ix->db, full, ix->msg, sizeof(ix->msg));
}

/* ---- batching ---- */

int index_flush(struct index *ix)
{
	int rc;
	if (!ix->in_tx)
		return 0;
	rc = sqlite3_step(ix_stmt(ix, S_COMMIT));
	sqlite3_reset(ix->stmt[S_COMMIT]);
	if (rc != SQLITE_DONE)
		return ix_fail_batch(ix, rc);
	ix->in_tx = false;
	ix->pending = 0;
	return 0;
}

uint64_t index_batches_lost(const struct index *ix)
{
	return ix->lost;
}

unsigned index_pending(const struct index *ix)
{
	return ix->pending;
}
