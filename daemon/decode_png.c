/*
 * decode_png: PNG through libspng (the only file that includes spng.h).
 *
 * Every bit depth and color type. Samples are kept as stored (SPNG_FMT_PNG: no palette
 * expansion, no tRNS, no gamma), as Pillow's np.array(Image.open(f)) does, except that
 * 16-bit color stays 16-bit (Pillow keeps only the high byte). Gray below 8 bits follows
 * Pillow: 1-bit gives 0/1, 2-bit and 4-bit are scaled to 0..255; palette indices are never
 * scaled. A libspng context cannot be reused after a decode, so each item creates one.
 */
#include "decode_priv.h"

#include <errno.h>
#include <string.h>

#include <jansson.h>
#include <spng.h>

/* Ancillary chunk memory (text, ICC profiles) per image. */
#define PNG_CHUNK_CACHE_MAX (16u << 20)

void png_release(struct decode_src *src)
{
	if (src->u.png.spng) {
		spng_ctx_free(src->u.png.spng);
		src->u.png.spng = NULL;
	}
}

static uint32_t channels_of(uint8_t color_type)
{
	switch (color_type) {
	case SPNG_COLOR_TYPE_GRAYSCALE:
	case SPNG_COLOR_TYPE_INDEXED:
		return 1;
	case SPNG_COLOR_TYPE_GRAYSCALE_ALPHA:
		return 2;
	case SPNG_COLOR_TYPE_TRUECOLOR:
		return 3;
	case SPNG_COLOR_TYPE_TRUECOLOR_ALPHA:
		return 4;
	default:
		return 0;
	}
}

int png_probe(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *ret,
	      char *err, size_t errlen)
{
	struct spng_ihdr ihdr;
	int r;
	spng_ctx *s = spng_ctx_new(0);
	if (!s) {
		decode_seterr(err, errlen, "out of memory");
		return -ENOMEM;
	}
	ret->u.png.spng = s;
	size_t chunk_max = len < (size_t)INT32_MAX ? len : (size_t)INT32_MAX;
	if ((r = spng_set_chunk_limits(s, chunk_max, PNG_CHUNK_CACHE_MAX)) != 0 ||
	    (r = spng_set_png_buffer(s, in, len)) != 0 || (r = spng_get_ihdr(s, &ihdr)) != 0) {
		decode_seterr(err, errlen, "PNG: %s", spng_strerror(r));
		return r == SPNG_ECHUNK_LIMITS ? -DMC_E_LIMIT_EXCEEDED : -DMC_E_DECODE_FAILED;
	}
	uint32_t c = channels_of(ihdr.color_type);
	if (c == 0) {
		decode_seterr(err, errlen, "PNG: invalid color type %u", ihdr.color_type);
		return -DMC_E_DECODE_FAILED;
	}
	ret->codec = DECODE_CODEC_PNG;
	ret->dtype = ihdr.bit_depth == 16 ? DECODE_DTYPE_U16 : DECODE_DTYPE_U8;
	ret->frames = 1;
	ret->channels = c;
	ret->height = ihdr.height;
	ret->width = ihdr.width;
	ret->encoded_bytes = len;
	/* Packed rows of the stored format; 64-bit, checked by the caller. */
	uint64_t row = ((uint64_t)ihdr.width * c * ihdr.bit_depth + 7) / 8;
	ret->work_bytes = row * ihdr.height;
	ret->u.png.bit_depth = ihdr.bit_depth;
	ret->u.png.color_type = ihdr.color_type;
	ret->u.png.interlace = ihdr.interlace_method;
	return 0;
}

int png_decode(struct decode_ctx *ctx, const uint8_t *in, size_t len, struct decode_src *src,
	       uint32_t first, uint32_t n, void *dst, char *err, size_t errlen)
{
	(void)in;
	(void)len;
	(void)first;
	(void)n;
	spng_ctx *s = src->u.png.spng;
	size_t sz;
	int r;
	if (!s)
		return -DMC_E_INTERNAL;
	if ((r = spng_decoded_image_size(s, SPNG_FMT_PNG, &sz)) != 0) {
		decode_seterr(err, errlen, "PNG: %s", spng_strerror(r));
		return -DMC_E_DECODE_FAILED;
	}
	const uint32_t w = src->width, h = src->height, c = src->channels;
	const unsigned depth = src->u.png.bit_depth;
	const size_t npx = (size_t)w * h;
	const size_t elem = depth == 16 ? 2 : 1;

	/* One channel at 8 or 16 bits: the stored layout is the output layout. */
	if (c == 1 && depth >= 8) {
		if (sz != npx * elem) {
			decode_seterr(err, errlen, "PNG: unexpected decoded size");
			return -DMC_E_DECODE_FAILED;
		}
		if ((r = spng_decode_image(s, dst, sz, SPNG_FMT_PNG, 0)) != 0) {
			decode_seterr(err, errlen, "PNG: %s", spng_strerror(r));
			return -DMC_E_DECODE_FAILED;
		}
		return 0;
	}
	r = decode_buf_reserve(ctx, &ctx->work, sz, err, errlen);
	if (r < 0)
		return r;
	/* libspng deinterlaces packed (< 8-bit) pixels by OR-ing bits into the buffer. */
	if (src->u.png.interlace && depth < 8)
		memset(ctx->work.p, 0, sz);
	if ((r = spng_decode_image(s, ctx->work.p, sz, SPNG_FMT_PNG, 0)) != 0) {
		decode_seterr(err, errlen, "PNG: %s", spng_strerror(r));
		return -DMC_E_DECODE_FAILED;
	}
	const uint8_t *sp = ctx->work.p;
	if (depth < 8) {
		/* Packed gray or palette, one channel, rows padded to a byte. */
		size_t row = ((size_t)w * depth + 7) / 8;
		if (sz < row * h) {
			decode_seterr(err, errlen, "PNG: unexpected decoded size");
			return -DMC_E_DECODE_FAILED;
		}
		unsigned mult = 1;
		if (src->u.png.color_type == SPNG_COLOR_TYPE_GRAYSCALE)
			mult = depth == 2 ? 85 : depth == 4 ? 17 : 1;
		unsigned mask = (1u << depth) - 1;
		uint8_t *d = dst;
		for (uint32_t y = 0; y < h; y++) {
			const uint8_t *rp = sp + (size_t)y * row;
			for (uint32_t x = 0; x < w; x++) {
				size_t bit = (size_t)x * depth;
				unsigned v = rp[bit / 8] >> (8 - depth - bit % 8) & mask;
				d[(size_t)y * w + x] = (uint8_t)(v * mult);
			}
		}
		return 0;
	}
	if (sz != npx * c * elem) {
		decode_seterr(err, errlen, "PNG: unexpected decoded size");
		return -DMC_E_DECODE_FAILED;
	}
	if (elem == 1) {
		uint8_t *d = dst;
		for (uint32_t k = 0; k < c; k++)
			for (size_t i = 0; i < npx; i++)
				d[k * npx + i] = sp[i * c + k];
	} else {
		uint16_t *d = dst;
		const uint16_t *s16 = (const uint16_t *)(const void *)sp;
		for (uint32_t k = 0; k < c; k++)
			for (size_t i = 0; i < npx; i++)
				d[k * npx + i] = s16[i * c + k];
	}
	return 0;
}

int png_meta(struct decode_ctx *ctx, const struct decode_src *src, void *json_obj)
{
	static const char *const types[] = { "gray", "", "rgb", "palette", "gray-alpha", "",
					     "rgba" };
	json_t *o = json_obj;
	(void)ctx;
	json_object_set_new(o, "width", json_integer(src->width));
	json_object_set_new(o, "height", json_integer(src->height));
	json_object_set_new(o, "bit_depth", json_integer(src->u.png.bit_depth));
	if (src->u.png.color_type < 7)
		json_object_set_new(o, "color_type", json_string(types[src->u.png.color_type]));
	json_object_set_new(o, "interlaced", json_boolean(src->u.png.interlace != 0));
	return 0;
}
