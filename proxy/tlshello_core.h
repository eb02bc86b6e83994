/* The ClientHello walk shared by proxy/_tlshello.c and proxy/_passthrough.c.
 *
 * No Python objects: it only finds where the three extensions that matter lie
 * (server_name, ALPN, supported_versions) and checks their structure as
 * proxy/tlshello.py's _parse_body(..., complete=True) would, so that either C
 * caller answers exactly when the Python parser would answer cleanly, and
 * defers (returns HELLO_DEFER) in every other case: a hello split over
 * records, a malformed field, a non-ASCII server name. Kept in one place so
 * that the passthrough's SNI (the key of its verdict memo) and the one the
 * Python path decides on can never differ.
 */
#ifndef LINEWARDEN_TLSHELLO_CORE_H
#define LINEWARDEN_TLSHELLO_CORE_H

#include <stddef.h>

#define HELLO_HANDSHAKE 22
#define HELLO_CLIENT_HELLO 1
#define HELLO_EXT_SERVER_NAME 0
#define HELLO_EXT_ALPN 16
#define HELLO_EXT_SUPPORTED_VERSIONS 43
#define HELLO_MAX_BYTES (64 * 1024)   /* tlshello.MAX_CLIENT_HELLO_BYTES */
#define HELLO_MAX_RECORD (16384 + 2048) /* tlshello._MAX_RECORD */

#define HELLO_OK 1
#define HELLO_MORE 0   /* the first record is not whole yet */
#define HELLO_DEFER -1 /* the Python parser must answer (or it is not a hello at all) */

typedef struct {
    const unsigned char *p;
    size_t n;
} hello_span;

typedef struct {
    int has_sni;
    hello_span sni;      /* the first host_name of the last server_name extension (ASCII) */
    int has_alpn;
    hello_span alpn;     /* the last ALPN extension's protocol_name_list body */
    int has_versions;
    hello_span versions; /* the last supported_versions extension's list body */
    unsigned legacy_version;
    size_t record_end;   /* bytes of the stream the first record takes (its header included) */
} hello_spans;

static inline unsigned hello_u16(const unsigned char *p) { return ((unsigned)p[0] << 8) | p[1]; }

/* tlshello._vector: the body of a vector with an `lenbytes` length prefix; 0 when short. */
static inline int hello_vector(hello_span ext, int lenbytes, hello_span *out) {
    if (ext.n < (size_t)lenbytes)
        return 0;
    size_t len = lenbytes == 1 ? ext.p[0] : hello_u16(ext.p);
    if (lenbytes + len > ext.n)
        return 0;
    out->p = ext.p + lenbytes;
    out->n = len;
    return 1;
}

/* tlshello._server_name: 1 with *has and *name set; 0: defer. */
static inline int hello_server_name(hello_span ext, int *has, hello_span *name) {
    hello_span names;
    if (!hello_vector(ext, 2, &names))
        return 0;
    size_t i = 0;
    while (i < names.n) {
        if (i + 3 > names.n)
            return 0;
        unsigned kind = names.p[i];
        size_t size = hello_u16(names.p + i + 1);
        i += 3;
        if (i + size > names.n)
            return 0;
        if (kind == 0) {
            for (size_t k = 0; k < size; k++) {
                if (names.p[i + k] >= 0x80)
                    return 0; /* not ASCII: Python raises its InputError */
            }
            *has = 1;
            name->p = names.p + i;
            name->n = size;
            return 1;
        }
        i += size;
    }
    *has = 0;
    return 1;
}

/* tlshello._alpn's structure: each protocol name inside the list. */
static inline int hello_alpn(hello_span ext, hello_span *list) {
    if (!hello_vector(ext, 2, list))
        return 0;
    size_t i = 0;
    while (i < list->n) {
        size_t end = i + 1 + list->p[i];
        if (end > list->n)
            return 0;
        i = end;
    }
    return 1;
}

/* The fields after legacy_version and random, RFC 8446 4.1.2; the extensions walked. */
static inline int hello_body(hello_span b, hello_spans *out) {
    const unsigned char *p = b.p;
    size_t n = b.n, i, size;
    if (n < 34)
        return HELLO_DEFER;
    out->legacy_version = hello_u16(p);
    i = 34;
    if (i >= n)
        return HELLO_DEFER;
    size = p[i++]; /* session id */
    if (i + size > n || size > 32)
        return HELLO_DEFER;
    i += size;
    if (i + 2 > n)
        return HELLO_DEFER;
    size = hello_u16(p + i); /* cipher suites */
    i += 2;
    if (i + size > n || size % 2)
        return HELLO_DEFER;
    i += size;
    if (i >= n)
        return HELLO_DEFER;
    i += 1 + p[i]; /* compression methods */
    if (i > n)
        return HELLO_DEFER;
    if (i == n)
        return HELLO_OK;
    if (i + 2 > n)
        return HELLO_DEFER;
    size_t ext_len = hello_u16(p + i);
    i += 2;
    if (n - i < ext_len)
        return HELLO_DEFER;
    size_t end = i + ext_len;
    while (i < end) {
        if (i + 4 > end)
            return HELLO_DEFER;
        unsigned etype = hello_u16(p + i);
        size = hello_u16(p + i + 2);
        i += 4;
        if (i + size > end)
            return HELLO_DEFER;
        hello_span ext = {p + i, size};
        i += size;
        /* A repeated extension replaces what the earlier gave (the Python parser's assignments). */
        if (etype == HELLO_EXT_SERVER_NAME) {
            if (!hello_server_name(ext, &out->has_sni, &out->sni))
                return HELLO_DEFER;
        } else if (etype == HELLO_EXT_ALPN) {
            if (!hello_alpn(ext, &out->alpn))
                return HELLO_DEFER;
            out->has_alpn = 1;
        } else if (etype == HELLO_EXT_SUPPORTED_VERSIONS) {
            if (!hello_vector(ext, 1, &out->versions))
                return HELLO_DEFER;
            out->has_versions = 1;
        }
    }
    return HELLO_OK;
}

/* tlshello._handshake_body's one slice: the whole ClientHello in the first record.
 * HELLO_MORE while that record may still be coming (the stream is its start). */
static inline int hello_scan(const unsigned char *d, size_t len, hello_spans *out) {
    *out = (hello_spans){0};
    if (len < 9) {
        if (len >= 1 && d[0] != HELLO_HANDSHAKE)
            return HELLO_DEFER;
        if (len >= 2 && d[1] != 3)
            return HELLO_DEFER;
        if (len >= 6 && d[5] != HELLO_CLIENT_HELLO)
            return HELLO_DEFER;
        return HELLO_MORE;
    }
    if (d[0] != HELLO_HANDSHAKE || d[1] != 3 || d[5] != HELLO_CLIENT_HELLO)
        return HELLO_DEFER;
    size_t rlen = hello_u16(d + 3);
    size_t mlen = ((size_t)d[6] << 16) | ((size_t)d[7] << 8) | d[8];
    if (!(4 + mlen <= rlen && rlen <= HELLO_MAX_RECORD && mlen <= HELLO_MAX_BYTES))
        return HELLO_DEFER;
    if (len < 5 + rlen)
        return HELLO_MORE;
    out->record_end = 5 + rlen;
    hello_span body = {d + 9, mlen};
    return hello_body(body, out);
}

#endif
