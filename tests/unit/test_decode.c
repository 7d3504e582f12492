/*
 * Unit tests of the pure decoders (daemon/decode*.c) on small in-memory inputs, their limit
 * checks, dtype conversion and metadata, and the .npy writer. Inputs are produced by
 * independent encoders (libspng's and TurboJPEG's encoders, libdeflate's compressor) or
 * assembled byte by byte here (NIfTI headers, DICOM data sets, RLE segments).
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <libdeflate.h>
#include <spng.h>
#include <turbojpeg.h>

#include "decode.h"
#include "npy.h"
#include "task.h"

/* ---- helpers ---- */

struct bb {
	uint8_t *p;
	size_t len, cap;
};

static void bb_put(struct bb *b, const void *d, size_t n)
{
	if (b->len + n > b->cap) {
		b->cap = (b->len + n) * 2 + 64;
		b->p = realloc(b->p, b->cap);
		if (!b->p)
			abort();
	}
	memcpy(b->p + b->len, d, n);
	b->len += n;
}
static void bb_u8(struct bb *b, uint8_t v) { bb_put(b, &v, 1); }
static void bb_le16(struct bb *b, uint16_t v) { uint8_t x[2] = { (uint8_t)v, (uint8_t)(v >> 8) }; bb_put(b, x, 2); }
static void bb_le32(struct bb *b, uint32_t v)
{
	uint8_t x[4] = { (uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24) };
	bb_put(b, x, 4);
}
static void bb_be32(struct bb *b, uint32_t v)
{
	uint8_t x[4] = { (uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v };
	bb_put(b, x, 4);
}
static void bb_zero(struct bb *b, size_t n)
{
	for (size_t i = 0; i < n; i++)
		bb_u8(b, 0);
}

static struct decode_ctx *new_ctx(uint64_t max_bytes)
{
	struct decode_limits lim;
	decode_limits_default(&lim);
	if (max_bytes)
		lim.max_decode_bytes = max_bytes;
	return decode_ctx_new(&lim);
}

/* Probe + decode with opts into a fresh buffer; returns the status. */
static int decode_all(struct decode_ctx *ctx, const void *in, size_t len,
		      const struct decode_opts *o, struct decode_desc *d, void **out)
{
	char err[256];
	int r = decode_probe(ctx, in, len, o, d, err, sizeof(err));
	*out = NULL;
	if (r < 0)
		return r;
	*out = malloc(d->nbytes ? (size_t)d->nbytes : 1);
	r = decode_run(ctx, in, len, o, *out, (size_t)d->nbytes, err, sizeof(err));
	if (r < 0) {
		free(*out);
		*out = NULL;
	}
	return r;
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- PNG (libspng's encoder makes the inputs) ---- */

static struct bb png_encode(uint32_t w, uint32_t h, uint8_t color, uint8_t depth, const void *img,
			    size_t len, const uint8_t *palette_rgb, unsigned npal)
{
	struct bb b = { 0 };
	spng_ctx *e = spng_ctx_new(SPNG_CTX_ENCODER);
	struct spng_ihdr ihdr = { w, h, depth, color, 0, 0, 0 };
	spng_set_option(e, SPNG_ENCODE_TO_BUFFER, 1);
	spng_set_ihdr(e, &ihdr);
	if (palette_rgb) {
		struct spng_plte plte;
		memset(&plte, 0, sizeof(plte));
		plte.n_entries = npal;
		for (unsigned i = 0; i < npal; i++) {
			plte.entries[i].red = palette_rgb[3 * i];
			plte.entries[i].green = palette_rgb[3 * i + 1];
			plte.entries[i].blue = palette_rgb[3 * i + 2];
		}
		spng_set_plte(e, &plte);
	}
	int r = spng_encode_image(e, img, len, SPNG_FMT_PNG, SPNG_ENCODE_FINALIZE);
	size_t n = 0;
	int err = 0;
	void *out = r == 0 ? spng_get_png_buffer(e, &n, &err) : NULL;
	if (out)
		bb_put(&b, out, n);
	free(out);
	spng_ctx_free(e);
	return b;
}

TEST(png_gray8_and_rgb16)
{
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	void *out;
	uint8_t g[6] = { 0, 1, 2, 200, 254, 255 };
	struct bb b = png_encode(3, 2, SPNG_COLOR_TYPE_GRAYSCALE, 8, g, sizeof(g), NULL, 0);
	ASSERT_GT(b.len, 8);
	ASSERT_EQ(decode_sniff(b.p, b.len), DECODE_FORMAT_PNG);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_U8);
	ASSERT_EQ(d.frames, 1);
	ASSERT_EQ(d.channels, 1);
	ASSERT_EQ(d.height, 2);
	ASSERT_EQ(d.width, 3);
	ASSERT_MEM_EQ(out, g, 6);
	free(out);
	free(b.p);

	/* RGB 16-bit: interleaved big-endian in the file, planar host-endian out. */
	uint16_t rgb[2 * 2 * 3];
	for (int i = 0; i < 12; i++)
		rgb[i] = (uint16_t)(i * 5000 + 7);
	b = png_encode(2, 2, SPNG_COLOR_TYPE_TRUECOLOR, 16, rgb, sizeof(rgb), NULL, 0);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_U16);
	ASSERT_EQ(d.channels, 3);
	const uint16_t *o = out;
	for (int c = 0; c < 3; c++)
		for (int i = 0; i < 4; i++)
			ASSERT_EQ(o[c * 4 + i], rgb[i * 3 + c]);
	free(out);
	free(b.p);
	decode_ctx_free(ctx);
}

TEST(png_low_bit_depths)
{
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	void *out;
	/* 2-bit gray, 5x1: values 0 1 2 3 1 packed MSB first; Pillow scales by 85. */
	uint8_t packed[2] = { 0x1b, 0x40 };
	struct bb b = png_encode(5, 1, SPNG_COLOR_TYPE_GRAYSCALE, 2, packed, sizeof(packed), NULL, 0);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	uint8_t want[5] = { 0, 85, 170, 255, 85 };
	ASSERT_EQ(d.width, 5);
	ASSERT_MEM_EQ(out, want, 5);
	free(out);
	free(b.p);

	/* 1-bit gray: 0/1 (Pillow's bool array as uint8). */
	uint8_t bits[1] = { 0xa0 }; /* 1 0 1 */
	b = png_encode(3, 1, SPNG_COLOR_TYPE_GRAYSCALE, 1, bits, 1, NULL, 0);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	uint8_t want1[3] = { 1, 0, 1 };
	ASSERT_MEM_EQ(out, want1, 3);
	free(out);
	free(b.p);

	/* 4-bit palette: indices, not scaled, not expanded. */
	uint8_t pal[16 * 3];
	for (int i = 0; i < 48; i++)
		pal[i] = (uint8_t)(i * 5);
	uint8_t idx[2] = { 0x3f, 0x70 }; /* 3 15 7 */
	b = png_encode(3, 1, SPNG_COLOR_TYPE_INDEXED, 4, idx, 2, pal, 16);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	uint8_t wantp[3] = { 3, 15, 7 };
	ASSERT_EQ(d.channels, 1);
	ASSERT_MEM_EQ(out, wantp, 3);
	free(out);
	free(b.p);
	decode_ctx_free(ctx);
}

static void png_chunk(struct bb *b, const char *type, const uint8_t *data, uint32_t n)
{
	bb_be32(b, n);
	size_t start = b->len;
	bb_put(b, type, 4);
	if (n)
		bb_put(b, data, n);
	bb_be32(b, libdeflate_crc32(0, b->p + start, 4 + n));
}

TEST(png_size_bomb)
{
	/* A 10^6 x 10^6 RGBA16 header with a tiny IDAT: rejected by the probe, quickly. */
	static const uint8_t sig[8] = { 0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a };
	struct bb b = { 0 };
	uint8_t ihdr[13] = { 0, 0x0f, 0x42, 0x40, 0, 0x0f, 0x42, 0x40, 16, 6, 0, 0, 0 };
	uint8_t idat[11] = { 0x78, 0x9c, 0x63, 0, 0, 0, 1, 0, 1, 0, 0 };
	bb_put(&b, sig, 8);
	png_chunk(&b, "IHDR", ihdr, 13);
	png_chunk(&b, "IDAT", idat, sizeof(idat));
	png_chunk(&b, "IEND", NULL, 0);
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	char err[256];
	double t = now_s();
	ASSERT_EQ(decode_probe(ctx, b.p, b.len, NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_LT(now_s() - t, 1.0);
	ASSERT(strstr(err, "exceeds") != NULL);
	free(b.p);

	/* Corrupt: a flipped IDAT byte in a valid image (CRC and Adler-32 mismatch). */
	uint8_t g[64];
	for (int i = 0; i < 64; i++)
		g[i] = (uint8_t)(i * 3);
	b = png_encode(8, 8, SPNG_COLOR_TYPE_GRAYSCALE, 8, g, sizeof(g), NULL, 0);
	b.p[8 + 25 + 8 + 4] ^= 0x55;
	void *out;
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), -DMC_E_DECODE_FAILED);
	/* Truncated after the header. */
	b = (struct bb){ b.p, 8 + 25 + 4, b.cap };
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), -DMC_E_DECODE_FAILED);
	decode_ctx_free(ctx);
	free(b.p);
}

/* ---- JPEG (TurboJPEG's encoder makes the inputs) ---- */

static struct bb jpeg_encode(const uint8_t *px, int w, int h, int pf, int subsamp, int quality,
			     int flags)
{
	struct bb b = { 0 };
	tjhandle tj = tjInitCompress();
	unsigned char *jb = NULL;
	unsigned long jl = 0;
	if (tjCompress2(tj, px, w, 0, h, pf, &jb, &jl, subsamp, quality, flags) == 0)
		bb_put(&b, jb, jl);
	tjFree(jb);
	tjDestroy(tj);
	return b;
}

/* The same bitstream through TurboJPEG directly: the reference for our planar output. */
static uint8_t *jpeg_reference(const struct bb *b, int w, int h, int pf, int c)
{
	uint8_t *o = malloc((size_t)w * h * c);
	tjhandle tj = tjInitDecompress();
	tjDecompress2(tj, b->p, b->len, o, w, 0, h, pf, 0);
	tjDestroy(tj);
	return o;
}

TEST(jpeg_gray_rgb_progressive)
{
	enum { W = 33, H = 17 };
	uint8_t rgb[W * H * 3];
	for (int i = 0; i < W * H * 3; i++)
		rgb[i] = (uint8_t)((i * 37) ^ (i >> 3));
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	void *out;

	struct bb b = jpeg_encode(rgb, W, H, TJPF_RGB, TJSAMP_420, 90, 0);
	ASSERT_EQ(decode_sniff(b.p, b.len), DECODE_FORMAT_JPEG);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.channels, 3);
	ASSERT_EQ(d.height, H);
	ASSERT_EQ(d.width, W);
	ASSERT_EQ(d.codec, DECODE_CODEC_JPEG);
	uint8_t *ref = jpeg_reference(&b, W, H, TJPF_RGB, 3);
	const uint8_t *o = out;
	for (int c = 0; c < 3; c++)
		for (int i = 0; i < W * H; i++)
			ASSERT_EQ(o[c * W * H + i], ref[i * 3 + c]);
	free(ref);
	free(out);
	free(b.p);

	b = jpeg_encode(rgb, W, H, TJPF_RGB, TJSAMP_444, 95, TJFLAG_PROGRESSIVE);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ref = jpeg_reference(&b, W, H, TJPF_RGB, 3);
	o = out;
	for (int c = 0; c < 3; c++)
		for (int i = 0; i < W * H; i++)
			ASSERT_EQ(o[c * W * H + i], ref[i * 3 + c]);
	free(ref);
	free(out);
	free(b.p);

	b = jpeg_encode(rgb, W, H, TJPF_GRAY, TJSAMP_GRAY, 80, 0);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.channels, 1);
	ref = jpeg_reference(&b, W, H, TJPF_GRAY, 1);
	ASSERT_MEM_EQ(out, ref, W * H);
	free(ref);
	free(out);

	/* Truncated: the reference decoders refuse it, so do we. */
	char err[256];
	ASSERT_EQ(decode_probe(ctx, b.p, b.len / 2, NULL, &d, err, sizeof(err)), 0);
	out = malloc((size_t)d.nbytes);
	ASSERT_EQ(decode_run(ctx, b.p, b.len / 2, NULL, out, (size_t)d.nbytes, err, sizeof(err)),
		  -DMC_E_DECODE_FAILED);
	free(out);
	free(b.p);
	decode_ctx_free(ctx);
}

TEST(jpeg_size_bomb)
{
	/* SOI, SOF0 65500 x 65500 x 3, SOS, EOI: 12.9 GB declared by ~30 bytes. */
	static const uint8_t j[] = { 0xff, 0xd8, 0xff, 0xc0, 0x00, 0x11, 0x08, 0xff, 0xdc, 0xff,
				     0xdc, 0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x00, 0x03, 0x11,
				     0x00, 0xff, 0xda, 0x00, 0x08, 0x01, 0x01, 0x00, 0x00, 0x3f,
				     0x00, 0xff, 0xd9 };
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	char err[256];
	double t = now_s();
	ASSERT_EQ(decode_probe(ctx, j, sizeof(j), NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_LT(now_s() - t, 1.0);
	/* Wrong magic. */
	static const uint8_t junk[16] = { 'n', 'o', 't', ' ', 'a', 'n', ' ', 'i', 'm', 'a', 'g', 'e' };
	ASSERT_EQ(decode_sniff(junk, sizeof(junk)), DECODE_FORMAT_UNKNOWN);
	ASSERT_EQ(decode_probe(ctx, junk, sizeof(junk), NULL, &d, err, sizeof(err)),
		  -DMC_E_DECODE_FAILED);
	decode_ctx_free(ctx);
}

/* ---- NIfTI (headers written byte by byte) ---- */

static void put16(uint8_t *p, uint16_t v, bool be)
{
	p[be ? 1 : 0] = (uint8_t)v;
	p[be ? 0 : 1] = (uint8_t)(v >> 8);
}
static void put32(uint8_t *p, uint32_t v, bool be)
{
	for (int i = 0; i < 4; i++)
		p[be ? 3 - i : i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v, bool be)
{
	for (int i = 0; i < 8; i++)
		p[be ? 7 - i : i] = (uint8_t)(v >> (8 * i));
}
static void putf32(uint8_t *p, float f, bool be)
{
	uint32_t u;
	memcpy(&u, &f, 4);
	put32(p, u, be);
}
static void putf64(uint8_t *p, double f, bool be)
{
	uint64_t u;
	memcpy(&u, &f, 8);
	put64(p, u, be);
}

/* A NIfTI-1 (v1) or NIfTI-2 file of int16 voxels x + 10 y + 100 z (-500 for odd voxels). */
static struct bb nifti_make(int version, bool be, int nx, int ny, int nz, float slope, float inter)
{
	struct bb b = { 0 };
	size_t hsz = version == 1 ? 352 : 544;
	bb_zero(&b, hsz);
	uint8_t *h = b.p;
	if (version == 1) {
		put32(h, 348, be);
		int16_t dim[8] = { 3, (int16_t)nx, (int16_t)ny, (int16_t)nz, 1, 1, 1, 1 };
		for (int i = 0; i < 8; i++)
			put16(h + 40 + 2 * i, (uint16_t)dim[i], be);
		put16(h + 70, 4, be);
		put16(h + 72, 16, be);
		putf32(h + 108, 352.0f, be);
		putf32(h + 112, slope, be);
		putf32(h + 116, inter, be);
		memcpy(h + 344, "n+1", 4);
	} else {
		static const uint8_t magic[8] = { 'n', '+', '2', 0, '\r', '\n', 0x1a, '\n' };
		put32(h, 540, be);
		memcpy(h + 4, magic, 8);
		put16(h + 12, 4, be);
		put16(h + 14, 16, be);
		int64_t dim[8] = { 3, nx, ny, nz, 1, 1, 1, 1 };
		for (int i = 0; i < 8; i++)
			put64(h + 16 + 8 * i, (uint64_t)dim[i], be);
		put64(h + 168, 544, be);
		putf64(h + 176, slope, be);
		putf64(h + 184, inter, be);
	}
	for (int z = 0; z < nz; z++)
		for (int y = 0; y < ny; y++)
			for (int x = 0; x < nx; x++) {
				int16_t v = (int16_t)(x + 10 * y + 100 * z - ((x + y + z) % 2 ? 500 : 0));
				uint8_t t[2];
				put16(t, (uint16_t)v, be);
				bb_put(&b, t, 2);
			}
	return b;
}

static int16_t nifti_voxel(int x, int y, int z)
{
	return (int16_t)(x + 10 * y + 100 * z - ((x + y + z) % 2 ? 500 : 0));
}

TEST(nifti_versions_and_byte_orders)
{
	struct decode_ctx *ctx = new_ctx(0);
	for (int version = 1; version <= 2; version++) {
		for (int be = 0; be <= 1; be++) {
			struct bb b = nifti_make(version, be, 4, 3, 2, 0, 0);
			struct decode_desc d;
			void *out;
			ASSERT_EQ(decode_sniff(b.p, b.len), DECODE_FORMAT_NIFTI);
			ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
			ASSERT_EQ(d.dtype, DECODE_DTYPE_I16);
			ASSERT_EQ(d.frames, 2);
			ASSERT_EQ(d.channels, 1);
			ASSERT_EQ(d.height, 3);
			ASSERT_EQ(d.width, 4);
			ASSERT_EQ(d.codec, DECODE_CODEC_NIFTI);
			const int16_t *o = out;
			for (int z = 0; z < 2; z++)
				for (int y = 0; y < 3; y++)
					for (int x = 0; x < 4; x++)
						ASSERT_EQ(o[(z * 3 + y) * 4 + x], nifti_voxel(x, y, z));
			free(out);

			/* One frame (slice z = 1). */
			struct decode_opts fo = { DECODE_F_FRAME, 1, DECODE_DTYPE_NONE };
			ASSERT_EQ(decode_all(ctx, b.p, b.len, &fo, &d, &out), 0);
			ASSERT_EQ(d.frames, 1);
			ASSERT_EQ(((int16_t *)out)[0], nifti_voxel(0, 0, 1));
			free(out);
			free(b.p);
		}
	}
	decode_ctx_free(ctx);
}

TEST(nifti_scaling_and_gzip)
{
	struct decode_ctx *ctx = new_ctx(0);
	struct bb b = nifti_make(1, false, 5, 4, 3, 0.5f, -3.25f);
	struct decode_desc d;
	void *out;
	struct decode_opts lut = { DECODE_F_LUT, 0, DECODE_DTYPE_F64 };
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &lut, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_F64);
	ASSERT(d.lut_applied);
	const double *o = out;
	for (int z = 0; z < 3; z++)
		for (int y = 0; y < 4; y++)
			for (int x = 0; x < 5; x++)
				ASSERT(o[(z * 4 + y) * 5 + x] == nifti_voxel(x, y, z) * 0.5 - 3.25);
	free(out);

	/* The same through gzip (libdeflate's compressor). */
	struct libdeflate_compressor *c = libdeflate_alloc_compressor(6);
	size_t cap = libdeflate_gzip_compress_bound(c, b.len);
	uint8_t *gz = malloc(cap);
	size_t gzlen = libdeflate_gzip_compress(c, b.p, b.len, gz, cap);
	ASSERT_GT(gzlen, 0);
	struct decode_opts lut32 = { DECODE_F_LUT, 0, DECODE_DTYPE_NONE };
	ASSERT_EQ(decode_all(ctx, gz, gzlen, &lut32, &d, &out), 0);
	ASSERT_EQ(d.codec, DECODE_CODEC_NIFTI_GZ);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_F32);
	const float *f = out;
	ASSERT(f[7] == (float)(nifti_voxel(2, 1, 0) * 0.5 - 3.25));
	free(out);

	/* Trailer ISIZE lying small: the stream overruns the buffer, a clean error. */
	char err[256];
	gz[gzlen - 4] ^= 0x40;
	ASSERT_EQ(decode_probe(ctx, gz, gzlen, NULL, &d, err, sizeof(err)), -DMC_E_DECODE_FAILED);
	libdeflate_free_compressor(c);
	free(gz);
	free(b.p);
	decode_ctx_free(ctx);
}

TEST(nifti_bombs_and_truncation)
{
	char err[256];
	struct decode_desc d;
	struct decode_ctx *ctx = new_ctx(64u << 20);
	/* A 352-byte header declaring 32767^3 int16 voxels: rejected before allocation. */
	struct bb b = nifti_make(1, false, 2, 2, 2, 0, 0);
	put16(b.p + 42, 32767, false);
	put16(b.p + 44, 32767, false);
	put16(b.p + 46, 32767, false);
	double t = now_s();
	ASSERT_EQ(decode_probe(ctx, b.p, b.len, NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_LT(now_s() - t, 1.0);
	/* NIfTI-2 with 2^62 voxels along x: overflow caught. */
	struct bb b2 = nifti_make(2, false, 2, 2, 2, 0, 0);
	put64(b2.p + 24, 1ull << 62, false);
	ASSERT_EQ(decode_probe(ctx, b2.p, b2.len, NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	/* Truncated voxel data, and a bad dim[0]. */
	struct bb b3 = nifti_make(1, false, 8, 8, 8, 0, 0);
	ASSERT_EQ(decode_probe(ctx, b3.p, b3.len - 10, NULL, &d, err, sizeof(err)),
		  -DMC_E_DECODE_FAILED);
	put16(b3.p + 40, 9, false);
	ASSERT_EQ(decode_probe(ctx, b3.p, b3.len, NULL, &d, err, sizeof(err)), -DMC_E_DECODE_FAILED);

	/* A gzip bomb: 256 MiB of zeros in ~250 KB, over the 64 MiB limit. */
	size_t big = 256u << 20;
	uint8_t *zeros = calloc(1, big);
	memcpy(zeros, b.p, 352);
	struct libdeflate_compressor *c = libdeflate_alloc_compressor(1);
	size_t cap = libdeflate_gzip_compress_bound(c, big);
	uint8_t *gz = malloc(cap);
	size_t gzlen = libdeflate_gzip_compress(c, zeros, big, gz, cap);
	free(zeros);
	t = now_s();
	ASSERT_EQ(decode_probe(ctx, gz, gzlen, NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_LT(now_s() - t, 1.0);
	libdeflate_free_compressor(c);
	free(gz);
	free(b.p);
	free(b2.p);
	free(b3.p);
	decode_ctx_free(ctx);
}

/* ---- DICOM (explicit VR little endian data sets written byte by byte) ---- */

static void el(struct bb *b, uint16_t g, uint16_t e, const char *vr, const void *v, uint32_t n)
{
	bb_le16(b, g);
	bb_le16(b, e);
	bb_put(b, vr, 2);
	bool long_form = !strcmp(vr, "OB") || !strcmp(vr, "OW") || !strcmp(vr, "SQ") ||
			 !strcmp(vr, "UN") || !strcmp(vr, "UT");
	uint32_t padded = n + (n & 1);
	if (long_form) {
		bb_le16(b, 0);
		bb_le32(b, padded);
	} else {
		bb_le16(b, (uint16_t)padded);
	}
	bb_put(b, v, n);
	if (n & 1)
		bb_u8(b, !strcmp(vr, "UI") || !strcmp(vr, "OB") ? 0 : ' ');
}
static void el_str(struct bb *b, uint16_t g, uint16_t e, const char *vr, const char *s)
{
	el(b, g, e, vr, s, (uint32_t)strlen(s));
}
static void el_us(struct bb *b, uint16_t g, uint16_t e, uint16_t v)
{
	uint8_t x[2] = { (uint8_t)v, (uint8_t)(v >> 8) };
	el(b, g, e, "US", x, 2);
}
static void el_ul_as_rows(struct bb *b, uint16_t g, uint16_t e, uint32_t v)
{
	uint8_t x[4] = { (uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24) };
	el(b, g, e, "UL", x, 4);
}

/* Preamble, meta group and the image attributes, up to (not including) Pixel Data. */
static struct bb dicom_head(const char *ts, uint32_t rows, uint32_t cols, uint16_t spp,
			    uint16_t bits, uint16_t pixrep, const char *pi, const char *frames,
			    bool rows_as_ul)
{
	struct bb b = { 0 }, meta = { 0 };
	bb_zero(&b, 128);
	bb_put(&b, "DICM", 4);
	uint8_t ver[2] = { 0, 1 };
	el(&meta, 0x0002, 0x0001, "OB", ver, 2);
	el_str(&meta, 0x0002, 0x0002, "UI", "1.2.840.10008.5.1.4.1.1.7");
	el_str(&meta, 0x0002, 0x0003, "UI", "1.2.3.4.5.6.7.8");
	el_str(&meta, 0x0002, 0x0010, "UI", ts);
	uint8_t gl[4] = { (uint8_t)meta.len, (uint8_t)(meta.len >> 8), 0, 0 };
	el(&b, 0x0002, 0x0000, "UL", gl, 4);
	bb_put(&b, meta.p, meta.len);
	free(meta.p);
	el_str(&b, 0x0008, 0x0016, "UI", "1.2.840.10008.5.1.4.1.1.7");
	el_str(&b, 0x0010, 0x0010, "PN", "Doe^Jane");
	el_str(&b, 0x0010, 0x0020, "LO", "ID\"1\\2");
	el_us(&b, 0x0028, 0x0002, spp);
	el_str(&b, 0x0028, 0x0004, "CS", pi);
	if (spp > 1)
		el_us(&b, 0x0028, 0x0006, 0);
	if (frames)
		el_str(&b, 0x0028, 0x0008, "IS", frames);
	if (rows_as_ul) {
		el_ul_as_rows(&b, 0x0028, 0x0010, rows);
		el_ul_as_rows(&b, 0x0028, 0x0011, cols);
	} else {
		el_us(&b, 0x0028, 0x0010, (uint16_t)rows);
		el_us(&b, 0x0028, 0x0011, (uint16_t)cols);
	}
	el_us(&b, 0x0028, 0x0100, bits);
	el_us(&b, 0x0028, 0x0101, bits);
	el_us(&b, 0x0028, 0x0102, (uint16_t)(bits - 1));
	el_us(&b, 0x0028, 0x0103, pixrep);
	return b;
}

static void encapsulate(struct bb *b, const uint8_t *const *frags, const uint32_t *lens,
			unsigned n)
{
	bb_le16(b, 0x7fe0);
	bb_le16(b, 0x0010);
	bb_put(b, "OB", 2);
	bb_le16(b, 0);
	bb_le32(b, 0xffffffffu);
	bb_le16(b, 0xfffe); /* empty basic offset table */
	bb_le16(b, 0xe000);
	bb_le32(b, 0);
	for (unsigned i = 0; i < n; i++) {
		bb_le16(b, 0xfffe);
		bb_le16(b, 0xe000);
		bb_le32(b, lens[i] + (lens[i] & 1));
		bb_put(b, frags[i], lens[i]);
		if (lens[i] & 1)
			bb_u8(b, 0);
	}
	bb_le16(b, 0xfffe);
	bb_le16(b, 0xe0dd);
	bb_le32(b, 0);
}

TEST(dicom_native_frames_lut_meta)
{
	enum { R = 3, C = 4, F = 2 };
	struct bb b = dicom_head("1.2.840.10008.1.2.1", R, C, 1, 16, 1, "MONOCHROME2", "2", false);
	el_str(&b, 0x0028, 0x1052, "DS", "-1024");
	el_str(&b, 0x0028, 0x1053, "DS", "2.5");
	int16_t px[F * R * C];
	for (int i = 0; i < F * R * C; i++)
		px[i] = (int16_t)(i * 300 - 2000);
	el(&b, 0x7fe0, 0x0010, "OW", px, sizeof(px));

	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	void *out;
	ASSERT_EQ(decode_sniff(b.p, b.len), DECODE_FORMAT_DICOM);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.codec, DECODE_CODEC_RAW);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_I16);
	ASSERT_EQ(d.frames, F);
	ASSERT_EQ(d.height, R);
	ASSERT_EQ(d.width, C);
	ASSERT_MEM_EQ(out, px, sizeof(px));
	free(out);

	struct decode_opts o = { DECODE_F_FRAME | DECODE_F_LUT, 1, DECODE_DTYPE_NONE };
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &o, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_F32);
	ASSERT_EQ(d.frames, 1);
	for (int i = 0; i < R * C; i++)
		ASSERT(((float *)out)[i] == (float)(px[R * C + i] * 2.5 - 1024.0));
	free(out);

	/* int16 -> uint8 saturates, as documented. */
	struct decode_opts u8 = { 0, 0, DECODE_DTYPE_U8 };
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &u8, &d, &out), 0);
	ASSERT_EQ(((uint8_t *)out)[0], 0);   /* -2000 */
	ASSERT_EQ(((uint8_t *)out)[7], 100); /* 100 */
	ASSERT_EQ(((uint8_t *)out)[8], 255); /* 400 */
	free(out);

	/* Frame out of range, buffer too small. */
	char err[256];
	struct decode_opts bad = { DECODE_F_FRAME, 2, DECODE_DTYPE_NONE };
	ASSERT_EQ(decode_probe(ctx, b.p, b.len, &bad, &d, err, sizeof(err)),
		  -DMC_E_INVALID_ARGUMENT);
	uint8_t small[8];
	ASSERT_EQ(decode_run(ctx, b.p, b.len, NULL, small, sizeof(small), err, sizeof(err)),
		  -DMC_E_INVALID_ARGUMENT);

	/* Metadata: the DICOM JSON model, escaped, without pixel data. */
	char meta[65536];
	size_t mlen;
	ASSERT_EQ(decode_meta(ctx, b.p, b.len, NULL, meta, sizeof(meta), &mlen, err, sizeof(err)), 0);
	ASSERT_EQ(strlen(meta), mlen);
	json_error_t je;
	json_t *j = json_loads(meta, 0, &je);
	ASSERT_NOT_NULL(j);
	json_t *h = json_object_get(j, "header");
	ASSERT_NOT_NULL(h);
	ASSERT_EQ(json_integer_value(json_array_get(
			  json_object_get(json_object_get(h, "00280010"), "Value"), 0)),
		  R);
	ASSERT_STR_EQ(json_string_value(json_object_get(json_object_get(h, "00280010"), "vr")), "US");
	ASSERT_STR_EQ(json_string_value(json_object_get(json_array_get(json_object_get(
				  json_object_get(h, "00100010"), "Value"), 0), "Alphabetic")),
		      "Doe^Jane");
	/* LO is multi-valued: backslash splits. */
	ASSERT_STR_EQ(json_string_value(json_array_get(
			      json_object_get(json_object_get(h, "00100020"), "Value"), 1)),
		      "2");
	ASSERT(json_real_value(json_array_get(
		       json_object_get(json_object_get(h, "00281053"), "Value"), 0)) == 2.5);
	ASSERT_NULL(json_object_get(h, "7FE00010"));
	ASSERT_STR_EQ(json_string_value(json_object_get(j, "dtype")), "int16");
	json_decref(j);

	/* Truncated pixel data. */
	ASSERT_EQ(decode_probe(ctx, b.p, b.len - 6, NULL, &d, err, sizeof(err)),
		  -DMC_E_DECODE_FAILED);
	free(b.p);
	decode_ctx_free(ctx);
}

/* An int16 row with a Modality LUT Sequence (undefined lengths) of `n` descriptor entries
 * and `words` words of LUT Data, optionally next to Rescale Slope/Intercept. */
static struct bb dicom_lut(uint16_t n, int16_t first, uint16_t bits, const uint16_t *data,
			   uint32_t words, bool rescale, const int16_t *px, uint32_t npx)
{
	struct bb b = dicom_head("1.2.840.10008.1.2.1", 1, npx, 1, 16, 1, "MONOCHROME2", NULL,
				 false);
	if (rescale) {
		el_str(&b, 0x0028, 0x1052, "DS", "-1024");
		el_str(&b, 0x0028, 0x1053, "DS", "2");
	}
	bb_le16(&b, 0x0028);
	bb_le16(&b, 0x3000);
	bb_put(&b, "SQ", 2);
	bb_le16(&b, 0);
	bb_le32(&b, 0xffffffffu);
	bb_le16(&b, 0xfffe);
	bb_le16(&b, 0xe000);
	bb_le32(&b, 0xffffffffu);
	uint8_t desc[6] = { (uint8_t)n, (uint8_t)(n >> 8), (uint8_t)first,
			    (uint8_t)((uint16_t)first >> 8), (uint8_t)bits, 0 };
	el(&b, 0x0028, 0x3002, "SS", desc, 6);
	el(&b, 0x0028, 0x3006, "OW", data, words * 2);
	bb_le16(&b, 0xfffe);
	bb_le16(&b, 0xe00d);
	bb_le32(&b, 0);
	bb_le16(&b, 0xfffe);
	bb_le16(&b, 0xe0dd);
	bb_le32(&b, 0);
	el(&b, 0x7fe0, 0x0010, "OW", px, npx * 2);
	return b;
}

TEST(dicom_modality_lut_sequence)
{
	/* first mapped value -3; 32767 - (-3) does not fit int16 (pydicom wraps there). */
	static const int16_t px[] = { -5, -3, -2, -1, 0, 1, 100, 32767 };
	static const uint16_t lut[] = { 10, 20, 30, 40 };
	static const uint16_t want[] = { 10, 10, 20, 30, 40, 40, 40, 40 };
	enum { N = 8 };
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_opts o = { DECODE_F_LUT, 0, DECODE_DTYPE_NONE };
	struct decode_desc d;
	void *out;
	char err[256];

	/* The LUT wins over Rescale Slope/Intercept; uint16 from its 16 bits. */
	struct bb b = dicom_lut(4, -3, 16, lut, 4, true, px, N);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &o, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_U16);
	ASSERT_EQ(d.src_dtype, DECODE_DTYPE_I16);
	ASSERT(d.lut_applied);
	ASSERT_MEM_EQ(out, want, sizeof(want));
	free(out);
	/* An asked-for dtype converts the looked-up values. */
	struct decode_opts f64 = { DECODE_F_LUT | DECODE_F_FRAME, 0, DECODE_DTYPE_F64 };
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &f64, &d, &out), 0);
	for (int i = 0; i < N; i++)
		ASSERT(((double *)out)[i] == want[i]);
	free(out);
	/* Without DECODE_F_LUT: the stored values. */
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_I16);
	ASSERT(!d.lut_applied);
	ASSERT_MEM_EQ(out, px, sizeof(px));
	free(out);
	free(b.p);

	/* 8-bit entries keep the low byte of their word; one entry maps everything. */
	static const uint16_t one[] = { 0x1234 };
	b = dicom_lut(1, 0, 8, one, 1, false, px, N);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &o, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_U8);
	for (int i = 0; i < N; i++)
		ASSERT_EQ(((uint8_t *)out)[i], 0x34);
	free(out);
	free(b.p);

	/* 0 entries means 65536: the identity table from -32768 maps every value to itself
	 * plus 32768. */
	uint16_t *full = malloc(65536 * 2);
	ASSERT_NOT_NULL(full);
	for (uint32_t i = 0; i < 65536; i++)
		full[i] = (uint16_t)i;
	b = dicom_lut(0, INT16_MIN, 16, full, 65536, false, px, N);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &o, &d, &out), 0);
	for (int i = 0; i < N; i++)
		ASSERT_EQ(((uint16_t *)out)[i], (uint16_t)(px[i] + 32768));
	free(out);
	free(b.p);

	/* Lying descriptors: too few words (also 0 = 65536 with 4 words), bits 12. Only the
	 * LUT fails; the image decodes without it. */
	struct {
		uint16_t n, bits;
		uint32_t words;
		const char *why;
	} bad[] = { { 5, 16, 4, "shorter" }, { 0, 16, 4, "shorter" }, { 4, 12, 4, "8 or 16" } };
	for (size_t k = 0; k < sizeof(bad) / sizeof(bad[0]); k++) {
		b = dicom_lut(bad[k].n, 0, bad[k].bits, full, bad[k].words, false, px, N);
		ASSERT_EQ(decode_probe(ctx, b.p, b.len, &o, &d, err, sizeof(err)),
			  -DMC_E_DECODE_FAILED);
		ASSERT(strstr(err, bad[k].why) != NULL);
		ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
		ASSERT_MEM_EQ(out, px, sizeof(px));
		free(out);
		free(b.p);
	}
	free(full);
	decode_ctx_free(ctx);
}

TEST(dicom_size_bomb)
{
	/* Rows/Columns 65535 encoded as UL, NumberOfFrames 2^31, four bytes of pixels. */
	struct bb b = dicom_head("1.2.840.10008.1.2.1", 65535, 65535, 1, 16, 0, "MONOCHROME2",
				 "2147483648", true);
	uint8_t px[4] = { 1, 2, 3, 4 };
	el(&b, 0x7fe0, 0x0010, "OW", px, 4);
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	char err[256];
	double t = now_s();
	ASSERT_EQ(decode_probe(ctx, b.p, b.len, NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_LT(now_s() - t, 1.0);
	free(b.p);
	/* Rows beyond any US as UL: 2^20 x 2^20. */
	b = dicom_head("1.2.840.10008.1.2.1", 1u << 20, 1u << 20, 1, 8, 0, "MONOCHROME2", NULL, true);
	el(&b, 0x7fe0, 0x0010, "OB", px, 4);
	ASSERT_EQ(decode_probe(ctx, b.p, b.len, NULL, &d, err, sizeof(err)), -DMC_E_LIMIT_EXCEEDED);
	free(b.p);
	decode_ctx_free(ctx);
}

/* PackBits: the whole segment as literal runs of at most 128 bytes. */
static void packbits(struct bb *b, const uint8_t *s, size_t n)
{
	for (size_t i = 0; i < n; i += 128) {
		size_t k = n - i < 128 ? n - i : 128;
		bb_u8(b, (uint8_t)(k - 1));
		bb_put(b, s + i, k);
	}
}

TEST(dicom_rle_and_jpeg)
{
	enum { R = 5, C = 7 };
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	void *out;

	/* RLE, 16-bit RGB: 6 segments, MSB then LSB of each sample; one replicate run too. */
	uint16_t rgb[3][R * C];
	for (int c = 0; c < 3; c++)
		for (int i = 0; i < R * C; i++)
			rgb[c][i] = (uint16_t)(c * 20000 + i * 97);
	struct bb frag = { 0 };
	bb_zero(&frag, 64);
	uint32_t offs[6];
	for (int c = 0; c < 3; c++) {
		for (int byte = 0; byte < 2; byte++) {
			uint8_t seg[R * C];
			for (int i = 0; i < R * C; i++)
				seg[i] = (uint8_t)(byte == 0 ? rgb[c][i] >> 8 : rgb[c][i]);
			offs[c * 2 + byte] = (uint32_t)frag.len;
			if (c == 0 && byte == 0) {
				/* a replicate run for the first 3 bytes, literals after */
				bb_u8(&frag, (uint8_t)(int8_t)-2);
				bb_u8(&frag, seg[0]);
				seg[1] = seg[2] = seg[0];
				rgb[0][1] = (uint16_t)(seg[0] << 8 | (rgb[0][1] & 0xff));
				rgb[0][2] = (uint16_t)(seg[0] << 8 | (rgb[0][2] & 0xff));
				packbits(&frag, seg + 3, R * C - 3);
			} else {
				packbits(&frag, seg, R * C);
			}
		}
	}
	frag.p[0] = 6;
	for (int i = 0; i < 6; i++) {
		frag.p[4 + 4 * i] = (uint8_t)offs[i];
		frag.p[5 + 4 * i] = (uint8_t)(offs[i] >> 8);
	}
	struct bb b = dicom_head("1.2.840.10008.1.2.5", R, C, 3, 16, 0, "RGB", NULL, false);
	const uint8_t *fr[1] = { frag.p };
	uint32_t fl[1] = { (uint32_t)frag.len };
	encapsulate(&b, fr, fl, 1);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.codec, DECODE_CODEC_RLE);
	ASSERT_EQ(d.channels, 3);
	ASSERT_MEM_EQ(out, rgb, sizeof(rgb));
	free(out);
	free(b.p);
	free(frag.p);

	/* JPEG baseline in DICOM: same pixels as the bare JPEG through our JPEG path. */
	uint8_t px[R * C * 3];
	for (int i = 0; i < R * C * 3; i++)
		px[i] = (uint8_t)(i * 11);
	struct bb j = jpeg_encode(px, C, R, TJPF_RGB, TJSAMP_420, 90, 0);
	void *ref;
	struct decode_desc jd;
	ASSERT_EQ(decode_all(ctx, j.p, j.len, NULL, &jd, &ref), 0);
	b = dicom_head("1.2.840.10008.1.2.4.50", R, C, 3, 8, 0, "YBR_FULL_422", "2", false);
	const uint8_t *fr2[2] = { j.p, j.p };
	uint32_t fl2[2] = { (uint32_t)j.len, (uint32_t)j.len };
	encapsulate(&b, fr2, fl2, 2);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &out), 0);
	ASSERT_EQ(d.codec, DECODE_CODEC_JPEG);
	ASSERT_EQ(d.frames, 2);
	ASSERT_MEM_EQ(out, ref, jd.nbytes);
	ASSERT_MEM_EQ((uint8_t *)out + jd.nbytes, ref, jd.nbytes);
	free(out);

	/* Photometric RGB without an Adobe marker: decoded without a color transform (as
	 * pydicom does), the same whether the frame is one fragment or split in two. */
	void *one, *two;
	free(b.p);
	b = dicom_head("1.2.840.10008.1.2.4.50", R, C, 3, 8, 0, "RGB", NULL, false);
	const uint8_t *f1[1] = { j.p };
	uint32_t l1[1] = { (uint32_t)j.len };
	encapsulate(&b, f1, l1, 1);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &one), 0);
	free(b.p);
	b = dicom_head("1.2.840.10008.1.2.4.50", R, C, 3, 8, 0, "RGB", NULL, false);
	uint32_t half = (uint32_t)j.len / 2 & ~1u;
	const uint8_t *f2[2] = { j.p, j.p + half };
	uint32_t l2[2] = { half, (uint32_t)j.len - half };
	encapsulate(&b, f2, l2, 2);
	ASSERT_EQ(decode_all(ctx, b.p, b.len, NULL, &d, &two), 0);
	ASSERT_MEM_EQ(one, two, jd.nbytes);
	ASSERT(memcmp(one, ref, jd.nbytes) != 0); /* YCbCr kept as is, not converted */
	free(one);
	free(two);
	free(ref);
	free(b.p);
	free(j.p);
	decode_ctx_free(ctx);
}

/* ---- conversions and names ---- */

TEST(names_and_policy)
{
	ASSERT_STR_EQ(decode_dtype_name(DECODE_DTYPE_F32), "float32");
	ASSERT_EQ(decode_dtype_from_name("int16"), DECODE_DTYPE_I16);
	ASSERT_EQ(decode_dtype_from_name("complex64"), DECODE_DTYPE_NONE);
	ASSERT_EQ(decode_dtype_size(DECODE_DTYPE_F64), 8);
	ASSERT_STR_EQ(decode_codec_name(DECODE_CODEC_JPEG_LS), "jpeg-ls");
	ASSERT(decode_codec_store_tensor(DECODE_CODEC_JPEG_2000));
	ASSERT(!decode_codec_store_tensor(DECODE_CODEC_RAW));
	ASSERT(!decode_codec_store_tensor(DECODE_CODEC_JPEG));
	ASSERT(decode_codec_store_tensor(DECODE_CODEC_PNG));
	ASSERT(decode_codec_store_tensor(DECODE_CODEC_NIFTI_GZ));
	ASSERT(!decode_codec_store_tensor(DECODE_CODEC_RLE));
	ASSERT(!decode_codec_store_tensor(DECODE_CODEC_JPEG_EXTENDED));
}

TEST(float_to_int_rounds_and_saturates)
{
	/* A float32 NIfTI through dtype int16: round to nearest, saturate, NaN -> 0. */
	struct bb b = nifti_make(1, false, 6, 1, 1, 0, 0);
	put16(b.p + 70, 16, false);
	put16(b.p + 72, 32, false);
	float v[6] = { 1.5f, -2.5f, 40000.0f, -40000.0f, NAN, 0.49f };
	b.len = 352;
	bb_put(&b, v, sizeof(v));
	struct decode_ctx *ctx = new_ctx(0);
	struct decode_desc d;
	void *out;
	struct decode_opts o = { 0, 0, DECODE_DTYPE_I16 };
	ASSERT_EQ(decode_all(ctx, b.p, b.len, &o, &d, &out), 0);
	const int16_t *s = out;
	ASSERT_EQ(s[0], 2); /* nearest even, as nearbyint */
	ASSERT_EQ(s[1], -2);
	ASSERT_EQ(s[2], 32767);
	ASSERT_EQ(s[3], -32768);
	ASSERT_EQ(s[4], 0);
	ASSERT_EQ(s[5], 0);
	free(out);
	free(b.p);
	decode_ctx_free(ctx);
}

TEST(npy_header)
{
	char h[NPY_HEADER_MAX];
	uint64_t shape[4] = { 2, 1, 512, 512 };
	int n = npy_header(h, sizeof(h), "<i2", shape, 4);
	ASSERT_EQ(n % 64, 0);
	ASSERT_MEM_EQ(h, "\x93NUMPY\x01\x00", 8);
	ASSERT_EQ((uint8_t)h[8] | (uint8_t)h[9] << 8, n - 10);
	const char *dict = "{'descr': '<i2', 'fortran_order': False, 'shape': (2, 1, 512, 512), }";
	ASSERT_MEM_EQ(h + 10, dict, strlen(dict));
	ASSERT_EQ(h[n - 1], '\n');
	uint64_t one[1] = { 7 };
	n = npy_header(h, sizeof(h), "|u1", one, 1);
	ASSERT(strstr(h + 10, "'shape': (7,), }") != NULL);
	ASSERT_EQ(npy_header(h, sizeof(h), "<c8", one, 1), -EINVAL);
	ASSERT_EQ(npy_header(h, 32, "<i2", shape, 4), -ENOBUFS);
	ASSERT_STR_EQ(npy_descr("float32"), "<f4");
	ASSERT_STR_EQ(npy_descr("float16"), "<f2");
	ASSERT_NULL(npy_descr("bfloat16")); /* numpy has no bfloat16 */
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(png_gray8_and_rgb16), T(png_low_bit_depths), T(png_size_bomb),
		  T(jpeg_gray_rgb_progressive), T(jpeg_size_bomb), T(nifti_versions_and_byte_orders),
		  T(nifti_scaling_and_gzip), T(nifti_bombs_and_truncation),
		  T(dicom_native_frames_lut_meta), T(dicom_modality_lut_sequence),
		  T(dicom_size_bomb), T(dicom_rle_and_jpeg),
		  T(names_and_policy), T(float_to_int_rounds_and_saturates), T(npy_header));
}
