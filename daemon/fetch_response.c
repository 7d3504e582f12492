/*
 * fetch's responses (see fetch.h): what an attempt's answer says, read with bounds from
 * curl's parsed headers: the status and size, Content-Range against the range asked for,
 * the strong ETag (the validator a resumption sends in If-Range), the object's SHA-256 the
 * server states (Repr-Digest, Digest); the body handed to the sink (pauses, sink errors,
 * max_object_bytes), an error answer's body kept apart and its message (JSON "message",
 * S3 <Code>) made printable. Loop thread only (curl's write callback runs on it).
 */
#include <curl/curl.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "fetch_priv.h"

/* ---- what the headers say ---- */

static int b64val(int c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+' || c == '-')
		return 62;
	if (c == '/' || c == '_')
		return 63;
	return -1;
}

/* Decodes exactly 32 bytes of base64 (44 chars with padding, or 43 without). */
static bool b64_sha256(const char *s, size_t len, uint8_t out[32])
{
	uint32_t acc = 0;
	int bits = 0;
	size_t n = 0;

	while (len && s[len - 1] == '=')
		len--;
	if (len != 43)
		return false;
	for (size_t i = 0; i < len; i++) {
		int v = b64val((unsigned char)s[i]);
		if (v < 0)
			return false;
		acc = (acc << 6) | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			if (n < 32)
				out[n++] = (uint8_t)(acc >> bits);
		}
	}
	return n == 32;
}

/* Looks for "<alg>=<b64>" (RFC 3230) or "<alg>=:<b64>:" (RFC 9530) in a header value. */
static bool find_sha256(const char *value, bool colons, uint8_t out[32])
{
	char buf[1024];
	size_t n = strlen(value);
	char *p;

	if (n >= sizeof(buf))
		return false;
	memcpy(buf, value, n + 1);
	for (p = buf; *p;) {
		size_t skip = strspn(p, " \t,");
		size_t len;
		p += skip;
		len = strcspn(p, ",");
		if (len > 8 && strncasecmp(p, "sha-256=", 8) == 0) {
			const char *v = p + 8;
			size_t vlen = len - 8;
			while (vlen && (v[vlen - 1] == ' ' || v[vlen - 1] == '\t'))
				vlen--;
			if (colons && vlen >= 2 && v[0] == ':' && v[vlen - 1] == ':' &&
			    b64_sha256(v + 1, vlen - 2, out))
				return true;
			if (!colons && b64_sha256(v, vlen, out))
				return true;
		}
		p += len;
	}
	return false;
}

/*
 * The object's SHA-256 as the server states it: RFC 9530 `Repr-Digest: sha-256=:B64:`, or
 * the older RFC 3230 `Digest: SHA-256=B64`.
 */
static bool response_sha256(CURL *easy, uint8_t out[32])
{
	struct curl_header *h;

	if (curl_easy_header(easy, "Repr-Digest", 0, CURLH_HEADER, -1, &h) == CURLHE_OK &&
	    h->value && find_sha256(h->value, true, out))
		return true;
	if (curl_easy_header(easy, "Digest", 0, CURLH_HEADER, -1, &h) == CURLHE_OK && h->value &&
	    find_sha256(h->value, false, out))
		return true;
	return false;
}

static const char *header_value(CURL *easy, const char *name)
{
	struct curl_header *h;

	if (curl_easy_header(easy, name, 0, CURLH_HEADER, -1, &h) == CURLHE_OK)
		return h->value;
	return NULL;
}

/* ---- the body ---- */

/* Content-Range: bytes FIRST-LAST/TOTAL */
static bool parse_content_range(const char *v, uint64_t *first, uint64_t *total)
{
	unsigned long long a, b, t;
	char star;

	if (!v)
		return false;
	if (sscanf(v, "bytes %llu-%llu/%llu", &a, &b, &t) == 3 && a <= b && b < t) {
		*first = a;
		*total = t;
		return true;
	}
	if (sscanf(v, "bytes %llu-%llu/%c", &a, &b, &star) == 3 && star == '*' && a <= b) {
		*first = a;
		*total = FETCH_SIZE_UNKNOWN;
		return true;
	}
	return false;
}

/* The first body bytes of an attempt: decide what they are. Returns false to abort. */
bool begin_body(struct fetch_xfer *x)
{
	struct fetch_response r = { 0 };
	long status = 0;
	curl_off_t clen = -1;
	const char *etag, *ct;

	curl_easy_getinfo(x->easy, CURLINFO_RESPONSE_CODE, &status);
	if (status != 200 && status != 206) {
		x->error_body = true;
		return true;
	}
	curl_easy_getinfo(x->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &clen);
	r.status = status;
	r.total_size = clen >= 0 ? (uint64_t)clen : FETCH_SIZE_UNKNOWN;
	if (status == 206) {
		uint64_t first, total;
		if (!parse_content_range(header_value(x->easy, "Content-Range"), &first, &total) ||
		    first != x->delivered) {
			/* not the part we asked for: take nothing, start over */
			x->restart = true;
			return false;
		}
		r.offset = first;
		r.total_size = total;
	} else {
		r.offset = 0;
		x->delivered = 0; /* a whole body: a resumed object starts over */
	}
	if (r.total_size != FETCH_SIZE_UNKNOWN && r.total_size > x->f->opts.max_object_bytes) {
		x->limit_hit = true;
		return false;
	}
	etag = header_value(x->easy, "ETag");
	if (etag && strncmp(etag, "W/", 2) != 0 && strlen(etag) < sizeof(x->etag))
		snprintf(x->etag, sizeof(x->etag), "%s", etag);
	else if (status == 200)
		x->etag[0] = '\0';
	r.etag = x->etag;
	ct = header_value(x->easy, "Content-Type");
	r.content_type = ct ? ct : "";
	r.has_sha256 = response_sha256(x->easy, r.sha256);
	x->body_started = true;
	if (x->ops->on_start) {
		int rc = x->ops->on_start(x, &r);
		if (rc < 0) {
			x->sink_err = rc;
			return false;
		}
	}
	return true;
}

size_t on_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	struct fetch_xfer *x = userdata;
	size_t n = size * nmemb;
	int rc;

	if (x->cancelled)
		return 0;
	if (!x->body_started && !x->error_body && !begin_body(x))
		return 0;
	if (x->error_body) {
		size_t take = n < ERRBODY_MAX - 1 - x->errbody_len ? n : ERRBODY_MAX - 1 - x->errbody_len;
		memcpy(x->errbody + x->errbody_len, ptr, take);
		x->errbody_len += take;
		x->errbody[x->errbody_len] = '\0';
		return n;
	}
	if (x->delivered + n > x->f->opts.max_object_bytes) {
		x->limit_hit = true;
		return 0;
	}
	rc = x->ops->on_data(x, ptr, n);
	if (rc == FETCH_PAUSE) {
		x->paused = true;
		return CURL_WRITEFUNC_PAUSE;
	}
	if (rc < 0) {
		x->sink_err = rc;
		return 0;
	}
	x->delivered += n;
	x->got += n;
	x->res.bytes += n;
	x->f->stats.bytes += n;
	return n;
}

/* The server's error text, from a JSON {"message": ...} body if there is one. */
void error_message(struct fetch_xfer *x, long status)
{
	const char *m = strstr(x->errbody, "\"message\"");
	size_t n = 0;
	char text[160] = "";

	const char *code = strstr(x->errbody, "<Code>");

	if (!m && code) {
		/* S3: <Error><Code>NoSuchKey</Code>... */
		m = code + 6;
		while (m[n] && m[n] != '<' && n < sizeof(text) - 1) {
			text[n] = (m[n] >= 32 && m[n] < 127) ? m[n] : '?';
			n++;
		}
		text[n] = '\0';
		m = NULL;
	}
	if (m && (m = strchr(m + 9, '"'))) {
		m++;
		while (m[n] && m[n] != '"' && n < sizeof(text) - 1) {
			text[n] = (m[n] >= 32 && m[n] < 127) ? m[n] : '?';
			n++;
		}
		text[n] = '\0';
	}
	snprintf(x->res.message, sizeof(x->res.message), "HTTP %ld%s%s", status, *text ? ": " : "",
		 text);
}
