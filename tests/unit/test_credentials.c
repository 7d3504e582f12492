/*
 * Unit tests of libdmcache's credentials (client/credentials.c): the precedence of option,
 * environment and datamintapi.yaml, the YAML reading (cross-checked against PyYAML's
 * safe_load, which the Datamint tools use), and the refusal of key files that others may
 * read or that belong to someone else (docs/reliability.md S5).
 *
 * The file is compiled in (not linked) so that its internal parser and permission check
 * can be called directly; the public functions are the same code as in libdmcache.
 * Each test runs with HOME pointing at a fresh temporary directory.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../../client/credentials.c"
#include "task.h"

static char base_dir[64];
static char home[128];
static char cfg[300]; /* $HOME/.config/datamintapi/datamintapi.yaml */
static int home_seq;

static void remove_base(void)
{
	if (base_dir[0])
		task_rm_tree(base_dir);
}

/* A fresh HOME with an empty ~/.config/datamintapi/, and no Datamint variables. */
static int fresh_home(void)
{
	char dir[256];

	snprintf(home, sizeof(home), "%s/home%d", base_dir, home_seq++);
	if (mkdir(home, 0700) != 0)
		return -1;
	snprintf(dir, sizeof(dir), "%s/.config", home);
	if (mkdir(dir, 0700) != 0)
		return -1;
	snprintf(dir, sizeof(dir), "%s/.config/datamintapi", home);
	if (mkdir(dir, 0700) != 0)
		return -1;
	snprintf(cfg, sizeof(cfg), "%s/datamintapi.yaml", dir);
	setenv("HOME", home, 1);
	unsetenv("XDG_CONFIG_HOME");
	unsetenv("DATAMINT_API_KEY");
	unsetenv("DATAMINT_API_URL");
	return 0;
}

static int write_file(const char *path, const void *data, size_t len, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, data, len);
	if (fchmod(fd, mode) != 0 || n != (ssize_t)len) {
		close(fd);
		return -1;
	}
	return close(fd);
}

static int write_cfg(const char *text, mode_t mode)
{
	return write_file(cfg, text, strlen(text), mode);
}

TEST(nothing_anywhere)
{
	struct dmc_credentials cr;
	char err[512];

	ASSERT_EQ(fresh_home(), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_NULL(cr.api_key);
	ASSERT_NULL(cr.key_from);
	ASSERT_STR_EQ(cr.server, "https://api.datamint.io");
	ASSERT_STR_EQ(cr.server_from, "default");
	ASSERT_STR_EQ(cr.file, cfg);
	dmc_credentials_done(&cr);
	ASSERT_NULL(cr.server);
	ASSERT_NULL(cr.file);
}

TEST(precedence_key)
{
	struct dmc_credentials cr;
	char err[512];

	ASSERT_EQ(fresh_home(), 0);
	ASSERT_EQ(write_cfg("api_key: from-file\ndefault_api_url: https://file.example\n", 0600),
		  0);
	setenv("DATAMINT_API_KEY", "from-env", 1);

	ASSERT_EQ(dmc_credentials_load("from-option", NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "from-option");
	ASSERT_STR_EQ(cr.key_from, "--api-key");
	ASSERT_STR_EQ(cr.server, "https://file.example");
	ASSERT_STR_EQ(cr.server_from, "file");
	dmc_credentials_done(&cr);
	ASSERT_NULL(cr.api_key);

	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "from-env");
	ASSERT_STR_EQ(cr.key_from, "DATAMINT_API_KEY");
	dmc_credentials_done(&cr);

	/* an empty option or variable counts as unset */
	setenv("DATAMINT_API_KEY", "", 1);
	ASSERT_EQ(dmc_credentials_load("", NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "from-file");
	ASSERT_STR_EQ(cr.key_from, "file");
	dmc_credentials_done(&cr);

	unsetenv("DATAMINT_API_KEY");
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "from-file");
	dmc_credentials_done(&cr);
}

TEST(precedence_url)
{
	struct dmc_credentials cr;
	char err[512];

	ASSERT_EQ(fresh_home(), 0);
	ASSERT_EQ(write_cfg("default_api_url: https://file.example/\n", 0644), 0);
	setenv("DATAMINT_API_URL", "http://env.example:8080//", 1);

	ASSERT_EQ(dmc_credentials_load(NULL, "https://option.example/", &cr, err, sizeof(err)),
		  0);
	ASSERT_STR_EQ(cr.server, "https://option.example");
	ASSERT_STR_EQ(cr.server_from, "--server");
	dmc_credentials_done(&cr);

	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.server, "http://env.example:8080");
	ASSERT_STR_EQ(cr.server_from, "DATAMINT_API_URL");
	dmc_credentials_done(&cr);

	unsetenv("DATAMINT_API_URL");
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.server, "https://file.example");
	ASSERT_STR_EQ(cr.server_from, "file");
	/* a file others may read is fine for the URL when it holds no key */
	ASSERT_NULL(cr.api_key);
	dmc_credentials_done(&cr);
}

TEST(xdg_config_home)
{
	struct dmc_credentials cr;
	char err[512], xdg[256], path[300];

	ASSERT_EQ(fresh_home(), 0);
	ASSERT_EQ(write_cfg("api_key: in-home\n", 0600), 0);
	snprintf(xdg, sizeof(xdg), "%s/xdg", home);
	ASSERT_EQ(mkdir(xdg, 0700), 0);
	snprintf(path, sizeof(path), "%s/datamintapi", xdg);
	ASSERT_EQ(mkdir(path, 0700), 0);
	snprintf(path, sizeof(path), "%s/datamintapi/datamintapi.yaml", xdg);
	ASSERT_EQ(write_file(path, "api_key: in-xdg\n", 16, 0400), 0);

	setenv("XDG_CONFIG_HOME", xdg, 1);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "in-xdg");
	ASSERT_STR_EQ(cr.file, path);
	dmc_credentials_done(&cr);

	/* a blank XDG_CONFIG_HOME is ignored, as platformdirs does */
	setenv("XDG_CONFIG_HOME", "  ", 1);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "in-home");
	ASSERT_STR_EQ(cr.file, cfg);
	dmc_credentials_done(&cr);
	unsetenv("XDG_CONFIG_HOME");
}

/* Every mode with a bit outside 0600 is refused for a key; the message says how to fix it. */
TEST(permissions)
{
	static const mode_t bad[] = { 0644, 0640, 0604, 0660, 0606, 0700, 0610, 0601, 0620,
				      0602, 0444, 04600, 02600, 01600, 0666, 0777 };
	static const mode_t good[] = { 0600, 0400 };
	struct dmc_credentials cr = { 0 };
	char err[1024], want[512];

	ASSERT_EQ(fresh_home(), 0);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		ASSERT_EQ(write_cfg("api_key: s3cr3t-k3y\n", bad[i]), 0);
		err[0] = '\0';
		ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), -EACCES);
		snprintf(want, sizeof(want), "run: chmod 600 %s", cfg);
		ASSERT_NOT_NULL(strstr(err, want));
		snprintf(want, sizeof(want), "mode %04o", (unsigned)bad[i]);
		ASSERT_NOT_NULL(strstr(err, want));
		ASSERT_NULL(strstr(err, "s3cr3t"));
		ASSERT_NULL(cr.api_key); /* untouched on failure */
	}
	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		ASSERT_EQ(write_cfg("api_key: s3cr3t-k3y\n", good[i]), 0);
		ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
		ASSERT_STR_EQ(cr.api_key, "s3cr3t-k3y");
		dmc_credentials_done(&cr);
	}

	/* with the key from elsewhere, the file only gives the URL: no refusal */
	ASSERT_EQ(write_cfg("api_key: s3cr3t-k3y\ndefault_api_url: https://u.example\n", 0644),
		  0);
	setenv("DATAMINT_API_KEY", "env-key", 1);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.api_key, "env-key");
	ASSERT_STR_EQ(cr.server, "https://u.example");
	dmc_credentials_done(&cr);
	unsetenv("DATAMINT_API_KEY");

	/* a null key in a public file is no key, and no refusal */
	ASSERT_EQ(write_cfg("api_key: null\ndefault_api_url: https://u.example\n", 0644), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_NULL(cr.api_key);
	dmc_credentials_done(&cr);
}

TEST(owner)
{
	struct dmc_credentials cr = { 0 };
	struct stat st;
	char err[1024], want[512];

	ASSERT_EQ(fresh_home(), 0);
	ASSERT_EQ(write_cfg("api_key: s3cr3t-k3y\n", 0600), 0);
	ASSERT_EQ(stat(cfg, &st), 0);
	ASSERT_EQ(check_key_file(&st, st.st_uid, cfg, err, sizeof(err)), 0);
	ASSERT_EQ(check_key_file(&st, st.st_uid + 1, cfg, err, sizeof(err)), -EACCES);
	snprintf(want, sizeof(want), "%s belongs to uid %u, not to you (uid %u)", cfg,
		 (unsigned)st.st_uid, (unsigned)st.st_uid + 1);
	ASSERT_NOT_NULL(strstr(err, want));

	/* CI runs as root: there the end-to-end case must run, not quietly drop out */
	if (geteuid() != 0 && getenv("CI") && strcmp(getenv("CI"), "true") == 0)
		ASSERT_EQ(geteuid(), 0);
	if (geteuid() == 0) {
		/* end to end: a file of another user is refused even with mode 0600 */
		ASSERT_EQ(chown(cfg, 65534, (gid_t)-1), 0);
		ASSERT_EQ(chmod(cfg, 0600), 0);
		ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), -EACCES);
		ASSERT_NOT_NULL(strstr(err, "belongs to uid 65534"));
		ASSERT_NULL(strstr(err, "s3cr3t"));
	}
}

TEST(bad_values)
{
	struct dmc_credentials cr = { 0 };
	char err[1024], big[API_KEY_MAX + 2];

	ASSERT_EQ(fresh_home(), 0);
	ASSERT_EQ(dmc_credentials_load("abc\ndef", NULL, &cr, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "control character"));
	ASSERT_NULL(strstr(err, "abc"));

	setenv("DATAMINT_API_KEY", "tab\there", 1);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "DATAMINT_API_KEY"));
	ASSERT_NULL(strstr(err, "tab"));
	unsetenv("DATAMINT_API_KEY");

	memset(big, 'k', sizeof(big) - 1);
	big[sizeof(big) - 1] = '\0';
	ASSERT_EQ(dmc_credentials_load(big, NULL, &cr, err, sizeof(err)), -EINVAL);
	big[API_KEY_MAX] = '\0';
	ASSERT_EQ(dmc_credentials_load(big, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_EQ(strlen(cr.api_key), API_KEY_MAX);
	dmc_credentials_done(&cr);

	ASSERT_EQ(dmc_credentials_load("k", "ftp://x.example", &cr, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "not an http:// or https:// URL"));
	ASSERT_EQ(dmc_credentials_load("k", "https://", &cr, err, sizeof(err)), -EINVAL);
	ASSERT_EQ(dmc_credentials_load("k", "https://a b", &cr, err, sizeof(err)), -EINVAL);
	ASSERT_EQ(dmc_credentials_load("k", "HTTPS://Upper.Example/", &cr, err, sizeof(err)), 0);
	ASSERT_STR_EQ(cr.server, "HTTPS://Upper.Example");
	dmc_credentials_done(&cr);

	/* a bad URL in the file names the file */
	ASSERT_EQ(write_cfg("default_api_url: api.datamint.io\n", 0600), 0);
	ASSERT_EQ(dmc_credentials_load("k", NULL, &cr, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, cfg));

	/* a control character in the file's key: refused without quoting it */
	ASSERT_EQ(write_cfg("api_key: \"s3cr3t\\x01\"\n", 0600), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), -EINVAL);
	ASSERT_NULL(strstr(err, "s3cr3t"));

	/* no message buffer is fine */
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, NULL, 0), -EINVAL);
}

TEST(file_limits)
{
	struct dmc_credentials cr = { 0 };
	char err[1024], path[300];
	char *big;
	size_t n = DMC_CREDENTIALS_FILE_MAX + 1;

	ASSERT_EQ(fresh_home(), 0);
	big = malloc(n);
	ASSERT_NOT_NULL(big);
	memset(big, '#', n); /* a comment: valid YAML, only too large */
	big[n - 1] = '\n';
	ASSERT_EQ(write_file(cfg, big, n, 0600), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), -EFBIG);
	ASSERT_EQ(write_file(cfg, big, n - 1, 0600), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_NULL(cr.api_key);
	dmc_credentials_done(&cr);
	free(big);

	/* a directory where the file should be */
	ASSERT_EQ(unlink(cfg), 0);
	ASSERT_EQ(mkdir(cfg, 0700), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "not a regular file"));
	ASSERT_EQ(rmdir(cfg), 0);

	/* ~/.config/datamintapi is a file: no config, no error */
	snprintf(path, sizeof(path), "%s/.config/datamintapi", home);
	ASSERT_EQ(rmdir(path), 0);
	ASSERT_EQ(write_file(path, "x", 1, 0600), 0);
	ASSERT_EQ(dmc_credentials_load(NULL, NULL, &cr, err, sizeof(err)), 0);
	ASSERT_NULL(cr.api_key);
	dmc_credentials_done(&cr);

	/* the key and URL from elsewhere: the file is not even opened */
	ASSERT_EQ(unlink(path), 0);
	ASSERT_EQ(mkdir(path, 0700), 0);
	ASSERT_EQ(mkdir(cfg, 0700), 0);
	ASSERT_EQ(dmc_credentials_load("k", "https://x.example", &cr, err, sizeof(err)), 0);
	dmc_credentials_done(&cr);
}

/* Errors of our own that PyYAML would not raise: limits and NUL bytes. */
TEST(yaml_own_limits)
{
	struct yaml_values v = { 0 };
	char err[512], doc[256];
	int n;

	/* nesting in a skipped value: up to YAML_DEPTH_MAX is read, deeper is refused */
	n = snprintf(doc, sizeof(doc), "other: ");
	for (int i = 0; i < YAML_DEPTH_MAX; i++)
		doc[n++] = '[';
	for (int i = 0; i < YAML_DEPTH_MAX; i++)
		doc[n++] = ']';
	n += snprintf(doc + n, sizeof(doc) - (size_t)n, "\napi_key: k\n");
	ASSERT_EQ(parse_yaml(doc, (size_t)n, "f", &v, err, sizeof(err)), 0);
	ASSERT_STR_EQ(v.api_key, "k");
	yaml_values_done(&v);

	n = snprintf(doc, sizeof(doc), "other: ");
	for (int i = 0; i <= YAML_DEPTH_MAX; i++)
		doc[n++] = '[';
	for (int i = 0; i <= YAML_DEPTH_MAX; i++)
		doc[n++] = ']';
	doc[n++] = '\n';
	err[0] = '\0';
	ASSERT_EQ(parse_yaml(doc, (size_t)n, "f", &v, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "nested deeper"));

	n = snprintf(doc, sizeof(doc), "api_key: \"ab\\0cd\"\n");
	err[0] = '\0';
	ASSERT_EQ(parse_yaml(doc, (size_t)n, "f", &v, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "NUL"));

	/* an alias for the key is refused (PyYAML would resolve it) */
	n = snprintf(doc, sizeof(doc), "a: &x k\napi_key: *x\n");
	err[0] = '\0';
	ASSERT_EQ(parse_yaml(doc, (size_t)n, "f", &v, err, sizeof(err)), -EINVAL);
	ASSERT_NOT_NULL(strstr(err, "f:2:"));
}

/*
 * The YAML reader against PyYAML: each document is read by parse_yaml() and by
 * yaml.safe_load() (with the Datamint tools' rule: the root must be a mapping or empty;
 * ours also wants api_key and default_api_url to be strings or null). Both must agree on
 * success, and on the exact bytes of both values.
 */
static const struct {
	const char *name;
	const char *doc;
	int ok; /* what we expect; PyYAML must agree */
} yaml_cases[] = {
	{ "dump", "api_key: 0123456789abcdef\ndefault_api_url: https://api.datamint.io\n", 1 },
	{ "quoted", "api_key: 'k ''2'''\ndefault_api_url: \"http://h:8080/\"\n", 1 },
	{ "null", "api_key: null\ndefault_api_url: https://x\n", 1 },
	{ "tilde", "api_key: ~\n", 1 },
	{ "empty_value", "api_key:\ndefault_api_url: https://y\n", 1 },
	{ "quoted_null", "api_key: 'null'\n", 1 },
	{ "flow", "{api_key: k3, default_api_url: 'https://f'}\n", 1 },
	{ "markers", "# comment\n---\napi_key: k4 # trailing\n...\n", 1 },
	{ "nested_others", "nested: {a: [1, 2, {b: c}]}\nlist:\n  - x\n  - y\napi_key: k5\n"
			   "other: 3\n", 1 },
	{ "duplicate", "api_key: first\napi_key: second\n", 1 },
	{ "empty", "", 1 },
	{ "only_comment", "# nothing here\n", 1 },
	{ "root_null", "--- null\n", 1 },
	{ "literal", "api_key: |-\n  k6\n", 1 },
	{ "literal_keep", "api_key: |\n  k6\n\n", 1 },
	{ "folded", "api_key: >-\n  part1\n  part2\n", 1 },
	{ "escapes", "api_key: \"k\\u00e9y\\x21\"\n", 1 },
	{ "utf8", "api_key: clé\n", 1 },
	{ "crlf", "api_key: k7\r\ndefault_api_url: https://c\r\n", 1 },
	{ "bom", "\xef\xbb\xbf" "api_key: k8\n", 1 },
	{ "anchors", "base: &b k9\napi_key: k10\nref: *b\n", 1 },
	{ "tagged", "api_key: !!str k11\n", 1 },
	{ "multiline_plain", "api_key: a\n  b\n", 1 },
	{ "list_root", "- a\n- b\n", 0 },
	{ "scalar_root", "hello\n", 0 },
	{ "unclosed", "api_key: [a\n", 0 },
	{ "two_docs", "api_key: a\n---\napi_key: b\n", 0 },
	{ "key_list", "api_key: [a, b]\n", 0 },
	{ "url_map", "default_api_url: {a: b}\n", 0 },
	{ "bad_indent", "api_key: a\n  b: c\n", 0 },
	{ "complex_key", "? [a, b]\n: v\napi_key: k\n", 0 },
	{ "tab", "api_key:\tk\n\tother: x\n", 0 },
};

#define N_YAML_CASES (sizeof(yaml_cases) / sizeof(yaml_cases[0]))

static const char pyyaml_script[] =
	"import sys, yaml\n"
	"def val(d, k):\n"
	"    v = d.get(k)\n"
	"    if v is None: return '-'\n"
	"    if not isinstance(v, str): raise ValueError(k)\n"
	"    return v.encode().hex() or 'e'\n"
	"for path in sys.argv[1:]:\n"
	"    try:\n"
	"        with open(path, 'rb') as f: d = yaml.safe_load(f)\n"
	"        if d is None: d = {}\n"
	"        if not isinstance(d, dict): raise ValueError('root')\n"
	"        print('ok', val(d, 'api_key'), val(d, 'default_api_url'))\n"
	"    except Exception:\n"
	"        print('err - -')\n";

/* "-" for NULL, "e" for "", else lowercase hex, as the script prints. */
static void to_hex(const char *s, char *out, size_t cap)
{
	size_t n = 0;

	if (!s) {
		snprintf(out, cap, "-");
		return;
	}
	if (!*s) {
		snprintf(out, cap, "e");
		return;
	}
	for (; *s && n + 3 < cap; s++)
		n += (size_t)snprintf(out + n, cap - n, "%02x", (unsigned char)*s);
}

TEST(yaml_against_pyyaml)
{
	const char *py = getenv("DMC_PYTHON") ? getenv("DMC_PYTHON") : "/usr/bin/python3";
	char paths[N_YAML_CASES][300], script[300], line[1024], cmd[64];
	const char *argv[N_YAML_CASES + 4];
	int pipefd[2], status;
	pid_t pid;
	FILE *f;

	ASSERT_EQ(fresh_home(), 0);
	snprintf(script, sizeof(script), "%s/check.py", home);
	ASSERT_EQ(write_file(script, pyyaml_script, strlen(pyyaml_script), 0600), 0);
	argv[0] = py;
	argv[1] = script;
	for (size_t i = 0; i < N_YAML_CASES; i++) {
		snprintf(paths[i], sizeof(paths[i]), "%s/%s.yaml", home, yaml_cases[i].name);
		ASSERT_EQ(write_file(paths[i], yaml_cases[i].doc, strlen(yaml_cases[i].doc), 0600),
			  0);
		argv[i + 2] = paths[i];
	}
	argv[N_YAML_CASES + 2] = NULL;

	ASSERT_EQ(pipe(pipefd), 0);
	pid = fork();
	ASSERT(pid >= 0);
	if (pid == 0) {
		dup2(pipefd[1], STDOUT_FILENO);
		close(pipefd[0]);
		close(pipefd[1]);
		execv(py, (char *const *)argv);
		_exit(127);
	}
	close(pipefd[1]);
	f = fdopen(pipefd[0], "r");
	ASSERT_NOT_NULL(f);
	for (size_t i = 0; i < N_YAML_CASES; i++) {
		struct yaml_values v = { 0 };
		char err[512], ours[1100], want_ok[8], want_key[512], want_url[512], hk[512],
			hu[512];
		int rc;

		ASSERT_NOT_NULL(fgets(line, sizeof(line), f));
		ASSERT_EQ(sscanf(line, "%7s %511s %511s", want_ok, want_key, want_url), 3);
		rc = parse_yaml(yaml_cases[i].doc, strlen(yaml_cases[i].doc), paths[i], &v, err,
				sizeof(err));
		if (rc == 0) {
			to_hex(v.api_key, hk, sizeof(hk));
			to_hex(v.url, hu, sizeof(hu));
			snprintf(ours, sizeof(ours), "ok %s %s", hk, hu);
		} else {
			snprintf(ours, sizeof(ours), "err - -");
			/* a refusal names the file */
			if (!strstr(err, paths[i]))
				printf("# case %s: '%s'\n", yaml_cases[i].name, err);
			ASSERT_NOT_NULL(strstr(err, paths[i]));
		}
		snprintf(cmd, sizeof(cmd), "%s", yaml_cases[i].name);
		line[strcspn(line, "\n")] = '\0';
		if (strcmp(ours, line) != 0)
			printf("# case %s: ours '%s', PyYAML '%s'\n", cmd, ours, line);
		ASSERT_STR_EQ(ours, line);
		ASSERT_EQ(rc == 0, yaml_cases[i].ok);
		yaml_values_done(&v);
	}
	fclose(f);
	ASSERT_EQ(waitpid(pid, &status, 0), pid);
	ASSERT(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main(int argc, char **argv)
{
	snprintf(base_dir, sizeof(base_dir), "/tmp/dmc-cred-XXXXXX");
	if (!mkdtemp(base_dir)) {
		perror("mkdtemp");
		return 1;
	}
	atexit(remove_base);
	RUN_TESTS(T(nothing_anywhere), T(precedence_key), T(precedence_url), T(xdg_config_home),
		  T(permissions), T(owner), T(bad_values), T(file_limits), T(yaml_own_limits),
		  T(yaml_against_pyyaml));
}
