/* apilane connect-time load balancer: cgroup sock_addr programs over the NAT maps in nat.h.
 *
 * connect4/6   rewrite a connect() to a service address into one of its backends, chosen at
 *              random among `count`; IPv4-mapped IPv6 (::ffff:a.b.c.d) uses the IPv4 maps.
 *              The socket's cookie and its backend go to apilane_conn (nat.h).
 * sendmsg4/6   the same for unconnected UDP sends.
 * recvmsg4/6   UDP: a datagram from a translated backend appears to come from the service.
 * getpeername4/6  the application sees the service address, not the backend.
 *
 * Reverse translation holds only while it is true: recvmsg and getpeername first check that the
 * entry's frontend still exists and still has the backend among its current ordinals (as
 * Cilium's socket LB does; Calico's recvmsg never checks). A stale entry is deleted and the
 * call passes through untranslated: a datagram from a removed backend shows its real source,
 * and getpeername on a socket still connected to it reports the backend, so the two agree on a
 * connected UDP socket and the application can tell it is no longer talking to the service.
 *
 * A miss, a frontend with count == 0 or a missing backend ordinal leaves the call untouched
 * (pass-through), unlike Calico's EPERM: our programs never make a destination less reachable
 * than it is without them, and the loader never programs an empty set (fail static) and repairs
 * a dangling ordinal from its invariant check.
 *
 * Compiled by bcc at load time with -DAPILANE_PIN_DIR="..." and -I<this directory>.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#include "nat.h"

#define APILANE_V4_MAPPED_PREFIX 0x0000ffff /* third word of ::ffff:a.b.c.d, host order */

/* How many ordinals a staleness check searches when the entry's hint no longer matches (the
 * set changed). An API server has a handful of endpoints; in a larger set a backend not found
 * among the first APILANE_REV_SCAN_MAX ordinals is not known to be gone, so it stays
 * translated. */
#define APILANE_REV_SCAN_MAX 256

/* Translate (addr, port, proto) through the IPv4 maps; records the reverse entry for the
 * socket. Returns 1 and fills *backend when translated. */
static __always_inline int apilane_nat4(struct bpf_sock_addr *ctx, __u32 addr, __u16 port,
                                        __u8 proto, struct apilane_be_value4 *backend)
{
    struct apilane_fe_key4 fe_key;
    __builtin_memset(&fe_key, 0, sizeof(fe_key));
    fe_key.addr = addr;
    fe_key.port = port;
    fe_key.proto = proto;

    struct apilane_fe_value *fe = apilane_fe4.lookup(&fe_key);
    if (!fe || fe->count == 0)
        return 0;

    struct apilane_be_key be_key = {};
    be_key.service_id = fe->service_id;
    be_key.ordinal = bpf_get_prandom_u32() % fe->count;
    struct apilane_be_value4 *be = apilane_be4.lookup(&be_key);
    if (!be)
        return 0;
    backend->addr = be->addr;
    backend->port = be->port;
    backend->pad = 0;

    struct apilane_rev_key4 rev_key;
    __builtin_memset(&rev_key, 0, sizeof(rev_key));
    rev_key.cookie = bpf_get_socket_cookie(ctx);
    rev_key.addr = be->addr;
    rev_key.port = be->port;
    struct apilane_rev_value4 rev_value;
    __builtin_memcpy(&rev_value.frontend, &fe_key, sizeof(rev_value.frontend));
    rev_value.service_id = be_key.service_id;
    rev_value.ordinal = be_key.ordinal;
    apilane_rev4.update(&rev_key, &rev_value);
    return 1;
}

/* Does the translation in `rev` still hold: is (addr, port) among the current backends of the
 * frontend it names? The hint (service_id, ordinal) costs one lookup and holds until the set
 * changes; then the set is searched and, if the backend is still in it, the hint is refreshed
 * so the next check is cheap again. Returns 0 when stale. */
static __always_inline int apilane_rev_current4(struct apilane_rev_value4 *rev,
                                                const struct apilane_fe_key4 *fe_key, __u32 addr,
                                                __u16 port)
{
    struct apilane_fe_value *fe = apilane_fe4.lookup((struct apilane_fe_key4 *)fe_key);
    if (!fe)
        return 0;
    __u32 count = fe->count;
    struct apilane_be_key be_key = {};
    be_key.service_id = fe->service_id;
    be_key.ordinal = rev->ordinal;
    if (be_key.service_id == rev->service_id && be_key.ordinal < count) {
        struct apilane_be_value4 *be = apilane_be4.lookup(&be_key);
        if (be && be->addr == addr && be->port == port)
            return 1;
    }
#pragma clang loop unroll(disable)
    for (__u32 ordinal = 0; ordinal < APILANE_REV_SCAN_MAX; ordinal++) {
        if (ordinal >= count)
            return 0;
        be_key.ordinal = ordinal;
        struct apilane_be_value4 *be = apilane_be4.lookup(&be_key);
        if (be && be->addr == addr && be->port == port) {
            rev->service_id = be_key.service_id;
            rev->ordinal = ordinal;
            return 1;
        }
    }
    return 1;
}

/* Reverse lookup for a backend address seen by this socket; returns 1 and fills *service while
 * the translation holds, deletes the entry once it does not. */
static __always_inline int apilane_rev_lookup4(struct bpf_sock_addr *ctx, __u32 addr, __u16 port,
                                               struct apilane_fe_key4 *service)
{
    struct apilane_rev_key4 rev_key;
    __builtin_memset(&rev_key, 0, sizeof(rev_key));
    rev_key.cookie = bpf_get_socket_cookie(ctx);
    rev_key.addr = addr;
    rev_key.port = port;
    struct apilane_rev_value4 *found = apilane_rev4.lookup(&rev_key);
    if (!found)
        return 0;
    __builtin_memcpy(service, &found->frontend, sizeof(*service));
    if (!apilane_rev_current4(found, service, addr, port)) {
        apilane_rev4.delete(&rev_key);
        return 0;
    }
    return 1;
}

static __always_inline int apilane_same_backend6(const struct apilane_be_value6 *be,
                                                 const __u32 *addr, __u16 port)
{
    return be->addr[0] == addr[0] && be->addr[1] == addr[1] && be->addr[2] == addr[2] &&
           be->addr[3] == addr[3] && be->port == port;
}

static __always_inline int apilane_nat6(struct bpf_sock_addr *ctx, __u16 port, __u8 proto,
                                        struct apilane_be_value6 *backend)
{
    struct apilane_fe_key6 fe_key;
    __builtin_memset(&fe_key, 0, sizeof(fe_key));
    fe_key.addr[0] = ctx->user_ip6[0];
    fe_key.addr[1] = ctx->user_ip6[1];
    fe_key.addr[2] = ctx->user_ip6[2];
    fe_key.addr[3] = ctx->user_ip6[3];
    fe_key.port = port;
    fe_key.proto = proto;

    struct apilane_fe_value *fe = apilane_fe6.lookup(&fe_key);
    if (!fe || fe->count == 0)
        return 0;

    struct apilane_be_key be_key = {};
    be_key.service_id = fe->service_id;
    be_key.ordinal = bpf_get_prandom_u32() % fe->count;
    struct apilane_be_value6 *be = apilane_be6.lookup(&be_key);
    if (!be)
        return 0;
    __builtin_memcpy(backend, be, sizeof(*backend));

    struct apilane_rev_key6 rev_key;
    __builtin_memset(&rev_key, 0, sizeof(rev_key));
    rev_key.cookie = bpf_get_socket_cookie(ctx);
    __builtin_memcpy(rev_key.addr, be->addr, sizeof(rev_key.addr));
    rev_key.port = be->port;
    struct apilane_rev_value6 rev_value;
    __builtin_memcpy(&rev_value.frontend, &fe_key, sizeof(rev_value.frontend));
    rev_value.service_id = be_key.service_id;
    rev_value.ordinal = be_key.ordinal;
    apilane_rev6.update(&rev_key, &rev_value);
    return 1;
}

/* apilane_rev_current4 for the IPv6 maps; `addr` is the backend's. */
static __always_inline int apilane_rev_current6(struct apilane_rev_value6 *rev,
                                                const struct apilane_fe_key6 *fe_key,
                                                const __u32 *addr, __u16 port)
{
    struct apilane_fe_value *fe = apilane_fe6.lookup((struct apilane_fe_key6 *)fe_key);
    if (!fe)
        return 0;
    __u32 count = fe->count;
    struct apilane_be_key be_key = {};
    be_key.service_id = fe->service_id;
    be_key.ordinal = rev->ordinal;
    if (be_key.service_id == rev->service_id && be_key.ordinal < count) {
        struct apilane_be_value6 *be = apilane_be6.lookup(&be_key);
        if (be && apilane_same_backend6(be, addr, port))
            return 1;
    }
#pragma clang loop unroll(disable)
    for (__u32 ordinal = 0; ordinal < APILANE_REV_SCAN_MAX; ordinal++) {
        if (ordinal >= count)
            return 0;
        be_key.ordinal = ordinal;
        struct apilane_be_value6 *be = apilane_be6.lookup(&be_key);
        if (be && apilane_same_backend6(be, addr, port)) {
            rev->service_id = be_key.service_id;
            rev->ordinal = ordinal;
            return 1;
        }
    }
    return 1;
}

static __always_inline int apilane_is_v4_mapped(struct bpf_sock_addr *ctx)
{
    return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
           ctx->user_ip6[2] == bpf_htonl(APILANE_V4_MAPPED_PREFIX);
}

/* Remember that this socket connected through a service address, to which backend. */
static __always_inline void apilane_record4(struct bpf_sock_addr *ctx,
                                            const struct apilane_be_value4 *backend)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct apilane_conn_value conn;
    __builtin_memset(&conn, 0, sizeof(conn));
    conn.addr[0] = backend->addr;
    conn.port = backend->port;
    conn.family = 4;
    apilane_conn.update(&cookie, &conn);
}

static __always_inline void apilane_record6(struct bpf_sock_addr *ctx,
                                            const struct apilane_be_value6 *backend)
{
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct apilane_conn_value conn;
    __builtin_memset(&conn, 0, sizeof(conn));
    __builtin_memcpy(conn.addr, backend->addr, sizeof(conn.addr));
    conn.port = backend->port;
    conn.family = 6;
    apilane_conn.update(&cookie, &conn);
}

/* connect() and unconnected sendmsg() share the forward translation; only connect() records
 * the connection (`connecting`). */
static __always_inline void apilane_forward4(struct bpf_sock_addr *ctx, int connecting)
{
    struct apilane_be_value4 backend = {};
    if (apilane_nat4(ctx, ctx->user_ip4, (__u16)ctx->user_port, (__u8)ctx->protocol, &backend)) {
        ctx->user_ip4 = backend.addr;
        ctx->user_port = backend.port;
        if (connecting)
            apilane_record4(ctx, &backend);
    }
}

static __always_inline void apilane_forward6(struct bpf_sock_addr *ctx, int connecting)
{
    __u16 port = (__u16)ctx->user_port;
    __u8 proto = (__u8)ctx->protocol;
    if (apilane_is_v4_mapped(ctx)) {
        struct apilane_be_value4 backend4 = {};
        if (apilane_nat4(ctx, ctx->user_ip6[3], port, proto, &backend4)) {
            ctx->user_ip6[3] = backend4.addr;
            ctx->user_port = backend4.port;
            if (connecting)
                apilane_record4(ctx, &backend4);
        }
        return;
    }
    struct apilane_be_value6 backend6 = {};
    if (apilane_nat6(ctx, port, proto, &backend6)) {
        ctx->user_ip6[0] = backend6.addr[0];
        ctx->user_ip6[1] = backend6.addr[1];
        ctx->user_ip6[2] = backend6.addr[2];
        ctx->user_ip6[3] = backend6.addr[3];
        ctx->user_port = backend6.port;
        if (connecting)
            apilane_record6(ctx, &backend6);
    }
}

/* recvmsg() and getpeername() share the reverse translation. */
static __always_inline void apilane_reverse4(struct bpf_sock_addr *ctx)
{
    struct apilane_fe_key4 service;
    if (apilane_rev_lookup4(ctx, ctx->user_ip4, (__u16)ctx->user_port, &service)) {
        ctx->user_ip4 = service.addr;
        ctx->user_port = service.port;
    }
}

static __always_inline void apilane_reverse6(struct bpf_sock_addr *ctx)
{
    __u16 port = (__u16)ctx->user_port;
    if (apilane_is_v4_mapped(ctx)) {
        struct apilane_fe_key4 service4;
        if (apilane_rev_lookup4(ctx, ctx->user_ip6[3], port, &service4)) {
            ctx->user_ip6[3] = service4.addr;
            ctx->user_port = service4.port;
        }
        return;
    }
    struct apilane_rev_key6 rev_key;
    __builtin_memset(&rev_key, 0, sizeof(rev_key));
    rev_key.cookie = bpf_get_socket_cookie(ctx);
    rev_key.addr[0] = ctx->user_ip6[0];
    rev_key.addr[1] = ctx->user_ip6[1];
    rev_key.addr[2] = ctx->user_ip6[2];
    rev_key.addr[3] = ctx->user_ip6[3];
    rev_key.port = port;
    struct apilane_rev_value6 *found = apilane_rev6.lookup(&rev_key);
    if (!found)
        return;
    struct apilane_fe_key6 service6;
    __builtin_memcpy(&service6, &found->frontend, sizeof(service6));
    if (!apilane_rev_current6(found, &service6, rev_key.addr, port)) {
        apilane_rev6.delete(&rev_key);
        return;
    }
    ctx->user_ip6[0] = service6.addr[0];
    ctx->user_ip6[1] = service6.addr[1];
    ctx->user_ip6[2] = service6.addr[2];
    ctx->user_ip6[3] = service6.addr[3];
    ctx->user_port = service6.port;
}

/* Every hook returns 1 ("allow"): we only rewrite addresses, never refuse a call. */

int apilane_connect4(struct bpf_sock_addr *ctx)
{
    apilane_forward4(ctx, 1);
    return 1;
}

int apilane_connect6(struct bpf_sock_addr *ctx)
{
    apilane_forward6(ctx, 1);
    return 1;
}

int apilane_sendmsg4(struct bpf_sock_addr *ctx)
{
    apilane_forward4(ctx, 0);
    return 1;
}

int apilane_sendmsg6(struct bpf_sock_addr *ctx)
{
    apilane_forward6(ctx, 0);
    return 1;
}

int apilane_recvmsg4(struct bpf_sock_addr *ctx)
{
    apilane_reverse4(ctx);
    return 1;
}

int apilane_recvmsg6(struct bpf_sock_addr *ctx)
{
    apilane_reverse6(ctx);
    return 1;
}

int apilane_getpeername4(struct bpf_sock_addr *ctx)
{
    apilane_reverse4(ctx);
    return 1;
}

int apilane_getpeername6(struct bpf_sock_addr *ctx)
{
    apilane_reverse6(ctx);
    return 1;
}
