/* The DNS shim's compiled hit path: answer repeated questions without Python.
 *
 * serve(fd, table, records, seq, max) reads up to `max` datagrams from the
 * non-blocking UDP socket `fd` with one recvmmsg(2). Each datagram's key is
 *     family byte (4 or 6) + the client's packed address + the datagram minus its id
 * and `table` (a dict filled by proxy/dns_hits.py) maps a key to
 *     (body: bytes, template: int, valid_until: float, monotonic clock)
 * or, for an answer whose TTLs age (a cache entry's),
 *     (body, template, valid_until, stored: float, ttls: bytes; see aged())
 * A datagram whose key is there and still valid is answered with its own id +
 * `body`, TTLs aged (one sendmmsg(2) for the batch) and leaves a fixed-size hit record in
 * the bytearray `records` (HIT_RECORD in dns_hits.py: ts µs, uid sequence,
 * template, client port, DNS id, latency µs, little-endian). Every other
 * datagram goes back to Python untouched, as (data, address) like recvfrom's.
 *
 * Why: on a cache hit the Python path costs ~20 µs of CPU (a loop callback,
 * a recvfrom and a sendto, the parse, the verdict and cache lookups, the
 * record); here a hit is a dict lookup and a share of two system calls.
 * The table never decides anything: Python puts an answer there only after
 * answering that same question from that same client the full way, and only
 * until the answer would change otherwise than by its TTLs ageing (the cache
 * entry's expiry); a rule reload clears it.
 *
 * Returns (misses, seq_after, hits, unsent, more): `unsent` counts answers the
 * socket refused (send buffer full: UDP may lose them, the client retries),
 * `more` is true when the batch was full (more datagrams may be waiting). The GIL is held throughout: the
 * socket is non-blocking and the calls are short.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define MAX_BATCH 64
#define MAX_PKT 4096 /* proxy/dns_shim.py MAX_UDP_QUERY */
#define KEY_MAX (1 + 16 + MAX_PKT)
#define RECORD_SIZE 28

static char rbuf[MAX_BATCH][MAX_PKT];
static struct sockaddr_storage raddr[MAX_BATCH];
static struct iovec riov[MAX_BATCH];
static struct mmsghdr rmsg[MAX_BATCH];
static struct mmsghdr smsg[MAX_BATCH];
static struct iovec siov[MAX_BATCH][2];
static PyObject *held[MAX_BATCH];
static unsigned char keybuf[KEY_MAX];
static char sbuf[MAX_BATCH][MAX_PKT]; /* aged answers (aged()) */

static double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long long wall_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static unsigned long long get_le(const unsigned char *p, int n) {
    unsigned long long v = 0;
    for (int i = n - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static void put_le(unsigned char *p, unsigned long long v, int n) {
    for (int i = 0; i < n; i++) {
        p[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* family byte + packed address; returns its length, 0 for a family we do not key. */
static Py_ssize_t addr_key(const struct sockaddr_storage *sa, unsigned char *out, int *port) {
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        out[0] = 4;
        memcpy(out + 1, &s4->sin_addr, 4);
        *port = ntohs(s4->sin_port);
        return 5;
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        if (s6->sin6_scope_id != 0)
            return 0; /* Python's key is built from the text form, which carries the scope */
        out[0] = 6;
        memcpy(out + 1, &s6->sin6_addr, 16);
        *port = ntohs(s6->sin6_port);
        return 17;
    }
    return 0;
}

/* The address tuple socket.recvfrom would give. */
static PyObject *addr_tuple(const struct sockaddr_storage *sa) {
    char text[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, text, sizeof text);
        return Py_BuildValue("(si)", text, ntohs(s4->sin_port));
    }
    if (sa->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, text, sizeof text);
        return Py_BuildValue("(siII)", text, ntohs(s6->sin6_port),
                             (unsigned int)ntohl(s6->sin6_flowinfo), (unsigned int)s6->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* `body` into sbuf[h] with its TTLs aged as proxy/dns_fastpath.py CachedWire.aged_body
 * does: `ttls` holds (offset in body, TTL when stored) as little-endian u32 pairs, and
 * each TTL drops by the whole seconds since `stored`, down to 0. 0, or -1 where the
 * answer cannot be aged here (Python's turn). */
static int aged(int h, PyObject *body, double stored, PyObject *ttls, double now) {
    Py_ssize_t n = PyBytes_GET_SIZE(body), m = PyBytes_GET_SIZE(ttls);
    if (n > MAX_PKT || m % 8 != 0)
        return -1;
    memcpy(sbuf[h], PyBytes_AS_STRING(body), (size_t)n);
    long long age = now > stored ? (long long)(now - stored) : 0;
    const unsigned char *t = (const unsigned char *)PyBytes_AS_STRING(ttls);
    for (Py_ssize_t k = 0; k < m; k += 8) {
        unsigned long long off = get_le(t + k, 4), ttl = get_le(t + k + 4, 4);
        if (off + 4 > (unsigned long long)n)
            return -1;
        unsigned long long v = (long long)ttl > age ? ttl - (unsigned long long)age : 0;
        unsigned char *p = (unsigned char *)sbuf[h] + off;
        p[0] = (unsigned char)(v >> 24);
        p[1] = (unsigned char)(v >> 16);
        p[2] = (unsigned char)(v >> 8);
        p[3] = (unsigned char)v;
    }
    return 0;
}

/* The table's answer for datagram i as hit h, or NULL (a new reference to the body on
 * success; *out points at the bytes to send: the body's, or sbuf[h] aged). */
static PyObject *lookup(PyObject *table, int i, int h, unsigned int len, double now, unsigned long *tid,
                        int *port, const char **out) {
    if (len < 12)
        return NULL;
    Py_ssize_t k = addr_key(&raddr[i], keybuf, port);
    if (k == 0)
        return NULL;
    memcpy(keybuf + k, rbuf[i] + 2, len - 2);
    PyObject *key = PyBytes_FromStringAndSize((const char *)keybuf, k + len - 2);
    if (key == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *val = PyDict_GetItemWithError(table, key);
    Py_DECREF(key);
    if (val == NULL) {
        PyErr_Clear();
        return NULL;
    }
    if (!PyTuple_CheckExact(val) || (PyTuple_GET_SIZE(val) != 3 && PyTuple_GET_SIZE(val) != 5))
        return NULL;
    PyObject *body = PyTuple_GET_ITEM(val, 0);
    PyObject *t = PyTuple_GET_ITEM(val, 1);
    PyObject *until = PyTuple_GET_ITEM(val, 2);
    if (!PyBytes_CheckExact(body) || !PyLong_CheckExact(t) || !PyFloat_CheckExact(until))
        return NULL;
    if (PyFloat_AS_DOUBLE(until) <= now)
        return NULL;
    *out = PyBytes_AS_STRING(body);
    if (PyTuple_GET_SIZE(val) == 5) {
        PyObject *stored = PyTuple_GET_ITEM(val, 3), *ttls = PyTuple_GET_ITEM(val, 4);
        if (!PyFloat_CheckExact(stored) || !PyBytes_CheckExact(ttls) ||
            aged(h, body, PyFloat_AS_DOUBLE(stored), ttls, now) < 0)
            return NULL;
        *out = sbuf[h];
    }
    *tid = PyLong_AsUnsignedLong(t);
    if (*tid == (unsigned long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return NULL;
    }
    Py_INCREF(body);
    return body;
}

static PyObject *serve(PyObject *self, PyObject *args) {
    int fd, max;
    PyObject *table;
    PyObject *records;
    unsigned long long seq;
    if (!PyArg_ParseTuple(args, "iO!O!Ki", &fd, &PyDict_Type, &table, &PyByteArray_Type, &records,
                          &seq, &max))
        return NULL;
    if (max < 1 || max > MAX_BATCH)
        max = MAX_BATCH;
    for (int i = 0; i < max; i++) {
        riov[i].iov_base = rbuf[i];
        riov[i].iov_len = MAX_PKT;
        memset(&rmsg[i].msg_hdr, 0, sizeof rmsg[i].msg_hdr);
        rmsg[i].msg_hdr.msg_iov = &riov[i];
        rmsg[i].msg_hdr.msg_iovlen = 1;
        rmsg[i].msg_hdr.msg_name = &raddr[i];
        rmsg[i].msg_hdr.msg_namelen = sizeof raddr[i];
    }
    int n = recvmmsg(fd, rmsg, (unsigned int)max, MSG_DONTWAIT, NULL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return Py_BuildValue("([]KiiO)", seq, 0, 0, Py_False);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    double now = mono_now();
    long long ts = wall_us();
    PyObject *misses = PyList_New(0);
    if (misses == NULL)
        return NULL;
    int hits = 0;
    unsigned long tids[MAX_BATCH];
    int ports[MAX_BATCH];
    int slot[MAX_BATCH];
    for (int i = 0; i < n; i++) {
        unsigned int len = rmsg[i].msg_len;
        int port = 0;
        unsigned long tid = 0;
        const char *answer = NULL;
        PyObject *body = lookup(table, i, hits, len, now, &tid, &port, &answer);
        if (body != NULL) {
            held[hits] = body;
            tids[hits] = tid;
            ports[hits] = port;
            slot[hits] = i;
            siov[hits][0].iov_base = rbuf[i];
            siov[hits][0].iov_len = 2;
            siov[hits][1].iov_base = (void *)answer;
            siov[hits][1].iov_len = (size_t)PyBytes_GET_SIZE(body);
            memset(&smsg[hits].msg_hdr, 0, sizeof smsg[hits].msg_hdr);
            smsg[hits].msg_hdr.msg_iov = siov[hits];
            smsg[hits].msg_hdr.msg_iovlen = 2;
            smsg[hits].msg_hdr.msg_name = &raddr[i];
            smsg[hits].msg_hdr.msg_namelen = rmsg[i].msg_hdr.msg_namelen;
            hits++;
            continue;
        }
        PyObject *data = PyBytes_FromStringAndSize(rbuf[i], len > MAX_PKT ? MAX_PKT : len);
        PyObject *addr = data ? addr_tuple(&raddr[i]) : NULL;
        PyObject *pair = addr ? PyTuple_Pack(2, data, addr) : NULL;
        Py_XDECREF(data);
        Py_XDECREF(addr);
        if (pair == NULL || PyList_Append(misses, pair) < 0) {
            Py_XDECREF(pair);
            goto fail;
        }
        Py_DECREF(pair);
    }
    if (hits) {
        /* Records first: nothing is answered that is not recorded (DESIGN.md principles). */
        Py_ssize_t old = PyByteArray_GET_SIZE(records);
        if (PyByteArray_Resize(records, old + (Py_ssize_t)hits * RECORD_SIZE) < 0)
            goto fail;
        unsigned char *p = (unsigned char *)PyByteArray_AS_STRING(records) + old;
        long long lat = (long long)((mono_now() - now) * 1e6);
        if (lat < 0)
            lat = 0;
        for (int h = 0; h < hits; h++, p += RECORD_SIZE) {
            const unsigned char *q = (const unsigned char *)rbuf[slot[h]];
            put_le(p, (unsigned long long)ts, 8);
            put_le(p + 8, seq++, 8);
            put_le(p + 16, tids[h], 4);
            put_le(p + 20, (unsigned long long)ports[h], 2);
            put_le(p + 22, (unsigned long long)((q[0] << 8) | q[1]), 2);
            put_le(p + 24, (unsigned long long)lat, 4);
        }
        int sent = 0;
        while (sent < hits) {
            int r = sendmmsg(fd, smsg + sent, (unsigned int)(hits - sent), MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                break; /* send buffer full or an error: UDP may lose an answer; the client retries */
            }
            if (r == 0)
                break;
            sent += r;
        }
        for (int h = 0; h < hits; h++)
            Py_DECREF(held[h]);
        return Py_BuildValue("(NKiiO)", misses, seq, hits, hits - sent, n == max ? Py_True : Py_False);
    }
    return Py_BuildValue("(NKiiO)", misses, seq, 0, 0, n == max ? Py_True : Py_False);
fail:
    for (int h = 0; h < hits; h++)
        Py_DECREF(held[h]);
    Py_DECREF(misses);
    return NULL;
}

static PyMethodDef methods[] = {
    {"serve", serve, METH_VARARGS,
     "serve(fd, table, records, seq, max) -> (misses, seq_after, hits, unsent, more)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "proxy._dnshits", "The DNS shim's compiled hit path.", -1, methods,
};

PyMODINIT_FUNC PyInit__dnshits(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "RECORD_SIZE", RECORD_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
