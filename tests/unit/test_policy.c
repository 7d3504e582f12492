/*
 * Unit tests of daemon/policy.c: the float16/bfloat16 roundings against independent
 * computations (the compiler's _Float16 conversion; bfloat16 rounded in double), and the
 * steps on small PNGs (libspng encodes them): channels, crop/pad with saturation, limits,
 * refused policies and the key.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <spng.h>

#include "policy.h"
#include "task.h"

static void *png(uint32_t w, uint32_t h, uint8_t color, const uint8_t *img, size_t len,
		 size_t *ret_len)
{
	spng_ctx *e = spng_ctx_new(SPNG_CTX_ENCODER);
	struct spng_ihdr ihdr = { w, h, 8, color, 0, 0, 0 };
	void *out = NULL;
	int err = 0;

	spng_set_option(e, SPNG_ENCODE_TO_BUFFER, 1);
	spng_set_ihdr(e, &ihdr);
	if (spng_encode_image(e, img, len, SPNG_FMT_PNG, SPNG_ENCODE_FINALIZE) == 0)
		out = spng_get_png_buffer(e, ret_len, &err);
	spng_ctx_free(e);
	return out;
}

static struct decode_ctx *ctx_with(uint64_t max_bytes)
{
	struct decode_limits lim;

	decode_limits_default(&lim);
	if (max_bytes)
		lim.max_decode_bytes = max_bytes;
	return decode_ctx_new(&lim);
}

/* probe + run; *out malloc'd (free it) on success */
static int apply(struct decode_ctx *ctx, const void *in, size_t len, enum decode_dtype dtype,
		 const struct dmc_policy *pol, struct decode_desc *d, void **out)
{
	struct decode_opts o = { 0, 0, dtype };
	char err[256];
	int r = policy_probe(ctx, in, len, &o, pol, d, err, sizeof(err));

	*out = NULL;
	if (r < 0)
		return r;
	*out = malloc(d->nbytes ? (size_t)d->nbytes : 1);
	r = policy_run(ctx, in, len, &o, pol, *out, (size_t)d->nbytes, err, sizeof(err));
	if (r < 0) {
		free(*out);
		*out = NULL;
	}
	return r;
}

TEST(float16_equals_the_compilers_conversion)
{
	/* every 1021st float bit pattern; every 17th between the smallest half subnormal and
	 * the first normal half, where the roundings are subtle */
	uint64_t checked = 0;

	for (uint64_t u = 0; u <= UINT32_MAX; u += 1021) {
		uint32_t x = (uint32_t)u;
		float f;
		memcpy(&f, &x, 4);
		_Float16 h = (_Float16)f;
		uint16_t want;
		memcpy(&want, &h, 2);
		if (isnan(f)) {
			uint16_t got = policy_f16_bits(f);
			ASSERT((got & 0x7c00u) == 0x7c00u && (got & 0x3ffu) != 0); /* a NaN */
			continue;
		}
		if (policy_f16_bits(f) != want)
			ASSERT_EQ(policy_f16_bits(f), want);
		checked++;
	}
	for (uint32_t x = 0x33000000u - 4096; x < 0x38800000u + 4096; x += 17) {
		float f;
		memcpy(&f, &x, 4);
		_Float16 h = (_Float16)f;
		uint16_t want;
		memcpy(&want, &h, 2);
		if (policy_f16_bits(f) != want)
			ASSERT_EQ(policy_f16_bits(f), want);
	}
	ASSERT_GT(checked, 4000000);
}

/* bfloat16 independently: f rounded to 8 significant bits in double, nearest even. */
static uint16_t bf16_by_double(float f)
{
	int e = ilogb(f);
	double q, r;
	float g;
	uint32_t x;

	if (f == 0 || isinf(f))
		r = f;
	else {
		if (e < -126)
			e = -126; /* subnormal floats share the smallest exponent's quantum */
		q = ldexp(1.0, e - 7);
		r = nearbyint((double)f / q) * q;
	}
	g = (float)r; /* exact, or past FLT_MAX: infinity, as the rounding carries */
	memcpy(&x, &g, 4);
	return (uint16_t)(x >> 16);
}

TEST(bfloat16_rounds_to_nearest_even)
{
	for (uint64_t u = 0; u <= UINT32_MAX; u += 509) {
		uint32_t x = (uint32_t)u;
		float f;
		memcpy(&f, &x, 4);
		if (isnan(f)) {
			ASSERT_EQ(policy_bf16_bits(f), 0x7fc0);
			continue;
		}
		if (policy_bf16_bits(f) != bf16_by_double(f))
			ASSERT_EQ(policy_bf16_bits(f), bf16_by_double(f));
	}
}

TEST(channels_of_gray_alpha_and_rgb)
{
	uint8_t ga[2 * 3 * 2], rgb[3 * 3 * 2];
	struct dmc_policy to1 = { DMC_POLICY_CHANNELS, 0, 0, 0, 1, 0, 0, 0 };
	struct dmc_policy to3 = { DMC_POLICY_CHANNELS, 0, 0, 0, 3, 0, 0, 0 };
	struct decode_ctx *ctx = ctx_with(0);
	struct decode_desc d;
	size_t n;
	void *in, *out;

	for (size_t i = 0; i < sizeof(ga); i++)
		ga[i] = (uint8_t)(i * 37 + 5);
	for (size_t i = 0; i < sizeof(rgb); i++)
		rgb[i] = (uint8_t)(i * 53 + 11);
	/* gray+alpha (interleaved in the file; planar out): 1 keeps the gray, 3 repeats it */
	in = png(3, 2, SPNG_COLOR_TYPE_GRAYSCALE_ALPHA, ga, sizeof(ga), &n);
	ASSERT_NOT_NULL(in);
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &to1, &d, &out), 0);
	ASSERT_EQ(d.channels, 1);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_U8);
	for (int i = 0; i < 6; i++)
		ASSERT_EQ(((uint8_t *)out)[i], ga[2 * i]);
	free(out);
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &to3, &d, &out), 0);
	ASSERT_EQ(d.channels, 3);
	ASSERT_UINT_EQ(d.nbytes, 18);
	for (int k = 0; k < 3; k++)
		for (int i = 0; i < 6; i++)
			ASSERT_EQ(((uint8_t *)out)[k * 6 + i], ga[2 * i]);
	free(out);
	free(in);
	/* RGB to 1: the luma, float32; to int16 when asked (rounded) */
	in = png(3, 2, SPNG_COLOR_TYPE_TRUECOLOR, rgb, sizeof(rgb), &n);
	ASSERT_NOT_NULL(in);
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &to1, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_F32);
	for (int i = 0; i < 6; i++) {
		double y = 0.299 * rgb[3 * i] + 0.587 * rgb[3 * i + 1] + 0.114 * rgb[3 * i + 2];
		ASSERT(((float *)out)[i] == (float)y);
	}
	free(out);
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_I16, &to1, &d, &out), 0);
	ASSERT_EQ(d.dtype, DECODE_DTYPE_I16);
	for (int i = 0; i < 6; i++) {
		double y = 0.299 * rgb[3 * i] + 0.587 * rgb[3 * i + 1] + 0.114 * rgb[3 * i + 2];
		ASSERT_EQ(((int16_t *)out)[i], (int16_t)nearbyint((float)y));
	}
	free(out);
	free(in);
	decode_ctx_free(ctx);
}

TEST(crop_pad_saturate_and_limits)
{
	uint8_t g[5 * 4];
	struct dmc_policy crop = { DMC_POLICY_CROP, 0, 2, 7, 0, 300.0, 0, 0 };
	struct dmc_policy pad = { DMC_POLICY_PAD, 0, 6, 3, 0, -3.0, 0, 0 };
	struct dmc_policy huge = { DMC_POLICY_SIZE, DMC_RESIZE_BILINEAR, 65535, 65535, 0, 0, 0, 0 };
	struct dmc_policy bad = { DMC_POLICY_SIZE, 0, 8, 8, 0, 0, 0, 0 };
	struct decode_ctx *ctx = ctx_with(1u << 20);
	struct decode_desc d;
	const uint8_t *o;
	size_t n;
	void *in, *out;

	for (size_t i = 0; i < sizeof(g); i++)
		g[i] = (uint8_t)(i + 1);
	in = png(5, 4, SPNG_COLOR_TYPE_GRAYSCALE, g, sizeof(g), &n);
	ASSERT_NOT_NULL(in);
	/* crop 2x7 of 4x5: rows 1..2, columns -1..5: one column of pad each side (300 -> 255) */
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &crop, &d, &out), 0);
	ASSERT_EQ(d.height, 2);
	ASSERT_EQ(d.width, 7);
	o = out;
	for (int y = 0; y < 2; y++)
		for (int x = 0; x < 7; x++)
			ASSERT_EQ(o[y * 7 + x], x == 0 || x == 6 ? 255 : g[(y + 1) * 5 + x - 1]);
	free(out);
	/* pad 6x3: top-left, cut at the right, -3 saturates to 0 in uint8, -3 in int16 */
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_I16, &pad, &d, &out), 0);
	for (int y = 0; y < 6; y++)
		for (int x = 0; x < 3; x++)
			ASSERT_EQ(((int16_t *)out)[y * 3 + x], y < 4 ? g[y * 5 + x] : -3);
	free(out);
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &pad, &d, &out), 0);
	ASSERT_EQ(((uint8_t *)out)[5 * 3], 0);
	free(out);
	/* 65535 x 65535 float32 is past max_decode_bytes; a refused policy is refused */
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &huge, &d, &out), -DMC_E_LIMIT_EXCEEDED);
	ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_NONE, &bad, &d, &out), -DMC_E_INVALID_ARGUMENT);
	/* float16 alone: no op, yet the worker's business (decoded as float32) */
	{
		struct decode_opts o16 = { 0, 0, DECODE_DTYPE_F16 }, dec;
		struct dmc_policy none = { 0 };
		ASSERT(policy_active(&o16, &none));
		policy_decoder_opts(&o16, &none, &dec);
		ASSERT_EQ(dec.dtype, DECODE_DTYPE_F32);
		ASSERT_EQ(apply(ctx, in, n, DECODE_DTYPE_F16, &none, &d, &out), 0);
		ASSERT_EQ(d.dtype, DECODE_DTYPE_F16);
		ASSERT_UINT_EQ(d.nbytes, 40);
		ASSERT_EQ(((uint16_t *)out)[19], policy_f16_bits(20.0f));
		free(out);
	}
	free(in);
	decode_ctx_free(ctx);
}

TEST(key_is_canonical)
{
	struct dmc_policy a = { DMC_POLICY_CROP, 0, 8, 8, 0, 0.0, 0, 0 }, b = a;
	struct dmc_policy none = { 0 };

	b.pad_value = -0.0;
	ASSERT(policy_key(&a) == policy_key(&b));
	ASSERT(policy_key(&a) != 0);
	ASSERT(policy_key(&none) == 0);
	b.pad_value = 1.0;
	ASSERT(policy_key(&a) != policy_key(&b));
	b = a;
	b.ops = DMC_POLICY_PAD;
	ASSERT(policy_key(&a) != policy_key(&b));
	b = a;
	b.width = 9;
	ASSERT(policy_key(&a) != policy_key(&b));
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(float16_equals_the_compilers_conversion), T(bfloat16_rounds_to_nearest_even),
		  T(channels_of_gray_alpha_and_rgb), T(crop_pad_saturate_and_limits),
		  T(key_is_canonical));
}
