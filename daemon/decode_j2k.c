/*
 * decode_j2k: one JPEG 2000 or HTJ2K frame (a J2K codestream, or a JP2 file) through
 * OpenJPEG (>= 2.5 decodes HTJ2K, ISO/IEC 15444-15), from memory into planar samples.
 * Used by decode_dicom.c for transfer syntaxes .4.90/.4.91 (JPEG 2000) and .4.201-.4.203
 * (HTJ2K). The header is checked against what the DICOM data set declares before any pixel
 * is decoded, so a codestream cannot make OpenJPEG allocate more than the frame.
 * OpenJPEG's messages never reach stderr: its error messages become `err`, the others go to
 * the decode diagnostic hook (decode_diag) at debug level. One thread at a time per ctx.
 */
#include "decode_priv.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openjpeg.h>

struct memstream {
	const uint8_t *p;
	OPJ_UINT64 len, off;
};

static OPJ_SIZE_T ms_read(void *buf, OPJ_SIZE_T n, void *user)
{
	struct memstream *m = user;
	if (m->off >= m->len)
		return (OPJ_SIZE_T)-1;
	OPJ_UINT64 left = m->len - m->off;
	if ((OPJ_UINT64)n > left)
		n = (OPJ_SIZE_T)left;
	memcpy(buf, m->p + m->off, n);
	m->off += n;
	return n;
}

static OPJ_OFF_T ms_skip(OPJ_OFF_T n, void *user)
{
	struct memstream *m = user;
	if (n < 0) {
		if ((OPJ_UINT64)-n > m->off)
			return -1;
		m->off -= (OPJ_UINT64)-n;
		return n;
	}
	OPJ_UINT64 left = m->len - m->off;
	if ((OPJ_UINT64)n > left)
		n = (OPJ_OFF_T)left;
	m->off += (OPJ_UINT64)n;
	return n;
}

static OPJ_BOOL ms_seek(OPJ_OFF_T off, void *user)
{
	struct memstream *m = user;
	if (off < 0 || (OPJ_UINT64)off > m->len)
		return OPJ_FALSE;
	m->off = (OPJ_UINT64)off;
	return OPJ_TRUE;
}

/* OpenJPEG's messages: the first error is kept for `err`, everything is a diagnostic. */
struct j2k_msgs {
	char first_error[160];
};

static void msg_trim(char *s)
{
	size_t n = strlen(s);
	while (n > 0 && (s[n - 1] == '\n' || s[n - 1] == '\r' || s[n - 1] == ' '))
		s[--n] = '\0';
}

static void on_error(const char *msg, void *user)
{
	struct j2k_msgs *m = user;
	if (!m->first_error[0]) {
		snprintf(m->first_error, sizeof(m->first_error), "%s", msg ? msg : "");
		msg_trim(m->first_error);
	}
	decode_diag("openjpeg", "error: %s", msg ? msg : "");
}

static void on_warning(const char *msg, void *user)
{
	(void)user;
	decode_diag("openjpeg", "warning: %s", msg ? msg : "");
}

static void on_info(const char *msg, void *user)
{
	(void)user;
	decode_diag("openjpeg", "%s", msg ? msg : "");
}

int j2k_decode_planar(struct decode_ctx *ctx, const uint8_t *in, size_t len, uint32_t w,
		      uint32_t h, uint32_t c, size_t esize, uint8_t *dst, const char *what,
		      char *err, size_t errlen)
{
	(void)ctx;
	OPJ_CODEC_FORMAT fmt;
	if (len >= 4 && in[0] == 0xff && in[1] == 0x4f && in[2] == 0xff && in[3] == 0x51)
		fmt = OPJ_CODEC_J2K;
	else if (len >= 12 && memcmp(in + 4, "jP  ", 4) == 0)
		fmt = OPJ_CODEC_JP2;
	else {
		decode_seterr(err, errlen, "%s: the frame is neither a J2K codestream nor a JP2 file",
			      what);
		return -DMC_E_DECODE_FAILED;
	}
	struct memstream ms = { in, len, 0 };
	struct j2k_msgs msgs;
	memset(&msgs, 0, sizeof(msgs));
	opj_codec_t *codec = opj_create_decompress(fmt);
	opj_stream_t *st = opj_stream_create(OPJ_J2K_STREAM_CHUNK_SIZE, OPJ_TRUE);
	opj_image_t *img = NULL;
	int r = -DMC_E_DECODE_FAILED;
	if (!codec || !st) {
		decode_seterr(err, errlen, "out of memory in OpenJPEG");
		r = -ENOMEM;
		goto out;
	}
	opj_set_error_handler(codec, on_error, &msgs);
	opj_set_warning_handler(codec, on_warning, &msgs);
	opj_set_info_handler(codec, on_info, &msgs);
	opj_stream_set_user_data(st, &ms, NULL);
	opj_stream_set_user_data_length(st, len);
	opj_stream_set_read_function(st, ms_read);
	opj_stream_set_skip_function(st, ms_skip);
	opj_stream_set_seek_function(st, ms_seek);

	opj_dparameters_t par;
	opj_set_default_decoder_parameters(&par);
	if (!opj_setup_decoder(codec, &par) || !opj_read_header(st, codec, &img) || !img) {
		decode_seterr(err, errlen, "%s: the codestream header is corrupt%s%s", what,
			      msgs.first_error[0] ? ": " : "", msgs.first_error);
		goto out;
	}
	/* What the data set declares, before OpenJPEG allocates the image. */
	uint64_t iw = (uint64_t)img->x1 - img->x0, ih = (uint64_t)img->y1 - img->y0;
	if (img->x1 < img->x0 || img->y1 < img->y0 || iw != w || ih != h || img->numcomps != c) {
		decode_seterr(err, errlen,
			      "%s: the codestream is %llu x %llu with %u components, the data set "
			      "declares %u x %u with %u",
			      what, (unsigned long long)iw, (unsigned long long)ih, img->numcomps, w,
			      h, c);
		goto out;
	}
	for (uint32_t k = 0; k < c; k++) {
		const opj_image_comp_t *cp = &img->comps[k];
		if (cp->dx != 1 || cp->dy != 1) {
			decode_seterr(err, errlen, "%s: subsampled components are not supported",
				      what);
			goto out;
		}
		if (cp->prec == 0 || cp->prec > esize * 8 || cp->prec > 31) {
			decode_seterr(err, errlen,
				      "%s: %u-bit samples do not fit BitsAllocated %zu", what,
				      cp->prec, esize * 8);
			goto out;
		}
	}
	if (!opj_decode(codec, st, img) || !opj_end_decompress(codec, st)) {
		decode_seterr(err, errlen, "%s: the codestream is corrupt%s%s", what,
			      msgs.first_error[0] ? ": " : "", msgs.first_error);
		goto out;
	}
	const size_t npx = (size_t)w * h;
	for (uint32_t k = 0; k < c; k++) {
		const opj_image_comp_t *cp = &img->comps[k];
		if (!cp->data || cp->w != w || cp->h != h) {
			decode_seterr(err, errlen, "%s: OpenJPEG returned no samples for component %u",
				      what, k);
			goto out;
		}
		const OPJ_INT32 *s = cp->data;
		uint8_t *d = dst + (size_t)k * npx * esize;
		/* Two's complement truncated to the element size: BitsStored-bit values as the
		 * codestream holds them (decode_dicom.c applies pydicom's sign correction). */
		if (esize == 1)
			for (size_t i = 0; i < npx; i++)
				d[i] = (uint8_t)s[i];
		else if (esize == 2)
			for (size_t i = 0; i < npx; i++) {
				uint16_t v = (uint16_t)s[i];
				memcpy(d + i * 2, &v, 2);
			}
		else
			for (size_t i = 0; i < npx; i++) {
				uint32_t v = (uint32_t)s[i];
				memcpy(d + i * 4, &v, 4);
			}
	}
	r = 0;
out:
	if (img)
		opj_image_destroy(img);
	if (st)
		opj_stream_destroy(st);
	if (codec)
		opj_destroy_codec(codec);
	return r;
}
