/*
 * decode_priv: what decode.c shares with the per-format files (decode_jpeg.c, decode_png.c,
 * decode_nifti.c, decode_dicom.c). Not for use outside daemon/decode*.
 *
 * A format decoder has two entry points:
 *   <fmt>_probe(ctx, in, len, ret_src)   parse headers only, fill the source tensor
 *                                         description (struct decode_src) and the private
 *                                         state the decode step needs;
 *   <fmt>_decode(ctx, in, len, src, first, n, dst)
 *                                         write frames [first, first + n) of the source
 *                                         tensor, planar (F, C, H, W), host byte order, in
 *                                         src->dtype, into dst.
 * decode.c applies the generic limits between the two, and converts dtypes and scaling.
 */
#ifndef DMC_DECODE_PRIV_H
#define DMC_DECODE_PRIV_H

#include <stdarg.h>

#include "decode.h"
#include "decode_gdcm.h"

/* Bytes a decoder may need beyond the tensor itself (headers, NIfTI extensions). */
#define DECODE_SLACK_BYTES (16u << 20)

/* A grow-only scratch buffer owned by a decode_ctx. */
struct decode_buf {
	void *p;
	size_t cap;
};

struct nifti_state {
	int version;              /* 1 or 2 */
	bool swap;                /* file is in the other byte order */
	int16_t datatype;
	uint32_t elem_size;       /* bytes per voxel component */
	const uint8_t *data;      /* the voxels, borrowed from the input or ctx->work */
	uint64_t data_len;        /* bytes of voxels the shape declares */
	const uint8_t *hdr;       /* the header (348 or 540 bytes), same owner as data */
	uint64_t dims[8];
	double pixdim[8];
	uint64_t vox_offset;
	bool gz;
};

struct png_state {
	void *spng;               /* spng_ctx, freed after decode or by the next probe */
	uint8_t bit_depth, color_type, interlace;
};

struct jpeg_state {
	int subsamp, colorspace;
	bool adobe;               /* APP14 "Adobe" marker: CMYK stored inverted */
	int progressive;
};

struct dicom_state {
	struct gdcm_info info;
	int route;                /* enum dicom_route in decode_dicom.c */
	const uint8_t *buf;       /* what GDCM parsed: the input, or the inflated copy */
	size_t len;
	/* Encapsulated Pixel Data of the top-level data set: offset in buf of its first item
	 * (the basic offset table), found by our own walk of the framing; 0 when none. */
	size_t items_off;
};

/* The source tensor a format decoder found. */
struct decode_src {
	enum decode_format format;
	enum decode_codec codec;
	enum decode_dtype dtype;
	uint32_t frames, channels, height, width;
	double slope, intercept;  /* 1, 0 when the file declares none */
	bool has_scaling;
	/* A DICOM Modality LUT Sequence: with DECODE_F_LUT it replaces slope/intercept, as in
	 * pydicom's apply_modality_lut. */
	bool has_lut;
	const char *lut_problem;  /* static text: why that LUT cannot be applied, or NULL */
	const uint16_t *lut;      /* lut_entries values, borrowed from the GDCM shim */
	uint32_t lut_entries;     /* 1..65536 */
	int32_t lut_first;        /* the first stored value mapped */
	enum decode_dtype lut_dtype; /* uint8 or uint16, from the descriptor's bits */
	uint64_t encoded_bytes;   /* compressed pixel bytes, for max_ratio; 0 when not compressed */
	uint64_t work_bytes;      /* scratch the decode step will allocate */
	union {
		struct nifti_state nii;
		struct png_state png;
		struct jpeg_state jpg;
		struct dicom_state dcm;
	} u;
};

struct decode_ctx {
	struct decode_limits lim;
	struct decode_buf work;   /* decoder scratch: inflated NIfTI, interleaved pixels */
	struct decode_buf work2;  /* second decoder scratch: concatenated JPEG fragments */
	struct decode_buf conv;   /* the source tensor when the output needs a conversion */
	struct decode_buf infl;   /* an inflated deflated-syntax DICOM file */
	struct decode_buf jfix;   /* a DICOM JPEG stream with patched color markers */
	void *tj;                 /* tjhandle, created on first use by decode_jpeg.c */
	void (*free_tj)(void *);
	void *inflater;           /* libdeflate decompressor, created by decode_nifti.c */
	void (*free_inflater)(void *);
	struct gdcm_shim *gdcm;   /* created on first use by decode_dicom.c */

	/* the last successful probe */
	bool probed;
	const void *in;
	size_t in_len;
	struct decode_opts opts;
	struct decode_src src;
	struct decode_desc desc;
};

void decode_seterr(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* A codec library's message to the decode_set_diag() hook (one line, trailing newline cut;
 * dropped when no hook is set). Callable from C++ (decode_gdcm.cc declares it). */
#ifdef __cplusplus
extern "C"
#endif
void decode_diag(const char *lib, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Makes b hold at least n bytes; -DMC_E_LIMIT_EXCEEDED above max_decode_bytes + slack. */
int decode_buf_reserve(struct decode_ctx *ctx, struct decode_buf *b, uint64_t n, char *err,
		       size_t errlen);

/* a * b * ... into *ret with overflow and limit checks; -DMC_E_LIMIT_EXCEEDED on overflow. */
int decode_mul_u64(uint64_t a, uint64_t b, uint64_t *ret);

/* Byte order helpers. */
static inline uint16_t rd_le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint16_t rd_be16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static inline uint32_t rd_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint32_t rd_be32(const uint8_t *p)
{
	return (uint32_t)p[3] | (uint32_t)p[2] << 8 | (uint32_t)p[1] << 16 | (uint32_t)p[0] << 24;
}
/* Swaps n elements of `size` bytes (2, 4 or 8) in place. */
void decode_swap(void *p, uint64_t n, unsigned size);

/* JPEG: TurboJPEG. */
int jpeg_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
	       char *err, size_t errlen);
int jpeg_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len,
		const struct decode_src *src, uint32_t first, uint32_t n, void *dst, char *err,
		size_t errlen);
/* One 8-bit JPEG bitstream of exactly w x h x c into planar dst (c*h*w bytes). Used for
 * DICOM .4.50/.4.51 as well. `ybr` is unused by TurboJPEG, which follows the markers. */
int jpeg_decode_planar(struct decode_ctx *ctx, const uint8_t *in, size_t len, uint32_t w,
		       uint32_t h, uint32_t c, uint8_t *dst, char *err, size_t errlen);
/* Width, height, components and precision from the SOF marker, without TurboJPEG. */
int jpeg_scan_header(const uint8_t *in, size_t len, uint32_t *ret_w, uint32_t *ret_h,
		     uint32_t *ret_c, uint32_t *ret_bits, bool *ret_adobe, bool *ret_progressive);
int jpeg_meta(struct decode_ctx *ctx, const struct decode_src *src, void *json_obj);

/* PNG: libspng. */
int png_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
	      char *err, size_t errlen);
int png_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *src,
	       uint32_t first, uint32_t n, void *dst, char *err, size_t errlen);
void png_release(struct decode_src *src);
int png_meta(struct decode_ctx *ctx, const struct decode_src *src, void *json_obj);

/* NIfTI-1/2, .nii and .nii.gz: own parser, libdeflate. */
int nifti_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
		char *err, size_t errlen);
int nifti_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len,
		 const struct decode_src *src, uint32_t first, uint32_t n, void *dst, char *err,
		 size_t errlen);
int nifti_meta(struct decode_ctx *ctx, const struct decode_src *src, void *json_obj);
bool nifti_sniff(const uint8_t *in, size_t len);
/* Raw deflate (no header) into out->p + prefix, growing `out` up to max_decode_bytes;
 * *ret_len gets the inflated size. Lives in decode_nifti.c, the libdeflate wrapper. */
int inflate_raw(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_buf *out,
		size_t prefix, size_t *ret_len, char *err, size_t errlen);

/* JPEG 2000 / HTJ2K: OpenJPEG (decode_j2k.c). One frame (J2K codestream or JP2) of exactly
 * w x h x c into planar dst, each sample stored in esize (1, 2, 4) bytes, host order, as the
 * codestream's two's complement truncated to esize. `what` names the syntax in errors. */
int j2k_decode_planar(struct decode_ctx *ctx, const uint8_t *in, size_t len, uint32_t w,
		      uint32_t h, uint32_t c, size_t esize, uint8_t *dst, const char *what,
		      char *err, size_t errlen);

/* DICOM: GDCM through decode_gdcm.cc, TurboJPEG for .4.50/.4.51. */
int dicom_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
		char *err, size_t errlen);
int dicom_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len,
		 const struct decode_src *src, uint32_t first, uint32_t n, void *dst, char *err,
		 size_t errlen);
/* The DICOM JSON model of the data set as NUL-terminated text in ctx->work. */
int dicom_meta(struct decode_ctx *ctx, const uint8_t *in, size_t len, const char **ret_text,
	       size_t *ret_len, char *err, size_t errlen);

#endif
