/*
 * decode_dicom: DICOM pixel data. GDCM (decode_gdcm.cc) parses the data set; the pixels take
 * one of five routes:
 *   native   implicit/explicit little endian, big endian, deflated: read here, with
 *            pydicom's semantics (raw stored values, 1-bit unpacked LSB first, YBR_FULL_422
 *            upsampled by repetition);
 *   turbo    JPEG baseline / 8-bit extended (.4.50, .4.51): fragments extracted here and
 *            decoded by TurboJPEG (2.5-2.8x faster than GDCM's own JPEG code);
 *   rle      RLE lossless (PS3.5 annex G): PackBits segments decoded here, straight into
 *            the planar output (GDCM 3.0.21 scrambles 16- and 32-bit multi-sample RLE);
 *   opj      JPEG 2000 (.4.90, .4.91) and HTJ2K (.4.201-.4.203): OpenJPEG (decode_j2k.c);
 *   gdcm     JPEG lossless, JPEG-LS, 12-bit JPEG: GDCM's codecs.
 * Encapsulated fragments are read by our own walk of the items (frag_*), as pydicom reads
 * them. A transfer syntax not decoded here is refused by UID and name before GDCM parses
 * the file; GDCM is shown HTJ2K files under a stand-in syntax it knows (restate_syntax).
 * 8-bit YBR_FULL and YBR_FULL_422 become RGB as pydicom's convert_color_space computes it
 * (float32 matrix, round half up, clip); JPEG streams get libjpeg's YCbCr->RGB instead.
 */
#include "decode_priv.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

enum dicom_route {
	ROUTE_NATIVE = 1,
	ROUTE_TURBO = 2,
	ROUTE_GDCM = 3,
	ROUTE_RLE = 4,
	ROUTE_OPJ = 5,
};

#define TS_PREFIX "1.2.840.10008.1.2"

/* Caps of the DICOM JSON header (decode.h). */
#define DICOM_JSON_MAX_VALUE (64u << 10)
#define DICOM_JSON_MAX_INLINE (4u << 10)
#define DICOM_JSON_MAX_DEPTH 16u

static struct gdcm_shim *get_shim(struct decode_ctx *ctx)
{
	if (!ctx->gdcm)
		ctx->gdcm = gdcm_shim_new();
	return ctx->gdcm;
}

static bool ts_is(const char *ts, const char *suffix)
{
	size_t n = strlen(TS_PREFIX);
	return strncmp(ts, TS_PREFIX, n) == 0 && strcmp(ts + n, suffix) == 0;
}

static bool is_ybr_full(const char *pi)
{
	return strcmp(pi, "YBR_FULL") == 0 || strcmp(pi, "YBR_FULL_422") == 0;
}

/*
 * The framing of the whole file, checked before GDCM sees it: every element, item and
 * fragment must fit in the bytes that are there. GDCM 3.0.21 (as Debian builds it) asserts,
 * i.e. aborts the process, on many truncated files, and allocates whatever length an element
 * declares: a 300-byte file could make it zero-fill 4 GiB. This walk reads only tags and
 * lengths; values are left to GDCM. Deflated data sets are inflated by GDCM itself and are
 * not walked.
 */
struct dwalk {
	const uint8_t *p;
	size_t len;
	bool big;
	char ts[68];
	size_t items_off; /* top-level encapsulated Pixel Data: its first item, or 0 */
};

#define DWALK_MAX_DEPTH 32

static bool dw_long_vr(const uint8_t *vr)
{
	static const char *const v[] = { "OB", "OW", "OF", "SQ", "UT", "UN", "UC",
					 "UR", "OD", "OL", "OV", "SV", "UV" };
	for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++)
		if (memcmp(vr, v[i], 2) == 0)
			return true;
	return false;
}

/* GDCM asserts on a VR it does not know: only the VRs of PS3.5 pass. */
static bool dw_known_vr(const uint8_t *vr)
{
	static const char vrs[] = "AEASATCSDADSDTFLFDISLOLTOBODOFOLOVOWPNSHSLSQSSSTSVTMUCUIULUNURUSUTUV";
	for (size_t i = 0; i + 1 < sizeof(vrs); i += 2)
		if (vr[0] == vrs[i] && vr[1] == vrs[i + 1])
			return true;
	return false;
}

static uint16_t dw16(const struct dwalk *w, size_t off)
{
	return w->big ? rd_be16(w->p + off) : rd_le16(w->p + off);
}

static uint32_t dw32(const struct dwalk *w, size_t off)
{
	return w->big ? rd_be32(w->p + off) : rd_le32(w->p + off);
}

/*
 * Walks elements from *off up to `end`, or up to the delimiter item `stop` (0xE00D: item
 * end, 0xE0DD: sequence end) when end is SIZE_MAX. Returns 0 with *off after the walked
 * part, or -DMC_E_DECODE_FAILED.
 */
static int dw_items(struct dwalk *w, size_t *off, size_t end, bool explicit_vr, int depth,
		    bool fragments);

static int dw_elements(struct dwalk *w, size_t *off, size_t end, bool explicit_vr, int depth,
		       uint16_t stop, bool meta_only)
{
	size_t lim = end == SIZE_MAX ? w->len : end;
	if (depth > DWALK_MAX_DEPTH)
		return -DMC_E_DECODE_FAILED;
	while (*off < lim) {
		size_t o = *off;
		if (o + 8 > lim) {
			/* Trailing zero padding is harmless; anything else is a cut element. */
			for (size_t i = o; i < lim; i++)
				if (w->p[i])
					return -DMC_E_DECODE_FAILED;
			*off = lim;
			return end == SIZE_MAX && stop ? -DMC_E_DECODE_FAILED : 0;
		}
		bool meta = rd_le16(w->p + o) == 0x0002;
		if (meta_only && !meta)
			return 0;
		/* The file meta group is always explicit VR little endian. */
		bool big = w->big;
		if (meta)
			w->big = false;
		uint16_t g = dw16(w, o), e = dw16(w, o + 2);
		uint64_t vl, hdr;
		const uint8_t *vr = w->p + o + 4;
		bool ex = (explicit_vr || meta) && g != 0xfffe && vr[0] >= 'A' && vr[0] <= 'Z' &&
			  vr[1] >= 'A' && vr[1] <= 'Z';
		if (g == 0xfffe) {
			vl = dw32(w, o + 4);
			hdr = 8;
		} else if (ex && dw_long_vr(vr)) {
			if (o + 12 > lim) {
				w->big = big;
				return -DMC_E_DECODE_FAILED;
			}
			vl = dw32(w, o + 8);
			hdr = 12;
		} else if (ex) {
			vl = dw16(w, o + 6);
			hdr = 8;
		} else {
			vl = dw32(w, o + 4); /* implicit VR, or explicit data written implicitly */
			hdr = 8;
		}
		w->big = big;
		if (ex && !dw_known_vr(vr))
			return -DMC_E_DECODE_FAILED;
		/* PS3.10: the meta group is explicit VR; GDCM asserts on other guesses. */
		if (meta && !ex)
			return -DMC_E_DECODE_FAILED;
		/* Pixel Data as anything but OB/OW/UN: another GDCM assertion. */
		if (ex && g == 0x7fe0 && e == 0x0010 && memcmp(vr, "OB", 2) != 0 &&
		    memcmp(vr, "OW", 2) != 0 && memcmp(vr, "UN", 2) != 0)
			return -DMC_E_DECODE_FAILED;
		if (g == 0xfffe) {
			*off = o + hdr;
			if (stop && e == stop && vl == 0)
				return 0;
			return -DMC_E_DECODE_FAILED; /* a stray item or delimiter */
		}
		if (meta && g == 0x0002 && e == 0x0010 && vl < sizeof(w->ts) && o + hdr + vl <= lim) {
			memcpy(w->ts, w->p + o + hdr, (size_t)vl);
			w->ts[vl] = '\0';
			for (size_t i = (size_t)vl; i > 0 && (w->ts[i - 1] == ' ' || !w->ts[i - 1]); i--)
				w->ts[i - 1] = '\0';
		}
		*off = o + hdr;
		if (vl == 0xffffffffu) {
			/* Undefined length: a sequence (SQ, UN, implicit), or encapsulated pixels. */
			bool pixels = g == 0x7fe0 && e == 0x0010;
			bool un = ex && memcmp(vr, "UN", 2) == 0;
			if (pixels && depth == 0)
				w->items_off = *off;
			int r = dw_items(w, off, SIZE_MAX, un ? false : explicit_vr, depth + 1, pixels);
			if (r < 0)
				return r;
			continue;
		}
		if (vl > lim - *off)
			return -DMC_E_DECODE_FAILED;
		if (ex && memcmp(vr, "SQ", 2) == 0 && vl > 0) {
			size_t sub = *off;
			int r = dw_items(w, &sub, *off + (size_t)vl, explicit_vr, depth + 1, false);
			if (r < 0)
				return r;
		}
		*off += (size_t)vl;
	}
	return end == SIZE_MAX && stop ? -DMC_E_DECODE_FAILED : 0;
}

static int dw_items(struct dwalk *w, size_t *off, size_t end, bool explicit_vr, int depth,
		    bool fragments)
{
	size_t lim = end == SIZE_MAX ? w->len : end;
	if (depth > DWALK_MAX_DEPTH)
		return -DMC_E_DECODE_FAILED;
	while (*off < lim) {
		size_t o = *off;
		if (o + 8 > lim || dw16(w, o) != 0xfffe)
			return -DMC_E_DECODE_FAILED;
		uint16_t e = dw16(w, o + 2);
		uint32_t vl = dw32(w, o + 4);
		*off = o + 8;
		if (e == 0xe0dd) /* sequence delimitation, length 0 (GDCM re-parses otherwise) */
			return end == SIZE_MAX && vl == 0 ? 0 : -DMC_E_DECODE_FAILED;
		if (e != 0xe000)
			return -DMC_E_DECODE_FAILED;
		if (vl == 0xffffffffu) {
			if (fragments)
				return -DMC_E_DECODE_FAILED;
			int r = dw_elements(w, off, SIZE_MAX, explicit_vr, depth + 1, 0xe00d, false);
			if (r < 0)
				return r;
			continue;
		}
		if (vl > lim - *off)
			return -DMC_E_DECODE_FAILED;
		if (!fragments && vl > 0) {
			size_t sub = *off;
			int r = dw_elements(w, &sub, *off + vl, explicit_vr, depth + 1, 0, false);
			if (r < 0)
				return r;
		}
		*off += vl;
	}
	return end == SIZE_MAX ? -DMC_E_DECODE_FAILED : 0;
}

/* Checks the framing; *ret_deflated says the data set after *ret_meta_end is deflated
 * (not walked: it has to be inflated first). */
static int check_framing(const uint8_t *in, size_t len, bool *ret_deflated, size_t *ret_meta_end,
			 size_t *ret_items_off, char *ts, size_t tslen, char *err, size_t errlen)
{
	struct dwalk w = { in, len, false, "", 0 };
	size_t off = 0;
	bool preamble = len >= 132 && memcmp(in + 128, "DICM", 4) == 0;
	*ret_deflated = false;
	if (preamble)
		off = 132;
	else if (len >= 2 && in[0] == 0x00 && in[1] == 0x08)
		w.big = true; /* a big-endian data set without meta information */
	int r = dw_elements(&w, &off, len, true, 0, 0, true);
	*ret_meta_end = off;
	*ret_items_off = 0;
	snprintf(ts, tslen, "%s", w.ts);
	if (r == 0 && off + 8 > len)
		r = -DMC_E_DECODE_FAILED; /* nothing after the meta group: GDCM asserts */
	if (r == 0 && w.ts[0]) {
		if (strcmp(w.ts, TS_PREFIX ".1.99") == 0) {
			*ret_deflated = true;
			return 0;
		}
		w.big = strcmp(w.ts, TS_PREFIX ".2") == 0;
		bool explicit_vr = strcmp(w.ts, TS_PREFIX) != 0;
		r = dw_elements(&w, &off, len, explicit_vr, 0, 0, false);
	} else if (r == 0) {
		/* No transfer syntax: explicit when a VR follows the first tag. */
		bool explicit_vr = off + 6 <= len && in[off + 4] >= 'A' && in[off + 4] <= 'Z' &&
				   in[off + 5] >= 'A' && in[off + 5] <= 'Z';
		r = dw_elements(&w, &off, len, explicit_vr, 0, 0, false);
	}
	if (r < 0)
		decode_seterr(err, errlen,
			      "DICOM: truncated or malformed at byte %zu (element or item longer "
			      "than the file)", off);
	*ret_items_off = w.items_off;
	return r;
}

/*
 * The file meta group from `start` to meta_end, copied into meta[] with the transfer syntax
 * replaced by `ts` and without its group length (the caller writes a new one); *ret_m gets
 * its size. The group was walked by check_framing: every element fits.
 */
static int copy_meta(const uint8_t *in, size_t start, size_t meta_end, const char *ts,
		     uint8_t *meta, size_t cap, size_t *ret_m, char *err, size_t errlen)
{
	size_t tl = strlen(ts), tv = tl + (tl & 1);
	size_t m = 0;
	for (size_t off = start; off < meta_end;) {
		const uint8_t *vr = in + off + 4;
		bool lng = dw_long_vr(vr);
		size_t hdr = lng ? 12 : 8;
		size_t vl = lng ? rd_le32(in + off + 8) : rd_le16(in + off + 6);
		uint16_t e = rd_le16(in + off + 2);
		if (e != 0x0000) {
			bool is_ts = e == 0x0010;
			size_t n = is_ts ? 8 + tv : hdr + vl;
			if (m + n > cap) {
				decode_seterr(err, errlen, "DICOM: file meta information too large");
				return -DMC_E_DECODE_FAILED;
			}
			if (is_ts) {
				memcpy(meta + m, in + off, 6);
				meta[m + 6] = (uint8_t)tv;
				meta[m + 7] = 0;
				memcpy(meta + m + 8, ts, tl);
				if (tv > tl)
					meta[m + 8 + tl] = 0;
			} else {
				memcpy(meta + m, in + off, n);
			}
			m += n;
		}
		off += hdr + vl;
	}
	*ret_m = m;
	return 0;
}

/* Preamble, "DICM" and a group length for m bytes of meta at p (which has 144 + m bytes). */
static void write_preamble(uint8_t *p, const uint8_t *meta, size_t m)
{
	static const uint8_t gl[8] = { 0x02, 0x00, 0x00, 0x00, 'U', 'L', 4, 0 };
	memset(p, 0, 128);
	memcpy(p + 128, "DICM", 4);
	memcpy(p + 132, gl, 8);
	p[140] = (uint8_t)m;
	p[141] = (uint8_t)(m >> 8);
	p[142] = 0;
	p[143] = 0;
	memcpy(p + 144, meta, m);
}

/*
 * Deflated explicit VR little endian: inflated here (libdeflate, capped) into a file of
 * explicit VR little endian, so that GDCM never runs its own unbounded zlib stream (it
 * hangs or asserts on truncated ones). The meta group is copied with the new transfer
 * syntax and a recomputed group length.
 */
static int inflate_dicom(struct decode_ctx *ctx, const uint8_t *in, size_t len, size_t meta_end,
			 const uint8_t **ret_p, size_t *ret_n, char *err, size_t errlen)
{
	uint8_t meta[4096];
	size_t m;
	int r = copy_meta(in, 132, meta_end, TS_PREFIX ".1", meta, sizeof(meta), &m, err, errlen);
	if (r < 0)
		return r;
	size_t prefix = 132 + 12 + m, inflated;
	r = inflate_raw(ctx, in + meta_end, len - meta_end, &ctx->infl, prefix, &inflated, err,
			errlen);
	if (r < 0)
		return r;
	write_preamble(ctx->infl.p, meta, m);
	*ret_p = ctx->infl.p;
	*ret_n = prefix + inflated;
	return 0;
}

/*
 * A copy of the file for GDCM with another transfer syntax in its meta group: GDCM 3.0.21
 * refuses to parse a data set whose syntax it does not know ("Serious bug"), HTJ2K
 * included. The stand-in has the same encoding (explicit VR little endian, encapsulated
 * pixels); GDCM reads only the elements from it, the pixels are decoded by OpenJPEG.
 */
static int restate_syntax(struct decode_ctx *ctx, const uint8_t *in, size_t len, size_t meta_end,
			  const char *ts, const uint8_t **ret_p, size_t *ret_n, char *err,
			  size_t errlen)
{
	uint8_t meta[4096];
	size_t m;
	size_t start = len >= 132 && memcmp(in + 128, "DICM", 4) == 0 ? 132 : 0;
	int r = copy_meta(in, start, meta_end, ts, meta, sizeof(meta), &m, err, errlen);
	if (r < 0)
		return r;
	size_t prefix = 132 + 12 + m, body = len - meta_end;
	r = decode_buf_reserve(ctx, &ctx->infl, (uint64_t)prefix + body, err, errlen);
	if (r < 0)
		return r;
	write_preamble(ctx->infl.p, meta, m);
	memcpy((uint8_t *)ctx->infl.p + prefix, in + meta_end, body);
	*ret_p = ctx->infl.p;
	*ret_n = prefix + body;
	return 0;
}

/* Transfer syntax names (PS3.6 annex A), for errors: the ones people meet. */
static const char *ts_name(const char *ts)
{
	static const struct {
		const char *suffix, *name;
	} names[] = {
		{ "", "Implicit VR Little Endian" },
		{ ".1", "Explicit VR Little Endian" },
		{ ".1.98", "Encapsulated Uncompressed Explicit VR Little Endian" },
		{ ".1.99", "Deflated Explicit VR Little Endian" },
		{ ".2", "Explicit VR Big Endian" },
		{ ".4.50", "JPEG Baseline (Process 1)" },
		{ ".4.51", "JPEG Extended (Process 2 & 4)" },
		{ ".4.57", "JPEG Lossless, Non-Hierarchical (Process 14)" },
		{ ".4.70", "JPEG Lossless, Non-Hierarchical, First-Order Prediction" },
		{ ".4.80", "JPEG-LS Lossless" },
		{ ".4.81", "JPEG-LS Near-Lossless" },
		{ ".4.90", "JPEG 2000 Lossless Only" },
		{ ".4.91", "JPEG 2000" },
		{ ".4.92", "JPEG 2000 Part 2 Multi-component Lossless Only" },
		{ ".4.93", "JPEG 2000 Part 2 Multi-component" },
		{ ".4.94", "JPIP Referenced" },
		{ ".4.95", "JPIP Referenced Deflate" },
		{ ".4.100", "MPEG2 Main Profile / Main Level" },
		{ ".4.100.1", "Fragmentable MPEG2 Main Profile / Main Level" },
		{ ".4.101", "MPEG2 Main Profile / High Level" },
		{ ".4.101.1", "Fragmentable MPEG2 Main Profile / High Level" },
		{ ".4.102", "MPEG-4 AVC/H.264 High Profile / Level 4.1" },
		{ ".4.102.1", "Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.1" },
		{ ".4.103", "MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1" },
		{ ".4.103.1", "Fragmentable MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1" },
		{ ".4.104", "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video" },
		{ ".4.104.1", "Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video" },
		{ ".4.105", "MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video" },
		{ ".4.105.1", "Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video" },
		{ ".4.106", "MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2" },
		{ ".4.106.1", "Fragmentable MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2" },
		{ ".4.107", "HEVC/H.265 Main Profile / Level 5.1" },
		{ ".4.108", "HEVC/H.265 Main 10 Profile / Level 5.1" },
		{ ".4.110", "JPEG XL Lossless" },
		{ ".4.111", "JPEG XL JPEG Recompression" },
		{ ".4.112", "JPEG XL" },
		{ ".4.201", "High-Throughput JPEG 2000 Image Compression (Lossless Only)" },
		{ ".4.202", "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)" },
		{ ".4.203", "High-Throughput JPEG 2000 Image Compression" },
		{ ".4.204", "JPIP HTJ2K Referenced" },
		{ ".4.205", "JPIP HTJ2K Referenced Deflate" },
		{ ".5", "RLE Lossless" },
		{ ".6.1", "RFC 2557 MIME encapsulation" },
		{ ".6.2", "XML Encoding" },
		{ ".7.1", "SMPTE ST 2110-20 Uncompressed Progressive Active Video" },
		{ ".7.2", "SMPTE ST 2110-20 Uncompressed Interlaced Active Video" },
		{ ".7.3", "SMPTE ST 2110-30 PCM Digital Audio" },
		{ ".8.1", "Deflated Image Frame Compression" },
	};
	for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
		if (ts_is(ts, names[i].suffix))
			return names[i].name;
	return "not a transfer syntax this decoder knows";
}

/* The syntaxes decoded here; anything else is refused by name before GDCM parses it. */
static bool ts_supported(const char *ts)
{
	static const char *const ok[] = { "", ".1", ".1.99", ".2", ".4.50", ".4.51", ".4.57",
					  ".4.70", ".4.80", ".4.81", ".4.90", ".4.91", ".4.201",
					  ".4.202", ".4.203", ".5" };
	for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
		if (ts_is(ts, ok[i]))
			return true;
	return false;
}

static bool ts_htj2k(const char *ts)
{
	return ts_is(ts, ".4.201") || ts_is(ts, ".4.202") || ts_is(ts, ".4.203");
}

static int unsupported_ts(const char *ts, char *err, size_t errlen)
{
	decode_seterr(err, errlen, "DICOM: transfer syntax %.64s (%s) is not supported", ts,
		      ts_name(ts));
	return -DMC_E_DECODE_FAILED;
}

/*
 * The items of the encapsulated Pixel Data, read from the file's bytes as pydicom reads
 * them: the basic offset table, then one item after the other by its length up to the
 * sequence delimiter, so that bytes inside a fragment are never taken for a tag (GDCM
 * 3.0.21 stops at a delimiter-looking pair inside fragment data). check_framing walked this
 * structure already: every item fits in the buffer.
 */
struct frag_it {
	const uint8_t *p;
	size_t off, len;
};

static void frag_begin(const struct decode_src *src, struct frag_it *it)
{
	it->p = src->u.dcm.buf;
	it->len = src->u.dcm.len;
	it->off = src->u.dcm.items_off;
}

/* 1: the next item in *ret_p, *ret_len; 0: the sequence delimiter; -1: malformed. */
static int frag_next(struct frag_it *it, const uint8_t **ret_p, uint64_t *ret_len)
{
	if (it->off == 0 || it->off > it->len || it->len - it->off < 8 ||
	    rd_le16(it->p + it->off) != 0xfffe)
		return -1;
	uint16_t e = rd_le16(it->p + it->off + 2);
	uint32_t vl = rd_le32(it->p + it->off + 4);
	if (e == 0xe0dd)
		return 0;
	if (e != 0xe000 || vl > it->len - it->off - 8)
		return -1;
	*ret_p = it->p + it->off + 8;
	*ret_len = vl;
	it->off += 8 + (size_t)vl;
	return 1;
}

/* The basic offset table (may be empty); the iterator is left at the first fragment. */
static int frag_table(const struct decode_src *src, struct frag_it *it, const uint8_t **ret_bot,
		      uint64_t *ret_botlen)
{
	frag_begin(src, it);
	return frag_next(it, ret_bot, ret_botlen) == 1 ? 0 : -1;
}

/*
 * The Modality LUT Sequence, checked now so that DECODE_F_LUT can fail at probe time with
 * the reason. Every descriptor value is checked against LUT Data here (and in the shim)
 * before decode.c indexes the table.
 */
static void modality_lut(struct gdcm_shim *sh, const struct gdcm_info *info,
			 enum decode_dtype dt, struct decode_src *ret)
{
	const uint16_t *lut = NULL;
	uint64_t n = 0;
	ret->has_lut = true;
	if (info->lut_problem) {
		ret->lut_problem = info->lut_problem;
		return;
	}
	uint64_t entries = info->lut_entries ? info->lut_entries : 65536;
	if (info->lut_bits != 8 && info->lut_bits != 16) {
		/* pydicom makes a numpy dtype 'uint<bits>' of it: only 8 and 16 exist. */
		ret->lut_problem = "the modality LUT has entries of other than 8 or 16 bits";
		return;
	}
	if (dt == DECODE_DTYPE_F32 || dt == DECODE_DTYPE_F64) {
		ret->lut_problem = "a modality LUT cannot index float pixel data";
		return;
	}
	if (gdcm_shim_modality_lut(sh, &lut, &n) < 0 || n != entries || info->lut_words < entries) {
		ret->lut_problem = "the modality LUT Data is shorter than its descriptor declares";
		return;
	}
	ret->lut = lut;
	ret->lut_entries = (uint32_t)entries;
	ret->lut_first = info->pixel_rep == 1 ? (int32_t)(int16_t)info->lut_first_raw
					      : (int32_t)info->lut_first_raw;
	ret->lut_dtype = info->lut_bits == 8 ? DECODE_DTYPE_U8 : DECODE_DTYPE_U16;
}

int dicom_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
		char *err, size_t errlen)
{
	struct gdcm_info in_;
	struct gdcm_info *info = &ret->u.dcm.info;
	const uint8_t *in_orig = in;
	struct gdcm_shim *sh = get_shim(ctx);
	int r;

	if (!sh) {
		decode_seterr(err, errlen, "out of memory");
		return -ENOMEM;
	}
	bool deflated;
	size_t meta_end, items_off;
	char file_ts[68];
	r = check_framing(in, len, &deflated, &meta_end, &items_off, file_ts, sizeof(file_ts), err,
			  errlen);
	if (r < 0)
		return r;
	if (file_ts[0] && !ts_supported(file_ts))
		return unsupported_ts(file_ts, err, errlen);
	if (deflated || ts_htj2k(file_ts)) {
		char ts2[68];
		if (deflated)
			r = inflate_dicom(ctx, in, len, meta_end, &in, &len, err, errlen);
		else
			r = restate_syntax(ctx, in, len, meta_end, TS_PREFIX ".4.90", &in, &len, err,
					   errlen);
		if (r == 0)
			r = check_framing(in, len, &deflated, &meta_end, &items_off, ts2, sizeof(ts2),
					  err, errlen);
		if (r < 0)
			return r;
	}
	ret->u.dcm.buf = in;
	ret->u.dcm.len = len;
	ret->u.dcm.items_off = items_off;
	r = gdcm_shim_load(sh, in, len, &in_, err, errlen);
	if (r < 0)
		return r;
	*info = in_;
	/* The file's own syntax, not the stand-in GDCM was shown. */
	if (ts_htj2k(file_ts))
		snprintf(info->ts, sizeof(info->ts), "%s", file_ts);
	if (!info->has_pixels) {
		decode_seterr(err, errlen, "DICOM: no pixel data");
		return -DMC_E_DECODE_FAILED;
	}
	if (info->frames_invalid) {
		decode_seterr(err, errlen, "DICOM: NumberOfFrames is not a number");
		return -DMC_E_DECODE_FAILED;
	}
	if (info->rows == 0 || info->cols == 0) {
		decode_seterr(err, errlen, "DICOM: Rows or Columns missing or zero");
		return -DMC_E_DECODE_FAILED;
	}
	/* Limits before anything else: Rows/Columns may be UL, NumberOfFrames 2^31. */
	if (info->rows > ctx->lim.max_dim || info->cols > ctx->lim.max_dim ||
	    info->frames > ctx->lim.max_frames) {
		decode_seterr(err, errlen, "DICOM: %llu x %llu pixels, %llu frames exceed the limits",
			      (unsigned long long)info->cols, (unsigned long long)info->rows,
			      (unsigned long long)info->frames);
		return -DMC_E_LIMIT_EXCEEDED;
	}
	if (info->samples != 1 && info->samples != 3) {
		decode_seterr(err, errlen, "DICOM: %llu samples per pixel are not supported",
			      (unsigned long long)info->samples);
		return -DMC_E_DECODE_FAILED;
	}
	uint64_t ba = info->bits_allocated;
	enum decode_dtype dt;
	bool sgn = info->pixel_rep == 1;
	if (info->float_bits == 32 && ba == 32)
		dt = DECODE_DTYPE_F32;
	else if (info->float_bits == 64 && ba == 64)
		dt = DECODE_DTYPE_F64;
	else if (info->float_bits)
		dt = DECODE_DTYPE_NONE;
	else if (ba == 1 && info->samples == 1)
		dt = DECODE_DTYPE_U8;
	else if (ba == 8)
		dt = sgn ? DECODE_DTYPE_I8 : DECODE_DTYPE_U8;
	else if (ba == 16)
		dt = sgn ? DECODE_DTYPE_I16 : DECODE_DTYPE_U16;
	else if (ba == 32)
		dt = sgn ? DECODE_DTYPE_I32 : DECODE_DTYPE_U32;
	else
		dt = DECODE_DTYPE_NONE;
	if (dt == DECODE_DTYPE_NONE) {
		decode_seterr(err, errlen, "DICOM: BitsAllocated %llu is not supported",
			      (unsigned long long)ba);
		return -DMC_E_DECODE_FAILED;
	}

	uint64_t total;
	if (decode_mul_u64(info->frames, info->rows, &total) ||
	    decode_mul_u64(total, info->cols, &total) ||
	    decode_mul_u64(total, info->samples, &total) ||
	    decode_mul_u64(total, decode_dtype_size(dt), &total) ||
	    total > ctx->lim.max_decode_bytes) {
		decode_seterr(err, errlen,
			      "DICOM: %llu frames of %llu x %llu x %llu exceed max_decode_bytes",
			      (unsigned long long)info->frames, (unsigned long long)info->rows,
			      (unsigned long long)info->cols, (unsigned long long)info->samples);
		return -DMC_E_LIMIT_EXCEEDED;
	}

	const char *ts = info->ts;
	if (ts_is(ts, "") || ts_is(ts, ".1") || ts_is(ts, ".2") || ts_is(ts, ".1.99")) {
		if (info->encapsulated) {
			decode_seterr(err, errlen, "DICOM: encapsulated pixel data in a native syntax");
			return -DMC_E_DECODE_FAILED;
		}
		ret->u.dcm.route = ROUTE_NATIVE;
		ret->codec = ret->u.dcm.buf != in_orig ? DECODE_CODEC_DEFLATE : DECODE_CODEC_RAW;
		if (ts_is(ts, ".2") && info->float_bits) {
			decode_seterr(err, errlen, "DICOM: big-endian float pixel data is not supported");
			return -DMC_E_DECODE_FAILED;
		}
		/* The stored size: 1-bit packed; YBR_FULL_422 keeps 2 samples per pixel. */
		uint64_t stored = total;
		if (ba == 1)
			stored = (info->frames * info->rows * info->cols + 7) / 8;
		else if (strcmp(info->photometric, "YBR_FULL_422") == 0 && info->samples == 3)
			stored = total / 3 * 2;
		if (info->pixel_bytes < stored || info->truncated) {
			decode_seterr(err, errlen,
				      "DICOM: pixel data has %llu bytes, %llu expected (truncated)",
				      (unsigned long long)info->pixel_bytes,
				      (unsigned long long)stored);
			return -DMC_E_DECODE_FAILED;
		}
	} else {
		if (!info->encapsulated) {
			decode_seterr(err, errlen, "DICOM: compressed syntax without encapsulated data");
			return -DMC_E_DECODE_FAILED;
		}
		bool jpeg8 = ba == 8 && info->bits_stored <= 8;
		if (!ret->u.dcm.items_off) {
			decode_seterr(err, errlen, "DICOM: encapsulated pixel data not at the top level");
			return -DMC_E_DECODE_FAILED;
		}
		if (ba == 1) {
			/* pydicom refuses these too (no codec defines bit-packed frames). */
			decode_seterr(err, errlen,
				      "DICOM: BitsAllocated 1 in transfer syntax %.64s (%s) is not "
				      "supported", ts, ts_name(ts));
			return -DMC_E_DECODE_FAILED;
		}
		if ((ts_is(ts, ".4.50") || ts_is(ts, ".4.51")) && jpeg8) {
			ret->u.dcm.route = ROUTE_TURBO;
			ret->codec = DECODE_CODEC_JPEG;
		} else if (ts_is(ts, ".5")) {
			ret->u.dcm.route = ROUTE_RLE;
			ret->codec = DECODE_CODEC_RLE;
		} else if (ts_is(ts, ".4.90") || ts_is(ts, ".4.91") || ts_htj2k(ts)) {
			ret->u.dcm.route = ROUTE_OPJ;
			ret->codec = ts_htj2k(ts) ? DECODE_CODEC_HTJ2K : DECODE_CODEC_JPEG_2000;
		} else {
			ret->u.dcm.route = ROUTE_GDCM;
			if (ts_is(ts, ".4.50") || ts_is(ts, ".4.51"))
				ret->codec = DECODE_CODEC_JPEG_EXTENDED;
			else if (ts_is(ts, ".4.57") || ts_is(ts, ".4.70"))
				ret->codec = DECODE_CODEC_JPEG_LOSSLESS;
			else if (ts_is(ts, ".4.80") || ts_is(ts, ".4.81"))
				ret->codec = DECODE_CODEC_JPEG_LS;
			else
				return unsupported_ts(ts, err, errlen);
		}
		/* The fragments' bytes as our own walk finds them (GDCM's sum stops early when a
		 * fragment holds delimiter-looking bytes). */
		uint64_t enc = 0;
		{
			struct frag_it it;
			const uint8_t *fp;
			uint64_t fl;
			if (frag_table(ret, &it, &fp, &fl) == 0)
				while (frag_next(&it, &fp, &fl) == 1)
					enc += fl;
		}
		ret->encoded_bytes = enc ? enc : 1;
		if (ret->u.dcm.route == ROUTE_OPJ) {
			/* OpenJPEG holds one frame as 32-bit samples. */
			ret->work_bytes = info->rows * info->cols * info->samples * 4;
		} else if (ret->u.dcm.route == ROUTE_GDCM) {
			uint64_t blen = 0;
			if (gdcm_shim_buffer_length(sh, &blen) < 0) {
				decode_seterr(err, errlen, "DICOM: GDCM cannot decode this image");
				return -DMC_E_DECODE_FAILED;
			}
			ret->work_bytes = blen;
		} else {
			ret->work_bytes = total;
		}
	}

	ret->dtype = dt;
	ret->frames = (uint32_t)info->frames;
	ret->channels = (uint32_t)info->samples;
	ret->height = (uint32_t)info->rows;
	ret->width = (uint32_t)info->cols;
	ret->slope = info->has_rescale ? info->slope : 1.0;
	ret->intercept = info->has_rescale ? info->intercept : 0.0;
	ret->has_scaling = info->has_rescale;
	if (info->has_lut_seq)
		modality_lut(sh, info, dt, ret);
	return 0;
}

/* pydicom's _convert_YBR_FULL_to_RGB, element by element in float32. */
static void ybr_to_rgb_planar(uint8_t *p, size_t npx)
{
	const float m01 = (float)(-0.114 * 1.772 / 0.587), m02 = 1.772f;
	const float m10 = 1.402f, m11 = (float)(-0.299 * 1.402 / 0.587);
	uint8_t *y = p, *cb = p + npx, *cr = p + 2 * npx;
	for (size_t i = 0; i < npx; i++) {
		float Y = y[i], B = (float)cb[i] - 128.0f, R = (float)cr[i] - 128.0f;
		float v[3];
		v[0] = Y * 1.0f + B * 0.0f + R * m10;
		v[1] = Y * 1.0f + B * m01 + R * m11;
		v[2] = Y * 1.0f + B * m02 + R * 0.0f;
		uint8_t o[3];
		for (int k = 0; k < 3; k++) {
			float f = floorf(v[k] + 0.5f);
			o[k] = f < 0.0f ? 0 : f > 255.0f ? 255 : (uint8_t)f;
		}
		y[i] = o[0];
		cb[i] = o[1];
		cr[i] = o[2];
	}
}

/* Interleaved samples of `esize` bytes into planes. */
static void deinterleave(const uint8_t *s, size_t npx, uint32_t c, size_t esize, uint8_t *d)
{
	for (uint32_t k = 0; k < c; k++) {
		uint8_t *plane = d + k * npx * esize;
		for (size_t i = 0; i < npx; i++)
			memcpy(plane + i * esize, s + (i * c + k) * esize, esize);
	}
}

static int decode_native(struct decode_ctx *ctx, const struct decode_src *src, uint32_t first,
			 uint32_t n, uint8_t *dst, char *err, size_t errlen)
{
	const struct gdcm_info *info = &src->u.dcm.info;
	const uint8_t *p;
	uint64_t plen;
	bool ow;
	int r = gdcm_shim_native(ctx->gdcm, &p, &plen, &ow);
	if (r < 0) {
		decode_seterr(err, errlen, "DICOM: cannot read the pixel data");
		return r;
	}
	const bool big = ts_is(info->ts, ".2");
	const size_t esize = decode_dtype_size(src->dtype);
	const size_t npx = (size_t)src->height * src->width;
	const uint32_t c = src->channels;
	const size_t frame_out = npx * c * esize;
	const bool ybr422 = strcmp(info->photometric, "YBR_FULL_422") == 0 && c == 3;

	if (info->bits_allocated == 1) {
		/* pydicom unpacks all bits LSB first, then cuts frames: frames need not start on
		 * a byte boundary. Big-endian OW words were swapped by GDCM: undo it. */
		for (uint32_t f = 0; f < n; f++) {
			uint64_t bit0 = (uint64_t)(first + f) * npx;
			for (size_t i = 0; i < npx; i++) {
				uint64_t b = bit0 + i;
				uint64_t byte = b / 8;
				if (big && ow)
					byte ^= 1;
				if (byte >= plen)
					return -DMC_E_DECODE_FAILED;
				dst[(size_t)f * npx + i] = (uint8_t)(p[byte] >> (b % 8) & 1);
			}
		}
		return 0;
	}

	const size_t frame_in = ybr422 ? npx * 2 * esize : frame_out;
	for (uint32_t f = 0; f < n; f++) {
		const uint8_t *fs = p + (uint64_t)(first + f) * frame_in;
		uint8_t *fd = dst + (size_t)f * frame_out;
		if ((uint64_t)(fs - p) + frame_in > plen)
			return -DMC_E_DECODE_FAILED;
		if (ybr422) {
			/* Y1 Y2 Cb Cr -> (Y1 Cb Cr) (Y2 Cb Cr), planar; 8-bit only in practice. */
			if (esize != 1) {
				decode_seterr(err, errlen, "DICOM: YBR_FULL_422 above 8 bits");
				return -DMC_E_DECODE_FAILED;
			}
			for (size_t i = 0; i < npx; i++) {
				size_t pair = i / 2;
				fd[i] = fs[pair * 4 + (i & 1)];
				fd[npx + i] = fs[pair * 4 + 2];
				fd[2 * npx + i] = fs[pair * 4 + 3];
			}
		} else if (c == 1 || info->planar == 1) {
			memcpy(fd, fs, frame_out);
		} else {
			deinterleave(fs, npx, c, esize, fd);
		}
		if (big && ow) {
			/* GDCM swapped OW as 16-bit words; pydicom reads the file's bytes as
			 * big-endian elements of BitsAllocated. */
			if (esize == 1)
				decode_swap(fd, frame_out / 2, 2);
			else if (esize == 4)
				for (size_t i = 0; i < frame_out / 4; i++) {
					uint32_t v;
					memcpy(&v, fd + i * 4, 4);
					v = v << 16 | v >> 16;
					memcpy(fd + i * 4, &v, 4);
				}
		} else if (big && !ow && esize > 1) {
			decode_swap(fd, frame_out / esize, (unsigned)esize);
		}
		if (c == 3 && esize == 1 && is_ybr_full(info->photometric))
			ybr_to_rgb_planar(fd, npx);
	}
	return 0;
}

/* Which fragments make frame k: [ret_first, ret_first + ret_n). */
static int frame_fragments(const struct decode_src *src, uint32_t frames, uint32_t k,
			   uint32_t *ret_first, uint32_t *ret_n, char *err, size_t errlen)
{
	struct frag_it it;
	const uint8_t *bot, *fp;
	uint64_t botlen, fl;
	uint32_t nfrag = 0;
	if (frag_table(src, &it, &bot, &botlen) < 0) {
		decode_seterr(err, errlen, "DICOM: no pixel data fragments");
		return -DMC_E_DECODE_FAILED;
	}
	struct frag_it first_frag = it;
	int r;
	while ((r = frag_next(&it, &fp, &fl)) == 1)
		nfrag++;
	if (r < 0 || nfrag == 0) {
		decode_seterr(err, errlen, "DICOM: no pixel data fragments");
		return -DMC_E_DECODE_FAILED;
	}
	if (frames == 1) {
		*ret_first = 0;
		*ret_n = nfrag;
		return 0;
	}
	if (nfrag == frames) {
		*ret_first = k;
		*ret_n = 1;
		return 0;
	}
	it = first_frag;
	if (botlen == (uint64_t)frames * 4) {
		/* Offsets count from the first fragment's item tag; each item has 8 header bytes. */
		uint64_t start = rd_le32(bot + 4 * (size_t)k);
		uint64_t end = k + 1 < frames ? rd_le32(bot + 4 * (size_t)(k + 1)) : UINT64_MAX;
		uint64_t off = 0;
		uint32_t a = UINT32_MAX, cnt = 0;
		for (uint32_t i = 0; i < nfrag && frag_next(&it, &fp, &fl) == 1; i++) {
			if (off >= start && off < end) {
				if (a == UINT32_MAX)
					a = i;
				cnt++;
			}
			off += 8 + fl;
		}
		if (a != UINT32_MAX) {
			*ret_first = a;
			*ret_n = cnt;
			return 0;
		}
	} else {
		/* No usable table: a frame starts at each fragment that starts with a JPEG SOI,
		 * a J2K SOC, or a JP2 signature box. */
		uint32_t frame = 0, a = UINT32_MAX, cnt = 0;
		for (uint32_t i = 0; i < nfrag && frag_next(&it, &fp, &fl) == 1; i++) {
			bool soi = fl >= 2 && fp[0] == 0xff && (fp[1] == 0xd8 || fp[1] == 0x4f);
			bool jp2 = fl >= 12 && memcmp(fp + 4, "jP  ", 4) == 0;
			if ((soi || jp2) && i > 0)
				frame++;
			if (frame == k) {
				if (a == UINT32_MAX)
					a = i;
				cnt++;
			}
		}
		if (a != UINT32_MAX) {
			*ret_first = a;
			*ret_n = cnt;
			return 0;
		}
	}
	decode_seterr(err, errlen, "DICOM: cannot find the fragments of frame %u", k);
	return -DMC_E_DECODE_FAILED;
}

/* The encoded bytes of frame k: one fragment in place, or several copied into work2. */
static int frame_bytes(struct decode_ctx *ctx, const struct decode_src *src, uint32_t k,
		       const uint8_t **ret_p, uint64_t *ret_len, char *err, size_t errlen)
{
	uint32_t a, cnt;
	int r = frame_fragments(src, src->frames, k, &a, &cnt, err, errlen);
	if (r < 0)
		return r;
	struct frag_it it, start;
	const uint8_t *bot, *fp, *p = NULL;
	uint64_t botlen, fl, plen = 0;
	if (frag_table(src, &it, &bot, &botlen) < 0)
		return -DMC_E_DECODE_FAILED;
	for (uint32_t i = 0; i < a; i++)
		if (frag_next(&it, &fp, &fl) != 1)
			return -DMC_E_DECODE_FAILED;
	start = it;
	if (cnt == 1) {
		if (frag_next(&it, &p, &plen) != 1)
			return -DMC_E_DECODE_FAILED;
	} else {
		uint64_t total = 0;
		for (uint32_t i = 0; i < cnt; i++) {
			if (frag_next(&it, &fp, &fl) != 1)
				return -DMC_E_DECODE_FAILED;
			total += fl;
		}
		r = decode_buf_reserve(ctx, &ctx->work2, total ? total : 1, err, errlen);
		if (r < 0)
			return r;
		it = start;
		uint64_t off = 0;
		for (uint32_t i = 0; i < cnt; i++) {
			if (frag_next(&it, &fp, &fl) != 1)
				return -DMC_E_DECODE_FAILED;
			if (fl) {
				memcpy((uint8_t *)ctx->work2.p + off, fp, fl);
				off += fl;
			}
		}
		p = ctx->work2.p;
		plen = off;
	}
	if (!p || plen == 0) {
		decode_seterr(err, errlen, "DICOM: empty pixel data fragment");
		return -DMC_E_DECODE_FAILED;
	}
	*ret_p = p;
	*ret_len = plen;
	return 0;
}

/*
 * pydicom decodes JPEG baseline with Photometric Interpretation RGB and no Adobe marker
 * without a color transform (the JPEG's own default would be YCbCr). TurboJPEG follows the
 * markers only, so the stream is copied with its JFIF identifier disabled and an Adobe
 * marker saying "transform 0" (RGB) inserted after SOI.
 */
static int force_rgb(struct decode_ctx *ctx, const uint8_t *p, uint64_t len, const uint8_t **ret_p,
		     uint64_t *ret_len, char *err, size_t errlen)
{
	static const uint8_t adobe[16] = { 0xff, 0xee, 0x00, 0x0e, 'A', 'd', 'o', 'b', 'e',
					   0x00, 0x64, 0x00, 0x00, 0x00, 0x00, 0x00 };
	uint64_t n = len + sizeof(adobe);
	/* Its own buffer: p may be in work2 (a multi-fragment frame), and the decode itself
	 * uses work for the interleaved pixels. */
	struct decode_buf *b = &ctx->jfix;
	int r = decode_buf_reserve(ctx, b, n, err, errlen);
	if (r < 0)
		return r;
	uint8_t *q = b->p;
	memcpy(q, p, 2);
	memcpy(q + 2, adobe, sizeof(adobe));
	memcpy(q + 2 + sizeof(adobe), p + 2, len - 2);
	/* Disable APP0 "JFIF": it would force YCbCr. Markers before the first SOS only. */
	for (uint64_t i = 2 + sizeof(adobe); i + 9 <= n;) {
		if (q[i] != 0xff)
			break;
		uint8_t m = q[i + 1];
		if (m == 0xda || m == 0xd9)
			break;
		uint32_t seg = rd_be16(q + i + 2);
		if (m == 0xe0 && seg >= 7 && memcmp(q + i + 4, "JFIF", 5) == 0)
			q[i + 7] = 'X';
		i += 2 + seg;
	}
	*ret_p = q;
	*ret_len = n;
	return 0;
}

static int decode_turbo(struct decode_ctx *ctx, const struct decode_src *src, uint32_t first,
			uint32_t n, uint8_t *dst, char *err, size_t errlen)
{
	const size_t frame_out = (size_t)src->height * src->width * src->channels;
	const bool rgb = src->channels == 3 && strcmp(src->u.dcm.info.photometric, "RGB") == 0;
	for (uint32_t f = 0; f < n; f++) {
		const uint8_t *p;
		uint64_t plen;
		int r = frame_bytes(ctx, src, first + f, &p, &plen, err, errlen);
		if (r < 0)
			return r;
		uint32_t w, h, c, bits;
		bool adobe = false, prog;
		if (rgb && jpeg_scan_header(p, (size_t)plen, &w, &h, &c, &bits, &adobe, &prog) == 0 &&
		    !adobe) {
			r = force_rgb(ctx, p, plen, &p, &plen, err, errlen);
			if (r < 0)
				return r;
		}
		r = jpeg_decode_planar(ctx, p, (size_t)plen, src->width, src->height, src->channels,
				       dst + (size_t)f * frame_out, err, errlen);
		if (r < 0)
			return r;
	}
	return 0;
}

/* One PackBits segment into `want` bytes spaced `stride` apart. */
static int rle_segment(const uint8_t *s, size_t n, uint8_t *out, size_t want, size_t stride)
{
	size_t i = 0, o = 0;
	while (o < want && i < n) {
		int8_t h = (int8_t)s[i++];
		if (h >= 0) {
			size_t cnt = (size_t)h + 1;
			if (i + cnt > n)
				return -1;
			for (size_t k = 0; k < cnt && o < want; k++)
				out[o++ * stride] = s[i + k];
			i += cnt;
		} else if (h != -128) {
			size_t cnt = (size_t)(1 - h);
			if (i >= n)
				return -1;
			uint8_t v = s[i++];
			for (size_t k = 0; k < cnt && o < want; k++)
				out[o++ * stride] = v;
		}
	}
	return o == want ? 0 : -1;
}

static int decode_rle(struct decode_ctx *ctx, const struct decode_src *src, uint32_t first,
		      uint32_t n, uint8_t *dst, char *err, size_t errlen)
{
	const size_t esize = decode_dtype_size(src->dtype);
	const size_t npx = (size_t)src->height * src->width;
	const uint32_t c = src->channels;
	const size_t frame_out = npx * c * esize;
	const uint32_t nseg = c * (uint32_t)esize;
	for (uint32_t f = 0; f < n; f++) {
		const uint8_t *p;
		uint64_t plen;
		int r = frame_bytes(ctx, src, first + f, &p, &plen, err, errlen);
		if (r < 0)
			return r;
		if (plen < 64 || rd_le32(p) != nseg) {
			decode_seterr(err, errlen, "RLE: header declares %u segments, %u expected",
				      plen >= 64 ? rd_le32(p) : 0, nseg);
			return -DMC_E_DECODE_FAILED;
		}
		uint8_t *fd = dst + (size_t)f * frame_out;
		for (uint32_t sg = 0; sg < nseg; sg++) {
			uint64_t start = rd_le32(p + 4 + 4 * sg);
			uint64_t end = sg + 1 < nseg ? rd_le32(p + 8 + 4 * sg) : plen;
			if (start < 64 || start > end || end > plen) {
				decode_seterr(err, errlen, "RLE: bad segment offsets");
				return -DMC_E_DECODE_FAILED;
			}
			/* Segment order: each sample, most significant byte first. */
			uint32_t sample = sg / (uint32_t)esize, byte = sg % (uint32_t)esize;
			size_t host_byte = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
						   ? esize - 1 - byte : byte;
			uint8_t *plane = fd + (size_t)sample * npx * esize + host_byte;
			if (rle_segment(p + start, (size_t)(end - start), plane, npx, esize) < 0) {
				decode_seterr(err, errlen, "RLE: segment %u is corrupt or short", sg);
				return -DMC_E_DECODE_FAILED;
			}
		}
		if (c == 3 && esize == 1 && is_ybr_full(src->u.dcm.info.photometric))
			ybr_to_rgb_planar(fd, npx);
	}
	return 0;
}

static void sign_extend_bits(uint8_t *p, size_t n, size_t esize, unsigned bits)
{
	for (size_t i = 0; i < n; i++) {
		if (esize == 2) {
			uint16_t v;
			memcpy(&v, p + i * 2, 2);
			uint16_t m = (uint16_t)(1u << (bits - 1));
			v = (uint16_t)(((v & (uint16_t)((1u << bits) - 1)) ^ m) - m);
			memcpy(p + i * 2, &v, 2);
		} else if (esize == 4) {
			uint32_t v;
			memcpy(&v, p + i * 4, 4);
			uint32_t m = 1u << (bits - 1);
			v = ((v & ((1u << bits) - 1)) ^ m) - m;
			memcpy(p + i * 4, &v, 4);
		} else if (esize == 1) {
			uint8_t m = (uint8_t)(1u << (bits - 1));
			p[i] = (uint8_t)(((p[i] & ((1u << bits) - 1)) ^ m) - m);
		}
	}
}

static int decode_gdcm(struct decode_ctx *ctx, const struct decode_src *src, uint32_t first,
		       uint32_t n, uint8_t *dst, char *err, size_t errlen)
{
	uint64_t blen;
	int planar, r;
	char pi[20];
	if (gdcm_shim_buffer_length(ctx->gdcm, &blen) < 0)
		return -DMC_E_DECODE_FAILED;
	const size_t esize = decode_dtype_size(src->dtype);
	const size_t npx = (size_t)src->height * src->width;
	const uint32_t c = src->channels;
	const size_t frame_bytes = npx * c * esize;
	if (blen < (uint64_t)frame_bytes * src->frames) {
		decode_seterr(err, errlen, "DICOM: GDCM buffer of %llu bytes, %llu expected",
			      (unsigned long long)blen,
			      (unsigned long long)frame_bytes * src->frames);
		return -DMC_E_DECODE_FAILED;
	}
	r = decode_buf_reserve(ctx, &ctx->work, blen, err, errlen);
	if (r < 0)
		return r;
	r = gdcm_shim_decode(ctx->gdcm, ctx->work.p, blen, &planar, pi, err, errlen);
	if (r == -DMC_E_DECODE_FAILED) {
		/* Say which stream failed: GDCM's own text names only its codec's complaint. */
		char why[200];
		const char *ts = src->u.dcm.info.ts;
		snprintf(why, sizeof(why), "%s", err ? err : "");
		if (src->codec == DECODE_CODEC_JPEG_LOSSLESS)
			decode_seterr(err, errlen,
				      "DICOM: the JPEG lossless stream is corrupt (transfer syntax "
				      "%.64s, %s): %s", ts, ts_name(ts), why);
		else
			decode_seterr(err, errlen,
				      "DICOM: the pixel data of transfer syntax %.64s (%s) cannot be "
				      "decoded: %s", ts, ts_name(ts), why);
	}
	if (r < 0)
		return r;
	/* pydicom's J2K correction: a J2K codestream may hold BitsStored-bit samples as
	 * unsigned while the header says signed; two's complement from BitsStored then. A
	 * no-op on samples that are already sign-extended. */
	const struct gdcm_info *info = &src->u.dcm.info;
	const bool sign_extend = src->codec == DECODE_CODEC_JPEG_2000 && info->pixel_rep == 1 &&
				 info->bits_stored > 0 && info->bits_stored < info->bits_allocated;
	const uint8_t *s = ctx->work.p;
	for (uint32_t f = 0; f < n; f++) {
		const uint8_t *fs = s + (size_t)(first + f) * frame_bytes;
		uint8_t *fd = dst + (size_t)f * frame_bytes;
		if (c == 1 || planar == 1)
			memcpy(fd, fs, frame_bytes);
		else
			deinterleave(fs, npx, c, esize, fd);
		if (c == 3 && esize == 1 && is_ybr_full(pi))
			ybr_to_rgb_planar(fd, npx);
		if (sign_extend)
			sign_extend_bits(fd, npx * c, esize, (unsigned)info->bits_stored);
	}
	return 0;
}

/* JPEG 2000 and HTJ2K through OpenJPEG, frame by frame from our own fragment walk. */
static int decode_opj(struct decode_ctx *ctx, const struct decode_src *src, uint32_t first,
		      uint32_t n, uint8_t *dst, char *err, size_t errlen)
{
	const struct gdcm_info *info = &src->u.dcm.info;
	const size_t esize = decode_dtype_size(src->dtype);
	const size_t npx = (size_t)src->height * src->width;
	const uint32_t c = src->channels;
	const size_t frame_out = npx * c * esize;
	/* pydicom's J2K correction, as in decode_gdcm(). */
	const bool sign_extend = info->pixel_rep == 1 && info->bits_stored > 0 &&
				 info->bits_stored < info->bits_allocated;
	char what[96];
	snprintf(what, sizeof(what), "%s (%.32s)",
		 src->codec == DECODE_CODEC_HTJ2K ? "HTJ2K" : "JPEG 2000", info->ts);
	for (uint32_t f = 0; f < n; f++) {
		const uint8_t *p;
		uint64_t plen;
		int r = frame_bytes(ctx, src, first + f, &p, &plen, err, errlen);
		if (r < 0)
			return r;
		uint8_t *fd = dst + (size_t)f * frame_out;
		r = j2k_decode_planar(ctx, p, (size_t)plen, src->width, src->height, c, esize, fd,
				      what, err, errlen);
		if (r < 0)
			return r;
		if (c == 3 && esize == 1 && is_ybr_full(info->photometric))
			ybr_to_rgb_planar(fd, npx);
		if (sign_extend)
			sign_extend_bits(fd, npx * c, esize, (unsigned)info->bits_stored);
	}
	return 0;
}

int dicom_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len,
		 const struct decode_src *src, uint32_t first, uint32_t n, void *dst, char *err,
		 size_t errlen)
{
	struct gdcm_info info;
	(void)in;
	(void)len;
	/* A no-op when the probe loaded this buffer (the input, or its inflated copy). */
	int r = gdcm_shim_load(ctx->gdcm, src->u.dcm.buf, src->u.dcm.len, &info, err, errlen);
	if (r < 0)
		return r;
	switch (src->u.dcm.route) {
	case ROUTE_NATIVE:
		return decode_native(ctx, src, first, n, dst, err, errlen);
	case ROUTE_TURBO:
		return decode_turbo(ctx, src, first, n, dst, err, errlen);
	case ROUTE_GDCM:
		return decode_gdcm(ctx, src, first, n, dst, err, errlen);
	case ROUTE_RLE:
		return decode_rle(ctx, src, first, n, dst, err, errlen);
	case ROUTE_OPJ:
		return decode_opj(ctx, src, first, n, dst, err, errlen);
	default:
		return -DMC_E_INTERNAL;
	}
}

int dicom_meta(struct decode_ctx *ctx, const uint8_t *in, size_t len, const char **ret_text,
	       size_t *ret_len, char *err, size_t errlen)
{
	struct gdcm_info info;
	struct gdcm_shim *sh = get_shim(ctx);
	(void)in;
	(void)len;
	if (!sh || !ctx->probed || ctx->src.format != DECODE_FORMAT_DICOM)
		return -DMC_E_INTERNAL;
	int r = gdcm_shim_load(sh, ctx->src.u.dcm.buf, ctx->src.u.dcm.len, &info, err, errlen);
	if (r < 0)
		return r;
	size_t cap = ctx->lim.max_meta_bytes;
	r = decode_buf_reserve(ctx, &ctx->work2, cap, err, errlen);
	if (r < 0)
		return r;
	r = gdcm_shim_json(sh, ctx->work2.p, cap, DICOM_JSON_MAX_VALUE, DICOM_JSON_MAX_INLINE,
			   DICOM_JSON_MAX_DEPTH, ret_len, err, errlen);
	if (r < 0)
		return r;
	*ret_text = ctx->work2.p;
	return 0;
}
