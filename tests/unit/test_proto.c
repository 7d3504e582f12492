/* Unit tests for the protocol codec (proto/proto.c). */
#include <math.h>
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


#define S(lit) ((struct dmc_str){ lit, sizeof(lit) - 1 })
#define ASSERT_DSTR(a, lit)                                                                        \
	do {                                                                                       \
		ASSERT_EQ((a).len, sizeof(lit) - 1);                                               \
		ASSERT_MEM_EQ((a).ptr, lit, sizeof(lit) - 1);                                      \
	} while (0)

TEST(prefetch_round_trip)
{
	struct dmc_prefetch in = { DMC_SOURCE_DATAMINT, 0, S("ct"), S("latest"),
				   S("http://127.0.0.1:8080"), S("secret-key") },
			    out;
	struct dmc_header h;
	int n = dmc_prefetch_encode(&in, 5, frame, sizeof(frame));

	ASSERT_GT(n, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_PREFETCH, 0, 5, &h));
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, h.length, &out), DMC_PROTO_OK);
	ASSERT_EQ(out.source, DMC_SOURCE_DATAMINT);
	ASSERT_DSTR(out.project, "ct");
	ASSERT_DSTR(out.version, "latest");
	ASSERT_DSTR(out.server, "http://127.0.0.1:8080");
	ASSERT_DSTR(out.api_key, "secret-key");
	for (uint32_t len = 0; len < h.length; len++)
		ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, len, &out), DMC_PROTO_ERROR);
	/* the offline flag travels; undefined flags are refused */
	in.flags = DMC_PREFETCH_OFFLINE;
	n = dmc_prefetch_encode(&in, 5, frame, sizeof(frame));
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_OK);
	ASSERT_EQ(out.flags, DMC_PREFETCH_OFFLINE);
	in.flags = DMC_PREFETCH_FLAGS_DEFINED + 1; /* the next bit, undefined */
	n = dmc_prefetch_encode(&in, 5, frame, sizeof(frame));
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_ERROR);
	/* a shard travels after the key, and only with its flag; a rank outside it is refused */
	in.flags = DMC_PREFETCH_SHARD | DMC_PREFETCH_TO_TIER;
	in.shard_rank = 2;
	in.shard_world = 3;
	n = dmc_prefetch_encode(&in, 5, frame, sizeof(frame));
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_OK);
	ASSERT_EQ(out.flags, DMC_PREFETCH_SHARD | DMC_PREFETCH_TO_TIER);
	ASSERT_EQ(out.shard_rank, 2);
	ASSERT_EQ(out.shard_world, 3);
	ASSERT_DSTR(out.api_key, "secret-key");
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE - 4, &out),
		  DMC_PROTO_ERROR);
	in.shard_rank = 3;
	n = dmc_prefetch_encode(&in, 5, frame, sizeof(frame));
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_ERROR);
	in.flags = 0;
	n = dmc_prefetch_encode(&in, 5, frame, sizeof(frame));
	ASSERT_EQ(dmc_prefetch_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_OK);
	ASSERT_EQ(out.shard_world, 1);
	ASSERT_EQ(out.shard_rank, 0);
}

TEST(progress_round_trip)
{
	struct dmc_progress in = { 7, 9, DMC_JOB_DOWNLOADING, S("p-id"), S("ct"), S("2025-01-01"),
				   100, 40, 10, 2, 1u << 30, 1u << 29, 12345678, 4000,
				   DMC_E_UPSTREAM_PERMANENT, 404, S("r-1"), S("gone") },
			    out;
	struct dmc_header h;
	int n = dmc_progress_encode(&in, true, 5, frame, sizeof(frame));

	ASSERT_GT(n, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_PREFETCH, DMC_FLAG_REPLY | DMC_FLAG_MORE, 5,
			   &h));
	ASSERT_EQ(dmc_progress_decode(frame + DMC_HEADER_SIZE, h.length, &out), DMC_PROTO_OK);
	ASSERT_UINT_EQ(out.job_id, 7);
	ASSERT_UINT_EQ(out.snapshot_id, 9);
	ASSERT_EQ(out.state, DMC_JOB_DOWNLOADING);
	ASSERT_DSTR(out.project_id, "p-id");
	ASSERT_DSTR(out.project_name, "ct");
	ASSERT_DSTR(out.version, "2025-01-01");
	ASSERT_UINT_EQ(out.items_total, 100);
	ASSERT_UINT_EQ(out.items_done, 40);
	ASSERT_UINT_EQ(out.items_cached, 10);
	ASSERT_UINT_EQ(out.items_failed, 2);
	ASSERT_UINT_EQ(out.bytes_total, 1u << 30);
	ASSERT_UINT_EQ(out.bytes_done, 1u << 29);
	ASSERT_UINT_EQ(out.rate_bps, 12345678);
	ASSERT_UINT_EQ(out.eta_ms, 4000);
	ASSERT_EQ(out.error_code, DMC_E_UPSTREAM_PERMANENT);
	ASSERT_EQ(out.http_status, 404);
	ASSERT_DSTR(out.error_resource, "r-1");
	ASSERT_DSTR(out.error_message, "gone");
	for (uint32_t len = 0; len < h.length; len++)
		ASSERT_EQ(dmc_progress_decode(frame + DMC_HEADER_SIZE, len, &out), DMC_PROTO_ERROR);
	/* the final reply has no MORE flag; an unknown state is malformed */
	n = dmc_progress_encode(&in, false, 5, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_PREFETCH, DMC_FLAG_REPLY, 5, &h));
	in.state = 99;
	n = dmc_progress_encode(&in, false, 5, frame, sizeof(frame));
	ASSERT_EQ(dmc_progress_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_ERROR);
}

TEST(cache_requests_round_trip)
{
	struct dmc_str p, sv;
	struct dmc_header h;
	uint32_t flags, cancelled;
	struct dmc_evict_reply er = { 3, 40, 1ull << 33 }, erout;
	struct dmc_verify_reply vr = { 1000, 2, 1ull << 34 }, vrout;
	int n;

	n = dmc_cancel_encode("ct", "", 1, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_CANCEL, 0, 1, &h));
	ASSERT_EQ(dmc_cancel_decode(frame + DMC_HEADER_SIZE, h.length, &p, &sv), DMC_PROTO_OK);
	ASSERT_DSTR(p, "ct");
	ASSERT_EQ(sv.len, 0);
	n = dmc_cancel_reply_encode(2, 1, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_CANCEL, DMC_FLAG_REPLY, 1, &h));
	ASSERT_EQ(dmc_cancel_reply_decode(frame + DMC_HEADER_SIZE, h.length, &cancelled),
		  DMC_PROTO_OK);
	ASSERT_EQ(cancelled, 2);

	n = dmc_evict_encode(DMC_EVICT_ALL, "", 2, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_EVICT, 0, 2, &h));
	ASSERT_EQ(dmc_evict_decode(frame + DMC_HEADER_SIZE, h.length, &flags, &p), DMC_PROTO_OK);
	ASSERT_EQ(flags, DMC_EVICT_ALL);
	n = dmc_evict_encode(2, "", 2, frame, sizeof(frame));
	ASSERT_EQ(dmc_evict_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &flags, &p),
		  DMC_PROTO_ERROR);
	n = dmc_evict_reply_encode(&er, 2, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_EVICT, DMC_FLAG_REPLY, 2, &h));
	ASSERT_EQ(dmc_evict_reply_decode(frame + DMC_HEADER_SIZE, h.length, &erout), DMC_PROTO_OK);
	ASSERT_UINT_EQ(erout.snapshots, 3);
	ASSERT_UINT_EQ(erout.blobs, 40);
	ASSERT_UINT_EQ(erout.bytes, 1ull << 33);

	n = dmc_verify_encode(3, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_VERIFY, 0, 3, &h));
	ASSERT_EQ(dmc_empty_decode(frame + DMC_HEADER_SIZE, h.length), DMC_PROTO_OK);
	n = dmc_verify_reply_encode(&vr, 3, frame, sizeof(frame));
	ASSERT_EQ(dmc_verify_reply_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE,
					  &vrout),
		  DMC_PROTO_OK);
	ASSERT_UINT_EQ(vrout.blobs_checked, 1000);
	ASSERT_UINT_EQ(vrout.blobs_bad, 2);
	ASSERT_UINT_EQ(vrout.bytes_checked, 1ull << 34);
}

TEST(tier_round_trip)
{
	static const char lines[] = "ab 10 1700000000 ok\ncd 20 1700000001 kept\n";
	struct dmc_tier_reply tr = { 2, 30, 5, 1, 0, 0, 7, 1, S(lines) }, trout;
	struct dmc_header h;
	uint32_t action, flags;
	int n;

	n = dmc_tier_encode(DMC_TIER_GC, DMC_TIER_DRY_RUN, 4, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_TIER, 0, 4, &h));
	ASSERT_EQ(dmc_tier_decode(frame + DMC_HEADER_SIZE, h.length, &action, &flags),
		  DMC_PROTO_OK);
	ASSERT_EQ(action, DMC_TIER_GC);
	ASSERT_EQ(flags, DMC_TIER_DRY_RUN);
	/* an undefined flag is refused */
	n = dmc_tier_encode(DMC_TIER_LS, 4, 4, frame, sizeof(frame));
	ASSERT_EQ(dmc_tier_decode(frame + DMC_HEADER_SIZE, (size_t)n - DMC_HEADER_SIZE, &action,
				  &flags),
		  DMC_PROTO_ERROR);
	n = dmc_tier_reply_encode(&tr, 4, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_TIER, DMC_FLAG_REPLY, 4, &h));
	ASSERT_EQ(dmc_tier_reply_decode(frame + DMC_HEADER_SIZE, h.length, &trout), DMC_PROTO_OK);
	ASSERT_UINT_EQ(trout.blobs, 2);
	ASSERT_UINT_EQ(trout.blob_bytes, 30);
	ASSERT_UINT_EQ(trout.maps, 5);
	ASSERT_UINT_EQ(trout.maps_deleted, 1);
	ASSERT_UINT_EQ(trout.blobs_bad, 7);
	ASSERT_EQ(trout.truncated, 1);
	ASSERT_DSTR(trout.entries, lines);
	/* one byte short: malformed */
	ASSERT_EQ(dmc_tier_reply_decode(frame + DMC_HEADER_SIZE, h.length - 1, &trout),
		  DMC_PROTO_ERROR);
}

TEST(list_round_trip)
{
	struct dmc_snapshot_info in = { 4, DMC_SOURCE_LOCAL, 1, S(""), S("id"), S("sample"),
					S("v1"), 20, 19, 123456, 1700000000000ull, 61001, 120000 },
				 out;
	struct dmc_writer w;
	struct dmc_reader r;
	struct dmc_header h;
	int n;

	n = dmc_list_encode(4, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_LIST, 0, 4, &h));
	dmc_frame_begin(&w, frame, sizeof(frame));
	dmc_write_u32(&w, 2);
	dmc_snapshot_info_write(&w, &in);
	in.id = 5;
	dmc_snapshot_info_write(&w, &in);
	n = dmc_frame_end(&w, DMC_OP_LIST, DMC_FLAG_REPLY, 4, 0);
	ASSERT(check_frame(frame, (size_t)n, DMC_OP_LIST, DMC_FLAG_REPLY, 4, &h));
	dmc_reader_init(&r, frame + DMC_HEADER_SIZE, h.length);
	ASSERT_EQ(dmc_read_u32(&r), 2);
	dmc_snapshot_info_read(&r, &out);
	ASSERT_UINT_EQ(out.id, 4);
	ASSERT_EQ(out.source, DMC_SOURCE_LOCAL);
	ASSERT_EQ(out.complete, 1);
	ASSERT_DSTR(out.project_name, "sample");
	ASSERT_DSTR(out.version, "v1");
	ASSERT_UINT_EQ(out.items_stored, 19);
	ASSERT_UINT_EQ(out.created_ms, 1700000000000ull);
	ASSERT_UINT_EQ(out.owner_uid, 61001);
	ASSERT_UINT_EQ(out.bytes_stored, 120000);
	dmc_snapshot_info_read(&r, &out);
	ASSERT_UINT_EQ(out.id, 5);
	ASSERT_EQ(dmc_reader_finish(&r), DMC_PROTO_OK);
}

TEST(serving_round_trip)
{
	struct dmc_open in = { DMC_SOURCE_DATAMINT, DMC_OPEN_LUT, DMC_DTYPE_F32, S("ct"), S(""),
			       S("http://x"), S("k"), 1u << 28 },
			out;
	struct dmc_open_reply rin = { 3, 4, 72, S("pid"), S("ct"), S("v1"), 1u << 28 }, rout;
	struct dmc_item_desc din = { 9, 0, DMC_DTYPE_I16, 4, { 1, 1, 512, 512 }, 4096, 524288,
				     528384, 100, S("") },
			     dout;
	uint64_t idx[3] = { 5, 1, 9 }, h;
	struct dmc_header hd;
	struct dmc_reader r;
	struct dmc_writer w;
	uint32_t n;
	int len;

	len = dmc_open_encode(&in, 1, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)len, DMC_OP_OPEN, 0, 1, &hd));
	ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, hd.length, &out), DMC_PROTO_OK);
	ASSERT_EQ(out.flags, DMC_OPEN_LUT);
	ASSERT_EQ(out.dtype, DMC_DTYPE_F32);
	ASSERT_UINT_EQ(out.arena_bytes, 1u << 28);
	ASSERT_DSTR(out.api_key, "k");
	for (uint32_t l = 0; l < hd.length; l++)
		ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, l, &out), DMC_PROTO_ERROR);
	in.dtype = DMC_DTYPE_LAST_ + 1;
	len = dmc_open_encode(&in, 1, frame, sizeof(frame));
	ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_ERROR);

	len = dmc_open_reply_encode(&rin, 1, 1, frame, sizeof(frame));
	ASSERT_EQ(dmc_header_decode(frame, (size_t)len, &hd), DMC_PROTO_OK);
	ASSERT_EQ(hd.nfds, 1);
	ASSERT_EQ(dmc_open_reply_decode(frame + DMC_HEADER_SIZE, hd.length, &rout), DMC_PROTO_OK);
	ASSERT_UINT_EQ(rout.items, 72);
	ASSERT_DSTR(rout.version, "v1");
	ASSERT(!rout.regions);
	ASSERT_UINT_EQ(rout.region_id, 0);
	/* DMC_OPEN_REGIONS: two more fields, and a second descriptor */
	rin.regions = true;
	rin.region_id = 5;
	rin.region_bytes = 1u << 30;
	len = dmc_open_reply_encode(&rin, 2, 1, frame, sizeof(frame));
	ASSERT_EQ(dmc_header_decode(frame, (size_t)len, &hd), DMC_PROTO_OK);
	ASSERT_EQ(hd.nfds, 2);
	ASSERT_EQ(dmc_open_reply_decode(frame + DMC_HEADER_SIZE, hd.length, &rout), DMC_PROTO_OK);
	ASSERT(rout.regions);
	ASSERT_UINT_EQ(rout.region_id, 5);
	ASSERT_UINT_EQ(rout.region_bytes, 1u << 30);
	ASSERT_UINT_EQ(rout.arena_bytes, 1u << 28);
	ASSERT_EQ(dmc_open_reply_decode(frame + DMC_HEADER_SIZE, hd.length - 8, &rout),
		  DMC_PROTO_ERROR);
	in.dtype = 0;
	in.flags = DMC_OPEN_REGIONS;
	len = dmc_open_encode(&in, 1, frame, sizeof(frame));
	ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_OK);
	ASSERT_EQ(out.flags, DMC_OPEN_REGIONS);

	len = dmc_get_encode(7, idx, 3, 2, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)len, DMC_OP_GET, 0, 2, &hd));
	ASSERT_EQ(dmc_get_begin(&r, frame + DMC_HEADER_SIZE, hd.length, &h, &n), DMC_PROTO_OK);
	ASSERT_UINT_EQ(h, 7);
	ASSERT_EQ(n, 3);
	ASSERT_UINT_EQ(dmc_read_u64(&r), 5);
	ASSERT_EQ(dmc_get_begin(&r, frame + DMC_HEADER_SIZE, hd.length - 1, &h, &n),
		  DMC_PROTO_ERROR);
	ASSERT_EQ(dmc_get_encode(7, idx, 0, 2, frame, sizeof(frame)), DMC_PROTO_NOSPACE);

	dmc_frame_begin(&w, frame, sizeof(frame));
	dmc_write_u32(&w, 1);
	dmc_item_desc_write(&w, &din);
	len = dmc_frame_end(&w, DMC_OP_GET, DMC_FLAG_REPLY, 2, 0);
	ASSERT_GT(len, 0);
	dmc_reader_init(&r, frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE);
	ASSERT_EQ(dmc_read_u32(&r), 1);
	dmc_item_desc_read(&r, &dout);
	ASSERT_EQ(dmc_reader_finish(&r), DMC_PROTO_OK);
	ASSERT_UINT_EQ(dout.shape[3], 512);
	ASSERT_UINT_EQ(dout.meta_offset, 528384);
	ASSERT_EQ(dmc_dtype_size(DMC_DTYPE_F64), 8);
	ASSERT_STR_EQ(dmc_dtype_name(DMC_DTYPE_I16), "int16");
	ASSERT_EQ(dmc_dtype_size(0), 0);
	ASSERT_NULL(dmc_dtype_name(DMC_DTYPE_LAST_ + 1));
}

TEST(open_policy_round_trip)
{
	struct dmc_open in = { DMC_SOURCE_LOCAL, DMC_OPEN_LUT | DMC_OPEN_POLICY, DMC_DTYPE_F16,
			       S("/d"), S(""), S(""), S(""), 0,
			       { DMC_POLICY_SIZE | DMC_POLICY_CHANNELS | DMC_POLICY_WINDOW,
				 DMC_RESIZE_AREA, 224, 192, 3, 0.0, 40.0, 400.5 } },
			out;
	struct dmc_header hd;
	int len, plain;

	len = dmc_open_encode(&in, 3, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)len, DMC_OP_OPEN, 0, 3, &hd));
	ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, hd.length, &out), DMC_PROTO_OK);
	ASSERT_EQ(out.dtype, DMC_DTYPE_F16);
	ASSERT_EQ(out.policy.ops, DMC_POLICY_SIZE | DMC_POLICY_CHANNELS | DMC_POLICY_WINDOW);
	ASSERT_EQ(out.policy.resize, DMC_RESIZE_AREA);
	ASSERT_EQ(out.policy.height, 224);
	ASSERT_EQ(out.policy.width, 192);
	ASSERT_EQ(out.policy.channels, 3);
	ASSERT(out.policy.window_center == 40.0 && out.policy.window_width == 400.5);
	/* every shorter payload is refused: the policy's fields are all required */
	for (uint32_t l = 0; l < hd.length; l++)
		ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, l, &out), DMC_PROTO_ERROR);
	/* without the flag the policy is neither written nor read: the old message */
	in.flags = DMC_OPEN_LUT;
	plain = dmc_open_encode(&in, 3, frame, sizeof(frame));
	ASSERT_EQ(plain, len - 44);
	ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, (size_t)plain - DMC_HEADER_SIZE, &out),
		  DMC_PROTO_OK);
	ASSERT_EQ(out.policy.ops, 0);
	ASSERT(out.policy.window_width == 0.0);
	ASSERT_EQ(dmc_dtype_size(DMC_DTYPE_BF16), 2);
	ASSERT_STR_EQ(dmc_dtype_name(DMC_DTYPE_F16), "float16");
	ASSERT_STR_EQ(dmc_dtype_name(DMC_DTYPE_BF16), "bfloat16");
}

/* Each bad policy is refused by the codec, whole OPEN frames included. */
TEST(open_policy_rejects_bad_fields)
{
	static const struct dmc_policy good[] = {
		{ DMC_POLICY_CROP, 0, 1, 65535, 0, -1024.0, 0, 0 },
		{ DMC_POLICY_PAD, 0, 8, 8, 0, 0.0, 0, 0 },
		{ DMC_POLICY_SIZE, DMC_RESIZE_NEAREST, 2, 3, 0, 0, 0, 0 },
		{ DMC_POLICY_CHANNELS, 0, 0, 0, 1, 0, 0, 0 },
		{ 0, 0, 0, 0, 0, 0, 0, 0 },
	};
	static const struct dmc_policy bad[] = {
		{ 32, 0, 0, 0, 0, 0, 0, 0 },                                     /* unknown op */
		{ DMC_POLICY_SIZE | DMC_POLICY_CROP, 1, 8, 8, 0, 0, 0, 0 },      /* two geometries */
		{ DMC_POLICY_SIZE, 0, 8, 8, 0, 0, 0, 0 },                        /* no resize */
		{ DMC_POLICY_SIZE, 4, 8, 8, 0, 0, 0, 0 },                        /* unknown resize */
		{ DMC_POLICY_SIZE, 1, 0, 8, 0, 0, 0, 0 },                        /* height 0 */
		{ DMC_POLICY_CROP, 0, 8, 65536, 0, 0, 0, 0 },                    /* too wide */
		{ DMC_POLICY_CROP, 1, 8, 8, 0, 0, 0, 0 },                        /* resize unused */
		{ DMC_POLICY_CHANNELS, 0, 0, 0, 2, 0, 0, 0 },                    /* 2 channels */
		{ 0, 0, 0, 0, 3, 0, 0, 0 },                                      /* channels unused */
		{ 0, 0, 4, 4, 0, 0, 0, 0 },                                      /* size unused */
		{ DMC_POLICY_PAD, 0, 8, 8, 0, INFINITY, 0, 0 },                  /* pad not finite */
		{ DMC_POLICY_SIZE, 1, 8, 8, 0, 1.0, 0, 0 },                      /* pad unused */
		{ DMC_POLICY_WINDOW, 0, 0, 0, 0, 0, 40, 0 },                     /* width 0 */
		{ DMC_POLICY_WINDOW, 0, 0, 0, 0, 0, 40, -5 },                    /* width < 0 */
		{ DMC_POLICY_WINDOW, 0, 0, 0, 0, 0, NAN, 400 },                  /* center NaN */
		{ 0, 0, 0, 0, 0, 0, 0, 400 },                                    /* window unused */
	};
	struct dmc_open in = { DMC_SOURCE_DATAMINT, DMC_OPEN_POLICY, 0, S("ct"), S(""), S("u"),
			       S("k"), 0, { 0 } },
			out;
	int len;

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		in.policy = good[i];
		ASSERT_EQ(dmc_policy_check(&good[i]), DMC_PROTO_OK);
		len = dmc_open_encode(&in, 1, frame, sizeof(frame));
		ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE,
					  &out),
			  DMC_PROTO_OK);
		ASSERT_EQ(out.policy.ops, good[i].ops);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		in.policy = bad[i];
		ASSERT_EQ(dmc_policy_check(&bad[i]), DMC_PROTO_ERROR);
		len = dmc_open_encode(&in, 1, frame, sizeof(frame));
		ASSERT_GT(len, 0);
		ASSERT_EQ(dmc_open_decode(frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE,
					  &out),
			  DMC_PROTO_ERROR);
	}
}

TEST(stream_round_trip_and_order)
{
	struct dmc_stream_req in = { 7, 11, 3, DMC_STREAM_SHUFFLE, 1, 4, 32, 2 }, out;
	struct dmc_batch_head bin = { 5, 32, 1, 4096, 1 << 24, 1 << 25, 3000 }, bout;
	struct dmc_header hd;
	struct dmc_reader r;
	struct dmc_writer w;
	uint64_t per, nb, seen[100] = { 0 };
	int len;

	len = dmc_stream_encode(&in, 9, frame, sizeof(frame));
	ASSERT(check_frame(frame, (size_t)len, DMC_OP_STREAM, 0, 9, &hd));
	ASSERT_EQ(dmc_stream_decode(frame + DMC_HEADER_SIZE, hd.length, &out), DMC_PROTO_OK);
	ASSERT_UINT_EQ(out.seed, 11);
	ASSERT_EQ(out.world_size, 4);
	ASSERT_EQ(out.batch_size, 32);
	for (uint32_t l = 0; l < hd.length; l++)
		ASSERT_EQ(dmc_stream_decode(frame + DMC_HEADER_SIZE, l, &out), DMC_PROTO_ERROR);
	/* every out-of-range field is refused */
	struct dmc_stream_req bad[] = {
		{ 7, 0, 0, 4, 0, 1, 1, 0 },  /* undefined flag */
		{ 7, 0, 0, 0, 4, 4, 1, 0 },  /* rank >= world_size */
		{ 7, 0, 0, 0, 0, 0, 1, 0 },  /* world_size 0 */
		{ 7, 0, 0, 0, 0, 1, 0, 0 },  /* batch_size 0 */
		{ 7, 0, 0, 0, 0, 1, DMC_GET_MAX + 1, 0 },
		{ 7, 0, 0, 0, 0, 1, 1, DMC_STREAM_AHEAD_MAX + 1 },
	};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		len = dmc_stream_encode(&bad[i], 9, frame, sizeof(frame));
		ASSERT_EQ(dmc_stream_decode(frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE,
					    &out),
			  DMC_PROTO_ERROR);
	}

	dmc_frame_begin(&w, frame, sizeof(frame));
	dmc_batch_head_write(&w, &bin);
	len = dmc_frame_end(&w, DMC_OP_STREAM, DMC_FLAG_REPLY | DMC_FLAG_MORE, 9, 0);
	dmc_reader_init(&r, frame + DMC_HEADER_SIZE, (size_t)len - DMC_HEADER_SIZE);
	dmc_batch_head_read(&r, &bout);
	ASSERT_EQ(dmc_reader_finish(&r), DMC_PROTO_OK);
	ASSERT_UINT_EQ(bout.meta_offset, 1 << 25);
	ASSERT_EQ(bout.uniform, 1);

	/* the permutation is a bijection for every size, and depends on the key */
	for (uint64_t n = 1; n <= 100; n++) {
		memset(seen, 0, sizeof(seen));
		for (uint64_t i = 0; i < n; i++) {
			uint64_t p = dmc_stream_perm(i, n, 42);
			ASSERT(p < n);
			ASSERT_UINT_EQ(seen[p], 0);
			seen[p] = 1;
		}
	}
	ASSERT(dmc_stream_perm(0, 100, 1) != dmc_stream_perm(0, 100, 2) ||
	       dmc_stream_perm(1, 100, 1) != dmc_stream_perm(1, 100, 2));
	ASSERT_UINT_EQ(dmc_stream_perm(5, (uint64_t)1 << 40, 3) < ((uint64_t)1 << 40), 1);

	/* DistributedSampler's arithmetic: 19 items, 4 ranks */
	in.flags = 0;
	in.batch_size = 2;
	dmc_stream_plan(19, &in, &per, &nb);
	ASSERT_UINT_EQ(per, 5);
	ASSERT_UINT_EQ(nb, 3);
	in.flags = DMC_STREAM_DROP_LAST;
	dmc_stream_plan(19, &in, &per, &nb);
	ASSERT_UINT_EQ(per, 4);
	ASSERT_UINT_EQ(nb, 2);
	in.flags = 0;
	in.rank = 3;
	/* rank 3 reads positions 3, 7, 11, 15, 19 -> 19 wraps to item 0 (padding) */
	ASSERT_UINT_EQ(dmc_stream_index(19, &in, 4), 0);
	ASSERT_UINT_EQ(dmc_stream_index(19, &in, 1), 7);
	dmc_stream_plan(0, &in, &per, &nb);
	ASSERT_UINT_EQ(nb, 0);
}

TEST(local_need_round_trip)
{
	static uint8_t big[DMC_HEADER_SIZE + DMC_FRAME_MAX];
	static char longest[DMC_LOCAL_PATH_MAX + 2];
	static const char *many[DMC_FDS_MAX + 1];
	const char *paths[] = { "images/a.dcm", "masks/u@x/r0/ann1", "b c/d.png" };
	struct dmc_header h;
	struct dmc_reader r;
	uint32_t first, n;
	int len;

	len = dmc_local_need_encode(253, paths, 3, 41, frame, sizeof(frame));
	ASSERT_GT(len, 0);
	ASSERT_EQ(dmc_header_decode(frame, (size_t)len, &h), DMC_PROTO_OK);
	ASSERT_EQ(h.opcode, DMC_OP_LOCAL_NEED);
	ASSERT_EQ(h.flags, DMC_FLAG_REPLY | DMC_FLAG_MORE); /* an event of the request */
	ASSERT_UINT_EQ(h.request_id, 41);
	ASSERT_EQ(h.nfds, 0);
	ASSERT_EQ(dmc_local_need_begin(&r, frame + DMC_HEADER_SIZE, h.length, &first, &n),
		  DMC_PROTO_OK);
	ASSERT_UINT_EQ(first, 253);
	ASSERT_UINT_EQ(n, 3);
	for (uint32_t i = 0; i < n; i++) {
		struct dmc_str st = dmc_read_str(&r);
		ASSERT_UINT_EQ(st.len, strlen(paths[i]));
		ASSERT_EQ(memcmp(st.ptr, paths[i], st.len), 0);
	}
	ASSERT_EQ(dmc_reader_finish(&r), DMC_PROTO_OK);
	/* a count the payload cannot hold, zero, or more than a message's descriptors */
	for (uint32_t bad = 0; bad < 3; bad++) {
		uint32_t v = bad == 0 ? 0 : bad == 1 ? DMC_FDS_MAX + 1 : 200;
		memcpy(frame + DMC_HEADER_SIZE + 4, &v, 4); /* little-endian host: the tests' CI */
		ASSERT_EQ(dmc_local_need_begin(&r, frame + DMC_HEADER_SIZE, h.length, &first, &n),
			  DMC_PROTO_ERROR);
	}
	/* encoder limits: no empty path, none longer than DMC_LOCAL_PATH_MAX, 1 .. 253 paths */
	memset(longest, 'a', DMC_LOCAL_PATH_MAX);
	paths[1] = longest;
	ASSERT_GT(dmc_local_need_encode(0, paths, 3, 1, big, sizeof(big)), 0);
	longest[DMC_LOCAL_PATH_MAX] = 'a';
	ASSERT_EQ(dmc_local_need_encode(0, paths, 3, 1, big, sizeof(big)), DMC_PROTO_NOSPACE);
	paths[1] = "";
	ASSERT_EQ(dmc_local_need_encode(0, paths, 3, 1, big, sizeof(big)), DMC_PROTO_NOSPACE);
	ASSERT_EQ(dmc_local_need_encode(0, paths, 0, 1, big, sizeof(big)), DMC_PROTO_NOSPACE);
	/* a full window of the longest paths fits in one frame */
	longest[DMC_LOCAL_PATH_MAX] = '\0';
	for (uint32_t i = 0; i <= DMC_FDS_MAX; i++)
		many[i] = longest;
	ASSERT_GT(dmc_local_need_encode(0, many, DMC_FDS_MAX, 1, big, sizeof(big)), 0);
	ASSERT_EQ(dmc_local_need_encode(0, many, DMC_FDS_MAX + 1, 1, big, sizeof(big)),
		  DMC_PROTO_NOSPACE);
}

TEST(local_files_round_trip)
{
	int32_t errs[5] = { 0, 13, 0, 2, 0 }, out[DMC_FDS_MAX];
	int32_t full[DMC_FDS_MAX];
	struct dmc_header h;
	uint32_t first, n;
	int len;

	len = dmc_local_files_encode(7, errs, 5, 42, frame, sizeof(frame));
	ASSERT_GT(len, 0);
	ASSERT_EQ(dmc_header_decode(frame, (size_t)len, &h), DMC_PROTO_OK);
	ASSERT_EQ(h.opcode, DMC_OP_LOCAL_FILES);
	ASSERT_EQ(h.flags, 0); /* client to daemon */
	ASSERT_EQ(h.nfds, 3);  /* one descriptor per zero */
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length, h.nfds, &first, &n,
					 out, DMC_FDS_MAX),
		  DMC_PROTO_OK);
	ASSERT_UINT_EQ(first, 7);
	ASSERT_UINT_EQ(n, 5);
	ASSERT_EQ(memcmp(out, errs, sizeof(errs)), 0);
	/* the zeros must number nfds: one descriptor more or fewer is an error */
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length, 2, &first, &n, out,
					 DMC_FDS_MAX),
		  DMC_PROTO_ERROR);
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length, 4, &first, &n, out,
					 DMC_FDS_MAX),
		  DMC_PROTO_ERROR);
	/* more entries than the caller holds, a truncated or padded payload */
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length, 3, &first, &n, out, 4),
		  DMC_PROTO_ERROR);
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length - 1, 3, &first, &n, out,
					 DMC_FDS_MAX),
		  DMC_PROTO_ERROR);
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length + 1, 3, &first, &n, out,
					 DMC_FDS_MAX),
		  DMC_PROTO_ERROR);
	/* an errno out of range (negative, above 4095) */
	errs[1] = -1;
	ASSERT_EQ(dmc_local_files_encode(7, errs, 5, 42, frame, sizeof(frame)), DMC_PROTO_NOSPACE);
	memset(frame + DMC_HEADER_SIZE + 12, 0xff, 4);
	ASSERT_EQ(dmc_local_files_decode(frame + DMC_HEADER_SIZE, h.length, 3, &first, &n, out,
					 DMC_FDS_MAX),
		  DMC_PROTO_ERROR);
	/* a whole window: 253 descriptors, the most one sendmsg passes */
	memset(full, 0, sizeof(full));
	len = dmc_local_files_encode(0, full, DMC_FDS_MAX, 1, frame, sizeof(frame));
	ASSERT_GT(len, 0);
	ASSERT_EQ(dmc_header_decode(frame, (size_t)len, &h), DMC_PROTO_OK);
	ASSERT_EQ(h.nfds, DMC_FDS_MAX);
	ASSERT_EQ(dmc_local_files_encode(0, full, 0, 1, frame, sizeof(frame)), DMC_PROTO_NOSPACE);
}

TEST(frame_set_nfds)
{
	struct dmc_prefetch m = { DMC_SOURCE_LOCAL, 0, { "/data/ds", 8 }, { "", 0 }, { "", 0 },
				  { "", 0 } };
	struct dmc_header h;
	int len = dmc_prefetch_encode(&m, 5, frame, sizeof(frame));

	ASSERT_GT(len, 0);
	ASSERT_EQ(dmc_frame_set_nfds(frame, (size_t)len, 1), DMC_PROTO_OK);
	ASSERT_EQ(dmc_header_decode(frame, (size_t)len, &h), DMC_PROTO_OK);
	ASSERT_EQ(h.nfds, 1);
	ASSERT_EQ(h.opcode, DMC_OP_PREFETCH);
	ASSERT_UINT_EQ(h.request_id, 5);
	ASSERT_EQ(dmc_frame_set_nfds(frame, (size_t)len, DMC_FDS_MAX + 1), DMC_PROTO_ERROR);
	ASSERT_EQ(dmc_frame_set_nfds(frame, DMC_HEADER_SIZE - 1, 1), DMC_PROTO_ERROR);
	ASSERT_STR_EQ(dmc_opcode_name(DMC_OP_LOCAL_NEED), "LOCAL_NEED");
	ASSERT_STR_EQ(dmc_opcode_name(DMC_OP_LOCAL_FILES), "LOCAL_FILES");
}

int main(int argc, char **argv)
{
	RUN_TESTS(T(header_round_trip), T(header_rejects_bad_fields), T(hello_round_trip),
		  T(ping_round_trip), T(status_round_trip), T(error_round_trip),
		  T(every_truncation_needs_more), T(trailing_bytes_and_bad_strings),
		  T(prefetch_round_trip), T(progress_round_trip), T(cache_requests_round_trip), T(tier_round_trip),
		  T(list_round_trip), T(serving_round_trip), T(open_policy_round_trip),
		  T(open_policy_rejects_bad_fields), T(stream_round_trip_and_order),
		  T(local_need_round_trip), T(local_files_round_trip), T(frame_set_nfds));
}
