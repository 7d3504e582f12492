/*
 * store's private parts, shared by store.c (the format, opening, pins, reading and
 * verifying), store_write.c (writing and publishing blobs) and store_scan.c (scanning,
 * the start's steps, space, checking a foreign blob file). Threads: store.h's rules.
 */
#ifndef DMC_STORE_PRIV_H
#define DMC_STORE_PRIV_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <openssl/evp.h>
#include <zstd.h>

#include "store.h"

/* I/O unit: bytes read or written per syscall, and the sample that decides compression. */
#define CHUNK (128u << 10)
#define OUT_CAP ZSTD_COMPRESSBOUND(CHUNK)
/* zstd is kept only if the stored payload is at most this percentage of the raw one. */
#define ZSTD_KEEP_PCT 95u
/* Window limit for decoding: our writer never needs more than 2^21 at levels 1-3; a
 * corrupt or hostile frame asking for more is refused before zstd allocates it. */
#define ZSTD_WINDOW_LOG_MAX 23
/* Writer and reader contexts kept for reuse, so that hot paths do not allocate. */
#define SCRATCH_POOL_MAX 8u

/* Buffers and codec contexts for one operation at a time; pooled in the store. */
struct scratch {
	struct scratch *next;
	EVP_MD_CTX *md;
	ZSTD_CCtx *cctx;
	ZSTD_DCtx *dctx;
	/* an allocation failed inside one of the contexts: freed, never pooled again */
	bool suspect;
	uint8_t in[CHUNK];
	uint8_t out[OUT_CAP];
};

struct pin {
	uint8_t digest[STORE_DIGEST_SIZE];
	uint32_t count;
};

struct store {
	char *dir;
	int root_fd, obj_fd, tmp_fd, quar_fd;
	struct store_options opt;

	/* Everything below is guarded by `lock`: counters, pins, the scratch pool, and the
	 * name-changing steps (publish, quarantine, remove) so that they see each other's
	 * results in one order. */
	pthread_mutex_t lock;
	struct store_stats st;
	struct pin *pins;
	size_t npins, pins_cap;
	struct scratch *pool;
	unsigned npool;
	uint64_t tmp_seq;
	uint64_t scan_failures, scan_quarantined; /* saved by store_scan_begin() */
	/* Per directory objects/<b>/: how many times its names changed since store_open()
	 * (publish, remove, quarantine; store_dir_gen(), and store_touched() for the
	 * clean-shutdown record, cache_clean.c), and its file bytes and blobs. A directory the start left
	 * to a background reconciliation (store_scan_end() with `unsettled`) counts only the
	 * changes since the start, which may be negative, until store_dir_settle() sets what
	 * its walk found. The totals are their sums; st.used_bytes and st.objects are the
	 * totals, 0 when negative. */
	uint64_t dir_gen[256];
	int64_t dir_used[256], dir_objects[256];
	int64_t used_total, objects_total;
	unsigned unsettled; /* directories still counting changes only */

	/* Serialises the steps that change names in tmp/ on hot paths (creating a temp,
	 * renaming it out; taken before `lock`). The kernel serialises them anyway on the
	 * directory's lock, but its waiters spin on the CPU while the holder allocates an
	 * inode, which can take milliseconds (ext4 without a journal skips recently deleted
	 * inodes one by one): a third of the daemon's CPU with many small blobs. Here they
	 * sleep. */
	pthread_mutex_t tmp_lock;
};

/* W_IMPORT: a whole blob file (header + stored payload), checked at commit */
enum writer_mode { W_SAMPLE, W_RAW, W_ZSTD, W_IMPORT };

/* Marks objects/<first>/ as changed (lock held). */
static inline void st_touch_locked(struct store *s, uint8_t first)
{
	s->dir_gen[first]++;
}

/* Adds to objects/<first>/'s file bytes and blobs, and the totals (lock held). */
static inline void st_account_locked(struct store *s, uint8_t first, int64_t bytes,
				     int64_t objects)
{
	s->dir_used[first] += bytes;
	s->dir_objects[first] += objects;
	s->used_total += bytes;
	s->objects_total += objects;
	s->st.used_bytes = s->used_total > 0 ? (uint64_t)s->used_total : 0;
	s->st.objects = s->objects_total > 0 ? (uint64_t)s->objects_total : 0;
}

struct store_writer {
	struct store *s;
	struct scratch *sc;
	int fd;
	int err;
	uint8_t kind;
	uint8_t mode;      /* enum writer_mode */
	uint8_t keep_pct;  /* zstd kept if the sample shrinks to this % or less */
	uint64_t expected; /* raw size, or STORE_SIZE_UNKNOWN */
	uint64_t raw_size;
	uint64_t stored_size; /* payload bytes written to fd after the header */
	size_t in_len;        /* raw bytes buffered in sc->in */
	size_t out_len;       /* zstd bytes buffered in sc->out */
	char tmp_name[64];
};

#define STAT_ADD(s, field, n)                                                                      \
	do {                                                                                       \
		pthread_mutex_lock(&(s)->lock);                                                    \
		(s)->st.field += (n);                                                              \
		pthread_mutex_unlock(&(s)->lock);                                                  \
	} while (0)

typedef int (*sink_fn)(void *ctx, const uint8_t *p, size_t n);

/* ---- store.c's helpers for store_write.c and store_scan.c ---- */

int st_blob_check(struct store *s, int fd, const struct store_blob_info *info, sink_fn sink,
		      void *ctx);
int st_blob_open(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int *ret_fd,
		     struct store_blob_info *ret_info);
int st_map_space_errno(int e);
int64_t st_now_ms(void);
void st_object_rel(const uint8_t digest[STORE_DIGEST_SIZE], char out[3 + STORE_HEX_SIZE + 1]);
int st_payload_stream(struct scratch *sc, int fd, const struct store_blob_info *info,
			  sink_fn sink, void *ctx);
struct pin *st_pin_find_locked(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE]);
int st_pin_locked(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE]);
int st_read_exact_at(int fd, void *buf, size_t len, uint64_t off);
struct scratch *st_scratch_get(struct store *s);
void st_scratch_put(struct store *s, struct scratch *sc);
void st_subdir_name(unsigned b, char out[3]);
int st_write_all_at(int fd, const void *buf, size_t len, uint64_t off);

#endif
