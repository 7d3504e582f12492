/*
 * decode_gdcm: the C face of GDCM (decode_gdcm.cc is the only file that includes GDCM).
 *
 * A shim holds one parsed DICOM data set (gdcm::Reader) and reuses it while the caller
 * passes the same buffer again, so that probe, decode and metadata parse a file once. GDCM's
 * exceptions and its trace output never leave the shim: failures come back as
 * -DMC_E_DECODE_FAILED (or -ENOMEM) with GDCM's last message in `err`; its messages, and what
 * its bundled C codecs print to `stderr` during a call (the C stream is swapped for a memory
 * stream meanwhile), go to decode_diag(). One thread at a time, in the whole process.
 *
 * Input buffers are borrowed: the shim may keep a pointer to the last one until the next
 * call or gdcm_shim_free(), so the caller keeps it alive and unchanged meanwhile.
 */
#ifndef DMC_DECODE_GDCM_H
#define DMC_DECODE_GDCM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The image attributes, read from the raw elements (Rows may be encoded as UL: X2). */
struct gdcm_info {
	char ts[68];            /* transfer syntax UID, NUL-terminated, trailing pad removed */
	char photometric[20];   /* e.g. "MONOCHROME2", "YBR_FULL_422" */
	uint64_t rows, cols, frames, samples;
	uint64_t bits_allocated, bits_stored, high_bit, pixel_rep, planar;
	double slope, intercept;
	bool has_rescale;       /* RescaleSlope or RescaleIntercept present */
	bool has_lut_seq;       /* Modality LUT Sequence present with at least one item */
	/* Its first item (the only one pydicom's apply_modality_lut reads), when lut_problem is
	 * NULL: LUT Descriptor as stored, and the length of LUT Data in 16-bit words. */
	uint32_t lut_entries;   /* Descriptor[0]: 0 means 65536 */
	uint16_t lut_first_raw; /* Descriptor[1]: signed (SS) with PixelRepresentation 1 */
	uint32_t lut_bits;      /* Descriptor[2] */
	uint64_t lut_words;     /* 16-bit words of LUT Data */
	const char *lut_problem; /* static text: why the LUT cannot be read, or NULL */
	bool has_pixels;        /* Pixel Data, Float or Double Float Pixel Data present */
	bool encapsulated;      /* Pixel Data is a sequence of fragments */
	bool frames_invalid;    /* NumberOfFrames present but not a non-negative integer */
	bool truncated;         /* the file ends inside the pixel data */
	unsigned float_bits;    /* 32 or 64 for Float / Double Float Pixel Data, else 0 */
	uint64_t pixel_bytes;   /* native: value length; encapsulated: sum of fragment lengths */
};

struct gdcm_shim;

/* NULL only on out-of-memory. Also silences GDCM's trace output (process-wide). */
struct gdcm_shim *gdcm_shim_new(void);
void gdcm_shim_free(struct gdcm_shim *sh);

/*
 * Forgets the loaded data set. The parse of a buffer is reused while the same pointer and
 * length come again; a caller that puts other bytes at the same address must call this.
 */
void gdcm_shim_unload(struct gdcm_shim *sh);

/* Parses buf (borrowed, see above) and fills *ret. */
int gdcm_shim_load(struct gdcm_shim *sh, const void *buf, size_t len, struct gdcm_info *ret,
		   char *err, size_t errlen);

/* Native pixel data of the loaded data set, little endian as GDCM keeps it in memory
 * (GDCM swaps big-endian files as 16-bit words); borrowed until the next load. *ret_ow says
 * whether the element's VR is OW (or unknown with 16-bit words). */
int gdcm_shim_native(struct gdcm_shim *sh, const uint8_t **ret_p, uint64_t *ret_len,
		     bool *ret_ow);

/* The LUT Data of the Modality LUT Sequence's first item as 16-bit values in host order
 * (US and OW alike, one entry per word as pydicom reads them), at most
 * max(lut_entries, 65536 when 0) of them: *ret_n gets how many. Borrowed until the next
 * load. -DMC_E_DECODE_FAILED when there is no usable LUT. */
int gdcm_shim_modality_lut(struct gdcm_shim *sh, const uint16_t **ret_p, uint64_t *ret_n);

/* Encapsulated pixel data: number of fragments (after the basic offset table), each
 * fragment, and the basic offset table (may be empty). Borrowed until the next load. */
int gdcm_shim_fragment_count(struct gdcm_shim *sh, uint32_t *ret_n);
int gdcm_shim_fragment(struct gdcm_shim *sh, uint32_t i, const uint8_t **ret_p,
		       uint64_t *ret_len);
int gdcm_shim_offset_table(struct gdcm_shim *sh, const uint8_t **ret_p, uint64_t *ret_len);

/*
 * Decodes all frames through GDCM's codecs into dst (dst_len >= the value returned by
 * gdcm_shim_buffer_length). The output is frame after frame, each in GDCM's layout:
 * *ret_planar says whether samples are planar (1) or interleaved (0); *ret_photometric
 * (>= 20 bytes) gets the photometric interpretation of the output.
 */
int gdcm_shim_buffer_length(struct gdcm_shim *sh, uint64_t *ret_len);
int gdcm_shim_decode(struct gdcm_shim *sh, void *dst, uint64_t dst_len, int *ret_planar,
		     char *ret_photometric, char *err, size_t errlen);

/*
 * The data set in the DICOM JSON model (PS3.18 annex F), pixel data and group lengths
 * excluded, into out (capacity cap, NUL-terminated). Values longer than max_value bytes and
 * inline binaries longer than max_inline bytes are left out (the element keeps its "vr");
 * sequences nest at most max_depth levels; elements that would make the text longer than
 * cap - 1 are left out. *ret_len gets the length without the NUL.
 */
int gdcm_shim_json(struct gdcm_shim *sh, char *out, size_t cap, size_t max_value,
		   size_t max_inline, unsigned max_depth, size_t *ret_len, char *err,
		   size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
