/*
 * decode_nifti: NIfTI-1 (348-byte header) and NIfTI-2 (540-byte header) single files, either
 * byte order, plain or gzip-compressed (libdeflate; the only file that includes it).
 *
 * Our own strict parser: nifti_clib trusts dim[] and can be made to allocate ~18 GB from a
 * 377-byte file (docs/reliability.md X2). Every dimension is checked with 64-bit arithmetic
 * against the limits before anything is allocated.
 *
 * .nii.gz: the gzip trailer's ISIZE (size mod 2^32) is checked against max_decode_bytes
 * before inflating, and the output buffer is exactly that size, so a stream that inflates to
 * more than it declares fails as soon as it passes the declared size: memory never exceeds
 * the cap, whatever the trailer claims. Only single-member gzip files are accepted.
 *
 * Layout: nibabel's array is (x, y, z, t, ...) in Fortran order; the Datamint client
 * transposes it to (z, y, x) and adds a channel axis. In memory that is the file's voxel
 * order unchanged: frame f = z + Z * (t + T * ...) is the f-th slice of Y rows of X voxels.
 */
#include "decode_priv.h"

#include <errno.h>
#include <math.h>
#include <string.h>

#include <jansson.h>
#include <libdeflate.h>

#define NII1_HDR 348u
#define NII2_HDR 540u

static const uint8_t nii2_magic[8] = { 'n', '+', '2', 0, '\r', '\n', 0x1a, '\n' };

bool nifti_sniff(const uint8_t *in, size_t len)
{
	if (len >= NII1_HDR && (rd_le32(in) == NII1_HDR || rd_be32(in) == NII1_HDR) &&
	    (memcmp(in + 344, "n+1", 4) == 0 || memcmp(in + 344, "ni1", 4) == 0))
		return true;
	if (len >= NII2_HDR && (rd_le32(in) == NII2_HDR || rd_be32(in) == NII2_HDR) &&
	    (memcmp(in + 4, nii2_magic, 8) == 0 || memcmp(in + 4, "ni2", 4) == 0))
		return true;
	return false;
}

/* Field readers in the file's byte order. */
static uint16_t f_u16(const struct nifti_state *s, size_t off)
{
	return s->swap ? rd_be16(s->hdr + off) : rd_le16(s->hdr + off);
}
static uint32_t f_u32(const struct nifti_state *s, size_t off)
{
	return s->swap ? rd_be32(s->hdr + off) : rd_le32(s->hdr + off);
}
static uint64_t f_u64(const struct nifti_state *s, size_t off)
{
	uint64_t lo = f_u32(s, off + (s->swap ? 4 : 0)), hi = f_u32(s, off + (s->swap ? 0 : 4));
	return hi << 32 | lo;
}
static int16_t f_i16(const struct nifti_state *s, size_t off) { return (int16_t)f_u16(s, off); }
static int32_t f_i32(const struct nifti_state *s, size_t off) { return (int32_t)f_u32(s, off); }
static int64_t f_i64(const struct nifti_state *s, size_t off) { return (int64_t)f_u64(s, off); }
static float f_f32(const struct nifti_state *s, size_t off)
{
	uint32_t u = f_u32(s, off);
	float f;
	memcpy(&f, &u, 4);
	return f;
}
static double f_f64(const struct nifti_state *s, size_t off)
{
	uint64_t u = f_u64(s, off);
	double d;
	memcpy(&d, &u, 8);
	return d;
}

static int dtype_of(int16_t code, enum decode_dtype *ret, uint32_t *ret_c, uint32_t *ret_size)
{
	*ret_c = 1;
	switch (code) {
	case 2:    *ret = DECODE_DTYPE_U8;  *ret_size = 1; return 0;
	case 4:    *ret = DECODE_DTYPE_I16; *ret_size = 2; return 0;
	case 8:    *ret = DECODE_DTYPE_I32; *ret_size = 4; return 0;
	case 16:   *ret = DECODE_DTYPE_F32; *ret_size = 4; return 0;
	case 64:   *ret = DECODE_DTYPE_F64; *ret_size = 8; return 0;
	case 256:  *ret = DECODE_DTYPE_I8;  *ret_size = 1; return 0;
	case 512:  *ret = DECODE_DTYPE_U16; *ret_size = 2; return 0;
	case 768:  *ret = DECODE_DTYPE_U32; *ret_size = 4; return 0;
	case 1024: *ret = DECODE_DTYPE_I64; *ret_size = 8; return 0;
	case 1280: *ret = DECODE_DTYPE_U64; *ret_size = 8; return 0;
	case 128:  *ret = DECODE_DTYPE_U8;  *ret_size = 1; *ret_c = 3; return 0; /* RGB24 */
	case 2304: *ret = DECODE_DTYPE_U8;  *ret_size = 1; *ret_c = 4; return 0; /* RGBA32 */
	default:
		return -1; /* complex, float128, binary */
	}
}

static void free_inflater(void *p)
{
	libdeflate_free_decompressor(p);
}

static int get_inflater(struct decode_ctx *ctx, char *err, size_t errlen)
{
	if (!ctx->inflater) {
		ctx->inflater = libdeflate_alloc_decompressor();
		if (!ctx->inflater) {
			decode_seterr(err, errlen, "out of memory");
			return -ENOMEM;
		}
		ctx->free_inflater = free_inflater;
	}
	return 0;
}

int inflate_raw(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_buf *out,
		size_t prefix, size_t *ret_len, char *err, size_t errlen)
{
	uint64_t cap = ctx->lim.max_decode_bytes + DECODE_SLACK_BYTES;
	uint64_t size = (uint64_t)len * 4 < (1u << 20) ? (1u << 20) : (uint64_t)len * 4;
	int r = get_inflater(ctx, err, errlen);
	if (r < 0)
		return r;
	/* The inflated size is not recorded anywhere: grow geometrically up to the cap. */
	for (;;) {
		if (size > cap)
			size = cap;
		r = decode_buf_reserve(ctx, out, prefix + size, err, errlen);
		if (r < 0)
			return r;
		size_t in_used = 0, out_len = 0;
		enum libdeflate_result lr = libdeflate_deflate_decompress_ex(
			ctx->inflater, in, len, (uint8_t *)out->p + prefix, (size_t)size, &in_used,
			&out_len);
		if (lr == LIBDEFLATE_SUCCESS) {
			*ret_len = out_len;
			return 0;
		}
		if (lr != LIBDEFLATE_INSUFFICIENT_SPACE) {
			decode_seterr(err, errlen, "deflate: corrupt or truncated compressed data");
			return -DMC_E_DECODE_FAILED;
		}
		if (size >= cap) {
			decode_seterr(err, errlen, "deflate: data inflates beyond max_decode_bytes");
			return -DMC_E_LIMIT_EXCEEDED;
		}
		size *= 2;
	}
}

static int inflate_gz(struct decode_ctx *ctx, const uint8_t *in, size_t len, const uint8_t **ret_p,
		      size_t *ret_n, char *err, size_t errlen)
{
	if (len < 18) {
		decode_seterr(err, errlen, "gzip: truncated");
		return -DMC_E_DECODE_FAILED;
	}
	uint64_t isize = rd_le32(in + len - 4);
	uint64_t cap = ctx->lim.max_decode_bytes + DECODE_SLACK_BYTES;
	uint64_t allowed;
	if (isize > cap) {
		decode_seterr(err, errlen, "gzip stream declares %llu bytes, more than max_decode_bytes",
			      (unsigned long long)isize);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	if (!decode_mul_u64(len, ctx->lim.max_ratio, &allowed) && isize > allowed) {
		decode_seterr(err, errlen, "gzip stream declares a ratio over %u", ctx->lim.max_ratio);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	int gr = get_inflater(ctx, err, errlen);
	if (gr < 0)
		return gr;
	/* ISIZE is the size mod 2^32: above 4 GiB of cap, try each size it may stand for. */
	for (uint64_t size = isize; size <= cap; size += (1ull << 32)) {
		size_t in_used = 0, out_len = 0;
		int r = decode_buf_reserve(ctx, &ctx->work, size ? size : 1, err, errlen);
		if (r < 0)
			return r;
		enum libdeflate_result lr = libdeflate_gzip_decompress_ex(
			ctx->inflater, in, len, ctx->work.p, (size_t)size, &in_used, &out_len);
		if (lr == LIBDEFLATE_SUCCESS) {
			if (in_used != len) {
				decode_seterr(err, errlen,
					      "gzip: data after the first member (multi-member files are not supported)");
				return -DMC_E_DECODE_FAILED;
			}
			*ret_p = ctx->work.p;
			*ret_n = out_len;
			return 0;
		}
		if (lr != LIBDEFLATE_INSUFFICIENT_SPACE) {
			decode_seterr(err, errlen, "gzip: corrupt compressed data");
			return -DMC_E_DECODE_FAILED;
		}
	}
	decode_seterr(err, errlen, "gzip: the data inflates beyond the size its trailer declares");
	return -DMC_E_DECODE_FAILED;
}

int nifti_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
		char *err, size_t errlen)
{
	struct nifti_state *s = &ret->u.nii;
	const uint8_t *p = in;
	size_t n = len;
	int r;

	if (len >= 2 && in[0] == 0x1f && in[1] == 0x8b) {
		r = inflate_gz(ctx, in, len, &p, &n, err, errlen);
		if (r < 0)
			return r;
		s->gz = true;
		if (!nifti_sniff(p, n)) {
			decode_seterr(err, errlen, "gzip data is not a NIfTI-1 or NIfTI-2 file");
			return -DMC_E_DECODE_FAILED;
		}
	}
	if (n >= NII1_HDR && (rd_le32(p) == NII1_HDR || rd_be32(p) == NII1_HDR)) {
		s->version = 1;
		s->swap = rd_le32(p) != NII1_HDR;
		if (memcmp(p + 344, "n+1", 4) != 0) {
			decode_seterr(err, errlen,
				      "NIfTI: a .hdr/.img pair cannot be decoded from one resource");
			return -DMC_E_DECODE_FAILED;
		}
	} else if (n >= NII2_HDR && (rd_le32(p) == NII2_HDR || rd_be32(p) == NII2_HDR)) {
		s->version = 2;
		s->swap = rd_le32(p) != NII2_HDR;
		if (memcmp(p + 4, nii2_magic, 8) != 0) {
			decode_seterr(err, errlen,
				      "NIfTI-2: a .hdr/.img pair or a damaged magic cannot be decoded");
			return -DMC_E_DECODE_FAILED;
		}
	} else {
		decode_seterr(err, errlen, "NIfTI: truncated header");
		return -DMC_E_DECODE_FAILED;
	}
	s->hdr = p;

	int64_t dim[8];
	double vox;
	if (s->version == 1) {
		for (int i = 0; i < 8; i++) {
			dim[i] = f_i16(s, 40 + 2 * i);
			s->pixdim[i] = f_f32(s, 76 + 4 * i);
		}
		s->datatype = f_i16(s, 70);
		vox = f_f32(s, 108);
		ret->slope = f_f32(s, 112);
		ret->intercept = f_f32(s, 116);
	} else {
		for (int i = 0; i < 8; i++) {
			dim[i] = f_i64(s, 16 + 8 * i);
			s->pixdim[i] = f_f64(s, 104 + 8 * i);
		}
		s->datatype = f_i16(s, 12);
		vox = (double)f_i64(s, 168);
		ret->slope = f_f64(s, 176);
		ret->intercept = f_f64(s, 184);
	}
	if (dim[0] < 1 || dim[0] > 7) {
		decode_seterr(err, errlen, "NIfTI: dim[0] = %lld, expected 1..7", (long long)dim[0]);
		return -DMC_E_DECODE_FAILED;
	}
	for (int i = 1; i <= dim[0]; i++) {
		if (dim[i] < 1) {
			decode_seterr(err, errlen, "NIfTI: dim[%d] = %lld", i, (long long)dim[i]);
			return -DMC_E_DECODE_FAILED;
		}
	}
	for (int i = 0; i < 8; i++)
		s->dims[i] = i <= dim[0] ? (uint64_t)dim[i] : 1;
	s->dims[0] = (uint64_t)dim[0];

	enum decode_dtype dt;
	uint32_t c, esize;
	if (dtype_of(s->datatype, &dt, &c, &esize) < 0) {
		decode_seterr(err, errlen, "NIfTI: unsupported datatype %d", s->datatype);
		return -DMC_E_DECODE_FAILED;
	}
	s->elem_size = esize;

	/* frames = dim[3] * dim[4] * ... with overflow checks. */
	uint64_t frames = 1;
	for (int i = 3; i <= 7; i++)
		if (decode_mul_u64(frames, s->dims[i], &frames))
			goto too_big;
	if (s->dims[1] > UINT32_MAX || s->dims[2] > UINT32_MAX || frames > UINT32_MAX)
		goto too_big;
	uint64_t bytes = frames;
	if (decode_mul_u64(bytes, s->dims[1], &bytes) || decode_mul_u64(bytes, s->dims[2], &bytes) ||
	    decode_mul_u64(bytes, (uint64_t)c * esize, &bytes) || bytes > ctx->lim.max_decode_bytes)
		goto too_big;

	uint32_t hdr_size = s->version == 1 ? NII1_HDR : NII2_HDR;
	if (!isfinite(vox) || vox < hdr_size || vox != floor(vox) || vox > (double)n) {
		decode_seterr(err, errlen, "NIfTI: invalid vox_offset %.17g", vox);
		return -DMC_E_DECODE_FAILED;
	}
	s->vox_offset = (uint64_t)vox;
	if (bytes > n - s->vox_offset) {
		decode_seterr(err, errlen, "NIfTI: truncated: %llu voxel bytes declared, %llu present",
			      (unsigned long long)bytes,
			      (unsigned long long)(n - s->vox_offset));
		return -DMC_E_DECODE_FAILED;
	}
	s->data = p + s->vox_offset;
	s->data_len = bytes;

	/* nibabel: a zero or non-finite slope means no scaling; a non-finite intercept with
	 * a valid slope is an error there; here it counts as 0. */
	if (!isfinite(ret->slope) || ret->slope == 0) {
		ret->slope = 1.0;
		ret->intercept = 0.0;
	}
	if (!isfinite(ret->intercept))
		ret->intercept = 0.0;
	ret->has_scaling = ret->slope != 1.0 || ret->intercept != 0.0;

	ret->codec = s->gz ? DECODE_CODEC_NIFTI_GZ : DECODE_CODEC_NIFTI;
	ret->dtype = dt;
	ret->frames = (uint32_t)frames;
	ret->channels = c;
	ret->height = (uint32_t)s->dims[2];
	ret->width = (uint32_t)s->dims[1];
	ret->encoded_bytes = s->gz ? len : 0;
	return 0;
too_big:
	decode_seterr(err, errlen,
		      "NIfTI: dimensions %llu x %llu x %llu x %llu ... exceed max_decode_bytes",
		      (unsigned long long)s->dims[1], (unsigned long long)s->dims[2],
		      (unsigned long long)s->dims[3], (unsigned long long)s->dims[4]);
	return -DMC_E_LIMIT_EXCEEDED;
}

int nifti_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len,
		 const struct decode_src *src, uint32_t first, uint32_t n, void *dst, char *err,
		 size_t errlen)
{
	(void)ctx;
	(void)in;
	(void)len;
	(void)err;
	(void)errlen;
	const struct nifti_state *s = &src->u.nii;
	uint64_t frame_px = (uint64_t)src->height * src->width;
	uint64_t frame_bytes = frame_px * src->channels * s->elem_size;
	const uint8_t *sp = s->data + (uint64_t)first * frame_bytes;
	uint64_t total = (uint64_t)n * frame_bytes;

	if (src->channels == 1) {
		memcpy(dst, sp, (size_t)total);
		if (s->swap && s->elem_size > 1)
			decode_swap(dst, total / s->elem_size, s->elem_size);
		return 0;
	}
	/* RGB24 / RGBA32: interleaved bytes per voxel, planar per frame in the output. */
	uint8_t *d = dst;
	uint32_t c = src->channels;
	for (uint32_t f = 0; f < n; f++) {
		const uint8_t *fs = sp + (uint64_t)f * frame_bytes;
		uint8_t *fd = d + (uint64_t)f * frame_bytes;
		for (uint32_t k = 0; k < c; k++)
			for (uint64_t i = 0; i < frame_px; i++)
				fd[k * frame_px + i] = fs[i * c + k];
	}
	return 0;
}

static json_t *ascii_string(const uint8_t *p, size_t max)
{
	char buf[96];
	size_t i;
	for (i = 0; i < max && i < sizeof(buf) - 1 && p[i]; i++)
		buf[i] = p[i] >= 0x20 && p[i] < 0x7f ? (char)p[i] : '?';
	buf[i] = '\0';
	return json_string(buf);
}

static json_t *real_or_null(double v)
{
	return isfinite(v) ? json_real(v) : json_null();
}

int nifti_meta(struct decode_ctx *ctx, const struct decode_src *src, void *json_obj)
{
	const struct nifti_state *s = &src->u.nii;
	json_t *o = json_obj;
	json_t *dims = json_array(), *pix = json_array();
	json_t *srow[3] = { json_array(), json_array(), json_array() };
	json_t *quat = json_array();
	(void)ctx;
	if (!dims || !pix || !srow[0] || !srow[1] || !srow[2] || !quat) {
		json_decref(dims);
		json_decref(pix);
		json_decref(srow[0]);
		json_decref(srow[1]);
		json_decref(srow[2]);
		json_decref(quat);
		return -ENOMEM;
	}
	for (uint64_t i = 0; i <= s->dims[0] && i < 8; i++) {
		json_array_append_new(dims, json_integer((json_int_t)s->dims[i]));
		json_array_append_new(pix, real_or_null(s->pixdim[i]));
	}
	int qform, sform, intent, units;
	if (s->version == 1) {
		qform = f_i16(s, 252);
		sform = f_i16(s, 254);
		intent = f_i16(s, 68);
		units = s->hdr[123];
		for (int r = 0; r < 3; r++)
			for (int k = 0; k < 4; k++)
				json_array_append_new(srow[r], real_or_null(f_f32(s, 280 + 16 * r + 4 * k)));
		for (int k = 0; k < 6; k++)
			json_array_append_new(quat, real_or_null(f_f32(s, 256 + 4 * k)));
		json_object_set_new(o, "descrip", ascii_string(s->hdr + 148, 80));
	} else {
		qform = f_i32(s, 344);
		sform = f_i32(s, 348);
		intent = f_i32(s, 504);
		units = f_i32(s, 500);
		for (int r = 0; r < 3; r++)
			for (int k = 0; k < 4; k++)
				json_array_append_new(srow[r], real_or_null(f_f64(s, 400 + 32 * r + 8 * k)));
		for (int k = 0; k < 6; k++)
			json_array_append_new(quat, real_or_null(f_f64(s, 352 + 8 * k)));
		json_object_set_new(o, "descrip", ascii_string(s->hdr + 240, 80));
	}
	json_object_set_new(o, "version", json_integer(s->version));
	json_object_set_new(o, "byte_order", json_string(s->swap ? "swapped" : "native"));
	json_object_set_new(o, "datatype", json_integer(s->datatype));
	json_object_set_new(o, "dim", dims);
	json_object_set_new(o, "pixdim", pix);
	json_object_set_new(o, "vox_offset", json_integer((json_int_t)s->vox_offset));
	json_object_set_new(o, "scl_slope", real_or_null(src->slope));
	json_object_set_new(o, "scl_inter", real_or_null(src->intercept));
	json_object_set_new(o, "qform_code", json_integer(qform));
	json_object_set_new(o, "sform_code", json_integer(sform));
	json_object_set_new(o, "quatern", quat);
	json_object_set_new(o, "srow_x", srow[0]);
	json_object_set_new(o, "srow_y", srow[1]);
	json_object_set_new(o, "srow_z", srow[2]);
	json_object_set_new(o, "intent_code", json_integer(intent));
	json_object_set_new(o, "xyzt_units", json_integer(units));
	json_object_set_new(o, "gzip", json_boolean(s->gz));
	return 0;
}
