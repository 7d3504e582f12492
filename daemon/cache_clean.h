/*
 * cache_clean: the clean-shutdown record, private to cache.c and cache_clean.c.
 *
 * A clean stop (cache_close_clean()) leaves <cache>/clean-shutdown: a fingerprint of
 * index.db and of each objects/<b>/ directory as the stop left them, with the blob count
 * and bytes of each directory whose files and index rows were known to agree. The next
 * start takes the record (reads it, then removes it and syncs the directory before the
 * index is opened for writing, so that a crash at any later point leaves none) and trusts
 * only what still matches to the nanosecond: the index check is skipped when index.db is
 * untouched, and only the directories whose fingerprint changed are walked and merged.
 * Anything else (no record, unreadable, bad checksum, other version, index.db changed)
 * is the full reconciliation. docs/reliability.md (I3, C6) says what each fault costs.
 *
 * Threads: the thread that owns the index, as cache.h.
 */
#ifndef DMC_DAEMON_CACHE_CLEAN_H
#define DMC_DAEMON_CACHE_CLEAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CLEAN_RECORD_NAME "clean-shutdown"
#define CLEAN_DIRS 256u

/* st_dev, st_ino, st_size, st_mode, st_mtim and st_ctim of one file or directory. */
struct clean_fp {
	uint64_t dev, ino, size, mode;
	int64_t mtim_s, mtim_ns, ctim_s, ctim_ns;
};

enum clean_dir_state {
	CLEAN_DIR_ABSENT = 0,    /* no objects/<b>/ at the stop: no blob, no row */
	CLEAN_DIR_SETTLED = 1,   /* files and rows agreed at the stop: objects, bytes */
	CLEAN_DIR_UNSETTLED = 2, /* to walk at the next start whatever its fingerprint */
};

struct clean_dir {
	struct clean_fp fp;
	uint64_t objects, bytes;
	uint32_t state; /* enum clean_dir_state */
};

struct clean_record {
	struct clean_fp index;
	struct clean_dir dirs[CLEAN_DIRS];
};

/*
 * Reads and removes the record of the cache in `dir` (the root directory synced after the
 * removal). 1: a valid record in *rec; -ENOENT: none (the last stop was not clean); 0:
 * one not to be trusted. Without a valid one the reason is in `why` and the caller
 * reconciles fully. Never fails otherwise.
 */
int clean_take(const char *dir, struct clean_record *rec, char *why, size_t whylen);

/* Whether index.db (and the absence of WAL content) is exactly as the record has it. */
bool clean_index_matches(const char *dir, const struct clean_record *rec, char *why,
			 size_t whylen);

/* Bit b of skip[b / 8] set for each settled or absent objects/<b>/ whose fingerprint
 * matches the record now; returns how many are set. */
unsigned clean_dirs_unchanged(const char *dir, const struct clean_record *rec,
			      uint8_t skip[CLEAN_DIRS / 8]);

/*
 * Writes the record of the cache in `dir` after a clean close (index closed, no store
 * write running): `rec->dirs[*]` objects, bytes and state filled by the caller; the
 * fingerprints are taken here. Atomic (temp file, fsync, rename, fsync of the directory),
 * mode 0600. 0, or a negative errno with the reason in `why` (no record then).
 */
int clean_write(const char *dir, struct clean_record *rec, char *why, size_t whylen);

/*
 * Without a record: how the last daemon ended. Each start leaves <cache>/started (this
 * boot's id, /proc/sys/kernel/random/boot_id, and index.db's device and inode); the
 * daemon's handler of fatal signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT: a bug, or
 * the watchdog) leaves <cache>/fault before the process dies. When the last daemon was
 * killed in this boot (kill -9, the OOM killer), with no fault and index.db the same file,
 * nothing but that process wrote the index since its last check, and SQLite loses nothing
 * committed when a process dies: the index check is skipped (PRAGMA quick_check reads
 * every page: 2 s for a million items). A power loss or a reboot (another boot id), a
 * fatal signal or another index.db: the check runs.
 */
#define CLEAN_STARTED_NAME "started"
#define CLEAN_FAULT_NAME "fault"

/* 1 when the index check may be skipped (above), else 0 with the reason in `why`. */
int clean_killed_this_boot(const char *dir, char *why, size_t whylen);
/* After the index opened (and checked, when it was): the marker of this start written, a
 * fault marker removed. Errors are ignored: without a marker the next start checks. */
void clean_mark_started(const char *dir);

#endif
