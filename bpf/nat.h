/* apilane NAT map layouts: the single source of truth.
 *
 * The Python adapter (apilane.node_loader.bpfmaps) takes its ctypes key/leaf types from bcc's
 * types generated from these structs; tests/node_loader/test_bpf_datapath.py checks their sizes
 * and offsets. Every struct has explicit padding so no byte of a key is left undefined.
 *
 * Byte order: addresses AND ports are network byte order (as in struct bpf_sock_addr), so the
 * programs compare and copy them without conversion. Protocol is the IPPROTO_* number.
 *
 * Changing a layout means bumping its version: the pin names carry it, so a loader with a new
 * layout never reinterprets an old pinned map. The NAT maps (APILANE_NAT_LAYOUT) and the reverse
 * maps (APILANE_REV_LAYOUT) are versioned apart: a new reverse layout keeps the NAT maps' pins
 * and contents, so an upgraded loader does not start from empty NAT maps. The loader removes
 * the pins of superseded layouts (programs.py).
 */
#ifndef APILANE_NAT_H
#define APILANE_NAT_H

#define APILANE_NAT_LAYOUT "v1"
/* v2: the value names the frontend (key and id) and the backend's ordinal, for the staleness
 * check in connect_lb.c. */
#define APILANE_REV_LAYOUT "v2"
/* v1: socket cookie -> the backend its connect() through a service address went to. */
#define APILANE_CONN_LAYOUT "v1"

#ifndef APILANE_PIN_DIR
#define APILANE_PIN_DIR "/sys/fs/bpf/apilane"
#endif

#define APILANE_FE_MAX 65536
#define APILANE_BE_MAX 262144
#define APILANE_REV_MAX 65536
#define APILANE_CONN_MAX 65536

/* BPF_F_NO_PREALLOC: memory grows with the entries present, not with max_entries. */
#define APILANE_NAT_MAP_FLAGS 1

/* Frontend: a service address. */
struct apilane_fe_key4 {
    __u32 addr;  /* NBO */
    __u16 port;  /* NBO */
    __u8 proto;  /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 pad;
};

struct apilane_fe_key6 {
    __u32 addr[4]; /* NBO */
    __u16 port;    /* NBO */
    __u8 proto;
    __u8 pad;
};

/* Ordinals 0..count-1 of service_id are in the backend map of the same family. */
struct apilane_fe_value {
    __u32 service_id;
    __u32 count;
    __u32 flags; /* reserved, 0 */
};

struct apilane_be_key {
    __u32 service_id;
    __u32 ordinal;
};

struct apilane_be_value4 {
    __u32 addr; /* NBO */
    __u16 port; /* NBO */
    __u16 pad;
};

struct apilane_be_value6 {
    __u32 addr[4]; /* NBO */
    __u16 port;    /* NBO */
    __u16 pad;
};

/* Reverse translation, per socket: (socket cookie, backend address) -> the service it was
 * chosen for. Written by connect and sendmsg; read by recvmsg (UDP replies appear to come from
 * the service) and getpeername (the application sees the service, not the backend).
 *
 * The value holds the frontend's key, so a reader can check that the translation still holds:
 * the frontend still exists and (addr, port) is still among its backends. `service_id` and
 * `ordinal` say where the backend was when last confirmed; they are a hint checked first (one
 * lookup), and the full set is searched only when the hint no longer matches (see
 * apilane_rev_current4 in connect_lb.c). */
struct apilane_rev_key4 {
    __u64 cookie;
    __u32 addr; /* backend, NBO */
    __u16 port; /* backend, NBO */
    __u16 pad;
};

struct apilane_rev_key6 {
    __u64 cookie;
    __u32 addr[4]; /* backend, NBO */
    __u16 port;    /* backend, NBO */
    __u16 pad;
    __u32 pad2;
};

struct apilane_rev_value4 {
    struct apilane_fe_key4 frontend; /* the service address, port and protocol */
    __u32 service_id;
    __u32 ordinal;
};

struct apilane_rev_value6 {
    struct apilane_fe_key6 frontend;
    __u32 service_id;
    __u32 ordinal;
};

/* Connections through a service address, per socket: written by connect4/6 only (never by
 * sendmsg, so an unconnected UDP socket is never recorded), read by the loader when a backend
 * is removed or fails its probes: only a socket recorded here, still connected to that
 * backend, is destroyed (sockets.py), so a direct connection to the same address is left
 * alone. Cookies are unique per boot across network namespaces, so one map serves every
 * namespace; an entry of a closed socket is never matched again and ages out of the LRU. */
struct apilane_conn_value {
    __u32 addr[4]; /* backend, NBO; an IPv4 backend in addr[0], the rest 0 */
    __u16 port;    /* backend, NBO */
    __u8 family;   /* 4 or 6: the backend's family (an IPv4-mapped connect6 records 4) */
    __u8 pad;
};

#define APILANE_PIN(name) APILANE_PIN_DIR "/" name "_" APILANE_NAT_LAYOUT
#define APILANE_REV_PIN(name) APILANE_PIN_DIR "/" name "_" APILANE_REV_LAYOUT
#define APILANE_CONN_PIN(name) APILANE_PIN_DIR "/" name "_" APILANE_CONN_LAYOUT

BPF_TABLE_PINNED("hash", struct apilane_fe_key4, struct apilane_fe_value, apilane_fe4,
                 APILANE_FE_MAX, APILANE_PIN("apilane_fe4"), APILANE_NAT_MAP_FLAGS);
BPF_TABLE_PINNED("hash", struct apilane_fe_key6, struct apilane_fe_value, apilane_fe6,
                 APILANE_FE_MAX, APILANE_PIN("apilane_fe6"), APILANE_NAT_MAP_FLAGS);
BPF_TABLE_PINNED("hash", struct apilane_be_key, struct apilane_be_value4, apilane_be4,
                 APILANE_BE_MAX, APILANE_PIN("apilane_be4"), APILANE_NAT_MAP_FLAGS);
BPF_TABLE_PINNED("hash", struct apilane_be_key, struct apilane_be_value6, apilane_be6,
                 APILANE_BE_MAX, APILANE_PIN("apilane_be6"), APILANE_NAT_MAP_FLAGS);
BPF_TABLE_PINNED("lru_hash", struct apilane_rev_key4, struct apilane_rev_value4, apilane_rev4,
                 APILANE_REV_MAX, APILANE_REV_PIN("apilane_rev4"));
BPF_TABLE_PINNED("lru_hash", struct apilane_rev_key6, struct apilane_rev_value6, apilane_rev6,
                 APILANE_REV_MAX, APILANE_REV_PIN("apilane_rev6"));
BPF_TABLE_PINNED("lru_hash", __u64, struct apilane_conn_value, apilane_conn, APILANE_CONN_MAX,
                 APILANE_CONN_PIN("apilane_conn"));

#endif /* APILANE_NAT_H */
