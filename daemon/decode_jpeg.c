/*
 * decode_jpeg: JPEG files and DICOM JPEG-baseline bitstreams through TurboJPEG (the only
 * file that includes turbojpeg.h besides the context teardown in decode.c).
 *
 * Output matches Pillow's np.array(Image.open(f)) (same libjpeg-turbo, accurate DCT, fancy
 * upsampling): gray -> 1 channel, YCbCr/RGB -> RGB, CMYK/YCCK -> CMYK, inverted as Pillow
 * does for every 4-component JPEG (rawmode "CMYK;I": Adobe's convention).
 * Progressive files are limited to 500 scans (TJFLAG_LIMITSCANS): a CPU bomb is an error.
 */
#include "decode_priv.h"

#include <errno.h>
#include <string.h>

#include <jansson.h>
#include <turbojpeg.h>

int jpeg_scan_header(const uint8_t *in, size_t len, uint32_t *ret_w, uint32_t *ret_h,
		     uint32_t *ret_c, uint32_t *ret_bits, bool *ret_adobe, bool *ret_progressive)
{
	bool adobe = false, sof = false, progressive = false;
	uint32_t w = 0, h = 0, c = 0, bits = 0;
	size_t i = 2;

	if (len < 4 || in[0] != 0xff || in[1] != 0xd8)
		return -DMC_E_DECODE_FAILED;
	while (i + 4 <= len) {
		if (in[i] != 0xff)
			return -DMC_E_DECODE_FAILED;
		uint8_t m = in[i + 1];
		if (m == 0xff) { /* fill byte */
			i++;
			continue;
		}
		if (m == 0xd8 || m == 0x01 || (m >= 0xd0 && m <= 0xd7)) {
			i += 2;
			continue;
		}
		if (m == 0xd9)
			break;
		uint32_t seg = rd_be16(in + i + 2);
		if (seg < 2 || i + 2 + seg > len)
			return -DMC_E_DECODE_FAILED;
		const uint8_t *p = in + i + 4;
		uint32_t plen = seg - 2;
		/* As libjpeg (and Pillow's adobe_transform): shorter APP14s do not count. */
		if (m == 0xee && plen >= 12 && memcmp(p, "Adobe", 5) == 0)
			adobe = true;
		bool is_sof = (m >= 0xc0 && m <= 0xcf) && m != 0xc4 && m != 0xc8 && m != 0xcc;
		if (is_sof && !sof) {
			if (plen < 6)
				return -DMC_E_DECODE_FAILED;
			bits = p[0];
			h = rd_be16(p + 1);
			w = rd_be16(p + 3);
			c = p[5];
			progressive = m == 0xc2 || m == 0xc6 || m == 0xca || m == 0xce;
			sof = true;
		}
		if (m == 0xda)
			break;
		i += 2 + seg;
	}
	if (!sof)
		return -DMC_E_DECODE_FAILED;
	*ret_w = w;
	*ret_h = h;
	*ret_c = c;
	*ret_bits = bits;
	*ret_adobe = adobe;
	*ret_progressive = progressive;
	return 0;
}

static void free_tj(void *tj)
{
	tjDestroy(tj);
}

static tjhandle get_tj(struct decode_ctx *ctx, char *err, size_t errlen)
{
	if (!ctx->tj) {
		ctx->tj = tjInitDecompress();
		if (!ctx->tj)
			decode_seterr(err, errlen, "TurboJPEG: %s", tjGetErrorStr2(NULL));
		ctx->free_tj = free_tj;
	}
	return ctx->tj;
}

static int channels_of(int colorspace)
{
	switch (colorspace) {
	case TJCS_GRAY:
		return 1;
	case TJCS_CMYK:
	case TJCS_YCCK:
		return 4;
	default:
		return 3;
	}
}

int jpeg_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
	       char *err, size_t errlen)
{
	uint32_t w, h, c, bits;
	bool adobe, progressive;
	int tw, th, subsamp, cs;

	if (jpeg_scan_header(in, len, &w, &h, &c, &bits, &adobe, &progressive) < 0) {
		decode_seterr(err, errlen, "JPEG: no frame header before the image data");
		return -DMC_E_DECODE_FAILED;
	}
	if (bits != 8) {
		decode_seterr(err, errlen, "JPEG: %u-bit samples are not supported", bits);
		return -DMC_E_DECODE_FAILED;
	}
	if (w == 0 || h == 0 || c == 0) {
		decode_seterr(err, errlen, "JPEG: empty frame %u x %u x %u", w, h, c);
		return -DMC_E_DECODE_FAILED;
	}
	ret->codec = DECODE_CODEC_JPEG;
	ret->dtype = DECODE_DTYPE_U8;
	ret->frames = 1;
	ret->height = h;
	ret->width = w;
	ret->channels = c == 1 ? 1 : c == 4 ? 4 : 3;
	ret->encoded_bytes = len;
	uint64_t px = (uint64_t)w * h;
	tjhandle tj = get_tj(ctx, err, errlen);
	if (!tj)
		return -ENOMEM;
	if (tjDecompressHeader3(tj, in, len, &tw, &th, &subsamp, &cs) != 0) {
		decode_seterr(err, errlen, "JPEG: %s", tjGetErrorStr2(tj));
		return -DMC_E_DECODE_FAILED;
	}
	if ((uint32_t)tw != w || (uint32_t)th != h) {
		decode_seterr(err, errlen, "JPEG: inconsistent frame header");
		return -DMC_E_DECODE_FAILED;
	}
	ret->channels = (uint32_t)channels_of(cs);
	ret->work_bytes = ret->channels > 1 ? px * ret->channels : 0;
	ret->u.jpg.subsamp = subsamp;
	ret->u.jpg.colorspace = cs;
	ret->u.jpg.adobe = adobe;
	ret->u.jpg.progressive = progressive;
	return 0;
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/* RGB -> planes, 16 pixels (48 bytes) per step with SSSE3 byte shuffles: a scalar loop
 * costs ~0.5 ms per 512x512 image, 30 % of the decode itself. */
__attribute__((target("ssse3"))) static size_t deinterleave3_ssse3(const uint8_t *s, size_t n,
								    uint8_t *r, uint8_t *g,
								    uint8_t *b)
{
#define M(...) _mm_setr_epi8(__VA_ARGS__)
	const __m128i ra = M(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
	const __m128i rb = M(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1);
	const __m128i rc = M(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13);
	const __m128i ga = M(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
	const __m128i gb = M(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1);
	const __m128i gc = M(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14);
	const __m128i ba = M(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
	const __m128i bb = M(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1);
	const __m128i bc = M(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15);
#undef M
	size_t i = 0;
	for (; i + 16 <= n; i += 16) {
		const uint8_t *p = s + 3 * i;
		__m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
		__m128i y = _mm_loadu_si128((const __m128i *)(const void *)(p + 16));
		__m128i z = _mm_loadu_si128((const __m128i *)(const void *)(p + 32));
		__m128i vr = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(x, ra), _mm_shuffle_epi8(y, rb)),
					  _mm_shuffle_epi8(z, rc));
		__m128i vg = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(x, ga), _mm_shuffle_epi8(y, gb)),
					  _mm_shuffle_epi8(z, gc));
		__m128i vb = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(x, ba), _mm_shuffle_epi8(y, bb)),
					  _mm_shuffle_epi8(z, bc));
		_mm_storeu_si128((__m128i *)(void *)(r + i), vr);
		_mm_storeu_si128((__m128i *)(void *)(g + i), vg);
		_mm_storeu_si128((__m128i *)(void *)(b + i), vb);
	}
	return i;
}
#endif

static void deinterleave3(const uint8_t *s, size_t n, uint8_t *d)
{
	uint8_t *r = d, *g = d + n, *b = d + 2 * n;
	size_t i = 0;
#if defined(__x86_64__) || defined(__i386__)
	if (__builtin_cpu_supports("ssse3"))
		i = deinterleave3_ssse3(s, n, r, g, b);
#endif
	for (; i < n; i++) {
		r[i] = s[3 * i];
		g[i] = s[3 * i + 1];
		b[i] = s[3 * i + 2];
	}
}

static void deinterleave4(const uint8_t *s, size_t n, uint8_t *d, bool invert)
{
	uint8_t *c0 = d, *c1 = d + n, *c2 = d + 2 * n, *c3 = d + 3 * n;
	const uint8_t x = invert ? 0xff : 0x00;
	for (size_t i = 0; i < n; i++) {
		c0[i] = s[4 * i] ^ x;
		c1[i] = s[4 * i + 1] ^ x;
		c2[i] = s[4 * i + 2] ^ x;
		c3[i] = s[4 * i + 3] ^ x;
	}
}

int jpeg_decode_planar(struct decode_ctx *ctx, const uint8_t *in, size_t len, uint32_t w,
		       uint32_t h, uint32_t c, uint8_t *dst, char *err, size_t errlen)
{
	int tw, th, subsamp, cs;
	tjhandle tj = get_tj(ctx, err, errlen);
	if (!tj)
		return -ENOMEM;
	if (tjDecompressHeader3(tj, in, len, &tw, &th, &subsamp, &cs) != 0) {
		decode_seterr(err, errlen, "JPEG: %s", tjGetErrorStr2(tj));
		return -DMC_E_DECODE_FAILED;
	}
	if ((uint32_t)tw != w || (uint32_t)th != h || (uint32_t)channels_of(cs) != c) {
		decode_seterr(err, errlen,
			      "JPEG: bitstream is %d x %d x %d, expected %u x %u x %u", tw, th,
			      channels_of(cs), w, h, c);
		return -DMC_E_DECODE_FAILED;
	}
	size_t npx = (size_t)w * h;
	int pf = c == 1 ? TJPF_GRAY : c == 4 ? TJPF_CMYK : TJPF_RGB;
	uint8_t *target = dst;
	if (c > 1) {
		int r = decode_buf_reserve(ctx, &ctx->work, (uint64_t)npx * c, err, errlen);
		if (r < 0)
			return r;
		target = ctx->work.p;
	}
	if (tjDecompress2(tj, in, (unsigned long)len, target, (int)w, 0, (int)h, pf,
			  TJFLAG_LIMITSCANS) != 0) {
		const char *msg = tjGetErrorStr2(tj);
		/* Warnings leave a complete image, except a truncated file, which the reference
		 * decoders reject: treat it as corrupt. */
		if (tjGetErrorCode(tj) != TJERR_WARNING || strstr(msg, "Premature end")) {
			decode_seterr(err, errlen, "JPEG: %s", msg);
			return -DMC_E_DECODE_FAILED;
		}
	}
	if (c == 3)
		deinterleave3(target, npx, dst);
	else if (c == 4)
		deinterleave4(target, npx, dst, true);
	return 0;
}

int jpeg_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len,
		const struct decode_src *src, uint32_t first, uint32_t n, void *dst, char *err,
		size_t errlen)
{
	(void)first;
	(void)n;
	return jpeg_decode_planar(ctx, in, len, src->width, src->height, src->channels, dst, err,
				  errlen);
}

int jpeg_meta(struct decode_ctx *ctx, const struct decode_src *src, void *json_obj)
{
	static const char *const sub[] = { "4:4:4", "4:2:2", "4:2:0", "gray", "4:4:0", "4:1:1" };
	static const char *const cs[] = { "RGB", "YCbCr", "gray", "CMYK", "YCCK" };
	json_t *o = json_obj;
	(void)ctx;
	json_object_set_new(o, "width", json_integer(src->width));
	json_object_set_new(o, "height", json_integer(src->height));
	json_object_set_new(o, "components", json_integer(src->channels));
	if (src->u.jpg.subsamp >= 0 && src->u.jpg.subsamp < 6)
		json_object_set_new(o, "subsampling", json_string(sub[src->u.jpg.subsamp]));
	if (src->u.jpg.colorspace >= 0 && src->u.jpg.colorspace < 5)
		json_object_set_new(o, "colorspace", json_string(cs[src->u.jpg.colorspace]));
	json_object_set_new(o, "progressive", json_boolean(src->u.jpg.progressive));
	json_object_set_new(o, "adobe", json_boolean(src->u.jpg.adobe));
	return 0;
}
