/*
 * policy: the uniformity policy of an OPEN (proto.h, DMC_OPEN_POLICY) applied to a decoded
 * item: CT window, channels, resize / center crop / pad, and the output dtype, including
 * float16 and bfloat16 (which no decoder produces).
 *
 * Owns: the policy arithmetic and its output descriptor, and the canonical key of a policy
 * (part of the key of the decoded tensors the daemon keeps). Pure like decode.h: no I/O,
 * no logging, no globals; scratch memory is allocated per call and freed before return.
 *
 * Threads: runs inside the decode worker processes (decode_worker.c), one job at a time,
 * on a decode_ctx that the worker owns; policy_key() and policy_active() are also called
 * on the daemon's loop thread (serve_request.c), they only read their arguments.
 *
 * The steps, in order (proto.h has the contract):
 *   decode   with policy_decoder_opts(): the modality LUT and float64 when a window is
 *            asked, float32 when the output is float16/bfloat16, else as asked;
 *   window   y = clip((x - (center - width / 2)) / width, 0, 1) in double, stored float32;
 *   channels 1 -> 3 repeated; 2 (gray+alpha) -> gray; 4 -> its first 3; 3/4 -> 1 by the
 *            luma 0.299 R + 0.587 G + 0.114 B (double, stored float32);
 *   geometry SIZE: Pillow's resampling of float32 ("F") planes for BILINEAR (triangle
 *            filter) and AREA (Pillow's BOX), the same coefficients and two passes
 *            (horizontal first, float32 in between), so values equal Pillow's; NEAREST
 *            takes source floor((x + 0.5) * in / out) in integers (Pillow's NEAREST, but
 *            exact where Pillow's floating point lands below an integer position).
 *            CROP: centered window, offset floor((in - out) / 2); outside the source,
 *            pad_value. PAD: source at the top-left, pad_value elsewhere, cut when larger;
 *   dtype    the asked dtype (integers: rounded to nearest, saturated, NaN 0; float16 and
 *            bfloat16: the value as float32, then rounded to nearest even, as numpy's
 *            astype(float16) and torch's .to(torch.bfloat16)); none asked: float32 when a
 *            step computed new values, else the decoded dtype.
 */
#ifndef DMC_POLICY_H
#define DMC_POLICY_H

#include <stdbool.h>
#include <stdint.h>

#include "decode.h"
#include "proto.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Whether `opts` + `pol` need this file (a policy op, or a float16/bfloat16 output). */
bool policy_active(const struct decode_opts *opts, const struct dmc_policy *pol);

/* The options the decoder runs with for `opts` + `pol`. */
void policy_decoder_opts(const struct decode_opts *opts, const struct dmc_policy *pol,
			 struct decode_opts *ret);

/*
 * As decode_probe(), the descriptor being the policy's output (dtype, channels, height,
 * width, nbytes; src_frames and the rest as the decoder's). Limits: every buffer within
 * max_decode_bytes (-DMC_E_LIMIT_EXCEEDED). A pol that dmc_policy_check() refuses, or
 * with dtype F16/BF16 requested and no policy: fine; a bad pol: -DMC_E_INVALID_ARGUMENT.
 */
int policy_probe(struct decode_ctx *ctx, const void *in, size_t len,
		 const struct decode_opts *opts, const struct dmc_policy *pol,
		 struct decode_desc *ret_desc, char *err, size_t errlen);

/* As decode_run(): decodes `in` and applies the policy into `out` (>= the probe's nbytes). */
int policy_run(struct decode_ctx *ctx, const void *in, size_t len,
	       const struct decode_opts *opts, const struct dmc_policy *pol, void *out,
	       size_t out_len, char *err, size_t errlen);

/*
 * A 64-bit fingerprint of the policy's canonical fields (-0.0 as 0.0): equal policies give
 * equal keys. 0 for an inactive policy (no op).
 */
uint64_t policy_key(const struct dmc_policy *pol);

/* float32 -> float16 bits as numpy's npy_floatbits_to_halfbits; -> bfloat16 bits as
 * torch's round_to_nearest_even (NaN: 0x7FC0). */
uint16_t policy_f16_bits(float f);
uint16_t policy_bf16_bits(float f);

#ifdef __cplusplus
}
#endif

#endif
