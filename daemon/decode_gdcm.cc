/*
 * decode_gdcm: GDCM behind a C interface (see decode_gdcm.h). The only file that includes
 * GDCM. Every entry point catches every exception: GDCM is treated as hostile code that may
 * throw anything, and its trace output is captured instead of reaching stderr.
 */
#include "decode_gdcm.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <istream>
#include <memory>
#include <new>
#include <sstream>
#include <streambuf>
#include <string>
#include <vector>

#include <unistd.h>

/* GDCM's own headers trip clang's -Wdeprecated-copy (implicit copies of DataSet, Item,
 * PrivateTag); not ours to fix. */
#if defined(__clang__)
#pragma clang diagnostic ignored "-Wdeprecated-copy"
#pragma clang diagnostic ignored "-Wdeprecated-copy-with-user-provided-copy"
#endif

#include <gdcmBase64.h>
#include <gdcmDataSet.h>
#include <gdcmDictEntry.h>
#include <gdcmDicts.h>
#include <gdcmFile.h>
#include <gdcmFileMetaInformation.h>
#include <gdcmGlobal.h>
#include <gdcmImage.h>
#include <gdcmItem.h>
#include <gdcmPixmap.h>
#include <gdcmPixmapReader.h>
#include <gdcmReader.h>
#include <gdcmSequenceOfFragments.h>
#include <gdcmSequenceOfItems.h>
#include <gdcmTrace.h>
#include <gdcmTransferSyntax.h>
#include <gdcmVR.h>

#include "proto.h"

/* decode.c: a codec library's message to the decode_set_diag() hook. */
extern "C" void decode_diag(const char *lib, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

namespace {

/* A read-only std::streambuf over a memory buffer: GDCM reads the resource in place. */
class MemBuf : public std::streambuf {
public:
	MemBuf(const char *p, size_t n)
	{
		char *b = const_cast<char *>(p);
		setg(b, b, b + n);
	}

protected:
	pos_type seekoff(off_type off, std::ios_base::seekdir dir,
			 std::ios_base::openmode which) override
	{
		if (!(which & std::ios_base::in))
			return pos_type(off_type(-1));
		off_type base;
		if (dir == std::ios_base::beg)
			base = 0;
		else if (dir == std::ios_base::cur)
			base = gptr() - eback();
		else
			base = egptr() - eback();
		off_type target = base + off;
		if (target < 0 || target > egptr() - eback())
			return pos_type(off_type(-1));
		setg(eback(), eback() + target, egptr());
		return pos_type(target);
	}
	pos_type seekpos(pos_type pos, std::ios_base::openmode which) override
	{
		return seekoff(off_type(pos), std::ios_base::beg, which);
	}
};

/* GDCM's trace output, captured so that only the daemon logs. */
std::ostringstream &trace_sink()
{
	static std::ostringstream s;
	return s;
}

/* What GDCM traced since the last reset goes to the diagnostic hook, line by line. */
void trace_reset()
{
	const std::string t = trace_sink().str();
	size_t pos = 0;
	while (pos < t.size()) {
		size_t nl = t.find('\n', pos);
		if (nl == std::string::npos)
			nl = t.size();
		if (nl > pos)
			decode_diag("gdcm", "%.*s", (int)(nl - pos), t.data() + pos);
		pos = nl + 1;
	}
	trace_sink().str(std::string());
	trace_sink().clear();
}

/*
 * GDCM's bundled libjpeg (and its other C codecs) print warnings with fprintf(stderr, ...):
 * "Corrupt JPEG data: bad Huffman code", "Unsupported JPEG data precision 12". For the
 * length of a GDCM call, the C library's `stderr` stream is an unbuffered cookie stream
 * whose lines go to the diagnostic hook. File descriptor 2 is not touched (sanitizer
 * reports still reach it) and no system call is needed (seccomp-safe in the workers), with
 * one exception: a failed assert() (GDCM 3.0.21 asserts on some malformed files) is about
 * to abort the process, so its message is also written to fd 2 as the crash's reason.
 * Process-wide: decoding is single-threaded (decode_gdcm.h).
 */
class StderrToDiag {
public:
	StderrToDiag()
	{
		cookie_io_functions_t io = {};
		io.write = on_write;
		mem_ = fopencookie(this, "w", io);
		if (mem_) {
			setvbuf(mem_, nullptr, _IONBF, 0);
			saved_ = stderr;
			stderr = mem_;
		}
	}
	~StderrToDiag()
	{
		if (!mem_)
			return;
		stderr = saved_;
		fclose(mem_);
		if (!line_.empty())
			emit();
	}
	StderrToDiag(const StderrToDiag &) = delete;
	StderrToDiag &operator=(const StderrToDiag &) = delete;

private:
	static ssize_t on_write(void *cookie, const char *buf, size_t n)
	{
		StderrToDiag *self = static_cast<StderrToDiag *>(cookie);
		if (memmem(buf, n, "Assertion", 9)) {
			ssize_t w = write(STDERR_FILENO, buf, n);
			(void)w;
		}
		try {
			for (size_t i = 0; i < n; i++) {
				if (buf[i] == '\n')
					self->emit();
				else if (self->line_.size() < 4096)
					self->line_.push_back(buf[i]);
			}
		} catch (...) {
		}
		return (ssize_t)n;
	}
	void emit()
	{
		if (!line_.empty())
			decode_diag("gdcm", "%s", line_.c_str());
		line_.clear();
	}
	FILE *mem_ = nullptr, *saved_ = nullptr;
	std::string line_;
};

/* The last non-empty line GDCM traced, or `fallback`. */
void set_err(char *err, size_t errlen, const char *fallback)
{
	if (!err || errlen == 0)
		return;
	std::string t = trace_sink().str();
	std::string last;
	size_t pos = 0;
	while (pos < t.size()) {
		size_t nl = t.find('\n', pos);
		if (nl == std::string::npos)
			nl = t.size();
		std::string line = t.substr(pos, nl - pos);
		/* Skip GDCM's "Error: In file, line, function" location lines: they name paths;
		 * and "Could not find: /usr/bin/pvrg-jpeg": GDCM's fallback for a JPEG stream its
		 * own codec failed on, never installed, says nothing about the stream. */
		if (!line.empty() && line.find("./Source/") == std::string::npos &&
		    line.find(".cxx") == std::string::npos && line.find("pvrg") == std::string::npos)
			last = line;
		pos = nl + 1;
	}
	if (last.empty())
		snprintf(err, errlen, "%s", fallback);
	else
		snprintf(err, errlen, "%s: %s", fallback, last.c_str());
	trace_reset();
}

bool trim_value(const gdcm::ByteValue *bv, std::string &out)
{
	if (!bv || !bv->GetPointer())
		return false;
	out.assign(bv->GetPointer(), bv->GetLength());
	while (!out.empty() && (out.back() == ' ' || out.back() == '\0'))
		out.pop_back();
	size_t b = 0;
	while (b < out.size() && out[b] == ' ')
		b++;
	out.erase(0, b);
	return true;
}

/* An unsigned value of US or UL, whatever the element's VR claims (X2: UL-encoded Rows). */
bool get_uint(const gdcm::DataSet &ds, uint16_t g, uint16_t e, uint64_t *ret)
{
	const gdcm::Tag tag(g, e);
	if (!ds.FindDataElement(tag))
		return false;
	const gdcm::DataElement &de = ds.GetDataElement(tag);
	const gdcm::ByteValue *bv = de.GetByteValue();
	if (!bv || !bv->GetPointer())
		return false;
	const unsigned char *p = reinterpret_cast<const unsigned char *>(bv->GetPointer());
	/* GDCM keeps values little endian in memory, also for big-endian files. */
	if (bv->GetLength() == 2) {
		*ret = (uint64_t)p[0] | (uint64_t)p[1] << 8;
		return true;
	}
	if (bv->GetLength() == 4) {
		*ret = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 |
		       (uint64_t)p[3] << 24;
		return true;
	}
	return false;
}

bool get_str(const gdcm::DataSet &ds, uint16_t g, uint16_t e, std::string &out)
{
	const gdcm::Tag tag(g, e);
	if (!ds.FindDataElement(tag))
		return false;
	return trim_value(ds.GetDataElement(tag).GetByteValue(), out);
}

/* The first value of a DS (or IS) element. */
bool get_number(const gdcm::DataSet &ds, uint16_t g, uint16_t e, double *ret, bool *ret_bad)
{
	std::string s;
	if (!get_str(ds, g, e, s) || s.empty())
		return false;
	size_t bs = s.find('\\');
	if (bs != std::string::npos)
		s.resize(bs);
	while (!s.empty() && s.back() == ' ')
		s.pop_back();
	const char *c = s.c_str();
	while (*c == ' ')
		c++;
	char *end = nullptr;
	errno = 0;
	double v = strtod(c, &end);
	if (end == c || *end != '\0' || errno != 0 || !std::isfinite(v)) {
		*ret_bad = true;
		return false;
	}
	*ret = v;
	return true;
}

} /* namespace */

struct gdcm_shim {
	std::unique_ptr<MemBuf> membuf;
	std::unique_ptr<std::istream> stream;
	std::unique_ptr<gdcm::Reader> reader;
	/* GDCM's codecs need a Pixmap: parsed again, only for the syntaxes they decode. (Not
	 * gdcm::ImageReader: its spacing code asserts on valid RT Dose files.) */
	std::unique_ptr<MemBuf> pix_membuf;
	std::unique_ptr<std::istream> pix_stream;
	std::unique_ptr<gdcm::PixmapReader> pix_reader;
	bool pix_loaded = false;
	const void *buf = nullptr;
	size_t len = 0;
	bool loaded = false;
	struct gdcm_info info;
	std::vector<uint16_t> lut; /* the modality LUT's entries, host order */
};

extern "C" struct gdcm_shim *gdcm_shim_new(void)
{
	try {
		static bool silenced = false;
		if (!silenced) {
			gdcm::Trace::SetDebug(false);
			/* Warnings go to the sink too: "Incomplete Pixel Data" is how GDCM reports a
			 * truncated native element, which it pads. */
			gdcm::Trace::SetWarning(true);
			gdcm::Trace::SetError(true);
			gdcm::Trace::SetErrorStream(trace_sink());
			gdcm::Trace::SetWarningStream(trace_sink());
			gdcm::Trace::SetDebugStream(trace_sink());
			silenced = true;
		}
		return new gdcm_shim();
	} catch (...) {
		return nullptr;
	}
}

extern "C" void gdcm_shim_free(struct gdcm_shim *sh)
{
	try {
		trace_reset();
		delete sh;
	} catch (...) {
	}
}

extern "C" void gdcm_shim_unload(struct gdcm_shim *sh)
{
	try {
		sh->loaded = false;
		sh->pix_loaded = false;
		sh->pix_reader.reset();
		sh->pix_stream.reset();
		sh->pix_membuf.reset();
		sh->reader.reset();
		sh->stream.reset();
		sh->membuf.reset();
	} catch (...) {
	}
}

/*
 * The first item of the Modality LUT Sequence, as pydicom's apply_modality_lut reads it.
 * Problems are recorded, not failed: they matter only when the caller asks for the LUT.
 * GDCM keeps US and OW values little endian in memory, also for big-endian files.
 */
static void read_modality_lut(struct gdcm_shim *sh, const gdcm::DataSet &ds)
{
	struct gdcm_info &in = sh->info;
	const gdcm::Tag seq_tag(0x0028, 0x3000);
	sh->lut.clear();
	if (!ds.FindDataElement(seq_tag))
		return;
	const gdcm::DataElement &seq = ds.GetDataElement(seq_tag);
	if (seq.IsEmpty())
		return;
	gdcm::SmartPointer<gdcm::SequenceOfItems> sq = seq.GetValueAsSQ();
	if (!sq || sq->GetNumberOfItems() == 0) {
		/* pydicom: an empty sequence is no LUT; one it cannot read is an error. */
		if (!sq) {
			in.has_lut_seq = true;
			in.lut_problem = "the Modality LUT Sequence cannot be parsed";
		}
		return;
	}
	in.has_lut_seq = true;
	const gdcm::DataSet &item = sq->GetItem(1).GetNestedDataSet();
	const gdcm::Tag desc_tag(0x0028, 0x3002), data_tag(0x0028, 0x3006);
	const gdcm::ByteValue *desc =
		item.FindDataElement(desc_tag) ? item.GetDataElement(desc_tag).GetByteValue() : nullptr;
	if (!desc || !desc->GetPointer() || desc->GetLength() != 6) {
		in.lut_problem = "the modality LUT has no LUT Descriptor of three values";
		return;
	}
	const unsigned char *d = reinterpret_cast<const unsigned char *>(desc->GetPointer());
	in.lut_entries = (uint32_t)(d[0] | d[1] << 8);
	in.lut_first_raw = (uint16_t)(d[2] | d[3] << 8);
	in.lut_bits = (uint32_t)(d[4] | d[5] << 8);
	const gdcm::ByteValue *data =
		item.FindDataElement(data_tag) ? item.GetDataElement(data_tag).GetByteValue() : nullptr;
	if (!data || !data->GetPointer()) {
		in.lut_problem = "the modality LUT has no LUT Data";
		return;
	}
	in.lut_words = data->GetLength() / 2;
	uint64_t entries = in.lut_entries ? in.lut_entries : 65536;
	if (in.lut_words < entries) {
		in.lut_problem = "the modality LUT Data is shorter than its descriptor declares";
		return;
	}
	const unsigned char *p = reinterpret_cast<const unsigned char *>(data->GetPointer());
	sh->lut.resize((size_t)entries);
	for (size_t i = 0; i < (size_t)entries; i++)
		sh->lut[i] = (uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
}

static void fill_info(struct gdcm_shim *sh)
{
	struct gdcm_info &in = sh->info;
	memset(&in, 0, sizeof(in));
	const gdcm::File &file = sh->reader->GetFile();
	const gdcm::DataSet &ds = file.GetDataSet();
	const gdcm::FileMetaInformation &hdr = file.GetHeader();

	std::string ts;
	if (!get_str(hdr, 0x0002, 0x0010, ts) || ts.empty()) {
		const char *s = gdcm::TransferSyntax::GetTSString(hdr.GetDataSetTransferSyntax());
		ts = s ? s : "";
	}
	snprintf(in.ts, sizeof(in.ts), "%s", ts.c_str());
	std::string pi;
	get_str(ds, 0x0028, 0x0004, pi);
	snprintf(in.photometric, sizeof(in.photometric), "%s", pi.c_str());

	in.samples = 1;
	get_uint(ds, 0x0028, 0x0002, &in.samples);
	get_uint(ds, 0x0028, 0x0006, &in.planar);
	get_uint(ds, 0x0028, 0x0010, &in.rows);
	get_uint(ds, 0x0028, 0x0011, &in.cols);
	get_uint(ds, 0x0028, 0x0100, &in.bits_allocated);
	if (!get_uint(ds, 0x0028, 0x0101, &in.bits_stored))
		in.bits_stored = in.bits_allocated;
	if (!get_uint(ds, 0x0028, 0x0102, &in.high_bit))
		in.high_bit = in.bits_stored ? in.bits_stored - 1 : 0;
	get_uint(ds, 0x0028, 0x0103, &in.pixel_rep);

	in.frames = 1;
	std::string nf;
	if (get_str(ds, 0x0028, 0x0008, nf) && !nf.empty()) {
		const char *c = nf.c_str();
		char *end = nullptr;
		errno = 0;
		unsigned long long v = strtoull(c, &end, 10);
		if (end == c || *end != '\0' || errno != 0 || c[0] == '-')
			in.frames_invalid = true;
		else
			in.frames = v == 0 ? 1 : v; /* pydicom: 0 or empty means one frame */
	}

	in.slope = 1.0;
	in.intercept = 0.0;
	bool bad = false;
	double v;
	if (get_number(ds, 0x0028, 0x1053, &v, &bad)) {
		in.slope = v;
		in.has_rescale = true;
	}
	if (get_number(ds, 0x0028, 0x1052, &v, &bad)) {
		in.intercept = v;
		in.has_rescale = true;
	}
	try {
		read_modality_lut(sh, ds);
	} catch (const std::bad_alloc &) {
		throw;
	} catch (...) {
		sh->lut.clear();
		in.has_lut_seq = true;
		in.lut_problem = "the Modality LUT Sequence cannot be parsed";
	}

	const gdcm::Tag px(0x7fe0, 0x0010), fpx(0x7fe0, 0x0008), dpx(0x7fe0, 0x0009);
	if (ds.FindDataElement(px) && !ds.GetDataElement(px).IsEmpty()) {
		const gdcm::DataElement &de = ds.GetDataElement(px);
		in.has_pixels = true;
		if (const gdcm::SequenceOfFragments *sf = de.GetSequenceOfFragments()) {
			in.encapsulated = true;
			uint64_t sum = 0;
			for (size_t i = 0; i < sf->GetNumberOfFragments(); i++)
				sum += sf->GetFragment(i).GetVL();
			in.pixel_bytes = sum;
		} else if (const gdcm::ByteValue *bv = de.GetByteValue()) {
			in.pixel_bytes = bv->GetLength();
		}
	} else if (ds.FindDataElement(fpx) || ds.FindDataElement(dpx)) {
		const gdcm::Tag t = ds.FindDataElement(fpx) ? fpx : dpx;
		const gdcm::ByteValue *bv = ds.GetDataElement(t).GetByteValue();
		if (bv) {
			in.has_pixels = true;
			in.float_bits = t == fpx ? 32 : 64;
			in.pixel_bytes = bv->GetLength();
		}
	}
}

extern "C" int gdcm_shim_load(struct gdcm_shim *sh, const void *buf, size_t len,
			      struct gdcm_info *ret, char *err, size_t errlen)
{
	try {
		StderrToDiag quiet;
		if (sh->loaded && sh->buf == buf && sh->len == len) {
			*ret = sh->info;
			return 0;
		}
		sh->loaded = false;
		sh->pix_loaded = false;
		sh->pix_reader.reset();
		sh->pix_stream.reset();
		sh->pix_membuf.reset();
		sh->reader.reset();
		sh->stream.reset();
		sh->membuf.reset();
		trace_reset();

		sh->membuf.reset(new MemBuf(static_cast<const char *>(buf), len));
		sh->stream.reset(new std::istream(sh->membuf.get()));
		std::unique_ptr<gdcm::Reader> r(new gdcm::Reader());
		r->SetStream(*sh->stream);
		if (!r->Read()) {
			set_err(err, errlen, "not a DICOM file GDCM can parse");
			return -DMC_E_DECODE_FAILED;
		}
		sh->reader = std::move(r);
		fill_info(sh);
		if (trace_sink().str().find("Incomplete Pixel Data") != std::string::npos)
			sh->info.truncated = true;
		sh->buf = buf;
		sh->len = len;
		sh->loaded = true;
		*ret = sh->info;
		return 0;
	} catch (const std::bad_alloc &) {
		sh->reader.reset();
		snprintf(err, errlen, "out of memory while parsing the DICOM data set");
		return -ENOMEM;
	} catch (const std::exception &e) {
		sh->reader.reset();
		snprintf(err, errlen, "DICOM parse error: %s", e.what());
		return -DMC_E_DECODE_FAILED;
	} catch (...) {
		sh->reader.reset();
		snprintf(err, errlen, "DICOM parse error");
		return -DMC_E_DECODE_FAILED;
	}
}

static const gdcm::DataElement *pixel_element(struct gdcm_shim *sh)
{
	if (!sh->loaded)
		return nullptr;
	const gdcm::DataSet &ds = sh->reader->GetFile().GetDataSet();
	static const gdcm::Tag tags[] = { gdcm::Tag(0x7fe0, 0x0010), gdcm::Tag(0x7fe0, 0x0008),
					  gdcm::Tag(0x7fe0, 0x0009) };
	for (const gdcm::Tag &t : tags)
		if (ds.FindDataElement(t))
			return &ds.GetDataElement(t);
	return nullptr;
}

extern "C" int gdcm_shim_modality_lut(struct gdcm_shim *sh, const uint16_t **ret_p,
				      uint64_t *ret_n)
{
	if (!sh->loaded || !sh->info.has_lut_seq || sh->info.lut_problem || sh->lut.empty())
		return -DMC_E_DECODE_FAILED;
	*ret_p = sh->lut.data();
	*ret_n = sh->lut.size();
	return 0;
}

extern "C" int gdcm_shim_native(struct gdcm_shim *sh, const uint8_t **ret_p, uint64_t *ret_len,
				bool *ret_ow)
{
	try {
		const gdcm::DataElement *de = pixel_element(sh);
		if (!de || !de->GetByteValue() || !de->GetByteValue()->GetPointer())
			return -DMC_E_DECODE_FAILED;
		const gdcm::ByteValue *bv = de->GetByteValue();
		*ret_p = reinterpret_cast<const uint8_t *>(bv->GetPointer());
		*ret_len = bv->GetLength();
		gdcm::VR vr = de->GetVR();
		if (vr == gdcm::VR::OW)
			*ret_ow = true;
		else if (vr == gdcm::VR::OB)
			*ret_ow = false;
		else
			*ret_ow = sh->info.bits_allocated > 8;
		return 0;
	} catch (...) {
		return -DMC_E_DECODE_FAILED;
	}
}

static const gdcm::SequenceOfFragments *fragments(struct gdcm_shim *sh)
{
	const gdcm::DataElement *de = pixel_element(sh);
	return de ? de->GetSequenceOfFragments() : nullptr;
}

extern "C" int gdcm_shim_fragment_count(struct gdcm_shim *sh, uint32_t *ret_n)
{
	try {
		const gdcm::SequenceOfFragments *sf = fragments(sh);
		if (!sf)
			return -DMC_E_DECODE_FAILED;
		size_t n = sf->GetNumberOfFragments();
		if (n > UINT32_MAX)
			return -DMC_E_LIMIT_EXCEEDED;
		*ret_n = (uint32_t)n;
		return 0;
	} catch (...) {
		return -DMC_E_DECODE_FAILED;
	}
}

extern "C" int gdcm_shim_fragment(struct gdcm_shim *sh, uint32_t i, const uint8_t **ret_p,
				  uint64_t *ret_len)
{
	try {
		const gdcm::SequenceOfFragments *sf = fragments(sh);
		if (!sf || i >= sf->GetNumberOfFragments())
			return -DMC_E_DECODE_FAILED;
		const gdcm::ByteValue *bv = sf->GetFragment(i).GetByteValue();
		if (!bv || !bv->GetPointer()) {
			*ret_p = nullptr;
			*ret_len = 0;
			return 0;
		}
		*ret_p = reinterpret_cast<const uint8_t *>(bv->GetPointer());
		*ret_len = bv->GetLength();
		return 0;
	} catch (...) {
		return -DMC_E_DECODE_FAILED;
	}
}

extern "C" int gdcm_shim_offset_table(struct gdcm_shim *sh, const uint8_t **ret_p,
				      uint64_t *ret_len)
{
	try {
		const gdcm::SequenceOfFragments *sf = fragments(sh);
		if (!sf)
			return -DMC_E_DECODE_FAILED;
		const gdcm::ByteValue *bv = sf->GetTable().GetByteValue();
		if (!bv || !bv->GetPointer()) {
			*ret_p = nullptr;
			*ret_len = 0;
			return 0;
		}
		*ret_p = reinterpret_cast<const uint8_t *>(bv->GetPointer());
		*ret_len = bv->GetLength();
		return 0;
	} catch (...) {
		return -DMC_E_DECODE_FAILED;
	}
}

static const gdcm::Pixmap *pixmap(struct gdcm_shim *sh)
{
	if (!sh->loaded)
		return nullptr;
	if (!sh->pix_loaded) {
		sh->pix_membuf.reset(new MemBuf(static_cast<const char *>(sh->buf), sh->len));
		sh->pix_stream.reset(new std::istream(sh->pix_membuf.get()));
		sh->pix_reader.reset(new gdcm::PixmapReader());
		sh->pix_reader->SetStream(*sh->pix_stream);
		if (!sh->pix_reader->Read()) {
			sh->pix_reader.reset();
			return nullptr;
		}
		sh->pix_loaded = true;
	}
	return sh->pix_reader ? &sh->pix_reader->GetPixmap() : nullptr;
}

extern "C" int gdcm_shim_buffer_length(struct gdcm_shim *sh, uint64_t *ret_len)
{
	try {
		StderrToDiag quiet;
		trace_reset();
		const gdcm::Pixmap *px = pixmap(sh);
		if (!px)
			return -DMC_E_DECODE_FAILED;
		*ret_len = px->GetBufferLength();
		return 0;
	} catch (const std::bad_alloc &) {
		return -ENOMEM;
	} catch (...) {
		return -DMC_E_DECODE_FAILED;
	}
}

extern "C" int gdcm_shim_decode(struct gdcm_shim *sh, void *dst, uint64_t dst_len, int *ret_planar,
				char *ret_photometric, char *err, size_t errlen)
{
	try {
		StderrToDiag quiet;
		trace_reset();
		const gdcm::Pixmap *px = pixmap(sh);
		if (!px) {
			set_err(err, errlen, "GDCM cannot decode this image");
			return -DMC_E_DECODE_FAILED;
		}
		if (px->GetBufferLength() > dst_len) {
			snprintf(err, errlen, "GDCM output larger than expected");
			return -DMC_E_DECODE_FAILED;
		}
		if (!px->GetBuffer(static_cast<char *>(dst))) {
			set_err(err, errlen, "GDCM failed to decode the pixel data");
			return -DMC_E_DECODE_FAILED;
		}
		*ret_planar = (int)px->GetPlanarConfiguration();
		const char *pi = gdcm::PhotometricInterpretation::GetPIString(
			px->GetPhotometricInterpretation());
		snprintf(ret_photometric, 20, "%s", pi ? pi : "");
		return 0;
	} catch (const std::bad_alloc &) {
		snprintf(err, errlen, "out of memory in GDCM");
		return -ENOMEM;
	} catch (const std::exception &e) {
		snprintf(err, errlen, "GDCM failed to decode the pixel data: %s", e.what());
		return -DMC_E_DECODE_FAILED;
	} catch (...) {
		snprintf(err, errlen, "GDCM failed to decode the pixel data");
		return -DMC_E_DECODE_FAILED;
	}
}

/* ---- DICOM JSON model (PS3.18 annex F) ---- */

namespace {

struct JsonOut {
	size_t max_value;
	size_t max_inline;
	unsigned max_depth;
	bool latin1; /* the data set's strings are not UTF-8 */
};

void json_escape(std::string &o, const char *p, size_t n, bool latin1)
{
	o.push_back('"');
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)p[i];
		if (c == '"' || c == '\\') {
			o.push_back('\\');
			o.push_back((char)c);
		} else if (c < 0x20) {
			char u[8];
			snprintf(u, sizeof(u), "\\u%04x", c);
			o.append(u);
		} else if (c < 0x80) {
			o.push_back((char)c);
		} else if (latin1) {
			o.push_back((char)(0xc0 | c >> 6));
			o.push_back((char)(0x80 | (c & 0x3f)));
		} else {
			/* Copy a valid UTF-8 sequence, replace anything else with U+FFFD. */
			size_t need = c >= 0xf0 && c < 0xf5 ? 3 : c >= 0xe0 ? 2 : c >= 0xc2 ? 1 : 0;
			bool ok = need > 0 && i + need < n + 0;
			for (size_t k = 1; ok && k <= need; k++)
				ok = ((unsigned char)p[i + k] & 0xc0) == 0x80;
			if (ok) {
				o.append(p + i, need + 1);
				i += need;
			} else {
				o.append("\xef\xbf\xbd");
			}
		}
	}
	o.push_back('"');
}

bool valid_utf8(const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)p[i];
		if (c < 0x80)
			continue;
		size_t need = c >= 0xf0 && c < 0xf5 ? 3 : c >= 0xe0 ? 2 : c >= 0xc2 ? 1 : 0;
		if (need == 0 || i + need >= n + 0)
			return false;
		for (size_t k = 1; k <= need; k++)
			if (((unsigned char)p[i + k] & 0xc0) != 0x80)
				return false;
		i += need;
	}
	return true;
}

void trim_component(std::string &s, bool leading)
{
	while (!s.empty() && (s.back() == ' ' || s.back() == '\0'))
		s.pop_back();
	if (leading) {
		size_t b = 0;
		while (b < s.size() && s[b] == ' ')
			b++;
		s.erase(0, b);
	}
}

std::vector<std::string> split_values(const char *p, size_t n)
{
	std::vector<std::string> v;
	size_t start = 0;
	for (size_t i = 0; i <= n; i++) {
		if (i == n || p[i] == '\\') {
			v.emplace_back(p + start, i - start);
			start = i + 1;
		}
	}
	return v;
}

bool emit_element(std::string &o, const gdcm::DataElement &de, const gdcm::Dicts &dicts,
		  const JsonOut &jo, unsigned depth);

void emit_dataset(std::string &o, const gdcm::DataSet &ds, const gdcm::Dicts &dicts,
		  const JsonOut &jo, unsigned depth, size_t cap)
{
	o.push_back('{');
	bool first = true;
	for (gdcm::DataSet::ConstIterator it = ds.Begin(); it != ds.End(); ++it) {
		const gdcm::DataElement &de = *it;
		const gdcm::Tag &t = de.GetTag();
		if (t.GetElement() == 0x0000)
			continue; /* group lengths are not part of the model */
		if (t.GetGroup() == 0x7fe0 &&
		    (t.GetElement() == 0x0010 || t.GetElement() == 0x0008 || t.GetElement() == 0x0009))
			continue; /* pixel data is the tensor */
		if (t.GetGroup() == 0xfffe)
			continue;
		std::string el;
		char key[16];
		snprintf(key, sizeof(key), "\"%04X%04X\":", t.GetGroup(), t.GetElement());
		el.append(key);
		if (!emit_element(el, de, dicts, jo, depth))
			continue;
		/* +2: the comma and the closing brace of this object. */
		if (o.size() + el.size() + 2 + depth * 2 > cap)
			continue;
		if (!first)
			o.push_back(',');
		o.append(el);
		first = false;
	}
	o.push_back('}');
}

bool emit_element(std::string &o, const gdcm::DataElement &de, const gdcm::Dicts &dicts,
		  const JsonOut &jo, unsigned depth)
{
	gdcm::VR vr = de.GetVR();
	if (vr == gdcm::VR::INVALID || vr == gdcm::VR::UN) {
		const gdcm::DictEntry &entry = dicts.GetDictEntry(de.GetTag());
		gdcm::VR dvr = entry.GetVR();
		/* Dictionary VRs like "US or SS" or "OB or OW" are several bits: keep those
		 * binary (UN); a single known VR is used as is. */
		unsigned long long bits = (unsigned long long)(gdcm::VR::VRType)dvr;
		if (bits != 0 && (bits & (bits - 1)) == 0)
			vr = dvr;
		else
			vr = gdcm::VR::UN;
	}
	if (de.GetSequenceOfFragments())
		return false;
	const char *vrs = gdcm::VR::GetVRString(vr);
	if (!vrs || strlen(vrs) != 2)
		return false;
	o.append("{\"vr\":\"");
	o.append(vrs);
	o.push_back('"');

	if (vr == gdcm::VR::SQ) {
		gdcm::SmartPointer<gdcm::SequenceOfItems> sq = de.GetValueAsSQ();
		if (sq && sq->GetNumberOfItems() > 0 && depth + 1 < jo.max_depth) {
			o.append(",\"Value\":[");
			for (gdcm::SequenceOfItems::SizeType i = 1; i <= sq->GetNumberOfItems(); i++) {
				if (i > 1)
					o.push_back(',');
				emit_dataset(o, sq->GetItem(i).GetNestedDataSet(), dicts, jo, depth + 1,
					     (size_t)-1);
				if (o.size() > jo.max_value * 16)
					return false;
			}
			o.push_back(']');
		}
		o.push_back('}');
		return true;
	}

	const gdcm::ByteValue *bv = de.GetByteValue();
	if (!bv || !bv->GetPointer() || bv->GetLength() == 0) {
		o.push_back('}');
		return true;
	}
	const char *p = bv->GetPointer();
	size_t n = bv->GetLength();

	switch (vr) {
	case gdcm::VR::OB: case gdcm::VR::OD: case gdcm::VR::OF: case gdcm::VR::OL:
	case gdcm::VR::OV: case gdcm::VR::OW: case gdcm::VR::UN: {
		if (n <= jo.max_inline) {
			size_t enc = gdcm::Base64::GetEncodeLength(p, n);
			std::string b(enc, '\0');
			size_t w = gdcm::Base64::Encode(&b[0], enc, p, n);
			b.resize(w);
			o.append(",\"InlineBinary\":\"");
			o.append(b);
			o.push_back('"');
		}
		o.push_back('}');
		return true;
	}
	default:
		break;
	}
	if (n > jo.max_value) {
		o.push_back('}');
		return true;
	}

	auto binary_numbers = [&](size_t size, auto conv) {
		size_t cnt = n / size;
		if (cnt == 0)
			return;
		o.append(",\"Value\":[");
		for (size_t i = 0; i < cnt; i++) {
			if (i)
				o.push_back(',');
			conv(p + i * size);
		}
		o.push_back(']');
	};
	char num[64];
	switch (vr) {
	case gdcm::VR::US:
		binary_numbers(2, [&](const char *q) {
			uint16_t v; memcpy(&v, q, 2);
			snprintf(num, sizeof(num), "%u", (unsigned)v); o.append(num); });
		break;
	case gdcm::VR::SS:
		binary_numbers(2, [&](const char *q) {
			int16_t v; memcpy(&v, q, 2);
			snprintf(num, sizeof(num), "%d", (int)v); o.append(num); });
		break;
	case gdcm::VR::UL:
		binary_numbers(4, [&](const char *q) {
			uint32_t v; memcpy(&v, q, 4);
			snprintf(num, sizeof(num), "%u", (unsigned)v); o.append(num); });
		break;
	case gdcm::VR::SL:
		binary_numbers(4, [&](const char *q) {
			int32_t v; memcpy(&v, q, 4);
			snprintf(num, sizeof(num), "%d", (int)v); o.append(num); });
		break;
	case gdcm::VR::UV:
		binary_numbers(8, [&](const char *q) {
			uint64_t v; memcpy(&v, q, 8);
			snprintf(num, sizeof(num), "%llu", (unsigned long long)v); o.append(num); });
		break;
	case gdcm::VR::SV:
		binary_numbers(8, [&](const char *q) {
			int64_t v; memcpy(&v, q, 8);
			snprintf(num, sizeof(num), "%lld", (long long)v); o.append(num); });
		break;
	case gdcm::VR::FL:
		binary_numbers(4, [&](const char *q) {
			float v; memcpy(&v, q, 4);
			if (std::isfinite(v)) { snprintf(num, sizeof(num), "%.9g", (double)v); o.append(num); }
			else o.append("null"); });
		break;
	case gdcm::VR::FD:
		binary_numbers(8, [&](const char *q) {
			double v; memcpy(&v, q, 8);
			if (std::isfinite(v)) { snprintf(num, sizeof(num), "%.17g", v); o.append(num); }
			else o.append("null"); });
		break;
	case gdcm::VR::AT:
		binary_numbers(4, [&](const char *q) {
			uint16_t g, e; memcpy(&g, q, 2); memcpy(&e, q + 2, 2);
			snprintf(num, sizeof(num), "\"%04X%04X\"", g, e); o.append(num); });
		break;
	case gdcm::VR::DS: case gdcm::VR::IS: {
		std::vector<std::string> vals = split_values(p, n);
		o.append(",\"Value\":[");
		for (size_t i = 0; i < vals.size(); i++) {
			if (i)
				o.push_back(',');
			std::string s = vals[i];
			trim_component(s, true);
			char *end = nullptr;
			errno = 0;
			double v = s.empty() ? 0 : strtod(s.c_str(), &end);
			if (s.empty() || *end != '\0' || errno != 0 || !std::isfinite(v)) {
				o.append("null");
			} else if (vr == gdcm::VR::IS) {
				char *iend = nullptr;
				long long iv = strtoll(s.c_str(), &iend, 10);
				if (*iend == '\0') {
					snprintf(num, sizeof(num), "%lld", iv);
					o.append(num);
				} else {
					o.append("null");
				}
			} else {
				snprintf(num, sizeof(num), "%.17g", v);
				o.append(num);
			}
		}
		o.push_back(']');
		break;
	}
	case gdcm::VR::PN: {
		std::vector<std::string> vals = split_values(p, n);
		o.append(",\"Value\":[");
		for (size_t i = 0; i < vals.size(); i++) {
			if (i)
				o.push_back(',');
			std::string s = vals[i];
			trim_component(s, false);
			static const char *groups[] = { "Alphabetic", "Ideographic", "Phonetic" };
			o.push_back('{');
			size_t start = 0;
			int gi = 0;
			bool any = false;
			for (size_t k = 0; k <= s.size() && gi < 3; k++) {
				if (k == s.size() || s[k] == '=') {
					if (k > start) {
						if (any)
							o.push_back(',');
						o.push_back('"');
						o.append(groups[gi]);
						o.append("\":");
						json_escape(o, s.data() + start, k - start, jo.latin1);
						any = true;
					}
					gi++;
					start = k + 1;
				}
			}
			o.push_back('}');
		}
		o.push_back(']');
		break;
	}
	default: {
		/* Strings. LT, ST, UT and UR hold one value that may contain backslashes. */
		bool single = vr == gdcm::VR::LT || vr == gdcm::VR::ST || vr == gdcm::VR::UT ||
			      vr == gdcm::VR::UR;
		std::vector<std::string> vals;
		if (single)
			vals.emplace_back(p, n);
		else
			vals = split_values(p, n);
		o.append(",\"Value\":[");
		for (size_t i = 0; i < vals.size(); i++) {
			if (i)
				o.push_back(',');
			std::string s = vals[i];
			trim_component(s, !single);
			if (s.empty())
				o.append("null");
			else
				json_escape(o, s.data(), s.size(), jo.latin1);
		}
		o.push_back(']');
		break;
	}
	}
	o.push_back('}');
	return true;
}

} /* namespace */

extern "C" int gdcm_shim_json(struct gdcm_shim *sh, char *out, size_t cap, size_t max_value,
			      size_t max_inline, unsigned max_depth, size_t *ret_len, char *err,
			      size_t errlen)
{
	try {
		if (!sh->loaded || cap < 3) {
			snprintf(err, errlen, "no DICOM data set loaded");
			return -DMC_E_DECODE_FAILED;
		}
		const gdcm::DataSet &ds = sh->reader->GetFile().GetDataSet();
		const gdcm::Dicts &dicts = gdcm::Global::GetInstance().GetDicts();
		JsonOut jo;
		jo.max_value = max_value;
		jo.max_inline = max_inline;
		jo.max_depth = max_depth;
		std::string cs;
		get_str(ds, 0x0008, 0x0005, cs);
		/* ISO_IR 192 is UTF-8; without a character set the strings are ASCII. Anything
		 * else that is not valid UTF-8 is taken as Latin-1 (ISO_IR 100), the common case. */
		jo.latin1 = false;
		if (!cs.empty() && cs.find("ISO_IR 192") == std::string::npos) {
			jo.latin1 = true;
			/* A mostly-ASCII data set in UTF-8 mislabelled: prefer UTF-8 when valid. */
			bool all_utf8 = true;
			for (gdcm::DataSet::ConstIterator it = ds.Begin(); it != ds.End() && all_utf8; ++it) {
				const gdcm::ByteValue *bv = it->GetByteValue();
				if (bv && bv->GetPointer() && gdcm::VR::IsASCII(it->GetVR()))
					all_utf8 = valid_utf8(bv->GetPointer(), bv->GetLength());
			}
			if (all_utf8)
				jo.latin1 = false;
		}
		std::string o;
		o.reserve(4096);
		emit_dataset(o, ds, dicts, jo, 0, cap - 1);
		if (o.size() + 1 > cap) {
			snprintf(err, errlen, "DICOM header JSON larger than %zu bytes", cap);
			return -DMC_E_LIMIT_EXCEEDED;
		}
		memcpy(out, o.data(), o.size());
		out[o.size()] = '\0';
		*ret_len = o.size();
		return 0;
	} catch (const std::bad_alloc &) {
		snprintf(err, errlen, "out of memory while writing the DICOM header");
		return -ENOMEM;
	} catch (...) {
		snprintf(err, errlen, "cannot convert the DICOM header to JSON");
		return -DMC_E_DECODE_FAILED;
	}
}
