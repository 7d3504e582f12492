/*
 * policy: the uniformity policy of an OPEN applied to a decoded item. See policy.h.
 *
 * Built with -ffp-contract=off (daemon/meson.build): the resampling sums must round like
 * Pillow's, one multiply and one add at a time.
 */
#include "policy.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* A tensor in the making: (f, c, h, w) of dtype t at p (owned by the caller). */
struct tens {
	uint8_t *p;
	enum decode_dtype t;
	uint32_t f, c, h, w;
};

static void seterr(char *err, size_t errlen, const char *msg)
{
	if (err && errlen) {
		strncpy(err, msg, errlen - 1);
		err[errlen - 1] = '\0';
	}
}

/* ---- element access ---- */

static double get(const uint8_t *p, enum decode_dtype t, size_t i)
{
	switch (t) {
#define G(T, C)                                                                                   \
	case T: {                                                                                  \
		C v;                                                                               \
		memcpy(&v, p + i * sizeof(C), sizeof(C));                                          \
		return (double)v;                                                                  \
	}
		G(DECODE_DTYPE_U8, uint8_t)
		G(DECODE_DTYPE_I8, int8_t)
		G(DECODE_DTYPE_U16, uint16_t)
		G(DECODE_DTYPE_I16, int16_t)
		G(DECODE_DTYPE_U32, uint32_t)
		G(DECODE_DTYPE_I32, int32_t)
		G(DECODE_DTYPE_U64, uint64_t)
		G(DECODE_DTYPE_I64, int64_t)
		G(DECODE_DTYPE_F32, float)
		G(DECODE_DTYPE_F64, double)
#undef G
	case DECODE_DTYPE_NONE:
	case DECODE_DTYPE_F16: /* outputs only: never read back */
	case DECODE_DTYPE_BF16:
		break;
	}
	return 0;
}

/* Round to nearest (even) and saturate into [lo, hi]; NaN becomes 0 (as decode.c). */
static double sat(double v, double lo, double hi)
{
	if (isnan(v))
		return 0;
	v = nearbyint(v);
	return v < lo ? lo : v > hi ? hi : v;
}

uint16_t policy_f16_bits(float f)
{
	uint32_t x, e, sig;
	uint16_t sgn;

	memcpy(&x, &f, sizeof(x));
	sgn = (uint16_t)((x & 0x80000000u) >> 16);
	e = x & 0x7f800000u;
	if (e >= 0x47800000u) { /* overflow, inf, NaN */
		sig = x & 0x007fffffu;
		if (e == 0x7f800000u && sig) {
			uint16_t r = (uint16_t)(0x7c00u + (sig >> 13));
			return (uint16_t)(sgn + (r == 0x7c00u ? r + 1 : r));
		}
		return (uint16_t)(sgn + 0x7c00u);
	}
	if (e <= 0x38000000u) { /* a subnormal half, or zero */
		if (e < 0x33000000u)
			return sgn;
		e >>= 23;
		sig = 0x00800000u + (x & 0x007fffffu);
		sig >>= (113 - e);
		if ((sig & 0x00003fffu) != 0x00001000u || (x & 0x000007ffu))
			sig += 0x00001000u;
		return (uint16_t)(sgn + (sig >> 13));
	}
	sig = x & 0x007fffffu;
	if ((sig & 0x00003fffu) != 0x00001000u)
		sig += 0x00001000u;
	/* a carry out of the significand increments the exponent: right, up to inf */
	return (uint16_t)(sgn + (((e - 0x38000000u) >> 13) + (sig >> 13)));
}

uint16_t policy_bf16_bits(float f)
{
	uint32_t x;

	if (isnan(f))
		return 0x7fc0;
	memcpy(&x, &f, sizeof(x));
	return (uint16_t)((x + (((x >> 16) & 1u) + 0x7fffu)) >> 16);
}

static void put(uint8_t *p, enum decode_dtype t, size_t i, double v)
{
	switch (t) {
#define P(T, C, LO, HI)                                                                           \
	case T: {                                                                                  \
		C c = (C)sat(v, LO, HI);                                                           \
		memcpy(p + i * sizeof(C), &c, sizeof(C));                                          \
		return;                                                                            \
	}
		P(DECODE_DTYPE_U8, uint8_t, 0, 255)
		P(DECODE_DTYPE_I8, int8_t, -128, 127)
		P(DECODE_DTYPE_U16, uint16_t, 0, 65535)
		P(DECODE_DTYPE_I16, int16_t, -32768, 32767)
		P(DECODE_DTYPE_U32, uint32_t, 0, 4294967295.0)
		P(DECODE_DTYPE_I32, int32_t, -2147483648.0, 2147483647.0)
		/* the largest doubles below 2^64 and 2^63: the casts stay defined */
		P(DECODE_DTYPE_U64, uint64_t, 0, 18446744073709549568.0)
		P(DECODE_DTYPE_I64, int64_t, -9223372036854775808.0, 9223372036854774784.0)
#undef P
	case DECODE_DTYPE_F32: {
		float c = (float)v;
		memcpy(p + i * 4, &c, 4);
		return;
	}
	case DECODE_DTYPE_F64:
		memcpy(p + i * 8, &v, 8);
		return;
	case DECODE_DTYPE_F16:
	case DECODE_DTYPE_BF16: {
		float c = (float)v; /* the value as float32 first, then rounded again */
		uint16_t b = t == DECODE_DTYPE_F16 ? policy_f16_bits(c) : policy_bf16_bits(c);
		memcpy(p + i * 2, &b, 2);
		return;
	}
	case DECODE_DTYPE_NONE:
		return;
	}
}

/* ---- the descriptor ---- */

static bool half_dtype(enum decode_dtype t)
{
	return t == DECODE_DTYPE_F16 || t == DECODE_DTYPE_BF16;
}

bool policy_active(const struct decode_opts *opts, const struct dmc_policy *pol)
{
	return (pol && pol->ops) || (opts && half_dtype(opts->dtype));
}

void policy_decoder_opts(const struct decode_opts *opts, const struct dmc_policy *pol,
			 struct decode_opts *ret)
{
	static const struct decode_opts none = { 0, 0, DECODE_DTYPE_NONE };

	*ret = opts ? *opts : none;
	if (pol && (pol->ops & DMC_POLICY_WINDOW)) {
		ret->flags |= DECODE_F_LUT;
		ret->dtype = DECODE_DTYPE_F64;
	} else if (half_dtype(ret->dtype)) {
		ret->dtype = DECODE_DTYPE_F32;
	}
}

static uint64_t tens_bytes(uint32_t f, uint32_t c, uint32_t h, uint32_t w, enum decode_dtype t)
{
	/* each factor < 2^32 and f * c < 2^23 (limits): checked for overflow anyway */
	unsigned __int128 n = (unsigned __int128)f * c * h * w * decode_dtype_size(t);

	return n > UINT64_MAX ? UINT64_MAX : (uint64_t)n;
}

/* The step-by-step dtype and shape: what each step makes from the decoded descriptor. */
struct plan {
	struct tens window, channels, geometry; /* p unused: dtype and shape after each */
	bool luma, resample;
	struct tens out;
};

static void make_plan(const struct decode_desc *d, enum decode_dtype asked,
		      const struct dmc_policy *pol, struct plan *pl)
{
	struct tens cur = { NULL, d->dtype, d->frames, d->channels, d->height, d->width };

	memset(pl, 0, sizeof(*pl));
	if (pol->ops & DMC_POLICY_WINDOW)
		cur.t = DECODE_DTYPE_F32;
	pl->window = cur;
	if ((pol->ops & DMC_POLICY_CHANNELS) && pol->channels != cur.c) {
		pl->luma = pol->channels == 1 && cur.c >= 3;
		if (pl->luma)
			cur.t = DECODE_DTYPE_F32;
		cur.c = pol->channels;
	}
	pl->channels = cur;
	if (pol->ops & DMC_POLICY_GEOMETRY) {
		cur.h = pol->height;
		cur.w = pol->width;
		pl->resample = (pol->ops & DMC_POLICY_SIZE) && pol->resize != DMC_RESIZE_NEAREST;
		if (pl->resample)
			cur.t = DECODE_DTYPE_F32;
	}
	pl->geometry = cur;
	if (asked != DECODE_DTYPE_NONE)
		cur.t = asked;
	pl->out = cur;
}

static int check_pol(const struct decode_opts *opts, const struct dmc_policy *pol, char *err,
		     size_t errlen)
{
	if (dmc_policy_check(pol) != DMC_PROTO_OK ||
	    (opts && (unsigned)opts->dtype > DECODE_DTYPE_ALL_LAST_)) {
		seterr(err, errlen, "invalid uniformity policy");
		return -DMC_E_INVALID_ARGUMENT;
	}
	return 0;
}

static int check_plan(const struct plan *pl, uint64_t max, char *err, size_t errlen)
{
	const struct tens *steps[] = { &pl->window, &pl->channels, &pl->geometry, &pl->out };

	const struct tens *in = &pl->channels;

	/* resampling holds one float32 plane of the input and one of h x out-width more */
	if (pl->resample && (tens_bytes(1, 1, in->h, in->w, DECODE_DTYPE_F32) > max ||
			     tens_bytes(1, 1, in->h, pl->geometry.w, DECODE_DTYPE_F32) > max)) {
		seterr(err, errlen, "the item under the uniformity policy exceeds the decoded-size "
				    "limit");
		return -DMC_E_LIMIT_EXCEEDED;
	}
	for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
		const struct tens *t = steps[i];
		if (tens_bytes(t->f, t->c, t->h, t->w, t->t) > max) {
			seterr(err, errlen, "the item under the uniformity policy exceeds the "
					    "decoded-size limit");
			return -DMC_E_LIMIT_EXCEEDED;
		}
	}
	return 0;
}

int policy_probe(struct decode_ctx *ctx, const void *in, size_t len,
		 const struct decode_opts *opts, const struct dmc_policy *pol,
		 struct decode_desc *ret_desc, char *err, size_t errlen)
{
	static const struct dmc_policy none;
	struct decode_opts dop;
	struct plan pl;
	int r;

	if (!pol)
		pol = &none;
	if ((r = check_pol(opts, pol, err, errlen)) < 0)
		return r;
	policy_decoder_opts(opts, pol, &dop);
	r = decode_probe(ctx, in, len, &dop, ret_desc, err, errlen);
	if (r < 0 || !policy_active(opts, pol))
		return r;
	make_plan(ret_desc, opts ? opts->dtype : DECODE_DTYPE_NONE, pol, &pl);
	if ((r = check_plan(&pl, decode_ctx_limits(ctx)->max_decode_bytes, err, errlen)) < 0)
		return r;
	ret_desc->dtype = pl.out.t;
	ret_desc->channels = pl.out.c;
	ret_desc->height = pl.out.h;
	ret_desc->width = pl.out.w;
	ret_desc->nbytes = tens_bytes(pl.out.f, pl.out.c, pl.out.h, pl.out.w, pl.out.t);
	return 0;
}

/* ---- the steps ---- */

static size_t tens_count(const struct tens *t)
{
	return (size_t)t->f * t->c * t->h * t->w;
}

static int tens_alloc(struct tens *t)
{
	size_t n = (size_t)tens_bytes(t->f, t->c, t->h, t->w, t->t);

	t->p = malloc(n ? n : 1);
	return t->p ? 0 : -ENOMEM;
}

static int step_window(struct tens *cur, const struct dmc_policy *pol, const struct tens *shape)
{
	struct tens o = *shape;
	double lo = pol->window_center - pol->window_width / 2.0;
	size_t n = tens_count(cur);

	if (tens_alloc(&o) < 0)
		return -ENOMEM;
	for (size_t i = 0; i < n; i++) {
		double y = (get(cur->p, cur->t, i) - lo) / pol->window_width;
		y = y < 0.0 ? 0.0 : y > 1.0 ? 1.0 : y;
		put(o.p, DECODE_DTYPE_F32, i, y);
	}
	free(cur->p);
	*cur = o;
	return 0;
}

static int step_channels(struct tens *cur, bool luma, const struct tens *shape)
{
	struct tens o = *shape;
	size_t plane = (size_t)cur->h * cur->w, es = decode_dtype_size(cur->t);

	if (tens_alloc(&o) < 0)
		return -ENOMEM;
	for (uint32_t f = 0; f < cur->f; f++) {
		const uint8_t *src = cur->p + (size_t)f * cur->c * plane * es;
		if (luma) {
			for (size_t i = 0; i < plane; i++) {
				double r = get(src, cur->t, i), g = get(src, cur->t, plane + i),
				       b = get(src, cur->t, 2 * plane + i);
				put(o.p, DECODE_DTYPE_F32, (size_t)f * plane + i,
				    0.299 * r + 0.587 * g + 0.114 * b);
			}
			continue;
		}
		for (uint32_t k = 0; k < o.c; k++) {
			/* to 3: gray (or gray+alpha's gray) repeated, RGBA's RGB; to 1: the gray */
			uint32_t from = cur->c <= 2 ? 0 : k;
			memcpy(o.p + ((size_t)f * o.c + k) * plane * es, src + from * plane * es,
			       plane * es);
		}
	}
	free(cur->p);
	*cur = o;
	return 0;
}

/* The source index of output index i for NEAREST / CROP / PAD; -1 outside the source. */
static int64_t src_index(const struct dmc_policy *pol, uint32_t in, uint32_t out, uint32_t i)
{
	int64_t d = (int64_t)in - out, off, s;

	if (pol->ops & DMC_POLICY_SIZE)
		return (int64_t)(((2 * (uint64_t)i + 1) * in) / (2 * (uint64_t)out));
	off = (pol->ops & DMC_POLICY_PAD) ? 0 : d >= 0 ? d / 2 : -((-d + 1) / 2);
	s = (int64_t)i + off;
	return s >= 0 && s < in ? s : -1;
}

static int step_copy_geometry(struct tens *cur, const struct dmc_policy *pol,
			      const struct tens *shape)
{
	struct tens o = *shape;
	size_t es = decode_dtype_size(cur->t);
	size_t ipl = (size_t)cur->h * cur->w, opl = (size_t)o.h * o.w;
	int64_t *sx = malloc(((size_t)o.w + o.h) * sizeof(*sx)), *sy;
	uint8_t padv[8];

	if (!sx)
		return -ENOMEM;
	if (tens_alloc(&o) < 0) {
		free(sx);
		return -ENOMEM;
	}
	sy = sx + o.w;
	for (uint32_t x = 0; x < o.w; x++)
		sx[x] = src_index(pol, cur->w, o.w, x);
	for (uint32_t y = 0; y < o.h; y++)
		sy[y] = src_index(pol, cur->h, o.h, y);
	put(padv, cur->t, 0, pol->pad_value);
	for (size_t k = 0; k < (size_t)cur->f * cur->c; k++) {
		const uint8_t *src = cur->p + k * ipl * es;
		uint8_t *dst = o.p + k * opl * es;
		for (uint32_t y = 0; y < o.h; y++) {
			for (uint32_t x = 0; x < o.w; x++) {
				uint8_t *d = dst + ((size_t)y * o.w + x) * es;
				if (sy[y] < 0 || sx[x] < 0)
					memcpy(d, padv, es);
				else
					memcpy(d, src + ((size_t)sy[y] * cur->w + (size_t)sx[x]) * es,
					       es);
			}
		}
	}
	free(sx);
	free(cur->p);
	*cur = o;
	return 0;
}

/* Pillow's resampling (libImaging/Resample.c): filters, coefficients, two passes. */
static double filter_bilinear(double x)
{
	if (x < 0.0)
		x = -x;
	return x < 1.0 ? 1.0 - x : 0.0;
}

static double filter_box(double x)
{
	return x > -0.5 && x <= 0.5 ? 1.0 : 0.0;
}

struct coeffs {
	int ksize;
	int *bounds; /* per output: first source index, count */
	double *kk;  /* per output: ksize weights */
};

static int precompute(uint32_t in_size, uint32_t out_size, double (*filter)(double),
		      double support0, struct coeffs *c)
{
	double scale = (double)(float)in_size / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
	double support = support0 * filterscale;

	c->ksize = (int)ceil(support) * 2 + 1;
	c->bounds = malloc((size_t)out_size * 2 * sizeof(*c->bounds));
	c->kk = calloc((size_t)out_size * (size_t)c->ksize, sizeof(*c->kk));
	if (!c->bounds || !c->kk) {
		free(c->bounds);
		free(c->kk);
		return -ENOMEM;
	}
	for (uint32_t xx = 0; xx < out_size; xx++) {
		double center = (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
		int xmin = (int)(center - support + 0.5), xmax = (int)(center + support + 0.5);
		double *k = &c->kk[(size_t)xx * (size_t)c->ksize];

		if (xmin < 0)
			xmin = 0;
		if (xmax > (int)in_size)
			xmax = (int)in_size;
		xmax -= xmin;
		for (int x = 0; x < xmax; x++) {
			double w = filter((x + xmin - center + 0.5) * ss);
			k[x] = w;
			ww += w;
		}
		for (int x = 0; x < xmax; x++)
			if (ww != 0.0)
				k[x] /= ww;
		c->bounds[xx * 2] = xmin;
		c->bounds[xx * 2 + 1] = xmax;
	}
	return 0;
}

/* One float32 plane (h, w) -> (oh, ow). `tmp` holds h * ow floats. */
static void resample_plane(const float *in, uint32_t h, uint32_t w, float *out, uint32_t oh,
			   uint32_t ow, const struct coeffs *ch, const struct coeffs *cv,
			   float *tmp)
{
	bool need_h = ow != w, need_v = oh != h;
	int yfirst = cv->bounds[0], ylast = cv->bounds[oh * 2 - 2] + cv->bounds[oh * 2 - 1];
	const float *src = in;
	uint32_t sw = w;
	int yoff = 0;

	if (need_h) {
		/* only the rows the vertical pass reads, as Pillow's ybox_first .. ybox_last */
		for (int yy = 0; yy < ylast - yfirst; yy++) {
			for (uint32_t xx = 0; xx < ow; xx++) {
				int xmin = ch->bounds[xx * 2], xmax = ch->bounds[xx * 2 + 1];
				const double *k = &ch->kk[(size_t)xx * (size_t)ch->ksize];
				double ss = 0.0;
				for (int x = 0; x < xmax; x++)
					ss += in[(size_t)(yy + yfirst) * w + (size_t)(x + xmin)] * k[x];
				tmp[(size_t)yy * ow + xx] = (float)ss;
			}
		}
		src = tmp;
		sw = ow;
		yoff = yfirst;
	}
	if (!need_v) {
		/* identical rows: Pillow's image after the horizontal pass, or a copy */
		memcpy(out, src, (size_t)oh * ow * sizeof(float));
		return;
	}
	for (uint32_t yy = 0; yy < oh; yy++) {
		int ymin = cv->bounds[yy * 2] - yoff, ymax = cv->bounds[yy * 2 + 1];
		const double *k = &cv->kk[(size_t)yy * (size_t)cv->ksize];
		for (uint32_t xx = 0; xx < sw; xx++) {
			double ss = 0.0;
			for (int y = 0; y < ymax; y++)
				ss += src[(size_t)(y + ymin) * sw + xx] * k[y];
			out[(size_t)yy * ow + xx] = (float)ss;
		}
	}
}

static int step_resample(struct tens *cur, const struct dmc_policy *pol,
			 const struct tens *shape)
{
	struct tens o = *shape;
	double (*filter)(double) = pol->resize == DMC_RESIZE_AREA ? filter_box : filter_bilinear;
	double support = pol->resize == DMC_RESIZE_AREA ? 0.5 : 1.0;
	size_t ipl = (size_t)cur->h * cur->w, opl = (size_t)o.h * o.w;
	struct coeffs ch = { 0 }, cv = { 0 };
	float *plane = NULL, *tmp = NULL;
	int r = -ENOMEM;

	if (tens_alloc(&o) < 0)
		return -ENOMEM;
	plane = malloc(ipl * sizeof(float));
	tmp = malloc((size_t)cur->h * o.w * sizeof(float) + 1);
	if (!plane || !tmp || precompute(cur->w, o.w, filter, support, &ch) < 0)
		goto out;
	if (precompute(cur->h, o.h, filter, support, &cv) < 0)
		goto out;
	for (size_t k = 0; k < (size_t)cur->f * cur->c; k++) {
		for (size_t i = 0; i < ipl; i++)
			plane[i] = (float)get(cur->p, cur->t, k * ipl + i); /* Pillow's "F" image */
		resample_plane(plane, cur->h, cur->w, (float *)(void *)(o.p + k * opl * 4), o.h,
			       o.w, &ch, &cv, tmp);
	}
	r = 0;
out:
	free(ch.bounds);
	free(ch.kk);
	free(cv.bounds);
	free(cv.kk);
	free(plane);
	free(tmp);
	if (r < 0) {
		free(o.p);
		return r;
	}
	free(cur->p);
	*cur = o;
	return 0;
}

int policy_run(struct decode_ctx *ctx, const void *in, size_t len,
	       const struct decode_opts *opts, const struct dmc_policy *pol, void *out,
	       size_t out_len, char *err, size_t errlen)
{
	static const struct dmc_policy none;
	struct decode_opts dop;
	struct decode_desc d;
	struct plan pl;
	struct tens cur = { 0 };
	int r;

	if (!pol)
		pol = &none;
	if ((r = check_pol(opts, pol, err, errlen)) < 0)
		return r;
	policy_decoder_opts(opts, pol, &dop);
	if (!policy_active(opts, pol))
		return decode_run(ctx, in, len, &dop, out, out_len, err, errlen);
	/* the probe of the same input and options is kept by ctx: decode_run reuses it */
	if ((r = decode_probe(ctx, in, len, &dop, &d, err, errlen)) < 0)
		return r;
	make_plan(&d, opts ? opts->dtype : DECODE_DTYPE_NONE, pol, &pl);
	if ((r = check_plan(&pl, decode_ctx_limits(ctx)->max_decode_bytes, err, errlen)) < 0)
		return r;
	if (tens_bytes(pl.out.f, pl.out.c, pl.out.h, pl.out.w, pl.out.t) > out_len) {
		seterr(err, errlen, "output buffer too small");
		return -DMC_E_INVALID_ARGUMENT;
	}
	cur = (struct tens){ NULL, d.dtype, d.frames, d.channels, d.height, d.width };
	if (tens_alloc(&cur) < 0)
		goto nomem;
	if ((r = decode_run(ctx, in, len, &dop, cur.p, d.nbytes, err, errlen)) < 0) {
		free(cur.p);
		return r;
	}
	if ((pol->ops & DMC_POLICY_WINDOW) && step_window(&cur, pol, &pl.window) < 0)
		goto nomem;
	if (cur.c != pl.channels.c && step_channels(&cur, pl.luma, &pl.channels) < 0)
		goto nomem;
	if (pol->ops & DMC_POLICY_GEOMETRY) {
		r = pl.resample ? step_resample(&cur, pol, &pl.geometry)
				: step_copy_geometry(&cur, pol, &pl.geometry);
		if (r < 0)
			goto nomem;
	}
	if (cur.t == pl.out.t) {
		memcpy(out, cur.p, (size_t)tens_bytes(cur.f, cur.c, cur.h, cur.w, cur.t));
	} else {
		size_t n = tens_count(&cur);
		for (size_t i = 0; i < n; i++)
			put(out, pl.out.t, i, get(cur.p, cur.t, i));
	}
	free(cur.p);
	return 0;
nomem:
	free(cur.p);
	seterr(err, errlen, "out of memory");
	return -ENOMEM;
}

/* ---- the key ---- */

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const uint8_t *b = p;

	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ull;
	}
	return h;
}

static uint64_t fnv_u32(uint64_t h, uint32_t v)
{
	uint8_t b[4] = { (uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24) };

	return fnv(h, b, 4);
}

static uint64_t fnv_f64(uint64_t h, double v)
{
	uint64_t u;

	if (v == 0.0)
		v = 0.0; /* -0.0 and 0.0 are one policy */
	memcpy(&u, &v, sizeof(u));
	for (int i = 0; i < 8; i++)
		h = fnv(h, &(uint8_t){ (uint8_t)(u >> (8 * i)) }, 1);
	return h;
}

uint64_t policy_key(const struct dmc_policy *pol)
{
	uint64_t h = 0xcbf29ce484222325ull;

	if (!pol || !pol->ops)
		return 0;
	h = fnv_u32(h, pol->ops);
	h = fnv_u32(h, pol->resize);
	h = fnv_u32(h, pol->height);
	h = fnv_u32(h, pol->width);
	h = fnv_u32(h, pol->channels);
	h = fnv_f64(h, pol->pad_value);
	h = fnv_f64(h, pol->window_center);
	h = fnv_f64(h, pol->window_width);
	return h ? h : 1;
}
