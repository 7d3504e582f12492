/*
 * fuzz_decode_common: the body shared by the fuzz_decode_* targets. Probes, then decodes
 * the whole item, one frame with the modality LUT, a dtype conversion, and the metadata,
 * with limits small enough for libFuzzer's -rss_limit_mb.
 */
#include <stdint.h>
#include <stdlib.h>

#include "decode.h"

#define FUZZ_MAX_DECODE_BYTES (64u << 20)

int fuzz_decode_one(enum decode_format want, const uint8_t *data, size_t size);

int fuzz_decode_one(enum decode_format want, const uint8_t *data, size_t size)
{
	static struct decode_ctx *ctx;
	static char meta[1 << 16];
	struct decode_limits lim;
	struct decode_desc d;
	char err[256];
	size_t mlen;

	if (decode_sniff(data, size) != want)
		return 0;
	if (!ctx) {
		decode_limits_default(&lim);
		lim.max_decode_bytes = FUZZ_MAX_DECODE_BYTES;
		lim.max_meta_bytes = sizeof(meta) - 4096;
		ctx = decode_ctx_new(&lim);
		if (!ctx)
			abort();
	}
	if (decode_probe(ctx, data, size, NULL, &d, err, sizeof(err)) == 0) {
		void *out = malloc(d.nbytes ? (size_t)d.nbytes : 1);
		if (!out)
			abort();
		decode_run(ctx, data, size, NULL, out, (size_t)d.nbytes, err, sizeof(err));
		free(out);
		struct decode_opts o = { DECODE_F_FRAME | DECODE_F_LUT, d.src_frames - 1,
					 DECODE_DTYPE_NONE };
		if (decode_probe(ctx, data, size, &o, &d, err, sizeof(err)) == 0) {
			out = malloc(d.nbytes ? (size_t)d.nbytes : 1);
			if (!out)
				abort();
			decode_meta(ctx, data, size, &o, meta, sizeof(meta), &mlen, err, sizeof(err));
			decode_run(ctx, data, size, &o, out, (size_t)d.nbytes, err, sizeof(err));
			free(out);
		}
		struct decode_opts u8 = { 0, 0, DECODE_DTYPE_U8 };
		if (decode_probe(ctx, data, size, &u8, &d, err, sizeof(err)) == 0) {
			out = malloc(d.nbytes ? (size_t)d.nbytes : 1);
			if (!out)
				abort();
			decode_run(ctx, data, size, &u8, out, (size_t)d.nbytes, err, sizeof(err));
			free(out);
		}
	}
	/* Forget large scratch, as a worker does between jobs. */
	decode_ctx_trim(ctx, 8u << 20);
	return 0;
}

