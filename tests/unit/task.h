/*
 * Minimal test harness for dmcache's C unit tests (after libuv's test/task.h).
 *
 * Each test executable lists its cases with TEST(name) and runs them from main() with
 * RUN_TESTS(...). Output is TAP ("ok 1 - name" / "not ok 1 - name"), so meson's tap protocol
 * reads it. ASSERT_* macros print both values and the location, then fail the current case.
 */
#ifndef DMC_TEST_TASK_H
#define DMC_TEST_TASK_H

#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

struct task_case {
	const char *name;
	void (*fn)(int *failed);
};

#define TEST(name) static void test_##name(int *task_failed_)
#define T(name) { #name, test_##name }

#define TASK_FAIL_(fmt, ...)                                                                       \
	do {                                                                                       \
		fprintf(stdout, "# %s:%d: " fmt "\n", __FILE__, __LINE__, __VA_ARGS__);            \
		*task_failed_ = 1;                                                                 \
		return;                                                                            \
	} while (0)

#define ASSERT(expr)                                                                               \
	do {                                                                                       \
		if (!(expr))                                                                       \
			TASK_FAIL_("assertion failed: %s", #expr);                                 \
	} while (0)

#define ASSERT_INT_OP_(a, op, b)                                                                   \
	do {                                                                                       \
		int64_t a_ = (int64_t)(a), b_ = (int64_t)(b);                                      \
		if (!(a_ op b_))                                                                   \
			TASK_FAIL_("%s %s %s: %" PRId64 " vs %" PRId64, #a, #op, #b, a_, b_);      \
	} while (0)

#define ASSERT_UINT_OP_(a, op, b)                                                                  \
	do {                                                                                       \
		uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                                   \
		if (!(a_ op b_))                                                                   \
			TASK_FAIL_("%s %s %s: %" PRIu64 " vs %" PRIu64, #a, #op, #b, a_, b_);      \
	} while (0)

#define ASSERT_EQ(a, b) ASSERT_INT_OP_(a, ==, b)
#define ASSERT_NE(a, b) ASSERT_INT_OP_(a, !=, b)
#define ASSERT_LT(a, b) ASSERT_INT_OP_(a, <, b)
#define ASSERT_LE(a, b) ASSERT_INT_OP_(a, <=, b)
#define ASSERT_GT(a, b) ASSERT_INT_OP_(a, >, b)
#define ASSERT_GE(a, b) ASSERT_INT_OP_(a, >=, b)
#define ASSERT_UINT_EQ(a, b) ASSERT_UINT_OP_(a, ==, b)

#define ASSERT_STR_EQ(a, b)                                                                        \
	do {                                                                                       \
		const char *a_ = (a), *b_ = (b);                                                   \
		if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0)                               \
			TASK_FAIL_("%s == %s: '%s' vs '%s'", #a, #b, a_ ? a_ : "(null)",          \
				   b_ ? b_ : "(null)");                                            \
	} while (0)

#define ASSERT_MEM_EQ(a, b, n)                                                                     \
	do {                                                                                       \
		if (memcmp((a), (b), (n)) != 0)                                                    \
			TASK_FAIL_("%s == %s over %zu bytes", #a, #b, (size_t)(n));                \
	} while (0)

#define ASSERT_NULL(a) ASSERT((a) == NULL)
#define ASSERT_NOT_NULL(a) ASSERT((a) != NULL)

static inline int task_run(const struct task_case *cases, size_t n, const char *only)
{
	int failures = 0;
	printf("1..%zu\n", n);
	for (size_t i = 0; i < n; i++) {
		int failed = 0;
		if (only && strcmp(only, cases[i].name) != 0) {
			printf("ok %zu - %s # SKIP not selected\n", i + 1, cases[i].name);
			continue;
		}
		cases[i].fn(&failed);
		printf("%s %zu - %s\n", failed ? "not ok" : "ok", i + 1, cases[i].name);
		fflush(stdout);
		failures += failed;
	}
	return failures ? 1 : 0;
}

/* RUN_TESTS(T(a), T(b), ...) in main(); argv[1] selects one case by name. */
#define RUN_TESTS(...)                                                                             \
	do {                                                                                       \
		static const struct task_case cases_[] = { __VA_ARGS__ };                          \
		return task_run(cases_, sizeof(cases_) / sizeof(cases_[0]),                       \
				argc > 1 ? argv[1] : NULL);                                        \
	} while (0)

/* Removes the tree at `path` (a test's scratch directory), depth first, not following
 * symbolic links. */
static inline int task_rm_entry_(const char *path, const struct stat *st, int flag,
				 struct FTW *ftw)
{
	(void)st;
	(void)flag;
	(void)ftw;
	return remove(path);
}

static inline void task_rm_tree(const char *path)
{
	nftw(path, task_rm_entry_, 16, FTW_DEPTH | FTW_PHYS);
}

#endif
