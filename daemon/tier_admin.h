/*
 * tier_admin: the TIER request (dmcache tier ls / gc), see tier_admin.c. Loop thread.
 */
#ifndef DMC_TIER_ADMIN_H
#define DMC_TIER_ADMIN_H

#include <stdint.h>

struct config;
struct conn;
struct dmc_header;
struct tier;

/* Answers a TIER request of `c` (admins only); `t` NULL: the daemon has no tier. */
void tier_admin_request(struct tier *t, const struct config *cfg, struct conn *c,
			const struct dmc_header *h, const uint8_t *payload);
/* `c` is closing: work of its goes on, unanswered. */
void tier_admin_conn_closed(struct conn *c);

#endif
