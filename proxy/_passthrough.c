/* The fast path's commonest job in C: a TLS connection passed through on a
 * verdict the Engine already gave (proxy/fastpath.py, "native passthrough").
 *
 * A Passthrough owns the fast path's listening socket and runs one thread with
 * its own epoll, without the GIL. For each new connection it reads the first
 * bytes and carries the connection itself only as far as the Python path has
 * already decided the very same bytes:
 *
 *   explicit mode: a CONNECT head byte-equal to one Python parsed and answered
 *   (remember_head: an address-literal target) gets the same "200 Connection
 *   established"; transparent mode: the redirected destination
 *   (SO_ORIGINAL_DST) of a connection that starts like TLS;
 *
 *   then a ClientHello whose server name (tlshello_core.h, the walk the Python
 *   parser's C shortcut shares) has a remembered verdict (remember_sni: "pass"
 *   or "block", set by Python after it asked the Engine for that name, and
 *   cleared by forget() when a reload brings another Engine).
 *
 * "block": the access_denied alert, the socket closes. "pass": a non-blocking
 * connect to the destination, then both directions relayed (recv into one
 * thread buffer, send; what dst does not take is kept and src is read no more
 * until dst drains; past SPLICE_AFTER bytes a flow may splice(2) through a
 * pipe, as proxy/relay.py's RelayMode says), half-close passed on, a reset or
 * error ending both (proxy/relay.py's semantics).
 *
 * Everything else (plain HTTP, an unknown CONNECT head or server name, a hello
 * the C walk defers, anything not TLS in a tunnel) is handed to Python with the
 * bytes read so far (a HANDOFF event: the descriptor, what was read, and how
 * far the connection got), and the Python path goes on exactly as if it had
 * read them itself. What happened to a connection C carried comes back as
 * events (CONNECTED: the tls record's moment; BLOCKED, FAILED, FINISHED, EARLY:
 * a conn record's), read by Python in batches (take()) after one eventfd
 * wake-up (fileno()); Python writes the records, so both paths write them with
 * the same code.
 *
 * Why: a passed-through TLS connection cost the Python fast path ~0.4 ms of
 * user CPU, about a dozen trips through the loop's callbacks; squid's is
 * ~0.23 ms. Here the connection itself costs a few microseconds of user CPU and
 * Python only writes its two records.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "tlshello_core.h"

#define SO_ORIGINAL_DST_OPT 80 /* proxy/original_dst.py */
#define COPY_BYTES (256 * 1024) /* proxy/relay.py COPY_BYTES */
#define HEAD_MAX 8192           /* a CONNECT head longer than this goes to Python */
#define IN_MAX (HELLO_MAX_BYTES + 1024 + HEAD_MAX) /* tlshello.MAX_CLIENT_HELLO_BYTES + 1024, and a head */
#define MEMO_MAX 4096           /* fastpath.SNI_MEMO_MAX, CONNECT_MEMO_MAX */
#define MEMO_BUCKETS 8192
#define SWEEP_MS 1000           /* fastpath.WAIT_SWEEP_S */
#define NOTIFY_MS 20
#define NOTIFY_EVENTS 256

static const unsigned char ALERT[] = {21, 3, 3, 0, 2, 2, 49};            /* fastpath.TLS_ALERT_ACCESS_DENIED */
static const char ESTABLISHED[] = "HTTP/1.1 200 Connection established\r\n\r\n";

enum { ST_FIRST, ST_TUNNEL, ST_CONNECTING, ST_RELAY };
enum { EV_HANDOFF = 1, EV_CONNECTED, EV_BLOCKED, EV_FAILED, EV_FINISHED, EV_EARLY };
enum { R_NONE, R_FIN, R_RST, R_TIMEOUT, R_SHUTDOWN, R_BLOCKED, R_CONNECT };
enum { KIND_PASS = 1, KIND_BLOCK = 2 };
enum { MODE_AUTO, MODE_SPLICE, MODE_COPY };

/* -- the memos (Python writes, the thread reads; one mutex) ----------------------- */

typedef struct memo_entry {
    struct memo_entry *next;
    uint64_t hash;
    size_t klen;
    int kind, vid;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    unsigned char key[];
} memo_entry;

typedef struct {
    memo_entry *buckets[MEMO_BUCKETS];
    int count;
} memo;

static uint64_t fnv(const unsigned char *p, size_t n, uint64_t seed) {
    uint64_t h = 1469598103934665603ULL ^ seed;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

static void memo_clear(memo *m) {
    for (int i = 0; i < MEMO_BUCKETS; i++) {
        memo_entry *e = m->buckets[i];
        while (e) {
            memo_entry *next = e->next;
            free(e);
            e = next;
        }
        m->buckets[i] = NULL;
    }
    m->count = 0;
}

static memo_entry *memo_find(memo *m, const unsigned char *k, size_t n, uint64_t h) {
    for (memo_entry *e = m->buckets[h % MEMO_BUCKETS]; e; e = e->next) {
        if (e->hash == h && e->klen == n && memcmp(e->key, k, n) == 0)
            return e;
    }
    return NULL;
}

static memo_entry *memo_get(memo *m, const unsigned char *k, size_t n, uint64_t seed) {
    return memo_find(m, k, n, fnv(k, n, seed));
}

/* Insert or replace; cleared when full, as the Python memos are. NULL: out of memory. */
static memo_entry *memo_put(memo *m, const unsigned char *k, size_t n, uint64_t seed) {
    uint64_t h = fnv(k, n, seed);
    memo_entry *e = memo_find(m, k, n, h);
    if (e)
        return e;
    if (m->count >= MEMO_MAX)
        memo_clear(m);
    e = calloc(1, sizeof *e + n);
    if (!e)
        return NULL;
    e->hash = h;
    e->klen = n;
    memcpy(e->key, k, n);
    size_t b = e->hash % MEMO_BUCKETS;
    e->next = m->buckets[b];
    m->buckets[b] = e;
    m->count++;
    return e;
}

/* A server name's key in the verdict memo: whether the hello named one, then the name
 * (Python's None and "" must not meet). ``key`` holds 1 + 65535 bytes; returns its length. */
static size_t sni_key(unsigned char *key, int has, const unsigned char *name, size_t n) {
    key[0] = (unsigned char)has;
    if (has)
        memcpy(key + 1, name, n);
    return 1 + (has ? n : 0);
}

/* -- connections ----------------------------------------------------------------- */

typedef struct conn conn;

typedef struct {
    conn *c;
    int server;
} endpoint;

typedef struct {
    unsigned char *buf; /* bytes for dst outside the kernel (malloc'd) */
    size_t len, off;
    int eof, done, ready, hup;
    uint64_t moved;     /* bytes read from src while relaying */
    int rfd, wfd;       /* a pipe once the flow splices */
    size_t in_pipe, capacity;
} flow;

struct conn {
    conn *prev, *next;
    uint64_t cid;
    int cfd, sfd, stage;
    endpoint ec, es;
    struct sockaddr_storage peer, dst, nat;
    socklen_t peerlen, dstlen, natlen;
    int64_t accept_us, decide_us;
    int64_t deadline_ms; /* monotonic; 0: none */
    unsigned char *in;
    size_t in_len, in_cap, head_len;
    int eof;             /* the client's FIN seen before the relay */
    int tls;             /* the tunnel started like TLS (fastpath: service "tls") */
    int vid;
    uint64_t from_client, from_server;
    flow up, down;       /* client → server, server → client */
    int local;           /* -1 unknown, else an end is on this host (RelayMode "auto") */
    int cfd_out;         /* the client socket is watched for EPOLLOUT too */
    int dead;
};

typedef struct {
    int type, fd, stage, vid, err, reason, tls;
    uint64_t cid, up, down;
    int64_t ts, ts2, ts_end; /* accept, decision, end (µs UTC; 0: not yet) */
    size_t head_len;
    struct sockaddr_storage peer, dst, nat;
    socklen_t peerlen, dstlen, natlen;
    unsigned char *data;
    size_t len;
} event;

typedef struct {
    PyObject_HEAD
    int lfd, ep, wake, notify;
    int transparent, mode;
    double connect_timeout, first_timeout;
    size_t splice_after, pipe_bytes;
    pthread_t thread;
    int running;
    volatile int stopping;
    pthread_mutex_t lock; /* the memos and the event queue */
    memo heads, snis;
    event *events;
    size_t nevents, cap_events;
    /* the thread's own */
    conn *conns, *graveyard;
    uint64_t next_cid;
    int nconns;
    int accept_paused;
    unsigned char *buf;
    endpoint listen_ep, wake_ep;
    int pushed;
    int64_t notified_ms;
} Passthrough;

static int64_t wall_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static int64_t mono_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* -- events ------------------------------------------------------------------------ */

/* An event about ``c`` (NULL: none), to be completed by the caller and then published. */
static event make_event(int type, const conn *c) {
    event e;
    memset(&e, 0, sizeof e);
    e.type = type;
    e.fd = -1;
    e.vid = -1;
    if (c) {
        e.cid = c->cid;
        e.stage = c->stage;
        e.ts = c->accept_us;
        e.ts2 = c->decide_us;
        e.peer = c->peer;
        e.peerlen = c->peerlen;
        e.dst = c->dst;
        e.dstlen = c->dstlen;
        e.nat = c->nat;
        e.natlen = c->natlen;
        e.head_len = c->head_len;
        e.vid = c->vid;
        e.up = c->from_client;
        e.down = c->from_server;
        e.tls = c->tls;
    }
    return e;
}

/* Append a finished event to the queue; 0 when out of memory (its data freed, its
 * descriptor closed: the connection is lost to the records, never to a leak). */
static int publish(Passthrough *pt, event *e) {
    pthread_mutex_lock(&pt->lock);
    if (pt->nevents == pt->cap_events) {
        size_t cap = pt->cap_events ? pt->cap_events * 2 : 256;
        event *grown = realloc(pt->events, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&pt->lock);
            free(e->data);
            if (e->fd >= 0)
                close(e->fd);
            return 0;
        }
        pt->events = grown;
        pt->cap_events = cap;
    }
    pt->events[pt->nevents++] = *e;
    pthread_mutex_unlock(&pt->lock);
    pt->pushed = 1;
    return 1;
}

/* Wake the Python loop for what was published, at most every NOTIFY_MS (or at once
 * past NOTIFY_EVENTS waiting): a wake-up and a take() cost Python ~15 µs, and a batch
 * of records is written with warm caches (measured: ~116 µs of Python a connection
 * when every connection's events woke the loop alone, on a busy machine). */
static void notify(Passthrough *pt, int now) {
    if (!pt->pushed)
        return;
    int64_t t = mono_ms();
    if (!now && t - pt->notified_ms < NOTIFY_MS && pt->nevents < NOTIFY_EVENTS)
        return;
    pt->notified_ms = t;
    pt->pushed = 0;
    uint64_t one = 1;
    ssize_t w = write(pt->notify, &one, sizeof one);
    (void)w;
}

/* -- the connection's life ------------------------------------------------------------ */

static void unlink_conn(Passthrough *pt, conn *c) {
    if (c->prev)
        c->prev->next = c->next;
    else
        pt->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pt->nconns--;
}

static void free_flow(flow *f) {
    free(f->buf);
    if (f->rfd >= 0) {
        close(f->rfd);
        close(f->wfd);
    }
}

/* A connection that ended is freed after the epoll batch: a later event of the same
 * batch may still name it (its other socket), and is then skipped (``dead``). */
static void free_conn(Passthrough *pt, conn *c) {
    unlink_conn(pt, c);
    c->dead = 1;
    c->next = pt->graveyard;
    pt->graveyard = c;
}

static void bury(Passthrough *pt) {
    while (pt->graveyard) {
        conn *c = pt->graveyard;
        pt->graveyard = c->next;
        free(c->in);
        free_flow(&c->up);
        free_flow(&c->down);
        free(c);
    }
}

/* Close both sockets; the event says why (FINISHED, EARLY, BLOCKED, FAILED). */
static void end_conn(Passthrough *pt, conn *c, int type, int reason, int err) {
    if (c->cfd >= 0)
        close(c->cfd);
    if (c->sfd >= 0)
        close(c->sfd);
    event e = make_event(type, c);
    e.reason = reason;
    e.err = err;
    e.ts_end = wall_us();
    if (type == EV_FAILED || type == EV_BLOCKED) {
        /* their tls record needs the hello */
        e.data = c->in;
        e.len = c->in_len;
        c->in = NULL;
    }
    publish(pt, &e);
    free_conn(pt, c);
}

/* Python takes the connection: the descriptor and everything read from it. */
static void hand_off(Passthrough *pt, conn *c) {
    epoll_ctl(pt->ep, EPOLL_CTL_DEL, c->cfd, NULL);
    event e = make_event(EV_HANDOFF, c);
    e.fd = c->cfd;
    e.data = c->in;
    e.len = c->in_len;
    c->in = NULL;
    publish(pt, &e);
    c->cfd = -1;
    free_conn(pt, c);
}

static int take_in(conn *c, const unsigned char *p, size_t n) {
    if (c->in_len + n > c->in_cap) {
        size_t cap = c->in_cap ? c->in_cap * 2 : 2048;
        while (cap < c->in_len + n)
            cap *= 2;
        unsigned char *grown = realloc(c->in, cap);
        if (!grown)
            return 0;
        c->in = grown;
        c->in_cap = cap;
    }
    memcpy(c->in + c->in_len, p, n);
    c->in_len += n;
    return 1;
}

/* Read what the client sent before the relay (ET: until it is drained); 0: out of memory.
 * A short read drains the socket unless the event said the peer is closing (``hup``):
 * a later segment brings a new edge, so no EAGAIN read is needed to know it. */
static int read_client(Passthrough *pt, conn *c, int hup) {
    while (!c->eof && c->in_len < IN_MAX) {
        size_t want = IN_MAX - c->in_len;
        ssize_t n = recv(c->cfd, pt->buf, want, 0);
        if (n > 0) {
            c->from_client += n;
            if (!take_in(c, pt->buf, n))
                return 0;
            if ((size_t)n < want && !hup)
                return 1;
        } else if (n == 0) {
            c->eof = 1;
        } else if (errno == EINTR) {
            continue;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 1;
        } else {
            /* A reset before any decision: the Python path sees it as the end of the
             * bytes (no data: "fin"; else Python's transport meets the error itself). */
            c->eof = 1;
        }
    }
    return 1;
}

static void start_relay(Passthrough *pt, conn *c);

static void connect_upstream(Passthrough *pt, conn *c) {
    c->decide_us = wall_us();
    int fd = socket(c->dst.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        end_conn(pt, c, EV_FAILED, R_CONNECT, errno);
        return;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* as asyncio's transports do */
    c->sfd = fd;
    if (connect(fd, (struct sockaddr *)&c->dst, c->dstlen) < 0 && errno != EINPROGRESS) {
        end_conn(pt, c, EV_FAILED, R_CONNECT, errno);
        return;
    }
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->es};
    if (epoll_ctl(pt->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
        end_conn(pt, c, EV_FAILED, R_CONNECT, errno);
        return;
    }
    c->stage = ST_CONNECTING;
    c->deadline_ms = mono_ms() + (int64_t)(pt->connect_timeout * 1000);
}

/* The tunnel's first bytes: a hello with a remembered verdict, or Python's. */
static void tunnel(Passthrough *pt, conn *c) {
    if (c->in_len == 0) {
        if (c->eof)
            end_conn(pt, c, EV_EARLY, R_FIN, 0);
        return;
    }
    if (c->in_len >= 3 && c->in[0] == HELLO_HANDSHAKE && c->in[1] == 3)
        c->tls = 1;
    hello_spans h;
    int got = hello_scan(c->in, c->in_len, &h);
    if (got == HELLO_MORE && !c->eof && c->in_len <= HELLO_MAX_BYTES + 1024)
        return; /* the rest is on its way */
    if (got != HELLO_OK) {
        hand_off(pt, c);
        return;
    }
    unsigned char key[1 + 65536];
    size_t klen = sni_key(key, h.has_sni, h.sni.p, h.sni.n);
    pthread_mutex_lock(&pt->lock);
    memo_entry *e = memo_get(&pt->snis, key, klen, 0);
    int kind = e ? e->kind : 0;
    c->vid = e ? e->vid : -1;
    pthread_mutex_unlock(&pt->lock);
    if (kind == KIND_BLOCK) {
        c->decide_us = wall_us();
        ssize_t w = send(c->cfd, ALERT, sizeof ALERT, MSG_NOSIGNAL);
        (void)w;
        end_conn(pt, c, EV_BLOCKED, R_BLOCKED, 0);
    } else if (kind == KIND_PASS) {
        connect_upstream(pt, c);
    } else {
        hand_off(pt, c);
    }
}

/* The first bytes of a new connection (explicit mode): a remembered CONNECT head. */
static void first(Passthrough *pt, conn *c) {
    if (c->in_len == 0) {
        if (c->eof)
            end_conn(pt, c, EV_EARLY, R_FIN, 0);
        return;
    }
    c->deadline_ms = 0; /* it has spoken: no first-bytes limit from here on (as the Python path) */
    if (pt->transparent) {
        if (c->in_len < 3 && !c->eof)
            return;
        c->stage = ST_TUNNEL;
        tunnel(pt, c);
        return;
    }
    static const char verb[] = "CONNECT ";
    size_t vn = c->in_len < 8 ? c->in_len : 8;
    if (memcmp(c->in, verb, vn) != 0) {
        hand_off(pt, c);
        return;
    }
    unsigned char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!end) {
        if (c->eof || c->in_len > HEAD_MAX)
            hand_off(pt, c);
        return;
    }
    size_t head = (size_t)(end - c->in) + 4;
    pthread_mutex_lock(&pt->lock);
    memo_entry *e = memo_get(&pt->heads, c->in, head, 1);
    if (e) {
        c->dst = e->addr;
        c->dstlen = e->addrlen;
    }
    pthread_mutex_unlock(&pt->lock);
    if (!e) {
        hand_off(pt, c);
        return;
    }
    if (send(c->cfd, ESTABLISHED, sizeof ESTABLISHED - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof ESTABLISHED - 1)) {
        hand_off(pt, c); /* the client is gone (or its buffer full, on a fresh socket): Python answers */
        return;
    }
    memmove(c->in, c->in + head, c->in_len - head);
    c->in_len -= head;
    c->head_len = head;
    c->stage = ST_TUNNEL;
    tunnel(pt, c);
}

static void accept_all(Passthrough *pt) {
    while (!pt->accept_paused) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        int fd = accept4(pt->lfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
                pt->accept_paused = 1; /* retried at the next sweep */
            return;
        }
        conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->cid = ++pt->next_cid;
        c->cfd = fd;
        c->sfd = -1;
        c->vid = -1;
        c->local = -1;
        c->up.rfd = c->down.rfd = -1;
        c->ec = (endpoint){c, 0};
        c->es = (endpoint){c, 1};
        c->peer = peer;
        c->peerlen = len;
        c->accept_us = wall_us();
        c->deadline_ms = mono_ms() + (int64_t)(pt->first_timeout * 1000);
        c->next = pt->conns;
        if (pt->conns)
            pt->conns->prev = c;
        pt->conns = c;
        pt->nconns++; /* TCP_NODELAY: inherited from the listening socket (start) */
        if (pt->transparent) {
            /* original_dst.py: the IPv6 table first on an IPv6 socket, then the IPv4 one;
             * none, or our own address (a direct connection: it would loop): Python says so. */
            struct sockaddr_storage own;
            socklen_t ownlen = sizeof own;
            c->dstlen = sizeof c->dst;
            int ok = -1;
            if (peer.ss_family == AF_INET6)
                ok = getsockopt(fd, SOL_IPV6, SO_ORIGINAL_DST_OPT, &c->dst, &c->dstlen);
            if (ok < 0) {
                c->dstlen = sizeof(struct sockaddr_in);
                ok = getsockopt(fd, SOL_IP, SO_ORIGINAL_DST_OPT, &c->dst, &c->dstlen);
            }
            if (ok < 0 || getsockname(fd, (struct sockaddr *)&own, &ownlen) < 0 ||
                (ownlen == c->dstlen && memcmp(&own, &c->dst, ownlen) == 0) ||
                c->dst.ss_family != peer.ss_family) {
                hand_off(pt, c);
                continue;
            }
        }
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = &c->ec};
        if (epoll_ctl(pt->ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            hand_off(pt, c);
            continue;
        }
    }
}

/* -- the relay ------------------------------------------------------------------------ */

static int is_loopback(const struct sockaddr_storage *a) {
    if (a->ss_family == AF_INET)
        return (ntohl(((const struct sockaddr_in *)a)->sin_addr.s_addr) >> 24) == 127;
    if (a->ss_family == AF_INET6) {
        const struct in6_addr *x = &((const struct sockaddr_in6 *)a)->sin6_addr;
        return IN6_IS_ADDR_LOOPBACK(x) || (IN6_IS_ADDR_V4MAPPED(x) && x->s6_addr[12] == 127);
    }
    return 0;
}

static int same_ip(const struct sockaddr_storage *a, const struct sockaddr_storage *b) {
    if (a->ss_family != b->ss_family)
        return 0;
    if (a->ss_family == AF_INET)
        return ((const struct sockaddr_in *)a)->sin_addr.s_addr == ((const struct sockaddr_in *)b)->sin_addr.s_addr;
    return memcmp(&((const struct sockaddr_in6 *)a)->sin6_addr, &((const struct sockaddr_in6 *)b)->sin6_addr,
                  16) == 0;
}

/* relay._on_this_host for either end: asked once a flow has moved SPLICE_AFTER bytes. */
static int on_this_host(conn *c) {
    if (c->local < 0) {
        struct sockaddr_storage own;
        socklen_t len = sizeof own;
        int client_local = is_loopback(&c->peer) ||
                           (getsockname(c->cfd, (struct sockaddr *)&own, &len) == 0 && same_ip(&own, &c->peer));
        c->local = client_local || is_loopback(&c->dst) || same_ip(&c->nat, &c->dst);
    }
    return c->local;
}

static void open_pipe(Passthrough *pt, conn *c, flow *f) {
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0)
        return; /* no descriptors left: this flow keeps copying */
    f->rfd = p[0];
    f->wfd = p[1];
    int got = fcntl(f->wfd, F_SETPIPE_SZ, (int)pt->pipe_bytes);
    f->capacity = got > 0 ? (size_t)got : 65536;
}

static void fail(Passthrough *pt, conn *c) { end_conn(pt, c, EV_FINISHED, R_RST, 0); }

/* dst is full: its EPOLLOUT edge must resume the flow. The upstream socket is watched
 * for it from its connect; the client's only from the first time it fills (one
 * epoll_ctl, and a short connection never fills it). A MOD of a writable socket
 * queues the edge at once, so none is lost. */
static int wait_writable(Passthrough *pt, conn *c, int dst) {
    if (dst != c->cfd || c->cfd_out)
        return 1;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->ec};
    if (epoll_ctl(pt->ep, EPOLL_CTL_MOD, c->cfd, &ev) < 0)
        return 0;
    c->cfd_out = 1;
    return 1;
}

enum { WROTE, FULL, FAILED };

/* What a write of n bytes (send or splice) to dst says: WROTE (n may be 0 after an
 * EINTR), FULL (wait for dst's EPOLLOUT edge) or FAILED (the connection ended, freed). */
static int wrote(Passthrough *pt, conn *c, int dst, ssize_t n) {
    if (n >= 0)
        return WROTE;
    if (errno == EINTR)
        return WROTE;
    if ((errno == EAGAIN || errno == EWOULDBLOCK) && wait_writable(pt, c, dst))
        return FULL;
    fail(pt, c);
    return FAILED;
}

/* One direction: send what is held, then read src and send until src is empty or
 * dst full. Returns 0 when the connection ended (it is freed). */
static int pump(Passthrough *pt, conn *c, flow *f, int src, int dst) {
    uint64_t *count = f == &c->up ? &c->from_client : &c->from_server;
    for (;;) {
        while (f->off < f->len) {
            ssize_t n = send(dst, f->buf + f->off, f->len - f->off, MSG_NOSIGNAL);
            int r = wrote(pt, c, dst, n);
            if (r != WROTE)
                return r == FULL;
            if (n > 0)
                f->off += n;
        }
        if (f->len) {
            free(f->buf);
            f->buf = NULL;
            f->len = f->off = 0;
        }
        while (f->in_pipe) {
            ssize_t n = splice(f->rfd, NULL, dst, NULL, f->in_pipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            int r = wrote(pt, c, dst, n);
            if (r != WROTE)
                return r == FULL;
            if (n > 0)
                f->in_pipe -= n;
        }
        if (f->eof) {
            if (!f->done) {
                shutdown(dst, SHUT_WR); /* half-close (RFC 9293 3.6) */
                f->done = 1;
                if (c->up.done && c->down.done) {
                    end_conn(pt, c, EV_FINISHED, R_FIN, 0);
                    return 0;
                }
            }
            return 1;
        }
        if (!f->ready)
            return 1;
        if (f->rfd < 0 && f->moved >= pt->splice_after && pt->mode != MODE_COPY &&
            (pt->mode == MODE_SPLICE || !on_this_host(c)))
            open_pipe(pt, c, f);
        ssize_t n;
        size_t want = f->rfd >= 0 ? f->capacity : COPY_BYTES;
        if (f->rfd >= 0)
            n = splice(src, NULL, f->wfd, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        else
            n = recv(src, pt->buf, want, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                f->ready = 0;
                return 1;
            }
            fail(pt, c);
            return 0;
        }
        if (n == 0) {
            f->eof = 1;
            continue;
        }
        f->moved += n;
        *count += n;
        if ((size_t)n < want && !f->hup)
            f->ready = 0; /* drained; a later segment (or the FIN) brings a new edge */
        if (f->rfd >= 0) {
            f->in_pipe = n;
            continue;
        }
        ssize_t w = send(dst, pt->buf, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                fail(pt, c);
                return 0;
            }
            w = 0;
        }
        if (w < n) {
            f->buf = malloc(n - w);
            if (!f->buf) {
                fail(pt, c);
                return 0;
            }
            memcpy(f->buf, pt->buf + w, n - w);
            f->len = n - w;
            f->off = 0;
            continue; /* sent from the loop's top, which waits for dst if it is full */
        }
    }
}

static void start_relay(Passthrough *pt, conn *c) {
    c->stage = ST_RELAY;
    c->deadline_ms = 0;
    /* What the client sent after the CONNECT head (the hello, and anything after it) goes first. */
    c->up.buf = c->in;
    c->up.len = c->in_len;
    c->in = NULL;
    c->in_len = c->in_cap = 0;
    c->up.eof = c->eof;
    c->up.ready = !c->eof; /* the client may have sent more while connecting */
    c->down.ready = 1;
    if (!pump(pt, c, &c->up, c->cfd, c->sfd))
        return;
    pump(pt, c, &c->down, c->sfd, c->cfd);
}

/* The connect ended: writable without an error is connected (no SO_ERROR read then). */
static void connected(Passthrough *pt, conn *c, uint32_t events) {
    int err = 0;
    socklen_t len = sizeof err;
    if ((events & (EPOLLERR | EPOLLHUP)) && getsockopt(c->sfd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        err = errno;
    if ((events & (EPOLLERR | EPOLLHUP)) && !err)
        err = ECONNRESET; /* hung up without an error code */
    if (err) {
        end_conn(pt, c, EV_FAILED, R_CONNECT, err);
        return;
    }
    c->natlen = sizeof c->nat;
    getsockname(c->sfd, (struct sockaddr *)&c->nat, &c->natlen);
    event e = make_event(EV_CONNECTED, c);
    if (c->in_len && (e.data = malloc(c->in_len)) != NULL) { /* the tls record's hello */
        memcpy(e.data, c->in, c->in_len);
        e.len = c->in_len;
    }
    publish(pt, &e);
    start_relay(pt, c);
}

static void on_event(Passthrough *pt, endpoint *ep, uint32_t events) {
    conn *c = ep->c;
    int hup = (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0;
    if (c->stage == ST_FIRST || c->stage == ST_TUNNEL) {
        if (!read_client(pt, c, hup)) {
            end_conn(pt, c, EV_EARLY, R_RST, 0);
            return;
        }
        if (c->stage == ST_FIRST)
            first(pt, c);
        else
            tunnel(pt, c);
        return;
    }
    if (c->stage == ST_CONNECTING) {
        if (ep->server) {
            if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
                connected(pt, c, events);
        } else {
            c->up.ready = 1; /* read once the relay starts */
            c->up.hup |= hup;
        }
        return;
    }
    flow *in = ep->server ? &c->down : &c->up;
    flow *out = ep->server ? &c->up : &c->down;
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        in->ready = 1;
        in->hup |= hup;
        if (!pump(pt, c, in, ep->server ? c->sfd : c->cfd, ep->server ? c->cfd : c->sfd))
            return;
    }
    if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP))
        pump(pt, c, out, ep->server ? c->cfd : c->sfd, ep->server ? c->sfd : c->cfd);
}

/* The waits: first bytes (and the hello) within first_timeout, a connect within connect_timeout. */
static void sweep(Passthrough *pt) {
    int64_t now = mono_ms();
    conn *c = pt->conns;
    while (c) {
        conn *next = c->next;
        if (c->deadline_ms && c->deadline_ms <= now) {
            if (c->stage == ST_CONNECTING)
                end_conn(pt, c, EV_FAILED, R_CONNECT, -1);
            else
                end_conn(pt, c, EV_EARLY, R_TIMEOUT, 0);
        }
        c = next;
    }
    if (pt->accept_paused) {
        pt->accept_paused = 0;
        accept_all(pt);
    }
}

static void shutdown_all(Passthrough *pt) {
    while (pt->conns) {
        conn *c = pt->conns;
        end_conn(pt, c, c->stage == ST_RELAY ? EV_FINISHED : EV_EARLY, R_SHUTDOWN, 0);
    }
}

static void *run(void *arg) {
    Passthrough *pt = arg;
    struct epoll_event evs[256];
    int64_t next_sweep = mono_ms() + SWEEP_MS;
    while (!pt->stopping) {
        int n = epoll_wait(pt->ep, evs, 256, pt->pushed ? NOTIFY_MS : SWEEP_MS);
        for (int i = 0; i < n; i++) {
            endpoint *ep = evs[i].data.ptr;
            if (ep == &pt->listen_ep)
                accept_all(pt);
            else if (ep == &pt->wake_ep) {
                uint64_t v;
                ssize_t r = read(pt->wake, &v, sizeof v);
                (void)r;
            } else {
                if (!ep->c->dead)
                    on_event(pt, ep, evs[i].events);
            }
        }
        bury(pt);
        int64_t now = mono_ms();
        if (now >= next_sweep) {
            sweep(pt);
            next_sweep = now + SWEEP_MS;
        }
        notify(pt, 0);
    }
    shutdown_all(pt);
    bury(pt);
    pt->pushed = 1;
    notify(pt, 1);
    return NULL;
}

/* -- the Python type ------------------------------------------------------------------ */

static PyObject *address(const struct sockaddr_storage *a, socklen_t len) {
    char text[INET6_ADDRSTRLEN];
    if (len == 0)
        return Py_BuildValue("(Oi)", Py_None, 0);
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)a;
        inet_ntop(AF_INET, &v4->sin_addr, text, sizeof text);
        return Py_BuildValue("(si)", text, ntohs(v4->sin_port));
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)a;
        if (IN6_IS_ADDR_V4MAPPED(&v6->sin6_addr)) /* fastpath._plain_ip */
            inet_ntop(AF_INET, &v6->sin6_addr.s6_addr[12], text, sizeof text);
        else
            inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof text);
        return Py_BuildValue("(si)", text, ntohs(v6->sin6_port));
    }
    return Py_BuildValue("(Oi)", Py_None, 0);
}

static PyObject *event_tuple(const event *e) {
    PyObject *data = e->data ? PyBytes_FromStringAndSize((const char *)e->data, e->len) : Py_NewRef(Py_None);
    PyObject *peer = address(&e->peer, e->peerlen);
    PyObject *dst = address(&e->dst, e->dstlen);
    PyObject *nat = address(&e->nat, e->natlen);
    if (!data || !peer || !dst || !nat) {
        Py_XDECREF(data);
        Py_XDECREF(peer);
        Py_XDECREF(dst);
        Py_XDECREF(nat);
        return NULL;
    }
    return Py_BuildValue("(iKiiiiLLNNNNnKKiiL)", e->type, (unsigned long long)e->cid, e->fd, e->stage, e->reason,
                         e->err, (long long)e->ts, (long long)e->ts2, peer, dst, nat, data, (Py_ssize_t)e->head_len,
                         (unsigned long long)e->up, (unsigned long long)e->down, e->vid, e->tls, (long long)e->ts_end);
}

static void drop_events(event *events, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(events[i].data);
        if (events[i].fd >= 0)
            close(events[i].fd);
    }
    free(events);
}

static PyObject *pt_take(Passthrough *pt, PyObject *unused) {
    uint64_t v;
    ssize_t r = read(pt->notify, &v, sizeof v); /* re-armed: the next batch wakes the loop again */
    (void)r;
    pthread_mutex_lock(&pt->lock);
    event *events = pt->events;
    size_t n = pt->nevents;
    pt->events = NULL;
    pt->nevents = pt->cap_events = 0;
    pthread_mutex_unlock(&pt->lock);
    PyObject *out = PyList_New((Py_ssize_t)n);
    if (!out) {
        drop_events(events, n);
        return NULL;
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *t = event_tuple(&events[i]);
        if (!t) {
            Py_DECREF(out);
            drop_events(events, n);
            return NULL;
        }
        events[i].fd = -1; /* Python owns it now */
        PyList_SET_ITEM(out, (Py_ssize_t)i, t);
    }
    drop_events(events, n);
    return out;
}

static int to_sockaddr(const char *ip, int port, struct sockaddr_storage *out, socklen_t *len) {
    memset(out, 0, sizeof *out);
    struct sockaddr_in *v4 = (struct sockaddr_in *)out;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)out;
    if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        *len = sizeof *v4;
        return 1;
    }
    if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        *len = sizeof *v6;
        return 1;
    }
    return 0;
}

static PyObject *pt_remember_head(Passthrough *pt, PyObject *args) {
    Py_buffer head;
    const char *ip;
    int port;
    if (!PyArg_ParseTuple(args, "y*si", &head, &ip, &port))
        return NULL;
    struct sockaddr_storage addr;
    socklen_t len;
    if (port < 1 || port > 65535 || head.len > HEAD_MAX || !to_sockaddr(ip, port, &addr, &len)) {
        PyBuffer_Release(&head);
        PyErr_Format(PyExc_ValueError, "not an address literal and port: %s %d", ip, port);
        return NULL;
    }
    pthread_mutex_lock(&pt->lock);
    memo_entry *e = memo_put(&pt->heads, head.buf, (size_t)head.len, 1);
    if (e) {
        e->addr = addr;
        e->addrlen = len;
    }
    pthread_mutex_unlock(&pt->lock);
    PyBuffer_Release(&head);
    if (!e)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *pt_remember_sni(Passthrough *pt, PyObject *args) {
    PyObject *sni;
    int kind, vid;
    if (!PyArg_ParseTuple(args, "Oii", &sni, &kind, &vid))
        return NULL;
    if (kind != KIND_PASS && kind != KIND_BLOCK) {
        PyErr_SetString(PyExc_ValueError, "kind is PASS or BLOCK");
        return NULL;
    }
    unsigned char key[1 + 65536];
    const char *text = NULL;
    Py_ssize_t len = 0;
    if (sni != Py_None) {
        text = PyUnicode_Check(sni) ? PyUnicode_AsUTF8AndSize(sni, &len) : NULL;
        if (!text)
            return PyErr_Occurred() ? NULL : (PyErr_SetString(PyExc_TypeError, "sni is a str or None"), NULL);
        if ((size_t)len > 65535) {
            PyErr_SetString(PyExc_ValueError, "server name too long");
            return NULL;
        }
    }
    size_t klen = sni_key(key, text != NULL, (const unsigned char *)text, (size_t)len);
    pthread_mutex_lock(&pt->lock);
    memo_entry *e = memo_put(&pt->snis, key, klen, 0);
    if (e) {
        e->kind = kind;
        e->vid = vid;
    }
    pthread_mutex_unlock(&pt->lock);
    if (!e)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *pt_forget(Passthrough *pt, PyObject *unused) {
    pthread_mutex_lock(&pt->lock);
    memo_clear(&pt->snis);
    pthread_mutex_unlock(&pt->lock);
    Py_RETURN_NONE;
}

static PyObject *pt_fileno(Passthrough *pt, PyObject *unused) { return PyLong_FromLong(pt->notify); }

static PyObject *pt_start(Passthrough *pt, PyObject *unused) {
    if (pt->running) {
        PyErr_SetString(PyExc_RuntimeError, "already started");
        return NULL;
    }
    /* Accepted sockets inherit it (Linux): one setsockopt for all, as asyncio sets on each. */
    int one = 1;
    setsockopt(pt->lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.ptr = &pt->listen_ep};
    if (epoll_ctl(pt->ep, EPOLL_CTL_ADD, pt->lfd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int err = pthread_create(&pt->thread, NULL, run, pt);
    if (err) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    pt->running = 1;
    Py_RETURN_NONE;
}

static void stop_thread(Passthrough *pt) {
    if (!pt->running)
        return;
    pt->stopping = 1;
    uint64_t one = 1;
    ssize_t w = write(pt->wake, &one, sizeof one);
    (void)w;
    Py_BEGIN_ALLOW_THREADS pthread_join(pt->thread, NULL);
    Py_END_ALLOW_THREADS pt->running = 0;
    epoll_ctl(pt->ep, EPOLL_CTL_DEL, pt->lfd, NULL);
}

static PyObject *pt_stop(Passthrough *pt, PyObject *unused) {
    stop_thread(pt);
    Py_RETURN_NONE;
}

static PyObject *pt_active(Passthrough *pt, void *closure) {
    return PyLong_FromLong(pt->running ? pt->nconns : 0);
}

static int pt_init(Passthrough *pt, PyObject *args, PyObject *kw) {
    static char *names[] = {"listen_fd", "transparent", "connect_timeout", "first_timeout", "mode",
                            "splice_after", "pipe_bytes", NULL};
    Py_ssize_t splice_after = 256 * 1024, pipe_bytes = 256 * 1024;
    pt->mode = MODE_AUTO;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "ipdd|inn", names, &pt->lfd, &pt->transparent, &pt->connect_timeout,
                                     &pt->first_timeout, &pt->mode, &splice_after, &pipe_bytes))
        return -1;
    if (pt->mode < MODE_AUTO || pt->mode > MODE_COPY || splice_after < 0 || pipe_bytes < 4096) {
        PyErr_SetString(PyExc_ValueError, "mode is 0 (auto), 1 (splice) or 2 (copy)");
        return -1;
    }
    pt->splice_after = (size_t)splice_after;
    pt->pipe_bytes = (size_t)pipe_bytes;
    if (pt->ep >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "already initialised");
        return -1;
    }
    pt->buf = malloc(COPY_BYTES > IN_MAX ? COPY_BYTES : IN_MAX);
    pt->ep = epoll_create1(EPOLL_CLOEXEC);
    pt->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    pt->notify = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!pt->buf || pt->ep < 0 || pt->wake < 0 || pt->notify < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pt->listen_ep.c = NULL;
    pt->wake_ep.c = NULL;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &pt->wake_ep};
    if (epoll_ctl(pt->ep, EPOLL_CTL_ADD, pt->wake, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *pt_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Passthrough *pt = (Passthrough *)type->tp_alloc(type, 0);
    if (!pt)
        return NULL;
    pt->ep = pt->wake = pt->notify = pt->lfd = -1;
    pthread_mutex_init(&pt->lock, NULL);
    return (PyObject *)pt;
}

static void pt_dealloc(Passthrough *pt) {
    stop_thread(pt);
    drop_events(pt->events, pt->nevents);
    memo_clear(&pt->heads);
    memo_clear(&pt->snis);
    free(pt->buf);
    if (pt->ep >= 0)
        close(pt->ep);
    if (pt->wake >= 0)
        close(pt->wake);
    if (pt->notify >= 0)
        close(pt->notify);
    pthread_mutex_destroy(&pt->lock);
    Py_TYPE(pt)->tp_free((PyObject *)pt);
}

static PyMethodDef pt_methods[] = {
    {"start", (PyCFunction)pt_start, METH_NOARGS, "start the thread: from now on it accepts"},
    {"stop", (PyCFunction)pt_stop, METH_NOARGS,
     "end every connection it carries (their events say shutdown) and join the thread"},
    {"take", (PyCFunction)pt_take, METH_NOARGS, "the events since the last take(), as tuples"},
    {"fileno", (PyCFunction)pt_fileno, METH_NOARGS, "an eventfd, readable when events wait"},
    {"remember_head", (PyCFunction)pt_remember_head, METH_VARARGS,
     "remember_head(head, ip, port): a CONNECT head answered with 200, tunnelling to ip:port"},
    {"remember_sni", (PyCFunction)pt_remember_sni, METH_VARARGS,
     "remember_sni(sni or None, kind, vid): the verdict on a server name (1 pass, 2 block)"},
    {"forget", (PyCFunction)pt_forget, METH_NOARGS, "forget every server name's verdict (another Engine)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef pt_members[] = {
    {"connect_timeout", T_DOUBLE, offsetof(Passthrough, connect_timeout), 0,
     "seconds a connect may take (read when one starts)"},
    {"first_timeout", T_DOUBLE, offsetof(Passthrough, first_timeout), 0,
     "seconds a new connection may stay silent (read at each accept)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef pt_getset[] = {
    {"active", (getter)pt_active, NULL, "connections the thread carries now (approximate)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject PassthroughType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "proxy._passthrough.Passthrough",
    .tp_basicsize = sizeof(Passthrough),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The fast path's TLS passthrough in C (proxy/_passthrough.c).",
    .tp_new = pt_new,
    .tp_init = (initproc)pt_init,
    .tp_dealloc = (destructor)pt_dealloc,
    .tp_methods = pt_methods,
    .tp_getset = pt_getset,
    .tp_members = pt_members,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._passthrough", "The fast path's TLS passthrough in C.", -1, NULL,
};

PyMODINIT_FUNC PyInit__passthrough(void) {
    if (PyType_Ready(&PassthroughType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Passthrough", (PyObject *)&PassthroughType) < 0 ||
        PyModule_AddIntConstant(m, "HANDOFF", EV_HANDOFF) < 0 ||
        PyModule_AddIntConstant(m, "CONNECTED", EV_CONNECTED) < 0 ||
        PyModule_AddIntConstant(m, "BLOCKED", EV_BLOCKED) < 0 || PyModule_AddIntConstant(m, "FAILED", EV_FAILED) < 0 ||
        PyModule_AddIntConstant(m, "FINISHED", EV_FINISHED) < 0 || PyModule_AddIntConstant(m, "EARLY", EV_EARLY) < 0 ||
        PyModule_AddIntConstant(m, "FIRST", ST_FIRST) < 0 || PyModule_AddIntConstant(m, "TUNNEL", ST_TUNNEL) < 0 ||
        PyModule_AddIntConstant(m, "CONNECTING", ST_CONNECTING) < 0 ||
        PyModule_AddIntConstant(m, "RELAY", ST_RELAY) < 0 || PyModule_AddIntConstant(m, "FIN", R_FIN) < 0 ||
        PyModule_AddIntConstant(m, "RST", R_RST) < 0 || PyModule_AddIntConstant(m, "TIMEOUT", R_TIMEOUT) < 0 ||
        PyModule_AddIntConstant(m, "SHUTDOWN", R_SHUTDOWN) < 0 ||
        PyModule_AddIntConstant(m, "BLOCK_REASON", R_BLOCKED) < 0 ||
        PyModule_AddIntConstant(m, "CONNECT_ERROR", R_CONNECT) < 0 || PyModule_AddIntConstant(m, "PASS", KIND_PASS) < 0 ||
        PyModule_AddIntConstant(m, "BLOCK", KIND_BLOCK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
