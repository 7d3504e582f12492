/* Unit tests for the protocol codec (proto/proto.c). */
#include <stdint.h>
#include <string.h>

#include "proto.h"
#include "task.h"

static uint8_t frame[DMC_HEADER_SIZE + 4096];

/* Decodes the header of `frame` of `len` bytes and checks it announces the whole frame. */
static int check_frame(const uint8_t *f, size_t len, uint16_t op, uint16_t flags, uint32_t id,
		       struct dmc_header *h)
{
	if (dmc_header_decode(f, len, h) != DMC_PROTO_OK)
		return 0;
	return h->length + DMC_HEADER_SIZE == len && h->opcode == op && h->flags == flags &&
	       h->request_id == id && h->nfds == 0;
}

TEST(header_round_trip)
{
	struct dmc_header in = { 1234, DMC_OP_STATUS, DMC_FLAG_REPLY | DMC_FLAG_MORE, 0xdeadbeef,
				 2 };
	struct dmc_header out;
	uint8_t b[DMC_HEADER_SIZE];

	dmc_header_encode(&in, b);
	/* explicit little-endian, whatever the host */
	ASSERT_EQ(b[0], 1234 & 0xff);
	ASSERT_EQ(b[1], 1234 >> 8);
	ASSERT_EQ(b[8], 0xef);
	ASSERT_EQ(b[11], 0xde);
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_OK);
	ASSERT_EQ(out.length, 1234);
	ASSERT_EQ(out.opcode, DMC_OP_STATUS);
	ASSERT_EQ(out.flags, DMC_FLAG_REPLY | DMC_FLAG_MORE);
	ASSERT_UINT_EQ(out.request_id, 0xdeadbeefu);
	ASSERT_EQ(out.nfds, 2);
}

TEST(header_rejects_bad_fields)
{
	struct dmc_header in = { 0, DMC_OP_PING, 0, 1, 0 };
	struct dmc_header out;
	uint8_t b[DMC_HEADER_SIZE];

	/* oversized length */
	in.length = DMC_FRAME_MAX + 1;
	dmc_header_encode(&in, b);
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_ERROR);
	in.length = DMC_FRAME_MAX;
	dmc_header_encode(&in, b);
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_OK);
	/* a 4 GiB declared length */
	memset(b, 0xff, 4);
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_ERROR);
	/* each reserved byte nonzero */
	in.length = 0;
	for (int i = 13; i < 16; i++) {
		dmc_header_encode(&in, b);
		b[i] = 1;
		ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_ERROR);
	}
	/* undefined flag bits */
	dmc_header_encode(&in, b);
	b[6] = 0x04;
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_ERROR);
	dmc_header_encode(&in, b);
	b[7] = 0x80;
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_ERROR);
	/* too many fds */
	in.nfds = DMC_FDS_MAX + 1;
	dmc_header_encode(&in, b);
	ASSERT_EQ(dmc_header_decode(b, sizeof(b), &out), DMC_PROTO_ERROR);
}

TEST(hello_round_trip)
{
	struct dmc_hello in = { 1, 3, { "libdmcache 0.1.0", 16 } }, out;
	struct dmc_hello_reply rin = { 1, 998, DMC_FRAME_MAX, { "dmcached 0.1.0", 14 } }, rout;
	struct dmc_header h;
	int n;

	n = dmc_hello_encode(&in, 7, frame, sizeof(frame));
	ASSERT_GT(n, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_HELLO, 0, 7, &h));
	ASSERT_EQ(dmc_hello_decode(frame + DMC_HEADER_SIZE, h.length, &out), DMC_PROTO_OK);
	ASSERT_EQ(out.version_min, 1);
	ASSERT_EQ(out.version_max, 3);
	ASSERT_EQ(out.client.len, 16);
	ASSERT_MEM_EQ(out.client.ptr, "libdmcache 0.1.0", 16);

	n = dmc_hello_reply_encode(&rin, 7, frame, sizeof(frame));
	ASSERT_GT(n, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_HELLO, DMC_FLAG_REPLY, 7, &h));
	ASSERT_EQ(dmc_hello_reply_decode(frame + DMC_HEADER_SIZE, h.length, &rout), DMC_PROTO_OK);
	ASSERT_EQ(rout.version, 1);
	ASSERT_EQ(rout.daemon_uid, 998);
	ASSERT_EQ(rout.frame_max, DMC_FRAME_MAX);
	ASSERT_EQ(rout.daemon.len, 14);
	ASSERT_MEM_EQ(rout.daemon.ptr, "dmcached 0.1.0", 14);

	/* min > max is malformed */
	in.version_min = 4;
	n = dmc_hello_encode(&in, 1, frame, sizeof(frame));
	ASSERT_EQ(dmc_hello_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_ERROR);
}

TEST(ping_round_trip)
{
	struct dmc_ping in = { 0x0123456789abcdefull }, out = { 0 };
	struct dmc_header h;
	int n = dmc_ping_encode(&in, DMC_FLAG_REPLY, 42, frame, sizeof(frame));

	ASSERT_EQ(n, DMC_HEADER_SIZE + 8);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_PING, DMC_FLAG_REPLY, 42, &h));
	ASSERT_EQ(dmc_ping_decode(frame + DMC_HEADER_SIZE, h.length, &out), DMC_PROTO_OK);
	ASSERT_UINT_EQ(out.token, 0x0123456789abcdefull);
	ASSERT_EQ(frame[DMC_HEADER_SIZE], 0xef);
}

TEST(status_round_trip)
{
	struct dmc_status_entry in[3] = {
		{ { "connections", 11 }, 5 },
		{ { "negative", 8 }, -9000000000ll },
		{ { "", 0 }, INT64_MAX },
	};
	struct dmc_status_entry out[3];
	struct dmc_str version;
	struct dmc_header h;
	uint64_t up;
	uint32_t pid, n_out;
	int n;

	n = dmc_status_encode(3, frame, sizeof(frame));
	ASSERT_EQ(n, DMC_HEADER_SIZE);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_STATUS, 0, 3, &h));
	ASSERT_EQ(dmc_status_decode(frame + DMC_HEADER_SIZE, 0), DMC_PROTO_OK);
	ASSERT_EQ(dmc_status_decode("x", 1), DMC_PROTO_ERROR);

	n = dmc_status_reply_encode("0.1.0", 123456789012ull, 4242, in, 3, 3, frame,
				    sizeof(frame));
	ASSERT_GT(n, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_STATUS, DMC_FLAG_REPLY, 3, &h));
	ASSERT_EQ(dmc_status_reply_decode(frame + DMC_HEADER_SIZE, h.length, &version, &up, &pid,
					  out, 3, &n_out),
		  DMC_PROTO_OK);
	ASSERT_EQ(version.len, 5);
	ASSERT_UINT_EQ(up, 123456789012ull);
	ASSERT_EQ(pid, 4242);
	ASSERT_EQ(n_out, 3);
	for (int i = 0; i < 3; i++) {
		ASSERT_EQ(out[i].name.len, in[i].name.len);
		ASSERT_MEM_EQ(out[i].name.ptr, in[i].name.ptr, in[i].name.len);
		ASSERT_EQ(out[i].value, in[i].value);
	}
	/* more entries than the caller has room for is an error, not an overflow */
	ASSERT_EQ(dmc_status_reply_decode(frame + DMC_HEADER_SIZE, h.length, &version, &up, &pid,
					  out, 2, &n_out),
		  DMC_PROTO_ERROR);
}

TEST(error_round_trip)
{
	struct dmc_error_msg in = { DMC_E_UPSTREAM_TRANSIENT, 503, 2000, 0, { "res-1", 5 },
				    { "try later", 9 } };
	struct dmc_error_msg out;
	struct dmc_header h;
	int n = dmc_error_encode(&in, 9, frame, sizeof(frame));

	ASSERT_GT(n, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_ERROR, DMC_FLAG_REPLY, 9, &h));
	ASSERT_EQ(dmc_error_decode(frame + DMC_HEADER_SIZE, h.length, &out), DMC_PROTO_OK);
	ASSERT_EQ(out.code, DMC_E_UPSTREAM_TRANSIENT);
	ASSERT_EQ(out.http_status, 503);
	ASSERT_EQ(out.retry_after_ms, 2000);
	ASSERT_EQ(out.sys_errno, 0);
	ASSERT_MEM_EQ(out.resource.ptr, "res-1", 5);
	ASSERT_MEM_EQ(out.message.ptr, "try later", 9);
	ASSERT_STR_EQ(dmc_error_name(DMC_E_UPSTREAM_TRANSIENT), "upstream_transient");
	ASSERT_STR_EQ(dmc_error_name(DMC_E_NOT_FOUND_OR_DENIED), "not_found_or_denied");
	ASSERT_NULL(dmc_error_name(0));
	ASSERT_NULL(dmc_error_name(DMC_E_LAST_ + 1));
	for (uint32_t c = DMC_E_FIRST_; c <= DMC_E_LAST_; c++) {
		ASSERT_NOT_NULL(dmc_error_name(c));
		ASSERT_NOT_NULL(dmc_error_text(c));
	}
}

/* Every proper prefix of a valid frame is "need more bytes" or an incomplete payload. */
TEST(every_truncation_needs_more)
{
	struct dmc_error_msg em = { DMC_E_IO, 0, 0, 28, { "r", 1 }, { "no space", 8 } };
	struct dmc_hello hm = { 1, 1, { "c", 1 } };
	struct dmc_ping pm = { 5 };
	struct dmc_status_entry e = { { "x", 1 }, 1 };
	uint8_t frames[4][256];
	int sizes[4];

	sizes[0] = dmc_error_encode(&em, 1, frames[0], sizeof(frames[0]));
	sizes[1] = dmc_hello_encode(&hm, 1, frames[1], sizeof(frames[1]));
	sizes[2] = dmc_ping_encode(&pm, 0, 1, frames[2], sizeof(frames[2]));
	sizes[3] = dmc_status_reply_encode("v", 1, 1, &e, 1, 1, frames[3], sizeof(frames[3]));
	for (int f = 0; f < 4; f++) {
		ASSERT_GT(sizes[f], DMC_HEADER_SIZE);
		for (int len = 0; len < sizes[f]; len++) {
			struct dmc_header h;
			int rc = dmc_header_decode(frames[f], (size_t)len, &h);

			if (len < (int)DMC_HEADER_SIZE) {
				ASSERT_EQ(rc, DMC_PROTO_AGAIN);
				continue;
			}
			/* header complete: the frame is not, by the header's own length */
			ASSERT_EQ(rc, DMC_PROTO_OK);
			ASSERT_LT(len, (int)(DMC_HEADER_SIZE + h.length));
		}
	}
	/* and each message decoder refuses every truncated payload */
	for (int len = 0; len < sizes[0] - (int)DMC_HEADER_SIZE; len++) {
		struct dmc_error_msg out;
		ASSERT_EQ(dmc_error_decode(frames[0] + DMC_HEADER_SIZE, (size_t)len, &out),
			  DMC_PROTO_ERROR);
	}
	for (int len = 0; len < sizes[1] - (int)DMC_HEADER_SIZE; len++) {
		struct dmc_hello out;
		ASSERT_EQ(dmc_hello_decode(frames[1] + DMC_HEADER_SIZE, (size_t)len, &out),
			  DMC_PROTO_ERROR);
	}
	for (int len = 0; len < sizes[2] - (int)DMC_HEADER_SIZE; len++) {
		struct dmc_ping out;
		ASSERT_EQ(dmc_ping_decode(frames[2] + DMC_HEADER_SIZE, (size_t)len, &out),
			  DMC_PROTO_ERROR);
	}
	for (int len = 0; len < sizes[3] - (int)DMC_HEADER_SIZE; len++) {
		struct dmc_status_entry out[1];
		struct dmc_str v;
		uint64_t up;
		uint32_t pid, n;
		ASSERT_EQ(dmc_status_reply_decode(frames[3] + DMC_HEADER_SIZE, (size_t)len, &v, &up,
						  &pid, out, 1, &n),
			  DMC_PROTO_ERROR);
	}
}

TEST(trailing_bytes_and_bad_strings)
{
	struct dmc_ping pm = { 5 }, out;
	struct dmc_hello hout;
	uint8_t p[64];
	struct dmc_writer w;

	/* a byte left over is an error */
	int n = dmc_ping_encode(&pm, 0, 1, frame, sizeof(frame));
	frame[n] = 0;
	ASSERT_EQ(dmc_ping_decode(frame + DMC_HEADER_SIZE, 9, &out), DMC_PROTO_ERROR);

	/* a string with a NUL inside */
	dmc_writer_init(&w, p, sizeof(p));
	dmc_write_u32(&w, 1);
	dmc_write_u32(&w, 1);
	dmc_write_u32(&w, 3);
	dmc_write_u8(&w, 'a');
	dmc_write_u8(&w, 0);
	dmc_write_u8(&w, 'b');
	ASSERT_EQ(dmc_hello_decode(p, w.len, &hout), DMC_PROTO_ERROR);

	/* a string length beyond DMC_STR_MAX, or beyond the payload */
	dmc_writer_init(&w, p, sizeof(p));
	dmc_write_u32(&w, 1);
	dmc_write_u32(&w, 1);
	dmc_write_u32(&w, DMC_STR_MAX + 1);
	ASSERT_EQ(dmc_hello_decode(p, w.len, &hout), DMC_PROTO_ERROR);
	dmc_writer_init(&w, p, sizeof(p));
	dmc_write_u32(&w, 1);
	dmc_write_u32(&w, 1);
	dmc_write_u32(&w, 0xffffffffu);
	ASSERT_EQ(dmc_hello_decode(p, w.len, &hout), DMC_PROTO_ERROR);

	/* the writer refuses NULs and reports a full buffer instead of overflowing */
	dmc_writer_init(&w, p, sizeof(p));
	dmc_write_str(&w, "a\0b", 3);
	ASSERT_EQ(w.err, DMC_PROTO_NOSPACE);
	dmc_writer_init(&w, p, 6);
	dmc_write_cstr(&w, "abc");
	ASSERT_EQ(w.err, DMC_PROTO_NOSPACE);
	ASSERT_EQ(dmc_hello_encode(&(struct dmc_hello){ 1, 1, { "c", 1 } }, 1, p, 20),
		  DMC_PROTO_NOSPACE);
	ASSERT_EQ(dmc_status_encode(1, p, 15), DMC_PROTO_NOSPACE);
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(header_round_trip), T(header_rejects_bad_fields), T(hello_round_trip),
		  T(ping_round_trip), T(status_round_trip), T(error_round_trip),
		  T(every_truncation_needs_more), T(trailing_bytes_and_bad_strings));
}
