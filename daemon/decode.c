/*
 * decode: format sniffing, dispatch, generic limits, dtype and scaling conversion, metadata.
 * See decode.h. Per-format work is in decode_{jpeg,png,nifti,dicom}.c.
 */
#include "decode_priv.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

void decode_seterr(char *err, size_t errlen, const char *fmt, ...)
{
	if (!err || errlen == 0)
		return;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

void decode_limits_default(struct decode_limits *lim)
{
	lim->max_decode_bytes = DECODE_DEFAULT_MAX_DECODE_BYTES;
	lim->max_input_bytes = DECODE_DEFAULT_MAX_INPUT_BYTES;
	lim->max_dim = DECODE_DEFAULT_MAX_DIM;
	lim->max_frames = DECODE_DEFAULT_MAX_FRAMES;
	lim->max_ratio = DECODE_DEFAULT_MAX_RATIO;
	lim->max_meta_bytes = DECODE_DEFAULT_MAX_META_BYTES;
}

static const char *const format_names[] = {
	[DECODE_FORMAT_UNKNOWN] = "unknown", [DECODE_FORMAT_DICOM] = "dicom",
	[DECODE_FORMAT_JPEG] = "jpeg",       [DECODE_FORMAT_PNG] = "png",
	[DECODE_FORMAT_NIFTI] = "nifti",
};

static const char *const codec_names[] = {
	[DECODE_CODEC_NONE] = "none",
	[DECODE_CODEC_RAW] = "raw",
	[DECODE_CODEC_DEFLATE] = "deflate",
	[DECODE_CODEC_RLE] = "rle",
	[DECODE_CODEC_JPEG] = "jpeg",
	[DECODE_CODEC_JPEG_EXTENDED] = "jpeg-extended",
	[DECODE_CODEC_JPEG_LOSSLESS] = "jpeg-lossless",
	[DECODE_CODEC_JPEG_LS] = "jpeg-ls",
	[DECODE_CODEC_JPEG_2000] = "jpeg-2000",
	[DECODE_CODEC_PNG] = "png",
	[DECODE_CODEC_NIFTI] = "nifti",
	[DECODE_CODEC_NIFTI_GZ] = "nifti-gz",
	[DECODE_CODEC_HTJ2K] = "htj2k",
};

static decode_diag_fn diag_fn;

void decode_set_diag(decode_diag_fn fn)
{
	diag_fn = fn;
}

void decode_diag(const char *lib, const char *fmt, ...)
{
	if (!diag_fn)
		return;
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	size_t n = strlen(line);
	while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
		line[--n] = '\0';
	if (n)
		diag_fn(lib, line);
}

static const struct {
	const char *name;
	size_t size;
} dtypes[] = {
	[DECODE_DTYPE_NONE] = { NULL, 0 },     [DECODE_DTYPE_U8] = { "uint8", 1 },
	[DECODE_DTYPE_I8] = { "int8", 1 },     [DECODE_DTYPE_U16] = { "uint16", 2 },
	[DECODE_DTYPE_I16] = { "int16", 2 },   [DECODE_DTYPE_U32] = { "uint32", 4 },
	[DECODE_DTYPE_I32] = { "int32", 4 },   [DECODE_DTYPE_U64] = { "uint64", 8 },
	[DECODE_DTYPE_I64] = { "int64", 8 },   [DECODE_DTYPE_F32] = { "float32", 4 },
	[DECODE_DTYPE_F64] = { "float64", 8 },  [DECODE_DTYPE_F16] = { "float16", 2 },
	[DECODE_DTYPE_BF16] = { "bfloat16", 2 },
};

const char *decode_format_name(enum decode_format f)
{
	return (unsigned)f < sizeof(format_names) / sizeof(format_names[0]) ? format_names[f] : NULL;
}

const char *decode_codec_name(enum decode_codec c)
{
	return (unsigned)c < sizeof(codec_names) / sizeof(codec_names[0]) ? codec_names[c] : NULL;
}

const char *decode_dtype_name(enum decode_dtype t)
{
	return (unsigned)t <= DECODE_DTYPE_ALL_LAST_ ? dtypes[t].name : NULL;
}

size_t decode_dtype_size(enum decode_dtype t)
{
	return (unsigned)t <= DECODE_DTYPE_ALL_LAST_ ? dtypes[t].size : 0;
}

enum decode_dtype decode_dtype_from_name(const char *name)
{
	for (unsigned t = 1; t <= DECODE_DTYPE_ALL_LAST_; t++)
		if (name && strcmp(name, dtypes[t].name) == 0)
			return (enum decode_dtype)t;
	return DECODE_DTYPE_NONE;
}

bool decode_codec_store_tensor(enum decode_codec c)
{
	/* decode.h, "Caching policy": lossless codecs whose decode costs >= 2x the zstd-1
	 * decompression of their tensor. */
	switch (c) {
	case DECODE_CODEC_DEFLATE:
	case DECODE_CODEC_JPEG_LOSSLESS:
	case DECODE_CODEC_JPEG_LS:
	case DECODE_CODEC_JPEG_2000:
	case DECODE_CODEC_HTJ2K:
	case DECODE_CODEC_PNG:
	case DECODE_CODEC_NIFTI_GZ:
		return true;
	case DECODE_CODEC_NONE:
	case DECODE_CODEC_RAW:
	case DECODE_CODEC_RLE:
	case DECODE_CODEC_JPEG:
	case DECODE_CODEC_JPEG_EXTENDED:
	case DECODE_CODEC_NIFTI:
		return false;
	}
	return false;
}

int decode_mul_u64(uint64_t a, uint64_t b, uint64_t *ret)
{
	uint64_t r;
	if (__builtin_mul_overflow(a, b, &r))
		return -DMC_E_LIMIT_EXCEEDED;
	*ret = r;
	return 0;
}

void decode_swap(void *p, uint64_t n, unsigned size)
{
	uint8_t *b = p;
	switch (size) {
	case 2:
		for (uint64_t i = 0; i < n; i++) {
			uint16_t v;
			memcpy(&v, b + i * 2, 2);
			v = __builtin_bswap16(v);
			memcpy(b + i * 2, &v, 2);
		}
		break;
	case 4:
		for (uint64_t i = 0; i < n; i++) {
			uint32_t v;
			memcpy(&v, b + i * 4, 4);
			v = __builtin_bswap32(v);
			memcpy(b + i * 4, &v, 4);
		}
		break;
	case 8:
		for (uint64_t i = 0; i < n; i++) {
			uint64_t v;
			memcpy(&v, b + i * 8, 8);
			v = __builtin_bswap64(v);
			memcpy(b + i * 8, &v, 8);
		}
		break;
	default:
		break;
	}
}

int decode_buf_reserve(struct decode_ctx *ctx, struct decode_buf *b, uint64_t n, char *err,
		       size_t errlen)
{
	if (n <= b->cap)
		return 0;
	if (n > ctx->lim.max_decode_bytes + DECODE_SLACK_BYTES || n > SIZE_MAX) {
		decode_seterr(err, errlen, "decoding needs %llu bytes of memory, more than the limit",
			      (unsigned long long)n);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	/* Grow by at least half again so that a run of slightly growing items settles. */
	uint64_t want = b->cap + b->cap / 2;
	if (want < n)
		want = n;
	if (want > ctx->lim.max_decode_bytes + DECODE_SLACK_BYTES)
		want = n;
	free(b->p);
	b->p = malloc((size_t)want);
	if (!b->p) {
		b->cap = 0;
		decode_seterr(err, errlen, "out of memory (%llu bytes)", (unsigned long long)want);
		return -ENOMEM;
	}
	b->cap = (size_t)want;
	return 0;
}

static void buf_free(struct decode_buf *b)
{
	free(b->p);
	b->p = NULL;
	b->cap = 0;
}

struct decode_ctx *decode_ctx_new(const struct decode_limits *lim)
{
	struct decode_ctx *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return NULL;
	decode_limits_default(&ctx->lim);
	if (lim) {
		if (lim->max_decode_bytes)
			ctx->lim.max_decode_bytes = lim->max_decode_bytes;
		if (lim->max_input_bytes)
			ctx->lim.max_input_bytes = lim->max_input_bytes;
		if (lim->max_dim)
			ctx->lim.max_dim = lim->max_dim;
		if (lim->max_frames)
			ctx->lim.max_frames = lim->max_frames;
		if (lim->max_ratio)
			ctx->lim.max_ratio = lim->max_ratio;
		if (lim->max_meta_bytes)
			ctx->lim.max_meta_bytes = lim->max_meta_bytes;
	}
	return ctx;
}

static void release_probe(struct decode_ctx *ctx)
{
	if (ctx->probed && ctx->src.format == DECODE_FORMAT_PNG)
		png_release(&ctx->src);
	/* the next input may sit at the same address with the same length (a worker's
	 * region): the DICOM parse keyed by pointer and length must not outlive the probe */
	if (ctx->gdcm)
		gdcm_shim_unload(ctx->gdcm);
	ctx->probed = false;
}

void decode_ctx_free(struct decode_ctx *ctx)
{
	if (!ctx)
		return;
	release_probe(ctx);
	buf_free(&ctx->work);
	buf_free(&ctx->work2);
	buf_free(&ctx->conv);
	buf_free(&ctx->infl);
	buf_free(&ctx->jfix);
	if (ctx->tj && ctx->free_tj)
		ctx->free_tj(ctx->tj);
	if (ctx->inflater && ctx->free_inflater)
		ctx->free_inflater(ctx->inflater);
	gdcm_shim_free(ctx->gdcm);
	free(ctx);
}

void decode_ctx_trim(struct decode_ctx *ctx, size_t keep)
{
	/* The probe state may point into work (an inflated .nii.gz): forget it. */
	release_probe(ctx);
	if (ctx->work.cap > keep)
		buf_free(&ctx->work);
	if (ctx->work2.cap > keep)
		buf_free(&ctx->work2);
	if (ctx->conv.cap > keep)
		buf_free(&ctx->conv);
	if (ctx->infl.cap > keep)
		buf_free(&ctx->infl);
	if (ctx->jfix.cap > keep)
		buf_free(&ctx->jfix);
}

const struct decode_limits *decode_ctx_limits(const struct decode_ctx *ctx)
{
	return &ctx->lim;
}

static bool is_dicom_start(const uint8_t *p, size_t len)
{
	/* A data set without the 128-byte preamble: the first tag is in group 0002 or 0008,
	 * little or big endian, followed by an explicit VR or a 32-bit implicit length. */
	if (len < 8)
		return false;
	bool le = (p[0] == 0x02 || p[0] == 0x08) && p[1] == 0x00;
	bool be = p[0] == 0x00 && (p[1] == 0x02 || p[1] == 0x08);
	if (!le && !be)
		return false;
	bool vr = p[4] >= 'A' && p[4] <= 'Z' && p[5] >= 'A' && p[5] <= 'Z';
	uint32_t implicit_len = le ? rd_le32(p + 4) : rd_be32(p + 4);
	return vr || implicit_len < (1u << 16);
}

enum decode_format decode_sniff(const void *in, size_t len)
{
	const uint8_t *p = in;
	static const uint8_t png_sig[8] = { 0x89, 'P', 'N', 'G', 0x0d, 0x0a, 0x1a, 0x0a };
	if (!p)
		return DECODE_FORMAT_UNKNOWN;
	if (len >= 8 && memcmp(p, png_sig, 8) == 0)
		return DECODE_FORMAT_PNG;
	if (len >= 3 && p[0] == 0xff && p[1] == 0xd8 && p[2] == 0xff)
		return DECODE_FORMAT_JPEG;
	if (len >= 3 && p[0] == 0x1f && p[1] == 0x8b && p[2] == 0x08)
		return DECODE_FORMAT_NIFTI; /* gzip: only .nii.gz is expected gzipped */
	if (nifti_sniff(p, len))
		return DECODE_FORMAT_NIFTI;
	if (len >= 132 && memcmp(p + 128, "DICM", 4) == 0)
		return DECODE_FORMAT_DICOM;
	if (is_dicom_start(p, len))
		return DECODE_FORMAT_DICOM;
	return DECODE_FORMAT_UNKNOWN;
}

static bool opts_equal(const struct decode_opts *a, const struct decode_opts *b)
{
	return a->flags == b->flags && a->frame == b->frame && a->dtype == b->dtype;
}

static int check_shape(struct decode_ctx *ctx, const struct decode_src *s, uint64_t *ret_bytes,
		       char *err, size_t errlen)
{
	const struct decode_limits *lim = &ctx->lim;
	if (s->frames == 0 || s->channels == 0 || s->height == 0 || s->width == 0) {
		decode_seterr(err, errlen, "empty image (%u x %u x %u x %u)", s->frames, s->channels,
			      s->height, s->width);
		return -DMC_E_DECODE_FAILED;
	}
	if (s->height > lim->max_dim || s->width > lim->max_dim) {
		decode_seterr(err, errlen, "image of %u x %u pixels exceeds the limit of %u",
			      s->width, s->height, lim->max_dim);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	if (s->frames > lim->max_frames) {
		decode_seterr(err, errlen, "%u frames exceed the limit of %u", s->frames,
			      lim->max_frames);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	uint64_t n = s->frames, b;
	if (decode_mul_u64(n, s->channels, &n) || decode_mul_u64(n, s->height, &n) ||
	    decode_mul_u64(n, s->width, &n) || decode_mul_u64(n, decode_dtype_size(s->dtype), &b) ||
	    b > lim->max_decode_bytes) {
		decode_seterr(err, errlen,
			      "decoded size %u x %u x %u x %u x %zu bytes exceeds max_decode_bytes %llu",
			      s->frames, s->channels, s->height, s->width,
			      decode_dtype_size(s->dtype), (unsigned long long)lim->max_decode_bytes);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	if (s->encoded_bytes > 0) {
		uint64_t allowed;
		if (!decode_mul_u64(s->encoded_bytes, lim->max_ratio, &allowed) && b > allowed) {
			decode_seterr(err, errlen,
				      "%llu encoded bytes declare %llu decoded bytes: ratio over %u",
				      (unsigned long long)s->encoded_bytes, (unsigned long long)b,
				      lim->max_ratio);
			return -DMC_E_LIMIT_EXCEEDED;
		}
	}
	if (s->work_bytes > lim->max_decode_bytes + DECODE_SLACK_BYTES) {
		decode_seterr(err, errlen, "decoding needs %llu bytes of scratch, over the limit",
			      (unsigned long long)s->work_bytes);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	*ret_bytes = b;
	return 0;
}

int decode_probe(struct decode_ctx *ctx, const void *in, size_t len, const struct decode_opts *opts,
		 struct decode_desc *ret_desc, char *err, size_t errlen)
{
	static const struct decode_opts no_opts = { 0, 0, DECODE_DTYPE_NONE };
	struct decode_src src;
	struct decode_desc d;
	uint64_t src_bytes;
	int r;

	if (err && errlen)
		err[0] = '\0';
	if (!opts)
		opts = &no_opts;
	release_probe(ctx);
	if ((unsigned)opts->dtype > DECODE_DTYPE_LAST_) {
		decode_seterr(err, errlen, "unknown output dtype %u", (unsigned)opts->dtype);
		return -DMC_E_INVALID_ARGUMENT;
	}
	if (opts->flags & ~(uint32_t)(DECODE_F_FRAME | DECODE_F_LUT)) {
		decode_seterr(err, errlen, "unknown decode flags 0x%x", opts->flags);
		return -DMC_E_INVALID_ARGUMENT;
	}
	if (!in || len == 0) {
		decode_seterr(err, errlen, "empty input");
		return -DMC_E_DECODE_FAILED;
	}
	if ((uint64_t)len > ctx->lim.max_input_bytes) {
		decode_seterr(err, errlen, "input of %zu bytes exceeds max_input_bytes %llu", len,
			      (unsigned long long)ctx->lim.max_input_bytes);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	memset(&src, 0, sizeof(src));
	src.slope = 1.0;
	enum decode_format f = decode_sniff(in, len);
	switch (f) {
	case DECODE_FORMAT_JPEG:
		r = jpeg_probe(ctx, in, len, &src, err, errlen);
		break;
	case DECODE_FORMAT_PNG:
		r = png_probe(ctx, in, len, &src, err, errlen);
		break;
	case DECODE_FORMAT_NIFTI:
		r = nifti_probe(ctx, in, len, &src, err, errlen);
		break;
	case DECODE_FORMAT_DICOM:
		r = dicom_probe(ctx, in, len, &src, err, errlen);
		break;
	case DECODE_FORMAT_UNKNOWN:
	default:
		decode_seterr(err, errlen, "unknown format: not DICOM, JPEG, PNG or NIfTI");
		return -DMC_E_DECODE_FAILED;
	}
	if (r < 0)
		goto fail;
	src.format = f;
	r = check_shape(ctx, &src, &src_bytes, err, errlen);
	if (r < 0)
		goto fail;

	memset(&d, 0, sizeof(d));
	d.format = f;
	d.codec = src.codec;
	d.src_dtype = src.dtype;
	d.src_frames = src.frames;
	d.channels = src.channels;
	d.height = src.height;
	d.width = src.width;
	d.slope = src.slope;
	d.intercept = src.intercept;
	d.frames = src.frames;
	if (opts->flags & DECODE_F_FRAME) {
		if (opts->frame >= src.frames) {
			decode_seterr(err, errlen, "frame %u out of range: the item has %u frames",
				      opts->frame, src.frames);
			r = -DMC_E_INVALID_ARGUMENT;
			goto fail;
		}
		d.frames = 1;
	}
	bool lut_seq = (opts->flags & DECODE_F_LUT) && src.has_lut;
	if (lut_seq && src.lut_problem) {
		decode_seterr(err, errlen, "%s", src.lut_problem);
		r = -DMC_E_DECODE_FAILED;
		goto fail;
	}
	d.lut_applied = (opts->flags & DECODE_F_LUT) && (src.has_scaling || src.has_lut);
	/* A LUT sequence gives its entries' type (pydicom: uint8/uint16), scaling float32. */
	d.dtype = opts->dtype != DECODE_DTYPE_NONE ? opts->dtype
		  : lut_seq			  ? src.lut_dtype
		  : (opts->flags & DECODE_F_LUT)  ? DECODE_DTYPE_F32
						  : src.dtype;
	uint64_t n = d.frames;
	n *= d.channels; /* each factor was checked above: no overflow */
	n *= d.height;
	n *= d.width;
	if (decode_mul_u64(n, decode_dtype_size(d.dtype), &d.nbytes) ||
	    d.nbytes > ctx->lim.max_decode_bytes) {
		decode_seterr(err, errlen, "output of %llu elements as %s exceeds max_decode_bytes",
			      (unsigned long long)n, decode_dtype_name(d.dtype));
		r = -DMC_E_LIMIT_EXCEEDED;
		goto fail;
	}

	ctx->src = src;
	ctx->desc = d;
	ctx->in = in;
	ctx->in_len = len;
	ctx->opts = *opts;
	ctx->probed = true;
	*ret_desc = d;
	return 0;
fail:
	if (f == DECODE_FORMAT_PNG)
		png_release(&src);
	return r;
}

/* ---- conversion ---- */

#define CHUNK 1024

static void load_f64(const uint8_t *s, enum decode_dtype t, size_t n, double *d)
{
	switch (t) {
#define L(T, C)                                                                                   \
	case T:                                                                                    \
		for (size_t i = 0; i < n; i++) {                                                   \
			C v;                                                                       \
			memcpy(&v, s + i * sizeof(C), sizeof(C));                                  \
			d[i] = (double)v;                                                          \
		}                                                                                  \
		break;
		L(DECODE_DTYPE_U8, uint8_t)
		L(DECODE_DTYPE_I8, int8_t)
		L(DECODE_DTYPE_U16, uint16_t)
		L(DECODE_DTYPE_I16, int16_t)
		L(DECODE_DTYPE_U32, uint32_t)
		L(DECODE_DTYPE_I32, int32_t)
		L(DECODE_DTYPE_U64, uint64_t)
		L(DECODE_DTYPE_I64, int64_t)
		L(DECODE_DTYPE_F32, float)
		L(DECODE_DTYPE_F64, double)
#undef L
	case DECODE_DTYPE_NONE:
	case DECODE_DTYPE_F16: /* never a decoder's (policy.c) */
	case DECODE_DTYPE_BF16:
		break;
	}
}

/* Round to nearest and saturate into [lo, hi]; NaN becomes 0. */
static inline double sat(double v, double lo, double hi)
{
	if (isnan(v))
		return 0;
	v = nearbyint(v);
	return v < lo ? lo : v > hi ? hi : v;
}

static void store_f64(const double *s, size_t n, uint8_t *d, enum decode_dtype t)
{
	switch (t) {
#define S(T, C, LO, HI)                                                                           \
	case T:                                                                                    \
		for (size_t i = 0; i < n; i++) {                                                   \
			C v = (C)sat(s[i], LO, HI);                                                \
			memcpy(d + i * sizeof(C), &v, sizeof(C));                                  \
		}                                                                                  \
		break;
		S(DECODE_DTYPE_U8, uint8_t, 0, 255)
		S(DECODE_DTYPE_I8, int8_t, -128, 127)
		S(DECODE_DTYPE_U16, uint16_t, 0, 65535)
		S(DECODE_DTYPE_I16, int16_t, -32768, 32767)
		S(DECODE_DTYPE_U32, uint32_t, 0, 4294967295.0)
		S(DECODE_DTYPE_I32, int32_t, -2147483648.0, 2147483647.0)
		/* The largest doubles below 2^64 and 2^63: the casts stay defined. */
		S(DECODE_DTYPE_U64, uint64_t, 0, 18446744073709549568.0)
		S(DECODE_DTYPE_I64, int64_t, -9223372036854775808.0, 9223372036854774784.0)
#undef S
	case DECODE_DTYPE_F32:
		for (size_t i = 0; i < n; i++) {
			float v = (float)s[i];
			memcpy(d + i * 4, &v, 4);
		}
		break;
	case DECODE_DTYPE_F64:
		memcpy(d, s, n * 8);
		break;
	case DECODE_DTYPE_NONE:
	case DECODE_DTYPE_F16: /* never a decoder's (policy.c) */
	case DECODE_DTYPE_BF16:
		break;
	}
}

static bool is_int(enum decode_dtype t)
{
	return t != DECODE_DTYPE_F32 && t != DECODE_DTYPE_F64 && t != DECODE_DTYPE_NONE;
}

/* Integer to integer without scaling: exact through 128 bits, saturating. */
static void convert_int(const uint8_t *s, enum decode_dtype st, size_t n, uint8_t *d,
			enum decode_dtype dt)
{
	for (size_t i = 0; i < n; i++) {
		__int128 v = 0;
		switch (st) {
#define L(T, C)                                                                                   \
	case T: {                                                                                  \
		C x;                                                                               \
		memcpy(&x, s + i * sizeof(C), sizeof(C));                                          \
		v = x;                                                                             \
		break;                                                                             \
	}
			L(DECODE_DTYPE_U8, uint8_t)
			L(DECODE_DTYPE_I8, int8_t)
			L(DECODE_DTYPE_U16, uint16_t)
			L(DECODE_DTYPE_I16, int16_t)
			L(DECODE_DTYPE_U32, uint32_t)
			L(DECODE_DTYPE_I32, int32_t)
			L(DECODE_DTYPE_U64, uint64_t)
			L(DECODE_DTYPE_I64, int64_t)
#undef L
		default:
			break;
		}
		switch (dt) {
#define S(T, C, LO, HI)                                                                           \
	case T: {                                                                                  \
		C x = (C)(v < (__int128)(LO) ? (LO) : v > (__int128)(HI) ? (HI) : v);              \
		memcpy(d + i * sizeof(C), &x, sizeof(C));                                          \
		break;                                                                             \
	}
			S(DECODE_DTYPE_U8, uint8_t, 0, UINT8_MAX)
			S(DECODE_DTYPE_I8, int8_t, INT8_MIN, INT8_MAX)
			S(DECODE_DTYPE_U16, uint16_t, 0, UINT16_MAX)
			S(DECODE_DTYPE_I16, int16_t, INT16_MIN, INT16_MAX)
			S(DECODE_DTYPE_U32, uint32_t, 0, UINT32_MAX)
			S(DECODE_DTYPE_I32, int32_t, INT32_MIN, INT32_MAX)
			S(DECODE_DTYPE_U64, uint64_t, 0, UINT64_MAX)
			S(DECODE_DTYPE_I64, int64_t, INT64_MIN, INT64_MAX)
#undef S
		default:
			break;
		}
	}
}

/*
 * Converts n elements. With scaling: v * slope + intercept in double, each step skipped when
 * it is the identity, as nibabel's apply_read_scaling and pydicom's apply_modality_lut do
 * (both compute in float64, also for float32 data).
 */
static void convert(const uint8_t *s, enum decode_dtype st, size_t n, uint8_t *d,
		    enum decode_dtype dt, bool scale, double slope, double inter)
{
	if (!scale && is_int(st) && is_int(dt)) {
		convert_int(s, st, n, d, dt);
		return;
	}
	double buf[CHUNK];
	size_t ss = decode_dtype_size(st), ds = decode_dtype_size(dt);
	for (size_t off = 0; off < n; off += CHUNK) {
		size_t k = n - off < CHUNK ? n - off : CHUNK;
		load_f64(s + off * ss, st, k, buf);
		if (scale && slope != 1.0)
			for (size_t i = 0; i < k; i++)
				buf[i] = buf[i] * slope;
		if (scale && inter != 0.0)
			for (size_t i = 0; i < k; i++)
				buf[i] = buf[i] + inter;
		store_f64(buf, k, d + off * ds, dt);
	}
}

/*
 * The modality LUT of a DICOM LUT Sequence over n integer elements, as pydicom's
 * apply_modality_lut: values below the first mapped value take the first entry, values past
 * the last entry the last one. Entries of an 8-bit LUT keep their low byte (numpy's uint8
 * cast of the 16-bit words). Then into dt.
 */
static void apply_lut(const uint8_t *s, enum decode_dtype st, size_t n, uint8_t *d,
		      enum decode_dtype dt, const struct decode_src *src)
{
	double v[CHUNK];
	uint16_t m[CHUNK];
	const uint16_t mask = src->lut_dtype == DECODE_DTYPE_U8 ? 0xff : 0xffff;
	const double first = src->lut_first, last = (double)src->lut_entries - 1;
	size_t ss = decode_dtype_size(st), ds = decode_dtype_size(dt);
	for (size_t off = 0; off < n; off += CHUNK) {
		size_t k = n - off < CHUNK ? n - off : CHUNK;
		load_f64(s + off * ss, st, k, v); /* integers of at most 32 bits: exact */
		for (size_t i = 0; i < k; i++) {
			double x = v[i] - first;
			size_t idx = x <= 0 ? 0 : x >= last ? (size_t)last : (size_t)x;
			m[i] = src->lut[idx] & mask;
		}
		convert((const uint8_t *)m, DECODE_DTYPE_U16, k, d + off * ds, dt, false, 1, 0);
	}
}

int decode_run(struct decode_ctx *ctx, const void *in, size_t len, const struct decode_opts *opts,
	       void *out, size_t out_len, char *err, size_t errlen)
{
	static const struct decode_opts no_opts = { 0, 0, DECODE_DTYPE_NONE };
	struct decode_desc d;
	int r;

	if (!opts)
		opts = &no_opts;
	if (!ctx->probed || ctx->in != in || ctx->in_len != len || !opts_equal(&ctx->opts, opts)) {
		r = decode_probe(ctx, in, len, opts, &d, err, errlen);
		if (r < 0)
			return r;
	}
	d = ctx->desc;
	if (!out || out_len < d.nbytes) {
		decode_seterr(err, errlen, "output buffer of %zu bytes, %llu needed", out_len,
			      (unsigned long long)d.nbytes);
		release_probe(ctx);
		return -DMC_E_INVALID_ARGUMENT;
	}
	struct decode_src *src = &ctx->src;
	uint32_t first = (opts->flags & DECODE_F_FRAME) ? opts->frame : 0;
	uint64_t nelem = (uint64_t)d.frames * d.channels * d.height * d.width;
	bool need_conv = d.dtype != src->dtype || d.lut_applied;
	void *dst = out;
	if (need_conv) {
		r = decode_buf_reserve(ctx, &ctx->conv, nelem * decode_dtype_size(src->dtype), err,
				       errlen);
		if (r < 0)
			goto out;
		dst = ctx->conv.p;
	}
	switch (src->format) {
	case DECODE_FORMAT_JPEG:
		r = jpeg_decode(ctx, in, len, src, first, d.frames, dst, err, errlen);
		break;
	case DECODE_FORMAT_PNG:
		r = png_decode(ctx, in, len, src, first, d.frames, dst, err, errlen);
		break;
	case DECODE_FORMAT_NIFTI:
		r = nifti_decode(ctx, in, len, src, first, d.frames, dst, err, errlen);
		break;
	case DECODE_FORMAT_DICOM:
		r = dicom_decode(ctx, in, len, src, first, d.frames, dst, err, errlen);
		break;
	default:
		r = -DMC_E_INTERNAL;
		break;
	}
	if (r < 0)
		goto out;
	if (need_conv && d.lut_applied && src->has_lut)
		apply_lut(dst, src->dtype, (size_t)nelem, out, d.dtype, src);
	else if (need_conv)
		convert(dst, src->dtype, (size_t)nelem, out, d.dtype, d.lut_applied, src->slope,
			src->intercept);
	r = 0;
out:
	/* One run per probe: PNG contexts decode once, and a stale probe must not linger. */
	release_probe(ctx);
	return r;
}

/* ---- metadata ---- */

int decode_meta(struct decode_ctx *ctx, const void *in, size_t len, const struct decode_opts *opts,
		char *out, size_t cap, size_t *ret_len, char *err, size_t errlen)
{
	static const struct decode_opts no_opts = { 0, 0, DECODE_DTYPE_NONE };
	struct decode_desc d;
	json_t *root = NULL, *hdr = NULL;
	int r;
	if (!opts)
		opts = &no_opts;
	/* Reuse a probe of the same input (then decode_run() reuses it too). */
	if (!ctx->probed || ctx->in != in || ctx->in_len != len || !opts_equal(&ctx->opts, opts)) {
		r = decode_probe(ctx, in, len, opts, &d, err, errlen);
		if (r < 0)
			return r;
	}
	d = ctx->desc;
	size_t limit = ctx->lim.max_meta_bytes;
	root = json_object();
	if (!root) {
		r = -ENOMEM;
		goto out;
	}
	json_t *shape = json_pack("[IIII]", (json_int_t)d.frames, (json_int_t)d.channels,
				  (json_int_t)d.height, (json_int_t)d.width);
	json_object_set_new(root, "format", json_string(decode_format_name(d.format)));
	json_object_set_new(root, "codec", json_string(decode_codec_name(d.codec)));
	json_object_set_new(root, "dtype", json_string(decode_dtype_name(d.dtype)));
	json_object_set_new(root, "src_dtype", json_string(decode_dtype_name(d.src_dtype)));
	json_object_set_new(root, "shape", shape);
	json_object_set_new(root, "frames", json_integer(d.src_frames));
	json_object_set_new(root, "slope", json_real(d.slope));
	json_object_set_new(root, "intercept", json_real(d.intercept));
	json_object_set_new(root, "lut_applied", json_boolean(d.lut_applied));

	switch (d.format) {
	case DECODE_FORMAT_DICOM: {
		const char *text;
		size_t tlen;
		r = dicom_meta(ctx, in, len, &text, &tlen, err, errlen);
		if (r < 0)
			goto out;
		json_error_t jerr;
		hdr = json_loadb(text, tlen, JSON_DECODE_ANY, &jerr);
		if (!hdr) {
			decode_seterr(err, errlen, "DICOM header JSON invalid: %s", jerr.text);
			r = -DMC_E_INTERNAL;
			goto out;
		}
		break;
	}
	case DECODE_FORMAT_NIFTI:
		hdr = json_object();
		r = hdr ? nifti_meta(ctx, &ctx->src, hdr) : -ENOMEM;
		break;
	case DECODE_FORMAT_PNG:
		hdr = json_object();
		r = hdr ? png_meta(ctx, &ctx->src, hdr) : -ENOMEM;
		break;
	case DECODE_FORMAT_JPEG:
		hdr = json_object();
		r = hdr ? jpeg_meta(ctx, &ctx->src, hdr) : -ENOMEM;
		break;
	default:
		r = -DMC_E_INTERNAL;
		break;
	}
	if (r < 0)
		goto out;
	json_object_set_new(root, "header", hdr);
	hdr = NULL;
	size_t need = json_dumpb(root, NULL, 0, JSON_COMPACT | JSON_REAL_PRECISION(17));
	if (need == 0) {
		r = -ENOMEM;
		goto out;
	}
	if (need + 1 > limit + 4096) {
		decode_seterr(err, errlen, "metadata of %zu bytes exceeds max_meta_bytes", need);
		r = -DMC_E_LIMIT_EXCEEDED;
		goto out;
	}
	if (need + 1 > cap) {
		decode_seterr(err, errlen, "metadata needs %zu bytes, buffer has %zu", need + 1, cap);
		r = -ENOBUFS;
		goto out;
	}
	json_dumpb(root, out, cap, JSON_COMPACT | JSON_REAL_PRECISION(17));
	out[need] = '\0';
	*ret_len = need;
	r = 0;
out:
	json_decref(hdr);
	json_decref(root);
	if (r < 0)
		release_probe(ctx);
	return r;
}
