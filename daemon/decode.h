/*
 * decode: DICOM, JPEG, PNG and NIfTI into tensors.
 *
 * Pure decoders: no I/O, no logging, no globals, no threads. The caller hands in the bytes of
 * one resource and gets a tensor of shape (frames, channels, height, width), C order, in the
 * source dtype (docs/architecture.md, the data path), in host byte order. The format is
 * recognised by its magic bytes, never by a file name, and nothing in a file ever becomes
 * a path.
 *
 * Two phases, so that the serving path can place the output in a shared-memory slot:
 *   decode_probe()  parses headers, applies every limit with 64-bit arithmetic and returns
 *                   the tensor descriptor (dtype, shape, byte size). Nothing proportional to
 *                   the image size is allocated before the limits pass.
 *   decode_run()    decodes into a caller-provided buffer of at least desc.nbytes.
 * A context (decode_ctx) keeps decoder handles and scratch buffers between calls so that a
 * worker decoding item after item does not allocate per item. A context is used by one
 * thread at a time; different contexts are independent.
 *
 * Decoders are untrusted code: in the daemon they run in the worker processes of
 * decode_pool.h, never in the event-loop process.
 *
 * Errors: >= 0 success; -DMC_E_LIMIT_EXCEEDED when a limit of struct decode_limits is
 * exceeded; -DMC_E_DECODE_FAILED when the input is corrupt, truncated or uses a feature no
 * decoder here supports; -DMC_E_INVALID_ARGUMENT for a bad option (frame index out of
 * range, an unknown dtype); -ENOMEM. `err` (may be NULL) receives a one-line English reason,
 * NUL-terminated, without any path.
 *
 * Glossary
 *   frame     one 2-D image of an item: a DICOM frame, a NIfTI slice (z, then t, ...), or the
 *             only image of a JPEG/PNG.
 *   channel   samples per pixel: 1 (gray, palette index, mask), 2 (gray+alpha), 3 (RGB),
 *             4 (RGBA, CMYK). Always planar in the output: (F, C, H, W).
 *   codec     how the pixels are stored; it decides whether a decoded tensor is worth keeping
 *             in the store (see the caching policy below).
 *   LUT       the DICOM modality LUT (a Modality LUT Sequence, else RescaleSlope/
 *             RescaleIntercept) or the NIfTI scl_slope/scl_inter scaling, applied when
 *             DECODE_F_LUT is set.
 *
 * Layout per format (as the Datamint Python client's Dataset returns items)
 *   DICOM   (NumberOfFrames, SamplesPerPixel, Rows, Columns). YBR_FULL and YBR_FULL_422 are
 *           converted to RGB (pydicom's convert_color_space for native data; libjpeg's
 *           YCbCr->RGB for JPEG baseline). BitsAllocated 1 is unpacked to uint8 0/1.
 *   JPEG    (1, C, H, W) uint8; C = 1 (gray), 3 (RGB), 4 (CMYK, inverted as Pillow does).
 *   PNG     (1, C, H, W); uint8, or uint16 for 16-bit PNGs; palette images give indices.
 *   NIfTI   (dim[3]*dim[4]*..., C, dim[2], dim[1]): the voxel array transposed (2,1,0) as the
 *           Datamint client does with nibabel's (x, y, z) array; C = 3/4 for RGB24/RGBA32.
 *   Segmentation masks are PNG or NIfTI files and decode through the same code, hence onto
 *   the same (F, 1, H, W) grid as the image they annotate (no resampling here).
 *
 * Known differences from the reference decoders (tests/decode/README.md has the details)
 *   - PNG 16-bit color: we keep 16 bits; Pillow keeps the high byte (ours >> 8 equals it),
 *     and opens 16-bit gray+alpha as 8-bit RGBA. 16-bit gray: Pillow returns int32 ("I"),
 *     we return uint16, same values. 1-bit gray: Pillow returns bool, we return uint8 0/1.
 *     2/4-bit gray are scaled to 8 bits (x*85, x*17) as Pillow does; palette indices are
 *     never scaled or expanded.
 *   - DICOM YBR_FULL(_422) in JPEG baseline: libjpeg's fixed-point YCbCr->RGB instead of
 *     pydicom's float matrix: lossy data anyway, PSNR > 50 dB against pydicom.
 *   - DICOM .4.51 with 12-bit precision is decoded by GDCM (TurboJPEG 2.1 has no 12-bit API).
 *   - DICOM RLE is decoded here (GDCM 3.0.21 scrambles 16- and 32-bit multi-sample RLE).
 *   - DICOM whose pixel fragments embed a sequence delimiter: GDCM's parser stops there,
 *     pydicom's does not; we fail with DMC_E_DECODE_FAILED.
 *   - DICOM Modality LUT Sequence (0028,3000), as pydicom's apply_modality_lut: it wins
 *     over Rescale Slope/Intercept; only its first item counts; LUT Descriptor = (entries,
 *     0 meaning 65536; first mapped value, signed with PixelRepresentation 1; bits, 8 or
 *     16); LUT Data (US or OW) one entry per 16-bit word, an 8-bit entry its low byte;
 *     values below the first mapped value take the first entry, values past the end the
 *     last. The output dtype is uint8 or uint16 from the bits, as pydicom's, unless
 *     opts.dtype says otherwise. One difference: pydicom computes value - first in the
 *     pixel dtype, which wraps for int8/int16 when the first mapped value is negative and
 *     a value is near the type's maximum; we compute it exactly. A descriptor that LUT
 *     Data does not back, a missing element or other bits: DMC_E_DECODE_FAILED, only with
 *     DECODE_F_LUT (pydicom raises).
 *   - Scaling (DECODE_F_LUT) computes v * slope + intercept in double, as pydicom's
 *     apply_modality_lut and nibabel's get_fdata() do; float64 output is bit-exact with
 *     them, float32 output is their result rounded to float32.
 *   - Conversions to an integer dtype round to nearest and saturate; NaN becomes 0 (numpy's
 *     astype truncates and wraps).
 *   - NIfTI with a finite slope and a non-finite intercept: nibabel raises, we use 0.
 *
 * Caching policy (docs/architecture.md, decode): the decoded tensor is kept in the store
 * (zstd-1) for a lossless codec whose decode costs at least 2x the zstd-1 decompression of
 * that tensor. Lossy codecs are decoded on the fly: their tensor is 5-10x the file on disk and
 * they decode at 600-800 items/s anyway. Measured with tests/bench/bench_decode.py (one
 * core, best of 3, same run; 512x512 CT int16 slices, 512x512 RGB photos, 256x256x64 int16
 * volumes; tests/bench/README.md has the whole table):
 *
 *   codec                 decode/s   zstd-1/s   zstd vs decode   store tensor
 *   raw DICOM               4379       1809          0.41            no
 *   deflated DICOM           682       1809          2.65            yes
 *   RLE (ours)              1233       1986          1.61            no
 *   JPEG lossless .4.70      189       1936          10.3            yes
 *   JPEG-LS                   93       1641          17.6            yes
 *   JPEG 2000                 22       1964          90.3            yes
 *   JPEG 12-bit (GDCM)       574       2835          4.94            no (lossy)
 *   JPEG baseline (DICOM)    607        980          1.61            no (lossy)
 *   JPEG RGB / gray file   600/768   1037/3032     1.73/3.95         no (lossy)
 *   PNG RGB8 / gray16      87/131     983/1476      11.3/11.2        yes
 *   NIfTI .nii              1849         98          0.05            no
 *   NIfTI .nii.gz             39        101          2.56            yes
 *
 * decode_codec_store_tensor() encodes the last column.
 */
#ifndef DMC_DECODE_H
#define DMC_DECODE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Explicit values: they reach the index and the wire later. Never reuse a number. */
enum decode_format {
	DECODE_FORMAT_UNKNOWN = 0,
	DECODE_FORMAT_DICOM = 1,
	DECODE_FORMAT_JPEG = 2,
	DECODE_FORMAT_PNG = 3,
	DECODE_FORMAT_NIFTI = 4, /* .nii and .nii.gz */
};

enum decode_codec {
	DECODE_CODEC_NONE = 0,
	DECODE_CODEC_RAW = 1,            /* DICOM implicit/explicit little endian, big endian */
	DECODE_CODEC_DEFLATE = 2,        /* DICOM deflated explicit little endian */
	DECODE_CODEC_RLE = 3,            /* DICOM RLE lossless */
	DECODE_CODEC_JPEG = 4,           /* JPEG files; DICOM .4.50 and 8-bit .4.51 (TurboJPEG) */
	DECODE_CODEC_JPEG_EXTENDED = 5,  /* DICOM 12-bit .4.51 (GDCM) */
	DECODE_CODEC_JPEG_LOSSLESS = 6,  /* DICOM .4.57, .4.70 */
	DECODE_CODEC_JPEG_LS = 7,        /* DICOM .4.80, .4.81 */
	DECODE_CODEC_JPEG_2000 = 8,      /* DICOM .4.90, .4.91 */
	DECODE_CODEC_PNG = 9,
	DECODE_CODEC_NIFTI = 10,
	DECODE_CODEC_NIFTI_GZ = 11,
	DECODE_CODEC_HTJ2K = 12,         /* DICOM .4.201, .4.202, .4.203 (OpenJPEG) */
};

/* numpy's names; explicit values. */
enum decode_dtype {
	DECODE_DTYPE_NONE = 0, /* in decode_opts: keep the source dtype */
	DECODE_DTYPE_U8 = 1,
	DECODE_DTYPE_I8 = 2,
	DECODE_DTYPE_U16 = 3,
	DECODE_DTYPE_I16 = 4,
	DECODE_DTYPE_U32 = 5,
	DECODE_DTYPE_I32 = 6,
	DECODE_DTYPE_U64 = 7,
	DECODE_DTYPE_I64 = 8,
	DECODE_DTYPE_F32 = 9,
	DECODE_DTYPE_F64 = 10,
	/* Made from float32 values by policy.c (decode workers), never by a decoder: */
	DECODE_DTYPE_F16 = 11,
	DECODE_DTYPE_BF16 = 12,
};
#define DECODE_DTYPE_LAST_ 10 /* the last dtype decoders produce (decode_opts.dtype) */
#define DECODE_DTYPE_ALL_LAST_ 12

/*
 * Limits, checked with 64-bit arithmetic before anything proportional to them is allocated.
 * Zero in a field means its default.
 */
struct decode_limits {
	uint64_t max_decode_bytes; /* bytes of the whole decoded item, and of any scratch buffer */
	uint64_t max_input_bytes;  /* bytes of the encoded resource */
	uint32_t max_dim;          /* width and height */
	uint32_t max_frames;       /* frames of one item */
	uint32_t max_ratio;        /* decoded bytes per encoded byte for compressed codecs */
	uint32_t max_meta_bytes;   /* the metadata JSON */
};
#define DECODE_DEFAULT_MAX_DECODE_BYTES (1ull << 30)
#define DECODE_DEFAULT_MAX_INPUT_BYTES (2ull << 30)
#define DECODE_DEFAULT_MAX_DIM 65535u
#define DECODE_DEFAULT_MAX_FRAMES (1u << 20)
/* Deflate tops out near 1032:1 and JPEG near 1:600; 4096 leaves room for blank images. */
#define DECODE_DEFAULT_MAX_RATIO 4096u
#define DECODE_DEFAULT_MAX_META_BYTES (1u << 20)

/* Fills every field with its default. */
void decode_limits_default(struct decode_limits *lim);

enum decode_flag {
	DECODE_F_FRAME = 1u << 0, /* decode only frame opts.frame: shape (1, C, H, W) */
	DECODE_F_LUT = 1u << 1,   /* apply the modality LUT / NIfTI scaling: float32 unless
				   * dtype; uint8/uint16 for a DICOM Modality LUT Sequence */
};

struct decode_opts {
	uint32_t flags;           /* enum decode_flag */
	uint32_t frame;           /* with DECODE_F_FRAME */
	enum decode_dtype dtype;  /* output dtype; DECODE_DTYPE_NONE: source (with DECODE_F_LUT
				   * as that flag says) */
};

/* The tensor descriptor: what decode_run() will write. */
struct decode_desc {
	enum decode_format format;
	enum decode_codec codec;
	enum decode_dtype src_dtype; /* as stored in the file */
	enum decode_dtype dtype;     /* of the output */
	uint32_t frames;             /* output shape (frames, channels, height, width) */
	uint32_t channels;
	uint32_t height;
	uint32_t width;
	uint32_t src_frames;         /* frames of the whole item */
	uint64_t nbytes;             /* output bytes = product of the shape * dtype size */
	double slope, intercept;     /* the scaling the file declares (1, 0 when none) */
	bool lut_applied;            /* scaling or a Modality LUT Sequence was applied */
};

struct decode_ctx;

/* A new context with `lim` (copied; NULL: defaults). NULL only on out-of-memory. */
struct decode_ctx *decode_ctx_new(const struct decode_limits *lim);
/* Frees the context and everything it holds. NULL is a no-op. */
void decode_ctx_free(struct decode_ctx *ctx);
/* Returns scratch memory above `keep` bytes to the system (after an unusually large item). */
void decode_ctx_trim(struct decode_ctx *ctx, size_t keep);
const struct decode_limits *decode_ctx_limits(const struct decode_ctx *ctx);

/* The format by magic bytes: DICM at 128 (or a plausible preamble-less group 0008/0002
 * start), FF D8 FF, the PNG signature, a NIfTI-1/2 header, or gzip (taken as .nii.gz). */
enum decode_format decode_sniff(const void *in, size_t len);

/*
 * Parses `in` (borrowed for the call; and until decode_run() on the same ctx) and fills
 * *ret_desc after every limit check. `opts` may be NULL (all defaults).
 */
int decode_probe(struct decode_ctx *ctx, const void *in, size_t len, const struct decode_opts *opts,
		 struct decode_desc *ret_desc, char *err, size_t errlen);

/*
 * Decodes `in` with `opts` into `out` (out_len >= desc.nbytes of the probe). Reuses the state
 * of the last decode_probe() on this ctx when it was for the same `in`, `len` and `opts`;
 * probes again otherwise. On failure the contents of `out` are unspecified.
 */
int decode_run(struct decode_ctx *ctx, const void *in, size_t len, const struct decode_opts *opts,
	       void *out, size_t out_len, char *err, size_t errlen);

/*
 * The metadata of `in` as a JSON object, NUL-terminated, into `out` (capacity `cap`):
 *   {"format": "dicom", "codec": "jpeg-lossless", "dtype": "int16", "shape": [F, C, H, W],
 *    "header": {...}}
 * where "header" is, for DICOM, the data set in the DICOM JSON model (PS3.18 annex F) without
 * pixel data, with values over 64 KiB and inline binaries over 4 KiB left out and sequences
 * deeper than 16 levels cut; for NIfTI the header fields; for PNG/JPEG the image header.
 * DICOM elements that would push the text over max_meta_bytes are left out.
 * *ret_len gets the length without the NUL. -ENOBUFS when `cap` is too small,
 * -DMC_E_LIMIT_EXCEEDED above max_meta_bytes. Reuses the probe of the same input and opts,
 * and leaves it for a following decode_run() (so a .nii.gz is inflated once).
 */
int decode_meta(struct decode_ctx *ctx, const void *in, size_t len, const struct decode_opts *opts,
		char *out, size_t cap, size_t *ret_len, char *err, size_t errlen);

/* Names: "dicom", "jpeg-lossless", "int16" (numpy). NULL for unknown values. */
const char *decode_format_name(enum decode_format f);
const char *decode_codec_name(enum decode_codec c);
const char *decode_dtype_name(enum decode_dtype t);
/* The dtype for a numpy name ("uint8", "float32", ...), or DECODE_DTYPE_NONE. */
enum decode_dtype decode_dtype_from_name(const char *name);
/* Bytes per element, 0 for DECODE_DTYPE_NONE. */
size_t decode_dtype_size(enum decode_dtype t);

/* The caching policy above: true when the decoded tensor should be kept in the store. */
bool decode_codec_store_tensor(enum decode_codec c);

/*
 * The codec libraries' own messages (GDCM warnings, OpenJPEG's info and warnings) never go
 * to stderr: they are handed, one line at a time, to this hook, process-wide (NULL, the
 * default: dropped). The daemon logs them at debug level (group "decode"). `lib` names the
 * library ("gdcm", "openjpeg"). Called from the decoding thread.
 */
typedef void (*decode_diag_fn)(const char *lib, const char *line);
void decode_set_diag(decode_diag_fn fn);

#ifdef __cplusplus
}
#endif

#endif /* DMC_DECODE_H */
