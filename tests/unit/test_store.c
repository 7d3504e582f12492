/*
 * Unit tests of daemon/store.c against real files in a temporary directory: round trips,
 * dedup, the compression policy, corruption detection, scanning, space accounting, pins
 * and concurrent writers. Expected values come from outside the store where it matters:
 * FIPS 180-2 test vectors for SHA-256, a hand-written header parser and zstd's one-shot
 * decoder for the file format.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zstd.h>

#include "proto.h"
#include "store.h"
#include "task.h"

/* ---- fixtures ---- */

struct fixture {
	char dir[64];
	struct store *s;
};

static int fx_open(struct fixture *fx, const struct store_options *o)
{
	char err[256] = "";
	snprintf(fx->dir, sizeof(fx->dir), "/tmp/dmc-store-XXXXXX");
	if (!mkdtemp(fx->dir))
		return -errno;
	int r = store_open(fx->dir, o, err, sizeof(err), &fx->s);
	if (r < 0)
		printf("# store_open: %d %s\n", r, err);
	return r;
}

static void fx_close(struct fixture *fx)
{
	store_close(fx->s);
	fx->s = NULL;
	task_rm_tree(fx->dir);
}

static void blob_path(const struct fixture *fx, const uint8_t d[STORE_DIGEST_SIZE], char *out,
		      size_t len)
{
	char hex[STORE_HEX_SIZE + 1];
	store_digest_hex(d, hex);
	snprintf(out, len, "%s/objects/%.2s/%s", fx->dir, hex, hex);
}

static int count_entries(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *e;
	int n = 0;
	if (!d)
		return -1;
	while ((e = readdir(d)) != NULL)
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			n++;
	closedir(d);
	return n;
}

static int count_sub(const struct fixture *fx, const char *sub)
{
	char p[128];
	snprintf(p, sizeof(p), "%s/%s", fx->dir, sub);
	return count_entries(p);
}

static int count_objects(const struct fixture *fx)
{
	int n = 0;
	for (unsigned b = 0; b < 256; b++) {
		char p[128];
		snprintf(p, sizeof(p), "%s/objects/%02x", fx->dir, b);
		int k = count_entries(p); /* -1: never created */
		n += k > 0 ? k : 0;
	}
	return n;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void)
{
	/* xorshift64*: reproducible test data without libc's rand(). */
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return rng_state * 0x2545f4914f6cdd1dull;
}

static void fill_random(uint8_t *p, size_t n)
{
	for (size_t i = 0; i < n; i++)
		p[i] = (uint8_t)(rnd() >> 56);
}

/* A CT-like int16 image: smooth gradient plus small noise. zstd-1 shrinks it well. */
static void fill_ct(uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2) {
		int16_t v = (int16_t)(((i / 2) % 512) * 4 - 1024 + (int)(rnd() >> 61));
		p[i] = (uint8_t)v;
		p[i + 1] = (uint8_t)((uint16_t)v >> 8);
	}
}

static int read_file(const char *path, uint8_t **ret, size_t *ret_len)
{
	struct stat st;
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		close(fd);
		return -errno;
	}
	uint8_t *b = malloc((size_t)st.st_size + 1);
	ssize_t n = read(fd, b, (size_t)st.st_size);
	close(fd);
	if (n != st.st_size) {
		free(b);
		return -EIO;
	}
	*ret = b;
	*ret_len = (size_t)n;
	return 0;
}

static int write_file(const char *path, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
	if (fd < 0)
		return -errno;
	ssize_t n = write(fd, buf, len);
	close(fd);
	return n == (ssize_t)len ? 0 : -EIO;
}

static uint64_t le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

/* ---- tests ---- */

TEST(sha256_vectors)
{
	/* FIPS 180-2 appendix B.1 and the empty string. */
	static const uint8_t abc[32] = {
		0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40,
		0xde, 0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17,
		0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad,
	};
	uint8_t d[32];
	char hex[65];
	ASSERT_EQ(store_digest_of("abc", 3, d), 0);
	ASSERT_MEM_EQ(d, abc, 32);
	ASSERT_EQ(store_digest_of("", 0, d), 0);
	store_digest_hex(d, hex);
	ASSERT_STR_EQ(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
	ASSERT_EQ(store_digest_parse(hex, 64, d), 0);
	store_digest_hex(d, hex);
	ASSERT_STR_EQ(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
	ASSERT_EQ(store_digest_parse("E3B0", 4, d), -EINVAL);
	ASSERT_EQ(store_digest_parse("g3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
				     64, d),
		  -EINVAL);
}

TEST(header_codec)
{
	struct store_blob_info in = { 0 }, out;
	uint8_t h[STORE_HEADER_SIZE];

	for (int i = 0; i < 32; i++)
		in.digest[i] = (uint8_t)(i * 7 + 1);
	in.kind = STORE_KIND_TENSOR;
	in.comp = STORE_COMP_ZSTD;
	in.raw_size = 0x0102030405ull;
	in.stored_size = 4242;
	store_header_encode(&in, h);

	/* The layout documented in store.h, read by hand. */
	ASSERT_MEM_EQ(h, "DMCBLOB\n", 8);
	ASSERT_EQ(h[8] | h[9] << 8, STORE_FORMAT_VERSION);
	ASSERT_EQ(h[10] | h[11] << 8, STORE_HEADER_SIZE);
	ASSERT_EQ(h[12], STORE_KIND_TENSOR);
	ASSERT_EQ(h[13], STORE_COMP_ZSTD);
	ASSERT_UINT_EQ(le64(h + 16), 0x0102030405ull);
	ASSERT_UINT_EQ(le64(h + 24), 4242);
	ASSERT_MEM_EQ(h + 32, in.digest, 32);

	ASSERT_EQ(store_header_decode(h, &out), 0);
	ASSERT_EQ(out.kind, in.kind);
	ASSERT_EQ(out.comp, in.comp);
	ASSERT_UINT_EQ(out.raw_size, in.raw_size);
	ASSERT_UINT_EQ(out.stored_size, in.stored_size);
	ASSERT_UINT_EQ(out.file_size, STORE_HEADER_SIZE + 4242);
	ASSERT_MEM_EQ(out.digest, in.digest, 32);

	/* Every single-bit flip anywhere in the header is caught. */
	for (unsigned i = 0; i < STORE_HEADER_SIZE * 8; i++) {
		h[i / 8] ^= (uint8_t)(1u << (i % 8));
		ASSERT_EQ(store_header_decode(h, &out), -DMC_E_INTEGRITY);
		h[i / 8] ^= (uint8_t)(1u << (i % 8));
	}
	/* Consistent but invalid fields are refused too. */
	in.comp = STORE_COMP_NONE; /* raw != stored */
	store_header_encode(&in, h);
	ASSERT_EQ(store_header_decode(h, &out), -DMC_E_INTEGRITY);
	in.comp = 7;
	in.stored_size = in.raw_size;
	store_header_encode(&in, h);
	ASSERT_EQ(store_header_decode(h, &out), -DMC_E_INTEGRITY);
	in.comp = STORE_COMP_NONE;
	in.kind = 0;
	store_header_encode(&in, h);
	ASSERT_EQ(store_header_decode(h, &out), -DMC_E_INTEGRITY);
}

TEST(roundtrip_and_file_format)
{
	struct fixture fx;
	struct store_blob_info info;
	size_t n = 1u << 20;
	uint8_t *buf = malloc(n), *back = malloc(n), *file = NULL;
	uint8_t d[32];
	uint64_t got = 0;
	size_t flen = 0;
	char path[256];

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	fill_ct(buf, n);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_TENSOR, buf, n, NULL, &info), 0);
	store_unpin(fx.s, info.digest);
	ASSERT_EQ(store_digest_of(buf, n, d), 0);
	ASSERT_MEM_EQ(info.digest, d, 32);
	ASSERT_EQ(info.comp, STORE_COMP_ZSTD);
	ASSERT_UINT_EQ(info.raw_size, n);

	ASSERT_EQ(store_read(fx.s, d, back, n, &got), 0);
	ASSERT_UINT_EQ(got, n);
	ASSERT_MEM_EQ(back, buf, n);

	/* The file on disk: named by the raw digest, header then one zstd frame that zstd's
	 * own one-shot decoder turns back into the raw bytes. */
	blob_path(&fx, d, path, sizeof(path));
	ASSERT_EQ(read_file(path, &file, &flen), 0);
	ASSERT_UINT_EQ(flen, STORE_HEADER_SIZE + info.stored_size);
	ASSERT_UINT_EQ(le64(file + 16), n);
	ASSERT_UINT_EQ(le64(file + 24), info.stored_size);
	ASSERT_MEM_EQ(file + 32, d, 32);
	memset(back, 0, n);
	size_t dn = ZSTD_decompress(back, n, file + STORE_HEADER_SIZE, flen - STORE_HEADER_SIZE);
	ASSERT(!ZSTD_isError(dn));
	ASSERT_UINT_EQ(dn, n);
	ASSERT_MEM_EQ(back, buf, n);
	struct stat st;
	ASSERT_EQ(stat(path, &st), 0);
	ASSERT_EQ(st.st_mode & 0777, 0600);

	/* Too small a buffer: the size comes back, nothing is quarantined. */
	ASSERT_EQ(store_read(fx.s, d, back, n - 1, &got), -ENOBUFS);
	ASSERT_UINT_EQ(got, n);
	ASSERT_EQ(store_stat(fx.s, d, &info), 0);
	ASSERT_UINT_EQ(info.raw_size, n);
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);
	ASSERT_EQ(count_sub(&fx, "quarantine"), 0);

	/* An absent blob is a plain miss. */
	d[5] ^= 1;
	ASSERT_EQ(store_read(fx.s, d, back, n, &got), -ENOENT);
	free(file);
	free(buf);
	free(back);
	fx_close(&fx);
}

TEST(streaming_writer_chunks)
{
	struct fixture fx;
	static const size_t sizes[] = { 0, 1, 7, 4096, 131071, 131072, 131073, 300000, 1000003 };
	uint8_t *buf = malloc(1000003), *back = malloc(1000003);

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	for (size_t k = 0; k < sizeof(sizes) / sizeof(sizes[0]); k++) {
		size_t n = sizes[k];
		struct store_writer *w;
		struct store_blob_info info;
		uint8_t d[32];
		uint64_t got;

		if (k % 2)
			fill_ct(buf, n);
		else
			fill_random(buf, n);
		ASSERT_EQ(store_digest_of(buf, n, d), 0);
		ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &w), 0);
		/* Chunks of awkward sizes, as a network delivers them. */
		for (size_t off = 0, step = 1; off < n; off += step, step = step * 3 + 1) {
			size_t m = n - off < step ? n - off : step;
			ASSERT_EQ(store_writer_write(w, buf + off, m), 0);
		}
		ASSERT_EQ(store_writer_commit(w, d, &info), 0);
		store_unpin(fx.s, d);
		ASSERT_MEM_EQ(info.digest, d, 32);
		ASSERT_UINT_EQ(info.raw_size, n);
		ASSERT_EQ(store_read(fx.s, d, back, n, &got), 0);
		ASSERT_UINT_EQ(got, n);
		ASSERT_MEM_EQ(back, buf, n);
	}
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);
	free(buf);
	free(back);
	fx_close(&fx);
}

TEST(commit_checks)
{
	struct fixture fx;
	struct store_writer *w;
	struct store_stats st;
	uint8_t buf[5000], d[32];

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	fill_random(buf, sizeof(buf));
	ASSERT_EQ(store_digest_of(buf, sizeof(buf), d), 0);

	/* Wrong expected digest: nothing published, temp gone. */
	d[0] ^= 0x80;
	ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, sizeof(buf), d, NULL), -DMC_E_INTEGRITY);
	ASSERT_EQ(count_objects(&fx), 0);
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);

	/* Declared size exceeded while writing, and short of it at commit. */
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, 100, &w), 0);
	ASSERT_EQ(store_writer_write(w, buf, 60), 0);
	ASSERT_EQ(store_writer_write(w, buf, 60), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_EQ(store_writer_write(w, buf, 1), -DMC_E_LIMIT_EXCEEDED); /* sticky */
	ASSERT_EQ(store_writer_commit(w, NULL, NULL), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, 100, &w), 0);
	ASSERT_EQ(store_writer_write(w, buf, 99), 0);
	ASSERT_EQ(store_writer_commit(w, NULL, NULL), -DMC_E_INTEGRITY);
	/* The same past the sample, with zstd streaming a frame pledged to the full size. */
	size_t big = 400000;
	uint8_t *ct = malloc(big);
	fill_ct(ct, big);
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_TENSOR, big, &w), 0);
	ASSERT_EQ(store_writer_write(w, ct, big - 1000), 0);
	ASSERT_EQ(store_writer_commit(w, NULL, NULL), -DMC_E_INTEGRITY);
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_TENSOR, big, &w), 0);
	ASSERT_EQ(store_writer_write(w, ct, big), 0);
	struct store_blob_info ci;
	ASSERT_EQ(store_writer_commit(w, NULL, &ci), 0);
	ASSERT_EQ(ci.comp, STORE_COMP_ZSTD);
	store_unpin(fx.s, ci.digest);
	ASSERT_EQ(store_remove(fx.s, ci.digest, NULL), 0);
	free(ct);

	/* Abort drops the temp file. */
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &w), 0);
	ASSERT_EQ(store_writer_write(w, buf, sizeof(buf)), 0);
	ASSERT_EQ(count_sub(&fx, "tmp"), 1);
	store_writer_abort(w);
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);
	ASSERT_EQ(count_objects(&fx), 0);

	/* Bad kinds and objects over max_object are refused up front. */
	ASSERT_EQ(store_writer_open(fx.s, 0, 10, &w), -EINVAL);
	ASSERT_EQ(store_writer_open(fx.s, 99, 10, &w), -EINVAL);
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, STORE_OBJECT_MAX_DEFAULT + 1, &w),
		  -DMC_E_LIMIT_EXCEEDED);
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.writes, 1); /* only the complete 400000-byte tensor */
	ASSERT_UINT_EQ(st.removed, 1);
	ASSERT_UINT_EQ(st.used_bytes, 0);
	fx_close(&fx);

	/* A small max_object bounds unknown-size writes. */
	struct store_options o = { .max_object = 1000 };
	ASSERT_EQ(fx_open(&fx, &o), 0);
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &w), 0);
	ASSERT_EQ(store_writer_write(w, buf, 1000), 0);
	ASSERT_EQ(store_writer_write(w, buf, 1), -DMC_E_LIMIT_EXCEEDED);
	store_writer_abort(w);
	ASSERT_EQ(store_reserve(fx.s, 1001), -DMC_E_LIMIT_EXCEEDED);
	fx_close(&fx);
}

TEST(dedup)
{
	struct fixture fx;
	struct store_blob_info a, b;
	struct store_stats st;
	size_t n = 200000;
	uint8_t *buf = malloc(n);

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	fill_ct(buf, n);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, n, NULL, &a), 0);
	store_get_stats(fx.s, &st);
	uint64_t used = st.used_bytes;
	ASSERT_UINT_EQ(used, a.file_size);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, n, NULL, &b), 0);
	ASSERT_MEM_EQ(a.digest, b.digest, 32);
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.writes, 1);
	ASSERT_UINT_EQ(st.dedup_hits, 1);
	ASSERT_UINT_EQ(st.used_bytes, used);
	ASSERT_UINT_EQ(st.objects, 1);
	ASSERT_EQ(count_objects(&fx), 1);
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);
	/* Each commit pinned it once. */
	ASSERT_EQ(store_remove(fx.s, a.digest, NULL), -EBUSY);
	store_unpin(fx.s, a.digest);
	ASSERT(store_is_pinned(fx.s, a.digest));
	store_unpin(fx.s, a.digest);
	ASSERT(!store_is_pinned(fx.s, a.digest));

	/* A corrupt copy in place is replaced, not deduplicated against. */
	char path[256];
	blob_path(&fx, a.digest, path, sizeof(path));
	ASSERT_EQ(truncate(path, 300), 0);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, n, NULL, &b), 0);
	store_unpin(fx.s, b.digest);
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.writes, 2);
	ASSERT_UINT_EQ(st.quarantined, 1);
	ASSERT_UINT_EQ(st.used_bytes, used);
	ASSERT_UINT_EQ(st.objects, 1);
	uint8_t *back = malloc(n);
	uint64_t got;
	ASSERT_EQ(store_read(fx.s, a.digest, back, n, &got), 0);
	ASSERT_MEM_EQ(back, buf, n);
	free(back);
	free(buf);
	fx_close(&fx);
}

TEST(compression_policy)
{
	struct fixture fx;
	struct store_blob_info info;
	size_t n = 600000;
	uint8_t *buf = malloc(n), *back = malloc(n);
	uint64_t got;

	ASSERT_EQ(fx_open(&fx, NULL), 0);

	/* Random bytes: zstd cannot shrink them, stored raw. */
	fill_random(buf, 100000);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, 100000, NULL, &info), 0);
	store_unpin(fx.s, info.digest);
	ASSERT_EQ(info.comp, STORE_COMP_NONE);
	ASSERT_UINT_EQ(info.stored_size, 100000);

	/* Already-compressed formats by magic, even when the rest would compress. */
	static const uint8_t magics[][12] = {
		{ 0xff, 0xd8, 0xff, 0xe0 },                         /* JPEG */
		{ 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' },     /* PNG */
		{ 0x1f, 0x8b, 0x08, 0x00 },                         /* gzip */
		{ 0xff, 0x4f, 0xff, 0x51 },                         /* J2K codestream */
		{ 0, 0, 0, 0x0c, 'j', 'P', ' ', ' ', '\r', '\n', 0x87, '\n' }, /* JP2 */
		{ 0x28, 0xb5, 0x2f, 0xfd },                         /* zstd */
	};
	for (size_t m = 0; m < sizeof(magics) / sizeof(magics[0]); m++) {
		memset(buf, 0, 50000);
		memcpy(buf, magics[m], sizeof(magics[m]));
		buf[12] = (uint8_t)m; /* distinct contents */
		ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, 50000, NULL, &info), 0);
		store_unpin(fx.s, info.digest);
		ASSERT_EQ(info.comp, STORE_COMP_NONE);
		ASSERT_EQ(store_read(fx.s, info.digest, back, n, &got), 0);
		ASSERT_MEM_EQ(back, buf, 50000);
	}

	/* A repetitive int16 buffer: compressed, small (one-shot) and large (streamed). */
	fill_ct(buf, n);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_TENSOR, buf, 100000, NULL, &info), 0);
	store_unpin(fx.s, info.digest);
	ASSERT_EQ(info.comp, STORE_COMP_ZSTD);
	ASSERT_LT(info.stored_size * 100, 100000 * 95);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_TENSOR, buf, n, NULL, &info), 0);
	store_unpin(fx.s, info.digest);
	ASSERT_EQ(info.comp, STORE_COMP_ZSTD);
	ASSERT_LT(info.stored_size * 100, (uint64_t)n * 95);
	ASSERT_EQ(store_read(fx.s, info.digest, back, n, &got), 0);
	ASSERT_MEM_EQ(back, buf, n);

	/* The sample lies: a compressible first 128 KiB, then 4 MiB of random bytes. The whole
	 * does not shrink by 5 %, so the commit re-encodes it raw. */
	size_t big = 4u << 20;
	uint8_t *lie = malloc(big), *lieback = malloc(big);
	memset(lie, 'A', 140000);
	fill_random(lie + 140000, big - 140000);
	ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, lie, big, NULL, &info), 0);
	store_unpin(fx.s, info.digest);
	ASSERT_EQ(info.comp, STORE_COMP_NONE);
	ASSERT_UINT_EQ(info.stored_size, big);
	ASSERT_EQ(store_read(fx.s, info.digest, lieback, big, &got), 0);
	ASSERT_MEM_EQ(lieback, lie, big);
	free(lie);
	free(lieback);
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);

	struct store_stats st;
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.compressed, 2);
	free(buf);
	free(back);
	fx_close(&fx);
}

/* Corruptions of docs/reliability.md C5. Each must give -DMC_E_INTEGRITY, quarantine and count
 * it, then read as a miss, and a fresh put must bring the right bytes back. */
enum corruption { C_FLIP_PAYLOAD, C_FLIP_HEADER, C_TRUNCATE, C_ZERO, C_SWAP, C_KEY, C_EXTEND };

static int corrupt(struct fixture *fx, const uint8_t d[32], const uint8_t other[32],
		   enum corruption c)
{
	char path[256], opath[256];
	uint8_t *f = NULL;
	size_t len = 0;
	int r;

	blob_path(fx, d, path, sizeof(path));
	if ((r = read_file(path, &f, &len)) < 0)
		return r;
	switch (c) {
	case C_FLIP_PAYLOAD:
		f[STORE_HEADER_SIZE + (len - STORE_HEADER_SIZE) / 2] ^= 0x10;
		r = write_file(path, f, len);
		break;
	case C_FLIP_HEADER:
		f[20] ^= 0x01; /* raw size */
		r = write_file(path, f, len);
		break;
	case C_TRUNCATE:
		r = truncate(path, (off_t)(len - 1)) < 0 ? -errno : 0;
		break;
	case C_ZERO:
		r = truncate(path, 0) < 0 ? -errno : 0;
		break;
	case C_EXTEND:
		f = realloc(f, len + 1);
		f[len] = 0;
		r = write_file(path, f, len + 1);
		break;
	case C_SWAP: {
		uint8_t *o = NULL;
		size_t olen = 0;
		blob_path(fx, other, opath, sizeof(opath));
		if ((r = read_file(opath, &o, &olen)) == 0)
			r = write_file(path, o, olen);
		free(o);
		break;
	}
	case C_KEY: {
		/* Another object's blob with its header rewritten to claim this name: a
		 * consistent header (valid check) whose payload hashes to the other digest. */
		struct store_blob_info info;
		uint8_t *o = NULL;
		size_t olen = 0;
		blob_path(fx, other, opath, sizeof(opath));
		if ((r = read_file(opath, &o, &olen)) < 0)
			break;
		if ((r = store_header_decode(o, &info)) == 0) {
			memcpy(info.digest, d, 32);
			store_header_encode(&info, o);
			r = write_file(path, o, olen);
		}
		free(o);
		break;
	}
	}
	free(f);
	return r;
}

TEST(corruption_is_a_miss)
{
	static const char *const names[] = { "flip payload", "flip header", "truncate", "zero",
					     "swap", "key mismatch", "extend" };
	size_t n = 300000;
	uint8_t *a = malloc(n), *b = malloc(n), *back = malloc(n);

	for (int comp = 0; comp < 2; comp++) {
		for (int c = C_FLIP_PAYLOAD; c <= C_EXTEND; c++) {
			struct fixture fx;
			struct store_blob_info ia, ib;
			struct store_stats st;
			uint64_t got = 0;

			printf("# %s, %s\n", names[c], comp ? "zstd" : "raw");
			ASSERT_EQ(fx_open(&fx, NULL), 0);
			if (comp) {
				fill_ct(a, n);
				fill_ct(b, n);
			} else {
				fill_random(a, n);
				fill_random(b, n);
			}
			ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, a, n, NULL, &ia), 0);
			ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, b, n, NULL, &ib), 0);
			store_unpin(fx.s, ia.digest);
			store_unpin(fx.s, ib.digest);
			ASSERT_EQ(ia.comp, comp ? STORE_COMP_ZSTD : STORE_COMP_NONE);
			ASSERT_EQ(corrupt(&fx, ia.digest, ib.digest, (enum corruption)c), 0);

			memset(back, 0, n);
			ASSERT_EQ(store_read(fx.s, ia.digest, back, n, &got), -DMC_E_INTEGRITY);
			store_get_stats(fx.s, &st);
			ASSERT_UINT_EQ(st.integrity_failures, 1);
			ASSERT_UINT_EQ(st.quarantined, 1);
			ASSERT_UINT_EQ(st.objects, 1);
			/* Where the damaged file no longer says what it was counted as, the
			 * store uncounts the size it has now (zero-length: nothing; swapped
			 * or re-keyed: the other blob's size) until the next scan recounts. */
			uint64_t gone = c == C_ZERO                 ? 0
				      : c == C_SWAP || c == C_KEY ? ib.file_size
								  : ia.file_size;
			ASSERT_UINT_EQ(st.used_bytes, ia.file_size + ib.file_size - gone);
			ASSERT_EQ(count_sub(&fx, "quarantine"), 1);
			/* Now a plain miss; the other blob is untouched. */
			ASSERT_EQ(store_read(fx.s, ia.digest, back, n, &got), -ENOENT);
			ASSERT_EQ(store_read(fx.s, ib.digest, back, n, &got), 0);
			ASSERT_MEM_EQ(back, b, n);
			/* Refetched, it reads right. */
			ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, a, n, NULL, &ia), 0);
			store_unpin(fx.s, ia.digest);
			ASSERT_EQ(store_read(fx.s, ia.digest, back, n, &got), 0);
			ASSERT_MEM_EQ(back, a, n);
			fx_close(&fx);
		}
	}
	free(a);
	free(b);
	free(back);
}

TEST(verify_and_stat_detect_corruption)
{
	struct fixture fx;
	struct store_blob_info info[6];
	uint8_t buf[20000];
	uint64_t ok = 0, bad = 0;

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	for (int i = 0; i < 6; i++) {
		fill_ct(buf, sizeof(buf));
		ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, sizeof(buf), NULL, &info[i]), 0);
		store_unpin(fx.s, info[i].digest);
	}
	ASSERT_EQ(corrupt(&fx, info[1].digest, NULL, C_FLIP_PAYLOAD), 0);
	ASSERT_EQ(corrupt(&fx, info[4].digest, info[2].digest, C_SWAP), 0);
	/* stat checks the header only: a payload flip passes, a swapped blob does not. */
	struct store_blob_info si;
	ASSERT_EQ(store_stat(fx.s, info[1].digest, &si), 0);
	ASSERT_EQ(store_verify(fx.s, info[0].digest, &si), 0);

	ASSERT_EQ(store_verify_all(fx.s, NULL, NULL, &ok, &bad), 0);
	ASSERT_UINT_EQ(ok, 4);
	ASSERT_UINT_EQ(bad, 2);
	ASSERT_EQ(count_objects(&fx), 4);
	ASSERT_EQ(store_verify_all(fx.s, NULL, NULL, &ok, &bad), 0);
	ASSERT_UINT_EQ(ok, 4);
	ASSERT_UINT_EQ(bad, 0);
	fx_close(&fx);
}

struct bad_seen {
	int n;
	uint8_t d[4][32];
};

static void on_bad(void *ctx, const uint8_t d[32])
{
	struct bad_seen *b = ctx;
	if (b->n < 4)
		memcpy(b->d[b->n], d, 32);
	b->n++;
}

TEST(verify_all_reports_bad)
{
	struct fixture fx;
	struct store_blob_info info[3];
	struct bad_seen seen = { 0 };
	uint8_t buf[9000];
	uint64_t ok = 0, bad = 0;

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	for (int i = 0; i < 3; i++) {
		fill_random(buf, sizeof(buf));
		ASSERT_EQ(store_put(fx.s, STORE_KIND_META, buf, sizeof(buf), NULL, &info[i]), 0);
		store_unpin(fx.s, info[i].digest);
	}
	ASSERT_EQ(corrupt(&fx, info[2].digest, NULL, C_TRUNCATE), 0);
	ASSERT_EQ(store_verify_all(fx.s, on_bad, &seen, &ok, &bad), 0);
	ASSERT_UINT_EQ(ok, 2);
	ASSERT_UINT_EQ(bad, 1);
	ASSERT_EQ(seen.n, 1);
	ASSERT_MEM_EQ(seen.d[0], info[2].digest, 32);
	fx_close(&fx);
}

struct scanned {
	int n;
	uint64_t bytes;
	uint8_t last[32];
	int out_of_order;
};

static int on_scanned(void *ctx, const struct store_blob_info *info)
{
	struct scanned *s = ctx;
	if (s->n > 0 && memcmp(s->last, info->digest, 32) >= 0)
		s->out_of_order++;
	memcpy(s->last, info->digest, 32);
	s->n++;
	s->bytes += info->file_size;
	return 0;
}

TEST(scan_repairs)
{
	struct fixture fx;
	struct store_blob_info info[40];
	struct scanned sc = { 0 };
	struct store_stats st;
	uint8_t buf[3000];
	uint64_t removed = 0, expect = 0;
	char p[256];

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	for (int i = 0; i < 40; i++) {
		fill_random(buf, sizeof(buf));
		ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, sizeof(buf), NULL, &info[i]), 0);
		store_unpin(fx.s, info[i].digest);
		if (i >= 2)
			expect += info[i].file_size;
	}
	/* Leftovers of a crash and of strangers. */
	snprintf(p, sizeof(p), "%s/tmp/w.1.2.3", fx.dir);
	ASSERT_EQ(write_file(p, buf, 100), 0);
	snprintf(p, sizeof(p), "%s/quarantine/x", fx.dir);
	ASSERT_EQ(write_file(p, buf, 100), 0);
	snprintf(p, sizeof(p), "%s/objects/00", fx.dir);
	ASSERT(mkdir(p, 0700) == 0 || errno == EEXIST);
	snprintf(p, sizeof(p), "%s/objects/00/not-a-digest", fx.dir);
	ASSERT_EQ(write_file(p, buf, 100), 0);
	ASSERT_EQ(corrupt(&fx, info[0].digest, NULL, C_ZERO), 0);
	ASSERT_EQ(corrupt(&fx, info[1].digest, info[5].digest, C_KEY), 0);
	expect += info[1].file_size; /* it was not counted (i >= 2 above) */
	/* A valid blob filed under the wrong subdirectory is not ours either. */
	char hex[65], wrong[256];
	store_digest_hex(info[2].digest, hex);
	blob_path(&fx, info[2].digest, p, sizeof(p));
	snprintf(wrong, sizeof(wrong), "%s/objects/%02x", fx.dir,
		 (unsigned)(info[2].digest[0] ^ 1));
	ASSERT(mkdir(wrong, 0700) == 0 || errno == EEXIST);
	snprintf(wrong, sizeof(wrong), "%s/objects/%02x/%s", fx.dir,
		 (unsigned)(info[2].digest[0] ^ 1), hex);
	ASSERT_EQ(rename(p, wrong), 0);
	expect -= info[2].file_size;

	ASSERT_EQ(store_scan(fx.s, on_scanned, &sc, &removed), 0);
	/* The scan reads headers only: the blob whose header was rewritten to claim another
	 * name passes it (the payload hash is checked on every read, below). */
	ASSERT_EQ(sc.n, 38);
	ASSERT_EQ(sc.out_of_order, 0);
	ASSERT_UINT_EQ(sc.bytes, expect);
	ASSERT_UINT_EQ(removed, 5); /* temp, quarantined, stranger, zero-length, misfiled */
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);
	ASSERT_EQ(count_sub(&fx, "quarantine"), 0);
	ASSERT_EQ(count_objects(&fx), 38);
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.objects, 38);
	ASSERT_UINT_EQ(st.used_bytes, expect);
	uint64_t got = 0;
	ASSERT_EQ(store_read(fx.s, info[1].digest, buf, sizeof(buf), &got), -DMC_E_INTEGRITY);
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.objects, 37);
	ASSERT_UINT_EQ(st.used_bytes, expect - info[1].file_size);
	fx_close(&fx);
}

TEST(reserve_and_remove)
{
	struct fixture fx;
	struct store_options o = { .max_size = 10 * (1000 + STORE_HEADER_SIZE) };
	struct store_blob_info info[10];
	struct store_stats st;
	uint8_t buf[1000];
	uint64_t need = 0, freed = 0;

	ASSERT_EQ(fx_open(&fx, &o), 0);
	for (int i = 0; i < 10; i++) {
		ASSERT_EQ(store_reserve(fx.s, sizeof(buf)), 0);
		fill_random(buf, sizeof(buf));
		ASSERT_EQ(store_put(fx.s, STORE_KIND_RAW, buf, sizeof(buf), NULL, &info[i]), 0);
		store_unpin(fx.s, info[i].digest);
		store_release(fx.s, sizeof(buf));
	}
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.used_bytes, o.max_size);
	ASSERT_UINT_EQ(st.reserved_bytes, 0);
	ASSERT_EQ(store_reserve(fx.s, 1), -DMC_E_CACHE_FULL);
	ASSERT_EQ(store_shortfall(fx.s, 1, &need), 0);
	ASSERT_UINT_EQ(need, 1 + STORE_HEADER_SIZE);

	/* Pinned blobs stay; unpinned ones go and free their bytes. */
	ASSERT_EQ(store_pin(fx.s, info[3].digest), 0);
	ASSERT_EQ(store_remove(fx.s, info[3].digest, &freed), -EBUSY);
	store_unpin(fx.s, info[3].digest);
	ASSERT_EQ(store_remove(fx.s, info[3].digest, &freed), 0);
	ASSERT_UINT_EQ(freed, 1000 + STORE_HEADER_SIZE);
	ASSERT_EQ(store_remove(fx.s, info[3].digest, &freed), -ENOENT);
	ASSERT_EQ(store_reserve(fx.s, 1000), 0);
	/* Reservations count until released. */
	ASSERT_EQ(store_reserve(fx.s, 1), -DMC_E_CACHE_FULL);
	store_release(fx.s, 1000);
	ASSERT_EQ(store_reserve(fx.s, 1), 0);
	store_release(fx.s, 1);
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.reserved_bytes, 0);
	ASSERT_UINT_EQ(st.objects, 9);
	ASSERT_UINT_EQ(st.removed, 1);
	fx_close(&fx);

	/* min_free larger than any file system: nothing is admitted. */
	struct store_options o2 = { .min_free = 1ull << 62 };
	ASSERT_EQ(fx_open(&fx, &o2), 0);
	ASSERT_EQ(store_reserve(fx.s, 1), -DMC_E_CACHE_FULL);
	ASSERT_EQ(store_shortfall(fx.s, 1, &need), 0);
	ASSERT_GT(need, 0);
	fx_close(&fx);
}

/* ---- concurrency: writers of overlapping content and readers, on several threads ---- */

#define CONC_THREADS 4
#define CONC_OBJECTS 24

struct conc {
	struct store *s;
	int id;
	int failures;
};

static void conc_content(int k, uint8_t *buf, size_t n)
{
	for (size_t i = 0; i < n; i++)
		buf[i] = (uint8_t)(k * 31 + (i % 251) * (k % 7 + 1));
}

static void *conc_main(void *arg)
{
	struct conc *c = arg;
	size_t n = 70000;
	uint8_t *buf = malloc(n), *back = malloc(n);
	for (int j = 0; j < CONC_OBJECTS; j++) {
		int k = (j * (c->id + 1)) % CONC_OBJECTS; /* overlapping between threads */
		struct store_blob_info info;
		uint64_t got;
		conc_content(k, buf, n);
		if (store_put(c->s, STORE_KIND_RAW, buf, n, NULL, &info) != 0) {
			c->failures++;
			continue;
		}
		if (store_read(c->s, info.digest, back, n, &got) != 0 || got != n ||
		    memcmp(back, buf, n) != 0)
			c->failures++;
		store_unpin(c->s, info.digest);
	}
	free(buf);
	free(back);
	return NULL;
}

TEST(concurrent_writers_and_readers)
{
	struct fixture fx;
	pthread_t th[CONC_THREADS];
	struct conc c[CONC_THREADS];
	struct store_stats st;

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	for (int i = 0; i < CONC_THREADS; i++) {
		c[i] = (struct conc){ fx.s, i, 0 };
		ASSERT_EQ(pthread_create(&th[i], NULL, conc_main, &c[i]), 0);
	}
	for (int i = 0; i < CONC_THREADS; i++) {
		pthread_join(th[i], NULL);
		ASSERT_EQ(c[i].failures, 0);
	}
	store_get_stats(fx.s, &st);
	ASSERT_UINT_EQ(st.writes + st.dedup_hits, CONC_THREADS * CONC_OBJECTS);
	ASSERT_UINT_EQ(st.objects, (uint64_t)count_objects(&fx));
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);
	ASSERT_UINT_EQ(st.integrity_failures, 0);
	uint64_t ok = 0, bad = 0;
	ASSERT_EQ(store_verify_all(fx.s, NULL, NULL, &ok, &bad), 0);
	ASSERT_UINT_EQ(ok, st.objects);
	ASSERT_UINT_EQ(bad, 0);
	fx_close(&fx);
}

TEST(open_errors)
{
	struct store *s = NULL;
	char err[256] = "";
	struct store_options o = { .zstd_level = 9 };
	ASSERT_EQ(store_open("/tmp", &o, err, sizeof(err), &s), -EINVAL);
	ASSERT(strstr(err, "zstd") != NULL);
	ASSERT_EQ(store_open("", NULL, err, sizeof(err), &s), -EINVAL);
	ASSERT_EQ(store_open("/proc/version/x", NULL, err, sizeof(err), &s), -ENOTDIR);
	ASSERT_NULL(s);
}

/* 12-bit values in 16-bit words: zstd-1 shrinks them to ~75 %, not to 2/3. */
static void fill_12bit(uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2) {
		uint16_t v = (uint16_t)(rnd() >> 52);
		p[i] = (uint8_t)v;
		p[i + 1] = (uint8_t)(v >> 8);
	}
}

static int put_keep(struct store *s, const uint8_t *buf, size_t n, int pct,
		    struct store_blob_info *ret)
{
	struct store_writer *w;
	int r = store_writer_open(s, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &w);
	if (r < 0)
		return r;
	if (pct >= 0 && (r = store_writer_set_zstd_keep(w, (unsigned)pct)) < 0) {
		store_writer_abort(w);
		return r;
	}
	/* 1 MiB pieces, as downloads come: raw ones go straight to the file */
	for (size_t off = 0; off < n; off += 1u << 20) {
		r = store_writer_write(w, buf + off, n - off < (1u << 20) ? n - off : (1u << 20));
		if (r < 0) {
			store_writer_abort(w);
			return r;
		}
	}
	r = store_writer_commit(w, NULL, ret);
	if (r == 0)
		store_unpin(s, ret->digest);
	return r;
}

TEST(zstd_keep_threshold)
{
	struct fixture fx;
	struct store_blob_info info;
	struct store_writer *w;
	size_t n = (3u << 20) + 12345;
	uint8_t *twelve = malloc(n), *sparse = calloc(1, n), *back = malloc(n);
	uint64_t got;

	ASSERT_EQ(fx_open(&fx, NULL), 0);
	fill_12bit(twelve, n);
	for (size_t i = 0; i < n; i += 4099)
		sparse[i] = (uint8_t)i;

	/* the default keeps zstd for a 25 % gain */
	ASSERT_EQ(put_keep(fx.s, twelve, n, -1, &info), 0);
	ASSERT_EQ(info.comp, STORE_COMP_ZSTD);
	ASSERT(info.stored_size * 100 > (uint64_t)n * 67 && info.stored_size * 100 < (uint64_t)n * 95);
	ASSERT_EQ(store_remove(fx.s, info.digest, NULL), 0);
	/* asking for 2/3 stores the same bytes raw, sparse data still compressed */
	ASSERT_EQ(put_keep(fx.s, twelve, n, 67, &info), 0);
	ASSERT_EQ(info.comp, STORE_COMP_NONE);
	ASSERT_UINT_EQ(info.stored_size, n);
	ASSERT_EQ(store_read(fx.s, info.digest, back, n, &got), 0);
	ASSERT_UINT_EQ(got, n);
	ASSERT_MEM_EQ(back, twelve, n);
	ASSERT_EQ(put_keep(fx.s, sparse, n, 67, &info), 0);
	ASSERT_EQ(info.comp, STORE_COMP_ZSTD);
	ASSERT(info.stored_size * 100 < (uint64_t)n);
	ASSERT_EQ(store_remove(fx.s, info.digest, NULL), 0);
	/* 0: never zstd */
	ASSERT_EQ(put_keep(fx.s, sparse, n, 0, &info), 0);
	ASSERT_EQ(info.comp, STORE_COMP_NONE);
	ASSERT_EQ(store_read(fx.s, info.digest, back, n, &got), 0);
	ASSERT_MEM_EQ(back, sparse, n);
	/* only before the first byte, only up to 100 */
	ASSERT_EQ(store_writer_open(fx.s, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, &w), 0);
	ASSERT_EQ(store_writer_set_zstd_keep(w, 101), -EINVAL);
	ASSERT_EQ(store_writer_write(w, sparse, 10), 0);
	ASSERT_EQ(store_writer_set_zstd_keep(w, 50), -EINVAL);
	store_writer_abort(w);
	ASSERT_EQ(count_sub(&fx, "tmp"), 0);

	free(twelve);
	free(sparse);
	free(back);
	fx_close(&fx);
}

/* A blob file copied as it is into another store (the cluster tier's path): verified, not
 * re-encoded; a flipped byte, a wrong name or a truncated file publishes nothing. */
static int read_whole(const char *path, uint8_t **ret, size_t *ret_len)
{
	FILE *f = fopen(path, "rb");
	long n;
	if (!f)
		return -errno;
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	fseek(f, 0, SEEK_SET);
	*ret = malloc((size_t)n);
	*ret_len = fread(*ret, 1, (size_t)n, f);
	fclose(f);
	return *ret_len == (size_t)n ? 0 : -EIO;
}

static int import_bytes(struct store *s, const uint8_t *buf, size_t len,
			const uint8_t expected[STORE_DIGEST_SIZE], struct store_blob_info *info)
{
	struct store_writer *w;
	int r = store_import_open(s, &w);
	if (r < 0)
		return r;
	/* in uneven pieces, as a network delivers them */
	for (size_t off = 0; off < len;) {
		size_t k = len - off < 7777 ? len - off : 7777;
		r = store_writer_write(w, buf + off, k);
		if (r < 0) {
			store_writer_abort(w);
			return r;
		}
		off += k;
	}
	return store_writer_commit(w, expected, info);
}

TEST(import_blob_file)
{
	struct fixture a, b;
	struct store_blob_info ia, ib;
	char path[256], path_b[256];
	uint8_t *file = NULL, *file_b = NULL, *raw, *back;
	size_t n = 300000, flen = 0, flen_b = 0;
	uint64_t got = 0;
	uint8_t other[STORE_DIGEST_SIZE];

	ASSERT_EQ(fx_open(&a, NULL), 0);
	ASSERT_EQ(fx_open(&b, NULL), 0);
	raw = malloc(n);
	back = malloc(n);
	fill_ct(raw, n); /* compresses: the imported file keeps its zstd payload */
	ASSERT_EQ(store_put(a.s, STORE_KIND_RAW, raw, n, NULL, &ia), 0);
	store_unpin(a.s, ia.digest);
	ASSERT_EQ(ia.comp, STORE_COMP_ZSTD);
	blob_path(&a, ia.digest, path, sizeof(path));
	ASSERT_EQ(read_whole(path, &file, &flen), 0);
	ASSERT_UINT_EQ(flen, ia.file_size);

	/* a flipped payload byte: refused, nothing published, no temp left */
	file[flen - 10] ^= 0x40;
	ASSERT_EQ(import_bytes(b.s, file, flen, ia.digest, &ib), -DMC_E_INTEGRITY);
	file[flen - 10] ^= 0x40;
	ASSERT_EQ(count_objects(&b), 0);
	ASSERT_EQ(count_sub(&b, "tmp"), 0);
	/* another name than the header's */
	memcpy(other, ia.digest, sizeof(other));
	other[0] ^= 1;
	ASSERT_EQ(import_bytes(b.s, file, flen, other, &ib), -DMC_E_INTEGRITY);
	/* truncated */
	ASSERT_EQ(import_bytes(b.s, file, flen - 1, ia.digest, &ib), -DMC_E_INTEGRITY);
	ASSERT_EQ(count_objects(&b), 0);

	/* the real file: the same bytes on disk, the same raw payload read back */
	ASSERT_EQ(import_bytes(b.s, file, flen, ia.digest, &ib), 0);
	store_unpin(b.s, ib.digest);
	ASSERT_MEM_EQ(ib.digest, ia.digest, STORE_DIGEST_SIZE);
	blob_path(&b, ia.digest, path_b, sizeof(path_b));
	ASSERT_EQ(read_whole(path_b, &file_b, &flen_b), 0);
	ASSERT_UINT_EQ(flen_b, flen);
	ASSERT_MEM_EQ(file_b, file, flen);
	ASSERT_EQ(store_read(b.s, ia.digest, back, n, &got), 0);
	ASSERT_UINT_EQ(got, n);
	ASSERT_MEM_EQ(back, raw, n);
	free(file);
	free(file_b);
	free(raw);
	free(back);
	fx_close(&a);
	fx_close(&b);
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(sha256_vectors), T(header_codec), T(roundtrip_and_file_format),
		  T(streaming_writer_chunks), T(commit_checks), T(dedup), T(compression_policy),
		  T(corruption_is_a_miss), T(verify_and_stat_detect_corruption),
		  T(verify_all_reports_bad), T(scan_repairs), T(reserve_and_remove),
		  T(concurrent_writers_and_readers), T(open_errors), T(zstd_keep_threshold),
		  T(import_blob_file));
}
