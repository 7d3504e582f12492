/*
 * Datamint credentials: the API key and server URL, from an option, the environment, or
 * the YAML file `datamint-config` writes. See dmcache.h.
 *
 * The only file of libdmcache that includes yaml.h. The file is read whole (at most
 * DMC_CREDENTIALS_FILE_MAX bytes) and walked with libyaml's event parser, which allocates
 * nothing per nesting level beyond its own stacks; nesting is capped anyway. Every copy of
 * the key this file makes, and libyaml's buffers and scalars, are wiped before they are
 * freed.
 */
#include <errno.h>
#include <fcntl.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml.h>

#include "dmcache.h"

#define DMC_EXPORT __attribute__((visibility("default")))

#define CONFIG_SUBPATH "/datamintapi/datamintapi.yaml"
#define API_KEY_MAX 4096u  /* bytes of a key: it travels in one HTTP header */
#define URL_MAX 4096u      /* bytes of a server URL */
#define YAML_DEPTH_MAX 32  /* nesting inside values we skip; the file is a flat mapping */

static void errf(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void errf(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static void wipe_free(char *s)
{
	if (s) {
		explicit_bzero(s, strlen(s));
		free(s);
	}
}

static char *dup_n(const char *s, size_t n)
{
	char *p = malloc(n + 1);

	if (p) {
		memcpy(p, s, n);
		p[n] = '\0';
	}
	return p;
}

/* Control bytes would let a value escape its HTTP header line. */
static bool has_control(const char *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)s[i] < 0x20 || s[i] == 0x7f)
			return true;
	return false;
}

/* Checks a key from `from`; never quotes the key itself. */
static int check_key(const char *key, size_t n, const char *from, char *err, size_t errlen)
{
	if (n > API_KEY_MAX) {
		errf(err, errlen, "the API key from %s is longer than %u bytes", from, API_KEY_MAX);
		return -EINVAL;
	}
	if (memchr(key, '\0', n) || has_control(key, n)) {
		errf(err, errlen, "the API key from %s contains a control character", from);
		return -EINVAL;
	}
	return 0;
}

/* Checks a server URL and returns a copy without trailing slashes. */
static int normalize_url(const char *url, size_t n, const char *from, char **ret, char *err,
			 size_t errlen)
{
	char *p;

	if (n > URL_MAX) {
		errf(err, errlen, "the server URL from %s is longer than %u bytes", from, URL_MAX);
		return -EINVAL;
	}
	if (memchr(url, '\0', n) || has_control(url, n) || memchr(url, ' ', n)) {
		errf(err, errlen, "the server URL from %s contains a space or control character",
		     from);
		return -EINVAL;
	}
	while (n && url[n - 1] == '/')
		n--;
	if (!((n > 7 && strncasecmp(url, "http://", 7) == 0) ||
	      (n > 8 && strncasecmp(url, "https://", 8) == 0))) {
		errf(err, errlen, "the server URL '%.*s' from %s is not an http:// or https:// URL",
		     (int)(n < 200 ? n : 200), url, from);
		return -EINVAL;
	}
	p = dup_n(url, n);
	if (!p)
		return -ENOMEM;
	*ret = p;
	return 0;
}

/* The config file's path, as platformdirs computes it on Linux; NULL when there is no home. */
static char *config_path(void)
{
	const char *base = getenv("XDG_CONFIG_HOME"), *home;
	char pwbuf[4096];
	struct passwd pw, *res = NULL;
	char *p;
	size_t n;
	bool blank = true;

	for (const char *q = base; q && *q; q++)
		if (*q != ' ' && *q != '\t' && *q != '\n')
			blank = false;
	if (!blank) {
		n = strlen(base) + sizeof(CONFIG_SUBPATH);
		p = malloc(n);
		if (p)
			snprintf(p, n, "%s" CONFIG_SUBPATH, base);
		return p;
	}
	home = getenv("HOME");
	if (!home || !*home) {
		if (getpwuid_r(geteuid(), &pw, pwbuf, sizeof(pwbuf), &res) != 0 || !res ||
		    !res->pw_dir)
			return NULL;
		home = res->pw_dir;
	}
	n = strlen(home) + sizeof("/.config" CONFIG_SUBPATH);
	p = malloc(n);
	if (p)
		snprintf(p, n, "%s/.config" CONFIG_SUBPATH, home);
	return p;
}

/* ---- the YAML file ---- */

struct yaml_values {
	char *api_key;  /* NULL when absent or null */
	char *url;
	bool has_key;   /* an api_key entry with a value was present */
};

static void yaml_values_done(struct yaml_values *v)
{
	wipe_free(v->api_key);
	free(v->url);
	*v = (struct yaml_values){ 0 };
}

/* Wipes the input and token buffers of a parser before yaml_parser_delete() frees them. */
static void wipe_parser(yaml_parser_t *p)
{
	if (p->raw_buffer.start)
		explicit_bzero(p->raw_buffer.start,
			       (size_t)(p->raw_buffer.end - p->raw_buffer.start));
	if (p->buffer.start)
		explicit_bzero(p->buffer.start, (size_t)(p->buffer.end - p->buffer.start));
	for (yaml_token_t *t = p->tokens.head; t && t != p->tokens.tail; t++)
		if (t->type == YAML_SCALAR_TOKEN && t->data.scalar.value)
			explicit_bzero(t->data.scalar.value, t->data.scalar.length);
}

static void event_done(yaml_event_t *e)
{
	if (e->type == YAML_SCALAR_EVENT && e->data.scalar.value)
		explicit_bzero(e->data.scalar.value, e->data.scalar.length);
	yaml_event_delete(e);
}

/* A plain scalar that YAML's core schema reads as null. */
static bool is_null(const yaml_event_t *e)
{
	static const char *const nulls[] = { "", "~", "null", "Null", "NULL" };
	const char *v = (const char *)e->data.scalar.value;

	if (e->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return false;
	for (size_t i = 0; i < sizeof(nulls) / sizeof(nulls[0]); i++)
		if (e->data.scalar.length == strlen(nulls[i]) &&
		    memcmp(v, nulls[i], e->data.scalar.length) == 0)
			return true;
	return false;
}

static bool scalar_is(const yaml_event_t *e, const char *word)
{
	size_t n = strlen(word);

	return e->data.scalar.length == n && memcmp(e->data.scalar.value, word, n) == 0;
}

enum yaml_state {
	Y_STREAM,    /* before the document */
	Y_DOCUMENT,  /* expecting the root node */
	Y_KEY,       /* in the root mapping, expecting a key or its end */
	Y_VALUE,     /* expecting the value of `key` */
	Y_DOC_END,   /* after the root node */
	Y_AFTER,     /* after the document */
};

/*
 * Walks the events of `buf`: a mapping with scalar keys (or an empty document), as
 * PyYAML's safe_load accepts it. Takes api_key and default_api_url, which must be strings
 * or null; other keys are skipped, whatever their values. Errors name the line.
 */
static int parse_yaml(const char *buf, size_t len, const char *path, struct yaml_values *ret,
		      char *err, size_t errlen)
{
	yaml_parser_t parser;
	yaml_event_t ev;
	enum yaml_state st = Y_STREAM;
	enum { K_OTHER, K_KEY, K_URL } key = K_OTHER;
	struct yaml_values v = { 0 };
	int depth = 0, rc = 0;
	bool done = false;

	if (err && errlen)
		err[0] = '\0'; /* the generic message below fills it only if nothing more precise did */
	if (!yaml_parser_initialize(&parser))
		return -ENOMEM;
	yaml_parser_set_input_string(&parser, (const unsigned char *)buf, len);
	while (!done) {
		if (!yaml_parser_parse(&parser, &ev)) {
			errf(err, errlen, "%s:%zu: not valid YAML: %s", path,
			     (size_t)parser.problem_mark.line + 1,
			     parser.problem ? parser.problem : "parse error");
			rc = parser.error == YAML_MEMORY_ERROR ? -ENOMEM : -EINVAL;
			break;
		}
		if (depth > 0) { /* inside a value being skipped */
			if (ev.type == YAML_SEQUENCE_START_EVENT || ev.type == YAML_MAPPING_START_EVENT)
				depth++;
			else if (ev.type == YAML_SEQUENCE_END_EVENT ||
				 ev.type == YAML_MAPPING_END_EVENT)
				depth--;
			if (depth > YAML_DEPTH_MAX) {
				errf(err, errlen, "%s:%zu: nested deeper than %d levels", path,
				     (size_t)ev.start_mark.line + 1, YAML_DEPTH_MAX);
				rc = -EINVAL;
			} else if (depth == 0) {
				st = Y_KEY; /* the skipped value is over */
			}
			event_done(&ev);
			if (rc < 0)
				break;
			continue;
		}
		switch (st) {
		case Y_STREAM:
			if (ev.type == YAML_STREAM_END_EVENT)
				done = true; /* an empty file */
			else if (ev.type == YAML_DOCUMENT_START_EVENT)
				st = Y_DOCUMENT;
			else if (ev.type != YAML_STREAM_START_EVENT)
				rc = -EINVAL;
			break;
		case Y_DOCUMENT:
			if (ev.type == YAML_MAPPING_START_EVENT)
				st = Y_KEY;
			else if (ev.type == YAML_SCALAR_EVENT && is_null(&ev))
				st = Y_DOC_END; /* an empty document */
			else
				rc = -EINVAL;
			break;
		case Y_KEY:
			if (ev.type == YAML_MAPPING_END_EVENT) {
				st = Y_DOC_END;
			} else if (ev.type == YAML_SCALAR_EVENT) {
				key = scalar_is(&ev, "api_key")		? K_KEY
				      : scalar_is(&ev, "default_api_url") ? K_URL
									  : K_OTHER;
				st = Y_VALUE;
			} else if (ev.type == YAML_ALIAS_EVENT) {
				key = K_OTHER;
				st = Y_VALUE;
			} else {
				rc = -EINVAL;
			}
			break;
		case Y_VALUE:
			if (ev.type == YAML_SCALAR_EVENT && key != K_OTHER) {
				char **slot = key == K_KEY ? &v.api_key : &v.url;
				size_t n = ev.data.scalar.length;
				const char *s = (const char *)ev.data.scalar.value;

				if (key == K_KEY)
					wipe_free(*slot);
				else
					free(*slot);
				*slot = NULL;
				if (key == K_KEY)
					v.has_key = false;
				if (!is_null(&ev)) {
					if (memchr(s, '\0', n)) {
						errf(err, errlen, "%s:%zu: a NUL byte in '%s'", path,
						     (size_t)ev.start_mark.line + 1,
						     key == K_KEY ? "api_key" : "default_api_url");
						rc = -EINVAL;
						break;
					}
					*slot = dup_n(s, n);
					if (!*slot) {
						rc = -ENOMEM;
						break;
					}
					if (key == K_KEY)
						v.has_key = true;
				}
				st = Y_KEY;
			} else if (ev.type == YAML_SCALAR_EVENT || ev.type == YAML_ALIAS_EVENT) {
				st = key == K_OTHER ? Y_KEY : Y_VALUE;
				if (key != K_OTHER) {
					errf(err, errlen, "%s:%zu: '%s' must be a plain string", path,
					     (size_t)ev.start_mark.line + 1,
					     key == K_KEY ? "api_key" : "default_api_url");
					rc = -EINVAL;
				}
			} else if (ev.type == YAML_SEQUENCE_START_EVENT ||
				   ev.type == YAML_MAPPING_START_EVENT) {
				if (key != K_OTHER) {
					errf(err, errlen, "%s:%zu: '%s' must be a string", path,
					     (size_t)ev.start_mark.line + 1,
					     key == K_KEY ? "api_key" : "default_api_url");
					rc = -EINVAL;
				}
				depth = 1;
			} else {
				rc = -EINVAL;
			}
			break;
		case Y_DOC_END:
			if (ev.type == YAML_DOCUMENT_END_EVENT)
				st = Y_AFTER;
			else
				rc = -EINVAL;
			break;
		case Y_AFTER:
			if (ev.type == YAML_STREAM_END_EVENT) {
				done = true;
			} else {
				errf(err, errlen, "%s:%zu: more than one YAML document", path,
				     (size_t)ev.start_mark.line + 1);
				rc = -EINVAL;
			}
			break;
		}
		if (rc == -EINVAL && err && errlen && !*err)
			errf(err, errlen, "%s:%zu: not a mapping of settings such as "
					  "'api_key: KEY' (as datamint-config writes)",
			     path, (size_t)ev.start_mark.line + 1);
		event_done(&ev);
		if (rc < 0)
			break;
	}
	wipe_parser(&parser);
	yaml_parser_delete(&parser);
	if (rc < 0) {
		yaml_values_done(&v);
		return rc;
	}
	*ret = v;
	return 0;
}

/*
 * docs/reliability.md S5: a key file must belong to the caller and be private to them (mode
 * 0600 or 0400; any group or other bit, or more, is refused).
 */
static int check_key_file(const struct stat *st, uid_t euid, const char *path, char *err,
			  size_t errlen)
{
	if (st->st_uid != euid) {
		errf(err, errlen,
		     "%s belongs to uid %u, not to you (uid %u): refusing to read an API key from "
		     "it; make it yours (chown) or set DATAMINT_API_KEY",
		     path, (unsigned)st->st_uid, (unsigned)euid);
		return -EACCES;
	}
	if (st->st_mode & 07177) {
		errf(err, errlen,
		     "%s has mode %04o, so others may read or change your API key: refusing to use "
		     "it; run: chmod 600 %s",
		     path, (unsigned)(st->st_mode & 07777), path);
		return -EACCES;
	}
	return 0;
}

/*
 * Reads the config file. A missing file (or directory) is no error: *ret stays empty.
 * When `want_key`, a key is taken only from a file the caller owns with mode 0600 or 0400.
 */
static int read_config(const char *path, bool want_key, struct yaml_values *ret, char *err,
		       size_t errlen)
{
	struct yaml_values v = { 0 };
	struct stat st;
	char *buf;
	size_t got = 0;
	int fd, rc;

	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ENOENT || errno == ENOTDIR)
			return 0;
		rc = -errno;
		errf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		return rc;
	}
	if (fstat(fd, &st) != 0) {
		rc = -errno;
		errf(err, errlen, "cannot stat %s: %s", path, strerror(errno));
		close(fd);
		return rc;
	}
	if (!S_ISREG(st.st_mode)) {
		errf(err, errlen, "%s is not a regular file", path);
		close(fd);
		return -EINVAL;
	}
	if ((uint64_t)st.st_size > DMC_CREDENTIALS_FILE_MAX) {
		errf(err, errlen, "%s is larger than %u bytes", path, DMC_CREDENTIALS_FILE_MAX);
		close(fd);
		return -EFBIG;
	}
	buf = malloc((size_t)st.st_size + 1);
	if (!buf) {
		close(fd);
		return -ENOMEM;
	}
	while (got < (size_t)st.st_size) {
		ssize_t n = read(fd, buf + got, (size_t)st.st_size - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = -errno;
			errf(err, errlen, "cannot read %s: %s", path, strerror(errno));
			explicit_bzero(buf, got);
			free(buf);
			close(fd);
			return rc;
		}
		if (n == 0)
			break; /* it shrank meanwhile: parse what is there */
		got += (size_t)n;
	}
	close(fd);
	rc = parse_yaml(buf, got, path, &v, err, errlen);
	explicit_bzero(buf, got);
	free(buf);
	if (rc < 0)
		return rc;
	if (want_key && v.has_key && (rc = check_key_file(&st, geteuid(), path, err, errlen)) < 0) {
		yaml_values_done(&v);
		return rc;
	}
	if (!want_key) {
		wipe_free(v.api_key);
		v.api_key = NULL;
		v.has_key = false;
	}
	*ret = v;
	return 0;
}

static const char *nonempty_env(const char *name)
{
	const char *v = getenv(name);

	return v && *v ? v : NULL;
}

DMC_EXPORT int dmc_credentials_load(const char *api_key_opt, const char *server_opt,
				    struct dmc_credentials *ret, char *err, size_t errlen)
{
	struct dmc_credentials cr = { 0 };
	struct yaml_values y = { 0 };
	const char *key = NULL, *url = NULL;
	int rc;

	if (err && errlen)
		err[0] = '\0';
	if (api_key_opt && *api_key_opt) {
		key = api_key_opt;
		cr.key_from = "--api-key";
	} else if ((key = nonempty_env("DATAMINT_API_KEY"))) {
		cr.key_from = "DATAMINT_API_KEY";
	}
	if (server_opt && *server_opt) {
		url = server_opt;
		cr.server_from = "--server";
	} else if ((url = nonempty_env("DATAMINT_API_URL"))) {
		cr.server_from = "DATAMINT_API_URL";
	}
	if (key && (rc = check_key(key, strlen(key), cr.key_from, err, errlen)) < 0)
		return rc;

	cr.file = config_path();
	if ((!key || !url) && cr.file) {
		rc = read_config(cr.file, !key, &y, err, errlen);
		if (rc < 0)
			goto fail;
		if (!key && y.api_key) {
			rc = check_key(y.api_key, strlen(y.api_key), cr.file, err, errlen);
			if (rc < 0)
				goto fail;
			cr.api_key = y.api_key;
			y.api_key = NULL;
			cr.key_from = "file";
		}
		if (!url && y.url) {
			rc = normalize_url(y.url, strlen(y.url), cr.file, &cr.server, err, errlen);
			if (rc < 0)
				goto fail;
			cr.server_from = "file";
		}
	}
	if (key) {
		cr.api_key = strdup(key);
		if (!cr.api_key) {
			rc = -ENOMEM;
			goto fail;
		}
	}
	if (url) {
		rc = normalize_url(url, strlen(url), cr.server_from, &cr.server, err, errlen);
		if (rc < 0)
			goto fail;
	} else if (!cr.server) {
		cr.server = strdup(DMC_DATAMINT_DEFAULT_URL);
		if (!cr.server) {
			rc = -ENOMEM;
			goto fail;
		}
		cr.server_from = "default";
	}
	yaml_values_done(&y);
	*ret = cr;
	return 0;
fail:
	yaml_values_done(&y);
	dmc_credentials_done(&cr);
	return rc;
}

DMC_EXPORT void dmc_credentials_done(struct dmc_credentials *cr)
{
	if (!cr)
		return;
	wipe_free(cr->api_key);
	free(cr->server);
	free(cr->file);
	*cr = (struct dmc_credentials){ 0 };
}
